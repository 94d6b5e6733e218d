"""Airflow plugin ``ct_reports``: the pipeline's reports, opened from the Airflow UI.

The Great Expectations Data Docs and the Evidently drift reports live in S3/MinIO, which a
browser usually cannot (and should not) read directly. This plugin adds a small FastAPI app to
Airflow's api-server at ``/ct/reports/<key>`` that streams them from the data bucket to users
who are logged in to Airflow (the UI's session cookie, or a bearer token), so the extra links on
task instances open them with Airflow's own access control and no public bucket.

It also renders the serving history of each model (:mod:`ml.serving_history`): ``/ct/serving/``
lists the models that have one, ``/ct/serving/<model>`` shows its timeline and entries.

Only report objects are served: keys under ``reports/`` and the validation reports under
``quarantine/<dataset>/<batch>/_validation/``. Raw or quarantined data itself is never served.

Reports are built from untrusted text (served texts, uploaded batches). The pipeline escapes it
when it writes them (:func:`ml.drift.report_html`, :func:`ml.validate.docs_safe_result`), and this
plugin serves every report so that, should something slip through, it still runs nowhere that
matters: see :data:`REPORT_HEADERS`.
"""

from __future__ import annotations

import re
from typing import ClassVar

from airflow.api_fastapi.core_api.security import get_user
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import Response

_REPORT_KEY = re.compile(r"^(reports/[^?#]+|quarantine/[^/]+/[^/]+/_validation/[^/?#]+)$")

# Every report response carries these. The page is served from Airflow's origin, whose cookie
# (``_token``) and API a script in it could otherwise use as the logged-in user.
# - ``sandbox allow-scripts`` (no ``allow-same-origin``): the page runs in an opaque origin. It can
#   read no cookie or storage of Airflow's, and its requests are cross-site, so the SameSite=Lax
#   ``_token`` cookie does not go with them. Scripts stay allowed: Evidently's report is a React app
#   that draws itself from inline JSON (without scripts it is a blank page). No ``allow-forms``,
#   ``allow-popups``, ``allow-top-navigation``, ``allow-modals``.
# - ``default-src 'none'`` and ``connect-src``/``form-action`` ``'none'``: no fetch, XHR, WebSocket,
#   beacon or form anywhere; scripts, styles, images and fonts only inline, ``data:`` or from the
#   page's own folder (``'self'``: the Data Docs' static/ files). No other origin at all: GX Data
#   Docs reference Bootstrap, jQuery and Vega on public CDNs, unpinned; they render without them
#   (unstyled) and never load third-party code into a page opened by Airflow users.
#   ``'unsafe-inline'`` is needed by both report kinds (their code and data are inline); what keeps
#   text from becoming code is the escaping when the reports are written.
# - ``frame-ancestors 'self'``: only Airflow's own pages may frame a report (no clickjacking).
# - ``nosniff``: a report is only ever what its Content-Type says (JSON is never sniffed as HTML).
# - ``no-referrer``, ``no-store``: report URLs and contents stay out of other sites' logs and caches.
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self' 'unsafe-inline'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data: blob:",
        "font-src 'self' data:",
        "connect-src 'none'",
        "form-action 'none'",
        "base-uri 'none'",
        "frame-ancestors 'self'",
        "sandbox allow-scripts",
    )
)
REPORT_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "private, no-store",
    "Cross-Origin-Resource-Policy": "same-origin",
}
# Types a browser shows in the page; anything else (parquet, unknown) is a download.
_INLINE_TYPES = ("text/html", "application/json", "text/css", "application/javascript", "image/")

app = FastAPI(
    title="Continuous-training reports",
    description="Data Docs and drift reports from the data bucket, for logged-in Airflow users.",
)


def report_response(key: str) -> Response:
    """The object as an HTTP response; 404 for anything that is not a report or does not exist."""
    from ct_airflow.settings import pipeline_settings
    from ml.storage import ObjectStore, guess_type

    if not _REPORT_KEY.match(key) or ".." in key.split("/"):
        raise HTTPException(
            404,
            f"{key!r} is not a report: only reports/… and quarantine/…/_validation/…",
            headers=REPORT_HEADERS,
        )
    store = ObjectStore(pipeline_settings())
    if not store.exists(key):
        raise HTTPException(404, f"s3://{store.bucket}/{key} does not exist", headers=REPORT_HEADERS)
    media_type = guess_type(key)  # text/* gets "; charset=utf-8" from Starlette
    headers = dict(REPORT_HEADERS)
    if not media_type.startswith(_INLINE_TYPES):
        headers["Content-Disposition"] = "attachment"
    return Response(store.get_bytes(key), media_type=media_type, headers=headers)


@app.get("/reports/{key:path}", summary="A report object from the data bucket")
def get_report(key: str, _user=Depends(get_user)) -> Response:  # noqa: B008 (FastAPI dependency)
    return report_response(key)


# The serving history pages (ml/serving_history_page.py) hold no script at all: scripts are refused
# outright, so even an entry that somehow became markup could run nothing. Same isolation otherwise.
HISTORY_CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'none'",
        "style-src 'unsafe-inline'",
        "img-src data:",
        "connect-src 'none'",
        "form-action 'none'",
        "base-uri 'none'",
        "frame-ancestors 'self'",
        "sandbox allow-scripts",
    )
)
HISTORY_HEADERS = {**REPORT_HEADERS, "Content-Security-Policy": HISTORY_CONTENT_SECURITY_POLICY}


def _history_store():
    from ct_airflow.settings import pipeline_settings
    from ml.storage import ObjectStore

    settings = pipeline_settings()
    return settings, ObjectStore(settings)


@app.get("/serving/", summary="The models that have a serving history")
def get_serving_index(_user=Depends(get_user)) -> Response:  # noqa: B008 (FastAPI dependency)
    from ml.serving_history import models_with_history, read
    from ml.serving_history_page import render_index_page

    settings, store = _history_store()
    models = {}
    for model in models_with_history(settings, store=store):
        newest = read(settings, model, limit=1, store=store)
        models[model] = newest[0] if newest else None
    return Response(render_index_page(models), media_type="text/html", headers=HISTORY_HEADERS)


@app.get("/serving/{model}", summary="A model's serving history: timeline and entries")
def get_serving_history(model: str, _user=Depends(get_user)) -> Response:  # noqa: B008 (FastAPI dependency)
    from ml.serving_history import check_model_name, read
    from ml.serving_history_page import render_history_page

    try:
        check_model_name(model)
    except ValueError as err:
        raise HTTPException(404, str(err), headers=HISTORY_HEADERS) from err
    settings, store = _history_store()
    entries = read(settings, model, store=store)
    if not entries:
        raise HTTPException(404, f"{model!r} has no serving history", headers=HISTORY_HEADERS)
    return Response(render_history_page(model, entries), media_type="text/html", headers=HISTORY_HEADERS)


class CtReportsPlugin(AirflowPlugin):
    name = "ct_reports"
    fastapi_apps: ClassVar[list[dict]] = [
        {"app": app, "url_prefix": "/ct", "name": "Continuous-training reports"}
    ]
