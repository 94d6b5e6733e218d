"""What a hostile client costs the others: normal clients' latency alone vs beside bad requests.

One run, side by side on the same replica: ``--concurrency`` normal clients (one text per
``POST /bench/v1/predict``, closed loop) for ``--duration`` seconds alone, then the same beside
``--hostile`` clients that each keep sending one kind of bad request:

* ``wrong-types``: a 1.2 MB body, ``{"texts": [0, 1, ..., 199999]}`` (a list far over the limit);
* ``many-problems``: 64 numbers instead of texts plus a 1.2 MB unknown field name;
* ``surrogates``: valid JSON whose texts are lone surrogates (``"\\ud800"``), which no tokenizer reads;
* ``valid-extra``: the same number of extra clients sending valid 4-text requests, for comparison:
  on a small machine any extra traffic costs the others something; a bad request should cost no
  more than a good one.

For each phase it prints the normal clients' texts/s and p50/p99 latency, their errors, and the
hostile requests' statuses and the largest error body; then the ratio of the normal clients' p50
and throughput under attack to alone. The benchmark app is the one of ``serve_bench.py``
(``serve-bench`` at ``/bench``, synthetic export, no prediction log), removed at the end.

    .venv/bin/python benchmarks/hostile_bench.py               # ~2 min on the local stack
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from serve_bench import (
    APP_NAME,
    DEFAULT_DATA,
    BenchApp,
    Window,
    _auth_header,
    _percentiles_ms,
    _rmtree,
    _threads_load,
    build_export,
    load_texts,
    start_local_ray,
)

HOSTILE_BODIES = {
    # the fair comparison: the same number of extra clients sending valid 4-text requests
    "valid-extra": json.dumps({"texts": ["Stocks rallied as the central bank held rates."] * 4}).encode(),
    "wrong-types": json.dumps({"texts": list(range(200_000))}).encode(),
    "many-problems": json.dumps({"texts": list(range(64)), "x" * 1_200_000: 0}).encode(),
    "surrogates": b'{"texts": [' + b",".join([b'"\\ud800 poisoned"'] * 64) + b"]}",
}


def hostile_load(url: str, body: bytes, clients: int, until: float) -> dict[str, Any]:
    """``clients`` threads posting ``body`` until ``until``; statuses and the largest answer."""
    import requests

    statuses: Counter = Counter()
    largest = 0
    lock = threading.Lock()
    headers = {"content-type": "application/json", **_auth_header()}

    def worker() -> None:
        nonlocal largest
        with requests.Session() as session:
            while time.perf_counter() < until:
                try:
                    resp = session.post(url, data=body, headers=headers, timeout=60)
                    status, size = resp.status_code, len(resp.content)
                except requests.RequestException as err:
                    status, size = type(err).__name__, 0
                with lock:
                    statuses[status] += 1
                    largest = max(largest, size)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"statuses": dict(statuses), "largest_answer_bytes": largest, "body_bytes": len(body)}


def phase(url: str, texts: list[str], args: argparse.Namespace, hostile: str | None) -> dict[str, Any]:
    bodies = [json.dumps({"text": text}).encode() for text in texts]
    window = Window(args.warmup, args.duration)
    attack: dict[str, Any] = {}
    attacker = None
    if hostile:

        def attack_run() -> None:
            attack.update(hostile_load(url, HOSTILE_BODIES[hostile], args.hostile, window.end))

        attacker = threading.Thread(target=attack_run, daemon=True)
        attacker.start()
    result = _threads_load(url, bodies, b'"predictions"', args.concurrency, window)
    if attacker is not None:
        attacker.join()
    return {
        "phase": hostile or "alone",
        "texts_per_s": round(len(result.latencies) / args.duration, 2),
        **_percentiles_ms(result.latencies),
        "errors": dict(result.errors),
        **({"hostile": attack} if hostile else {}),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start_local_ray()

    import yaml

    from ml.rollout import CONFIG_FILE, ServeDeployer
    from ml.settings import load_settings

    settings = load_settings()
    deployer = ServeDeployer(settings, app_name=APP_NAME, timeout_s=300)
    texts, labels = load_texts(args.data, 0)
    template = yaml.safe_load(CONFIG_FILE.read_text())["applications"][0]["deployments"][0]
    user_config = template.pop("user_config")
    template.pop("autoscaling_config", None)
    template["num_replicas"] = 1
    rows = []
    with contextlib.ExitStack() as cleanup:
        tmp = Path(tempfile.mkdtemp(prefix="hostile-bench-"))
        cleanup.callback(_rmtree, tmp)
        export = build_export(tmp / "export", labels)
        user_config = {**user_config, "model_name": "", "model_path": str(export), "prediction_log": False}
        app = BenchApp(deployer, settings.serve_url, template, {}, 300)
        try:
            app.apply(user_config)
            app.wait_applied(user_config)
            url = f"{app.url}/v1/predict"
            for hostile in [None, *args.kinds]:
                print(f"-- {hostile or 'normal clients alone'} ...", file=sys.stderr, flush=True)
                rows.append(phase(url, texts, args, hostile))
        except KeyboardInterrupt:
            return 130
        finally:
            app.remove()
    alone = rows[0]
    print(f"{'phase':<14} {'texts/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}  hostile answers")
    for row in rows:
        hostile = row.get("hostile", {})
        answers = (
            f"{hostile.get('statuses')} largest {hostile.get('largest_answer_bytes')} B "
            f"for {hostile.get('body_bytes')} B sent"
            if hostile
            else ""
        )
        print(
            f"{row['phase']:<14} {row['texts_per_s']:>8.1f} {row['p50_ms'] or 0:>8.1f} "
            f"{row['p99_ms'] or 0:>8.1f} {sum(row['errors'].values()):>7}  {answers}"
        )
    for row in rows[1:]:
        slowdown = (row["p50_ms"] or 0) / (alone["p50_ms"] or 1)
        throughput = row["texts_per_s"] / (alone["texts_per_s"] or 1)
        print(f"{row['phase']}: normal clients' p50 x{slowdown:.2f}, throughput x{throughput:.2f} of alone")
    return 1 if any(row["errors"] for row in rows) else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=8, help="normal clients (default 8)")
    parser.add_argument("--hostile", type=int, default=2, help="hostile clients per phase (default 2)")
    parser.add_argument(
        "--kinds", nargs="+", choices=sorted(HOSTILE_BODIES), default=sorted(HOSTILE_BODIES), help="attacks"
    )
    parser.add_argument("--duration", type=float, default=20.0, help="seconds measured per phase")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before each phase's window")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CSV(.gz) with a text column")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
