"""Fine-tuning with Ray Train (``TorchTrainer``) and DeepSpeed ZeRO, as a Ray job entrypoint.

``python -m ml.train --config '<TrainConfig JSON>' --result-key <s3 key>`` runs on the Ray
cluster (submitted by the ``train`` task through the Jobs API):

1. checks the configuration against the cluster before starting anything (base model path,
   ZeRO stage, workers that cannot be placed, labels the model cannot map);
2. writes (or reuses) the snapshot's stratified train/val/test splits;
3. runs :func:`train_loop_per_worker` on ``num_workers`` workers: each reads its shard, wraps
   the model in a DeepSpeed engine (ZeRO stage 0-3; bf16/fp16 on GPU, fp32 on CPU) on the
   process group Ray set up, evaluates macro-F1 on the validation split every epoch, stops
   early, and checkpoints every epoch from all ranks (ZeRO shards) to S3. A worker failure
   restarts the group from the latest checkpoint (``FailureConfig``);
4. consolidates the best checkpoint into a plain safetensors export (weights, tokenizer, label
   map, training config), logs it to MLflow as a pyfunc model (no pickles), and writes a result
   JSON for the downstream tasks.

The worker loop also runs without Ray (``--local``, under ``torchrun`` or single process) for
quick GPU measurements.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ml.settings import REPO_ROOT, Settings

log = logging.getLogger(__name__)

CHECKPOINT_TAG = "zero"
STATE_FILE = "train_state.json"
INJECTED_FAILURE = "injected failure (TrainConfig.fail_after_epoch) to test resume-from-checkpoint"
# The only non-tensor types DeepSpeed 0.19 pickles into its checkpoints (the ZeRO 1-3 optimizer
# states, the fp16/bf16 optimizers): found with torch.serialization.get_unsafe_globals_in_checkpoint
# on checkpoints of every stage. Everything else in them is tensors, numbers, strings, lists, dicts.
DEEPSPEED_CHECKPOINT_TYPES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


class TrainConfigError(ValueError):
    """A training configuration that cannot work; raised before anything is started."""


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds pickled objects beyond tensors and DEEPSPEED_CHECKPOINT_TYPES."""


