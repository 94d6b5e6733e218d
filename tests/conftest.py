"""Shared test fixtures: isolated settings and sample data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pandas as pd
import pytest

from ml.sample_data import AGNEWS_SAMPLE, NEWSGROUPS_SAMPLE

# Great Expectations must not try to phone home from tests either.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
# The venv's tools first, as `make` sets them: DeepSpeed JIT-builds its CPU comm op with the
# `ninja` on PATH and rebuilds it (a minute or two) whenever another ninja built the cached one.
_VENV_BIN = str(Path(sys.executable).parent)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _VENV_BIN:
    os.environ["PATH"] = os.pathsep.join([_VENV_BIN, os.environ.get("PATH", "")])

REPO_ROOT = Path(__file__).resolve().parent.parent
# The sample data shipped in data/ (see data/README.md): a plain clone has all the tests need.
AGNEWS = AGNEWS_SAMPLE
NEWSGROUPS = NEWSGROUPS_SAMPLE


@pytest.fixture(scope="session")
def agnews() -> pd.DataFrame:
    if not AGNEWS.exists():
        pytest.fail(f"{AGNEWS} is missing: it ships with the repository (data/README.md)")
    return pd.read_csv(AGNEWS)


@pytest.fixture
def small_batch(agnews: pd.DataFrame) -> pd.DataFrame:
    """40 real AG News rows, 10 per class."""
    return agnews.groupby("label", group_keys=False).head(10).reset_index(drop=True)
