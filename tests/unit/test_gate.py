"""The Great Expectations suite on in-memory batches: each bad input fails the named expectation."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from ml.settings import Settings
from ml.validate import DataGate, resolve_allowed_labels

LABELS = ["Business", "Sci_Tech", "Sports", "World"]


@pytest.fixture(scope="module")
def gate(tmp_path_factory: pytest.TempPathFactory) -> DataGate:
    return DataGate(Settings(), LABELS, Path(tmp_path_factory.mktemp("docs")))


def failed_types(verdict) -> set[str]:
    return {failure.split("(", 1)[0] for failure in verdict.failures}


def test_real_batch_passes_and_renders_data_docs(gate, small_batch):
    verdict = gate.check("good", small_batch)
    assert verdict.success, verdict.failures
    assert verdict.rows == 40
    assert verdict.html is not None and verdict.html.read_text().startswith("<!DOCTYPE html>")


def test_unknown_label(gate, small_batch):
    batch = small_batch.copy()
    batch.loc[:5, "label"] = "Sprots"
    verdict = gate.check("unknown-label", batch)
    assert not verdict.success
    assert "expect_column_values_to_be_in_set" in failed_types(verdict)
    assert any("Sprots" in f for f in verdict.failures)


def test_empty_and_blank_texts(gate, small_batch):
    batch = small_batch.copy()
    batch.loc[0, "text"] = ""
    batch.loc[1, "text"] = "   \t"
    verdict = gate.check("empty-texts", batch)
    assert "expect_column_values_to_not_match_regex" in failed_types(verdict)


def test_null_values(gate, small_batch):
    batch = small_batch.astype(object).copy()
    batch.loc[0, "text"] = None
    batch.loc[1, "label"] = None
    failed = failed_types(gate.check("nulls", batch))
    assert "expect_column_values_to_not_be_null" in failed


def test_all_duplicates(gate, small_batch):
    batch = pd.DataFrame({"text": [small_batch["text"].iloc[0]] * 40, "label": ["World"] * 40})
    verdict = gate.check("duplicates", batch)
    assert "expect_column_proportion_of_unique_values_to_be_between" in failed_types(verdict)


def test_huge_text(gate, small_batch):
    batch = small_batch.copy()
    batch.loc[0, "text"] = "x" * 2_000_000
    verdict = gate.check("huge", batch)
    assert "expect_column_value_lengths_to_be_between" in failed_types(verdict)
    # the failure message stays readable: the huge value is abbreviated
    assert all(len(f) < 1000 for f in verdict.failures)


@pytest.mark.parametrize("missing", ["text", "label"])
def test_missing_column(gate, small_batch, missing):
    verdict = gate.check(f"no-{missing}", small_batch.drop(columns=[missing]))
    assert not verdict.success
    assert f"expect_column_to_exist({missing}): column {missing!r} missing" in verdict.failures


def test_too_few_rows_of_a_class(gate, small_batch):
    batch = pd.concat(
        [small_batch[small_batch.label != "World"], small_batch[small_batch.label == "World"][:2]]
    )
    verdict = gate.check("thin-class", batch)
    assert "expect_column_values_to_be_between" in failed_types(verdict)


def test_header_only_batch(gate):
    verdict = gate.check("header-only", pd.DataFrame({"text": [], "label": []}, dtype=object))
    assert "expect_table_row_count_to_be_between" in failed_types(verdict)


def test_label_inference_ignores_a_typo_seen_in_one_batch(small_batch):
    typo = small_batch.copy()
    typo.loc[:9, "label"] = "Sprots"
    frames = {"a": small_batch, "b": small_batch, "c": typo}
    labels, source = resolve_allowed_labels(Settings(), frames, previous=set())
    assert labels == LABELS
    assert source == "inferred from this first snapshot"


def test_label_sources_in_order_of_precedence(small_batch):
    frames = {"a": small_batch}
    explicit = Settings(allowed_labels="World,Sports")
    assert resolve_allowed_labels(explicit, frames, {"Business"}) == (
        ["Sports", "World"],
        "CT_ALLOWED_LABELS",
    )
    assert resolve_allowed_labels(Settings(), frames, {"Business"}) == (["Business"], "earlier snapshots")


def test_an_uploaded_file_never_lands_among_the_reports(tmp_path):
    """quarantine/<ds>/<batch>/_validation/ is served to Airflow users as reports: an uploader's
    raw/<ds>/<batch>/_validation/x.html is moved beside the batch's other files, not there."""
    from ml.settings import Settings
    from ml.validate import BatchVerdict, quarantine_batch

    class Store:  # the three ObjectStore calls quarantine_batch makes, in memory
        bucket = "ct-data"

        def __init__(self) -> None:
            self.objects: dict[str, bytes] = {}

        def put_json(self, key, data) -> None:
            self.objects[key] = b"json"

        def put_file(self, key, path, content_type=None) -> None:
            self.objects[key] = b"html"

        def move(self, src, dst) -> None:
            self.objects[dst] = self.objects.pop(src)

    settings = Settings(dataset="news")
    store = Store()
    raw = "raw/news/b1"
    uploaded = [f"{raw}/part.csv", f"{raw}/_validation/x.html", f"{raw}/_validation/s1.json"]
    store.objects.update({key: b"upload" for key in uploaded})
    manifest = {"snapshot_id": "s1", "objects": [{"key": key, "batch_id": "b1"} for key in uploaded]}
    verdict = BatchVerdict(batch_id="b1", rows=3, success=False, failures=["bad"], result={}, html=None)
    quarantine_batch(store, settings, manifest, verdict, "reports/validation/s1/data_docs", tmp_path)

    reports = {k: v for k, v in store.objects.items() if "/_validation/" in k and "_uploaded" not in k}
    assert reports == {"quarantine/news/b1/_validation/s1.json": b"json"}  # ours, not overwritten
    assert store.objects["quarantine/news/b1/_uploaded/_validation/x.html"] == b"upload"  # kept
    assert store.objects["quarantine/news/b1/_uploaded/_validation/s1.json"] == b"upload"
    assert store.objects["quarantine/news/b1/part.csv"] == b"upload"
