"""Browser check of the Airflow web UI with headless Chromium, driven over the DevTools Protocol.

Logs in through the real login form, then for the DAG list and for each DAG checks that its page
renders, that its ``doc_md`` shows in the "Dag Docs" dialog and that the trigger form shows every
param title (the form is never submitted). JS exceptions, console errors and HTTP >= 400 answers
from Airflow fail the check too. A PNG screenshot of every page and dialog goes to the out dir.

    .venv/bin/python scripts/ui_check.py [--base-url URL] [--out DIR] [--dag DAG_ID ...]

Exit status: 0 all checks passed, 1 a check failed, 2 chromium is not installed.
What the page is expected to show comes from the REST API, not from this file.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import requests
from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "scripts"))
from airflow_client import AirflowClient  # noqa: E402

DEFAULT_BASE_URL = "http://127.0.0.1:8080"
DEFAULT_OUT = REPO_ROOT / ".state" / "ui-check"
DAG_TAG = "continuous-training"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
VIEWPORT = (1440, 900)
MAX_SCREENSHOT_HEIGHT = 12000
# The UI's English labels (airflow/ui/dist/i18n/locales/en): a fresh browser profile gets English.
DOCS_BUTTON = "Dag Docs"  # dag.json header.buttons.dagDocs
TRIGGER_DIALOG_TITLE = "Trigger Dag"  # components.json triggerDag.title


class ChromiumNotFound(RuntimeError):
    pass


class UiTimeout(RuntimeError):
    pass


class CdpError(RuntimeError):
    pass


@dataclass
class Check:
    ok: bool
    kind: str  # login, dag-list, page, docs, trigger-form, browser-errors
    subject: str  # a dag_id, or "ui"
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


def _strip_markdown(text: str) -> str:
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links and images: their text
    text = re.sub(r"[`*_~]", "", text)
    return _squash(text)


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _doc_heading(doc_md: str | None) -> tuple[str | None, str | None]:
    """(heading text, raw line) of the first markdown heading, else of the first non-empty line."""
    if not doc_md:
        return None, None
    lines = [line.strip() for line in doc_md.splitlines() if line.strip()]
    heading = next((line for line in lines if re.match(r"#{1,6}\s", line)), lines[0] if lines else None)
    if heading is None:
        return None, None
    return _strip_markdown(re.sub(r"^#{1,6}\s+", "", heading).rstrip("#")), heading


def discover_dags(client: AirflowClient, tag: str = DAG_TAG) -> list[str]:
    dags = client._call("GET", "/dags", params={"tags": tag, "limit": 100})["dags"]
    return sorted(d["dag_id"] for d in dags if tag in {t["name"] for t in d.get("tags", [])})


def expectation(client: AirflowClient, dag_id: str) -> DagExpectation:
    details = client._call("GET", f"/dags/{quote(dag_id, safe='')}/details")
    heading, raw = _doc_heading(details.get("doc_md"))
    params = details.get("params") or {}
    titles, booleans = {}, []
    for name, param in params.items():
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


# --------------------------------------------------------------------------------------
# Chromium and the DevTools Protocol
# --------------------------------------------------------------------------------------


def find_chromium() -> str:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    raise ChromiumNotFound(
        "chromium not found on PATH: apt-get install chromium (scripts/setup.sh does it when run as root)"
    )


class Browser:
    """A headless Chromium in its own process group and temporary profile; ``close`` ends both."""

    def __init__(self, executable: str, timeout: float) -> None:
        self.profile = Path(tempfile.mkdtemp(prefix="ui-check-chromium-"))
        self.log_path = self.profile.parent / f"{self.profile.name}.log"
        self._log = self.log_path.open("wb")
        width, height = VIEWPORT
        self.proc = subprocess.Popen(
            [
                executable,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--remote-debugging-port=0",
                f"--user-data-dir={self.profile}",
                f"--window-size={width},{height}",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--lang=en-US",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: close() ends renderers and zygotes too
        )
        self.timeout = timeout

    def ws_url(self) -> str:
        """The browser's DevTools websocket, from the DevToolsActivePort file it writes."""
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}: {self._log_tail()}")
            with contextlib.suppress(OSError):
                lines = port_file.read_text().split()
                if len(lines) >= 2:
                    return f"ws://127.0.0.1:{lines[0]}{lines[1]}"
            time.sleep(0.1)
        raise UiTimeout(f"chromium wrote no DevToolsActivePort in {self.timeout:.0f}s: {self._log_tail()}")

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-2000:]
        return ""

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        # helpers (zygote, crashpad) may outlive the main process for a moment
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                break  # the group is gone
            time.sleep(0.2)
        self._log.close()
        shutil.rmtree(self.profile, ignore_errors=True)
        self.log_path.unlink(missing_ok=True)


