"""Airflow plugin ``ct_reports``: the pipeline's reports, opened from the Airflow UI.

The Great Expectations Data Docs and the Evidently drift reports live in S3/MinIO, which a
browser usually cannot (and should not) read directly. This plugin adds a small FastAPI app to
Airflow's api-server at ``/ct/reports/<key>`` that streams them from the data bucket to users
who are logged in to Airflow (the UI's session cookie, or a bearer token), so the extra links on
task instances open them with Airflow's own access control and no public bucket.

Only report objects are served: keys under ``reports/`` and the validation reports under
``quarantine/<dataset>/<batch>/_validation/``. Raw or quarantined data itself is never served.
"""

from __future__ import annotations

import re
from typing import ClassVar

from airflow.api_fastapi.core_api.security import get_user
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import Response

_REPORT_KEY = re.compile(r"^(reports/[^?#]+|quarantine/[^/]+/[^/]+/_validation/[^/?#]+)$")

app = FastAPI(
    title="Continuous-training reports",
    description="Data Docs and drift reports from the data bucket, for logged-in Airflow users.",
)


def report_response(key: str) -> Response:
    """The object as an HTTP response; 404 for anything that is not a report or does not exist."""
    from ct_airflow.settings import pipeline_settings
    from ml.storage import ObjectStore, guess_type

    if not _REPORT_KEY.match(key) or ".." in key.split("/"):
        raise HTTPException(404, f"{key!r} is not a report: only reports/… and quarantine/…/_validation/…")
    store = ObjectStore(pipeline_settings())
    if not store.exists(key):
        raise HTTPException(404, f"s3://{store.bucket}/{key} does not exist")
    return Response(store.get_bytes(key), media_type=guess_type(key), headers={"Cache-Control": "private"})


@app.get("/reports/{key:path}", summary="A report object from the data bucket")
def get_report(key: str, _user=Depends(get_user)) -> Response:  # noqa: B008 (FastAPI dependency)
    return report_response(key)


class CtReportsPlugin(AirflowPlugin):
    name = "ct_reports"
    fastapi_apps: ClassVar[list[dict]] = [
        {"app": app, "url_prefix": "/ct", "name": "Continuous-training reports"}
    ]
