#!/usr/bin/env bash
# The GPU check: one command, at most about 8 minutes on one GPU, writes out/gpu_check/report.md.
#   bash script/gpu_check.sh                # on a machine with an NVIDIA GPU
#   DEVICE=cpu bash script/gpu_check.sh     # tiny shapes on the CPU (a plumbing check; the tests run it)
# On a GPU image whose python already holds a CUDA torch, SKIP_SETUP=1 uses it instead of .venv.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
python gpu_check.py "$@"
