"""Checks before the local stack starts: sample data, Python version, free ports, free disk space.

Every problem is named at once, each with its fix, before any service starts:

    .venv/bin/python scripts/preflight.py     # or: make preflight; exit status 1 on a problem

``scripts/stack.py up`` (so ``make up``, ``make demo`` and the integration tests) runs the same
checks first; a port held by this checkout's own running stack counts as free there.
``scripts/setup.sh`` checks the Python version and the disk space for the venv itself, in bash,
since it runs before the venv exists. Standard library only.
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from ml.sample_data import SAMPLE_FILES  # noqa: E402 (paths only: no third-party import)

PYTHONS = ((3, 11), (3, 12))
# The running stack writes under .state/ (S3 objects, MLflow's database, Airflow logs: a demo
# leaves a few hundred MB) and Ray writes its session logs and spilled objects to the temp dir.
STACK_MIN_FREE_GB = 2.0


@dataclass(frozen=True)
class Problem:
    """Something that would make the stack or the demo fail, and what to do about it."""

    what: str
    fix: str

    def __str__(self) -> str:
        return f"{self.what}\n    fix: {self.fix}"


class PreflightError(RuntimeError):
    """One or more checks failed; the message names every problem and its fix."""


def check_data(files: Iterable[Path] = SAMPLE_FILES) -> list[Problem]:
    """The sample data the demo and the tests read ships in data/; a partial checkout lacks it."""
    return [
        Problem(
            f"sample data {path} is missing",
            "it ships with the repository: restore it from git (`git restore data/`), see data/README.md",
        )
        for path in files
        if not path.is_file() or path.stat().st_size == 0
    ]


def check_python(
    version: tuple[int, ...] = tuple(sys.version_info[:3]), executable: str = ""
) -> list[Problem]:
    """Python 3.11 or 3.12: what the pinned dependencies are built and tested for."""
    if tuple(version[:2]) in PYTHONS:
        return []
    running = ".".join(map(str, version)) + (f" ({executable})" if executable else "")
    wanted = " or ".join(f"{major}.{minor}" for major, minor in PYTHONS)
    return [
        Problem(
            f"Python {running} runs this; the project needs {wanted}",
            "rebuild the venv with a supported interpreter: rm -rf .venv && PYTHON=python3.12 make setup",
        )
    ]


def check_disk(paths: Iterable[Path], min_free_gb: float = STACK_MIN_FREE_GB) -> list[Problem]:
    """At least ``min_free_gb`` free on every filesystem holding one of ``paths``."""
    problems, seen = [], set()
    for path in paths:
        existing = next(p for p in (path, *path.parents) if p.exists())
        device = existing.stat().st_dev
        if device in seen:
            continue
        seen.add(device)
        free_gb = shutil.disk_usage(existing).free / 1e9
        if free_gb < min_free_gb:
            problems.append(
                Problem(
                    f"only {free_gb:.1f} GB free on the filesystem of {path}; "
                    f"the stack needs at least {min_free_gb:g} GB",
                    "free some space there (`make clean` deletes this checkout's .state/, "
                    "which holds the stack's S3 objects and MLflow registry)",
                )
            )
    return problems


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if nothing listens on ``port`` (a wildcard listener counts too)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def port_listener(port: int) -> tuple[int, str] | None:
    """(pid, process name) listening on ``port`` per ``ss -ltnp``, if known."""
    try:
        argv = ["ss", "-ltnpH", f"sport = :{port}"]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r'\("([^"]+)",pid=(\d+)', out)
    return (int(match.group(2)), match.group(1)) if match else None


def port_owner(port: int) -> str:
    """`` by NAME (pid N)`` for the process listening on ``port``, if known."""
    listener = port_listener(port)
    return f" by {listener[1]} (pid {listener[0]})" if listener else ""


def check_ports(ports: Mapping[int, str]) -> list[Problem]:
    """Each port (mapped to the service that will listen on it) must be free; one problem per
    service and process holding its ports."""
    taken: dict[tuple[str, str], list[int]] = {}
    for port, service in sorted(ports.items()):
        if not port_free(port):
            taken.setdefault((service, port_owner(port)), []).append(port)
    return [
        Problem(
            f"{'port' if len(held) == 1 else 'ports'} {', '.join(map(str, held))} ({service}) "
            f"{'is' if len(held) == 1 else 'are'} in use{owner}, not by this checkout's stack",
            "stop that process (a stack of another checkout: `make down` there), "
            "or point the CT_* settings of this one elsewhere",
        )
        for (service, owner), held in taken.items()
    ]


def run(
    ports: Mapping[int, str],
    state_dir: Path = REPO_ROOT / ".state",
    min_free_gb: float = STACK_MIN_FREE_GB,
) -> list[Problem]:
    """Every check; an empty list means the stack may start."""
    return [
        *check_data(),
        *check_python(executable=sys.executable),
        *check_ports(ports),
        *check_disk([state_dir, Path(tempfile.gettempdir())], min_free_gb),
    ]


def describe(problems: list[Problem]) -> str:
    """One message naming every problem with its fix."""
    lines = [f"preflight: {len(problems)} problem(s) before starting the stack:"]
    lines += [f"  - {problem}" for problem in problems]
    return "\n".join(lines)


def _stack_ports() -> tuple[dict[int, str], Path]:
    """The stack's ports not held by its own running services, and its state directory."""
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import stack

    return stack.ports_to_check(), stack.state_dir()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--min-free-gb", type=float, default=STACK_MIN_FREE_GB, help="free disk space to require"
    )
    args = parser.parse_args(argv)
    ports, state_dir = _stack_ports()
    problems = run(ports, state_dir, args.min_free_gb)
    if problems:
        print(describe(problems), file=sys.stderr)
        return 1
    services = sorted(set(ports.values()))
    port_note = f"ports of {', '.join(services)} free" if services else "every service already runs"
    print(
        f"preflight: ok (sample data, Python {sys.version.split()[0]}, {port_note}, "
        f">= {args.min_free_gb:g} GB free disk)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
