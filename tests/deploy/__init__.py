"""Static checks of docker/ (images, compose, Kubernetes manifests): no docker engine needed."""

from __future__ import annotations

import re

from tests.conftest import REPO_ROOT


def requirement_pin(package: str) -> str:
    """The version requirements.txt pins ``package`` to (with or without extras)."""
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        match = re.match(rf"^{re.escape(package)}(\[[^\]]*\])?==([^\s#]+)", line)
        if match:
            return match.group(2)
    raise AssertionError(f"requirements.txt pins no {package}")
