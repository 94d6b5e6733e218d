"""Data survives a restart of the local stack (`make down && make up`): an S3 object, a registered
model version with its alias and artifacts, and the version still loads in Ray Serve and answers
/v1/predict afterwards.

The test stops and starts S3 (SeaweedFS), MLflow and Ray the way `stack.py down` / `up` do, in
the stack's order; Airflow, which holds none of this data, is left as it is. The model is
registered before the restart and deployed only after it, so the Serve replica loads it from the
restarted MLflow and S3, not from a process that outlived the restart. Serve is put back as the
test found it.
"""

from __future__ import annotations

import time
import uuid

import pytest
import requests

from ml.registry import CHAMPION
from ml.rollout import ServeDeployer
from ml.settings import Settings
from ml.storage import ObjectStore
from tests.integration.conftest import restore_serve, stack
from tests.model_factory import LABELS, build_export, register_export

pytestmark = pytest.mark.integration

RESTARTED = ["s3", "mlflow", "ray"]


def _model_objects(settings: Settings, model_id: str) -> dict[str, str]:
    """key -> etag of every object of a logged model in the artifact bucket."""
    artifacts = ObjectStore(settings, settings.mlflow_bucket)
    return {o.key: o.etag for o in artifacts.list("") if model_id in o.key}


def test_objects_models_and_serving_survive_a_restart(local_stack, tmp_path, agnews):
    from mlflow import MlflowClient

    local_stack.require(*RESTARTED)
    settings = Settings(
        dataset=f"it-{uuid.uuid4().hex[:10]}", registered_model=f"it-persist-{uuid.uuid4().hex[:8]}"
    )
    store = ObjectStore(settings)
    key = f"raw/{settings.dataset}/2026-01-01/part-000.csv"
    body = b"text,label\nkept across restarts,World\n"
    etag = store.put_bytes(key, body, "text/csv")

    export = build_export(tmp_path / "export")
    version = register_export(settings, export)
    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    client.set_registered_model_alias(settings.registered_model, CHAMPION, version)
    before = client.get_model_version(settings.registered_model, version)
    model_id = before.source.removeprefix("models:/")  # MLflow 3: the logged model's id (m-...)
    artifacts_before = _model_objects(settings, model_id)
    assert any(k.endswith("model.safetensors") for k in artifacts_before), artifacts_before

    deployer = ServeDeployer(settings, timeout_s=600, poll_s=2)
    serve_before = deployer.current_config()

    started = time.monotonic()
    stack.down(RESTARTED)
    assert not any(stack.is_healthy(name) for name in RESTARTED)
    stack.up(RESTARTED)
    restart_s = time.monotonic() - started
    try:
        # the S3 object, byte for byte
        assert store.get_bytes(key) == body
        assert store.stat(key).etag == etag

        # the registry: the version, its alias, its run and every artifact object
        client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
        after = client.get_model_version(settings.registered_model, version)
        assert (after.run_id, after.source, after.status) == (before.run_id, before.source, "READY")
        assert client.get_model_version_by_alias(settings.registered_model, CHAMPION).version == version
        assert _model_objects(settings, model_id) == artifacts_before  # same keys, same etags

        # a fresh Serve replica loads the version through the restarted MLflow and S3, and answers
        result = deployer.deploy(version)
        assert result["version"] == version
        texts = agnews["text"].head(4).tolist()
        resp = requests.post(f"{deployer.serve_url}/v1/predict", json={"texts": texts}, timeout=60)
        assert resp.status_code == 200, resp.text[:500]
        answer = resp.json()
        assert answer["model"]["name"] == settings.registered_model and answer["model"]["version"] == version
        assert len(answer["predictions"]) == 4 and {p["label"] for p in answer["predictions"]} <= set(LABELS)
    finally:
        restore_serve(deployer, serve_before)
    print(f"restart of {RESTARTED}: {restart_s:.0f} s")
