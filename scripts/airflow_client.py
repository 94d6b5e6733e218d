"""A small client for the Airflow 3 REST API (``/api/v2``), used by the demo and the tests."""

from __future__ import annotations

import logging
import time
from typing import Any

import requests

log = logging.getLogger(__name__)

# a deferred task is waiting in the triggerer (e.g. for its Ray job): it is working, not stuck
ACTIVE_TASK_STATES = frozenset({"queued", "running", "deferred", "up_for_retry", "up_for_reschedule"})
TERMINAL_RUN_STATES = {"success", "failed"}


class AirflowClient:
    """Token-authenticated calls to a running Airflow api-server."""

    def __init__(self, base_url: str, username: str, password: str, timeout: float = 30) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        response = self.session.post(
            f"{self.base_url}/auth/token",
            json={"username": username, "password": password},
            timeout=timeout,
        )
        response.raise_for_status()
        self.session.headers["Authorization"] = f"Bearer {response.json()['access_token']}"

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.session.request(
            method, f"{self.base_url}/api/v2{path}", timeout=self.timeout, **kwargs
        )
        if response.status_code >= 400:
            raise RuntimeError(f"{method} {path} -> {response.status_code}: {response.text[:500]}")
        return response.json() if response.content else None

    def wait_for_dag(self, dag_id: str, timeout: float = 180) -> dict[str, Any]:
        """Wait until the dag-processor has parsed and registered ``dag_id``."""
        deadline = time.monotonic() + timeout
        while True:
            response = self.session.get(f"{self.base_url}/api/v2/dags/{dag_id}", timeout=self.timeout)
            if response.status_code == 200:
                return response.json()
            if time.monotonic() > deadline:
                errors = self._call("GET", "/importErrors")
                raise TimeoutError(
                    f"DAG {dag_id} not registered after {timeout:.0f}s; import errors: {errors}"
                )
            time.sleep(3)

    def unpause(self, dag_id: str) -> None:
        self._call("PATCH", f"/dags/{dag_id}", json={"is_paused": False})

    def pause(self, dag_id: str) -> None:
        self._call("PATCH", f"/dags/{dag_id}", json={"is_paused": True})

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None, run_id: str | None = None) -> str:
        body: dict[str, Any] = {"logical_date": None, "conf": conf or {}}
        if run_id:
            body["dag_run_id"] = run_id
        return self._call("POST", f"/dags/{dag_id}/dagRuns", json=body)["dag_run_id"]

    def runs(self, dag_id: str, limit: int = 10) -> list[dict[str, Any]]:
        """The most recent runs first."""
        return self._call(
            "GET", f"/dags/{dag_id}/dagRuns", params={"order_by": "-run_after", "limit": limit}
        )["dag_runs"]

    def run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return self._call("GET", f"/dags/{dag_id}/dagRuns/{run_id}")

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        instances = self._call("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")
        return {ti["task_id"]: ti["state"] for ti in instances["task_instances"]}

    def wait_for_run(
        self, dag_id: str, run_id: str, timeout: float = 600, heartbeat_s: float = 60
    ) -> dict[str, Any]:
        """Poll until the run ends; logs task states as they change, and every ``heartbeat_s``."""
        started = time.monotonic()
        deadline = started + timeout
        last: dict[str, str | None] = {}
        last_logged = started
        while True:
            run = self.run(dag_id, run_id)
            states = self.task_states(dag_id, run_id)
            now = time.monotonic()
            if states != last:
                log.info("%s %s: %s", dag_id, run["state"], ", ".join(f"{k}={v}" for k, v in states.items()))
                last, last_logged = states, now
            elif now - last_logged >= heartbeat_s:
                busy = [f"{k} ({v})" for k, v in states.items() if v in ACTIVE_TASK_STATES] or ["nothing yet"]
                log.info(
                    "%s still %s after %.0f s: %s",
                    dag_id,
                    run["state"],
                    now - started,
                    ", ".join(busy),
                )
                last_logged = now
            if run["state"] in TERMINAL_RUN_STATES:
                return run
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{dag_id} run {run_id} still {run['state']} after {timeout:.0f}s: {states}"
                )
            time.sleep(3)

    def xcom(
        self, dag_id: str, run_id: str, task_id: str, key: str = "return_value", map_index: int | None = None
    ) -> Any:
        """An XCom value; ``map_index`` picks one instance of a mapped task."""
        entry = self._call(
            "GET",
            f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}",
            params={} if map_index is None else {"map_index": map_index},
        )
        return entry["value"]

    def mapped(self, dag_id: str, run_id: str, task_id: str) -> list[dict[str, Any]]:
        """The instances of a mapped task (``map_index``, ``rendered_map_index``, ``state``, ...),
        in map-index order."""
        instances = self._call(
            "GET",
            f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/listMapped",
            params={"limit": 100},
        )["task_instances"]
        return sorted(instances, key=lambda ti: ti["map_index"])

    def task_log(
        self,
        dag_id: str,
        run_id: str,
        task_id: str,
        try_number: int | None = None,
        map_index: int | None = None,
    ) -> str:
        """The task instance's log as text (the latest try unless ``try_number``)."""
        index = "" if map_index is None else f"/{map_index}"
        params = {} if map_index is None else {"map_index": map_index}
        if try_number is None:
            ti = self._call("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}{index}")
            try_number = max(int(ti.get("try_number") or 1), 1)
        body = self._call(
            "GET",
            f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
            params={"full_content": "true", **params},
            headers={"Accept": "application/json"},
        )
        content = body.get("content") if isinstance(body, dict) else body
        if isinstance(content, list):  # structured log lines
            return "\n".join(
                str(line.get("event", line)) if isinstance(line, dict) else str(line) for line in content
            )
        return str(content)

    def links(
        self, dag_id: str, run_id: str, task_id: str, map_index: int | None = None
    ) -> dict[str, str | None]:
        """The task instance's extra links, {name: url}."""
        return self._call(
            "GET",
            f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/links",
            params={} if map_index is None else {"map_index": map_index},
        )["extra_links"]
