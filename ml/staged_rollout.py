"""Staged rollouts: judge a new model on live traffic (shadow, then canary) before it takes over.

``continuous_training``'s ``rollout`` param picks one of :data:`ROLLOUTS`:

* ``direct``: the gate's champion is deployed to 100 % at once (``ml.rollout``), as before.
* ``shadow``: the candidate is deployed **beside** the serving model in the same Serve application
  (``user_config.candidate``, mode ``shadow``). Every client is still answered by the serving
  model; a copy of each request's texts goes to the candidate in the background (low CPU priority,
  bounded queue) and its answers go only to the prediction log (``role=shadow``).
  :func:`shadow_stage` waits for ``min_texts`` paired texts or ``max_minutes``, compares the two
  models on the same texts (:func:`ml.rollout_report.shadow_comparison`), writes an HTML + JSON
  report and decides. Stopped: the candidate is removed and the run fails with the numbers.
* ``shadow+canary``: after the shadow stage, the candidate answers ``fraction`` of the live
  requests (sticky per client key), :func:`canary_stage` compares live error rate and latency of
  canary and serving model, and either passes or rolls the canary back to 0 %.

Only then :func:`promote_candidate` makes the candidate serve 100 % (the replicas already hold it:
the swap loads nothing), smoke-tests it like any deploy, and moves ``champion`` and ``serving``. Until
then the candidate is only ``challenger``. Every stage goes into the serving history.

A quiet service (fewer texts than the policy's ``min_decisive`` in ``max_minutes``) gives no live
evidence: ``on_quiet: proceed`` (default) goes on with the offline gate's verdict (the report says
so), ``stop`` stops the rollout. A service nobody calls cannot be harmed by the new model, and a
drift-triggered run must not wait forever.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from ml.rollout import DeployError, ModelId, ServeDeployer
from ml.rollout_report import CanaryPolicy, ShadowPolicy, canary_comparison, render_html, shadow_comparison
from ml.settings import Settings

log = logging.getLogger(__name__)

ROLLOUTS = ("direct", "shadow", "shadow+canary")
ROLLOUT_REPORTS = "reports/rollout"


class RolloutStopped(DeployError):
    """A stage said no: the candidate was removed, the serving model serves on untouched."""

    def __init__(self, message: str, report: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.report = report


def check_rollout(rollout: str) -> str:
    if rollout not in ROLLOUTS:
        raise ValueError(f"rollout must be one of {', '.join(ROLLOUTS)}, not {rollout!r}")
    return rollout


def _record(settings: Settings, **entry: Any) -> None:
    from ml.serving_history import record

    try:
        record(settings, dataset=settings.dataset, **entry)
    except Exception:  # the rollout's own outcome is what the task must report
        log.exception("could not record %s in the serving history", entry.get("action"))


def _now() -> datetime:
    return datetime.now(UTC)


# ---- the candidate beside the serving model ------------------------------------------------------


def start_candidate(
    settings: Settings,
    outcome: dict[str, Any],
    mode: str,
    *,
    fraction: float = 0.0,
    inject: dict[str, Any] | None = None,
    actor: str,
    deployer: ServeDeployer | None = None,
) -> dict[str, Any]:
    """Run ``outcome``'s version (name, version, run_id) as candidate in ``mode`` beside the serving
    model, until every replica reports it loaded; recorded as ``<mode>_start``.

    Returns ``{"name", "version", "run_id", "champion": {...}, "mode", "started_at", ...}``, or
    ``{"skipped": why}`` when nothing serves yet (a first deploy has nothing to compare with).
    A candidate that does not load is removed again and :class:`DeployError` says why.
    """
    deployer = deployer or ServeDeployer(settings)
    started = time.monotonic()
    serving = deployer.serving()
    target = ModelId(outcome["name"], str(outcome["version"]), outcome.get("run_id"))
    if serving is None:
        return {"skipped": f"nothing serves at {deployer.serve_url} yet: {target} is deployed directly"}
    if serving.model.matches(target):
        return {"skipped": f"{target} already serves"}
    candidate = {
        "model_name": target.name,
        "model_version": target.version,
        "mode": mode,
        "fraction": fraction if mode == "canary" else 0.1,
        **(inject or {}),
    }
    log.info(
        "starting %s as %s candidate beside %s (application %r)",
        target,
        mode,
        serving.model,
        deployer.app_name,
    )
    entry = {
        "model": target.name,
        "action": f"{mode}_start",
        "from_version": serving.version,
        "to_version": target.version,
        "actor": actor,
    }
    try:
        deployer.apply(deployer.candidate_config(deployer.current_config(), candidate))
        deployer.wait_for_candidate(target, mode)
    except DeployError as err:
        _remove_candidate(deployer)
        _record(
            settings,
            **entry,
            result="failed",
            reason=f"{mode} stage could not start",
            seconds=round(time.monotonic() - started, 1),
            detail=str(err)[:2000],
        )
        raise
    seconds = round(time.monotonic() - started, 1)
    share = f" answering {fraction:.0%} of client keys" if mode == "canary" else " on mirrored traffic"
    _record(
        settings,
        **entry,
        result="ok",
        reason=f"candidate v{target.version} in {mode}{share}; v{serving.version} serves",
        seconds=seconds,
    )
    log.info("%s is in %s beside %s after %.1f s", target, mode, serving.model, seconds)
    return {
        **target.to_dict(),
        "champion": serving.model.to_dict(),
        "mode": mode,
        "fraction": fraction if mode == "canary" else 0.0,
        "started_at": _now().isoformat(),
        "app": deployer.app_name,
        "inject": inject or {},
    }


def _remove_candidate(deployer: ServeDeployer) -> None:
    """Take the candidate out (0 % of traffic, no mirroring); the serving model is untouched."""
    try:
        current = deployer.current_config()
        if deployer.app_config(current) is not None:
            deployer.apply(deployer.candidate_config(current, None))
            deployer.wait_for_candidate(None)
    except Exception:
        log.exception("could not remove the candidate from application %r", deployer.app_name)
        raise


def stop_candidate(
    settings: Settings,
    stage: dict[str, Any],
    *,
    action: str,
    reason: str,
    actor: str,
    detail: str | None = None,
    deployer: ServeDeployer | None = None,
) -> None:
    """Remove ``stage``'s candidate and record ``action`` (shadow_reject / canary_rollback)."""
    deployer = deployer or ServeDeployer(settings)
    started = time.monotonic()
    result = "ok"
    try:
        _remove_candidate(deployer)
    except Exception as err:
        result, detail = "failed", f"the candidate could not be removed: {err}"[:2000]
    _record(
        settings,
        model=stage["name"],
        action=action,
        from_version=stage["champion"]["version"],
        to_version=str(stage["version"]),
        result=result,
        actor=actor,
        reason=reason[:1000],
        seconds=round(time.monotonic() - started, 1),
        detail=detail,
    )


