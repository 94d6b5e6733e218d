"""Reports are built from untrusted text (issue 12): served texts in the Evidently drift report,
uploaded batches in the Great Expectations Data Docs. Hostile text must come out as text, never as
an element or a script, and the ct_reports plugin serves every report inert.

The pages are checked with html.parser, which ends a <script> at "</script" as browsers do;
tests/integration/test_report_safety.py opens them in headless Chromium too.
"""

from __future__ import annotations

import json
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import ClassVar

import pandas as pd
import pytest

from ml.drift import compare, report_html, sample_reference, script_safe_json
from ml.settings import Settings
from ml.validate import DataGate, docs_safe_result, gx_safe_name
from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "plugins"))

MARK = "pwn"  # every hostile payload creates elements whose id starts with this
HOSTILE = [
    f"</script><script id={MARK}-script>window.__pwned=1</script>",
    f"<img src=x id={MARK}-img onerror=window.__pwned=2>",
    f"<svg id={MARK}-svg onload=window.__pwned=3></svg>",
    f'"><img src=x id={MARK}-attr onerror=window.__pwned=4>',
    f"'><iframe id={MARK}-frame srcdoc=x></iframe>",
    f"<!--<script id={MARK}-comment>window.__pwned=5</script>-->",
    f"<a id={MARK}-link href=javascript:window.__pwned=6>a & b</a>",
]
LABELS = ["Business", "Sci_Tech", "Sports", "World"]


class Elements(HTMLParser):
    """The start tags of a page as the browser's tokenizer sees them, and the text of its scripts."""

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[str] = []
        self.text: list[str] = []
        self._in_script = False
        self.feed(page)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"
        if self._in_script:
            self.scripts.append("")

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data
        else:
            self.text.append(data)

    def injected(self) -> list[tuple[str, dict[str, str | None]]]:
        """Elements a payload made: one with a payload's id, or an attribute holding its code."""
        return [
            (tag, attrs)
            for tag, attrs in self.tags
            if (attrs.get("id") or "").startswith(MARK)
            or any("__pwned" in (value or "") for value in attrs.values())
        ]


# --- the drift report --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile_drift_report(agnews) -> tuple[str, list[str]]:
    """A drift check whose served window is all hostile texts (so they are the characteristic
    examples the report shows). Returns the HTML and the served texts."""
    reference = sample_reference(agnews.sample(frac=1.0, random_state=3).head(600), 250)
    texts = [f"{HOSTILE[i % len(HOSTILE)]} served text {i} about zzqx" for i in range(250)]
    result = compare(reference, pd.DataFrame({"text": texts, "label": ["World"] * 250}))
    assert result.verdict == "drift" and result.html
    return result.html, texts


def test_served_texts_in_the_drift_report_are_data_not_markup(hostile_drift_report):
    html, texts = hostile_drift_report
    page = Elements(html)
    assert not page.injected(), page.injected()
    assert {tag for tag, _ in page.tags} <= {"html", "head", "meta", "style", "script", "body", "div"}
    # Every script is the report's own: 4 in Evidently 0.7 (data, a global, the library, the call
    # that draws the dashboard); a text that ended the data script would have added some.
    assert len(page.scripts) == 4, [s[:80] for s in page.scripts]
    data = next(s for s in page.scripts if "var additional_graphs_" in s)
    assert not {"<", ">", "&"} & set(data)
    # ... and the texts are still there, verbatim once the JSON is read: the report shows them.
    info = json.loads(data.split(" = ", 1)[1].split(";\n    var additional_graphs_", 1)[0])
    shown = json.dumps(info)
    assert sum(text in shown for text in {json.dumps(t)[1:-1] for t in texts}) >= 5


def test_report_html_refuses_a_layout_it_does_not_know():
    class Snapshot:
        def get_html_str(self, as_iframe: bool) -> str:
            return "<html><script>var report = {};</script></html>"

    with pytest.raises(RuntimeError, match="cannot embed the served texts safely"):
        report_html(Snapshot())


