"""Served vs bare throughput of the Ray Serve classifier: batched vs unbatched, under closed-loop HTTP load.

One run measures, on the same cores and one after the other:

* **served unbatched**: a benchmark application of its own (``serve.app:classifier_app``, one
  replica, route ``/bench``, ``max_batch_size=1``) under closed-loop load: ``--concurrency``
  clients, each sending one text per ``POST /bench/v1/predict`` and the next as soon as the answer
  is in, for ``--duration`` seconds after ``--warmup`` seconds;
* **served batched**: the same replica reconfigured (``user_config``) to each
  ``--max-batch-size`` x ``--batch-wait-ms`` (default 16 x {5, 100} ms);
* **HTTP only**: ``GET /bench/healthz`` under the same load: the serving path without the model;
* **bare**: the model in this process (:class:`ml.predict.TextClassifier`, no HTTP, no Ray), same
  torch threads, on random batches of 1, 4, 8, 16, 32 texts of the same pool;

and prints texts/s, p50/p95/p99 latency, errors, the replica's mean batch, CPU time per text and
where the CPU went (client, proxy, replica, the rest of the machine); then batched ÷ unbatched and
served ÷ bare ("serving efficiency") against their targets. A JSON record of the run is appended
to ``benchmarks/results/serve_bench.jsonl``.

The benchmark application is added to the running Serve config beside the other applications
(the Serve REST API is declarative: every PUT names every application, so theirs are re-sent as
they are) and only it is removed at the end, also on Ctrl-C, SIGTERM or an error. The model is the
packaged base model with a random head, exported like training does (``--model-path`` for a real
export): the same compute as a trained model.

    .venv/bin/python benchmarks/serve_bench.py                        # local stack, ~2.5 min
    .venv/bin/python benchmarks/serve_bench.py --max-batch-size 8,16 --batch-wait-ms 20,100
    .venv/bin/python benchmarks/serve_bench.py --bare-only --device cuda    # no Ray needed
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import datetime as dt
import gzip
import ipaddress
import itertools
import json
import os
import platform
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ml.sample_data import AGNEWS_SAMPLE

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = AGNEWS_SAMPLE
DEFAULT_RESULTS = REPO_ROOT / "benchmarks" / "results" / "serve_bench.jsonl"
APP_NAME = "serve-bench"
ROUTE_PREFIX = "/bench"
TEMPLATE_APP = "classifier"  # serve/config.yaml's application: the deployment settings we copy
DEFAULT_METRICS_URL = "http://127.0.0.1:8090/metrics"  # scripts/stack.py's RAY_METRICS_PORT
TARGET_BATCHED_OVER_UNBATCHED = 1.8  # on this 2-core CPU; >= 10 expected on a GPU
TARGET_GPU_BATCHED_OVER_UNBATCHED = 10.0
TARGET_SERVED_OVER_BARE = 0.8
TARGET_LOW_LOAD_P50_EXCESS_MS = 10.0  # adaptive batching, 1 client: p50 within this of bare batch 1
FIXED_WAIT_BASELINE_MS = 100.0  # the fixed batch wait adaptive batching is compared with
SERVED_MODES = ("unbatched", "batched", "adaptive")
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------------------
# texts and the model export
# ----------------------------------------------------------------------------------------


def load_texts(path: Path, seed: int) -> tuple[list[str], list[str]]:
    """The AG News texts, shuffled with ``seed``, and the sorted label set."""
    import csv

    with gzip.open(path, "rt", newline="") if path.suffix == ".gz" else path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "text" not in rows[0]:
        raise SystemExit(f"{path}: expected a CSV with a 'text' column")
    texts = [row["text"] for row in rows if row["text"].strip()]
    random.Random(seed).shuffle(texts)
    labels = sorted({row.get("label", "") for row in rows} - {""}) or ["a", "b", "c", "d"]
    return texts, labels


def build_export(directory: Path, labels: list[str]) -> Path:
    """The packaged base model with a seeded random head, exported like training does.

    :func:`ml.predict.export_base_model` with training's default ``max_length`` (64), so a
    forward pass costs what a trained model's does.
    """
    from transformers.utils import logging as hf_logging

    from ml.predict import export_base_model
    from ml.train import TrainConfig

    hf_logging.disable_progress_bar()
    return export_base_model(directory, labels, max_length=TrainConfig.model_fields["max_length"].default)


# ----------------------------------------------------------------------------------------
# the bare model
# ----------------------------------------------------------------------------------------


def _percentiles_ms(seconds: list[float]) -> dict[str, float | None]:
    if not seconds:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    import numpy as np

    p50, p95, p99 = np.percentile(np.asarray(seconds) * 1000, [50, 95, 99])
    return {"p50_ms": round(float(p50), 1), "p95_ms": round(float(p95), 1), "p99_ms": round(float(p99), 1)}


def bench_bare(
    export: Path,
    texts: list[str],
    batch_sizes: list[int],
    threads: int,
    device: str | None,
    dtype: str | None,
    seconds: float,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """texts/s of ``predict_proba`` on consecutive random batches of each size, as a replica runs them.

    Each batch is ``batch_size`` texts of the shuffled pool, tokenized, sorted and padded to its
    own longest text by ``TextClassifier.predict_proba``: what ``Classifier._classify`` does with
    a batch of that many requests. Latency columns are per batch (one ``predict_proba`` call).
    """
    import torch
    from transformers.utils import logging as hf_logging

    from ml.predict import TextClassifier

    hf_logging.disable_progress_bar()
    torch.set_num_threads(threads)
    started = time.perf_counter()
    clf = TextClassifier.from_dir(export, device=device, dtype=dtype)
    info = {
        "device": str(clf.device),
        "dtype": str(clf.model.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "max_length": clf.max_length,
        "load_s": round(time.perf_counter() - started, 1),
    }
    rows = []
    for size in batch_sizes:
        chunks = itertools.cycle(range(0, len(texts) - size + 1, size))
        for _ in range(2):  # warm-up: first calls of a new shape allocate
            start = next(chunks)
            clf.predict_proba(texts[start : start + size], size)
        latencies: list[float] = []
        cpu_before = _cpu_now()
        began = time.perf_counter()
        while time.perf_counter() - began < seconds or len(latencies) < 3:
            start = next(chunks)
            t = time.perf_counter()
            clf.predict_proba(texts[start : start + size], size)
            latencies.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - began
        own, machine = (after - before for after, before in zip(_cpu_now(), cpu_before, strict=True))
        row = {
            "mode": "bare",
            "max_batch_size": size,
            "batch_wait_ms": None,
            "concurrency": None,
            "texts": size * len(latencies),
            "seconds": round(elapsed, 2),
            "texts_per_s": size * len(latencies) / elapsed,
            "errors": 0,
            **_percentiles_ms(latencies),
            "cores_used": {
                "bare": round(own / elapsed, 2),
                "machine": round(machine / elapsed, 2),
                "other": round((machine - own) / elapsed, 2),
            },
        }
        row["cpu_ms_per_text"] = _cpu_ms_per_text(row["cores_used"], row["texts_per_s"])
        print(f"   bare batch {size:>3}: {row['texts_per_s']:7.1f} texts/s", file=sys.stderr, flush=True)
        rows.append(row)
    del clf
    return rows, info


# ----------------------------------------------------------------------------------------
# the load generator
# ----------------------------------------------------------------------------------------


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)  # successful requests done in the window
    errors: Counter = field(default_factory=Counter)  # failures done in the window, by kind
    requests_total: int = 0  # everything that completed, warm-up included
    ok_total: int = 0
    window_s: float = 0.0


class Window:
    """Warm-up, then the timed window: a request counts if it completed inside the window."""

    def __init__(self, warmup_s: float, duration_s: float) -> None:
        now = time.perf_counter()
        self.begin, self.end = now + warmup_s, now + warmup_s + duration_s

    def record(self, result: LoadResult, sent: float, done: float, error: str | None) -> None:
        result.requests_total += 1
        result.ok_total += error is None
        if self.begin <= done <= self.end:
            if error is None:
                result.latencies.append(done - sent)
            else:
                result.errors[error] += 1


def _body_error(status: int, payload: bytes, expect: bytes) -> str | None:
    if status != 200:
        return f"HTTP {status}"
    if expect not in payload:
        return f"200 without {expect.decode()}"
    return None


async def _aiohttp_load(
    url: str, bodies: list[bytes] | None, expect: bytes, concurrency: int, window: Window
) -> LoadResult:
    import aiohttp

    result = LoadResult()
    counter = itertools.count()
    headers = {"content-type": "application/json", **_auth_header()}
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency), timeout=aiohttp.ClientTimeout(total=60)
    ) as session:

        async def worker() -> None:
            while (sent := time.perf_counter()) < window.end:
                try:
                    if bodies is None:
                        call = session.get(url, headers=headers)
                    else:
                        call = session.post(url, data=bodies[next(counter) % len(bodies)], headers=headers)
                    async with call as resp:
                        error = _body_error(resp.status, await resp.read(), expect)
                except (TimeoutError, aiohttp.ClientError, OSError) as err:
                    error = type(err).__name__
                window.record(result, sent, time.perf_counter(), error)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return result


def _threads_load(
    url: str, bodies: list[bytes] | None, expect: bytes, concurrency: int, window: Window
) -> LoadResult:
    import requests

    result = LoadResult()
    counter = itertools.count()
    lock = threading.Lock()
    headers = {"content-type": "application/json", **_auth_header()}

    def worker() -> None:
        with requests.Session() as session:
            while (sent := time.perf_counter()) < window.end:
                with lock:
                    body = None if bodies is None else bodies[next(counter) % len(bodies)]
                try:
                    if body is None:
                        resp = session.get(url, headers=headers, timeout=60)
                    else:
                        resp = session.post(url, data=body, headers=headers, timeout=60)
                    error = _body_error(resp.status_code, resp.content, expect)
                except requests.RequestException as err:
                    error = type(err).__name__
                done = time.perf_counter()
                with lock:
                    window.record(result, sent, done, error)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return result


def _auth_header() -> dict[str, str]:
    token = os.environ.get("CT_SERVE_API_TOKEN")  # serve.app.API_TOKEN_ENV
    return {"Authorization": f"Bearer {token}"} if token else {}


class CpuProbe(threading.Thread):
    """CPU seconds used during the timed window by this process (the client), the given local
    processes (proxy, replica) and the whole machine (all cores, from /proc/stat)."""

    def __init__(self, pids: dict[str, list[int]], window: Window) -> None:
        super().__init__(daemon=True)
        self.pids, self.window = pids, window
        self.begin: dict[str, float] = {}
        self.end: dict[str, float] = {}

    def _sample(self) -> dict[str, float]:
        values = {"client": _cpu_now()[0]}
        values.update({name: sum(_proc_cpu_s(pid) for pid in pids) for name, pids in self.pids.items()})
        values["machine"] = _machine_busy_s()
        return values

    def run(self) -> None:
        time.sleep(max(0.0, self.window.begin - time.perf_counter()))
        self.begin = self._sample()
        time.sleep(max(0.0, self.window.end - time.perf_counter()))
        self.end = self._sample()

    def cores_used(self) -> dict[str, float]:
        """Average cores busy per process group over the window; ``other``: the rest of the machine."""
        if not self.begin or not self.end:
            return {}
        seconds = self.window.end - self.window.begin
        used = {name: (self.end[name] - self.begin[name]) / seconds for name in self.begin}
        used["other"] = used["machine"] - sum(v for k, v in used.items() if k != "machine")
        return {name: round(value, 2) for name, value in used.items()}


def _proc_cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), from /proc; 0 if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def _cpu_now() -> tuple[float, float]:
    """(CPU seconds of this process, busy CPU seconds of the whole machine)."""
    usage = os.times()
    return usage.user + usage.system, _machine_busy_s()


def _machine_busy_s() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat; steal counts: other guests had it)."""
    first = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in first[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def run_load(
    client: str,
    url: str,
    texts: list[str] | None,
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    pids: dict[str, list[int]],
) -> tuple[LoadResult, dict[str, float]]:
    """Closed loop: ``concurrency`` clients, one text per request, the next as soon as one answers.

    ``texts`` None: ``GET url`` instead (the HTTP path alone, no model).
    """
    if texts is None:
        bodies, expect = None, b'"status"'
    else:
        bodies, expect = [json.dumps({"text": text}).encode() for text in texts], b'"predictions"'
    window = Window(warmup_s, duration_s)
    probe = CpuProbe(pids, window)
    probe.start()
    if client == "aiohttp":
        result = asyncio.run(_aiohttp_load(url, bodies, expect, concurrency, window))
    else:
        result = _threads_load(url, bodies, expect, concurrency, window)
    probe.join()
    result.window_s = duration_s
    return result, probe.cores_used()


# ----------------------------------------------------------------------------------------
# the benchmark application on Ray Serve
# ----------------------------------------------------------------------------------------


class BenchApp:
    """Our own Serve application, added to (and later removed from) the running declarative config."""

    def __init__(
        self,
        deployer: Any,
        serve_url: str,
        deployment: dict[str, Any],
        env_vars: dict[str, str],
        timeout_s: float,
        import_path: str = "serve.app:classifier_app",
    ) -> None:
        self.deployer = deployer  # ml.rollout.ServeDeployer with app_name=APP_NAME
        self.url = serve_url.rstrip("/") + ROUTE_PREFIX
        self.deployment = deployment
        self.env_vars = env_vars
        self.import_path = import_path
        self.timeout_s = timeout_s
        self.deployed = False
        self.applied: dict[str, Any] | None = None

    def _app(self, user_config: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": APP_NAME,
            "route_prefix": ROUTE_PREFIX,
            "import_path": self.import_path,
            "runtime_env": {"env_vars": dict(self.env_vars)} if self.env_vars else {},
            "deployments": [{**copy.deepcopy(self.deployment), "user_config": user_config}],
        }

    def apply(self, user_config: dict[str, Any]) -> None:
        """Put our app (with ``user_config``) into the running config; the other apps stay as they are."""
        from serve.schemas import ServeOptions

        if self.deployed and user_config == self.applied:
            return  # every PUT re-sends the other apps' config: no more of them than needed
        ServeOptions.model_validate(user_config)  # refuse a bad config here, not in the replica
        config = self.deployer.current_config()
        if config is None:  # Serve starts with this PUT: it listens where serve/config.yaml says
            import yaml

            from ml.rollout import CONFIG_FILE

            http = yaml.safe_load(CONFIG_FILE.read_text()).get("http_options") or {}
            config = {"http_options": http, "applications": []}  # host 127.0.0.1, not Serve's 0.0.0.0
        others = [app for app in config["applications"] if app["name"] != APP_NAME]
        self.deployed = True  # from here on, remove() must run
        self.deployer.apply({**config, "applications": [*others, self._app(user_config)]})
        self.applied = user_config

    def wait_applied(self, user_config: dict[str, Any]) -> dict[str, Any]:
        """Until ``GET /bench/v1/model`` shows the model and batch limits of ``user_config``."""
        import requests

        deadline = time.monotonic() + self.timeout_s
        last = "no answer yet"
        missing_since: float | None = None
        while time.monotonic() < deadline:
            status, message = self.deployer.app_status()
            if status in {"DEPLOY_FAILED", "UNHEALTHY"}:
                raise RuntimeError(f"benchmark app is {status}: {message.strip()[:2000]}")
            if status == "NOT_STARTED" and self.deployed:
                missing_since = missing_since or time.monotonic()
                if time.monotonic() - missing_since > 30:
                    raise RuntimeError(
                        f"{APP_NAME!r} is not in the Serve config any more: another deploy (a PUT of "
                        "the whole config) replaced it; run the benchmark again"
                    )
            else:
                missing_since = None
            try:
                resp = requests.get(f"{self.url}/v1/model", timeout=5)
                info = resp.json() if resp.status_code == 200 else None
            except (requests.RequestException, ValueError):
                info = None
            if info is not None:
                limits = info.get("limits", {})
                if (
                    info.get("source") == user_config["model_path"]
                    and limits.get("max_batch_size") == user_config["max_batch_size"]
                    and limits.get("batch_wait_timeout_s") == user_config["batch_wait_timeout_s"]
                    and limits.get("adaptive_batching", False) == user_config.get("adaptive_batching", False)
                ):
                    return info
                last = f"serving {info.get('source')} with limits {limits}"
                if info.get("last_load_error"):
                    raise RuntimeError(f"benchmark app failed to load the model: {info['last_load_error']}")
            elif status != "NOT_STARTED":
                last = f"application {status}"
            time.sleep(1.0)
        raise RuntimeError(f"the benchmark app did not apply its config in {self.timeout_s:.0f} s ({last})")

    def remove(self) -> None:
        """Take our app out of the running config; leave every other app as it is."""
        if not self.deployed:
            return
        config = self.deployer.current_config()
        if config is None or not any(app["name"] == APP_NAME for app in config["applications"]):
            self.deployed = False
            return
        others = [app for app in config["applications"] if app["name"] != APP_NAME]
        self.deployer.apply({**config, "applications": others})
        self.deployed = False
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and APP_NAME in (self.deployer.details().get("applications") or {}):
            time.sleep(1.0)


def _other_apps_replicas(deployer: Any) -> dict[str, list[str]]:
    """The replica ids of every other app: a PUT that leaves an app as it was keeps its replicas."""
    apps = deployer.details().get("applications") or {}
    return {
        name: sorted(
            r.get("replica_id", "")
            for d in (app.get("deployments") or {}).values()
            for r in d.get("replicas", [])
        )
        for name, app in apps.items()
        if name != APP_NAME
    }


def _serve_pids() -> dict[str, list[int]]:
    """Our replica's and the HTTP proxy's pids, when they run on this machine (for their CPU time)."""
    replica = _local_pids(f"ray::ServeReplica:{APP_NAME}:")
    return {"replica": replica, "proxy": _local_pids("ray::ProxyActor")} if replica else {}


def _local_pids(marker: str) -> list[int]:
    """Pids of processes on this machine whose command line starts with ``marker``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "cmdline").read_bytes().startswith(marker.encode()):
                    pids.append(int(entry.name))
    return pids


def _niceness(pid: int) -> int | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(raw[raw.rindex(")") + 2 :].split()[16])  # field 19 of stat(5)


def _batch_metrics(url: str | None, role: str | None = None) -> tuple[float, float] | None:
    """(texts, forward passes) the replica has counted for our app (Ray metrics), or None.

    Texts come from the ``ct_serve_texts`` counter (only those of ``role``, e.g. ``champion``, when
    given: a shadow's answers count there too but run no batch) and passes from the
    ``ct_serve_batch_size`` histogram's count. Not from the histogram's ``_sum``: Ray 2.60 exports
    one lower than the texts its buckets hold.
    """
    if not url:
        return None
    import requests

    try:
        text = requests.get(url, timeout=5).text
    except requests.RequestException:
        return None
    texts = batches = 0.0
    for line in text.splitlines():
        if f'application="{APP_NAME}"' in line:
            if line.startswith("ray_ct_serve_texts_total{") and (role is None or f'role="{role}"' in line):
                texts += float(line.rsplit(" ", 1)[1])
            elif line.startswith("ray_ct_serve_batch_size_count{"):
                batches += float(line.rsplit(" ", 1)[1])
    return texts, batches


def _mean_batch(
    url: str | None,
    before: tuple[float, float] | None,
    texts_done: int,
    reader: Any = None,
    wait_s: float = 20.0,
) -> float | None:
    """Mean texts per forward pass over a mode (warm-up included), from the replica's metrics
    (``reader(url)`` → (texts, batches) counters; default :func:`_batch_metrics`).

    Ray exports metrics every few seconds: wait (at most ``wait_s``) until the counter has counted
    every text the mode got answers for.
    """
    if before is None:
        return None
    deadline = time.monotonic() + wait_s
    while True:
        after = (reader or _batch_metrics)(url)
        if after is None:
            return None
        texts, batches = after[0] - before[0], after[1] - before[1]
        if texts >= texts_done or time.monotonic() > deadline:
            return round(texts / batches, 2) if batches else None
        time.sleep(1.0)


def bench_served(
    args: argparse.Namespace, export: Path, texts: list[str], meta: dict[str, Any]
) -> list[dict]:
    """Deploy the benchmark app, load it unbatched then batched, remove it; one row per mode."""
    import yaml

    from ml.rollout import CONFIG_FILE, ServeDeployer
    from ml.settings import load_settings

    overrides = {"ray_address": args.dashboard} if args.dashboard else {}
    settings = load_settings(**overrides)
    serve_url = args.serve_url or settings.serve_url
    deployer = ServeDeployer(settings, app_name=APP_NAME, timeout_s=args.deploy_timeout)
    template = yaml.safe_load(CONFIG_FILE.read_text())
    deployment = copy.deepcopy(
        next(app for app in template["applications"] if app["name"] == TEMPLATE_APP)["deployments"][0]
    )
    base_user_config = deployment.pop("user_config")
    deployment.pop("autoscaling_config", None)
    deployment["num_replicas"] = 1
    deployment["max_ongoing_requests"] = max(deployment.get("max_ongoing_requests", 64), *args.max_batch_size)
    deployment["ray_actor_options"] = {
        **(deployment.get("ray_actor_options") or {}),
        "num_cpus": args.replica_cpus,
        "num_gpus": 1 if (args.device or "").startswith("cuda") else 0,
    }
    meta["deployment"] = deployment
    app = BenchApp(deployer, serve_url, deployment, args.env, args.deploy_timeout, args.import_path)

    def user_config(batch: int, wait_ms: float, adaptive: bool = False) -> dict[str, Any]:
        return {
            **base_user_config,
            "model_name": "",
            "model_version": "champion",
            "model_path": str(export),
            "max_batch_size": batch,
            "batch_wait_timeout_s": wait_ms / 1000,
            "adaptive_batching": adaptive,
            "torch_threads": args.torch_threads,
            "device": args.device,
            "dtype": args.dtype,
            "prediction_log": False,
        }

    modes = [("unbatched", 1, 0.0)] if not args.no_unbatched else []
    modes += [("batched", n, wait) for n in args.max_batch_size for wait in args.batch_wait_ms]
    modes += [("adaptive", n, wait) for n in args.max_batch_size for wait in args.adaptive_wait_ms]
    rows: list[dict[str, Any]] = []
    others_before = _other_apps_replicas(deployer)
    try:
        print(f"-- deploying {APP_NAME!r} at {app.url} (one replica) ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        first = user_config(modes[0][1], modes[0][2], modes[0][0] == "adaptive")
        app.apply(first)
        info = app.wait_applied(first)
        meta["served_model"] = {k: info.get(k) for k in ("source", "device", "dtype", "max_length")}
        print(f"   ready after {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        replica = _local_pids(f"ray::ServeReplica:{APP_NAME}:")  # empty when Serve runs elsewhere
        meta["replica_niceness"] = _niceness(replica[0]) if replica else None
        _renice(args, meta)
        for mode, batch, wait_ms in modes:
            config = user_config(batch, wait_ms, mode == "adaptive")
            app.apply(config)
            app.wait_applied(config)
            pids = _serve_pids()
            for concurrency in args.concurrency:
                before = _batch_metrics(args.metrics_url)
                print(
                    f"-- served {mode}: max_batch_size {batch}, wait {wait_ms:g} ms, concurrency "
                    f"{concurrency}, {args.warmup:g} s warm-up + {args.duration:g} s ...",
                    file=sys.stderr,
                    flush=True,
                )
                result, cores = run_load(
                    args.client,
                    f"{app.url}/v1/predict",
                    texts,
                    concurrency,
                    args.warmup,
                    args.duration,
                    pids,
                )
                row = _served_row(mode, batch, wait_ms, concurrency, result, cores)
                row["pids"] = pids
                row["mean_batch"] = _mean_batch(args.metrics_url, before, result.ok_total)
                print(
                    f"   {row['texts_per_s']:.1f} texts/s, p50 {row['p50_ms']} ms, errors {row['errors']}, "
                    f"mean batch {row['mean_batch']}",
                    file=sys.stderr,
                    flush=True,
                )
                rows.append(row)
        if args.http_seconds > 0:
            top = max(args.concurrency)
            print(
                f"-- HTTP path alone: GET {ROUTE_PREFIX}/healthz, concurrency {top}, "
                f"{args.http_seconds:g} s ...",
                file=sys.stderr,
                flush=True,
            )
            result, cores = run_load(
                args.client, f"{app.url}/healthz", None, top, 2.0, args.http_seconds, pids
            )
            rows.append(_served_row("HTTP only", None, None, top, result, cores))
            rows[-1]["pids"] = pids
    finally:
        print(f"-- removing {APP_NAME!r} ...", file=sys.stderr, flush=True)
        try:
            app.remove()
        except Exception as err:
            print(
                f"   could not remove {APP_NAME!r}: {err!r}; remove it by hand (PUT the Serve config "
                f"without it)",
                file=sys.stderr,
            )
        else:
            others_after = _other_apps_replicas(deployer)
            changed = [n for n in others_before if others_after.get(n) != others_before[n]]
            meta["other_apps_with_new_replicas"] = changed
            if changed:
                print(
                    f"   note: the replicas of {changed} changed during the run: someone redeployed or "
                    "rescaled them (this benchmark's PUTs carry their config unchanged)",
                    file=sys.stderr,
                )
    return rows


def _served_row(
    mode: str,
    batch: int | None,
    wait_ms: float | None,
    concurrency: int,
    result: LoadResult,
    cores: dict[str, float],
) -> dict[str, Any]:
    done = len(result.latencies)
    return {
        "mode": mode,
        "max_batch_size": batch,
        "batch_wait_ms": wait_ms,
        "concurrency": concurrency,
        "texts": done,
        "seconds": result.window_s,
        "texts_per_s": done / result.window_s,
        "errors": sum(result.errors.values()),
        "error_kinds": dict(result.errors),
        **_percentiles_ms(result.latencies),
        "client_cpu_ms_per_request": (
            round(1000 * cores["client"] * result.window_s / done, 2) if done and "client" in cores else None
        ),
        "cores_used": cores,
        "cpu_ms_per_text": _cpu_ms_per_text(cores, done / result.window_s),
    }


def _cpu_ms_per_text(cores: dict[str, float], per_s: float) -> float | None:
    """CPU time the benchmark's own processes spent per text (client, proxy, replica; or bare)."""
    ours = sum(v for k, v in cores.items() if k not in ("machine", "other"))
    return round(1000 * ours / per_s, 1) if cores and per_s > 0 else None


def _renice(args: argparse.Namespace, meta: dict[str, Any]) -> None:
    """Run this process (client) at the replica's niceness, so neither has priority over the other."""
    target = args.nice if args.nice is not None else (meta.get("replica_niceness") or 0)
    current = os.nice(0)
    if target > current:
        os.nice(target - current)
    meta["client_niceness"] = os.nice(0)


# ----------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ["mode", "max batch", "wait ms", "concurrency", "texts/s", "p50 ms", "p95 ms", "p99 ms"]
    header += ["errors", "mean batch", "CPU ms/text", "client CPU ms/req", "other load (cores)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in rows:
        cells = [
            row["mode"],
            _fmt(row["max_batch_size"]),
            _fmt(row.get("batch_wait_ms"), "g"),
            _fmt(row.get("concurrency")),
            f"{row['texts_per_s']:.1f}",
            _fmt(row.get("p50_ms"), ".0f"),
            _fmt(row.get("p95_ms"), ".0f"),
            _fmt(row.get("p99_ms"), ".0f"),
            str(row["errors"]),
            _fmt(row.get("mean_batch"), ".1f"),
            _fmt(row.get("cpu_ms_per_text"), ".1f"),
            _fmt(row.get("client_cpu_ms_per_request"), ".2f"),
            _fmt(row.get("cores_used", {}).get("other"), ".2f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _at(rows: list[dict[str, Any]], mode: str, concurrency: int | None) -> list[dict[str, Any]]:
    return [r for r in rows if r["mode"] == mode and (concurrency is None or r["concurrency"] == concurrency)]


def _best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    return max(rows, key=lambda r: r["texts_per_s"], default=None)


def summarize(rows: list[dict[str, Any]], gpu: bool) -> dict[str, Any]:
    """The ratios against their targets. Served modes are compared at the highest concurrency
    (the load batching is for); adaptive batching also at each level against the fixed wait."""
    bare = [r for r in rows if r["mode"] == "bare"]
    levels = sorted({r["concurrency"] for r in rows if r["mode"] in SERVED_MODES})
    top = levels[-1] if levels else None
    unbatched = next(iter(_at(rows, "unbatched", top)), None)
    best_bare = _best(bare)
    bare_1 = next((r for r in bare if r["max_batch_size"] == 1), None)
    best_batched = _best(_at(rows, "batched", top) + _at(rows, "adaptive", top))
    target_ratio = TARGET_GPU_BATCHED_OVER_UNBATCHED if gpu else TARGET_BATCHED_OVER_UNBATCHED
    out: dict[str, Any] = {
        "concurrency": top,
        "best_bare": best_bare
        and {"batch": best_bare["max_batch_size"], "texts_per_s": best_bare["texts_per_s"]},
        "bare_best_over_batch1": best_bare["texts_per_s"] / bare_1["texts_per_s"]
        if best_bare and bare_1
        else None,
        "best_batched": best_batched
        and {
            "mode": best_batched["mode"],
            "batch": best_batched["max_batch_size"],
            "wait_ms": best_batched["batch_wait_ms"],
            "texts_per_s": best_batched["texts_per_s"],
        },
        "target_batched_over_unbatched": target_ratio,
        "target_served_over_bare": TARGET_SERVED_OVER_BARE,
    }
    if unbatched and best_batched and unbatched["texts_per_s"] > 0:
        out["batched_over_unbatched"] = best_batched["texts_per_s"] / unbatched["texts_per_s"]
    if best_batched and best_bare:
        out["served_over_bare"] = best_batched["texts_per_s"] / best_bare["texts_per_s"]
    if unbatched and bare_1:
        out["unbatched_over_bare_batch1"] = unbatched["texts_per_s"] / bare_1["texts_per_s"]
    adaptive: dict[str, Any] = {}
    for level in levels:
        here = _best(_at(rows, "adaptive", level))
        fixed = _best(
            [r for r in _at(rows, "batched", level) if r["batch_wait_ms"] == FIXED_WAIT_BASELINE_MS]
        )
        if here is None:
            continue
        entry: dict[str, Any] = {"texts_per_s": here["texts_per_s"], "p50_ms": here["p50_ms"]}
        if fixed:
            entry["fixed_texts_per_s"] = fixed["texts_per_s"]
            entry["fixed_p50_ms"] = fixed["p50_ms"]
            entry["throughput_over_fixed"] = here["texts_per_s"] / fixed["texts_per_s"]
        if bare_1 and here["p50_ms"] is not None and bare_1.get("p50_ms") is not None:
            entry["p50_minus_bare_batch1_ms"] = here["p50_ms"] - bare_1["p50_ms"]
        adaptive[str(level)] = entry
    if adaptive:
        out["adaptive"] = adaptive
        out["target_low_load_p50_over_bare_batch1_ms"] = TARGET_LOW_LOAD_P50_EXCESS_MS
    return out


def report(rows: list[dict[str, Any]], summary: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        "",
        f"Ray Serve classifier benchmark, {meta['date_utc']}, {meta['machine']}",
        f"model: {meta['model']}; device {meta['bare'].get('device')} {meta['bare'].get('dtype')}, "
        f"torch threads {meta['torch_threads']}, max_length {meta['bare'].get('max_length')}",
        (
            f"load: closed loop, one text per request, {meta['client']} client; this process at niceness "
            f"{meta.get('client_niceness', '-')} (the replica's: {meta.get('replica_niceness', '-')})"
            if any(r["mode"] != "bare" for r in rows)
            else f"bare model only (no Ray, no HTTP), this process at niceness {meta.get('client_niceness')}"
        ),
        f"1-min load average {meta['load_average_1min_before']} before, "
        f"{meta.get('load_average_1min_after')} after, on {meta['cpu_cores_available']} cores",
        "",
        format_table(rows),
        "",
        "Latency: bare rows per predict_proba call (one batch), served rows per HTTP request. mean batch: "
        "texts per forward pass in the replica (warm-up included). other load: cores busy with anything "
        "but this benchmark (this process, the proxy, the replica) during the row's timed window.",
    ]
    gpu = meta["bare"].get("device", "cpu").startswith("cuda")

    def verdict(name: str, top: float, bottom: float, target: float | None, note: str) -> str:
        value = top / bottom
        met = "" if target is None else f" (target >= {target:g}: {'met' if value >= target else 'MISSED'})"
        return f"{name}: {top:.1f} / {bottom:.1f} = {value:.2f}{met}; {note}"

    bare = [r for r in rows if r["mode"] == "bare"]
    best_bare = max(bare, key=lambda r: r["texts_per_s"], default=None)
    bare_1 = next((r for r in bare if r["max_batch_size"] == 1), None)
    top = summary.get("concurrency")
    unbatched = next(iter(_at(rows, "unbatched", top)), None)
    best_batched = _best(_at(rows, "batched", top) + _at(rows, "adaptive", top))
    if best_batched and unbatched:
        lines.append(
            verdict(
                "served batched / unbatched",
                best_batched["texts_per_s"],
                unbatched["texts_per_s"],
                summary["target_batched_over_unbatched"],
                f"best batched: {best_batched['mode']}, max batch {best_batched['max_batch_size']}, "
                f"wait {best_batched['batch_wait_ms']:g} ms, {top} clients",
            )
        )
    if best_batched and best_bare:
        lines.append(
            verdict(
                "served / bare (serving efficiency)",
                best_batched["texts_per_s"],
                best_bare["texts_per_s"],
                TARGET_SERVED_OVER_BARE,
                f"best bare: batch {best_bare['max_batch_size']}",
            )
        )
    if best_bare and bare_1:
        lines.append(
            verdict(
                "bare best / bare batch 1",
                best_bare["texts_per_s"],
                bare_1["texts_per_s"],
                TARGET_GPU_BATCHED_OVER_UNBATCHED if gpu else None,
                f"batch {best_bare['max_batch_size']}: what batching buys the model alone",
            )
        )
    if unbatched and bare_1:
        lines.append(
            verdict(
                "served unbatched / bare batch 1",
                unbatched["texts_per_s"],
                bare_1["texts_per_s"],
                None,
                "the serving path's cost without batching",
            )
        )
    for level, entry in (summary.get("adaptive") or {}).items():
        head = f"adaptive batching at {level} clients: {entry['texts_per_s']:.1f} texts/s"
        parts = [f"{head}, p50 {entry['p50_ms']:.0f} ms"]
        if "throughput_over_fixed" in entry:
            parts.append(
                f"vs fixed {FIXED_WAIT_BASELINE_MS:g} ms wait {entry['fixed_texts_per_s']:.1f} texts/s, p50 "
                f"{entry['fixed_p50_ms']:.0f} ms: throughput x{entry['throughput_over_fixed']:.2f}"
            )
        if "p50_minus_bare_batch1_ms" in entry:
            excess = entry["p50_minus_bare_batch1_ms"]
            goal = TARGET_LOW_LOAD_P50_EXCESS_MS
            parts.append(
                f"p50 - bare batch-1 p50 = {excess:+.0f} ms"
                + (
                    f" (low-load goal <= {goal:g} ms: {'met' if excess <= goal else 'MISSED'})"
                    if level == "1"
                    else ""
                )
            )
        lines.append("; ".join(parts))
    for row in rows:
        if row.get("cores_used") and row["mode"] != "bare":
            used = ", ".join(f"{k} {v:.2f}" for k, v in row["cores_used"].items())
            what = (
                f"max batch {row['max_batch_size']}, wait {row['batch_wait_ms']:g} ms"
                if row["max_batch_size"]
                else ""
            ) + f", {row['concurrency']} clients"
            lines.append(f"cores used during {row['mode']} {what}: {used}")
    return "\n".join(lines)


def _machine(device: str) -> str:
    cores = len(os.sched_getaffinity(0))
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")
        ]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    text = f"{cores} CPU cores ({cpu})"
    if device.startswith("cuda"):
        import torch

        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


def _git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        return out.stdout.strip() or None
    return None


# ----------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 1,8,16, got {text!r}"
        ) from err
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _float_list(text: str) -> list[float]:
    if text.strip().lower() == "none":
        return []
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 5,50, got {text!r}"
        ) from err
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected numbers >= 0, got {text!r}")
    return values


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Closed-loop HTTP load on the Ray Serve classifier, batched vs unbatched, "
        "next to the bare model's throughput measured in the same run."
    )
    load = parser.add_argument_group("load")
    load.add_argument(
        "--concurrency",
        type=_int_list,
        default=[16],
        help="closed-loop clients: one or more levels, each run in every served mode (default 16)",
    )
    load.add_argument(
        "--duration", type=float, default=20.0, help="timed seconds per served mode (default 20)"
    )
    load.add_argument("--warmup", type=float, default=5.0, help="untimed seconds before each (default 5)")
    load.add_argument(
        "--client",
        choices=["aiohttp", "threads"],
        default="aiohttp",
        help="asyncio + aiohttp (default: cheapest on CPU) or one thread + requests.Session per client",
    )
    load.add_argument(
        "--nice",
        type=int,
        default=None,
        help="niceness of this process (client, bare model); default: the replica's (Ray: 15)",
    )
    serve = parser.add_argument_group("the served app")
    serve.add_argument(
        "--max-batch-size",
        type=_int_list,
        default=[16],
        help="max_batch_size of the batched mode(s), e.g. 8,16 (default 16); unbatched is always 1",
    )
    serve.add_argument(
        "--batch-wait-ms",
        type=_float_list,
        default=[5.0, 100.0],
        help="batch_wait_timeout_s of the batched mode(s) in ms (default 5,100: a short wait, and one long "
        "enough for batches to fill, serve/config.yaml's); each combined with every --max-batch-size",
    )
    serve.add_argument(
        "--adaptive-wait-ms",
        type=_float_list,
        default=[100.0],
        help="adaptive mode(s): batches sized to the texts in flight lately, waiting at most this many "
        "ms (default 100, serve/config.yaml's); 'none' to skip; each combined with every --max-batch-size",
    )
    serve.add_argument("--no-unbatched", action="store_true", help="skip the unbatched mode")
    serve.add_argument(
        "--import-path",
        default="serve.app:classifier_app",
        help="the Serve app to load (default serve.app:classifier_app), e.g. a candidate change of it "
        "(put its folder on the replica's path with --env PYTHONPATH=...)",
    )
    serve.add_argument("--replica-cpus", type=float, default=1.0, help="the replica's num_cpus (Ray logical)")
    serve.add_argument("--dashboard", help="Ray dashboard URL (default CT_RAY_ADDRESS; skips starting Ray)")
    serve.add_argument("--serve-url", help="Serve HTTP proxy (default CT_SERVE_URL; skips starting Ray)")
    serve.add_argument("--allow-remote", action="store_true", help="allow a --serve-url not on 127.0.0.1")
    serve.add_argument("--metrics-url", default=DEFAULT_METRICS_URL, help="Ray metrics (for the mean batch)")
    serve.add_argument("--deploy-timeout", type=float, default=300.0, help="seconds to wait for the app")
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model-path", type=Path, help="an export directory (default: base model + random head)"
    )
    model.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available, else cpu)")
    model.add_argument("--dtype", default=None, help="float32/float16/bfloat16 (default fp32 CPU, fp16 GPU)")
    model.add_argument(
        "--torch-threads",
        type=int,
        default=os.cpu_count() or 1,
        help=f"torch CPU threads, replica and bare model alike (default os.cpu_count() = {os.cpu_count()})",
    )
    model.add_argument(
        "--bare-batch-sizes",
        type=_int_list,
        default=None,
        help="default 1,4,8,16,32 (CPU), 1,8,...,512 (GPU)",
    )
    model.add_argument("--bare-seconds", type=float, default=5.0, help="timed seconds per bare batch size")
    model.add_argument("--bare-only", action="store_true", help="only the bare model (no Ray, no HTTP)")
    serve.add_argument(
        "--http-seconds",
        type=float,
        default=10.0,
        help="also load GET /bench/healthz this long: the HTTP path's own ceiling, no model (0: skip)",
    )
    parser.add_argument(
        "--env",
        action="append",
        type=_env_pair,
        default=[],
        metavar="KEY=VALUE",
        help="an environment variable for the replica and this process (bare model), e.g. "
        "OMP_WAIT_POLICY=PASSIVE; repeatable",
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CSV(.gz) with a text column")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_RESULTS, help="append the record here (JSON lines)"
    )
    args = parser.parse_args(argv)
    args.env = dict(args.env)
    if min(args.concurrency) < 1 or args.duration <= 0 or args.warmup < 0 or args.torch_threads < 1:
        parser.error("--concurrency and --torch-threads must be >= 1, --duration > 0, --warmup >= 0")
    if not args.data.is_file():
        parser.error(f"--data: {args.data} does not exist")
    if args.model_path and not (args.model_path / "label_map.json").is_file():
        parser.error(f"--model-path: {args.model_path} is not a model export (no label_map.json)")
    if args.serve_url and not args.allow_remote:
        host = urlsplit(args.serve_url).hostname or ""
        loopback = host == "localhost"
        with contextlib.suppress(ValueError):
            loopback = loopback or ipaddress.ip_address(host).is_loopback
        if not loopback:
            parser.error(f"--serve-url {args.serve_url}: load tests target 127.0.0.1 only (--allow-remote)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.update(args.env)  # before torch is imported: OpenMP reads its variables once
    signal.signal(signal.SIGTERM, _interrupt)
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import stack

    # Ray reads RAY_AUTH_MODE once per process: set it before anything imports ray.
    for key, value in stack.service_env().items():
        os.environ.setdefault(key, value)
    if not args.bare_only and not args.dashboard and not args.serve_url:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        if stack.up(["ray"]):
            print("   started the local Ray head (it keeps running: `make down` stops it)", file=sys.stderr)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: torch {torch.__version__} sees no CUDA device here")
    bare_sizes = args.bare_batch_sizes or (
        [1, 8, 32, 64, 128, 256, 512] if device.startswith("cuda") else [1, 4, 8, 16, 32]
    )
    texts, labels = load_texts(args.data, args.seed)
    started = dt.datetime.now(dt.UTC)
    meta: dict[str, Any] = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else None,
        "date_utc": started.isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "machine": _machine(device),
        "cpu_count": os.cpu_count(),
        "cpu_cores_available": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "git_commit": _git_commit(),
        "load_average_1min_before": round(os.getloadavg()[0], 2),
        "torch_threads": args.torch_threads,
        "client": args.client,
        "concurrency": args.concurrency,
        "warmup_s": args.warmup,
        "duration_s": args.duration,
        "env": args.env,
        "import_path": args.import_path,
        "data": str(args.data),
        "texts_in_pool": len(texts),
    }
    with contextlib.ExitStack() as cleanup:
        if args.model_path:
            export = args.model_path.resolve()
            meta["model"] = str(export)
        else:
            tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
            cleanup.callback(_rmtree, tmp)
            print(f"-- building a synthetic export in {tmp} ...", file=sys.stderr, flush=True)
            export = build_export(tmp / "export", labels)
            meta["model"] = f"packaged all-MiniLM-L6-v2 + random {len(labels)}-class head (synthetic export)"
        rows: list[dict[str, Any]] = []
        try:
            if args.bare_only:
                _renice(args, meta)
            else:
                rows += bench_served(args, export, texts, meta)  # renices to the replica's niceness
            print(f"-- bare model, batch sizes {bare_sizes} ...", file=sys.stderr, flush=True)
            bare_rows, meta["bare"] = bench_bare(
                export, texts, bare_sizes, args.torch_threads, args.device, args.dtype, args.bare_seconds
            )
        except KeyboardInterrupt:
            print("interrupted (the benchmark app, if any, was removed)", file=sys.stderr)
            return 130
        rows = bare_rows + rows
    meta["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    summary = summarize(rows, device.startswith("cuda"))
    print(report(rows, summary, meta))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    with args.json.open("a") as fh:
        fh.write(json.dumps({"meta": meta, "summary": summary, "rows": rows}) + "\n")
    print(f"\nrecord appended to {args.json}")
    return 1 if any(r["errors"] for r in rows) else 0


def start_local_ray() -> None:
    """Start-up of a benchmark on the local stack: offline model, Ray's client settings (read once
    per process, so before anything imports ray), SIGTERM as Ctrl-C, and the Ray head running."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    signal.signal(signal.SIGTERM, _interrupt)
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import stack

    for key, value in stack.service_env().items():
        os.environ.setdefault(key, value)
    if stack.up(["ray"]):
        print("   started the local Ray head (it keeps running: `make down` stops it)", file=sys.stderr)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
