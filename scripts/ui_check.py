"""Browser check of the Airflow web UI: Playwright driving the system's headless Chromium.

Logs in through the real login form, then for the DAG list and for each DAG checks that its page
renders, that its ``doc_md`` shows in the "Dag Docs" dialog and that the trigger form shows every
param title (the form is never submitted). JS exceptions, console errors (CSP refusals among them)
and HTTP >= 400 answers from Airflow fail the check too. A PNG screenshot of every page and dialog
goes to the out dir.

    .venv/bin/python scripts/ui_check.py [--base-url URL] [--out DIR] [--dag DAG_ID ...] [--history MODEL ...]

``--history MODEL`` also opens the model's serving history page (``/ct/serving/MODEL``, the
``ct_reports`` plugin): it must show its table of entries and its timeline, and no script may be in
it or run from it.

Exit status: 0 all checks passed, 1 a check failed, 2 chromium is not installed.
What the page is expected to show comes from the REST API, not from this file. Playwright drives
the chromium found on PATH (``executable_path``): it never downloads a browser.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import requests
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Locator, Page, sync_playwright

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "scripts"))
from airflow_client import AirflowClient  # noqa: E402

DEFAULT_BASE_URL = "http://127.0.0.1:8080"
DEFAULT_OUT = REPO_ROOT / ".state" / "ui-check"
DAG_TAG = "continuous-training"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
VIEWPORT = {"width": 1440, "height": 900}
MAX_SCREENSHOT_HEIGHT = 12000
# The UI's English labels (airflow/ui/dist/i18n/locales/en): the browser context asks for en-US.
DOCS_BUTTON = "Dag Docs"  # dag.json header.buttons.dagDocs
TRIGGER_DIALOG_TITLE = "Trigger Dag"  # components.json triggerDag.title
DIALOGS = '[role="dialog"], [role="alertdialog"]'


class ChromiumNotFound(RuntimeError):
    pass


class UiTimeout(RuntimeError):
    pass


@dataclass
class Check:
    ok: bool
    kind: str  # login, dag-list, page, docs, trigger-form, link, browser-errors, browser, rest-api
    subject: str  # a dag_id, a link's name, or "ui"
    detail: str

    def __str__(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'} [{self.subject}] {self.kind}: {self.detail}"


@dataclass
class UiReport:
    results: list[Check] = field(default_factory=list)
    screenshots: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def checks(self) -> list[str]:
        return [str(c) for c in self.results]

    @property
    def failures(self) -> list[str]:
        return [str(c) for c in self.results if not c.ok]

    def kinds(self, subject: str) -> set[str]:
        """The kinds of check that passed for ``subject``."""
        return {c.kind for c in self.results if c.subject == subject and c.ok}


# --------------------------------------------------------------------------------------
# what the UI should show, from the REST API
# --------------------------------------------------------------------------------------


@dataclass
class DagExpectation:
    dag_id: str
    display_name: str
    doc_heading: str | None  # first heading of doc_md, markdown stripped
    doc_heading_raw: str | None
    param_titles: dict[str, str]  # param name -> schema title
    boolean_params: list[str]


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _doc_heading(doc_md: str | None) -> tuple[str | None, str | None]:
    """(heading text, raw line) of the first markdown heading, else of the first non-empty line."""
    lines = [line.strip() for line in (doc_md or "").splitlines() if line.strip()]
    if not lines:
        return None, None
    heading = next((line for line in lines if re.match(r"#{1,6}\s", line)), lines[0])
    text = re.sub(r"^#{1,6}\s+", "", heading).rstrip("#")
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links and images: their text
    return _squash(re.sub(r"[`*_~]", "", text)), heading


def discover_dags(client: AirflowClient, tag: str = DAG_TAG) -> list[str]:
    dags = client._call("GET", "/dags", params={"tags": tag, "limit": 100})["dags"]
    return sorted(d["dag_id"] for d in dags if tag in {t["name"] for t in d.get("tags", [])})


def expectation(client: AirflowClient, dag_id: str) -> DagExpectation:
    details = client._call("GET", f"/dags/{quote(dag_id, safe='')}/details")
    heading, raw = _doc_heading(details.get("doc_md"))
    titles, booleans = {}, []
    for name, param in (details.get("params") or {}).items():
        schema = (param or {}).get("schema") or {}
        if schema.get("title"):
            titles[name] = str(schema["title"])
        types = schema.get("type")
        if types == "boolean" or (isinstance(types, list) and "boolean" in types):
            booleans.append(name)
    return DagExpectation(
        dag_id=dag_id,
        display_name=details.get("dag_display_name") or dag_id,
        doc_heading=heading,
        doc_heading_raw=raw,
        param_titles=titles,
        boolean_params=booleans,
    )


def find_chromium() -> str:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    raise ChromiumNotFound(
        "chromium not found on PATH: apt-get install chromium (scripts/setup.sh does it when run as root)"
    )


def _reason(exc: Exception) -> str:
    """One line: the error's first line and, for Playwright's, what it was waiting for."""
    lines = str(exc).splitlines() or [repr(exc)]
    waiting = next((line.strip(" -") for line in lines[1:] if "waiting for" in line), "")
    return f"{lines[0]} ({waiting})" if waiting else lines[0]


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


# --------------------------------------------------------------------------------------
# the browser: what went wrong on the page, and screenshots
# --------------------------------------------------------------------------------------


class Watcher:
    """Every JS exception, console error (CSP refusals included) and failed Airflow request of a
    page, tagged with the stage that was running."""

    def __init__(self, page: Page, origin: str) -> None:
        self.origin = origin
        self.stage = "start"
        self.events: list[tuple[str, str]] = []
        self._failed_urls: set[tuple[str, str]] = set()
        # Until the login form is submitted the visitor is anonymous: the UI's first API calls
        # (e.g. /ui/config) answer 401, which is how the app knows to send it to the login form.
        self.anonymous = True
        page.on("pageerror", lambda exc: self._record(f"JS exception: {exc.name}: {exc.message}"))
        page.on("console", self._on_console)
        page.on("response", self._on_response)
        page.on("requestfailed", self._on_request_failed)

    def _ours(self, url: str) -> bool:
        return _origin(url) == self.origin

    def _record(self, text: str) -> None:
        self.events.append((self.stage, text.splitlines()[0][:500] if text else text))

    def _on_console(self, message: Any) -> None:
        if message.type not in {"error", "assert"}:
            return
        url = message.location.get("url", "")
        # "Failed to load resource" repeats a failed response recorded below; other origins'
        # resources are not Airflow's to answer for.
        if message.text.startswith("Failed to load resource") and (
            (self.stage, url) in self._failed_urls or (url and not self._ours(url))
        ):
            return
        self._record(f"console.{message.type}: {message.text} {url}".rstrip())

    def _on_response(self, response: Any) -> None:
        if response.status >= 400 and self._ours(response.url):
            self._failed_urls.add((self.stage, response.url))
            if not (response.status == 401 and self.anonymous):
                self._record(f"HTTP {response.status} {response.status_text} from {response.url}")

    def _on_request_failed(self, request: Any) -> None:
        error = request.failure or ""
        # ERR_ABORTED: the page itself dropped the request (navigation, aborted fetch), no error.
        # The browser's own favicon request from a sandboxed report (an opaque origin, so no login
        # cookie) gets Airflow's 401 JSON, which ORB blocks: not the page's failure.
        if (
            "ERR_ABORTED" in error
            or not self._ours(request.url)
            or urlsplit(request.url).path == "/favicon.ico"
        ):
            return
        self._record(f"request failed: {error} ({request.resource_type}) {request.url}")

    def since(self, mark: int) -> list[str]:
        return [text for _, text in self.events[mark:]]


# The UI scrolls inside panels and dialogs, not the document. [largest, total] pixels that
# scrollable boxes (and the document) hide below their fold.
_HIDDEN = """() => {
    let largest = Math.max(0, document.documentElement.scrollHeight - window.innerHeight);
    let total = largest;
    for (const el of document.querySelectorAll('*')) {
        const hidden = el.scrollHeight - el.clientHeight;
        if (hidden > 1 && /(auto|scroll)/.test(getComputedStyle(el).overflowY)) {
            largest = Math.max(largest, hidden);
            total += hidden;
        }
    }
    return [Math.ceil(largest), Math.ceil(total)];
}"""
# Boxes of a fixed height inside ``root`` (a dialog's scrolling body) do not grow with the
# viewport: let them, and their ancestors up to ``root``, take their content's height for the
# screenshot. window.__uiCheckRestore puts the styles back.
_UNCLIP = """(root) => {
    const saved = [];
    const set = (el, props) => {
        saved.push([el, el.getAttribute('style')]);
        for (const [k, v] of Object.entries(props)) el.style.setProperty(k, v, 'important');
    };
    for (const el of [root, ...root.querySelectorAll('*')]) {
        if (el.scrollHeight - el.clientHeight > 1 && /(auto|scroll)/.test(getComputedStyle(el).overflowY)) {
            set(el, {'height': 'auto', 'max-height': 'none', 'overflow-y': 'visible'});
            for (let a = el.parentElement; a && a !== root.parentElement; a = a.parentElement) {
                set(a, {'height': 'auto', 'max-height': 'none'});
            }
        }
    }
    window.__uiCheckRestore = () => {
        for (const [el, style] of saved.reverse()) {
            if (style === null) el.removeAttribute('style'); else el.setAttribute('style', style);
        }
    };
}"""


def screenshot(page: Page, path: Path, unclip: Locator | None = None) -> Path:
    """A PNG of the whole page: the viewport grows until nothing that scrolls hides anything (up to
    MAX_SCREENSHOT_HEIGHT); ``unclip`` (e.g. a dialog) first lets the fixed-height scrolling boxes
    inside it grow too. Everything is put back afterwards."""
    width, height = VIEWPORT["width"], VIEWPORT["height"]
    try:
        if unclip is not None:
            unclip.first.evaluate(_UNCLIP)
            page.wait_for_timeout(300)
        for _ in range(4):  # growing one box can reveal the next
            largest, total = page.evaluate(_HIDDEN)
            taller = min(height + largest, MAX_SCREENSHOT_HEIGHT)
            if largest <= 1 or taller <= height:
                break
            page.set_viewport_size({"width": width, "height": taller})
            page.wait_for_timeout(500)
            if page.evaluate(_HIDDEN)[1] >= total:  # a box of fixed height: growing is no use
                page.set_viewport_size(VIEWPORT)
                break
            height = taller
        page.screenshot(path=str(path))
    finally:
        with contextlib.suppress(PlaywrightError):
            page.evaluate("() => window.__uiCheckRestore && window.__uiCheckRestore()")
            page.evaluate("() => { delete window.__uiCheckRestore; }")
        page.set_viewport_size(VIEWPORT)
    return path


@contextlib.contextmanager
def _browser_page(executable: str, base_url: str, timeout: float) -> Iterator[tuple[Page, Watcher]]:
    """A page in a fresh headless ``executable`` (Playwright's temporary profile, gone afterwards),
    every wait in it bounded by ``timeout`` seconds."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            context = browser.new_context(viewport=VIEWPORT, locale="en-US")
            context.set_default_timeout(timeout * 1000)
            page = context.new_page()
            yield page, Watcher(page, _origin(base_url))
        finally:
            browser.close()


# --------------------------------------------------------------------------------------
# the checks
# --------------------------------------------------------------------------------------


class UiChecker:
    def __init__(
        self, page: Page, watcher: Watcher, base_url: str, out_dir: Path, report: UiReport, timeout: float
    ) -> None:
        self.page = page
        self.watcher = watcher
        self.base_url = base_url
        self.out_dir = out_dir
        self.report = report
        self.timeout = timeout
        self._shot_no = 0

    def check(self, ok: bool, kind: str, subject: str, detail: str) -> bool:
        result = Check(ok, kind, subject, detail)
        self.report.results.append(result)
        print(result, flush=True)
        return ok

    def shot(self, name: str, unclip: Locator | None = None) -> Path:
        self._shot_no += 1
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        path = screenshot(self.page, self.out_dir / f"{self._shot_no:02d}-{safe}.png", unclip)
        self.report.screenshots.append(path)
        return path

    def goto(self, url: str) -> None:
        """Open ``url`` and let the single-page app finish its first requests."""
        self.page.goto(url, wait_until="load")
        with contextlib.suppress(PlaywrightError):  # a page that polls may never go quiet
            self.page.wait_for_load_state("networkidle", timeout=10_000)

    def dialog(self, title: str = "") -> Locator:
        """The open dialog whose text includes ``title`` (any open dialog for "")."""
        dialogs = self.page.locator(DIALOGS).filter(visible=True)
        return dialogs.filter(has_text=title).first if title else dialogs.first

    def stage(self, name: str, subject: str, body: Callable[[], Any]) -> None:
        """Run one check, then one more: no browser errors happened while it ran."""
        self.watcher.stage = f"{subject} {name}"
        mark = len(self.watcher.events)
        try:
            body()
        except (UiTimeout, PlaywrightError) as exc:
            self.check(False, name, subject, _reason(exc))
            with contextlib.suppress(PlaywrightError, OSError):  # what the page showed instead
                (self.out_dir / f"{subject}-{name}.failed.txt").write_text(
                    f"{self.page.url}\n\n{self.page.locator('body').inner_text(timeout=5000)}"
                )
            with contextlib.suppress(PlaywrightError, OSError):
                self.shot(f"{subject}-{name}-failed")
                self._dismiss_dialogs()  # so the next check starts from a clean page
        self.page.wait_for_timeout(1000)  # late errors belong to this stage, not the next
        errors = self.watcher.since(mark)
        self.check(
            not errors,
            "browser-errors",
            subject,
            f"during {name}: "
            + ("; ".join(errors) if errors else "no JS exceptions, console errors or HTTP >= 400"),
        )

    # ---- login ---------------------------------------------------------------------

    def login(self, user: str, password: str) -> None:
        page = self.page
        self.goto(f"{self.base_url}/")
        form, app = page.locator('input[name="username"]'), page.locator('a[href$="/dags"]')
        form.or_(app).first.wait_for()
        if not form.is_visible():
            self.watcher.anonymous = False
            self.check(True, "login", "ui", f"no login needed at {self.base_url}/ (the app rendered)")
            return
        login_url = page.url
        form.fill(user)
        page.locator('input[name="password"]').fill(password)
        self.shot("login-form")
        page.get_by_role("button", name="Sign in", exact=True).click()
        self.watcher.anonymous = False
        # Success leaves the form; a refusal shows an alert above the form (the "Simple auth
        # manager enabled" banner is one below it).
        outcome = page.wait_for_function(
            """() => {
                if (!location.pathname.includes('/auth/login')) {
                    return document.readyState === 'complete' ? 'ok' : null;
                }
                const form = document.querySelector('input[name="username"]');
                const alert = form && [...document.querySelectorAll('.chakra-alert__root, [role="alert"]')]
                    .find(a => a.compareDocumentPosition(form) & Node.DOCUMENT_POSITION_FOLLOWING);
                return alert ? 'refused: ' + alert.innerText.replace(/\\s+/g, ' ').trim() : null;
            }""",
            polling=250,
        ).json_value()
        if outcome != "ok":
            self.shot("login-refused")
            raise UiTimeout(f"the login form at {login_url} says {outcome}")
        token = any(c["name"] == "_token" for c in page.context.cookies(self.base_url + "/"))
        app.first.wait_for()
        with contextlib.suppress(PlaywrightError):
            page.wait_for_load_state("networkidle", timeout=10_000)
        self.shot("home")
        self.check(
            token,
            "login",
            "ui",
            f"filled and submitted the form at {login_url}; landed on {urlsplit(page.url).path} "
            + ("with the _token cookie set" if token else "WITHOUT a _token cookie"),
        )

    # ---- DAG list ------------------------------------------------------------------

    def dag_list(self, dags: list[DagExpectation]) -> None:
        self.goto(f"{self.base_url}/dags")
        deadline = time.monotonic() + self.timeout
        missing = []
        for dag in dags:
            href = f"/dags/{quote(dag.dag_id, safe='')}"
            link = self.page.locator(f'a[href$="{href}"]').first
            try:
                link.wait_for(state="attached", timeout=max(1.0, deadline - time.monotonic()) * 1000)
            except PlaywrightError:
                missing.append(href)
        self.shot("dag-list")
        self.check(
            not missing,
            "dag-list",
            "ui",
            f"/dags lists {len(dags) - len(missing)}/{len(dags)} DAGs as links"
            + (f"; missing: {missing}" if missing else f" ({', '.join(d.dag_id for d in dags)})"),
        )

    # ---- one DAG -------------------------------------------------------------------

    def dag_page(self, dag: DagExpectation) -> None:
        page = self.page
        url = f"{self.base_url}/dags/{quote(dag.dag_id, safe='')}"
        self.goto(url)  # networkidle there: the grid and the run details load after the header
        page.get_by_test_id("trigger-dag-button").wait_for()
        page.get_by_text(dag.display_name).filter(visible=True).first.wait_for()
        self.shot(f"{dag.dag_id}-page")
        self.check(
            True,
            "page",
            dag.dag_id,
            f"{url} rendered {dag.display_name!r} and a Trigger button ({page.title()})",
        )

    def dag_docs(self, dag: DagExpectation) -> None:
        if not dag.doc_heading:
            self.check(False, "docs", dag.dag_id, "the DAG has no doc_md (GET /dags/{id}/details)")
            return
        self.page.get_by_role("button", name=DOCS_BUTTON, exact=True).click()
        dialog = self.dialog()
        try:
            dialog.filter(has_text=dag.doc_heading).wait_for()
        except PlaywrightError as exc:
            shown = _squash(dialog.inner_text(timeout=5000))[:200] if dialog.count() else None
            raise UiTimeout(
                f"no doc_md heading {dag.doc_heading!r} in the dialog: {_reason(exc)}; it shows: {shown!r}"
            ) from None
        text = _squash(dialog.inner_text())
        if dag.doc_heading not in text:  # has_text ignores case
            raise UiTimeout(f"the dialog shows {text[:200]!r}, not the doc_md heading {dag.doc_heading!r}")
        headings = dialog.locator("h1, h2, h3, h4, h5, h6").filter(
            has_text=re.compile(rf"^\s*{re.escape(dag.doc_heading)}\s*$")
        )
        rendered = headings.first.evaluate("h => h.tagName") if headings.count() else None
        self.shot(f"{dag.dag_id}-docs", unclip=dialog)
        raw = dag.doc_heading_raw or ""
        ok = not (raw.startswith("#") and _squash(raw) in text)
        self.check(
            ok,
            "docs",
            dag.dag_id,
            f"the {DOCS_BUTTON!r} dialog shows the doc_md heading {dag.doc_heading!r}"
            + (f" as an <{rendered.lower()}>" if rendered else "")
            + ("" if ok else " but as raw markdown"),
        )
        self._close_dialog(dialog)

    def trigger_form(self, dag: DagExpectation) -> None:
        page = self.page
        page.get_by_test_id("trigger-dag-button").click()
        # After a run with a conf, the button opens a menu: "Trigger" / "Trigger again with this config"
        dialog = self.dialog(TRIGGER_DIALOG_TITLE)
        menu_item = page.locator('[role="menuitem"][data-value="trigger"]')
        dialog.or_(menu_item).first.wait_for()
        if menu_item.is_visible():
            menu_item.click()
        dialog.get_by_test_id("trigger-dag-submit").wait_for()  # there, and never clicked
        titles = list(dag.param_titles.values())
        # The form comes once the DAG's details have loaded: wait for the titles (bounded).
        deadline = time.monotonic() + self.timeout / 2
        for title in titles:
            with contextlib.suppress(PlaywrightError):
                dialog.get_by_text(_squash(title)).first.wait_for(
                    timeout=max(0.5, deadline - time.monotonic()) * 1000
                )
        seen = _squash(dialog.inner_text())
        # Params sit in accordion sections, one per param "section" ("Run Parameters" by default,
        # open); open any closed one and read it too. "Advanced Options" holds no params.
        if any(_squash(t) not in seen for t in titles):
            closed = dialog.locator(
                '[data-scope="accordion"][data-part="item-trigger"][aria-expanded="false"]'
            )
            for trigger in closed.all():
                if not (trigger.get_attribute("id") or "").endswith(":advancedOptions"):
                    trigger.click()
                    page.wait_for_timeout(500)
            seen = _squash(dialog.inner_text())
        missing = [t for t in titles if _squash(t) not in seen]
        labels = dialog.locator('label[data-part="label"]').evaluate_all(
            """labels => labels.map(l => {
                const c = l.cloneNode(true);
                c.querySelectorAll('[aria-hidden="true"]').forEach(x => x.remove());
                return c.textContent.replace(/\\s+/g, ' ').trim();
            })"""
        )
        as_labels = sum(1 for t in titles if _squash(t) in labels)
        # boolean params render as switches: the input is named element_<param>
        switch = '[data-scope="switch"] input[type="checkbox"][name="element_{}"]'
        no_switch = [n for n in dag.boolean_params if not dialog.locator(switch.format(n)).count()]
        booleans = len(dag.boolean_params)
        header = dialog.evaluate("d => d.querySelector('h2, h3, header')?.innerText || ''")
        self.shot(f"{dag.dag_id}-trigger-form", unclip=dialog)
        self.check(
            not missing and not no_switch,
            "trigger-form",
            dag.dag_id,
            f"the {TRIGGER_DIALOG_TITLE!r} dialog"
            + (f" for {dag.display_name!r}" if dag.display_name in header else "")
            + f" shows {len(titles) - len(missing)}/{len(titles)} param titles ({as_labels} as field labels)"
            + (f"; missing: {missing}" if missing else "")
            + f"; {booleans - len(no_switch)}/{booleans} boolean params as switches"
            + (f"; no switch for: {no_switch}" if no_switch else "")
            + " (not submitted)",
        )
        self._close_dialog(dialog)

    def _dismiss_dialogs(self) -> None:
        for _ in range(3):
            if not self.dialog().count():
                return
            self.page.keyboard.press("Escape")
            self.page.wait_for_timeout(500)

    def _close_dialog(self, dialog: Locator) -> None:
        closer = dialog.locator('[aria-label="Close"], [data-part="close-trigger"]').first
        if closer.count():
            closer.click()
        else:
            self.page.keyboard.press("Escape")
        dialog.wait_for(state="hidden", timeout=10_000)

    # ---- a page a task links to (report viewer, MLflow) -------------------------------

    def linked_page(self, url: str, name: str) -> None:
        """Open ``url`` in the logged-in browser: it must render a page with content, not an error."""
        self.goto(url)
        text = self.page.locator("body").inner_text().strip()
        self.shot(f"link-{name}")
        self.check(
            len(text) > 200 and "Not authenticated" not in text[:500],
            "link",
            name,
            f"{url} rendered {self.page.title()!r} with {len(text)} characters of text",
        )

    # ---- a serving history page (the ct_reports plugin's /ct/serving/<model>) ----------

    def history_page(self, url: str, name: str) -> None:
        """Open a model's serving history: it must show the entries' table and the timeline, and hold
        no script: none in the document, none that ran (an entry's text that became markup and ran
        would set ``window.__pwned`` or make an element whose id starts with ``pwn``, the hostile
        test payloads' mark). Console errors (a CSP refusal of a script) fail the stage's
        browser-errors check."""
        self.goto(url)
        self.page.locator("table#history tbody tr").first.wait_for()
        self.page.locator("svg#timeline circle").first.wait_for()
        state = self.page.evaluate(_HISTORY_STATE)
        self.shot(f"history-{name}")
        clean = state["scripts"] == 0 and state["ran"] is None and state["injected"] == 0
        self.check(
            clean and state["rows"] > 0 and state["dots"] > 0,
            "history",
            name,
            f"{url} shows {state['rows']} entries and a timeline of {state['dots']} dots; "
            + (
                "no script in the page and none ran"
                if clean
                else f"SCRIPT: {state['scripts']} <script> elements, window.__pwned={state['ran']!r}, "
                f"{state['injected']} injected elements"
            ),
        )


_HISTORY_STATE = """() => ({
    rows: document.querySelectorAll('table#history tbody tr').length,
    dots: document.querySelectorAll('svg#timeline circle').length,
    scripts: document.scripts.length,
    ran: window.__pwned === undefined ? null : String(window.__pwned),
    injected: document.querySelectorAll('[id^="pwn"]').length,
})"""


# --------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _session(
    base_url: str, user: str, password: str, out_dir: Path, report: UiReport, timeout: float, budget: float
) -> Iterator[tuple[UiChecker | None, Callable[[], bool]]]:
    """A fresh browser, logged in through the form: the checker (None when the login failed) and
    ``in_budget()``, which is False (a failed check) once the run is past ``budget`` seconds. A
    browser that fails to start or dies becomes a failed "browser" check."""
    started = time.monotonic()

    def fail(detail: str) -> bool:
        report.results.append(Check(False, "browser", "ui", detail))
        print(report.results[-1], flush=True)
        return False

    def in_budget() -> bool:
        return time.monotonic() - started <= budget or fail(
            f"the whole check ran past its {budget:.0f}s budget"
        )

    yielded = False
    try:
        with _browser_page(find_chromium(), base_url, timeout) as (page, watcher):
            checker = UiChecker(page, watcher, base_url, out_dir, report, timeout)
            checker.stage("login", "ui", lambda: checker.login(user, password))
            logged_in = any(c.kind == "login" and c.ok for c in report.results)
            yielded = True
            yield (checker if logged_in else None), in_budget  # nothing else can work without it
    except (PlaywrightError, UiTimeout, OSError) as exc:
        fail(f"{type(exc).__name__}: {_reason(exc)}")
        if not yielded:
            yield None, in_budget


