"""Failure messages that name the stage and the fix.

Every task of the pipeline DAGs gets :func:`explain_failure` as ``on_failure_callback``: when a
try fails for good, the last lines of its log say which stage failed, the error, and what an
operator usually does about it. The error texts themselves already name the object at fault
(batch, version, job id); the hints say where to look and what to change.
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn

log = logging.getLogger(__name__)

STAGE_HINTS: dict[str, tuple[str, str]] = {
    # continuous_training
    "extract": (
        "data extraction from S3/MinIO",
        "check the S3 endpoint and credentials (connection ct_minio / CT_S3_*) and that the bucket exists; "
        "unreadable files are reported per object and the batch is quarantined by validate",
    ),
    "validate": (
        "data validation (Great Expectations)",
        "read the failed expectations above and the batch's Data Docs (task link); fix the data and upload "
        "it under a new batch id in raw/<dataset>/ - the bad batch stays in quarantine/ for reference",
    ),
    "plan_training": (
        "training plan",
        "fix the run's params (trigger form) named in the error, e.g. ZeRO stage or max_length",
    ),
    "train": (
        "fine-tuning (Ray Train + DeepSpeed)",
        "open the Ray job (task link or dashboard :8265) for the worker traceback; out of memory -> smaller "
        "batch_size/max_length or ZeRO stage 3; not enough CPUs/GPUs -> fewer num_workers",
    ),
    "training_summary": (
        "reading the training result",
        "the training job finished without writing its result JSON; see the train task's log",
    ),
    "evaluate": (
        "evaluation against the champion",
        "open the Ray job log; a champion that cannot be loaded (deleted artifact) must be fixed or its "
        "alias moved in MLflow",
    ),
    "register": (
        "registration in MLflow",
        "check the MLflow server (connection ct_mlflow / CT_MLFLOW_TRACKING_URI) and its artifact store",
    ),
    "deploy": (
        "deployment to Ray Serve",
        "the previous model was put back and still serves (see the message); check the Serve replica logs "
        "in the Ray dashboard, fix the model or the Serve config, then clear this task",
    ),
    "smoke_test": (
        "smoke test of the deployed model",
        "the previous model was put back; compare the served and offline predictions in the log - a "
        "difference usually means a preprocessing or dtype mismatch between serving and evaluation",
    ),
    "start_shadow": (
        "starting the shadow stage (candidate beside the champion)",
        "the candidate did not load in the Serve replicas and was removed; the champion serves on. See the "
        "error (Ray dashboard -> Serve -> replica logs) and the Serving history",
    ),
    "shadow_check": (
        "shadow check on live traffic",
        "the candidate answered mirrored live traffic too differently from the champion (numbers above, "
        "Rollout report link) and was removed; the champion serves on untouched. Look at the report's "
        "disagreements and label distribution; retrain, or promote by hand (serving_control) if you disagree",
    ),
    "canary": (
        "canary on live traffic",
        "the canary's live error rate or latency was out of bounds (numbers above, Rollout report link); it "
        "was rolled back to 0 % and the champion answers every request. Check the candidate's replica logs",
    ),
    # drift_monitor (check, decide, trigger_training, record_trigger: one mapped instance per model)
    "list_models": (
        "listing the models that served the window",
        "check S3 (connection ct_minio / CT_S3_*): the prediction log is under predictions/dt=…/hour=…/",
    ),
    "check": (
        "drift check (Evidently)",
        "check S3 (prediction log under predictions/) and MLflow; a model version without a snapshot_id tag "
        "or a deleted training split has no reference - retrain it through continuous_training",
    ),
    "decide": (
        "trigger decision",
        "see the error; the cooldown stamp is s3://<bucket>/reports/drift/<model>/_last_trigger.json",
    ),
    "trigger_training": (
        "triggering continuous_training",
        "check that the DAG continuous_training exists and is not paused",
    ),
    "record_trigger": (
        "starting the cooldown",
        "the training run WAS triggered, but its cooldown stamp could not be written to S3: check S3; until "
        "it is written a later drift verdict may trigger again",
    ),
    # serving_control
    "plan": (
        "checking the serving-control request",
        "nothing was changed: fix the form (a reason, a version number for pin) or, for rollback, pin a "
        "version when the serving history records none before the current one",
    ),
    "apply": (
        "serving-control deploy",
        "the previous version was put back and still serves (see the message and the Serving history "
        "link); fix the version or the Serve config and trigger again - this task never retries",
    ),
    # raw_data_watch (detect, trigger_training, record_announcement: one mapped instance per dataset)
    "list_datasets": (
        "listing the datasets under raw/",
        "check the S3 endpoint and credentials (connection ct_minio / CT_S3_*) and the datasets param",
    ),
    "detect": (
        "new raw data detection",
        "check the S3 endpoint and credentials (connection ct_minio / CT_S3_*)",
    ),
    "record_announcement": (
        "recording the announcement",
        "the training run WAS triggered, but s3://<bucket>/reports/raw_watch/<dataset>.json could not be "
        "written: check S3; until it is written the next poll triggers another run for the same data "
        "(which skips at extract once the first one consumed it)",
    ),
}


def failure_message(task_id: str, error: BaseException | str | None) -> str:
    """``task_id`` may be a task group's (``per_model.check``): the task's own id names the stage."""
    stage, hint = STAGE_HINTS.get(task_id) or STAGE_HINTS.get(
        task_id.rsplit(".", 1)[-1], (task_id, "see the error above")
    )
    return f"stage '{task_id}' ({stage}) failed: {error or 'see the log above'}\n  what to do: {hint}"


def explain_failure(context: Any) -> None:
    """``on_failure_callback``: log the stage, the error and the usual fix."""
    ti = context["ti"]
    log.error(failure_message(ti.task_id, context.get("exception")))


def skip(reason: str) -> NoReturn:
    """Skip the task with ``reason`` in its log (Airflow itself only logs "Skipping task.")."""
    from airflow.sdk.exceptions import AirflowSkipException

    log.info("SKIPPED: %s", reason)
    raise AirflowSkipException(reason)
