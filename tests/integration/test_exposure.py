"""Exposure and secrets on the running local stack, with a Serve application deployed and a Ray job
run through the Airflow hook (the paths that carry secrets):

- every socket the stack's processes listen on is bound to loopback or to the host a CT_* setting
  names for that service; a wildcard bind fails unless it is in ``WILDCARD_ALLOWED`` (with why);
- the secrets (S3 secret key, Ray auth token, Airflow password and keys, CT_SERVE_API_TOKEN when
  set) appear in no file but their own under .state/ and Ray's session logs, and nowhere in what
  the Ray dashboard shows (jobs, Serve applications, actors, tasks, runtime_envs).
"""

from __future__ import annotations

import configparser
import ipaddress
import os
import re
import time
import uuid
from pathlib import Path

import psutil
import pytest
import requests

from ml.settings import Settings, settings_env
from tests.integration.conftest import stack

pytestmark = pytest.mark.integration

# Wildcard listeners the stack cannot avoid: process name prefix -> why (also in docs/security.md).
WILDCARD_ALLOWED: dict[str, str] = {
    "ray::ServeReplica:": "each Serve replica's inter-deployment gRPC server (random port): Ray 2.60 "
    'binds it to "[::]:0" in ray/serve/_private/replica.py, with no setting',
}
WILDCARDS = {"0.0.0.0", "::"}
RAY_SESSION_LOGS = Path("/tmp/ray/session_latest/logs")
SCAN_MAX_BYTES = 512 * 1024 * 1024


@pytest.fixture(scope="module")
def serving(local_stack, tmp_path_factory):
    """The stack, with the classifier deployed from serve/config.yaml (the Serve proxy and a
    replica are listeners too); Serve is left as it was found."""
    local_stack.require("s3", "mlflow", "ray", "airflow")
    from ml.rollout import ServeDeployer
    from tests.integration.conftest import restore_serve
    from tests.model_factory import build_export, register_export

    settings = Settings(registered_model=f"it-exposure-{uuid.uuid4().hex[:8]}")
    version = register_export(settings, build_export(tmp_path_factory.mktemp("exposure") / "model"))
    deployer = ServeDeployer(settings, timeout_s=300, poll_s=1)
    before = deployer.current_config()
    deployer.deploy(version)
    yield settings
    restore_serve(deployer, before)


# ---- listeners -------------------------------------------------------------------------------


def _stack_processes(settings: Settings) -> list[psutil.Process]:
    """Every live process of the stack's sessions (each service starts in a session of its own;
    Ray's workers, Serve's proxy and replicas and Airflow's tasks stay in theirs)."""
    procs = []
    for name in stack.SERVICE_ORDER:
        sid = stack._read_pid(settings, name)
        for pid in stack._session_members(sid) if sid else []:
            try:
                procs.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                continue
    return procs


def _listeners(procs: list[psutil.Process]) -> list[tuple[str, int, str, int, str]]:
    """(address, port, proto, pid, process name) of each listening TCP / unconnected UDP socket."""
    found = []
    for proc in procs:
        try:
            conns, name = proc.net_connections(kind="inet"), proc.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in conns:
            tcp = c.type == 1  # SOCK_STREAM
            if (tcp and c.status == psutil.CONN_LISTEN) or (not tcp and not c.raddr):
                found.append((c.laddr.ip, c.laddr.port, "tcp" if tcp else "udp", proc.pid, name))
    return sorted(set(found))


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _configured_hosts(settings: Settings) -> set[str]:
    """The addresses a CT_* setting asks a service to listen on (loopback by default)."""
    hosts = {
        stack._host_port(settings.s3_endpoint, 9000)[0],
        stack._host_port(settings.mlflow_tracking_uri, 5000)[0],
        stack._host_port(settings.ray_address, 8265)[0],
    }
    if settings.serve_http_host:
        hosts.add(settings.serve_http_host)
    return hosts


def test_the_stack_listens_on_loopback_only(serving):
    settings = Settings()
    procs = _stack_processes(settings)
    listeners = _listeners(procs)
    assert len(procs) > 10 and len(listeners) > 10, (procs, listeners)  # the stack is really there
    ports = {port for _, port, *_ in listeners}
    assert {9000, 5000, 6379, 8265, 8080, 8000} <= ports, sorted(ports)  # ... with Serve's proxy

    allowed_hosts = _configured_hosts(settings)

    def unavoidable(address: str, process: str) -> bool:
        return address in WILDCARDS and any(process.startswith(prefix) for prefix in WILDCARD_ALLOWED)

    exposed = [
        item
        for item in listeners
        if not _loopback(item[0]) and item[0] not in allowed_hosts and not unavoidable(item[0], item[4])
    ]
    assert not exposed, "listening beyond loopback (address, port, proto, pid, process):\n" + "\n".join(
        map(str, exposed)
    )


# ---- secrets -----------------------------------------------------------------------------------


