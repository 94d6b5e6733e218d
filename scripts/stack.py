"""Local stack manager: SeaweedFS (S3), MLflow, a Ray head and Airflow standalone on 127.0.0.1.

Run from the repo root::

    .venv/bin/python scripts/stack.py up [SERVICE ...]     # s3, mlflow, ray, airflow
    .venv/bin/python scripts/stack.py down [SERVICE ...]
    .venv/bin/python scripts/stack.py status
    eval "$(.venv/bin/python scripts/stack.py env)"

Endpoints, credentials, buckets and the state directory come from
``ml.settings.Settings`` (``CT_*`` variables). Logs go to
``<state>/logs/<service>.log``, pids to ``<state>/pids/<service>.pid``. Pytest
fixtures can use ``up``, ``down``, ``is_healthy``, ``service_env`` and
``airflow_login``.

Everything the services store stays in ``<state>`` across ``down`` and ``up``: S3 objects
(SeaweedFS, ``<state>/s3/data``), MLflow's registry (``<state>/mlflow/mlflow.db``), Airflow's
database. Delete ``<state>`` (``make clean``) to start afresh.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import logging
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import requests

if TYPE_CHECKING:
    from minio import Minio

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import preflight  # noqa: E402  (scripts/, beside this file)

from ml.settings import Settings, load_settings  # noqa: E402

log = logging.getLogger("stack")

SERVICE_ORDER: tuple[str, ...] = ("s3", "mlflow", "ray", "airflow")
VENV_BIN = Path(sys.executable).parent  # not resolved: keep the venv's bin, not the base python's
RAY_GCS_PORT = 6379
# SeaweedFS (`weed mini`) serves S3 on the port of CT_S3_ENDPOINT and runs its master, volume
# server, filer and admin (maintenance) server on these, all on 127.0.0.1. Every port is given
# explicitly: `weed mini` silently moves a default port that is taken. None is in Ray's worker
# port range (10002-19999) or the kernel's ephemeral range (32768+). The admin's gRPC port is
# its HTTP port + 10000: mini's maintenance worker dials that, whatever -admin.port.grpc says.
SEAWEEDFS_PORTS = {
    "master.port": 9333,
    "master.port.grpc": 9334,
    "volume.port": 9340,
    "volume.port.grpc": 9341,
    "filer.port": 9388,
    "filer.port.grpc": 9389,
    "s3.port.grpc": 9335,
    "admin.port": 22646,
}
SEAWEEDFS_ADMIN_GRPC_PORT = SEAWEEDFS_PORTS["admin.port"] + 10000
S3_STORE_ID = "ct-store-id"  # in SeaweedFS's data directory: which store MLflow's database belongs to
RAY_METRICS_PORT = 8090
RAY_CLIENT_PORT = 10001
AIRFLOW_PORT = 8080
AIRFLOW_USER = "admin"
STOP_GRACE_S = 20.0
PROGRESS_EVERY_S = 10.0
LOG_TAIL_LINES = 30


class _DetachedPopen(subprocess.Popen):
    """A Popen for a service meant to outlive this process: no "still running" ResourceWarning."""

    def __del__(self) -> None:
        pass


# Services started by this process, so a long-lived caller (pytest) can reap them: no zombies.
_CHILDREN: dict[str, _DetachedPopen] = {}


class StackError(RuntimeError):
    """A service could not be started or its port belongs to something else."""


@dataclass(frozen=True)
class Service:
    """How to start, recognise and health-check one service of the stack."""

    name: str
    ports: tuple[int, ...]  # ports it listens on; must be free before a start
    url: str  # what `status` shows
    argv: list[str]
    env: dict[str, str]
    health: Callable[[], bool]
    timeout_s: float  # how long to wait for `health` after starting
    marker: str  # substring of the leader's command line that identifies our process
    daemonizes: bool = False  # argv exits after forking daemons (ray); pid file = their session
    stop_argv: list[str] | None = None  # run first by `down` (ray stop)
    before_start: Callable[[], None] | None = None  # one-off preparation (the Ray token)
    after_start: Callable[[], None] | None = None  # idempotent set-up once healthy (buckets)


# --------------------------------------------------------------------------------------
# paths and small helpers
# --------------------------------------------------------------------------------------


def _state(s: Settings, *parts: str) -> Path:
    """An absolute path under the stack's state directory."""
    return Path(s.state_dir).resolve().joinpath(*parts)


