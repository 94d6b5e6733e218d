"""The real local stack for integration tests: started on demand, stopped at the end.

Services already running (a developer's `make up`) are reused and left running; the ones this
session started are stopped when it ends, so no process outlives the test run.
"""

from __future__ import annotations

import os
import sys
import uuid

import pytest

from ml.settings import Settings
from ml.storage import ObjectStore
from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import stack

# What `eval "$(scripts/stack.py env)"` gives a user's shell: Ray's token auth, MLflow's S3
# settings. Ray reads RAY_AUTH_MODE once per process, so it must be set before ray is imported.
os.environ.update(stack.service_env())
# Scheduled drift checks and raw-data polls act on every model and dataset the stack holds, and
# other tests leave theirs behind: a scheduled run mid-session would start training runs that
# queue in front of a test's own. Tests trigger these DAGs by hand, so the Airflow this session
# starts schedules them once a year (a developer's running stack keeps its own schedules). Only
# the started services see this: the DAG-integrity tests in the same pytest process check the
# real defaults.
TEST_SCHEDULES = {"CT_DRIFT_SCHEDULE": "0 0 1 1 *", "CT_RAW_WATCH_SCHEDULE": "0 0 1 1 *"}


class StackManager:
    def __init__(self) -> None:
        self.started: list[str] = []

    def require(self, *services: str) -> None:
        missing = [s for s in services if s not in self.started]
        if missing:
            saved = {key: os.environ.get(key) for key in TEST_SCHEDULES}
            os.environ.update({k: v for k, v in TEST_SCHEDULES.items() if saved[k] is None})
            try:
                self.started += stack.up(missing)
            finally:
                for key, value in saved.items():
                    if value is None:
                        os.environ.pop(key, None)

    def stop(self) -> None:
        if self.started:
            stack.down(self.started)


@pytest.fixture(scope="session")
def local_stack():
    manager = StackManager()
    try:
        yield manager
    finally:
        manager.stop()


@pytest.fixture(scope="session")
def s3(local_stack) -> None:
    local_stack.require("s3")


@pytest.fixture
def settings(s3) -> Settings:
    """Settings on the local stack with a dataset name of its own: tests never share prefixes."""
    return Settings(dataset=f"it-{uuid.uuid4().hex[:10]}")


@pytest.fixture
def store(settings) -> ObjectStore:
    store = ObjectStore(settings)
    store.ensure_bucket()
    return store


def restore_serve(deployer, before: dict | None) -> None:
    """Put the Serve config back as a test found it: ``before``, or without our app if it had none."""
    if before is not None:
        deployer.apply(before)
    else:
        apps = (deployer.current_config() or {}).get("applications", [])
        deployer.apply({"applications": [a for a in apps if a["name"] != deployer.app_name]})
