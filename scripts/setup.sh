#!/usr/bin/env bash
# Set up a fresh machine: .venv with every pinned dependency, the project installed editable,
# and the state directory. Re-running it when nothing changed takes about a second.
#
#   PYTHON=python3.12      interpreter for the venv: 3.11 or 3.12 (default: python3.11, else
#                          python3.12, whichever is on PATH first)
#   TORCH_INDEX_URL=...    where to get torch==2.13.0 if pip's own config has no CPU build,
#                          e.g. https://download.pytorch.org/whl/cpu (CUDA: .../whl/cu128)
#   VENV=.venv             where to build the venv (the Makefile uses .venv)
#
# Before building, it checks the interpreter and the free disk space and names every problem at
# once. Each step prints its number and how long it took; on a terminal pip and uv draw their
# progress bars, elsewhere (CI logs) a line every 30 s says what is still running.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
UV_VERSION=0.13.9
TORCH_VERSION=2.13.0
SUPPORTED_PYTHONS="3.11 3.12"
FRESH_VENV_MIN_GB=6 # venv ~3.0 GB + uv's cache ~2.3 GB (measured with torch 2.13.0+cpu, Python 3.11)
UPDATE_MIN_GB=2
inputs_hash=$(cat requirements.txt constraints.txt pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
stamp="$VENV/.installed-$inputs_hash"

log() { printf '[setup] %s\n' "$*"; }

# Runs "$@". Off a terminal (CI), where pip and uv draw no progress, a line every 30 s says the
# step is still going and how big the venv has grown: no silent minutes, no per-chunk bars.
with_heartbeat() {
  if [[ -t 1 ]]; then
    "$@"
    return
  fi
  "$@" &
  local pid=$! waited=0
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    waited=$((waited + 1))
    if ((waited % 30 == 0)); then
      log "  … still running after ${waited} s ($VENV: $(du -sh "$VENV" 2>/dev/null | cut -f1))"
    fi
  done
  wait "$pid"
}

step_started=0
step() { # step N "what": announces step N of 4
  step_started=$SECONDS
  log "$1/4 $2"
}
step_done() { log "    done in $((SECONDS - step_started)) s"; }

python_version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }

