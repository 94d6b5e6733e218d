"""Extract + validate against a real S3 endpoint: quarantine, idempotency, nothing lost."""

from __future__ import annotations

import hashlib
import io
import json
from datetime import UTC, datetime

import pandas as pd
import pytest

from ml.extract import extract_snapshot, load_manifests
from ml.seed import seed_raw
from ml.validate import NoValidDataError, validate_snapshot
from tests.conftest import AGNEWS

pytestmark = pytest.mark.integration

CUTOFF = datetime(2026, 11, 21, tzinfo=UTC)


def bad_batches(agnews: pd.DataFrame) -> dict[str, tuple[str, bytes, str]]:
    """batch id -> (file name, bytes, text the quarantine reason must contain)."""
    rows = agnews.groupby("label", group_keys=False).head(8).reset_index(drop=True)

    def csv(frame: pd.DataFrame) -> bytes:
        return frame.to_csv(index=False).encode()

    unknown = rows.copy()
    unknown.loc[:6, "label"] = "Sprots"
    blank = rows.copy()
    blank.loc[:3, "text"] = ""
    huge = rows.copy()
    huge.loc[0, "text"] = "x" * 3_000_000
    return {
        "2026-11-18_missing-column": (
            "part.csv",
            csv(rows.rename(columns={"label": "category"})),
            "column 'label' missing",
        ),
        "2026-11-18_empty-file": ("part.csv", b"", "empty file"),
        "2026-11-18_not-utf8": ("part.csv", csv(rows)[:200] + b"\xe9t\xe9\n", "not valid UTF-8"),
        "2026-11-18_malformed-csv": ("part.csv", b"text,label\nhello,World,extra\n", "expected 2 fields"),
        "2026-11-18_malformed-json": (
            "part.jsonl",
            b'{"text": "a", "label": "World"}\n{"text": \n',
            "invalid JSON",
        ),
        "2026-11-18_unknown-label": ("part.csv", csv(unknown), "Sprots"),
        "2026-11-18_empty-texts": ("part.csv", csv(blank), "expect_column_values_to_not_match_regex"),
        "2026-11-18_all-duplicates": (
            "part.csv",
            csv(pd.DataFrame({"text": ["same text"] * 30, "label": ["World"] * 30})),
            "expect_column_proportion_of_unique_values_to_be_between",
        ),
        "2026-11-18_huge-text": ("part.csv", csv(huge), "expect_column_value_lengths_to_be_between"),
    }


def test_bad_batches_are_quarantined_with_reports_and_good_ones_kept(settings, store, agnews):
    good = seed_raw(settings, AGNEWS, batches=3, rows=240, end=CUTOFF.date().replace(day=20), store=store)
    bad = bad_batches(agnews)
    originals = {}
    for batch_id, (name, data, _) in bad.items():
        key = f"raw/{settings.dataset}/{batch_id}/{name}"
        store.put_bytes(key, data)
        originals[batch_id] = hashlib.sha256(data).hexdigest()

    manifest = extract_snapshot(settings, run_id="run-1", cutoff=CUTOFF, store=store)
    assert manifest is not None
    assert len(manifest["batches"]) == 3 + len(bad)
    assert {o["key"] for o in manifest["objects"]} >= set(good)
    assert all(o["sha256"] and o["etag"] for o in manifest["objects"])

    summary = validate_snapshot(settings, manifest["snapshot_id"], store=store)

    assert sorted(summary["accepted_batches"]) == ["2026-11-18", "2026-11-19", "2026-11-20"]
    assert summary["labels"] == ["Business", "Sci_Tech", "Sports", "World"]
    quarantined = {q["batch_id"]: q for q in summary["quarantined"]}
    assert set(quarantined) == set(bad)
    for batch_id, (name, _, reason) in bad.items():
        entry = quarantined[batch_id]
        assert any(reason in r for r in entry["reasons"]), (batch_id, entry["reasons"])
        # moved, not deleted: gone from raw/, byte-identical in quarantine/, with its report
        assert not store.exists(f"raw/{settings.dataset}/{batch_id}/{name}")
        moved = store.get_bytes(f"quarantine/{settings.dataset}/{batch_id}/{name}")
        assert hashlib.sha256(moved).hexdigest() == originals[batch_id]
        report = store.get_json(entry["report"])
        assert report["reasons"] == entry["reasons"]
    # parsed batches also get their Data Docs page next to the report
    assert store.get_bytes(quarantined["2026-11-18_unknown-label"]["report_html"]).startswith(
        b"<!DOCTYPE html>"
    )
    assert store.exists(f"reports/validation/{manifest['snapshot_id']}/data_docs/index.html")

    validated = pd.read_parquet(io.BytesIO(store.get_bytes(summary["validated_key"])))
    assert len(validated) == summary["rows_accepted"] == 240
    assert set(validated["label"]) == set(summary["labels"])
    # the good raw batches stay where they were
    assert all(store.exists(key) for key in good)
    assert store.get_json(f"snapshots/{manifest['snapshot_id']}/validation.json") == json.loads(
        json.dumps(summary)
    )


