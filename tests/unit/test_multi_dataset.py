"""The pure logic behind the per-model drift checks and the per-dataset raw-data watch."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pandas as pd
import pytest

from ml.extract import datasets_to_watch, raw_datasets
from ml.monitor import model_dataset, production_rows, served_models
from ml.prediction_log import PIPELINE_REQUEST_PREFIX
from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "plugins"))


def _window(rows: list[tuple[str, str | None, str | None]]) -> pd.DataFrame:
    """(request id, model name, model version) per row."""
    return pd.DataFrame(
        {
            "request_id": [r[0] for r in rows],
            "text": [f"t{i}" for i in range(len(rows))],
            "model_name": [r[1] for r in rows],
            "model_version": [r[2] for r in rows],
        }
    )


def test_every_model_in_the_window_once_with_its_most_served_version():
    window = _window(
        [("a", "agnews-classifier", "1")] * 2
        + [("b", "agnews-classifier", "2")] * 5  # a rollout: v2 answered most of agnews' rows
        + [("c", "newsgroups-classifier", "3")] * 9
    )
    assert served_models(window) == [
        {"name": "newsgroups-classifier", "version": "3", "rows": 9, "model_rows": 9},
        {"name": "agnews-classifier", "version": "2", "rows": 5, "model_rows": 7},
    ]


def test_a_tie_between_versions_goes_to_the_newer_one_and_names_order_equal_traffic():
    window = _window(
        [("a", "b-classifier", "9")] * 2
        + [("b", "b-classifier", "10")] * 2
        + [("c", "a-classifier", "1")] * 4
    )
    models = served_models(window)
    assert [(m["name"], m["version"]) for m in models] == [("a-classifier", "1"), ("b-classifier", "10")]


def test_the_pipelines_own_requests_and_unnamed_rows_are_no_model():
    window = _window(
        [(f"{PIPELINE_REQUEST_PREFIX}smoke", "agnews-classifier", "4")] * 3
        + [("u1", None, None), ("u2", "", "1")]
        + [("u3", "newsgroups-classifier", "1")]
    )
    assert [m["name"] for m in served_models(production_rows(window))] == ["newsgroups-classifier"]
    assert served_models(production_rows(window.iloc[:3])) == []
    assert served_models(window.iloc[0:0]) == []


def test_the_recorded_dataset_wins_over_the_model_name():
    assert model_dataset("agnews-classifier", "agnews-v2") == ("agnews-v2", "snapshot manifest")
    assert model_dataset("newsgroups-classifier") == ("newsgroups", "model name")
    assert model_dataset("my-custom-model") == (None, "unknown")
    assert model_dataset("-classifier") == (None, "unknown")


def test_every_dataset_under_raw_unless_some_are_asked_for():
    assert datasets_to_watch(["newsgroups", "agnews"]) == ["agnews", "newsgroups"]
    # asked for: those only, also one whose folder does not exist yet (its detect says "nothing new")
    assert datasets_to_watch(["agnews", "newsgroups"], ["newsgroups", "later", "newsgroups"]) == [
        "later",
        "newsgroups",
    ]
    assert datasets_to_watch([], None) == []
    assert datasets_to_watch(["agnews", ".."], []) == ["agnews"]  # not a dataset folder: ignored


@pytest.mark.parametrize("name", ["", "a/b", "..", " /x"])
def test_an_asked_for_name_must_be_one_folder(name):
    with pytest.raises(ValueError, match="not dataset names"):
        datasets_to_watch(["agnews"], [name])


def test_raw_datasets_are_the_first_level_folders():
    listed = [
        SimpleNamespace(object_name="raw/agnews/", is_dir=True),
        SimpleNamespace(object_name="raw/newsgroups/", is_dir=True),
        SimpleNamespace(object_name="raw/stray.csv", is_dir=False),  # a file, not a dataset
    ]
    calls = []

    class Client:
        def list_objects(self, bucket, prefix, recursive):
            calls.append((bucket, prefix, recursive))
            return iter(listed)

    store = SimpleNamespace(client=Client(), bucket="ct-data")
    assert raw_datasets(store) == ["agnews", "newsgroups"]
    assert calls == [("ct-data", "raw/", False)]


def test_a_mapped_tasks_failure_names_its_stage():
    from ct_airflow.failures import failure_message

    assert failure_message("per_model.check", "boom").startswith("stage 'per_model.check' (drift check")
    assert "reports/raw_watch/<dataset>.json" in failure_message("per_dataset.record_announcement", None)
    assert "see the error above" in failure_message("group.unknown_task", None)
