"""Training configuration: every impossible config is refused before anything starts."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from pydantic import ValidationError

from ml.data import stratified_split
from ml.settings import Settings
from ml.train import (
    ZERO_AUTO_MIN_PARAMS,
    TrainConfig,
    TrainConfigError,
    check_config,
    count_parameters,
    deepspeed_config,
    resolve_precision,
    resolve_zero_stage,
    steps_per_epoch_for,
)

LABELS = ("Business", "Sci_Tech", "Sports", "World")
CLUSTER = {"CPU": 2.0}


def config(**overrides) -> TrainConfig:
    return TrainConfig(snapshot_id="s", run_name="r", **overrides)


@pytest.mark.parametrize("stage", [-1, 4, 7])
def test_zero_stage_outside_0_to_3_is_rejected(stage):
    with pytest.raises(ValidationError, match="ZeRO stage must be 0, 1, 2, 3"):
        config(zero_stage=stage)


def test_unknown_base_model_path(tmp_path):
    with pytest.raises(TrainConfigError, match="is not a Hugging Face model directory"):
        check_config(config(base_model=str(tmp_path / "nope")), LABELS, CLUSTER)


@pytest.mark.parametrize(
    ("overrides", "cluster", "message"),
    [
        ({"num_workers": 3}, {"CPU": 2.0}, "3 workers x 1.0 CPU = 3.0 CPU, but the Ray cluster has 2"),
        ({"num_workers": 2, "cpus_per_worker": 2}, {"CPU": 2.0}, "the Ray cluster has 2"),
        (
            {"num_workers": 1, "use_gpu": True},
            {"CPU": 2.0},
            "1 workers x 1.0 GPU = 1.0 GPU, but the Ray cluster has 0",
        ),
    ],
)
def test_more_workers_than_the_cluster_can_place(overrides, cluster, message):
    with pytest.raises(TrainConfigError, match=message.replace(".", r"\.").replace("x", "x")):
        check_config(config(**overrides), LABELS, cluster)


def test_labels_the_model_cannot_map(tmp_path):
    base = tmp_path / "finetuned"
    base.mkdir()
    (base / "config.json").write_text(
        json.dumps(
            {"architectures": ["BertForSequenceClassification"], "id2label": {"0": "World", "1": "Sports"}}
        )
    )
    with pytest.raises(TrainConfigError, match=r"labels \['Business', 'Sci_Tech'\] that base model"):
        check_config(config(base_model=str(base)), LABELS, CLUSTER)
    # a head that knows every label is fine
    assert check_config(config(base_model=str(base)), ("World", "Sports"), CLUSTER) == str(base)


def test_default_base_model_is_the_packaged_minilm():
    assert check_config(config(), LABELS, CLUSTER) == Settings().resolved_base_model()


def test_single_label_cannot_train():
    with pytest.raises(TrainConfigError, match="at least 2 labels"):
        check_config(config(), ("World",), CLUSTER)


@pytest.mark.parametrize(
    ("cuda", "bf16", "asked", "expected"),
    [
        (False, False, "auto", "fp32"),
        (False, True, "bf16", "fp32"),  # no mixed precision on CPU
        (True, True, "auto", "bf16"),
        (True, False, "auto", "fp16"),
        (True, True, "fp16", "fp16"),
    ],
)
def test_precision(cuda, bf16, asked, expected):
    assert resolve_precision(config(precision=asked), cuda, bf16) == expected


def test_deepspeed_config_carries_stage_precision_accumulation_and_schedule():
    ds = deepspeed_config(config(zero_stage=3, grad_accum_steps=4, epochs=2, warmup_ratio=0.25), "bf16", 10)
    assert ds["zero_optimization"] == {"stage": 3}
    assert ds["bf16"] == {"enabled": True} and ds["fp16"]["enabled"] is False
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["scheduler"]["params"]["total_num_steps"] == 20
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 5
    assert ds["optimizer"]["params"]["torch_adam"] is True


def test_stratified_split_is_deterministic_and_keeps_every_label():
    frame = pd.DataFrame(
        {"text": [f"t{i}" for i in range(200)], "label": [LABELS[i % 4] for i in range(200)]}
    )
    first = stratified_split(frame, 0.1, 0.2, seed=1)
    again = stratified_split(frame, 0.1, 0.2, seed=1)
    assert all(first[k].equals(again[k]) for k in first)
    assert [len(first[k]) for k in ("train", "val", "test")] == [140, 20, 40]
    assert all(set(first[k]["label"]) == set(LABELS) for k in first)
    texts = [set(first[k]["text"]) for k in first]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])


def test_an_autoscaling_cluster_may_lack_the_resources_now(caplog):
    gpu_job = config(num_workers=2, use_gpu=True)
    with pytest.raises(TrainConfigError, match="CT_RAY_AUTOSCALING"):
        check_config(gpu_job, LABELS, {"CPU": 2.0})
    with caplog.at_level("WARNING", logger="ml.train"):
        assert check_config(gpu_job, LABELS, {"CPU": 2.0}, autoscaling=True)
    assert "2.0 GPU, but the Ray cluster has 0 now; waiting for the autoscaler" in caplog.text


@pytest.mark.parametrize(
    ("requested", "use_gpu", "parameters", "stage"),
    [
        ("auto", False, 7_000_000_000, 0),  # CPU workers: sharding only adds gloo traffic
        ("auto", True, 22_700_000, 0),  # MiniLM on GPUs: too small to gain
        ("auto", True, ZERO_AUTO_MIN_PARAMS, 2),
        (3, False, 22_700_000, 3),  # an explicit stage is kept
        (0, True, 7_000_000_000, 0),
    ],
)
def test_zero_stage_auto(requested, use_gpu, parameters, stage):
    assert resolve_zero_stage(config(zero_stage=requested, use_gpu=use_gpu), parameters) == stage


def test_zero_stage_defaults_to_auto_and_must_be_resolved_before_deepspeed():
    assert config().zero_stage == "auto"
    assert config(zero_stage="2").zero_stage == 2  # as a trigger form or JSON may send it
    with pytest.raises(ValidationError, match="or 'auto'"):
        config(zero_stage="fast")
    with pytest.raises(ValueError, match="resolve the ZeRO stage first"):
        deepspeed_config(config(), "fp32", 10)


def test_count_parameters_of_the_packaged_base_model():
    # all-MiniLM-L6-v2's encoder: 22.7 M parameters (the classification head is not counted)
    assert 22_000_000 < count_parameters(Settings().resolved_base_model()) < 23_000_000


@pytest.mark.parametrize(
    ("rows", "overrides", "steps"),
    [
        (400, {}, 13),  # ceil(400 / (16 x 2 workers))
        (384, {}, 12),
        (10, {}, 1),
        (400, {"grad_accum_steps": 4}, 12),  # whole accumulation cycles only
        (10, {"grad_accum_steps": 4}, 4),  # at least one cycle
    ],
)
def test_steps_per_epoch(rows, overrides, steps):
    assert steps_per_epoch_for(config(**overrides), rows) == steps
