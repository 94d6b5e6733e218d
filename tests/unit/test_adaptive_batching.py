"""Adaptive batching: a lone request goes at once, concurrent requests still share a batch.

Driven through the replica's own ``_answer`` and the real ``@serve.batch`` queue with a real
model (no Ray actor): the batch size a request's first text opens is the texts in flight lately
(``_InFlight``), at most ``max_batch_size``; ``batch_wait_timeout_s`` is only the ceiling.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from ml.serve_options import ServeOptions
from serve.app import Classifier, LoadedModel, _InFlight
from tests.model_factory import build_export

WAIT_S = 0.6  # a long ceiling, so a batch that waits for it is plain to see


class _Sizes:
    def __init__(self) -> None:
        self.seen: list[int] = []

    def observe(self, value, *args, **kwargs) -> None:
        self.seen.append(int(value))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> LoadedModel:
    from ml.predict import TextClassifier

    export = build_export(tmp_path_factory.mktemp("adaptive") / "export")
    return LoadedModel(
        TextClassifier.from_dir(export), name="m", version="1", source=str(export), requested=""
    )


@pytest.fixture(autouse=True)
def replica_context(monkeypatch):
    from ray import serve

    # the batch queue reads max_ongoing_requests from the replica context, for a warning only
    context = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=64))
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)
    # @serve.batch builds its queue once per decorated method, on the event loop of its first
    # call; each test runs its own loop (asyncio.run), so each starts with a fresh queue
    lazy = Classifier.func_or_class.__mro__[1]._classify.set_max_batch_size.__self__
    monkeypatch.setattr(lazy, "_queue", None)


def _replica(adaptive: bool) -> Classifier:
    """The deployment's class without Serve's replica machinery (its __init__ needs a Ray actor)."""
    replica = object.__new__(Classifier.func_or_class.__mro__[1])
    replica._threads = 1
    replica._batch_size = _Sizes()
    replica._in_flight = _InFlight()
    replica._options = ServeOptions(
        max_batch_size=16, batch_wait_timeout_s=WAIT_S, adaptive_batching=adaptive
    )
    replica._classify.set_max_batch_size(16)
    replica._classify.set_batch_wait_timeout_s(WAIT_S)
    return replica


async def _lone(replica: Classifier, model: LoadedModel) -> float:
    await replica._answer(model, ["Warm-up: the first pass builds the tokenizer's caches."])
    started = time.perf_counter()
    await replica._answer(model, ["Stocks rallied as the central bank held rates."])
    return time.perf_counter() - started


@pytest.mark.parametrize("adaptive", [True, False])
def test_a_lone_request_waits_for_the_batch_only_without_adaptive_batching(model, adaptive):
    async def run():
        replica = _replica(adaptive)
        return await _lone(replica, model), replica._batch_size.seen

    took, sizes = asyncio.run(run())
    if adaptive:
        assert took < WAIT_S / 2, f"a lone request took {took:.3f} s: it waited for the batch to fill"
    else:  # the control: the fixed wait is what adaptive batching removes
        assert took >= WAIT_S * 0.9
    assert sizes == [1, 1]


def test_concurrent_requests_still_share_one_batch(model):
    texts = [f"Match report {i}: the home side won in extra time." for i in range(8)]

    async def run():
        replica = _replica(adaptive=True)
        started = time.perf_counter()
        results = await asyncio.gather(*(replica._answer(model, [text]) for text in texts))
        return results, replica._batch_size.seen, time.perf_counter() - started

    results, sizes, took = asyncio.run(run())
    assert sizes == [8]  # all eight were in flight when the batch opened: one forward pass
    assert took < WAIT_S  # and it did not wait for 16
    assert [len(rows) for rows, _ in results] == [1] * 8


def test_a_multi_text_request_opens_a_batch_for_all_its_texts(model):
    async def run():
        replica = _replica(adaptive=True)
        await replica._answer(model, [f"Text {i} about the election results." for i in range(5)])
        return replica._batch_size.seen

    assert asyncio.run(run()) == [5]


def test_in_flight_peak_outlives_the_dip_between_batches_then_fades(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("serve.app.time.monotonic", lambda: now[0])
    flight = _InFlight(window_s=1.0)
    for _ in range(16):
        flight.enter(1)
    assert flight.recent_peak() == 16
    flight.leave(16)  # every client answered; their next requests are on the way
    now[0] += 0.5
    flight.enter(1)
    assert flight.now == 1 and flight.recent_peak() == 16
    now[0] += 1.0  # a new window: the previous window's peak still counts
    assert flight.recent_peak() == 16
    flight.leave(1)
    now[0] += 1.0  # two quiet windows later, a lone client is alone again
    flight.enter(1)
    assert flight.recent_peak() == 1
    flight.leave(1)
    now[0] += 5.0  # long idle: nothing carried over
    assert flight.recent_peak() == 0
