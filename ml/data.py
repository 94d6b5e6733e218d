"""Training data of a snapshot: deterministic stratified train / validation / test splits.

The splits are written once to ``snapshots/<id>/splits/{train,val,test}.parquet`` and reused,
so every consumer (trainer workers, the evaluation job, a retried run) sees the same rows, and
the champion and the challenger are scored on the same held-out test split.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import pandas as pd

from ml.settings import Settings
from ml.storage import SNAPSHOTS, ObjectStore

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitKeys:
    train: str
    val: str
    test: str
    labels: tuple[str, ...]


def split_key(snapshot_id: str, split: str) -> str:
    return f"{SNAPSHOTS}/{snapshot_id}/splits/{split}.parquet"


def stratified_split(
    frame: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, pd.DataFrame]:
    """Per-label shuffle and cut, so every split keeps the label mix (and tiny classes still
    land in train first)."""
    parts: dict[str, list[pd.DataFrame]] = {name: [] for name in SPLITS}
    for _, group in frame.groupby("label", sort=True):
        group = group.sample(frac=1.0, random_state=seed)
        n = len(group)
        n_test = round(n * test_fraction)
        n_val = round(n * val_fraction)
        if n - n_test - n_val < 1:
            n_test, n_val = 0, 0
        parts["test"].append(group.iloc[:n_test])
        parts["val"].append(group.iloc[n_test : n_test + n_val])
        parts["train"].append(group.iloc[n_test + n_val :])
    return {
        name: pd.concat(chunks).sample(frac=1.0, random_state=seed).reset_index(drop=True)
        for name, chunks in parts.items()
    }


def read_parquet(store: ObjectStore, key: str) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(store.get_bytes(key)))


def prepare_splits(
    settings: Settings,
    snapshot_id: str,
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    max_rows: int | None = None,
    store: ObjectStore | None = None,
) -> SplitKeys:
    """Write the splits of a validated snapshot (once) and return their keys and label set."""
    store = store or ObjectStore(settings)
    summary = store.get_json(f"{SNAPSHOTS}/{snapshot_id}/validation.json")
    if not summary.get("validated_key"):
        raise ValueError(f"snapshot {snapshot_id} has no validated data; run the data gate first")
    labels = tuple(summary["labels"])
    keys = SplitKeys(*(split_key(snapshot_id, s) for s in SPLITS), labels=labels)
    if all(store.exists(k) for k in (keys.train, keys.val, keys.test)):
        log.info("reusing the splits of snapshot %s", snapshot_id)
        return keys
    frame = read_parquet(store, summary["validated_key"])[["text", "label"]]
    if max_rows is not None and len(frame) > max_rows:
        frame = (
            frame.groupby("label", group_keys=False)
            .sample(frac=max_rows / len(frame), random_state=seed)
            .reset_index(drop=True)
        )
    splits = stratified_split(frame, val_fraction, test_fraction, seed)
    for name, part in splits.items():
        buffer = io.BytesIO()
        part.to_parquet(buffer, index=False)
        store.put_bytes(split_key(snapshot_id, name), buffer.getvalue(), "application/vnd.apache.parquet")
    log.info(
        "snapshot %s splits: %s",
        snapshot_id,
        ", ".join(f"{name}={len(part)}" for name, part in splits.items()),
    )
    return keys
