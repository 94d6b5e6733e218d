"""Every DAG file imports cleanly, parses fast, imports nothing heavy and looks up nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DAG_FILES = sorted((REPO_ROOT / "dags").glob("*.py"))
HEAVY = ["torch", "transformers", "ray", "deepspeed", "mlflow", "great_expectations", "evidently"]

# Parse a DAG file the way the dag-processor does, in a clean interpreter, with connection and
# variable lookups booby-trapped: parse-time lookups hit the metadata DB on every parse.
PARSE_PROBE = r"""
import json, sys, time
import airflow.sdk
from airflow.sdk import BaseHook, Variable
calls = []
def trap(name):
    def _trap(*args, **kwargs):
        calls.append(f"{name}{args}")
        raise RuntimeError(f"{name} called at parse time")
    return _trap
BaseHook.get_connection = classmethod(trap("get_connection"))
Variable.get = staticmethod(trap("Variable.get"))
from airflow.dag_processing.dagbag import DagBag
start = time.perf_counter()
bag = DagBag(dag_folder=sys.argv[1])
elapsed = time.perf_counter() - start
print(json.dumps({
    "seconds": elapsed,
    "errors": {k: str(v) for k, v in bag.import_errors.items()},
    "dags": sorted(bag.dag_ids),
    "calls": calls,
    "heavy": sorted(m for m in sys.argv[2].split(",") if m in sys.modules),
}))
"""


@pytest.fixture(scope="module")
def airflow_home():
    with tempfile.TemporaryDirectory(prefix="airflow-home-") as home:
        yield home


def parse(dag_file: Path, airflow_home: str) -> dict:
    env = {
        **os.environ,
        "AIRFLOW_HOME": airflow_home,
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(dag_file.parent),
    }
    out = subprocess.run(
        [sys.executable, "-c", PARSE_PROBE, str(dag_file), ",".join(HEAVY)],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_there_are_dags():
    assert DAG_FILES, "no DAG files found in dags/"


@pytest.mark.parametrize("dag_file", DAG_FILES, ids=[f.name for f in DAG_FILES])
def test_dag_file_parses_fast_without_heavy_imports_or_lookups(dag_file, airflow_home):
    result = parse(dag_file, airflow_home)
    assert result["errors"] == {}
    assert result["dags"], f"{dag_file.name} defines no DAG"
    assert result["calls"] == [], "connection/variable lookups at parse time"
    assert result["heavy"] == [], f"heavy modules imported at parse time: {result['heavy']}"
    assert result["seconds"] < 1.0, f"parsing took {result['seconds']:.2f}s"


@pytest.fixture(scope="module")
def dagbag(airflow_home):
    os.environ.setdefault("AIRFLOW_HOME", airflow_home)
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO_ROOT / "dags"))
    assert bag.import_errors == {}
    return bag


# Tasks that must not retry, and why.
NO_RETRY = {
    # after a failed smoke test the old version is back; a retry would test the old version
    # against the new one's offline predictions and roll back again
    "continuous_training.smoke_test",
    # a staged rollout's live checks: a failed one removed the candidate; a retry would judge nothing
    "continuous_training.shadow_check",
    "continuous_training.canary",
    # a retried rollback would roll back once more, to the version before the previous one
    "serving_control.apply",
}


def test_every_dag_is_documented_tagged_and_retried(dagbag):
    for dag_id, dag in dagbag.dags.items():
        assert dag.doc_md and len(dag.doc_md) > 200, f"{dag_id}: doc_md missing"
        assert dag.tags, f"{dag_id}: no tags"
        assert not dag.catchup, f"{dag_id}: catchup would replay every missed day at once"
        for task in dag.tasks:
            if f"{dag_id}.{task.task_id}" in NO_RETRY:
                assert task.retries == 0, f"{dag_id}.{task.task_id} must not retry"
            else:
                assert task.retries >= 1, f"{dag_id}.{task.task_id}: no retries"
            assert task.execution_timeout is not None, f"{dag_id}.{task.task_id}: no timeout"


def test_every_task_explains_its_failures(dagbag):
    from ct_airflow.failures import STAGE_HINTS, explain_failure

    for dag_id, dag in dagbag.dags.items():
        for task in dag.tasks:
            assert explain_failure in (task.on_failure_callback or []), f"{dag_id}.{task.task_id}"
            # a task in a (mapped) task group: its own id names the stage
            own_id = task.task_id.rsplit(".", 1)[-1]
            assert own_id in STAGE_HINTS, f"{dag_id}.{task.task_id}: no stage hint"


def test_continuous_training_shape(dagbag):
    from airflow.sdk import AssetOrTimeSchedule

    dag = dagbag.dags["continuous_training"]
    assert dag.max_active_runs == 1
    # daily *or* when raw_data_watch announces new data
    assert isinstance(dag.schedule, AssetOrTimeSchedule)
    assert dag.schedule.timetable.expression == "0 0 * * *"
    assert [a.name for a in dag.schedule.asset_condition.objects] == ["ct_raw_data"]
    assert dag.get_task("validate").upstream_task_ids == {"extract"}
    # serving changes only after a registered, gated model: register -> [shadow -> canary] -> deploy
    # -> smoke_test; deploy also runs when the live stages were skipped (direct rollout), never when
    # one failed
    assert dag.get_task("start_shadow").upstream_task_ids == {"register"}
    assert dag.get_task("shadow_check").upstream_task_ids == {"start_shadow"}
    assert dag.get_task("canary").upstream_task_ids == {"shadow_check"}
    assert dag.get_task("deploy").upstream_task_ids == {"register", "canary"}
    assert dag.get_task("deploy").trigger_rule == "none_failed_min_one_success"
    assert dag.get_task("smoke_test").upstream_task_ids == {"deploy", "training_summary", "register"}
    assert not dag.get_task("smoke_test").downstream_task_ids
    params = dag.params.dump()
    assert params["rollout"] == "shadow+canary"
    from ml.staged_rollout import ROLLOUTS

    assert dag.params.get_param("rollout").schema["enum"] == list(ROLLOUTS)


def _mapped_group(task):
    """The mapped task group ``task`` is expanded in, or None."""
    return task.get_closest_mapped_task_group()


def test_raw_data_watch_maps_one_announcement_per_dataset(dagbag):
    watch = dagbag.dags["raw_data_watch"]
    assert watch.max_active_runs == 1
    assert watch.get_task("list_datasets").upstream_task_ids == set()
    per_dataset = ["per_dataset.detect", "per_dataset.trigger_training", "per_dataset.record_announcement"]
    groups = {getattr(_mapped_group(watch.get_task(task_id)), "group_id", None) for task_id in per_dataset}
    assert groups == {"per_dataset"}, "detect/trigger/record must be mapped together"
    group = _mapped_group(watch.get_task("per_dataset.detect"))
    # expanded over what list_datasets returns, one map index per dataset
    assert [op.task_id for op in group.iter_mapped_dependencies()] == ["list_datasets"]
    assert watch.get_task("per_dataset.detect").upstream_task_ids == {"list_datasets"}
    trigger = watch.get_task("per_dataset.trigger_training")
    assert trigger.trigger_dag_id == "continuous_training"
    assert trigger.upstream_task_ids == {"per_dataset.detect"}
    assert watch.get_task("per_dataset.record_announcement").upstream_task_ids == {
        "per_dataset.detect",
        "per_dataset.trigger_training",
    }
    # one triggered run per dataset, never an asset event: Airflow would merge events of several
    # datasets into one continuous_training run, which trains one dataset
    assert all(not task.outlets for task in watch.tasks)
    assert "ct_raw_data" in dagbag.dags["continuous_training"].schedule.asset_condition.objects[0].name
    schema = watch.params.get_param("datasets").schema
    assert schema["type"] == ["null", "array"] and schema["items"] == {"type": "string"}
    assert schema.get("title") == "Datasets"
    # empty = every dataset under raw/ (CT_RAW_WATCH_DATASETS is not set here)
    assert watch.params["datasets"] is None
    doc = watch.doc_md
    phrases = ("per_dataset.detect", "list_datasets", "max_active_runs=1", "merges asset events", "datasets")
    for phrase in phrases:
        assert phrase in doc, phrase


def test_trigger_form_has_the_documented_params(dagbag):
    params = dagbag.dags["continuous_training"].params
    schema = {name: params.get_param(name).schema for name in params}
    for name in (
        "epochs",
        "learning_rate",
        "num_workers",
        "zero_stage",
        "data_window_days",
        "max_length",
        "force_promote",
        "dry_run",
    ):
        assert schema[name].get("title"), f"{name}: no title in the trigger form"
    assert "WARNING" in params.get_param("force_promote").description
    assert params["force_promote"] is False and params["dry_run"] is False
    monitor = dagbag.dags["drift_monitor"].params
    for name in ("window_hours", "min_rows", "cooldown_hours", "dry_run", "training_params"):
        assert monitor.get_param(name).schema.get("title"), name


def test_tasks_link_to_what_they_produced(dagbag):
    def links(dag_id, task_id):
        return {link.name for link in dagbag.dags[dag_id].get_task(task_id).operator_extra_links}

    assert "Data Docs (Great Expectations)" in links("continuous_training", "validate")
    assert "MLflow run" in links("continuous_training", "training_summary")
    assert {"MLflow run", "MLflow model version"} <= links("continuous_training", "register")
    assert "Ray job" in links("continuous_training", "train")
    assert {"Evidently report", "MLflow run"} <= links("drift_monitor", "per_model.check")


def test_drift_monitor_shape(dagbag):
    dag = dagbag.dags["drift_monitor"]
    assert dag.max_active_runs == 1
    assert dag.timetable.expression == "0 * * * *"
    # the first scheduled run is the next full hour, not an immediate one when unpaused
    assert dag.start_date is None
    assert dag.get_task("list_models").upstream_task_ids == set()
    # check -> decide -> trigger_training -> record_trigger, mapped together: one instance per model
    per_model = [f"per_model.{t}" for t in ("check", "decide", "trigger_training", "record_trigger")]
    groups = {getattr(_mapped_group(dag.get_task(task_id)), "group_id", None) for task_id in per_model}
    assert groups == {"per_model"}, groups
    group = _mapped_group(dag.get_task("per_model.check"))
    assert [op.task_id for op in group.iter_mapped_dependencies()] == ["list_models"]
    assert dag.get_task("per_model.check").upstream_task_ids == {"list_models"}
    assert dag.get_task("per_model.decide").upstream_task_ids == {"per_model.check"}
    assert dag.get_task("per_model.trigger_training").trigger_dag_id == "continuous_training"
    assert dag.get_task("per_model.record_trigger").upstream_task_ids == {
        "per_model.decide",
        "per_model.trigger_training",
    }
    # the UI names each mapped instance after its model
    for task_id in per_model:
        assert "model" in (dag.get_task(task_id).map_index_template or ""), task_id
    doc = dag.doc_md
    phrases = ("list_models", "per_model.check", "every model", "version that served them", "own cooldown")
    for phrase in phrases:
        assert phrase.lower() in doc.lower(), phrase
