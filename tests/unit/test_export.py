"""The consolidated export of a DeepSpeed checkpoint reproduces the trained model exactly,
for ZeRO stage 0 (whole-module file) and 3 (sharded parameters), and holds no pickles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ml.predict import TextClassifier
from ml.settings import Settings
from ml.train import CHECKPOINT_TAG, STATE_FILE, TrainConfig, deepspeed_config, export_checkpoint

LABELS = ("Business", "Sci_Tech", "Sports", "World")
TEXTS = ["Stocks rallied after the earnings report.", "The home team won in overtime.", "New chip design"]


@pytest.mark.parametrize("stage", [0, 3])
def test_export_matches_the_trained_engine(process_group, tmp_path, stage):
    import deepspeed
    from ray.train import Checkpoint
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = Settings().resolved_base_model()
    config = TrainConfig(
        snapshot_id="s", run_name="r", zero_stage=stage, epochs=1, batch_size=4, max_length=16
    )
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=4, id2label=dict(enumerate(LABELS)), label2id={k: i for i, k in enumerate(LABELS)}
    )
    deepspeed.init_distributed(dist_backend="gloo")
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=deepspeed_config(config, "fp32", 4)
    )
    batch = tokenizer(TEXTS[:2] * 2, padding=True, return_tensors="pt")
    for _ in range(3):  # move the weights away from the base model
        loss = engine(**batch, labels=torch.tensor([0, 1, 2, 3])).loss
        engine.backward(loss)
        engine.step()

    checkpoint_dir = tmp_path / "checkpoint"
    engine.save_checkpoint(str(checkpoint_dir), tag=CHECKPOINT_TAG)
    (checkpoint_dir / STATE_FILE).write_text(json.dumps({"epoch": 1, "history": []}))
    tokenizer.save_pretrained(checkpoint_dir)
    model.config.save_pretrained(checkpoint_dir)

    engine.eval()
    encoded = tokenizer(TEXTS, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.inference_mode():
        expected = torch.softmax(engine(**encoded).logits, -1).numpy()

    export = export_checkpoint(
        Checkpoint.from_directory(str(checkpoint_dir)), tmp_path / "export", config, LABELS
    )
    files = sorted(p.name for p in Path(export).iterdir())
    assert "model.safetensors" in files and "label_map.json" in files and "training_config.json" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl"))]
    classifier = TextClassifier.from_dir(export, device="cpu")
    assert classifier.labels == list(LABELS)
    assert classifier.predict_proba(TEXTS) == pytest.approx(expected, abs=1e-5)
