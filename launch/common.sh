# Shared settings of the megatron-espace launch scripts (sourced, not run).
#
# Every setting is an environment variable with a default; the scripts that source this file
# (train_single_node.sh, train_multi_node.sh, slurm_espace.sbatch) build the flags of one
# megatron_espace tool from them into the bash array ESPACE_ARGS. Flags are Megatron-LM's.
#
#   TOOL                train | calibrate | sensitivity | convert      (default train)
#
#   model               NUM_LAYERS=24 HIDDEN_SIZE=1024 NUM_ATTENTION_HEADS=16 SEQ_LENGTH=1024
#                       FFN_HIDDEN_SIZE MAX_POSITION_EMBEDDINGS (defaults: 4 x hidden, SEQ_LENGTH)
#                       NUM_QUERY_GROUPS (sets --group-query-attention)
#                       POSITION_EMBEDDING_TYPE=learned_absolute NORMALIZATION=LayerNorm
#                       SWIGLU=0 DISABLE_BIAS_LINEAR=0 UNTIE_EMBEDDINGS=0
#                       BF16 (default 1 when nvidia-smi lists a GPU, else 0)
#   parallelism         TP=1 PP=1 SEQUENCE_PARALLEL=0 MICRO_BATCH=4 GLOBAL_BATCH (default:
#                       MICRO_BATCH x data-parallel size) SEED=1234
#   data                DATA_PATH (required by train, calibrate, sensitivity: a prefix or a
#                       blend "W1 PREFIX1 W2 PREFIX2") SPLIT=949,50,1 DATA_CACHE_PATH
#   tokenizer           TOKENIZER_TYPE (GPT2BPETokenizer when VOCAB_FILE is set, else ByteLevel)
#                       VOCAB_FILE MERGE_FILE
#   checkpoints         LOAD SAVE
#   ESPACE              ESPACE_CONFIG ESPACE_PROJECTIONS (train: both or neither)
#   train               TRAIN_ITERS=1000 LR=1e-4 MIN_LR=0 LR_WARMUP_ITERS=0
#                       LR_DECAY_STYLE=cosine WEIGHT_DECAY=0.01 CLIP_GRAD=1.0
#                       EVAL_INTERVAL=1000 EVAL_ITERS=10 LOG_INTERVAL=10 SAVE_INTERVAL
#                       DISTRIBUTED_OPTIMIZER=0 FINETUNE=0 NO_LOAD_OPTIM=0
#   calibrate           OUT=projections.safetensors CALIB_SAMPLES=512 MAX_RANK
#   sensitivity         OUT_CONFIG=espace-selected.yaml EVAL_ITERS=10 LAYER_COMPRESSION
#                       one of TARGET_COMPRESSION=0.5 | MAX_PPL_INCREASE | INFLECTION=1
#   convert             LOAD SAVE ESPACE_CONFIG ESPACE_PROJECTIONS (all required)
#
# Anything else goes after the script's name and is passed on unchanged (later flags win).
# DRY_RUN=1 prints the command instead of running it.

_espace_die() { echo "$(basename "$0"): $*" >&2; exit 2; }

# Number of GPUs on this node, or 1 without any (then the tools run on CPU with gloo).
espace_gpu_count() {
    local n=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    [ "${n:-0}" -gt 0 ] && echo "$n" || echo 1
}

espace_has_gpu() {
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'
}

# ESPACE_ARGS+=(FLAG VALUE) when VALUE is not empty
_espace_opt() { if [ -n "$2" ]; then ESPACE_ARGS+=("$1" "$2"); fi; }
# ESPACE_ARGS+=(FLAG) when VALUE is 1
_espace_flag() { if [ "$2" = 1 ]; then ESPACE_ARGS+=("$1"); fi; }

