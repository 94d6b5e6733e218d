"""The Ray job operator's and trigger's state machine, against a scripted fake of the hook."""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
import types
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
import structlog
from airflow.sdk.exceptions import AirflowException, TaskDeferralError, TaskDeferralTimeout, TaskDeferred
from airflow.sdk.module_loading import import_string
from airflow.sdk.serde import deserialize, serialize

from ct_airflow.ray_job import (
    TERMINAL_STATES,
    RayJobHook,
    RayJobInfo,
    RayJobOperator,
    RayJobTrigger,
    ray_submission_id,
)

DAG_ID, RUN_ID, TASK_ID, KEY = "ct", "manual__2026-11-21T00:00:00+00:00", "train", "agnews-20261121-abc"


def job_id(try_number: int = 1) -> str:
    return ray_submission_id(
        dag_id=DAG_ID, run_id=RUN_ID, task_id=TASK_ID, submission_key=KEY, try_number=try_number
    )


@dataclass
class FakeTI:
    try_number: int = 1
    dag_id: str = DAG_ID
    run_id: str = RUN_ID
    task_id: str = TASK_ID
    map_index: int = -1
    xcom: dict[str, Any] = field(default_factory=dict)

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = value


class FakeHook:
    """Jobs by id; optionally a script of (status | None | Exception, log text) per poll."""

    def __init__(self, jobs: dict[str, str] | None = None, script: list[tuple[Any, str]] | None = None):
        self.jobs = {
            sid: RayJobInfo(sid, status, start_time=time.time()) for sid, status in (jobs or {}).items()
        }
        self.script = list(script or [])
        self.current_log: str | None = None
        self.submitted: list[dict[str, Any]] = []
        self.stopped: list[str] = []

    def job_info(self, submission_id: str) -> RayJobInfo | None:
        if self.script:
            state, self.current_log = self.script.pop(0)
            if isinstance(state, Exception):
                raise state
            return None if state is None else RayJobInfo(submission_id, state, message=f"job {state}")
        return self.jobs.get(submission_id)

    def logs(self, submission_id: str) -> str:
        if self.current_log is None:
            return f"log of {submission_id}\nlast line\n"
        return self.current_log

    def submit(self, **kwargs: Any) -> str:
        assert kwargs["submission_id"] not in self.jobs, "Ray refuses a duplicate submission_id"
        self.submitted.append(kwargs)
        self.jobs[kwargs["submission_id"]] = RayJobInfo(kwargs["submission_id"], "PENDING")
        return kwargs["submission_id"]

    def stop(self, submission_id: str) -> bool:
        self.stopped.append(submission_id)
        return True

    def dashboard_url(self, submission_id: str) -> str:
        return f"http://ray:8265/#/jobs/{submission_id}"


def make_operator(hook: FakeHook, **kwargs: Any) -> RayJobOperator:
    op = RayJobOperator(
        task_id=TASK_ID, entrypoint="python -m ml.train", submission_key=KEY, poll_interval=5, **kwargs
    )
    op.hook = hook  # the cached_property is the seam: no connection, no Ray
    return op


def make_trigger(hook: FakeHook, **kwargs: Any) -> RayJobTrigger:
    trigger = RayJobTrigger(submission_id=job_id(), **{"poll_interval": 0, **kwargs})
    trigger.hook = hook
    return trigger


def run_trigger(trigger: RayJobTrigger) -> tuple[list[dict[str, Any]], list[str]]:
    """All events the trigger yields, and the job log lines it wrote to the task log."""

    async def collect() -> list[dict[str, Any]]:
        return [event.payload async for event in trigger.run()]

    with structlog.testing.capture_logs() as records:
        events = asyncio.run(collect())
    # Airflow's structlog set-up formats "%s" arguments into the event before it is captured.
    lines = [r["event"].removeprefix("[ray] ") for r in records if r["event"].startswith("[ray] ")]
    return events, lines


# ---- submission ids -----------------------------------------------------------------------


def test_submission_id_is_deterministic_readable_and_ray_safe():
    sid = ray_submission_id(dag_id="d", run_id="r", task_id="group.train model/1", submission_key="k")
    assert sid == ray_submission_id(dag_id="d", run_id="r", task_id="group.train model/1", submission_key="k")
    assert re.fullmatch(r"ct-group-train-model-1-[0-9a-f]{16}", sid)
    assert ray_submission_id(dag_id="d", run_id="r", task_id="t", try_number=3).endswith("-try3")


