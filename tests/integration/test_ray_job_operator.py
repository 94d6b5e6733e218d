"""RayJobOperator against the real Ray head (token auth on): one job per task instance, the job's
log streamed into the task log, failures raised with the log tail, and `airflow dags test`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog
from airflow.sdk.exceptions import AirflowException, TaskDeferred

from ct_airflow.ray_job import RayJobOperator
from ml.settings import Settings
from tests.conftest import REPO_ROOT
from tests.integration.conftest import stack

pytestmark = pytest.mark.integration

AIRFLOW = str(Path(sys.executable).parent / "airflow")
TWO_LINES = "python -c \"import time; print('line one'); time.sleep(1); print('line two')\""
FAILING = "python -c \"import sys; print('boom'); sys.exit(3)\""


@pytest.fixture(scope="module", autouse=True)
def airflow_home(tmp_path_factory) -> Iterator[tuple[dict[str, str], subprocess.Popen]]:
    """An empty Airflow home whose SQLite DB `airflow db migrate` prepares (~12 s) in the
    background while the other tests wait on Ray; the `dags test` test waits for it."""
    home = tmp_path_factory.mktemp("airflow")
    dags = home / "dags"
    dags.mkdir()
    env = {
        **os.environ,
        **stack.service_env(),
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW_CONN_CT_RAY": json.dumps({"conn_type": "http", "host": "127.0.0.1", "port": 8265}),
        "PYTHONPATH": str(REPO_ROOT),
    }
    migrate = subprocess.Popen(
        [AIRFLOW, "db", "migrate"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        yield env, migrate
    finally:
        if migrate.poll() is None:
            migrate.kill()
        migrate.communicate()


@pytest.fixture(scope="module")
def ray_client(local_stack):
    local_stack.require("ray")
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(Settings().ray_address)


@dataclass
class TaskInstance:
    """The part of Airflow's RuntimeTaskInstance the operator uses."""

    run_id: str = field(default_factory=lambda: f"it__{uuid.uuid4().hex[:12]}")
    dag_id: str = "it_ray_job"
    task_id: str = "job"
    map_index: int = -1
    try_number: int = 1
    xcom: dict[str, Any] = field(default_factory=dict)

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = value


def operator(entrypoint: str) -> RayJobOperator:
    # no ct_ray connection in this process: the hook falls back to CT_RAY_ADDRESS (127.0.0.1)
    return RayJobOperator(task_id="job", entrypoint=entrypoint, submission_key="it", poll_interval=0.5)


def run_trigger(trigger) -> tuple[list[dict[str, Any]], list[str]]:
    async def collect() -> list[dict[str, Any]]:
        return [event.payload async for event in trigger.run()]

    with structlog.testing.capture_logs() as records:
        events = asyncio.run(asyncio.wait_for(collect(), timeout=90))
    return events, [r["event"].removeprefix("[ray] ") for r in records if r["event"].startswith("[ray] ")]


def jobs_with_id(ray_client, submission_id: str) -> list[Any]:
    return [job for job in ray_client.list_jobs() if job.submission_id == submission_id]


def test_job_runs_once_and_a_second_execute_reattaches(ray_client):
    ti = TaskInstance()
    with pytest.raises(TaskDeferred) as first:
        operator(TWO_LINES).execute({"ti": ti})
    submission_id = first.value.trigger.submission_id
    assert ti.xcom["submission_id"] == submission_id

    # the same task instance executed again while the job runs (a worker restart): same job
    with pytest.raises(TaskDeferred) as second:
        operator(TWO_LINES).execute({"ti": ti})
    assert second.value.trigger.submission_id == submission_id

    events, lines = run_trigger(second.value.trigger)
    assert [e["status"] for e in events] == ["SUCCEEDED"]
    assert lines.index("line one") < lines.index("line two")
    assert lines.count("line one") == lines.count("line two") == 1
    result = operator(TWO_LINES).execute_complete({"ti": ti}, events[0])
    assert result == {"submission_id": submission_id, "status": "SUCCEEDED"}

    # and once more after it succeeded: the result, still without a new submission
    assert operator(TWO_LINES).execute({"ti": ti}) == result
    [job] = jobs_with_id(ray_client, submission_id)
    assert job.metadata["airflow_run_id"] == ti.run_id


def test_failing_job_raises_with_status_and_log_tail(ray_client):
    ti = TaskInstance()
    op = operator(FAILING)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({"ti": ti})
    events, lines = run_trigger(deferred.value.trigger)
    assert [e["status"] for e in events] == ["FAILED"]
    assert "boom" in lines

    with pytest.raises(AirflowException) as err:
        op.execute_complete({"ti": ti}, events[0])
    message = str(err.value)
    assert "FAILED" in message
    assert deferred.value.trigger.submission_id in message
    assert "boom" in message

    # the retry (try 2) gets a job of its own instead of re-reading the failed one
    with pytest.raises(TaskDeferred) as retry:
        operator(FAILING).execute({"ti": TaskInstance(run_id=ti.run_id, try_number=2)})
    assert retry.value.trigger.submission_id == f"{deferred.value.trigger.submission_id}-try2"
    ray_client.stop_job(retry.value.trigger.submission_id)


DAG_FILE = """
from datetime import timedelta

from airflow.sdk import DAG

from ct_airflow.ray_job import RayJobOperator

with DAG("{dag_id}", schedule=None, catchup=False):
    RayJobOperator(
        task_id="job",
        entrypoint={entrypoint!r},
        submission_key="{{{{ dag_run.conf['key'] }}}}",
        poll_interval=0.5,
        job_timeout=timedelta(minutes=2),
    )
"""


def test_dags_test_runs_the_job_and_streams_its_log(ray_client, airflow_home):
    """`airflow dags test` runs the trigger inline, as a user would try the DAG locally."""
    env, migrate = airflow_home
    output, _ = migrate.communicate(timeout=180)
    assert migrate.returncode == 0, output[-3000:]
    dag_id = f"it_ray_job_{uuid.uuid4().hex[:8]}"
    dag_file = Path(env["AIRFLOW__CORE__DAGS_FOLDER"]) / f"{dag_id}.py"
    dag_file.write_text(DAG_FILE.format(dag_id=dag_id, entrypoint=TWO_LINES))

    out = subprocess.run(
        [AIRFLOW, "dags", "test", dag_id, "-c", json.dumps({"key": "snapshot-1"})],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "state=success" in log, log[-4000:]
    assert log.index("[ray] line one") < log.index("[ray] line two"), "job log not streamed"
    assert "submitted Ray job ct-job-" in log

    [job] = [j for j in ray_client.list_jobs() if (j.metadata or {}).get("airflow_dag_id") == dag_id]
    assert job.status == "SUCCEEDED"
    assert job.metadata["submission_key"] == "snapshot-1"  # the templated key was rendered

    # this DAG run's task executed again (same run id, as a retry would): no second job
    ti = TaskInstance(dag_id=dag_id, run_id=job.metadata["airflow_run_id"], try_number=2)
    again = RayJobOperator(task_id="job", entrypoint=TWO_LINES, submission_key="snapshot-1")
    assert again.execute({"ti": ti}) == {"submission_id": job.submission_id, "status": "SUCCEEDED"}
    assert len(jobs_with_id(ray_client, job.submission_id)) == 1
