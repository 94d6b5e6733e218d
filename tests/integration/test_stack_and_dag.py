"""The whole local stack for real: MLflow stores artifacts in S3, Ray's Jobs API runs a job with
token auth on, and Airflow runs the closed loop on seeded data: continuous_training trains and
deploys v1, traffic goes to the service over HTTP, drift_monitor checks it (control: no drift;
20 Newsgroups texts: drift), the drift triggers continuous_training, a second verdict inside the
cooldown does not, and new raw data found by raw_data_watch starts a run for its dataset."""

from __future__ import annotations

import io
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest
import requests

from ml.prediction_log import wait_for_logged
from ml.rollout import ServeDeployer
from ml.seed import seed_raw
from ml.serving_history import read as read_history
from ml.settings import Settings
from ml.storage import ObjectStore
from serve.client import predict
from tests.conftest import AGNEWS, NEWSGROUPS
from tests.integration.conftest import stack

pytestmark = pytest.mark.integration

DAG_ID = "continuous_training"
MONITOR = "drift_monitor"
WATCH = "raw_data_watch"


@pytest.fixture(scope="module")
def full_stack(local_stack) -> dict[str, str]:
    local_stack.require("s3", "mlflow", "ray", "airflow")
    return stack.service_env()


@pytest.fixture(scope="module")
def airflow(full_stack):
    from airflow_client import AirflowClient

    client = AirflowClient("http://127.0.0.1:8080", *stack.airflow_login())
    for dag_id in (DAG_ID, MONITOR, WATCH):
        client.wait_for_dag(dag_id)
        client.unpause(dag_id)
    yield client
    # scheduled runs of the monitor and the watch would act on whatever the stack holds later
    for dag_id in (MONITOR, WATCH):
        client.pause(dag_id)


def test_mlflow_keeps_artifacts_in_s3(full_stack, tmp_path):
    import mlflow

    settings = Settings()
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_experiment(f"it-{uuid.uuid4().hex[:8]}")
    note = tmp_path / "note.txt"
    note.write_text("stored through the tracking server")
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(note))
    keys = [o.key for o in ObjectStore(settings, settings.mlflow_bucket).list("")]
    assert any(k.endswith(f"{run.info.run_id}/artifacts/note.txt") for k in keys), keys[-5:]
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="note.txt")
    assert Path(local).read_text() == "stored through the tracking server"


def test_ray_jobs_api_runs_a_job_and_requires_the_token(full_stack):
    import requests
    from ray.job_submission import JobStatus, JobSubmissionClient

    settings = Settings()
    # without the token the dashboard refuses the Jobs API
    assert requests.get(f"{settings.ray_address}/api/jobs/", timeout=10).status_code in {401, 403}

    client = JobSubmissionClient(settings.ray_address)
    job_id = client.submit_job(entrypoint="python -c \"print('hello from ray')\"")
    deadline = time.monotonic() + 120
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED}:
        assert time.monotonic() < deadline, f"job still {status}"
        time.sleep(1)
    assert status == JobStatus.SUCCEEDED, client.get_job_logs(job_id)
    assert "hello from ray" in client.get_job_logs(job_id)


SMALL_TRAINING = {"batch_size": 8, "max_length": 32, "num_workers": 2, "zero_stage": 2}
TRAFFIC = 400  # texts per window: above the monitor's min_rows (200)


PER_MODEL = ("check", "decide", "trigger_training", "record_trigger")


def _monitor(airflow, since: datetime, model: str, **params) -> tuple[str, dict[str, str | None], int]:
    """Run drift_monitor over the window from ``since`` to now; returns (run id, the states of
    ``model``'s mapped per_model tasks by their own id, its map index)."""
    hours = ((datetime.now(UTC) - since).total_seconds() + 5) / 3600
    run_id = airflow.trigger(MONITOR, conf={"window_hours": hours, **params})
    assert airflow.wait_for_run(MONITOR, run_id, timeout=600)["state"] == "success"
    checks = {
        ti["rendered_map_index"]: ti["map_index"] for ti in airflow.mapped(MONITOR, run_id, "per_model.check")
    }
    assert model in checks, f"no check of {model}: {checks}"
    index = checks[model]
    states = {
        task: ti["state"]
        for task in PER_MODEL
        for ti in airflow.mapped(MONITOR, run_id, f"per_model.{task}")
        if ti["map_index"] == index
    }
    return run_id, states, index


