"""Run a Ray job from Airflow 3: submit it once, defer while it runs, stream its log.

No maintained Ray provider supports Airflow 3, so this module holds the three pieces:

- :class:`RayJobHook` talks to the Ray Jobs API (the dashboard, connection ``ct_ray``).
- :class:`RayJobOperator` submits the job under a deterministic ``submission_id``, so a retry
  re-attaches to its job instead of submitting a second one, then defers.
- :class:`RayJobTrigger` runs in the triggerer: polls the job, streams its new log lines into the
  task log, stops it at the deadline and fires exactly one event.

Importing this module is cheap (no ``ray`` import): DAG files may import it at top level.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

from airflow.sdk import BaseHook, BaseOperator
from airflow.sdk.bases.operator import TRIGGER_FAIL_REPR
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from airflow.triggers.base import BaseTrigger, TriggerEvent

from ct_airflow.links import RayJobLink
from ct_airflow.settings import RAY_CONN_ID, _connection, _url

if TYPE_CHECKING:
    from airflow.sdk import Context
    from ray.job_submission import JobSubmissionClient

# Ray's JobStatus values. A job in a terminal state never changes again.
TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
ACTIVE_STATES = frozenset({"PENDING", "RUNNING"})
SUCCEEDED = "SUCCEEDED"
# Event statuses the trigger adds to Ray's: the deadline passed / Ray could not be asked.
TIMEOUT = "TIMEOUT"
ERROR = "ERROR"

_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
# Names of variables that hold credentials. The Ray dashboard shows a job's runtime_env (and every
# actor's and task's) to whoever can open it, and Ray's own logs print it: secrets belong in the
# Ray nodes' environment instead.


def ray_submission_id(
    *,
    dag_id: str,
    run_id: str,
    task_id: str,
    submission_key: str = "",
    map_index: int = -1,
    try_number: int = 1,
) -> str:
    """The Ray ``submission_id`` of one task instance's job: ``ct-<task>-<hash>[-try<n>]``.

    The hash covers dag, run, task, map index and ``submission_key``; the readable task prefix is
    for people scanning the dashboard. Try 1 has no suffix; a later try gets ``-try<n>`` so a retry
    after a failed job submits a new job. Only ``[A-Za-z0-9_-]``: Ray puts the id in URLs and in
    log file names.
    """
    identity = json.dumps([dag_id, run_id, task_id, map_index, submission_key])
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    slug = _UNSAFE_ID_CHARS.sub("-", task_id).strip("-")[:40] or "task"
    base = f"ct-{slug}-{digest}"
    return base if try_number <= 1 else f"{base}-try{try_number}"


@dataclass(frozen=True)
class RayJobInfo:
    """What the operator and the trigger need to know about a Ray job."""

    submission_id: str
    status: str
    message: str = ""
    start_time: float | None = None  # seconds since the epoch; None until the job started


class RayJobHook(BaseHook):
    """The Ray Jobs API of the cluster named by an Airflow connection (default ``ct_ray``).

    The connection is an http connection (host, port, ``schema`` http/https); without it the
    ``CT_RAY_ADDRESS`` setting applies. A connection password, if set, is sent as the Ray auth
    token; otherwise Ray's own token lookup applies (``RAY_AUTH_MODE=token`` and
    ``RAY_AUTH_TOKEN_PATH`` in the process environment, as the local stack sets them).
    Nothing touches the network until the first call.
    """

    conn_name_attr = "ray_conn_id"
    default_conn_name = RAY_CONN_ID
    conn_type = "http"
    hook_name = "Ray Jobs API"

    def __init__(self, ray_conn_id: str = RAY_CONN_ID) -> None:
        super().__init__()
        self.ray_conn_id = ray_conn_id

    @cached_property
    def _conn(self) -> Any | None:
        return _connection(self.ray_conn_id)

    @cached_property
    def address(self) -> str:
        """The dashboard / Jobs API URL, e.g. ``http://127.0.0.1:8265``."""
        if self._conn is not None and self._conn.host:
            return _url(self._conn)
        from ml.settings import Settings

        return Settings().ray_address.rstrip("/")

    @cached_property
    def client(self) -> JobSubmissionClient:
        """The Jobs API client; building it checks the cluster's version (one HTTP request)."""
        from ray.job_submission import JobSubmissionClient

        for variable in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
            if os.environ.get(variable):  # Ray prefers these to the address it is given
                self.log.warning(
                    "%s=%s overrides %s for the Ray Jobs API", variable, os.environ[variable], self.address
                )
                break
        token = self._conn.password if self._conn is not None else None
        headers = {"Authorization": f"Bearer {token}"} if token else None
        return JobSubmissionClient(self.address, headers=headers)

    def dashboard_url(self, submission_id: str) -> str:
        """The job's page in the Ray dashboard, as a browser reaches it: under ``CT_RAY_UI_URL``
        when that is set (compose, Kubernetes: the Jobs API address is an internal one), else under
        the Jobs API address."""
        from ml.settings import Settings

        base = Settings().ray_ui_url.strip().rstrip("/") or self.address
        return f"{base}/#/jobs/{submission_id}"

    def submit(
        self,
        entrypoint: str,
        submission_id: str,
        runtime_env: dict[str, Any] | None = None,
        metadata: dict[str, str] | None = None,
        entrypoint_num_cpus: float | None = None,
        entrypoint_num_gpus: float | None = None,
    ) -> str:
        """Submit a job under ``submission_id``; Ray refuses an id that exists already.

        A runtime_env variable named like a secret is refused (``ml.settings.is_secret_name``).
        """
        from ml.settings import is_secret_name

        secret_names = sorted(
            name for name in ((runtime_env or {}).get("env_vars") or {}) if is_secret_name(name)
        )
        if secret_names:  # a retry would not help: fail the task
            raise AirflowFailException(
                f"Ray job {submission_id}: runtime_env.env_vars {secret_names} look like secrets, and the "
                "Ray dashboard shows a job's runtime_env to all its users; set them in the Ray nodes' "
                "environment instead (see docs/security.md#exposure-and-secrets)"
            )
        optional = {"entrypoint_num_cpus": entrypoint_num_cpus, "entrypoint_num_gpus": entrypoint_num_gpus}
        return self.client.submit_job(
            entrypoint=entrypoint,
            submission_id=submission_id,
            runtime_env=runtime_env or None,
            metadata=metadata or None,
            **{key: value for key, value in optional.items() if value is not None},
        )

    def job_info(self, submission_id: str) -> RayJobInfo | None:
        """Status, message and start time of a job; None if Ray has no such job."""
        try:
            details = self.client.get_job_info(submission_id)
        except RuntimeError as err:
            if _is_not_found(err):
                return None
            raise
        start_ms = details.start_time
        return RayJobInfo(
            submission_id=submission_id,
            status=str(details.status),  # JobStatus is a str enum whose str() is its value
            message=details.message or "",
            start_time=start_ms / 1000 if start_ms else None,
        )

    def status(self, submission_id: str) -> str | None:
        """PENDING / RUNNING / SUCCEEDED / FAILED / STOPPED, or None if Ray has no such job."""
        info = self.job_info(submission_id)
        return info.status if info is not None else None

    def logs(self, submission_id: str) -> str:
        """The job's whole driver log so far."""
        return self.client.get_job_logs(submission_id)

    def stop(self, submission_id: str) -> bool:
        """Ask Ray to stop the job; True if it was running, False if it had ended or is unknown."""
        try:
            return bool(self.client.stop_job(submission_id))
        except RuntimeError as err:
            if _is_not_found(err):
                return False
            raise


