#!/usr/bin/env bash
# Set up a fresh machine: .venv with every pinned dependency, the project installed editable,
# and the state directory. Re-running it when nothing changed takes about a second.
#
#   PYTHON=python3.11      interpreter for the venv (3.11 or 3.12)
#   TORCH_INDEX_URL=...    where to get torch==2.13.0 if pip's own config has no CPU build,
#                          e.g. https://download.pytorch.org/whl/cpu (CUDA: .../whl/cu128)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
VENV=.venv
UV_VERSION=0.13.9
TORCH_VERSION=2.13.0
inputs_hash=$(cat requirements.txt constraints.txt pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
stamp="$VENV/.installed-$inputs_hash"

log() { printf '[setup] %s\n' "$*"; }

if [[ -f "$stamp" ]]; then
  log "environment is up to date ($VENV)"
else
  if [[ ! -x "$VENV/bin/python" ]]; then
    command -v "$PYTHON" >/dev/null || { log "error: $PYTHON not found; set PYTHON=python3.11"; exit 1; }
    log "creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "uv==$UV_VERSION"

  # torch goes in first and with pip, which honours pip's config (a find-links folder holding
  # the CPU wheel on our CI machines); uv does not read pip's config. Installed first, the
  # resolver below keeps it instead of pulling a newer CUDA build.
  have_torch=$("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('torch'))" 2>/dev/null || true)
  if [[ "${have_torch%%+*}" != "$TORCH_VERSION" ]]; then
    log "installing torch==$TORCH_VERSION"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
      ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$TORCH_VERSION"
  fi

  find_links=()
  pip_links=$("$VENV/bin/python" -m pip config get global.find-links 2>/dev/null || true)
  [[ -n "$pip_links" ]] && find_links=(--find-links "$pip_links")
  log "installing requirements.txt (pinned by constraints.txt)"
  "$VENV/bin/uv" pip install --python "$VENV/bin/python" "${find_links[@]}" \
    -r requirements.txt -c constraints.txt
  "$VENV/bin/uv" pip install --python "$VENV/bin/python" --no-deps -e .

  installed=$("$VENV/bin/python" -c "import torch; print(torch.__version__)")
  [[ "${installed%%+*}" == "$TORCH_VERSION" ]] || { log "error: torch $installed installed, expected $TORCH_VERSION"; exit 1; }
  "$VENV/bin/uv" pip check --python "$VENV/bin/python" >/dev/null
  rm -f "$VENV"/.installed-*
  touch "$stamp"
  log "done: $("$VENV/bin/python" --version), torch $installed"
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

mkdir -p .state/logs .state/pids
