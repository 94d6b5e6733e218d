"""The pipeline DAGs with several datasets side by side, on the real local stack through Airflow's
REST API: drift_monitor maps one check per model that served the window, each judged against its
own training data, and a drifted model triggers continuous_training for its own dataset only;
raw_data_watch gives every dataset with new data a continuous_training run of its own.

Nothing is trained: models are the packaged base model with a random head (tests/model_factory.py),
the drift-triggered run finds no new data and skips at extract, and the raw batches lack their
label column, so the runs stop at validate."""

from __future__ import annotations

import io
import time
import uuid
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest

from ml.data import split_key
from ml.prediction_log import PIPELINE_REQUEST_PREFIX, PredictionLogger
from ml.settings import Settings
from ml.storage import ObjectStore
from tests.conftest import AGNEWS, NEWSGROUPS
from tests.integration.conftest import stack
from tests.model_factory import build_export, register_export

pytestmark = pytest.mark.integration

TRAINING = "continuous_training"
MONITOR = "drift_monitor"
WATCH = "raw_data_watch"


@pytest.fixture(scope="module")
def airflow(local_stack):
    from airflow_client import AirflowClient

    local_stack.require("s3", "mlflow", "airflow")
    client = AirflowClient("http://127.0.0.1:8080", *stack.airflow_login())
    paused = {}
    for dag_id in (TRAINING, MONITOR, WATCH):
        paused[dag_id] = client.wait_for_dag(dag_id)["is_paused"]
        client.unpause(dag_id)
    yield client
    # scheduled runs of the monitor and the watch would act on whatever the stack holds later
    for dag_id in (MONITOR, WATCH):
        client.pause(dag_id)
    if paused[TRAINING]:
        client.pause(TRAINING)


def _mapped(airflow, dag_id: str, run_id: str, task_id: str) -> dict[str, dict]:
    """The mapped instances of ``task_id`` by their rendered name (model or dataset)."""
    return {ti["rendered_map_index"]: ti for ti in airflow.mapped(dag_id, run_id, task_id)}


def _model(settings: Settings, store: ObjectStore, export, reference: pd.DataFrame) -> tuple[str, str]:
    """A registered version whose snapshot (manifest naming the dataset, train split) is ``reference``."""
    from mlflow import MlflowClient

    snapshot_id = f"{settings.dataset}-snap"
    buf = io.BytesIO()
    reference.to_parquet(buf, index=False)
    store.put_bytes(split_key(snapshot_id, "train"), buf.getvalue())
    store.put_json(
        f"snapshots/{snapshot_id}/manifest.json",
        {"snapshot_id": snapshot_id, "dataset": settings.dataset, "dry_run": True, "objects": []},
    )
    version = register_export(settings, export, snapshot_id)
    MlflowClient(settings.mlflow_tracking_uri).set_model_version_tag(
        settings.registered_model, version, "snapshot_id", snapshot_id
    )
    return settings.registered_model, version


def _log(store: ObjectStore, since: datetime, traffic: list[tuple[str, str, str, str, str]]) -> None:
    """(request id, text, label, model name, version) rows, logged from ``since`` on, 0.02 s apart."""
    logger = PredictionLogger(store, writer_id=f"it-multi-{uuid.uuid4().hex[:6]}")
    logger.append(
        [
            {
                "ts": since + timedelta(seconds=i / 50),
                "request_id": request_id,
                "text": text,
                "label": label,
                "score": 0.9,
                "model_name": name,
                "model_version": version,
            }
            for i, (request_id, text, label, name, version) in enumerate(traffic)
        ]
    )
    assert logger.flush_now() == len(traffic)