def _is_not_found(err: RuntimeError) -> bool:
    # The Jobs client reports HTTP errors as RuntimeError("Request failed with status code 404: ...").
    return "status code 404" in str(err)


class _LogFollower:
    """Turns successive snapshots of a growing log into its new complete lines, each once."""

    def __init__(self) -> None:
        self.text = ""
        self._consumed = 0
        self._partial = ""

    def new_lines(self, text: str) -> list[str]:
        """Complete lines that ``text`` adds to the previous snapshot (a partial last line waits)."""
        if len(text) < self._consumed:  # the log was replaced: follow the new one from its start
            self._consumed, self._partial = 0, ""
        self.text = text
        *complete, self._partial = (self._partial + text[self._consumed :]).split("\n")
        self._consumed = len(text)
        return [line.rstrip("\r") for line in complete]

    def flush(self) -> list[str]:
        """The pending partial line, once the log is final."""
        rest, self._partial = self._partial, ""
        return [rest.rstrip("\r")] if rest else []

    def tail(self, lines: int) -> str:
        return _tail(self.text, lines)


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:]) if lines > 0 else ""


def _event_payload(status: str, submission_id: str, message: str, log_tail: str) -> dict[str, str]:
    return {"status": status, "submission_id": submission_id, "message": message, "log_tail": log_tail}


