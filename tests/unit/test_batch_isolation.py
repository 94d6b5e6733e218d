"""One text that breaks the forward pass must not fail the other texts of its batch.

Texts of concurrent requests share ``@serve.batch`` forward passes in the Serve replica. The
validator keeps known poison out (tests/unit/test_serve_contract.py); this is the defence behind
it: the replica's batch method, driven by the real ``@serve.batch`` queue and a real model, with a
text the real tokenizer cannot read slipped past the validator.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from serve.app import Classifier, LoadedModel, _ItemFailed
from tests.model_factory import build_export


class _Metric:
    def observe(self, *args, **kwargs) -> None:
        pass


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> LoadedModel:
    from ml.predict import TextClassifier

    export = build_export(tmp_path_factory.mktemp("isolation") / "export")
    return LoadedModel(
        TextClassifier.from_dir(export), name="m", version="1", source=str(export), requested=""
    )


def _replica() -> Classifier:
    """The deployment's class without Serve's replica machinery (its __init__ needs a Ray actor)."""
    replica = object.__new__(Classifier.func_or_class.__mro__[1])
    replica._threads = 1
    replica._batch_size = _Metric()
    return replica


def test_a_poisoned_text_fails_alone(model, monkeypatch):
    from types import SimpleNamespace

    from ray import serve

    # the batch queue reads max_ongoing_requests from the replica context, for a warning only
    context = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=64))
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)
    texts = [f"Stocks and markets, story number {i}." for i in range(11)]
    poison = "a lone surrogate \ud800 no tokenizer reads"
    with pytest.raises(TypeError):  # the real tokenizer: this is the failure being isolated
        model.classifier.predict_proba([poison])

    async def run():
        replica = _replica()
        replica._classify.set_max_batch_size(16)
        replica._classify.set_batch_wait_timeout_s(0.5)  # all 12 land in one batch
        items = [*texts[:5], poison, *texts[5:]]
        return await asyncio.gather(*(replica._classify((text, model)) for text in items))

    results = asyncio.run(run())
    failed = [i for i, r in enumerate(results) if isinstance(r, _ItemFailed)]
    assert failed == [5]
    expected = model.classifier.predict_proba(texts)
    served = np.stack([r for r in results if not isinstance(r, _ItemFailed)])
    np.testing.assert_allclose(served, expected, atol=1e-5)