# ---- watching the prediction log -----------------------------------------------------------------


def _window(settings: Settings, since: datetime, store: Any = None):
    from ml.prediction_log import read_predictions
    from ml.storage import ObjectStore

    return read_predictions(store or ObjectStore(settings), since, _now() + timedelta(minutes=1))


def _ids(stage: dict[str, Any]) -> tuple[tuple[str, str], tuple[str, str]]:
    return (stage["champion"]["name"], str(stage["champion"]["version"])), (
        stage["name"],
        str(stage["version"]),
    )


def training_labels(settings: Settings, name: str, version: str) -> dict[str, float] | None:
    """The label shares of the candidate's training split (None when unknown)."""
    from ml.monitor import reference_for
    from ml.storage import ObjectStore

    try:
        reference, _, _ = reference_for(settings, ObjectStore(settings), name, version)
    except Exception as err:
        log.warning(
            "training labels of %s v%s unknown (%s): the label shift is not judged", name, version, err
        )
        return None
    shares = reference["label"].astype(str).value_counts(normalize=True)
    return {str(k): float(v) for k, v in shares.items()}


def observe(
    settings: Settings,
    stage: dict[str, Any],
    compare: Any,
    enough: Any,
    max_minutes: float,
    poll_s: float = 10.0,
    store: Any = None,
) -> dict[str, Any]:
    """Re-read the stage's window of the prediction log every ``poll_s`` and ``compare`` it, until
    ``enough(report)`` or ``max_minutes`` after the stage started; the last report, with the wait."""
    since = datetime.fromisoformat(stage["started_at"])
    deadline = since + timedelta(minutes=max_minutes)
    while True:
        report = compare(_window(settings, since, store))
        waited = (_now() - since).total_seconds()
        report["window"] = {
            "start": since.isoformat(),
            "end": _now().isoformat(),
            "waited_s": round(waited, 1),
        }
        if enough(report):
            report["window"]["ended_by"] = "enough traffic"
            return report
        if _now() >= deadline:
            report["window"]["ended_by"] = f"time ({max_minutes:g} min)"
            return report
        log.info("%s: %s after %.0f s; waiting for more traffic", stage["mode"], _progress(report), waited)
        time.sleep(poll_s)


