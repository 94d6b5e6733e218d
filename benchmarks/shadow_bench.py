"""What shadow mirroring costs the champion: client-side latency with and without a shadow candidate.

The issue's goal: mirroring must not raise the champion's p99 latency by more than 10 % at the
benchmark's load. One run deploys the benchmark application of ``serve_bench.py`` (``serve-bench``
at ``/bench``, one replica, ``serve/config.yaml``'s ``classifier`` deployment and batching: 16
texts, 100 ms wait; a synthetic export; no prediction log) and alternates two conditions on it,
``user_config`` changes of the same replica:

* **champion**: ``candidate`` null, the champion alone;
* **shadow**: ``candidate = {"mode": "shadow", "model_path": <the same export>, ...}``: every
  champion answer's texts are mirrored to the candidate in the replica's background thread
  (niceness 19, ``shadow_threads`` torch threads, short passes in the champion's idle moments, a
  bounded queue whose overflow is dropped).

For each ``--concurrency`` level (default 1, 4, 16 closed-loop clients, one text per
``POST /bench/v1/predict``, the next as soon as the answer is in), both conditions run back to back,
``--warmup`` untimed then ``--duration`` timed seconds each, ``--rounds`` times (default 2) in the
order A B, B A, A B ...: a drift of the machine's load (it is shared) weighs on both alike. Latencies
of every round are pooled per condition and level, and the report gives p50/p95/p99, texts/s, the ratio
p99(shadow) / p99(champion) per level (the goal: <= 1.10), and what the shadow did meanwhile: the
texts it answered and dropped (``GET /bench/v1/model`` ``candidate.shadow``, read at the start and
end of each timed window) and the CPU its thread used (the replica's threads at niceness 19, from
``/proc``). A JSON record is appended to ``benchmarks/results/shadow_bench.jsonl``.

    .venv/bin/python benchmarks/shadow_bench.py                     # local stack, ~6.5 min
    .venv/bin/python benchmarks/shadow_bench.py --concurrency 16 --rounds 4 --duration 20
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
import threading
import time
from pathlib import Path
from typing import Any

from serve_bench import (
    APP_NAME,
    CLK_TCK,
    DEFAULT_DATA,
    REPO_ROOT,
    TEMPLATE_APP,
    BenchApp,
    CpuProbe,
    LoadResult,
    Window,
    _aiohttp_load,
    _auth_header,
    _batch_metrics,
    _float_list,
    _git_commit,
    _int_list,
    _local_pids,
    _machine,
    _mean_batch,
    _niceness,
    _percentiles_ms,
    _renice,
    _rmtree,
    _threads_load,
    build_export,
    load_texts,
    start_local_ray,
)

DEFAULT_RESULTS = REPO_ROOT / "benchmarks" / "results" / "shadow_bench.jsonl"
DEFAULT_METRICS_URL = "http://127.0.0.1:8090/metrics"  # scripts/stack.py's RAY_METRICS_PORT
MAX_P99_RATIO = 1.10  # the issue: mirroring raises the champion's p99 by at most 10 %
SHADOW_NICENESS = 19  # serve.app.SHADOW_NICENESS: how the shadow thread is told apart in /proc
CONDITIONS = ("champion", "shadow")


# ----------------------------------------------------------------------------------------
# what the replica and its shadow did during a window
# ----------------------------------------------------------------------------------------


def shadow_thread_cpu_s(pid: int) -> float:
    """CPU seconds of ``pid``'s threads at the shadow's niceness (the mirror thread; 0 if none)."""
    total = 0.0
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                raw = (task / "stat").read_text()
                fields = raw[raw.rindex(")") + 2 :].split()
                if int(fields[16]) == SHADOW_NICENESS:
                    total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def shadow_stats(url: str) -> dict[str, int] | None:
    """``candidate.shadow`` of ``GET /bench/v1/model`` (the replica's counters), or None."""
    import requests

    with contextlib.suppress(requests.RequestException, ValueError):
        resp = requests.get(f"{url}/v1/model", headers=_auth_header(), timeout=10)
        if resp.status_code == 200:
            return ((resp.json().get("candidate") or {}).get("shadow")) or None
    return None


class ShadowProbe(threading.Thread):
    """The shadow's counters and its thread's CPU time at the start and the end of the timed window."""

    def __init__(self, url: str, replica: list[int], window: Window) -> None:
        super().__init__(daemon=True)
        self.url, self.replica, self.window = url, replica, window
        self.begin: dict[str, Any] = {}
        self.end: dict[str, Any] = {}

    def _sample(self) -> dict[str, Any]:
        return {
            "stats": shadow_stats(self.url),
            "cpu_s": sum(shadow_thread_cpu_s(pid) for pid in self.replica),
        }

    def run(self) -> None:
        time.sleep(max(0.0, self.window.begin - time.perf_counter()))
        self.begin = self._sample()
        time.sleep(max(0.0, self.window.end - time.perf_counter()))
        self.end = self._sample()

    def summary(self, seconds: float) -> dict[str, Any]:
        out: dict[str, Any] = {
            "shadow_cores": round((self.end["cpu_s"] - self.begin["cpu_s"]) / seconds, 3)
            if self.begin and self.end
            else None
        }
        before, after = (self.begin or {}).get("stats"), (self.end or {}).get("stats")
        if before and after:
            out.update({f"shadow_{k}": after.get(k, 0) - before.get(k, 0) for k in after})
            out["shadow_backlog_end"] = after["mirrored"] - after["answered"] - after["failed"]
        return out


def champion_batches(url: str | None) -> tuple[float, float] | None:
    """(texts, forward passes) of the champion in our app, from the replica's Ray metrics: only
    ``role="champion"`` texts (the shadow's answers count in ``ct_serve_texts`` too, as
    ``role="shadow"``, but not in ``ct_serve_batch_size``)."""
    return _batch_metrics(url, role="champion")


def mean_batch(url: str | None, before: tuple[float, float] | None, texts_done: int) -> float | None:
    """Champion texts per forward pass over a level (warm-up included); waits (<= 15 s) for Ray's
    metrics export to count every text the level got answers for."""
    return _mean_batch(url, before, texts_done, reader=champion_batches, wait_s=15.0)


# ----------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------


def wait_condition(app: BenchApp, condition: str, timeout_s: float) -> dict[str, Any]:
    """Until ``GET /bench/v1/model`` shows the candidate loaded and its mirror running (shadow),
    or no candidate (champion)."""
    import requests

    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException, ValueError):
            resp = requests.get(f"{app.url}/v1/model", headers=_auth_header(), timeout=10)
            if resp.status_code == 200:
                candidate = resp.json().get("candidate")
                if condition == "champion" and candidate is None:
                    return {}
                if condition == "shadow" and candidate:
                    if candidate.get("load_error"):
                        raise RuntimeError(f"the shadow candidate failed to load: {candidate['load_error']}")
                    if candidate.get("version") and candidate.get("shadow") is not None:
                        return candidate
                last = f"candidate {candidate}"
            else:
                last = f"HTTP {resp.status_code}"
        time.sleep(1.0)
    raise RuntimeError(
        f"the benchmark app did not reach condition {condition!r} in {timeout_s:.0f} s ({last})"
    )


