"""Judge a staged rollout from the prediction log: the shadow stage and the canary stage.

In the **shadow** stage the candidate answers a mirrored copy of live traffic that no client sees;
:func:`shadow_comparison` pairs its answers with the champion's on the same texts and judges
agreement, error rate and label shift. In the **canary** stage it answers a fraction of live
requests; :func:`canary_comparison` compares the two models request by request (error rate, p95
latency). Both return a JSON-serialisable report with ``checks``, a ``decision`` and a ``reason``
in numbers; :func:`render_html` turns either into one self-contained page (no script, every value
escaped: labels and texts are user input).

Pure: pandas and numpy only; reading the log and acting on the decision is the caller's job.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

# Same value as ml.prediction_log.PIPELINE_REQUEST_PREFIX (that module pulls in S3 clients).
PIPELINE_REQUEST_PREFIX = "ct-pipeline-"
REQUIRED_COLUMNS = ("request_id", "model_name", "model_version", "label")
SHADOW_LATENCY_NOTE = (
    "shadow latency is measured at low CPU priority beside the champion: informational, not judged"
)


class ShadowPolicy(BaseModel):
    """When a shadow candidate may go on to the canary stage."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    min_texts: int = Field(200, ge=1)  # paired texts shadow_check waits for
    max_minutes: float = Field(10, gt=0)
    min_decisive: int = Field(30, ge=1)
    min_agreement: float = Field(0.7, ge=0, le=1)
    max_error_rate_excess: float = Field(0.01, ge=0)
    max_label_shift_excess: float = Field(0.15, ge=0)
    on_quiet: Literal["proceed", "stop"] = "proceed"


class CanaryPolicy(BaseModel):
    """When a canary may become the champion."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    fraction: float = Field(0.1, gt=0, le=1)
    min_requests: int = Field(100, ge=1)  # canary requests canary_check waits for
    max_minutes: float = Field(10, gt=0)
    min_decisive: int = Field(20, ge=1)
    max_error_rate_excess: float = Field(0.01, ge=0)
    max_latency_ratio: float = Field(1.5, gt=0)
    latency_slack_ms: float = Field(25.0, ge=0)
    # a p95 over the limit rolls back only when the canary is slower as a whole, not by a few
    # outliers: one-sided Mann-Whitney U on the request latencies, p below this
    latency_alpha: float = Field(0.01, gt=0, lt=1)
    on_quiet: Literal["proceed", "stop"] = "proceed"


def _num(value: Any, digits: int = 6) -> float | None:
    """A plain float for JSON (None for None/NaN/inf)."""
    if value is None or value is pd.NA:
        return None
    value = float(value)
    return round(value, digits) if math.isfinite(value) else None


def percentiles(values: Any, qs: tuple[int, ...] = (50, 95, 99)) -> dict[str, float | None]:
    """{"p50": …, "p95": …, "p99": …} of the non-null values (None each when there are none)."""
    arr = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").dropna().to_numpy(float)
    if arr.size == 0:
        return {f"p{q}": None for q in qs}
    return {f"p{q}": _num(v, 3) for q, v in zip(qs, np.percentile(arr, qs), strict=True)}


def wilson_interval(successes: int, n: int, z: float = 1.96) -> list[float] | None:
    """The Wilson score interval [lo, hi] of a rate (95 % by default); None when n == 0."""
    if n <= 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [_num(max(0.0, centre - half)), _num(min(1.0, centre + half))]


def _prepare(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows with every optional column present, old rows' nulls read as the service meant them
    (no role = champion), and the pipeline's own requests left out; in log order."""
    missing = [c for c in REQUIRED_COLUMNS if c not in rows.columns]
    if missing:
        raise ValueError(f"prediction log rows lack the columns {missing}: read them with ml.prediction_log")
    frame = rows.copy()
    for column in ("ts", "item", "text", "score", "role", "latency_ms", "error"):
        if column not in frame.columns:
            frame[column] = None
    frame["request_id"] = frame["request_id"].astype(str)
    frame["model_name"] = frame["model_name"].astype(str)
    frame["model_version"] = frame["model_version"].astype(str)
    frame["role"] = frame["role"].astype(object).where(frame["role"].notna(), "champion")
    frame["failed"] = frame["error"].notna()
    frame["score"] = pd.to_numeric(frame["score"], errors="coerce")
    frame["latency_ms"] = pd.to_numeric(frame["latency_ms"], errors="coerce")
    frame = frame[~frame["request_id"].str.startswith(PIPELINE_REQUEST_PREFIX)]
    if frame["ts"].notna().any():
        frame = frame.sort_values("ts", kind="stable", na_position="last")
    return frame.reset_index(drop=True)


