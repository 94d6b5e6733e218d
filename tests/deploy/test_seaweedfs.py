"""Compose's S3 server for real, without a docker engine: docker/seaweedfs/start.sh runs here with
the PyPI ``weed`` (the release the compose image pins) on spare ports, its S3 gateway on 127.0.0.2
as the container's network interface and everything else on 127.0.0.1 as the container's loopback.

- Every party's identity gets exactly what its policy (docker/minio/<party>.json) allows: SeaweedFS
  answers put, get, delete and list for every prefix the code writes, and some it must not, as the
  policy evaluator of test_least_privilege does, through the ``minio`` client the code uses.
- No identity can make buckets; wrong keys and anonymous requests are refused.
- Only the S3 gateway (and its gRPC port) listens beyond loopback, and that gRPC port refuses an
  unsigned request to add an identity (without the signing key it would accept one).
- A restart keeps the objects and finds the buckets made; bad keys stop the script before weed starts.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from minio import Minio
from minio.error import S3Error

from tests.deploy.test_docker import DOCKER
from tests.deploy.test_least_privilege import (
    ARTIFACTS,
    DATA,
    DELETE,
    PARTIES,
    READ,
    WRITE,
    allowed,
    written_prefixes,
)

START = DOCKER / "seaweedfs" / "start.sh"
WEED = Path(sys.executable).parent / "weed"
S3_HOST = "127.0.0.2"  # the "container interface"; 127.0.0.1 plays the container's loopback
REGION = "us-east-1"  # the code's clients name it (ml.storage): no GetBucketLocation call first
KEYS = {party: (f"ct-{party}-test-key", f"{party}-test-secret-0123") for party in PARTIES}


def _free_ports(n: int) -> list[int]:
    """``n`` HTTP ports, each with its gRPC port (+10000) free too, on both addresses."""
    ports: list[int] = []
    for port in range(21000 + os.getpid() % 2000 * 4, 30000):
        if all(_free(p, host) for p in (port, port + 10000) for host in ("127.0.0.1", S3_HOST)):
            ports.append(port)
            if len(ports) == n:
                return ports
    raise RuntimeError("no free ports")


def _free(port: int, host: str) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


@dataclass
class Server:
    s3_port: int
    env: dict[str, str]
    run_dir: Path
    proc: subprocess.Popen | None = None
    log: Path | None = None

    def start(self, timeout: float = 90) -> None:
        self.log = self.run_dir.parent / f"start-{time.monotonic_ns()}.log"
        (self.run_dir / "ready").unlink(missing_ok=True)  # the last run's (the script removes it too)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                ["sh", str(START)], env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while not (self.run_dir / "ready").exists():
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # as `docker stop` does: the script passes it on
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        assert not self.weed_processes(), "weed outlived the script"

    def weed_processes(self) -> list[psutil.Process]:
        if self.proc is None:
            return []
        found = []
        for proc in psutil.process_iter(["name", "cmdline"]):
            cmd = proc.info["cmdline"] or []
            if proc.info["name"] == "weed" and f"-s3.port={self.s3_port}" in cmd:
                found.append(proc)
        return found

    def client(self, party: str | None, secret: str | None = None) -> Minio:
        access, real_secret = KEYS[party] if party else (None, None)
        return Minio(
            f"{S3_HOST}:{self.s3_port}",
            access_key=access,
            secret_key=secret or real_secret,
            secure=False,
            region=REGION,
        )


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("seaweedfs")
    s3_port, master, volume, filer = _free_ports(4)
    env = {
        "PATH": os.environ["PATH"],
        "WEED": str(WEED),
        "CT_S3_POLICY_DIR": str(DOCKER / "minio"),
        "SEAWEEDFS_DATA_DIR": str(base / "data"),
        "SEAWEEDFS_RUN_DIR": str(base / "run"),
        "SEAWEEDFS_S3_BIND": S3_HOST,
        "SEAWEEDFS_S3_PORT": str(s3_port),
        "SEAWEEDFS_MASTER_PORT": str(master),
        "SEAWEEDFS_VOLUME_PORT": str(volume),
        "SEAWEEDFS_FILER_PORT": str(filer),
    }
    for party, (access, secret) in KEYS.items():
        env[f"S3_{party.upper()}_ACCESS_KEY"] = access
        env[f"S3_{party.upper()}_SECRET_KEY"] = secret
    srv = Server(s3_port, env, base / "run")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def _outcome(call) -> str:
    try:
        call()
    except S3Error as exc:
        return exc.code
    return "ok"


def _probe_keys() -> list[tuple[str, str]]:
    """(bucket, key) pairs: every prefix the code writes, reads of each side, and some no one may."""
    keys = [(DATA, key) for key in written_prefixes()]
    keys += [
        (DATA, "raw/agnews/2026-01-01/part-000.csv"),
        (DATA, "quarantine/agnews/b/_validation/s1.html"),
        (DATA, "reports/drift/m/w/report.html"),
        (DATA, "training/run/evaluation.json"),
        (DATA, "snapshots/s1/validated.parquet"),
        (DATA, "elsewhere/x.txt"),
        (DATA, "rawish/x.txt"),
        (ARTIFACTS, "1/models/m/artifacts/MLmodel"),
    ]
    return keys


@pytest.mark.parametrize("party", PARTIES)
def test_each_identity_gets_exactly_what_its_policy_allows(server, party):
    client = server.client(party)
    body = b"probe"
    mismatches = []
    for bucket, key in _probe_keys():
        calls = {
            WRITE: lambda b=bucket, k=key: client.put_object(b, k, io.BytesIO(body), len(body)),
            READ: lambda b=bucket, k=key: client.get_object(b, k).read(),
            DELETE: lambda b=bucket, k=key: client.remove_object(b, k),
        }
        for action, call in calls.items():  # put first: the get then finds the object if it may
            got = _outcome(call)
            want = allowed(party, action, bucket, key)
            # refused = AccessDenied; allowed = done, or NoSuchKey for a get of what nobody wrote
            if (got != "AccessDenied") != want or got not in {"ok", "AccessDenied", "NoSuchKey"}:
                mismatches.append(f"{action} {bucket}/{key}: SeaweedFS {got}, policy allows: {want}")
    for bucket in (DATA, ARTIFACTS):
        got = _outcome(lambda b=bucket: list(client.list_objects(b, prefix="", recursive=True)))
        if (got == "ok") != allowed(party, "s3:ListBucket", bucket):
            mismatches.append(f"list {bucket}: SeaweedFS {got}")
    assert not mismatches, f"{party}:\n" + "\n".join(mismatches)


def test_the_evaluator_and_server_really_disagree_when_they_should(server):
    """The comparison above is worth something only if some answers are refusals and some not."""
    ray = server.client("ray")
    assert _outcome(lambda: ray.put_object(DATA, "ray-results/r/x", io.BytesIO(b"x"), 1)) == "ok"
    assert _outcome(lambda: ray.put_object(DATA, "snapshots/s1/manifest.json", io.BytesIO(b"x"), 1)) == (
        "AccessDenied"
    )
    assert _outcome(lambda: ray.get_object(DATA, "ray-results/r/x").read()) == "ok"


def test_no_identity_makes_buckets_and_strangers_get_nothing(server):
    for party in PARTIES:
        assert _outcome(lambda p=party: server.client(p).make_bucket(f"new-{p}")) == "AccessDenied"
    # the buckets start.sh made through the shell are there
    assert server.client("airflow").bucket_exists(DATA)
    assert server.client("mlflow").bucket_exists(ARTIFACTS)
    wrong = server.client("airflow", secret="not-the-secret-at-all")
    assert _outcome(lambda: list(wrong.list_objects(DATA))) == "SignatureDoesNotMatch"
    stranger = Minio(
        f"{S3_HOST}:{server.s3_port}", "nobody-key", "nobody-secret", secure=False, region=REGION
    )
    assert _outcome(lambda: list(stranger.list_objects(DATA))) == "InvalidAccessKeyId"
    anonymous = server.client(None)
    assert _outcome(lambda: anonymous.get_object(DATA, "ray-results/r/x").read()) == "AccessDenied"


def test_only_the_s3_gateway_listens_beyond_loopback(server):
    (weed,) = server.weed_processes()
    listening = {(c.laddr.ip, c.laddr.port) for c in weed.net_connections("tcp") if c.status == "LISTEN"}
    s3 = {server.s3_port, server.s3_port + 10000}  # S3 and its gRPC port
    outside = {(ip, port) for ip, port in listening if ip != "127.0.0.1"}
    assert outside == {(S3_HOST, port) for port in s3}, sorted(listening)
    env = server.env
    for name in ("MASTER", "VOLUME", "FILER"):  # the APIs without S3 credentials: loopback only
        port = int(env[f"SEAWEEDFS_{name}_PORT"])
        assert {("127.0.0.1", port), ("127.0.0.1", port + 10000)} <= listening, name


def test_the_s3_grpc_port_refuses_an_unsigned_new_identity(server):
    import grpc

    def field(number: int, payload: bytes) -> bytes:
        length, size = b"", len(payload)
        while True:
            byte, size = size & 0x7F, size >> 7
            length += bytes([byte | (0x80 if size else 0)])
            if not size:
                break
        return bytes([number << 3 | 2]) + length + payload

    credential = field(1, b"intruder-key") + field(2, b"intruder-secret")
    identity = field(1, b"intruder") + field(2, credential) + field(3, b"Admin")
    with grpc.insecure_channel(f"{S3_HOST}:{server.s3_port + 10000}") as channel:
        put = channel.unary_unary(
            "/messaging_pb.SeaweedS3IamCache/PutIdentity",
            request_serializer=lambda m: m,
            response_deserializer=lambda m: m,
        )
        with pytest.raises(grpc.RpcError) as refused:
            put(field(1, identity), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, refused.value
    intruder = Minio(
        f"{S3_HOST}:{server.s3_port}", "intruder-key", "intruder-secret", secure=False, region=REGION
    )
    assert _outcome(lambda: list(intruder.list_objects(DATA))) == "InvalidAccessKeyId"


def test_a_restart_keeps_the_objects_and_the_buckets(server):
    producer, airflow = server.client("producer"), server.client("airflow")
    key = "raw/agnews/2026-02-02/kept.csv"
    producer.put_object(DATA, key, io.BytesIO(b"text,label\n"), 11)
    started = time.monotonic()
    server.stop()
    stopped = time.monotonic()
    server.start()
    print(f"seaweedfs: stopped in {stopped - started:.1f} s, up again in {time.monotonic() - stopped:.1f} s")
    assert airflow.get_object(DATA, key).read() == b"text,label\n"
    assert "S3 on" in server.log.read_text()  # the buckets were there: the script went on


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("S3_RAY_SECRET_KEY", 'quote"breaks-json', "may only hold"),
        ("S3_RAY_SECRET_KEY", "short", "at least 8"),
        ("S3_MLFLOW_ACCESS_KEY", KEYS["ray"][0], "another party's key"),
        ("S3_AIRFLOW_ACCESS_KEY", None, "set S3_AIRFLOW_ACCESS_KEY in docker/.env"),
    ],
)
def test_bad_keys_stop_the_script_before_weed_starts(tmp_path, variable, value, message):
    env = {
        "PATH": os.environ["PATH"],
        "WEED": str(tmp_path / "no-weed-here"),
        "CT_S3_POLICY_DIR": str(DOCKER / "minio"),
        "SEAWEEDFS_DATA_DIR": str(tmp_path / "data"),
        "SEAWEEDFS_RUN_DIR": str(tmp_path / "run"),
    }
    for party, (access, secret) in KEYS.items():
        env[f"S3_{party.upper()}_ACCESS_KEY"], env[f"S3_{party.upper()}_SECRET_KEY"] = access, secret
    if value is None:
        del env[variable]
    else:
        env[variable] = value
    done = subprocess.run(["sh", str(START)], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0 and message in done.stderr, done.stderr
    assert "weed exited" not in done.stderr  # it stopped before starting weed
