"""The local stack's S3 server without starting it: how `weed mini` is started (every port pinned,
on the host of CT_S3_ENDPOINT, flags the installed binary has) and when MLflow's database is moved
aside (only for an S3 store that really was wiped). tests/integration/test_persistence.py restarts
the running stack and checks that objects, models and a served model survive."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest

from ml.settings import Settings
from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import stack


def _s3(settings: Settings) -> stack.Service:
    return stack._services(settings)["s3"]


def _flags(argv: list[str]) -> dict[str, str]:
    return dict(arg[1:].split("=", 1) for arg in argv if arg.startswith("-") and "=" in arg)


@pytest.mark.parametrize("host", ["127.0.0.1", "10.1.2.3"])
def test_seaweedfs_pins_every_port_on_the_host_of_the_endpoint(tmp_path, host):
    s3 = _s3(Settings(state_dir=tmp_path, s3_endpoint=f"{host}:9100"))
    flags = _flags(s3.argv)
    assert s3.argv[1:3] == ["-logtostderr", "mini"]
    assert flags["ip"] == flags["ip.bind"] == host
    assert flags["s3.port"] == "9100" and flags["dir"] == str(tmp_path.resolve() / "s3" / "data")
    for flag, port in stack.SEAWEEDFS_PORTS.items():
        assert flags[flag] == str(port), flag  # given, so `weed mini` cannot move it elsewhere
    for component in ("master", "volume", "filer"):  # each HTTP port and its gRPC port
        assert {f"{component}.port", f"{component}.port.grpc"} <= set(flags)
    assert flags["admin.ui"] == flags["webdav"] == flags["master.telemetry"] == "false"
    assert flags["s3.port.iceberg"] == flags["s3.port.lance"] == "0"
    ports = [9100, *stack.SEAWEEDFS_PORTS.values(), stack.SEAWEEDFS_ADMIN_GRPC_PORT]
    assert sorted(s3.ports) == sorted(ports) and len(set(ports)) == len(ports)  # checked before a start
    for port in ports:  # not where Ray hands out worker ports, nor the kernel's ephemeral ports
        assert not 10002 <= port <= 19999 and port < 32768, port
    assert s3.marker in " ".join(s3.argv) + " "


def test_seaweedfs_gets_the_credentials_and_signing_keys(tmp_path):
    s3 = _s3(Settings(state_dir=tmp_path, s3_access_key="ak-local", s3_secret_key="sk-local-secret"))
    assert s3.env["AWS_ACCESS_KEY_ID"] == "ak-local"  # weed mini's one S3 identity
    assert s3.env["AWS_SECRET_ACCESS_KEY"] == "sk-local-secret"
    other = _s3(Settings(state_dir=tmp_path))
    for key in ("WEED_JWT_SIGNING_KEY", "WEED_JWT_FILER_SIGNING_KEY"):
        assert len(s3.env[key]) >= 32 and s3.env[key] != other.env[key]  # random, new every start


def test_the_flags_are_ones_the_installed_weed_mini_has(tmp_path):
    argv = _s3(Settings(state_dir=tmp_path)).argv
    weed_help = (
        subprocess.run([argv[0], "mini", "-h"], capture_output=True, text=True, timeout=60).stdout
        + subprocess.run([argv[0], "mini", "-h"], capture_output=True, text=True, timeout=60).stderr
    )
    assert "-s3.port" in weed_help, weed_help[:500]
    for flag in _flags(argv):
        assert f"  -{flag} " in weed_help or f"  -{flag}\n" in weed_help, flag
    global_help = subprocess.run([argv[0], "-h"], capture_output=True, text=True, timeout=60)
    assert "-logtostderr" in global_help.stdout + global_help.stderr


def test_no_credentials_no_start(tmp_path):
    """weed mini without an identity lets anyone read and write."""
    with pytest.raises(stack.StackError, match="must not be empty"):
        stack._prepare_s3(Settings(state_dir=tmp_path, s3_secret_key=""))


def test_a_store_keeps_its_id_and_the_saved_flags_go(tmp_path):
    settings = Settings(state_dir=tmp_path)
    stack._prepare_s3(settings)
    store = stack._s3_store_id(settings)
    assert store
    saved = stack._s3_data_dir(settings) / "mini.options"
    saved.write_text("s3.port=1234\n")  # what weed mini writes after a start and re-applies
    stack._prepare_s3(settings)
    assert stack._s3_store_id(settings) == store and not saved.exists()


# ---- MLflow's database and the S3 store ---------------------------------------------------------


def _mlflow_db(settings: Settings, runs: int = 1) -> None:
    db = stack._state(settings, "mlflow", "mlflow.db")
    db.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE runs (run_uuid TEXT)")
        conn.executemany("INSERT INTO runs VALUES (?)", [(f"r{i}",) for i in range(runs)])


def _retired(settings: Settings) -> list[str]:
    return sorted(p.name for p in stack._state(settings, "mlflow").glob("mlflow.db.orphaned-*"))


def test_the_database_stays_while_its_store_does(tmp_path):
    settings = Settings(state_dir=tmp_path)
    stack._prepare_s3(settings)
    stack._retire_orphaned_mlflow_db(settings)  # MLflow's first start records the store
    _mlflow_db(settings)  # ... then runs and models are logged
    for _ in range(3):  # restarts find the same store
        stack._prepare_s3(settings)
        stack._retire_orphaned_mlflow_db(settings)
        assert stack._state(settings, "mlflow", "mlflow.db").exists() and not _retired(settings)


def test_the_database_of_a_wiped_store_is_moved_aside_not_deleted(tmp_path):
    settings = Settings(state_dir=tmp_path)
    stack._prepare_s3(settings)
    stack._retire_orphaned_mlflow_db(settings)
    _mlflow_db(settings)
    # the S3 store is deleted (rm -rf .state/s3) and made anew at the next start
    for path in sorted(stack._s3_data_dir(settings).rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    stack._prepare_s3(settings)
    stack._retire_orphaned_mlflow_db(settings)
    assert not stack._state(settings, "mlflow", "mlflow.db").exists()
    assert len(_retired(settings)) == 1
    recorded = stack._state(settings, "mlflow", "s3-store").read_text().strip()
    assert recorded == stack._s3_store_id(settings)  # the new database belongs to the new store


def test_a_database_from_the_in_memory_s3_days_is_moved_aside(tmp_path):
    """No recorded store: written while S3 was moto's memory, whose artifacts are gone."""
    settings = Settings(state_dir=tmp_path)
    _mlflow_db(settings)
    stack._prepare_s3(settings)
    stack._retire_orphaned_mlflow_db(settings)
    assert len(_retired(settings)) == 1


def test_a_database_without_runs_or_without_a_local_store_is_left_alone(tmp_path):
    empty = Settings(state_dir=tmp_path / "empty")
    _mlflow_db(empty, runs=0)
    stack._prepare_s3(empty)
    stack._retire_orphaned_mlflow_db(empty)
    assert stack._state(empty, "mlflow", "mlflow.db").exists() and not _retired(empty)

    elsewhere = Settings(state_dir=tmp_path / "elsewhere")  # S3 is not the stack's own: no store id
    _mlflow_db(elsewhere)
    stack._retire_orphaned_mlflow_db(elsewhere)
    assert stack._state(elsewhere, "mlflow", "mlflow.db").exists() and not _retired(elsewhere)
