"""Do fp16 and bf16 give the same answers as fp32? Same texts, same export, one dtype at a time.

The export is either ``--model-path`` or made here: the packaged base model fine-tuned for
``--train-steps`` steps in fp32 on AG News rows that are not among the test texts (plain torch
AdamW, no DeepSpeed), so its answers are a trained classifier's, not a random head's near-ties.
With ``--train-steps 0`` it is ``export_base_model`` (a seeded random head).

Each dtype loads the export with ``TextClassifier.from_dir(..., dtype=...)`` and runs
``predict_proba`` on the first ``--texts`` texts of the shuffled sample, exactly as serving does
(sorted by length, padded per batch). Against the first dtype of ``--dtypes`` (fp32) it reports:
label agreement (same argmax), max and mean absolute probability difference, the texts that
disagree with the reference's top-2 margin, and each dtype's accuracy on the true labels.

    .venv/bin/python benchmarks/dtype_check.py --device cuda --dtypes fp32,fp16,bf16 --texts 500
    .venv/bin/python benchmarks/dtype_check.py --device cpu --dtypes fp32,bf16 --texts 32 --train-steps 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ml.sample_data import AGNEWS_SAMPLE


def _rows(data: str, seed: int) -> tuple[list[tuple[str, str]], list[str]]:
    import pandas as pd

    frame = pd.read_csv(data)
    rows = list(zip(frame["text"].astype(str), frame["label"].astype(str), strict=True))
    random.Random(seed).shuffle(rows)
    return rows, sorted({label for _, label in rows})


def finetune_export(
    directory: Path,
    base_model: str,
    rows: list[tuple[str, str]],
    labels: list[str],
    options: argparse.Namespace,
    device: Any,
) -> dict[str, Any]:
    """Fine-tune the base model in fp32 for ``options.train_steps`` steps and save an export."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from ml.predict import LABEL_MAP_FILE, TRAINING_CONFIG_FILE

    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected
    torch.manual_seed(options.seed)
    label_to_id = {label: i for i, label in enumerate(labels)}
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForSequenceClassification.from_pretrained(
        base_model,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id=label_to_id,
        dtype=torch.float32,
    ).to(device)
    steps, batch = options.train_steps, options.train_batch
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )
    order = list(range(len(rows)))
    rng = random.Random(options.seed)
    rng.shuffle(order)
    model.train()
    started = time.perf_counter()
    losses = []
    for step in range(steps):
        idx = [order[(step * batch + i) % len(order)] for i in range(batch)]
        encoded = tokenizer(
            [rows[i][0] for i in idx],
            padding=True,
            truncation=True,
            max_length=options.max_length,
            return_tensors="pt",
        ).to(device)
        targets = torch.tensor([label_to_id[rows[i][1]] for i in idx], device=device)
        loss = model(**encoded, labels=targets).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - started
    model.eval()
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    (directory / LABEL_MAP_FILE).write_text(json.dumps({"labels": labels}))
    (directory / TRAINING_CONFIG_FILE).write_text(json.dumps({"max_length": options.max_length}))
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "train_steps": steps,
        "train_batch": batch,
        "train_rows": len(rows),
        "lr": options.lr,
        "train_seconds": round(seconds, 2),
        "train_loss_first": losses[0],
        "train_loss_last_tenth": sum(tail) / len(tail),
    }


