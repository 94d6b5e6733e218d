"""Evaluate a challenger against the champion on the same held-out split, and decide promotion.

The challenger is the model a training run logged; the champion is the registered version the
``champion`` alias points to. Both are scored on ``snapshots/<snapshot id>/splits/test.parquet``;
the metrics, the confusion matrix and ``evaluation.json`` go to the challenger's MLflow run, and
:func:`gate_decision` says whether it may replace the champion.

CLI (run as a Ray job; settings from ``CT_*``)::

    python -m ml.evaluate --snapshot-id S --run-id R --result-key KEY
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import logging
import math
import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ml.data import split_key
from ml.settings import Settings

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

TEXT = "text"
LABEL = "label"
EVALUATION_ARTIFACT = "evaluation/evaluation.json"
CONFUSION_ARTIFACT = "evaluation/confusion_matrix.png"
SMOKE_TEXTS = 8  # test texts whose offline predictions a deploy's smoke test compares against
_EPSILON = 1e-9  # float noise: 0.8 - 0.005 must count as "within the tolerance" of 0.795


# --------------------------------------------------------------------------------------
# metrics and the gate (pure functions)
# --------------------------------------------------------------------------------------


def classification_report(
    y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, macro-F1 over ``labels``, F1 and support per label, and the confusion matrix.

    ``confusion_matrix[i][j]`` counts texts of ``labels[i]`` predicted as ``labels[j]``. A label
    with neither support nor predictions scores F1 0 (and pulls the macro-F1 down).
    """
    from sklearn import metrics

    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} items but y_pred has {len(y_pred)}")
    if not len(y_true):
        raise ValueError("cannot evaluate on an empty test split")
    labels = list(labels)
    per_class = metrics.f1_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    matrix = metrics.confusion_matrix(y_true, y_pred, labels=labels)
    return {
        "rows": len(y_true),
        "labels": labels,
        "accuracy": float(metrics.accuracy_score(y_true, y_pred)),
        "macro_f1": float(np.mean(per_class)),
        "per_class_f1": {label: float(f1) for label, f1 in zip(labels, per_class, strict=True)},
        "support": {label: int(n) for label, n in zip(labels, matrix.sum(axis=1), strict=True)},
        "confusion_matrix": matrix.tolist(),
    }


def gate_decision(
    challenger_f1: float, champion_f1: float | None, floor: float, tolerance: float
) -> dict[str, Any]:
    """Promote if the challenger's macro-F1 reaches the floor and is at least the champion's
    minus ``tolerance``; with no champion, the floor alone decides."""
    if challenger_f1 is None or math.isnan(challenger_f1):
        promote, reason = False, f"challenger macro-F1 is {challenger_f1}: nothing to compare"
    elif challenger_f1 + _EPSILON < floor:
        versus = f" (champion {champion_f1:.4f})" if champion_f1 is not None else ""
        promote = False
        reason = f"challenger macro-F1 {challenger_f1:.4f} is below the floor {floor:.4f}{versus}"
    elif champion_f1 is None:
        promote = True
        reason = f"first model: challenger macro-F1 {challenger_f1:.4f} >= floor {floor:.4f}; no champion yet"
    elif challenger_f1 + _EPSILON >= champion_f1 - tolerance:
        promote = True
        reason = (
            f"challenger macro-F1 {challenger_f1:.4f} >= champion {champion_f1:.4f} - tolerance "
            f"{tolerance:.4f} (and >= floor {floor:.4f})"
        )
    else:
        promote = False
        reason = (
            f"challenger macro-F1 {challenger_f1:.4f} < champion {champion_f1:.4f} - tolerance "
            f"{tolerance:.4f}; champion kept"
        )
    return {
        "promote": promote,
        "reason": reason,
        "challenger_macro_f1": challenger_f1,
        "champion_macro_f1": champion_f1,
        "floor": floor,
        "tolerance": tolerance,
    }