def _progress(report: dict[str, Any]) -> str:
    if report.get("stage") == "shadow":
        agreement = report.get("agreement")
        so_far = f", agreement so far {agreement:.2f}" if agreement is not None else ""
        return f"{report.get('texts', 0)} paired texts{so_far}"
    requests = report.get("requests") or {}
    return f"{requests.get('canary', 0)} canary / {requests.get('champion', 0)} champion requests"


def write_report(settings: Settings, report: dict[str, Any], stage: dict[str, Any]) -> dict[str, str]:
    """The report as JSON and HTML under ``reports/rollout/<model>/v<version>/``; their links."""
    import json

    from ml.storage import ObjectStore

    store = ObjectStore(settings)
    stamp = _now().strftime("%Y%m%dT%H%M%SZ")
    base = f"{ROLLOUT_REPORTS}/{stage['name']}/v{stage['version']}/{report['stage']}-{stamp}"
    store.put_bytes(
        f"{base}.json", json.dumps(report, indent=2, allow_nan=False).encode(), "application/json"
    )
    store.put_bytes(f"{base}.html", render_html(report).encode(), "text/html; charset=utf-8")
    return {
        "json": settings.report_link(f"{base}.json"),
        "html": settings.report_link(f"{base}.html"),
        "key": f"{base}.html",
    }


# ---- the stages ----------------------------------------------------------------------------------


def _conclude(
    settings: Settings,
    stage: dict[str, Any],
    report: dict[str, Any],
    policy: Any,
    *,
    action: str,
    actor: str,
    stopped: Any,
    deployer: ServeDeployer | None = None,
) -> dict[str, Any]:
    """Write the stage's report and act on its decision: the summary when it passed; else the
    candidate is removed, ``action`` recorded, and :class:`RolloutStopped` (``stopped(reason, link)``)."""
    report["policy"] = policy.model_dump()
    links = write_report(settings, report, stage)
    log.info("%s report: %s", report["stage"], links["html"])
    summary = {"decision": report["decision"], "reason": report["reason"], "report": links}
    if not report["passed"]:
        stop_candidate(
            settings,
            stage,
            action=action,
            reason=f"{report['stage']} check: {report['reason']}",
            actor=actor,
            detail=links["html"],
            deployer=deployer,
        )
        raise RolloutStopped(stopped(report["reason"], links["html"]), summary)
    return summary


