"""Schema-driven fuzzing of the live classifier service (schemathesis against 127.0.0.1).

The OpenAPI document the service publishes is the contract: every request it calls valid must be
answered (no 4xx), none may cause a server error, and every answer must match its declared schema.
Requests that break the schema (negative cases) must be refused with a 4xx, never a 5xx.

Bounded: a fixed number of generated cases, each with a short timeout, against a deployment with
small limits (4 texts of at most 200 characters) so that the model's forward passes stay cheap.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections import Counter

import pytest
import requests

from ml.rollout import ServeDeployer
from ml.settings import Settings
from tests.integration.conftest import restore_serve
from tests.model_factory import build_export, register_export

pytestmark = pytest.mark.integration

SERVE = "http://127.0.0.1:8000"
POSITIVE_CASES = 1000
NEGATIVE_CASES = 300
LIMITS = {"max_texts_per_request": 4, "max_text_chars": 200}


@pytest.fixture(scope="module")
def fuzz_app(local_stack, tmp_path_factory):
    """The classifier app with a real (untrained) model and small limits; Serve put back afterwards."""
    local_stack.require("s3", "mlflow", "ray")
    settings = Settings(registered_model=f"it-fuzz-{uuid.uuid4().hex[:8]}")
    version = register_export(settings, build_export(tmp_path_factory.mktemp("fuzz") / "export"))
    deployer = ServeDeployer(settings, timeout_s=300, poll_s=1)
    before = deployer.current_config()
    config = deployer.build_config(before, version)
    deployment = deployer.app_config(config)["deployments"][0]
    deployment["user_config"] = {**deployment["user_config"], **LIMITS}
    deployer.apply(config)
    deployer.wait_for_model(deployer.target(version))
    yield deployer
    restore_serve(deployer, before)


def _fuzz(operation, mode, cases: int, checks) -> tuple[Counter, list[str]]:
    """Run ``cases`` generated requests; every failed check is collected, not raised at the first."""
    from hypothesis import HealthCheck, Phase, given, settings

    statuses: Counter = Counter()
    failures: list[str] = []
    session = requests.Session()

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=cases,
        deadline=None,
        database=None,
        derandomize=True,  # the same cases every run: a failure is reproducible
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case) -> None:
        response = case.call(base_url=SERVE, session=session, timeout=30)
        statuses[response.status_code] += 1
        try:
            case.validate_response(response, checks=checks)
        except Exception as err:  # collected, asserted on below
            body = case.body if not isinstance(case.body, str | bytes) else case.body[:200]
            failures.append(f"{response.status_code} for {body!r}: {str(err)[:300]}")

    run()
    return statuses, failures


def test_schema_driven_fuzz(fuzz_app):
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.config import SchemathesisConfig
    from schemathesis.generation.modes import GenerationMode
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        positive_data_acceptance,
        response_schema_conformance,
        status_code_conformance,
    )

    # 413 is how the service refuses too many texts (documented for the operation): a rejection too
    rejections = ["400", "401", "413", "415", "422"]
    config = SchemathesisConfig.from_dict(
        {"checks": {"negative_data_rejection": {"expected-statuses": rejections}}}
    )
    schema = schemathesis.openapi.from_url(f"{SERVE}/openapi.json", config=config)
    body = schema.raw_schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["properties"]["texts"]["maxItems"] == LIMITS["max_texts_per_request"]
    predict = schema["/v1/predict"]["POST"]
    conformance = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]

    statuses, failures = _fuzz(
        predict, GenerationMode.POSITIVE, POSITIVE_CASES, [*conformance, positive_data_acceptance]
    )
    print(f"positive cases: {sum(statuses.values())}, statuses {dict(statuses)}")
    assert sum(statuses.values()) >= POSITIVE_CASES
    assert failures == [], f"{len(failures)} failures, first: {failures[:5]}"
    assert statuses[200] == sum(statuses.values())

    statuses, failures = _fuzz(
        predict, GenerationMode.NEGATIVE, NEGATIVE_CASES, [*conformance, negative_data_rejection]
    )
    print(f"negative cases: {sum(statuses.values())}, statuses {dict(statuses)}")
    assert failures == [], f"{len(failures)} failures, first: {failures[:5]}"
    assert not any(status >= 500 for status in statuses)

    for path in ("/v1/model", "/healthz", "/readyz"):
        statuses, failures = _fuzz(schema[path]["GET"], GenerationMode.POSITIVE, 5, conformance)
        assert failures == [], (path, failures[:3])


def test_auth_is_checked_before_the_body(fuzz_app):
    """With a token configured, a request without it gets 401 whatever its body: malformed, huge or
    invalid bodies are never read (and a wrong-token client cannot probe the validator)."""
    deployer = fuzz_app
    token = uuid.uuid4().hex
    config = deployer.current_config()
    app = deployer.app_config(config)
    env = (app.get("runtime_env") or {}).get("env_vars") or {}
    # a test token in runtime_env for brevity; production keeps it in the Ray nodes' environment
    app["runtime_env"] = {**(app.get("runtime_env") or {}), "env_vars": {**env, "CT_SERVE_API_TOKEN": token}}
    deployer.apply(config)
    deadline = time.monotonic() + 300
    while True:  # until the restarted replicas ask for the token
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{SERVE}/v1/model", timeout=30).status_code == 401:
                break
        assert time.monotonic() < deadline, "the token never took effect"
        time.sleep(2)

    json_type = {"content-type": "application/json"}
    for data in (b"{not json", b'{"texts": [1, 2, 3]}', b'{"texts": ["' + b"x" * 8_000_000 + b'"]}'):
        resp = requests.post(f"{SERVE}/v1/predict", data=data, headers=json_type, timeout=60)
        assert resp.status_code == 401, (resp.status_code, resp.text[:200])
        assert resp.headers["www-authenticate"] == "Bearer"
    wrong = {**json_type, "Authorization": "Bearer nope"}
    assert (
        requests.post(f"{SERVE}/v1/predict", data=b"{not json", headers=wrong, timeout=30).status_code == 401
    )
    right = {**json_type, "Authorization": f"Bearer {token}"}
    assert (
        requests.post(f"{SERVE}/v1/predict", data=b"{not json", headers=right, timeout=30).status_code == 400
    )
    assert (
        requests.post(f"{SERVE}/v1/predict", json={"text": "Stocks rose."}, headers=right).status_code == 200
    )
    assert requests.get(f"{SERVE}/v1/model", headers=right, timeout=10).status_code == 200
    schema = requests.get(f"{SERVE}/openapi.json", timeout=10).json()
    assert schema["paths"]["/v1/predict"]["post"]["security"] == [{"bearer": []}]
