"""espace import-hf: tiny transformers models (Llama GQA + tied + llama3 rope, Mistral, Qwen2
qkv bias, GPT-2) imported, then megatron's logits against transformers' at TP=1, TP=2, PP=2;
the model flags read back from the checkpoint; the tokenizer against ``tokenizers``; errors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from megatron_espace import arguments, hf_layout
from megatron_espace.import_hf import import_hf, main
from tests import hf_models
from tests.harness import run_distributed

TOL = 1e-4


def _ref(case):
    return load_file(str(case / "ref.safetensors"))


def test_logits_match_transformers_at_tp1(hf_cases):
    for name, case in hf_cases.items():
        ref = _ref(case)
        model, args = hf_models.load_imported(case / "ckpt")
        vocab = ref["logits"].shape[-1]
        assert args.vocab_size == vocab and model.vocab_size % 8 == 0
        logits = hf_models.megatron_logits(model, ref["tokens"], vocab)
        diff = (logits - ref["logits"]).abs().max().item()
        print(f"{name}: TP=1 max |megatron - transformers| = {diff:.2e}")
        assert diff <= TOL, name


def _parallel_logits(root):
    from pathlib import Path

    from megatron_espace import runtime

    out = {}
    for tp, pp in ((2, 1), (1, 2)):
        runtime.initialize(tp, pp)
        for name in hf_models.NAMES:
            case = Path(root) / name
            ref = load_file(str(case / "ref.safetensors"))
            model, _ = hf_models.load_imported(case / "ckpt", tp, pp)
            logits = hf_models.megatron_logits(model, ref["tokens"], ref["logits"].shape[-1])
            if logits is not None:
                out[f"{name} TP={tp} PP={pp}"] = logits
    return out


def test_logits_match_transformers_at_tp2_and_pp2(hf_cases):
    root = next(iter(hf_cases.values())).parent
    results = run_distributed(_parallel_logits, nprocs=2, root=str(root))
    seen = set()
    for result in results:
        for key, logits in result.items():
            ref = _ref(root / key.split()[0])["logits"]
            diff = (logits - ref).abs().max().item()
            print(f"{key}: max |megatron - transformers| = {diff:.2e}")
            assert diff <= TOL, key
            seen.add(key)
    assert len(seen) == 2 * len(hf_models.NAMES)


def test_model_args_describe_the_checkpoint(hf_cases, capsys):
    ckpt = hf_cases["llama"] / "ckpt"
    stored = json.loads((ckpt / arguments.MODEL_ARGS).read_text())
    assert stored["num_query_groups"] == 2 and stored["use_rope_scaling"] is True
    assert stored["rope_scaling_factor"] == 4.0 and stored["rotary_base"] == 5000
    assert stored["tokenizer_type"] == "HuggingFaceTokenizer"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "release"
    # args.txt is the same description for @FILE (Megatron-LM's fromfile style)
    p = _parser()
    args = arguments.parse_args(p, [f"@{ckpt / arguments.ARGS_TXT}"])
    assert {k: getattr(args, k) for k in stored} == stored
    # a default flag is replaced, a model flag that disagrees is an error naming both
    args = arguments.parse_args(_parser(), ["--load", str(ckpt), "--seq-length", "8"])
    assert args.seq_length == 8 and args.num_layers == 2
    with pytest.raises(SystemExit):
        arguments.parse_args(_parser(), ["--load", str(ckpt), "--num-layers", "3"])
    assert (f"--num-layers 3 conflicts with --num-layers 2 in {ckpt / arguments.MODEL_ARGS}"
            in capsys.readouterr().err)


def _parser():
    import argparse

    p = argparse.ArgumentParser()
    arguments.add_model_args(p)
    arguments.add_parallel_args(p)
    arguments.add_tokenizer_args(p)
    arguments.add_checkpoint_args(p)
    return p


TEXT = ("Hello world! The year 2024, 12345 items; naïve café ☃ 𝄞 🙂 ½\n\n  indented\tx = 3.14"
        "<|endoftext|>def f(x):\n    return x**2  # it's   done  \r\n") + hf_models.CORPUS[3]


@pytest.mark.parametrize("kind", ["llama3", "smollm2"])
def test_tokenizer_ids_equal_the_tokenizers_library(tmp_path, kind):
    from megatron_espace.tokenizer import HuggingFaceTokenizer

    reference = hf_models.train_tokenizer(tmp_path / "tokenizer.json", kind)
    ours = HuggingFaceTokenizer(str(tmp_path))
    for text in (TEXT, TEXT.upper(), " leading", "x" * 50 + " 0000000"):
        assert ours.tokenize(text) == reference.encode(text, add_special_tokens=False).ids
    assert ours.detokenize(ours.tokenize(TEXT)) == TEXT


def test_imported_directory_is_the_tokenizer(hf_cases):
    from tokenizers import Tokenizer

    ckpt = hf_cases["llama"] / "ckpt"
    args = arguments.parse_args(_parser(), ["--load", str(ckpt)])
    tok = arguments.tokenizer(args)  # --tokenizer-model DIR from model_args.json
    reference = Tokenizer.from_file(str(hf_cases["llama"] / "hf" / "tokenizer.json"))
    assert tok.tokenize(TEXT) == reference.encode(TEXT, add_special_tokens=False).ids
    assert tok.vocab_size <= args.vocab_size


# ----------------------------------------------------------------------------- errors


def _copy_hf(hf_cases, name, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(hf_cases[name] / "hf", hf)
    return hf


def _edit_config(hf, **changes):
    config = json.loads((hf / "config.json").read_text())
    config.update(changes)
    (hf / "config.json").write_text(json.dumps(config))


def _fails(hf, tmp_path, capsys, *fragments):
    assert main([str(hf), "--save", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, err
    assert not (tmp_path / "out").exists()


def test_unknown_architecture_names_file_and_field(hf_cases, tmp_path, capsys):
    hf = _copy_hf(hf_cases, "qwen2", tmp_path)
    _edit_config(hf, architectures=["BertForMaskedLM"])
    _fails(hf, tmp_path, capsys, f"{hf / 'config.json'}: architectures ['BertForMaskedLM'] is "
           "not supported", "Qwen2ForCausalLM")


def test_unsupported_rope_scaling_names_the_type(hf_cases, tmp_path, capsys):
    hf = _copy_hf(hf_cases, "mistral", tmp_path)
    _edit_config(hf, rope_parameters=None, rope_theta=10000.0,
                 rope_scaling={"type": "yarn", "factor": 4.0})
    _fails(hf, tmp_path, capsys, "config.json: rope_scaling type 'yarn' is not supported")
    _edit_config(hf, rope_scaling=None, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_theta": 1e4})
    _fails(hf, tmp_path, capsys, "rope_parameters.low_freq_factor = 2.0")


def test_missing_tensor_and_shape_mismatch_name_the_tensor(hf_cases, tmp_path, capsys):
    from safetensors.torch import save_file

    hf = _copy_hf(hf_cases, "gpt2", tmp_path)
    weights = load_file(str(hf / "model.safetensors"))
    full = dict(weights)
    del weights["transformer.h.1.mlp.c_fc.bias"]
    save_file(weights, str(hf / "model.safetensors"), metadata={"format": "pt"})
    _fails(hf, tmp_path, capsys, "tensor transformer.h.1.mlp.c_fc.bias is missing")
    full["transformer.h.0.attn.c_proj.weight"] = torch.zeros(32, 16)
    save_file(full, str(hf / "model.safetensors"), metadata={"format": "pt"})
    _fails(hf, tmp_path, capsys, f"{hf / 'model.safetensors'}: tensor "
           "transformer.h.0.attn.c_proj.weight has shape [32, 16]", "[32, 32]")


def test_unsupported_tokenizer_kind_names_the_file(hf_cases, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    hf = _copy_hf(hf_cases, "qwen2", tmp_path)
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))  # Llama 2 / Mistral style
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.save(str(hf / "tokenizer.json"))
    _fails(hf, tmp_path, capsys, f"{hf / 'tokenizer.json'}: model.byte_fallback = True is not "
           "supported")
    assert main([str(hf), "--save", str(tmp_path / "out"), "--no-tokenizer"]) == 0


def test_vocab_divisor_keeps_tp_changes_free():
    for vocab in (50257, 32000, 128256, 151936, 49152, 123, 300):
        d = hf_layout.vocab_divisor(vocab)
        sizes = {hf_layout.padded_vocab(vocab, d, tp) for tp in hf_layout.TP_SIZES}
        assert len(sizes) == 1 and 0 <= sizes.pop() - vocab < 8, vocab
    assert hf_layout.vocab_divisor(32000) == 4000  # no padding when 8 divides the vocabulary