def load_level(
    args: argparse.Namespace, url: str, bodies: list[bytes], concurrency: int, pids: dict[str, list[int]]
) -> tuple[LoadResult, dict[str, float], dict[str, Any]]:
    """One closed-loop window at ``concurrency`` clients, with the CPU and shadow probes beside it."""
    window = Window(args.warmup, args.duration)
    cpu = CpuProbe(pids, window)
    shadow = ShadowProbe(url, pids.get("replica", []), window)
    cpu.start()
    shadow.start()
    target = f"{url}/v1/predict"
    if args.client == "aiohttp":
        result = asyncio.run(_aiohttp_load(target, bodies, b'"predictions"', concurrency, window))
    else:
        result = _threads_load(target, bodies, b'"predictions"', concurrency, window)
    cpu.join()
    shadow.join()
    result.window_s = args.duration
    return result, cpu.cores_used(), shadow.summary(args.duration)


def schedule(rounds: int) -> list[tuple[int, str]]:
    """(round, condition) in the order A B, B A, A B ...: each condition first in half the rounds."""
    return [
        (r, condition)
        for r in range(rounds)
        for condition in (CONDITIONS if r % 2 == 0 else tuple(reversed(CONDITIONS)))
    ]


def run(
    args: argparse.Namespace, export: Path, texts: list[str], meta: dict[str, Any]
) -> list[dict[str, Any]]:
    import yaml

    from ml.rollout import CONFIG_FILE, ServeDeployer
    from ml.settings import load_settings

    settings = load_settings()
    deployer = ServeDeployer(settings, app_name=APP_NAME, timeout_s=args.deploy_timeout)
    template = yaml.safe_load(CONFIG_FILE.read_text())
    deployment = copy.deepcopy(
        next(app for app in template["applications"] if app["name"] == TEMPLATE_APP)["deployments"][0]
    )
    base = deployment.pop("user_config")
    deployment.pop("autoscaling_config", None)
    deployment["num_replicas"] = 1
    deployment["ray_actor_options"] = {**(deployment.get("ray_actor_options") or {}), "num_gpus": 0}
    meta["deployment"] = deployment
    app = BenchApp(deployer, settings.serve_url, deployment, args.env, args.deploy_timeout, args.import_path)
    champion = {
        **base,
        "model_name": "",
        "model_version": "champion",
        "model_path": str(export),
        "max_batch_size": args.max_batch_size,
        "batch_wait_timeout_s": args.batch_wait_ms / 1000,
        "torch_threads": args.torch_threads,
        "device": "cpu",
        "dtype": None,
        "prediction_log": False,
        "candidate": None,
    }
    candidate = {
        "model_version": "shadow-bench",
        "model_path": str(args.candidate_path.resolve() if args.candidate_path else export),
        "mode": "shadow",
        "shadow_threads": args.shadow_threads,
        "shadow_queue_texts": args.shadow_queue_texts,
    }
    configs = {"champion": champion, "shadow": {**champion, "candidate": candidate}}
    meta["user_config"] = configs
    bodies = [json.dumps({"text": text}).encode() for text in texts]
    rows: list[dict[str, Any]] = []
    try:
        print(f"-- deploying {APP_NAME!r} at {app.url} (one replica) ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        app.apply(champion)
        info = app.wait_applied(champion)
        meta["served_model"] = {k: info.get(k) for k in ("source", "device", "dtype", "max_length")}
        print(f"   ready after {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        replica = _local_pids(f"ray::ServeReplica:{APP_NAME}:")
        meta["replica_niceness"] = _niceness(replica[0]) if replica else None
        _renice(args, meta)
        for concurrency, round_no, condition in (
            (c, r, cond) for c in args.concurrency for r, cond in schedule(args.rounds)
        ):
            switched = time.monotonic()
            if app.applied != configs[condition]:
                app.apply(configs[condition])
                app.wait_applied(configs[condition])
                detail = wait_condition(app, condition, args.deploy_timeout)
                took = (
                    f" (candidate {detail.get('version')}, {time.monotonic() - switched:.0f} s)"
                    if detail
                    else ""
                )
                print(f"-- {condition}{took}", file=sys.stderr, flush=True)
            replica = _local_pids(f"ray::ServeReplica:{APP_NAME}:")
            pids = {"replica": replica, "proxy": _local_pids("ray::ProxyActor")} if replica else {}
            before = champion_batches(args.metrics_url)
            result, cores, shadow = load_level(args, app.url, bodies, concurrency, pids)
            done = len(result.latencies)
            row = {
                "round": round_no,
                "condition": condition,
                "concurrency": concurrency,
                "texts": done,
                "seconds": result.window_s,
                "texts_per_s": round(done / result.window_s, 2),
                "errors": sum(result.errors.values()),
                "error_kinds": dict(result.errors),
                **_percentiles_ms(result.latencies),
                "cores_used": cores,
                **(shadow if condition == "shadow" else {}),
                "mean_batch": mean_batch(args.metrics_url, before, result.ok_total),
                "pids": pids,
            }
            row["latencies_ms"] = [round(s * 1000, 1) for s in result.latencies]
            print(
                f"   round {round_no + 1}/{args.rounds}, {condition:<8} {concurrency:>3} clients: "
                f"{row['texts_per_s']:6.1f} texts/s, "
                f"p50 {row['p50_ms']} ms, "
                f"p99 {row['p99_ms']} ms, errors {row['errors']}, mean batch {row['mean_batch']}"
                + (
                    f", shadow answered {row.get('shadow_answered')} dropped {row.get('shadow_dropped')}"
                    f" ({row.get('shadow_cores')} cores)"
                    if condition == "shadow"
                    else ""
                ),
                file=sys.stderr,
                flush=True,
            )
            rows.append(row)
    finally:
        print(f"-- removing {APP_NAME!r} ...", file=sys.stderr, flush=True)
        try:
            app.remove()
        except Exception as err:
            print(f"   could not remove {APP_NAME!r}: {err!r}; remove it by hand", file=sys.stderr)
    return rows


# ----------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------


def pooled(rows: list[dict[str, Any]], levels: list[int]) -> list[dict[str, Any]]:
    """Per condition and level: all rounds' latencies together."""
    out = []
    for concurrency in levels:
        for condition in CONDITIONS:
            mine = [r for r in rows if r["condition"] == condition and r["concurrency"] == concurrency]
            if not mine:
                continue
            latencies = [ms / 1000 for r in mine for ms in r["latencies_ms"]]
            seconds = sum(r["seconds"] for r in mine)
            cores = [r["cores_used"] for r in mine if r["cores_used"]]

            def mean_core(key: str, cores: list[dict[str, float]] = cores) -> float | None:
                values = [c[key] for c in cores if key in c]
                return round(sum(values) / len(values), 2) if values else None

            entry: dict[str, Any] = {
                "condition": condition,
                "concurrency": concurrency,
                "rounds": len(mine),
                "texts": len(latencies),
                "texts_per_s": round(len(latencies) / seconds, 2),
                "errors": sum(r["errors"] for r in mine),
                **_percentiles_ms(latencies),
                "p99_ms_per_round": [r["p99_ms"] for r in mine],
                "mean_batch": _mean([r["mean_batch"] for r in mine]),
                "replica_cores": mean_core("replica"),
                "other_cores": mean_core("other"),
            }
            if condition == "shadow":
                for key in ("mirrored", "answered", "failed", "dropped"):
                    values = [r.get(f"shadow_{key}") for r in mine]
                    entry[f"shadow_{key}"] = sum(values) if None not in values else None
                entry["shadow_cores"] = _mean([r.get("shadow_cores") for r in mine], 3)
            out.append(entry)
    return out


def _mean(values: list[float | None], digits: int = 2) -> float | None:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), digits) if values else None


