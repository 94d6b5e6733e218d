#!/usr/bin/env bash
# The GPU figures in one script, bounded to < 8 minutes on one GPU (see benchmarks/README.md,
# "GPU check"):
#   1. inference: batched vs unbatched bare predictor at 1/16/64 closed-loop clients (gpu_infer.py)
#   2. dtypes: same labels in fp32, fp16 and bf16 on 500 AG News texts? (dtype_check.py)
#   3. training: samples/s and MFU of DeepSpeed ZeRO 0/2/3 in bf16, micro-batch 8 and 64 (zero_stages.py)
# then gpu_check.json (all three sections) and summary.md, next to each step's JSON and log.txt.
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine: needs the carry of scripts/gpu_pack.sh
#   bash benchmarks/gpu_check.sh --dry-run    # here, on CPU, tiny sizes, the local .venv (no install)
#
# Options: --out DIR (default: $OUT if set, else /tmp/gpu_check_dry_run for --dry-run and
# benchmarks/results/gpu_check_<UTC stamp>/ otherwise), --carry DIR (default .whl/gpu).
# Environment: PYTHON (default python3 on the GPU machine, .venv/bin/python for --dry-run),
# GPU_CHECK_BUDGET_S (every step ends by then; default 465 s, dry run 420 s).
# Exit status: 0 when every step ran and the report has all three sections, else 1.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1
DRY=0
CARRY=.whl/gpu
OUTDIR=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --carry) CARRY=$2; shift ;;
        --out) OUTDIR=$2; shift ;;
        -h | --help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (--dry-run, --out DIR, --carry DIR)" >&2; exit 2 ;;
    esac
    shift
done

START_NS=$(date +%s%N)
if [ "$DRY" = 1 ]; then MODE=dry-run; BUDGET=${GPU_CHECK_BUDGET_S:-420}; else MODE=gpu; BUDGET=${GPU_CHECK_BUDGET_S:-465}; fi
DEADLINE=$(( START_NS / 1000000000 + BUDGET ))
if [ -z "$OUTDIR" ]; then
    if [ -n "${OUT:-}" ]; then OUTDIR=$OUT
    elif [ "$DRY" = 1 ]; then OUTDIR=${TMPDIR:-/tmp}/gpu_check_dry_run
    else OUTDIR=$REPO/benchmarks/results/gpu_check_$(date -u +%Y%m%dT%H%M%SZ)
    fi
fi
mkdir -p "$OUTDIR" || exit 1
OUTDIR=$(cd "$OUTDIR" && pwd)
rm -f "$OUTDIR"/zero_stages_b*.json "$OUTDIR"/gpu_infer.json "$OUTDIR"/dtype_check.json "$OUTDIR"/gpu_check.json
exec > >(tee "$OUTDIR/log.txt") 2>&1
TEE_PID=$!

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
echo "gpu_check.sh ($MODE), $(date -u +%FT%TZ), output in $OUTDIR, every step ends within ${BUDGET} s"

if [ "$DRY" = 1 ]; then
    if [ -z "${PYTHON:-}" ]; then
        if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
    fi
    # The venv's bin first (its ninja builds DeepSpeed's CPU comm op; see benchmarks/README.md traps).
    export PATH=$(dirname "$PYTHON"):$PATH
else
    PYTHON=${PYTHON:-python3}
    if [ ! -d "$CARRY/wheels" ] || [ ! -f "$CARRY/model/model.safetensors" ]; then
        echo "no carry at $CARRY: run 'bash scripts/gpu_pack.sh' on the dev machine and name .whl/gpu in carry" >&2
        exit 1
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "nvidia-smi failed"
    "$PYTHON" -c 'import sys; v = sys.version_info[:2]; print("python", sys.version.split()[0]); sys.exit(v != (3, 12))' \
        || echo "warning: the carried wheels are for CPython 3.12; this python differs" >&2
    SITE=${GPU_CHECK_SITE:-/tmp/ct-site}
    echo "== installing $(ls "$CARRY"/wheels/*.whl | wc -l) carried wheels into $SITE"
    timeout 180 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$CARRY"/wheels/*.whl || { echo "wheel install failed" >&2; exit 1; }
    export PYTHONPATH=$SITE:$PYTHONPATH
    timeout 120 "$PYTHON" benchmarks/gpu_carry.py unpack-model "$CARRY/model" /tmp/ct-base-model \
        || { echo "model unpack failed" >&2; exit 1; }
    export CT_BASE_MODEL=/tmp/ct-base-model DS_ACCELERATOR=cuda
    timeout 120 "$PYTHON" -c 'import torch, transformers, ml.settings; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0), "| transformers", transformers.__version__)' \
        || { echo "no usable GPU, or the carried packages do not import: see above" >&2; exit 1; }
    # Only the training steps need DeepSpeed: without it they fail and are reported, the rest runs.
    timeout 120 "$PYTHON" -c 'import deepspeed, ml.train; print("deepspeed", deepspeed.__version__, "from", deepspeed.__file__)' \
        || echo "warning: deepspeed does not import: the zero_stages steps will fail" >&2
