"""The whole local stack for real: MLflow stores artifacts in S3, Ray's Jobs API runs a job with
token auth on, and Airflow runs continuous_training on seeded data, quarantine included."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests

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


SMALL_TRAINING = {"batch_size": 8, "max_length": 32, "num_workers": 2, "zero_stage": 2}


def test_continuous_training_through_airflow(airflow, full_stack):
    """Run 1 trains, becomes champion and is deployed; run 2 (a worse, 0-epoch model) stays
    challenger and serving is untouched; run 3 finds no new data and skips. All asserted through
    Airflow, S3, MLflow and the service's HTTP API."""
    from mlflow import MlflowClient

    settings = Settings(dataset=f"it-dag-{uuid.uuid4().hex[:8]}")
    store = ObjectStore(settings)
    mlflow = MlflowClient(settings.mlflow_tracking_uri)
    today = datetime.now(UTC).date()
    seed_raw(settings, AGNEWS, batches=2, rows=200, end=today, bad_batch=True, store=store)

    conf = {"dataset": settings.dataset, "epochs": 1, "gate_min_macro_f1": 0.2, **SMALL_TRAINING}
    run_id = airflow.trigger(DAG_ID, conf=conf)
    run = airflow.wait_for_run(DAG_ID, run_id, timeout=1200)
    assert run["state"] == "success", airflow.task_states(DAG_ID, run_id)

    # extract + validate: snapshot, manifest, quarantine
    snapshot = airflow.xcom(DAG_ID, run_id, "extract")
    manifest = store.get_json(f"snapshots/{snapshot['snapshot_id']}/manifest.json")
    assert manifest["run_id"] == run_id
    assert manifest["dataset"] == settings.dataset
    assert len(manifest["batches"]) == 3
    assert all(o["sha256"] for o in manifest["objects"])
    validated = airflow.xcom(DAG_ID, run_id, "validate")
    bad = f"{today.isoformat()}_export-2"
    assert validated["quarantined"] == [bad]
    assert validated["rows"] == 200
    assert store.exists(f"quarantine/{settings.dataset}/{bad}/part-000.csv")
    assert store.exists(f"quarantine/{settings.dataset}/{bad}/_validation/{snapshot['snapshot_id']}.json")
    assert not store.exists(f"raw/{settings.dataset}/{bad}/part-000.csv")

    # train (Ray job, 2 workers, ZeRO-2) -> evaluate -> register: first model becomes champion
    summary = airflow.xcom(DAG_ID, run_id, "training_summary")
    assert summary["epochs_completed"] == 1
    first = airflow.xcom(DAG_ID, run_id, "register")
    assert first["promoted"] is True, first
    name = settings.registered_model
    champion = mlflow.get_model_version_by_alias(name, "champion")
    assert champion.version == first["version"] == "1"
    assert champion.run_id == summary["mlflow_run_id"]
    assert champion.tags["snapshot_id"] == snapshot["snapshot_id"]
    assert champion.tags["gate_decision"] == "promote"
    assert champion.tags["trigger_reason"] == "manual"
    training_run = mlflow.get_run(summary["mlflow_run_id"])
    assert training_run.data.params["zero_stage"] == "2" and training_run.data.params["num_workers"] == "2"
    assert {"val_macro_f1", "train_loss", "samples_per_second", "test_macro_f1"} <= set(
        training_run.data.metrics
    )
    artifacts = {a.path for a in mlflow.list_artifacts(summary["mlflow_run_id"], "evaluation")}
    assert "evaluation/confusion_matrix.png" in artifacts

    # deploy -> smoke test: the service answers with the new champion; MLflow marks it serving
    states = airflow.task_states(DAG_ID, run_id)
    assert states["deploy"] == states["smoke_test"] == "success", states
    smoke = airflow.xcom(DAG_ID, run_id, "smoke_test")
    assert smoke["version"] == "1" and smoke["compared_offline"] is True
    served = requests.post(f"{settings.serve_url}/v1/predict", json={"text": "Stocks fell."}, timeout=30)
    assert served.json()["model"] == {"name": name, "version": "1"}
    assert mlflow.get_model_version_by_alias(name, "serving").version == "1"

    # run 2: new data, a worse model (0 epochs = untrained head) -> challenger only
    seed_raw(settings, AGNEWS, batches=1, rows=120, end=today, store=store, batch_suffix="_more", seed=1)
    second = airflow.trigger(DAG_ID, conf={**conf, "epochs": 0})
    assert airflow.wait_for_run(DAG_ID, second, timeout=1200)["state"] == "success"
    outcome = airflow.xcom(DAG_ID, second, "register")
    assert outcome["promoted"] is False, outcome
    assert outcome["version"] == "2"
    assert mlflow.get_model_version_by_alias(name, "champion").version == "1"
    challenger = mlflow.get_model_version_by_alias(name, "challenger")
    assert challenger.version == "2"
    assert challenger.tags["gate_decision"] != "promote"
    # not promoted: serving untouched
    states = airflow.task_states(DAG_ID, second)
    assert states["deploy"] == states["smoke_test"] == "skipped", states
    served = requests.post(f"{settings.serve_url}/v1/predict", json={"text": "Stocks fell."}, timeout=30)
    assert served.json()["model"]["version"] == "1"

    # run 3: nothing new -> everything after extract is skipped, and the run still succeeds
    third = airflow.trigger(DAG_ID, conf={"dataset": settings.dataset})
    assert airflow.wait_for_run(DAG_ID, third, timeout=300)["state"] == "success"
    states = airflow.task_states(DAG_ID, third)
    assert states.pop("extract") == "skipped"
    assert set(states.values()) == {"skipped"}, states
