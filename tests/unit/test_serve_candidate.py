"""A candidate beside the serving model (shadow, canary, promotion), in the replica outside Ray.

``serve.app.Classifier`` with ``load_model`` standing in for the registry: each version number is a
fake classifier (deterministic per text; "rotated", which disagrees; slow; raising). Requests go
through ``Classifier.predict`` itself (a Starlette ``Request`` with a JSON body), and the prediction
log is an object collecting the rows the replica appends.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
from starlette.requests import Request
from starlette.responses import Response

from ml.prediction_log import RECORD_FIELDS, _normalize, client_rows
from serve.app import Classifier, LoadedModel, _canary_share
from serve.schemas import ServeOptions

LABELS = ["world", "sports", "business", "tech"]
NAME = "m"


class Deterministic:
    """Probabilities that depend only on the text (and ``shift``: a rotated model disagrees)."""

    labels = LABELS
    device = "cpu"
    max_length = 128
    model = SimpleNamespace(dtype="torch.float32")

    def __init__(self, shift: int = 0, delay_s: float = 0.0) -> None:
        self.shift, self.delay_s = shift, delay_s
        self.calls = 0

    def proba(self, text: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")
        logits = np.random.default_rng(seed).normal(size=len(LABELS))
        probs = np.exp(logits) / np.exp(logits).sum()
        return np.roll(probs, self.shift)

    def predict_proba(self, texts: list[str], batch_size: int) -> np.ndarray:
        self.calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        return np.stack([self.proba(t) for t in texts])

    def label(self, text: str) -> str:
        return LABELS[int(np.argmax(self.proba(text)))]


class Gated(Deterministic):
    """Runs only once ``gate`` is set: a shadow thread kept busy for as long as a test needs."""

    def __init__(self, shift: int = 0) -> None:
        super().__init__(shift)
        self.gate = threading.Event()

    def predict_proba(self, texts: list[str], batch_size: int) -> np.ndarray:
        self.calls += 1
        assert self.gate.wait(10), "the test never opened the gate"
        return np.stack([self.proba(t) for t in texts])


class Raising(Deterministic):
    def predict_proba(self, texts: list[str], batch_size: int) -> np.ndarray:
        self.calls += 1
        raise RuntimeError("candidate weights are garbage")


class Registry:
    """``load_model``: version number → classifier; a version in ``broken`` fails to load."""

    def __init__(self, models: dict[str, Any], broken: frozenset[str] = frozenset()) -> None:
        self.models, self.broken = models, broken
        self.calls: list[str] = []

    def __call__(self, options: ServeOptions) -> LoadedModel:
        self.calls.append(options.model_version)
        if options.model_version in self.broken:
            raise OSError(f"safetensors export of v{options.model_version} is truncated")
        return LoadedModel(
            self.models[options.model_version],
            name=options.model_name or NAME,
            version=options.model_version,
            source=f"models:/{NAME}/{options.model_version}",
            requested=options.reference(),
            run_id=f"run-{options.model_version}",
        )


class FakeLog:
    """The prediction log: rows appended, in order."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def append(self, records: list[dict[str, Any]]) -> None:
        self.rows.extend(records)

    def of(self, role: str, request_id: str | None = None) -> list[dict[str, Any]]:
        return [
            r
            for r in self.rows
            if r["role"] == role and (request_id is None or r["request_id"] == request_id)
        ]


def _replica(monkeypatch, registry: Registry) -> tuple[Any, FakeLog]:
    from ray import serve

    context = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=64))
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)
    monkeypatch.delenv("CT_SERVE_API_TOKEN", raising=False)
    cls = Classifier.func_or_class.__mro__[1]  # the class without Serve's replica machinery
    # Serve keeps the class with a copy of the module globals its methods use: patch that copy
    monkeypatch.setitem(cls._swap_model.__globals__, "load_model", registry)
    monkeypatch.setitem(cls.reconfigure.__globals__, "_assigned_cpus", lambda: 1)  # not in a Ray actor
    # @serve.batch keeps one queue per process (one replica there), bound to the event loop it was
    # made on: each test's loop needs a fresh one
    monkeypatch.setattr(cls._classify.set_max_batch_size.__self__, "_queue", None)

    class Replica(cls):
        def __del__(self) -> None:  # Serve awaits the async one; the garbage collector would not
            self._stop_waiting()
            self._drop_candidate()

    replica = Replica()
    log = FakeLog()

    def configure_log(options: ServeOptions) -> None:  # no S3 here
        replica._prediction_log = log if options.prediction_log else None

    replica._configure_prediction_log = configure_log
    return replica, log


