"""
### Raw data watch: new labelled data starts a training run, one per dataset

Every 15 minutes (schedule: `CT_RAW_WATCH_SCHEDULE`, cron, UTC) this DAG lists the datasets under
`s3://<bucket>/raw/` and, **for each dataset** (one mapped task instance per dataset, named after
it), looks for batches under `raw/<dataset>/` that are due and that no training run has consumed
yet. Each dataset with new data it has not announced before gets **its own**
`continuous_training` run, with conf `{"dataset": "<name>", "reason": "new_data", "batches": […]}`.

| task | what it does | where to look |
|---|---|---|
| `list_datasets` | The datasets to watch: the `datasets` param, else `CT_RAW_WATCH_DATASETS` (comma-separated), else every folder under `raw/`. None → *skipped*. | task log |
| `per_dataset.detect` (one per dataset) | Lists the dataset's unconsumed due batches. None → *skipped* ("nothing new"). Already announced and still waiting for a training run → *skipped* ("already announced"). Otherwise → the conf of its training run. | task log |
| `per_dataset.trigger_training` | Triggers `continuous_training` for that dataset only. | link **Triggered DAG** |
| `per_dataset.record_announcement` | Remembers what was announced (`reports/raw_watch/<dataset>.json`: the new objects' fingerprint, the batches, the triggered run). | S3 |

**Why a triggered run per dataset, not an event on the `ct_raw_data` asset.** `continuous_training`
trains one dataset per run and runs one at a time (`max_active_runs=1`, so two runs never race for
the same batches). Airflow merges asset events into the next asset-triggered run: events of two
datasets that arrive together, or while a training run is active, start **one** run, which can
train only one of them; the other would wait for a later trigger. A triggered run carries its
dataset in its own conf and is never merged: two datasets with new data give two queued runs, which
`max_active_runs=1` runs one after the other, each on its own dataset. Nothing is left for the daily
run (which trains `CT_DATASET`).

**Operating it**
- Faster than the poll: a producer that has finished an upload can start the run itself, by
  triggering `continuous_training` with conf `{"dataset": "<name>"}`, or by an event on the asset
  `ct_raw_data` (`POST /api/v2/assets/events` with `{"asset_id": <id>, "extra": {"dataset": "<name>"}}`;
  events of several datasets merged into one run train the newest one's, and this watch starts a run
  for any other dataset still waiting at its next poll).
- Watch only some datasets: trigger with the `datasets` param (e.g. `["agnews"]`), or set
  `CT_RAW_WATCH_DATASETS` for the scheduled runs.
- The announcement stamp is `s3://<bucket>/reports/raw_watch/<dataset>.json`; deleting it re-announces.
"""

from __future__ import annotations

import hashlib
import logging
import os
from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import CronTriggerTimetable, Param, dag, get_current_context, task, task_group

from ct_airflow.dag_defaults import default_args
from ct_airflow.failures import skip

DAG_ID = "raw_data_watch"
TRAINING_DAG_ID = "continuous_training"
GROUP_ID = "per_dataset"
# scheduled runs watch these datasets (comma-separated); empty = every dataset under raw/
WATCH_DATASETS = [d.strip() for d in os.environ.get("CT_RAW_WATCH_DATASETS", "").split(",") if d.strip()]
log = logging.getLogger(__name__)


def stamp_key(dataset: str) -> str:
    return f"reports/raw_watch/{dataset}.json"