@pytest.mark.parametrize("value", [HOSTILE, {"a&b": "<\\/script>", "n": [1.5, None, True]}, "\u2028<"])
def test_script_safe_json_keeps_the_value(value):
    raw = json.dumps(value)
    safe = script_safe_json(raw)
    assert json.loads(safe) == value
    assert not {"<", ">", "&"} & set(safe)


# --- the Data Docs of a quarantined batch ------------------------------------------------------


@pytest.fixture(scope="module")
def hostile_batch_docs(tmp_path_factory, small_batch_module) -> tuple[object, Path]:
    """A batch that fails the gate because of hostile labels and texts, under a hostile batch id
    (an uploaded object's key), with a hostile label among the allowed ones (labels can be
    inferred from a first snapshot's data)."""
    docs = Path(tmp_path_factory.mktemp("docs"))
    hostile_label = HOSTILE[1]
    gate = DataGate(Settings(), [*LABELS, hostile_label], docs)
    batch = small_batch_module.copy()
    for i, payload in enumerate(HOSTILE):
        batch.loc[i, "label"] = payload  # not an allowed label (but one): unexpected values
        batch.loc[10 + i, "text"] = payload + (" x" * 6000)  # too long: unexpected values
    verdict = gate.check(f"2026-01-01_{HOSTILE[1]}", batch)  # no "/": a key's folder name
    assert not verdict.success
    return verdict, docs


@pytest.fixture(scope="module")
def small_batch_module(agnews) -> pd.DataFrame:
    return agnews.groupby("label", group_keys=False).head(10).reset_index(drop=True)


def test_quarantined_batch_data_docs_show_hostile_values_as_text(hostile_batch_docs):
    verdict, docs = hostile_batch_docs
    pages = sorted(docs.rglob("*.html"))
    assert docs / "index.html" in pages, pages
    for path in pages:
        page = Elements(path.read_text())
        assert not page.injected(), (path.name, page.injected())
        # the index keeps its rows (batch names) in a script: only as the safe name
        assert not [s for s in page.scripts if "<img" in s or "__pwned=" in s], path.name
        assert "&amp;lt;" not in path.read_text(), f"{path.name}: a value was escaped twice"
    assert len(pages) == 3 and verdict.html in pages, (verdict.html, pages)  # index, suite, the batch
    # The validation page still shows what was wrong, as text.
    text = " ".join(Elements(verdict.html.read_text()).text)
    assert HOSTILE[3] in text and HOSTILE[4] in text
    # ... and the real values stay in the result kept for the JSON report and the failures.
    assert any(HOSTILE[0][:40] in failure for failure in verdict.failures)
    assert HOSTILE[0] in json.dumps(verdict.result)


def test_docs_safe_result_escapes_data_values_only():
    from great_expectations.core import ExpectationSuiteValidationResult, ExpectationValidationResult
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    config = ExpectationConfiguration(
        type="expect_column_values_to_be_in_set", kwargs={"column": "label", "value_set": LABELS}
    )
    result = ExpectationValidationResult(
        success=False,
        expectation_config=config,
        result={
            "unexpected_count": 1,
            "partial_unexpected_list": [HOSTILE[1]],
            "partial_unexpected_counts": [{"value": HOSTILE[1], "count": 1}],
        },
        exception_info={"raised_exception": True, "exception_message": f"bad {HOSTILE[2]}"},
    )
    original = ExpectationSuiteValidationResult(success=False, results=[result], suite_name="s")
    safe = docs_safe_result(original).results[0]
    assert safe.result["partial_unexpected_list"] == ["&lt;img src=x id=pwn-img onerror=window.__pwned=2&gt;"]
    assert safe.result["partial_unexpected_counts"][0]["value"].startswith("&lt;img")
    assert safe.result["unexpected_count"] == 1
    assert safe.exception_info["exception_message"].startswith("bad &lt;svg")
    assert safe.expectation_config == config
    assert original.results[0].result["partial_unexpected_list"] == [HOSTILE[1]], "the original changed"