def _config(version: str = "1", candidate: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    # no batch wait: a request alone in its batch is classified at once
    config = {"model_name": NAME, "model_version": version, "batch_wait_timeout_s": 0.0, **extra}
    if candidate is not None:
        config["candidate"] = candidate
    return config


def _request(texts: list[str], headers: dict[str, str] | None = None) -> Request:
    raw = json.dumps({"texts": texts}).encode()
    fields = {"content-type": "application/json", "content-length": str(len(raw)), **(headers or {})}
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/predict",
        "headers": [(k.lower().encode(), v.encode()) for k, v in fields.items()],
    }
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}

    return Request(scope, receive)


async def _predict(replica: Any, texts: list[str], **headers: str) -> tuple[Any, Response, float]:
    response = Response()
    started = time.perf_counter()
    answer = await replica.predict(
        _request(texts, {k.replace("_", "-"): v for k, v in headers.items()}), response
    )
    return answer, response, time.perf_counter() - started


async def _until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


# --------------------------------------------------------------------------------------
# shadow
# --------------------------------------------------------------------------------------


def test_shadow_logs_the_candidate_and_leaves_answers_alone(monkeypatch):
    champion, candidate = Deterministic(), Deterministic(shift=1)
    registry = Registry({"1": champion, "2": candidate})

    async def scenario():
        replica, log = _replica(monkeypatch, registry)
        await replica.reconfigure(_config("1", {"model_version": "2", "mode": "shadow"}))
        assert registry.calls == ["1", "2"]
        texts = ["markets rally", "cup final tonight", "new chip announced"]
        answer, response, _ = await _predict(replica, texts, X_Request_ID="req-1")
        assert answer.role == "champion" and answer.model.version == "1"
        assert [p.label for p in answer.predictions] == [champion.label(t) for t in texts]
        assert response.headers["X-Model-Version"] == "1" and response.headers["X-Model-Role"] == "champion"

        await _until(lambda: len(log.of("shadow")) == 3)
        served, shadow = log.of("champion", "req-1"), log.of("shadow", "req-1")
        assert [r["item"] for r in served] == [r["item"] for r in shadow] == [0, 1, 2]
        assert [r["text"] for r in shadow] == texts
        assert {(r["model_version"], r["model_run_id"]) for r in shadow} == {("2", "run-2")}
        assert [r["label"] for r in shadow] == [candidate.label(t) for t in texts]
        assert all(r.get("error") is None and r["latency_ms"] >= 0 for r in shadow)
        assert [r["label"] for r in served] == [champion.label(t) for t in texts]
        assert all(len(_normalize(r)) == len(RECORD_FIELDS) for r in log.rows)  # storable rows

        # the pipeline's smoke tests check the champion alone: not mirrored
        answer, _, _ = await _predict(replica, ["smoke"], X_Request_ID="ct-pipeline-42")
        assert answer.role == "champion"
        await asyncio.sleep(0.1)
        assert log.of("shadow", "ct-pipeline-42") == [] and log.of("champion", "ct-pipeline-42")
        info = replica._candidate_info()
        assert (info.mode, info.version, info.fraction, info.load_error) == ("shadow", "2", 0.0, None)
        assert info.shadow == {"mirrored": 3, "answered": 3, "failed": 0, "dropped": 0}
        replica._drop_candidate()

    asyncio.run(scenario())


def test_a_full_shadow_queue_drops_without_delaying_requests(monkeypatch):
    slow = Gated(shift=1)
    registry = Registry({"1": Deterministic(), "2": slow})

    async def scenario():
        replica, log = _replica(monkeypatch, registry)
        shadow = {"model_version": "2", "mode": "shadow", "shadow_queue_texts": 2}
        await replica.reconfigure(_config("1", shadow))
        await _predict(replica, ["first"], X_Request_ID="r0")
        await _until(lambda: slow.calls == 1)  # the shadow thread is busy with it until the gate opens
        elapsed = []
        for i in range(1, 6):
            answer, _, took = await _predict(replica, [f"text {i}"], X_Request_ID=f"r{i}")
            assert answer.role == "champion" and answer.model.version == "1"
            elapsed.append(took)
        assert max(elapsed) < 0.5, elapsed  # no request waited for the shadow
        stats = replica._candidate_info().shadow
        assert stats == {"mirrored": 3, "answered": 0, "failed": 0, "dropped": 3}, stats
        slow.gate.set()
        await _until(lambda: len(log.of("shadow")) == 3)
        assert [r["request_id"] for r in log.of("shadow")] == ["r0", "r1", "r2"]
        assert len(log.of("champion")) == 6  # every client answer logged
        replica._drop_candidate()

    asyncio.run(scenario())