def _side(frame: pd.DataFrame, roles: tuple[str, ...], model: tuple[str, str]) -> pd.DataFrame:
    name, version = model
    mask = frame["role"].isin(roles) & (frame["model_name"] == name) & (frame["model_version"] == version)
    return frame[mask]


def _text_keys(side: pd.DataFrame) -> pd.Series:
    """(request_id, item), or (request_id, text) for old rows without an item, as one string."""
    items = pd.to_numeric(side["item"], errors="coerce")
    keys = [
        f"{rid}\x1fi{int(item)}" if not math.isnan(item) else f"{rid}\x1ft{text}"
        for rid, item, text in zip(side["request_id"], items.astype(float), side["text"], strict=True)
    ]
    return pd.Series(keys, index=side.index, dtype=object)


def _requests(side: pd.DataFrame) -> pd.DataFrame:
    """One row per request: errored if any text failed, latency the first one logged."""
    if side.empty:
        return pd.DataFrame({"failed": pd.Series(dtype=bool), "latency_ms": pd.Series(dtype=float)})
    grouped = side.groupby("request_id", sort=False)
    return pd.DataFrame({"failed": grouped["failed"].any(), "latency_ms": grouped["latency_ms"].first()})


def _latency(requests: pd.DataFrame) -> dict[str, Any]:
    return {**percentiles(requests["latency_ms"]), "requests": int(requests["latency_ms"].notna().sum())}


def _distribution(labels: Any) -> dict[str, float]:
    counts = pd.Series(labels, dtype=object).dropna().astype(str).value_counts()
    total = counts.sum()
    return {str(k): float(v) / total for k, v in counts.items()} if total else {}


def _normalize_training(training_labels: dict[str, float] | None) -> dict[str, float] | None:
    if not training_labels:
        return None
    if any(not math.isfinite(float(v)) or float(v) < 0 for v in training_labels.values()):
        raise ValueError(f"training_labels must be counts or shares >= 0, got {training_labels!r}")
    total = sum(float(v) for v in training_labels.values())
    return {str(k): float(v) / total for k, v in training_labels.items()} if total > 0 else None


def _tvd(p: dict[str, float], q: dict[str, float]) -> float:
    """Total-variation distance: half the L1 distance, 0 (same) to 1 (disjoint)."""
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


def _confidence(scores: pd.Series) -> dict[str, Any]:
    arr = scores.dropna().to_numpy(float)
    if arr.size == 0:
        return {"n": 0, "mean": None, "p10": None, "p50": None, "p90": None, "histogram": [0] * 10}
    p10, p50, p90 = np.percentile(arr, [10, 50, 90])
    hist, _ = np.histogram(np.clip(arr, 0.0, 1.0), bins=10, range=(0.0, 1.0))
    return {
        "n": int(arr.size),
        "mean": _num(arr.mean()),
        "p10": _num(p10),
        "p50": _num(p50),
        "p90": _num(p90),
        "histogram": [int(c) for c in hist],
    }


def _rate(failed: pd.Series) -> float | None:
    return _num(failed.mean()) if len(failed) else None


def _check(name: str, value: Any, limit: Any, passed: bool, detail: str) -> dict[str, Any]:
    return {"name": name, "value": value, "limit": limit, "passed": bool(passed), "detail": detail}


def _error_check(stage: str, candidate: float | None, champion: float | None, excess: float, n: int):
    baseline = champion or 0.0  # no champion rows: hold the candidate to an error-free baseline
    value = _num((candidate or 0.0) - baseline)
    passed = value is not None and value <= excess + 1e-12
    detail = (
        f"{stage} error rate {candidate or 0.0:.3f} {'<=' if passed else '>'} champion "
        f"{baseline:.3f} + {excess:.3f} on {n} {'rows' if stage == 'shadow' else 'requests'}"
    )
    return _check("error_rate_excess", value, excess, passed, detail)


