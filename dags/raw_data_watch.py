"""
### Raw data watch: new labelled data starts a training run

Every 15 minutes (schedule: `CT_RAW_WATCH_SCHEDULE`, cron, UTC) this DAG looks under
`s3://<bucket>/raw/<dataset>/` for batches that are due and that no training run has consumed
yet. When it finds some it has not announced before, it emits an event on the Airflow Asset
**`ct_raw_data`** (extra: dataset, batch ids, object count), and `continuous_training`, which is
scheduled on that asset *or* daily, starts a run for that dataset.

| task | what it does | where to look |
|---|---|---|
| `detect` | Lists unconsumed due batches. None → *skipped* ("nothing new"). Already announced and still waiting for a training run → *skipped* ("already announced"). Otherwise → success, one asset event. | task log; Assets → `ct_raw_data` |

**Operating it**
- Faster than the poll: a producer that has finished an upload can emit the event itself,
  `POST /api/v2/assets/events` with `{"asset_id": <id of ct_raw_data>, "extra": {"dataset": "<name>"}}`.
- Another dataset than `CT_DATASET`: trigger this DAG with the `dataset` param.
- The announcement stamp is `s3://<bucket>/reports/raw_watch/<dataset>.json`; deleting it re-announces.
"""

from __future__ import annotations

import hashlib
import logging
import os
from datetime import UTC, datetime, timedelta

from airflow.sdk import CronTriggerTimetable, dag, get_current_context, task

from ct_airflow.assets import RAW_DATA
from ct_airflow.dag_defaults import dataset_param, default_args
from ct_airflow.failures import skip

DAG_ID = "raw_data_watch"
log = logging.getLogger(__name__)


@dag(
    dag_id=DAG_ID,
    # No start_date: the first scheduled run is the next poll time after the DAG first appears.
    schedule=CronTriggerTimetable(os.environ.get("CT_RAW_WATCH_SCHEDULE", "*/15 * * * *"), timezone="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["continuous-training", "data"],
    params={
        "dataset": dataset_param("watch"),
    },
    default_args=default_args(timedelta(minutes=10)),
)
def raw_data_watch() -> None:
    @task(outlets=[RAW_DATA])
    def detect() -> dict:
        """Announce unconsumed due batches once, as an event on the ct_raw_data asset."""

        from ct_airflow.settings import dataset_settings
        from ml.extract import pending_batches
        from ml.storage import REPORTS, ObjectStore

        context = get_current_context()
        settings = dataset_settings(context["params"].get("dataset"))
        store = ObjectStore(settings)
        pending = pending_batches(settings, datetime.now(UTC), store)
        if not pending:
            skip(f"nothing new under raw/{settings.dataset}/: no event")
        objects = sorted(f"{o.key}\0{o.etag}" for b in pending for o in b.objects)
        fingerprint = hashlib.sha256("\n".join(objects).encode()).hexdigest()[:16]
        stamp_key = f"{REPORTS}/raw_watch/{settings.dataset}.json"
        last = store.get_json(stamp_key) if store.exists(stamp_key) else {}
        batches = [b.batch_id for b in pending]
        if last.get("fingerprint") == fingerprint:
            skip(
                f"{len(batches)} batch(es) under raw/{settings.dataset}/ were already announced at "
                f"{last.get('at')} and wait for a continuous_training run: {', '.join(batches)}"
            )
        extra = {"dataset": settings.dataset, "batches": batches, "objects": len(objects)}
        context["outlet_events"][RAW_DATA].extra = extra
        store.put_json(
            stamp_key,
            {
                "fingerprint": fingerprint,
                "at": datetime.now(UTC).isoformat(),
                "by": context["run_id"],
                **extra,
            },
        )
        log.info("new data under raw/%s/: %s -> event on asset %s", settings.dataset, batches, RAW_DATA.name)
        return extra

    detect()


raw_data_watch()