def _assert_report_opens(airflow, url: str | None) -> None:
    """A report link opens for a logged-in Airflow user (the ct_reports plugin) and only for one."""
    assert url and url.startswith("http://127.0.0.1:8080/ct/reports/"), url
    page = airflow.session.get(url, timeout=60)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html"), page.text[:300]
    assert "<html" in page.text[:2000].lower()
    assert requests.get(url, timeout=60).status_code == 401, "reports must need an Airflow login"


def _assert_renders_in_a_browser(url: str, out_dir: Path) -> None:
    """The link, followed by a person logged in to the Airflow UI (headless Chromium), renders."""
    import ui_check

    try:
        ui_check.find_chromium()
    except ui_check.ChromiumNotFound:
        return  # tests/integration/test_airflow_ui.py reports the skip
    report = ui_check.run_ui_check(
        "http://127.0.0.1:8080", *stack.airflow_login(), [MONITOR], out_dir, links={"report": url}
    )
    assert not report.failures, report.failures
    assert "link" in report.kinds("report"), report.checks


class LiveTraffic:
    """Paced single-text requests from one thread (20 client keys) once ``start()`` says so: the
    live traffic a staged rollout judges. Bounded: ``max_requests`` (kept small so this traffic does
    not dilute the drifted window checked again later) and ``max_seconds``."""

    def __init__(self, url, texts, start, max_requests=150, pause_s=0.4, max_seconds=1800):
        import threading

        self.url, self.texts, self.start = url, texts, start
        self.max_requests, self.pause_s, self.max_seconds = max_requests, pause_s, max_seconds
        self.sent, self.failed = 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and not self.start():
            if self._stop.wait(5) or time.monotonic() > deadline:
                return
        session = requests.Session()
        while not self._stop.is_set() and self.sent < self.max_requests and time.monotonic() < deadline:
            text = self.texts[self.sent % len(self.texts)]
            try:
                key = {"X-Client-Key": f"it-{self.sent % 20}"}
                resp = session.post(self.url, json={"text": text}, headers=key, timeout=60)
                if resp.status_code != 200:
                    self.failed.append((resp.status_code, resp.text[:200]))
            except requests.RequestException as err:
                self.failed.append((-1, str(err)[:200]))
            self.sent += 1
            self._stop.wait(self.pause_s)

    def __enter__(self) -> LiveTraffic:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=90)


def _stage_started(airflow, run_id: str) -> bool:
    """The run's shadow_check runs (or the run got past it): live traffic is judged from now on."""
    try:
        states = airflow.task_states(DAG_ID, run_id)
    except Exception:
        return False
    return states.get("shadow_check") in {"running", "success", "failed", "skipped", "upstream_failed"}


def _training_runs(airflow) -> list[dict]:
    return airflow.runs(DAG_ID, limit=50)


def _drift_runs(airflow, dataset: str) -> list[dict]:
    """continuous_training runs that drift_monitor triggered for ``dataset``."""
    return [
        r
        for r in _training_runs(airflow)
        if (r.get("conf") or {}).get("reason") == "drift" and r["conf"].get("dataset") == dataset
    ]


@pytest.fixture
def serve_as_found(full_stack):
    """The Serve applications this test creates (one per dataset it trains) are removed at the end:
    their replicas would keep CPUs that later tests' training jobs need."""
    deployer = ServeDeployer(Settings())
    before = {a["name"] for a in (deployer.current_config() or {}).get("applications", [])}
    yield
    current = deployer.current_config()
    kept = [a for a in (current or {}).get("applications", []) if a["name"] in before]
    if current and len(kept) < len(current["applications"]):
        deployer.apply({**current, "applications": kept})