@pytest.mark.parametrize(
    "changed",
    [{"dag_id": "d2"}, {"run_id": "r2"}, {"task_id": "t2"}, {"submission_key": "k2"}, {"map_index": 4}],
)
def test_submission_id_changes_with_every_input(changed):
    base = {"dag_id": "d", "run_id": "r", "task_id": "t", "submission_key": "k", "map_index": -1}
    assert ray_submission_id(**base) != ray_submission_id(**{**base, **changed})


# ---- execute: submit, re-attach or return -------------------------------------------------


@pytest.mark.parametrize(
    ("existing", "try_number", "expect_submitted", "expect_attached"),
    [
        pytest.param({}, 1, job_id(1), job_id(1), id="no-job-submits"),
        pytest.param({job_id(1): "RUNNING"}, 1, None, job_id(1), id="running-reattaches"),
        pytest.param({job_id(1): "PENDING"}, 1, None, job_id(1), id="pending-reattaches"),
        pytest.param({job_id(1): "RUNNING"}, 2, None, job_id(1), id="earlier-try-still-running"),
        pytest.param({job_id(1): "FAILED"}, 2, job_id(2), job_id(2), id="failed-try-gets-new-id"),
        pytest.param({job_id(1): "STOPPED"}, 2, job_id(2), job_id(2), id="stopped-try-gets-new-id"),
        pytest.param({job_id(1): "FAILED", job_id(2): "RUNNING"}, 3, None, job_id(2), id="latest-try-wins"),
        pytest.param({job_id(1): "FAILED", job_id(2): "FAILED"}, 3, job_id(3), job_id(3), id="third-try"),
    ],
)
def test_execute_submits_or_reattaches_then_defers(existing, try_number, expect_submitted, expect_attached):
    hook, ti = FakeHook(existing), FakeTI(try_number=try_number)
    op = make_operator(hook, job_timeout=timedelta(minutes=30))

    with pytest.raises(TaskDeferred) as deferred:
        op.execute({"ti": ti})

    assert [s["submission_id"] for s in hook.submitted] == ([expect_submitted] if expect_submitted else [])
    trigger = deferred.value.trigger
    assert isinstance(trigger, RayJobTrigger)
    assert trigger.submission_id == expect_attached
    assert deferred.value.method_name == "execute_complete"
    assert ti.xcom["submission_id"] == expect_attached
    # the trigger's own deadline comes first; Airflow's timeout is only a backstop behind it
    assert time.time() < trigger.deadline <= time.time() + 30 * 60
    assert deferred.value.timeout > timedelta(seconds=trigger.deadline - time.time())


def test_submission_carries_airflow_identity_and_job_settings():
    hook = FakeHook()
    op = make_operator(
        hook, runtime_env={"env_vars": {"A": "1"}}, entrypoint_num_cpus=1, metadata={"snapshot": KEY}
    )
    with pytest.raises(TaskDeferred):
        op.execute({"ti": FakeTI()})
    (submitted,) = hook.submitted
    assert submitted["entrypoint"] == "python -m ml.train"
    assert submitted["runtime_env"] == {"env_vars": {"A": "1"}}
    assert submitted["entrypoint_num_cpus"] == 1
    assert submitted["metadata"]["snapshot"] == KEY
    assert submitted["metadata"]["airflow_run_id"] == RUN_ID
    assert submitted["metadata"]["airflow_try_number"] == "1"


@pytest.mark.parametrize("try_number", [1, 2])
def test_succeeded_job_is_the_result_without_submit_or_defer(try_number):
    hook = FakeHook({job_id(1): "SUCCEEDED"})
    result = make_operator(hook).execute({"ti": FakeTI(try_number=try_number)})
    assert result == {"submission_id": job_id(1), "status": "SUCCEEDED"}
    assert hook.submitted == []


def test_same_try_whose_job_failed_reports_it_instead_of_resubmitting():
    hook = FakeHook({job_id(2): "FAILED"})
    with pytest.raises(AirflowException, match="FAILED") as err:
        make_operator(hook).execute({"ti": FakeTI(try_number=2)})
    assert job_id(2) in str(err.value)
    assert "last line" in str(err.value)
    assert hook.submitted == []


# ---- execute_complete ---------------------------------------------------------------------


def event(status: str, tail: str = "step 1\nTraceback: boom") -> dict[str, str]:
    return {"status": status, "submission_id": job_id(), "message": f"it {status}", "log_tail": tail}


