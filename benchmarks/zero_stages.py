"""Throughput and peak memory of the pipeline's training step under DeepSpeed ZeRO 0, 2 and 3.

Every configuration (ZeRO stage x number of workers) trains the same workload: the real base
model (all-MiniLM-L6-v2 + a classification head) on real AG News texts, with the micro-batch and
max_length of :class:`ml.train.TrainConfig`, the DeepSpeed config of :func:`ml.train.deepspeed_config`
and the per-step code of :func:`ml.train._train_one_epoch` (tokenize, forward, backward, step).
A few warm-up steps are run first and left out of the timing. All configurations run in one
invocation, so their ratios to the stage-0 / 1-worker baseline are measured side by side.

No Ray: each configuration spawns its own N fresh processes (``torch.multiprocessing``, a free
port each, gloo on CPU / nccl on GPU), so peak RSS per worker belongs to that configuration
alone and the benchmark can be carried to a GPU machine that has no Ray.

    .venv/bin/python benchmarks/zero_stages.py                      # CPU, stages 0,2,3 x 1,2 workers
    .venv/bin/python benchmarks/zero_stages.py --gpu --workers 1    # one GPU, bf16, prints MFU
    .venv/bin/python benchmarks/zero_stages.py --json /tmp/zero.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import shlex
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Only the standard library (and ml.sample_data, paths only) at module level: every spawned worker
# re-imports this module.
from ml.sample_data import AGNEWS_SAMPLE

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = AGNEWS_SAMPLE
H100_SXM_BF16_TFLOPS = 989.0  # dense bf16 peak, NVIDIA H100 SXM datasheet (no sparsity)
GPU_PATH_NOTE = (
    "The --gpu path (nccl, bf16, MFU) was written for GPU machines but has not been run yet: "
    "treat its numbers as unverified until it has."
)


# ----------------------------------------------------------------------------------------
# the worker: one rank of one configuration
# ----------------------------------------------------------------------------------------


class _StepClock:
    """Wraps the DeepSpeed engine and records when each ``step()`` returns.

    ``_train_one_epoch`` calls ``engine.train()``, ``engine(...)``, ``engine.backward()`` and
    ``engine.step()``; everything but ``step`` passes straight through.
    """

    def __init__(self, engine: Any, cuda: bool) -> None:
        self._engine = engine
        self._cuda = cuda
        self.step_ends: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._engine(*args, **kwargs)

    def step(self) -> None:
        self._engine.step()
        if self._cuda:
            import torch

            # _train_one_epoch syncs right after step() anyway (float(loss)); this only moves
            # the sync before the timestamp so per-step times are not skewed by async kernels.
            torch.cuda.synchronize()
        self.step_ends.append(time.perf_counter())


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _current_rss_mb() -> float:
    """Resident memory now (VmRSS), to tell a start-up transient from the steady state."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _load_rows(data: str, rank: int, world: int) -> tuple[list[tuple[str, int]], list[str]]:
    """This rank's shard of (text, label id), sharded as ml.train._load_shards does."""
    import pandas as pd

    frame = pd.read_csv(data)
    missing = {"text", "label"} - set(frame.columns)
    if missing:
        raise ValueError(f"{data} lacks column(s) {sorted(missing)}; expected columns text,label")
    labels = sorted(frame["label"].astype(str).unique())
    label_to_id = {label: i for i, label in enumerate(labels)}
    rows = list(zip(frame["text"].astype(str), frame["label"].astype(str).map(label_to_id), strict=True))
    return rows[rank::world], labels


def _count_params(model: Any) -> tuple[int, int]:
    """(all parameters, parameters outside embedding tables): lookups do no matmul FLOPs."""
    import torch

    total = sum(p.numel() for p in model.parameters())
    embedding = sum(
        m.weight.numel()
        for m in model.modules()
        if isinstance(m, torch.nn.Embedding) and m.weight is not None
    )
    return total, total - embedding