# Everything the build needs that is not a download: checked first, reported together.
preflight() {
  local problems=() need_gb free_gb version
  if [[ ! -x "$VENV/bin/python" ]]; then
    need_gb=$FRESH_VENV_MIN_GB
    if [[ -z "${PYTHON:-}" ]]; then
      for candidate in python3.11 python3.12; do
        if command -v "$candidate" >/dev/null; then PYTHON=$candidate && break; fi
      done
    fi
    if [[ -z "${PYTHON:-}" ]]; then
      problems+=("no python3.11 or python3.12 on PATH; fix: install one (Debian/Ubuntu: apt-get install python3.12 python3.12-venv) or set PYTHON=/path/to/python3.12")
    elif ! version=$(python_version "$PYTHON"); then
      problems+=("PYTHON=$PYTHON does not run; fix: set PYTHON to a Python 3.11 or 3.12 interpreter")
    elif [[ " $SUPPORTED_PYTHONS " != *" $version "* ]]; then
      problems+=("$PYTHON is Python $version; the project needs 3.11 or 3.12; fix: PYTHON=python3.12 make setup (or python3.11)")
    elif ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
      problems+=("$PYTHON cannot create a venv (no ensurepip); fix: apt-get install python$version-venv")
    fi
  else
    need_gb=$UPDATE_MIN_GB
    version=$(python_version "$VENV/bin/python") || version="?"
    if [[ " $SUPPORTED_PYTHONS " != *" $version "* ]]; then
      problems+=("$VENV runs Python $version; the project needs 3.11 or 3.12; fix: rm -rf $VENV && PYTHON=python3.12 make setup")
    fi
  fi
  free_gb=$(df -Pk "$(dirname "$VENV")" | awk 'NR == 2 { printf "%d", $4 / 1000000 }')
  if ((free_gb < need_gb)); then
    problems+=("only $free_gb GB free on $(df -P "$(dirname "$VENV")" | awk 'NR == 2 { print $6 }'); building $VENV needs about $need_gb GB; fix: free some space there")
  fi
  if ((${#problems[@]})); then
    log "cannot set up, ${#problems[@]} problem(s):"
    printf '[setup]   - %s\n' "${problems[@]}"
    exit 1
  fi
}

if [[ -f "$stamp" ]]; then
  log "environment is up to date ($VENV)"
else
  preflight
  started=$SECONDS
  tty_progress=$([[ -t 1 ]] && echo on || echo off)
  pip=("$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar "$tty_progress")
  if [[ ! -x "$VENV/bin/python" ]]; then
    step 1 "creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
    step_done
  else
    log "1/4 $VENV exists ($("$VENV/bin/python" --version)): updating it"
  fi
  step 2 "installing uv $UV_VERSION (about 20 MB)"
  "${pip[@]}" -q "uv==$UV_VERSION"
  step_done

  # torch goes in first and with pip, which honours pip's config (a find-links folder holding
  # the CPU wheel on our CI machines); uv does not read pip's config. Installed first, the
  # resolver below keeps it instead of pulling a newer CUDA build.
  have_torch=$("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('torch'))" 2>/dev/null || true)
  if [[ "${have_torch%%+*}" != "$TORCH_VERSION" ]]; then
    step 3 "installing torch==$TORCH_VERSION (CPU wheel about 190 MB; CUDA builds pull several GB of nvidia-* wheels)"
    with_heartbeat "${pip[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$TORCH_VERSION"
    step_done
  else
    log "3/4 torch $have_torch is installed"
  fi

  find_links=()
  pip_links=$("$VENV/bin/python" -m pip config get global.find-links 2>/dev/null || true)
  [[ -n "$pip_links" ]] && find_links=(--find-links "$pip_links")
  step 4 "installing requirements.txt, pinned by constraints.txt (~290 packages, about 0.8 GB to download the first time)"
  with_heartbeat "$VENV/bin/uv" pip install --python "$VENV/bin/python" "${find_links[@]}" \
    -r requirements.txt -c constraints.txt
  "$VENV/bin/uv" pip install --quiet --python "$VENV/bin/python" --no-deps -e .
  step_done

  installed=$("$VENV/bin/python" -c "import torch; print(torch.__version__)")
  [[ "${installed%%+*}" == "$TORCH_VERSION" ]] || { log "error: torch $installed installed, expected $TORCH_VERSION"; exit 1; }
  "$VENV/bin/uv" pip check --python "$VENV/bin/python" >/dev/null
  rm -f "$VENV"/.installed-*
  touch "$stamp"
  log "done in $((SECONDS - started)) s: $("$VENV/bin/python" --version), torch $installed ($(du -sh "$VENV" | cut -f1))"
fi

# Chromium for the browser check of the Airflow UI (make ui-check, tests/integration/test_airflow_ui.py),
# which is skipped without it. CT_SKIP_CHROMIUM=1 leaves it out.
if [[ "${CT_SKIP_CHROMIUM:-0}" != "1" ]] && ! command -v chromium >/dev/null; then
  if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null; then
    log "installing chromium for the Airflow UI check (CT_SKIP_CHROMIUM=1 skips this)"
    if ! { apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; }; then
      log "warning: could not install chromium; the Airflow UI check will be skipped"
    fi
  else
    log "hint: the Airflow UI check (make ui-check) needs chromium: apt-get install chromium (as root)"
  fi
fi

# DeepSpeed's CPU communication op is compiled on first use (a minute or two on 2 cores): build
# it here, with the venv's ninja as `make` and the stack's Ray workers use it, so the first
# training run does not pay for it. Every Python of this venv (Ray workers included) caches
# compiled ops in .venv/torch_extensions, set by a .pth file, so that two checkouts on one
# machine do not rebuild each other's op.
venv_abs=$(cd "$VENV" && pwd)
site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
printf '%s\n' "import os; os.environ.setdefault('TORCH_EXTENSIONS_DIR', '$venv_abs/torch_extensions')" \
  >"$site/ct_torch_extensions.pth"
shm_op=("$venv_abs/torch_extensions/deepspeed_shm_comm/deepspeed_shm_comm.so")
if [[ "${CT_SKIP_DEEPSPEED_BUILD:-0}" != "1" && ! -f "${shm_op[0]}" ]]; then
  log "building DeepSpeed's CPU communication op (once, about a minute)"
  PATH="$venv_abs/bin:$PATH" "$VENV/bin/python" -c \
    "from deepspeed.accelerator import get_accelerator as a; b = a().create_op_builder('ShareMemCommBuilder'); b and b.load()" \
    >/dev/null 2>&1 || log "warning: could not pre-build it; the first training run will"
fi

mkdir -p .state/logs .state/pids
