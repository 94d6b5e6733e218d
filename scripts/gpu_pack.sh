#!/usr/bin/env bash
# Prepare, on this machine, what benchmarks/gpu_check.sh needs on the GPU machine and cannot fetch
# there (no network; it has Python 3.12, CUDA torch and transformers, but no DeepSpeed, pydantic or
# the base model): the carry folder .whl/gpu/ (gitignored by /.whl/), named in the device tool's
# `carry`. See benchmarks/README.md, "GPU check".
#
#   bash scripts/gpu_pack.sh [DIR]     # default DIR = .whl/gpu
#
# DIR/wheels/  CPython 3.12 manylinux wheels, pinned to this venv's versions: deepspeed (built here
#              from its sdist: py3-none-any, ops JIT-compiled at run time) and what it and ml.settings
#              import that the GPU image lacks: hjson, py-cpuinfo, msgpack, ninja, einops, pydantic,
#              pydantic-core, pydantic-settings, python-dotenv, typing-extensions, typing-inspection,
#              annotated-types. One version of each (two would stop the install).
# DIR/model/   the packaged all-MiniLM-L6-v2 (Settings().resolved_base_model()) with its weights
#              stored as fp16 (~44 MiB instead of 87); gpu_check.sh widens them back to fp32.
# Fails if DIR plus the working tree that travels with it would exceed the tool's 64 MiB.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
DIR=${1:-.whl/gpu}
PY=${PYTHON:-$REPO/.venv/bin/python}
LIMIT=$((64 * 1024 * 1024))
WHEELS=(deepspeed hjson py-cpuinfo msgpack ninja einops pydantic pydantic-core pydantic-settings
    python-dotenv typing-extensions typing-inspection annotated-types)

# pip warns once per package about this machine's local index folders that lack it: noise here.
quiet() { grep -v "is ignored: it is neither a file nor a directory" || true; }
version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

case "$(realpath -m "$DIR")" in / | "$REPO" | "$HOME") echo "refusing to empty $DIR" >&2; exit 2 ;; esac
rm -rf "$DIR"
mkdir -p "$DIR/wheels"
PLATFORMS=()
for tag in manylinux_2_{39,35,34,31,28,27,24,17,12,5}_x86_64 manylinux2014_x86_64 manylinux2010_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$tag")
done
DOWNLOAD=()
for name in "${WHEELS[@]}"; do
    [ "$name" = deepspeed ] || DOWNLOAD+=("$name==$(version "$name")")
done
echo "== downloading ${#DOWNLOAD[@]} wheels for CPython 3.12: ${DOWNLOAD[*]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DIR/wheels" "${DOWNLOAD[@]}" 2> >(quiet >&2)
DS="deepspeed==$(version deepspeed)"
echo "== building $DS (sdist only on PyPI) into a py3-none-any wheel"
"$PY" -m pip wheel -q --no-deps --no-cache-dir -w "$DIR/wheels" "$DS" 2> >(quiet >&2)
ls "$DIR"/wheels/deepspeed-*-py3-none-any.whl >/dev/null

BASE=$(cd "$REPO" && "$PY" -c "from ml.settings import Settings; print(Settings().resolved_base_model())")
echo "== base model $BASE -> $DIR/model (fp16 weights)"
"$PY" benchmarks/gpu_carry.py pack-model "$BASE" "$DIR/model"

# What travels: tracked files + untracked files git does not ignore + this carry.
TREE=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
CARRY=$(du -sb "$DIR" | cut -f1)
TOTAL=$((TREE + CARRY))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
{
    echo "carry $DIR: $(mib "$CARRY") (wheels $(mib "$(du -sb "$DIR/wheels" | cut -f1)"), model $(mib "$(du -sb "$DIR/model" | cut -f1)"))"
    echo "working tree that travels: $(mib "$TREE"); together $(mib "$TOTAL") of the 64 MiB limit"
    ls -1 "$DIR/wheels"
} | tee "$DIR/MANIFEST.txt"
if [ "$TOTAL" -gt "$LIMIT" ]; then
    echo "too large for one device-tool call (64 MiB): split the carry (wheels in one call, model in the next," \
        "kept on the warm machine), see benchmarks/README.md" >&2
    exit 1
fi
