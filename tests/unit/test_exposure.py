"""Exposure and secrets without services: what the local stack binds, where its secrets go, and
what refuses to put a secret where the Ray dashboard shows it. tests/integration/test_exposure.py
checks the same on the running stack (its listening sockets, logs and dashboard)."""

from __future__ import annotations

import json
import stat
import subprocess
import sys

import pytest
from airflow.sdk.exceptions import AirflowFailException

from ct_airflow.ray_job import RayJobHook
from ml.settings import Settings, settings_env
from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import demo
import stack


def _arg(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


@pytest.mark.parametrize("host", ["127.0.0.1", "10.1.2.3"])
def test_ray_binds_the_host_of_its_address(tmp_path, host):
    ray = stack._services(Settings(state_dir=tmp_path, ray_address=f"http://{host}:8265"))["ray"]
    # the node IP is what every Ray server binds (GCS, raylet, workers, agents, client server)
    assert _arg(ray.argv, "--node-ip-address") == host
    assert _arg(ray.argv, "--dashboard-host") == host
    # else `ray start` swaps 127.0.0.1 for the machine's network address (a single-node switch)
    assert ray.env.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == ("0" if host == "127.0.0.1" else None)


def test_ray_nodes_hold_the_secrets_not_the_runtime_env(tmp_path):
    settings = Settings(state_dir=tmp_path, s3_secret_key="s3cr3t-only-here")
    ray = stack._services(settings)["ray"]
    assert ray.env["CT_S3_SECRET_KEY"] == "s3cr3t-only-here"
    assert "s3cr3t-only-here" not in json.dumps(settings_env(settings))


def test_airflow_scheduler_and_triggerer_start_without_log_servers(tmp_path, monkeypatch):
    fake_bin = tmp_path / "venv-bin"
    fake_bin.mkdir()
    fake = fake_bin / "airflow"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setattr(stack, "VENV_BIN", fake_bin)
    settings = Settings(state_dir=tmp_path / "state")
    stack._write_airflow_shim(settings)
    airflow = stack._services(settings)["airflow"]
    shim_dir = str(stack._airflow_bin(settings))
    assert airflow.env["PATH"].split(":")[0] == shim_dir  # what `airflow standalone` starts by name

    def started(*args: str) -> str:
        env = {"PATH": airflow.env["PATH"]}
        return subprocess.run(["airflow", *args], env=env, capture_output=True, text=True, check=True).stdout

    assert started("scheduler").split() == ["scheduler", "--skip-serve-logs"]
    assert started("triggerer").split() == ["triggerer", "--skip-serve-logs"]
    assert started("api-server").split() == ["api-server"]
    assert started("dag-processor").split() == ["dag-processor"]


def test_airflow_password_is_generated_by_the_stack_into_its_own_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CT_STATE_DIR", str(tmp_path))
    settings = Settings()
    stack._ensure_airflow_password(settings)
    path = stack.airflow_password_file()
    user, password = stack.airflow_login()
    assert user == "admin" and len(password) >= 16
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    stack._ensure_airflow_password(settings)
    assert stack.airflow_login() == (user, password)  # generated once, kept

    # neither `make status` nor the demo's closing lines show it
    stack._status()
    demo.print_where_to_look(settings, user)
    out = capsys.readouterr().out
    assert str(path) in out
    assert password not in out


class _RecordingJobsClient:
    def __init__(self) -> None:
        self.submitted: list[dict] = []

    def submit_job(self, **kwargs) -> str:
        self.submitted.append(kwargs)
        return kwargs["submission_id"]


@pytest.mark.parametrize(
    "name",
    ["CT_S3_SECRET_KEY", "AWS_SECRET_ACCESS_KEY", "CT_SERVE_API_TOKEN", "RAY_AUTH_TOKEN", "DB_PASSWORD"],
)
def test_ray_job_hook_refuses_a_secret_in_the_runtime_env(name):
    hook = RayJobHook()
    client = _RecordingJobsClient()
    hook.__dict__["client"] = client  # the cached_property, without a cluster
    with pytest.raises(AirflowFailException, match=name):
        hook.submit("python -V", "ct-x", runtime_env={"env_vars": {"CT_DATASET": "agnews", name: "v"}})
    assert client.submitted == []


def test_ray_job_hook_submits_the_settings_runtime_env():
    hook = RayJobHook()
    client = _RecordingJobsClient()
    hook.__dict__["client"] = client
    env = settings_env(Settings())
    hook.submit("python -V", "ct-x", runtime_env={"env_vars": env})
    assert client.submitted[0]["runtime_env"] == {"env_vars": env}