def ratios(rows: list[dict[str, Any]], pool: list[dict[str, Any]], levels: list[int]) -> list[dict[str, Any]]:
    out = []
    for concurrency in levels:
        by = {e["condition"]: e for e in pool if e["concurrency"] == concurrency}
        if set(by) != set(CONDITIONS) or not by["champion"]["p99_ms"]:
            continue
        per_round = []
        for round_no in sorted({r["round"] for r in rows}):
            pair = {
                r["condition"]: r
                for r in rows
                if r["round"] == round_no and r["concurrency"] == concurrency and r["p99_ms"]
            }
            if set(pair) == set(CONDITIONS):
                per_round.append(round(pair["shadow"]["p99_ms"] / pair["champion"]["p99_ms"], 3))
        ratio = by["shadow"]["p99_ms"] / by["champion"]["p99_ms"]
        out.append(
            {
                "concurrency": concurrency,
                "p99_champion_ms": by["champion"]["p99_ms"],
                "p99_shadow_ms": by["shadow"]["p99_ms"],
                "p99_ratio": round(ratio, 3),
                "p99_ratio_per_round": per_round,
                "p50_ratio": round(by["shadow"]["p50_ms"] / by["champion"]["p50_ms"], 3),
                "throughput_ratio": round(by["shadow"]["texts_per_s"] / by["champion"]["texts_per_s"], 3),
                "met": ratio <= MAX_P99_RATIO,
            }
        )
    return out


