"""The serving history as HTML (the ``ct_reports`` plugin serves it at ``/ct/serving/``).

One page per model: a timeline of the served version over time (inline SVG) and a table of the
entries, newest first; and an index of the models that have a history. Plain HTML and CSS, no
script at all, nothing loaded from anywhere. Reasons, actors and error texts are user input:
every value goes through :func:`html.escape` (quotes included) before it is placed in the page,
as element text, attribute value or SVG ``<title>``, so no entry can ever become markup.
"""

from __future__ import annotations

from datetime import datetime
from html import escape
from typing import Any
from urllib.parse import quote

from ml.serving_history import HISTORY_FILE, HISTORY_PREFIX, SERVING_ACTIONS, check_model_name

RESULT_COLOURS = {"ok": "#2e7d32", "failed": "#c62828", "rolled_back": "#ef6c00"}
_STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #1d2330; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 24px 0 8px; }
.muted { color: #5f6b7a; } a { color: #0b57d0; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid #dde3ea; padding: 6px 8px; text-align: left; vertical-align: top; }
th { background: #f3f6f9; font-weight: 600; white-space: nowrap; }
td.text { max-width: 420px; overflow-wrap: anywhere; white-space: pre-wrap; }
.result { font-weight: 600; } .ok { color: #2e7d32; } .failed { color: #c62828; }
.rolled_back { color: #ef6c00; }
svg.timeline { border: 1px solid #dde3ea; background: #fbfcfd; max-width: 100%; height: auto; }
svg text { font: 12px system-ui, sans-serif; fill: #3c4654; }
.legend span { margin-right: 16px; }
"""


def _e(value: Any) -> str:
    """Escaped text of ``value`` ("" for None): safe as element text and as a quoted attribute."""
    return "" if value is None else escape(str(value), quote=True)


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="referrer" content="no-referrer">'
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def _version_order(version: str) -> tuple[int, int, str]:
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


def _when(entry: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(entry["at"].replace("Z", "+00:00"))


def timeline_svg(entries: list[dict[str, Any]], width: int = 960) -> str:
    """An inline SVG: one row per version, the served version over time as a step line (from the
    successful entries), and a dot per entry coloured by its result (hover: what happened)."""
    points = [e for e in entries if e.get("to_version")]
    if not points:
        return '<p class="muted" id="timeline-empty">No entry names a version yet: nothing to draw.</p>'
    points = sorted(points, key=_when)
    versions = sorted(
        {e["to_version"] for e in points} | {e["from_version"] for e in points if e.get("from_version")},
        key=_version_order,
    )
    left, right, top, row = 70, 20, 20, 34
    height = top + row * len(versions) + 40
    t0, t1 = _when(points[0]).timestamp(), _when(points[-1]).timestamp()
    span = max(t1 - t0, 1.0)
    inner = width - left - right

    def x(entry: dict[str, Any]) -> float:
        return left + (inner / 2 if t1 == t0 else (_when(entry).timestamp() - t0) / span * inner)

    def y(version: str) -> float:
        return top + row * (len(versions) - 1 - versions.index(version)) + row / 2

    parts = [
        f'<svg class="timeline" id="timeline" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="served version over time">'
    ]
    for version in versions:
        parts.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y(version):.1f}" y2="{y(version):.1f}" '
            'stroke="#e3e8ee"/>'
            f'<text x="{left - 10}" y="{y(version) + 4:.1f}" text-anchor="end">v{_e(version)}</text>'
        )
    served = [e for e in points if e["result"] == "ok" and e["action"] in SERVING_ACTIONS]
    if served:
        path, last = [], None
        for entry in served:
            ex, ey = x(entry), y(entry["to_version"])
            path.append(f"M{ex:.1f},{ey:.1f}" if last is None else f"H{ex:.1f}V{ey:.1f}")
            last = ey
        path.append(f"H{width - right}")
        parts.append(
            f'<path class="served" d="{"".join(path)}" fill="none" stroke="#0b57d0" stroke-width="2"/>'
        )
    for entry in points:
        colour = RESULT_COLOURS.get(entry["result"], "#5f6b7a")
        hover = (
            f"{entry['at']} {entry['action']} {entry['result']}: v{entry.get('from_version') or '-'} -> "
            f"v{entry['to_version']} by {entry['actor']}: {entry.get('reason') or ''}"
        )
        parts.append(
            f'<circle class="entry {_e(entry["result"])}" cx="{x(entry):.1f}" '
            f'cy="{y(entry["to_version"]):.1f}" '
            f'r="6" fill="{colour}" stroke="#fff" stroke-width="1.5"><title>{_e(hover)}</title></circle>'
        )
    axis_y = top + row * len(versions) + 22
    parts.append(f'<text x="{left}" y="{axis_y}">{_e(points[0]["at"][:19])}</text>')
    if t1 != t0:
        parts.append(
            f'<text x="{width - right}" y="{axis_y}" text-anchor="end">{_e(points[-1]["at"][:19])}</text>'
        )
    parts.append("</svg>")
    legend = "".join(
        f'<span><svg width="12" height="12"><circle cx="6" cy="6" r="5" fill="{c}"/></svg> {_e(r)}</span>'
        for r, c in RESULT_COLOURS.items()
    )
    return "".join(parts) + f'<p class="legend muted">{legend}<span>blue line: the version served</span></p>'


COLUMNS = ("at (UTC)", "action", "result", "from", "to", "actor", "reason", "seconds", "detail")


def history_table(entries: list[dict[str, Any]]) -> str:
    """The entries as a table, newest first."""
    rows = []
    for entry in sorted(entries, key=lambda e: (_when(e), e["id"]), reverse=True):
        seconds = entry.get("seconds")
        cells = (
            f"<td>{_e(entry['at'])}</td>",
            f"<td>{_e(entry['action'])}</td>",
            f'<td class="result {_e(entry["result"])}">{_e(entry["result"])}</td>',
            f"<td>{_e(entry.get('from_version') or '–')}</td>",
            f"<td>{_e(entry.get('to_version') or '–')}</td>",
            f'<td class="text">{_e(entry["actor"])}</td>',
            f'<td class="text">{_e(entry.get("reason"))}</td>',
            f"<td>{'' if seconds is None else _e(f'{seconds:.1f}')}</td>",
            f'<td class="text">{_e(entry.get("detail"))}</td>',
        )
        rows.append(f'<tr class="entry" data-id="{_e(entry["id"])}">{"".join(cells)}</tr>')
    head = "".join(f"<th>{_e(c)}</th>" for c in COLUMNS)
    return f'<table id="history"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def render_history_page(model: str, entries: list[dict[str, Any]]) -> str:
    """The page of one model's serving history (``entries`` in any order)."""
    check_model_name(model)
    served = [
        e for e in entries if e["result"] == "ok" and e.get("to_version") and e["action"] in SERVING_ACTIONS
    ]
    now = max(served, key=_when)["to_version"] if served else None
    raw = f"../reports/{HISTORY_PREFIX}/{quote(model)}/{HISTORY_FILE}"
    body = [
        f'<p class="muted"><a href="./">all models</a> · <a href="{_e(raw)}">history.jsonl</a></p>',
        f"<h1>Serving history of {_e(model)}</h1>",
        '<p class="muted">Every change of what the model\'s Ray Serve application serves: deploys, '
        "automatic rollbacks, and the operator's rollback, pin and promote, failed attempts included. "
        f"{len(entries)} entries" + (f"; by the history, v{_e(now)} serves now." if now else ".") + "</p>",
        "<h2>Timeline</h2>",
        timeline_svg(entries),
        "<h2>Entries (newest first)</h2>",
        history_table(entries) if entries else '<p class="muted" id="history-empty">No entries yet.</p>',
    ]
    return _page(f"Serving history: {model}", "\n".join(body))


def render_index_page(models: dict[str, dict[str, Any] | None]) -> str:
    """The list of models with a history: {model: its newest entry (or None)}."""
    rows = []
    for model, last in sorted(models.items()):
        summary = (
            f"{_e(last['at'])}: {_e(last['action'])} {_e(last['result'])} "
            f"v{_e(last.get('from_version') or '-')} → v{_e(last.get('to_version') or '-')}"
            if last
            else ""
        )
        rows.append(f'<tr><td><a href="{_e(quote(model))}">{_e(model)}</a></td><td>{summary}</td></tr>')
    table = (
        f'<table id="models"><thead><tr><th>model</th><th>last change</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
        if rows
        else '<p class="muted" id="models-empty">No model has a serving history yet.</p>'
    )
    body = (
        "<h1>Serving history</h1>"
        '<p class="muted">Models whose Ray Serve application changed what it serves '
        f"(<code>{_e(HISTORY_PREFIX)}/&lt;model&gt;/{_e(HISTORY_FILE)}</code> in the data bucket).</p>{table}"
    )
    return _page("Serving history", body)