class TrainConfig(BaseModel):
    """Everything a training run needs; serialised as JSON into the Ray job's entrypoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    snapshot_id: str
    run_name: str = Field(description="Stable name: Ray Train run dir and MLflow run name.")
    base_model: str = ""
    epochs: int = Field(3, ge=0, le=100)
    learning_rate: float = Field(1e-4, gt=0, le=1)
    batch_size: int = Field(16, ge=1, description="Micro-batch per worker.")
    grad_accum_steps: int = Field(1, ge=1)
    max_length: int = Field(64, ge=8, le=512)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    zero_stage: int | Literal["auto"] = Field(
        "auto",
        description="DeepSpeed ZeRO stage 0-3, or auto: 2 on GPUs for models big enough to gain, else 0.",
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    test_fraction: float = Field(0.1, gt=0, lt=0.5)
    early_stopping_patience: int = Field(2, ge=1)
    seed: int = 42
    max_rows: int | None = Field(None, ge=10, description="Cap on rows used (tests, dry runs).")
    data_window_days: float | None = Field(
        30, ge=0, description="Also train on earlier snapshots this many days back (None = all, 0 = none)."
    )
    init_from: Literal["base", "champion"] = Field(
        "base",
        description="Weights to start from: the base model, or the registered champion (warm start: "
        "continue from what is served, on the new data and the data window).",
    )
    max_failures: int = Field(2, ge=0)
    fail_after_epoch: int | None = Field(None, ge=1, description="Test hook: one worker dies once.")
    trigger_reason: str = "schedule"
    trigger_tags: dict[str, str] = Field(
        default_factory=dict, description="Why the run was triggered (e.g. drift_score, drift_report)."
    )
    dag_run_id: str = ""
    mlflow_run_id: str | None = None

    @field_validator("zero_stage", mode="before")
    @classmethod
    def _zero_stage(cls, value: Any) -> int | str:
        if value == "auto":
            return value
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, bool) or value not in (0, 1, 2, 3):
            raise ValueError(
                f"DeepSpeed ZeRO stage must be 0, 1, 2, 3 (0 = plain data parallel) or 'auto', got {value!r}"
            )
        return value


# Below this many parameters ZeRO's sharding saves too little to pay for its extra communication:
# a 100 M-parameter model's whole training state (fp32 master weights + Adam moments + bf16
# copies, ~16 bytes a parameter) is ~1.6 GB, a rounding error on a training GPU.
ZERO_AUTO_MIN_PARAMS = 100_000_000


def resolve_zero_stage(config: TrainConfig, parameters: int) -> int:
    """The ZeRO stage to run: an explicit stage as given; ``auto`` picks 0 on CPU workers (sharding
    only adds gloo traffic there: -25 % throughput and no memory saved for MiniLM, see
    docs/benchmarks.md) and for models under ZERO_AUTO_MIN_PARAMS, else 2 (optimizer state
    and gradients sharded across GPUs)."""
    if config.zero_stage != "auto":
        return int(config.zero_stage)
    if not config.use_gpu or parameters < ZERO_AUTO_MIN_PARAMS:
        return 0
    return 2


def count_parameters(model_dir: str | Path) -> int:
    """Parameters of the model in ``model_dir``, counted on the meta device (no weights loaded)."""
    import torch
    from transformers import AutoConfig, AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


def resolve_precision(config: TrainConfig, cuda: bool, bf16_supported: bool) -> str:
    if not cuda:
        return "fp32"
    if config.precision != "auto":
        return config.precision
    return "bf16" if bf16_supported else "fp16"


def deepspeed_config(config: TrainConfig, precision: str, steps_per_epoch: int) -> dict[str, Any]:
    """The DeepSpeed config: ZeRO stage, precision, accumulation, warm-up + linear decay."""
    if config.zero_stage == "auto":
        raise ValueError("resolve the ZeRO stage first (resolve_zero_stage): the config says 'auto'")
    total = max(1, steps_per_epoch * max(config.epochs, 1))
    return {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": config.grad_accum_steps,
        "gradient_clipping": 1.0,
        # torch_adam: DeepSpeed's fused Adam would be JIT-compiled on CPU (~65 s) for no gain.
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": config.learning_rate,
                "weight_decay": config.weight_decay,
                "torch_adam": True,
            },
        },
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": config.learning_rate,
                "warmup_num_steps": max(1, int(total * config.warmup_ratio)),
                "warmup_type": "linear",
                "total_num_steps": total,
            },
        },
        "zero_optimization": {"stage": config.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 12},
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }


# ----------------------------------------------------------------------------------------
# the worker loop
# ----------------------------------------------------------------------------------------


class _Session:
    """What the loop needs from its runner: rank, checkpoints, reporting."""

    rank: int
    world_size: int

    def latest_checkpoint(self) -> Path | None:
        raise NotImplementedError

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        raise NotImplementedError

    def wait_for_reported_checkpoints(self) -> None:
        """Block until every report() so far has been processed (checkpoints registered)."""


class _RaySession(_Session):
    def __init__(self) -> None:
        import ray.train

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self._checkpoint = ray.train.get_checkpoint()
        self._tmp = Path(tempfile.mkdtemp(prefix="ct-restore-"))

    def latest_checkpoint(self) -> Path | None:
        if self._checkpoint is None:
            return None
        return Path(self._checkpoint.to_directory(str(self._tmp)))

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    def wait_for_reported_checkpoints(self) -> None:
        import ray.train

        ray.train.get_all_reported_checkpoints(timeout_s=600)


class _LocalSession(_Session):
    """torchrun / single-process runner: checkpoints in a local folder."""

    def __init__(self, checkpoint_root: Path) -> None:
        import torch.distributed as dist

        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.root = checkpoint_root
        self.reports: list[dict[str, Any]] = []

    def latest_checkpoint(self) -> Path | None:
        done = sorted(self.root.glob("epoch-*/" + STATE_FILE))
        return done[-1].parent if done else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        self.reports.append(metrics)
        if self.rank == 0:
            log.info("epoch metrics: %s", json.dumps(metrics))


def train_loop_per_worker(loop_config: dict[str, Any], session: _Session | None = None) -> None:
    """One worker: shard, tokenize, DeepSpeed-train, evaluate, checkpoint, maybe stop early."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    config = TrainConfig.model_validate(loop_config["config"])
    settings = Settings(**loop_config["settings"])
    session = session or _RaySession()
    rank, world = session.rank, session.world_size
    torch.manual_seed(config.seed + rank)
    cuda = config.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(max(1, int(config.cpus_per_worker)))
    precision = resolve_precision(config, cuda, cuda and torch.cuda.is_bf16_supported())

    labels = list(loop_config["labels"])
    label_to_id = {label: i for i, label in enumerate(labels)}
    train_rows, val_rows = _load_shards(settings, loop_config, rank, world, label_to_id)
    start_from = _start_weights(settings, loop_config)
    tokenizer = AutoTokenizer.from_pretrained(start_from)
    train_encoded = encode_rows(tokenizer, train_rows, config.max_length)
    model = AutoModelForSequenceClassification.from_pretrained(
        start_from,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id=label_to_id,
        ignore_mismatched_sizes=True,
    )
    # Every rank steps the same number of times per epoch (DeepSpeed needs them in lockstep).
    steps_per_epoch = loop_config["steps_per_epoch"]
    ds_config = deepspeed_config(config, precision, steps_per_epoch // config.grad_accum_steps)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)

    state = {"epoch": 0, "best_val_macro_f1": -1.0, "epochs_without_improvement": 0, "history": []}
    restored = session.latest_checkpoint()
    if restored is not None:
        state = restore_checkpoint(engine, restored)
        if rank == 0:
            log.info("resumed from checkpoint after epoch %d", state["epoch"])

    mlflow_logger = _MlflowEpochLogger(settings, config.mlflow_run_id) if rank == 0 else None
    if mlflow_logger is not None and restored is not None:
        mlflow_logger.backfill(state["history"])
    for epoch in range(state["epoch"] + 1, config.epochs + 1):
        started = time.perf_counter()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        train_loss, samples = _train_one_epoch(
            engine, tokenizer, train_encoded, config, steps_per_epoch, epoch, device
        )
        elapsed = time.perf_counter() - started
        val_pred, val_true = _predict(engine, tokenizer, val_rows, config, device)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (val_pred, val_true, train_loss, samples))
        metrics = _epoch_metrics(gathered, labels, epoch, elapsed, cuda)
        improved = metrics["val_macro_f1"] > state["best_val_macro_f1"] + 1e-6
        state["best_val_macro_f1"] = max(state["best_val_macro_f1"], metrics["val_macro_f1"])
        state["epochs_without_improvement"] = 0 if improved else state["epochs_without_improvement"] + 1
        state["epoch"] = epoch
        state["history"].append(metrics)
        stop = state["epochs_without_improvement"] >= config.early_stopping_patience
        metrics["early_stop"] = stop

        if mlflow_logger is not None:
            # Before report(): a failing peer makes Ray tear this worker down right after it.
            mlflow_logger.log(metrics, epoch)
        _checkpoint_and_report(engine, tokenizer, model, state, metrics, session)
        if config.fail_after_epoch == epoch and restored is None:
            # Die only once every rank reported and Ray Train registered this epoch's checkpoint,
            # so the test exercises resume-from-checkpoint, not a lost checkpoint.
            dist.barrier()
            if rank == world - 1:
                session.wait_for_reported_checkpoints()
                raise RuntimeError(INJECTED_FAILURE)
        if stop:
            if rank == 0:
                log.info(
                    "early stopping after epoch %d: val macro-F1 did not improve for %d epochs",
                    epoch,
                    config.early_stopping_patience,
                )
            break
    if config.epochs == 0 or state["epoch"] == 0:
        # Nothing trained (epochs=0): still report a checkpoint so the run has a model to export.
        untrained = {"epoch": 0, "val_macro_f1": -1.0, "early_stop": False}
        _checkpoint_and_report(engine, tokenizer, model, state, untrained, session)


