"""Evaluate, register and promote against the real MLflow server (artifacts in S3).

Two training runs are faked with real exports of the base model: the first is, by construction,
right on every test text (the test labels are its own predictions); the second is the same
network with its output rows rotated, so it is wrong on every text. The first becomes champion;
the second is registered as challenger only, and the champion stays.
"""

from __future__ import annotations

import io
import os
import uuid

import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ml.data import split_key
from ml.evaluate import evaluate_challenger
from ml.predict import TextClassifier
from ml.registry import CHALLENGER, CHAMPION, champion_version, register_challenger
from ml.settings import Settings
from ml.storage import ObjectStore
from tests.model_factory import LABELS, build_export, log_training_run, rotate_head

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def mlflow_stack(local_stack) -> None:
    local_stack.require("s3", "mlflow")


def test_evaluate_register_promote(mlflow_stack, agnews, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    settings = Settings(
        registered_model=f"it-{uuid.uuid4().hex[:10]}", gate_min_macro_f1=0.0, gate_tolerance=0.0
    )
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_experiment(f"it-registry-{uuid.uuid4().hex[:8]}")
    client = MlflowClient(settings.mlflow_tracking_uri)
    assert champion_version(client, settings.registered_model) is None, "no model yet: no champion"
    client.create_registered_model(settings.registered_model)
    assert champion_version(client, settings.registered_model) is None, "no alias yet: no champion"

    good = build_export(tmp_path / "good")
    bad = rotate_head(good, tmp_path / "bad")
    texts = agnews["text"].sample(24, random_state=3).tolist()
    truth = [label for label, _ in TextClassifier.from_dir(good, device="cpu").predict(texts)]
    snapshot_id = f"it-eval-{uuid.uuid4().hex[:10]}"
    split = io.BytesIO()
    pd.DataFrame({"text": texts, "label": truth}).to_parquet(split, index=False)
    ObjectStore(settings).put_bytes(split_key(snapshot_id, "test"), split.getvalue())

    # first model: above the floor, no champion -> v1 becomes champion
    run_1 = log_training_run(good, snapshot_id)
    evaluation_1 = evaluate_challenger(settings, snapshot_id, run_1)
    assert evaluation_1["challenger"]["accuracy"] == 1.0
    assert evaluation_1["champion"] is None
    assert evaluation_1["gate"]["promote"] is True
    tags = {"trigger": "new data", "validation": "3/3 batches passed"}
    first = register_challenger(settings, run_1, evaluation_1, tags)
    assert first == {
        "name": settings.registered_model,
        "version": "1",
        "run_id": run_1,  # the deploy's identity check: a version number alone can be reused
        "promoted": True,
        "champion_moved": True,  # move_champion (a direct rollout); staged: after the live stages
        "forced": False,
        "champion_version": "1",
        "reason": evaluation_1["gate"]["reason"],
    }
    # a retried task reuses the run's version instead of creating another
    assert register_challenger(settings, run_1, evaluation_1, tags) == first

    # second model: wrong on every text -> registered as challenger, champion stays on v1
    run_2 = log_training_run(bad, snapshot_id)
    evaluation_2 = evaluate_challenger(settings, snapshot_id, run_2)
    assert evaluation_2["challenger"]["accuracy"] == 0.0
    assert evaluation_2["champion"]["version"] == "1"
    assert evaluation_2["champion"]["run_id"] == run_1
    assert evaluation_2["champion"]["macro_f1"] == evaluation_1["challenger"]["macro_f1"]
    assert evaluation_2["gate"]["promote"] is False
    second = register_challenger(settings, run_2, evaluation_2, tags)
    assert (second["version"], second["promoted"], second["champion_version"]) == ("2", False, "1")

    assert register_challenger(settings, run_2, evaluation_2, tags) == second
    versions = client.search_model_versions(f"name = '{settings.registered_model}'")
    assert sorted(v.version for v in versions) == ["1", "2"]

    champion = client.get_model_version_by_alias(settings.registered_model, CHAMPION)
    challenger = client.get_model_version_by_alias(settings.registered_model, CHALLENGER)
    assert (champion.version, champion.run_id) == ("1", run_1)
    assert (challenger.version, challenger.run_id) == ("2", run_2)
    assert challenger.tags["gate_decision"] == "reject"
    assert challenger.tags["snapshot_id"] == snapshot_id
    assert challenger.tags["trigger"] == "new data"
    assert challenger.tags["validation"] == "3/3 batches passed"
    assert float(challenger.tags["champion_macro_f1"]) == evaluation_1["challenger"]["macro_f1"]
    assert challenger.description.startswith("NOT PROMOTED")
    assert champion.tags["gate_decision"] == "promote"

    # what the evaluation left on the challenger's run
    run = client.get_run(run_2)
    assert run.data.metrics["test_accuracy"] == 0.0
    assert run.data.metrics["champion_test_macro_f1"] == evaluation_1["challenger"]["macro_f1"]
    assert {f"test_f1_{label}" for label in LABELS} <= set(run.data.metrics)
    logged = {f.path for f in client.list_artifacts(run_2, "evaluation")}
    assert logged == {"evaluation/evaluation.json", "evaluation/confusion_matrix.png"}

    # the champion loads as a pyfunc model and predicts labels, from a DataFrame or a list
    model = mlflow.pyfunc.load_model(f"models:/{settings.registered_model}@{CHAMPION}")
    predicted = model.predict(pd.DataFrame({"text": texts[:5]}))
    assert list(predicted.columns) == ["label", "score"]
    assert predicted["label"].tolist() == truth[:5]
    assert model.predict(texts[:3])["label"].tolist() == truth[:3]

    # an operator's override: force_promote makes a rejected model champion, and says so
    run_3 = log_training_run(bad, snapshot_id)
    evaluation_3 = evaluate_challenger(settings, snapshot_id, run_3)
    assert evaluation_3["gate"]["promote"] is False
    forced = register_challenger(settings, run_3, evaluation_3, tags, force_promote=True)
    assert (forced["version"], forced["promoted"], forced["forced"]) == ("3", True, True)
    assert forced["reason"].startswith("FORCED")
    version_3 = client.get_model_version_by_alias(settings.registered_model, CHAMPION)
    assert version_3.version == "3"
    assert version_3.tags["forced_promotion"] == "true"
    assert version_3.tags["gate_decision"] == "promote"
    assert "FORCED" in version_3.description
    assert "forced_promotion" not in champion.tags
