"""Extra links on task instances: from a task in the Airflow UI to what it produced.

A task publishes its links as it learns them, with :func:`publish_links` (XCom ``ct_links``, a
``{link name: url}`` dict), also right before it fails, so a failed validation still links to
its Data Docs. At the end of every try Airflow asks each link of the task for its URL and keeps
it (Airflow 3 stores extra links in XCom); the UI shows them as buttons on the task instance.

URLs are what a browser opens, never the internal addresses the code talks to: the MLflow UI
(``CT_MLFLOW_UI_URL``), the Ray dashboard (``CT_RAY_UI_URL``), the service (``CT_SERVE_UI_URL``)
and the report viewer that the ``ct_reports`` plugin adds to Airflow (``CT_REPORT_VIEWER_URL``,
for logged-in users); each empty = the internal address. Links are plain strings: nothing here
needs credentials at display time.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.sdk import BaseOperatorLink

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey

log = logging.getLogger(__name__)

LINKS_XCOM_KEY = "ct_links"


def _own_xcom(ti_key: Any, key: str) -> Any:
    """This task instance's XCom ``key``; None where ``ti_key`` cannot read XCom.

    During a task's finalize, Airflow passes the running task instance as ``ti_key``.
    """
    pull = getattr(ti_key, "xcom_pull", None)
    return pull(task_ids=ti_key.task_id, key=key, map_indexes=ti_key.map_index) if pull else None


class _PublishedLink(BaseOperatorLink):
    """A link whose URL the task published under ``field`` in XCom ``ct_links`` ("" if none)."""

    field: ClassVar[str]

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        return str((_own_xcom(ti_key, LINKS_XCOM_KEY) or {}).get(self.field) or "")


class MlflowRunLink(_PublishedLink):
    name = "MLflow run"
    field = "mlflow_run"


class MlflowModelLink(_PublishedLink):
    name = "MLflow model version"
    field = "mlflow_model"


class DataDocsLink(_PublishedLink):
    name = "Data Docs (Great Expectations)"
    field = "data_docs"


class DriftReportLink(_PublishedLink):
    name = "Evidently report"
    field = "drift_report"


class RayJobLink(BaseOperatorLink):
    """The Ray dashboard page of the job a :class:`~ct_airflow.ray_job.RayJobOperator` ran."""

    name = "Ray job"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        submission_id = _own_xcom(ti_key, "submission_id")
        hook = getattr(operator, "hook", None)
        return hook.dashboard_url(submission_id) if submission_id and hook is not None else ""


class ServedModelLink(_PublishedLink):
    name = "Serving API (/v1/model)"
    field = "serve"


class ServingHistoryLink(_PublishedLink):
    name = "Serving history"
    field = "serving_history"


class RolloutReportLink(_PublishedLink):
    name = "Rollout report"
    field = "rollout_report"


def publish_links(context: Any, **links: str | None) -> None:
    """Add ``links`` (field=url) to this task instance's ``ct_links`` and log each one."""
    ti = context["ti"]
    current = _own_xcom(ti, LINKS_XCOM_KEY) or {}
    fresh = {field: url for field, url in links.items() if url}
    for field, url in fresh.items():
        log.info("link %s: %s", field, url)
    ti.xcom_push(key=LINKS_XCOM_KEY, value={**current, **fresh})


def with_links(xcom_arg: Any, *links: BaseOperatorLink) -> Any:
    """Attach extra links to the operator behind a ``@task`` call's result; returns the result."""
    operator = xcom_arg.operator
    operator.operator_extra_links = (*operator.operator_extra_links, *links)
    return xcom_arg
