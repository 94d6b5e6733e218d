"""Operator actions on what a model's Serve application serves: rollback, pin, promote.

The ``serving_control`` DAG (trigger form) and this module's CLI run the same code::

    python -m ml.serving_control rollback --dataset agnews --reason "v7 mislabels sports"
    python -m ml.serving_control pin      --dataset agnews --version 5 --reason "hold v5 over the holidays"
    python -m ml.serving_control promote  --dataset agnews --reason "challenger checked by hand"

* ``rollback``: back to the version that served before the current one, by the serving history
  (``reports/serving/<model>/history.jsonl``, :mod:`ml.serving_history`);
* ``pin``: a given version number;
* ``promote``: the current ``challenger``.

Each goes through the pipeline's own deploy, smoke test and automatic rollback
(:class:`ml.rollout.ServeDeployer`): the new version must answer the smoke texts as it did offline
in its evaluation (``evaluation/evaluation.json`` of its training run; fixed texts when a version
has none), else the previous one is put back and the action fails. On success the ``champion``
and ``serving`` aliases both move to the served version, so the next training run is compared
against what actually serves. Every attempt, good or failed, is appended to the serving history
with the operator's reason.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from ml.settings import Settings, load_settings

log = logging.getLogger(__name__)

ACTIONS = ("rollback", "pin", "promote")
MIN_REASON_CHARS = 3


class ControlError(RuntimeError):
    """The action cannot be carried out (nothing to roll back to, no such version, a failed deploy);
    the message says why and what serves now."""


def check_request(action: str, reason: str | None, version: str | int | None) -> tuple[str, str | None]:
    """The action's inputs, checked before anything changes: ``(reason, version)``."""
    if action not in ACTIONS:
        raise ControlError(f"unknown action {action!r}: one of {', '.join(ACTIONS)}")
    reason = (reason or "").strip()
    if len(reason) < MIN_REASON_CHARS:
        raise ControlError(
            f"a reason is required for {action} (at least {MIN_REASON_CHARS} characters): it goes "
            "into the serving history and onto the model version"
        )
    version = None if version is None or str(version).strip() == "" else str(version).strip()
    if action == "pin" and (version is None or not version.isdigit()):
        raise ControlError(f"pin needs a version number, got {version!r}")
    if action != "pin" and version is not None:
        raise ControlError(
            f"{action} takes no version (it was given {version!r}); use pin for a given version"
        )
    return reason, version


def expected_answers(settings: Settings, run_id: str | None) -> dict[str, Any] | None:
    """The smoke set of a version's evaluation (texts, offline labels and scores), or None."""
    if not run_id:
        return None
    from mlflow import MlflowClient

    from ml.evaluate import EVALUATION_ARTIFACT

    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    try:
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory(prefix="ct-smoke-") as tmp:
            path = client.download_artifacts(run_id, EVALUATION_ARTIFACT, tmp)
            return json.loads(Path(path).read_text()).get("smoke")
    except Exception as err:  # a version registered outside the pipeline: the fixed texts then
        log.info(
            "run %s has no %s (%s): the smoke test uses its fixed texts", run_id, EVALUATION_ARTIFACT, err
        )
        return None


def resolve_target(settings: Settings, action: str, version: str | None, serving_now: str | None):
    """The registered version the action serves (an MLflow ``ModelVersion``)."""
    from mlflow import MlflowClient

    from ml.registry import CHALLENGER, resolve_version
    from ml.serving_history import previous_serving_version

    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    name = settings.registered_model
    try:
        if action == "pin":
            return resolve_version(client, name, version)
        if action == "promote":
            return resolve_version(client, name, CHALLENGER)
        previous = previous_serving_version(settings, name, current=serving_now)
    except LookupError as err:
        raise ControlError(str(err)) from err
    if previous is None:
        raise ControlError(
            f"rollback of {name}: the serving history (reports/serving/{name}/history.jsonl) records no "
            f"version that served before v{serving_now}; use pin with a version number"
        )
    try:
        return resolve_version(client, name, previous)
    except LookupError as err:
        raise ControlError(f"rollback of {name} to v{previous}: {err}") from err


def run_control(
    settings: Settings,
    action: str,
    reason: str | None,
    actor: str,
    version: str | int | None = None,
    deployer: Any = None,
) -> dict[str, Any]:
    """Carry out ``action`` on the settings' dataset's model; returns the history entry it recorded.

    Raises :class:`ControlError` when it cannot (the old version then still serves, and the failed
    attempt is in the history too).
    """
    from ml.registry import CHAMPION, mark_serving
    from ml.rollout import DeployError, ServeDeployer
    from ml.serving_history import record

    reason, version = check_request(action, reason, version)
    deployer = deployer or ServeDeployer(settings)
    name = settings.registered_model
    started = time.monotonic()
    before = deployer.serving()
    serving_now = before.model.version if before else None
    entry = {"model": name, "dataset": settings.dataset, "action": action, "actor": actor, "reason": reason}
    try:
        target = resolve_target(settings, action, version, serving_now)
    except ControlError as err:
        record(
            settings,
            **entry,
            from_version=serving_now,
            to_version=None,
            result="failed",
            seconds=round(time.monotonic() - started, 1),
            detail=str(err),
        )
        raise
    to_version = str(target.version)
    log.info(
        "%s of %s: v%s -> v%s (%s); reason: %s", action, name, serving_now or "-", to_version, actor, reason
    )
    try:
        if (
            before is not None
            and before.model.version == to_version
            and before.model.run_id in {None, target.run_id}
        ):
            log.info("%s v%s already serves: only the aliases move", name, to_version)
        else:
            deployed = deployer.deploy(to_version, model_name=name, run_id=target.run_id)
            deployer.verify(deployed, expected_answers(settings, target.run_id))  # rolls back on failure
    except DeployError as err:
        rolled_back = "ROLLBACK ALSO FAILED" not in str(err)
        record(
            settings,
            **entry,
            from_version=serving_now,
            to_version=to_version,
            result="rolled_back" if rolled_back else "failed",
            seconds=round(time.monotonic() - started, 1),
            detail=str(err),
        )
        raise ControlError(f"{action} of {name} to v{to_version} failed: {err}") from err

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    client.set_registered_model_alias(name, CHAMPION, to_version)  # the next run is compared with what serves
    mark_serving(settings, to_version, name=name, tags={"deployed_by": actor, "serving_control": action})
    seconds = round(time.monotonic() - started, 1)
    log.info("%s v%s serves and is champion (%s took %.1f s)", name, to_version, action, seconds)
    return record(
        settings, **entry, from_version=serving_now, to_version=to_version, result="ok", seconds=seconds
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=ACTIONS)
    parser.add_argument("--dataset", help="the model's dataset (default CT_DATASET)")
    parser.add_argument("--version", help="pin: the version number to serve")
    parser.add_argument("--reason", required=True, help="why: goes into the serving history")
    parser.add_argument("--actor", help="who (default user:<login name>)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = load_settings(**({"dataset": args.dataset} if args.dataset else {}))
    try:
        entry = run_control(
            settings, args.action, args.reason, args.actor or f"user:{getpass.getuser()}", args.version
        )
    except ControlError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(entry))
    return 0


if __name__ == "__main__":
    sys.exit(main())
