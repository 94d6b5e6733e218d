"""benchmarks/gpu_check.sh --dry-run: the three GPU measurements run end to end on CPU at tiny sizes.

The GPU run itself needs the GPU machine; what can break before it gets there (arguments, the
steps' JSON, the report that merges them, the fp16 carry of the base model) is checked here.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


@pytest.fixture(scope="module")
def carry():
    folder = str(REPO_ROOT / "benchmarks")
    sys.path.insert(0, folder)
    try:
        import gpu_carry

        yield gpu_carry
    finally:
        sys.path.remove(folder)


def test_dry_run_records_all_three_sections(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "CT_BASE_MODEL")}
    env["PYTHON"] = sys.executable
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(REPO_ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=480,  # ~1 min here; a cold DeepSpeed CPU comm-op build adds ~1 min more
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    record = json.loads((out / "gpu_check.json").read_text())

    assert record["meta"]["mode"] == "dry-run"
    assert [s["name"] for s in record["meta"]["steps"]] == ["inference", "dtypes", "zero_stages_b8"]
    assert all(s["status"] == "ok" for s in record["meta"]["steps"])

    zero = record["zero_stages"]["batch_8"]
    (row,) = zero["rows"]
    assert row["stage"] == 3 and row["samples_per_s"] > 0 and math.isfinite(row["train_loss"])

    inference = record["inference"]
    rows = {(r["mode"], r["concurrency"]): r for r in inference["rows"]}
    assert set(rows) == {("unbatched", 1), ("unbatched", 4), ("batched", 1), ("batched", 4)}
    for r in rows.values():
        assert r["texts_per_s"] > 0 and r["errors"] == 0 and 0 < r["p50_ms"] <= r["p99_ms"]
    assert rows[("unbatched", 4)]["mean_batch"] == 1
    assert rows[("batched", 4)]["mean_batch"] > 1  # the micro-batcher gathered concurrent texts
    assert inference["verdict"]["at_concurrency"] == 4 and inference["verdict"]["ratio"] > 0

    dtypes = record["dtypes"]
    assert dtypes["meta"]["reference"] == "fp32" and dtypes["meta"]["texts"] == 32
    bf16 = dtypes["comparisons"]["bf16"]
    assert 0 <= bf16["agreement"] <= 1 and 0 <= bf16["max_abs_prob_diff"] < 1
    assert record["targets"]["dtype_label_agreement"]["bf16"]["value"] == bf16["agreement"]

    summary = (out / "summary.md").read_text()
    for heading in ("## Training", "## Inference", "## Same answers"):
        assert heading in summary
    assert (out / "log.txt").is_file()


def test_model_travels_as_fp16_and_comes_back_as_fp32(carry, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    src, packed, unpacked = tmp_path / "src", tmp_path / "packed", tmp_path / "unpacked"
    src.mkdir()
    weights = {"w": torch.randn(8, 4), "ids": torch.arange(3)}
    save_file(weights, src / "model.safetensors")
    (src / "vocab.txt").write_text("[PAD]\nhello\n")

    carry.pack_model(src, packed)
    half = load_file(packed / "model.safetensors")
    assert half["w"].dtype == torch.float16 and half["ids"].dtype == torch.int64
    assert (packed / "vocab.txt").read_text() == "[PAD]\nhello\n"

    carry.unpack_model(packed, unpacked)
    back = load_file(unpacked / "model.safetensors")
    assert back["w"].dtype == torch.float32
    torch.testing.assert_close(back["w"], weights["w"], rtol=1e-3, atol=1e-3)
    assert torch.equal(back["ids"], weights["ids"])
    assert (unpacked / "vocab.txt").is_file() and not (unpacked / "ct_carry.json").exists()