def _decide(
    report: dict[str, Any], *, enough: bool, quiet_reason: str, policy: ShadowPolicy | CanaryPolicy
) -> dict[str, Any]:
    """Fill decision, passed and reason: a failed check decides once there is evidence (an
    erroring candidate is stopped even on few pairs); otherwise too little evidence follows on_quiet."""
    failed = [c for c in report["checks"] if not c["passed"]]
    bad = "stop" if report["stage"] == "shadow" else "rollback"
    errors_decisive = any(c["name"] == "error_rate_excess" and c.get("decisive") for c in failed)
    for c in report["checks"]:
        c.pop("decisive", None)
    if failed and (enough or errors_decisive):
        decision, reason = bad, "; ".join(c["detail"] for c in failed)
    elif not enough:
        follows = "the rollout proceeds" if policy.on_quiet == "proceed" else "the rollout stops"
        decision, reason = "no_evidence", f"{quiet_reason}; on_quiet={policy.on_quiet}, so {follows}"
    else:
        decision, reason = "promote", "; ".join(c["detail"] for c in report["checks"])
    passed = decision == "promote" or (decision == "no_evidence" and policy.on_quiet == "proceed")
    return {**report, "decision": decision, "passed": passed, "reason": reason}


def _model(model: tuple[str, str]) -> dict[str, str]:
    return {"name": str(model[0]), "version": str(model[1])}


def shadow_comparison(
    rows: pd.DataFrame,
    *,
    champion: tuple[str, str],
    candidate: tuple[str, str],
    training_labels: dict[str, float] | None,
    policy: ShadowPolicy,
) -> dict[str, Any]:
    """Compare the shadow candidate's answers with the champion's on the same texts.

    Judged: agreement (texts both models answered), error rate (all rows of each side) and, when
    ``training_labels`` are given, how much further the shadow's predicted labels are from them
    than the champion's (total-variation distance; a shift of the traffic itself moves both).
    Label distributions and confidence are taken over the texts both answered, so the two sides
    describe the same traffic. A failing error rate on ``min_decisive`` shadow rows stops the
    candidate even when too few texts pair (a shadow that fails on everything pairs nothing).
    """
    frame = _prepare(rows)
    champ = _side(frame, ("champion",), champion)
    shadow = _side(frame, ("shadow",), candidate)
    left = champ.assign(key=_text_keys(champ)).drop_duplicates("key")
    right = shadow.assign(key=_text_keys(shadow)).drop_duplicates("key")
    cols = ["key", "label", "score", "failed"]
    paired = left[cols].merge(right[cols], on="key", suffixes=("_c", "_s"))
    both = ~paired["failed_c"].astype(bool) & ~paired["failed_s"].astype(bool)
    answered = paired[both & paired["label_c"].notna() & paired["label_s"].notna()]
    agree = int((answered["label_c"].astype(str) == answered["label_s"].astype(str)).sum())
    agreement = _num(agree / len(answered)) if len(answered) else None

    differ = answered[answered["label_c"].astype(str) != answered["label_s"].astype(str)]
    confusion = (
        differ.groupby([differ["label_c"].astype(str), differ["label_s"].astype(str)]).size()
        if len(differ)
        else pd.Series(dtype=int)
    )
    confusion = sorted(((int(n), str(c), str(s)) for (c, s), n in confusion.items()), key=lambda t: -t[0])
    training = _normalize_training(training_labels)
    dist_c, dist_s = _distribution(answered["label_c"]), _distribution(answered["label_s"])
    labels = sorted(set(dist_c) | set(dist_s) | set(training or {}))
    distribution = {
        side: {k: _num(d.get(k, 0.0)) for k in labels} if d is not None else None
        for side, d in (("training", training), ("champion", dist_c), ("shadow", dist_s))
    }
    label_shift = (
        {"champion_tvd": _num(_tvd(dist_c, training)), "shadow_tvd": _num(_tvd(dist_s, training))}
        if training and len(answered)
        else None
    )
    error_rate = {"champion": _rate(champ["failed"]), "shadow": _rate(shadow["failed"])}

    texts = len(paired)
    checks = []
    if agreement is not None:
        ok = agreement >= policy.min_agreement
        sign = ">=" if ok else "<"
        detail = f"agreement {agreement:.2f} {sign} {policy.min_agreement:.2f} on {len(answered)} texts"
        checks.append(_check("agreement", agreement, policy.min_agreement, ok, detail))
    elif texts:
        detail = f"no text of the {texts} paired was answered by both models"
        checks.append(_check("agreement", None, policy.min_agreement, False, detail))
    error = _error_check(
        "shadow", error_rate["shadow"], error_rate["champion"], policy.max_error_rate_excess, len(shadow)
    )
    checks.append({**error, "decisive": len(shadow) >= policy.min_decisive})
    if label_shift:
        excess = _num(label_shift["shadow_tvd"] - label_shift["champion_tvd"])
        ok = excess <= policy.max_label_shift_excess + 1e-12
        detail = (
            f"shadow label TVD to training {label_shift['shadow_tvd']:.2f} exceeds the champion's "
            f"{label_shift['champion_tvd']:.2f} by {excess:.2f} {'<=' if ok else '>'} "
            f"{policy.max_label_shift_excess:.2f}"
        )
        checks.append(_check("label_shift_excess", excess, policy.max_label_shift_excess, ok, detail))

    report = {
        "stage": "shadow",
        "champion": _model(champion),
        "candidate": _model(candidate),
        "policy": policy.model_dump(),
        "texts": texts,
        "compared_texts": len(answered),
        "shadow_rows": len(shadow),
        "champion_rows": len(champ),
        "agreement": agreement,
        "agreement_ci95": wilson_interval(agree, len(answered)),
        "confusion": [{"champion_label": c, "shadow_label": s, "count": n} for n, c, s in confusion[:10]],
        "confidence": {
            "champion": _confidence(answered["score_c"]),
            "shadow": _confidence(answered["score_s"]),
        },
        "label_distribution": distribution,
        "label_shift": label_shift,
        "error_rate": error_rate,
        "latency_ms": {
            "champion": _latency(_requests(champ)),
            "shadow": _latency(_requests(shadow)),
            "note": SHADOW_LATENCY_NOTE,
        },
        "checks": checks,
        "notes": [] if training else ["no training label distribution given: label shift not judged"],
    }
    quiet = f"only {texts} paired texts (< min_decisive {policy.min_decisive}): no live evidence"
    return _decide(report, enough=texts >= policy.min_decisive, quiet_reason=quiet, policy=policy)


