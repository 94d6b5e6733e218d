"""The shadow and canary judgements of a staged rollout, from hand-built prediction logs."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest
from pydantic import ValidationError

from ml.rollout_report import (
    PIPELINE_REQUEST_PREFIX,
    CanaryPolicy,
    ShadowPolicy,
    canary_comparison,
    percentiles,
    render_html,
    shadow_comparison,
    wilson_interval,
)

CHAMPION = ("news", "3")
CANDIDATE = ("news", "4")
LABELS = ["world", "sports", "business", "tech"]
TRAINING = {label: 250 for label in LABELS}
T0 = datetime(2025, 5, 1, 12, tzinfo=UTC)


def row(request_id, item, role, version, label, *, latency=20.0, error=None, score=0.9, text=None):
    return {
        "ts": T0 + timedelta(milliseconds=len(request_id) + (item or 0)),
        "request_id": request_id,
        "item": item,
        "text": text if text is not None else f"text {request_id}/{item}",
        "label": None if error else label,
        "score": None if error else score,
        "scores": None if error else json.dumps({label: score}),
        "model_name": "news",
        "model_version": version,
        "model_run_id": f"run-{version}",
        "role": role,
        "latency_ms": latency,
        "error": error,
        "writer_id": "w1",
    }


def shadow_log(n=200, shadow_label=None, shadow_error=None, per_request=4):
    """n texts answered by the champion (v3) and mirrored to the shadow (v4); shadow_label(i,
    champion_label) gives the shadow's answer, shadow_error(i) its error."""
    rows = []
    for i in range(n):
        rid, item = f"r{i // per_request}", i % per_request
        label = LABELS[i % 4]
        rows.append(row(rid, item, "champion", "3", label))
        s_label = shadow_label(i, label) if shadow_label else label
        error = shadow_error(i) if shadow_error else None
        rows.append(row(rid, item, "shadow", "4", s_label, latency=60.0, error=error, score=0.8))
    return pd.DataFrame(rows)


def shadow(frame, policy=None, training=TRAINING):
    return shadow_comparison(
        frame,
        champion=CHAMPION,
        candidate=CANDIDATE,
        training_labels=training,
        policy=policy or ShadowPolicy(),
    )


def canary_log(n_champion=300, n_canary=60, canary_latency=20.0, canary_fails=lambda i: False):
    rows = [row(f"c{i}", 0, "champion", "3", LABELS[i % 4], latency=18.0 + i % 5) for i in range(n_champion)]
    for i in range(n_canary):
        rid = f"k{i}"
        if canary_fails(i):
            rows.append(row(rid, 0, "canary", "4", None, latency=None, error="RuntimeError: boom"))
            rows.append(row(rid, 0, "champion", "3", LABELS[i % 4], latency=19.0))  # the fallback
        else:
            rows.append(row(rid, 0, "canary", "4", LABELS[i % 4], latency=canary_latency + i % 5))
    return pd.DataFrame(rows)


def canary(frame, policy=None):
    return canary_comparison(frame, champion=CHAMPION, candidate=CANDIDATE, policy=policy or CanaryPolicy())


def check(report, name):
    return next(c for c in report["checks"] if c["name"] == name)


def test_agreeing_candidate_is_promoted():
    report = shadow(shadow_log())
    assert report["decision"] == "promote" and report["passed"] is True
    assert report["texts"] == 200 and report["shadow_rows"] == 200 and report["champion_rows"] == 200
    assert report["agreement"] == 1.0 and report["agreement_ci95"][0] > 0.95
    assert report["confusion"] == []
    assert report["label_distribution"]["shadow"] == {
        "business": 0.25,
        "sports": 0.25,
        "tech": 0.25,
        "world": 0.25,
    }
    assert report["label_shift"] == {"champion_tvd": 0.0, "shadow_tvd": 0.0}
    assert report["error_rate"] == {"champion": 0.0, "shadow": 0.0}
    assert report["confidence"]["shadow"]["histogram"][8] == 200  # 0.8 falls in [0.8, 0.9)
    assert report["latency_ms"]["shadow"]["p95"] == 60.0 and "informational" in report["latency_ms"]["note"]
    assert {c["name"] for c in report["checks"]} == {"agreement", "error_rate_excess", "label_shift_excess"}
    json.dumps(report, allow_nan=False)


def test_shuffled_candidate_is_stopped_on_agreement():
    # the shadow answers the next label over on three texts in four: agreement 0.25
    report = shadow(shadow_log(n=312, shadow_label=lambda i, lab: lab if i % 4 == 0 else LABELS[(i + 1) % 4]))
    assert report["decision"] == "stop" and report["passed"] is False
    assert report["agreement"] == pytest.approx(0.25, abs=0.01)
    assert report["reason"].startswith("agreement 0.25 < 0.70 on 312 texts")
    assert not check(report, "agreement")["passed"]
    assert len(report["confusion"]) == 3 and all(c["count"] == 78 for c in report["confusion"])
    hi = report["agreement_ci95"][1]
    assert hi < 0.35


