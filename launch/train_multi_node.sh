#!/usr/bin/env bash
# Many nodes: run this once on every node (by hand, pdsh, or launch/slurm_espace.sbatch).
# torchrun with a c10d rendezvous at $MASTER_ADDR:$MASTER_PORT starts $GPUS_PER_NODE
# processes of megatron_espace.$TOOL here.
#
#   MASTER_ADDR        host of the rendezvous, reachable from every node (required)
#   MASTER_PORT=29500  its port
#   NNODES             number of nodes (required)
#   NODE_RANK          this node's index, 0..NNODES-1 (required; with a c10d rendezvous
#                      torchrun may renumber nodes, global ranks stay consistent)
#   RDZV_ID=espace     rendezvous id, the same on every node of one job (a SLURM job id)
#   GPUS_PER_NODE      processes per node (default: the GPUs nvidia-smi lists, or 1)
#   TOOL, model, parallelism, data, checkpoints, ESPACE: see launch/common.sh
#   PYTHON=python
#
# Extra arguments are passed to the tool unchanged. Example (2 nodes of 8 GPUs):
#
#   # on node 0 and node 1, with NODE_RANK=0 and NODE_RANK=1:
#   MASTER_ADDR=node0 NNODES=2 NODE_RANK=0 TP=4 PP=2 GLOBAL_BATCH=256 \
#       DATA_PATH=data/corpus_text_document LOAD=ckpt/base SAVE=ckpt/espace \
#       ESPACE_CONFIG=espace.yaml ESPACE_PROJECTIONS=projections.safetensors \
#       launch/train_multi_node.sh
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
source "$HERE/common.sh"

: "${MASTER_ADDR:?set MASTER_ADDR to the rendezvous host}"
: "${NNODES:?set NNODES to the number of nodes}"
: "${NODE_RANK:?set NODE_RANK to the index of this node, 0..NNODES-1}"
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-espace}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(espace_gpu_count)}
PYTHON=${PYTHON:-python}
espace_build_args

espace_exec "$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$RDZV_ID" \
    -m "megatron_espace.$TOOL" "${ESPACE_ARGS[@]}" "$@"
