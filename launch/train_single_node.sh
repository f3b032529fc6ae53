#!/usr/bin/env bash
# One node: torchrun --nproc_per_node=$GPUS_PER_NODE -m megatron_espace.$TOOL, Megatron-LM flags.
#
#   TOOL=train|calibrate|sensitivity|convert   which megatron_espace tool runs (default train)
#   GPUS_PER_NODE                              processes on this node (default: the GPUs
#                                              nvidia-smi lists, or 1; without CUDA every
#                                              process runs on CPU with gloo)
#   MASTER_PORT=29500                          rendezvous port on this node
#   PYTHON=python                              the interpreter whose torchrun is used
#   ... model, parallelism, data, checkpoint and ESPACE settings: see launch/common.sh
#
# Extra arguments are passed to the tool unchanged. Examples:
#
#   # the baseline
#   DATA_PATH=data/corpus_text_document SAVE=ckpt/base TRAIN_ITERS=10000 \
#       launch/train_single_node.sh
#   # calibrate it, then retrain with ESPACE from its weights and Adam moments
#   TOOL=calibrate DATA_PATH=data/corpus_text_document LOAD=ckpt/base \
#       ESPACE_CONFIG=espace.yaml OUT=projections.safetensors launch/train_single_node.sh
#   DATA_PATH=data/corpus_text_document LOAD=ckpt/base SAVE=ckpt/espace \
#       ESPACE_CONFIG=espace.yaml ESPACE_PROJECTIONS=projections.safetensors \
#       launch/train_single_node.sh
#   # two CPU processes, a tiny model
#   GPUS_PER_NODE=2 TP=2 NUM_LAYERS=2 HIDDEN_SIZE=64 NUM_ATTENTION_HEADS=4 SEQ_LENGTH=64 \
#       MICRO_BATCH=2 TRAIN_ITERS=2 DATA_PATH=/tmp/x/text_text_document \
#       launch/train_single_node.sh
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
source "$HERE/common.sh"

GPUS_PER_NODE=${GPUS_PER_NODE:-$(espace_gpu_count)}
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-python}
espace_build_args

espace_exec "$PYTHON" -m torch.distributed.run \
    --nproc_per_node="$GPUS_PER_NODE" --nnodes=1 \
    --master_addr=127.0.0.1 --master_port="$MASTER_PORT" \
    -m "megatron_espace.$TOOL" "${ESPACE_ARGS[@]}" "$@"
