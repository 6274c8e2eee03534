#!/usr/bin/env bash
# Runs a training script on this machine's GPUs, on several nodes, or as one CPU process.
#   bash script/launch.sh pretrain.py config/pretrain_100m.py [--key=value ...]
# Environment:
#   NPROC      processes on this node (default: the number of GPUs, or 1 without a GPU)
#   NNODES     nodes (default 1); with NNODES > 1 start the same command on every node with
#   MASTER     host:port of node 0's rendezvous (e.g. 10.0.0.1:29500), the same on every node
#   NODE_RANK  this node's rank, 0 .. NNODES-1 (optional with the c10d rendezvous; logs are clearer with it)
#   RDZV_ID    a job id shared by the nodes (default mcg)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
SCRIPT="${1:?usage: launch.sh SCRIPT.py [CONFIG.py] [--key=value ...]}"
shift
NPROC="${NPROC:-$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}"
NNODES="${NNODES:-1}"
if [ "$NNODES" -gt 1 ]; then
  exec torchrun --nnodes="$NNODES" ${NODE_RANK:+--node_rank="$NODE_RANK"} --nproc_per_node="$NPROC" \
    --rdzv_backend=c10d --rdzv_endpoint="${MASTER:?set MASTER=host:port of node 0}" --rdzv_id="${RDZV_ID:-mcg}" \
    "$SCRIPT" "$@"
elif [ "$NPROC" -gt 1 ]; then
  exec torchrun --standalone --nproc_per_node="$NPROC" "$SCRIPT" "$@"
else
  exec python "$SCRIPT" "$@"
fi
