"""
### Drift monitor: is the service still receiving what each model was trained on?

Hourly (schedule: `CT_DRIFT_SCHEDULE`, default `0 * * * *`), this DAG reads the texts the Ray Serve
applications answered in the last `window_hours` (the prediction log,
`s3://<bucket>/predictions/dt=…/hour=…/`) and checks **every model that served users in that
window**, one mapped task instance per model (dynamic task mapping; the instance is named after the
model). Each model's texts are compared with **the reference of the version that served them**: a
sample of the training split of that version's snapshot, so an AG News model is judged against AG
News and a 20 Newsgroups model against 20 Newsgroups.

| task | what it does | where to look |
|---|---|---|
| `list_models` | The registered models that answered users' requests in the window (the pipeline's own smoke-test requests left out), each with the version that answered most of its rows. No traffic at all → *skipped* ("no traffic"), and so is everything after it. | task log; XCom: the list |
| `per_model.check` (one per model) | Evidently 0.7 on that model's rows: text drift (a domain classifier's ROC AUC), readable descriptors (length, word count, non-letter share) and drift of the predicted label distribution. Too few served texts → verdict *insufficient data* (not "no drift"). | links **Evidently report** (opens in Airflow, served from S3/MinIO) and **MLflow run** (experiment `drift`, the report as artifact `report.html`, metric trends) |
| `per_model.decide` | Drift → a training run **for that model's dataset**, unless `dry_run`, the run drift last triggered for this model is still queued or running, or it is younger than `cooldown_hours` (each model has its own cooldown). Every skip says why in the log. | task log |
| `per_model.trigger_training` | Triggers `continuous_training` with conf `{"dataset": <the model's dataset>, "reason": "drift", "drift_score": …, "report": …, "model": …}` plus `training_params`; the training run and the model version record them as tags. | link **Triggered DAG** |
| `per_model.record_trigger` | Starts that model's cooldown (`reports/drift/<model>/_last_trigger.json`, with the triggered run's id). | S3 |

One model's verdict, skip or failure never affects another model's instances. The dataset of a model
is the `dataset` recorded in the manifest of the snapshot its version was trained on; a model
without one falls back to its registered name `<dataset>-classifier`, and drift in a model whose
dataset is unknown fails `decide` instead of training the wrong dataset.

**Operating it**
- Manual check of another window: trigger with `window_hours` (the window ends at the run's time).
- See what it would do without training: `dry_run`.
- Drift in several models in one window: one `continuous_training` run each, queued one after the
  other (that DAG runs one at a time).
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
from airflow.sdk import CronTriggerTimetable, Param, dag, get_current_context, task, task_group

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
        # how the retrained model takes over (staged rollout)
        "rollout",
        "shadow_min_texts",
        "shadow_max_minutes",
        "shadow_min_agreement",
        "canary_fraction",
        "canary_min_requests",
        "canary_max_minutes",
        "quiet_service",
    }
)
GROUP_ID = "per_model"
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
    def list_models() -> list[dict[str, Any]]:
        """The models that served users in the window: one mapped check each."""
        from ct_airflow.settings import pipeline_settings
        from ml.monitor import models_in_window

        start, end = _window(get_current_context())
        models = models_in_window(pipeline_settings(), start, end)
        if not models:
            skip(
                f"no traffic: no user request was answered between {start:%Y-%m-%d %H:%M:%S} and "
                f"{end:%Y-%m-%d %H:%M:%S} UTC (the pipeline's own requests do not count); nothing to check"
            )
        for model in models:
            log.info(
                "%s answered %d texts in the window (v%s: %d)",
                model["name"],
                model["model_rows"],
                model["version"],
                model["rows"],
            )
        return models

    @task(map_index_template="{{ model_name }}")
    def check(model: dict[str, Any]) -> dict[str, Any]:
        """Compare this model's served rows with its serving version's reference; store the report."""
        from ct_airflow.settings import pipeline_settings
        from ml.drift import DriftThresholds
        from ml.monitor import check_window

        context = get_current_context()
        context["model_name"] = model["name"]  # type: ignore[typeddict-unknown-key]  # map index name
        params = context["params"]
        start, end = _window(context)
        thresholds = DriftThresholds(
            text_roc_auc=params["text_roc_auc"],
            label_distance=params["label_distance"],
            min_rows=params["min_rows"],
        )
        summary = check_window(pipeline_settings(), start, end, thresholds, model_name=model["name"])
        publish_links(
            context,
            drift_report=summary.get("report_url"),
            mlflow_run=summary.get("mlflow_report_url") or summary.get("mlflow_run_url"),
        )
        return summary

    @task(map_index_template="{{ model_name }}")
    def decide(summary: dict[str, Any]) -> dict[str, Any]:
        """Drift, and this model's last drift-triggered run is done, and its cooldown is over → the
        trigger's conf, for the model's own dataset."""
        from airflow.sdk.exceptions import AirflowFailException

        from ct_airflow.settings import pipeline_settings
        from ml.storage import ObjectStore

        context = get_current_context()
        name = summary["model"]["name"]
        context["model_name"] = name  # type: ignore[typeddict-unknown-key]
        params = context["params"]
        unknown = set(params["training_params"]) - TRAINING_PARAMS
        if unknown:
            raise AirflowFailException(
                f"training_params has unknown keys {sorted(unknown)}; allowed: {sorted(TRAINING_PARAMS)}"
            )
        verdict = summary["verdict"]
        if verdict != "drift":
            skip(f"{name}: verdict {verdict!r} ({summary.get('served_rows', 0)} served texts): no training")
        if params["dry_run"]:
            skip(f"{name}: drift (score {summary['drift_score']:.2f}) but dry_run is set: not triggering")
        if not summary.get("dataset"):
            raise AirflowFailException(
                f"{name}: drift (score {summary['drift_score']:.2f}), but its dataset is unknown (no "
                "snapshot manifest names it and the model is not named <dataset>-classifier): not "
                "triggering a training run of the wrong dataset; retrain it with the dataset param"
            )
        store = ObjectStore(pipeline_settings())
        stamp_key = last_trigger_key(name)
        last = store.get_json(stamp_key) if store.exists(stamp_key) else None
        if last and last.get("training_run_id"):
            busy = context["ti"].get_dr_count(
                TRAINING_DAG_ID, run_ids=[last["training_run_id"]], states=["queued", "running"]
            )
            if busy:
                skip(
                    f"{name}: drift, but the {TRAINING_DAG_ID} run {last['training_run_id']} it triggered "
                    "is already queued or running"
                )
        if last:
            at = datetime.fromisoformat(last["at"])
            until = at + timedelta(hours=float(params["cooldown_hours"]))
            now = context["dag_run"].run_after
            if now < until:
                skip(
                    f"drift (score {summary['drift_score']:.2f}), but the last drift-triggered run for "
                    f"{name} started at {at:%Y-%m-%d %H:%M:%S} UTC: cooldown until "
                    f"{until:%Y-%m-%d %H:%M:%S} UTC (cooldown_hours={params['cooldown_hours']})"
                )
        conf = {
            **params["training_params"],
            "reason": "drift",
            "drift_score": summary["drift_score"],
            "report": summary.get("report_key"),
            "drift_run_id": summary.get("mlflow_run_id"),
            "model": name,
            "dataset": summary["dataset"],
        }
        log.info(
            "%s: drift (score %.2f): triggering %s for dataset %s (from the %s) with %s",
            name,
            summary["drift_score"],
            TRAINING_DAG_ID,
            summary["dataset"],
            summary.get("dataset_source", "check"),
            conf,
        )
        return conf

    @task(map_index_template="{{ model_name }}")
    def record_trigger(trigger_conf: dict[str, Any]) -> None:
        """Start this model's cooldown window; remember the run it triggered."""
        from ct_airflow.settings import pipeline_settings
        from ml.storage import ObjectStore

        context = get_current_context()
        context["model_name"] = trigger_conf["model"]  # type: ignore[typeddict-unknown-key]
        ti = context["ti"]
        training_run_id = ti.xcom_pull(
            task_ids=f"{GROUP_ID}.trigger_training", key="trigger_run_id", map_indexes=ti.map_index
        )
        ObjectStore(pipeline_settings()).put_json(
            last_trigger_key(trigger_conf["model"]),
            {
                "at": context["dag_run"].run_after.isoformat(),
                "by": context["dag_run"].run_id,
                "training_run_id": training_run_id,
                "conf": trigger_conf,
            },
        )

    @task_group(group_id=GROUP_ID)
    def per_model(model: dict[str, Any]) -> None:
        """check → decide → trigger_training → record_trigger for one model (one map index)."""
        trigger_conf = decide(with_links(check(model), DriftReportLink(), MlflowRunLink()))
        trigger_training = TriggerDagRunOperator(
            task_id="trigger_training",
            trigger_dag_id=TRAINING_DAG_ID,
            conf=trigger_conf,
            wait_for_completion=False,
            map_index_template="{{ task.conf.get('model', '') }}",
        )
        trigger_training >> record_trigger(trigger_conf)

    per_model.expand(model=list_models())


def _window(context: Any) -> tuple[datetime, datetime]:
    """The run's window: ``window_hours`` up to its data interval end (a manual run: its time)."""
    end = context.get("data_interval_end") or context["dag_run"].run_after
    return end - timedelta(hours=float(context["params"]["window_hours"])), end


drift_monitor()
