#!/usr/bin/env bash
# Pretraining: all four MiniCPM phases of the config (default config/pretrain_100m.py).
#   bash script/pretrain.sh                                        # every GPU here, or 1 CPU process
#   CONFIG=config/pretrain_25m.py bash script/pretrain.sh --batch_size=32
#   NPROC=8 bash script/pretrain.sh --init_from=resume             # continue after a stop
#   NNODES=2 NODE_RANK=0 MASTER=10.0.0.1:29500 bash script/pretrain.sh   # node 0; NODE_RANK=1 on node 1
# Checkpoints: out/pretrain/<phase>/ckpt.pt (out_dir in the config). See script/launch.sh for the variables.
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/launch.sh" pretrain.py "${CONFIG:-config/pretrain_100m.py}" "$@"
