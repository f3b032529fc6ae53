"""HuggingFace causal LMs in Megatron's layout: the flags a config.json means, and the tensor map.

Pure torch (no Megatron import); ``import_hf`` and ``export_hf`` use it in both directions.

Supported ``architectures``: LlamaForCausalLM (also SmolLM, Llama 3), MistralForCausalLM,
Qwen2ForCausalLM and GPT2LMHeadModel. Megatron's layouts (local spec, one rank):

* ``linear_qkv`` [ng·(q/g + 2)·d, h]: per query group g, its q heads then its k and v head,
  so a TP split of dim 0 gives every rank whole groups (HF keeps q, k, v apart);
* ``linear_fc1`` [2F, h] = [gate; up] for SwiGLU (megatron's checkpoint keeps this global
  order at any TP);
* GPT-2's ``Conv1D`` weights are stored [in, out]: transposed here;
* the vocabulary is padded with zero rows to ``padded_vocab`` (see :func:`vocab_divisor`).
"""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import List

import torch

from megatron_espace import atomic

LLAMA_LIKE = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
ARCHITECTURES = LLAMA_LIKE + ("GPT2LMHeadModel",)
#: the tensor parallel sizes that must see the same padded vocabulary
TP_SIZES = (1, 2, 4, 8)
#: HF tensors that are not weights (old causal-mask and rotary buffers)
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


class HFFormatError(ValueError):
    """A HuggingFace directory this module cannot map (the message names file and field)."""


def read_config(hf_dir) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise HFFormatError(f"{path}: not found (a HuggingFace model directory has config.json)")
    return atomic.read_json_object(path, HFFormatError)


def architecture(config: dict, where) -> str:
    archs = config.get("architectures")
    if not (isinstance(archs, list) and len(archs) == 1 and archs[0] in ARCHITECTURES):
        raise HFFormatError(f"{where}: architectures {archs!r} is not supported (supported: "
                            f"{', '.join(ARCHITECTURES)})")
    return archs[0]


def vocab_divisor(vocab_size: int) -> int:
    """``--make-vocab-size-divisible-by`` D for which the padded vocabulary (a multiple of
    D × TP) is the same at every TP in TP_SIZES: D = ceil(V / 8), padding at most 7 rows."""
    for tp_max in sorted(TP_SIZES, reverse=True):
        d = -(-vocab_size // tp_max)
        if all(padded_vocab(vocab_size, d, tp) == padded_vocab(vocab_size, d, 1)
               for tp in TP_SIZES if tp <= tp_max):
            return d
    return 1


def padded_vocab(vocab_size: int, divisor: int, tp: int = 1) -> int:
    """Megatron-LM's padding: the next multiple of divisor × TP."""
    multiple = divisor * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def _get(config, key, where, default=None, required=True):
    if key not in config or config[key] is None:
        if required and default is None:
            raise HFFormatError(f"{where}: field {key!r} is missing")
        return default
    return config[key]


def _refuse(config, where, key, allowed, why):
    value = config.get(key)
    if value not in allowed:
        raise HFFormatError(f"{where}: {key} = {value!r} is not supported ({why})")


def _rope(config: dict, where) -> dict:
    """Megatron's rope flags for ``rope_theta`` / ``rope_scaling`` (transformers < 5) or
    ``rope_parameters`` (transformers 5); refuses scalings megatron-core does not implement."""
    params = config.get("rope_parameters")
    field = "rope_parameters"
    if params is None:
        params, field = dict(config.get("rope_scaling") or {}), "rope_scaling"
        params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", 10000.0))
    if theta != int(theta):
        raise HFFormatError(f"{where}: rope_theta = {theta} is not an integer (--rotary-base)")
    flags = {"position_embedding_type": "rope", "rotary_base": int(theta),
             "rotary_percent": float(config.get("partial_rotary_factor", 1.0))}
    if kind == "llama3":
        # megatron-core implements Llama 3.x scaling with these constants only
        fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}
        for key, value in fixed.items():
            if float(params.get(key, -1)) != value:
                raise HFFormatError(f"{where}: {field}.{key} = {params.get(key)!r}: megatron-core "
                                    f"implements llama3 rope scaling with {key} = {value} only")
        flags.update(use_rope_scaling=True, rope_scaling_factor=float(params["factor"]))
    elif kind != "default":
        raise HFFormatError(f"{where}: {field} type {kind!r} is not supported (supported: "
                            f"default, llama3); linear, dynamic, yarn, longrope are not")
    return flags


