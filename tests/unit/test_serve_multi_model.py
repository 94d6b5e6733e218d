"""One Serve application per dataset: naming, routes, config building, isolation, rollback.

No services: the Serve config's home is an in-memory stand-in that records every PUT. What is
checked is ours: which entry a deploy or a rollback changes, and that every other application's
entry goes back exactly as it was (a declarative PUT replaces the whole config; a changed entry
would redeploy that application).
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import yaml
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

import ml.rollout
from ml.rollout import (
    APP_NAME,
    CONFIG_FILE,
    DeployError,
    ServeDeployer,
    check_dataset_name,
    replace_app_entry,
    serve_app,
)
from ml.settings import Settings


class MemoryControl:
    """The Serve config in memory; records what was applied."""

    def __init__(self, config: dict[str, Any] | None) -> None:
        self.config = copy.deepcopy(config)
        self.applied: list[dict[str, Any]] = []

    def current_config(self) -> dict[str, Any] | None:
        return copy.deepcopy(self.config)

    def apply(self, config: dict[str, Any]) -> None:
        self.applied.append(copy.deepcopy(config))
        self.config = copy.deepcopy(config)

    def details(self) -> dict[str, Any]:
        return {}

    def app_status(self, app_name: str) -> tuple[str, str]:
        return "RUNNING", ""


def _settings(dataset: str = "agnews", **kw: Any) -> Settings:
    return Settings(dataset=dataset, serve_default_dataset="agnews", **kw)


def _app(config: dict[str, Any], name: str) -> dict[str, Any]:
    (app,) = [a for a in config["applications"] if a["name"] == name]
    return app


def _user_config(config: dict[str, Any], name: str) -> dict[str, Any]:
    return _app(config, name)["deployments"][0]["user_config"]


def _canonical(entry: dict[str, Any]) -> str:
    return json.dumps(entry, sort_keys=False)  # byte for byte, key order included


def test_the_default_dataset_keeps_the_classifier_app_at_the_root_others_get_their_own():
    assert serve_app("agnews", "agnews") == ml.rollout.ServeApp(APP_NAME, "/", "agnews")
    news = serve_app("newsgroups", "agnews")
    assert (news.name, news.route_prefix, news.path) == ("newsgroups", "/newsgroups", "/newsgroups")
    assert serve_app("agnews", "newsgroups").name == "agnews"  # another deployment's default

    default = ServeDeployer(_settings())
    assert (default.app_name, default.route_prefix) == (APP_NAME, "/")
    assert default.serve_url == "http://127.0.0.1:8000"
    other = ServeDeployer(_settings("newsgroups", serve_url="http://127.0.0.1:8000/"))
    assert (other.app_name, other.route_prefix) == ("newsgroups", "/newsgroups")
    assert other.serve_url == "http://127.0.0.1:8000/newsgroups"  # every HTTP check goes there


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "cannot name a Serve application"),
        ("a/b", "cannot name a Serve application"),
        ("news groups", "cannot name a Serve application"),
        ("-news", "cannot name a Serve application"),
        ("x" * 64, "cannot name a Serve application"),
        ("v1", "reserved"),
        ("docs", "reserved"),
        ("classifier", "reserved"),
        ("openapi.json", "cannot name"),
    ],
)
def test_dataset_names_that_cannot_be_an_app_or_route_are_refused_clearly(name, message):
    with pytest.raises(DeployError, match=message):
        check_dataset_name(name)
    with pytest.raises(DeployError, match=message):
        ServeDeployer(_settings(name))
    assert check_dataset_name("it-0a1b_C2") == "it-0a1b_C2"


def test_the_default_dataset_comes_from_the_environment_not_the_runs_override(monkeypatch):
    monkeypatch.delenv("CT_SERVE_DEFAULT_DATASET", raising=False)
    monkeypatch.setenv("CT_DATASET", "newsgroups")
    run = Settings(dataset="agnews")  # what the DAG's _settings(context) builds for a run's dataset
    assert (run.dataset, run.serve_default_dataset) == ("agnews", "newsgroups")
    assert ServeDeployer(run).app_name == "agnews"
    assert ServeDeployer(Settings()).app_name == APP_NAME
    monkeypatch.delenv("CT_DATASET")
    assert Settings(dataset="newsgroups").serve_default_dataset == "agnews"  # the Settings default
    monkeypatch.setenv("CT_SERVE_DEFAULT_DATASET", "newsgroups")
    assert ServeDeployer(Settings(dataset="newsgroups")).app_name == APP_NAME


def test_a_new_dataset_gets_its_app_from_the_config_file_and_other_apps_stay_byte_for_byte():
    running = ServeDeployer(_settings()).build_config(None, "7")
    running["applications"][0]["deployments"][0]["user_config"]["max_batch_size"] = 32  # an operator's edit
    foreign = {"name": "other", "route_prefix": "/other", "import_path": "x:y", "runtime_env": {"a": 1}}
    running["applications"].append(foreign)
    before = copy.deepcopy(running)

    config = ServeDeployer(_settings("newsgroups", serve_num_gpus=0.5)).build_config(running, "3")

    assert running == before  # not mutated
    assert [a["name"] for a in config["applications"]] == [APP_NAME, "other", "newsgroups"]
    for name in (APP_NAME, "other"):
        assert _canonical(_app(config, name)) == _canonical(_app(before, name))
    assert {k: v for k, v in config.items() if k != "applications"} == {
        k: v for k, v in before.items() if k != "applications"
    }
    new = _app(config, "newsgroups")
    template = yaml.safe_load(CONFIG_FILE.read_text())["applications"][0]
    assert new["route_prefix"] == "/newsgroups" and new["import_path"] == template["import_path"]
    deployment, file_deployment = new["deployments"][0], template["deployments"][0]
    assert deployment["autoscaling_config"] == file_deployment["autoscaling_config"]
    assert deployment["ray_actor_options"]["num_gpus"] == 0.5  # the new app's settings: only its own
    assert _app(config, APP_NAME)["deployments"][0]["ray_actor_options"]["num_gpus"] == 0
    user_config = deployment["user_config"]
    assert (user_config["model_name"], user_config["model_version"]) == ("newsgroups-classifier", "3")
    assert user_config["max_batch_size"] == file_deployment["user_config"]["max_batch_size"]
    env = new["runtime_env"]["env_vars"]
    assert env["CT_DATASET"] == "newsgroups" and env["CT_SERVE_DEFAULT_DATASET"] == "agnews"
    assert _app(config, APP_NAME)["runtime_env"]["env_vars"]["CT_DATASET"] == "agnews"


def test_redeploying_one_dataset_changes_only_its_own_entry():
    running = ServeDeployer(_settings()).build_config(None, "7")
    running = ServeDeployer(_settings("newsgroups")).build_config(running, "3")
    before = copy.deepcopy(running)

    config = ServeDeployer(_settings("newsgroups")).build_config(running, "4")
    assert _canonical(_app(config, APP_NAME)) == _canonical(_app(before, APP_NAME))
    assert _user_config(config, "newsgroups")["model_version"] == "4"
    config = ServeDeployer(_settings()).build_config(running, "8")
    assert _canonical(_app(config, "newsgroups")) == _canonical(_app(before, "newsgroups"))
    assert _user_config(config, APP_NAME)["model_version"] == "8"
    assert [a["name"] for a in config["applications"]] == [APP_NAME, "newsgroups"]  # order kept


def test_a_route_taken_by_another_application_is_refused_before_anything_changes():
    running = {"applications": [{"name": "mine", "route_prefix": "/newsgroups", "import_path": "x:y"}]}
    with pytest.raises(DeployError, match=r"route prefix /newsgroups .* is taken by application 'mine'"):
        ServeDeployer(_settings("newsgroups")).build_config(running, "1")


def test_rollback_restores_only_the_target_app_inside_the_current_config():
    a_v4 = ServeDeployer(_settings()).build_config(None, "4")
    previous = ServeDeployer(_settings("newsgroups")).build_config(a_v4, "1")  # A v4, B v1
    # meanwhile: B's broken v2 was applied, and A moved on to v5 by its own deploy
    now = ServeDeployer(_settings("newsgroups")).build_config(previous, "2")
    now = ServeDeployer(_settings()).build_config(now, "5")
    control = MemoryControl(now)
    deployer = ServeDeployer(_settings("newsgroups"), control=control)

    with pytest.raises(DeployError, match="Rolled back: None"):
        deployer.rollback(previous, None, reason="deploy of B v2 failed")

    (applied,) = control.applied
    assert _canonical(_app(applied, APP_NAME)) == _canonical(_app(now, APP_NAME))  # A v5, untouched
    assert _user_config(applied, APP_NAME)["model_version"] == "5"
    assert _canonical(_app(applied, "newsgroups")) == _canonical(_app(previous, "newsgroups"))  # B v1
    assert [a["name"] for a in applied["applications"]] == [APP_NAME, "newsgroups"]


def test_rollback_of_a_new_app_removes_only_it():
    running = ServeDeployer(_settings()).build_config(None, "4")
    now = ServeDeployer(_settings("newsgroups")).build_config(running, "1")
    control = MemoryControl(now)
    with pytest.raises(DeployError, match="Nothing was serving before; the application was removed"):
        ServeDeployer(_settings("newsgroups"), control=control).rollback(running, None, reason="broken")
    (applied,) = control.applied
    assert applied == running  # A's entry and the global options exactly as they run


def test_replace_app_entry_keeps_everything_else():
    config = {"proxy_location": "EveryNode", "applications": [{"name": "a", "x": [1]}, {"name": "b"}]}
    assert replace_app_entry(config, "b", {"name": "b", "y": 2})["applications"] == [
        {"name": "a", "x": [1]},
        {"name": "b", "y": 2},
    ]
    assert replace_app_entry(config, "c", {"name": "c"})["applications"][-1] == {"name": "c"}
    assert replace_app_entry(config, "a", None) == {
        "proxy_location": "EveryNode",
        "applications": [{"name": "b"}],
    }
    assert replace_app_entry(None, "a", None) == {"applications": []}
    assert config["applications"][0] == {"name": "a", "x": [1]}  # not mutated


def test_the_dag_helpers_route_by_the_runs_dataset(monkeypatch):
    seen = []

    def deploy(self, version, model_name=None, run_id=None):
        seen.append((self.app_name, self.serve_url, model_name, version))
        return {"name": model_name, "version": version}

    monkeypatch.setattr(ServeDeployer, "deploy", deploy)
    monkeypatch.setattr(ServeDeployer, "serving", lambda self: None)
    ml.rollout.deploy_promoted(_settings("newsgroups"), {"name": "newsgroups-classifier", "version": "2"})
    assert seen == [("newsgroups", "http://127.0.0.1:8000/newsgroups", "newsgroups-classifier", "2")]
    # a smoke test with another dataset's settings refuses to check (or roll back) the wrong app
    deployed = {"name": "newsgroups-classifier", "version": "2", "app": "newsgroups", "previous_config": None}
    with pytest.raises(DeployError, match="deployed to application 'newsgroups', not 'classifier'"):
        ServeDeployer(_settings()).verify(deployed)


def _echo(request):
    return JSONResponse({"root_path": request.scope.get("root_path", ""), "path": request.url.path})


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/v1/model", 200),
        ("/agnews/v1/model", 200),
        ("/newsgroups/v1/model", 404),  # another dataset's route: never this model's answer
        ("/agnewsx/v1/model", 404),
        ("/v1/agnews/v1/model", 404),
    ],
)
def test_the_default_app_also_answers_under_its_datasets_prefix(path, status):
    from serve.app import DatasetPrefix

    inner = Starlette(routes=[Route("/v1/model", _echo)])
    client = TestClient(DatasetPrefix(inner, alias="/agnews"))
    resp = client.get(path)
    assert resp.status_code == status
    if status == 200:
        assert resp.json()["root_path"] == ("/agnews" if path.startswith("/agnews/") else "")
    # without an alias (any other dataset's app) nothing is rewritten
    assert TestClient(DatasetPrefix(inner, alias="")).get(path).status_code == (
        200 if path == "/v1/model" else 404
    )


def test_v1_models_is_in_the_openapi_document():
    from serve.app import _openapi, api

    api.openapi_schema = None
    schema = _openapi()
    get = schema["paths"]["/v1/models"]["get"]
    ref = get["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/ServedModels")
    served = schema["components"]["schemas"]["ServedModel"]["properties"]
    for field in (
        "app",
        "dataset",
        "registered_model",
        "version",
        "route_prefix",
        "routes",
        "status",
        "error",
    ):
        assert field in served, field