def test_gx_names_are_safe_and_distinct():
    assert gx_safe_name("2026-01-01_review") == "2026-01-01_review"
    odd = [gx_safe_name(b) for b in ("a<b", "a>b", 'x"><script>', "v1.2 final")]
    assert len(set(odd)) == 4
    assert all(set(name) <= set("abcdefghijklmnopqrstuvwxyz0123456789._-") for name in odd)


# --- the ct_reports plugin ---------------------------------------------------------------------


class FakeStore:
    objects: ClassVar[dict[str, bytes]] = {}
    bucket = "ct-data"

    def __init__(self, settings) -> None:
        pass

    def exists(self, key: str) -> bool:
        return key in self.objects

    def get_bytes(self, key: str) -> bytes:
        return self.objects[key]


@pytest.fixture
def plugin_client(monkeypatch):
    import ct_reports_plugin
    from airflow.api_fastapi.core_api.security import get_user
    from fastapi.testclient import TestClient

    import ct_airflow.settings
    import ml.storage

    monkeypatch.setattr(ml.storage, "ObjectStore", FakeStore)
    monkeypatch.setattr(ct_airflow.settings, "pipeline_settings", lambda: None)
    FakeStore.objects = {
        "reports/drift/m/1/report.html": b"<html><script>window.__pwned=1</script></html>",
        "reports/drift/m/1/summary.json": b'{"text": "<script>alert(1)</script>"}',
        "reports/validation/s/data_docs/static/styles/a.css": b"body {}",
        "quarantine/d/b/_validation/s.json": b"{}",
        "reports/validation/s/data/x.parquet": b"PAR1",
    }
    ct_reports_plugin.app.dependency_overrides[get_user] = lambda: object()
    try:
        yield TestClient(ct_reports_plugin.app)
    finally:
        ct_reports_plugin.app.dependency_overrides.clear()


def _directives(policy: str) -> dict[str, list[str]]:
    parts = (p.split() for p in policy.split(";") if p.strip())
    return {name: values for name, *values in parts}


@pytest.mark.parametrize(
    ("key", "content_type"),
    [
        ("reports/drift/m/1/report.html", "text/html; charset=utf-8"),
        ("reports/drift/m/1/summary.json", "application/json"),
        ("reports/validation/s/data_docs/static/styles/a.css", "text/css; charset=utf-8"),
        ("quarantine/d/b/_validation/s.json", "application/json"),
        ("reports/validation/s/data/x.parquet", "application/vnd.apache.parquet"),
    ],
)
def test_every_report_is_served_inert(plugin_client, key, content_type):
    response = plugin_client.get(f"/reports/{key}")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == content_type
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "set-cookie" not in response.headers
    assert response.headers["referrer-policy"] == "no-referrer"
    assert "no-store" in response.headers["cache-control"]
    csp = _directives(response.headers["content-security-policy"])
    # sandboxed, scripts allowed but never with allow-same-origin: an opaque origin, no cookies
    assert csp["sandbox"] == ["allow-scripts"], csp["sandbox"]
    assert csp["default-src"] == ["'none'"]
    assert csp["connect-src"] == ["'none'"] and csp["form-action"] == ["'none'"]
    assert csp["base-uri"] == ["'none'"] and csp["frame-ancestors"] == ["'self'"]
    for directive in ("script-src", "style-src", "img-src", "font-src"):
        # no other origin: only the page's own folder, inline code, data:/blob: images and fonts
        assert set(csp[directive]) <= {"'self'", "'unsafe-inline'", "data:", "blob:"}, csp[directive]
    attachment = response.headers.get("content-disposition") == "attachment"
    assert attachment == (content_type == "application/vnd.apache.parquet")


def test_refusals_carry_the_headers_too(plugin_client):
    for key in ("raw/d/b/x.csv", "reports/missing.html"):
        response = plugin_client.get(f"/reports/{key}")
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/json"
        assert "sandbox" in response.headers["content-security-policy"]
        assert response.headers["x-content-type-options"] == "nosniff"
