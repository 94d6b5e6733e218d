"""The training loop's micro-batches: the same count on every rank, every row once an epoch, and
length bucketing that pads less without changing which rows an epoch sees."""

from __future__ import annotations

import random

import pytest

from ml.settings import Settings
from ml.train import _batches, encode_rows


def _rows(n: int, seed: int = 0) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    return list(range(n)), [rng.randint(8, 64) for _ in range(n)]


def _padded(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


@pytest.mark.parametrize("bucketed", [False, True])
def test_an_epoch_is_steps_full_batches_covering_every_row_once(bucketed):
    rows, lengths = _rows(1600)
    batches = list(_batches(rows, 16, 100, epoch=1, seed=42, lengths=lengths if bucketed else None))
    assert len(batches) == 100 and all(len(b) == 16 for b in batches)
    assert sorted(i for b in batches for i in b) == rows


def test_short_shards_wrap_around_so_every_rank_steps_in_lockstep():
    rows, lengths = _rows(37)
    batches = list(_batches(rows, 16, 10, epoch=1, seed=42, lengths=lengths))
    assert len(batches) == 10 and all(len(b) == 16 for b in batches)
    assert set(i for b in batches for i in b) == set(rows)


def test_bucketing_pads_less_and_still_shuffles():
    rows, lengths = _rows(1600)
    plain = list(_batches(rows, 16, 100, epoch=1, seed=42))
    bucketed = list(_batches(rows, 16, 100, epoch=1, seed=42, lengths=lengths))
    assert _padded(bucketed, lengths) < 0.8 * _padded(plain, lengths)
    # batch order is shuffled: lengths do not rise through the epoch
    first_lengths = [max(lengths[i] for i in b) for b in bucketed[:50]]
    assert first_lengths != sorted(first_lengths)
    # another epoch, other batches
    assert list(_batches(rows, 16, 100, epoch=2, seed=42, lengths=lengths)) != bucketed


def test_encode_rows_tokenizes_once_truncated_and_unpadded():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(Settings().resolved_base_model())
    encoded = encode_rows(tokenizer, [("short text", 1), ("a much longer text " * 20, 0)], max_length=16)
    (short, short_label), (long, long_label) = encoded
    assert (short_label, long_label) == (1, 0)
    assert len(short["input_ids"]) < 16 and len(long["input_ids"]) == 16
    assert set(short) == {"input_ids", "token_type_ids", "attention_mask"}
    padded = tokenizer.pad([short, long], return_tensors="pt")
    assert tuple(padded["input_ids"].shape) == (2, 16)
