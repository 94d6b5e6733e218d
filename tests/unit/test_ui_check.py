"""scripts/ui_check.py's browser plumbing against pages served on 127.0.0.1, in the real headless
Chromium (no Airflow needed): what it records as a browser error, how a failed check reads, and
that its screenshots show what scrolls inside a panel. tests/integration/test_airflow_ui.py runs
the checks themselves against Airflow."""

from __future__ import annotations

import struct
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import ui_check

PAGES = {
    "/good": ({}, "<title>good</title><p>all is well</p>"),
    "/bad": (
        {},
        "<title>bad</title><script>console.error('bad-console'); fetch('/missing');"
        "setTimeout(() => { throw new Error('bad-exception'); }, 0);</script>"
        "<img src='http://127.0.0.1:1/elsewhere.png'>",  # another origin's failure: not Airflow's
    ),
    "/csp": ({"Content-Security-Policy": "script-src 'none'"}, "<script>window.ran = 1</script>"),
    # a panel as tall as the window, and a dialog's body of a fixed height, each scrolling 2500px
    "/panel": (
        {},
        "<body style='margin:0'><div style='height:100vh;overflow-y:auto'><div style='height:2500px'>",
    ),
    "/dialog": (
        {},
        "<body style='margin:0'><div role=dialog><div style='height:300px;overflow-y:auto'>"
        "<div style='height:2500px'>",
    ),
    "/favicon.ico": ({}, " "),
}


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        headers, body = PAGES.get(self.path, ({}, None))
        self.send_response(200 if body else 404)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write((body or "not found").encode())

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def site():
    try:
        executable = ui_check.find_chromium()
    except ui_check.ChromiumNotFound as exc:
        pytest.skip(str(exc))
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    with ui_check._browser_page(executable, url, timeout=20) as (page, watcher):
        watcher.anonymous = False
        yield url, page, watcher
    server.shutdown()
    server.server_close()


def _open(site, path: str) -> list[str]:
    url, page, watcher = site
    watcher.stage = path
    mark = len(watcher.events)
    page.goto(url + path)
    page.wait_for_timeout(500)
    return watcher.since(mark)


def test_a_clean_page_records_nothing(site):
    assert _open(site, "/good") == []


def test_exceptions_console_errors_and_failed_requests_are_recorded(site):
    events = _open(site, "/bad")
    assert any(e.startswith("console.error: bad-console") for e in events), events
    assert any(e.startswith("JS exception: Error: bad-exception") for e in events), events
    assert any(e.startswith("HTTP 404") and e.endswith("/missing") for e in events), events
    assert not any("elsewhere.png" in e for e in events), events
    assert len(events) == 3, events  # the 404's "Failed to load resource" is not counted twice


def test_a_csp_refusal_is_recorded(site):
    (event,) = _open(site, "/csp")
    assert event.startswith("console.error:") and "Content Security Policy" in event, event


def test_a_failed_check_names_what_it_waited_for(site, tmp_path):
    url, page, watcher = site
    report = ui_check.UiReport()
    checker = ui_check.UiChecker(page, watcher, url, tmp_path, report, timeout=2)
    page.set_default_timeout(2000)
    _open(site, "/good")
    checker.stage("docs", "demo", lambda: page.get_by_role("button", name="No such button").click())
    failed, errors = report.results
    assert not failed.ok and failed.kind == "docs", failed
    assert "No such button" in failed.detail and "Timeout 2000ms" in failed.detail, failed
    assert errors.ok and errors.kind == "browser-errors", errors
    assert (tmp_path / "demo-docs.failed.txt").read_text().startswith(url + "/good")
    assert [p.name for p in report.screenshots] == ["01-demo-docs-failed.png"]


def _png_size(path) -> tuple[int, int]:
    return struct.unpack(">II", path.read_bytes()[16:24])  # the PNG's IHDR


def test_a_screenshot_shows_what_scrolls_inside_a_panel_or_a_dialog(site, tmp_path):
    _, page, _ = site
    _open(site, "/panel")
    assert _png_size(ui_check.screenshot(page, tmp_path / "panel.png")) == (1440, 2500)
    assert page.viewport_size == ui_check.VIEWPORT  # put back afterwards

    _open(site, "/dialog")
    dialog = page.get_by_role("dialog")
    assert _png_size(ui_check.screenshot(page, tmp_path / "clipped.png")) == (1440, 900)  # can't grow
    assert _png_size(ui_check.screenshot(page, tmp_path / "dialog.png", unclip=dialog)) == (1440, 2500)
    assert dialog.evaluate("d => d.firstElementChild.getBoundingClientRect().height") == 300  # put back
