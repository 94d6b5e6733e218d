"""Staged rollouts on the real stack: shadow, then canary, with real registered models under load.

One fresh model (its own dataset, so its own Serve application) serves ``v1``. Client threads keep
sending requests to its route while ``ml.staged_rollout`` runs a candidate beside it:

* a good candidate (the same weights, registered again) passes shadow and canary and is promoted,
  with 0 failed requests, sticky canary assignment per ``X-Client-Key``, and ``champion`` moved;
* a candidate that disagrees wildly (its labels rotated: wrong wherever the champion is right) is
  stopped at shadow, and the champion serves on untouched;
* a candidate that errors and is slow (faults injected through ``user_config.candidate``, not
  code) is rolled back during canary, with 0 failed client requests.

Windows are small (tens of texts, at most 2 minutes a stage) to keep the suite fast.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
import requests

from ml.registry import CHAMPION, SERVING
from ml.rollout import ServeDeployer
from ml.rollout_report import CanaryPolicy, ShadowPolicy
from ml.serving_history import read
from ml.settings import Settings
from ml.staged_rollout import (
    RolloutStopped,
    canary_stage,
    promote_candidate,
    shadow_stage,
    start_candidate,
)
from ml.storage import ObjectStore
from tests.integration.conftest import restore_serve
from tests.integration.test_serving import Traffic
from tests.model_factory import build_export, register_export, rotate_head

pytestmark = pytest.mark.integration

TEXTS = [
    "Stocks fell as oil prices rose for a third day.",
    "The champions lost at home in extra time.",
    "A new phone chip doubles battery life.",
    "Ministers met to discuss the border talks.",
    "The central bank kept rates on hold again.",
    "A late goal sent the home side through to the final.",
    "Rebels and the army agreed to a ceasefire.",
    "Quarterly profit beat forecasts at the carmaker.",
]
SHADOW = ShadowPolicy(min_texts=40, max_minutes=2, min_decisive=20)
CANARY = CanaryPolicy(fraction=0.5, min_requests=30, max_minutes=2, min_decisive=15)


def PacedTraffic(texts: list[str], url: str, max_seconds: float) -> Traffic:
    """Traffic with a pause between requests: the replica keeps idle CPU for the shadow (on 2 cores
    a closed loop would starve it, and the stage would see a quiet service)."""
    return Traffic(texts, url=url, max_seconds=max_seconds, pause_s=0.05)


@pytest.fixture(scope="module")
def rollout(local_stack, tmp_path_factory):
    """A fresh model's application serving v1 (champion and serving), and candidates to try."""
    from mlflow import MlflowClient

    local_stack.require("s3", "mlflow", "ray")
    tmp = tmp_path_factory.mktemp("staged")
    settings = Settings(dataset=f"it-roll-{uuid.uuid4().hex[:8]}")
    ObjectStore(settings).ensure_bucket()
    good = build_export(tmp / "good")
    versions = {
        "v1": register_export(settings, good),
        "good": register_export(settings, good),  # the same weights: agrees everywhere
        "rotated": register_export(settings, rotate_head(good, tmp / "rotated")),
        "faulty": register_export(settings, good),  # healthy weights; faults injected via config
    }
    deployer = ServeDeployer(settings, timeout_s=300, poll_s=1)
    before = deployer.current_config()
    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    try:
        deployer.deploy(versions["v1"], model_name=settings.registered_model)
        client.set_registered_model_alias(settings.registered_model, CHAMPION, versions["v1"])
        yield settings, deployer, versions, client
    finally:
        restore_serve(deployer, before)


def _outcome(settings: Settings, version: str) -> dict:
    return {"name": settings.registered_model, "version": version, "run_id": None}


def _serving_version(deployer: ServeDeployer) -> str:
    return deployer.serving().version


def _metric_roles(model: str, version: str, timeout_s: float = 60) -> set[str]:
    """The roles of ``model`` ``version``'s ``ct_serve_requests`` series on Ray's /metrics (pushed
    to the exporter every few seconds: polled until shadow and canary show, or ``timeout_s``)."""
    import re

    from tests.integration.conftest import stack

    roles: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not {"shadow", "canary"} <= roles:
        text = requests.get(f"http://127.0.0.1:{stack.RAY_METRICS_PORT}/metrics", timeout=10).text
        for line in text.splitlines():
            if (
                line.startswith("ray_ct_serve_requests_total{")
                and f'model_name="{model}"' in line
                and f'model_version="{version}"' in line
            ):
                roles.update(re.findall(r'role="([a-z]+)"', line))
        time.sleep(2)
    return roles


def _no_failures(load: Traffic) -> None:
    failed = load.failed
    assert load.results and not failed, f"{len(failed)} of {len(load.results)} requests failed: {failed[:5]}"


