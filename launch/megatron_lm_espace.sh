#!/usr/bin/env bash
# Megatron-LM's own training loop (pretrain_gpt.py at tag core_v0.16.1) with ESPACE, through
# launch/pretrain_gpt_espace.py: no Megatron-LM file is edited.
#
#   MEGATRON_LM_PATH   a Megatron-LM checkout at tag core_v0.16.1 (required), e.g.
#                      git clone https://github.com/NVIDIA/Megatron-LM && \
#                      git -C Megatron-LM checkout core_v0.16.1
#   ESPACE_CONFIG, ESPACE_PROJECTIONS   both (ESPACE retraining) or neither (plain
#                      pretrain_gpt.py, e.g. for the baseline)
#   LOAD, SAVE         checkpoint directories (Megatron-LM layout). LOAD may be a *baseline*
#                      checkpoint without projections: the wrapper checks that everything
#                      else fits and loads it with --dist-ckpt-strictness log_unexpected.
#                      Without FINETUNE=1 Megatron-LM continues the baseline's iteration
#                      count, LR schedule and Adam moments: TRAIN_ITERS counts from there
#                      (pass --override-opt-param-scheduler when it differs from the
#                      baseline's schedule length; Megatron-LM refuses the load otherwise).
#   FINETUNE=0         1: start at iteration 0 without the baseline's optimizer state
#
#   launcher           GPUS_PER_NODE (default: the GPUs nvidia-smi lists, or 1) NNODES=1
#                      NODE_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 PYTHON=python
#   model              NUM_LAYERS=24 HIDDEN_SIZE=1024 NUM_ATTENTION_HEADS=16 SEQ_LENGTH=1024
#                      MAX_POSITION_EMBEDDINGS (default SEQ_LENGTH) FFN_HIDDEN_SIZE
#                      POSITION_EMBEDDING_TYPE=learned_absolute NORMALIZATION=LayerNorm
#                      SWIGLU=0 DISABLE_BIAS_LINEAR=0 UNTIE_EMBEDDINGS=0
#                      BF16 (default 1 with a GPU, else 0)
#                      TRANSFORMER_IMPL=local (ESPACE needs megatron-core's unfused spec)
#   parallelism        TP=1 PP=1 SEQUENCE_PARALLEL=0 MICRO_BATCH=4 GLOBAL_BATCH (default
#                      MICRO_BATCH x data-parallel size) DISTRIBUTED_OPTIMIZER=0
#   data               DATA_PATH (or MOCK_DATA=1) SPLIT=949,50,1
#   tokenizer          TOKENIZER_TYPE=GPT2BPETokenizer VOCAB_FILE MERGE_FILE TOKENIZER_MODEL
#                      VOCAB_SIZE (NullTokenizer: e.g. 256 for megatron_espace's ByteLevel data)
#   training           TRAIN_ITERS=1000 LR=1e-4 MIN_LR=0 LR_WARMUP_ITERS=0 LR_DECAY_STYLE=cosine
#                      WEIGHT_DECAY=0.01 CLIP_GRAD=1.0 SAVE_INTERVAL=1000 EVAL_INTERVAL=1000
#                      EVAL_ITERS=10 LOG_INTERVAL=10
#
# Without a GPU the script passes the CPU-friendly flags (gloo, no fused kernels, CPU
# initialisation); Megatron-LM's training loop itself still assumes CUDA in places.
# Extra arguments are Megatron-LM flags, passed on unchanged (later flags win); DRY_RUN=1
# prints the command instead of running it. Example:
#
#   MEGATRON_LM_PATH=~/Megatron-LM DATA_PATH=data/corpus_text_document \
#       VOCAB_FILE=gpt2-vocab.json MERGE_FILE=gpt2-merges.txt \
#       LOAD=ckpt/baseline SAVE=ckpt/espace TRAIN_ITERS=12000 \
#       ESPACE_CONFIG=espace.yaml ESPACE_PROJECTIONS=projections.safetensors \
#       launch/megatron_lm_espace.sh --use-flash-attn
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
source "$HERE/common.sh"

: "${MEGATRON_LM_PATH:?set MEGATRON_LM_PATH to a Megatron-LM checkout at tag core_v0.16.1}"
[ -f "$MEGATRON_LM_PATH/pretrain_gpt.py" ] ||
    _espace_die "MEGATRON_LM_PATH=$MEGATRON_LM_PATH: no pretrain_gpt.py" \
                "(not a Megatron-LM checkout)"
