"""Batched vs unbatched inference of the bare predictor, under closed-loop concurrent clients.

No Ray and no HTTP (neither travels to the GPU machine): ``ml.predict.TextClassifier`` is driven
directly, the way one Serve replica drives it, so the figures are the model's and the batching's.

- **unbatched**: every client's text is one forward pass (``predict_proba([text])``); passes run one
  at a time in one worker thread, as a replica with ``max_batch_size`` 1 runs them.
- **batched**: an asyncio micro-batcher gathers the texts of all waiting clients into one forward
  pass of at most ``--max-batch`` texts. It never waits for more texts by default
  (``--batch-wait-ms 0``): while a pass runs, new texts queue, and the next pass takes all of them.

Each client sends one text, waits for its answer and sends the next (closed loop). Per mode and
concurrency: ``--warmup`` seconds untimed, then ``--duration`` seconds timed; a request counts if it
completes inside the timed window; texts/s = counted requests / window, latency = submit to answer.
The model is the packaged base model with a seeded random 4-class head (``export_base_model``, the
compute of a trained model) unless ``--model-path`` names an export.

    .venv/bin/python benchmarks/gpu_infer.py --device cuda                      # 1,16,64 clients
    .venv/bin/python benchmarks/gpu_infer.py --device cpu --concurrency 1,4 --duration 2 --json /tmp/i.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ml.sample_data import AGNEWS_SAMPLE

TARGET_RATIO = 10.0  # batched / unbatched texts/s at the highest concurrency
TARGET_P99_MS = 100.0  # batched p99 at the highest concurrency


class MicroBatcher:
    """Gathers concurrent texts into one forward pass (at most ``max_batch`` texts)."""

    def __init__(self, classifier: Any, max_batch: int, wait_s: float, executor: ThreadPoolExecutor) -> None:
        self.classifier = classifier
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.executor = executor
        self.queue: asyncio.Queue[tuple[str, asyncio.Future]] = asyncio.Queue()
        self.passes: list[tuple[float, int, float]] = []  # (end time, texts, forward seconds)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def submit(self, text: str) -> Any:
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((text, future))
        return await future

    async def _gather(self) -> list[tuple[str, asyncio.Future]]:
        batch = [await self.queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while len(batch) < self.max_batch:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), left))
            except TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            texts = [text for text, _ in batch]
            started = time.perf_counter()
            try:
                probs = await loop.run_in_executor(
                    self.executor, lambda t=texts: self.classifier.predict_proba(t, batch_size=self.max_batch)
                )
            except Exception as err:  # hand the failure to every waiting client
                for _, future in batch:
                    if not future.done():
                        future.set_exception(err)
                continue
            ended = time.perf_counter()
            self.passes.append((ended, len(batch), ended - started))
            for (_, future), row in zip(batch, probs, strict=True):
                if not future.done():
                    future.set_result(row)


def _percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


async def run_window(
    classifier: Any,
    mode: str,
    concurrency: int,
    pool: list[str],
    offset: int,
    options: argparse.Namespace,
) -> dict[str, Any]:
    """``concurrency`` closed-loop clients for warmup + duration seconds; one table row."""
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")  # one pass at a time
    batcher = None
    if mode == "batched":
        batcher = MicroBatcher(classifier, options.max_batch, options.batch_wait_ms / 1000, executor)
        batcher.start()
        infer = batcher.submit
    else:
        unbatched_passes: list[tuple[float, int, float]] = []

        def one(text: str) -> Any:
            started = time.perf_counter()
            row = classifier.predict_proba([text], batch_size=1)[0]
            ended = time.perf_counter()
            unbatched_passes.append((ended, 1, ended - started))
            return row

        async def infer(text: str) -> Any:
            return await loop.run_in_executor(executor, one, text)

    start = time.perf_counter() + options.warmup
    end = start + options.duration
    latencies: list[float] = []
    errors = 0
    counter = iter(range(offset, offset + 10**9))

    async def client() -> None:
        nonlocal errors
        while time.perf_counter() < end:
            text = pool[next(counter) % len(pool)]
            sent = time.perf_counter()
            try:
                await infer(text)
            except Exception:
                errors += 1
                continue
            done = time.perf_counter()
            if start <= done <= end:
                latencies.append(done - sent)

    cpu_before = time.process_time()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    cpu_s = time.process_time() - cpu_before
    if batcher is not None:
        await batcher.close()
        passes = batcher.passes
    else:
        passes = unbatched_passes
    executor.shutdown(wait=True)
    timed = [(n, s) for t, n, s in passes if start <= t <= end]
    return {
        "mode": mode,
        "concurrency": concurrency,
        "max_batch": options.max_batch if mode == "batched" else 1,
        "batch_wait_ms": options.batch_wait_ms if mode == "batched" else 0.0,
        "window_s": options.duration,
        "completed": len(latencies),
        "errors": errors,
        "texts_per_s": len(latencies) / options.duration,
        "p50_ms": 1000 * _percentile(latencies, 50),
        "p95_ms": 1000 * _percentile(latencies, 95),
        "p99_ms": 1000 * _percentile(latencies, 99),
        "max_ms": 1000 * max(latencies) if latencies else float("nan"),
        "passes": len(timed),
        "mean_batch": sum(n for n, _ in timed) / len(timed) if timed else float("nan"),
        "forward_ms_mean": 1000 * sum(s for _, s in timed) / len(timed) if timed else float("nan"),
        "process_cpu_s_per_s": cpu_s / (options.warmup + options.duration),
    }


def add_ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """batched ÷ unbatched texts/s per concurrency, and the verdict at the highest one."""
    by = {(r["mode"], r["concurrency"]): r for r in rows}
    ratios = {}
    for (mode, concurrency), row in sorted(by.items()):
        base = by.get(("unbatched", concurrency))
        if mode == "batched" and base and base["texts_per_s"] > 0:
            ratios[str(concurrency)] = row["texts_per_s"] / base["texts_per_s"]
    verdict: dict[str, Any] = {"batched_over_unbatched": ratios}
    if ratios:
        top = max(int(c) for c in ratios)
        ratio, p99 = ratios[str(top)], by[("batched", top)]["p99_ms"]
        verdict |= {
            "at_concurrency": top,
            "ratio": ratio,
            "ratio_target": TARGET_RATIO,
            "ratio_met": ratio >= TARGET_RATIO,
            "p99_ms": p99,
            "p99_target_ms": TARGET_P99_MS,
            "p99_met": p99 <= TARGET_P99_MS,
        }
    return verdict


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ["mode", "max batch", "clients", "texts/s", "p50 ms", "p95 ms", "p99 ms", "errors"]
    header += ["mean batch", "forward ms", "passes"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "|".join("---:" for _ in header[1:]) + "|"]
    for r in rows:
        cells = [
            r["mode"],
            str(r["max_batch"]),
            str(r["concurrency"]),
            f"{r['texts_per_s']:.1f}",
            f"{r['p50_ms']:.1f}",
            f"{r['p95_ms']:.1f}",
            f"{r['p99_ms']:.1f}",
            str(r["errors"]),
            f"{r['mean_batch']:.1f}",
            f"{r['forward_ms_mean']:.2f}",
            str(r["passes"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_verdict(verdict: dict[str, Any]) -> str:
    if "ratio" not in verdict:
        return "batched ÷ unbatched: not measured (both modes are needed)"
    c = verdict["at_concurrency"]
    return (
        f"batched ÷ unbatched at {c} clients = {verdict['ratio']:.2f} "
        f"(target >= {verdict['ratio_target']:g}: {'met' if verdict['ratio_met'] else 'MISSED'}); "
        f"batched p99 at {c} clients = {verdict['p99_ms']:.1f} ms "
        f"(target <= {verdict['p99_target_ms']:g} ms: {'met' if verdict['p99_met'] else 'MISSED'})"
    )


def _texts(data: str, seed: int) -> list[str]:
    import pandas as pd

    texts = pd.read_csv(data)["text"].astype(str).tolist()
    random.Random(seed).shuffle(texts)
    return texts


def _labels(data: str) -> list[str]:
    import pandas as pd

    return sorted(pd.read_csv(data)["label"].astype(str).unique())


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", default=None, help="cuda, cpu, cuda:1 ...; default: a GPU if there is one"
    )
    parser.add_argument(
        "--dtype", default=None, help="float32/float16/bfloat16; default: fp16 on GPU, fp32 on CPU"
    )
    parser.add_argument(
        "--model-path", default=None, help="an export directory; default: base model + random head"
    )
    parser.add_argument(
        "--concurrency", type=_int_list, default=[1, 16, 64], help="client counts (default 1,16,64)"
    )
    parser.add_argument("--modes", default="unbatched,batched", help="unbatched,batched (default both)")
    parser.add_argument("--max-batch", type=int, default=64, help="largest forward pass of the batched mode")
    parser.add_argument(
        "--batch-wait-ms", type=float, default=0.0, help="batched: wait this long for more texts"
    )
    parser.add_argument("--warmup", type=float, default=2.0, help="untimed seconds before each window")
    parser.add_argument("--duration", type=float, default=8.0, help="timed seconds per mode and concurrency")
    parser.add_argument(
        "--max-length", type=int, default=64, help="tokenizer truncation (training's default 64)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    parser.add_argument("--data", default=str(AGNEWS_SAMPLE), help="CSV (.gz) with columns text,label")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or set(args.modes) - {"unbatched", "batched"}:
        parser.error(f"--modes: expected unbatched and/or batched, got {args.modes}")
    if args.max_batch < 1 or args.duration <= 0 or args.warmup < 0 or args.batch_wait_ms < 0:
        parser.error("--max-batch >= 1, --duration > 0, --warmup >= 0 and --batch-wait-ms >= 0")
    return args


def _write(path: Path | None, record: dict[str, Any]) -> None:
    if path is not None:
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(record, indent=2))
        partial.replace(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers.utils import logging as hf_logging

    from ml.predict import TextClassifier, export_base_model, resolve_device
    from ml.settings import Settings

    hf_logging.disable_progress_bar()  # "Loading weights" bars, one per model load
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    started = dt.datetime.now(dt.UTC)
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-infer-") as tmp:
        base_model = Settings().resolved_base_model()
        export = args.model_path or str(
            export_base_model(
                Path(tmp) / "export", _labels(args.data), args.max_length, base_model=base_model
            )
        )
        classifier = TextClassifier.from_dir(export, device=device, dtype=args.dtype)
    pool = _texts(args.data, args.seed)
    # Warm-up: first CUDA kernels, cuBLAS handles, allocator; every batch shape class once.
    for size in (1, 2, 8, args.max_batch):
        classifier.predict_proba(pool[:size], batch_size=args.max_batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    meta = {
        "command": " ".join(
            [Path(sys.executable).name, *(sys.argv if argv is None else ["gpu_infer.py", *argv])]
        ),
        "date_utc": started.isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu_cores": len(os.sched_getaffinity(0)),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "dtype": str(classifier.model.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "model": args.model_path or f"{base_model} + seeded random head (export_base_model)",
        "max_length": classifier.max_length,
        "warmup_s": args.warmup,
        "duration_s": args.duration,
        "max_batch": args.max_batch,
        "batch_wait_ms": args.batch_wait_ms,
        "load_average_1min_before": round(os.getloadavg()[0], 2),
    }
    rows: list[dict[str, Any]] = []
    offset = 0
    for mode in args.modes:
        for concurrency in args.concurrency:
            print(f"-- {mode}, {concurrency} client(s) ...", file=sys.stderr, flush=True)
            row = asyncio.run(run_window(classifier, mode, concurrency, pool, offset, args))
            offset += row["completed"] + 1000
            print(
                f"   {row['texts_per_s']:.1f} texts/s, p50 {row['p50_ms']:.1f} ms, "
                f"p99 {row['p99_ms']:.1f} ms, mean batch {row['mean_batch']:.1f}",
                file=sys.stderr,
                flush=True,
            )
            rows.append(row)
            _write(args.json, {"meta": meta, "rows": rows, "verdict": add_ratios(rows)})
    verdict = add_ratios(rows)
    meta["wall_s"] = round(time.perf_counter() - wall, 1)
    meta["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        meta["peak_gpu_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    _write(args.json, {"meta": meta, "rows": rows, "verdict": verdict})
    print(
        f"\nBare-predictor inference, {meta['date_utc']}, {meta['device_name']} "
        f"({meta['device']}, {meta['dtype']}), {args.warmup:g} s warm-up + {args.duration:g} s timed "
        f"per row, max batch {args.max_batch}\n"
    )
    print(format_table(rows))
    print("\n" + format_verdict(verdict))
    if args.json:
        print(f"\nJSON written to {args.json}")
    return 1 if any(r["errors"] or not r["completed"] for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