def test_a_good_candidate_passes_shadow_and_canary_and_is_promoted(rollout):
    settings, deployer, versions, client = rollout
    champion = _serving_version(deployer)
    url = f"{deployer.serve_url}/v1/predict"
    with PacedTraffic(TEXTS, url=url, max_seconds=420) as load:
        stage = start_candidate(settings, _outcome(settings, versions["good"]), "shadow", actor="it")
        assert stage["champion"]["version"] == champion
        info = deployer.serving()
        assert info.candidate["mode"] == "shadow" and info.candidate["version"] == versions["good"]
        shadowed = shadow_stage(settings, stage, SHADOW, actor="it", poll_s=3)
        assert shadowed["shadow"]["decision"] == "promote", shadowed["shadow"]["reason"]
        # clients never saw the shadow: every answer so far came from the champion
        assert {r[3] for r in load.results if r[2] == 200} == {champion}

        canaried = canary_stage(settings, shadowed, CANARY, actor="it", poll_s=3)
        assert canaried["canary"]["decision"] == "promote", canaried["canary"]["reason"]

        # sticky per client key, and every response names the version that answered
        seen: dict[str, set[str]] = {}
        for key in (f"client-{i}" for i in range(12)):
            for _ in range(3):
                resp = requests.post(url, json={"text": TEXTS[0]}, headers={"X-Client-Key": key}, timeout=30)
                assert resp.status_code == 200, resp.text
                body = resp.json()
                assert resp.headers["X-Model-Version"] == body["model"]["version"]
                assert resp.headers["X-Model-Role"] == body["role"]
                seen.setdefault(key, set()).add(body["model"]["version"])
        assert all(len(v) == 1 for v in seen.values()), f"a client flipped between versions: {seen}"
        assert set().union(*seen.values()) == {champion, versions["good"]}, "both versions answer at 50 %"

        # per-version request series labelled by role, on Ray's Prometheus endpoint
        roles = _metric_roles(settings.registered_model, versions["good"])
        assert {"shadow", "canary"} <= roles, roles

        promoted = promote_candidate(settings, canaried, None, actor="it")
        assert promoted["version"] == versions["good"]
        done = time.monotonic()
        time.sleep(2)
    _no_failures(load)
    assert load.versions_sent_after(done) == {versions["good"]}
    assert deployer.serving().candidate is None
    name = settings.registered_model
    assert client.get_model_version_by_alias(name, CHAMPION).version == versions["good"]
    assert client.get_model_version_by_alias(name, SERVING).version == versions["good"]
    actions = [e["action"] for e in read(settings, name)]
    assert actions[-4:] == ["shadow_start", "canary_start", "canary_pass", "deploy"], actions
    # the reports exist as JSON and HTML
    store = ObjectStore(settings)
    key = shadowed["shadow"]["report"]["key"]
    assert store.exists(key) and store.exists(key.removesuffix(".html") + ".json")


def test_a_candidate_that_disagrees_is_stopped_at_shadow(rollout):
    settings, deployer, versions, client = rollout
    champion = _serving_version(deployer)
    with PacedTraffic(TEXTS, url=f"{deployer.serve_url}/v1/predict", max_seconds=300) as load:
        stage = start_candidate(settings, _outcome(settings, versions["rotated"]), "shadow", actor="it")
        with pytest.raises(RolloutStopped) as stopped:
            shadow_stage(settings, stage, SHADOW, actor="it", poll_s=3)
        time.sleep(2)
    assert "stopped at shadow" in str(stopped.value) and "agreement" in str(stopped.value), str(stopped.value)
    _no_failures(load)
    assert {r[3] for r in load.results} == {champion}, "the champion answered every request"
    assert _serving_version(deployer) == champion and deployer.serving().candidate is None
    entry = read(settings, settings.registered_model)[-1]
    assert (entry["action"], entry["result"]) == ("shadow_reject", "ok")
    assert entry["to_version"] == versions["rotated"]
    report = json.loads(
        ObjectStore(settings).get_bytes(stopped.value.report["report"]["key"].removesuffix(".html") + ".json")
    )
    assert report["decision"] == "stop" and report["agreement"] < SHADOW.min_agreement
    assert client.get_model_version_by_alias(settings.registered_model, CHAMPION).version == champion


def test_an_erroring_slow_candidate_is_rolled_back_during_canary(rollout):
    settings, deployer, versions, client = rollout
    champion = _serving_version(deployer)
    with PacedTraffic(TEXTS, url=f"{deployer.serve_url}/v1/predict", max_seconds=420) as load:
        stage = start_candidate(settings, _outcome(settings, versions["faulty"]), "shadow", actor="it")
        shadowed = shadow_stage(settings, stage, SHADOW, actor="it", poll_s=3)
        # the drill: from the canary on, half its calls fail and each takes 300 ms longer
        faulty = {**shadowed, "inject": {"inject_error_rate": 0.5, "inject_delay_ms": 300}}
        with pytest.raises(RolloutStopped) as stopped:
            canary_stage(settings, faulty, CANARY, actor="it", poll_s=3)
        rolled_back = time.monotonic()
        time.sleep(3)
    assert "rolled back to 0 %" in str(stopped.value), str(stopped.value)
    _no_failures(load)  # a failed canary answer was retried on the champion
    assert load.versions_sent_after(rolled_back) == {champion}
    assert versions["faulty"] in {r[3] for r in load.results}, "the canary did answer some clients"
    assert _serving_version(deployer) == champion and deployer.serving().candidate is None
    entries = read(settings, settings.registered_model)
    assert [e["action"] for e in entries[-3:]] == ["shadow_start", "canary_start", "canary_rollback"]
    assert client.get_model_version_by_alias(settings.registered_model, CHAMPION).version == champion
