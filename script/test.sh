#!/usr/bin/env bash
# The test command (README, CI): sets up .venv if needed, then runs the whole suite.
# Extra arguments go to pytest, e.g. `bash script/test.sh -k tokenizer -x`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
python -m pytest -q "$@" tests