def compare(reference: Any, other: Any, truth: list[int]) -> dict[str, Any]:
    """Agreement and probability differences of ``other`` against ``reference`` (n x classes)."""
    import numpy as np

    ref_pred, pred = reference.argmax(axis=1), other.argmax(axis=1)
    top2 = np.sort(reference, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    diff = np.abs(other - reference)
    disagree = np.flatnonzero(ref_pred != pred)
    return {
        "texts": len(truth),
        "agreement": float((ref_pred == pred).mean()),
        "disagreements": len(disagree),
        "max_abs_prob_diff": float(diff.max()),
        "mean_abs_prob_diff": float(diff.mean()),
        "disagreeing_texts": [
            {
                "index": int(i),
                "reference_margin": float(margin[i]),
                "reference": int(ref_pred[i]),
                "other": int(pred[i]),
            }
            for i in disagree[:20]
        ],
        "reference_margin_min": float(margin.min()),
        "reference_margins_below_max_diff": int((margin < 2 * diff.max()).sum()),
    }


def _dtype_list(text: str) -> list[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    if len(values) < 2:
        raise argparse.ArgumentTypeError(f"need a reference dtype and at least one more, got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cuda, cpu ...; default: a GPU if there is one")
    parser.add_argument(
        "--dtypes", type=_dtype_list, default=["fp32", "fp16", "bf16"], help="first = reference"
    )
    parser.add_argument("--texts", type=int, default=500, help="test texts (default 500)")
    parser.add_argument("--model-path", default=None, help="an export; default: fine-tune one here")
    parser.add_argument("--train-steps", type=int, default=300, help="fine-tuning steps (0 = random head)")
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64, help="predict_proba batch size")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    parser.add_argument("--data", default=str(AGNEWS_SAMPLE), help="CSV (.gz) with columns text,label")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    if args.texts < 1 or args.train_steps < 0 or args.train_batch < 1 or args.batch_size < 1:
        parser.error("--texts, --train-batch, --batch-size >= 1 and --train-steps >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import numpy as np
    import torch
    from transformers.utils import logging as hf_logging

    from ml.predict import TextClassifier, export_base_model, resolve_device
    from ml.settings import Settings

    hf_logging.disable_progress_bar()  # "Loading weights" bars, one per model load
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    started = dt.datetime.now(dt.UTC)
    wall = time.perf_counter()
    rows, labels = _rows(args.data, args.seed)
    test, train = rows[: args.texts], rows[args.texts :]
    texts = [text for text, _ in test]
    truth = [labels.index(label) for _, label in test]
    base_model = Settings().resolved_base_model()
    probs: dict[str, Any] = {}
    loaded: dict[str, str] = {}
    training: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="dtype-check-") as tmp:
        export = Path(args.model_path) if args.model_path else Path(tmp) / "export"
        if not args.model_path:
            if args.train_steps:
                training = finetune_export(export, base_model, train, labels, args, device)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            else:
                export_base_model(export, labels, args.max_length, seed=args.seed, base_model=base_model)
        for name in args.dtypes:
            classifier = TextClassifier.from_dir(export, device=device, dtype=name)
            loaded[name] = str(classifier.model.dtype).removeprefix("torch.")
            probs[name] = classifier.predict_proba(texts, batch_size=args.batch_size)
            del classifier
            if device.type == "cuda":
                torch.cuda.empty_cache()
    reference = args.dtypes[0]
    accuracy = {name: float((p.argmax(axis=1) == np.array(truth)).mean()) for name, p in probs.items()}
    comparisons = {name: compare(probs[reference], probs[name], truth) for name in args.dtypes[1:]}
    record = {
        "meta": {
            "command": " ".join(
                [Path(sys.executable).name, *(sys.argv if argv is None else ["dtype_check.py", *argv])]
            ),
            "date_utc": started.isoformat(timespec="seconds"),
            "host": platform.node(),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
            "model": args.model_path
            or (f"{base_model} fine-tuned here" if training else f"{base_model} + seeded random head"),
            "texts": len(texts),
            "labels": labels,
            "reference": reference,
            "dtypes_loaded": loaded,
            "training": training,
            "wall_s": round(time.perf_counter() - wall, 1),
        },
        "accuracy": accuracy,
        "comparisons": comparisons,
    }
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))
    print(
        f"\ndtype agreement on {len(texts)} AG News texts, {record['meta']['device_name']}, "
        f"reference {reference}"
    )
    if training:
        print(
            f"model fine-tuned here: {training['train_steps']} steps x {training['train_batch']} in "
            f"{training['train_seconds']} s, loss {training['train_loss_first']:.3f} -> "
            f"{training['train_loss_last_tenth']:.3f}"
        )
    print(
        "\n| dtype | accuracy | agreement vs ref | disagreements | max abs prob diff | mean abs prob diff |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| {reference} (ref) | {accuracy[reference]:.3f} | - | - | - | - |")
    for name, c in comparisons.items():
        print(
            f"| {name} | {accuracy[name]:.3f} | {c['agreement']:.4f} | {c['disagreements']} | "
            f"{c['max_abs_prob_diff']:.2e} | {c['mean_abs_prob_diff']:.2e} |"
        )
    if args.json:
        print(f"\nJSON written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