def test_drift_monitor_checks_every_served_model_against_its_own_reference(airflow, tmp_path):
    """Three models served one window: an AG News model AG News texts (no drift), a 20 Newsgroups
    model 20 Newsgroups texts (no drift; against AG News it would be drift), and a second AG News
    model 20 Newsgroups posts (drift). One check each; only the drifted model triggers training,
    for its own dataset. The pipeline's own smoke requests are no model's traffic."""
    tag = uuid.uuid4().hex[:8]
    # custom model names: their dataset can come only from the recorded snapshot manifest
    agnews_set = Settings(dataset=f"it-md-ag-{tag}", registered_model=f"it-md-ag-{tag}-model")
    news_set = Settings(dataset=f"it-md-news-{tag}")  # default name <dataset>-classifier
    drifted_set = Settings(dataset=f"it-md-drift-{tag}", registered_model=f"it-md-drift-{tag}-model")
    store = ObjectStore(agnews_set)
    store.ensure_bucket()

    agnews = pd.read_csv(AGNEWS).sample(frac=1.0, random_state=3)
    ag_train, ag_held_out = agnews.iloc[:600], agnews.iloc[600:850]
    news = pd.read_csv(NEWSGROUPS)
    odd = news.groupby("label").cumcount() % 2 == 1
    news_train, news_held_out = news[~odd], news[odd]  # the same label shares on both sides

    export = build_export(tmp_path / "export")
    ag_model = _model(agnews_set, store, export, ag_train)
    news_model = _model(news_set, store, export, news_train)
    drifted_model = _model(drifted_set, store, export, ag_train)

    # a window of the last seconds, under the test lock: other tests' traffic (models without a
    # reference, whose checks would fail the run) stays out of it
    since = datetime.now(UTC) - timedelta(seconds=20)
    traffic = [
        (f"ag{i}", t, lbl, *ag_model)
        for i, (t, lbl) in enumerate(zip(ag_held_out["text"], ag_held_out["label"], strict=True))
    ]
    traffic += [
        (f"nw{i}", t, lbl, *news_model)
        for i, (t, lbl) in enumerate(zip(news_held_out["text"], news_held_out["label"], strict=True))
    ]
    traffic += [(f"dr{i}", t, "World", *drifted_model) for i, t in enumerate(news_held_out["text"])]
    smoke_model = f"it-md-smoke-{tag}-classifier"
    traffic += [(f"{PIPELINE_REQUEST_PREFIX}{i}", "smoke text", "World", smoke_model, "1") for i in range(5)]
    _log(store, since, traffic)

    before = {r["dag_run_id"] for r in airflow.runs(TRAINING, limit=50)}
    hours = ((datetime.now(UTC) - since).total_seconds() + 5) / 3600
    run_id = airflow.trigger(MONITOR, conf={"window_hours": hours, "training_params": {"epochs": 1}})
    assert airflow.wait_for_run(MONITOR, run_id, timeout=900)["state"] == "success"

    listed = {m["name"]: m for m in airflow.xcom(MONITOR, run_id, "list_models")}
    assert listed[ag_model[0]]["rows"] == len(ag_held_out)
    assert listed[news_model[0]]["rows"] == len(news_held_out)
    assert smoke_model not in listed, "the pipeline's own requests are not a model's traffic"

    checks = _mapped(airflow, MONITOR, run_id, "per_model.check")
    mine = {ag_model[0], news_model[0], drifted_model[0]}
    assert mine <= set(checks), checks.keys()  # one mapped check per model, named after it
    assert len(checks) == len(listed)
    summaries = {
        name: airflow.xcom(MONITOR, run_id, "per_model.check", map_index=checks[name]["map_index"])
        for name in mine
    }
    for (name, version), settings, verdict in (
        (ag_model, agnews_set, "no_drift"),
        (news_model, news_set, "no_drift"),
        (drifted_model, drifted_set, "drift"),
    ):
        summary = summaries[name]
        assert summary["verdict"] == verdict, (name, summary)
        assert summary["model"] == {"name": name, "version": version}
        # judged against its own training data, and its dataset is the one recorded for it
        assert summary["reference_key"] == split_key(f"{settings.dataset}-snap", "train")
        assert (summary["dataset"], summary["dataset_source"]) == (settings.dataset, "snapshot manifest")
    assert summaries[news_model[0]]["rows"]["current"] == len(news_held_out)
    link = airflow.links(MONITOR, run_id, "per_model.check", map_index=checks[drifted_model[0]]["map_index"])
    assert link["Evidently report"].endswith(summaries[drifted_model[0]]["report_key"]), link

    # instances that never ran (upstream skipped) have no rendered name: the group's map index joins them
    index = {name: checks[name]["map_index"] for name in mine}
    decide, trigger, record = (
        {
            name: ti
            for ti in airflow.mapped(MONITOR, run_id, f"per_model.{task}")
            for name in mine
            if ti["map_index"] == index[name]
        }
        for task in ("decide", "trigger_training", "record_trigger")
    )
    for name in (ag_model[0], news_model[0]):
        assert decide[name]["state"] == trigger[name]["state"] == record[name]["state"] == "skipped"
        log = airflow.task_log(MONITOR, run_id, "per_model.decide", map_index=decide[name]["map_index"])
        assert "verdict 'no_drift'" in log
        assert not store.exists(f"reports/drift/{name}/_last_trigger.json")
    drifted = drifted_model[0]
    assert decide[drifted]["state"] == trigger[drifted]["state"] == record[drifted]["state"] == "success"

    new_runs = [r for r in airflow.runs(TRAINING, limit=50) if r["dag_run_id"] not in before]
    triggered = [r for r in new_runs if (r.get("conf") or {}).get("model") == drifted]
    assert len(triggered) == 1, new_runs
    conf = triggered[0]["conf"]
    assert conf["dataset"] == drifted_set.dataset and conf["reason"] == "drift" and conf["epochs"] == 1
    assert conf["report"] == summaries[drifted]["report_key"]
    assert not [
        r for r in new_runs if (r.get("conf") or {}).get("dataset") in {agnews_set.dataset, news_set.dataset}
    ]
    stamp = store.get_json(f"reports/drift/{drifted}/_last_trigger.json")
    assert stamp["training_run_id"] == triggered[0]["dag_run_id"] and stamp["by"] == run_id

    # that run trains the drifted model's dataset: nothing new under raw/<it>/ -> skipped at extract
    training_run = triggered[0]["dag_run_id"]
    assert airflow.wait_for_run(TRAINING, training_run, timeout=600)["state"] == "success"
    assert airflow.task_states(TRAINING, training_run)["extract"] == "skipped"
    assert f"dataset {drifted_set.dataset}" in airflow.task_log(TRAINING, training_run, "extract")

    # the same window again: the drifted model is in its own cooldown; the others are not affected
    hours = ((datetime.now(UTC) - since).total_seconds() + 5) / 3600
    again = airflow.trigger(MONITOR, conf={"window_hours": hours})
    assert airflow.wait_for_run(MONITOR, again, timeout=900)["state"] == "success"
    decide = _mapped(airflow, MONITOR, again, "per_model.decide")
    assert decide[drifted]["state"] == "skipped"
    assert "cooldown until" in airflow.task_log(
        MONITOR, again, "per_model.decide", map_index=decide[drifted]["map_index"]
    )