def test_execute_complete_returns_the_result_on_success():
    op = make_operator(FakeHook())
    assert op.execute_complete({}, event("SUCCEEDED")) == {"submission_id": job_id(), "status": "SUCCEEDED"}


@pytest.mark.parametrize("status", ["FAILED", "STOPPED", "TIMEOUT", "ERROR"])
def test_execute_complete_raises_with_status_id_and_log_tail(status):
    op = make_operator(FakeHook())
    with pytest.raises(AirflowException) as err:
        op.execute_complete({}, event(status))
    message = str(err.value)
    assert status in message
    assert job_id() in message
    assert "Traceback: boom" in message


# ---- stopping the job ---------------------------------------------------------------------


def test_on_kill_stops_the_submitted_job():
    hook = FakeHook()
    op = make_operator(hook)
    op.on_kill()  # nothing submitted yet: nothing to stop
    assert hook.stopped == []
    with pytest.raises(TaskDeferred):
        op.execute({"ti": FakeTI()})
    op.on_kill()
    assert hook.stopped == [job_id()]


@pytest.mark.parametrize(
    ("error", "raised"), [("Trigger timeout", TaskDeferralTimeout), ("Trigger failure", TaskDeferralError)]
)
def test_airflow_deferral_failure_stops_the_running_job(error, raised):
    hook = FakeHook({job_id(1): "RUNNING"})
    with pytest.raises(raised):
        make_operator(hook).resume_execution("__fail__", {"error": error}, {"ti": FakeTI()})
    assert hook.stopped == [job_id(1)]


# ---- the trigger ----------------------------------------------------------------------------

LOG_1 = "Running entrypoint\nepoch 1"  # "epoch 1" is still being written
LOG_2 = LOG_1 + " loss=0.9\nepoch 2 loss=0.5\n"
LOG_3 = LOG_2 + "done"


@pytest.mark.parametrize("final", sorted(TERMINAL_STATES))
def test_trigger_streams_each_log_line_once_in_order_and_fires_one_event(final):
    script = [("PENDING", ""), ("RUNNING", LOG_1), ("RUNNING", LOG_1), ("RUNNING", LOG_2), (final, LOG_3)]
    hook = FakeHook(script=script)
    events, lines = run_trigger(make_trigger(hook, log_tail_lines=2))

    assert lines == ["Running entrypoint", "epoch 1 loss=0.9", "epoch 2 loss=0.5", "done"]
    assert events == [
        {
            "status": final,
            "submission_id": job_id(),
            "message": f"job {final}",
            "log_tail": "epoch 2 loss=0.5\ndone",
        }
    ]
    assert hook.script == []
    assert hook.stopped == []


def test_trigger_rides_out_short_outages():
    # two outages of two failed polls each: only failures in a row count against the limit
    down, gone = (ConnectionError("refused"), ""), (None, "")
    script = [("RUNNING", "a\n"), down, gone, ("RUNNING", "a\n"), gone, down, ("SUCCEEDED", "a\nb\n")]
    events, lines = run_trigger(make_trigger(FakeHook(script=script), max_poll_errors=3))
    assert [e["status"] for e in events] == ["SUCCEEDED"]
    assert lines == ["a", "b"]


@pytest.mark.parametrize(
    ("failure", "expected"),
    [(ConnectionError("connection refused"), "connection refused"), (None, "no job")],
    ids=["cluster-unreachable", "job-vanished"],
)
def test_trigger_gives_up_after_too_many_failed_polls(failure, expected):
    script = [("RUNNING", "started\n")] + [(failure, "")] * 3 + [("SUCCEEDED", "never seen\n")]
    hook = FakeHook(script=script)
    events, _ = run_trigger(make_trigger(hook, max_poll_errors=3))
    assert len(events) == 1
    assert events[0]["status"] == "ERROR"
    assert expected in events[0]["message"]
    assert events[0]["log_tail"] == "started"
    assert hook.script == [("SUCCEEDED", "never seen\n")]


def test_trigger_stops_the_job_at_its_deadline():
    hook = FakeHook(script=[("RUNNING", "step 1\n")] * 1000)
    trigger = make_trigger(hook, poll_interval=0.01, deadline=time.time() + 0.2)
    events, lines = run_trigger(trigger)
    assert hook.stopped == [job_id()]
    assert len(events) == 1
    assert events[0]["status"] == "TIMEOUT"
    assert lines == ["step 1"]
    assert len(hook.script) > 900, "the trigger should wait poll_interval between polls"


