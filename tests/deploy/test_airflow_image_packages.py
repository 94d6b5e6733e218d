"""The Airflow image's package set, installed for real, runs the Airflow side without torch.

A fresh virtualenv gets exactly docker/requirements-airflow.txt (+ pytest), resolved with
constraints.txt as the image build does, and then the tests of everything that runs in an Airflow
task: the DAG files, the data gate (Great Expectations), the drift check (Evidently), extraction,
the prediction-log reader, the deploy task's Serve targets and the Ray job operator. The Ray-side
code (training, the Serve app, the predictor) is left to the full environment.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.deploy import requirement_pin

ROOT = Path(__file__).resolve().parents[2]
AIRFLOW_SIDE_TESTS = [
    "tests/dags",
    "tests/unit/test_gate.py",
    "tests/unit/test_drift.py",
    "tests/unit/test_extract_rules.py",
    "tests/unit/test_batches.py",
    "tests/unit/test_airflow_glue.py",
    "tests/unit/test_serve_targets.py",
    "tests/unit/test_rollout_report.py",
    "tests/unit/test_ray_job_operator.py",
    "tests/unit/test_settings.py",
    "tests/unit/test_prediction_log.py",
]


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{' '.join(cmd[:4])} …: {result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result


def test_the_airflow_side_runs_on_the_airflow_image_packages_alone(tmp_path: Path) -> None:
    uv = Path(sys.executable).parent / "uv"
    venv = tmp_path / "airflow-image"
    python = venv / "bin" / "python"
    _run([str(uv), "venv", "-q", "--python", sys.executable, str(venv)], timeout=120)
    # pip's find-links (a local wheel folder on our CI machines), which uv does not read itself
    links = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", "global.find-links"], capture_output=True, text=True
    ).stdout.strip()
    find_links = ["--find-links", links] if links else []
    requirements = ["-r", str(ROOT / "docker/requirements-airflow.txt"), "-c", str(ROOT / "constraints.txt")]
    install = [str(uv), "pip", "install", "-q", "--python", str(python), *find_links, *requirements]
    pins = [f"{name}=={requirement_pin(name)}" for name in ("pytest", "pytest-timeout")]
    _run([*install, *pins], timeout=600)
    probe = "import importlib.util as u, sys; print(' '.join(m for m in sys.argv[1:] if u.find_spec(m)))"
    modules = ["torch", "transformers", "deepspeed", "airflow", "great_expectations", "evidently"]
    present = _run([str(python), "-c", probe, *modules], timeout=60).stdout.split()
    assert present == ["airflow", "great_expectations", "evidently"]

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins")]),
        "AIRFLOW_HOME": str(tmp_path / "airflow-home"),
    }
    env.pop("VIRTUAL_ENV", None)
    result = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *AIRFLOW_SIDE_TESTS],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    assert re.search(r"\b\d{2,} passed\b", result.stdout), result.stdout[-2000:]
