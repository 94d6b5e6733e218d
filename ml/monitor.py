"""One drift check over a window of served predictions: reference, compare, report, record.

The window is what the service logged (``ml.prediction_log``) between ``start`` and ``end``.
It is compared with the **reference of the model that served it**: a sample of the training
split of the snapshot that model version was trained on (its registry tag ``snapshot_id`` points
to ``snapshots/<id>/splits/train.parquet``), so after a retraining the next window is compared
with the new model's data, not the old one's.

Results go where people look:

* ``reports/drift/<model>/<window end>/report.html`` (Evidently) and ``summary.json`` in S3;
* a run in the MLflow experiment ``drift`` (metrics ``drift_score``, ``text_roc_auc``,
  ``label_js_distance``, row counts; tags ``verdict``, ``model_version``, ``report``; the HTML
  report as the artifact ``report.html``, which the MLflow UI renders), so the trend is one chart
  and every report stays one click away.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ml.drift import DEFAULT_THRESHOLDS, DriftThresholds
from ml.settings import Settings

if TYPE_CHECKING:
    import pandas as pd

    from ml.storage import ObjectStore

log = logging.getLogger(__name__)

DRIFT_EXPERIMENT = "drift"
DRIFT_REPORTS = "reports/drift"
REFERENCE_ROWS = 1000


def production_rows(window: pd.DataFrame) -> pd.DataFrame:
    """The answers users received: without the pipeline's own requests (deploy smoke tests), a
    shadow candidate's answers (mirrored copies nobody saw) and failed attempts (ml.prediction_log.
    client_rows); a text counts once, with the model that answered it."""
    from ml.prediction_log import PIPELINE_REQUEST_PREFIX, client_rows

    own = window["request_id"].astype(str).str.startswith(PIPELINE_REQUEST_PREFIX)
    if own.any():
        log.info("leaving out %d rows of the pipeline's own requests (smoke tests)", int(own.sum()))
    answered = client_rows(window[~own])
    if len(answered) < int((~own).sum()):
        log.info("leaving out %d shadow or failed rows", int((~own).sum()) - len(answered))
    return answered


def serving_model(window: pd.DataFrame) -> tuple[str, str] | None:
    """The (model name, version) that answered most of the window; None for an empty window."""
    if window.empty:
        return None
    counts = window.groupby(["model_name", "model_version"]).size().sort_values(ascending=False)
    name, version = counts.index[0]
    return str(name), str(version)


def served_models(window: pd.DataFrame) -> list[dict[str, Any]]:
    """Every model that answered rows of the window, once per registered model name: the version
    that answered most of that model's rows (as :func:`serving_model` for the whole window), its
    row count, and the model's rows in all. Most-served first, then by name; rows without a model
    name (never written by the service) are left out."""
    named = window[window["model_name"].notna() & (window["model_name"].astype(str) != "")]
    models = []
    for name, rows in named.groupby("model_name", sort=True):
        counts = rows.groupby("model_version", dropna=False).size()
        # most rows first; among equal counts the highest version number (the newer one)
        version = max(counts.index, key=lambda v: (int(counts[v]), _version_order(v)))
        models.append(
            {
                "name": str(name),
                "version": str(version),
                "rows": int(counts[version]),
                "model_rows": len(rows),
            }
        )
    return sorted(models, key=lambda m: (-m["model_rows"], m["name"]))


def _version_order(version: Any) -> tuple[int, str]:
    text = str(version)
    return (int(text), "") if text.isdigit() else (-1, text)


MODEL_NAME_SUFFIX = "-classifier"


def model_dataset(model_name: str, recorded: str | None = None) -> tuple[str | None, str]:
    """The dataset a model is trained on, and where that came from.

    ``recorded``, the ``dataset`` field of the manifest of the snapshot the version was trained on,
    wins; else the registered name ``<dataset>-classifier`` (``Settings.registered_model``'s
    default) names it; else the dataset is unknown (a custom ``CT_REGISTERED_MODEL`` without a
    manifest) and (None, "unknown") comes back.
    """
    if recorded:
        return recorded, "snapshot manifest"
    if model_name.endswith(MODEL_NAME_SUFFIX) and len(model_name) > len(MODEL_NAME_SUFFIX):
        return model_name.removesuffix(MODEL_NAME_SUFFIX), "model name"
    return None, "unknown"


def models_in_window(
    settings: Settings, start: datetime, end: datetime, store: ObjectStore | None = None
) -> list[dict[str, Any]]:
    """:func:`served_models` of the users' traffic logged in [start, end) (the pipeline's own
    requests left out)."""
    from ml.prediction_log import read_predictions
    from ml.storage import ObjectStore

    store = store or ObjectStore(settings)
    return served_models(production_rows(read_predictions(store, start, end)))


def reference_for(
    settings: Settings, store: ObjectStore, name: str, version: str, rows: int = REFERENCE_ROWS
):
    """A seeded sample of the training split the version was trained on, that split's key, and the
    version's training run id (which tells its rows from those of a reused version number)."""
    import io

    import pandas as pd
    from mlflow import MlflowClient

    from ml.data import split_key
    from ml.drift import sample_reference

    model_version = MlflowClient(tracking_uri=settings.mlflow_tracking_uri).get_model_version(name, version)
    snapshot_id = (model_version.tags or {}).get("snapshot_id")
    if not snapshot_id:
        raise LookupError(
            f"{name} v{version} has no snapshot_id tag: its training data (the reference) is unknown"
        )
    key = split_key(snapshot_id, "train")
    if not store.exists(key):
        raise FileNotFoundError(
            f"s3://{store.bucket}/{key} is missing: the reference of {name} v{version} is gone"
        )
    train = pd.read_parquet(io.BytesIO(store.get_bytes(key)))
    return sample_reference(train, min(rows, len(train))), key, model_version.run_id