def slower_p_value(candidate: Any, baseline: Any) -> float | None:
    """One-sided Mann-Whitney U p-value for "``candidate`` latencies are larger than
    ``baseline``'s" (None with fewer than 2 values on a side)."""
    from scipy.stats import mannwhitneyu

    a = pd.to_numeric(pd.Series(candidate, dtype=object), errors="coerce").dropna().to_numpy(float)
    b = pd.to_numeric(pd.Series(baseline, dtype=object), errors="coerce").dropna().to_numpy(float)
    if a.size < 2 or b.size < 2:
        return None
    return float(mannwhitneyu(a, b, alternative="greater").pvalue)


def _latency_check(champion_ms: Any, canary_ms: Any, c95: float, k95: float, policy: CanaryPolicy):
    """p95 within ratio × champion + slack; a p95 over it fails only when the canary's latencies are
    significantly larger overall (a p95 of a few dozen requests moves with one or two outliers
    on a busy machine, while a slow model shifts the whole distribution)."""
    limit = _num(policy.max_latency_ratio * c95 + policy.latency_slack_ms, 3)
    within = k95 <= limit
    p_value = None if within else slower_p_value(canary_ms, champion_ms)
    significant = p_value is None or p_value < policy.latency_alpha
    passed = within or not significant
    detail = (
        f"canary p95 {k95:.0f} ms {'<=' if within else '>'} {policy.max_latency_ratio:g} × champion p95 "
        f"{c95:.0f} ms + {policy.latency_slack_ms:g} ms"
    )
    if p_value is not None:
        detail += (
            f"; slower overall: Mann-Whitney p={p_value:.2g} "
            f"{'<' if significant else '>='} {policy.latency_alpha:g}"
            + ("" if significant else ", so tail noise, not a slower model")
        )
    check = _check("latency_p95", k95, limit, passed, detail)
    check["p_value"] = _num(p_value)
    return check


