"""Build the pipeline's :class:`ml.settings.Settings` inside a task, from Airflow connections.

Connections (all optional; missing ones fall back to the ``CT_*`` environment):

- ``ct_minio``: the S3 endpoint (SeaweedFS, MinIO or AWS S3), in either of two styles:

  * the Amazon provider's (conn type ``aws``): extra ``endpoint_url`` (``http://minio:9000``; or
    ``service_config.s3.endpoint_url``) and ``region_name``; login = access key id, password =
    secret access key. Without an endpoint, an ``aws`` connection means AWS S3 itself, as it does
    for the Amazon provider;
  * host and port (a scheme in the host is allowed), extra ``{"secure": false, "region": "..."}``.

  Login and password are optional: without them the ``CT_S3_ACCESS_KEY`` / ``CT_S3_SECRET_KEY``
  environment applies.
- ``ct_mlflow``: MLflow tracking server; host, port, schema (http/https).
- ``ct_ray``: Ray dashboard / Jobs API; host, port, schema; password = the Ray auth token.

Environment variables hold them as JSON or URI (``AIRFLOW_CONN_CT_MINIO``...): docker/compose.yaml
and docker/k8s/airflow-values.yaml set all three. Call :func:`pipeline_settings` only inside a
running task: it looks connections up, which the scheduler must never do while parsing DAG files.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

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
    """``scheme://host:port`` of an HTTP-style connection; a host may carry its own scheme."""
    host = (conn.host or "").strip().rstrip("/")
    if "://" in host:
        scheme, _, host = host.partition("://")
    elif conn.schema in {"http", "https"}:  # HTTP connections keep the scheme here (as the http provider)
        scheme = conn.schema
    else:
        scheme = "https" if conn.conn_type == "https" else default_scheme
    host, slash, path = host.partition("/")  # e.g. a server behind a path prefix
    port = f":{conn.port}" if conn.port and ":" not in host else ""
    return f"{scheme}://{host}{port}{slash}{path}"


AWS_S3_ENDPOINT = "s3.amazonaws.com"


def _endpoint(url: str, conn_id: str) -> tuple[str, bool]:
    """``(host:port, secure)`` from an endpoint URL such as ``http://minio:9000``."""
    parts = urlsplit(url.strip() if "://" in url else f"http://{url.strip()}")
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError(f"connection {conn_id}: endpoint {url!r} is not an http(s)://host[:port] URL")
    if parts.path.strip("/") or parts.query:
        raise ValueError(
            f"connection {conn_id}: endpoint {url!r} has a path; the S3 client needs the bare "
            "endpoint (buckets are not part of it)"
        )
    return parts.netloc.rpartition("@")[2], parts.scheme == "https"


def s3_overrides(conn: Any) -> dict[str, Any]:
    """Settings fields (``s3_*``) from an S3 connection of either style (see the module docstring)."""
    extra = conn.extra_dejson or {}
    conn_id = getattr(conn, "conn_id", None) or MINIO_CONN_ID
    overrides: dict[str, Any] = {}
    service = ((extra.get("service_config") or {}).get("s3") or {}) if isinstance(extra, dict) else {}
    endpoint_url = service.get("endpoint_url") or extra.get("endpoint_url")
    if endpoint_url:
        overrides["s3_endpoint"], overrides["s3_secure"] = _endpoint(str(endpoint_url), conn_id)
    elif conn.host:
        host = conn.host.strip()
        if "://" in host:
            overrides["s3_endpoint"], overrides["s3_secure"] = _endpoint(host, conn_id)
            if conn.port and ":" not in overrides["s3_endpoint"]:
                overrides["s3_endpoint"] += f":{conn.port}"
        else:
            overrides["s3_endpoint"] = f"{host}:{conn.port or 9000}"
    elif conn.conn_type == "aws":
        overrides["s3_endpoint"], overrides["s3_secure"] = AWS_S3_ENDPOINT, True
    if "secure" in extra and "s3_secure" not in overrides:  # a URL's scheme says it already
        overrides["s3_secure"] = str(extra["secure"]).strip().lower() in {"true", "1", "yes"}
    access_key = conn.login or extra.get("aws_access_key_id")
    secret_key = conn.password or extra.get("aws_secret_access_key")
    if access_key:
        overrides["s3_access_key"] = access_key
    if secret_key:
        overrides["s3_secret_key"] = secret_key
    region = service.get("region_name") or extra.get("region_name") or extra.get("region")
    if region:
        overrides["s3_region"] = region
    return overrides


def overrides_from_connections() -> dict[str, Any]:
    """Settings fields taken from the Airflow connections that exist."""
    overrides: dict[str, Any] = {}
    if (minio := _connection(MINIO_CONN_ID)) is not None:
        overrides.update(s3_overrides(minio))
    if (mlflow := _connection(MLFLOW_CONN_ID)) is not None and mlflow.host:
        overrides["mlflow_tracking_uri"] = _url(mlflow)
    if (ray := _connection(RAY_CONN_ID)) is not None and ray.host:
        overrides["ray_address"] = _url(ray)
    return overrides


def pipeline_settings(**extra: Any) -> Settings:
    """Settings = CT_* environment, overlaid by Airflow connections, overlaid by ``extra``."""
    from ml.settings import Settings

    return Settings(**{**overrides_from_connections(), **extra})


def dataset_settings(dataset: str | None) -> Settings:
    """Pipeline settings for ``dataset``; None or empty keeps CT_DATASET."""
    return pipeline_settings(**({"dataset": dataset} if dataset else {}))