@dag(
    dag_id=DAG_ID,
    # No start_date: the first scheduled run is the next poll time after the DAG first appears.
    schedule=CronTriggerTimetable(os.environ.get("CT_RAW_WATCH_SCHEDULE", "*/15 * * * *"), timezone="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["continuous-training", "data"],
    params={
        "datasets": Param(
            WATCH_DATASETS or None,
            type=["null", "array"],
            items={"type": "string"},
            title="Datasets",
            description="Datasets under raw/ to watch, one per line; empty = CT_RAW_WATCH_DATASETS, "
            "else every dataset under raw/.",
        ),
    },
    default_args=default_args(timedelta(minutes=10)),
)
def raw_data_watch() -> None:
    @task
    def list_datasets() -> list[str]:
        """The datasets to look at: the param, else every folder under raw/."""
        from airflow.sdk.exceptions import AirflowFailException

        from ct_airflow.settings import pipeline_settings
        from ml.extract import datasets_to_watch, raw_datasets
        from ml.storage import ObjectStore

        requested = get_current_context()["params"].get("datasets")
        try:
            datasets = datasets_to_watch(
                [] if requested else raw_datasets(ObjectStore(pipeline_settings())), requested
            )
        except ValueError as err:
            raise AirflowFailException(str(err)) from err
        if not datasets:
            skip("no datasets under raw/: nothing to watch")
        log.info("watching %d dataset(s): %s", len(datasets), ", ".join(datasets))
        return datasets

    @task(map_index_template="{{ dataset }}")
    def detect(dataset: str) -> dict[str, Any]:
        """This dataset's unconsumed due batches, unless already announced → its training run's conf."""
        from ct_airflow.settings import dataset_settings
        from ml.extract import pending_batches
        from ml.storage import ObjectStore

        context = get_current_context()
        context["dataset"] = dataset  # type: ignore[typeddict-unknown-key]  # the map index's name
        settings = dataset_settings(dataset)
        store = ObjectStore(settings)
        pending = pending_batches(settings, datetime.now(UTC), store)
        if not pending:
            skip(f"nothing new under raw/{dataset}/: no training run")
        objects = sorted(f"{o.key}\0{o.etag}" for b in pending for o in b.objects)
        fingerprint = hashlib.sha256("\n".join(objects).encode()).hexdigest()[:16]
        key = stamp_key(dataset)
        last = store.get_json(key) if store.exists(key) else {}
        batches = [b.batch_id for b in pending]
        if last.get("fingerprint") == fingerprint:
            skip(
                f"{len(batches)} batch(es) under raw/{dataset}/ were already announced at "
                f"{last.get('at')} (run {last.get('training_run_id')}) and wait for a "
                f"{TRAINING_DAG_ID} run: {', '.join(batches)}"
            )
        context["ti"].xcom_push(key="fingerprint", value=fingerprint)
        log.info("new data under raw/%s/: %s -> a %s run for %s", dataset, batches, TRAINING_DAG_ID, dataset)
        return {"dataset": dataset, "reason": "new_data", "batches": batches, "objects": len(objects)}

    @task(map_index_template="{{ dataset }}")
    def record_announcement(announcement: dict[str, Any]) -> dict[str, Any]:
        """Remember the announced objects (announced once) and the run they started."""
        from ct_airflow.settings import pipeline_settings
        from ml.storage import ObjectStore

        context = get_current_context()
        context["dataset"] = announcement["dataset"]  # type: ignore[typeddict-unknown-key]
        ti = context["ti"]
        stamp = {
            **announcement,
            "fingerprint": ti.xcom_pull(
                task_ids=f"{GROUP_ID}.detect", key="fingerprint", map_indexes=ti.map_index
            ),
            "training_run_id": ti.xcom_pull(
                task_ids=f"{GROUP_ID}.trigger_training", key="trigger_run_id", map_indexes=ti.map_index
            ),
            "at": datetime.now(UTC).isoformat(),
            "by": context["run_id"],
        }
        ObjectStore(pipeline_settings()).put_json(stamp_key(announcement["dataset"]), stamp)
        return stamp

    @task_group(group_id=GROUP_ID)
    def per_dataset(dataset: str) -> None:
        """detect → trigger_training → record_announcement for one dataset (one map index)."""
        announcement = detect(dataset)
        trigger_training = TriggerDagRunOperator(
            task_id="trigger_training",
            trigger_dag_id=TRAINING_DAG_ID,
            conf=announcement,
            wait_for_completion=False,
            map_index_template="{{ task.conf.get('dataset', '') }}",
        )
        trigger_training >> record_announcement(announcement)

    per_dataset.expand(dataset=list_datasets())


raw_data_watch()