def shadow_stage(
    settings: Settings,
    stage: dict[str, Any],
    policy: ShadowPolicy,
    *,
    actor: str,
    poll_s: float = 10.0,
) -> dict[str, Any]:
    """Watch the shadow, report and decide. Passed: the report (the candidate stays in shadow for
    the next stage). Stopped: the candidate is removed, recorded, and :class:`RolloutStopped`."""
    champion, candidate = _ids(stage)
    labels = training_labels(settings, *candidate)
    log.info(
        "shadow of v%s beside v%s: waiting for %d paired texts or %g min",
        candidate[1],
        champion[1],
        policy.min_texts,
        policy.max_minutes,
    )
    report = observe(
        settings,
        stage,
        lambda rows: shadow_comparison(
            rows, champion=champion, candidate=candidate, training_labels=labels, policy=policy
        ),
        lambda r: r["texts"] >= policy.min_texts,
        policy.max_minutes,
        poll_s,
    )
    summary = _conclude(
        settings,
        stage,
        report,
        policy,
        action="shadow_reject",
        actor=actor,
        stopped=lambda reason, html: (
            f"candidate v{candidate[1]} stopped at shadow: {reason}. v{champion[1]} "
            f"serves on untouched. Report: {html}"
        ),
    )
    log.info("shadow check passed: %s", report["reason"])
    return {**stage, "shadow": summary}


def canary_stage(
    settings: Settings,
    stage: dict[str, Any],
    policy: CanaryPolicy,
    *,
    actor: str,
    poll_s: float = 10.0,
    deployer: ServeDeployer | None = None,
) -> dict[str, Any]:
    """Switch the candidate from shadow to canary at ``policy.fraction``, watch, report, decide.
    Outside the bounds: rolled back to 0 % (the clients it answered get the serving model again),
    recorded, :class:`RolloutStopped` with the numbers."""
    deployer = deployer or ServeDeployer(settings)
    canary = start_candidate(
        settings,
        {"name": stage["name"], "version": stage["version"], "run_id": stage.get("run_id")},
        "canary",
        fraction=policy.fraction,
        inject=stage.get("inject"),
        actor=actor,
        deployer=deployer,
    )
    if "skipped" in canary:  # the serving model changed meanwhile
        raise RolloutStopped(f"canary of v{stage['version']} not started: {canary['skipped']}")
    canary = {**stage, **canary}
    champion, candidate = _ids(canary)
    log.info(
        "canary v%s answers %.0f%% of client keys; waiting for %d canary requests or %g min",
        candidate[1],
        100 * policy.fraction,
        policy.min_requests,
        policy.max_minutes,
    )
    report = observe(
        settings,
        canary,
        lambda rows: canary_comparison(rows, champion=champion, candidate=candidate, policy=policy),
        lambda r: (r.get("requests") or {}).get("canary", 0) >= policy.min_requests,
        policy.max_minutes,
        poll_s,
    )
    summary = _conclude(
        settings,
        canary,
        report,
        policy,
        action="canary_rollback",
        actor=actor,
        stopped=lambda reason, html: (
            f"canary v{candidate[1]} rolled back to 0 %: {reason}. v{champion[1]} "
            f"answers every request again. Report: {html}"
        ),
        deployer=deployer,
    )
    links = summary["report"]
    _record(
        settings,
        model=canary["name"],
        action="canary_pass",
        from_version=champion[1],
        to_version=candidate[1],
        result="ok",
        actor=actor,
        reason=f"canary check: {report['reason']}",
        detail=links["html"],
    )
    log.info("canary check passed: %s", report["reason"])
    return {**canary, "canary": summary}


def promote_candidate(
    settings: Settings,
    stage: dict[str, Any],
    expected: dict[str, Any] | None,
    *,
    actor: str,
) -> dict[str, Any]:
    """The candidate serves 100 %: the same deploy and smoke test as a direct rollout (with its
    automatic rollback), then ``champion`` and ``serving`` move to it. The replicas already hold the
    candidate, so the swap loads nothing."""
    from ml.rollout import deploy_promoted, verify_deployed

    stages = " and ".join(s for s in ("shadow", "canary") if s in stage)
    outcome = {"name": stage["name"], "version": stage["version"], "run_id": stage.get("run_id")}
    deployed = deploy_promoted(settings, outcome, actor=actor)
    return verify_deployed(
        settings,
        deployed,
        expected,
        actor,
        reason=f"promoted after the {stages or 'offline'} check{'s' if ' and ' in stages else ''} passed",
        move_champion=True,
    )