def megatron_flags(config: dict, where) -> dict:
    """``{dest: value}`` of the Megatron flags (``arguments.MODEL_FLAGS`` and the suggested
    DEFAULT_FLAGS) that describe the model of ``config`` (read from ``where``)."""
    arch = architecture(config, where)
    vocab = _get(config, "vocab_size", where)
    if arch == "GPT2LMHeadModel":
        hidden = _get(config, "n_embd", where)
        _refuse(config, where, "activation_function", TANH_GELUS + ("gelu",),
                "supported: tanh GELU or exact gelu")
        _refuse(config, where, "scale_attn_weights", (True, None), "megatron always scales")
        _refuse(config, where, "scale_attn_by_inverse_layer_idx", (False, None),
                "megatron has no per-layer attention scaling")
        _refuse(config, where, "add_cross_attention", (False, None), "decoder only")
        positions = _get(config, "n_positions", where)
        flags = {
            "num_layers": _get(config, "n_layer", where), "hidden_size": hidden,
            "ffn_hidden_size": _get(config, "n_inner", where, 4 * hidden),
            "num_attention_heads": _get(config, "n_head", where),
            "kv_channels": hidden // _get(config, "n_head", where),
            "group_query_attention": False, "max_position_embeddings": positions,
            "position_embedding_type": "learned_absolute", "normalization": "LayerNorm",
            "norm_epsilon": float(_get(config, "layer_norm_epsilon", where, 1e-5)),
            "swiglu": False,
            "openai_gelu": config.get("activation_function", "gelu_new") in TANH_GELUS,
            "disable_bias_linear": False, "add_qkv_bias": False,
            "untie_embeddings_and_output_weights": not config.get("tie_word_embeddings", True),
            "seq_length": positions,
            "hidden_dropout": float(config.get("resid_pdrop", 0.0)),
            "attention_dropout": float(config.get("attn_pdrop", 0.0)),
        }
    else:
        hidden = _get(config, "hidden_size", where)
        heads = _get(config, "num_attention_heads", where)
        groups = _get(config, "num_key_value_heads", where, heads)
        _refuse(config, where, "hidden_act", ("silu",), "supported: silu (SwiGLU)")
        _refuse(config, where, "attention_bias", (False, None), "megatron's qkv bias is "
                "--add-qkv-bias; an output-projection bias has no Llama flag")
        _refuse(config, where, "mlp_bias", (False, None), "no MLP bias in this mapping")
        if arch == "Qwen2ForCausalLM":
            _refuse(config, where, "use_sliding_window", (False, None),
                    "sliding-window attention is not implemented")
        positions = _get(config, "max_position_embeddings", where)
        seq = min(positions, 4096)
        window = config.get("sliding_window") if arch == "MistralForCausalLM" else None
        if window:  # same attention as full causal attention up to the window
            seq = min(seq, window)
        flags = {
            "num_layers": _get(config, "num_hidden_layers", where), "hidden_size": hidden,
            "ffn_hidden_size": _get(config, "intermediate_size", where),
            "num_attention_heads": heads,
            "kv_channels": _get(config, "head_dim", where, hidden // heads),
            "group_query_attention": groups != heads,
            "num_query_groups": groups, "max_position_embeddings": positions,
            **_rope(config, where), "normalization": "RMSNorm",
            "norm_epsilon": float(_get(config, "rms_norm_eps", where, 1e-6)),
            "swiglu": True, "openai_gelu": False, "disable_bias_linear": True,
            "add_qkv_bias": arch == "Qwen2ForCausalLM",
            "untie_embeddings_and_output_weights": not config.get("tie_word_embeddings", False),
            "seq_length": seq, "hidden_dropout": 0.0,
            "attention_dropout": float(config.get("attention_dropout", 0.0)),
        }
        if heads % groups:
            raise HFFormatError(f"{where}: num_attention_heads {heads} is not a multiple of "
                                f"num_key_value_heads {groups}")
    flags.update(vocab_size=vocab, make_vocab_size_divisible_by=vocab_divisor(vocab))
    return flags


# ------------------------------------------------------------------------- the tensor map


@dataclass
class Rule:
    """One megatron tensor made of ``hf`` tensors by ``kind`` (and back)."""
    megatron: str
    hf: List[str]
    kind: str  # copy | transpose | vocab | gate_up | qkv | qkv_conv1d | qkv_fused


def tensor_map(config: dict, flags: dict) -> List[Rule]:
    """The rules for every megatron tensor of the one-rank model ``flags`` describe."""
    arch = architecture(config, "config.json")
    rules = []
    if arch == "GPT2LMHeadModel":
        rules += [Rule("embedding.word_embeddings.weight", ["transformer.wte.weight"], "vocab"),
                  Rule("embedding.position_embeddings.weight", ["transformer.wpe.weight"],
                       "copy")]
        for i in range(flags["num_layers"]):
            m, h = f"decoder.layers.{i}.", f"transformer.h.{i}."
            for mega, hf in (("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2")):
                rules += [Rule(f"{m}{mega}.{p}", [f"{h}{hf}.{p}"], "copy")
                          for p in ("weight", "bias")]
            rules += [Rule(m + "self_attention.linear_qkv.weight", [h + "attn.c_attn.weight"],
                           "qkv_conv1d"),
                      Rule(m + "self_attention.linear_qkv.bias", [h + "attn.c_attn.bias"],
                           "qkv_fused")]
            for mega, hf in (("self_attention.linear_proj", "attn.c_proj"),
                             ("mlp.linear_fc1", "mlp.c_fc"), ("mlp.linear_fc2", "mlp.c_proj")):
                rules += [Rule(f"{m}{mega}.weight", [f"{h}{hf}.weight"], "transpose"),
                          Rule(f"{m}{mega}.bias", [f"{h}{hf}.bias"], "copy")]
        rules += [Rule(f"decoder.final_layernorm.{p}", [f"transformer.ln_f.{p}"], "copy")
                  for p in ("weight", "bias")]
    else:
        rules.append(Rule("embedding.word_embeddings.weight", ["model.embed_tokens.weight"],
                          "vocab"))
        for i in range(flags["num_layers"]):
            m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
            attn = h + "self_attn."
            rules += [
                Rule(m + "input_layernorm.weight", [h + "input_layernorm.weight"], "copy"),
                Rule(m + "self_attention.linear_qkv.weight",
                     [f"{attn}{x}_proj.weight" for x in "qkv"], "qkv")]
            if flags["add_qkv_bias"]:
                rules.append(Rule(m + "self_attention.linear_qkv.bias",
                                  [f"{attn}{x}_proj.bias" for x in "qkv"], "qkv"))
            rules += [
                Rule(m + "self_attention.linear_proj.weight", [attn + "o_proj.weight"], "copy"),
                Rule(m + "pre_mlp_layernorm.weight", [h + "post_attention_layernorm.weight"],
                     "copy"),
                Rule(m + "mlp.linear_fc1.weight",
                     [h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"], "gate_up"),
                Rule(m + "mlp.linear_fc2.weight", [h + "mlp.down_proj.weight"], "copy")]
        rules.append(Rule("decoder.final_layernorm.weight", ["model.norm.weight"], "copy"))
    if flags["untie_embeddings_and_output_weights"]:
        rules.append(Rule("output_layer.weight", ["lm_head.weight"], "vocab"))
    return rules


def hf_name(name: str, arch: str) -> str:
    """A tensor name of a HF file in the canonical spelling (GPT-2 files may lack the
    ``transformer.`` prefix)."""
    if arch == "GPT2LMHeadModel" and not name.startswith(("transformer.", "lm_head.")):
        return "transformer." + name
    return name


def _heads(flags):
    heads = flags["num_attention_heads"]
    groups = flags.get("num_query_groups") if flags.get("group_query_attention") else heads
    return heads, groups or heads, flags["kv_channels"]


def _interleave(q, k, v, flags):
    heads, groups, d = _heads(flags)
    tail = q.shape[1:]
    q = q.reshape(groups, heads // groups * d, *tail)
    k, v = k.reshape(groups, d, *tail), v.reshape(groups, d, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def _deinterleave(qkv, flags):
    heads, groups, d = _heads(flags)
    tail = qkv.shape[1:]
    per = qkv.reshape(groups, (heads // groups + 2) * d, *tail)
    q, k, v = per.split([heads // groups * d, d, d], dim=1)
    return [t.reshape(-1, *tail).contiguous() for t in (q, k, v)]


def to_megatron(rule: Rule, tensors: list, flags: dict, padded: int) -> torch.Tensor:
    """The megatron tensor of ``rule`` from its HF tensors (in ``rule.hf`` order)."""
    kind = rule.kind
    if kind == "copy":
        return tensors[0]
    if kind == "transpose":
        return tensors[0].t().contiguous()
    if kind == "vocab":
        t = tensors[0]
        return torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])])
    if kind == "gate_up":
        return torch.cat(tensors)
    if kind == "qkv":
        return _interleave(*tensors, flags)
    fused = tensors[0].t() if kind == "qkv_conv1d" else tensors[0]
    return _interleave(*fused.chunk(3, dim=0), flags)


def to_hf(rule: Rule, tensor: torch.Tensor, flags: dict) -> list:
    """The HF tensors of ``rule`` (in ``rule.hf`` order) from its megatron tensor."""
    kind = rule.kind
    if kind == "copy":
        return [tensor]
    if kind == "transpose":
        return [tensor.t().contiguous()]
    if kind == "vocab":
        return [tensor[:flags["vocab_size"]].contiguous()]
    if kind == "gate_up":
        return [t.contiguous() for t in tensor.chunk(2, dim=0)]
    q, k, v = _deinterleave(tensor, flags)
    if kind == "qkv":
        return [q, k, v]
    fused = torch.cat([q, k, v])
    return [fused.t().contiguous() if kind == "qkv_conv1d" else fused]
