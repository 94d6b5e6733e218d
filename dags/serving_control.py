"""
### Serving control: roll back, pin or promote what a model serves, in one click

Manual only (no schedule). **Trigger DAG w/ config** and fill the form:

| param | meaning |
|---|---|
| `dataset` | the model to act on: `<dataset>-classifier` (empty = `CT_DATASET`) |
| `action` | `rollback`: back to the version that served before the current one (from the serving history) · `pin`: serve the given `version` · `promote`: serve the current `challenger` |
| `version` | for `pin` only: the registered version number |
| `reason` | required: why (goes into the serving history and onto the model version) |

| task | what it does | where to look |
|---|---|---|
| `plan` | Checks the form and resolves the target version; nothing changes yet. | task log |
| `apply` | Deploys the target to the model's Ray Serve application with the pipeline's own deploy, smoke test (the version must answer as it did in its offline evaluation) and automatic rollback; on success moves the MLflow aliases `champion` **and** `serving` to it, so the next training run is compared against what actually serves. Records the attempt, good or failed, in the serving history. | links **Serving history**, **Serving API (/v1/model)** |

A failed `apply` leaves the previous version serving (the deploy rolls back) and says what failed.
Clients see no failed requests either way: replicas load the new model beside the old one and swap
in place. The same actions from a shell: `python -m ml.serving_control rollback --dataset agnews
--reason "..."` (docs/serving.md#serving-control).

The serving history of every model: the **Serving history** link of `apply`, or `/ct/serving/` on
this Airflow (the `ct_reports` plugin).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from airflow.sdk import Param, dag, get_current_context, task

from ct_airflow.dag_defaults import dataset_param, default_args
from ct_airflow.links import ServedModelLink, ServingHistoryLink, publish_links, with_links

DAG_ID = "serving_control"
log = logging.getLogger(__name__)


def _actor(context: Any) -> str:
    """Who asked: the triggering user when Airflow knows it, and the run id."""
    dag_run = context["dag_run"]
    user = getattr(dag_run, "triggering_user_name", None)
    return f"user:{user} ({dag_run.run_id})" if user else dag_run.run_id


@dag(
    dag_id=DAG_ID,
    schedule=None,
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["continuous-training", "serving"],
    params={
        "dataset": dataset_param("act on (the model <dataset>-classifier)"),
        "action": Param(
            "rollback",
            type="string",
            enum=["rollback", "pin", "promote"],
            title="Action",
            description="rollback = the previously serving version; pin = the version below; "
            "promote = the current challenger.",
        ),
        "version": Param(
            None,
            type=["null", "integer"],
            minimum=1,
            title="Version (pin only)",
            description="The registered version number to serve. Leave empty for rollback and promote.",
        ),
        "reason": Param(
            "",
            type="string",
            minLength=3,
            maxLength=500,
            title="Reason (required)",
            description="Why: recorded in the serving history and on the model version.",
        ),
    },
    default_args=default_args(timedelta(minutes=15)),
)
def serving_control() -> None:
    @task(retries=1)
    def plan() -> dict[str, Any]:
        """Check the form and resolve the version to serve; changes nothing."""
        from airflow.sdk.exceptions import AirflowFailException

        from ct_airflow.settings import dataset_settings
        from ml.rollout import ServeDeployer
        from ml.serving_control import ControlError, check_request, resolve_target

        params = get_current_context()["params"]
        settings = dataset_settings(params.get("dataset"))
        try:
            reason, version = check_request(params["action"], params.get("reason"), params.get("version"))
            serving = ServeDeployer(settings).serving()
            current = serving.model.version if serving else None
            target = resolve_target(settings, params["action"], version, current)
        except ControlError as err:
            raise AirflowFailException(str(err)) from err
        log.info(
            "%s of %s: serving v%s now, will serve v%s; reason: %s",
            params["action"],
            settings.registered_model,
            current or "-",
            target.version,
            reason,
        )
        return {"dataset": settings.dataset, "from_version": current, "to_version": str(target.version)}

    @task(retries=0)  # a retried rollback would roll back once more (NO_RETRY in tests/dags)
    def apply(planned: dict[str, Any]) -> dict[str, Any]:
        """Deploy, smoke-test (rolling back on failure), move the aliases, record the history."""
        from airflow.sdk.exceptions import AirflowFailException

        from ct_airflow.settings import dataset_settings
        from ml.serving_control import ControlError, run_control
        from ml.serving_history import serving_history_url

        context = get_current_context()
        params = context["params"]
        settings = dataset_settings(planned["dataset"])
        publish_links(context, serving_history=serving_history_url(settings, settings.registered_model))
        try:
            entry = run_control(
                settings, params["action"], params.get("reason"), _actor(context), params.get("version")
            )
        except ControlError as err:
            raise AirflowFailException(str(err)) from err
        if entry["to_version"] != planned["to_version"]:
            log.warning("the target moved between plan and apply: v%s was served", entry["to_version"])
        publish_links(context, serve=settings.serve_link("v1/model"))
        return entry

    with_links(apply(plan()), ServingHistoryLink(), ServedModelLink())


serving_control()