class Cdp:
    """One websocket to the browser; pages are flat sessions on it."""

    def __init__(self, ws: Any, timeout: float) -> None:
        self.ws = ws
        self.timeout = timeout
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                message = json.loads(raw)
                if "id" in message:
                    future = self._pending.pop(message["id"], None)
                    if future is None or future.done():
                        continue
                    if "error" in message:
                        future.set_exception(CdpError(str(message["error"])))
                    else:
                        future.set_result(message.get("result", {}))
                else:
                    for listener in self.listeners:
                        listener(message)
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(CdpError("DevTools connection closed"))

    async def send(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None
    ) -> Any:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        future = asyncio.get_running_loop().create_future()
        self._pending[self._next_id] = future
        await self.ws.send(json.dumps(message))
        try:
            return await asyncio.wait_for(future, self.timeout)
        except TimeoutError:
            raise UiTimeout(f"no answer to {method} in {self.timeout:.0f}s") from None
        finally:
            self._pending.pop(message["id"], None)

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader


@dataclass
class BrowserEvent:
    stage: str
    text: str


class Page:
    """A browser tab: navigation, waiting, real mouse and keyboard input, screenshots, and every
    JS exception, console error and failed Airflow request, tagged with the current stage."""

    def __init__(self, cdp: Cdp, session: str, origin: str, timeout: float) -> None:
        self.cdp = cdp
        self.session = session
        self.origin = origin
        self.timeout = timeout
        self.stage = "start"
        self.events: list[BrowserEvent] = []
        self._failed_urls: set[tuple[str, str]] = set()
        self._request_urls: dict[str, str] = {}
        # Until the login form is submitted the visitor is anonymous: the UI's first API calls
        # (e.g. /ui/config) answer 401, which is how the app knows to send it to the login form.
        self.anonymous = True
        cdp.listeners.append(self._on_event)

    async def send(self, method: str, params: dict[str, Any] | None = None) -> Any:
        return await self.cdp.send(method, params, self.session)

    async def enable(self) -> None:
        for domain in ("Page", "Runtime", "Log", "Network"):
            await self.send(f"{domain}.enable")

    def _ours(self, url: str) -> bool:
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.netloc}" == self.origin

    def _record(self, text: str) -> None:
        self.events.append(BrowserEvent(self.stage, text[:500]))

    def _on_event(self, message: dict[str, Any]) -> None:
        if message.get("sessionId") != self.session:
            return
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            exc = details.get("exception", {})
            text = exc.get("description") or details.get("text") or "exception"
            self._record(f"JS exception: {text.splitlines()[0] if text else text} ({details.get('url', '')})")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in {"error", "assert"}:
            args = params.get("args", [])
            text = " ".join(str(a.get("value", a.get("description", a.get("type")))) for a in args)
            self._record(f"console.{params['type']}: {text}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            url = entry.get("url", "")
            # "Failed to load resource" entries repeat a failed response recorded below; other
            # origins' resources are not Airflow's to answer for.
            if entry.get("source") == "network" and (
                (self.stage, url) in self._failed_urls or (url and not self._ours(url))
            ):
                return
            self._record(f"log ({entry.get('source')}): {entry.get('text')} {url}".rstrip())
        elif method == "Network.responseReceived":
            response = params.get("response", {})
            url, status = response.get("url", ""), int(response.get("status", 0))
            if status >= 400 and self._ours(url):
                self._failed_urls.add((self.stage, url))
                if status == 401 and self.anonymous:
                    return
                self._record(f"HTTP {status} {response.get('statusText', '')} from {url}")
        elif method == "Network.requestWillBeSent":
            self._request_urls[params.get("requestId", "")] = params.get("request", {}).get("url", "")
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            # canceled: the page itself dropped the request (navigation, aborted fetch), no error
            url = self._request_urls.get(params.get("requestId", ""), "")
            # The browser's own favicon request from a sandboxed report (an opaque origin, so no
            # login cookie) gets Airflow's 401 JSON, which ORB blocks: not the page's failure.
            if self._ours(url) and urlsplit(url).path != "/favicon.ico":
                self._record(f"request failed: {params.get('errorText')} ({params.get('type')}) {url}")

    def errors_since(self, mark: int) -> list[str]:
        return [e.text for e in self.events[mark:]]

    # ---- JavaScript ----------------------------------------------------------------

    async def js(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True}
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise CdpError(
                f"evaluating {expression[:80]!r}: "
                f"{details.get('exception', {}).get('description') or details.get('text')}"
            )
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, what: str, timeout: float | None = None) -> Any:
        """Poll ``expression`` until it is truthy; its value. UiTimeout names ``what``."""
        deadline = time.monotonic() + (timeout or self.timeout)
        last_error = ""
        while True:
            try:
                value = await self.js(expression)
                if value:
                    return value
            except CdpError as exc:  # e.g. the context went away during a navigation
                last_error = f" (last error: {exc})"
            if time.monotonic() > deadline:
                raise UiTimeout(
                    f"timed out after {timeout or self.timeout:.0f}s waiting for {what}{last_error}"
                )
            await asyncio.sleep(0.25)

    async def navigate(self, url: str) -> None:
        result = await self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise CdpError(f"navigating to {url}: {result['errorText']}")
        await self.wait_for("document.readyState === 'complete'", f"{url} to load")

    async def text(self, selector: str = "body") -> str:
        return await self.js(f"document.querySelector({json.dumps(selector)})?.innerText") or ""

    async def settle(self, quiet_s: float = 1.0) -> None:
        """Give the app a moment to finish requests and rendering after an action."""
        await asyncio.sleep(quiet_s)

    # ---- input ---------------------------------------------------------------------

    async def click(self, find_js: str, what: str) -> None:
        """Click, with real mouse events, the element that the JS expression ``find_js`` returns."""
        box = await self.wait_for(
            f"""(() => {{
                const el = ({find_js});
                if (!el || el.disabled) return null;
                el.scrollIntoView({{block: 'center', inline: 'center'}});
                const r = el.getBoundingClientRect();
                if (r.width === 0 || r.height === 0) return null;
                return {{x: r.left + r.width / 2, y: r.top + r.height / 2}};
            }})()""",
            f"{what} to be clickable",
        )
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            await self.send(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": box["x"], "y": box["y"], "button": "left", "clickCount": 1},
            )

    async def type_into(self, selector: str, text: str) -> None:
        await self.click(f"document.querySelector({json.dumps(selector)})", selector)
        await self.js(f"document.querySelector({json.dumps(selector)}).select()")
        await self.send("Input.insertText", {"text": text})

    async def press_escape(self) -> None:
        for kind in ("keyDown", "keyUp"):
            await self.send(
                "Input.dispatchKeyEvent",
                {"type": kind, "key": "Escape", "code": "Escape", "windowsVirtualKeyCode": 27},
            )

    # ---- screenshots ---------------------------------------------------------------

    # The UI scrolls inside panels and dialogs, not the document. [largest, total] pixels that
    # scrollable boxes (and the document) hide below their fold.
    _HIDDEN = """(() => {
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
    })()"""

    # Boxes of a fixed height inside ``root`` (a dialog's scrolling body) do not grow with the
    # viewport: let them, and their ancestors up to ``root``, take their content's height for the
    # screenshot. window.__uiCheckRestore puts the styles back.
    _UNCLIP = """(root) => {
        const saved = [];
        const set = (el, props) => {
            saved.push([el, el.getAttribute('style')]);
            for (const [k, v] of Object.entries(props)) el.style.setProperty(k, v, 'important');
        };
        if (root) {
            for (const el of [root, ...root.querySelectorAll('*')]) {
                if (el.scrollHeight - el.clientHeight > 1
                        && /(auto|scroll)/.test(getComputedStyle(el).overflowY)) {
                    set(el, {'height': 'auto', 'max-height': 'none', 'overflow-y': 'visible'});
                    for (let a = el.parentElement; a && a !== root.parentElement; a = a.parentElement) {
                        set(a, {'height': 'auto', 'max-height': 'none'});
                    }
                }
            }
        }
        window.__uiCheckRestore = () => {
            for (const [el, style] of saved.reverse()) {
                if (style === null) el.removeAttribute('style'); else el.setAttribute('style', style);
            }
        };
        return saved.length;
    }"""

    async def set_viewport(self, width: int, height: int) -> None:
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    async def screenshot(self, path: Path, unclip: str | None = None) -> Path:
        """A PNG of the whole page: the viewport grows until nothing that scrolls hides anything
        (up to MAX_SCREENSHOT_HEIGHT); ``unclip`` (JS for an element, e.g. a dialog) first lets
        the fixed-height scrolling boxes inside it grow too. Everything is put back afterwards."""
        width, height = VIEWPORT
        unclipped = False
        try:
            if unclip:
                await self.js(f"({self._UNCLIP})({unclip})")
                unclipped = True
                await asyncio.sleep(0.3)
            for _ in range(4):  # growing one box can reveal the next
                largest, total = await self.js(self._HIDDEN)
                taller = min(height + largest, MAX_SCREENSHOT_HEIGHT)
                if largest <= 1 or taller <= height:
                    break
                await self.set_viewport(width, taller)
                await asyncio.sleep(0.5)
                if (await self.js(self._HIDDEN))[1] >= total:  # a box of fixed height: growing is no use
                    await self.set_viewport(width, height)
                    break
                height = taller
            shot = await self.send("Page.captureScreenshot", {"format": "png"})
        finally:
            if unclipped:
                await self.js("window.__uiCheckRestore && window.__uiCheckRestore()")
            await self.set_viewport(*VIEWPORT)
            await asyncio.sleep(0.3)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