@pytest.mark.parametrize("fault", ["raising", "injected"])
def test_a_failing_shadow_logs_errors_and_never_fails_a_request(monkeypatch, fault):
    candidate = Raising() if fault == "raising" else Deterministic(shift=1)
    registry = Registry({"1": Deterministic(), "2": candidate})
    shadow = {"model_version": "2", "mode": "shadow"}
    if fault == "injected":
        shadow["inject_error_rate"] = 1.0

    async def scenario():
        replica, log = _replica(monkeypatch, registry)
        await replica.reconfigure(_config("1", shadow))
        answer, _, _ = await _predict(replica, ["a", "b"], X_Request_ID="req-e")
        assert answer.role == "champion" and len(answer.predictions) == 2
        await _until(lambda: len(log.of("shadow")) == 2)
        rows = log.of("shadow", "req-e")
        assert [r["item"] for r in rows] == [0, 1]
        assert all(r["error"] and r.get("label") is None and r["model_version"] == "2" for r in rows)
        expected = "garbage" if fault == "raising" else "injected fault"
        assert expected in rows[0]["error"]
        assert replica._candidate_info().shadow["failed"] == 2
        replica._drop_candidate()

    asyncio.run(scenario())


# --------------------------------------------------------------------------------------
# canary
# --------------------------------------------------------------------------------------


def test_canary_answers_its_share_of_clients_sticky_per_key(monkeypatch):
    champion, candidate = Deterministic(), Deterministic(shift=1)
    registry = Registry({"1": champion, "2": candidate})

    async def scenario():
        replica, log = _replica(monkeypatch, registry)
        await replica.reconfigure(_config("1", {"model_version": "2", "mode": "canary", "fraction": 0.5}))
        keys = [f"client-{i}" for i in range(200)]

        async def ask(key: str, n: int) -> tuple[str, str, str, str]:
            answer, response, _ = await _predict(
                replica, ["same text"], X_Client_Key=key, X_Request_ID=f"{key}-{n}"
            )
            assert response.headers["X-Model-Version"] == answer.model.version
            assert response.headers["X-Model-Role"] == answer.role
            assert response.headers["X-Model-Name"] == NAME
            return answer.role, answer.model.version, answer.predictions[0].label, key

        first = await asyncio.gather(*(ask(k, 0) for k in keys))
        again = await asyncio.gather(*(ask(k, 1) for k in keys))
        assert first == again  # sticky: the same key gets the same version every time
        canary = [f for f in first if f[0] == "canary"]
        assert 0.35 <= len(canary) / len(keys) <= 0.65, len(canary)
        for role, version, label, key in first:
            assert (role, version) in {("canary", "2"), ("champion", "1")}
            model = candidate if role == "canary" else champion
            assert label == model.label("same text")
            assert (_canary_share(key, "2") < 0.5) == (role == "canary")
        assert len(log.of("canary")) == 2 * len(canary)
        assert {r["model_version"] for r in log.of("canary")} == {"2"}
        assert all(r.get("error") is None for r in log.rows)

        # a pipeline smoke test always gets the champion, whatever its key
        in_canary = canary[0][3]
        answer, _, _ = await _predict(replica, ["x"], X_Client_Key=in_canary, X_Request_ID="ct-pipeline-7")
        assert answer.role == "champion"
        # no client key: the request id decides
        rid = next(f"rid-{i}" for i in range(1000) if _canary_share(f"rid-{i}", "2") < 0.5)
        answer, _, _ = await _predict(replica, ["x"], X_Request_ID=rid)
        assert (answer.role, answer.request_id) == ("canary", rid)

        await replica.reconfigure(_config("1", {"model_version": "2", "mode": "canary", "fraction": 0.0}))
        assert registry.calls == ["1", "2"]  # only the fraction changed: nothing reloaded
        roles = {(await _predict(replica, ["x"], X_Client_Key=k))[0].role for k in keys[:50]}
        assert roles == {"champion"}

    asyncio.run(scenario())