def canary_comparison(
    rows: pd.DataFrame,
    *,
    champion: tuple[str, str],
    candidate: tuple[str, str],
    policy: CanaryPolicy,
) -> dict[str, Any]:
    """Compare the canary's requests with the champion's: error rate and p95 latency.

    A canary request that failed was answered by the champion (a fallback); those champion
    requests are left out of the champion's side, which stays the traffic it answered first-hand.
    """
    frame = _prepare(rows)
    canary = _requests(_side(frame, ("canary",), candidate))
    champ_all = _requests(_side(frame, ("champion",), champion))
    fallback_ids = canary.index[canary["failed"]]
    champ = champ_all[~champ_all.index.isin(canary.index)]
    answered = champ_all.loc[champ_all.index.isin(fallback_ids) & ~champ_all["failed"]]
    error_rate = {"champion": _rate(champ["failed"]), "canary": _rate(canary["failed"])}
    latency = {"champion": _latency(champ), "canary": _latency(canary)}

    checks, notes = [], []
    error = _error_check(
        "canary", error_rate["canary"], error_rate["champion"], policy.max_error_rate_excess, len(canary)
    )
    checks.append({**error, "decisive": len(canary) >= policy.min_decisive})
    c95, k95 = latency["champion"]["p95"], latency["canary"]["p95"]
    if c95 is not None and k95 is not None:
        checks.append(_latency_check(champ["latency_ms"], canary["latency_ms"], c95, k95, policy))
    else:
        notes.append("no latency logged for one side: p95 latency not judged")

    report = {
        "stage": "canary",
        "champion": _model(champion),
        "candidate": _model(candidate),
        "policy": policy.model_dump(),
        "requests": {"champion": len(champ), "canary": len(canary)},
        "error_rate": error_rate,
        "latency_ms": latency,
        "fallbacks": len(fallback_ids),
        "fallbacks_answered": len(answered),
        "checks": checks,
        "notes": notes,
    }
    if len(canary) < policy.min_decisive:
        quiet = f"only {len(canary)} canary requests (< min_decisive {policy.min_decisive}): no live evidence"
    else:
        quiet = (
            f"only {len(champ)} champion requests (< min_decisive {policy.min_decisive}): "
            "the canary's latency cannot be compared with the champion's"
        )
    enough = len(canary) >= policy.min_decisive and len(champ) >= policy.min_decisive
    return _decide(report, enough=enough, quiet_reason=quiet, policy=policy)


