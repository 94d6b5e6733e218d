"""The service's input rules, error messages, auth and config building, without Ray running."""

from __future__ import annotations

import json

import pytest
import yaml
from pydantic import ValidationError
from starlette.requests import Request

from ml.rollout import CONFIG_FILE, ServeDeployer
from ml.settings import Settings
from serve.schemas import (
    MAX_PROBLEMS,
    InputError,
    ServeOptions,
    check_request_id,
    max_body_bytes,
    parse_predict_body,
    predict_request_schema,
)


def _refusal(raw: str | bytes, max_texts: int = 64, max_chars: int = 10_000) -> InputError:
    with pytest.raises(InputError) as err:
        parse_predict_body(raw.encode() if isinstance(raw, str) else raw, max_texts, max_chars)
    return err.value


@pytest.mark.parametrize(
    ("raw", "status", "message"),
    [
        ("{oops", 400, "malformed JSON"),
        (b'{"texts": ["\xff"]}', 400, "not UTF-8"),
        ("[" * 100_000, 400, "malformed JSON"),  # nesting too deep for the parser: not a 500
        ('{"texts": [' + "9" * 5000 + "]}", 400, "malformed JSON"),  # int beyond Python's digit limit
        ("", 422, "the body is empty"),
        ('{"texts": [1, "a"]}', 422, "texts[0] must be a string, got number"),
        ('{"texts": ["a", null]}', 422, "texts[1] must be a string, got null"),
        ('{"texts": "abc"}', 422, "texts must be a list of strings, got string"),
        ('{"txt": ["a"]}', 422, 'unknown field "txt"'),
        ("[1, 2]", 422, "must be a JSON object"),
        ('{"text": ["a"]}', 422, "text must be a string, got list"),
        ('{"texts": ["a"], "return_all_scores": "yes"}', 422, "return_all_scores must be true or false"),
        ('{"texts": []}', 422, "'texts' is empty"),
        (r'{"texts": ["ok", " \n"]}', 422, "texts[1] is empty or whitespace only"),
        (r'{"texts": ["ok", "\u001c\ufeff"]}', 422, "texts[1] is empty or whitespace only"),
        ('{"texts": null, "text": "a"}', 422, "texts must be a list of strings, got null"),
        ("{}", 422, "exactly one of 'texts'"),
        ('{"text": "a", "texts": ["b"]}', 422, "exactly one of 'texts'"),
    ],
)
def test_malformed_bodies_get_a_message_naming_the_problem(raw, status, message):
    error = _refusal(raw)
    assert error.status == status
    assert message in " | ".join([error.message, *(error.problems or [])])


def test_lone_surrogates_are_refused_naming_the_text():
    """JSON can carry them; no tokenizer reads them. A 422 here keeps them out of shared batches."""
    error = _refusal(r'{"texts": ["fine", "bad \ud800 text"]}')
    assert error.status == 422
    assert "texts[1] is not valid Unicode text: a lone surrogate (U+D800) at character 4" in error.message
    assert _refusal(r'{"text": "\udfff"}').status == 422
    json.dumps(error.body(), ensure_ascii=False).encode()  # the error body itself is valid UTF-8
    # a surrogate *pair* is one valid character
    assert parse_predict_body(rb'{"text": "\ud83d\ude00 ok"}', 4, 10).texts == ["\U0001f600 ok"]


@pytest.mark.parametrize(
    ("texts", "status", "message"),
    [
        (["ok"] * 4, 413, "4 texts in one request; the limit is 3"),
        (["ok", "x" * 11], 422, "texts[1] has 11 characters; the limit is 10"),
    ],
)
def test_request_limits(texts, status, message):
    error = _refusal(json.dumps({"texts": texts}), max_texts=3, max_chars=10)
    assert error.status == status and message in error.message


def test_texts_within_limits_pass_unchanged():
    parsed = parse_predict_body(json.dumps({"texts": ["a", "x" * 10]}).encode(), 3, 10)
    assert parsed.texts == ["a", "x" * 10] and parsed.return_all_scores is False
    parsed = parse_predict_body(b'{"text": " a ", "return_all_scores": true}', 3, 10)
    assert parsed.texts == [" a "] and parsed.return_all_scores is True