def _pid_file(s: Settings, name: str) -> Path:
    return _state(s, "pids", f"{name}.pid")


def _log_file(s: Settings, name: str) -> Path:
    return _state(s, "logs", f"{name}.log")


def ray_num_cpus() -> str:
    """The local Ray head's logical CPUs: ``CT_RAY_NUM_CPUS``, else twice the machine's cores."""
    value = os.environ.get("CT_RAY_NUM_CPUS", "").strip()
    if value and not (value.isdigit() and int(value) > 0):
        raise SystemExit(f"CT_RAY_NUM_CPUS must be a positive integer, got {value!r}")
    return value or str(2 * (os.cpu_count() or 1))


SERVE_INGRESSES = ("proxy", "haproxy")


def serve_ingress_env(s: Settings) -> dict[str, str]:
    """The Ray head's Serve ingress: ``CT_SERVE_INGRESS`` = ``proxy`` (default, Serve's Python HTTP
    proxy) or ``haproxy`` (Ray's HAProxy ingress, benchmarks/README.md: the HTTP path costs ~0.4 ms
    of CPU per request instead of ~2.6). Opt-in because Ray 2.60's HAProxy config binds its stats
    page (8404) and Prometheus exporter (9101) on every interface, which the stack's loopback-only
    rule forbids; its admin socket and config go under .state/ray/haproxy (mode 700), not /tmp."""
    value = os.environ.get("CT_SERVE_INGRESS", "").strip().lower() or "proxy"
    if value not in SERVE_INGRESSES:
        raise SystemExit(f"CT_SERVE_INGRESS must be one of {list(SERVE_INGRESSES)}, got {value!r}")
    if value == "proxy":
        return {}
    home = _haproxy_home(s)
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(home / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(home / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(home),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(home / "server-state"),
    }


def _haproxy_home(s: Settings) -> Path:
    return _state(s, "ray", "haproxy")


def _prepare_ray(s: Settings) -> None:
    _ensure_ray_token(s)
    if serve_ingress_env(s):
        _haproxy_home(s).mkdir(parents=True, exist_ok=True)
        _haproxy_home(s).chmod(0o700)


def _ray_token_path(s: Settings) -> Path:
    return _state(s, "ray", "auth_token")


def _airflow_home(s: Settings) -> Path:
    return _state(s, "airflow")


def _host_port(url_or_endpoint: str, default_port: int) -> tuple[str, int]:
    """Host and port of ``http://host:port/...`` or a bare ``host:port``."""
    if "//" not in url_or_endpoint:
        url_or_endpoint = f"//{url_or_endpoint}"
    parts = urlsplit(url_or_endpoint)
    try:
        return parts.hostname or "127.0.0.1", parts.port or default_port
    except ValueError as exc:
        raise StackError(f"bad endpoint {url_or_endpoint.lstrip('/')!r} in the CT_* settings: {exc}") from exc


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False


# one implementation for the preflight and the stack
_port_free = preflight.port_free
_port_owner = preflight.port_listener


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, session id) of a process from /proc, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[3])  # state, ppid, pgrp, session -> indexes 0..3


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie (reaping it if it is our child)."""
    for proc in _CHILDREN.values():
        if proc.pid == pid:
            proc.poll()
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def _session_members(sid: int) -> list[int]:
    """Live processes of session ``sid``; task processes may sit in their own groups."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat and stat[1] == sid and stat[0] not in ("Z", "X"):
                members.append(int(entry.name))
    return members