def test_the_loop_through_airflow(airflow, full_stack, tmp_path, serve_as_found):
    """Run 1 trains and deploys v1. Same-distribution traffic: no drift, no trigger. 20 Newsgroups
    traffic: drift, and continuous_training runs with the drift in its conf; it trains v2 on the
    new labelled batch plus the earlier data and deploys it only if it passes the gate. While it
    runs, and after it, further drift verdicts trigger nothing (busy, then cooldown). A last run
    finds no new data and skips. Asserted through the Airflow API, S3, MLflow and the service."""
    from mlflow import MlflowClient

    settings = Settings(dataset=f"it-dag-{uuid.uuid4().hex[:8]}")
    store = ObjectStore(settings)
    mlflow = MlflowClient(settings.mlflow_tracking_uri)
    name = settings.registered_model
    serve_url = ServeDeployer(settings).serve_url  # the run's dataset has its own app, at /<dataset>
    today = datetime.now(UTC).date()
    seed_raw(settings, AGNEWS, batches=2, rows=600, end=today, bad_batch=True, store=store)

    conf = {"dataset": settings.dataset, "epochs": 2, "gate_min_macro_f1": 0.2, **SMALL_TRAINING}
    run_id = airflow.trigger(DAG_ID, conf=conf)
    run = airflow.wait_for_run(DAG_ID, run_id, timeout=1200)
    assert run["state"] == "success", airflow.task_states(DAG_ID, run_id)

    # extract + validate: snapshot, manifest, quarantine; the task links to its Data Docs
    snapshot = airflow.xcom(DAG_ID, run_id, "extract")
    assert snapshot["dataset"] == settings.dataset
    manifest = store.get_json(f"snapshots/{snapshot['snapshot_id']}/manifest.json")
    assert manifest["run_id"] == run_id
    assert manifest["dataset"] == settings.dataset
    assert manifest["dry_run"] is False
    assert len(manifest["batches"]) == 3
    assert all(o["sha256"] for o in manifest["objects"])
    validated = airflow.xcom(DAG_ID, run_id, "validate")
    bad = f"{today.isoformat()}_export-2"
    assert validated["quarantined"] == [bad]
    assert validated["rows"] == 600
    assert store.exists(f"quarantine/{settings.dataset}/{bad}/part-000.csv")
    assert store.exists(f"quarantine/{settings.dataset}/{bad}/_validation/{snapshot['snapshot_id']}.json")
    assert not store.exists(f"raw/{settings.dataset}/{bad}/part-000.csv")
    docs = airflow.links(DAG_ID, run_id, "validate")["Data Docs (Great Expectations)"]
    _assert_report_opens(airflow, docs)

    # train (Ray job, 2 workers, ZeRO-2) -> evaluate -> register: first model becomes champion
    summary = airflow.xcom(DAG_ID, run_id, "training_summary")
    assert summary["epochs_completed"] == 2
    first = airflow.xcom(DAG_ID, run_id, "register")
    assert first["promoted"] is True, first
    champion = mlflow.get_model_version_by_alias(name, "champion")
    assert champion.version == first["version"] == "1"
    assert champion.run_id == summary["mlflow_run_id"]
    assert champion.tags["snapshot_id"] == snapshot["snapshot_id"]
    assert champion.tags["gate_decision"] == "promote"
    assert champion.tags["trigger_reason"] == "manual"
    training_run = mlflow.get_run(summary["mlflow_run_id"])
    assert training_run.data.params["zero_stage"] == "2" and training_run.data.params["num_workers"] == "2"
    assert {"val_macro_f1", "train_loss", "samples_per_second", "test_macro_f1"} <= set(
        training_run.data.metrics
    )
    artifacts = {a.path for a in mlflow.list_artifacts(summary["mlflow_run_id"], "evaluation")}
    assert "evaluation/confusion_matrix.png" in artifacts
    run_link = airflow.links(DAG_ID, run_id, "training_summary")["MLflow run"]
    assert run_link.endswith(f"/runs/{summary['mlflow_run_id']}"), run_link
    assert airflow.links(DAG_ID, run_id, "register")["MLflow model version"].endswith("/versions/1")
    assert "/#/jobs/" in (airflow.links(DAG_ID, run_id, "train")["Ray job"] or "")

    # deploy -> smoke test: the service answers with the new champion; MLflow marks it serving
    states = airflow.task_states(DAG_ID, run_id)
    assert states["deploy"] == states["smoke_test"] == "success", states
    smoke = airflow.xcom(DAG_ID, run_id, "smoke_test")
    assert smoke["version"] == "1" and smoke["compared_offline"] is True
    served = requests.get(f"{serve_url}/v1/model", timeout=30).json()
    assert (served["name"], served["version"]) == (name, "1"), served
    assert mlflow.get_model_version_by_alias(name, "serving").version == "1"

    # a second dataset (20 Newsgroups, twelve groups) trains from the trigger form alone and is served
    # beside the first, by its own Serve application at its own route; the first keeps answering
    loaded_at = served["loaded_at"]
    other = Settings(dataset=f"it-dag-news-{uuid.uuid4().hex[:8]}")
    news = pd.read_csv(NEWSGROUPS)
    groups = sorted(news["label"].unique())[:12]
    news_source = tmp_path / "newsgroups-12.csv"
    news[news["label"].isin(groups)].to_csv(news_source, index=False)
    seed_raw(other, news_source, batches=1, end=today, store=ObjectStore(other))
    other_conf = {"dataset": other.dataset, "epochs": 2, "gate_min_macro_f1": 0.0, **SMALL_TRAINING}
    other_run = airflow.trigger(DAG_ID, conf={**other_conf, "max_length": 64})
    other_state = airflow.wait_for_run(DAG_ID, other_run, timeout=1200)["state"]
    assert other_state == "success", airflow.task_states(DAG_ID, other_run)
    other_name, other_url = other.registered_model, ServeDeployer(other).serve_url
    assert other_url.endswith(f"/{other.dataset}") and other_url != serve_url
    other_served = requests.get(f"{other_url}/v1/model", timeout=30).json()
    assert (other_served["name"], other_served["version"]) == (other_name, "1"), other_served
    assert sorted(other_served["labels"]) == groups
    served = requests.get(f"{serve_url}/v1/model", timeout=30).json()
    assert (served["name"], served["version"], served["loaded_at"]) == (name, "1", loaded_at), served
    other_texts = pd.read_csv(news_source)["text"].tolist()

    # control: held-out AG News texts (not in the training snapshot) -> no drift, no trigger
    seen = set(pd.read_parquet(io.BytesIO(store.get_bytes(validated["validated_key"])))["text"])
    agnews = pd.read_csv(AGNEWS)
    control = agnews[~agnews["text"].isin(seen)].sample(TRAFFIC, random_state=11)["text"].tolist()
    since = datetime.now(UTC)
    assert len(predict(serve_url, control)) == TRAFFIC
    wait_for_logged(store, since, name, TRAFFIC)
    runs_before = {r["dag_run_id"] for r in _training_runs(airflow)}
    control_run, states, index = _monitor(airflow, since, name)
    control_summary = airflow.xcom(MONITOR, control_run, "per_model.check", map_index=index)
    assert control_summary["verdict"] == "no_drift", control_summary
    assert control_summary["model"] == {"name": name, "version": "1"}
    assert control_summary["served_rows"] == TRAFFIC
    assert states["decide"] == states["trigger_training"] == states["record_trigger"] == "skipped", states
    assert "verdict 'no_drift'" in airflow.task_log(MONITOR, control_run, "per_model.decide", map_index=index)
    assert {r["dag_run_id"] for r in _training_runs(airflow)} == runs_before
    # the second model's own window: it is checked against its own training data, not the first's
    # (dry run: a 12-class model trained on 240 rows predicts a label mix unlike its training
    # labels, which the check may call drift; retraining it is not this test's business)
    since = datetime.now(UTC)
    assert len(predict(other_url, other_texts)) == len(other_texts)
    wait_for_logged(store, since, other_name, len(other_texts))
    other_run_id, other_states, other_index = _monitor(airflow, since, other_name, dry_run=True)
    other_check = airflow.xcom(MONITOR, other_run_id, "per_model.check", map_index=other_index)
    assert other_check["model"] == {"name": other_name, "version": "1"}, other_check
    assert other_check["dataset"] == other.dataset and other_check["served_rows"] == len(other_texts)
    other_snapshot = airflow.xcom(DAG_ID, other_run, "extract")["snapshot_id"]
    assert other_snapshot in other_check["reference_key"], other_check
    assert snapshot["snapshot_id"] not in other_check["reference_key"]
    assert other_check["verdict"] in {"no_drift", "drift"}, other_check  # judged: enough rows
    assert other_states["trigger_training"] == "skipped", other_states
    checked = {ti["rendered_map_index"] for ti in airflow.mapped(MONITOR, other_run_id, "per_model.check")}
    assert checked == {other_name}, checked  # the window held only the second model's traffic
    assert {r["dag_run_id"] for r in _training_runs(airflow)} == runs_before

    # new labelled production data lands in raw/ (docs/pipeline.md: how labelled data gets there)
    seed_raw(settings, AGNEWS, batches=1, rows=120, end=today, store=store, batch_suffix="_labelled", seed=1)

    # drift: 20 Newsgroups posts -> drift -> continuous_training with the drift in its conf
    news = pd.read_csv(NEWSGROUPS)
    news = news[news["text"].str.strip().str.len().between(20, 3000)]
    drifted = news.sample(TRAFFIC, random_state=5)["text"].tolist()
    since = datetime.now(UTC)
    assert len(predict(serve_url, drifted)) == TRAFFIC
    wait_for_logged(store, since, name, TRAFFIC)
    # the retrain warm-starts from the champion (v1) with ZeRO left to "auto" (stage 0 on CPU), and
    # takes over through the staged rollout (small windows; two small models agree less than the
    # production default asks)
    training = {
        "epochs": 2,
        "gate_min_macro_f1": 0.2,
        **SMALL_TRAINING,
        "zero_stage": "auto",
        "init_from": "champion",
        "rollout": "shadow+canary",
        "shadow_min_texts": 30,
        "shadow_max_minutes": 3,
        "shadow_min_agreement": 0.3,
        "canary_fraction": 0.5,
        "canary_min_requests": 15,
        "canary_max_minutes": 3,
    }
    drift_run, states, index = _monitor(airflow, since, name, training_params=training)
    drift = airflow.xcom(MONITOR, drift_run, "per_model.check", map_index=index)
    assert drift["verdict"] == "drift", drift
    assert drift["text"]["drifted"] is True, drift["text"]
    assert states["trigger_training"] == states["record_trigger"] == "success", states
    assert store.exists(drift["report_key"]) and store.exists(drift["summary_key"])
    links = airflow.links(MONITOR, drift_run, "per_model.check", map_index=index)
    _assert_report_opens(airflow, links["Evidently report"])
    _assert_renders_in_a_browser(links["Evidently report"], tmp_path)
    assert links["MLflow run"].endswith("/artifacts/report.html"), links
    drift_mlflow = mlflow.get_run(drift["mlflow_run_id"])
    assert drift_mlflow.data.tags["verdict"] == "drift"
    assert "report.html" in {a.path for a in mlflow.list_artifacts(drift["mlflow_run_id"])}

    triggered = _drift_runs(airflow, settings.dataset)
    assert len(triggered) == 1, triggered
    second = triggered[0]["dag_run_id"]
    conf_sent = triggered[0]["conf"]
    assert conf_sent["dataset"] == settings.dataset
    assert conf_sent["report"] == drift["report_key"]
    assert conf_sent["drift_score"] == pytest.approx(drift["drift_score"])
    assert conf_sent["epochs"] == 2 and conf_sent["init_from"] == "champion"

    # a second drift verdict while that run is queued/running: no second trigger
    busy_run, states, index = _monitor(airflow, since, name, training_params=training)
    if states["decide"] == "skipped" and airflow.run(DAG_ID, second)["state"] != "success":
        log = airflow.task_log(MONITOR, busy_run, "per_model.decide", map_index=index)
        assert "already queued or running" in log
    assert states["trigger_training"] == "skipped", states

    # live traffic (AG News, paced) while the retrained model is in shadow and canary
    agnews_texts = pd.read_csv(AGNEWS)["text"].tolist()[-200:]
    in_shadow = lambda: _stage_started(airflow, second)  # noqa: E731
    with LiveTraffic(f"{serve_url}/v1/predict", agnews_texts, in_shadow) as live:
        assert airflow.wait_for_run(DAG_ID, second, timeout=1800)["state"] == "success", airflow.task_states(
            DAG_ID, second
        )
    assert not live.failed, f"{len(live.failed)} of {live.sent} live requests failed: {live.failed[:3]}"
    outcome = airflow.xcom(DAG_ID, second, "register")
    assert outcome["version"] == "2"
    version = mlflow.get_model_version(name, "2")
    assert version.tags["trigger_reason"] == "drift"
    assert float(version.tags["drift_score"]) == pytest.approx(drift["drift_score"])
    assert version.tags["drift_report"] == drift["report_key"]
    run_2 = mlflow.get_run(airflow.xcom(DAG_ID, second, "training_summary")["mlflow_run_id"])
    assert run_2.data.tags["trigger_reason"] == "drift"
    assert run_2.data.tags["drift_report"] == drift["report_key"]
    # warm start from v1, and ZeRO "auto" resolved to stage 0 for CPU workers
    assert run_2.data.tags["init_from"] == "champion" and run_2.data.tags["init_model_version"] == "1"
    assert run_2.data.params["zero_stage"] == "0" and run_2.data.params["zero_stage_requested"] == "auto"
    # retraining used the new labelled batch *and* the earlier snapshot (data window)
    sources = run_2.data.tags["training_snapshots"].split(",")
    assert sources[1:] == [snapshot["snapshot_id"]], sources
    second_snapshot = airflow.xcom(DAG_ID, second, "extract")
    assert second_snapshot["batches"] == [f"{today.isoformat()}_labelled"]
    # deployed only if it passed the gate; the service says which version answers
    states = airflow.task_states(DAG_ID, second)
    expected = "2" if outcome["promoted"] else "1"
    assert states["deploy"] == states["smoke_test"] == ("success" if outcome["promoted"] else "skipped")
    # a drift-triggered run goes through the same stages: shadow, then canary, then 100 %
    staged = ("start_shadow", "shadow_check", "canary")
    assert [states[t] for t in staged] == ["success" if outcome["promoted"] else "skipped"] * 3, states
    if outcome["promoted"]:
        assert outcome["champion_moved"] is False  # challenger until the live stages passed
        shadow = airflow.xcom(DAG_ID, second, "shadow_check")["shadow"]
        assert shadow["decision"] in {"promote", "no_evidence"}, shadow
        assert live.sent > 0
        actions = [e["action"] for e in read_history(settings, name)]
        assert actions[-4:] == ["shadow_start", "canary_start", "canary_pass", "deploy"], actions
        report = airflow.links(DAG_ID, second, "shadow_check")["Rollout report"]
        _assert_report_opens(airflow, report)
    assert mlflow.get_model_version_by_alias(name, "champion").version == expected
    assert mlflow.get_model_version_by_alias(name, "serving").version == expected
    served = requests.get(f"{serve_url}/v1/model", timeout=30).json()
    assert (served["name"], served["version"]) == (name, expected), served

    # cooldown: the same drifted window again, training finished -> skipped, cooldown named
    cooldown_run, states, index = _monitor(airflow, since, name, training_params=training)
    assert airflow.xcom(MONITOR, cooldown_run, "per_model.check", map_index=index)["verdict"] == "drift"
    assert states["decide"] == states["trigger_training"] == "skipped", states
    assert "cooldown until" in airflow.task_log(MONITOR, cooldown_run, "per_model.decide", map_index=index)
    assert len(_drift_runs(airflow, settings.dataset)) == 1

    # nothing new -> everything after extract is skipped, and the run still succeeds
    third = airflow.trigger(DAG_ID, conf={"dataset": settings.dataset})
    assert airflow.wait_for_run(DAG_ID, third, timeout=300)["state"] == "success"
    states = airflow.task_states(DAG_ID, third)
    assert states.pop("extract") == "skipped"
    assert set(states.values()) == {"skipped"}, states


