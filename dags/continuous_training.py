"""
### Continuous training of the text classifier

Turns newly arrived labelled text into a gated, evaluated, registered and deployed model.
**When it runs:** daily at 00:00 UTC (`CT_TRAINING_SCHEDULE`, dataset `CT_DATASET`), **or** when
`raw_data_watch` finds new data under `raw/<dataset>/` (one triggered run per dataset, conf `dataset`,
`reason: new_data`), **or** on an event on the asset `ct_raw_data` (a producer's; the event's `dataset`),
**or** when `drift_monitor` sees drift in what a model receives (a run for that model's dataset, conf
`reason: drift`, recorded on the MLflow run and model version with `drift_score` and `drift_report`).
**Each run trains one dataset**; runs queue and run one at a time.

| task | what it does | where to look |
|---|---|---|
| `extract` | Collects the batches under `raw/<dataset>/<batch id>/` that are due by the run's data interval end and were not consumed by an earlier run; writes `snapshots/<snapshot id>/` (Parquet per batch + `manifest.json` with keys, etags, sha256, row counts, columns). | task log: snapshot id |
| `validate` | Runs the Great Expectations suite `text_classification_batch` on every batch. A failing batch is **moved** (never deleted) to `quarantine/<dataset>/<batch id>/` with its validation JSON and Data Docs page; the rest is written to `snapshots/<id>/validated.parquet`. | link **Data Docs (Great Expectations)**; task log: every failed expectation |
| `plan_training` | Builds the training config from the run's params and checks it (ZeRO stage, numbers) before anything is submitted. | task log: the config |
| `train` | Submits `python -m ml.train` to the Ray cluster as a job with a deterministic id (a retry re-attaches instead of training twice), then waits in the triggerer, streaming the job log here. Ray Train runs DeepSpeed ZeRO on `num_workers` workers, checkpoints every epoch to S3 and resumes from the last checkpoint if a worker dies. | link **Ray job**; task log: the job log |
| `training_summary` | Reads the job's result: epochs, best validation macro-F1, the MLflow run. | link **MLflow run** |
| `evaluate` | A Ray job scoring the new model (challenger) and the current `champion` on the **same** held-out test split of this snapshot; logs metrics and a confusion matrix to the run; decides promotion. | link **Ray job**; MLflow run → artifacts `evaluation/` |
| `register` | Registers the model version with lineage tags, alias `challenger`; moves `champion` only if the gate passed. | links **MLflow run**, **MLflow model version** |
| `start_shadow` | Staged rollouts (`rollout` = `shadow` or `shadow+canary`, the default) of a model the gate passed: loads it **beside** the champion in the same Serve application. Clients are still answered by the champion; a copy of their texts goes to the candidate at low CPU priority and its answers only to the prediction log (`role=shadow`). Skipped for `direct`, a forced promotion, or when nothing serves yet. | link **Serving history** |
| `shadow_check` | Waits for `shadow_min_texts` live texts or `shadow_max_minutes`, then compares shadow and champion on the same texts: agreement, confidence, predicted labels vs the training labels, error rate, latency. Writes an HTML + JSON report and decides; stopped → the candidate is removed, the champion serves on untouched, the run fails with the numbers. | link **Rollout report** |
| `canary` | `shadow+canary` only: the candidate answers `canary_fraction` of the requests (sticky per `X-Client-Key` header, else per request id; every response names its version). Live error rate and latency of canary vs champion are compared; out of bounds → rolled back to 0 % (no client request fails: a failed canary answer is retried on the champion) and the run fails with the numbers. | link **Rollout report** |
| `deploy` | Only for a new champion (staged: after its live stages passed): points the Ray Serve application `classifier` at it (Serve REST API; replicas load it beside the old model and swap in place, no request fails) and waits until every answer names the new version. If it does not load or serve, the previous config is put back and the task fails saying which version serves. Skipped when the gate said no. | task log; Ray dashboard → Serve |
| `smoke_test` | Sends fixed test texts to `POST /v1/predict`: the new version must answer them exactly as it did offline in `evaluate` (labels, scores ±0.01), and a malformed request must get a 4xx. On failure: rollback as above. On success: MLflow alias `serving` → this version (staged rollouts: `champion` too; until here it was only `challenger`). | link **Serving API (/v1/model)** |

**Rollout** (param `rollout`, default `CT_ROLLOUT` = `shadow+canary`): `direct` deploys the gate's champion
to 100 % at once; `shadow` judges it on mirrored live traffic first; `shadow+canary` then lets it answer a
share of live requests. A quiet service (fewer than 30 texts / 20 canary requests in the window) gives no
live evidence: `quiet_service` = `proceed` (default: the offline gate decides) or `stop`.

**No new data** → `extract` is *skipped* with a log line saying so, and so is everything after it.
**Every batch bad** → `validate` fails (no retry) naming each batch and its first failed expectation.
**Promotion gate**: the challenger becomes `champion` (staged rollouts: after its live stages) only if its test macro-F1 ≥ the champion's − `CT_GATE_TOLERANCE`
and ≥ the floor (`gate_min_macro_f1` param / `CT_GATE_MIN_MACRO_F1`); otherwise it stays `challenger` and the serving model is untouched.

**Manual runs** take the params in the trigger form: epochs, learning rate, workers, ZeRO stage, max length,
**data window** (earlier snapshots trained on too, default 30 days), **force promote** (dangerous: skips the gate)
and **dry run** (train and evaluate only; nothing registered or deployed, new batches stay unconsumed).
Scheduled, asset- and drift-triggered runs use the defaults (drift: plus `drift_monitor`'s `training_params`).
A failed task's last log lines name the stage and what to do.

**Operating it**
- Add data: upload CSV / JSONL / Parquet with `text` and `label` columns to
  `s3://<bucket>/raw/<dataset>/<YYYY-MM-DD or batch id>/<file>`.
- Re-run a day: clear the run; `extract` returns the snapshot it already committed (idempotent).
- Release a quarantined batch after fixing it: upload the fixed file under a new batch id in `raw/`.
- Settings: `CT_*` environment variables and the connections `ct_minio`, `ct_mlflow`, `ct_ray`
  (see docs/configuration.md in the project's repository).
"""

