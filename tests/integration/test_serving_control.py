"""``serving_control`` through Airflow on the real stack: a rollback under load fails no request,
takes under 30 s, moves ``champion`` and ``serving`` together and is recorded in the history.

Two versions of a fresh model (its own dataset, so its own Serve application) are served one
after the other with the CLI's code (``pin``), so the history knows what served before; then the
DAG is triggered with ``rollback`` while client threads keep sending requests to the model's route.
"""

from __future__ import annotations

import time
import uuid

import pytest

from ml.registry import CHAMPION, SERVING
from ml.rollout import ServeDeployer
from ml.serving_control import run_control
from ml.serving_history import read
from ml.settings import Settings
from tests.integration.conftest import restore_serve, stack
from tests.integration.test_serving import Traffic
from tests.model_factory import build_export, register_export, rotate_head

pytestmark = pytest.mark.integration

DAG_ID = "serving_control"
TEXTS = [
    "Stocks fell as oil prices rose for a third day.",
    "The champions lost at home in extra time.",
    "A new phone chip doubles battery life.",
    "Ministers met to discuss the border talks.",
]


@pytest.fixture(scope="module")
def airflow(local_stack):
    from airflow_client import AirflowClient

    local_stack.require("s3", "mlflow", "ray", "airflow")
    client = AirflowClient("http://127.0.0.1:8080", *stack.airflow_login())
    client.wait_for_dag(DAG_ID)
    client.unpause(DAG_ID)
    yield client
    client.pause(DAG_ID)


def test_rollback_through_the_dag_under_load(airflow, tmp_path):
    from mlflow import MlflowClient

    settings = Settings(dataset=f"it-ctl-{uuid.uuid4().hex[:8]}")
    good = build_export(tmp_path / "good")
    v1 = register_export(settings, good)
    v2 = register_export(settings, rotate_head(good, tmp_path / "rotated"))
    deployer = ServeDeployer(settings, timeout_s=300, poll_s=1)
    before = deployer.current_config()
    try:
        run_control(settings, "pin", "it: first version", actor="it", version=v1, deployer=deployer)
        run_control(settings, "pin", "it: second version", actor="it", version=v2, deployer=deployer)
        assert deployer.serving().version == v2

        with Traffic(TEXTS, url=f"{deployer.serve_url}/v1/predict") as load:
            time.sleep(3)  # traffic flows before the rollback starts
            run_id = airflow.trigger(
                DAG_ID,
                conf={
                    "dataset": settings.dataset,
                    "action": "rollback",
                    "reason": "it: <b>v2</b> misbehaves",
                },
            )
            state = airflow.wait_for_run(DAG_ID, run_id, timeout=300)["state"]
            clicked_done = time.monotonic()
            time.sleep(3)  # and keeps flowing after it
        log = airflow.task_log(DAG_ID, run_id, "apply")
        assert state == "success", log[-3000:]

        failed = load.failed
        assert load.results and not failed, (
            f"{len(failed)} of {len(load.results)} requests failed: {failed[:5]}"
        )
        assert load.versions_sent_after(clicked_done) == {v1}, "v1 answers after the rollback"

        entry = read(settings, settings.registered_model)[-1]
        assert entry["action"] == "rollback" and entry["result"] == "ok"
        assert (entry["from_version"], entry["to_version"]) == (v2, v1)
        assert entry["reason"] == "it: <b>v2</b> misbehaves"
        assert run_id in entry["actor"]
        assert entry["seconds"] < 30, f"the rollback took {entry['seconds']} s"

        client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
        name = settings.registered_model
        assert client.get_model_version_by_alias(name, CHAMPION).version == v1
        assert client.get_model_version_by_alias(name, SERVING).version == v1

        # a pin of a version that does not exist fails in plan and changes nothing
        missing = airflow.trigger(
            DAG_ID,
            conf={"dataset": settings.dataset, "action": "pin", "version": 999, "reason": "it: no such"},
        )
        assert airflow.wait_for_run(DAG_ID, missing, timeout=180)["state"] == "failed"
        assert airflow.task_states(DAG_ID, missing)["apply"] in {"upstream_failed", None}
        assert deployer.serving().version == v1
    finally:
        restore_serve(deployer, before)
