"""Build the pipeline's :class:`ml.settings.Settings` inside a task, from Airflow connections.

Connections (all optional; missing ones fall back to the ``CT_*`` environment):

- ``ct_minio``: S3 endpoint; host, port, login (access key), password (secret key),
  extra ``{"secure": false, "region": "us-east-1"}``.
- ``ct_mlflow``: MLflow tracking server; host, port, schema (http/https).
- ``ct_ray``: Ray dashboard / Jobs API; host, port, schema.

Call :func:`pipeline_settings` only inside a running task: it looks connections up, which the
scheduler must never do while parsing DAG files.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ml.settings import Settings

log = logging.getLogger(__name__)

MINIO_CONN_ID = "ct_minio"
MLFLOW_CONN_ID = "ct_mlflow"
RAY_CONN_ID = "ct_ray"


def _connection(conn_id: str) -> Any | None:
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        log.info("connection %s not defined; using CT_* environment defaults", conn_id)
        return None


def _url(conn: Any, default_scheme: str = "http") -> str:
    # HTTP connections keep the scheme in ``schema`` (as the http provider's hook does).
    if conn.schema in {"http", "https"}:
        scheme = conn.schema
    else:
        scheme = "https" if conn.conn_type == "https" else default_scheme
    port = f":{conn.port}" if conn.port else ""
    return f"{scheme}://{conn.host}{port}"


def overrides_from_connections() -> dict[str, Any]:
    """Settings fields taken from the Airflow connections that exist."""
    overrides: dict[str, Any] = {}
    if (minio := _connection(MINIO_CONN_ID)) is not None:
        extra = minio.extra_dejson or {}
        overrides["s3_endpoint"] = f"{minio.host}:{minio.port or 9000}"
        if minio.login:
            overrides["s3_access_key"] = minio.login
        if minio.password:
            overrides["s3_secret_key"] = minio.password
        if "secure" in extra:
            overrides["s3_secure"] = bool(extra["secure"])
        if "region" in extra:
            overrides["s3_region"] = extra["region"]
    if (mlflow := _connection(MLFLOW_CONN_ID)) is not None:
        overrides["mlflow_tracking_uri"] = _url(mlflow)
    if (ray := _connection(RAY_CONN_ID)) is not None:
        overrides["ray_address"] = _url(ray)
    return overrides


def pipeline_settings(**extra: Any) -> Settings:
    """Settings = CT_* environment, overlaid by Airflow connections, overlaid by ``extra``."""
    from ml.settings import Settings

    return Settings(**{**overrides_from_connections(), **extra})


def dataset_settings(dataset: str | None) -> Settings:
    """Pipeline settings for ``dataset``; None or empty keeps CT_DATASET."""
    return pipeline_settings(**({"dataset": dataset} if dataset else {}))