def test_rejections_are_bounded_and_cheap():
    """A 1.2 MB body of wrong types used to get an 8 MB error body back."""
    import time

    many = json.dumps({"texts": list(range(200_000))}).encode()
    assert len(many) > 1_000_000
    started = time.perf_counter()
    error = _refusal(many)
    assert error.status == 413 and "200000 texts" in error.message
    assert time.perf_counter() - started < 1.0  # one json.loads, no per-item work

    wrong = _refusal(json.dumps({"texts": [1] * 64, **{f"k{i}" * 5000: 1 for i in range(50)}}))
    body = json.dumps(wrong.body())
    assert wrong.status == 422 and len(wrong.body()["problems"]) == MAX_PROBLEMS
    assert wrong.body()["more_problems"] == 50 + 64 - MAX_PROBLEMS
    assert len(body) < 4000, len(body)  # client input is quoted short: 25 KB keys are not echoed


def test_request_id_header_is_checked():
    assert check_request_id(None) is None
    assert check_request_id("ct-pipeline-1234") == "ct-pipeline-1234"
    for bad in ("", "a b", "x" * 129, "caf\xe9"):
        with pytest.raises(InputError) as err:
            check_request_id(bad)
        assert err.value.status == 400 and "X-Request-ID" in err.value.message


def test_a_valid_request_always_fits_the_body_limit():
    texts = ["\U0001f600" * 10] * 4  # astral characters: 12 bytes each as JSON escapes
    raw = json.dumps({"texts": texts}, ensure_ascii=True).encode()
    assert len(raw) <= max_body_bytes(4, 10)


@pytest.mark.parametrize(
    "body",
    [
        {"text": "a"},
        {"texts": ["a", "b"], "return_all_scores": True},
        {"text": "\u001c"},
        {"text": "\ufeff"},
        {"text": "\u3000x"},
        {"text": "\x85"},
        {"text": "\u180e"},  # whitespace in old Unicode versions, a letter-like format char now
        {"text": " " * 11},
        {"text": "x" * 11},
        {"texts": []},
        {"texts": ["a"] * 4},
        {"texts": None, "text": "a"},
        {"text": "a", "texts": ["a"]},
        {},
        {"text": "a", "other": 1},
        {"text": "a", "return_all_scores": None},
        {"text": 1},
    ],
)
def test_openapi_schema_and_parser_agree(body):
    """The service accepts exactly what its OpenAPI schema allows (Python's jsonschema and the
    Rust validator schemathesis uses)."""
    import jsonschema
    import jsonschema_rs

    schema = predict_request_schema(max_texts=3, max_chars=10)
    try:
        parse_predict_body(json.dumps(body).encode(), 3, 10)
        accepted = True
    except InputError:
        accepted = False
    assert jsonschema.Draft202012Validator(schema).is_valid(body) == accepted
    assert jsonschema_rs.validator_for(schema).is_valid(body) == accepted


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


def test_a_model_is_its_name_version_and_run():
    from ml.rollout import ModelId, Serving

    a2, b2 = ModelId("A", "2", "run-a"), ModelId("B", "2", "run-b")
    assert not a2.matches(b2)  # the same number is not the same model
    assert not a2.matches(ModelId("A", "2", "run-x"))  # a recreated registry reused the number
    assert a2.matches(ModelId("A", "2")) and ModelId("A", "2").matches(a2)  # run unknown: any
    info = {"name": "A", "version": "2", "run_id": "run-a", "labels": ["x"], "requested": "B@2"}
    kept_a = Serving.from_json({**info, "last_load_error": "B@2: SafetensorError", "failed_request": "B@2"})
    assert kept_a.failed_to_load(b2) and not kept_a.model.matches(b2)
    assert not kept_a.failed_to_load(ModelId("C", "3"))  # a failure of another request is not ours
    assert not Serving.from_json({**info, "requested": "A@2", "last_load_error": None}).failed_to_load(a2)