def confusion_matrix_figure(
    matrix: Sequence[Sequence[int]], labels: Sequence[str], title: str = ""
) -> Figure:
    """A labelled heat map of the confusion matrix (rows: true label, columns: predicted).

    Built on the Agg canvas directly (no pyplot): safe in worker processes without a display.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = np.asarray(matrix)
    size = 1.5 + 0.9 * len(labels)
    fig = Figure(figsize=(size + 1.5, size), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(counts, cmap="Blues")
    fig.colorbar(image, ax=ax)
    ticks = range(len(labels))
    ax.set_xticks(ticks, labels, rotation=45, ha="right")
    ax.set_yticks(ticks, labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    threshold = counts.max() / 2 if counts.size else 0
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, str(n), ha="center", va="center", color="white" if n > threshold else "black")
    return fig


def figure_png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------
# the evaluation stage (MLflow + S3)
# --------------------------------------------------------------------------------------


def evaluate_challenger(settings: Settings, snapshot_id: str, challenger_run_id: str) -> dict[str, Any]:
    """Score the run's model and the champion on the snapshot's test split; log; gate.

    Returns a JSON-ready dict: ``snapshot_id``, ``run_id``, ``test_rows``, ``challenger`` (its
    :func:`classification_report` plus ``model_id``), ``champion`` (the same plus ``version`` and
    ``run_id``, or None) and ``gate`` (:func:`gate_decision`).
    """
    from mlflow import MlflowClient

    from ml.registry import champion_version, download_export, logged_model_id

    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    test = load_test_split(settings, snapshot_id)
    texts, y_true = test[TEXT].tolist(), test[LABEL].tolist()

    with tempfile.TemporaryDirectory(prefix="ct-evaluate-") as tmp:
        model_id = logged_model_id(client, challenger_run_id)
        model_root = client.get_logged_model(model_id).artifact_location
        export = download_export(client, model_root, Path(tmp) / "challenger")
        y_pred, y_score, model_labels = _predict(export, texts)
        labels = model_labels + sorted(set(y_true) - set(model_labels))
        challenger = {"model_id": model_id, **classification_report(y_true, y_pred, labels)}

        champion = None
        current = champion_version(client, settings.registered_model)
        if current is not None:
            model_root = client.get_model_version_download_uri(current.name, current.version)
            export = download_export(client, model_root, Path(tmp) / "champion")
            champion_pred, _, _ = _predict(export, texts)
            champion = {
                "version": str(current.version),
                "run_id": current.run_id,
                **classification_report(y_true, champion_pred, labels),
            }

    gate = gate_decision(
        challenger["macro_f1"],
        champion["macro_f1"] if champion else None,
        settings.gate_min_macro_f1,
        settings.gate_tolerance,
    )
    evaluation = {
        "snapshot_id": snapshot_id,
        "run_id": challenger_run_id,
        "registered_model": settings.registered_model,
        "test_rows": len(test),
        "challenger": challenger,
        "champion": champion,
        "gate": gate,
        "smoke": smoke_set(texts, y_pred, y_score),
    }
    log_evaluation(client, challenger_run_id, evaluation)
    log.info("run %s on %s: %s", challenger_run_id, snapshot_id, gate["reason"])
    return evaluation


def load_test_split(settings: Settings, snapshot_id: str) -> pd.DataFrame:
    import pandas as pd

    from ml.storage import ObjectStore

    key = split_key(snapshot_id, "test")
    store = ObjectStore(settings)
    if not store.exists(key):
        raise FileNotFoundError(f"s3://{store.bucket}/{key} is missing: the snapshot has no test split")
    frame = pd.read_parquet(io.BytesIO(store.get_bytes(key)))
    missing = {TEXT, LABEL} - set(frame.columns)
    if missing:
        raise ValueError(f"s3://{store.bucket}/{key} lacks column(s) {sorted(missing)}")
    if frame.empty:
        raise ValueError(f"s3://{store.bucket}/{key} has no rows")
    return frame.assign(**{LABEL: frame[LABEL].astype(str)})


def log_evaluation(client: MlflowClient, run_id: str, evaluation: dict[str, Any]) -> None:
    """Metrics, the confusion matrix image and evaluation.json on the challenger's run.

    Uses the client with an explicit run id: the (finished) training run is not reopened.
    """
    from mlflow.entities import Metric

    challenger, champion = evaluation["challenger"], evaluation["champion"]
    values = {"test_accuracy": challenger["accuracy"], "test_macro_f1": challenger["macro_f1"]}
    values |= {f"test_f1_{metric_safe(label)}": f1 for label, f1 in challenger["per_class_f1"].items()}
    if champion is not None:
        values["champion_test_macro_f1"] = champion["macro_f1"]
        values["champion_test_accuracy"] = champion["accuracy"]
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in values.items()])
    client.set_tag(run_id, "gate_decision", "promote" if evaluation["gate"]["promote"] else "reject")
    fig = confusion_matrix_figure(
        challenger["confusion_matrix"],
        challenger["labels"],
        f"test split of {evaluation['snapshot_id']}\nmacro-F1 {challenger['macro_f1']:.4f}",
    )
    client.log_figure(run_id, fig, CONFUSION_ARTIFACT)
    client.log_dict(run_id, evaluation, EVALUATION_ARTIFACT)


def metric_safe(label: str) -> str:
    """A label as part of an MLflow metric name (letters, digits, ``_ - . /`` and spaces)."""
    return re.sub(r"[^\w\-./ ]", "_", label)


def _predict(export: Path, texts: list[str]) -> tuple[list[str], list[float], list[str]]:
    """Predicted labels and their probabilities for ``texts``, and the model's label list."""
    from ml.predict import TextClassifier

    classifier = TextClassifier.from_dir(export)
    predictions = classifier.predict(texts)
    labels = classifier.labels
    del classifier
    gc.collect()  # one model in memory at a time
    return [label for label, _ in predictions], [score for _, score in predictions], labels


def smoke_set(
    texts: list[str], labels: list[str], scores: list[float], n: int = SMOKE_TEXTS
) -> dict[str, Any]:
    """The first ``n`` test texts with the challenger's offline predictions.

    After a deploy, the served model must give the same labels (and scores within a tolerance)
    for these texts: the check that serving loads and runs the very model that was evaluated.
    """
    return {"texts": texts[:n], "labels": labels[:n], "scores": [round(x, 6) for x in scores[:n]]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--snapshot-id", required=True)
    parser.add_argument("--run-id", required=True, help="MLflow run id of the training run (challenger)")
    parser.add_argument("--result-key", required=True, help="data-bucket key to write the result JSON to")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from ml.storage import ObjectStore

    settings = Settings()
    evaluation = evaluate_challenger(settings, args.snapshot_id, args.run_id)
    ObjectStore(settings).put_json(args.result_key, evaluation)
    print(json.dumps(evaluation["gate"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