def test_extract_is_idempotent_and_skips_when_nothing_is_new(settings, store):
    seed_raw(settings, AGNEWS, batches=2, rows=80, end=CUTOFF.date().replace(day=20), store=store)

    first = extract_snapshot(settings, run_id="run-a", cutoff=CUTOFF, store=store)
    retry = extract_snapshot(settings, run_id="run-a", cutoff=CUTOFF, store=store)
    assert retry["snapshot_id"] == first["snapshot_id"]
    assert len(load_manifests(store, settings)) == 1

    # another run finds nothing new
    assert extract_snapshot(settings, run_id="run-b", cutoff=CUTOFF, store=store) is None

    # a batch dated after the cutoff waits for its own run, then is the only thing taken
    store.put_bytes(f"raw/{settings.dataset}/2026-11-21/part.csv", b"text,label\nhi there,World\n")
    assert extract_snapshot(settings, run_id="run-c", cutoff=CUTOFF, store=store) is None
    later = extract_snapshot(settings, run_id="run-d", cutoff=CUTOFF.replace(day=22), store=store)
    assert [b["batch_id"] for b in later["batches"]] == ["2026-11-21"]

    # after the gate moved data away, a retry of the same run still returns its snapshot
    with pytest.raises(NoValidDataError):
        validate_snapshot(settings, later["snapshot_id"], store=store)
    again = extract_snapshot(settings, run_id="run-d", cutoff=CUTOFF.replace(day=22), store=store)
    assert again["snapshot_id"] == later["snapshot_id"]


def test_all_bad_batches_fail_the_gate_with_every_reason(settings, store):
    store.put_bytes(f"raw/{settings.dataset}/2026-11-19/a.csv", b"body,label\nhello,World\n")
    store.put_bytes(f"raw/{settings.dataset}/2026-11-20/a.csv", b"")
    manifest = extract_snapshot(settings, run_id="run-x", cutoff=CUTOFF, store=store)

    with pytest.raises(NoValidDataError) as err:
        validate_snapshot(settings, manifest["snapshot_id"], store=store)

    message = str(err.value)
    assert "validation quarantined 2/2 batches" in message
    assert "2026-11-19: expect_column_to_exist(text): column 'text' missing" in message
    assert "2026-11-20" in message and "empty file" in message
    assert store.exists(f"quarantine/{settings.dataset}/2026-11-19/a.csv")
    assert store.exists(f"quarantine/{settings.dataset}/2026-11-20/a.csv")
    assert list(store.list(f"raw/{settings.dataset}/")) == []
    summary = store.get_json(f"snapshots/{manifest['snapshot_id']}/validation.json")
    assert summary["validated_key"] is None and summary["rows_accepted"] == 0
