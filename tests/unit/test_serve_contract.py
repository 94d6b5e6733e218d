"""The service's input rules, error messages, auth and config building, without Ray running."""

from __future__ import annotations

import json

import pytest
import yaml
from pydantic import ValidationError
from starlette.requests import Request

from ml.settings import Settings
from serve.deploy import CONFIG_FILE, ServeDeployer
from serve.schemas import InputError, PredictRequest, ServeOptions, check_texts, describe_validation_errors


def _errors(raw: str) -> tuple[int, str]:
    try:
        PredictRequest.model_validate_json(raw)
    except ValidationError as err:
        return describe_validation_errors(err.errors())
    raise AssertionError(f"{raw!r} was accepted")


@pytest.mark.parametrize(
    ("raw", "status", "message"),
    [
        ("{oops", 400, "malformed JSON"),
        ('{"texts": [1, "a"]}', 422, "texts[0] must be a string, got int"),
        ('{"texts": ["a", null]}', 422, "texts[1] must be a string, got null"),
        ('{"texts": "abc"}', 422, "texts must be a list of strings"),
        ('{"txt": ["a"]}', 422, "unknown field 'txt'"),
        ("[1, 2]", 422, "must be a JSON object"),
        ('{"text": ["a"]}', 422, "text must be a string"),
        ('{"texts": ["a"], "return_all_scores": "yes"}', 422, "return_all_scores"),
    ],
)
def test_malformed_bodies_get_a_message_naming_the_problem(raw, status, message):
    got_status, got_message = _errors(raw)
    assert got_status == status
    assert message in got_message


def test_one_of_text_or_texts():
    assert PredictRequest.model_validate({"text": "hi"}).items() == ["hi"]
    assert PredictRequest.model_validate({"texts": ["a", "b"]}).items() == ["a", "b"]
    for body in ({}, {"text": "a", "texts": ["b"]}):
        with pytest.raises(InputError, match="exactly one"):
            PredictRequest.model_validate(body).items()


@pytest.mark.parametrize(
    ("texts", "status", "message"),
    [
        ([], 422, "'texts' is empty"),
        (["ok"] * 4, 413, "4 texts in one request; the limit is 3"),
        (["ok", " \n"], 422, "texts[1] is empty or whitespace only"),
        (["ok", "x" * 11], 422, "texts[1] has 11 characters; the limit is 10"),
    ],
)
def test_request_limits(texts, status, message):
    with pytest.raises(InputError) as err:
        check_texts(texts, max_texts=3, max_chars=10)
    assert err.value.status == status and message in err.value.message


def test_texts_within_limits_pass_unchanged():
    assert check_texts(["a", "x" * 10], max_texts=3, max_chars=10) == ["a", "x" * 10]


def _request(headers: dict[str, str]) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "method": "POST", "path": "/v1/predict", "headers": raw})


def test_bearer_token_is_required_only_when_configured(monkeypatch):
    from serve.app import API_TOKEN_ENV, _authorize

    monkeypatch.delenv(API_TOKEN_ENV, raising=False)
    _authorize(_request({}))  # auth off: anything goes
    monkeypatch.setenv(API_TOKEN_ENV, "s3cret")
    for headers, message in [
        ({}, "needs 'Authorization: Bearer <token>'"),
        ({"Authorization": "Basic s3cret"}, "needs 'Authorization: Bearer <token>'"),
        ({"Authorization": "Bearer nope"}, "wrong bearer token"),
    ]:
        with pytest.raises(InputError) as err:
            _authorize(_request(headers))
        assert err.value.status == 401 and message in err.value.message
    _authorize(_request({"Authorization": "Bearer s3cret"}))


def test_serve_options_reject_unknown_keys_and_bad_values():
    with pytest.raises(ValidationError, match="max_batch_sz"):
        ServeOptions.model_validate({"max_batch_sz": 8})
    with pytest.raises(ValidationError, match="max_batch_size"):
        ServeOptions.model_validate({"max_batch_size": 0})


def test_config_file_is_a_valid_serve_config():
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(CONFIG_FILE.read_text())
    ServeDeploySchema.model_validate(config)
    deployment = config["applications"][0]["deployments"][0]
    options = ServeOptions.model_validate(deployment["user_config"])
    # batches can only fill when a replica takes at least max_batch_size requests at once
    assert deployment["max_ongoing_requests"] >= options.max_batch_size


def test_first_deploy_starts_from_the_config_file_and_pins_the_version():
    settings = Settings(registered_model="news-classifier", mlflow_tracking_uri="http://mlflow:5000")
    config = ServeDeployer(settings).build_config(None, "7")
    (app,) = config["applications"]
    user_config = app["deployments"][0]["user_config"]
    assert user_config["model_name"] == "news-classifier" and user_config["model_version"] == "7"
    env = app["runtime_env"]["env_vars"]
    assert env["CT_MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "CT_S3_SECRET_KEY" not in env  # secrets come from the nodes, not the visible runtime_env


def test_redeploy_keeps_the_running_config_and_other_apps():
    settings = Settings(registered_model="news-classifier")
    running = ServeDeployer(settings).build_config(None, "7")
    running["applications"][0]["deployments"][0]["user_config"]["max_batch_size"] = 32  # an operator's edit
    other = {"name": "other", "route_prefix": "/other", "import_path": "x:y"}
    running["applications"].append(other)
    config = ServeDeployer(settings).build_config(json.loads(json.dumps(running)), "8")
    ours = config["applications"][0]["deployments"][0]["user_config"]
    assert ours["model_version"] == "8" and ours["max_batch_size"] == 32
    assert other in config["applications"]
    assert running["applications"][0]["deployments"][0]["user_config"]["model_version"] == "7"  # not mutated


def test_model_cache_is_keyed_by_training_run_not_only_version(tmp_path, monkeypatch):
    """A recreated registry reuses version numbers: v1 of another run must not come from the cache."""
    import ml.registry
    from serve import app

    downloads = []

    def fake_download(client, model_root, dst):  # what would come from MLflow: a marker file
        downloads.append(model_root)
        (dst / "export").mkdir(parents=True)
        (dst / "export" / "weights").write_text(model_root)
        return dst / "export"

    class Client:
        def get_model_version_download_uri(self, name, version):
            return f"s3://bucket/{name}/{version}/{len(downloads)}"

    monkeypatch.setenv(app.MODEL_CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(ml.registry, "download_export", fake_download)
    first = app.fetch_export(Client(), "m", "1", "run-a")
    assert app.fetch_export(Client(), "m", "1", "run-a") == first and len(downloads) == 1
    other = app.fetch_export(Client(), "m", "1", "run-b")
    assert other != first and len(downloads) == 2
    assert (other / "weights").read_text() != (first / "weights").read_text()
