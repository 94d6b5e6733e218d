"""
### Drift monitor: is the service still receiving what its model was trained on?

Hourly (schedule: `CT_DRIFT_SCHEDULE`, default `0 * * * *`), this DAG compares the texts the Ray
Serve application answered in the last `window_hours` (its prediction log,
`s3://<bucket>/predictions/dt=…/hour=…/`) with the **reference of the model version that served
them**: a sample of the training split of that version's snapshot.

| task | what it does | where to look |
|---|---|---|
| `check` | Evidently 0.7: text drift (a domain classifier's ROC AUC), readable descriptors (length, word count, non-letter share) and drift of the predicted label distribution. Too few served texts → verdict *insufficient data* (not "no drift"). | task log; the HTML report `reports/drift/<model>/<window end>/report.html`; MLflow experiment `drift` |
| `decide` | Drift → a training run, unless `dry_run`, a `continuous_training` run is already queued or running, or the last drift-triggered run is younger than `cooldown_hours`. Every skip says why. | task log |
| `trigger_training` | Triggers `continuous_training` with conf `{"reason": "drift", "drift_score": …, "report": …}`; the training run and the model version record the reason. | the triggered run (extra link) |
| `record_trigger` | Starts the cooldown (`reports/drift/_last_trigger.json`). | S3 |

Retraining uses the labelled batches that arrived in `raw/<dataset>/` since the last snapshot
(how labelled production data gets there: see the README); with nothing new, the triggered run
skips at `extract` and says so.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timedelta
from typing import Any

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import CronTriggerTimetable, Param, dag, get_current_context, task

DAG_ID = "drift_monitor"
TRAINING_DAG_ID = "continuous_training"
LAST_TRIGGER_KEY = "reports/drift/_last_trigger.json"
log = logging.getLogger(__name__)


@dag(
    dag_id=DAG_ID,
    schedule=CronTriggerTimetable(os.environ.get("CT_DRIFT_SCHEDULE", "0 * * * *"), timezone="UTC"),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["continuous-training", "monitoring", "drift"],
    params={
        "window_hours": Param(1, type="number", exclusiveMinimum=0, maximum=168, title="Window (hours)"),
        "min_rows": Param(
            200,
            type="integer",
            minimum=20,
            title="Fewest served texts for a verdict",
            description="Below this the verdict is 'insufficient data', never 'no drift'.",
        ),
        "text_roc_auc": Param(
            0.6,
            type="number",
            exclusiveMinimum=0.5,
            maximum=1,
            title="Text drift threshold (domain-classifier ROC AUC)",
        ),
        "label_distance": Param(
            0.1,
            type="number",
            exclusiveMinimum=0,
            maximum=1,
            title="Predicted-label drift threshold (JS distance)",
        ),
        "cooldown_hours": Param(
            6,
            type="number",
            minimum=0,
            title="Cooldown",
            description="No new drift-triggered run within this window.",
        ),
        "dry_run": Param(
            False, type="boolean", title="Dry run", description="Check and report, never trigger."
        ),
    },
    default_args={
        "owner": "ml-platform",
        "retries": 2,
        "retry_delay": timedelta(minutes=1),
        "execution_timeout": timedelta(minutes=30),
    },
)
def drift_monitor() -> None:
    @task
    def check() -> dict[str, Any]:
        """Compare the served window with the serving model's reference; store the report."""
        from ct_airflow.settings import pipeline_settings
        from ml.drift import DriftThresholds
        from ml.monitor import check_window

        context = get_current_context()
        params = context["params"]
        end = context.get("data_interval_end") or context["dag_run"].run_after
        start = end - timedelta(hours=float(params["window_hours"]))
        thresholds = DriftThresholds(
            text_roc_auc=params["text_roc_auc"],
            label_distance=params["label_distance"],
            min_rows=params["min_rows"],
        )
        summary = check_window(pipeline_settings(), start, end, thresholds)
        if summary.get("report_url"):
            log.info("Evidently report: %s", summary["report_url"])
        return summary

    @task
    def decide(summary: dict[str, Any]) -> dict[str, Any]:
        """Drift, and no training queued/running, and the cooldown is over → the trigger's conf."""
        from airflow.sdk.exceptions import AirflowSkipException

        from ct_airflow.settings import pipeline_settings
        from ml.storage import ObjectStore

        context = get_current_context()
        params = context["params"]
        verdict = summary["verdict"]
        if verdict != "drift":
            raise AirflowSkipException(
                f"verdict {verdict!r} ({summary.get('served_rows', 0)} served texts): no training"
            )
        if params["dry_run"]:
            raise AirflowSkipException(
                f"drift (score {summary['drift_score']:.2f}) but dry_run is set: not triggering"
            )
        busy = context["ti"].get_dr_count(TRAINING_DAG_ID, states=["queued", "running"])
        if busy:
            raise AirflowSkipException(
                f"drift, but {busy} {TRAINING_DAG_ID} run(s) already queued or running"
            )
        store = ObjectStore(pipeline_settings())
        if store.exists(LAST_TRIGGER_KEY):
            last = datetime.fromisoformat(store.get_json(LAST_TRIGGER_KEY)["at"])
            until = last + timedelta(hours=float(params["cooldown_hours"]))
            now = context["dag_run"].run_after
            if now < until:
                raise AirflowSkipException(
                    f"drift, but the last drift-triggered run started at {last:%Y-%m-%d %H:%M} UTC: "
                    f"cooldown until {until:%Y-%m-%d %H:%M} UTC"
                )
        return {
            "reason": "drift",
            "drift_score": summary["drift_score"],
            "report": summary.get("report_key"),
            "drift_run_id": summary.get("mlflow_run_id"),
        }

    @task
    def record_trigger(trigger_conf: dict[str, Any]) -> None:
        """Start the cooldown window."""
        from ct_airflow.settings import pipeline_settings
        from ml.storage import ObjectStore

        context = get_current_context()
        ObjectStore(pipeline_settings()).put_json(
            LAST_TRIGGER_KEY,
            {
                "at": context["dag_run"].run_after.isoformat(),
                "by": context["dag_run"].run_id,
                "conf": trigger_conf,
            },
        )

    trigger_conf = decide(check())
    trigger_training = TriggerDagRunOperator(
        task_id="trigger_training",
        trigger_dag_id=TRAINING_DAG_ID,
        conf=trigger_conf,
        wait_for_completion=False,
    )
    trigger_training >> record_trigger(trigger_conf)


drift_monitor()