class RayJobTrigger(BaseTrigger):
    """Polls one Ray job until it ends, streaming its log; fires exactly one event.

    Event payload: ``status`` (a Ray terminal state, ``TIMEOUT`` or ``ERROR``), ``submission_id``,
    ``message`` and ``log_tail`` (the last ``log_tail_lines`` lines of the job log).

    ``deadline`` is an absolute epoch time, so a triggerer restart does not extend it; past it the
    job is stopped. ``max_poll_errors`` consecutive failed polls (cluster unreachable, job gone)
    end the wait with an ``ERROR`` event.
    """

    def __init__(
        self,
        submission_id: str,
        ray_conn_id: str = RAY_CONN_ID,
        poll_interval: float = 10.0,
        deadline: float | None = None,
        log_tail_lines: int = 60,
        max_poll_errors: int = 12,
    ) -> None:
        super().__init__()
        self.submission_id = submission_id
        self.ray_conn_id = ray_conn_id
        self.poll_interval = poll_interval
        self.deadline = deadline
        self.log_tail_lines = log_tail_lines
        self.max_poll_errors = max_poll_errors

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "submission_id": self.submission_id,
                "ray_conn_id": self.ray_conn_id,
                "poll_interval": self.poll_interval,
                "deadline": self.deadline,
                "log_tail_lines": self.log_tail_lines,
                "max_poll_errors": self.max_poll_errors,
            },
        )

    @cached_property
    def hook(self) -> RayJobHook:
        return RayJobHook(self.ray_conn_id)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        follower = _LogFollower()
        errors = 0
        while True:
            try:
                # The Jobs client is blocking (requests): keep it off the triggerer's event loop.
                info = await asyncio.to_thread(self.hook.job_info, self.submission_id)
                if info is None:
                    raise LookupError(f"Ray has no job {self.submission_id} (cluster restarted?)")
                text = await asyncio.to_thread(self.hook.logs, self.submission_id)
            except Exception as err:  # boundary: any failed poll counts, the limit decides
                errors += 1
                self.log.warning(
                    "polling Ray job %s failed (%d/%d in a row): %s",
                    self.submission_id,
                    errors,
                    self.max_poll_errors,
                    err,
                )
                if errors >= self.max_poll_errors:
                    message = f"gave up after {errors} failed polls in a row; last error: {err}"
                    yield TriggerEvent(self._payload(ERROR, message, follower))
                    return
            else:
                errors = 0
                self._emit(follower.new_lines(text))
                if info.status in TERMINAL_STATES:
                    self._emit(follower.flush())
                    yield TriggerEvent(self._payload(info.status, info.message, follower))
                    return
            if self.deadline is not None and time.time() >= self.deadline:
                yield TriggerEvent(await self._stop_at_deadline(follower))
                return
            await asyncio.sleep(self._seconds_to_next_poll())

    async def on_kill(self) -> None:
        """A user marked the deferred task failed/success or cleared it: stop the job."""
        stopped = await asyncio.to_thread(self.hook.stop, self.submission_id)
        self.log.info(
            "task killed while deferred; Ray job %s stop requested: %s", self.submission_id, stopped
        )

    def _seconds_to_next_poll(self) -> float:
        if self.deadline is None:
            return self.poll_interval
        return max(0.0, min(self.poll_interval, self.deadline - time.time()))

    def _emit(self, lines: Sequence[str]) -> None:
        for line in lines:
            self.log.info("[ray] %s", line)

    def _payload(self, status: str, message: str, follower: _LogFollower) -> dict[str, str]:
        return _event_payload(status, self.submission_id, message, follower.tail(self.log_tail_lines))

    async def _stop_at_deadline(self, follower: _LogFollower) -> dict[str, str]:
        self.log.error("Ray job %s passed its deadline; stopping it", self.submission_id)
        try:
            stopped = await asyncio.to_thread(self.hook.stop, self.submission_id)
            text = await asyncio.to_thread(self.hook.logs, self.submission_id)
        except Exception as err:  # boundary: report the timeout even if Ray does not answer
            self.log.exception("could not stop Ray job %s or read its log", self.submission_id)
            return self._payload(TIMEOUT, f"job_timeout passed; stopping the job failed: {err}", follower)
        self._emit(follower.new_lines(text))
        self._emit(follower.flush())
        return self._payload(
            TIMEOUT, f"job_timeout passed; stop requested (was running: {stopped})", follower
        )


