"""Tiny seeded HuggingFace models made with ``transformers`` itself, and megatron's view of them.

``build(root)`` writes, per architecture, ``root/NAME/hf`` (save_pretrained: config.json and
model.safetensors), ``root/NAME/ref.safetensors`` (fixed tokens and the float32 HF logits)
and imports it into ``root/NAME/ckpt``. The Llama model has GQA, tied embeddings, Llama 3
rope scaling and a byte-level BPE tokenizer.json trained with ``tokenizers`` (Llama 3's
split regex); Mistral has GQA and untied embeddings; Qwen2 has the qkv bias; GPT-2 has
Conv1D weights, learned positions, biases and tanh-GELU. Vocabularies 300/122/120/123 make
megatron pad some of them.
"""

import argparse
from pathlib import Path

import torch

SEQ, BATCH = 16, 2
NAMES = ("llama", "mistral", "qwen2", "gpt2")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = [f"The quick brown fox {i} jumps over the lazy dog; naïve café {i * 37}!\n"
          f"def f_{i % 5}(x):\n    return x * {i} + 1  # ünïcödé ☃\n" for i in range(40)]


def configs() -> dict:
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, rms_norm_eps=1e-5)
    llama3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
              "rope_theta": 5000.0}
    return {
        "llama": LlamaConfig(vocab_size=300, num_key_value_heads=2, tie_word_embeddings=True,
                             max_position_embeddings=16384, rope_parameters=llama3, **common),
        "mistral": MistralConfig(vocab_size=122, num_key_value_heads=2, sliding_window=None,
                                 max_position_embeddings=64, tie_word_embeddings=False,
                                 **common),
        "qwen2": Qwen2Config(vocab_size=120, num_key_value_heads=4, max_position_embeddings=64,
                             tie_word_embeddings=False, **common),
        "gpt2": GPT2Config(vocab_size=123, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    }


def train_tokenizer(path, kind="llama3"):
    """A byte-level BPE tokenizer.json trained by ``tokenizers`` on CORPUS: Llama 3's layout
    (Split regex, ByteLevel without its own regex, ignore_merges) or SmolLM2's (Digits, then
    ByteLevel with GPT-2's regex)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=kind == "llama3"))
    if kind == "llama3":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return tok


def hf_model(name, config):
    """The seeded transformers model, weights scaled so logits are O(1)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(sum(map(ord, name)))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or ".ln_" in n:
                p.copy_((1 if n.endswith("weight") else 0) + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model.eval()


def build(root) -> dict:
    """Write every case under ``root``; returns {name: case directory}."""
    from safetensors.torch import save_file

    from megatron_espace.import_hf import import_hf

    root = Path(root)
    out = {}
    for name, config in configs().items():
        case = root / name
        model = hf_model(name, config)
        model.save_pretrained(case / "hf")
        if name == "llama":
            train_tokenizer(case / "hf" / "tokenizer.json")
        g = torch.Generator().manual_seed(7)
        tokens = torch.randint(0, config.vocab_size, (BATCH, SEQ), generator=g)
        with torch.no_grad():
            logits = model(tokens).logits
        save_file({"tokens": tokens, "logits": logits}, str(case / "ref.safetensors"))
        import_hf(case / "hf", case / "ckpt")
        out[name] = case
    return out


def load_imported(ckpt, tp=1, pp=1, extra=()):
    """The megatron model of this rank from an imported checkpoint, ``--load`` alone
    (plus the parallel sizes) describing it; returns (model, args)."""
    from megatron_espace import arguments

    p = argparse.ArgumentParser()
    arguments.add_model_args(p)
    arguments.add_parallel_args(p)
    arguments.add_tokenizer_args(p)
    arguments.add_checkpoint_args(p)
    args = arguments.parse_args(p, ["--load", str(ckpt), "--tensor-model-parallel-size",
                                    str(tp), "--pipeline-model-parallel-size", str(pp),
                                    *extra])
    model = arguments.build_model(args, args.vocab_size)
    arguments.load_model(model, args.load)
    return model, args


def megatron_logits(model, tokens, vocab_size):
    """Full-vocabulary logits [b, s, vocab_size] on the last pipeline stage (None elsewhere);
    the stages exchange the hidden states by hand (point-to-point)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    model.eval()
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        if not ps.is_pipeline_first_stage():
            hidden = torch.empty(tokens.shape[1], tokens.shape[0], model.config.hidden_size)
            torch.distributed.recv(hidden, ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        out = model(tokens, pos, None)
        if not ps.is_pipeline_last_stage():
            torch.distributed.send(out.contiguous(), ps.get_pipeline_model_parallel_next_rank())
            return None
    return gather_from_tensor_model_parallel_region(out)[..., :vocab_size]