def test_candidate_agreeing_but_collapsing_to_one_label_is_stopped_on_label_shift():
    # agrees on 3 texts in 4 (above 0.7) but answers "world" on every disagreement
    report = shadow(shadow_log(shadow_label=lambda i, lab: "world" if i % 4 == 1 else lab))
    assert check(report, "agreement")["passed"]
    shift = check(report, "label_shift_excess")
    assert not shift["passed"] and shift["value"] == pytest.approx(0.25)
    assert report["decision"] == "stop" and "label TVD" in report["reason"]


def test_traffic_shift_moves_both_models_and_is_not_the_candidates_fault():
    frame = shadow_log()
    far = {"world": 0.97, "sports": 0.01, "business": 0.01, "tech": 0.01}
    report = shadow(frame, training=far)
    assert report["label_shift"]["champion_tvd"] == pytest.approx(0.72)
    assert report["decision"] == "promote"
    no_labels = shadow(frame, training=None)
    assert no_labels["label_shift"] is None and no_labels["decision"] == "promote"
    assert "label_shift_excess" not in {c["name"] for c in no_labels["checks"]}


def test_erroring_shadow_is_stopped_on_error_rate():
    report = shadow(shadow_log(shadow_error=lambda i: "OOM" if i % 10 == 0 else None))
    assert report["error_rate"] == {"champion": 0.0, "shadow": 0.1}
    assert not check(report, "error_rate_excess")["passed"]
    assert report["decision"] == "stop" and "shadow error rate 0.100 > champion 0.000" in report["reason"]
    assert check(report, "agreement")["passed"]  # errors are left out of the agreement


def test_shadow_failing_whole_requests_is_stopped_though_nothing_pairs():
    # a request-level failure logs rows without item or text: they pair with no champion text
    frame = shadow_log(n=40, shadow_error=lambda i: "boom")
    frame.loc[frame["role"] == "shadow", ["item", "text"]] = None
    report = shadow(frame)
    assert report["texts"] == 0 and report["shadow_rows"] == 40 and report["agreement"] is None
    assert report["decision"] == "stop" and "shadow error rate 1.000" in report["reason"]


@pytest.mark.parametrize(("on_quiet", "passed"), [("proceed", True), ("stop", False)])
def test_too_few_texts_is_no_evidence_and_follows_on_quiet(on_quiet, passed):
    report = shadow(shadow_log(n=12), ShadowPolicy(on_quiet=on_quiet))
    assert report["decision"] == "no_evidence" and report["passed"] is passed
    assert "12 paired texts" in report["reason"] and f"on_quiet={on_quiet}" in report["reason"]


def test_pipeline_requests_are_left_out():
    frame = shadow_log(n=20)
    smoke = shadow_log(n=200, shadow_label=lambda i, lab: "tech")
    smoke["request_id"] = PIPELINE_REQUEST_PREFIX + smoke["request_id"]
    report = shadow(pd.concat([frame, smoke]), ShadowPolicy(min_decisive=10))
    assert report["texts"] == 20 and report["agreement"] == 1.0 and report["decision"] == "promote"


def test_old_rows_without_role_or_item_columns():
    frame = shadow_log(n=60)
    old = frame[frame["role"] == "champion"].drop(columns=["role", "item", "latency_ms", "error"])
    new = frame[frame["role"] == "shadow"].assign(item=None)  # pairs on (request_id, text)
    report = shadow(pd.concat([old, new]))
    assert report["texts"] == 60 and report["champion_rows"] == 60 and report["decision"] == "promote"
    assert report["latency_ms"]["champion"]["p95"] is None
    json.dumps(report, allow_nan=False)


def test_null_role_counts_as_champion_and_other_models_are_ignored():
    frame = shadow_log(n=60)
    frame.loc[frame["role"] == "champion", "role"] = None
    other = shadow_log(n=60).assign(model_name="other")
    report = shadow(pd.concat([frame, other]))
    assert report["champion_rows"] == 60 and report["shadow_rows"] == 60 and report["texts"] == 60


def test_healthy_canary_is_promoted():
    report = canary(canary_log())
    assert report["decision"] == "promote" and report["passed"] is True
    assert report["requests"] == {"champion": 300, "canary": 60} and report["fallbacks"] == 0
    assert check(report, "latency_p95")["passed"]
    json.dumps(report, allow_nan=False)


