"""
### Drift monitor: is the service still receiving what its model was trained on?

Hourly (schedule: `CT_DRIFT_SCHEDULE`, default `0 * * * *`), this DAG compares the texts the Ray
Serve application answered in the last `window_hours` (its prediction log,
`s3://<bucket>/predictions/dt=…/hour=…/`) with the **reference of the model version that served
them**: a sample of the training split of that version's snapshot.

| task | what it does | where to look |
|---|---|---|
| `check` | Evidently 0.7: text drift (a domain classifier's ROC AUC), readable descriptors (length, word count, non-letter share) and drift of the predicted label distribution. Too few served texts → verdict *insufficient data* (not "no drift"). | links **Evidently report** (opens in Airflow, served from S3/MinIO) and **MLflow run** (experiment `drift`, the report as artifact `report.html`, metric trends) |
| `decide` | Drift → a training run, unless `dry_run`, a `continuous_training` run is already queued or running, or the last drift-triggered run for this model is younger than `cooldown_hours`. Every skip says why in the log. | task log |
| `trigger_training` | Triggers `continuous_training` for the served model's dataset with conf `{"reason": "drift", "drift_score": …, "report": …}` plus `training_params`; the training run and the model version record them as tags. | link **Triggered DAG** |
| `record_trigger` | Starts the cooldown (`reports/drift/<model>/_last_trigger.json`). | S3 |

**Operating it**
- Manual check of another window: trigger with `window_hours` (the window ends at the run's time).
- See what it would do without training: `dry_run`.
- Retraining uses the labelled batches that arrived in `raw/<dataset>/` (plus earlier data within the
  training run's data window); getting labelled production data there is described in docs/pipeline.md.
  With nothing new and nothing in the window, the triggered run skips at `extract` and says so.
- Thresholds: the defaults are explained in `ml/drift.py` (`DriftThresholds`).
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timedelta
from typing import Any

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import CronTriggerTimetable, Param, dag, get_current_context, task

from ct_airflow.dag_defaults import default_args
from ct_airflow.failures import skip
from ct_airflow.links import DriftReportLink, MlflowRunLink, publish_links, with_links

DAG_ID = "drift_monitor"
TRAINING_DAG_ID = "continuous_training"
# continuous_training params a drift-triggered run may set through `training_params`
TRAINING_PARAMS = frozenset(
    {
        "epochs",
        "learning_rate",
        "batch_size",
        "num_workers",
        "use_gpu",
        "zero_stage",
        "max_length",
        "init_from",
        "max_rows",
        "data_window_days",
        "gate_min_macro_f1",
    }
)
log = logging.getLogger(__name__)


def last_trigger_key(model_name: str) -> str:
    return f"reports/drift/{model_name}/_last_trigger.json"


@dag(
    dag_id=DAG_ID,
    # No start_date: the first scheduled run is the next full hour after the DAG first appears,
    # not a catch-up run of the past hour the moment it is unpaused.
    schedule=CronTriggerTimetable(os.environ.get("CT_DRIFT_SCHEDULE", "0 * * * *"), timezone="UTC"),
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
        "training_params": Param(
            {},
            type="object",
            title="Params of the triggered training run",
            description='continuous_training params for drift-triggered runs, e.g. {"epochs": 3}; '
            f"allowed: {', '.join(sorted(TRAINING_PARAMS))}. Empty = that DAG's defaults.",
        ),
    },
    default_args=default_args(timedelta(minutes=30)),
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
        publish_links(
            context,
            drift_report=summary.get("report_url"),
            mlflow_run=summary.get("mlflow_report_url") or summary.get("mlflow_run_url"),
        )
        return summary

    @task
    def decide(summary: dict[str, Any]) -> dict[str, Any]:
        """Drift, and no training queued/running, and the cooldown is over → the trigger's conf."""
        from airflow.sdk.exceptions import AirflowFailException

        from ct_airflow.settings import pipeline_settings
        from ml.storage import ObjectStore

        context = get_current_context()
        params = context["params"]
        unknown = set(params["training_params"]) - TRAINING_PARAMS
        if unknown:
            raise AirflowFailException(
                f"training_params has unknown keys {sorted(unknown)}; allowed: {sorted(TRAINING_PARAMS)}"
            )
        verdict = summary["verdict"]
        if verdict != "drift":
            skip(f"verdict {verdict!r} ({summary.get('served_rows', 0)} served texts): no training")
        if params["dry_run"]:
            skip(f"drift (score {summary['drift_score']:.2f}) but dry_run is set: not triggering")
        busy = context["ti"].get_dr_count(TRAINING_DAG_ID, states=["queued", "running"])
        if busy:
            skip(f"drift, but {busy} {TRAINING_DAG_ID} run(s) already queued or running")
        store = ObjectStore(pipeline_settings())
        stamp_key = last_trigger_key(summary["model"]["name"])
        if store.exists(stamp_key):
            last = datetime.fromisoformat(store.get_json(stamp_key)["at"])
            until = last + timedelta(hours=float(params["cooldown_hours"]))
            now = context["dag_run"].run_after
            if now < until:
                skip(
                    f"drift (score {summary['drift_score']:.2f}), but the last drift-triggered run for "
                    f"{summary['model']['name']} started at {last:%Y-%m-%d %H:%M:%S} UTC: cooldown until "
                    f"{until:%Y-%m-%d %H:%M:%S} UTC (cooldown_hours={params['cooldown_hours']})"
                )
        conf = {
            **params["training_params"],
            "reason": "drift",
            "drift_score": summary["drift_score"],
            "report": summary.get("report_key"),
            "drift_run_id": summary.get("mlflow_run_id"),
            "model": summary["model"]["name"],
        }
        if summary.get("dataset"):
            conf["dataset"] = summary["dataset"]
        log.info("drift (score %.2f): triggering %s with %s", summary["drift_score"], TRAINING_DAG_ID, conf)
        return conf

    @task
    def record_trigger(trigger_conf: dict[str, Any]) -> None:
        """Start the cooldown window."""
        from ct_airflow.settings import pipeline_settings
        from ml.storage import ObjectStore

        context = get_current_context()
        ObjectStore(pipeline_settings()).put_json(
            last_trigger_key(trigger_conf["model"]),
            {
                "at": context["dag_run"].run_after.isoformat(),
                "by": context["dag_run"].run_id,
                "conf": trigger_conf,
            },
        )

    trigger_conf = decide(with_links(check(), DriftReportLink(), MlflowRunLink()))
    trigger_training = TriggerDagRunOperator(
        task_id="trigger_training",
        trigger_dag_id=TRAINING_DAG_ID,
        conf=trigger_conf,
        wait_for_completion=False,
    )
    trigger_training >> record_trigger(trigger_conf)


drift_monitor()