# ---- by hand: python -m ml.staged_rollout start|stop ---------------------------------------------
#
#   python -m ml.staged_rollout start --dataset agnews --version 7 --mode shadow
#   python -m ml.staged_rollout start --dataset agnews --version 7 --mode canary --fraction 0.1
#   python -m ml.staged_rollout stop --dataset agnews --reason "drill over"
#
# The same settings as the DAG (CT_SERVE_TARGET picks the Ray dashboard's Serve REST API or the
# KubeRay RayService), the same start_candidate / stop_candidate, recorded in the serving history
# with actor user:<login> (ml.staged_rollout). It starts or stops a candidate; judging it and the
# promotion stay with the DAG (or `python -m ml.rollout --version N`, which ends any candidate).
# Exit status: 0 done, 1 failed (the error names the step; a candidate that did not load is removed
# again), 2 command line refused before anything was contacted.

CLI_MODES = ("shadow", "canary")
DEFAULT_CANARY_FRACTION = CanaryPolicy.model_fields["fraction"].default
MIN_STOP_REASON_CHARS = 3


class UsageError(ValueError):
    """A command line refused before any service is contacted."""


def candidate_request(mode: str, version: str | None, fraction: float | None) -> tuple[str, float]:
    """``(version, fraction)`` of a ``start`` command line, or :class:`UsageError`."""
    if mode not in CLI_MODES:
        raise UsageError(f"--mode must be one of {', '.join(CLI_MODES)}, not {mode!r}")
    version = (version or "").strip()
    if not version:
        raise UsageError("--version needs a version number or an alias (e.g. challenger)")
    if mode == "shadow":
        if fraction is not None:
            raise UsageError(
                "--fraction is for --mode canary: a shadow answers no client, it gets a copy of every request"
            )
        return version, 0.0
    fraction = DEFAULT_CANARY_FRACTION if fraction is None else fraction
    if not 0 < fraction <= 1:  # NaN fails too
        raise UsageError(
            f"--fraction is the share of client keys the canary answers: > 0 and <= 1, not {fraction:g}"
        )
    return version, fraction


def stop_reason(reason: str | None) -> str:
    reason = (reason or "").strip()
    if len(reason) < MIN_STOP_REASON_CHARS:
        raise UsageError(
            f"--reason needs at least {MIN_STOP_REASON_CHARS} characters: it goes into the serving history"
        )
    return reason


def _resolve_version(settings: Settings, name: str, ref: str) -> dict[str, Any]:
    """Name, version number and training run of ``ref`` (a number or an alias) in the registry."""
    from mlflow import MlflowClient

    from ml.registry import resolve_version

    found = resolve_version(MlflowClient(tracking_uri=settings.mlflow_tracking_uri), name, ref)
    return {"name": name, "version": str(found.version), "run_id": found.run_id or None}


def start_by_hand(
    settings: Settings,
    model: str,
    version: str,
    mode: str,
    fraction: float,
    *,
    actor: str,
    deployer: ServeDeployer,
) -> dict[str, Any]:
    """``start``: ``model`` ``version`` as candidate in ``mode``; :class:`DeployError` when it is not
    started (nothing serves, it serves already, another candidate runs, it does not load)."""
    outcome = _resolve_version(settings, model, version)
    target = ModelId(outcome["name"], outcome["version"], outcome["run_id"])
    serving = deployer.serving()
    if serving is None:
        raise DeployError(
            f"nothing serves at {deployer.serve_url}: a candidate needs a serving model to run beside "
            f"(deploy one first: python -m ml.rollout --dataset {settings.dataset} --version N)"
        )
    if serving.model.matches(target):
        raise DeployError(f"{target} already serves in application {deployer.app_name!r}: nothing to compare")
    running = serving.candidate
    if running and (running.get("name"), str(running.get("version"))) != (target.name, target.version):
        raise DeployError(
            f"candidate {running.get('name')} v{running.get('version')} runs in {running.get('mode')} in "
            f"application {deployer.app_name!r}: stop it first "
            f"(python -m ml.staged_rollout stop --dataset {settings.dataset} --reason ...)"
        )
    stage = start_candidate(settings, outcome, mode, fraction=fraction, actor=actor, deployer=deployer)
    if "skipped" in stage:
        raise DeployError(f"no {mode} started: {stage['skipped']}")
    return stage


