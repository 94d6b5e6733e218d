"""
### Continuous training of the text classifier

Daily, this DAG turns newly arrived labelled text into a training snapshot that passed the data gate.

| task | what it does | where to look |
|---|---|---|
| `extract` | Collects the batches under `raw/<dataset>/<batch id>/` that are due by the run's data interval end and were not consumed by an earlier run; writes `snapshots/<snapshot id>/` (Parquet per batch + `manifest.json` with keys, etags, sha256, row counts, columns). | task log: snapshot id |
| `validate` | Runs the Great Expectations suite `text_classification_batch` on every batch. A failing batch is **moved** (never deleted) to `quarantine/<dataset>/<batch id>/` with its validation JSON and Data Docs page; the rest is written to `snapshots/<id>/validated.parquet`. | task log: every failed expectation, the Data Docs URL |

**No new data** → `extract` is *skipped* with a log line saying so, and so is everything after it.
**Every batch bad** → `validate` fails (no retry) naming each batch and its first failed expectation.

**Operating it**
- Add data: upload CSV / JSONL / Parquet with `text` and `label` columns to
  `s3://<bucket>/raw/<dataset>/<YYYY-MM-DD or batch id>/<file>`.
- Re-run a day: clear the run; `extract` returns the snapshot it already committed (idempotent).
- Release a quarantined batch after fixing it: upload the fixed file under a new batch id in `raw/`.
- Settings: `CT_*` environment variables and the connections `ct_minio`, `ct_mlflow`, `ct_ray`
  (see the project README's configuration table).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import Param, dag, get_current_context, task

DAG_ID = "continuous_training"


def _dataset_override(params: dict[str, Any]) -> dict[str, Any]:
    return {"dataset": params["dataset"]} if params.get("dataset") else {}


@dag(
    dag_id=DAG_ID,
    schedule="@daily",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    # Runs consume raw batches in order; two at once would race for the same batches.
    max_active_runs=1,
    doc_md=__doc__,
    tags=["continuous-training", "data-quality"],
    params={
        "dataset": Param(
            None,
            type=["null", "string"],
            title="Dataset",
            description="Dataset under raw/ to train on; empty uses CT_DATASET (default agnews).",
        ),
    },
    default_args={
        "owner": "ml-platform",
        "retries": 2,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": True,
        "execution_timeout": timedelta(hours=2),
    },
)
def continuous_training() -> None:
    @task
    def extract() -> dict[str, Any]:
        """Snapshot the due, unconsumed raw batches; skip the run when there are none."""
        from airflow.sdk.exceptions import AirflowSkipException

        from ct_airflow.settings import pipeline_settings
        from ml.extract import extract_snapshot

        context = get_current_context()
        dag_run = context["dag_run"]
        cutoff = context.get("data_interval_end") or dag_run.run_after
        settings = pipeline_settings(**_dataset_override(context["params"]))
        manifest = extract_snapshot(settings, run_id=dag_run.run_id, cutoff=cutoff, dag_id=DAG_ID)
        if manifest is None:
            raise AirflowSkipException(
                f"no new data: every batch under raw/{settings.dataset}/ due by {cutoff:%Y-%m-%d %H:%M} "
                "was consumed by an earlier run; nothing to train on"
            )
        return {
            "snapshot_id": manifest["snapshot_id"],
            "batches": [b["batch_id"] for b in manifest["batches"]],
            "rows": manifest["total_rows"],
        }

    @task
    def validate(snapshot: dict[str, Any]) -> dict[str, Any]:
        """Gate every batch; quarantine failures; fail only when nothing valid remains."""
        from airflow.sdk.exceptions import AirflowFailException

        from ct_airflow.settings import pipeline_settings
        from ml.validate import NoValidDataError, validate_snapshot

        try:
            settings = pipeline_settings(**_dataset_override(get_current_context()["params"]))
            summary = validate_snapshot(settings, snapshot["snapshot_id"])
        except NoValidDataError as err:
            # Bad data does not get better on retry: fail for good, with the reasons.
            raise AirflowFailException(str(err)) from err
        return {
            "snapshot_id": summary["snapshot_id"],
            "validated_key": summary["validated_key"],
            "rows": summary["rows_accepted"],
            "labels": summary["labels"],
            "quarantined": [q["batch_id"] for q in summary["quarantined"]],
            "data_docs": summary["data_docs"],
        }

    validate(extract())


continuous_training()
