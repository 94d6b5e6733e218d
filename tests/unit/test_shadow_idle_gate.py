"""The shadow mirror runs its passes only in the serving model's idle moments (``serve.app``).

A shadow candidate at low CPU priority still cost the champion's p99 (its Python holds the GIL the
request path needs; ``benchmarks/shadow_bench.py``), so each shadow pass of
``SHADOW_PASS_TEXTS`` texts waits until no serving pass has run for ``SHADOW_QUIET_S``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import numpy as np

from ml.serve_options import CandidateOptions
from serve import app

LABELS = ["world", "sports", "business", "tech"]


class Recording:
    labels = LABELS

    def __init__(self) -> None:
        self.calls: list[tuple[float, int, float]] = []  # (when, texts, the serving model's quiet seconds)

    def predict_proba(self, texts: list[str], batch_size: int) -> np.ndarray:
        self.calls.append((time.monotonic(), len(texts), app._SERVING.quiet_s()))
        return np.full((len(texts), len(LABELS)), 0.25, dtype=np.float32)


def test_shadow_passes_wait_for_the_serving_model_to_be_idle():
    candidate = Recording()
    model = app.LoadedModel(candidate, name="m", version="2", source="test", requested="m@2")
    emitted: list[tuple[list[dict[str, Any]], float]] = []

    async def scenario() -> None:
        mirror = app.ShadowMirror(
            model,
            CandidateOptions(model_version="2", mode="shadow"),
            16,
            lambda records, latency_ms, failed: emitted.append((records, latency_ms)),
            asyncio.get_running_loop(),
        )
        try:
            with app._SERVING:  # a serving pass in flight: the shadow must not start one
                assert mirror.offer("r1", ["a", "b", "c"])
                await asyncio.sleep(0.3)
                assert candidate.calls == [] and mirror.stats["answered"] == 0
            idle_since = time.monotonic()
            deadline = time.monotonic() + 5
            while not emitted:
                assert time.monotonic() < deadline, "the shadow never ran once the serving model was idle"
                await asyncio.sleep(0.01)
        finally:
            mirror.close()
        assert [n for _, n, _ in candidate.calls] == [1, 1, 1]  # one text per pass
        assert all(quiet >= app.SHADOW_QUIET_S for _, _, quiet in candidate.calls)
        assert candidate.calls[0][0] - idle_since >= app.SHADOW_QUIET_S * 0.9
        records, latency_ms = emitted[0]
        assert [r["item"] for r in records] == [0, 1, 2] and {r["role"] for r in records} == {"shadow"}
        assert latency_ms < 300, latency_ms  # its compute time, not the 0.3 s it waited
        assert mirror.stats == {"mirrored": 3, "answered": 3, "failed": 0, "dropped": 0}

    asyncio.run(scenario())


def test_a_serving_pass_counts_as_busy_until_it_returns():
    seen: list[float] = []

    class Serving(Recording):
        def predict_proba(self, texts: list[str], batch_size: int) -> np.ndarray:
            seen.append(app._SERVING.quiet_s())
            time.sleep(0.05)
            return super().predict_proba(texts, batch_size)

    worker = threading.Thread(target=app._infer, args=(Serving(), ["x", "y"], 0))
    worker.start()
    worker.join()
    assert seen == [0.0]
    assert 0.0 < app._SERVING.quiet_s() < 5
