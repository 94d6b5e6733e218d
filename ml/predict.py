"""Batched inference for an exported text classifier (safetensors + tokenizer + label map).

The export directory is what training writes with ``save_pretrained``: ``config.json``,
``model.safetensors``, tokenizer files, ``label_map.json`` (``{"labels": [...]}``, class id order)
and ``training_config.json`` (``max_length``). :class:`TextClassifier` is the one inference core
for evaluation, the MLflow pyfunc model and the Ray Serve deployment, so it imports neither
MLflow nor Ray.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

LABEL_MAP_FILE = "label_map.json"
TRAINING_CONFIG_FILE = "training_config.json"
DEFAULT_MAX_LENGTH = 128

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, or the first CUDA GPU when there is one, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``dtype`` by name or value; None means float32 on CPU and float16 on CUDA."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


def read_labels(export_dir: Path) -> list[str]:
    """The class labels in class-id order, from ``label_map.json``."""
    path = export_dir / LABEL_MAP_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: an export needs {LABEL_MAP_FILE} with {{'labels': [...]}}"
        )
    labels = json.loads(path.read_text()).get("labels")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise ValueError(f"{path}: 'labels' must be a non-empty list of strings, got {labels!r}")
    return labels


def read_max_length(export_dir: Path) -> int:
    """``max_length`` from ``training_config.json``; :data:`DEFAULT_MAX_LENGTH` if absent."""
    path = export_dir / TRAINING_CONFIG_FILE
    if not path.is_file():
        return DEFAULT_MAX_LENGTH
    value = json.loads(path.read_text()).get("max_length", DEFAULT_MAX_LENGTH)
    if not isinstance(value, int) or value < 2:
        raise ValueError(f"{path}: max_length must be an integer >= 2, got {value!r}")
    return value


class TextClassifier:
    """A sequence-classification model with its tokenizer, labels and truncation length."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        labels: Sequence[str],
        max_length: int = DEFAULT_MAX_LENGTH,
    ) -> None:
        num_labels = model.config.num_labels
        if len(labels) != num_labels:
            raise ValueError(f"label map has {len(labels)} labels but the model has {num_labels} outputs")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.labels = list(labels)
        self.max_length = max_length
        self.device = next(model.parameters()).device

    @classmethod
    def from_dir(
        cls,
        export_dir: str | Path,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> TextClassifier:
        """Load an export directory; weights from safetensors only (never a pickle)."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        export_dir = Path(export_dir)
        if not (export_dir / "model.safetensors").is_file() and not any(
            export_dir.glob("model-*.safetensors")
        ):
            raise FileNotFoundError(f"{export_dir} holds no model.safetensors: not a model export")
        labels = read_labels(export_dir)
        max_length = read_max_length(export_dir)
        target = resolve_device(device)
        model = AutoModelForSequenceClassification.from_pretrained(
            export_dir, use_safetensors=True, local_files_only=True, dtype=resolve_dtype(dtype, target)
        ).to(target)
        tokenizer = AutoTokenizer.from_pretrained(export_dir, local_files_only=True)
        log.info("loaded %s on %s (%s), labels %s", export_dir, target, model.dtype, labels)
        return cls(model, tokenizer, labels, max_length)

    def predict_proba(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Class probabilities, shape ``(len(texts), len(labels))``, rows in the input order.

        Texts are sorted by token count and padded per batch, so a batch of short texts is not
        padded to the longest text of the call.
        """
        texts = _check_texts(texts)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        probs = np.empty((len(texts), len(self.labels)), dtype=np.float32)
        if not texts:
            return probs
        input_ids = self.tokenizer(
            texts,
            truncation=True,
            max_length=self.max_length,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]
        order = np.argsort([len(ids) for ids in input_ids], kind="stable")
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                batch = self._pad([input_ids[i] for i in rows])
                logits = self.model(**batch).logits
                probs[rows] = logits.float().softmax(dim=-1).cpu().numpy()
        return probs

    def predict(self, texts: Sequence[str], batch_size: int = 32) -> list[tuple[str, float]]:
        """The most likely label of each text and its probability, in the input order."""
        probs = self.predict_proba(texts, batch_size=batch_size)
        best = probs.argmax(axis=1)
        return [(self.labels[k], float(probs[i, k])) for i, k in enumerate(best)]

    def _pad(self, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
        """Pad token ids to the longest sequence of this batch, on the tokenizer's padding side."""
        width = max(len(ids) for ids in sequences)
        pad_id = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        left = self.tokenizer.padding_side == "left"
        for row, ids in enumerate(sequences):
            span = slice(width - len(ids), width) if left else slice(0, len(ids))
            input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, span] = 1
        return {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device)}


def export_base_model(
    directory: str | Path,
    labels: Sequence[str],
    max_length: int = DEFAULT_MAX_LENGTH,
    seed: int = 0,
    base_model: str | Path | None = None,
) -> Path:
    """An untrained export: the base model with a seeded random head, laid out like training's.

    Same files, same compute as a fine-tuned model, made in seconds: for tests, benchmarks and
    smoke checks of the serving path. ``base_model`` defaults to the configured base model.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if base_model is None:
        from ml.settings import Settings

        base_model = Settings().resolved_base_model()
    directory = Path(directory)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier weights" is the point here
    try:
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(
            base_model,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    model.save_pretrained(directory, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_model).save_pretrained(directory)
    (directory / LABEL_MAP_FILE).write_text(json.dumps({"labels": list(labels)}))
    (directory / TRAINING_CONFIG_FILE).write_text(json.dumps({"max_length": max_length, "epochs": 0}))
    return directory


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not a single string: wrap it in a list")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
    return texts
