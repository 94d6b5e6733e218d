"""Soak test of the Ray Serve classifier: steady load for a long time, memory and latency per minute.

It deploys the benchmark application of ``serve_bench.py`` (``serve-bench`` at ``/bench``: the
deployment options of ``serve/config.yaml``'s ``classifier`` app, a synthetic export, no prediction
log) with ``--replicas`` replicas, and loads it for ``--minutes`` minutes: ``--concurrency`` clients,
one text per ``POST /bench/v1/predict``, paced to ``--rate`` requests/s in all (a client whose
answer comes late sends the next at once, so the load never exceeds the rate nor the
concurrency). Every ``--sample-s`` seconds it samples the RSS of each replica process (psutil, on
the pids Serve reports) and of the HTTP proxy, and the request count, errors and p50/p99 latency
of that interval; it prints a table row and appends it to ``benchmarks/results/soak.jsonl``.

At the end it reports each replica's RSS growth after warm-up (the first ``--warmup-minutes``
are excluded: model load, allocator arenas and caches fill up then) and the p99 drift, and exits
1 if any replica grew by ``--max-growth`` (10 %) or more. Only the benchmark app is removed at
the end (also on Ctrl-C or SIGTERM); the other apps keep running as they were.

    .venv/bin/python benchmarks/soak.py                           # 30 minutes, 2 replicas
    .venv/bin/python benchmarks/soak.py --minutes 3 --warmup-minutes 1   # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import datetime as dt
import json
import os
import shlex
import socket
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve_bench import (
    APP_NAME,
    DEFAULT_DATA,
    REPO_ROOT,
    TEMPLATE_APP,
    BenchApp,
    _auth_header,
    _git_commit,
    _local_pids,
    _machine,
    _percentiles_ms,
    _rmtree,
    build_export,
    load_texts,
    start_local_ray,
)

DEFAULT_RESULTS = REPO_ROOT / "benchmarks" / "results" / "soak.jsonl"
DEPLOYMENT = "Classifier"
MAX_RSS_GROWTH = 0.10  # the goal: < 10 % RSS growth per replica after warm-up
MB = 1024 * 1024


# ----------------------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------------------


@dataclass
class Interval:
    """What completed since the last sample."""

    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    def record(self, seconds: float, error: str | None) -> None:
        if error is None:
            self.latencies.append(seconds)
        else:
            self.errors[error] = self.errors.get(error, 0) + 1


class SteadyLoad:
    """``concurrency`` clients, each sending one request every ``concurrency / rate`` seconds
    (or at once, when the previous answer came later than that) until ``end``."""

    def __init__(self, url: str, bodies: list[bytes], concurrency: int, rate: float, end: float) -> None:
        self.url, self.bodies, self.concurrency, self.end = url, bodies, concurrency, end
        self.period = concurrency / rate
        self.interval = Interval()
        self.sent = 0

    def take(self) -> Interval:
        interval, self.interval = self.interval, Interval()
        return interval

    async def run(self) -> None:
        import aiohttp

        headers = {"content-type": "application/json", **_auth_header()}
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.concurrency), timeout=aiohttp.ClientTimeout(total=60)
        ) as session:
            await asyncio.gather(*(self._client(session, headers, i) for i in range(self.concurrency)))

    async def _client(self, session: Any, headers: dict[str, str], index: int) -> None:
        import aiohttp

        next_send = time.monotonic() + self.period * index / self.concurrency  # spread the clients out
        while next_send < self.end:
            await asyncio.sleep(max(0.0, next_send - time.monotonic()))
            sent = time.monotonic()
            body = self.bodies[self.sent % len(self.bodies)]
            self.sent += 1
            try:
                async with session.post(self.url, data=body, headers=headers) as resp:
                    payload = await resp.read()
                    error = (
                        None if resp.status == 200 and b'"predictions"' in payload else f"HTTP {resp.status}"
                    )
            except (TimeoutError, aiohttp.ClientError, OSError) as err:
                error = type(err).__name__
            self.interval.record(time.monotonic() - sent, error)
            next_send = max(next_send + self.period, time.monotonic())


# ----------------------------------------------------------------------------------------
# samples
# ----------------------------------------------------------------------------------------


def replica_pids(deployer: Any) -> dict[str, int]:
    """Replica id -> pid of the benchmark app's running replicas on this machine."""
    app = (deployer.details().get("applications") or {}).get(APP_NAME) or {}
    replicas = (app.get("deployments") or {}).get(DEPLOYMENT, {}).get("replicas") or []
    return {r["replica_id"]: r["pid"] for r in replicas if r.get("state") == "RUNNING" and r.get("pid")}