def _signal_session(sid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to every process group that has members in session ``sid``."""
    groups = set()
    for pid in _session_members(sid):
        with contextlib.suppress(ProcessLookupError):
            groups.add(os.getpgid(pid))
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)


def _log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with path.open(errors="replace") as fh:
            return "".join(deque(fh, maxlen=lines))
    except OSError:
        return f"(no log at {path})"


def _http_ok(url: str, headers: dict[str, str] | None = None) -> bool:
    try:
        return requests.get(url, headers=headers, timeout=3).status_code == 200
    except requests.RequestException:
        return False


# --------------------------------------------------------------------------------------
# service definitions
# --------------------------------------------------------------------------------------


def _minio_client(s: Settings) -> Minio:
    """A minio client that fails fast (no retries) so health checks stay snappy."""
    import urllib3

    from ml.storage import minio_client

    http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=2, read=5), retries=urllib3.Retry(total=0))
    return minio_client(s, http)


def _s3_healthy(s: Settings) -> bool:
    host, port = _host_port(s.s3_endpoint, 9000)
    if _port_free(port, host):
        return False
    try:
        _minio_client(s).list_buckets()
    except Exception:  # any failure means "not healthy"
        return False
    return True


def _make_buckets(s: Settings) -> None:
    """Create the data and MLflow buckets if they do not exist yet."""
    client = _minio_client(s)
    for bucket in (s.data_bucket, s.mlflow_bucket):
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)
            log.info("s3: created bucket %s", bucket)


def _s3_data_dir(s: Settings) -> Path:
    return _state(s, "s3", "data")


def _s3_store_id(s: Settings) -> str | None:
    try:
        return (_s3_data_dir(s) / S3_STORE_ID).read_text().strip() or None
    except OSError:
        return None


def _prepare_s3(s: Settings) -> None:
    """Refuse to start SeaweedFS without credentials (it would let anyone in); give a new store
    an id (``_retire_orphaned_mlflow_db`` compares it); drop the flags `weed mini` saved last time
    in ``mini.options`` (it re-applies them at start): the command line is the only source."""
    if not (s.s3_access_key and s.s3_secret_key):
        raise StackError("s3: CT_S3_ACCESS_KEY and CT_S3_SECRET_KEY must not be empty")
    host = _host_port(s.s3_endpoint, 9000)[0]
    if not _is_loopback(host):
        log.warning(
            "s3: SeaweedFS's master, volume server and filer listen on %s too (weed mini binds one "
            "address for all); their read APIs take no S3 credentials",
            host,
        )
    data = _s3_data_dir(s)
    data.mkdir(parents=True, exist_ok=True)
    if _s3_store_id(s) is None:
        (data / S3_STORE_ID).write_text(f"{secrets.token_hex(8)}\n")
    (data / "mini.options").unlink(missing_ok=True)


def _retire_orphaned_mlflow_db(s: Settings) -> None:
    """Keep MLflow's database consistent with the S3 store that holds its artifacts.

    S3 keeps its data across restarts, so this is only about a store that really was wiped
    (``<state>/s3`` deleted, or a database from the days of the in-memory moto server): its runs
    and model versions point at artifacts that are gone (a champion that can no longer be loaded).
    The database records the id of the store it was written against (``<state>/mlflow/s3-store``);
    when the store's id differs and the database holds runs, move the database aside (never delete
    it) and start MLflow afresh. With S3 elsewhere (no local store) nothing is compared."""
    store = _s3_store_id(s)
    if store is None:
        return
    db, record = _state(s, "mlflow", "mlflow.db"), _state(s, "mlflow", "s3-store")
    try:
        recorded = record.read_text().strip()
    except OSError:
        recorded = None
    if recorded != store and db.exists() and _mlflow_db_has_runs(db):
        retired = db.with_name(f"mlflow.db.orphaned-{time.strftime('%Y%m%dT%H%M%S')}")
        db.rename(retired)
        log.warning(
            "mlflow: the S3 store the runs and models in %s were written to is gone (store %s, "
            "now %s); moved the database to %s and starting with a new one",
            db,
            recorded or "in memory",
            store,
            retired,
        )
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(f"{store}\n")


def _mlflow_db_has_runs(db: Path) -> bool:
    import sqlite3

    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            return conn.execute("SELECT EXISTS (SELECT 1 FROM runs)").fetchone()[0] == 1
    except sqlite3.Error:
        return True  # unknown schema or state: treat as holding runs


def _ray_token(s: Settings) -> str:
    try:
        return _ray_token_path(s).read_text().strip()
    except OSError:
        return ""


def _ensure_ray_token(s: Settings) -> None:
    """Generate the Ray auth token once (0600); later runs reuse it."""
    path = _ray_token_path(s)
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))
    log.info("ray: generated auth token at %s", path)


def _airflow_password_file(s: Settings) -> Path:
    return _airflow_home(s) / "simple_auth_manager_passwords.json.generated"


def _ensure_airflow_password(s: Settings) -> None:
    """Generate the admin password once (0600) before Airflow starts: Airflow's simple auth
    manager then finds it and does not print it into the service log, as it does when it
    generates the password itself."""
    path = _airflow_password_file(s)
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps({AIRFLOW_USER: secrets.token_urlsafe(16)}) + "\n")
    log.info("airflow: generated the %s password in %s", AIRFLOW_USER, path)


def _airflow_bin(s: Settings) -> Path:
    return _airflow_home(s) / "bin"


def _write_airflow_shim(s: Settings) -> None:
    """An ``airflow`` first on the PATH of ``airflow standalone`` that starts the scheduler and the
    triggerer with ``--skip-serve-logs``: their log servers (8793, 8794) listen on every interface,
    with no setting to change that (airflow/utils/serve_logs/core.py binds host ""). On one machine
    the API server reads the task and trigger logs from disk, so nothing needs them."""
    shim = _airflow_bin(s) / "airflow"
    shim.parent.mkdir(parents=True, exist_ok=True)
    real = shlex.quote(str(VENV_BIN / "airflow"))
    shim.write_text(
        "#!/bin/sh\n# written by scripts/stack.py (see _write_airflow_shim)\n"
        f'case "$1" in scheduler|triggerer) exec {real} "$@" --skip-serve-logs ;; esac\n'
        f'exec {real} "$@"\n'
    )
    shim.chmod(0o755)


def _prepare_airflow(s: Settings) -> None:
    _ensure_airflow_password(s)
    _write_airflow_shim(s)


def _ray_healthy(s: Settings) -> bool:
    token = _ray_token(s)
    if not token:
        return False
    headers = {"Authorization": f"Bearer {token}"}
    return _http_ok(f"{s.ray_address.rstrip('/')}/api/jobs/", headers)


def _airflow_healthy() -> bool:
    """The API server answers and reports the scheduler as healthy."""
    try:
        resp = requests.get(f"http://127.0.0.1:{AIRFLOW_PORT}/api/v2/monitor/health", timeout=3)
        return resp.status_code == 200 and resp.json()["scheduler"]["status"] == "healthy"
    except (requests.RequestException, ValueError, KeyError, TypeError):
        return False


def _airflow_connections(s: Settings) -> dict[str, str]:
    """AIRFLOW_CONN_CT_* variables (JSON format) for S3, MLflow and Ray's dashboard."""
    s3_host, s3_port = _host_port(s.s3_endpoint, 9000)
    ml_host, ml_port = _host_port(s.mlflow_tracking_uri, 5000)
    ray_host, ray_port = _host_port(s.ray_address, 8265)
    conns = {
        "CT_MINIO": {
            "conn_type": "aws",
            "host": s3_host,
            "port": s3_port,
            "login": s.s3_access_key,
            "password": s.s3_secret_key,
            "extra": {
                "secure": s.s3_secure,
                "region": s.s3_region,
                "endpoint_url": s.s3_url,  # what the Amazon provider's hooks read
                "region_name": s.s3_region,
            },
        },
        "CT_MLFLOW": {"conn_type": "http", "host": ml_host, "port": ml_port},
        "CT_RAY": {"conn_type": "http", "host": ray_host, "port": ray_port},
    }
    return {f"AIRFLOW_CONN_{key}": json.dumps(value) for key, value in conns.items()}


