"""The small Airflow-side helpers: failure messages, asset-event datasets, drift tags, report keys."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "plugins"))
sys.path.insert(0, str(REPO_ROOT / "dags"))


def test_failure_message_names_stage_error_and_fix():
    from ct_airflow.failures import failure_message

    error = ValueError("validation quarantined 3/3 batches: column 'label' missing")
    text = failure_message("validate", error)
    assert text.startswith("stage 'validate' (data validation (Great Expectations)) failed: validation")
    assert "what to do: read the failed expectations" in text
    assert "what to do: see the error above" in failure_message("some_new_task", None)


def test_dataset_comes_from_the_newest_raw_data_event():
    from ct_airflow.assets import dataset_from_events

    older = SimpleNamespace(extra={"dataset": "a"}, timestamp=datetime(2026, 11, 1, tzinfo=UTC))
    newer = SimpleNamespace(extra={"dataset": "b"}, timestamp=datetime(2026, 11, 2, tzinfo=UTC))
    unnamed = SimpleNamespace(extra={}, timestamp=datetime(2026, 11, 3, tzinfo=UTC))
    assert dataset_from_events({"ct_raw_data": [older, newer, unnamed]}) == "b"
    assert dataset_from_events({}) is None
    assert dataset_from_events(None) is None


def test_drift_conf_becomes_tags_and_reason():
    from continuous_training import trigger_reason, trigger_tags

    drift = SimpleNamespace(
        run_type="manual",
        conf={"reason": "drift", "drift_score": 1.4, "report": "reports/drift/m/x/report.html", "epochs": 1},
    )
    assert trigger_reason(drift) == "drift"
    assert trigger_tags(drift) == {"drift_score": "1.4", "drift_report": "reports/drift/m/x/report.html"}
    scheduled = SimpleNamespace(run_type=SimpleNamespace(value="scheduled"), conf={})
    assert (trigger_reason(scheduled), trigger_tags(scheduled)) == ("scheduled", {})


@pytest.mark.parametrize(
    "key",
    [
        "raw/agnews/2026-11-20/part-000.csv",
        "quarantine/agnews/batch-1/part-000.csv",
        "snapshots/x/validated.parquet",
        "reports/../raw/agnews/x.csv",
        "predictions/dt=2026-11-21/hour=10/a.parquet",
    ],
)
def test_report_viewer_serves_reports_only(key):
    from ct_reports_plugin import report_response
    from fastapi import HTTPException

    with pytest.raises(HTTPException) as err:
        report_response(key)
    assert err.value.status_code == 404


def test_dag_defaults_from_the_environment(monkeypatch):
    from ct_airflow.dag_defaults import env_flag, env_int

    monkeypatch.delenv("CT_TRAIN_NUM_WORKERS", raising=False)
    assert env_int("CT_TRAIN_NUM_WORKERS", 2) == 2
    monkeypatch.setenv("CT_TRAIN_NUM_WORKERS", "4")
    assert env_int("CT_TRAIN_NUM_WORKERS", 2) == 4
    monkeypatch.setenv("CT_TRAIN_NUM_WORKERS", "four")
    with pytest.raises(ValueError, match="CT_TRAIN_NUM_WORKERS must be an integer, got 'four'"):
        env_int("CT_TRAIN_NUM_WORKERS", 2)
    for value, expected in [("true", True), ("1", True), ("No", False), ("", True)]:
        monkeypatch.setenv("CT_TRAIN_USE_GPU", value)
        assert env_flag("CT_TRAIN_USE_GPU", True) is expected
    monkeypatch.setenv("CT_TRAIN_USE_GPU", "gpu")
    with pytest.raises(ValueError, match="CT_TRAIN_USE_GPU must be true or false"):
        env_flag("CT_TRAIN_USE_GPU", False)
