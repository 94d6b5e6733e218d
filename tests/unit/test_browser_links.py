"""Links meant for a browser use the browser-facing addresses (CT_*_UI_URL), not internal ones.

In compose and Kubernetes the pipeline reaches MLflow, Ray and Serve by service names
(``http://ray-head:8265``) that no browser resolves; the links Airflow shows on task instances, the
log lines and the demo's output must open from the user's machine.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from ct_airflow.links import RayJobLink
from ct_airflow.ray_job import RayJobHook
from ml.settings import Settings

INTERNAL = {
    "mlflow_tracking_uri": "http://mlflow:5000",
    "ray_address": "http://ray-head:8265",
    "serve_url": "http://ray-head:8000",
}
PUBLIC = {
    "mlflow_ui_url": "https://mlflow.example.com/",
    "ray_ui_url": "https://ray.example.com",
    "serve_ui_url": "https://classifier.example.com/",
}


def test_links_use_the_browser_facing_addresses():
    settings = Settings(**INTERNAL, **PUBLIC)
    assert (
        settings.mlflow_link("experiments/1/runs/abc")
        == "https://mlflow.example.com/#/experiments/1/runs/abc"
    )
    assert settings.ray_link("jobs/ct-train-1") == "https://ray.example.com/#/jobs/ct-train-1"
    assert settings.serve_link("/v1/model") == "https://classifier.example.com/v1/model"
    assert settings.serve_link("docs") == "https://classifier.example.com/docs"
    # the code keeps talking to the internal addresses
    assert (settings.ray_address, settings.serve_url) == (INTERNAL["ray_address"], INTERNAL["serve_url"])


def test_without_ui_urls_links_use_the_service_addresses():
    settings = Settings(**INTERNAL)
    assert settings.mlflow_link() == "http://mlflow:5000/#/"
    assert settings.ray_link("jobs/x") == "http://ray-head:8265/#/jobs/x"
    assert settings.serve_link("v1/model") == "http://ray-head:8000/v1/model"


@pytest.mark.parametrize(
    ("ui_url", "expected"), [("https://ray.example.com/", "https://ray.example.com"), ("", None)]
)
def test_the_ray_job_link_of_a_task(monkeypatch, ui_url, expected):
    """The task instance's "Ray job" button: the job's page in the dashboard a browser can open."""
    monkeypatch.setenv(
        "AIRFLOW_CONN_CT_RAY", json.dumps({"conn_type": "http", "host": "ct-train-head-svc.ct", "port": 8265})
    )
    monkeypatch.setenv("CT_RAY_UI_URL", ui_url)
    operator = SimpleNamespace(hook=RayJobHook())
    ti = SimpleNamespace(
        task_id="train",
        map_index=-1,
        xcom_pull=lambda task_ids, key, map_indexes: "ct-train-abc" if key == "submission_id" else None,
    )
    link = RayJobLink().get_link(operator, ti_key=ti)
    assert link == f"{expected or 'http://ct-train-head-svc.ct:8265'}/#/jobs/ct-train-abc"
    assert operator.hook.address == "http://ct-train-head-svc.ct:8265"  # jobs are still submitted there


def test_the_serving_link_and_log_line_of_the_deploy(monkeypatch):
    """What smoke_test publishes (the "Serving API" button) and logs."""
    import re

    from tests.conftest import REPO_ROOT

    source = (REPO_ROOT / "dags" / "continuous_training.py").read_text()
    smoke = source[source.index("def smoke_test") :]
    smoke = smoke[: smoke.index("\n    @task") if "\n    @task" in smoke else None]
    assert 'publish_links(context, serve=settings.serve_link("v1/model"))' in smoke
    assert not re.search(r"publish_links\([^)]*serve_url", smoke), "a link built from the internal address"
    monkeypatch.setenv("CT_SERVE_URL", "http://ray-head:8000")
    monkeypatch.setenv("CT_SERVE_UI_URL", "http://localhost:8000")
    assert Settings().serve_link("v1/model") == "http://localhost:8000/v1/model"


def test_the_demo_prints_browser_addresses(monkeypatch, capsys):
    import sys

    from tests.conftest import REPO_ROOT

    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import demo

    settings = Settings(**INTERNAL, **PUBLIC)
    demo.print_where_to_look(settings, "admin")
    out = capsys.readouterr().out
    assert "https://mlflow.example.com/#/" in out and "https://ray.example.com/#/" in out
    assert "https://classifier.example.com/docs" in out
    assert "ray-head" not in out and "mlflow:5000" not in out
