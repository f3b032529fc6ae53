#!/usr/bin/env bash
# The README's "Compressing a HuggingFace model" workflow on a tiny Llama, on CPU, 2 processes.
#
#   bash examples/hf_tiny.sh [OUT]        (default OUT=hf-tiny; needs transformers)
#
# No model can be downloaded here, so step 0 makes the "pretrained" HuggingFace model: a
# byte-level BPE tokenizer (Llama 3's split regex) trained with `tokenizers`, a random tiny
# Llama (GQA, tied embeddings) saved with transformers, imported, and pretrained briefly with
# our trainer, then exported back to HuggingFace format. Steps 1-8 are the workflow itself.
set -euo pipefail
OUT=${1:-hf-tiny}
PY=${PY:-python}
RUN="$PY -m torch.distributed.run --nproc_per_node 2 --master_port ${PORT:-29517}"
DATA=$OUT/data/corpus_text_document
FLAGS=(--tensor-model-parallel-size 2 --seq-length 128 --micro-batch-size 8 --split 90,5,5
       --data-path "$DATA")
mkdir -p "$OUT"

echo "== 0. a pretrained tiny HuggingFace Llama (stand-in for a downloaded one)"
$PY - "$OUT" <<'EOF'
import sys, sysconfig
from pathlib import Path
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig

out = Path(sys.argv[1])
files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:60]
(out / "corpus").mkdir(exist_ok=True)
for f in files:
    (out / "corpus" / (f.stem + ".txt")).write_text(f.read_text(errors="replace"))
split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
         r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
tok = Tokenizer(models.BPE(ignore_merges=True))
tok.pre_tokenizer = pre_tokenizers.Sequence([
    pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator((f.read_text(errors="replace") for f in files), trainers.BpeTrainer(
    vocab_size=1024, special_tokens=["<|endoftext|>"], show_progress=False,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
torch.manual_seed(0)
config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=192,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     max_position_embeddings=128, tie_word_embeddings=True,
                     eos_token_id=0, bos_token_id=0)
AutoModelForCausalLM.from_config(config).save_pretrained(out / "random")
tok.save(str(out / "random" / "tokenizer.json"))
EOF
$PY -m megatron_espace.cli import-hf "$OUT/random" --save "$OUT/random_ckpt"
$PY -m megatron_espace.cli preprocess --input "$OUT/corpus" --output-prefix "$OUT/data/corpus" \
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$OUT/random_ckpt" --append-eod
$RUN -m megatron_espace.train --load "$OUT/random_ckpt" --save "$OUT/pretrained_ckpt" \
    "${FLAGS[@]}" --global-batch-size 16 --train-iters 300 --lr 3e-3 --lr-warmup-iters 30 \
    --eval-interval 300 --eval-iters 8 --log-interval 100
$PY -m megatron_espace.cli export-hf --load "$OUT/pretrained_ckpt" --save "$OUT/hf"

echo "== 1. import"
$PY -m megatron_espace.cli import-hf "$OUT/hf" --save "$OUT/base"
echo "== 2. preprocess with the model's tokenizer"
rm -rf "$OUT/data"
$PY -m megatron_espace.cli preprocess --input "$OUT/corpus" --output-prefix "$OUT/data/corpus" \
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$OUT/base" --append-eod
echo "== 3. calibrate"
cat > "$OUT/candidates.yaml" <<'EOF'
calibration:
  methods: [mse, nmse, go_mse, go_mse_l2, nl_mse, nl_mse_l2]
rank_multiple: pow2
layers:
  - match: "decoder.layers.*"
    compression: 0.5
    method: auto
EOF
$RUN -m megatron_espace.calibrate --load "$OUT/base" "${FLAGS[@]}" \
    --espace-config "$OUT/candidates.yaml" --calib-samples 64 --out "$OUT/projections.safetensors"
echo "== 4. sensitivity"
$RUN -m megatron_espace.sensitivity --load "$OUT/base" "${FLAGS[@]}" \
    --espace-config "$OUT/candidates.yaml" --espace-projections "$OUT/projections.safetensors" \
    --eval-iters 4 --target-compression 0.3 --out-config "$OUT/espace.yaml"
echo "== 5. retrain"
$RUN -m megatron_espace.train --load "$OUT/base" --save "$OUT/espace_ckpt" "${FLAGS[@]}" \
    --espace-config "$OUT/espace.yaml" --espace-projections "$OUT/projections.safetensors" \
    --global-batch-size 16 --train-iters 100 --lr 1e-3 --eval-interval 100 --eval-iters 8 \
    --log-interval 50 --metrics-json "$OUT/retrain.json"
echo "== 6. convert"
$RUN -m megatron_espace.convert --load "$OUT/espace_ckpt" --save "$OUT/compressed_ckpt" \
    --espace-config "$OUT/espace.yaml" --espace-projections "$OUT/projections.safetensors" \
    --tensor-model-parallel-size 2
echo "== 7. evaluate: perplexity on a held-out file, and the local lm-eval task"
VALID=$OUT/valid.txt
$PY -c "import sysconfig; print(open(sysconfig.get_paths()['stdlib'] + '/this.py').read())" \
    > "$VALID"
ESPACE=(--espace-config "$OUT/espace.yaml" --espace-projections "$OUT/projections.safetensors")
TASKS=(--tasks espace_tiny_choice --include-path examples/lm_eval)
$RUN -m megatron_espace.evaluate --load "$OUT/base" --tensor-model-parallel-size 2 \
    --text "$VALID" --seq-length 128 "${TASKS[@]}" --json "$OUT/eval_base.json"
$RUN -m megatron_espace.evaluate --load "$OUT/espace_ckpt" --tensor-model-parallel-size 2 \
    "${ESPACE[@]}" --text "$VALID" --seq-length 128 "${TASKS[@]}" --json "$OUT/eval_espace.json"
echo "== 8. export-hf"
$PY -m megatron_espace.cli export-hf --load "$OUT/espace_ckpt" --save "$OUT/hf_espace" \
    "${ESPACE[@]}"
$PY - "$OUT" "$VALID" <<'EOF'
import math, sys
import torch
from transformers import AutoModelForCausalLM
from megatron_espace.tokenizer import HuggingFaceTokenizer

out, valid = sys.argv[1], sys.argv[2]
text = open(valid).read()  # as espace evaluate: one file, tokenized once, no special tokens
ids = torch.tensor(HuggingFaceTokenizer(f"{out}/hf").tokenize(text))
for name in ("hf", "hf_espace"):
    model = AutoModelForCausalLM.from_pretrained(f"{out}/{name}", dtype=torch.float32).eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, 128):
            window = ids[start:start + 128].unsqueeze(0)
            if window.shape[1] < 2:
                break
            logits = model(window).logits[0, :-1]
            nll += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
            n += window.shape[1] - 1
    print(f"transformers {name}: {n} tokens of {valid}: nll {nll / n:.4f}, "
          f"ppl {math.exp(nll / n):.2f}")
EOF