# --------------------------------------------------------------------------------------
# the checks
# --------------------------------------------------------------------------------------

# JS helpers, injected into every check that needs them
_DIALOG_JS = """(title) => {
    const dialogs = [...document.querySelectorAll('[role="dialog"], [role="alertdialog"]')]
        .filter(d => d.offsetParent !== null || d.getClientRects().length > 0);
    return dialogs.find(d => !title || d.innerText.includes(title)) || null;
}"""
_BUTTON_JS = """(label, root) => [...(root || document).querySelectorAll('button, [role="button"]')]
    .find(b => b.innerText.trim() === label || b.getAttribute('aria-label') === label) || null"""


def _dialog(title: str) -> str:
    """JS: the open dialog whose text includes ``title`` (any open dialog for ""), else null."""
    return f"({_DIALOG_JS})({json.dumps(title)})"


def _button(label: str) -> str:
    """JS: the button labelled ``label``, else null."""
    return f"({_BUTTON_JS})({json.dumps(label)})"


class UiChecker:
    def __init__(self, page: Page, base_url: str, out_dir: Path, report: UiReport) -> None:
        self.page = page
        self.base_url = base_url
        self.out_dir = out_dir
        self.report = report
        self._shot_no = 0

    def check(self, ok: bool, kind: str, subject: str, detail: str) -> bool:
        result = Check(ok, kind, subject, detail)
        self.report.results.append(result)
        print(result, flush=True)
        return ok

    async def shot(self, name: str, unclip: str | None = None) -> Path:
        self._shot_no += 1
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        path = await self.page.screenshot(self.out_dir / f"{self._shot_no:02d}-{safe}.png", unclip)
        self.report.screenshots.append(path)
        return path

    async def dump(self, name: str) -> None:
        """On a failure: the page's text beside the screenshots, to see what it showed instead."""
        try:
            text = await self.page.text()
            (self.out_dir / f"{name}.failed.txt").write_text(
                f"{await self.page.js('location.href')}\n\n{text}"
            )
        except (UiTimeout, CdpError, OSError) as exc:
            print(f"  (could not save the page text: {exc})", flush=True)

    async def stage(self, name: str, subject: str, body: Callable[[], Any]) -> None:
        """Run one check, then one more: no browser errors happened while it ran."""
        self.page.stage = f"{subject} {name}"
        mark = len(self.page.events)
        try:
            await body()
        except (UiTimeout, CdpError) as exc:
            self.check(False, name, subject, str(exc))
            await self.dump(f"{subject}-{name}")
            with contextlib.suppress(UiTimeout, CdpError, OSError):
                await self.shot(f"{subject}-{name}-failed")
                await self._dismiss_dialogs()  # so the next check starts from a clean page
        await self.page.settle(1.0)  # late errors belong to this stage, not the next
        errors = self.page.errors_since(mark)
        self.check(
            not errors,
            "browser-errors",
            subject,
            f"during {name}: "
            + ("; ".join(errors) if errors else "no JS exceptions, console errors or HTTP >= 400"),
        )

    # ---- a page a task links to (report viewer, MLflow) -------------------------------

    async def linked_page(self, url: str, name: str) -> None:
        """Open ``url`` in the logged-in browser: it must render a page with content, not an error."""
        page = self.page
        await page.navigate(url)
        await page.wait_for("document.readyState === 'complete'", f"{url} to load")
        await page.settle(2.0)
        title = await page.js("document.title")
        length = await page.js("document.body ? document.body.innerText.trim().length : 0")
        await self.shot(f"link-{name}")
        self.check(
            bool(length and length > 200) and "Not authenticated" not in (await page.text())[:500],
            "link",
            name,
            f"{url} rendered {title!r} with {length} characters of text",
        )

    # ---- login ---------------------------------------------------------------------

    async def login(self, user: str, password: str) -> None:
        page = self.page
        await page.navigate(f"{self.base_url}/")
        where = await page.wait_for(
            """(() => document.querySelector('input[name="username"]') ? 'form'
                : document.querySelector('a[href$="/dags"]')
                  ? 'app' : null)()""",
            "the login form or the app",
        )
        if where == "app":
            page.anonymous = False
            self.check(True, "login", "ui", f"no login needed at {self.base_url}/ (the app rendered)")
            return
        login_url = await page.js("location.href")
        await page.type_into('input[name="username"]', user)
        await page.type_into('input[name="password"]', password)
        await self.shot("login-form")
        await page.click(_button("Sign in"), "the Sign in button")
        page.anonymous = False
        # Success leaves the form; a refusal shows an alert above the form (the "Simple auth
        # manager enabled" banner is one below it).
        outcome = await page.wait_for(
            """(() => {
                if (!location.pathname.includes('/auth/login')) {
                    return document.readyState === 'complete' ? 'ok' : null;
                }
                const form = document.querySelector('input[name="username"]');
                const alert = form && [...document.querySelectorAll('.chakra-alert__root, [role="alert"]')]
                    .find(a => a.compareDocumentPosition(form) & Node.DOCUMENT_POSITION_FOLLOWING);
                return alert ? 'refused: ' + alert.innerText.replace(/\\s+/g, ' ').trim() : null;
            })()""",
            "the login to leave the form",
        )
        if outcome != "ok":
            await self.shot("login-refused")
            raise UiTimeout(f"the login form at {login_url} says {outcome}")
        cookies = (await page.send("Network.getCookies", {"urls": [self.base_url + "/"]}))["cookies"]
        token = next((c for c in cookies if c["name"] == "_token"), None)
        await page.wait_for(
            "document.querySelector('a[href$=\"/dags\"]') !== null", "the app's navigation (a link to /dags)"
        )
        await page.settle(1.5)
        await self.shot("home")
        self.check(
            token is not None,
            "login",
            "ui",
            f"filled and submitted the form at {login_url}; landed on "
            f"{await page.js('location.pathname')} "
            + ("with the _token cookie set" if token else "WITHOUT a _token cookie"),
        )

    # ---- DAG list ------------------------------------------------------------------

    async def dag_list(self, dags: list[DagExpectation]) -> None:
        page = self.page
        await page.navigate(f"{self.base_url}/dags")
        hrefs = [f"/dags/{quote(d.dag_id, safe='')}" for d in dags]
        missing_js = f"""(() => {{
            const hrefs = {json.dumps(hrefs)};
            const links = [...document.querySelectorAll('a[href]')].map(a => new URL(a.href).pathname);
            return hrefs.filter(h => !links.some(l => l.endsWith(h)));
        }})()"""
        with contextlib.suppress(UiTimeout):
            await page.wait_for(f"{missing_js}.length === 0", "every DAG's link on the DAG list")
        missing = await page.js(missing_js)
        await page.settle(1.0)
        await self.shot("dag-list")
        self.check(
            not missing,
            "dag-list",
            "ui",
            f"/dags lists {len(dags) - len(missing)}/{len(dags)} DAGs as links"
            + (f"; missing: {missing}" if missing else f" ({', '.join(d.dag_id for d in dags)})"),
        )

    # ---- one DAG -------------------------------------------------------------------

    async def dag_page(self, dag: DagExpectation) -> None:
        page = self.page
        url = f"{self.base_url}/dags/{quote(dag.dag_id, safe='')}"
        await page.navigate(url)
        await page.wait_for(
            f"""(() => document.body.innerText.includes({json.dumps(dag.display_name)})
                && document.querySelector('[data-testid="trigger-dag-button"]') !== null)()""",
            f"{url} to show {dag.display_name!r} and its Trigger button",
        )
        await page.settle(2.0)  # the grid and the run details load after the header
        await self.shot(f"{dag.dag_id}-page")
        title = await page.js("document.title")
        self.check(
            True, "page", dag.dag_id, f"{url} rendered {dag.display_name!r} and a Trigger button ({title})"
        )

    async def dag_docs(self, dag: DagExpectation) -> None:
        page = self.page
        if not dag.doc_heading:
            self.check(False, "docs", dag.dag_id, "the DAG has no doc_md (GET /dags/{id}/details)")
            return
        await page.click(_button(DOCS_BUTTON), f"the {DOCS_BUTTON!r} button")
        await page.wait_for(f"{_dialog('')} !== null", f"the {DOCS_BUTTON!r} dialog")
        heading = json.dumps(dag.doc_heading)
        try:
            dialog_text = await page.wait_for(
                f"""(() => {{
                    const d = {_dialog("")};
                    if (!d) return null;
                    const text = d.innerText.replace(/\\s+/g, ' ');
                    return text.includes({heading}) ? text : null;
                }})()""",
                f"the dialog to show the doc_md heading {dag.doc_heading!r}",
            )
        except UiTimeout as exc:
            shown = await page.js(
                f"""(() => {{ const d = {_dialog("")};
                    return d ? d.innerText.replace(/\\s+/g, ' ').slice(0, 200) : null; }})()"""
            )
            raise UiTimeout(f"{exc}; it shows: {shown!r}") from None
        rendered = await page.js(
            f"""(() => {{
                const d = {_dialog("")};
                const h = [...d.querySelectorAll('h1,h2,h3,h4,h5,h6')]
                    .find(h => h.innerText.replace(/\\s+/g, ' ').trim() === {heading});
                return h ? h.tagName : null;
            }})()"""
        )
        await page.settle(0.5)
        await self.shot(f"{dag.dag_id}-docs", unclip=_dialog(""))
        raw_shown = bool(dag.doc_heading_raw and dag.doc_heading_raw.startswith("#")) and (
            _squash(dag.doc_heading_raw) in dialog_text
        )
        ok = not raw_shown
        self.check(
            ok,
            "docs",
            dag.dag_id,
            f"the {DOCS_BUTTON!r} dialog shows the doc_md heading {dag.doc_heading!r}"
            + (f" as an <{rendered.lower()}>" if rendered else "")
            + ("" if ok else " but as raw markdown"),
        )
        await self._close_dialog("")

    async def trigger_form(self, dag: DagExpectation) -> None:
        page = self.page
        await page.click(
            "document.querySelector('[data-testid=\"trigger-dag-button\"]')", "the Trigger button"
        )
        # After a run with a conf, the button opens a menu: "Trigger" / "Trigger again with this config"
        opened = await page.wait_for(
            f"""(() => {_dialog(TRIGGER_DIALOG_TITLE)} ? 'dialog'
                : document.querySelector('[role="menuitem"][data-value="trigger"]') ? 'menu' : null)()""",
            "the trigger dialog (or the trigger menu)",
        )
        if opened == "menu":
            await page.click(
                'document.querySelector(\'[role="menuitem"][data-value="trigger"]\')', "the Trigger menu item"
            )
        dialog = _dialog(TRIGGER_DIALOG_TITLE)
        await page.wait_for(
            f"(() => {{ const d = {dialog}; "
            "return d && d.querySelector('[data-testid=\"trigger-dag-submit\"]') !== null; })()",
            f"the {TRIGGER_DIALOG_TITLE!r} dialog with its (unclicked) Trigger button",
        )
        titles = list(dag.param_titles.values())
        text_js = f"(() => {{ const d = {dialog}; return d ? d.innerText.replace(/\\s+/g, ' ') : null; }})()"
        # The form comes once the DAG's details have loaded: wait for the titles (bounded).
        with contextlib.suppress(UiTimeout):
            await page.wait_for(
                f"(() => {{ const t = {text_js}; return t !== null && {json.dumps(titles)}"
                ".every(x => t.includes(x.replace(/\\s+/g, ' '))); })()",
                "every param title in the trigger dialog",
                timeout=page.timeout / 2,
            )
        seen = await page.js(text_js)
        if seen is None:
            raise UiTimeout("the trigger dialog went away")
        # Params sit in accordion sections, one per param "section" ("Run Parameters" by default,
        # open); open any closed one and read it too. "Advanced Options" holds no params.
        closed = await page.js(
            f"""(() => [...{dialog}.querySelectorAll(
                    '[data-scope="accordion"][data-part="item-trigger"][aria-expanded="false"]')]
                .filter(t => !t.id.endsWith(':advancedOptions')).map(t => t.id))()"""
        )
        for section_id in closed if any(_squash(t) not in seen for t in titles) else []:
            await page.click(f"document.getElementById({json.dumps(section_id)})", f"section {section_id}")
            await page.settle(0.5)
            seen += " " + (await page.js(text_js) or "")
        missing = [t for t in titles if _squash(t) not in seen]
        labels = await page.js(
            f"""(() => [...{dialog}.querySelectorAll('label[data-part="label"]').values()].map(l => {{
                const c = l.cloneNode(true);
                c.querySelectorAll('[aria-hidden="true"]').forEach(x => x.remove());
                return c.textContent.replace(/\\s+/g, ' ').trim();
            }}))()"""
        )
        as_labels = sum(1 for t in titles if _squash(t) in labels)
        # boolean params render as switches: the input is named element_<param>
        no_switch = await page.js(
            f"""(() => {{ const d = {dialog};
                const input = n => '[data-scope="switch"] input[type="checkbox"][name="'
                    + CSS.escape('element_' + n) + '"]';
                return {json.dumps(dag.boolean_params)}.filter(n => !d.querySelector(input(n)));
            }})()"""
        )
        booleans = len(dag.boolean_params)
        header_ok = dag.display_name in (
            await page.js(f"{dialog}.querySelector('h2, h3, header')?.innerText") or ""
        )
        await self.shot(f"{dag.dag_id}-trigger-form", unclip=dialog)
        self.check(
            not missing and not no_switch,
            "trigger-form",
            dag.dag_id,
            f"the {TRIGGER_DIALOG_TITLE!r} dialog"
            + (f" for {dag.display_name!r}" if header_ok else "")
            + f" shows {len(titles) - len(missing)}/{len(titles)} param titles ({as_labels} as field labels)"
            + (f"; missing: {missing}" if missing else "")
            + f"; {booleans - len(no_switch)}/{booleans} boolean params as switches"
            + (f"; no switch for: {no_switch}" if no_switch else "")
            + " (not submitted)",
        )
        await self._close_dialog(TRIGGER_DIALOG_TITLE)

    async def _dismiss_dialogs(self) -> None:
        for _ in range(3):
            if await self.page.js(f"{_dialog('')} === null"):
                return
            await self.page.press_escape()
            await self.page.settle(0.5)

    async def _close_dialog(self, title: str) -> None:
        page = self.page
        dialog = _dialog(title)
        closer = f"""(() => {{ const d = {dialog}; if (!d) return null;
            return d.querySelector('[aria-label="Close"], [data-part="close-trigger"]'); }})()"""
        if await page.js(f"{closer} !== null"):
            await page.click(closer, "the dialog's close button")
        else:
            await page.press_escape()
        await page.wait_for(f"{dialog} === null", "the dialog to close", timeout=10)