def test_new_raw_data_starts_training_for_its_dataset(airflow, full_stack):
    """raw_data_watch finds a new batch and triggers a continuous_training run for the batch's
    dataset (one per dataset: tests/integration/test_multi_dataset_dags.py). The batch is bad:
    validate quarantines it and the run fails naming the stage, the batch, the failed expectation
    and what to do."""
    settings = Settings(dataset=f"it-asset-{uuid.uuid4().hex[:8]}")
    store = ObjectStore(settings)
    frame = pd.read_csv(AGNEWS).sample(60, random_state=2).drop(columns=["label"])
    store.put_bytes(f"raw/{settings.dataset}/upload-1/part-000.csv", frame.to_csv(index=False).encode())
    time.sleep(1.5)  # due once uploaded before the watch's cutoff (S3 stamps have 1 s resolution)

    before = {r["dag_run_id"] for r in _training_runs(airflow)}
    watch = airflow.trigger(WATCH, conf={"datasets": [settings.dataset]})
    assert airflow.wait_for_run(WATCH, watch, timeout=300)["state"] == "success"
    (detected,) = airflow.mapped(WATCH, watch, "per_dataset.detect")
    assert (detected["rendered_map_index"], detected["state"]) == (settings.dataset, "success")
    assert airflow.xcom(WATCH, watch, "per_dataset.detect", map_index=0)["batches"] == ["upload-1"]

    deadline = time.monotonic() + 180
    while not (new := [r for r in _training_runs(airflow) if r["dag_run_id"] not in before]):
        assert time.monotonic() < deadline, "no continuous_training run after the watch"
        time.sleep(3)
    (run,) = new
    assert run["conf"]["dataset"] == settings.dataset and run["conf"]["reason"] == "new_data", run
    final = airflow.wait_for_run(DAG_ID, run["dag_run_id"], timeout=600)
    assert final["state"] == "failed"
    assert airflow.xcom(DAG_ID, run["dag_run_id"], "extract")["dataset"] == settings.dataset
    states = airflow.task_states(DAG_ID, run["dag_run_id"])
    assert (states["extract"], states["validate"]) == ("success", "failed"), states
    text = airflow.task_log(DAG_ID, run["dag_run_id"], "validate")
    assert "validation quarantined 1/1 batches" in text and "label" in text, text[-2000:]
    assert "stage 'validate' (data validation (Great Expectations)) failed" in text
    assert "what to do:" in text
    assert store.exists(f"quarantine/{settings.dataset}/upload-1/part-000.csv")
    assert airflow.links(DAG_ID, run["dag_run_id"], "validate")["Data Docs (Great Expectations)"]

    # announced once: with nothing new the watch skips and emits no event
    again = airflow.trigger(WATCH, conf={"datasets": [settings.dataset]})
    assert airflow.wait_for_run(WATCH, again, timeout=300)["state"] == "success"
    assert [ti["state"] for ti in airflow.mapped(WATCH, again, "per_dataset.detect")] == ["skipped"]