fi

STEPS=()
# step NAME CAP_SECONDS COMMAND...: run with a limit of min(CAP, time left), record rc and seconds.
step() {
    local name=$1 cap=$2 left limit t0 t1 rc
    shift 2
    left=$(( DEADLINE - $(date +%s) ))
    limit=$(( cap < left ? cap : left ))
    if [ "$limit" -lt 15 ]; then
        echo "== $name: skipped, only ${left} s left"
        STEPS+=("--step" "$name:skipped:0.0:$limit")
        return
    fi
    echo "== $name (at most ${limit} s): $*"
    t0=$(date +%s%N)
    timeout -k 10 "$limit" "$@"
    rc=$?
    t1=$(date +%s%N)
    STEPS+=("--step" "$name:$rc:$(( (t1 - t0) / 1000000 / 1000 )).$(( (t1 - t0) / 1000000 % 1000 / 100 )):$limit")
    echo "== $name: rc $rc"
}

if [ "$DRY" = 1 ]; then
    step inference 150 "$PYTHON" benchmarks/gpu_infer.py --device cpu --concurrency 1,4 --warmup 0.5 \
        --duration 1.5 --json "$OUTDIR/gpu_infer.json"
    step dtypes 150 "$PYTHON" benchmarks/dtype_check.py --device cpu --dtypes fp32,bf16 --texts 32 \
        --train-steps 2 --train-batch 8 --json "$OUTDIR/dtype_check.json"
    # One stage (3: the most machinery) and one worker: spawn + DeepSpeed init + 3 steps on CPU.
    step zero_stages_b8 240 "$PYTHON" benchmarks/zero_stages.py --stages 3 --workers 1 --steps 2 --warmup 1 \
        --json "$OUTDIR/zero_stages_b8.json"
else
    step inference 130 "$PYTHON" benchmarks/gpu_infer.py --device cuda --concurrency 1,16,64 --warmup 2 \
        --duration 8 --max-batch 64 --json "$OUTDIR/gpu_infer.json"
    step dtypes 70 "$PYTHON" benchmarks/dtype_check.py --device cuda --dtypes fp32,fp16,bf16 --texts 500 \
        --train-steps 300 --json "$OUTDIR/dtype_check.json"
    step zero_stages_b8 140 "$PYTHON" benchmarks/zero_stages.py --gpu --workers 1 --stages 0,2,3 --steps 50 \
        --warmup 10 --json "$OUTDIR/zero_stages_b8.json"
    step zero_stages_b64 100 "$PYTHON" benchmarks/zero_stages.py --gpu --workers 1 --stages 0,2,3 \
        --batch-size 64 --steps 30 --warmup 5 --json "$OUTDIR/zero_stages_b64.json"
    nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv || true
fi

END_NS=$(date +%s%N)
WALL="$(( (END_NS - START_NS) / 1000000000 )).$(( (END_NS - START_NS) / 100000000 % 10 ))"
CARRY_ARGS=()
[ "$DRY" = 1 ] || CARRY_ARGS=(--carry "$CARRY")
"$PYTHON" benchmarks/gpu_carry.py report "$OUTDIR" --mode "$MODE" --wall-s "$WALL" "${CARRY_ARGS[@]}" "${STEPS[@]}"
RC=$?
for s in "${STEPS[@]}"; do
    [ "$s" = --step ] && continue
    IFS=: read -r _ step_rc _ <<<"$s"
    [ "$step_rc" = 0 ] || RC=1
done
echo "gpu_check.sh ($MODE): wall ${WALL} s, exit $RC, files in $OUTDIR"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null
exit $RC
