"""A drift check against the real S3 and MLflow servers: the window comes from the prediction log,
the reference from the training split of the model version that served it.

(Not named test_monitor.py: `ray stop`, run when the test session stops the Ray it started, kills
every process whose command line contains "monitor.py", pytest included.)"""

from __future__ import annotations

import io
import random
import uuid
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest

from ml.data import split_key
from ml.monitor import DRIFT_EXPERIMENT, check_window
from ml.prediction_log import PredictionLogger
from tests.conftest import NEWSGROUPS
from tests.model_factory import build_export, register_export

pytestmark = pytest.mark.integration


@pytest.fixture
def served_model(local_stack, settings, store, agnews, tmp_path):
    """A registered version whose snapshot's train split holds 600 AG News rows; the rest are held out."""
    from mlflow import MlflowClient

    local_stack.require("mlflow")
    shuffled = agnews.sample(frac=1.0, random_state=0)
    train, held_out = shuffled.iloc[:600], shuffled.iloc[600:]
    snapshot_id = f"{settings.dataset}-snap"
    buf = io.BytesIO()
    train.to_parquet(buf, index=False)
    store.put_bytes(split_key(snapshot_id, "train"), buf.getvalue())
    version = register_export(settings, build_export(tmp_path / "export"), snapshot_id)
    MlflowClient(settings.mlflow_tracking_uri).set_model_version_tag(
        settings.registered_model, version, "snapshot_id", snapshot_id
    )
    return settings, version, held_out


def _log(store, settings, version, texts, labels, start: datetime) -> None:
    logger = PredictionLogger(store, writer_id="it-monitor")
    logger.append(
        [
            {
                "ts": start + timedelta(seconds=i),
                "request_id": f"r{i}",
                "text": text,
                "label": label,
                "score": 0.9,
                "model_name": settings.registered_model,
                "model_version": version,
            }
            for i, (text, label) in enumerate(zip(texts, labels, strict=True))
        ]
    )
    assert logger.flush_now() == len(texts)


# Hours of their own in the past, apart from each other: other tests' logs never fall into them.
BASE_HOUR = datetime(2025, 1, 1, tzinfo=UTC) + timedelta(
    hours=24 * random.Random(uuid.uuid4().int).randrange(300)
)


def _window(slot: int) -> datetime:
    return BASE_HOUR + timedelta(hours=3 * slot)


def test_drifted_traffic_is_detected_reported_and_recorded(served_model, store):
    from mlflow import MlflowClient

    settings, version, _ = served_model
    newsgroups = pd.read_csv(NEWSGROUPS).sample(300, random_state=0)
    start = _window(0)
    # what the AG News model would answer for posts it was never trained on (a stand-in): World
    _log(store, settings, version, newsgroups["text"].tolist(), ["World"] * 300, start)

    summary = check_window(settings, start, start + timedelta(hours=1), store=store)
    assert summary["verdict"] == "drift", summary
    assert summary["model"] == {"name": settings.registered_model, "version": version}
    assert summary["text"]["score"] > 0.8
    assert summary["rows"]["current"] == 300
    assert summary["reference_key"].endswith("/splits/train.parquet")
    assert "<html" in store.get_bytes(summary["report_key"]).decode()[:5000].lower()
    assert store.get_json(summary["summary_key"])["verdict"] == "drift"

    client = MlflowClient(settings.mlflow_tracking_uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert client.get_experiment(run.info.experiment_id).name == DRIFT_EXPERIMENT
    assert run.data.tags["verdict"] == "drift" and run.data.tags["model_version"] == version
    assert run.data.metrics["text_roc_auc"] == pytest.approx(summary["text"]["score"])


def test_same_distribution_traffic_is_not_drift(served_model, store):
    settings, version, held_out = served_model
    rows = held_out.head(300)
    start = _window(1)
    _log(store, settings, version, rows["text"].tolist(), rows["label"].tolist(), start)
    summary = check_window(settings, start, start + timedelta(hours=1), store=store)
    assert summary["verdict"] == "no_drift", summary


def test_too_little_traffic_gives_no_verdict(served_model, store):
    settings, version, held_out = served_model
    start = _window(2)
    _log(
        store,
        settings,
        version,
        held_out["text"].head(50).tolist(),
        held_out["label"].head(50).tolist(),
        start,
    )
    summary = check_window(settings, start, start + timedelta(hours=1), store=store)
    assert summary["verdict"] == "insufficient_data", summary
    assert summary["report_key"] is None

    empty = check_window(settings, _window(3), _window(3) + timedelta(hours=1), store=store)
    assert empty["verdict"] == "insufficient_data" and empty["served_rows"] == 0
