"""What Ray Train costs the pipeline's training: ``ml.train`` through Ray Train vs the bare loop.

Both paths train the same rows (a fixed, seeded subset of the real AG News sample) with the same
:class:`ml.train.TrainConfig` (the pipeline's defaults: micro-batch 16, max_length 64, ZeRO
``auto`` resolved as ``run_training`` resolves it, 1 CPU = 1 torch thread per worker), the same
number of workers, epochs and steps per epoch (``ml.train.steps_per_epoch_for``):

- **ray**: the pipeline's own Ray Train path. A private local Ray instance (never the stack's head
  at 127.0.0.1:6379: ``RAY_ADDRESS`` is dropped, ``address="local"``, its own temp dir, no
  dashboard) is started for the run and shut down after it; ``ml.train.make_trainer`` builds the
  ``TorchTrainer`` that ``run_training`` builds, with ``ml.train.train_loop_config``'s loop config,
  checkpoints to a local folder instead of S3. Its workers run ``ml.train.train_loop_per_worker``
  itself (DeepSpeed on Ray's gloo group, validation, a checkpoint and ``ray.train.report`` every
  epoch) through a thin wrapper that swaps two things in the worker process: the shards come from
  a local file instead of S3 (sharded ``rows[rank::world]`` as ``_load_shards`` does), and
  ``_train_one_epoch`` is timed.
- **bare**: N processes spawned with ``torch.multiprocessing`` (as ``zero_stages.py`` does), gloo,
  ``deepspeed.initialize`` with the same ``deepspeed_config``, then the same timed
  ``_train_one_epoch`` on the same shards, epoch after epoch. No validation, no checkpoints.

Timing: **end-to-end** (ray: from ``ray.init`` to ``fit()`` returning; bare: from spawning to the
processes' exit) and the **training loop** (from entering ``_train_one_epoch`` to the last
``engine.step()`` returning, summed over epochs, measured in each worker; the slowest rank
counts). samples/s = all ranks' samples / loop time. The two paths alternate ``--rounds`` times
(ray, bare; bare, ray; ...) so drift of the machine's load weighs on both. Goal: loop time
ray ÷ bare <= 1.15. One JSON line per invocation is appended to ``results/train_overhead.jsonl``.

    .venv/bin/python benchmarks/train_overhead.py --rows 400 --epochs 1 --workers 2 --rounds 2
    .venv/bin/python benchmarks/train_overhead.py --rows 64 --json /tmp/train_overhead.jsonl  # smoke
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import itertools
import json
import os
import random
import shlex
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Only the standard library and light helpers at module level: spawned workers re-import this
# module, and Ray workers unpickle its functions.
from zero_stages import _free_port, _load_rows, _machine, _peak_rss_mb, _StepClock, _use_venv_ninja

from ml.sample_data import AGNEWS_SAMPLE

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_FILE = BENCH_DIR / "results" / "train_overhead.jsonl"
GOAL_RATIO = 1.15  # Ray Train's training-loop time / the bare loop's
PATHS = ("ray", "bare")


# ----------------------------------------------------------------------------------------
# in the workers (both paths)
# ----------------------------------------------------------------------------------------


def _shards(data_file: str, rank: int, world: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """This rank's (train, val) rows from the run's data file, sharded as ml.train._load_shards does."""
    data = json.loads(Path(data_file).read_text())
    train = [(text, int(label)) for text, label in data["train"]]
    val = [(text, int(label)) for text, label in data["val"]]
    return train[rank::world], val[rank::world]


def _timed_epoch(train_one_epoch: Callable[..., Any], epochs: list[dict[str, Any]]) -> Callable[..., Any]:
    """``ml.train._train_one_epoch`` with a clock: entry to the last ``engine.step()``, per epoch."""

    def timed(engine, tokenizer, encoded, config, steps, epoch, device):
        import torch

        clock = _StepClock(engine, device.type == "cuda")
        wall = time.time()
        started = time.perf_counter()
        loss, samples = train_one_epoch(clock, tokenizer, encoded, config, steps, epoch, device)
        ended = clock.step_ends[-1] if clock.step_ends else time.perf_counter()
        marks = [started, *clock.step_ends]
        epochs.append(
            {
                "epoch": epoch,
                "start": wall,
                "end": wall + (ended - started),
                "loop_s": ended - started,
                "step_s": [b - a for a, b in itertools.pairwise(marks)],
                "samples": samples,
                "train_loss": loss,
                "threads": torch.get_num_threads(),
            }
        )
        return loss, samples

    return timed


def _write_record(out_dir: str, path: str, rank: int, entered: float, epochs: list[dict[str, Any]]) -> None:
    record = {
        "path": path,
        "rank": rank,
        "entered": entered,
        "left": time.time(),
        "epochs": epochs,
        "peak_rss_mb": _peak_rss_mb(),
    }
    Path(out_dir, f"{path}-rank{rank}.json").write_text(json.dumps(record))


def ray_train_loop(loop_config: dict[str, Any]) -> None:
    """A Ray Train worker: ``ml.train.train_loop_per_worker`` with local shards and a timed loop."""
    entered = time.time()
    import ray.train

    import ml.train as train

    bench = loop_config["benchmark"]
    epochs: list[dict[str, Any]] = []

    def local_shards(settings, loop_config, rank, world, label_to_id):  # instead of the S3 read
        return _shards(bench["data_file"], rank, world)

    train._load_shards = local_shards
    train._train_one_epoch = _timed_epoch(train._train_one_epoch, epochs)
    train.train_loop_per_worker({k: v for k, v in loop_config.items() if k != "benchmark"})
    _write_record(bench["out_dir"], "ray", ray.train.get_context().get_world_rank(), entered, epochs)


def _bare_worker(rank: int, world: int, port: int, run: dict[str, Any]) -> None:
    """One rank of the bare loop: what train_loop_per_worker does up to and including the epochs'
    ``_train_one_epoch`` calls, on a process group of its own (no Ray)."""
    entered = time.time()
    config_dict = run["config"]
    threads = str(max(1, int(config_dict["cpus_per_worker"])))
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        OMP_NUM_THREADS=threads,  # as Ray sets for a 1-CPU worker
    )
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ml.train import TrainConfig, _train_one_epoch, deepspeed_config, encode_rows, resolve_precision

    if not run["verbose"]:  # what the Ray path's workers print goes to Ray's log files instead
        import logging
        import warnings

        from transformers.utils import logging as hf_logging

        deepspeed.utils.logger.setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning)
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    config = TrainConfig.model_validate(config_dict)
    torch.manual_seed(config.seed + rank)
    torch.set_num_threads(int(threads))
    device = torch.device("cpu")
    precision = resolve_precision(config, False, False)
    labels = list(run["labels"])
    label_to_id = {label: i for i, label in enumerate(labels)}
    train_rows, _ = _shards(run["data_file"], rank, world)
    tokenizer = AutoTokenizer.from_pretrained(config.base_model)
    encoded = encode_rows(tokenizer, train_rows, config.max_length)
    model = AutoModelForSequenceClassification.from_pretrained(
        config.base_model,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id=label_to_id,
        ignore_mismatched_sizes=True,
    )
    steps = run["steps_per_epoch"]
    ds_config = deepspeed_config(config, precision, steps // config.grad_accum_steps)
    deepspeed.init_distributed(dist_backend="gloo")
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    epochs: list[dict[str, Any]] = []
    timed = _timed_epoch(_train_one_epoch, epochs)
    for epoch in range(1, config.epochs + 1):
        timed(engine, tokenizer, encoded, config, steps, epoch, device)
    dist.destroy_process_group()
    _write_record(run["out_dir"], "bare", rank, entered, epochs)


# ----------------------------------------------------------------------------------------
# the driver
# ----------------------------------------------------------------------------------------


def schedule(rounds: int) -> list[tuple[int, str]]:
    """(round, path) in running order: ray, bare; then bare, ray; ... (drift weighs on both)."""
    order: list[tuple[int, str]] = []
    for number in range(1, rounds + 1):
        paths = PATHS if number % 2 else tuple(reversed(PATHS))
        order += [(number, path) for path in paths]
    return order


def summarise_run(ranks: list[dict[str, Any]], started: float, ended: float) -> dict[str, Any]:
    """One table row from every rank's record (``_write_record``); times are ``time.time()`` on
    this machine, ``started``/``ended`` the run's start and end as the driver saw them."""
    loop_s = max(sum(e["loop_s"] for e in r["epochs"]) for r in ranks)
    samples = sum(e["samples"] for r in ranks for e in r["epochs"])
    per_rank = [list(itertools.chain(*(e["step_s"] for e in r["epochs"]))) for r in ranks]
    steps = [max(step) for step in zip(*per_rank, strict=True)]  # the slowest rank per step
    first_step = max(r["epochs"][0]["start"] for r in ranks if r["epochs"])
    last_step = max(r["epochs"][-1]["end"] for r in ranks if r["epochs"])
    return {
        "end_to_end_s": ended - started,
        "to_first_step_s": first_step - started,
        "loop_s": loop_s,
        "after_loop_s": ended - last_step,
        # of which in the workers (ray: validation, checkpoint, report); the rest is their teardown
        "after_loop_in_workers_s": max(r["left"] for r in ranks) - last_step,
        "samples": samples,
        "steps_per_rank": len(steps),
        "samples_per_s": samples / loop_s if loop_s > 0 else float("nan"),
        "step_ms_median": 1000 * statistics.median(steps) if steps else float("nan"),
        "train_loss": statistics.fmean(e["train_loss"] for r in ranks for e in r["epochs"][-1:]),
        "threads_per_worker": ranks[0]["epochs"][0]["threads"] if ranks[0]["epochs"] else None,
        "peak_rss_mb_per_worker": [round(r["peak_rss_mb"], 1) for r in ranks],
        "worker_entered_s": max(r["entered"] for r in ranks) - started,
    }