def stop_by_hand(settings: Settings, reason: str, *, actor: str, deployer: ServeDeployer) -> dict[str, Any]:
    """``stop``: remove the candidate of ``settings.dataset``'s application (recorded as
    ``shadow_reject`` or ``canary_rollback``); :class:`DeployError` when there is none or it stays."""
    app = deployer.app_config(deployer.current_config())
    user_config = ((app or {}).get("deployments") or [{}])[0].get("user_config") or {}
    configured = user_config.get("candidate") or {}
    serving = deployer.serving()
    reported = (serving.candidate if serving else None) or {}
    if not configured and not reported:
        raise DeployError(
            f"no candidate in application {deployer.app_name!r} (dataset {settings.dataset!r}): "
            "nothing to stop"
        )
    mode = reported.get("mode") or configured.get("mode") or "shadow"
    name = (
        reported.get("name")
        or configured.get("model_name")
        or user_config.get("model_name")
        or settings.registered_model
    )
    version = str(reported.get("version") or configured.get("model_version"))
    stage = {"name": name, "version": version, "champion": {"version": serving.version if serving else None}}
    action = "canary_rollback" if mode == "canary" else "shadow_reject"
    stop_candidate(
        settings, stage, action=action, reason=f"stopped by hand: {reason}", actor=actor, deployer=deployer
    )
    # stop_candidate records a failed removal rather than raising it: look again
    app = deployer.app_config(deployer.current_config())
    still = (((app or {}).get("deployments") or [{}])[0].get("user_config") or {}).get("candidate")
    after = deployer.serving()
    if still or (after is not None and after.candidate):
        raise DeployError(
            f"candidate {name} v{version} is still in application {deployer.app_name!r}: see the log above "
            "(the serving history records the failed attempt)"
        )
    return {
        "stopped": {"name": name, "version": version, "mode": mode},
        "action": action,
        "app": deployer.app_name,
    }


def main(argv: list[str] | None = None) -> int:
    import argparse
    import getpass
    import json
    import sys

    from ml.rollout import check_dataset_name
    from ml.settings import load_settings

    parser = argparse.ArgumentParser(
        prog="python -m ml.staged_rollout",
        description="Start or stop a candidate beside the serving model (shadow or canary) by hand.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="run a registered version as shadow or canary")
    start.add_argument("--dataset", required=True, help="the dataset whose Serve application it joins")
    start.add_argument("--version", required=True, help="the candidate: a version number or an alias")
    start.add_argument("--mode", required=True, choices=CLI_MODES)
    start.add_argument(
        "--fraction",
        type=float,
        help="canary only: share of client keys (X-Client-Key) it answers "
        f"(default {DEFAULT_CANARY_FRACTION:g})",
    )
    start.add_argument("--model", help="registered model name (default <dataset>-classifier)")
    stop = commands.add_parser("stop", help="remove the candidate; the serving model serves on")
    stop.add_argument("--dataset", required=True, help="the dataset whose Serve application it is in")
    stop.add_argument("--reason", required=True, help="why: goes into the serving history")
    args = parser.parse_args(argv)
    try:
        check_dataset_name(args.dataset)
        if args.command == "start":
            version, fraction = candidate_request(args.mode, args.version, args.fraction)
        else:
            reason = stop_reason(args.reason)
    except (UsageError, DeployError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = load_settings(dataset=args.dataset)
    actor = f"user:{getpass.getuser()} (ml.staged_rollout)"
    deployer = ServeDeployer(settings)
    try:
        if args.command == "start":
            result = start_by_hand(
                settings,
                args.model or settings.registered_model,
                version,
                args.mode,
                fraction,
                actor=actor,
                deployer=deployer,
            )
        else:
            result = stop_by_hand(settings, reason, actor=actor, deployer=deployer)
    except (DeployError, LookupError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
