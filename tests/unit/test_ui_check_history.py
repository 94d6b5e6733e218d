"""scripts/ui_check.py's serving history check in the real headless Chromium, without Airflow: a
history page rendered from hostile entries (ml/serving_history_page.py) and served with the
ct_reports plugin's headers passes; a page where an entry's text became a live script fails it.
tests/integration/test_serving_history.py runs it against the page on the real Airflow."""

from __future__ import annotations

import sys
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ml.serving_history import HistoryEntry
from ml.serving_history_page import render_history_page
from tests.conftest import REPO_ROOT
from tests.unit.test_report_safety import HOSTILE

sys.path.insert(0, str(REPO_ROOT / "scripts"))
sys.path.insert(0, str(REPO_ROOT / "plugins"))
import ui_check

MODEL = "agnews-classifier"


def _entries() -> list[dict]:
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    return [
        HistoryEntry(
            model=MODEL, dataset="agnews", action="pin", from_version=str(i), to_version=str(i + 1),
            result=("ok", "failed", "rolled_back")[i % 3], actor=f"user:{p}", reason=p, detail=p,
            at=t0 + timedelta(hours=i),
        ).to_dict()
        for i, p in enumerate(HOSTILE)
    ]  # fmt: skip


@pytest.fixture(scope="module")
def site():
    from ct_reports_plugin import HISTORY_HEADERS

    try:
        executable = ui_check.find_chromium()
    except ui_check.ChromiumNotFound as exc:
        pytest.skip(str(exc))
    safe = render_history_page(MODEL, _entries())
    # what a slip would look like: an entry's reason placed in the page unescaped
    slipped = safe.replace("</body>", "<script>window.__pwned=1</script></body>")
    pages = {"/safe": (HISTORY_HEADERS, safe), "/slipped": ({}, slipped), "/favicon.ico": ({}, " ")}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            headers, body = pages.get(self.path, ({}, None))
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            for name, value in headers.items():
                if name.lower() != "content-type":
                    self.send_header(name, value)
            self.end_headers()
            self.wfile.write((body or "not found").encode())

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    with ui_check._browser_page(executable, url, timeout=20) as (page, watcher):
        watcher.anonymous = False
        yield url, page, watcher
    server.shutdown()
    server.server_close()


def _check(site, path: str, tmp_path) -> ui_check.UiReport:
    url, page, watcher = site
    report = ui_check.UiReport()
    checker = ui_check.UiChecker(page, watcher, url, tmp_path, report, timeout=20)
    checker.stage("history", MODEL, lambda: checker.history_page(url + path, MODEL))
    return report


def test_a_history_page_with_hostile_entries_passes(site, tmp_path):
    report = _check(site, "/safe", tmp_path)
    assert not report.failures, report.checks
    history, errors = report.results
    assert history.kind == "history" and f"shows {len(HOSTILE)} entries" in history.detail, history
    assert "no script in the page and none ran" in history.detail
    assert errors.kind == "browser-errors" and errors.ok, errors
    assert report.screenshots and report.screenshots[0].name == f"01-history-{MODEL}.png"


def test_a_history_page_whose_entry_ran_as_script_fails(site, tmp_path):
    report = _check(site, "/slipped", tmp_path)
    (failed,) = report.failures
    assert "SCRIPT: 1 <script> elements, window.__pwned='1'" in failed, failed
