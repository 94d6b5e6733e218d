"""The whole local stack for real: MLflow stores artifacts in S3, Ray's Jobs API runs a job with
token auth on, and Airflow runs continuous_training on seeded data, quarantine included."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ml.seed import seed_raw
from ml.settings import Settings
from ml.storage import ObjectStore
from tests.conftest import AGNEWS
from tests.integration.conftest import stack

pytestmark = pytest.mark.integration

DAG_ID = "continuous_training"


@pytest.fixture(scope="module")
def full_stack(local_stack) -> dict[str, str]:
    local_stack.require("s3", "mlflow", "ray", "airflow")
    return stack.service_env()


@pytest.fixture(scope="module")
def airflow(full_stack):
    from airflow_client import AirflowClient

    client = AirflowClient("http://127.0.0.1:8080", *stack.airflow_login())
    client.wait_for_dag(DAG_ID)
    client.unpause(DAG_ID)
    return client


def test_mlflow_keeps_artifacts_in_s3(full_stack, tmp_path):
    import mlflow

    settings = Settings()
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_experiment(f"it-{uuid.uuid4().hex[:8]}")
    note = tmp_path / "note.txt"
    note.write_text("stored through the tracking server")
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(note))
    keys = [o.key for o in ObjectStore(settings, settings.mlflow_bucket).list("")]
    assert any(k.endswith(f"{run.info.run_id}/artifacts/note.txt") for k in keys), keys[-5:]
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="note.txt")
    assert Path(local).read_text() == "stored through the tracking server"


def test_ray_jobs_api_runs_a_job_and_requires_the_token(full_stack):
    import requests
    from ray.job_submission import JobStatus, JobSubmissionClient

    settings = Settings()
    # without the token the dashboard refuses the Jobs API
    assert requests.get(f"{settings.ray_address}/api/jobs/", timeout=10).status_code in {401, 403}

    client = JobSubmissionClient(settings.ray_address)
    job_id = client.submit_job(entrypoint="python -c \"print('hello from ray')\"")
    deadline = time.monotonic() + 120
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED}:
        assert time.monotonic() < deadline, f"job still {status}"
        time.sleep(1)
    assert status == JobStatus.SUCCEEDED, client.get_job_logs(job_id)
    assert "hello from ray" in client.get_job_logs(job_id)


def test_continuous_training_through_airflow(airflow, full_stack):
    settings = Settings(dataset=f"it-dag-{uuid.uuid4().hex[:8]}")
    store = ObjectStore(settings)
    today = datetime.now(UTC).date()
    seed_raw(settings, AGNEWS, batches=3, rows=120, end=today, bad_batch=True, store=store)

    run_id = airflow.trigger(DAG_ID, conf={"dataset": settings.dataset})
    run = airflow.wait_for_run(DAG_ID, run_id, timeout=600)
    assert run["state"] == "success", airflow.task_states(DAG_ID, run_id)

    snapshot = airflow.xcom(DAG_ID, run_id, "extract")
    manifest = store.get_json(f"snapshots/{snapshot['snapshot_id']}/manifest.json")
    assert manifest["run_id"] == run_id
    assert manifest["dataset"] == settings.dataset
    assert len(manifest["batches"]) == 4
    assert all(o["sha256"] for o in manifest["objects"])
    assert store.exists(f"snapshots/{snapshot['snapshot_id']}/validated.parquet")

    gate = airflow.xcom(DAG_ID, run_id, "validate")
    bad = f"{today.isoformat()}_export-2"
    assert gate["quarantined"] == [bad]
    assert gate["rows"] == 120
    assert store.exists(f"quarantine/{settings.dataset}/{bad}/part-000.csv")
    assert store.exists(f"quarantine/{settings.dataset}/{bad}/_validation/{snapshot['snapshot_id']}.json")
    assert not store.exists(f"raw/{settings.dataset}/{bad}/part-000.csv")

    # nothing new: the next run skips everything after extract and still counts as a success
    second = airflow.trigger(DAG_ID, conf={"dataset": settings.dataset})
    assert airflow.wait_for_run(DAG_ID, second, timeout=300)["state"] == "success"
    assert airflow.task_states(DAG_ID, second) == {"extract": "skipped", "validate": "skipped"}
