"""Ray Train + DeepSpeed on the real local Ray cluster: a worker killed after the first checkpoint
makes the job resume from that checkpoint, and the export holds no pickles."""

from __future__ import annotations

import shlex
import time
import uuid
from datetime import UTC, datetime

import pytest

from ml.extract import extract_snapshot
from ml.seed import seed_raw
from ml.settings import Settings, settings_env
from ml.storage import ObjectStore
from ml.train import INJECTED_FAILURE, TrainConfig
from ml.validate import validate_snapshot
from tests.conftest import AGNEWS

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_stack(local_stack) -> None:
    local_stack.require("s3", "mlflow", "ray")


def wait_for_job(client, job_id: str, timeout: float = 900) -> str:
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout
    while (status := client.get_job_status(job_id)) not in {
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.STOPPED,
    }:
        assert time.monotonic() < deadline, f"job {job_id} still {status}"
        time.sleep(3)
    return str(status.value)


def test_training_resumes_from_the_last_checkpoint_after_a_worker_dies(ray_stack):
    from mlflow import MlflowClient
    from ray.job_submission import JobSubmissionClient

    settings = Settings(dataset=f"it-train-{uuid.uuid4().hex[:8]}")
    store = ObjectStore(settings)
    seed_raw(settings, AGNEWS, batches=2, rows=160, end=datetime.now(UTC).date(), store=store)
    manifest = extract_snapshot(settings, run_id="resume-test", cutoff=datetime.now(UTC), store=store)
    validate_snapshot(settings, manifest["snapshot_id"], store=store)

    config = TrainConfig(
        snapshot_id=manifest["snapshot_id"],
        run_name=f"{manifest['snapshot_id']}-resume",
        epochs=2,
        batch_size=8,
        max_length=32,
        num_workers=2,
        zero_stage=2,  # sharded optimizer state: every rank checkpoints its own shard
        early_stopping_patience=5,
        fail_after_epoch=1,
    )
    result_key = f"training/{config.run_name}/result.json"
    client = JobSubmissionClient(settings.ray_address)
    job_id = client.submit_job(
        entrypoint=f"python -m ml.train --config {shlex.quote(config.model_dump_json())} "
        f"--result-key {result_key}",
        runtime_env={"env_vars": settings_env(settings)},
    )
    status = wait_for_job(client, job_id)
    logs = client.get_job_logs(job_id)
    assert status == "SUCCEEDED", logs[-4000:]

    # the failure really happened after epoch 1's checkpoint, and the new worker group resumed
    assert INJECTED_FAILURE in logs
    assert "resumed from checkpoint after epoch 1" in logs
    result = store.get_json(result_key)
    assert [m["epoch"] for m in result["history"]] == [1, 2]
    assert result["epochs_completed"] == 2
    # checkpoints of both epochs from all ranks (ZeRO-2 optimizer shards) are in S3
    shards = [o.key for o in store.list(f"ray-results/{config.run_name}/") if "optim_states" in o.key]
    assert len(shards) >= 4, shards

    # metrics per epoch on the MLflow run; the exported model is safetensors, no pickles
    mlflow = MlflowClient(settings.mlflow_tracking_uri)
    history = mlflow.get_metric_history(result["mlflow_run_id"], "val_macro_f1")
    assert sorted(m.step for m in history) == [1, 2]
    run = mlflow.get_run(result["mlflow_run_id"])
    assert run.data.tags["snapshot_id"] == manifest["snapshot_id"]
    assert run.data.params["zero_stage"] == "2"
    files = _artifact_files(mlflow, result["mlflow_run_id"], result["model_uri"])
    assert any(f.endswith("model.safetensors") for f in files), files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl", ".pickle"))], files


def _artifact_files(client, run_id: str, model_uri: str) -> list[str]:
    import mlflow

    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri)
    from pathlib import Path

    return [str(p.relative_to(local)) for p in Path(local).rglob("*") if p.is_file()]