from __future__ import annotations

import hashlib
import logging
import os
from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, get_current_context, task

from ct_airflow.assets import RAW_DATA, dataset_from_events
from ct_airflow.dag_defaults import (
    dataset_param,
    default_args,
    env_choice,
    env_flag,
    env_float,
    env_int,
)
from ct_airflow.failures import skip
from ct_airflow.links import (
    DataDocsLink,
    MlflowModelLink,
    MlflowRunLink,
    RolloutReportLink,
    ServedModelLink,
    ServingHistoryLink,
    publish_links,
    with_links,
)
from ct_airflow.ray_job import RayJobOperator

DAG_ID = "continuous_training"
ROLLOUTS = ("direct", "shadow", "shadow+canary")  # ml.staged_rollout.ROLLOUTS (not imported at parse time)
log = logging.getLogger(__name__)


def _settings(context: Any) -> Any:
    """Pipeline settings for the run's dataset: the ``dataset`` param, else the dataset named by
    the raw-data asset event that triggered the run, else ``CT_DATASET``."""
    from ct_airflow.settings import dataset_settings

    return dataset_settings(
        context["params"].get("dataset") or dataset_from_events(context.get("triggering_asset_events"))
    )


@dag(
    dag_id=DAG_ID,
    # Daily (CT_TRAINING_SCHEDULE, cron, UTC) *or* on a producer's event on the ct_raw_data asset
    # (raw_data_watch triggers one run per dataset with conf instead: asset events would be merged).
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable(os.environ.get("CT_TRAINING_SCHEDULE", "@daily"), timezone="UTC"),
        assets=[RAW_DATA],
    ),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    # Runs consume raw batches in order; two at once would race for the same batches.
    max_active_runs=1,
    doc_md=__doc__,
    tags=["continuous-training", "data-quality"],
    params={
        "dataset": dataset_param("train on"),
        "epochs": Param(
            2,
            type="integer",
            minimum=0,
            maximum=50,
            title="Epochs",
            description="0 registers the untrained base model (useful to test the gate).",
        ),
        "learning_rate": Param(1e-4, type="number", exclusiveMinimum=0, maximum=1, title="Learning rate"),
        "batch_size": Param(16, type="integer", minimum=1, maximum=1024, title="Micro-batch per worker"),
        # Defaults of scheduled runs come from the deployment: a GPU box sets CT_TRAIN_USE_GPU=true.
        "num_workers": Param(
            env_int("CT_TRAIN_NUM_WORKERS", 2),
            type="integer",
            minimum=1,
            maximum=64,
            title="Ray Train workers",
            description="Default: CT_TRAIN_NUM_WORKERS (2).",
        ),
        "use_gpu": Param(
            env_flag("CT_TRAIN_USE_GPU", False),
            type="boolean",
            title="One GPU per worker",
            description="Default: CT_TRAIN_USE_GPU (false).",
        ),
        "zero_stage": Param(
            "auto",
            type=["string", "integer"],
            enum=["auto", 0, 1, 2, 3],
            title="DeepSpeed ZeRO stage",
            description="auto = 2 on GPUs for models of 100 M parameters or more, else 0 (on CPU "
            "ZeRO only adds communication); 0 = plain data parallel; 2 shards optimizer state and "
            "gradients; 3 also parameters.",
        ),
        "max_length": Param(64, type="integer", minimum=8, maximum=512, title="Max tokens per text"),
        "init_from": Param(
            "base",
            type="string",
            enum=["base", "champion"],
            title="Start from",
            description="base = fine-tune the base model from scratch; champion = warm start: continue "
            "training the current champion on the new data and the data window (fewer epochs reach "
            "its quality; falls back to the base model when there is no champion or the labels changed).",
        ),
        "max_rows": Param(
            None,
            type=["null", "integer"],
            minimum=10,
            title="Row cap",
            description="Use at most this many validated rows (quick trials). Empty = all.",
        ),
        "data_window_days": Param(
            30,
            type=["null", "number"],
            minimum=0,
            title="Data window (days)",
            description="Train on the new batches plus the validated data of earlier snapshots created "
            "within this many days. 0 = only the new batches; empty = all history.",
        ),
        "gate_min_macro_f1": Param(
            None,
            type=["null", "number"],
            minimum=0,
            maximum=1,
            title="Promotion floor",
            description="Override CT_GATE_MIN_MACRO_F1 for this run.",
        ),
        "force_promote": Param(
            False,
            type="boolean",
            title="Force promote (DANGER)",
            description="WARNING: makes the new model champion and deploys it even if it is WORSE than the "
            "current champion or below the floor. For emergencies only (e.g. the champion is broken); "
            "recorded on the model version as forced_promotion=true. The smoke test still guards the deploy.",
        ),
        "rollout": Param(
            env_choice("CT_ROLLOUT", "shadow+canary", ROLLOUTS),
            type="string",
            enum=list(ROLLOUTS),
            title="Rollout",
            description="How a model the gate passed takes over. direct: 100 % at once. shadow: first judged "
            "on a mirrored copy of live traffic (clients never see its answers). shadow+canary: then answers "
            "canary_fraction of live requests before it takes all. Default: CT_ROLLOUT (shadow+canary).",
        ),
        "shadow_min_texts": Param(
            env_int("CT_SHADOW_MIN_TEXTS", 200),
            type="integer",
            minimum=1,
            title="Shadow: live texts to judge on",
            description="shadow_check ends when this many live texts were answered by both models...",
        ),
        "shadow_max_minutes": Param(
            env_float("CT_SHADOW_MAX_MINUTES", 10.0),
            type="number",
            exclusiveMinimum=0,
            maximum=1440,
            title="Shadow: longest wait (minutes)",
            description="...or after this long, judged on what arrived (see quiet_service).",
        ),
        "shadow_min_agreement": Param(
            env_float("CT_SHADOW_MIN_AGREEMENT", 0.7),
            type="number",
            minimum=0,
            maximum=1,
            title="Shadow: least agreement with the champion",
            description="Share of live texts both models label the same; below it the candidate is stopped.",
        ),
        "canary_fraction": Param(
            env_float("CT_CANARY_FRACTION", 0.1),
            type="number",
            exclusiveMinimum=0,
            maximum=1,
            title="Canary: share of clients",
            description="Share of client keys (X-Client-Key header, else request id) the candidate answers.",
        ),
        "canary_min_requests": Param(
            env_int("CT_CANARY_MIN_REQUESTS", 100),
            type="integer",
            minimum=1,
            title="Canary: requests to judge on",
        ),
        "canary_max_minutes": Param(
            env_float("CT_CANARY_MAX_MINUTES", 10.0),
            type="number",
            exclusiveMinimum=0,
            maximum=1440,
            title="Canary: longest wait (minutes)",
        ),
        "quiet_service": Param(
            env_choice("CT_ROLLOUT_ON_QUIET", "proceed", ("proceed", "stop")),
            type="string",
            enum=["proceed", "stop"],
            title="Quiet service",
            description="Too little live traffic to judge in the window: proceed (the offline gate decides; "
            "the report says so) or stop the rollout.",
        ),
        "dry_run": Param(
            False,
            type="boolean",
            title="Dry run",
            description="Extract, validate, train and evaluate, then stop: nothing is registered, no alias "
            "moves, nothing is deployed, and the new batches stay unconsumed for the next real run.",
        ),
    },
    default_args=default_args(timedelta(hours=2), retry_exponential_backoff=True),
)
def continuous_training() -> None:
    @task
    def extract() -> dict[str, Any]:
        """Snapshot the due, unconsumed raw batches; skip the run when there are none."""

        from ml.extract import extract_snapshot

        context = get_current_context()
        dag_run = context["dag_run"]
        cutoff = context.get("data_interval_end") or dag_run.run_after
        settings = _settings(context)
        log.info("run %s (%s): dataset %s", dag_run.run_id, trigger_reason(dag_run), settings.dataset)
        manifest = extract_snapshot(
            settings,
            run_id=dag_run.run_id,
            cutoff=cutoff,
            dag_id=DAG_ID,
            dry_run=bool(context["params"].get("dry_run")),
        )
        if manifest is None:
            skip(
                f"no new data: every batch under raw/{settings.dataset}/ due by {cutoff:%Y-%m-%d %H:%M} "
                "was consumed by an earlier run; nothing to train on"
            )
        return {
            "snapshot_id": manifest["snapshot_id"],
            "dataset": settings.dataset,
            "batches": [b["batch_id"] for b in manifest["batches"]],
            "rows": manifest["total_rows"],
        }

    @task
    def validate(snapshot: dict[str, Any]) -> dict[str, Any]:
        """Gate every batch; quarantine failures; fail only when nothing valid remains."""
        from airflow.sdk.exceptions import AirflowFailException

        from ml.storage import SNAPSHOTS, ObjectStore
        from ml.validate import NoValidDataError, validate_snapshot

        context = get_current_context()
        settings = _settings(context)
        try:
            summary = validate_snapshot(settings, snapshot["snapshot_id"])
        except NoValidDataError as err:
            report = ObjectStore(settings).get_json(f"{SNAPSHOTS}/{snapshot['snapshot_id']}/validation.json")
            publish_links(context, data_docs=report.get("data_docs"))
            # Bad data does not get better on retry: fail for good, with the reasons.
            raise AirflowFailException(str(err)) from err
        publish_links(context, data_docs=summary["data_docs"])
        return {
            "snapshot_id": summary["snapshot_id"],
            "validated_key": summary["validated_key"],
            "rows": summary["rows_accepted"],
            "labels": summary["labels"],
            "quarantined": [q["batch_id"] for q in summary["quarantined"]],
            "data_docs": summary["data_docs"],
        }

    @task
    def plan_training(gate: dict[str, Any]) -> dict[str, Any]:
        """Turn the run's params into a checked TrainConfig and the Ray job's entrypoint."""
        import shlex

        from airflow.sdk.exceptions import AirflowFailException
        from pydantic import ValidationError

        from ml.settings import settings_env
        from ml.train import TrainConfig

        context = get_current_context()
        params, dag_run = context["params"], context["dag_run"]
        settings = _settings(context)
        run_name = training_run_name(gate["snapshot_id"], dag_run.run_id)
        try:
            config = TrainConfig(
                snapshot_id=gate["snapshot_id"],
                run_name=run_name,
                epochs=params["epochs"],
                learning_rate=params["learning_rate"],
                batch_size=params["batch_size"],
                num_workers=params["num_workers"],
                use_gpu=params["use_gpu"],
                zero_stage=params["zero_stage"],
                max_length=params["max_length"],
                init_from=params.get("init_from", "base"),
                max_rows=params["max_rows"],
                data_window_days=params.get("data_window_days"),
                trigger_reason=trigger_reason(dag_run),
                trigger_tags=trigger_tags(dag_run),
                dag_run_id=dag_run.run_id,
            )
        except ValidationError as err:
            raise AirflowFailException(f"training config rejected before submission: {err}") from err
        result_key = f"training/{run_name}/result.json"
        env = settings_env(settings)
        if params.get("gate_min_macro_f1") is not None:
            env["CT_GATE_MIN_MACRO_F1"] = str(params["gate_min_macro_f1"])
        return {
            "snapshot_id": gate["snapshot_id"],
            "run_name": run_name,
            "result_key": result_key,
            "entrypoint": "python -m ml.train --config "
            f"{shlex.quote(config.model_dump_json())} --result-key {shlex.quote(result_key)}",
            "runtime_env": {"env_vars": env},
        }

    @task
    def training_summary(plan: dict[str, Any]) -> dict[str, Any]:
        """Read the training job's result and build the evaluation job's entrypoint."""
        import shlex

        from ml.registry import run_url
        from ml.storage import ObjectStore

        context = get_current_context()
        settings = _settings(context)
        result = ObjectStore(settings).get_json(plan["result_key"])
        url = run_url(settings, result["mlflow_run_id"])
        publish_links(context, mlflow_run=url)
        log.info(
            "trained %s: %d epochs, best validation macro-F1 %s at epoch %s, %.0f s; MLflow run %s",
            plan["run_name"],
            result["epochs_completed"],
            result["best_val_macro_f1"],
            result["best_epoch"],
            result["fit_seconds"],
            url,
        )
        evaluation_key = f"training/{plan['run_name']}/evaluation.json"
        return {
            **{k: result[k] for k in ("mlflow_run_id", "epochs_completed", "best_val_macro_f1", "labels")},
            "mlflow_run_url": url,
            "evaluation_key": evaluation_key,
            "entrypoint": f"python -m ml.evaluate --snapshot-id {shlex.quote(plan['snapshot_id'])} "
            f"--run-id {shlex.quote(result['mlflow_run_id'])} --result-key {shlex.quote(evaluation_key)}",
        }

    @task
    def register(plan: dict[str, Any], summary: dict[str, Any], gate: dict[str, Any]) -> dict[str, Any]:
        """Register the model version; alias challenger always, champion only through the gate."""

        from ml.registry import model_version_url, register_challenger
        from ml.storage import ObjectStore

        context = get_current_context()
        params, dag_run = context["params"], context["dag_run"]
        settings = _settings(context)
        evaluation = ObjectStore(settings).get_json(summary["evaluation_key"])
        publish_links(context, mlflow_run=summary.get("mlflow_run_url"))
        if params.get("dry_run"):
            gate = evaluation["gate"]
            skip(
                f"dry run: nothing registered or deployed. The gate would have said "
                f"{'PROMOTE' if gate['promote'] else 'REJECT'}: {gate['reason']}"
            )
        outcome = register_challenger(
            settings,
            summary["mlflow_run_id"],
            evaluation,
            tags={
                "snapshot_id": plan["snapshot_id"],
                "validation": f"{gate['rows']} rows accepted, quarantined: {gate['quarantined'] or 'none'}",
                "trigger_reason": trigger_reason(dag_run),
                **trigger_tags(dag_run),
                "dag_run_id": dag_run.run_id,
            },
            force_promote=bool(params.get("force_promote")),
            # staged: champion moves only after the live stages (deploy's smoke_test)
            move_champion=params.get("rollout", "direct") == "direct",
        )
        publish_links(context, mlflow_model=model_version_url(settings, outcome["name"], outcome["version"]))
        if outcome["promoted"] and not outcome.get("champion_moved", True):
            verdict = f"passed the gate; rollout {params['rollout']}: champion once it passed on live traffic"
        elif outcome["promoted"]:
            verdict = "PROMOTED to champion"
        else:
            verdict = "kept as challenger (champion unchanged)"
        log.info("%s version %s %s: %s", outcome["name"], outcome["version"], verdict, outcome["reason"])
        return outcome

    @task(retries=1)
    def start_shadow(outcome: dict[str, Any]) -> dict[str, Any]:
        """Load the gate's new model beside the champion; mirrored live traffic, answers logged only."""
        from airflow.sdk.exceptions import AirflowFailException

        from ml.rollout import DeployError
        from ml.serving_history import serving_history_url
        from ml.staged_rollout import start_candidate

        context = get_current_context()
        rollout = context["params"].get("rollout", "direct")
        if not outcome["promoted"]:
            skip(f"v{outcome['version']} did not pass the gate: nothing to roll out")
        if outcome.get("champion_moved", True):
            skip(
                f"rollout {rollout}{' (forced promotion)' if outcome.get('forced') else ''}: deploy serves it at once"
            )
        settings = _settings(context)
        try:
            stage = start_candidate(settings, outcome, "shadow", actor=context["dag_run"].run_id)
        except DeployError as err:
            raise AirflowFailException(str(err)) from err
        publish_links(context, serving_history=serving_history_url(settings, outcome["name"]))
        if "skipped" in stage:
            skip(stage["skipped"])
        return stage

    @task(retries=0, execution_timeout=timedelta(hours=25))  # a retry would watch a removed candidate
    def shadow_check(stage: dict[str, Any]) -> dict[str, Any]:
        """Wait for live texts, compare shadow and champion on them, report, decide."""
        from airflow.sdk.exceptions import AirflowFailException

        from ml.rollout_report import ShadowPolicy
        from ml.staged_rollout import RolloutStopped, shadow_stage

        context = get_current_context()
        params = context["params"]
        policy = ShadowPolicy(
            min_texts=params["shadow_min_texts"],
            max_minutes=params["shadow_max_minutes"],
            min_agreement=params["shadow_min_agreement"],
            on_quiet=params["quiet_service"],
        )
        try:
            result = shadow_stage(_settings(context), stage, policy, actor=context["dag_run"].run_id)
        except RolloutStopped as err:
            publish_links(context, rollout_report=((err.report or {}).get("report") or {}).get("html"))
            raise AirflowFailException(str(err)) from err
        publish_links(context, rollout_report=result["shadow"]["report"]["html"])
        return result

    @task(retries=0, execution_timeout=timedelta(hours=25))  # a retry would re-judge after a rollback
    def canary(stage: dict[str, Any]) -> dict[str, Any]:
        """The candidate answers a share of live requests; compare errors and latency; promote or roll back."""
        from airflow.sdk.exceptions import AirflowFailException

        from ml.rollout_report import CanaryPolicy
        from ml.staged_rollout import RolloutStopped, canary_stage

        context = get_current_context()
        params = context["params"]
        if params.get("rollout") != "shadow+canary":
            skip(
                f"rollout {params.get('rollout')}: no canary stage; deploy promotes the candidate from shadow"
            )
        policy = CanaryPolicy(
            fraction=params["canary_fraction"],
            min_requests=params["canary_min_requests"],
            max_minutes=params["canary_max_minutes"],
            on_quiet=params["quiet_service"],
        )
        try:
            result = canary_stage(_settings(context), stage, policy, actor=context["dag_run"].run_id)
        except RolloutStopped as err:
            publish_links(context, rollout_report=((err.report or {}).get("report") or {}).get("html"))
            raise AirflowFailException(str(err)) from err
        publish_links(context, rollout_report=result["canary"]["report"]["html"])
        return result

    # runs after the live stages passed, or when they were skipped (direct rollout, nothing served)
    @task(retries=1, trigger_rule="none_failed_min_one_success")
    def deploy(outcome: dict[str, Any]) -> dict[str, Any]:
        """Point the model's Ray Serve application at the new champion; roll back if it does not serve."""
        from airflow.sdk.exceptions import AirflowFailException

        from ml.rollout import DeployError, deploy_promoted

        if not outcome["promoted"]:
            skip(
                f"v{outcome['version']} was not promoted; champion is still v{outcome['champion_version']}: "
                "the serving application is left untouched"
            )
        try:
            context = get_current_context()
            return deploy_promoted(_settings(context), outcome, actor=context["dag_run"].run_id)
        except DeployError as err:
            raise AirflowFailException(str(err)) from err

    @task(retries=0)  # a retry after a rollback would re-test the old version: see NO_RETRY in the tests
    def smoke_test(
        deployed: dict[str, Any], summary: dict[str, Any], outcome: dict[str, Any]
    ) -> dict[str, Any]:
        """Served predictions must equal the evaluated model's offline ones; else roll back."""
        from airflow.sdk.exceptions import AirflowFailException

        from ml.rollout import DeployError, verify_deployed
        from ml.storage import ObjectStore

        context = get_current_context()
        settings = _settings(context)
        expected = ObjectStore(settings).get_json(summary["evaluation_key"]).get("smoke")
        passed = [t for t in ("shadow_check", "canary") if context["ti"].xcom_pull(task_ids=t)]
        staged = not outcome.get("champion_moved", True)
        reason = (
            f"promoted after the live {' and '.join(t.removesuffix('_check') for t in passed)} stage"
            f"{'s' if len(passed) > 1 else ''} passed"
            if passed
            else "promoted to champion by the offline gate"
        )
        try:
            report = verify_deployed(
                settings,
                deployed,
                expected,
                actor=context["dag_run"].run_id,
                reason=reason,
                move_champion=staged,
            )
        except DeployError as err:
            raise AirflowFailException(str(err)) from err
        publish_links(context, serve=settings.serve_link("v1/model"))
        log.info(
            "%s v%s is serving at %s (MLflow alias 'serving')",
            deployed["name"],
            deployed["version"],
            settings.serve_link("v1/predict"),
        )
        return report

    validated = with_links(validate(extract()), DataDocsLink())
    plan = plan_training(validated)
    train = RayJobOperator(
        task_id="train",
        entrypoint=plan["entrypoint"],
        submission_key=plan["run_name"],
        runtime_env=plan["runtime_env"],
        job_timeout=timedelta(hours=6),
        poll_interval=5,
        execution_timeout=timedelta(hours=7),
    )
    summary = with_links(training_summary(plan), MlflowRunLink())
    train >> summary
    evaluate = RayJobOperator(
        task_id="evaluate",
        entrypoint=summary["entrypoint"],
        submission_key=summary["evaluation_key"],
        runtime_env=plan["runtime_env"],
        job_timeout=timedelta(hours=1),
        poll_interval=5,
    )
    outcome = with_links(register(plan, summary, validated), MlflowRunLink(), MlflowModelLink())
    evaluate >> outcome
    stage = with_links(start_shadow(outcome), ServingHistoryLink())
    staged = with_links(canary(with_links(shadow_check(stage), RolloutReportLink())), RolloutReportLink())
    deployed = deploy(outcome)
    staged >> deployed
    with_links(smoke_test(deployed, summary, outcome), ServedModelLink())


def trigger_reason(dag_run: Any) -> str:
    """Why this run exists: the conf's ``reason`` (e.g. drift), else the run type."""
    run_type = getattr(dag_run.run_type, "value", dag_run.run_type)
    return str((dag_run.conf or {}).get("reason") or run_type)


def trigger_tags(dag_run: Any) -> dict[str, str]:
    """What a drift-triggered run was told about the drift, for MLflow run and version tags."""
    conf = dag_run.conf or {}
    fields = {"drift_score": "drift_score", "drift_report": "report", "drift_check_run_id": "drift_run_id"}
    return {tag: str(conf[key]) for tag, key in fields.items() if conf.get(key) is not None}


def training_run_name(snapshot_id: str, run_id: str) -> str:
    """Stable per (snapshot, DAG run): Ray Train's run folder and the MLflow run name."""
    return f"{snapshot_id}-{hashlib.sha256(run_id.encode()).hexdigest()[:8]}"


continuous_training()