def compare(runs: list[dict[str, Any]], goal: float = GOAL_RATIO) -> dict[str, Any]:
    """Ray ÷ bare for the loop and the end-to-end time: of the means over rounds, and per round."""
    good = [r for r in runs if "error" not in r]
    by_path = {path: [r for r in good if r["path"] == path] for path in PATHS}
    summary: dict[str, Any] = {"goal_loop_ratio": goal}
    if not all(by_path.values()):
        summary["verdict"] = "no result: a path has no successful run"
        return summary
    for path, rows in by_path.items():
        summary[path] = {
            "runs": len(rows),
            "loop_s_mean": statistics.fmean(r["loop_s"] for r in rows),
            "end_to_end_s_mean": statistics.fmean(r["end_to_end_s"] for r in rows),
            "samples_per_s_mean": statistics.fmean(r["samples_per_s"] for r in rows),
        }
    ray, bare = summary["ray"], summary["bare"]
    summary["loop_ratio"] = ray["loop_s_mean"] / bare["loop_s_mean"]
    summary["end_to_end_ratio"] = ray["end_to_end_s_mean"] / bare["end_to_end_s_mean"]
    rounds = sorted({r["round"] for r in good})
    per_round = []
    for number in rounds:
        pair = {r["path"]: r for r in good if r["round"] == number}
        if set(pair) == set(PATHS):
            per_round.append(
                {
                    "round": number,
                    "loop_ratio": pair["ray"]["loop_s"] / pair["bare"]["loop_s"],
                    "end_to_end_ratio": pair["ray"]["end_to_end_s"] / pair["bare"]["end_to_end_s"],
                }
            )
    summary["per_round"] = per_round
    same_work = len({(r["samples"], r["steps_per_rank"]) for r in good}) == 1
    summary["same_work"] = same_work
    met = summary["loop_ratio"] <= goal
    summary["goal_met"] = met
    summary["verdict"] = (
        f"loop time ray/bare {summary['loop_ratio']:.3f}: goal <= {goal:.2f} {'met' if met else 'MISSED'}"
        + ("" if same_work else " (the paths did not do the same work: compare samples and steps)")
    )
    return summary


