"""The service started as a newcomer starts it, without the DAG: ``serve deploy serve/config.yaml``
with no ``user_config`` (or one without ``model_version``) serves the registered model's champion.

Real MLflow, real Ray Serve, the real ``serve`` CLI; models are real exports of the base model
(random seeded heads). The registered model is one of the test's own (``CT_REGISTERED_MODEL`` in
the application's runtime_env, as a user would export it), so the demo's model is not touched.

Before a champion exists the replica stays up and healthy (Serve does not restart it), answers 503
naming the missing alias, and starts serving by itself once a version gets the alias.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import requests
import yaml

from ml.rollout import CONFIG_FILE, ServeDeployer
from ml.settings import Settings
from tests.conftest import REPO_ROOT
from tests.integration.conftest import restore_serve
from tests.model_factory import build_export, register_export

pytestmark = pytest.mark.integration

SERVE = "http://127.0.0.1:8000"
TEXT = {"texts": ["Stocks rally as the central bank holds rates."]}


@pytest.fixture(scope="module")
def deployer(local_stack):
    local_stack.require("s3", "mlflow", "ray")
    deployer = ServeDeployer(Settings(), timeout_s=300, poll_s=1)
    before = deployer.current_config()
    yield deployer
    restore_serve(deployer, before)


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return build_export(tmp_path_factory.mktemp("champion") / "export")


def _serve_deploy(tmp_path: Path, model: str, user_config: dict | None, **deployment: object) -> None:
    """``serve deploy`` of serve/config.yaml, its user_config replaced by ``user_config`` (None: none)."""
    config = yaml.safe_load(CONFIG_FILE.read_text())
    app = config["applications"][0]
    app["runtime_env"] = {"env_vars": {"CT_REGISTERED_MODEL": model}}
    target = app["deployments"][0]
    del target["user_config"]
    if user_config is not None:
        target["user_config"] = user_config
    target.update(deployment)
    path = tmp_path / "serve-config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    subprocess.run(
        [str(REPO_ROOT / ".venv" / "bin" / "serve"), "deploy", str(path), "-a", Settings().ray_address],
        check=True,
        env=os.environ,
        timeout=120,
    )


def _replicas(deployer: ServeDeployer) -> list[tuple[str, str]]:
    app = (deployer.details().get("applications") or {}).get("classifier") or {}
    deployment = (app.get("deployments") or {}).get("Classifier") or {}
    return [(r["replica_id"], r["state"]) for r in deployment.get("replicas") or []]


def _until(check, timeout_s: float, what: str):
    """``check()``'s first truthy result; ``check`` may return ``(None, what it saw)`` meanwhile."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            result = check()
        except requests.RequestException as err:
            result = (None, err)
        if isinstance(result, tuple):
            result, last = result
        if result:
            return result
        time.sleep(1)
    raise AssertionError(f"{what} within {timeout_s:.0f} s (last seen: {last})")


def _answer_from(model: str, version: str):
    def check():
        resp = requests.post(f"{SERVE}/v1/predict", json=TEXT, timeout=30)
        served = resp.json().get("model") if resp.status_code == 200 else None
        if served and (served["name"], served["version"]) == (model, version):
            return resp.json()
        return None, f"HTTP {resp.status_code}: {resp.text[:600]}"

    return check


def _set_champion(model: str, version: str) -> None:
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=Settings().mlflow_tracking_uri).set_registered_model_alias(
        model, "champion", version
    )


def test_without_a_champion_the_replica_waits_then_serves_it(deployer, export, tmp_path):
    model = f"it-champion-{uuid.uuid4().hex[:8]}"
    # no model_version: the champion. Health checked every second: a replica failing its health
    # check would be replaced within a few seconds (Serve's threshold is 3 failures in a row).
    _serve_deploy(tmp_path, model, {"model_retry_s": 2}, health_check_period_s=1)
    _until(lambda: (deployer.app_status()[0] == "RUNNING", deployer.app_status()), 180, "not RUNNING")

    def refused():
        resp = requests.post(f"{SERVE}/v1/predict", json=TEXT, timeout=30)
        seen = f"HTTP {resp.status_code}: {resp.text[:600]}"
        return (resp.json(), seen) if resp.status_code == 503 and model in resp.text else (None, seen)

    # (the check returns the body: a requests.Response of a 503 is falsy)
    detail = _until(refused, 60, f"/v1/predict did not answer 503 naming {model}")["detail"]
    assert "has no alias 'champion'" in detail and "continuous_training DAG" in detail, detail
    ready = requests.get(f"{SERVE}/readyz", timeout=10)
    assert ready.status_code == 503 and ready.json()["status"] == "waiting"
    assert requests.get(f"{SERVE}/healthz", timeout=10).json() == {"status": "ok"}

    replicas = _replicas(deployer)
    time.sleep(10)  # ten health periods
    assert _replicas(deployer) == replicas and all(state == "RUNNING" for _, state in replicas), (
        f"replicas changed while waiting: {replicas} -> {_replicas(deployer)}"
    )
    assert deployer.app_status()[0] == "RUNNING"

    version = register_export(Settings(registered_model=model), export)
    _set_champion(model, version)
    started = time.monotonic()
    answer = _until(_answer_from(model, version), 60, f"{model} v{version} was not served")
    assert len(answer["predictions"]) == 1
    assert time.monotonic() - started < 30  # retries at most 2 s apart, plus the load
    assert _replicas(deployer) == replicas  # the same replica, no restart
    assert requests.get(f"{SERVE}/readyz", timeout=10).json()["status"] == "ready"


def test_without_user_config_the_champion_serves(deployer, export, tmp_path):
    model = f"it-champion-{uuid.uuid4().hex[:8]}"
    settings = Settings(registered_model=model)
    register_export(settings, export)  # v1: not the champion
    version = register_export(settings, export, snapshot_id="second")
    _set_champion(model, version)
    _serve_deploy(tmp_path, model, None)  # no user_config at all: Serve never calls reconfigure
    answer = _until(_answer_from(model, version), 240, f"{model} v{version} (the champion) was not served")
    assert answer["model"]["version"] == version == "2"
    info = requests.get(f"{SERVE}/v1/model", timeout=10).json()
    assert info["requested"] == "<default>@champion" and info["last_load_error"] is None
