"""Checkpoints are loaded as data, never as code: a DeepSpeed checkpoint of any ZeRO stage that
carries a pickled object which runs code when unpickled is refused by resume and by export (the
code does not run), and an untouched checkpoint still resumes to the same model and loop state.

The checkpoints live in the data bucket, which other parties can write to.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from ml.train import (
    CHECKPOINT_TAG,
    STATE_FILE,
    TrainConfig,
    UnsafeCheckpointError,
    deepspeed_config,
    export_checkpoint,
    restore_checkpoint,
)

LABELS = ("Business", "Sci_Tech", "Sports", "World")
STAGES = [0, 1, 2, 3]


class RunsCode:
    """Unpickling this runs ``exec``: it touches ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).touch()",)


def _config(stage: int) -> TrainConfig:
    return TrainConfig(snapshot_id="s", run_name="r", zero_stage=stage, epochs=1, batch_size=4, max_length=16)


def _engine(stage: int, seed: int):
    """A small BERT classifier (the packaged tokenizer's vocabulary) in a DeepSpeed engine."""
    import deepspeed
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    model_config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={k: i for i, k in enumerate(LABELS)},
    )
    model = BertForSequenceClassification(model_config)
    deepspeed.init_distributed(dist_backend="gloo")
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=deepspeed_config(_config(stage), "fp32", 4)
    )
    return engine, model


def _logits(engine, batch) -> torch.Tensor:
    engine.eval()
    with torch.inference_mode():
        return engine(**batch).logits.clone()


@pytest.fixture(scope="module", params=STAGES, ids=[f"zero{s}" for s in STAGES])
def checkpoint(request, process_group, tmp_path_factory):
    """A checkpoint as the training loop writes it, after two optimizer steps; + what it must restore."""
    from transformers import AutoTokenizer

    from ml.settings import Settings

    stage = request.param
    tokenizer = AutoTokenizer.from_pretrained(Settings().resolved_base_model())
    engine, model = _engine(stage, seed=0)
    batch = tokenizer(
        ["Stocks rallied", "The home team won", "New chip", "Talks stall"], return_tensors="pt", padding=True
    )
    for _ in range(2):
        loss = engine(**batch, labels=torch.tensor([0, 1, 2, 3])).loss
        engine.backward(loss)
        engine.step()
    directory = tmp_path_factory.mktemp(f"zero{stage}") / "checkpoint"
    engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG)
    state = {"epoch": 1, "best_val_macro_f1": 0.5, "epochs_without_improvement": 0, "history": []}
    (directory / STATE_FILE).write_text(json.dumps(state))
    tokenizer.save_pretrained(directory)
    model.config.save_pretrained(directory)
    return {
        "stage": stage,
        "dir": directory,
        "state": state,
        "batch": dict(batch),
        "logits": _logits(engine, batch),
        "steps": engine.global_steps,
    }


def _poison(src: Path, dst: Path, marker: Path) -> list[str]:
    """A copy of the checkpoint with a code-running object added to every one of its .pt files."""
    shutil.copytree(src, dst)
    poisoned = []
    for path in sorted((dst / CHECKPOINT_TAG).glob("*.pt")):
        content = torch.load(path, map_location="cpu", weights_only=False)  # our own, untouched file
        content["payload"] = RunsCode(marker)
        torch.save(content, path)
        poisoned.append(path.name)
    return poisoned


def test_poisoning_helper_really_runs_code(tmp_path):
    """The payload does what the tests below say must not happen, when loaded the unsafe way."""
    marker = tmp_path / "ran"
    torch.save({"payload": RunsCode(marker)}, tmp_path / "x.pt")
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert marker.exists()


def test_resume_restores_the_model_and_the_loop_state(checkpoint):
    engine, _ = _engine(checkpoint["stage"], seed=1)  # other initial weights than the saved ones
    assert not torch.allclose(_logits(engine, checkpoint["batch"]), checkpoint["logits"])
    state = restore_checkpoint(engine, checkpoint["dir"])
    assert state == checkpoint["state"]
    assert engine.global_steps == checkpoint["steps"]
    assert torch.allclose(_logits(engine, checkpoint["batch"]), checkpoint["logits"], atol=1e-6)
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None  # only forced while loading


def test_resume_refuses_a_checkpoint_that_runs_code(checkpoint, tmp_path):
    marker = tmp_path / "code-ran"
    poisoned = _poison(checkpoint["dir"], tmp_path / "checkpoint", marker)
    assert poisoned  # the model states, and for ZeRO 1-3 the optimizer states
    engine, _ = _engine(checkpoint["stage"], seed=1)
    with pytest.raises(UnsafeCheckpointError, match="refused to load a checkpoint"):
        restore_checkpoint(engine, tmp_path / "checkpoint")
    assert not marker.exists(), f"unpickling {poisoned} ran the payload"


def test_export_refuses_a_checkpoint_that_runs_code(checkpoint, tmp_path):
    from ray.train import Checkpoint

    marker = tmp_path / "code-ran"
    _poison(checkpoint["dir"], tmp_path / "checkpoint", marker)
    with pytest.raises(UnsafeCheckpointError, match="refused to load a checkpoint"):
        export_checkpoint(
            Checkpoint.from_directory(str(tmp_path / "checkpoint")),
            tmp_path / "export",
            _config(checkpoint["stage"]),
            LABELS,
        )
    assert not marker.exists()
    assert not (tmp_path / "export").exists()