def rss_mb(pid: int) -> float | None:
    import psutil

    try:
        return round(psutil.Process(pid).memory_info().rss / MB, 1)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None  # gone, or on another node


def sample(minute: float, interval: Interval, seconds: float, deployer: Any) -> dict[str, Any]:
    pids = replica_pids(deployer)
    proxies = _local_pids("ray::ProxyActor")
    done = len(interval.latencies)
    return {
        "minute": round(minute, 2),
        "requests": done + sum(interval.errors.values()),
        "requests_per_s": round(done / seconds, 2),
        "errors": sum(interval.errors.values()),
        "error_kinds": interval.errors,
        **{k: v for k, v in _percentiles_ms(interval.latencies).items() if k != "p95_ms"},
        "replica_rss_mb": {rid: rss_mb(pid) for rid, pid in sorted(pids.items())},
        "replica_pids": pids,
        "proxy_rss_mb": sum(filter(None, (rss_mb(pid) for pid in proxies))) or None,
    }


def growth(rows: list[dict[str, Any]], warmup_minutes: float) -> dict[str, Any]:
    """Per replica: RSS at its first sample after warm-up and at its last, and the growth between."""
    after = [r for r in rows if r["minute"] > warmup_minutes]
    per_replica: dict[str, dict[str, Any]] = {}
    for row in after:
        for rid, rss in row["replica_rss_mb"].items():
            if rss is None:
                continue
            entry = per_replica.setdefault(rid, {"first_minute": row["minute"], "first_mb": rss})
            entry.update(last_minute=row["minute"], last_mb=rss)
    for entry in per_replica.values():
        entry["growth"] = round((entry["last_mb"] - entry["first_mb"]) / entry["first_mb"], 4)
        entry["span_minutes"] = round(entry["last_minute"] - entry["first_minute"], 2)
    p99 = [r["p99_ms"] for r in after if r["p99_ms"] is not None]
    return {
        "warmup_minutes": warmup_minutes,
        "samples_after_warmup": len(after),
        "replicas": per_replica,
        "max_growth": max((e["growth"] for e in per_replica.values()), default=None),
        "p99_first_ms": p99[0] if p99 else None,
        "p99_last_ms": p99[-1] if p99 else None,
        "p99_drift": round(p99[-1] / p99[0] - 1, 4) if len(p99) > 1 and p99[0] else None,
        "requests": sum(r["requests"] for r in rows),
        "errors": sum(r["errors"] for r in rows),
    }


def format_row(row: dict[str, Any]) -> str:
    rss = "  ".join(f"{rid} {mb:7.1f}" for rid, mb in row["replica_rss_mb"].items() if mb)
    return (
        f"{row['minute']:6.1f} {row['requests']:6d} {row['requests_per_s']:6.1f} {row['errors']:5d} "
        f"{_num(row['p50_ms'])} {_num(row['p99_ms'])} {_num(row['proxy_rss_mb'])}   {rss}"
    )


def _num(value: float | None) -> str:
    return f"{value:7.1f}" if value is not None else "      -"


# ----------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------


