"""The Airflow web UI in headless Chromium (scripts/ui_check.py): log in through the form, then each
DAG's page, its doc_md in the "Dag Docs" dialog and its params in the trigger form (never submitted),
with no JS exceptions, console errors or failed Airflow requests on the way."""

from __future__ import annotations

import pytest

from tests.integration.conftest import stack

pytestmark = pytest.mark.integration

BASE_URL = "http://127.0.0.1:8080"
OUR_DAGS = ("continuous_training", "drift_monitor")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def airflow_ui(local_stack):
    """The running Airflow with our DAGs registered; the DAG ids to check."""
    import ui_check  # scripts/ is on sys.path (tests/integration/conftest.py)
    from airflow_client import AirflowClient

    try:
        ui_check.find_chromium()
    except ui_check.ChromiumNotFound:
        pytest.skip(
            "chromium not installed: apt-get install chromium (scripts/setup.sh does it when run as root)"
        )
    local_stack.require("s3", "mlflow", "ray", "airflow")
    client = AirflowClient(BASE_URL, *stack.airflow_login())
    for dag_id in OUR_DAGS:
        client.wait_for_dag(dag_id)
    # and any other DAG tagged continuous-training
    return sorted(set(OUR_DAGS) | set(ui_check.discover_dags(client)))


def test_airflow_ui_in_headless_chromium(airflow_ui, tmp_path):
    from ui_check import run_ui_check

    dag_ids = airflow_ui
    report = run_ui_check(BASE_URL, *stack.airflow_login(), dag_ids, tmp_path)

    assert not report.failures, "UI check failures:\n" + "\n".join(report.failures)
    assert "login" in report.kinds("ui") and "dag-list" in report.kinds("ui"), report.checks
    for dag_id in dag_ids:
        missing = {"page", "docs", "trigger-form"} - report.kinds(dag_id)
        assert not missing, f"{dag_id}: no passing {sorted(missing)} check in\n" + "\n".join(report.checks)

    names = [p.name for p in report.screenshots]
    for dag_id in dag_ids:
        for view in ("page", "docs", "trigger-form"):
            assert any(n.endswith(f"-{dag_id}-{view}.png") for n in names), (dag_id, view, names)
    for path in report.screenshots:
        assert path.parent == tmp_path and path.is_file(), path
        data = path.read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_SIGNATURE), f"{path} is not a PNG screenshot"