def inspect_pages(
    base_url: str,
    user: str,
    password: str,
    probes: dict[str, tuple[str, str]],
    out_dir: Path,
    timeout: float = 45.0,
) -> tuple[UiReport, dict[str, dict[str, Any]]]:
    """Log in through the form like a person, then open each page and evaluate a JS expression in
    it (awaited if it returns a promise): ``probes`` is {name: (url, expression)}.

    Returns the report (login, browser failures, screenshots) and, per name, ``value`` (what the
    expression returned) and ``events`` (JS exceptions, console errors, CSP refusals and failed
    Airflow requests while the page was open). Every wait is bounded by ``timeout`` seconds.
    """
    started = time.monotonic()
    find_chromium()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report, results = UiReport(), {}
    budget = 4 * timeout + 3 * timeout * len(probes)
    with _session(base_url.rstrip("/"), user, password, out_dir, report, timeout, budget) as (
        checker,
        in_budget,
    ):
        for name, (url, probe) in probes.items() if checker else ():
            if not in_budget():
                break
            checker.watcher.stage = name
            mark = len(checker.watcher.events)
            checker.goto(url)
            value = checker.page.evaluate(probe)
            checker.page.wait_for_timeout(1000)  # late errors belong to this page
            checker.shot(f"inspect-{name}")
            results[name] = {"value": value, "events": checker.watcher.since(mark)}
    report.seconds = time.monotonic() - started
    return report, results


