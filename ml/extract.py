"""Extract: gather the raw batches a run should train on into an immutable snapshot.

A run takes every batch under ``raw/<dataset>/`` that is due by its cutoff (the end of its data
interval) and that no other run's snapshot has consumed, parses each file, and writes
``snapshots/<snapshot id>/`` (one Parquet file per batch plus ``manifest.json``).

Idempotent: the snapshot id is derived from the objects' keys and etags, and a run that
already committed a manifest gets that same snapshot back on retry, even if the data gate
has since moved some of its batches to quarantine.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pandas as pd

from ml.batches import BatchFormatError, file_format, parse_batch_file
from ml.settings import Settings
from ml.storage import RAW, SNAPSHOTS, ObjectInfo, ObjectStore

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
_DATE_BATCH = re.compile(r"^(\d{4}-\d{2}-\d{2})(?:$|[T_].*)")


@dataclass(frozen=True)
class RawBatch:
    """A batch is the folder ``raw/<dataset>/<batch_id>/``: validated and quarantined as one."""

    batch_id: str
    objects: tuple[ObjectInfo, ...]


def raw_prefix(settings: Settings) -> str:
    return f"{RAW}/{settings.dataset}/"


_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def raw_datasets(store: ObjectStore) -> list[str]:
    """The datasets under ``raw/``: its first-level folders (``raw/<dataset>/``), sorted."""
    found = store.client.list_objects(store.bucket, prefix=f"{RAW}/", recursive=False)
    return sorted(
        {o.object_name[len(RAW) + 1 :].strip("/") for o in found if o.is_dir} - {""},
    )


def datasets_to_watch(found: list[str], requested: list[str] | None = None) -> list[str]:
    """Which datasets to look at for new data: ``requested`` (an operator's choice, whether or not
    ``raw/<name>/`` exists yet) if any, else every dataset ``found`` under ``raw/``; sorted, once
    each. A requested name that is not one folder name (empty, ``a/b``, ``..``) is a ValueError; a
    found folder of that kind is skipped with a warning."""
    if requested:
        names = [str(n).strip() for n in requested]
        bad = [n for n in names if not _DATASET_NAME.match(n)]
        if bad:
            raise ValueError(f"not dataset names (one folder under raw/ each): {bad}")
        return sorted(set(names))
    names = set()
    for name in found:
        if _DATASET_NAME.match(name):
            names.add(name)
        else:
            log.warning("ignoring raw/%s/: not a dataset name", name)
    return sorted(names)


def batch_due(batch: RawBatch, cutoff: datetime) -> bool:
    """Date-named batches are due once their day has started before the cutoff; other
    batch ids once all their files were uploaded before it."""
    match = _DATE_BATCH.match(batch.batch_id)
    if match:
        day = datetime.strptime(match.group(1), "%Y-%m-%d").replace(tzinfo=UTC)
        return day < cutoff
    stamps = [o.last_modified for o in batch.objects if o.last_modified is not None]
    return bool(stamps) and max(stamps) <= cutoff


def list_raw_batches(store: ObjectStore, settings: Settings) -> list[RawBatch]:
    prefix = raw_prefix(settings)
    grouped: dict[str, list[ObjectInfo]] = defaultdict(list)
    for obj in store.list(prefix):
        rest = obj.key[len(prefix) :]
        if "/" not in rest:
            log.warning("ignoring %s: raw files belong in %s<batch id>/<file>", obj.key, prefix)
            continue
        grouped[rest.split("/", 1)[0]].append(obj)
    return [RawBatch(b, tuple(objs)) for b, objs in sorted(grouped.items())]


def load_manifests(store: ObjectStore, settings: Settings) -> list[dict[str, Any]]:
    """Manifests of every committed snapshot of this dataset."""
    manifests = []
    for obj in store.list(f"{SNAPSHOTS}/"):
        if obj.key.endswith("/manifest.json"):
            manifest = store.get_json(obj.key)
            if manifest.get("dataset") == settings.dataset:
                manifests.append(manifest)
    return manifests


def snapshot_id_for(settings: Settings, cutoff: datetime, objects: list[ObjectInfo]) -> str:
    digest = hashlib.sha256()
    for obj in sorted(objects, key=lambda o: o.key):
        digest.update(f"{obj.key}\0{obj.etag}\n".encode())
    return f"{settings.dataset}-{cutoff:%Y%m%dT%H%M%S}-{digest.hexdigest()[:10]}"


def consumed_objects(manifests: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """(key, etag) of every raw object a real run's snapshot took; dry runs consume nothing."""
    return {(o["key"], o["etag"]) for m in manifests if not m.get("dry_run") for o in m.get("objects", [])}