def _start_weights(settings: Settings, loop_config: dict[str, Any]) -> str:
    """The model folder this worker starts from: the base model, or (warm start) the champion's
    export, downloaded from MLflow by each worker (workers may sit on other nodes than the driver).
    Safetensors only: the export holds no pickles (export_checkpoint refuses them)."""
    warm = loop_config.get("init_model")
    if not warm:
        return loop_config["base_model"]
    from mlflow import MlflowClient

    from ml.registry import download_export

    client = MlflowClient(settings.mlflow_tracking_uri)
    return str(download_export(client, warm["model_root"], Path(tempfile.mkdtemp(prefix="ct-init-"))))


@contextmanager
def tensors_only_loading() -> Iterator[None]:
    """Every ``torch.load`` inside, DeepSpeed's own included, loads tensors and allow-listed types only.

    Checkpoints live in the data bucket, which other parties write to: unpickling whatever a
    checkpoint file holds would run their code. DeepSpeed's checkpoint engine and ``zero_to_fp32``
    call ``torch.load(weights_only=False)``; torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` overrides
    that argument on every call, and ``safe_globals`` admits DeepSpeed's few non-tensor types.
    """
    import pickle

    import torch

    allowed = [_import_type(name) for name in DEEPSPEED_CHECKPOINT_TYPES]
    previous = os.environ.get(_FORCE_WEIGHTS_ONLY)
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"refused to load a checkpoint: it holds pickled objects that are not tensors or one of "
            f"{DEEPSPEED_CHECKPOINT_TYPES} (tampered with, or written by another DeepSpeed version): {err}"
        ) from err
    finally:
        if previous is None:
            os.environ.pop(_FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[_FORCE_WEIGHTS_ONLY] = previous


def _import_type(dotted: str) -> type:
    import importlib

    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def restore_checkpoint(engine, directory: Path) -> dict[str, Any]:
    """Load this rank's ZeRO shards into ``engine`` (tensors only) and return the saved loop state."""
    with tensors_only_loading():
        load_path, _ = engine.load_checkpoint(str(directory), tag=CHECKPOINT_TAG)
    if load_path is None:
        raise FileNotFoundError(f"{directory} holds no DeepSpeed checkpoint tagged {CHECKPOINT_TAG!r}")
    return json.loads((directory / STATE_FILE).read_text())


def _checkpoint_and_report(
    engine, tokenizer, model, state: dict[str, Any], metrics, session: _Session
) -> None:
    """Every rank writes its ZeRO shard; rank 0 adds the loop state, tokenizer and model config."""
    with tempfile.TemporaryDirectory(prefix="ct-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=CHECKPOINT_TAG)
        if session.rank == 0:
            (Path(tmp) / STATE_FILE).write_text(json.dumps(state))
            tokenizer.save_pretrained(tmp)
            model.config.save_pretrained(tmp)
        session.report(metrics, Path(tmp))


def _load_shards(
    settings: Settings, loop_config: dict[str, Any], rank: int, world: int, label_to_id: dict[str, int]
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    from ml.data import read_parquet
    from ml.storage import ObjectStore

    store = ObjectStore(settings)
    shards = []
    for key in (loop_config["train_key"], loop_config["val_key"]):
        frame = read_parquet(store, key)
        rows = list(zip(frame["text"], frame["label"].map(label_to_id), strict=True))
        shards.append(rows[rank::world])
    return shards[0], shards[1]


BUCKET_BATCHES = 50  # batches per length-sorting window (_batches)


def encode_rows(
    tokenizer, rows: list[tuple[str, int]], max_length: int
) -> list[tuple[dict[str, list[int]], int]]:
    """Tokenize every row once (truncated, unpadded): (features, label id) per row."""
    encoded = tokenizer([text for text, _ in rows], truncation=True, max_length=max_length)
    keys = list(encoded.keys())
    return [({k: encoded[k][i] for k in keys}, label) for i, (_, label) in enumerate(rows)]


def _batches(
    rows: list, batch_size: int, steps: int, epoch: int, seed: int, lengths: list[int] | None = None
):
    """``steps`` micro-batches of ``batch_size`` rows for this epoch (the same count on every rank).

    Rows are shuffled per epoch and wrap around. With ``lengths``, each window of BUCKET_BATCHES
    batches is sorted by length before it is cut, and the batches are shuffled again: a batch
    pads to the longest of similar texts, not of 16 random ones (on AG News 50 instead of 64
    tokens a text, about 20 % less compute for the same rows and order statistics)."""
    import random

    rng = random.Random(seed * 1000 + epoch)
    order = list(range(len(rows)))
    rng.shuffle(order)
    wanted = steps * batch_size
    order = [order[i % len(order)] for i in range(wanted)]
    if lengths is None:
        cut = [order[i : i + batch_size] for i in range(0, wanted, batch_size)]
    else:
        cut = []
        window = batch_size * BUCKET_BATCHES
        for start in range(0, wanted, window):
            chunk = sorted(order[start : start + window], key=lengths.__getitem__)
            cut += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        rng.shuffle(cut)
    for idx in cut:
        yield [rows[i] for i in idx]


def _train_one_epoch(engine, tokenizer, encoded, config: TrainConfig, steps: int, epoch: int, device):
    """One epoch over ``encoded`` rows (from :func:`encode_rows`), length-bucketed, padded per batch."""
    import torch

    engine.train()
    total_loss, samples = 0.0, 0
    lengths = [len(features["input_ids"]) for features, _ in encoded]
    for batch in _batches(encoded, config.batch_size, steps, epoch, config.seed, lengths):
        features, targets = zip(*batch, strict=True)
        inputs = tokenizer.pad(list(features), return_tensors="pt").to(device)
        out = engine(**inputs, labels=torch.tensor(targets, device=device))
        engine.backward(out.loss)
        engine.step()
        total_loss += float(out.loss.detach()) * len(batch)
        samples += len(batch)
    return total_loss / max(samples, 1), samples


def _predict(engine, tokenizer, rows, config: TrainConfig, device) -> tuple[list[int], list[int]]:
    import torch

    engine.eval()
    predictions: list[int] = []
    with torch.inference_mode():
        for start in range(0, len(rows), 64):
            batch = rows[start : start + 64]
            encoded = tokenizer(
                [t for t, _ in batch],
                padding=True,
                truncation=True,
                max_length=config.max_length,
                return_tensors="pt",
            ).to(device)
            predictions += engine(**encoded).logits.argmax(-1).tolist()
    return predictions, [y for _, y in rows]


def _epoch_metrics(gathered, labels: list[str], epoch: int, seconds: float, cuda: bool) -> dict[str, Any]:
    import resource

    import torch
    from sklearn.metrics import accuracy_score, f1_score

    y_pred = [p for g in gathered for p in g[0]]
    y_true = [t for g in gathered for t in g[1]]
    samples = sum(g[3] for g in gathered)
    loss = sum(g[2] * g[3] for g in gathered) / max(samples, 1)
    if cuda:
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:  # peak RSS of this worker process (Linux reports KiB)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "epoch": epoch,
        "train_loss": round(loss, 5),
        "val_accuracy": float(accuracy_score(y_true, y_pred)) if y_true else 0.0,
        "val_macro_f1": float(
            f1_score(y_true, y_pred, average="macro", labels=list(range(len(labels))), zero_division=0)
        )
        if y_true
        else 0.0,
        "samples_per_second": round(samples / max(seconds, 1e-9), 3),
        "epoch_seconds": round(seconds, 2),
        "peak_memory_mb_rank0": round(peak_mb, 1),
    }


class _MlflowEpochLogger:
    """Rank 0 logs per-epoch metrics into the run the driver opened."""

    def __init__(self, settings: Settings, run_id: str | None) -> None:
        self.run_id = run_id
        self.settings = settings

    def log(self, metrics: dict[str, Any], epoch: int) -> None:
        if not self.run_id:
            return
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(key, float(value), now, epoch)
            for key, value in metrics.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        ]
        MlflowClient(self.settings.mlflow_tracking_uri).log_batch(self.run_id, metrics=batch)

    def backfill(self, history: list[dict[str, Any]]) -> None:
        """After a restart, log the epochs whose metrics the killed worker group never sent."""
        if not self.run_id:
            return
        from mlflow import MlflowClient

        client = MlflowClient(self.settings.mlflow_tracking_uri)
        logged = {m.step for m in client.get_metric_history(self.run_id, "val_macro_f1")}
        for metrics in history:
            if metrics["epoch"] not in logged:
                self.log(metrics, metrics["epoch"])


# ----------------------------------------------------------------------------------------
# the driver (the Ray job's entrypoint)
# ----------------------------------------------------------------------------------------


def check_config(
    config: TrainConfig, labels: tuple[str, ...], cluster: dict[str, float], autoscaling: bool = False
) -> str:
    """Fail fast with a clear message before any worker starts; returns the base model path.

    On an autoscaling cluster (``CT_RAY_AUTOSCALING``, e.g. KubeRay with GPU workers scaled to
    zero) missing CPUs/GPUs are only logged: the workers' pending placement group makes the
    autoscaler add nodes.
    """
    base = Path(config.base_model or Settings().resolved_base_model())
    if not (base / "config.json").is_file():
        raise TrainConfigError(
            f"base model {base} is not a Hugging Face model directory (no config.json); "
            "set CT_BASE_MODEL / the base_model param to a local model folder"
        )
    per_worker = {"CPU": config.cpus_per_worker} | ({"GPU": 1.0} if config.use_gpu else {})
    for resource, amount in per_worker.items():
        capacity = cluster.get(resource, 0.0)
        if config.num_workers * amount > capacity + 1e-9:
            shortfall = (
                f"{config.num_workers} workers x {amount} {resource} = {config.num_workers * amount} "
                f"{resource}, but the Ray cluster has {capacity:g} now"
            )
            if autoscaling:
                log.warning("%s; waiting for the autoscaler to add nodes", shortfall)
                continue
            raise TrainConfigError(
                f"{shortfall}; lower num_workers or "
                f"{'cpus_per_worker' if resource == 'CPU' else 'use_gpu'}, or add nodes "
                "(on an autoscaling cluster set CT_RAY_AUTOSCALING=true)"
            )
    model_config = json.loads((base / "config.json").read_text())
    head_labels = _fine_tuned_labels(model_config)
    if head_labels and set(labels) - set(head_labels):
        raise TrainConfigError(
            f"the snapshot has labels {sorted(set(labels) - set(head_labels))} that base model {base} "
            f"cannot map (its classifier knows {sorted(head_labels)}); start from a model without a "
            "classification head or from one trained on these labels"
        )
    if len(labels) < 2:
        raise TrainConfigError(f"need at least 2 labels to train a classifier, the snapshot has {labels}")
    return str(base)


def warm_start_model(
    settings: Settings, config: TrainConfig, labels: tuple[str, ...]
) -> dict[str, str] | None:
    """For ``init_from=champion``: the champion to start from (its version, run id and model folder
    in MLflow), or None to start from the base model, with a log line saying why: there is no
    champion yet, or its classifier has other labels (or another order) than this snapshot."""
    if config.init_from != "champion":
        return None
    from mlflow import MlflowClient

    from ml.registry import champion_version, download_export

    client = MlflowClient(settings.mlflow_tracking_uri)
    current = champion_version(client, settings.registered_model)
    if current is None:
        log.warning(
            "init_from=champion: %s has no champion yet; starting from the base model",
            settings.registered_model,
        )
        return None
    model_root = client.get_model_version_download_uri(current.name, current.version)
    with tempfile.TemporaryDirectory(prefix="ct-labels-") as tmp:
        label_map = json.loads(download_export(client, model_root, Path(tmp), "label_map.json").read_text())
    if tuple(label_map["labels"]) != tuple(labels):
        log.warning(
            "init_from=champion: champion v%s classifies %s, this snapshot has %s; "
            "starting from the base model",
            current.version,
            label_map["labels"],
            list(labels),
        )
        return None
    log.info("warm start: continuing from %s v%s (run %s)", current.name, current.version, current.run_id)
    return {"version": str(current.version), "run_id": current.run_id, "model_root": model_root}


def _fine_tuned_labels(model_config: dict[str, Any]) -> list[str]:
    """Labels of an existing classification head (none for a bare encoder)."""
    architectures = model_config.get("architectures") or []
    if not any("SequenceClassification" in a for a in architectures):
        return []
    return [str(v) for v in (model_config.get("id2label") or {}).values()]


def steps_per_epoch_for(config: TrainConfig, train_rows: int) -> int:
    """Micro-batch steps every rank takes per epoch (the same on all ranks): enough for every
    training row across the workers, rounded down to whole accumulation cycles, at least one."""
    steps = max(1, math.ceil(train_rows / (config.batch_size * config.num_workers)))
    return max(config.grad_accum_steps, steps - steps % config.grad_accum_steps)


def train_loop_config(
    config: TrainConfig,
    settings: Settings,
    labels: tuple[str, ...],
    train_key: str,
    val_key: str,
    base_model: str,
    init_model: dict[str, str] | None,
    steps_per_epoch: int,
) -> dict[str, Any]:
    """What :func:`train_loop_per_worker` gets from the driver (JSON-able: it crosses to the workers)."""
    return {
        "config": config.model_dump(),
        "settings": settings.model_dump(mode="json"),
        "labels": list(labels),
        "train_key": train_key,
        "val_key": val_key,
        "base_model": base_model,
        "init_model": init_model,
        "steps_per_epoch": steps_per_epoch,
    }


def make_trainer(
    config: TrainConfig,
    loop_config: dict[str, Any],
    storage_path: str,
    filesystem: Any = None,
    train_loop: Callable[[dict[str, Any]], None] = train_loop_per_worker,
) -> Any:
    """The Ray Train ``TorchTrainer`` of a run: ``num_workers`` workers running ``train_loop``,
    checkpoints under ``storage_path`` (S3 in the pipeline; benchmarks/train_overhead.py passes a
    local folder and a timing wrapper around train_loop_per_worker)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=config.use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=config.run_name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute="val_macro_f1", checkpoint_score_order="max"
            ),
            worker_runtime_env={"env_vars": _worker_env()},
        ),
    )


def run_training(settings: Settings, config: TrainConfig, result_key: str) -> dict[str, Any]:
    """The whole job: checks, splits, Ray Train fit, export, MLflow, result JSON."""
    import mlflow
    import ray

    from ml.data import prepare_splits, read_parquet
    from ml.storage import ObjectStore

    store = ObjectStore(settings)
    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=True)
    splits = prepare_splits(
        settings,
        config.snapshot_id,
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        seed=config.seed,
        max_rows=config.max_rows,
        data_window_days=config.data_window_days,
        store=store,
    )
    base_model = check_config(config, splits.labels, ray.cluster_resources(), settings.ray_autoscaling)
    init_model = warm_start_model(settings, config, splits.labels)
    train_rows = len(read_parquet(store, splits.train))
    steps_per_epoch = steps_per_epoch_for(config, train_rows)

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_experiment(settings.mlflow_experiment)
    run_id = _mlflow_run_for(config.run_name)
    requested_stage = config.zero_stage
    parameters = count_parameters(base_model)
    zero_stage = resolve_zero_stage(config, parameters)
    log.info(
        "DeepSpeed ZeRO stage %d (requested: %s; %.1f M parameters, %s workers)",
        zero_stage,
        requested_stage,
        parameters / 1e6,
        "GPU" if config.use_gpu else "CPU",
    )
    config = config.model_copy(
        update={"mlflow_run_id": run_id, "base_model": base_model, "zero_stage": zero_stage}
    )
    precision_hint = "bf16/fp16 (GPU)" if config.use_gpu else "fp32"
    ds_preview = deepspeed_config(config, "fp32", steps_per_epoch // config.grad_accum_steps)
    with mlflow.start_run(run_id=run_id):
        mlflow.set_tags(
            {
                "snapshot_id": config.snapshot_id,
                "dag_run_id": config.dag_run_id,
                "trigger_reason": config.trigger_reason,
                **config.trigger_tags,
                "training_snapshots": ",".join(splits.sources)[:5000],
                "git_commit": _git_commit(),
                "ray_job_id": os.environ.get("RAY_JOB_SUBMISSION_ID", ""),
                "init_from": "champion" if init_model else "base",
                **(
                    {"init_model_version": init_model["version"], "init_model_run_id": init_model["run_id"]}
                    if init_model
                    else {}
                ),
            }
        )
        _log_params_once(
            run_id,
            config,
            train_rows,
            steps_per_epoch,
            precision_hint,
            {"zero_stage_requested": requested_stage, "model_parameters": parameters},
        )
        mlflow.log_dict(ds_preview, "deepspeed_config.json")
        manifest = store.get_json(f"snapshots/{config.snapshot_id}/manifest.json")
        mlflow.log_dict(manifest, "snapshot/manifest.json")
        mlflow.log_dict(
            store.get_json(f"snapshots/{config.snapshot_id}/validation.json"), "snapshot/validation.json"
        )

    storage_path, filesystem = _ray_storage(settings)
    loop_config = train_loop_config(
        config, settings, splits.labels, splits.train, splits.val, base_model, init_model, steps_per_epoch
    )
    trainer = make_trainer(config, loop_config, storage_path, filesystem)
    started = time.perf_counter()
    result = trainer.fit()
    fit_seconds = time.perf_counter() - started
    if result.checkpoint is None:
        raise RuntimeError(f"training run {config.run_name} produced no checkpoint")
    # best_checkpoints keeps the top num_to_keep by val_macro_f1, in no promised order.
    best = max(
        result.best_checkpoints or [(result.checkpoint, {})],
        key=lambda pair: pair[1].get("val_macro_f1", -1.0),
    )[0]
    history = _read_state(result.checkpoint)["history"]

    with tempfile.TemporaryDirectory(prefix="ct-export-") as tmp:
        export_dir = export_checkpoint(best, Path(tmp) / "export", config, splits.labels)
        with mlflow.start_run(run_id=run_id):
            from ml.registry import log_model

            best_epoch = max(history, key=lambda m: m["val_macro_f1"], default={})
            mlflow.log_metrics(
                {"best_val_macro_f1": best_epoch.get("val_macro_f1", -1.0), "fit_seconds": fit_seconds}
            )
            model_info = log_model(export_dir)
    outcome = {
        "snapshot_id": config.snapshot_id,
        "mlflow_run_id": run_id,
        "model_uri": model_info.model_uri,
        "labels": list(splits.labels),
        "epochs_completed": len(history),
        "best_epoch": best_epoch.get("epoch", 0),
        "best_val_macro_f1": best_epoch.get("val_macro_f1"),
        "history": history,
        "fit_seconds": round(fit_seconds, 1),
        "test_key": splits.test,
        "run_name": config.run_name,
    }
    store.put_json(result_key, outcome)
    log.info("training result -> s3://%s/%s: %s", store.bucket, result_key, json.dumps(outcome)[:2000])
    return outcome


def _read_state(checkpoint: Any) -> dict[str, Any]:
    """The loop state saved with a checkpoint, read without downloading the shards."""
    with checkpoint.filesystem.open_input_file(f"{checkpoint.path}/{STATE_FILE}") as handle:
        return json.loads(handle.read())


def export_checkpoint(
    checkpoint: Any, export_dir: Path, config: TrainConfig, labels: tuple[str, ...]
) -> Path:
    """Consolidate ZeRO shards into a plain model and save it as safetensors + tokenizer + label map."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="ct-best-") as tmp:
        local = Path(checkpoint.to_directory(tmp))
        with tensors_only_loading():
            if config.zero_stage == 0:
                # Stage 0 keeps the whole module in one file.
                import torch

                model_states = local / CHECKPOINT_TAG / "mp_rank_00_model_states.pt"
                state_dict = torch.load(model_states, map_location="cpu", weights_only=True)["module"]
            else:
                state_dict = get_fp32_state_dict_from_zero_checkpoint(str(local), tag=CHECKPOINT_TAG)
        model_config = AutoConfig.from_pretrained(local)
        model = AutoModelForSequenceClassification.from_config(model_config)
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            raise RuntimeError(
                f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}"
            )
        export_dir.mkdir(parents=True)
        model.save_pretrained(export_dir, safe_serialization=True)
        AutoTokenizer.from_pretrained(local).save_pretrained(export_dir)
        state = json.loads((local / STATE_FILE).read_text())
    (export_dir / "label_map.json").write_text(json.dumps({"labels": list(labels)}, indent=2))
    (export_dir / "training_config.json").write_text(
        json.dumps(
            {**config.model_dump(), "history": state["history"], "best_epoch_state": state["epoch"]}, indent=2
        )
    )
    pickles = [p.name for p in export_dir.iterdir() if p.suffix in {".bin", ".pt", ".pkl", ".pickle"}]
    if pickles:
        raise RuntimeError(f"export must hold no pickled files, found {pickles}")
    return export_dir