class RayJobOperator(BaseOperator):
    """Run ``entrypoint`` as a Ray job and wait for it in the triggerer (deferred).

    The job's ``submission_id`` is derived from dag, run, task, map index and ``submission_key``
    (see :func:`ray_submission_id`). On execute the operator looks for this task instance's latest
    job: a PENDING/RUNNING one is re-attached to, a SUCCEEDED one is the result (nothing is
    submitted), a FAILED/STOPPED one from an earlier try leads to a new job under this try's id.
    A new submission key (e.g. the data snapshot id) or a new run gives a new job.

    Returns (XCom ``return_value``) ``{"submission_id": ..., "status": "SUCCEEDED"}``; the id is
    also pushed as XCom ``submission_id`` as soon as it is known. Raises
    :class:`~airflow.sdk.exceptions.AirflowException` with the status, the id and the tail of the
    job log when the job fails, is stopped or passes ``job_timeout`` (then it is stopped).
    """

    template_fields: Sequence[str] = ("entrypoint", "submission_key", "runtime_env", "metadata")
    operator_extra_links = (RayJobLink(),)
    template_fields_renderers: ClassVar[dict[str, str]] = {"runtime_env": "json", "metadata": "json"}

    def __init__(
        self,
        *,
        entrypoint: str,
        submission_key: str = "",
        runtime_env: dict[str, Any] | None = None,
        entrypoint_num_cpus: float | None = None,
        entrypoint_num_gpus: float | None = None,
        metadata: dict[str, str] | None = None,
        ray_conn_id: str = RAY_CONN_ID,
        job_timeout: timedelta = timedelta(hours=6),
        poll_interval: float = 10.0,
        log_tail_lines: int = 60,
        max_poll_errors: int = 12,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if job_timeout <= timedelta(0):
            raise ValueError(f"{self.task_id}: job_timeout must be positive, got {job_timeout}")
        if poll_interval <= 0:
            raise ValueError(f"{self.task_id}: poll_interval must be > 0 seconds, got {poll_interval}")
        if log_tail_lines < 0 or max_poll_errors < 1:
            raise ValueError(f"{self.task_id}: log_tail_lines must be >= 0 and max_poll_errors >= 1")
        self.entrypoint = entrypoint
        self.submission_key = submission_key
        self.runtime_env = runtime_env
        self.entrypoint_num_cpus = entrypoint_num_cpus
        self.entrypoint_num_gpus = entrypoint_num_gpus
        self.metadata = metadata
        self.ray_conn_id = ray_conn_id
        self.job_timeout = job_timeout
        self.poll_interval = poll_interval
        self.log_tail_lines = log_tail_lines
        self.max_poll_errors = max_poll_errors
        self._submission_id: str | None = None  # the job this process knows about, for on_kill

    @cached_property
    def hook(self) -> RayJobHook:
        return RayJobHook(self.ray_conn_id)

    # ---- the task's life cycle ----------------------------------------------------------

    def execute(self, context: Context) -> dict[str, str]:
        ti = context["ti"]
        latest = self._latest_job(ti)
        if latest is None:
            return self._submit_and_defer(ti, self._submission_id_for(ti, ti.try_number))
        self._remember(ti, latest.submission_id)
        if latest.status == SUCCEEDED:
            self.log.info("Ray job %s already SUCCEEDED; not submitting again", latest.submission_id)
            return {"submission_id": latest.submission_id, "status": SUCCEEDED}
        if latest.status in ACTIVE_STATES:
            self.log.info(
                "re-attaching to Ray job %s (%s), not submitting: %s",
                latest.submission_id,
                latest.status,
                self.hook.dashboard_url(latest.submission_id),
            )
            started = latest.start_time or time.time()
            self._defer_to(latest.submission_id, deadline=started + self.job_timeout.total_seconds())
        this_try = self._submission_id_for(ti, ti.try_number)
        if latest.submission_id == this_try:
            # This very try already ran its job to the end (the task was executed twice in one
            # try): its id is taken, so report that job's outcome instead of submitting.
            return self.execute_complete(context, self._final_event(latest))
        self.log.info(
            "the previous try's Ray job %s ended %s; submitting a new one",
            latest.submission_id,
            latest.status,
        )
        return self._submit_and_defer(ti, this_try)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, str]:
        """Resume after the trigger fired: the result on success, otherwise raise."""
        status, submission_id = event["status"], event["submission_id"]
        self._submission_id = submission_id
        if status == SUCCEEDED:
            self.log.info("Ray job %s SUCCEEDED", submission_id)
            return {"submission_id": submission_id, "status": status}
        tail = event.get("log_tail") or "(no log output)"
        raise AirflowException(
            f"Ray job {submission_id} ended {status}: {event.get('message', '')}\n"
            f"--- last {self.log_tail_lines} lines of the job log ---\n{tail}"
        )

    def resume_execution(self, next_method: str, next_kwargs: dict[str, Any] | None, context: Context) -> Any:
        # Airflow's own deferral timeout (or a crashed trigger) resumes the task with "__fail__"
        # and never calls execute_complete: stop the job here so it does not run on unattended.
        if next_method == TRIGGER_FAIL_REPR:
            self._stop_unattended_job(context)
        return super().resume_execution(next_method, next_kwargs, context)

    def on_kill(self) -> None:
        if self._submission_id is None:
            return
        stopped = self.hook.stop(self._submission_id)
        self.log.info(
            "task killed; Ray job %s stop requested (was running: %s)", self._submission_id, stopped
        )

    # ---- steps ----------------------------------------------------------------------------

    def _submission_id_for(self, ti: Any, try_number: int) -> str:
        return ray_submission_id(
            dag_id=ti.dag_id,
            run_id=ti.run_id,
            task_id=ti.task_id,
            submission_key=str(self.submission_key or ""),
            map_index=getattr(ti, "map_index", -1),
            try_number=try_number,
        )

    def _latest_job(self, ti: Any) -> RayJobInfo | None:
        """The job of the most recent try (this one first) that Ray knows about, if any."""
        for try_number in range(max(ti.try_number, 1), 0, -1):
            info = self.hook.job_info(self._submission_id_for(ti, try_number))
            if info is not None:
                return info
        return None

    def _remember(self, ti: Any, submission_id: str) -> None:
        self._submission_id = submission_id
        ti.xcom_push(key="submission_id", value=submission_id)

    def _submit_and_defer(self, ti: Any, submission_id: str) -> NoReturn:
        metadata = {
            **{str(k): str(v) for k, v in (self.metadata or {}).items()},
            "airflow_dag_id": ti.dag_id,
            "airflow_run_id": ti.run_id,
            "airflow_task_id": ti.task_id,
            "airflow_map_index": str(getattr(ti, "map_index", -1)),
            "airflow_try_number": str(ti.try_number),
            "submission_key": str(self.submission_key or ""),
        }
        self.hook.submit(
            entrypoint=self.entrypoint,
            submission_id=submission_id,
            runtime_env=self.runtime_env,
            metadata=metadata,
            entrypoint_num_cpus=self.entrypoint_num_cpus,
            entrypoint_num_gpus=self.entrypoint_num_gpus,
        )
        self._remember(ti, submission_id)
        self.log.info("submitted Ray job %s: %s", submission_id, self.hook.dashboard_url(submission_id))
        self._defer_to(submission_id, deadline=time.time() + self.job_timeout.total_seconds())

    def _defer_to(self, submission_id: str, deadline: float) -> NoReturn:
        trigger = RayJobTrigger(
            submission_id=submission_id,
            ray_conn_id=self.ray_conn_id,
            poll_interval=self.poll_interval,
            deadline=deadline,
            log_tail_lines=self.log_tail_lines,
            max_poll_errors=self.max_poll_errors,
        )
        # The trigger stops the job at `deadline` and reports it; Airflow's own timeout is only
        # the backstop for a trigger that never answers (see resume_execution).
        backstop = max(deadline - time.time(), 0.0) + max(60.0, 3 * self.poll_interval)
        self.defer(trigger=trigger, method_name="execute_complete", timeout=timedelta(seconds=backstop))

    def _final_event(self, info: RayJobInfo) -> dict[str, str]:
        tail = _tail(self.hook.logs(info.submission_id), self.log_tail_lines)
        return _event_payload(info.status, info.submission_id, info.message, tail)

    def _stop_unattended_job(self, context: Context) -> None:
        try:
            latest = self._latest_job(context["ti"])
            if latest is not None and latest.status in ACTIVE_STATES:
                self.hook.stop(latest.submission_id)
                self.log.error("deferral failed or timed out; stopped Ray job %s", latest.submission_id)
        except Exception:  # boundary: never hide the deferral failure that is being raised
            self.log.exception("could not stop the Ray job after the deferral failed")


__all__ = (
    "ACTIVE_STATES",
    "TERMINAL_STATES",
    "RayJobHook",
    "RayJobInfo",
    "RayJobOperator",
    "RayJobTrigger",
    "ray_submission_id",
)
