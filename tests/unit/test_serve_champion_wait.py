"""A replica asked for the champion before one exists waits for it; one asked for a version fails.

The replica's own logic (``serve.app.Classifier``) outside Ray, with ``load_model`` standing in
for the registry: it fails as ``ml.registry.resolve_version`` does when the alias is missing, then
succeeds. tests/integration/test_serve_champion.py runs the same against the real MLflow and Serve.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from serve.app import Classifier, LoadedModel, _retry_delays
from serve.schemas import InputError, ServeOptions

MISSING = "registered model 'm' has no alias 'champion' at http://127.0.0.1:5000 (not found)"


class FlakyRegistry:
    """``load_model``: the alias is missing for the first ``missing`` calls, then points at v7."""

    def __init__(self, missing: int) -> None:
        self.missing = missing
        self.calls: list[str] = []

    def __call__(self, options: ServeOptions) -> LoadedModel:
        self.calls.append(options.reference())
        if len(self.calls) <= self.missing:
            raise LookupError(MISSING)
        version = options.model_version if options.model_version.isdigit() else "7"
        return LoadedModel(SimpleNamespace(device="cpu"), name="m", version=version, source="s", requested="")


def _replica(monkeypatch, registry: FlakyRegistry) -> Classifier:
    from ray import serve

    # the batch queue (once another test made one) reads max_ongoing_requests from the replica
    # context, for a warning only
    context = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=64))
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)
    cls = Classifier.func_or_class.__mro__[1]  # the class without Serve's replica machinery
    # Serve keeps the class with a copy of the module globals its methods use: patch that copy
    monkeypatch.setitem(cls._swap_model.__globals__, "load_model", registry)
    monkeypatch.setitem(cls.reconfigure.__globals__, "_assigned_cpus", lambda: 1)  # not in a Ray actor
    replica = cls()
    replica._configure_prediction_log = lambda options: None  # no S3 here
    return replica


async def _until_loaded(replica, timeout_s: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while replica._model is None:
        assert asyncio.get_running_loop().time() < deadline, "the model never loaded"
        await asyncio.sleep(0.02)


def test_without_user_config_the_replica_waits_for_the_champion(monkeypatch):
    registry = FlakyRegistry(missing=1)

    async def scenario():
        replica = _replica(monkeypatch, registry)
        await replica.check_health()  # Serve's first health check: no user_config came, defaults apply
        assert registry.calls == ["<default>@champion"]
        with pytest.raises(InputError) as refused:
            replica._require_model()
        assert refused.value.status == 503
        assert MISSING in refused.value.message and "continuous_training DAG" in refused.value.message
        ready = await replica.readyz()
        assert ready.status_code == 503 and b'"waiting"' in ready.body
        await replica.check_health()  # healthy while waiting: a restart would not create a champion
        await _until_loaded(replica, timeout_s=5)  # the first retry comes 1 s later
        assert (replica._model.version, replica._load_error, replica._waiter) == ("7", None, None)
        await replica.check_health()

    asyncio.run(scenario())


def test_a_version_number_that_does_not_load_fails_the_replica(monkeypatch):
    """The DAG's deploy sends a version number: a replica that cannot load it must not start."""

    async def scenario():
        replica = _replica(monkeypatch, FlakyRegistry(missing=1))
        with pytest.raises(LookupError):
            await replica.reconfigure({"model_version": "3"})
        assert replica._waiter is None
        with pytest.raises(RuntimeError, match="no model loaded"):
            await replica.check_health()

    asyncio.run(scenario())


def test_a_user_config_ends_the_wait(monkeypatch):
    registry = FlakyRegistry(missing=1000)

    async def scenario():
        replica = _replica(monkeypatch, registry)
        await replica.reconfigure({"model_retry_s": 0.05})  # no model_version: the champion
        assert replica._waiting()
        await asyncio.sleep(0.3)
        assert len(registry.calls) >= 3, "the replica does not retry"
        waiter = replica._waiter
        registry.missing = 0
        await replica.reconfigure({"model_version": "5", "model_retry_s": 0.05})
        assert waiter.cancelled() or waiter.done()
        assert replica._model.version == "5" and not replica._waiting()

    asyncio.run(scenario())


def test_retries_back_off_to_the_configured_bound():
    delays = _retry_delays(30)
    assert [next(delays) for _ in range(8)] == [1, 2, 4, 8, 16, 30, 30, 30]
    assert next(_retry_delays(0.5)) == 0.5


@pytest.mark.parametrize(
    ("user_config", "waits"),
    [
        ({}, True),
        ({"model_version": "champion"}, True),
        ({"model_version": "serving"}, True),
        ({"model_version": "12"}, False),
        ({"model_path": "/models/x"}, False),
    ],
)
def test_which_requests_wait(user_config, waits):
    assert ServeOptions.model_validate(user_config).waits_for_alias() is waits