# --------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------


async def _run(
    browser: Browser,
    base_url: str,
    user: str,
    password: str,
    dags: list[DagExpectation],
    out_dir: Path,
    report: UiReport,
    timeout: float,
    links: dict[str, str],
) -> None:
    ws_url = browser.ws_url()
    async with connect(ws_url, max_size=None, open_timeout=timeout, ping_interval=None) as ws:
        cdp = Cdp(ws, timeout)
        try:
            page = await _new_page(cdp, base_url, timeout)
            checker = UiChecker(page, base_url, out_dir, report)
            await checker.stage("login", "ui", lambda: checker.login(user, password))
            if not any(c.kind == "login" and c.ok for c in report.results):
                return  # nothing else can work
            await checker.stage("dag-list", "ui", lambda: checker.dag_list(dags))
            for dag in dags:
                await checker.stage("page", dag.dag_id, lambda dag=dag: checker.dag_page(dag))
                await checker.stage("docs", dag.dag_id, lambda dag=dag: checker.dag_docs(dag))
                await checker.stage("trigger-form", dag.dag_id, lambda dag=dag: checker.trigger_form(dag))
            for name, url in links.items():
                await checker.stage("link", name, lambda name=name, url=url: checker.linked_page(url, name))
        finally:
            await cdp.close()


