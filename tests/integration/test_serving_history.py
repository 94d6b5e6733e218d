"""The serving history on the local stack: concurrent writers on the real S3 (SeaweedFS) lose
nothing, entries are mirrored onto real MLflow model versions as tags, and the history page comes
through the ct_reports plugin on the real Airflow api-server, logged in, with hostile reasons and
actors inert (as text in the page, and in headless Chromium no script runs)."""

from __future__ import annotations

import json
import os
import threading
import uuid
from urllib.parse import quote

import pytest

from ml import serving_history as sh
from tests.integration.conftest import stack
from tests.unit.test_report_safety import MARK, Elements

pytestmark = pytest.mark.integration

# another api-server of the same Airflow (e.g. one started after a plugin change) with CT_IT_AIRFLOW_URL
BASE_URL = os.environ.get("CT_IT_AIRFLOW_URL", "http://127.0.0.1:8080")


def _record(settings, store, model, i, mlflow=False, **extra):
    fields = {
        "model": model,
        "dataset": settings.dataset,
        "action": "deploy",
        "from_version": str(i),
        "to_version": str(i + 1),
        "result": "ok",
        "actor": f"it-run-{i}",
        "reason": "integration test",
        "seconds": 0.5,
        **extra,
    }
    return sh.record(settings, **fields, store=store, mlflow=mlflow)


def test_concurrent_writers_on_s3_lose_nothing(settings, store):
    model = f"{settings.dataset}-classifier"
    errors, ids = [], []

    def writer(w: int) -> None:
        try:
            for i in range(6):
                ids.append(_record(settings, store, model, w * 10 + i)["id"])
        except Exception as err:  # shown by the assert below
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    lines = store.get_bytes(sh.history_key(model)).decode().splitlines()
    assert sorted(json.loads(line)["id"] for line in lines) == sorted(ids) and len(ids) == 24
    read = sh.read(settings, model, store=store)
    assert [e["at"] for e in read] == sorted(e["at"] for e in read)
    assert sh.models_with_history(settings, store=store).count(model) == 1


def test_entries_are_mirrored_onto_mlflow_versions(local_stack, settings, store):
    local_stack.require("mlflow")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    model = f"it-history-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(model)
    for _ in range(2):
        client.create_model_version(model, source=f"s3://{settings.mlflow_bucket}/it/{model}")
    entry = sh.record(
        settings, model=model, dataset=settings.dataset, action="rollback", from_version="2", to_version="1",
        result="ok", actor="user:it", reason="v2 mislabels\nsports " + "x" * 500, seconds=3.0, store=store,
    )  # fmt: skip
    key = sh.tag_key(entry)
    to_tags = client.get_model_version(model, "1").tags
    from_tags = client.get_model_version(model, "2").tags
    assert to_tags[key].startswith("ok: v2 -> v1; by user:it; v2 mislabels sports x"), to_tags
    assert len(to_tags[key]) <= sh.MAX_TAG_VALUE_CHARS
    assert "(this version was replaced)" in from_tags[key], from_tags
    # a version MLflow does not have: logged, the entry is recorded all the same
    missing = _record(settings, store, model, 40, mlflow=True)
    assert sh.read(settings, model, store=store)[-1]["id"] == missing["id"]


@pytest.fixture(scope="module")
def airflow(local_stack):
    import ui_check  # scripts/ is on sys.path (tests/integration/conftest.py)
    from airflow_client import AirflowClient

    try:
        ui_check.find_chromium()
    except ui_check.ChromiumNotFound:
        pytest.skip("chromium not installed: apt-get install chromium (scripts/setup.sh does it as root)")
    local_stack.require("s3", "airflow")
    return AirflowClient(BASE_URL, *stack.airflow_login())


def test_history_page_through_airflow_keeps_hostile_entries_inert(settings, store, airflow, tmp_path):
    from ui_check import _HISTORY_STATE, inspect_pages

    model = f"{settings.dataset}-classifier"
    payloads = [
        f"<script id={MARK}-script>window.__pwned=1</script>",
        f'"><img src=x id={MARK}-img onerror=window.__pwned=2>',
        f"'><svg id={MARK}-svg onload=window.__pwned=3>",
    ]
    for i, payload in enumerate(payloads):
        _record(settings, store, model, i, reason=payload, actor=f"user:{payload}", detail=payload)
    url = f"{BASE_URL}/ct/serving/{quote(model)}"

    response = airflow.session.get(url, timeout=60)
    assert response.status_code == 200, (
        f"{url} answered {response.status_code}: {response.text[:200]} (an api-server started before "
        "the plugin had the serving pages must be restarted: make down && make up)"
    )
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    policy = response.headers["content-security-policy"]
    assert "script-src 'none'" in policy and "sandbox" in policy and "allow-same-origin" not in policy
    assert response.headers["x-content-type-options"] == "nosniff"
    page = Elements(response.text)
    assert not page.injected() and page.scripts == [], page.injected()
    assert all(p in "".join(page.text) for p in payloads)
    index = airflow.session.get(f"{BASE_URL}/ct/serving/", timeout=60)
    assert index.status_code == 200 and f'href="{model}"' in index.text
    assert airflow.session.get(f"{BASE_URL}/ct/serving/..%2Fx", timeout=60).status_code == 404

    report, results = inspect_pages(
        BASE_URL, *stack.airflow_login(), {"history": (url, _HISTORY_STATE)}, tmp_path
    )
    assert not report.failures, report.failures
    state = results["history"]["value"]
    assert state == {"rows": 3, "dots": 3, "scripts": 0, "ran": None, "injected": 0}, state
    assert results["history"]["events"] == [], results["history"]["events"]