def test_trigger_on_kill_stops_the_job():
    # Airflow 3.3 calls a trigger's on_kill when a user fails/clears the task while it is deferred
    hook = FakeHook({job_id(): "RUNNING"})
    asyncio.run(make_trigger(hook).on_kill())
    assert hook.stopped == [job_id()]


def test_trigger_does_not_block_the_event_loop():
    class SlowHook(FakeHook):
        def job_info(self, submission_id: str) -> RayJobInfo | None:
            time.sleep(0.3)  # a slow HTTP request
            return super().job_info(submission_id)

    trigger = make_trigger(SlowHook(script=[("SUCCEEDED", "ok\n")]))
    ticks = 0

    async def main() -> None:
        nonlocal ticks

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        tick_task = asyncio.create_task(ticker())
        [_event] = [e async for e in trigger.run()]
        tick_task.cancel()

    asyncio.run(main())
    assert ticks >= 10, "the event loop stalled while the hook was busy"


def test_trigger_serialize_round_trips_through_airflow_serde():
    trigger = RayJobTrigger(
        submission_id=job_id(), ray_conn_id="ray_prod", poll_interval=3, deadline=1.8e9, log_tail_lines=5
    )
    classpath, kwargs = trigger.serialize()
    assert classpath == "ct_airflow.ray_job.RayJobTrigger"
    rebuilt = import_string(classpath)(**deserialize(serialize(kwargs)))
    assert rebuilt.serialize() == (classpath, kwargs)


# ---- the hook ---------------------------------------------------------------------------------


class FakeJobsClient:
    """Stands in for ray.job_submission.JobSubmissionClient: answers, or raises like it does."""

    def __init__(self, error: Exception | None = None):
        self.error = error

    def get_job_info(self, submission_id: str) -> Any:
        if self.error:
            raise self.error
        return types.SimpleNamespace(
            status="RUNNING", message="Job is running.", start_time=1_700_000_000_500
        )

    def stop_job(self, submission_id: str) -> bool:
        if self.error:
            raise self.error
        return True


def test_hook_address_comes_from_the_connection(monkeypatch):
    conn = {"conn_type": "http", "host": "ray-head", "port": 8265, "schema": "https"}
    monkeypatch.setenv("AIRFLOW_CONN_RAY_PROD", json.dumps(conn))
    hook = RayJobHook("ray_prod")
    assert hook.address == "https://ray-head:8265"
    assert hook.dashboard_url("ct-x") == "https://ray-head:8265/#/jobs/ct-x"


def test_hook_falls_back_to_the_ct_ray_address_setting(monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_RAY_MISSING", raising=False)
    monkeypatch.setenv("CT_RAY_ADDRESS", "http://10.1.2.3:8265/")
    assert RayJobHook("ray_missing").address == "http://10.1.2.3:8265"


@pytest.mark.parametrize(
    ("password", "headers"), [("s3cret", {"Authorization": "Bearer s3cret"}), (None, None)]
)
def test_hook_sends_a_connection_password_as_the_ray_token(monkeypatch, password, headers):
    conn = {"conn_type": "http", "host": "ray-head", "port": 8265, "password": password}
    monkeypatch.setenv("AIRFLOW_CONN_RAY_PROD", json.dumps(conn))
    calls = []
    fake_module = types.SimpleNamespace(
        JobSubmissionClient=lambda address, headers: calls.append((address, headers))
    )
    monkeypatch.setitem(sys.modules, "ray.job_submission", fake_module)
    RayJobHook("ray_prod").client  # noqa: B018 - building the client is the behaviour under test
    assert calls == [("http://ray-head:8265", headers)]


def test_hook_maps_ray_answers():
    hook = RayJobHook()
    hook.client = FakeJobsClient()
    assert hook.job_info("ct-x") == RayJobInfo("ct-x", "RUNNING", "Job is running.", 1_700_000_000.5)
    assert hook.status("ct-x") == "RUNNING"
    assert hook.stop("ct-x") is True


def test_hook_treats_404_as_no_such_job_and_raises_other_errors():
    hook = RayJobHook()
    hook.client = FakeJobsClient(
        RuntimeError("Request failed with status code 404: Job ct-x does not exist.")
    )
    assert hook.job_info("ct-x") is None
    assert hook.status("ct-x") is None
    assert hook.stop("ct-x") is False
    hook.client = FakeJobsClient(RuntimeError("Request failed with status code 500: boom"))
    with pytest.raises(RuntimeError, match="500"):
        hook.job_info("ct-x")