def _secrets(settings: Settings) -> dict[str, tuple[str, set[Path]]]:
    """name -> (value, the files allowed to hold it)."""
    state = Path(settings.state_dir).resolve()
    airflow_home = state / "airflow"
    found = {
        "Ray auth token": (stack._ray_token(settings), {state / "ray" / "auth_token"}),
        "Airflow admin password": (stack.airflow_login()[1], {stack.airflow_password_file()}),
    }
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(airflow_home / "airflow.cfg")
    for section, key in (("api", "secret_key"), ("api_auth", "jwt_secret"), ("core", "fernet_key")):
        value = cfg.get(section, key, fallback="")
        if len(value) >= 8:
            found[f"Airflow [{section}] {key}"] = (value, {airflow_home / "airflow.cfg"})
    if os.environ.get("CT_SERVE_API_TOKEN"):
        found["CT_SERVE_API_TOKEN"] = (os.environ["CT_SERVE_API_TOKEN"], set())
    if len(settings.s3_secret_key) >= 12 and settings.s3_secret_key != settings.s3_access_key:
        found["S3 secret key"] = (settings.s3_secret_key, set())
    return found


def _s3_secret_pattern(settings: Settings) -> re.Pattern[bytes]:
    """The S3 secret under one of its names: the local stack's default (minioadmin, the same as the
    access key) is too common a string to look for alone."""
    names = rb"AWS_SECRET_ACCESS_KEY|CT_S3_SECRET_KEY|s3_secret_key|secret_key|aws_secret_access_key"
    quoting = rb"[\\\"' ]*"  # JSON inside JSON (the dashboard's serialized runtime_env) escapes quotes
    return re.compile(
        rb"(?:" + names + rb")" + quoting + rb"[:=]" + quoting + re.escape(settings.s3_secret_key.encode())
    )


def _files_to_scan(settings: Settings) -> list[Path]:
    roots = [Path(settings.state_dir).resolve(), RAY_SESSION_LOGS.resolve()]
    return [
        p for root in roots if root.exists() for p in root.rglob("*") if p.is_file() and not p.is_symlink()
    ]


def _dashboard_views(settings: Settings) -> dict[str, bytes]:
    """What the Ray dashboard shows anyone holding the cluster token."""
    headers = {"Authorization": f"Bearer {stack._ray_token(settings)}"}
    base = settings.ray_address.rstrip("/")
    views = {}
    for path in (
        "/api/jobs/",
        "/api/serve/applications/",
        "/api/v0/actors?detail=1&limit=10000",
        "/api/v0/tasks?detail=1&limit=10000",
        "/api/v0/runtime_envs?detail=1",
    ):
        resp = requests.get(base + path, headers=headers, timeout=60)
        assert resp.status_code == 200, (path, resp.status_code, resp.text[:300])
        views[f"dashboard {path}"] = resp.content
    return views


def _run_job_through_the_hook(settings: Settings) -> None:
    """A Ray job submitted as the DAG does (runtime_env = settings_env): it reads S3 with the
    credentials of the node's environment."""
    from ct_airflow.ray_job import RayJobHook

    hook = RayJobHook()
    job = f"it-secrets-{uuid.uuid4().hex[:8]}"
    check = (
        "from ml.settings import Settings; from ml.storage import ObjectStore; "
        "s = Settings(); ObjectStore(s).ensure_bucket(); print('s3 ok as', s.s3_access_key[:2] + '...')"
    )
    hook.submit(f'python -c "{check}"', job, runtime_env={"env_vars": settings_env(settings)})
    deadline = time.monotonic() + 180
    while (status := hook.status(job)) not in {"SUCCEEDED", "FAILED", "STOPPED"}:
        assert time.monotonic() < deadline, f"job {job} still {status}"
        time.sleep(1)
    assert status == "SUCCEEDED", hook.logs(job)[-2000:]
    assert "s3 ok" in hook.logs(job)


def test_secrets_stay_in_their_own_files(serving):
    settings = Settings()
    _run_job_through_the_hook(settings)
    secrets = _secrets(settings)
    s3_pattern = _s3_secret_pattern(settings)
    leaks = []

    def scan(where: str, data: bytes, path: Path | None = None) -> None:
        for name, (value, own_files) in secrets.items():
            if value and value.encode() in data and path not in own_files:
                leaks.append(f"{name} in {where}")
        if s3_pattern.search(data):
            leaks.append(f"S3 secret key in {where}: {s3_pattern.search(data).group(0)[:30]!r}...")

    for where, data in _dashboard_views(settings).items():
        scan(where, data)
    scanned = 0
    for path in _files_to_scan(settings):
        try:
            if path.stat().st_size > SCAN_MAX_BYTES:
                continue
            data = path.read_bytes()
        except OSError:  # a log rotated away meanwhile
            continue
        scanned += 1
        scan(str(path), data, path)
    assert scanned > 20, scanned
    assert not leaks, "secrets outside their own files:\n" + "\n".join(sorted(set(leaks)))


def test_the_dashboard_shows_no_secret_in_the_served_app_config(serving):
    """The Serve app's runtime_env holds the settings, not the credentials (those come from the
    nodes' environment, where the replica finds them)."""
    app = requests.get(
        f"{serving.ray_address}/api/serve/applications/",
        headers={"Authorization": f"Bearer {stack._ray_token(serving)}"},
        timeout=30,
    ).json()["applications"]["classifier"]
    env = app["deployed_app_config"]["runtime_env"]["env_vars"]
    assert env["CT_S3_ENDPOINT"] == serving.s3_endpoint
    assert not {"CT_S3_SECRET_KEY", "CT_S3_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY", "CT_SERVE_API_TOKEN"} & set(
        env
    )