def test_slow_canary_is_rolled_back_naming_p95():
    report = canary(canary_log(canary_latency=200.0))
    assert report["decision"] == "rollback" and report["passed"] is False
    assert "canary p95 204 ms > 1.5 × champion p95 22 ms + 25 ms" in report["reason"]
    assert check(report, "latency_p95")["p_value"] < 1e-6 and "Mann-Whitney" in report["reason"]


def test_a_few_slow_canary_requests_on_a_busy_machine_are_tail_noise_not_a_rollback():
    """The case CI met: 30 canary requests from the same distribution as the champion's, three of
    them caught by a load spike, put the canary's p95 over the limit; the model is not slower."""
    spread = [90.0 + 6 * (i % 30) for i in range(300)]  # 90..264 ms, as on a loaded 2-core machine
    rows = [row(f"c{i}", 0, "champion", "3", LABELS[i % 4], latency=ms) for i, ms in enumerate(spread)]
    canary_ms = [*spread[:27], 430.0, 440.0, 450.0]
    rows += [row(f"k{i}", 0, "canary", "4", LABELS[i % 4], latency=ms) for i, ms in enumerate(canary_ms)]
    report = canary(pd.DataFrame(rows), CanaryPolicy(min_decisive=15))
    latency = check(report, "latency_p95")
    assert latency["value"] > latency["limit"]  # the p95 alone would have rolled it back
    assert latency["passed"] and latency["p_value"] >= 0.01 and "tail noise" in latency["detail"]
    assert report["decision"] == "promote"


def test_a_canary_slower_as_a_whole_is_rolled_back_on_few_requests():
    spread = [90.0 + 6 * (i % 30) for i in range(300)]
    rows = [row(f"c{i}", 0, "champion", "3", LABELS[i % 4], latency=ms) for i, ms in enumerate(spread)]
    rows += [
        row(f"k{i}", 0, "canary", "4", LABELS[i % 4], latency=ms + 300) for i, ms in enumerate(spread[:30])
    ]
    report = canary(pd.DataFrame(rows), CanaryPolicy(min_decisive=15))
    assert report["decision"] == "rollback" and check(report, "latency_p95")["p_value"] < 0.01


def test_erroring_canary_is_rolled_back_and_fallbacks_counted():
    report = canary(canary_log(n_canary=100, canary_fails=lambda i: i % 20 == 0))
    assert report["error_rate"] == {"champion": 0.0, "canary": 0.05}
    assert report["fallbacks"] == 5 and report["fallbacks_answered"] == 5
    assert report["requests"]["champion"] == 300  # fallbacks are not champion traffic
    assert report["decision"] == "rollback" and "canary error rate 0.050" in report["reason"]


@pytest.mark.parametrize(("on_quiet", "passed"), [("proceed", True), ("stop", False)])
def test_few_canary_requests_is_no_evidence(on_quiet, passed):
    report = canary(canary_log(n_canary=5, canary_latency=500.0), CanaryPolicy(on_quiet=on_quiet))
    assert report["decision"] == "no_evidence" and report["passed"] is passed
    assert "only 5 canary requests" in report["reason"]


def test_few_champion_requests_says_latency_cannot_be_compared():
    report = canary(canary_log(n_champion=3))
    assert report["decision"] == "no_evidence" and "cannot be compared" in report["reason"]


def test_policies_are_strict():
    with pytest.raises(ValidationError):
        CanaryPolicy(fraction=0)
    with pytest.raises(ValidationError):
        ShadowPolicy(min_agreemnt=0.5)
    with pytest.raises(ValidationError):
        ShadowPolicy().min_texts = 5  # type: ignore[misc]


def test_helpers():
    assert percentiles([]) == {"p50": None, "p95": None, "p99": None}
    assert percentiles([1.0, None, float("nan"), 3.0])["p50"] == 2.0
    assert wilson_interval(0, 0) is None
    lo, hi = wilson_interval(50, 100)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(0.19, abs=0.01)


HOSTILE = '<script>alert(1)</script><img src=x onerror="alert(2)">'


def test_render_html_escapes_hostile_labels():
    frame = shadow_log(shadow_label=lambda i, lab: HOSTILE if i % 2 else lab)
    frame["model_name"] = frame["model_name"].where(frame["role"] == "shadow", "news")
    report = shadow(frame, training={**TRAINING, HOSTILE: 1})
    page = render_html(report)
    assert "<script" not in page.lower() and "<img" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    assert "STOP" in page and "http" not in page.replace("http-equiv", "").replace("http://www.w3.org", "")
    canary_page = render_html(canary(canary_log(canary_latency=200.0)))
    assert "ROLLBACK" in canary_page and "<script" not in canary_page.lower()
    json.dumps(report, allow_nan=False)