# ---------------------------------------------------------------------------------------- HTML
DECISION_COLOURS = {"promote": "#2e7d32", "stop": "#c62828", "rollback": "#c62828", "no_evidence": "#ef6c00"}
_STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #1d2330; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 24px 0 8px; }
.decision { font-size: 32px; font-weight: 700; letter-spacing: 1px; margin: 12px 0 4px; }
.muted { color: #5f6b7a; } .pass { color: #2e7d32; } .fail { color: #c62828; }
table { border-collapse: collapse; } td.text { max-width: 420px; overflow-wrap: anywhere; }
th, td { border-bottom: 1px solid #dde3ea; padding: 5px 8px; text-align: left; vertical-align: top; }
th { background: #f3f6f9; font-weight: 600; white-space: nowrap; }
.bar { height: 10px; display: inline-block; vertical-align: middle; }
.training { background: #9aa5b1; } .champion { background: #0b57d0; } .candidate { background: #ef6c00; }
"""
_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def _e(value: Any) -> str:
    """Escaped text of ``value`` ("" for None): safe as element text and as a quoted attribute."""
    return "" if value is None else escape(str(value), quote=True)


def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    return _e(f"{value:.{digits}f}" if isinstance(value, float) else value)


def _table(head: list[str], rows: list[list[str]], table_id: str) -> str:
    """A table; ``rows`` hold already-escaped cell HTML."""
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table id="{_e(table_id)}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _bar(share: float | None, css: str) -> str:
    width = 0.0 if share is None else max(0.0, min(1.0, float(share))) * 240
    return f'<span class="bar {css}" style="width:{width:.1f}px"></span> {_f(share, 3)}'


def _histogram_svg(counts: list[int], colour: str) -> str:
    top = max(counts) or 1
    bars = "".join(
        f'<rect x="{i * 22}" y="{60 - 60 * c / top:.1f}" width="20" height="{60 * c / top:.1f}" '
        f'fill="{colour}"><title>{i / 10:.1f}–{(i + 1) / 10:.1f}: {int(c)}</title></rect>'
        for i, c in enumerate(counts)
    )
    return f'<svg xmlns="http://www.w3.org/2000/svg" width="220" height="62" role="img">{bars}</svg>'


def _shadow_sections(report: dict[str, Any]) -> list[str]:
    dist = report["label_distribution"]
    sides = [
        (s, css) for s, css in (("training", "training"), ("champion", "champion"), ("shadow", "candidate"))
    ]
    labels = sorted({k for d in dist.values() if d for k in d})
    rows = [
        [_e(label)]
        + [_bar((dist[s] or {}).get(label), css) if dist[s] is not None else "–" for s, css in sides]
        for label in labels
    ]
    shift = report["label_shift"] or {}
    conf = report["confidence"]
    conf_rows = [
        [
            _e(side),
            _f(c["mean"]),
            _f(c["p10"]),
            _f(c["p50"]),
            _f(c["p90"]),
            _f(c["n"]),
            _histogram_svg(c["histogram"], colour),
        ]
        for side, colour in (("champion", "#0b57d0"), ("shadow", "#ef6c00"))
        for c in [conf[side]]
    ]
    confusion = [
        [_e(c["champion_label"]), _e(c["shadow_label"]), _f(c["count"])] for c in report["confusion"]
    ]
    ci = report["agreement_ci95"] or [None, None]
    return [
        f"<p>{_f(report['texts'])} paired texts ({_f(report['compared_texts'])} answered by both); "
        f"agreement {_f(report['agreement'])} (95 % CI {_f(ci[0])}–{_f(ci[1])}); "
        f"rows: champion {_f(report['champion_rows'])}, shadow {_f(report['shadow_rows'])}.</p>",
        "<h2>Predicted labels</h2>",
        _table(["label", "training", "champion", "shadow"], rows, "labels"),
        f'<p class="muted">TVD to training: champion {_f(shift.get("champion_tvd"))}, '
        f"shadow {_f(shift.get('shadow_tvd'))}</p>",
        "<h2>Top disagreements</h2>",
        _table(["champion label", "shadow label", "texts"], confusion, "confusion")
        if confusion
        else '<p class="muted">None.</p>',
        "<h2>Confidence (top probability)</h2>",
        _table(["side", "mean", "p10", "p50", "p90", "texts", "histogram 0–1"], conf_rows, "confidence"),
    ]


def render_html(report: dict[str, Any]) -> str:
    """One self-contained page for a shadow or canary report: no script, nothing loaded."""
    stage, cand, champ = report["stage"], report["candidate"], report["champion"]
    decision = report["decision"]
    colour = DECISION_COLOURS.get(decision, "#5f6b7a")
    title = (
        f"{stage} check: {cand['name']} v{cand['version']} vs champion {champ['name']} v{champ['version']}"
    )
    checks = [
        [
            _e(c["name"]),
            _f(c["value"], 4),
            _f(c["limit"], 4),
            '<span class="pass">✓</span>' if c["passed"] else '<span class="fail">✗</span>',
            f'<span class="text">{_e(c["detail"])}</span>',
        ]
        for c in report["checks"]
    ]
    other = "shadow" if stage == "shadow" else "canary"
    latency = report["latency_ms"]
    lat_rows = [
        [_e(side)]
        + [_f(latency[side][p], 1) for p in ("p50", "p95", "p99")]
        + [_f(latency[side]["requests"])]
        for side in ("champion", other)
    ]
    errors = [[_e(side), _f(report["error_rate"][side], 4)] for side in ("champion", other)]
    body = [
        f"<h1>{_e(title)}</h1>",
        f'<p class="decision" id="decision" style="color:{colour}">{_e(decision.upper())}</p>',
        f'<p id="reason">{_e(report["reason"])}</p>',
        "<h2>Checks</h2>",
        _table(["check", "value", "limit", "passed", "detail"], checks, "checks"),
    ]
    body += (
        _shadow_sections(report)
        if stage == "shadow"
        else [
            f"<p>requests: champion {_f(report['requests']['champion'])}, canary "
            f"{_f(report['requests']['canary'])}; fallbacks (failed canary requests answered by the "
            f"champion): {_f(report['fallbacks'])} ({_f(report['fallbacks_answered'])} answered).</p>"
        ]
    )
    body += [
        "<h2>Latency (ms, per request)</h2>",
        _table(["side", "p50", "p95", "p99", "requests"], lat_rows, "latency"),
        f'<p class="muted">{_e(latency.get("note", ""))}</p>',
        "<h2>Error rate</h2>",
        _table(["side", "error rate"], errors, "errors"),
    ]
    body += [f'<p class="muted">{_e(note)}</p>' for note in report.get("notes", [])]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="referrer" content="no-referrer">'
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
