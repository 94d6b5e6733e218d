"""Metrics on hand-made labels, the promotion gate's rules, and the confusion-matrix image."""

from __future__ import annotations

import struct

import pytest

from ml.evaluate import classification_report, confusion_matrix_figure, figure_png, gate_decision, metric_safe

LABELS = ["a", "b", "c"]
# a: 2 of 3 right (one taken for b); b: 1 of 2 (one taken for c); c: 1 of 1
Y_TRUE = ["a", "a", "a", "b", "b", "c"]
Y_PRED = ["a", "a", "b", "b", "c", "c"]


def test_report_exact_values():
    report = classification_report(Y_TRUE, Y_PRED, LABELS)
    assert report["rows"] == 6
    assert report["accuracy"] == pytest.approx(4 / 6)
    # a: P 1, R 2/3 -> 0.8; b: P 1/2, R 1/2 -> 0.5; c: P 1/2, R 1 -> 2/3
    assert report["per_class_f1"] == pytest.approx({"a": 0.8, "b": 0.5, "c": 2 / 3})
    assert report["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert report["support"] == {"a": 3, "b": 2, "c": 1}
    assert report["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert report["labels"] == LABELS


def test_report_follows_the_label_order_and_counts_absent_labels():
    report = classification_report(Y_TRUE, Y_PRED, ["c", "b", "a", "d"])
    assert report["confusion_matrix"] == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 2, 0], [0, 0, 0, 0]]
    assert report["per_class_f1"]["d"] == 0.0
    assert report["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3 + 0.0) / 4)


def test_perfect_predictions():
    report = classification_report(Y_TRUE, Y_TRUE, LABELS)
    assert report["accuracy"] == 1.0
    assert report["macro_f1"] == 1.0


@pytest.mark.parametrize(
    ("y_true", "y_pred", "message"),
    [(["a", "b"], ["a"], "2 items"), ([], [], "empty")],
)
def test_report_rejects_bad_input(y_true, y_pred, message):
    with pytest.raises(ValueError, match=message):
        classification_report(y_true, y_pred, LABELS)


@pytest.mark.parametrize(
    ("case", "challenger", "champion", "floor", "tolerance", "promote", "in_reason"),
    [
        ("first model above the floor", 0.62, None, 0.5, 0.005, True, "first model"),
        ("first model at the floor", 0.5, None, 0.5, 0.005, True, "first model"),
        ("first model below the floor", 0.41, None, 0.5, 0.005, False, "below the floor"),
        ("better than the champion", 0.85, 0.80, 0.5, 0.005, True, "0.8000"),
        ("equal to the champion", 0.80, 0.80, 0.5, 0.0, True, "0.8000"),
        ("worse, within the tolerance", 0.797, 0.80, 0.5, 0.005, True, "tolerance"),
        ("worse, at the tolerance's edge", 0.795, 0.80, 0.5, 0.005, True, "tolerance"),
        ("worse, beyond the tolerance", 0.79, 0.80, 0.5, 0.005, False, "champion kept"),
        ("worse by a hair, no tolerance", 0.7999, 0.80, 0.5, 0.0, False, "champion kept"),
        ("better than the champion but below the floor", 0.45, 0.40, 0.5, 0.005, False, "below the floor"),
    ],
)
def test_gate_decision(case, challenger, champion, floor, tolerance, promote, in_reason):
    decision = gate_decision(challenger, champion, floor, tolerance)
    assert decision["promote"] is promote, (case, decision["reason"])
    assert in_reason in decision["reason"]
    assert f"{challenger:.4f}" in decision["reason"]
    if champion is not None:
        assert f"{champion:.4f}" in decision["reason"], "the reason names both scores"
    assert decision["challenger_macro_f1"] == challenger
    assert decision["champion_macro_f1"] == champion


def test_gate_rejects_a_nan_score():
    assert gate_decision(float("nan"), None, 0.0, 0.0)["promote"] is False


def test_confusion_matrix_figure_renders_png():
    report = classification_report(Y_TRUE, Y_PRED, LABELS)
    png = figure_png(confusion_matrix_figure(report["confusion_matrix"], LABELS, "test"))
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk
    assert width > 100 and height > 100


@pytest.mark.parametrize(
    ("label", "safe"), [("Sci_Tech", "Sci_Tech"), ("Sci/Tech", "Sci/Tech"), ("a+b?", "a_b_")]
)
def test_metric_safe(label, safe):
    assert metric_safe(label) == safe
