"""The drift check on real text: AG News against itself (no drift), against 20 Newsgroups (drift),
against itself with skewed predictions (label drift), and windows too small to judge.

Each Evidently comparison runs once per module (fixtures) and takes a few seconds on 300 rows.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from ml import drift
from ml.drift import DriftThresholds, compare, sample_reference
from tests.conftest import NEWSGROUPS

ROWS = 300  # per side: enough for the default thresholds' false-alarm rates, small enough to be quick


def agnews_stand_in_prediction(newsgroup: str) -> str:
    """Stand-in for what the served AG News model answers for a newsgroup post: it has to pick
    one of its four classes, and the plausible pick is the nearest topic."""
    if newsgroup.startswith(("comp.", "sci.")):
        return "Sci_Tech"
    if newsgroup.startswith("rec.sport."):
        return "Sports"
    if newsgroup in {"misc.forsale", "rec.autos", "rec.motorcycles"}:
        return "Business"
    return "World"  # alt.atheism, soc.religion.christian, talk.politics.*, talk.religion.misc


@pytest.fixture(scope="module")
def agnews_halves(agnews: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """AG News cut into two disjoint random halves: the training split and the served traffic."""
    shuffled = agnews.sample(frac=1.0, random_state=7).reset_index(drop=True)
    half = len(shuffled) // 2
    return shuffled.iloc[:half].reset_index(drop=True), shuffled.iloc[half:].reset_index(drop=True)


@pytest.fixture(scope="module")
def reference(agnews_halves) -> pd.DataFrame:
    return sample_reference(agnews_halves[0], ROWS, seed=0)


@pytest.fixture(scope="module")
def control(reference, agnews_halves) -> drift.DriftResult:
    """Served texts from the same source as the training data, labelled correctly."""
    current = agnews_halves[1].sample(n=ROWS, random_state=1)
    return compare(reference, current)


@pytest.fixture(scope="module")
def newsgroups(reference) -> drift.DriftResult:
    """Served texts from another source (20 Newsgroups posts), with the stand-in predictions."""
    posts = pd.read_csv(NEWSGROUPS).sample(n=ROWS, random_state=1)
    current = pd.DataFrame({"text": posts["text"], "label": posts["label"].map(agnews_stand_in_prediction)})
    return compare(reference, current)


@pytest.fixture(scope="module")
def skewed_predictions(reference, agnews_halves) -> drift.DriftResult:
    """AG News texts as in training, but the model answers "Business" for 40% of them."""
    current = agnews_halves[1].sample(n=ROWS, random_state=2).reset_index(drop=True)
    current.loc[current.index % 5 < 2, "label"] = "Business"
    return compare(reference, current)


def test_same_source_is_no_drift(control):
    assert control.verdict == drift.NO_DRIFT
    assert control.text["score"] < control.text["threshold"]
    assert not control.text["drifted"]
    assert control.label["distance"] < control.label["threshold"]
    assert not control.label["drifted"]
    assert control.drift_score < 1.0
    assert control.rows == {
        "reference": ROWS,
        "current": ROWS,
        "reference_compared": ROWS,
        "current_compared": ROWS,
    }


def test_another_source_is_text_drift(newsgroups):
    assert newsgroups.verdict == drift.DRIFT
    assert newsgroups.text["drifted"]
    assert newsgroups.text["score"] > 0.8  # posts and news items are easy to tell apart (0.94 measured)
    assert newsgroups.drift_score >= 1.0
    assert newsgroups.html and "<html" in newsgroups.html
    # Posts are far longer than AG News' one- or two-sentence items.
    length = newsgroups.descriptors["text_length"]
    assert length["drifted"]
    assert length["current_mean"] > 3 * length["reference_mean"]
    assert set(newsgroups.descriptors) == set(drift.DESCRIPTORS)


def test_skewed_predictions_are_label_drift(skewed_predictions):
    result = skewed_predictions
    assert result.verdict == drift.DRIFT
    assert result.label["drifted"]
    assert result.label["distance"] >= result.label["threshold"]
    assert not result.text["drifted"]  # the texts themselves did not change
    ref, cur = result.label["reference_distribution"], result.label["current_distribution"]
    assert ref == pytest.approx(dict.fromkeys(["Business", "Sci_Tech", "Sports", "World"], 0.25), abs=0.01)
    assert cur["Business"] > 0.5
    assert sum(cur.values()) == pytest.approx(1.0)


def test_summary_is_json_without_html(newsgroups):
    summary = newsgroups.summary()
    assert "html" not in summary
    decoded = json.loads(json.dumps(summary))
    assert decoded["verdict"] == "drift"
    assert decoded["thresholds"]["min_rows"] == DriftThresholds().min_rows
    assert decoded["label"]["current_distribution"] == newsgroups.label["current_distribution"]
    assert decoded["seconds"] > 0


@pytest.mark.parametrize(("reference_rows", "current_rows"), [(ROWS, 50), (50, ROWS)])
def test_too_few_rows_is_insufficient_data_without_evidently(
    monkeypatch, agnews_halves, reference_rows, current_rows
):
    def must_not_run(*args, **kwargs):
        raise AssertionError("Evidently ran on a window below min_rows")

    monkeypatch.setattr(drift, "_run_report", must_not_run)
    result = compare(agnews_halves[0].head(reference_rows), agnews_halves[1].head(current_rows))
    assert result.verdict == drift.INSUFFICIENT_DATA
    assert result.rows == {
        "reference": reference_rows,
        "current": current_rows,
        "reference_compared": 0,
        "current_compared": 0,
    }
    assert result.drift_score is None and result.text is None and result.label is None
    assert result.html is None
    assert result.summary()["verdict"] == "insufficient_data"


def test_blank_texts_do_not_count_towards_min_rows(monkeypatch, agnews_halves):
    monkeypatch.setattr(drift, "_run_report", lambda *a, **k: pytest.fail("Evidently ran"))
    current = agnews_halves[1].head(250).copy()
    current.loc[:99, "text"] = "   "
    current.loc[100:109, "label"] = None
    result = compare(agnews_halves[0].head(ROWS), current)
    assert result.verdict == drift.INSUFFICIENT_DATA
    assert result.rows["current"] == 140


def test_missing_column_names_it(agnews_halves):
    with pytest.raises(ValueError, match=r"current frame has no 'label' column"):
        compare(agnews_halves[0], agnews_halves[1][["text"]])


def test_sample_reference_keeps_label_shares_and_is_seeded(agnews):
    skewed = pd.concat([agnews[agnews.label == "World"], agnews[agnews.label == "Sports"].head(350)])
    sample = sample_reference(skewed, 100, seed=3)
    assert len(sample) == 100
    assert list(sample.columns) == ["text", "label"]
    assert sample.label.value_counts().to_dict() == {"World": 80, "Sports": 20}  # 1400 : 350
    assert set(sample.text) <= set(skewed.text)
    assert sample.equals(sample_reference(skewed, 100, seed=3))
    assert not sample.equals(sample_reference(skewed, 100, seed=4))


def test_sample_reference_rounds_to_exactly_n(agnews):
    three = agnews[agnews.label.isin(["World", "Sports", "Business"])]
    sample = sample_reference(three, 100)
    assert len(sample) == 100
    assert sorted(sample.label.value_counts().tolist()) == [33, 33, 34]


def test_sample_reference_of_a_small_split_is_all_of_it(small_batch):
    sample = sample_reference(small_batch, 1000)
    assert len(sample) == len(small_batch)
    assert sorted(sample.text) == sorted(small_batch.text)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("text_roc_auc", 0.5, "0.5 is chance"),
        ("label_distance", 0.0, "must be > 0"),
        ("min_rows", 1, "must be >= 2"),
        ("max_rows", 100, "below min_rows"),
    ],
)
def test_thresholds_reject_values_that_cannot_work(field, value, message):
    with pytest.raises(ValueError, match=message):
        DriftThresholds(**{field: value})


def test_the_pipelines_own_requests_are_not_traffic():
    from ml.monitor import production_rows
    from ml.prediction_log import PIPELINE_REQUEST_PREFIX

    window = pd.DataFrame(
        {"request_id": ["a1", f"{PIPELINE_REQUEST_PREFIX}x", "b2"], "text": ["u", "smoke", "v"]}
    )
    assert production_rows(window)["text"].tolist() == ["u", "v"]
