#!/usr/bin/env bash
# The test command (README, CI): sets up .venv if needed, then runs the whole suite.
# Extra arguments go to pytest, e.g. `bash script/test.sh -k tokenizer -x`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
# Style first (ruff.toml): a formatting slip fails in a second, not after the suite.
ruff format --check --quiet "$ROOT" || { echo "fix with: ruff format ." >&2; exit 1; }
ruff check --quiet "$ROOT"
python -m pytest -q "$@" tests
