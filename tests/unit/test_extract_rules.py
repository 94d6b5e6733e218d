from __future__ import annotations

from datetime import UTC, datetime

from ml.extract import RawBatch, batch_due, snapshot_id_for
from ml.settings import Settings
from ml.storage import ObjectInfo

CUTOFF = datetime(2026, 11, 21, tzinfo=UTC)


def obj(key: str, etag: str = "e", modified: datetime | None = None) -> ObjectInfo:
    return ObjectInfo(key, etag, 10, modified)


def test_dated_batches_are_due_once_their_day_started_before_the_cutoff():
    assert batch_due(RawBatch("2026-11-20", ()), CUTOFF)
    assert batch_due(RawBatch("2026-11-20_export-2", ()), CUTOFF)
    assert not batch_due(RawBatch("2026-11-21", ()), CUTOFF)  # belongs to the next daily run
    assert batch_due(RawBatch("2026-11-21", ()), datetime(2026, 11, 21, 17, tzinfo=UTC))


def test_undated_batches_are_due_when_uploaded_before_the_cutoff():
    early = datetime(2026, 11, 20, 12, tzinfo=UTC)
    late = datetime(2026, 11, 21, 1, tzinfo=UTC)
    assert batch_due(RawBatch("upload-42", (obj("k", modified=early),)), CUTOFF)
    assert not batch_due(RawBatch("upload-43", (obj("k", modified=early), obj("j", modified=late))), CUTOFF)


def test_snapshot_id_depends_on_objects_not_on_listing_order():
    settings = Settings()
    a, b = obj("raw/agnews/1/a.csv", "x"), obj("raw/agnews/1/b.csv", "y")
    first = snapshot_id_for(settings, CUTOFF, [a, b])
    assert first == snapshot_id_for(settings, CUTOFF, [b, a])
    assert first.startswith("agnews-20261121T000000-")
    assert first != snapshot_id_for(settings, CUTOFF, [a, obj("raw/agnews/1/b.csv", "changed")])
