"""Real model exports for tests, made in seconds from the packaged base model (no training).

``build_export`` writes exactly what training exports (safetensors, tokenizer, label map,
training config) with a seeded random head; ``rotate_head`` makes a model that is wrong wherever
the first is right; ``register_export`` logs an export as a run's pyfunc model and registers it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ml.settings import Settings

LABELS = ["Business", "Sports", "World"]


def build_export(directory: Path, labels: list[str] = LABELS, seed: int = 0) -> Path:
    """The base model with a random (seeded) head, exported like training does."""
    from ml.predict import export_base_model

    return export_base_model(directory, labels, max_length=32, seed=seed)


def rotate_head(src: Path, dst: Path) -> Path:
    """A copy whose logit for class k+1 is the original's for class k: it predicts k+1 where
    ``src`` predicts k, so it is wrong wherever ``src`` is right."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(src / "model.safetensors")
    n = weights["classifier.bias"].shape[0]
    rotation = [n - 1, *range(n - 1)]
    for key in ("classifier.weight", "classifier.bias"):
        weights[key] = weights[key][rotation].contiguous()
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def nan_head(src: Path, dst: Path) -> Path:
    """A copy that loads fine and answers NaN for every text: a model that misbehaves in service."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(src / "model.safetensors")
    weights["classifier.bias"] = weights["classifier.bias"] * float("nan")
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def corrupt_export(src: Path, dst: Path) -> Path:
    """A copy whose weights file is cut in half: it downloads fine and fails to load."""
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return dst


def log_training_run(export: Path, snapshot_id: str) -> str:
    """A finished MLflow run that logged ``export`` as its model; returns the run id."""
    import mlflow

    from ml.registry import log_model

    with mlflow.start_run() as run:
        mlflow.set_tag("snapshot_id", snapshot_id)
        log_model(export)
    return run.info.run_id


def register_export(settings: Settings, export: Path, snapshot_id: str = "test") -> str:
    """Log ``export`` in a run and register it under ``settings.registered_model``; returns the version."""
    from mlflow import MlflowClient

    from ml.registry import _version_for_run

    run_id = log_training_run(export, snapshot_id)
    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    return str(_version_for_run(client, settings.registered_model, run_id).version)