export MEGATRON_LM_PATH
if { [ -n "${ESPACE_CONFIG:-}" ] && [ -z "${ESPACE_PROJECTIONS:-}" ]; } ||
   { [ -z "${ESPACE_CONFIG:-}" ] && [ -n "${ESPACE_PROJECTIONS:-}" ]; }; then
    _espace_die "ESPACE_CONFIG and ESPACE_PROJECTIONS go together" \
                "(both: ESPACE; neither: plain pretrain_gpt.py)"
fi

GPUS_PER_NODE=${GPUS_PER_NODE:-$(espace_gpu_count)}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-python}
SEQ_LENGTH=${SEQ_LENGTH:-1024}
if [ -z "${BF16:-}" ]; then
    if espace_has_gpu; then BF16=1; else BF16=0; fi
fi

ESPACE_ARGS=(
    --num-layers "${NUM_LAYERS:-24}"
    --hidden-size "${HIDDEN_SIZE:-1024}"
    --num-attention-heads "${NUM_ATTENTION_HEADS:-16}"
    --seq-length "$SEQ_LENGTH"
    --max-position-embeddings "${MAX_POSITION_EMBEDDINGS:-$SEQ_LENGTH}"
    --position-embedding-type "${POSITION_EMBEDDING_TYPE:-learned_absolute}"
    --normalization "${NORMALIZATION:-LayerNorm}"
    --transformer-impl "${TRANSFORMER_IMPL:-local}"
    --tensor-model-parallel-size "${TP:-1}"
    --pipeline-model-parallel-size "${PP:-1}"
    --micro-batch-size "${MICRO_BATCH:-4}"
    --train-iters "${TRAIN_ITERS:-1000}"
    --lr "${LR:-1e-4}"
    --min-lr "${MIN_LR:-0}"
    --lr-warmup-iters "${LR_WARMUP_ITERS:-0}"
    --lr-decay-style "${LR_DECAY_STYLE:-cosine}"
    --weight-decay "${WEIGHT_DECAY:-0.01}"
    --clip-grad "${CLIP_GRAD:-1.0}"
    --split "${SPLIT:-949,50,1}"
    --tokenizer-type "${TOKENIZER_TYPE:-GPT2BPETokenizer}"
    --ckpt-format torch_dist
    --save-interval "${SAVE_INTERVAL:-1000}"
    --eval-interval "${EVAL_INTERVAL:-1000}"
    --eval-iters "${EVAL_ITERS:-10}"
    --log-interval "${LOG_INTERVAL:-10}"
)
_espace_opt --ffn-hidden-size "${FFN_HIDDEN_SIZE:-}"
_espace_opt --global-batch-size "${GLOBAL_BATCH:-}"
_espace_opt --vocab-file "${VOCAB_FILE:-}"
_espace_opt --merge-file "${MERGE_FILE:-}"
_espace_opt --tokenizer-model "${TOKENIZER_MODEL:-}"
_espace_opt --vocab-size "${VOCAB_SIZE:-}"
_espace_opt --load "${LOAD:-}"
_espace_opt --save "${SAVE:-}"
_espace_opt --espace-config "${ESPACE_CONFIG:-}"
_espace_opt --espace-projections "${ESPACE_PROJECTIONS:-}"
_espace_flag --swiglu "${SWIGLU:-0}"
_espace_flag --disable-bias-linear "${DISABLE_BIAS_LINEAR:-0}"
_espace_flag --untie-embeddings-and-output-weights "${UNTIE_EMBEDDINGS:-0}"
_espace_flag --bf16 "$BF16"
_espace_flag --sequence-parallel "${SEQUENCE_PARALLEL:-0}"
_espace_flag --use-distributed-optimizer "${DISTRIBUTED_OPTIMIZER:-0}"
_espace_flag --finetune "${FINETUNE:-0}"
if [ "${MOCK_DATA:-0}" = 1 ]; then
    ESPACE_ARGS+=(--mock-data)
else
    [ -n "${DATA_PATH:-}" ] ||
        _espace_die "set DATA_PATH (an indexed dataset prefix) or MOCK_DATA=1"
    # shellcheck disable=SC2206  # a blend "W1 P1 W2 P2" is meant to split into words
    ESPACE_ARGS+=(--data-path ${DATA_PATH})
fi
if ! espace_has_gpu; then
    # no apex / Transformer Engine kernels and no NCCL without CUDA
    ESPACE_ARGS+=(--distributed-backend gloo --use-cpu-initialization
                  --no-gradient-accumulation-fusion --no-persist-layer-norm
                  --no-masked-softmax-fusion --no-bias-gelu-fusion --no-bias-dropout-fusion
                  --no-rope-fusion)
fi

espace_exec "$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$GPUS_PER_NODE" \
    --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
    "$HERE/pretrain_gpt_espace.py" "${ESPACE_ARGS[@]}" "$@"