async def _new_page(cdp: Cdp, base_url: str, timeout: float) -> Page:
    """A blank tab attached to ``cdp``, its events enabled, at the check's viewport size."""
    target = await cdp.send("Target.createTarget", {"url": "about:blank"})
    attached = await cdp.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
    page = Page(cdp, attached["sessionId"], _origin(base_url), timeout)
    await page.enable()
    await page.set_viewport(*VIEWPORT)
    return page


async def _inspect(
    browser: Browser,
    base_url: str,
    user: str,
    password: str,
    probes: dict[str, tuple[str, str]],
    out_dir: Path,
    report: UiReport,
    timeout: float,
    results: dict[str, dict[str, Any]],
) -> None:
    ws_url = browser.ws_url()
    async with connect(ws_url, max_size=None, open_timeout=timeout, ping_interval=None) as ws:
        cdp = Cdp(ws, timeout)
        try:
            page = await _new_page(cdp, base_url, timeout)
            checker = UiChecker(page, base_url, out_dir, report)
            await checker.stage("login", "ui", lambda: checker.login(user, password))
            if not any(c.kind == "login" and c.ok for c in report.results):
                return
            for name, (url, probe) in probes.items():
                page.stage = name
                mark = len(page.events)
                await page.navigate(url)
                await page.settle(2.0)
                value = await page.js(probe)
                await page.settle(1.0)
                await checker.shot(f"inspect-{name}")
                results[name] = {"value": value, "events": page.errors_since(mark)}
        finally:
            await cdp.close()


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
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report, results = UiReport(), {}
    browser = Browser(find_chromium(), timeout)
    try:
        asyncio.run(
            asyncio.wait_for(
                _inspect(
                    browser, base_url.rstrip("/"), user, password, probes, out_dir, report, timeout, results
                ),
                4 * timeout + 3 * timeout * len(probes),
            )
        )
    except TimeoutError as exc:
        report.results.append(Check(False, "browser", "ui", str(exc) or "the inspection ran past its budget"))
    except (UiTimeout, CdpError, OSError, RuntimeError, WebSocketException) as exc:
        report.results.append(Check(False, "browser", "ui", f"{type(exc).__name__}: {exc}"))
    finally:
        browser.close()
    report.seconds = time.monotonic() - started
    return report, results


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def run_ui_check(
    base_url: str,
    user: str,
    password: str,
    dag_ids: list[str] | None,
    out_dir: Path,
    timeout: float = 45.0,
    links: dict[str, str] | None = None,
) -> UiReport:
    """Check the UI in headless Chromium; ``dag_ids=None`` checks every DAG tagged continuous-training.

    ``links`` ({name: url}) are pages a task links to (reports, MLflow): each must render for the
    logged-in user.

    Raises ChromiumNotFound when no chromium is installed. Every wait is bounded by ``timeout``
    seconds, and the browser and its temporary profile are gone when this returns.
    """
    started = time.monotonic()
    base_url = base_url.rstrip("/")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in [*out_dir.glob("[0-9][0-9]-*.png"), *out_dir.glob("*.failed.txt")]:  # a previous run's
        old.unlink()
    executable = find_chromium()
    report = UiReport()

    def fail(kind: str, subject: str, detail: str) -> UiReport:
        result = Check(False, kind, subject, detail)
        report.results.append(result)
        print(result, flush=True)
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
    budget = 4 * timeout + 6 * timeout * len(dags) + 2 * timeout * len(links or {})
    browser = Browser(executable, timeout)
    try:
        asyncio.run(
            asyncio.wait_for(
                _run(browser, base_url, user, password, dags, out_dir, report, timeout, links or {}), budget
            )
        )
    except TimeoutError as exc:  # asyncio.wait_for's says nothing
        fail("browser", "ui", str(exc) or f"the whole check ran past its {budget:.0f}s budget")
    except (UiTimeout, CdpError, OSError, RuntimeError, WebSocketException) as exc:
        fail("browser", "ui", f"{type(exc).__name__}: {exc}")
    finally:
        browser.close()
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
    report = run_ui_check(
        args.base_url, user, password, args.dags, args.out, timeout=args.timeout, links=links
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