def check_window(
    settings: Settings,
    start: datetime,
    end: datetime,
    thresholds: DriftThresholds = DEFAULT_THRESHOLDS,
    store: ObjectStore | None = None,
    model_name: str | None = None,
) -> dict[str, Any]:
    """Compare the served window [start, end) with its model's reference; store and record the result.

    ``model_name``: check that registered model's rows of the window (the version that answered
    most of them); None checks the model that answered most of the whole window.
    Returns the JSON summary (verdict, scores, rows, the model and its dataset, the report's key
    and URL, the MLflow run id).
    """
    from ml.drift import INSUFFICIENT_DATA, compare
    from ml.prediction_log import read_predictions
    from ml.storage import ObjectStore

    store = store or ObjectStore(settings)
    window = production_rows(read_predictions(store, start, end))
    if model_name is not None:
        window = window[window["model_name"] == model_name]
    model = serving_model(window)
    base = {"window": {"start": start.isoformat(), "end": end.isoformat()}, "served_rows": len(window)}
    if model is None:
        which = f" by {model_name}" if model_name else ""
        summary = {
            **base,
            "verdict": INSUFFICIENT_DATA,
            "reason": f"no predictions{which} were logged in the window",
        }
        if model_name:
            summary["model"] = {"name": model_name, "version": None}
        log.info("drift check %s .. %s: no traffic%s, no verdict", start, end, which)
        return summary
    name, version = model
    current = window[(window["model_name"] == name) & (window["model_version"] == version)]
    reference, reference_key, run_id = reference_for(settings, store, name, version)
    if "model_run_id" in current and run_id:
        # a version number alone is not an identity: rows of an earlier model that had the same
        # name and number (a recreated registry) are not this model's traffic
        same = current["model_run_id"].isna() | (current["model_run_id"] == run_id)
        if not same.all():
            log.info(
                "leaving out %d rows answered by another run's %s v%s", int((~same).sum()), name, version
            )
        current = current[same]
    result = compare(reference, current[["text", "label"]], thresholds)
    dataset, dataset_source = model_dataset(name, _dataset_of(store, reference_key))
    prefix = f"{DRIFT_REPORTS}/{name}/{end:%Y%m%dT%H%M%S}"
    summary = {
        **base,
        **result.summary(),
        "model": {"name": name, "version": version},
        "dataset": dataset,
        "dataset_source": dataset_source,
        "reference_key": reference_key,
        "summary_key": f"{prefix}/summary.json",
        "report_key": f"{prefix}/report.html" if result.html else None,
    }
    if result.html:
        store.put_bytes(summary["report_key"], result.html.encode(), content_type="text/html; charset=utf-8")
        summary["report_url"] = settings.report_link(summary["report_key"])
    summary["mlflow_run_id"], experiment_id = _record(settings, summary, result.html)
    run_path = f"experiments/{experiment_id}/runs/{summary['mlflow_run_id']}"
    summary["mlflow_run_url"] = settings.mlflow_link(run_path)
    if result.html:
        summary["mlflow_report_url"] = settings.mlflow_link(f"{run_path}/artifacts/report.html")
    store.put_json(summary["summary_key"], summary)
    log.info(
        "drift check of %s v%s, %s .. %s: %s (score %s, %d served rows)",
        name,
        version,
        start,
        end,
        summary["verdict"],
        summary.get("drift_score"),
        len(current),
    )
    return summary


def _dataset_of(store: ObjectStore, reference_key: str) -> str | None:
    """The dataset the reference snapshot belongs to (what a retraining must train on)."""
    snapshot_dir = reference_key.split("/splits/")[0]
    manifest_key = f"{snapshot_dir}/manifest.json"
    return store.get_json(manifest_key).get("dataset") if store.exists(manifest_key) else None


def _record(settings: Settings, summary: dict[str, Any], html: str | None) -> tuple[str, str]:
    """One run in the ``drift`` experiment: the numbers as metrics, the verdict as a tag, the
    report as an artifact. Returns (run id, experiment id)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    experiment = client.get_experiment_by_name(DRIFT_EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(DRIFT_EXPERIMENT)
    model = summary["model"]
    run = client.create_run(
        experiment_id, run_name=f"{model['name']}-v{model['version']}-{summary['window']['end']}"
    )
    ts = int(datetime.fromisoformat(summary["window"]["end"]).timestamp() * 1000)
    metrics = {
        "drift_score": summary.get("drift_score"),
        "text_roc_auc": (summary.get("text") or {}).get("score"),
        "label_js_distance": (summary.get("label") or {}).get("distance"),
        "reference_rows": (summary.get("rows") or {}).get("reference"),
        "current_rows": (summary.get("rows") or {}).get("current"),
    }
    client.log_batch(
        run.info.run_id,
        metrics=[Metric(k, float(v), ts, 0) for k, v in metrics.items() if v is not None],
        params=[
            Param("window_start", summary["window"]["start"]),
            Param("window_end", summary["window"]["end"]),
        ],
        tags=[
            RunTag("verdict", summary["verdict"]),
            RunTag("model_name", model["name"]),
            RunTag("model_version", model["version"]),
            RunTag("report", summary.get("report_key") or ""),
        ],
    )
    client.log_dict(
        run.info.run_id, {k: v for k, v in summary.items() if k != "mlflow_run_id"}, "summary.json"
    )
    if html:
        client.log_text(run.info.run_id, html, "report.html")
    client.set_terminated(run.info.run_id)
    return run.info.run_id, experiment_id
