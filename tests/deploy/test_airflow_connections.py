"""The Airflow connections that docker/compose.yaml and the Helm values set (``AIRFLOW_CONN_*``)
parse, with Airflow's own parser, into the settings the code expects: the same endpoints as the
``CT_*`` settings of the same deployment, S3 in the Amazon provider's style.

A task reads the connections first and the ``CT_*`` environment second
(``ct_airflow.settings.pipeline_settings``), and hands the result to its Ray jobs: a connection
that disagreed with the environment would send the Airflow side and the Ray side to different
places.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from airflow.sdk import Connection

from ct_airflow.settings import MINIO_CONN_ID, MLFLOW_CONN_ID, RAY_CONN_ID, pipeline_settings
from ml.settings import Settings
from tests.deploy.test_docker import compose
from tests.deploy.test_k8s_manifests import documents, one

CONN_IDS = {MINIO_CONN_ID, MLFLOW_CONN_ID, RAY_CONN_ID}
ENDPOINT_FIELDS = ("s3_endpoint", "s3_secure", "s3_region", "mlflow_tracking_uri", "ray_address")


def _parse(conn_id: str, value: str) -> Connection:
    """What Airflow's environment-variable secrets backend does with ``AIRFLOW_CONN_<ID>``."""
    value = value.strip()
    return (
        Connection.from_json(value, conn_id=conn_id)
        if value.startswith("{")
        else Connection.from_uri(value, conn_id=conn_id)
    )


def _connections(env: dict[str, str]) -> dict[str, Connection]:
    return {
        key.removeprefix("AIRFLOW_CONN_").lower(): _parse(
            key.removeprefix("AIRFLOW_CONN_").lower(), str(value)
        )
        for key, value in env.items()
        if key.startswith("AIRFLOW_CONN_")
    }


def _check(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The connections of ``env`` are the project's three, S3 Amazon-style, and agree with its CT_*."""
    connections = _connections(env)
    assert set(connections) == CONN_IDS, f"connections set: {sorted(connections)}"
    s3 = connections[MINIO_CONN_ID]
    assert s3.conn_type == "aws" and s3.extra_dejson.get("endpoint_url"), "S3: the Amazon provider's style"
    assert not s3.password, "the S3 secret stays out of the connection string (it comes from a secret)"
    for conn_id in (MLFLOW_CONN_ID, RAY_CONN_ID):
        assert connections[conn_id].conn_type == "http" and connections[conn_id].host
    for key in list(os.environ):
        if key.startswith(("CT_", "AIRFLOW_CONN_")):
            monkeypatch.delenv(key)
    fields = set(Settings.model_fields)
    from_env = {key[3:].lower(): value for key, value in env.items() if key.startswith("CT_")}
    expected = Settings(**{k: v for k, v in from_env.items() if k in fields})
    for key, value in env.items():
        if key.startswith(("CT_", "AIRFLOW_CONN_")):
            monkeypatch.setenv(key, str(value))
    # the task's own path: the task SDK looks the connections up in the environment
    actual = pipeline_settings()
    got = {name: getattr(actual, name) for name in ENDPOINT_FIELDS}
    assert got == {name: getattr(expected, name) for name in ENDPOINT_FIELDS}


def test_compose_sets_the_connections_the_tasks_read(monkeypatch):
    env: dict[str, Any] = compose()["services"]["airflow-scheduler"]["environment"]
    _check({key: str(value) for key, value in env.items()}, monkeypatch)
    region = _parse(MINIO_CONN_ID, env["AIRFLOW_CONN_CT_MINIO"]).extra_dejson.get("region_name")
    assert region == env["AWS_DEFAULT_REGION"]


def test_helm_values_set_the_connections_the_tasks_read(monkeypatch):
    values = documents("airflow-values.yaml")[0]
    env = {item["name"]: item["value"] for item in values["env"] if "value" in item}
    settings = one("ConfigMap", "ct-settings")["data"]  # what extraEnvFrom gives every container
    _check({**settings, **env}, monkeypatch)


def test_the_check_notices_a_connection_that_disagrees(monkeypatch):
    env = {
        key: str(value) for key, value in compose()["services"]["airflow-scheduler"]["environment"].items()
    }
    env["AIRFLOW_CONN_CT_RAY"] = '{"conn_type": "http", "host": "ray-head", "port": 6379}'
    with pytest.raises(AssertionError):
        _check(env, monkeypatch)
