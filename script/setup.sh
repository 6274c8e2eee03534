#!/usr/bin/env bash
# Idempotent environment set-up, sourced by every entry point: `source script/setup.sh`.
# Creates .venv once, installs torch (only if none is importable) and requirements.txt (again only
# when the file changed). Variables: TORCH_VERSION (default 2.13.0), VENV (default .venv),
# SKIP_SETUP=1 to use the python already on PATH (conda, a cluster module, ...).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "${SKIP_SETUP:-0}" != "1" ]; then
  VENV="${VENV:-$ROOT/.venv}"
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "${PYTHON:-python3}" -m venv "$VENV" || { echo "[setup] python3 -m venv failed (install python3-venv)" >&2; exit 1; }
  fi
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
  stamp="$VENV/.requirements.sha256"
  want="$(sha256sum "$ROOT/requirements.txt" | cut -d' ' -f1)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    if ! python -c "import torch" 2>/dev/null; then
      echo "[setup] installing torch==${TORCH_VERSION:-2.13.0}"
      pip install --disable-pip-version-check -q "torch==${TORCH_VERSION:-2.13.0}" || exit 1
    fi
    echo "[setup] installing requirements.txt"
    pip install --disable-pip-version-check -q -r "$ROOT/requirements.txt" || exit 1
    echo "$want" > "$stamp"
  fi
fi
cd "$ROOT" || exit 1