def _collect(out_dir: Path, path: str, world: int) -> list[dict[str, Any]]:
    ranks = [json.loads(p.read_text()) for p in sorted(out_dir.glob(f"{path}-rank*.json"))]
    if len(ranks) != world:
        raise RuntimeError(f"{path}: {len(ranks)} of {world} workers wrote a record")
    for p in out_dir.glob(f"{path}-rank*.json"):
        p.unlink()
    return ranks


def run_ray(run: dict[str, Any]) -> dict[str, Any]:
    """One run of the pipeline's Ray Train path on a private, fresh local Ray instance."""
    import ray

    from ml.settings import Settings
    from ml.train import TrainConfig, check_config, make_trainer, train_loop_config

    config = TrainConfig.model_validate(run["config"])
    settings = Settings()
    temp_dir = tempfile.mkdtemp(prefix="ctro-", dir="/tmp")  # short: Ray's socket paths live in it
    storage = Path(run["out_dir"], "ray-results")
    timings: dict[str, float] = {}
    # On Linux Ray swaps a node IP of 127.0.0.1 for the machine's address and binds that or every
    # interface; this switch keeps the private instance on loopback (as scripts/stack.py does).
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    started = time.time()
    try:
        ray.init(
            address="local",
            num_cpus=int(config.num_workers * config.cpus_per_worker + 0.999),
            include_dashboard=False,
            _temp_dir=temp_dir,
            _node_ip_address="127.0.0.1",
            log_to_driver=run["verbose"],
            configure_logging=run["verbose"],
        )
        timings["ray_init_s"] = time.time() - started
        base_model = check_config(config, tuple(run["labels"]), ray.cluster_resources())
        loop_config = train_loop_config(
            config,
            settings,
            tuple(run["labels"]),
            "benchmark/train",
            "benchmark/val",
            base_model,
            None,
            run["steps_per_epoch"],
        ) | {"benchmark": {"data_file": run["data_file"], "out_dir": run["out_dir"]}}
        trainer = make_trainer(config, loop_config, str(storage), None, train_loop=ray_train_loop)
        fit_started = time.time()
        result = trainer.fit()
        ended = time.time()
        timings["fit_s"] = ended - fit_started
        if getattr(result, "error", None):
            raise RuntimeError(f"Ray Train run failed: {result.error!r}")
    finally:
        shutdown_started = time.time()
        ray.shutdown()
        timings["ray_shutdown_s"] = time.time() - shutdown_started
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(storage, ignore_errors=True)
    ranks = _collect(Path(run["out_dir"]), "ray", config.num_workers)
    return summarise_run(ranks, started, ended) | timings


