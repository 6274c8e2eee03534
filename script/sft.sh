#!/usr/bin/env bash
# Supervised fine-tuning from the last pretraining phase (default config/sft.py).
#   python sft_data_process.py --source huatuo=... --out data/sft/sft_data.csv     # first, the CSV
#   bash script/sft.sh                                             # every GPU here, or 1 CPU process
#   CONFIG=config/sft.py NPROC=4 bash script/sft.sh --init_from=out/pretrain/clinical/ckpt.pt
# The model is saved to out/sft/ckpt.pt. See script/launch.sh for the variables.
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/launch.sh" sft.py "${CONFIG:-config/sft.py}" "$@"
