"""The Airflow Asset for newly landed labelled data.

``raw_data_watch`` emits an event on it when unconsumed batches appear under ``raw/<dataset>/``
(event ``extra``: dataset, batch ids, object count); ``continuous_training`` is scheduled on it
(``AssetOrTimeSchedule``: daily *or* on new data). Producers that know when they finish an upload
can also emit the event themselves through the REST API (``POST /api/v2/assets/events``, see
docs/pipeline.md), which starts training without waiting for the next poll.
"""

from __future__ import annotations

import os

from airflow.sdk import Asset

RAW_DATA = Asset(
    name="ct_raw_data",
    uri=f"s3://{os.environ.get('CT_DATA_BUCKET', 'ct-data')}/raw/",
    group="continuous-training",
    extra={"layout": "raw/<dataset>/<batch id>/<file>.{csv,jsonl,parquet}[.gz]"},
)


def dataset_from_events(events: object) -> str | None:
    """The dataset named by the newest raw-data event among a run's triggering asset events."""
    newest = None
    for asset_events in getattr(events, "values", lambda: [])() or []:
        for event in asset_events:
            dataset = (getattr(event, "extra", None) or {}).get("dataset")
            stamp = getattr(event, "timestamp", None)
            if dataset and (newest is None or (stamp and newest[0] and stamp > newest[0])):
                newest = (stamp, dataset)
    return newest[1] if newest else None
