"""Airflow connections become pipeline settings: the S3 connection in the Amazon provider's style
(conn type ``aws``, ``endpoint_url`` and ``region_name`` in extra, keys as login/password) and in
the older host/port style; MLflow and Ray as HTTP connections.

Connections are Airflow's own objects: ``airflow.sdk.Connection`` built from JSON and URIs the
way Airflow parses ``AIRFLOW_CONN_*``, and, end to end, the task SDK's lookup
(``airflow.sdk.BaseHook.get_connection``) of connections set in the environment.
"""

from __future__ import annotations

import json

import pytest
from airflow.sdk import Connection

from ct_airflow.settings import _url, pipeline_settings, s3_overrides


def _json(conn_id: str = "ct_minio", **fields) -> Connection:
    return Connection.from_json(json.dumps(fields), conn_id=conn_id)


@pytest.mark.parametrize(
    ("conn", "expected"),
    [
        pytest.param(
            _json(
                conn_type="aws",
                login="AKIDEXAMPLE",
                password="s3cret/key+x",
                extra={"endpoint_url": "http://seaweedfs:8333", "region_name": "eu-west-1"},
            ),
            {
                "s3_endpoint": "seaweedfs:8333",
                "s3_secure": False,
                "s3_access_key": "AKIDEXAMPLE",
                "s3_secret_key": "s3cret/key+x",
                "s3_region": "eu-west-1",
            },
            id="amazon-json",
        ),
        pytest.param(
            Connection.from_uri(
                conn_id="ct_minio",
                uri="aws://AKIDEXAMPLE:s3cret%2Fkey%2Bx@/?endpoint_url=https%3A%2F%2Fs3.internal%3A9443"
                "&region_name=eu-west-1",
            ),
            {
                "s3_endpoint": "s3.internal:9443",
                "s3_secure": True,
                "s3_access_key": "AKIDEXAMPLE",
                "s3_secret_key": "s3cret/key+x",
                "s3_region": "eu-west-1",
            },
            id="amazon-uri",
        ),
        pytest.param(
            _json(conn_type="aws", extra={"service_config": {"s3": {"endpoint_url": "http://minio:9000/"}}}),
            {"s3_endpoint": "minio:9000", "s3_secure": False},
            id="amazon-service-config-no-keys",
        ),
        pytest.param(
            _json(conn_type="aws", login="AKID", password="SECRET", extra={"region_name": "us-west-2"}),
            {
                "s3_endpoint": "s3.amazonaws.com",
                "s3_secure": True,
                "s3_access_key": "AKID",
                "s3_secret_key": "SECRET",
                "s3_region": "us-west-2",
            },
            id="amazon-without-endpoint-is-aws-s3",
        ),
        pytest.param(
            _json(
                conn_type="aws",
                host="127.0.0.1",
                port=9000,
                login="minioadmin",
                password="minioadmin",
                extra={"secure": False, "region": "us-east-1", "endpoint_url": "http://127.0.0.1:9000"},
            ),
            {
                "s3_endpoint": "127.0.0.1:9000",
                "s3_secure": False,
                "s3_access_key": "minioadmin",
                "s3_secret_key": "minioadmin",
                "s3_region": "us-east-1",
            },
            id="local-stack-both-styles",
        ),
        pytest.param(
            _json(conn_type="generic", host="minio", port=9000, extra={"secure": "true", "region": "x"}),
            {"s3_endpoint": "minio:9000", "s3_secure": True, "s3_region": "x"},
            id="host-port",
        ),
        pytest.param(
            _json(conn_type="generic", host="minio"),
            {"s3_endpoint": "minio:9000"},
            id="host-default-port",
        ),
        pytest.param(
            _json(conn_type="generic", host="https://minio.example.com"),
            {"s3_endpoint": "minio.example.com", "s3_secure": True},
            id="host-with-scheme",
        ),
    ],
)
def test_s3_connection_styles(conn, expected):
    assert s3_overrides(conn) == expected


@pytest.mark.parametrize(
    "endpoint", ["http://minio:9000/ct-data", "ftp://minio:9000", "http://:9000", "http://minio:9000/?a=b"]
)
def test_an_endpoint_the_s3_client_cannot_use_is_refused_by_name(endpoint):
    conn = _json(conn_type="aws", extra={"endpoint_url": endpoint})
    with pytest.raises(ValueError, match=r"connection ct_minio: endpoint"):
        s3_overrides(conn)


@pytest.mark.parametrize(
    ("fields", "url"),
    [
        ({"conn_type": "http", "host": "mlflow", "port": 5000}, "http://mlflow:5000"),
        ({"conn_type": "http", "host": "mlflow", "port": 443, "schema": "https"}, "https://mlflow:443"),
        ({"conn_type": "https", "host": "mlflow.example.com"}, "https://mlflow.example.com"),
        ({"conn_type": "http", "host": "https://mlflow.example.com/"}, "https://mlflow.example.com"),
        (
            {"conn_type": "http", "host": "https://example.com/mlflow", "port": 8443},
            "https://example.com:8443/mlflow",
        ),
        ({"conn_type": "http", "host": "http://ray-head:8265", "port": 8265}, "http://ray-head:8265"),
    ],
)
def test_http_connections(fields, url):
    assert _url(_json("ct_mlflow", **fields)) == url


def test_a_task_reads_amazon_style_connections_from_the_environment(monkeypatch):
    """The task SDK's own lookup of AIRFLOW_CONN_* (JSON and URI), overlaid on the CT_* settings."""
    for name in ("CT_S3_ENDPOINT", "CT_S3_SECURE", "CT_MLFLOW_TRACKING_URI", "CT_RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CT_S3_ACCESS_KEY", "from-the-environment")
    monkeypatch.setenv(
        "AIRFLOW_CONN_CT_MINIO",
        json.dumps(
            {
                "conn_type": "aws",
                "extra": {"endpoint_url": "https://s3.example.com", "region_name": "eu-north-1"},
            }
        ),
    )
    monkeypatch.setenv("AIRFLOW_CONN_CT_MLFLOW", "http://mlflow.example.com:5000")
    monkeypatch.setenv(
        "AIRFLOW_CONN_CT_RAY", json.dumps({"conn_type": "http", "host": "ray-head", "port": 8265})
    )
    settings = pipeline_settings()
    assert (settings.s3_endpoint, settings.s3_secure, settings.s3_region) == (
        "s3.example.com",
        True,
        "eu-north-1",
    )
    assert settings.s3_url == "https://s3.example.com"
    assert settings.s3_access_key == "from-the-environment"  # no login in the connection
    assert settings.mlflow_tracking_uri == "http://mlflow.example.com:5000"
    assert settings.ray_address == "http://ray-head:8265"


def test_without_connections_the_environment_applies(monkeypatch):
    for conn in ("CT_MINIO", "CT_MLFLOW", "CT_RAY"):
        monkeypatch.delenv(f"AIRFLOW_CONN_{conn}", raising=False)
    monkeypatch.setenv("CT_S3_ENDPOINT", "s3.local:8333")
    monkeypatch.setenv("CT_RAY_ADDRESS", "http://ray.local:8265")
    settings = pipeline_settings()
    assert (settings.s3_endpoint, settings.ray_address) == ("s3.local:8333", "http://ray.local:8265")
