"""Write the docker images' requirement files from requirements.txt, or check they are current.

requirements.txt is the one list of pins. A line ending in ``# images: ray airflow[default]``
goes into ``docker/requirements-ray.txt`` as written and into ``docker/requirements-airflow.txt``
as ``ray[default]==...`` (the same pin, other extras). Lines without ``# images:`` (tests, lint,
the local S3 stand-in) stay out of every image::

    python scripts/image_requirements.py           # rewrite docker/requirements-*.txt
    python scripts/image_requirements.py --check   # exit 1 if one is stale (a test runs this)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements.txt"
DOCKER = ROOT / "docker"
IMAGES = ("airflow", "ray", "mlflow")
_LINE = re.compile(r"^(?P<name>[A-Za-z0-9._-]+)(?:\[(?P<extras>[^\]]*)\])?==(?P<version>\S+)")
_IMAGE = re.compile(r"^(?P<image>[a-z]+)(?:\[(?P<extras>[^\]]*)\])?$")


def image_pins(requirements: str = "") -> dict[str, list[str]]:
    """``{image: ["name[extras]==version", ...]}`` from the ``# images:`` annotations."""
    text = requirements or REQUIREMENTS.read_text()
    pins: dict[str, list[str]] = {image: [] for image in IMAGES}
    for number, raw in enumerate(text.splitlines(), 1):
        spec, _, comment = raw.partition("#")
        if not comment.strip().startswith("images:"):
            continue
        line = _LINE.match(spec.strip())
        if line is None:
            raise ValueError(f"requirements.txt:{number}: an image requirement must be an exact pin: {raw!r}")
        for token in comment.strip().removeprefix("images:").split():
            image = _IMAGE.match(token)
            if image is None or image["image"] not in IMAGES:
                raise ValueError(f"requirements.txt:{number}: unknown image {token!r}; known: {IMAGES}")
            extras = image["extras"] if image["extras"] is not None else line["extras"]
            name = f"{line['name']}[{extras}]" if extras else line["name"]
            pins[image["image"]].append(f"{name}=={line['version']}")
    return pins


def render(image: str, pins: list[str]) -> str:
    header = (
        f"# The {image} image's packages: generated from requirements.txt by scripts/image_requirements.py\n"
        "# (edit the `# images:` annotations there, then run it). Installed with -c constraints.txt.\n"
    )
    return header + "".join(f"{pin}\n" for pin in pins)


def stale_files(pins: dict[str, list[str]]) -> list[Path]:
    paths = []
    for image, lines in pins.items():
        path = DOCKER / f"requirements-{image}.txt"
        if not path.exists() or path.read_text() != render(image, lines):
            paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when a file is stale")
    args = parser.parse_args(argv)
    pins = image_pins()
    stale = stale_files(pins)
    if args.check:
        for path in stale:
            hint = "run python scripts/image_requirements.py (make image-requirements)"
            print(f"{path.relative_to(ROOT)} is stale: {hint}", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        image = path.stem.removeprefix("requirements-")
        path.write_text(render(image, pins[image]))
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
