"""``python -m ml.staged_rollout start|stop`` without a running stack.

A refused command line must fail before any service is contacted (exit 2); the commands that pass
call start_candidate / stop_candidate with the user as actor. The services are replaced by fakes:
what the functions themselves do is tested in tests/integration/test_staged_rollout.py.
"""

from __future__ import annotations

import getpass
import json
import math
from typing import Any

import pytest

import ml.staged_rollout as staged
from ml.rollout import DeployError, ModelId, Serving

ACTOR = f"user:{getpass.getuser()} (ml.staged_rollout)"


@pytest.fixture
def untouchable(monkeypatch) -> None:
    """Any attempt to reach the registry or the Serve config fails the test."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a refused command line reached a service")

    monkeypatch.setattr(staged, "ServeDeployer", refuse)
    monkeypatch.setattr(staged, "_resolve_version", refuse)
    monkeypatch.setattr(staged, "start_candidate", refuse)
    monkeypatch.setattr(staged, "stop_candidate", refuse)


def _serving(version: str = "5", candidate: dict[str, Any] | None = None) -> Serving:
    return Serving(
        ModelId("agnews-classifier", version, f"run{version}"), ["a", "b"], version, None, None, candidate
    )


class FakeDeployer:
    """The Serve config and GET /v1/model of one application, as ServeDeployer shows them."""

    def __init__(
        self, settings: Any, candidate: dict[str, Any] | None = None, serving: Serving | None = None
    ):
        self.settings = settings
        self.app_name = "classifier"
        self.serve_url = "http://127.0.0.1:8000"
        user_config = {"model_name": "", "model_version": "5"}
        if candidate:
            user_config["candidate"] = candidate
        self.config = {
            "applications": [{"name": "classifier", "deployments": [{"user_config": user_config}]}]
        }
        self.answer = serving

    def current_config(self) -> dict[str, Any]:
        return self.config

    def app_config(self, config: dict[str, Any] | None) -> dict[str, Any] | None:
        return next((a for a in (config or {}).get("applications", []) if a["name"] == self.app_name), None)

    def serving(self) -> Serving | None:
        return self.answer

    def drop_candidate(self) -> None:
        self.config["applications"][0]["deployments"][0]["user_config"].pop("candidate", None)
        if self.answer is not None:
            self.answer = _serving(self.answer.version)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["promote", "--dataset", "agnews"],
        ["start", "--dataset", "agnews", "--version", "7"],  # no --mode
        ["start", "--dataset", "agnews", "--version", "7", "--mode", "blue"],
        ["start", "--dataset", "agnews", "--version", "7", "--mode", "canary", "--fraction", "ten"],
        ["start", "--version", "7", "--mode", "shadow"],  # no --dataset
        ["stop", "--dataset", "agnews"],  # no --reason
    ],
)
def test_the_parser_refuses_incomplete_command_lines(argv, untouchable, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        staged.main(argv)
    assert exit_.value.code == 2
    assert "usage: python -m ml.staged_rollout" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (
            ["start", "--dataset", "agnews", "--version", "7", "--mode", "shadow", "--fraction", "0.2"],
            "for --mode canary",
        ),
        (["start", "--dataset", "agnews", "--version", " ", "--mode", "shadow"], "--version needs"),
        (["start", "--dataset", "agnews", "--version", "7", "--mode", "canary", "--fraction", "0"], "not 0"),
        (
            ["start", "--dataset", "agnews", "--version", "7", "--mode", "canary", "--fraction", "1.5"],
            "not 1.5",
        ),
        (
            ["start", "--dataset", "agnews", "--version", "7", "--mode", "canary", "--fraction", "nan"],
            "not nan",
        ),
        (
            ["start", "--dataset", "../etc", "--version", "7", "--mode", "shadow"],
            "cannot name a Serve application",
        ),
        (["start", "--dataset", "v1", "--version", "7", "--mode", "shadow"], "reserved"),
        (["stop", "--dataset", "agnews", "--reason", "  x "], "at least 3 characters"),
        (["stop", "--dataset", "bad name", "--reason", "drill over"], "cannot name a Serve application"),
    ],
)
def test_bad_values_are_refused_before_any_service_is_contacted(argv, says, untouchable, capsys) -> None:
    assert staged.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err


def test_candidate_request_defaults() -> None:
    assert staged.candidate_request("shadow", " 7 ", None) == ("7", 0.0)
    assert staged.candidate_request("canary", "challenger", None) == ("challenger", 0.1)
    assert staged.candidate_request("canary", "7", 1.0) == ("7", 1.0)
    with pytest.raises(staged.UsageError, match="not inf"):
        staged.candidate_request("canary", "7", math.inf)


@pytest.fixture
def started(monkeypatch) -> list[dict[str, Any]]:
    """start_candidate replaced: what it was called with; the registry resolves any ref to v7."""
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(
        staged,
        "_resolve_version",
        lambda settings, name, ref: {"name": name, "version": "7", "run_id": "run7"},
    )

    def start_candidate(settings, outcome, mode, **kwargs):
        calls.append({"dataset": settings.dataset, "outcome": outcome, "mode": mode, **kwargs})
        return {**outcome, "mode": mode, "fraction": kwargs["fraction"], "app": kwargs["deployer"].app_name}

    monkeypatch.setattr(staged, "start_candidate", start_candidate)
    return calls


@pytest.mark.parametrize(
    ("extra", "mode", "fraction"),
    [
        (["--mode", "shadow"], "shadow", 0.0),
        (["--mode", "canary"], "canary", 0.1),
        (["--mode", "canary", "--fraction", "0.25"], "canary", 0.25),
    ],
)
def test_start_calls_start_candidate_as_the_user(monkeypatch, started, capsys, extra, mode, fraction) -> None:
    monkeypatch.setattr(staged, "ServeDeployer", lambda settings: FakeDeployer(settings, serving=_serving()))
    assert staged.main(["start", "--dataset", "agnews", "--version", "challenger", *extra]) == 0
    (call,) = started
    assert call["dataset"] == "agnews"
    assert call["outcome"] == {"name": "agnews-classifier", "version": "7", "run_id": "run7"}
    assert (call["mode"], call["fraction"], call["actor"]) == (mode, fraction, ACTOR)
    assert json.loads(capsys.readouterr().out)["version"] == "7"


@pytest.mark.parametrize(
    ("serving", "says"),
    [
        (None, "nothing serves at http://127.0.0.1:8000"),
        (_serving("7"), "already serves"),
        (_serving("5", {"name": "agnews-classifier", "version": "6", "mode": "shadow"}), "stop it first"),
    ],
)
def test_start_refuses_without_a_champion_or_beside_another_candidate(
    monkeypatch, started, capsys, serving, says
) -> None:
    monkeypatch.setattr(staged, "ServeDeployer", lambda settings: FakeDeployer(settings, serving=serving))
    assert staged.main(["start", "--dataset", "agnews", "--version", "7", "--mode", "canary"]) == 1
    assert says in capsys.readouterr().err
    assert started == []


def test_start_switches_its_own_shadow_to_canary(monkeypatch, started) -> None:
    shadow = {"name": "agnews-classifier", "version": "7", "mode": "shadow"}
    monkeypatch.setattr(
        staged, "ServeDeployer", lambda settings: FakeDeployer(settings, serving=_serving("5", shadow))
    )
    assert staged.main(["start", "--dataset", "agnews", "--version", "7", "--mode", "canary"]) == 0
    assert started[0]["mode"] == "canary"


def test_a_registry_miss_fails_the_start(monkeypatch, capsys) -> None:
    def missing(settings, name, ref):
        raise LookupError(f"registered model {name!r} has no version {ref!r}")

    monkeypatch.setattr(staged, "_resolve_version", missing)
    monkeypatch.setattr(staged, "ServeDeployer", lambda settings: FakeDeployer(settings, serving=_serving()))
    assert staged.main(["start", "--dataset", "agnews", "--version", "99", "--mode", "shadow"]) == 1
    assert "has no version '99'" in capsys.readouterr().err


@pytest.mark.parametrize(("mode", "action"), [("shadow", "shadow_reject"), ("canary", "canary_rollback")])
def test_stop_removes_the_candidate_and_records_the_stage(monkeypatch, capsys, mode, action) -> None:
    candidate = {"name": "agnews-classifier", "version": "7", "mode": mode}
    deployer = FakeDeployer(None, {"model_version": "7", "mode": mode}, _serving("5", candidate))
    monkeypatch.setattr(staged, "ServeDeployer", lambda settings: deployer)
    calls = []

    def stop_candidate(settings, stage, **kwargs):
        calls.append((stage, kwargs))
        kwargs["deployer"].drop_candidate()

    monkeypatch.setattr(staged, "stop_candidate", stop_candidate)
    assert staged.main(["stop", "--dataset", "agnews", "--reason", "drill over"]) == 0
    ((stage, kwargs),) = calls
    assert stage == {"name": "agnews-classifier", "version": "7", "champion": {"version": "5"}}
    assert kwargs["action"] == action
    assert kwargs["reason"] == "stopped by hand: drill over"
    assert kwargs["actor"] == ACTOR
    assert json.loads(capsys.readouterr().out)["action"] == action


def test_stop_without_a_candidate_changes_nothing(monkeypatch, capsys) -> None:
    monkeypatch.setattr(staged, "ServeDeployer", lambda settings: FakeDeployer(settings, serving=_serving()))
    monkeypatch.setattr(staged, "stop_candidate", lambda *a, **k: pytest.fail("nothing to stop"))
    assert staged.main(["stop", "--dataset", "agnews", "--reason", "drill over"]) == 1
    assert "nothing to stop" in capsys.readouterr().err


def test_stop_fails_when_the_candidate_stays(monkeypatch, capsys) -> None:
    """stop_candidate records a failed removal without raising: the command must still fail."""
    deployer = FakeDeployer(None, {"model_version": "7", "mode": "canary"}, _serving())
    monkeypatch.setattr(staged, "ServeDeployer", lambda settings: deployer)
    monkeypatch.setattr(staged, "stop_candidate", lambda *a, **k: None)
    assert staged.main(["stop", "--dataset", "agnews", "--reason", "drill over"]) == 1
    assert "is still in application 'classifier'" in capsys.readouterr().err


def test_start_reports_a_candidate_that_does_not_load(monkeypatch, capsys) -> None:
    monkeypatch.setattr(
        staged, "_resolve_version", lambda settings, name, ref: {"name": name, "version": "7", "run_id": None}
    )

    def start_candidate(*args, **kwargs):
        raise DeployError("the replicas could not load candidate agnews-classifier v7: OSError")

    monkeypatch.setattr(staged, "start_candidate", start_candidate)
    monkeypatch.setattr(staged, "ServeDeployer", lambda settings: FakeDeployer(settings, serving=_serving()))
    assert staged.main(["start", "--dataset", "agnews", "--version", "7", "--mode", "shadow"]) == 1
    assert "could not load candidate" in capsys.readouterr().err