def run_ui_check(
    base_url: str,
    user: str,
    password: str,
    dag_ids: list[str] | None,
    out_dir: Path,
    timeout: float = 45.0,
    links: dict[str, str] | None = None,
    history_pages: dict[str, str] | None = None,
) -> UiReport:
    """Check the UI in headless Chromium; ``dag_ids=None`` checks every DAG tagged continuous-training.

    ``links`` ({name: url}) are pages a task links to (reports, MLflow): each must render for the
    logged-in user. ``history_pages`` ({name: url}) are serving history pages
    (``/ct/serving/<model>``): each must show its table and timeline and run no script.

    Raises ChromiumNotFound when no chromium is installed. Every wait is bounded by ``timeout``
    seconds, and the browser and its temporary profile are gone when this returns.
    """
    started = time.monotonic()
    base_url = base_url.rstrip("/")
    find_chromium()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in [*out_dir.glob("[0-9][0-9]-*.png"), *out_dir.glob("*.failed.txt")]:  # a previous run's
        old.unlink()
    report = UiReport()

    def fail(kind: str, subject: str, detail: str) -> UiReport:
        report.results.append(Check(False, kind, subject, detail))
        print(report.results[-1], flush=True)
        report.seconds = time.monotonic() - started
        return report

    # what the pages should show, from the REST API
    try:
        client = AirflowClient(base_url, user, password)
        ids = dag_ids or discover_dags(client)
    except (requests.RequestException, RuntimeError) as exc:
        return fail("rest-api", "ui", f"cannot log in to or list DAGs from {base_url}: {exc}")
    if not ids:
        return fail("dag-list", "ui", f"no DAG is tagged {DAG_TAG!r} in {base_url}")
    dags = []
    for dag_id in ids:
        try:
            dags.append(expectation(client, dag_id))
        except (requests.RequestException, RuntimeError) as exc:
            fail("page", dag_id, f"GET /api/v2/dags/{dag_id}/details failed: {exc}")

    # a bound on the whole run too, however many waits come close to their own timeout
    links = links or {}
    history_pages = history_pages or {}
    budget = 4 * timeout + 6 * timeout * len(dags) + 2 * timeout * (len(links) + len(history_pages))
    with _session(base_url, user, password, out_dir, report, timeout, budget) as (checker, in_budget):
        if checker and in_budget():
            checker.stage("dag-list", "ui", lambda: checker.dag_list(dags))
        for dag in dags if checker else ():
            for kind, body in (
                ("page", checker.dag_page),
                ("docs", checker.dag_docs),
                ("trigger-form", checker.trigger_form),
            ):
                if not in_budget():
                    break
                checker.stage(kind, dag.dag_id, lambda body=body, dag=dag: body(dag))
        for name, url in links.items() if checker else ():
            if in_budget():
                checker.stage("link", name, lambda name=name, url=url: checker.linked_page(url, name))
        for name, url in history_pages.items() if checker else ():
            if in_budget():
                checker.stage("history", name, lambda name=name, url=url: checker.history_page(url, name))
    report.seconds = time.monotonic() - started
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL, help=f"Airflow (default {DEFAULT_BASE_URL})")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="screenshots go here (default .state/ui-check)"
    )
    parser.add_argument(
        "--dag",
        action="append",
        dest="dags",
        metavar="DAG_ID",
        help=f"DAG to check (repeatable; default: every DAG tagged {DAG_TAG!r})",
    )
    parser.add_argument("--timeout", type=float, default=45.0, help="seconds per wait (default 45)")
    parser.add_argument(
        "--open",
        action="append",
        default=[],
        metavar="URL",
        help="also open this page as the logged-in user (e.g. a task's report link; repeatable)",
    )
    parser.add_argument(
        "--history",
        action="append",
        default=[],
        metavar="MODEL",
        help="also check the serving history page of this model (/ct/serving/MODEL; repeatable)",
    )
    parser.add_argument("--user", help="default: the login Airflow standalone generated")
    parser.add_argument("--password")
    args = parser.parse_args(argv)

    try:
        find_chromium()
    except ChromiumNotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.user and args.password:
        user, password = args.user, args.password
    else:
        import stack

        user, password = stack.airflow_login()

    links = {f"open-{i + 1}": url for i, url in enumerate(args.open)}
    history_pages = {m: f"{args.base_url.rstrip('/')}/ct/serving/{quote(m)}" for m in args.history}
    report = run_ui_check(
        args.base_url,
        user,
        password,
        args.dags,
        args.out,
        timeout=args.timeout,
        links=links,
        history_pages=history_pages,
    )
    passed = len(report.results) - len(report.failures)
    print(
        f"\n{'OK' if not report.failures else 'FAILED'}: {passed} passed, {len(report.failures)} failed "
        f"in {report.seconds:.0f}s; {len(report.screenshots)} screenshots in {args.out}"
    )
    for failure in report.failures:
        print(f"  {failure}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
