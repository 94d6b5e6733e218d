"""One drift check over a window of served predictions: reference, compare, report, record.

The window is what the service logged (``serve.prediction_log``) between ``start`` and ``end``.
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
    """The window without the pipeline's own requests (deploy smoke tests): users' traffic only."""
    from serve.prediction_log import PIPELINE_REQUEST_PREFIX

    own = window["request_id"].astype(str).str.startswith(PIPELINE_REQUEST_PREFIX)
    if own.any():
        log.info("leaving out %d rows of the pipeline's own requests (smoke tests)", int(own.sum()))
    return window[~own]


def serving_model(window: pd.DataFrame) -> tuple[str, str] | None:
    """The (model name, version) that answered most of the window; None for an empty window."""
    if window.empty:
        return None
    counts = window.groupby(["model_name", "model_version"]).size().sort_values(ascending=False)
    name, version = counts.index[0]
    return str(name), str(version)


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
) -> dict[str, Any]:
    """Compare the served window [start, end) with its model's reference; store and record the result.

    Returns the JSON summary (verdict, scores, rows, the report's key and URL, the MLflow run id).
    """
    from ml.drift import INSUFFICIENT_DATA, compare
    from ml.storage import ObjectStore
    from serve.prediction_log import read_predictions

    store = store or ObjectStore(settings)
    window = production_rows(read_predictions(store, start, end))
    model = serving_model(window)
    base = {"window": {"start": start.isoformat(), "end": end.isoformat()}, "served_rows": len(window)}
    if model is None:
        summary = {**base, "verdict": INSUFFICIENT_DATA, "reason": "no predictions were logged in the window"}
        log.info("drift check %s .. %s: no traffic, no verdict", start, end)
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
    dataset = _dataset_of(store, reference_key)
    prefix = f"{DRIFT_REPORTS}/{name}/{end:%Y%m%dT%H%M%S}"
    summary = {
        **base,
        **result.summary(),
        "model": {"name": name, "version": version},
        "dataset": dataset,
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