def _fmt(value: Any, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def report(pool: list[dict[str, Any]], verdicts: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    header = [
        "condition", "clients", "rounds", "texts/s", "p50 ms", "p95 ms", "p99 ms", "errors", "mean batch",
        "shadow answered", "shadow dropped", "shadow cores", "replica cores", "other load (cores)",
    ]  # fmt: skip
    lines = [
        "",
        f"Shadow mirroring benchmark, {meta['date_utc']}, {meta['machine']}",
        f"model: {meta['model']}; champion: max batch {meta['max_batch_size']}, "
        f"wait {meta['batch_wait_ms']:g} ms, "
        f"{meta['torch_threads']} torch threads; shadow: {meta['shadow_threads']} thread(s), queue "
        f"{meta['shadow_queue_texts']} texts",
        f"load: closed loop, one text per request, {meta['client']} client, {meta['warmup_s']:g} s warm-up + "
        f"{meta['duration_s']:g} s per level and condition, {meta['rounds']} rounds (A B, B A, ...); this "
        f"process at niceness {meta.get('client_niceness')} (the replica's: {meta.get('replica_niceness')})",
        f"1-min load average {meta['load_average_1min_before']} before, "
        f"{meta.get('load_average_1min_after')} after",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for e in pool:
        cells = [
            e["condition"],
            str(e["concurrency"]),
            str(e["rounds"]),
            f"{e['texts_per_s']:.1f}",
            _fmt(e["p50_ms"], ".0f"),
            _fmt(e["p95_ms"], ".0f"),
            _fmt(e["p99_ms"], ".0f"),
            str(e["errors"]),
            _fmt(e["mean_batch"], ".1f"),
            _fmt(e.get("shadow_answered")),
            _fmt(e.get("shadow_dropped")),
            _fmt(e.get("shadow_cores"), ".2f"),
            _fmt(e["replica_cores"], ".2f"),
            _fmt(e["other_cores"], ".2f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Latency per HTTP request, all rounds pooled. shadow answered / dropped: texts, summed over the "
        "timed "
        "windows (GET /bench/v1/model candidate.shadow). shadow cores: CPU of the replica's niceness-19 "
        "thread(s). mean batch: the champion's texts per forward pass (warm-up included).",
        "",
        "| clients | p99 champion ms | p99 shadow ms | p99 ratio | per round | p50 ratio | texts/s ratio | "
        f"goal <= {MAX_P99_RATIO:.2f} |",
        "|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for v in verdicts:
        lines.append(
            f"| {v['concurrency']} | {v['p99_champion_ms']:.0f} | {v['p99_shadow_ms']:.0f} | "
            f"{v['p99_ratio']:.2f} | "
            f"{', '.join(f'{x:.2f}' for x in v['p99_ratio_per_round'])} | {v['p50_ratio']:.2f} | "
            f"{v['throughput_ratio']:.2f} | {'met' if v['met'] else 'MISSED'} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--concurrency", type=_int_list, default=[1, 4, 16], help="closed-loop client counts (default 1,4,16)"
    )
    parser.add_argument("--duration", type=float, default=15.0, help="timed seconds per level (default 15)")
    parser.add_argument("--warmup", type=float, default=4.0, help="untimed seconds before each (default 4)")
    parser.add_argument(
        "--rounds", type=int, default=2, help="champion/shadow pairs, A B, B A, ... (default 2)"
    )
    parser.add_argument("--client", choices=["aiohttp", "threads"], default="aiohttp")
    parser.add_argument(
        "--nice", type=int, default=None, help="this process's niceness (default: the replica's)"
    )
    parser.add_argument("--max-batch-size", type=int, default=None, help="default: serve/config.yaml's (16)")
    parser.add_argument(
        "--batch-wait-ms", type=_float_list, default=None, help="default: serve/config.yaml's (100)"
    )
    parser.add_argument(
        "--torch-threads", type=int, default=None, help="champion; default serve/config.yaml's (2)"
    )
    parser.add_argument("--shadow-threads", type=int, default=1, help="candidate.shadow_threads (default 1)")
    parser.add_argument(
        "--shadow-queue-texts", type=int, default=512, help="candidate.shadow_queue_texts (default 512)"
    )
    parser.add_argument("--model-path", type=Path, help="an export (default: base model + random head)")
    parser.add_argument("--candidate-path", type=Path, help="the shadow's export (default: the champion's)")
    parser.add_argument("--import-path", default="serve.app:classifier_app")
    parser.add_argument(
        "--env",
        action="append",
        type=_env_pair,
        default=[],
        metavar="KEY=VALUE",
        help="replica env; repeatable",
    )
    parser.add_argument(
        "--metrics-url", default=DEFAULT_METRICS_URL, help="Ray metrics (mean batch); '' skips"
    )
    parser.add_argument("--deploy-timeout", type=float, default=300.0)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default="", help="free text kept in the record (e.g. what was changed)")
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_RESULTS, help="append the record here (JSON lines)"
    )
    args = parser.parse_args(argv)
    args.env = dict(args.env)
    if args.rounds < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("--rounds >= 1, --duration > 0, --warmup >= 0")
    if args.batch_wait_ms is not None:
        if len(args.batch_wait_ms) != 1:
            parser.error("--batch-wait-ms: one value")
        args.batch_wait_ms = args.batch_wait_ms[0]
    for name in ("model_path", "candidate_path"):
        path = getattr(args, name)
        if path and not (path / "label_map.json").is_file():
            parser.error(f"--{name.replace('_', '-')}: {path} is not a model export (no label_map.json)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start_local_ray()
    import yaml

    from ml.rollout import CONFIG_FILE

    template = next(
        app for app in yaml.safe_load(CONFIG_FILE.read_text())["applications"] if app["name"] == TEMPLATE_APP
    )["deployments"][0]["user_config"]
    args.max_batch_size = args.max_batch_size or template["max_batch_size"]
    if args.batch_wait_ms is None:
        args.batch_wait_ms = template["batch_wait_timeout_s"] * 1000
    args.torch_threads = args.torch_threads or template.get("torch_threads") or (os.cpu_count() or 1)
    texts, labels = load_texts(args.data, args.seed)
    meta: dict[str, Any] = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else None,
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "machine": _machine("cpu"),
        "git_commit": _git_commit(),
        "load_average_1min_before": round(os.getloadavg()[0], 2),
        "concurrency": args.concurrency,
        "warmup_s": args.warmup,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "client": args.client,
        "max_batch_size": args.max_batch_size,
        "batch_wait_ms": args.batch_wait_ms,
        "torch_threads": args.torch_threads,
        "shadow_threads": args.shadow_threads,
        "shadow_queue_texts": args.shadow_queue_texts,
        "env": args.env,
        "import_path": args.import_path,
        "note": args.note,
    }
    started = time.monotonic()
    with contextlib.ExitStack() as cleanup:
        if args.model_path:
            export = args.model_path.resolve()
            meta["model"] = str(export)
        else:
            tmp = Path(tempfile.mkdtemp(prefix="shadow-bench-"))
            cleanup.callback(_rmtree, tmp)
            print(f"-- building a synthetic export in {tmp} ...", file=sys.stderr, flush=True)
            export = build_export(tmp / "export", labels)
            meta["model"] = f"packaged all-MiniLM-L6-v2 + random {len(labels)}-class head (synthetic export)"
        try:
            rows = run(args, export, texts, meta)
        except KeyboardInterrupt:
            print("interrupted (the benchmark app was removed)", file=sys.stderr)
            return 130
    meta["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    meta["wall_s"] = round(time.monotonic() - started)
    pool = pooled(rows, args.concurrency)
    verdicts = ratios(rows, pool, args.concurrency)
    print(report(pool, verdicts, meta))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    with args.json.open("a") as fh:
        record = {
            "meta": meta,
            "pooled": pool,
            "p99_ratios": verdicts,
            "rows": [{k: v for k, v in r.items() if k != "latencies_ms"} for r in rows],
        }
        fh.write(json.dumps(record) + "\n")
    print(f"\nrecord appended to {args.json}")
    if any(r["errors"] for r in rows):
        return 1
    return 0 if all(v["met"] for v in verdicts) else 3


if __name__ == "__main__":
    raise SystemExit(main())
