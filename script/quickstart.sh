#!/usr/bin/env bash
# The main job: the whole pipeline on the embedded sample data, on CPU, in minutes.
# Sets up .venv if needed. Arguments go to quickstart.py (--force, --smoke, --out DIR).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec python quickstart.py "$@"  # exec: killing this script stops the run, not only the shell