@pytest.mark.parametrize("fault", ["raising", "injected"])
def test_a_failing_canary_is_answered_by_the_champion(monkeypatch, fault):
    champion = Deterministic()
    candidate = Raising() if fault == "raising" else Deterministic(shift=1)
    registry = Registry({"1": champion, "2": candidate})
    canary = {"model_version": "2", "mode": "canary", "fraction": 1.0}
    if fault == "injected":
        canary.update(inject_error_rate=1.0, inject_delay_ms=30)

    async def scenario():
        replica, log = _replica(monkeypatch, registry)
        await replica.reconfigure(_config("1", canary))
        for i in range(5):
            texts = ["one", "two"]
            answer, response, _ = await _predict(replica, texts, X_Client_Key=f"k{i}", X_Request_ID=f"q{i}")
            assert (answer.role, answer.model.version) == ("champion", "1")
            assert (
                response.headers["X-Model-Role"] == "champion" and response.headers["X-Model-Version"] == "1"
            )
            assert [p.label for p in answer.predictions] == [champion.label(t) for t in texts]
            errors = log.of("canary", f"q{i}")
            assert [(r["item"], r["model_version"]) for r in errors] == [(0, "2"), (1, "2")]
            assert all(r["error"] and r.get("label") is None for r in errors)
            assert all(r["latency_ms"] >= (30 if fault == "injected" else 0) for r in errors)
            assert [r["label"] for r in log.of("champion", f"q{i}")] == [champion.label(t) for t in texts]
        if fault == "injected":
            assert candidate.calls == 0  # the fault is injected before the model runs
        assert all(len(_normalize(r)) == len(RECORD_FIELDS) for r in log.rows)  # storable rows
        frame = pd.DataFrame(log.rows)
        assert set(client_rows(frame)["role"]) == {"champion"} and len(client_rows(frame)) == 10

    asyncio.run(scenario())


def test_an_injected_delay_slows_canary_answers_but_they_succeed(monkeypatch):
    registry = Registry({"1": Deterministic(), "2": Deterministic(shift=1)})

    async def scenario():
        replica, log = _replica(monkeypatch, registry)
        delayed = {"model_version": "2", "mode": "canary", "fraction": 1.0, "inject_delay_ms": 150}
        await replica.reconfigure(_config("1", delayed))
        took = []
        for i in range(3):
            answer, _, elapsed = await _predict(replica, ["slow"], X_Client_Key=f"k{i}")
            assert (answer.role, answer.model.version) == ("canary", "2")
            took.append(elapsed)
        assert min(took) >= 0.15, took
        assert all(r["latency_ms"] >= 150 and r.get("error") is None for r in log.of("canary"))

        await replica.reconfigure(_config("1", {**delayed, "fraction": 0.0}))
        _, _, fast = await _predict(replica, ["slow"], X_Client_Key="k0")
        assert fast < 0.1 < min(took), (fast, took)
        assert log.of("champion")[-1]["latency_ms"] < 100

    asyncio.run(scenario())


# --------------------------------------------------------------------------------------
# promotion, load failures
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["shadow", "canary"])
def test_promotion_swaps_the_loaded_candidate_in_without_loading(monkeypatch, mode):
    registry = Registry({"1": Deterministic(), "2": Deterministic(shift=1)})

    async def scenario():
        replica, log = _replica(monkeypatch, registry)
        await replica.reconfigure(_config("1", {"model_version": "2", "mode": mode, "fraction": 0.2}))
        candidate = replica._candidate
        shadow = replica._shadow
        assert candidate.version == "2" and (shadow is not None) == (mode == "shadow")
        await replica.reconfigure(_config("2"))
        assert replica._model is candidate  # the very object: no second load
        assert registry.calls == ["1", "2"]
        assert replica._candidate is None and replica._shadow is None and replica._candidate_info() is None
        if shadow is not None:
            assert shadow._closed and not shadow.offer("late", ["x"])
        answer, response, _ = await _predict(replica, ["after"], X_Client_Key="anyone")
        assert (answer.role, answer.model.version, answer.model.run_id) == ("champion", "2", "run-2")
        assert response.headers["X-Model-Version"] == "2"
        await asyncio.sleep(0.05)
        assert log.of("shadow") == []

    asyncio.run(scenario())