espace_build_args() {
    TOOL=${TOOL:-train}
    case "$TOOL" in
        train|calibrate|sensitivity|convert) ;;
        *) _espace_die "TOOL=$TOOL: expected train, calibrate, sensitivity or convert" ;;
    esac
    if [ -z "${BF16:-}" ]; then
        if espace_has_gpu; then BF16=1; else BF16=0; fi
    fi
    if [ -z "${TOKENIZER_TYPE:-}" ]; then
        TOKENIZER_TYPE=ByteLevel
        if [ -n "${VOCAB_FILE:-}" ]; then TOKENIZER_TYPE=GPT2BPETokenizer; fi
    fi

    ESPACE_ARGS=(
        --num-layers "${NUM_LAYERS:-24}"
        --hidden-size "${HIDDEN_SIZE:-1024}"
        --num-attention-heads "${NUM_ATTENTION_HEADS:-16}"
        --seq-length "${SEQ_LENGTH:-1024}"
        --position-embedding-type "${POSITION_EMBEDDING_TYPE:-learned_absolute}"
        --normalization "${NORMALIZATION:-LayerNorm}"
        --tensor-model-parallel-size "${TP:-1}"
        --pipeline-model-parallel-size "${PP:-1}"
        --micro-batch-size "${MICRO_BATCH:-4}"
        --seed "${SEED:-1234}"
        --tokenizer-type "$TOKENIZER_TYPE"
    )
    _espace_opt --ffn-hidden-size "${FFN_HIDDEN_SIZE:-}"
    _espace_opt --max-position-embeddings "${MAX_POSITION_EMBEDDINGS:-}"
    if [ -n "${NUM_QUERY_GROUPS:-}" ]; then
        ESPACE_ARGS+=(--group-query-attention --num-query-groups "$NUM_QUERY_GROUPS")
    fi
    _espace_flag --swiglu "${SWIGLU:-0}"
    _espace_flag --disable-bias-linear "${DISABLE_BIAS_LINEAR:-0}"
    _espace_flag --untie-embeddings-and-output-weights "${UNTIE_EMBEDDINGS:-0}"
    _espace_flag --bf16 "$BF16"
    _espace_flag --sequence-parallel "${SEQUENCE_PARALLEL:-0}"
    _espace_opt --global-batch-size "${GLOBAL_BATCH:-}"
    _espace_opt --vocab-file "${VOCAB_FILE:-}"
    _espace_opt --merge-file "${MERGE_FILE:-}"
    _espace_opt --load "${LOAD:-}"

    if [ "$TOOL" != convert ]; then
        [ -n "${DATA_PATH:-}" ] ||
            _espace_die "TOOL=$TOOL needs DATA_PATH (an indexed dataset prefix, e.g." \
                        "data/corpus_text_document)"
        # shellcheck disable=SC2206  # a blend "W1 P1 W2 P2" is meant to split into words
        ESPACE_ARGS+=(--data-path ${DATA_PATH} --split "${SPLIT:-949,50,1}")
        _espace_opt --data-cache-path "${DATA_CACHE_PATH:-}"
    fi

    case "$TOOL" in
    train)
        if { [ -n "${ESPACE_CONFIG:-}" ] && [ -z "${ESPACE_PROJECTIONS:-}" ]; } ||
           { [ -z "${ESPACE_CONFIG:-}" ] && [ -n "${ESPACE_PROJECTIONS:-}" ]; }; then
            _espace_die "ESPACE_CONFIG and ESPACE_PROJECTIONS go together" \
                        "(both: ESPACE retraining; neither: the baseline)"
        fi
        ESPACE_ARGS+=(
            --train-iters "${TRAIN_ITERS:-1000}"
            --lr "${LR:-1e-4}"
            --min-lr "${MIN_LR:-0}"
            --lr-warmup-iters "${LR_WARMUP_ITERS:-0}"
            --lr-decay-style "${LR_DECAY_STYLE:-cosine}"
            --weight-decay "${WEIGHT_DECAY:-0.01}"
            --clip-grad "${CLIP_GRAD:-1.0}"
            --eval-interval "${EVAL_INTERVAL:-1000}"
            --eval-iters "${EVAL_ITERS:-10}"
            --log-interval "${LOG_INTERVAL:-10}"
        )
        _espace_opt --save "${SAVE:-}"
        _espace_opt --save-interval "${SAVE_INTERVAL:-}"
        _espace_opt --espace-config "${ESPACE_CONFIG:-}"
        _espace_opt --espace-projections "${ESPACE_PROJECTIONS:-}"
        _espace_flag --use-distributed-optimizer "${DISTRIBUTED_OPTIMIZER:-0}"
        _espace_flag --finetune "${FINETUNE:-0}"
        _espace_flag --no-load-optim "${NO_LOAD_OPTIM:-0}"
        ;;
    calibrate)
        [ -n "${ESPACE_CONFIG:-}" ] || _espace_die "TOOL=calibrate needs ESPACE_CONFIG"
        [ -n "${LOAD:-}" ] || _espace_die "TOOL=calibrate needs LOAD (the baseline checkpoint)"
        ESPACE_ARGS+=(--espace-config "$ESPACE_CONFIG" --out "${OUT:-projections.safetensors}"
                      --calib-samples "${CALIB_SAMPLES:-512}")
        _espace_opt --max-rank "${MAX_RANK:-}"
        ;;
    sensitivity)
        [ -n "${ESPACE_CONFIG:-}" ] && [ -n "${ESPACE_PROJECTIONS:-}" ] ||
            _espace_die "TOOL=sensitivity needs ESPACE_CONFIG and ESPACE_PROJECTIONS"
        [ -n "${LOAD:-}" ] || _espace_die "TOOL=sensitivity needs LOAD (the baseline checkpoint)"
        ESPACE_ARGS+=(--espace-config "$ESPACE_CONFIG" --espace-projections "$ESPACE_PROJECTIONS"
                      --out-config "${OUT_CONFIG:-espace-selected.yaml}"
                      --eval-iters "${EVAL_ITERS:-10}")
        _espace_opt --layer-compression "${LAYER_COMPRESSION:-}"
        if [ -n "${MAX_PPL_INCREASE:-}" ]; then
            ESPACE_ARGS+=(--max-ppl-increase "$MAX_PPL_INCREASE")
        elif [ "${INFLECTION:-0}" = 1 ]; then
            ESPACE_ARGS+=(--inflection)
        else
            ESPACE_ARGS+=(--target-compression "${TARGET_COMPRESSION:-0.5}")
        fi
        ;;
    convert)
        [ -n "${LOAD:-}" ] && [ -n "${SAVE:-}" ] && [ -n "${ESPACE_CONFIG:-}" ] &&
            [ -n "${ESPACE_PROJECTIONS:-}" ] ||
            _espace_die "TOOL=convert needs LOAD, SAVE, ESPACE_CONFIG and ESPACE_PROJECTIONS"
        ESPACE_ARGS+=(--save "$SAVE" --espace-config "$ESPACE_CONFIG"
                      --espace-projections "$ESPACE_PROJECTIONS")
        ;;
    esac
}

# Run the command (DRY_RUN=1: print it, shell-quoted, and exit).
espace_exec() {
    if [ "${DRY_RUN:-0}" = 1 ]; then
        printf '%q ' "$@"
        echo
        exit 0
    fi
    set -x
    exec "$@"
}

# CUDA_DEVICE_MAX_CONNECTIONS=1 keeps megatron's TP/SP communication ordered on GPUs (Megatron-LM
# asserts it under tensor parallelism); an environment variable only, harmless without CUDA.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# megatron-core >= 0.18 would run `git rev-parse` on every import to stamp its version
export NO_VCS_VERSION=${NO_VCS_VERSION:-1}
