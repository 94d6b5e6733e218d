"""Helpers of the GPU check (``benchmarks/gpu_check.sh``) and of its carry (``scripts/gpu_pack.sh``).

    python benchmarks/gpu_carry.py pack-model SRC DST     # here: the base model, weights as fp16
    python benchmarks/gpu_carry.py unpack-model SRC DST   # there: back to fp32, as training loads it
    python benchmarks/gpu_carry.py report DIR --mode gpu --step NAME:RC:SECONDS:LIMIT ...

The base model travels with its weights stored in fp16 (half the bytes: ~44 of the 87 MiB), so the
working tree, the wheels and the model fit in one 64 MiB transfer. ``unpack-model`` widens them back
to fp32 before anything loads them: every step then sees an fp32 checkpoint, as training and serving
do here; its values are the fp16-rounded ones (a relative change of at most ~5e-4 per weight, the
same for every dtype compared).

``report`` merges the JSON of the three steps (``zero_stages_b*.json``, ``gpu_infer.json``,
``dtype_check.json``) into ``gpu_check.json`` and writes ``summary.md``.

Only the standard library at module level: ``report`` runs where torch may be missing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

WEIGHTS = "model.safetensors"
CARRY_INFO = "ct_carry.json"
SMALL_FILE_BYTES = 4 * 2**20  # tokenizer, config and the like; the weights are converted instead


def _convert(src: Path, dst: Path, dtype_name: str) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file, save_file

    dtype = {"float16": torch.float16, "float32": torch.float32}[dtype_name]
    tensors = load_file(src / WEIGHTS)
    converted = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    dst.mkdir(parents=True, exist_ok=True)
    save_file(converted, dst / WEIGHTS, metadata={"format": "pt"})
    for path in sorted(src.rglob("*")):
        if (
            path.is_file()
            and path.name not in (WEIGHTS, CARRY_INFO)
            and path.stat().st_size <= SMALL_FILE_BYTES
        ):
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    return {"tensors": len(converted), "bytes": (dst / WEIGHTS).stat().st_size}


def pack_model(src: Path, dst: Path) -> None:
    if not (src / WEIGHTS).is_file():
        raise SystemExit(f"{src} holds no {WEIGHTS}: not a Hugging Face model directory")
    if dst.exists():
        shutil.rmtree(dst)
    info = _convert(src, dst, "float16")
    (dst / CARRY_INFO).write_text(
        json.dumps(
            {"source": str(src), "weights_dtype": "float16", "source_bytes": (src / WEIGHTS).stat().st_size}
        )
    )
    print(f"{dst}: {info['tensors']} tensors, {info['bytes'] / 2**20:.1f} MiB of fp16 weights")


def unpack_model(src: Path, dst: Path) -> None:
    if not (src / WEIGHTS).is_file():
        raise SystemExit(f"{src} holds no {WEIGHTS}: run scripts/gpu_pack.sh and name .whl/gpu in carry")
    info = _convert(src, dst, "float32")
    print(f"{dst}: {info['tensors']} tensors, {info['bytes'] / 2**20:.1f} MiB of fp32 weights")


# ----------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "deepspeed", "pydantic", "tokenizers"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _step(text: str) -> dict[str, Any]:
    name, rc, seconds, limit = text.split(":")
    return {
        "name": name,
        "rc": None if rc == "skipped" else int(rc),
        "status": "skipped"
        if rc == "skipped"
        else "ok"
        if rc == "0"
        else "timed out"
        if rc in ("124", "137")
        else "failed",
        "seconds": float(seconds),
        "limit_s": int(limit),
    }


def _zero_table(record: dict[str, Any]) -> list[str]:
    gpu = record["meta"].get("peak_tflops") is not None
    lines = [
        "| ZeRO stage | samples/s | ratio | step ms (median) | peak mem MB/worker | MFU | train loss "
        "| precision |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in record["rows"]:
        if "error" in r:
            lines.append(f"| {r['stage']} | failed: {r['error']} | | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.2f} %" if "mfu" in r else "-"
        lines.append(
            f"| {r['stage']} | {r['samples_per_s']:.1f} | {r.get('ratio_vs_baseline', float('nan')):.2f}x | "
            f"{r['step_ms_median']:.1f} | {max(r['peak_mb_per_worker']):.0f} | {mfu} | "
            f"{r['train_loss']:.4f} | {r['device']} {r['precision']} |"
        )
    planned = record["meta"].get("configurations_planned")
    if planned and planned > len(record["rows"]):
        lines.append(f"\n({len(record['rows'])} of {planned} configurations ran: the step was stopped.)")
    if gpu:
        lines.append(
            f"\nMFU = 6 x non-embedding params x tokens/s / {record['meta']['peak_tflops']:g} TFLOP/s."
        )
    return lines


def report(directory: Path, mode: str, steps: list[dict[str, Any]], wall_s: float, carry: str | None) -> int:
    zero = {}
    for path in sorted(directory.glob("zero_stages_b*.json")):
        record = _load(path)
        if record is not None:
            zero[f"batch_{record['meta']['batch_size_per_worker']}"] = record
    inference = _load(directory / "gpu_infer.json")
    dtypes = _load(directory / "dtype_check.json")
    targets: dict[str, Any] = {}
    if inference and "ratio" in inference.get("verdict", {}):
        v = inference["verdict"]
        targets["batched_over_unbatched"] = {
            "at_concurrency": v["at_concurrency"],
            "value": v["ratio"],
            "target": f">= {v['ratio_target']:g}",
            "met": v["ratio_met"],
        }
        targets["batched_p99_ms"] = {
            "at_concurrency": v["at_concurrency"],
            "value": v["p99_ms"],
            "target": f"<= {v['p99_target_ms']:g}",
            "met": v["p99_met"],
        }
    if dtypes:
        targets["dtype_label_agreement"] = {
            name: {"value": c["agreement"], "max_abs_prob_diff": c["max_abs_prob_diff"]}
            for name, c in dtypes["comparisons"].items()
        }
    record = {
        "meta": {
            "mode": mode,
            "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "host": platform.node(),
            "versions": _versions(),
            "wall_s": wall_s,
            "carry": carry,
            "steps": steps,
        },
        "zero_stages": zero or None,
        "inference": inference,
        "dtypes": dtypes,
        "targets": targets,
    }
    (directory / "gpu_check.json").write_text(json.dumps(record, indent=2))
    (directory / "summary.md").write_text(summary(record))
    print(summary(record))
    missing = [
        name
        for name, part in (("zero_stages", zero), ("inference", inference), ("dtypes", dtypes))
        if not part
    ]
    if missing:
        print(f"missing section(s): {', '.join(missing)}", file=sys.stderr)
    return 1 if missing else 0


def summary(record: dict[str, Any]) -> str:
    meta = record["meta"]
    v = meta["versions"]
    lines = [
        f"# GPU check ({meta['mode']}), {meta['date_utc']}, {meta['host']}",
        "",
        f"python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, "
        f"deepspeed {v['deepspeed']}; wall {meta['wall_s']:.0f} s",
        "",
        *(
            [
                "A CPU dry run at tiny sizes: it checks that the steps run, its figures mean nothing and it "
                "misses the GPU targets by design.",
                "",
            ]
            if meta["mode"] == "dry-run"
            else []
        ),
        "| step | status | seconds | limit s |",
        "|---|---|---:|---:|",
        *[
            f"| {s['name']} | {s['status']} (rc {s['rc']}) | {s['seconds']:.1f} | {s['limit_s']} |"
            for s in meta["steps"]
        ],
        "",
        "## Training: DeepSpeed ZeRO stages (`zero_stages.py`)",
    ]
    if not record["zero_stages"]:
        lines += ["", "not measured (see log.txt)"]
    for key, zero in (record["zero_stages"] or {}).items():
        m = zero["meta"]
        lines += [
            "",
            f"{m['machine']}; micro-batch {m['batch_size_per_worker']}, max_length {m['max_length']}, "
            f"{m['warmup']} warm-up + {m['steps']} timed steps ({key})",
            "",
            *_zero_table(zero),
        ]
    lines += ["", "## Inference: batched vs unbatched (`gpu_infer.py`)", ""]
    inference = record["inference"]
    if inference:
        from gpu_infer import format_table, format_verdict  # a sibling script

        m = inference["meta"]
        lines += [
            f"{m['device_name']} ({m['device']}, {m['dtype']}), {m['warmup_s']:g} s warm-up + "
            f"{m['duration_s']:g} s timed per row, max batch {m['max_batch']}",
            "",
            format_table(inference["rows"]),
            "",
            format_verdict(inference["verdict"]),
        ]
    else:
        lines.append("not measured (see log.txt)")
    lines += ["", "## Same answers in every dtype? (`dtype_check.py`)", ""]
    dtypes = record["dtypes"]
    if dtypes:
        m = dtypes["meta"]
        ref = m["reference"]
        lines += [
            f"{m['texts']} AG News texts, {m['device_name']}, model: {m['model']}, reference {ref}",
            "",
            "| dtype | accuracy | label agreement vs ref | disagreements | max abs prob diff "
            "| mean abs prob diff |",
            "|---|---:|---:|---:|---:|---:|",
            f"| {ref} (ref) | {dtypes['accuracy'][ref]:.3f} | - | - | - | - |",
            *[
                f"| {name} | {dtypes['accuracy'][name]:.3f} | {c['agreement']:.4f} | {c['disagreements']} | "
                f"{c['max_abs_prob_diff']:.2e} | {c['mean_abs_prob_diff']:.2e} |"
                for name, c in dtypes["comparisons"].items()
            ],
        ]
    else:
        lines.append("not measured (see log.txt)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("pack-model", "unpack-model"):
        p = sub.add_parser(name)
        p.add_argument("src", type=Path)
        p.add_argument("dst", type=Path)
    p = sub.add_parser("report")
    p.add_argument("directory", type=Path)
    p.add_argument("--mode", required=True, choices=["gpu", "dry-run"])
    p.add_argument("--step", action="append", default=[], help="NAME:RC:SECONDS:LIMIT, one per step")
    p.add_argument("--wall-s", type=float, default=0.0)
    p.add_argument("--carry", default=None)
    args = parser.parse_args(argv)
    if args.command == "pack-model":
        pack_model(args.src, args.dst)
    elif args.command == "unpack-model":
        unpack_model(args.src, args.dst)
    else:
        return report(args.directory, args.mode, [_step(s) for s in args.step], args.wall_s, args.carry)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
