"""Training data across snapshots (the data window) against the real S3 endpoint: earlier rows
keep their split, dry-run snapshots are neither consumed nor part of a window."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest

from ml.data import SPLITS, prepare_splits, split_key, window_snapshots
from ml.extract import extract_snapshot, pending_batches
from ml.validate import validate_snapshot

pytestmark = pytest.mark.integration

SPLIT_ARGS = {"val_fraction": 0.1, "test_fraction": 0.2, "seed": 7}


def _upload(store, settings, batch_id: str, frame: pd.DataFrame) -> None:
    buffer = io.BytesIO()
    frame.to_csv(buffer, index=False)
    store.put_bytes(f"raw/{settings.dataset}/{batch_id}/part-000.csv", buffer.getvalue(), "text/csv")


def _later() -> datetime:
    """A cutoff after every upload so far (S3 stamps have 1 s resolution)."""
    return datetime.now(UTC) + timedelta(seconds=2)


def _snapshot(settings, store, run_id: str, dry_run: bool = False) -> str:
    manifest = extract_snapshot(settings, run_id=run_id, cutoff=_later(), store=store, dry_run=dry_run)
    assert manifest is not None
    validate_snapshot(settings, manifest["snapshot_id"], store=store)
    return manifest["snapshot_id"]


def _read(store, snapshot_id: str, split: str) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(store.get_bytes(split_key(snapshot_id, split))))


def test_window_keeps_earlier_splits_and_ignores_dry_runs(settings, store, agnews):
    shuffled = agnews.sample(frac=1.0, random_state=1).reset_index(drop=True)
    first, second, third = shuffled.iloc[:200], shuffled.iloc[200:320], shuffled.iloc[320:400]

    _upload(store, settings, "batch-a", first)
    snap_a = _snapshot(settings, store, "run-a")
    splits_a = prepare_splits(settings, snap_a, data_window_days=30, store=store, **SPLIT_ARGS)
    assert splits_a.sources == (snap_a,)
    test_a = set(_read(store, snap_a, "test")["text"])

    # a dry run snapshots batch-b but does not consume it, and is in no window
    _upload(store, settings, "batch-b", second)
    snap_dry = _snapshot(settings, store, "run-dry", dry_run=True)
    assert snap_dry.endswith("-dryrun")
    assert [b.batch_id for b in pending_batches(settings, _later(), store)] == ["batch-b"]
    assert window_snapshots(store, settings, snap_dry, None) == [snap_a]

    snap_b = _snapshot(settings, store, "run-b")
    assert pending_batches(settings, _later(), store) == []
    splits_b = prepare_splits(settings, snap_b, data_window_days=30, store=store, **SPLIT_ARGS)
    assert splits_b.sources == (snap_b, snap_a)
    parts = {s: _read(store, snap_b, s) for s in SPLITS}
    assert sum(len(p) for p in parts.values()) == len(first) + len(second)
    # rows of snapshot a kept the split they had: the champion's training rows never become test rows
    assert set(parts["test"].loc[parts["test"]["_snapshot"] == snap_a, "text"]) == test_a
    assert set(parts["train"]["_snapshot"]) == {snap_a, snap_b}

    # window 0: only the new batch; the next run's window takes a and b once each (no duplicates)
    _upload(store, settings, "batch-c", third)
    snap_c = _snapshot(settings, store, "run-c")
    assert window_snapshots(store, settings, snap_c, 0) == []
    assert window_snapshots(store, settings, snap_c, None) == [snap_a, snap_b]
    splits_c = prepare_splits(settings, snap_c, data_window_days=None, store=store, **SPLIT_ARGS)
    assert splits_c.sources == (snap_c, snap_a, snap_b)
    total = sum(len(_read(store, snap_c, s)) for s in SPLITS)
    assert total == len(first) + len(second) + len(third)
    # reusing the splits (a retried job) gives the same answer
    again = prepare_splits(settings, snap_c, data_window_days=None, store=store, **SPLIT_ARGS)
    assert again == splits_c