def _padded_tokens(tokenizer: Any, encoded: list[Any], config: Any, steps: int, epoch: int) -> int:
    """Tokens the timed steps will process, padding included (the same batches as the training step)."""
    from ml.train import _batches

    lengths = [len(features["input_ids"]) for features, _ in encoded]
    batches = _batches(encoded, config.batch_size, steps, epoch, config.seed, lengths)
    return sum(len(batch) * max(len(f["input_ids"]) for f, _ in batch) for batch in batches)


def _worker(rank: int, world: int, port: int, stage: int, options: dict[str, Any], out_dir: str) -> None:
    """One rank: load data and model, DeepSpeed-initialize, warm up, time ``steps`` steps."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    entered = time.perf_counter()
    import logging
    import warnings

    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from ml.train import TrainConfig, _train_one_epoch, deepspeed_config, encode_rows, resolve_precision

    deepspeed.utils.logger.setLevel(logging.WARNING)
    # ZeRO 2/3 call the old collective names on every step; one warning per call floods stderr.
    warnings.filterwarnings(
        "ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning
    )
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected here
    hf_logging.disable_progress_bar()
    cuda = bool(options["gpu"])
    if cuda:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    torch.set_num_threads(options["threads_per_worker"])
    baseline_rss_mb = _peak_rss_mb()  # after imports, before data / model / engine

    config = TrainConfig(
        snapshot_id="benchmark",
        run_name=f"bench-zero{stage}-w{world}",
        epochs=1,
        batch_size=options["batch_size"],
        max_length=options["max_length"],
        zero_stage=stage,
        num_workers=world,
        use_gpu=cuda,
        cpus_per_worker=options["threads_per_worker"],
        seed=options["seed"],
    )
    precision = resolve_precision(config, cuda, cuda and torch.cuda.is_bf16_supported())
    torch.manual_seed(config.seed + rank)  # as train_loop_per_worker; DeepSpeed broadcasts rank 0's head
    rows, labels = _load_rows(options["data"], rank, world)
    base_model = options["base_model"]
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForSequenceClassification.from_pretrained(
        base_model,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        ignore_mismatched_sizes=True,
    )
    params_total, params_non_embedding = _count_params(model)  # before ZeRO-3 partitions them

    warmup, steps = options["warmup"], options["steps"]
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=model.parameters(),
        config=deepspeed_config(config, precision, warmup + steps),
    )
    setup_s = time.perf_counter() - entered
    clock = _StepClock(engine, cuda)
    # epoch 0 = warm-up batches, epoch 1 = timed batches (different shuffles, same for every stage)
    encoded = encode_rows(tokenizer, rows, config.max_length)
    _train_one_epoch(clock, tokenizer, encoded, config, warmup, 0, device)
    tokens = _padded_tokens(tokenizer, encoded, config, steps, 1)
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    started = time.perf_counter()
    clock.step_ends.clear()
    loss, samples = _train_one_epoch(clock, tokenizer, encoded, config, steps, 1, device)
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    elapsed = time.perf_counter() - started

    marks = [started, *clock.step_ends]
    result = {
        "rank": rank,
        "elapsed_s": elapsed,
        "setup_s": setup_s,
        "step_s": [b - a for a, b in itertools.pairwise(marks)],
        "samples": samples,
        "tokens": tokens,
        "train_loss": loss,
        "peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mb(),
        "baseline_rss_mb": baseline_rss_mb,
        "rss_end_mb": _current_rss_mb(),
        "threads": torch.get_num_threads(),
        "precision": precision,
        "device": torch.cuda.get_device_name(rank) if cuda else "cpu",
        "params_total": params_total,
        "params_non_embedding": params_non_embedding,
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------
# the driver
# ----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_configuration(stage: int, workers: int, options: dict[str, Any]) -> dict[str, Any]:
    """Spawn ``workers`` fresh processes for one ZeRO stage and summarise what they measured."""
    import torch.multiprocessing as mp

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="zero-bench-") as out_dir:
        port = _free_port()
        mp.spawn(_worker, args=(workers, port, stage, options, out_dir), nprocs=workers, join=True)
        ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(workers)]
    return summarise(stage, workers, ranks, options) | {"wall_s": round(time.perf_counter() - started, 1)}


def summarise(
    stage: int, workers: int, ranks: list[dict[str, Any]], options: dict[str, Any]
) -> dict[str, Any]:
    """One table row from the per-rank results (the slowest rank sets the pace)."""
    elapsed = max(r["elapsed_s"] for r in ranks)
    steps = options["steps"]
    samples = sum(r["samples"] for r in ranks)
    tokens = sum(r["tokens"] for r in ranks)
    per_step = [max(times) for times in zip(*(r["step_s"] for r in ranks), strict=True)]
    row: dict[str, Any] = {
        "stage": stage,
        "workers": workers,
        "threads_per_worker": ranks[0]["threads"],
        "setup_s": round(max(r["setup_s"] for r in ranks), 1),
        "precision": ranks[0]["precision"],
        "device": ranks[0]["device"],
        "samples": samples,
        "samples_per_s": samples / elapsed,
        "tokens_per_s": tokens / elapsed,
        "mean_padded_length": tokens / samples,
        "step_ms_mean": 1000 * elapsed / steps,
        "step_ms_median": 1000 * statistics.median(per_step),
        "peak_mb_per_worker": [round(r["peak_mb"], 1) for r in ranks],
        "train_loss": statistics.fmean(r["train_loss"] for r in ranks),
        "params_total": ranks[0]["params_total"],
        "params_non_embedding": ranks[0]["params_non_embedding"],
    }
    if not options["gpu"]:
        # Peak RSS includes ~hundreds of MB of imported libraries; the part above that is what
        # the data, model, engine and training steps added.
        row["peak_above_imports_mb_per_worker"] = [
            round(r["peak_mb"] - r["baseline_rss_mb"], 1) for r in ranks
        ]
        row["rss_after_timed_steps_mb_per_worker"] = [round(r["rss_end_mb"], 1) for r in ranks]
    else:
        # 6 x params x tokens: forward + backward matmul FLOPs (attention scores and embedding
        # lookups left out), per GPU, against the GPU's dense bf16 peak.
        flops = 6 * row["params_non_embedding"] * row["tokens_per_s"] / workers
        row["mfu"] = flops / (options["peak_tflops"] * 1e12)
    return row


def add_ratios(rows: list[dict[str, Any]]) -> str:
    """Set each row's throughput ratio to the stage-0 / 1-worker row; returns the baseline's name."""
    measured = [r for r in rows if "error" not in r]
    if not measured:
        return "none (every configuration failed)"
    baseline = next((r for r in measured if r["stage"] == 0 and r["workers"] == 1), measured[0])
    for row in measured:
        row["ratio_vs_baseline"] = row["samples_per_s"] / baseline["samples_per_s"]
    return f"stage {baseline['stage']}, {baseline['workers']} worker(s)"


def format_table(rows: list[dict[str, Any]], gpu: bool) -> str:
    """A Markdown table, so the output can be pasted into benchmarks/README.md as is."""
    memory = "peak GPU mem MB/worker (max)" if gpu else "peak RSS MB/worker (max)"
    header = ["ZeRO stage", "workers", "threads/worker", "samples/s", "ratio vs baseline"]
    header += ["step ms (mean)", "step ms (median)", memory]
    header += ["MFU (approx.)"] if gpu else ["above imports MB (max)"]
    header += ["train loss", "device"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    for row in rows:
        if "error" in row:
            cells = [str(row["stage"]), str(row["workers"]), f"failed: {row['error']}"]
            cells += [""] * (len(header) - len(cells))
        else:
            cells = [
                str(row["stage"]),
                str(row["workers"]),
                str(row["threads_per_worker"]),
                f"{row['samples_per_s']:.2f}",
                f"{row['ratio_vs_baseline']:.2f}x",
                f"{row['step_ms_mean']:.0f}",
                f"{row['step_ms_median']:.0f}",
                f"{max(row['peak_mb_per_worker']):.0f}",
                f"{100 * row['mfu']:.2f} %" if gpu else f"{max(row['peak_above_imports_mb_per_worker']):.0f}",
                f"{row['train_loss']:.4f}",
                f"{row['device']} {row['precision']}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _machine(gpu: bool) -> str:
    cores = len(os.sched_getaffinity(0))
    cpu = platform.processor() or platform.machine()
    try:
        names = [
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")
        ]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    except OSError:
        pass
    text = f"{cores} CPU cores ({cpu})"
    if gpu:
        import torch

        text += f", GPU {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return text


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 0,2,3, got {text!r}"
        ) from err


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Samples/s and peak memory per worker of the training step, DeepSpeed ZeRO "
        "stages x worker counts, side by side in one run (no Ray)."
    )
    parser.add_argument("--stages", type=_int_list, default=[0, 2, 3], help="ZeRO stages (default 0,2,3)")
    parser.add_argument("--workers", type=_int_list, default=[1, 2], help="worker counts (default 1,2)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--batch-size", type=int, default=8, help="micro-batch per worker")
    parser.add_argument("--max-length", type=int, default=64, help="tokenizer truncation length")
    parser.add_argument(
        "--threads-per-worker",
        type=int,
        default=1,
        help="torch threads per worker (default 1: one worker = one core, as one worker = one GPU, "
        "and as the pipeline's TrainConfig.cpus_per_worker=1)",
    )
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker, nccl, bf16 if supported")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=H100_SXM_BF16_TFLOPS,
        help="the GPU's dense bf16 peak, for MFU (default 989 = H100 SXM)",
    )
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="CSV (.gz) with columns text,label")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here as JSON")
    args = parser.parse_args(argv)
    for stage in args.stages:
        if stage not in (0, 1, 2, 3):
            parser.error(f"--stages: ZeRO stage must be 0, 1, 2 or 3, got {stage}")
    if not args.stages or not args.workers or min(args.workers) < 1:
        parser.error("--stages and --workers need at least one value each; worker counts must be >= 1")
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.threads_per_worker < 1:
        parser.error("--steps, --batch-size and --threads-per-worker must be >= 1, --warmup >= 0")
    if not Path(args.data).is_file():
        parser.error(f"--data: {args.data} does not exist (expected AG News as CSV with columns text,label)")
    return args


def _use_venv_ninja() -> None:
    """Put this venv's bin first on PATH, so DeepSpeed JIT-builds with the venv's ninja.

    The pipeline's Ray workers run with the venv's bin on PATH (ninja 1.13 from PyPI); a bare
    ``.venv/bin/python`` would find the system's ninja (1.11 here) instead. The two versions hash
    command lines differently in the shared ``.ninja_log``, so each one sees the other's build of
    the shm comm op as stale and rebuilds it (~40-100 s per configuration on 2 cores).
    """
    venv_bin = Path(sys.executable).parent
    path = os.environ.get("PATH", "")
    if (venv_bin / "ninja").is_file() and not path.startswith(f"{venv_bin}{os.pathsep}"):
        os.environ["PATH"] = f"{venv_bin}{os.pathsep}{path}"


def _check_gpus(workers: list[int]) -> None:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--gpu: torch sees no CUDA device (this torch build or machine has no GPU)")
    if max(workers) > torch.cuda.device_count():
        raise SystemExit(
            f"--gpu --workers {max(workers)} needs {max(workers)} GPUs (one per worker), "
            f"this machine has {torch.cuda.device_count()}; pass --workers 1"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _use_venv_ninja()
    if args.gpu:
        _check_gpus(args.workers)
    from ml.settings import Settings

    cores = len(os.sched_getaffinity(0))
    base_model = Settings().resolved_base_model()
    load_before = os.getloadavg()[0]
    started = dt.datetime.now(dt.UTC)
    rows: list[dict[str, Any]] = []
    for workers in args.workers:
        for stage in args.stages:
            options = {
                "gpu": args.gpu,
                "steps": args.steps,
                "warmup": args.warmup,
                "batch_size": args.batch_size,
                "max_length": args.max_length,
                "threads_per_worker": args.threads_per_worker,
                "seed": args.seed,
                "data": args.data,
                "base_model": base_model,
                "peak_tflops": args.peak_tflops,
            }
            print(f"-- ZeRO stage {stage}, {workers} worker(s) ...", file=sys.stderr, flush=True)
            try:
                row = run_configuration(stage, workers, options)
            except Exception as err:  # one failed configuration must not lose the others' numbers
                print(f"   failed: {err!r}", file=sys.stderr, flush=True)
                row = {"stage": stage, "workers": workers, "error": repr(err).splitlines()[0][:200]}
            else:
                print(
                    f"   {row['samples_per_s']:.2f} samples/s; wall {row['wall_s']} s "
                    f"(setup {row['setup_s']} s)",
                    file=sys.stderr,
                    flush=True,
                )
            rows.append(row)
            if args.json:  # after every configuration: a run stopped by a timeout keeps what it measured
                _write_json(args.json, _meta(args, argv, started, cores, base_model, load_before, rows), rows)
    meta = _meta(args, argv, started, cores, base_model, load_before, rows)
    print(_report(rows, meta, args.gpu, cores))
    if args.json:
        _write_json(args.json, meta, rows)
        print(f"\nJSON written to {args.json}")
    return 1 if any("error" in r for r in rows) else 0


def _write_json(path: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    partial.replace(path)


def _meta(
    args: argparse.Namespace,
    argv: list[str] | None,
    started: dt.datetime,
    cores: int,
    base_model: str,
    load_before: float,
    rows: list[dict[str, Any]],
) -> dict[str, Any]:
    """The run's description; also sets each row's ratio to the baseline (add_ratios)."""
    load_after = os.getloadavg()[0]
    baseline = add_ratios(rows)
    return {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else None,
        "date_utc": started.isoformat(timespec="seconds"),
        "machine": _machine(args.gpu),
        "cpu_cores_available": cores,
        "load_average_1min_before": round(load_before, 2),
        "load_average_1min_after": round(load_after, 2),
        "threads_per_worker": args.threads_per_worker,
        "baseline": baseline,
        "steps": args.steps,
        "warmup": args.warmup,
        "batch_size_per_worker": args.batch_size,
        "max_length": args.max_length,
        "base_model": base_model,
        "data": args.data,
        "peak_tflops": args.peak_tflops if args.gpu else None,
        "gpu_path_tested": False if args.gpu else None,
        "configurations_planned": len(args.stages) * len(args.workers),
    }


def _model_name(path: str) -> str:
    folder = Path(path)
    return folder.parent.name if folder.name == "model" else folder.name  # the packaged model's folder


def _report(rows: list[dict[str, Any]], meta: dict[str, Any], gpu: bool, cores: int) -> str:
    params = next((f" ({r['params_total'] / 1e6:.1f} M params)" for r in rows if "error" not in r), "")
    lines = [
        f"DeepSpeed ZeRO stages, {meta['date_utc']}, {meta['machine']}",
        f"workload: {_model_name(meta['base_model'])}{params} + classification head, AG News, micro-batch "
        f"{meta['batch_size_per_worker']}/worker, max_length {meta['max_length']}, "
        f"{meta['warmup']} warm-up + {meta['steps']} timed steps per configuration; "
        f"ratio vs baseline = {meta['baseline']}",
    ]
    if gpu:
        lines.append(f"MFU = 6 x non-embedding params x tokens/s per GPU / {meta['peak_tflops']:g} TFLOP/s.")
        lines.append(GPU_PATH_NOTE)
    else:
        busy = max(meta["load_average_1min_before"], meta["load_average_1min_after"])
        shared = (
            f"shared with other work (1-min load average {meta['load_average_1min_before']} before, "
            f"{meta['load_average_1min_after']} after, on {cores} cores): timings are noisy"
            if busy > 0.5
            else f"idle at the start (1-min load average {meta['load_average_1min_before']})"
        )
        lines.append(f"CPU numbers, fp32, taken on {cores} CPU cores {shared}.")
    return "\n".join(["", *lines, "", format_table(rows, gpu)])


if __name__ == "__main__":
    raise SystemExit(main())