def pending_batches(
    settings: Settings,
    cutoff: datetime,
    store: ObjectStore | None = None,
    manifests: list[dict[str, Any]] | None = None,
) -> list[RawBatch]:
    """Batches due by ``cutoff`` with files no real run has consumed yet (only those files)."""
    store = store or ObjectStore(settings)
    manifests = load_manifests(store, settings) if manifests is None else manifests
    consumed = consumed_objects(manifests)
    batches = list_raw_batches(store, settings)
    due = [b for b in batches if batch_due(b, cutoff)]
    new = [
        RawBatch(b.batch_id, fresh)
        for b in due
        if (fresh := tuple(o for o in b.objects if (o.key, o.etag) not in consumed))
    ]
    log.info(
        "raw/%s: %d batches, %d due by %s, %d with unconsumed files",
        settings.dataset,
        len(batches),
        len(due),
        cutoff.isoformat(),
        len(new),
    )
    return new


def extract_snapshot(
    settings: Settings,
    *,
    run_id: str,
    cutoff: datetime,
    dag_id: str = "continuous_training",
    store: ObjectStore | None = None,
    dry_run: bool = False,
) -> dict[str, Any] | None:
    """Write (or find) this run's snapshot and return its manifest; None when nothing is new.

    A ``dry_run`` snapshot is marked as such: its batches stay unconsumed for the next real run,
    and no data window includes it.
    """
    store = store or ObjectStore(settings)
    cutoff = cutoff.astimezone(UTC)
    manifests = load_manifests(store, settings)

    for manifest in manifests:
        if manifest.get("run_id") == run_id and manifest.get("dag_id") == dag_id:
            log.info("run %s already committed snapshot %s; reusing it", run_id, manifest["snapshot_id"])
            return manifest

    new = pending_batches(settings, cutoff, store, manifests)
    if not new:
        return None

    objects = [o for b in new for o in b.objects]
    snapshot_id = snapshot_id_for(settings, cutoff, objects) + ("-dryrun" if dry_run else "")
    base = f"{SNAPSHOTS}/{snapshot_id}"
    entries: list[dict[str, Any]] = []
    batch_entries: list[dict[str, Any]] = []
    for batch in new:
        frames = []
        for obj in batch.objects:
            entry, frame = _read_object(store, settings, obj)
            entry["batch_id"] = batch.batch_id
            entries.append(entry)
            if frame is not None:
                frames.append(frame)
        data_key = None
        rows = 0
        if frames:
            data = pd.concat(frames, ignore_index=True)
            rows = len(data)
            data_key = f"{base}/data/{batch.batch_id}.parquet"
            store.put_bytes(data_key, _to_parquet(data), "application/vnd.apache.parquet")
        errors = [e["parse_error"] for e in entries if e["batch_id"] == batch.batch_id and e["parse_error"]]
        batch_entries.append(
            {"batch_id": batch.batch_id, "data_key": data_key, "rows": rows, "parse_errors": errors}
        )
        log.info(
            "batch %s: %d files, %d rows%s",
            batch.batch_id,
            len(batch.objects),
            rows,
            f", {len(errors)} unreadable" if errors else "",
        )

    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "snapshot_id": snapshot_id,
        "dataset": settings.dataset,
        "dag_id": dag_id,
        "run_id": run_id,
        "cutoff": cutoff.isoformat(),
        "dry_run": dry_run,
        "created_at": datetime.now(UTC).isoformat(),
        "schema": {"text_column": settings.text_column, "label_column": settings.label_column},
        "objects": entries,
        "batches": batch_entries,
        "total_rows": sum(b["rows"] for b in batch_entries),
    }
    # The manifest goes last: its presence is what marks the objects as consumed.
    store.put_json(f"{base}/manifest.json", manifest)
    log.info(
        "snapshot %s: %d batches, %d files, %d rows -> s3://%s/%s/",
        snapshot_id,
        len(new),
        len(entries),
        manifest["total_rows"],
        store.bucket,
        base,
    )
    return manifest


def _read_object(
    store: ObjectStore, settings: Settings, obj: ObjectInfo
) -> tuple[dict[str, Any], pd.DataFrame | None]:
    entry: dict[str, Any] = {
        "key": obj.key,
        "etag": obj.etag,
        "size": obj.size,
        "last_modified": obj.last_modified.isoformat() if obj.last_modified else None,
        "sha256": None,
        "format": None,
        "rows": 0,
        "columns": None,
        "parse_error": None,
    }
    if obj.size > settings.max_object_bytes:
        entry["parse_error"] = (
            f"{obj.key}: {obj.size} bytes is over CT_MAX_OBJECT_BYTES={settings.max_object_bytes}; "
            "split the batch into smaller files"
        )
        return entry, None
    data = store.get_bytes(obj.key)
    entry["sha256"] = hashlib.sha256(data).hexdigest()
    try:
        entry["format"] = file_format(obj.key)[0]
        frame = parse_batch_file(obj.key, data)
    except BatchFormatError as err:
        entry["parse_error"] = str(err)
        log.warning("unreadable raw object: %s", err)
        return entry, None
    entry["rows"] = len(frame)
    entry["columns"] = list(frame.columns)
    frame["_source_key"] = obj.key
    frame["_source_row"] = range(len(frame))
    return entry, frame


def _to_parquet(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()