def run_bare(run: dict[str, Any]) -> dict[str, Any]:
    """One run of the bare loop: fresh processes, gloo, DeepSpeed, ``_train_one_epoch``."""
    import torch.multiprocessing as mp

    world = run["config"]["num_workers"]
    started = time.time()
    mp.spawn(_bare_worker, args=(world, _free_port(), run), nprocs=world, join=True)
    ended = time.time()
    ranks = _collect(Path(run["out_dir"]), "bare", world)
    return summarise_run(ranks, started, ended)


def pick_rows(
    data: str, rows: int, val_rows: int, seed: int
) -> tuple[list[tuple[str, int]], list[tuple[str, int]], list[str]]:
    """A fixed, seeded subset of the CSV: ``rows`` training rows and ``val_rows`` other rows."""
    every, labels = _load_rows(data, 0, 1)
    if rows + val_rows > len(every):
        raise SystemExit(f"--rows + --val-rows = {rows + val_rows}, but {data} has {len(every)} rows")
    picked = random.Random(seed).sample(every, rows + val_rows)
    return picked[:rows], picked[rows:], labels


def format_table(runs: list[dict[str, Any]]) -> str:
    header = [
        "round",
        "path",
        "end-to-end s",
        "workers entered s",
        "to first step s",
        "loop s",
        "after loop s",
        "samples",
        "samples/s",
        "step ms (median)",
        "train loss",
        "peak RSS MB/worker (max)",
    ]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if h != "path" else "---" for h in header) + "|",
    ]
    for r in runs:
        if "error" in r:
            cells = [str(r["round"]), r["path"], f"failed: {r['error']}"] + [""] * (len(header) - 3)
        else:
            cells = [
                str(r["round"]),
                r["path"],
                f"{r['end_to_end_s']:.1f}",
                f"{r['worker_entered_s']:.1f}",
                f"{r['to_first_step_s']:.1f}",
                f"{r['loop_s']:.1f}",
                f"{r['after_loop_s']:.1f}",
                str(r["samples"]),
                f"{r['samples_per_s']:.2f}",
                f"{r['step_ms_median']:.0f}",
                f"{r['train_loss']:.4f}",
                f"{max(r['peak_rss_mb_per_worker']):.0f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_summary(summary: dict[str, Any]) -> str:
    if "loop_ratio" not in summary:
        return summary["verdict"]
    rounds = ", ".join(
        f"round {p['round']}: {p['loop_ratio']:.3f} / {p['end_to_end_ratio']:.3f}"
        for p in summary["per_round"]
    )
    ray, bare = summary["ray"], summary["bare"]
    return "\n".join(
        [
            f"means over rounds: ray loop {ray['loop_s_mean']:.1f} s "
            f"({ray['samples_per_s_mean']:.2f} samples/s), bare loop {bare['loop_s_mean']:.1f} s "
            f"({bare['samples_per_s_mean']:.2f} samples/s); "
            f"end to end ray {ray['end_to_end_s_mean']:.1f} s, bare {bare['end_to_end_s_mean']:.1f} s",
            f"ratio ray/bare, training loop: {summary['loop_ratio']:.3f} "
            f"(goal <= {summary['goal_loop_ratio']:.2f})",
            f"ratio ray/bare, end to end:    {summary['end_to_end_ratio']:.3f} "
            "(includes Ray start-up; no goal)",
            f"per round (loop / end to end): {rounds}",
            summary["verdict"],
        ]
    )


def _versions() -> dict[str, str]:
    found = {}
    for name in ("torch", "ray", "deepspeed", "transformers"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Training time of ml.train through Ray Train vs the bare _train_one_epoch loop "
        "(same rows, workers, epochs and TrainConfig); goal: loop time ratio <= 1.15."
    )
    parser.add_argument("--rows", type=int, default=400, help="training rows (a seeded subset of --data)")
    parser.add_argument(
        "--val-rows",
        type=int,
        default=0,
        help="validation rows for the ray path's per-epoch evaluation (default 0: the bare loop has none; "
        "its time is in 'after loop' either way, not in the loop time)",
    )
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="ray+bare pairs, alternating the order")
    parser.add_argument("--batch-size", type=int, default=None, help="micro-batch (default: TrainConfig's)")
    parser.add_argument("--max-length", type=int, default=None, help="default: TrainConfig's")
    parser.add_argument("--zero-stage", default="auto", help="0-3 or auto (default, as the pipeline)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="1 CPU = 1 torch thread")
    parser.add_argument("--data", default=str(AGNEWS_SAMPLE), help="CSV (.gz) with columns text,label")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--json", type=Path, default=RESULTS_FILE, help="append the record to this JSONL file"
    )
    parser.add_argument("--note", default="", help="free text stored with the record")
    parser.add_argument("--verbose", action="store_true", help="show the Ray workers' logs")
    args = parser.parse_args(argv)
    if min(args.rows, args.epochs, args.workers, args.rounds) < 1 or args.val_rows < 0:
        parser.error("--rows, --epochs, --workers and --rounds must be >= 1, --val-rows >= 0")
    if args.rows < args.workers:
        parser.error("--rows must be at least --workers (every worker needs a shard)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.pop("RAY_ADDRESS", None)  # never the stack's Ray head
    _use_venv_ninja()
    # Ray workers unpickle ray_train_loop, which needs this folder's modules (zero_stages).
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH_DIR), os.environ.get("PYTHONPATH")]))
    from ml.settings import Settings
    from ml.train import TrainConfig, count_parameters, resolve_zero_stage, steps_per_epoch_for

    base_model = Settings().resolved_base_model()
    overrides = {k: v for k, v in {"batch_size": args.batch_size, "max_length": args.max_length}.items() if v}
    config = TrainConfig(
        snapshot_id="benchmark",
        run_name="train-overhead",
        epochs=args.epochs,
        num_workers=args.workers,
        cpus_per_worker=args.cpus_per_worker,
        zero_stage=args.zero_stage,
        seed=args.seed,
        # Validation decides early stopping: never stop before the bare loop does (it never stops).
        early_stopping_patience=max(2, args.epochs),
        **overrides,
    )
    parameters = count_parameters(base_model)
    config = config.model_copy(
        update={"base_model": base_model, "zero_stage": resolve_zero_stage(config, parameters)}
    )
    train_rows, val_rows, labels = pick_rows(args.data, args.rows, args.val_rows, args.seed)
    steps = steps_per_epoch_for(config, len(train_rows))
    out_dir = Path(tempfile.mkdtemp(prefix="train-overhead-"))
    data_file = out_dir / "data.json"
    data_file.write_text(json.dumps({"train": train_rows, "val": val_rows}))
    run = {
        "config": config.model_dump(),
        "labels": labels,
        "steps_per_epoch": steps,
        "data_file": str(data_file),
        "out_dir": str(out_dir),
        "verbose": args.verbose,
    }
    cores = len(os.sched_getaffinity(0))
    started = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    print(
        f"train_overhead: {len(train_rows)} rows, {args.workers} workers x {config.cpus_per_worker:g} CPU, "
        f"{args.epochs} epoch(s) x {steps} steps of {config.batch_size}/worker, max_length "
        f"{config.max_length}, ZeRO {config.zero_stage} (requested {args.zero_stage}); "
        f"{args.rounds} round(s); load average {load_before[0]:.2f} on {cores} cores",
        file=sys.stderr,
        flush=True,
    )
    runs: list[dict[str, Any]] = []
    try:
        for number, path in schedule(args.rounds):
            print(f"-- round {number}: {path} ...", file=sys.stderr, flush=True)
            load = os.getloadavg()[0]
            try:
                row = run_ray(run) if path == "ray" else run_bare(run)
            except Exception as err:  # keep the other runs' numbers
                print(f"   failed: {err!r}", file=sys.stderr, flush=True)
                row = {"error": repr(err).splitlines()[0][:300]}
            else:
                print(
                    f"   loop {row['loop_s']:.1f} s ({row['samples_per_s']:.2f} samples/s), "
                    f"end to end {row['end_to_end_s']:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
            runs.append({"round": number, "path": path, "load_average_1min_at_start": round(load, 2)} | row)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    load_after = os.getloadavg()
    summary = compare(runs)
    record = {
        "benchmark": "train_overhead",
        "command": shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(argv),
        "date_utc": started.isoformat(timespec="seconds"),
        "wall_s": round((dt.datetime.now(dt.UTC) - started).total_seconds(), 1),
        "host": socket.gethostname(),
        "machine": _machine(False),
        "cpu_count": os.cpu_count(),
        "cpu_cores_available": cores,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "versions": _versions(),
        "note": args.note,
        "data": args.data,
        "rows": len(train_rows),
        "val_rows": len(val_rows),
        "steps_per_epoch": steps,
        "model_parameters": parameters,
        "config": {k: v for k, v in config.model_dump().items() if k not in {"trigger_tags"}},
        "runs": runs,
        "summary": summary,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    with args.json.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(
        f"\nRay Train vs the bare loop, {record['date_utc']}, {record['machine']}; load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after\n\n{format_table(runs)}\n\n"
        f"{format_summary(summary)}\n\nrecord appended to {args.json}"
    )
    if any("error" in r for r in runs) or "loop_ratio" not in summary:
        return 1
    return 0 if summary["goal_met"] else 3


if __name__ == "__main__":
    raise SystemExit(main())
