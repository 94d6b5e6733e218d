"""TextClassifier on a real (untrained) export: row order, batching, truncation, safetensors only."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ml.predict import DEFAULT_MAX_LENGTH, TextClassifier, export_base_model

LABELS = ["Business", "Sports", "World"]
MAX_LENGTH = 24
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


def build_export(directory: Path, labels: list[str], max_length: int, seed: int = 0) -> Path:
    return export_base_model(directory, labels, max_length=max_length, seed=seed)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    return build_export(tmp_path_factory.mktemp("export"), LABELS, MAX_LENGTH)


@pytest.fixture(scope="module")
def classifier(export_dir) -> TextClassifier:
    return TextClassifier.from_dir(export_dir, device="cpu")


@pytest.fixture(scope="module")
def texts(agnews) -> list[str]:
    rows = agnews["text"].head(13).tolist()  # 21 texts in all: not a multiple of the batch sizes below
    short = ["", "short", "stocks fell", "a goal in extra time", "rain", "election day", "ok"]
    return [*rows, *short, "word " * 400]  # with one far longer than max_length


def test_export_holds_no_pickles(export_dir):
    names = {p.name for p in export_dir.iterdir()}
    assert "model.safetensors" in names
    assert not [n for n in names if Path(n).suffix in PICKLE_SUFFIXES], names


def test_loads_without_unpickling(export_dir, monkeypatch):
    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load (pickle) must not be used to load an export")

    monkeypatch.setattr(torch, "load", refuse)
    classifier = TextClassifier.from_dir(export_dir, device="cpu")
    assert classifier.labels == LABELS
    assert classifier.max_length == MAX_LENGTH
    assert classifier.predict_proba(["still works"]).shape == (1, 3)


def test_probabilities(classifier, texts):
    probs = classifier.predict_proba(texts)
    assert probs.shape == (len(texts), len(LABELS))
    assert probs.dtype == np.float32
    assert np.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_rows_follow_the_input_order(classifier, texts):
    probs = classifier.predict_proba(texts, batch_size=8)
    order = list(range(len(texts)))
    random.Random(7).shuffle(order)
    shuffled = classifier.predict_proba([texts[i] for i in order], batch_size=8)
    np.testing.assert_allclose(shuffled, probs[order], atol=1e-5)
    # and each row is the text's own prediction, not its neighbour's
    np.testing.assert_allclose(classifier.predict_proba([texts[3]])[0], probs[3], atol=1e-5)


def test_batch_size_does_not_change_results(classifier, texts):
    one = classifier.predict_proba(texts, batch_size=1)
    many = classifier.predict_proba(texts, batch_size=32)
    np.testing.assert_allclose(one, many, atol=1e-5)


def test_batches_are_length_sorted_padded_per_batch_and_truncated(classifier, texts):
    widths: list[int] = []
    hook = classifier.model.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        classifier.predict_proba(texts, batch_size=4)
    finally:
        hook.remove()
    assert len(widths) == -(-len(texts) // 4)
    assert widths == sorted(widths), "batches go from the shortest texts to the longest"
    assert widths[0] < widths[-1], "each batch is padded to its own longest text"
    assert max(widths) == MAX_LENGTH, "texts are truncated to training_config's max_length"


def test_predict_returns_labels_and_scores(classifier, texts):
    probs = classifier.predict_proba(texts)
    predictions = classifier.predict(texts)
    assert len(predictions) == len(texts)
    for (label, score), row in zip(predictions, probs, strict=True):
        assert label == LABELS[int(row.argmax())]
        assert score == pytest.approx(float(row.max()))


def test_empty_input(classifier):
    assert classifier.predict_proba([]).shape == (0, 3)
    assert classifier.predict([]) == []


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [("one string", TypeError, "wrap it in a list"), (["ok", 3], TypeError, r"texts\[1\]")],
)
def test_bad_input(classifier, bad, error, message):
    with pytest.raises(error, match=message):
        classifier.predict_proba(bad)


def _linked_copy(src: Path, dst: Path, skip: str) -> Path:
    dst.mkdir()
    for path in src.iterdir():
        if path.name != skip:
            (dst / path.name).symlink_to(path)
    return dst


def test_label_map_must_match_the_model(export_dir, tmp_path):
    bad = _linked_copy(export_dir, tmp_path / "bad", skip="label_map.json")
    (bad / "label_map.json").write_text(json.dumps({"labels": ["only", "two"]}))
    with pytest.raises(ValueError, match="2 labels but the model has 3"):
        TextClassifier.from_dir(bad, device="cpu")


def test_missing_label_map_and_default_max_length(export_dir, tmp_path):
    no_map = _linked_copy(export_dir, tmp_path / "no_map", skip="label_map.json")
    with pytest.raises(FileNotFoundError, match=r"label_map\.json"):
        TextClassifier.from_dir(no_map, device="cpu")
    no_config = _linked_copy(export_dir, tmp_path / "no_config", skip="training_config.json")
    assert TextClassifier.from_dir(no_config, device="cpu").max_length == DEFAULT_MAX_LENGTH


def test_device_and_dtype_follow_the_hardware_unless_configured():
    """The GPU path's choices, checked where no GPU is: fp16 on CUDA, fp32 on CPU, names accepted."""
    import torch

    from ml.predict import resolve_device, resolve_dtype

    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype(None, torch.device("cuda")) == torch.float16
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype(torch.float32, torch.device("cuda")) == torch.float32
    with pytest.raises(ValueError, match="float8"):
        resolve_dtype("float8", torch.device("cpu"))
