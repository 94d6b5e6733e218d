"""The Airflow Asset for newly landed labelled data.

``continuous_training`` is scheduled on it (``AssetOrTimeSchedule``: daily *or* on new data).
Producers that know when they finish an upload emit an event on it through the REST API
(``POST /api/v2/assets/events`` with ``extra: {"dataset": ...}``, see docs/pipeline.md), which
starts training without waiting for the next poll of ``raw_data_watch``.

``raw_data_watch`` itself does not emit events: Airflow merges the asset events that arrive
together, or while a run is active, into one run, and a run trains one dataset. It triggers one
``continuous_training`` run per dataset with new data instead (conf ``dataset``), which are never
merged. A run that several datasets' events started trains the newest one's
(:func:`dataset_from_events`); the watch starts a run for each other dataset still waiting.
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