def _node_secrets(s: Settings) -> dict[str, str]:
    """The secret settings, for the Ray node's environment (settings_env leaves them out)."""
    return {"CT_S3_ACCESS_KEY": s.s3_access_key, "CT_S3_SECRET_KEY": s.s3_secret_key}


def _ray_loopback_env(ray_host: str) -> dict[str, str]:
    """Keep a loopback Ray node on loopback. On Linux, `ray start` swaps a node IP of 127.0.0.1
    for the machine's network address (ray._private.services.resolve_ip_for_localhost), and its
    servers bind that address or every interface. Ray's switch for single-machine clusters
    (meant for macOS and Windows) makes it keep 127.0.0.1; no other node can join then."""
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"} if _is_loopback(ray_host) else {}


def _services(s: Settings) -> dict[str, Service]:
    """The four services, built from the current settings (no side effects)."""
    # Every service (and what it spawns by name: `airflow`, Ray jobs' `python`) runs
    # from the venv and can `import ml`.
    base_env = {
        **os.environ,
        **service_env(s),
        "PATH": os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")]),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    s3_host, s3_port = _host_port(s.s3_endpoint, 9000)
    ml_host, ml_port = _host_port(s.mlflow_tracking_uri, 5000)
    # Ray listens on the host of CT_RAY_ADDRESS (127.0.0.1 by default): as the node IP, every Ray
    # server (GCS, raylet, object manager, workers, agents, client server, metrics) binds it.
    ray_host, dash_port = _host_port(s.ray_address, 8265)
    airflow_home = _airflow_home(s)

    # fmt: off
    seaweedfs_argv = [
        str(VENV_BIN / "weed"), "-logtostderr", "mini", f"-dir={_s3_data_dir(s)}",
        f"-ip={s3_host}", f"-ip.bind={s3_host}", f"-s3.port={s3_port}",
        *(f"-{flag}={port}" for flag, port in SEAWEEDFS_PORTS.items()),
        # no admin UI, WebDAV, Iceberg or Lance endpoints, no telemetry
        "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-master.telemetry=false",
    ]
    mlflow_argv = [
        str(VENV_BIN / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{_state(s, 'mlflow', 'mlflow.db')}",
        "--artifacts-destination", f"s3://{s.mlflow_bucket}",
        "--host", ml_host, "--port", str(ml_port), "--workers", "1",
    ]
    ray_argv = [
        str(VENV_BIN / "ray"), "start", "--head",
        "--port", str(RAY_GCS_PORT), "--node-ip-address", ray_host,
        "--ray-client-server-port", str(RAY_CLIENT_PORT),
        "--include-dashboard", "true",
        "--dashboard-host", ray_host, "--dashboard-port", str(dash_port),
        # Twice the machine's cores as logical CPUs (CT_RAY_NUM_CPUS overrides): each model's Serve
        # replica (1 CPU) and a 2-worker training job fit side by side on a 2-core laptop, with two
        # models served (inference mostly idles between requests).
        "--num-cpus", ray_num_cpus(), "--disable-usage-stats",
        # Prometheus metrics of Ray, Serve and the app (ct_serve_*) on this port of every node.
        "--metrics-export-port", str(RAY_METRICS_PORT),
    ]
    # fmt: on

    s3 = Service(
        name="s3",
        ports=(s3_port, *SEAWEEDFS_PORTS.values(), SEAWEEDFS_ADMIN_GRPC_PORT),
        url=s.s3_url,
        argv=seaweedfs_argv,
        # AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (from service_env) become SeaweedFS's one S3
        # identity: wrong credentials are refused. The signing keys (new at every start) lock the
        # filer's and volume server's write APIs and the S3 gateway's IAM gRPC calls.
        env={
            **base_env,
            "WEED_JWT_SIGNING_KEY": secrets.token_urlsafe(32),
            "WEED_JWT_FILER_SIGNING_KEY": secrets.token_urlsafe(32),
        },
        health=lambda: _s3_healthy(s),
        timeout_s=60,
        marker=f"mini -dir={_s3_data_dir(s)} ",
        before_start=lambda: _prepare_s3(s),
        after_start=lambda: _make_buckets(s),
    )
    mlflow = Service(
        name="mlflow",
        ports=(ml_port,),
        url=s.mlflow_tracking_uri,
        argv=mlflow_argv,
        env={**base_env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        before_start=lambda: _retire_orphaned_mlflow_db(s),
        health=lambda: _http_ok(f"{s.mlflow_tracking_uri.rstrip('/')}/health"),
        timeout_s=120,
        marker="mlflow server",
    )
    ray = Service(
        name="ray",
        # GCS, dashboard, metrics, client server, and the Serve proxy that deployments open later
        ports=(RAY_GCS_PORT, dash_port, RAY_METRICS_PORT, RAY_CLIENT_PORT, _host_port(s.serve_url, 8000)[1]),
        url=s.ray_address,
        argv=ray_argv,
        # The nodes' own environment is where jobs and Serve replicas find the secrets (S3 keys,
        # CT_SERVE_API_TOKEN when set): a runtime_env is shown by the dashboard to all its users.
        env={
            **base_env,
            **_node_secrets(s),
            **_ray_loopback_env(ray_host),
            **serve_ingress_env(s),
            "RAY_USAGE_STATS_ENABLED": "0",
        },
        health=lambda: _ray_healthy(s),
        timeout_s=120,
        marker="gcs_server",
        daemonizes=True,
        stop_argv=[str(VENV_BIN / "ray"), "stop"],
        before_start=lambda: _prepare_ray(s),
    )
    airflow = Service(
        name="airflow",
        ports=(AIRFLOW_PORT,),
        url=f"http://127.0.0.1:{AIRFLOW_PORT}",
        argv=[str(VENV_BIN / "airflow"), "standalone"],
        env={
            **base_env,
            "PATH": os.pathsep.join([str(_airflow_bin(s)), base_env["PATH"]]),
            **_airflow_connections(s),
            "AIRFLOW_HOME": str(airflow_home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO_ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            # LocalExecutor forks `parallelism` idle workers up front (default 32).
            "AIRFLOW__CORE__PARALLELISM": "8",
            "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "120",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{AIRFLOW_PORT}/execution/",
            "AIRFLOW__DAG_PROCESSOR__DAG_FILE_PROCESSOR_TIMEOUT": "180",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(AIRFLOW_PORT),
        },
        health=_airflow_healthy,
        timeout_s=180,
        marker="airflow standalone",
        before_start=lambda: _prepare_airflow(s),
    )
    return {svc.name: svc for svc in (s3, mlflow, ray, airflow)}


# --------------------------------------------------------------------------------------
# process bookkeeping
# --------------------------------------------------------------------------------------


def _read_pid(s: Settings, name: str) -> int | None:
    try:
        return int(_pid_file(s, name).read_text().strip())
    except (OSError, ValueError):
        return None


def _our_pid(s: Settings, svc: Service) -> int | None:
    """The leader pid of our running instance of ``svc``, or None."""
    if svc.daemonizes:
        # Ray: ours if the dashboard accepts our token; report the GCS server's pid.
        # (Stale pid files are harmless: down only signals live members of that session.)
        if not svc.health():
            return None
        owner = _port_owner(RAY_GCS_PORT)
        return owner[0] if owner else 0
    pid = _read_pid(s, svc.name)
    if pid and _alive(pid) and svc.marker in _cmdline(pid):
        return pid
    return None


def _check_ports(svc: Service) -> None:
    """Raise StackError naming the port and its owner if a port of ``svc`` is taken."""
    for port in svc.ports:
        if _port_free(port):
            continue
        owner = _port_owner(port)
        who = f" by {owner[1]} (pid {owner[0]})" if owner else ""
        raise StackError(
            f"{svc.name}: port {port} is already in use{who}, not by this stack; "
            f"stop it or point the CT_* settings elsewhere"
        )


def _wait_healthy(svc: Service, alive: Callable[[], bool]) -> float:
    """Poll ``svc.health`` until it passes; return seconds waited or raise."""
    start = time.monotonic()
    next_report = start + PROGRESS_EVERY_S
    while True:
        if svc.health():
            return time.monotonic() - start
        elapsed = time.monotonic() - start
        if not alive():
            raise StackError(f"{svc.name}: process exited after {elapsed:.0f} s")
        if elapsed > svc.timeout_s:
            raise StackError(f"{svc.name}: not healthy after {svc.timeout_s:.0f} s")
        if time.monotonic() >= next_report:
            log.info("%s: waiting for health check (%.0f s)", svc.name, elapsed)
            next_report += PROGRESS_EVERY_S
        time.sleep(1)


def _start(s: Settings, svc: Service) -> None:
    """Launch ``svc`` detached (log to its log file); wait until healthy."""
    log_path, workdir = _log_file(s, svc.name), _state(s, svc.name)
    for directory in (log_path.parent, _pid_file(s, svc.name).parent, workdir):
        directory.mkdir(parents=True, exist_ok=True)
    if svc.before_start:
        svc.before_start()
    log.info("%s: starting: %s", svc.name, shlex.join(svc.argv))
    started = time.monotonic()
    with log_path.open("ab") as fh:
        fh.write(f"\n===== {time.strftime('%F %T')} {shlex.join(svc.argv)}\n".encode())
        fh.flush()
        proc = _DetachedPopen(
            svc.argv,
            env=svc.env,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    if svc.daemonizes:
        try:
            rc = proc.wait(timeout=svc.timeout_s)
        except subprocess.TimeoutExpired:
            _signal_session(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = -1
        _pid_file(s, svc.name).write_text(f"{proc.pid}\n")  # the daemons' session id
        if rc != 0:
            _fail(s, svc, f"{svc.name}: `{svc.argv[0]} {svc.argv[1]}` exited with {rc}", stop=True)
        ports = svc.ports

        def alive() -> bool:
            return not _port_free(ports[0])
    else:
        _CHILDREN[svc.name] = proc
        _pid_file(s, svc.name).write_text(f"{proc.pid}\n")

        def alive() -> bool:
            return proc.poll() is None

    try:
        _wait_healthy(svc, alive)
    except StackError as exc:
        _fail(s, svc, str(exc), stop=True)
    log.info("%s: healthy after %.1f s at %s", svc.name, time.monotonic() - started, svc.url)


def _fail(s: Settings, svc: Service, message: str, stop: bool = False) -> None:
    """Log the tail of the service's log, stop the half-started service if asked, raise."""
    log_path = _log_file(s, svc.name)
    tail = _log_tail(log_path).rstrip()
    log.error("%s\n--- last %d lines of %s ---\n%s", message, LOG_TAIL_LINES, log_path, tail)
    if stop:
        _stop(s, svc)
    raise StackError(message)


def _stop(s: Settings, svc: Service) -> None:
    """Stop ``svc`` (``stop_argv`` first if it has one), then SIGTERM what is left of its
    session and SIGKILL it after a grace period."""
    if svc.stop_argv:
        with _log_file(s, svc.name).open("ab") as fh:
            done = subprocess.run(
                svc.stop_argv, env=svc.env, stdout=fh, stderr=subprocess.STDOUT, timeout=120
            )
        log.info("%s: `%s` exited with %d", svc.name, shlex.join(svc.stop_argv), done.returncode)
    pid_file = _pid_file(s, svc.name)
    pid = _read_pid(s, svc.name)
    child = _CHILDREN.pop(svc.name, None)
    if pid is None or not _session_members(pid):
        if svc.stop_argv:
            _wait_ports_free(svc)
        log.info("%s: %s", svc.name, "stopped" if svc.stop_argv else "not running")
        pid_file.unlink(missing_ok=True)
        return
    if _alive(pid) and svc.marker not in _cmdline(pid):
        log.warning("%s: pid %d is not ours (%s); leaving it", svc.name, pid, _cmdline(pid))
        pid_file.unlink(missing_ok=True)
        return
    log.info("%s: sending SIGTERM to session %d", svc.name, pid)
    _signal_session(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while _session_members(pid) and time.monotonic() < deadline:
        if child is not None:
            child.poll()  # reap the leader so it does not linger as a zombie
        time.sleep(0.5)
    leftovers = _session_members(pid)
    if leftovers:
        log.warning("%s: %s still running after %.0f s; SIGKILL", svc.name, leftovers, STOP_GRACE_S)
        _signal_session(pid, signal.SIGKILL)
    if child is not None:
        child.wait(timeout=5)
    pid_file.unlink(missing_ok=True)
    _wait_ports_free(svc)
    log.info("%s: stopped", svc.name)


def _wait_ports_free(svc: Service, timeout_s: float = 10.0) -> None:
    """Wait (a little) until a stopped service's ports are free, so that an `up` right after this
    `down` finds them so. /proc shows a multi-threaded process (weed, a Go binary) as a zombie once
    its main thread has exited, while its other threads still hold its sockets for a moment."""
    deadline = time.monotonic() + timeout_s
    while any(not _port_free(port) for port in svc.ports) and time.monotonic() < deadline:
        time.sleep(0.2)


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------


def _select(services: Iterable[str] | None) -> list[str]:
    names = list(services) if services else list(SERVICE_ORDER)
    unknown = sorted(set(names) - set(SERVICE_ORDER))
    if unknown:
        raise StackError(f"unknown service(s) {unknown}; choose from {list(SERVICE_ORDER)}")
    return [name for name in SERVICE_ORDER if name in names]


def service_env(settings: Settings | None = None) -> dict[str, str]:
    """Environment variables a client needs to talk to the stack (MLflow, S3, Ray)."""
    s = settings or load_settings()
    return {
        "MLFLOW_TRACKING_URI": s.mlflow_tracking_uri,
        "MLFLOW_S3_ENDPOINT_URL": s.s3_url,
        "AWS_ACCESS_KEY_ID": s.s3_access_key,
        "AWS_SECRET_ACCESS_KEY": s.s3_secret_key,
        "AWS_DEFAULT_REGION": s.s3_region,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(_ray_token_path(s)),
    }


def up(services: Iterable[str] | None = None) -> list[str]:
    """Start the given services (default: all) in order; return those it started."""
    s = load_settings()
    defs = _services(s)
    problems = preflight.run(ports_to_check(services), _state(s))  # data, Python, ports, disk
    if problems:
        raise StackError(preflight.describe(problems))
    started: list[str] = []

    def bring_up(name: str) -> None:
        svc = defs[name]
        pid = _our_pid(s, svc)
        if pid is not None:
            if not svc.health():
                log.info("%s: pid %d is ours but not healthy yet; waiting", name, pid)
                try:
                    _wait_healthy(svc, lambda pid=pid: _alive(pid))
                except StackError as exc:
                    _fail(s, svc, str(exc))
            log.info("%s: already running (pid %s), reusing %s", name, pid or "?", svc.url)
        else:
            _pid_file(s, svc.name).unlink(missing_ok=True)  # stale, if any
            _check_ports(svc)
            _start(s, svc)
            started.append(name)
        if svc.after_start:
            svc.after_start()

    # S3 first (MLflow checks its store before it starts); MLflow, Ray and Airflow need nothing
    # of each other to start, so they start side by side: about a minute less than one by one.
    names = _select(services)
    if "s3" in names:
        bring_up("s3")
    rest = [name for name in names if name != "s3"]
    with ThreadPoolExecutor(max_workers=max(1, len(rest))) as pool:
        futures = [pool.submit(bring_up, name) for name in rest]
    errors = [err for err in (f.exception() for f in futures) if err is not None]
    if errors:
        raise errors[0]
    return [name for name in names if name in started]


def ports_to_check(services: Iterable[str] | None = None) -> dict[int, str]:
    """Port -> service for the given services (default: all), less those of our running ones."""
    s = load_settings()
    defs = _services(s)
    return {
        port: name
        for name in _select(services)
        if _our_pid(s, defs[name]) is None
        for port in defs[name].ports
    }


def state_dir() -> Path:
    """The stack's state directory (.state/ unless CT_STATE_DIR says otherwise)."""
    return _state(load_settings())


def down(services: Iterable[str] | None = None) -> None:
    """Stop the given services (default: all) in reverse order."""
    s = load_settings()
    defs = _services(s)
    for name in reversed(_select(services)):
        _stop(s, defs[name])


def is_healthy(service: str) -> bool:
    """True if ``service`` answers its health check right now."""
    return _services(load_settings())[_select([service])[0]].health()


def airflow_password_file() -> Path:
    """The file that holds the Airflow admin password (0600); nothing else shows it."""
    return _airflow_password_file(load_settings())


def airflow_login() -> tuple[str, str]:
    """(username, password) that Airflow standalone generated for its UI and API."""
    users = json.loads(_airflow_password_file(load_settings()).read_text())
    username, password = next(iter(users.items()))
    return username, password


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def _status() -> int:
    """Print one line per service and the Airflow login; 0 if all run, else 3."""
    s = load_settings()
    all_running = True
    for name, svc in _services(s).items():
        pid = _our_pid(s, svc)
        healthy = svc.health() if pid is not None and not svc.daemonizes else pid is not None
        state = "running" if healthy else ("unhealthy" if pid is not None else "stopped")
        all_running &= healthy
        print(f"{name:<8} {state:<10} pid={pid if pid else '-':<8} {svc.url}")
    password_file = _airflow_password_file(s)
    if password_file.exists():  # the password stays in its own file: no terminal or CI log shows it
        print(
            f"airflow login: {AIRFLOW_USER}, password in {password_file}  (UI http://127.0.0.1:{AIRFLOW_PORT})"
        )
    else:
        print("airflow login: not generated yet (start airflow first)")
    return 0 if all_running else 3


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: up / down / status / env."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command, help_text in (("up", "start services"), ("down", "stop services")):
        p = sub.add_parser(command, help=help_text)
        p.add_argument("services", nargs="*", metavar="SERVICE", help=", ".join(SERVICE_ORDER))
    sub.add_parser("status", help="show what is running")
    sub.add_parser("env", help="print `export` lines for clients")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    try:
        if args.command == "up":
            up(args.services)
        elif args.command == "down":
            down(args.services)
        elif args.command == "status":
            return _status()
        else:
            for key, value in service_env().items():
                print(f"export {key}={shlex.quote(value)}")
    except StackError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