def test_no_traffic_is_a_clear_skip(airflow):
    run_id = airflow.trigger(MONITOR, conf={"window_hours": 0.0001})  # the 0.36 s before the run
    assert airflow.wait_for_run(MONITOR, run_id, timeout=300)["state"] == "success"
    states = airflow.task_states(MONITOR, run_id)
    assert states["list_models"] == "skipped", states
    assert "no traffic" in airflow.task_log(MONITOR, run_id, "list_models")
    assert airflow.mapped(MONITOR, run_id, "per_model.check") == []


def test_raw_data_watch_starts_one_training_run_per_dataset(airflow):
    """New (bad) batches under two datasets -> one mapped detect each -> two continuous_training
    runs, each on its own dataset (each quarantines its own batch at validate); announced once."""
    tag = uuid.uuid4().hex[:8]
    datasets = sorted([f"it-mw-ag-{tag}", f"it-mw-news-{tag}"])
    store = ObjectStore(Settings())
    sources = {datasets[0]: AGNEWS, datasets[1]: NEWSGROUPS}
    for dataset, source in sources.items():
        frame = pd.read_csv(source).sample(40, random_state=4).drop(columns=["label"])
        store.put_bytes(f"raw/{dataset}/upload-1/part-000.csv", frame.to_csv(index=False).encode())
    time.sleep(1.5)  # due once uploaded before the watch's cutoff (S3 stamps have 1 s resolution)

    before = {r["dag_run_id"] for r in airflow.runs(TRAINING, limit=50)}
    watch = airflow.trigger(WATCH, conf={"datasets": datasets})
    assert airflow.wait_for_run(WATCH, watch, timeout=300)["state"] == "success"
    assert airflow.xcom(WATCH, watch, "list_datasets") == datasets
    for task_id in ("per_dataset.detect", "per_dataset.trigger_training", "per_dataset.record_announcement"):
        instances = _mapped(airflow, WATCH, watch, task_id)
        assert sorted(instances) == datasets, (task_id, instances.keys())
        assert {ti["state"] for ti in instances.values()} == {"success"}, (task_id, instances)

    runs = {}
    for dataset in datasets:
        mine = [
            r
            for r in airflow.runs(TRAINING, limit=50)
            if r["dag_run_id"] not in before and (r.get("conf") or {}).get("dataset") == dataset
        ]
        assert len(mine) == 1, (dataset, mine)
        assert mine[0]["conf"]["reason"] == "new_data" and mine[0]["conf"]["batches"] == ["upload-1"]
        runs[dataset] = mine[0]["dag_run_id"]
        assert store.get_json(f"reports/raw_watch/{dataset}.json")["training_run_id"] == runs[dataset]
    for dataset, run_id in runs.items():
        final = airflow.wait_for_run(TRAINING, run_id, timeout=600)
        assert final["state"] == "failed"  # no label column: every batch quarantined
        assert airflow.xcom(TRAINING, run_id, "extract")["dataset"] == dataset
        assert airflow.task_states(TRAINING, run_id)["validate"] == "failed"
        assert store.exists(f"quarantine/{dataset}/upload-1/part-000.csv")

    # announced once: nothing new under either dataset now -> both skip, no further runs
    again = airflow.trigger(WATCH, conf={"datasets": datasets})
    assert airflow.wait_for_run(WATCH, again, timeout=300)["state"] == "success"
    detect = _mapped(airflow, WATCH, again, "per_dataset.detect")
    assert sorted(detect) == datasets and {ti["state"] for ti in detect.values()} == {"skipped"}
    after = [r for r in airflow.runs(TRAINING, limit=50) if (r.get("conf") or {}).get("dataset") in runs]
    assert len(after) == 2, after