def deployment_options(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """serve/config.yaml's classifier deployment with ``--replicas`` fixed replicas, and its user_config."""
    import yaml

    from ml.rollout import CONFIG_FILE

    template = yaml.safe_load(CONFIG_FILE.read_text())
    deployment = copy.deepcopy(
        next(app for app in template["applications"] if app["name"] == TEMPLATE_APP)["deployments"][0]
    )
    user_config = deployment.pop("user_config")
    deployment.pop("autoscaling_config", None)
    deployment["num_replicas"] = args.replicas
    return deployment, user_config


def wait_for_replicas(deployer: Any, count: int, timeout_s: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if len(pids := replica_pids(deployer)) == count:
            return pids
        time.sleep(1.0)
    raise RuntimeError(f"{count} replicas of {APP_NAME!r} were not running after {timeout_s:.0f} s")


async def soak(
    args: argparse.Namespace, url: str, texts: list[str], deployer: Any, out: Any, meta: dict
) -> list:
    bodies = [json.dumps({"text": text}).encode() for text in texts]
    start = time.monotonic()
    load = SteadyLoad(url, bodies, args.concurrency, args.rate, start + args.minutes * 60)
    task = asyncio.create_task(load.run())
    rows: list[dict[str, Any]] = []
    print(" minute   reqs  req/s  errs  p50 ms  p99 ms proxy MB   replica: RSS MB", flush=True)
    last = start
    while not task.done():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.shield(task), timeout=max(0.0, last + args.sample_s - time.monotonic())
            )
        now = time.monotonic()
        interval = load.take()
        if task.done() and rows and now - last < args.sample_s / 2:
            break  # the last requests in flight when the load ended: too few for a sample of their own
        row = await asyncio.to_thread(sample, (now - start) / 60, interval, now - last, deployer)
        last = now
        rows.append(row)
        print(format_row(row), flush=True)
        out.write(json.dumps({"run": meta["run"], "kind": "sample", **row}) + "\n")
        out.flush()
    await task
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start_local_ray()

    from ml.rollout import ServeDeployer
    from ml.settings import load_settings

    settings = load_settings()
    deployer = ServeDeployer(settings, app_name=APP_NAME, timeout_s=args.deploy_timeout)
    texts, labels = load_texts(args.data, args.seed)
    deployment, base_user_config = deployment_options(args)
    meta: dict[str, Any] = {
        "run": uuid.uuid4().hex[:12],
        "command": shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else None,
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "machine": _machine("cpu"),
        "git_commit": _git_commit(),
        "load_average_1min_before": round(os.getloadavg()[0], 2),
        **{k: getattr(args, k) for k in ("minutes", "warmup_minutes", "sample_s", "replicas", "concurrency")},
        "rate": args.rate,
        "torch_threads": args.torch_threads,
        "deployment": deployment,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as cleanup:
        if args.model_path:
            export = args.model_path.resolve()
        else:
            tmp = Path(tempfile.mkdtemp(prefix="soak-"))
            cleanup.callback(_rmtree, tmp)
            export = build_export(tmp / "export", labels)
        meta["model"] = str(export) if args.model_path else "packaged all-MiniLM-L6-v2 + random head"
        user_config = {
            **base_user_config,
            "model_name": "",
            "model_path": str(export),
            "torch_threads": args.torch_threads,
            "prediction_log": False,
        }
        app = BenchApp(deployer, settings.serve_url, deployment, {}, args.deploy_timeout)
        out = cleanup.enter_context(args.json.open("a"))
        try:
            print(f"-- deploying {APP_NAME!r} with {args.replicas} replicas ...", file=sys.stderr, flush=True)
            app.apply(user_config)
            app.wait_applied(user_config)
            meta["replicas_at_start"] = wait_for_replicas(deployer, args.replicas, args.deploy_timeout)
            out.write(json.dumps({"run": meta["run"], "kind": "meta", **meta}) + "\n")
            print(
                f"-- {args.minutes:g} min at {args.rate:g} req/s ({args.concurrency} clients), "
                f"a sample every {args.sample_s:g} s; RSS growth counted after minute "
                f"{args.warmup_minutes:g}",
                file=sys.stderr,
                flush=True,
            )
            rows = asyncio.run(soak(args, f"{app.url}/v1/predict", texts, deployer, out, meta))
        except KeyboardInterrupt:
            print("interrupted (the benchmark app was removed)", file=sys.stderr)
            return 130
        finally:
            app.remove()
        summary = growth(rows, args.warmup_minutes)
        summary["replaced_replicas"] = sorted(
            set(meta["replicas_at_start"]) ^ {rid for row in rows for rid in row["replica_rss_mb"]}
        )
        summary["load_average_1min_after"] = round(os.getloadavg()[0], 2)
        out.write(json.dumps({"run": meta["run"], "kind": "summary", **summary}) + "\n")
    return report(summary, args)


def report(summary: dict[str, Any], args: argparse.Namespace) -> int:
    print(f"\nafter warm-up (minute > {args.warmup_minutes:g}, {summary['samples_after_warmup']} samples):")
    for rid, entry in summary["replicas"].items():
        print(
            f"  replica {rid}: {entry['first_mb']:.1f} MB at minute {entry['first_minute']:.1f} -> "
            f"{entry['last_mb']:.1f} MB at minute {entry['last_minute']:.1f}: {entry['growth']:+.1%}"
        )
    if summary["p99_drift"] is not None:
        print(
            f"  p99 {summary['p99_first_ms']:.0f} ms -> {summary['p99_last_ms']:.0f} ms: "
            f"{summary['p99_drift']:+.1%}"
        )
    print(f"  {summary['requests']} requests, {summary['errors']} errors in the whole run")
    if summary["replaced_replicas"]:
        print(f"  replicas changed during the run: {summary['replaced_replicas']}")
    print(f"record appended to {args.json}")
    worst = summary["max_growth"]
    if worst is None or summary["samples_after_warmup"] < 2:
        print("NOT MEASURED: fewer than 2 samples after warm-up (raise --minutes)", file=sys.stderr)
        return 2
    met = worst < args.max_growth
    print(
        f"RSS growth after warm-up: {worst:+.1%} (goal < {args.max_growth:.0%}: {'met' if met else 'MISSED'})"
    )
    return 0 if met else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Steady HTTP load on the Ray Serve classifier for a long time; replica RSS and "
        "latency per minute, RSS growth after warm-up against a goal."
    )
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the load (default 30)")
    parser.add_argument(
        "--warmup-minutes",
        type=float,
        default=5.0,
        help="samples up to this minute are not counted (default 5)",
    )
    parser.add_argument("--sample-s", type=float, default=60.0, help="seconds between samples (default 60)")
    parser.add_argument("--replicas", type=int, default=2, help="replicas of the benchmark app (default 2)")
    parser.add_argument(
        "--concurrency", type=int, default=8, help="clients, i.e. most requests in flight (8)"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=10.0,
        help="requests/s in all, one text each (default 10; one replica served ~50 "
        "texts/s batched on 2 CPU cores: benchmarks/README.md)",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch threads per replica (default 1: 2 replicas, 2 cores)",
    )
    parser.add_argument("--max-growth", type=float, default=MAX_RSS_GROWTH, help="goal (default 0.10)")
    parser.add_argument(
        "--model-path", type=Path, help="an export directory (default: base model + random head)"
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CSV(.gz) with a text column")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deploy-timeout", type=float, default=300.0, help="seconds to wait for the app")
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_RESULTS, help="append the samples here (JSON lines)"
    )
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.sample_s <= 0 or args.rate <= 0 or min(args.replicas, args.concurrency) < 1:
        parser.error("--minutes, --sample-s and --rate must be > 0, --replicas and --concurrency >= 1")
    if args.warmup_minutes + 2 * args.sample_s / 60 > args.minutes:
        parser.error(
            f"--warmup-minutes {args.warmup_minutes:g} leaves fewer than 2 samples in {args.minutes:g} min: "
            "lower it or raise --minutes"
        )
    if not args.data.is_file():
        parser.error(f"--data: {args.data} does not exist")
    return args


if __name__ == "__main__":
    raise SystemExit(main())
