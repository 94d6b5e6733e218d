"""Training data of a snapshot: deterministic stratified train / validation / test splits.

The splits are written once to ``snapshots/<id>/splits/{train,val,test}.parquet`` and reused,
so every consumer (trainer workers, the evaluation job, a retried run) sees the same rows, and
the champion and the challenger are scored on the same held-out test split.

**Data window.** A run trains on its own new batches *plus* the validated data of the earlier
snapshots of the same dataset created within ``data_window_days`` (None = all of them, 0 = only
the new batches). Earlier rows keep the split they were first given (every row carries its
``_snapshot``), so a row the champion trained on never lands in the test split it is judged on.
Dry-run snapshots are never part of a window.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

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
    sources: tuple[str, ...] = ()


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


def window_snapshots(
    store: ObjectStore, settings: Settings, snapshot_id: str, days: float | None
) -> list[str]:
    """Earlier validated, non-dry-run snapshots of the dataset within ``days`` before this one."""
    from ml.extract import load_manifests

    if days is not None and days <= 0:
        return []
    manifests = {m["snapshot_id"]: m for m in load_manifests(store, settings)}
    own = manifests.get(snapshot_id)
    if own is None:
        raise FileNotFoundError(f"snapshot {snapshot_id} has no manifest")
    created = datetime.fromisoformat(own["created_at"])
    oldest = None if days is None else created - timedelta(days=days)
    earlier = []
    for sid, manifest in manifests.items():
        when = datetime.fromisoformat(manifest["created_at"])
        if sid == snapshot_id or manifest.get("dry_run") or when >= created:
            continue
        if oldest is not None and when < oldest:
            continue
        if store.exists(f"{SNAPSHOTS}/{sid}/validated.parquet"):
            earlier.append((when, sid))
    return [sid for _, sid in sorted(earlier)]


def _own_splits(
    store: ObjectStore, snapshot_id: str, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, pd.DataFrame]:
    """The rows this snapshot contributes, in the split each was given (first time: a new split)."""
    if all(store.exists(split_key(snapshot_id, s)) for s in SPLITS):
        parts = {s: read_parquet(store, split_key(snapshot_id, s)) for s in SPLITS}
        if all("_snapshot" in p.columns for p in parts.values()):
            return {s: p[p["_snapshot"] == snapshot_id] for s, p in parts.items()}
        return {s: p[["text", "label"]].assign(_snapshot=snapshot_id) for s, p in parts.items()}
    summary = store.get_json(f"{SNAPSHOTS}/{snapshot_id}/validation.json")
    frame = read_parquet(store, summary["validated_key"])[["text", "label"]]
    return {
        s: p.assign(_snapshot=snapshot_id)
        for s, p in stratified_split(frame, val_fraction, test_fraction, seed).items()
    }


def prepare_splits(
    settings: Settings,
    snapshot_id: str,
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    max_rows: int | None = None,
    data_window_days: float | None = 0,
    store: ObjectStore | None = None,
) -> SplitKeys:
    """Write the splits of a validated snapshot and its data window (once); return their keys."""
    store = store or ObjectStore(settings)
    summary = store.get_json(f"{SNAPSHOTS}/{snapshot_id}/validation.json")
    if not summary.get("validated_key"):
        raise ValueError(f"snapshot {snapshot_id} has no validated data; run the data gate first")
    keys = SplitKeys(*(split_key(snapshot_id, s) for s in SPLITS), labels=tuple(summary["labels"]))
    sources_key = f"{SNAPSHOTS}/{snapshot_id}/splits/sources.json"
    if all(store.exists(k) for k in (keys.train, keys.val, keys.test)):
        sources = store.get_json(sources_key) if store.exists(sources_key) else {"snapshots": [snapshot_id]}
        log.info("reusing the splits of snapshot %s (from %s)", snapshot_id, ", ".join(sources["snapshots"]))
        return _with_sources(keys, sources)

    frame = read_parquet(store, summary["validated_key"])[["text", "label"]]
    if max_rows is not None and len(frame) > max_rows:
        frame = (
            frame.groupby("label", group_keys=False)
            .sample(frac=max_rows / len(frame), random_state=seed)
            .reset_index(drop=True)
        )
    splits = {
        s: p.assign(_snapshot=snapshot_id)
        for s, p in stratified_split(frame, val_fraction, test_fraction, seed).items()
    }
    earlier = window_snapshots(store, settings, snapshot_id, data_window_days)
    labels = set(keys.labels)
    for sid in earlier:
        own = _own_splits(store, sid, val_fraction, test_fraction, seed)
        for s in SPLITS:
            splits[s] = pd.concat([splits[s], own[s]], ignore_index=True)
        labels |= set(store.get_json(f"{SNAPSHOTS}/{sid}/validation.json").get("labels") or [])
    for name, part in splits.items():
        part = part.sample(frac=1.0, random_state=seed).reset_index(drop=True)
        buffer = io.BytesIO()
        part.to_parquet(buffer, index=False)
        store.put_bytes(split_key(snapshot_id, name), buffer.getvalue(), "application/vnd.apache.parquet")
    rows = {name: len(part) for name, part in splits.items()}
    sources: dict[str, Any] = {
        "snapshots": [snapshot_id, *earlier],
        "data_window_days": data_window_days,
        "labels": list(keys.labels) if labels == set(keys.labels) else sorted(labels),
        "rows": rows,
    }
    store.put_json(sources_key, sources)
    log.info(
        "snapshot %s splits: %s; new batches + %d earlier snapshot(s) in the %s-day window",
        snapshot_id,
        ", ".join(f"{name}={n}" for name, n in rows.items()),
        len(earlier),
        "unbounded" if data_window_days is None else data_window_days,
    )
    return _with_sources(keys, sources)


def _with_sources(keys: SplitKeys, sources: dict[str, Any]) -> SplitKeys:
    labels = tuple(sources.get("labels") or keys.labels)
    return SplitKeys(keys.train, keys.val, keys.test, labels=labels, sources=tuple(sources["snapshots"]))