def _mlflow_run_for(run_name: str) -> str:
    """The MLflow run of this training run: reused when the job is retried or resumed."""
    import mlflow

    existing = mlflow.search_runs(filter_string=f"attributes.run_name = '{run_name}'", output_format="list")
    if existing:
        log.info("reusing MLflow run %s for %s", existing[0].info.run_id, run_name)
        return existing[0].info.run_id
    with mlflow.start_run(run_name=run_name) as run:
        return run.info.run_id


def _log_params_once(
    run_id: str, config: TrainConfig, rows: int, steps: int, precision: str, extra: dict[str, Any]
) -> None:
    import mlflow

    logged = mlflow.get_run(run_id).data.params
    params = {
        **{k: v for k, v in config.model_dump().items() if k not in {"mlflow_run_id", "trigger_tags"}},
        "train_rows": rows,
        "steps_per_epoch": steps,
        "precision": precision,
        **extra,
    }
    mlflow.log_params({k: str(v)[:500] for k, v in params.items() if k not in logged})


def _ray_storage(settings: Settings) -> tuple[str, Any]:
    """Checkpoints go to s3://<data bucket>/ray-results through pyarrow's S3 filesystem."""
    from pyarrow import fs

    filesystem = fs.S3FileSystem(
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key,
        endpoint_override=settings.s3_endpoint,
        scheme="https" if settings.s3_secure else "http",
        region=settings.s3_region,
    )
    return f"{settings.data_bucket}/ray-results", filesystem


def _worker_env() -> dict[str, str]:
    """The job's settings for the Train workers' runtime_env: no secrets, which the Ray dashboard
    would show; the workers get S3 credentials from their node's environment, like this job."""
    from ml.settings import is_secret_name

    keep = ("CT_", "MLFLOW_", "AWS_", "HF_", "RAY_AUTH")
    env = {k: v for k, v in os.environ.items() if k.startswith(keep) and not is_secret_name(k)}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("CT_GIT_COMMIT", "unknown")


def main(argv: list[str] | None = None, runner: Callable[..., Any] = run_training) -> int:
    parser = argparse.ArgumentParser(description="Fine-tune the text classifier on a snapshot (Ray job).")
    parser.add_argument("--config", required=True, help="TrainConfig as JSON")
    parser.add_argument("--result-key", required=True, help="S3 key for the result JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        config = TrainConfig.model_validate_json(args.config)
        runner(Settings(), config, args.result_key)
    except TrainConfigError as err:
        log.error("configuration error: %s", err)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