def test_another_version_than_the_candidate_is_loaded(monkeypatch):
    registry = Registry({"1": Deterministic(), "2": Deterministic(shift=1), "3": Deterministic(shift=2)})

    async def scenario():
        replica, _ = _replica(monkeypatch, registry)
        await replica.reconfigure(_config("1", {"model_version": "2", "mode": "canary"}))
        candidate = replica._candidate
        await replica.reconfigure(_config("3", {"model_version": "2", "mode": "canary"}))
        assert replica._model.version == "3" and replica._candidate is candidate
        assert registry.calls == ["1", "2", "3"]
        # mode changes keep the loaded candidate
        await replica.reconfigure(_config("3", {"model_version": "2", "mode": "shadow"}))
        assert replica._candidate is candidate and replica._shadow is not None
        assert registry.calls == ["1", "2", "3"]
        replica._drop_candidate()

    asyncio.run(scenario())


def test_a_candidate_that_fails_to_load_leaves_the_serving_model_alone(monkeypatch):
    registry = Registry({"1": Deterministic()}, broken=frozenset({"9"}))

    async def scenario():
        replica, log = _replica(monkeypatch, registry)
        await replica.reconfigure(_config("1"))
        serving = replica._model
        await replica.reconfigure(_config("1", {"model_version": "9", "mode": "canary", "fraction": 1.0}))
        assert replica._model is serving and replica._load_error is None and replica._candidate is None
        info = replica._candidate_info()
        assert info.version is None and info.mode == "canary" and info.requested == "<serving model>@9"
        assert "v9 is truncated" in info.load_error and "OSError" in info.load_error
        answer, _, _ = await _predict(replica, ["still served"], X_Client_Key="k")
        assert (answer.role, answer.model.version) == ("champion", "1")

        replica._history = SimpleNamespace(get=_no_history)  # GET /v1/model without S3
        model_info = await replica.model_info(_request([]))
        assert model_info.version == "1" and model_info.last_load_error is None
        assert "v9 is truncated" in model_info.candidate.load_error
        assert replica.describe()["candidate"]["load_error"] == info.load_error

        await replica.reconfigure(_config("1"))  # candidate removed
        assert replica._candidate_info() is None and replica._candidate_error is None
        assert replica._model is serving and registry.calls == ["1", "9"]
        assert log.of("canary") == []

    asyncio.run(scenario())


async def _no_history(model: str) -> None:
    return None


# --------------------------------------------------------------------------------------
# pure functions
# --------------------------------------------------------------------------------------


def test_canary_share_is_stable_and_uniform():
    keys = [f"client-{i}" for i in range(20_000)]
    shares = np.array([_canary_share(k, "7") for k in keys])
    assert ((shares >= 0) & (shares < 1)).all()
    assert [_canary_share(k, "7") for k in keys[:100]] == shares[:100].tolist()  # stable
    for fraction in (0.01, 0.1, 0.5, 0.9):
        assert abs((shares < fraction).mean() - fraction) < 0.015, fraction
    counts, _ = np.histogram(shares, bins=10, range=(0, 1))
    assert counts.min() > 1800 and counts.max() < 2200, counts
    # another candidate version reshuffles clients: about half of a 50 % canary changes sides
    other = np.array([_canary_share(k, "8") for k in keys])
    assert 0.4 < ((shares < 0.5) != (other < 0.5)).mean() < 0.6
    assert _canary_share("\ud800 odd", "7") == _canary_share("\ud800 odd", "7")  # any str hashes


def test_client_rows_leave_out_shadow_and_error_rows():
    frame = pd.DataFrame(
        [
            {"request_id": "a", "role": "champion", "error": None},
            {"request_id": "b", "role": None, "error": None},  # written before the column existed
            {"request_id": "c", "role": "canary", "error": None},
            {"request_id": "d", "role": "shadow", "error": None},
            {"request_id": "e", "role": "canary", "error": "injected fault"},
            {"request_id": "f", "role": "shadow", "error": "boom"},
        ]
    )
    assert client_rows(frame)["request_id"].tolist() == ["a", "b", "c"]
    old = pd.DataFrame([{"request_id": "x"}])  # files from before role and error existed
    assert client_rows(old)["request_id"].tolist() == ["x"]


def test_a_hand_edited_unquoted_version_number_is_a_version():
    """``model_version: 7`` in a hand-edited serveConfigV2 is version "7", not a refused config."""
    from ml.serve_options import ServeOptions

    options = ServeOptions.model_validate({"candidate": {"model_version": 7, "mode": "canary"}})
    assert options.candidate.model_version == "7"
    with pytest.raises(ValueError):
        ServeOptions.model_validate({"candidate": {"model_version": True}})
