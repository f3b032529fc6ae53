"""Megatron-LM's command-line flags for a GPT model, and the model they describe.

Shared by the torchrun tools (``calibrate``, and the trainer and sensitivity tools that
follow). Flag names and defaults follow Megatron-LM's ``arguments.py`` so a user's launch
script carries over; only the flags these tools use are defined.
"""

import argparse
import math
import os
import shutil
import sys
from pathlib import Path

import torch

from megatron_espace import atomic


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model (Megatron-LM flags)")
    g.add_argument("--num-layers", type=int, required=True)
    g.add_argument("--hidden-size", type=int, required=True)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 x hidden")
    g.add_argument("--num-attention-heads", type=int, required=True)
    g.add_argument("--kv-channels", type=int, default=None,
                   help="attention head dimension (default hidden / heads)")
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=int, default=1)
    g.add_argument("--seq-length", type=int, required=True)
    g.add_argument("--max-position-embeddings", type=int, default=None,
                   help="default --seq-length")
    g.add_argument("--position-embedding-type", default="learned_absolute",
                   choices=["learned_absolute", "rope", "none"])
    g.add_argument("--rotary-base", type=int, default=10000)
    g.add_argument("--rotary-percent", type=float, default=1.0)
    g.add_argument("--use-rope-scaling", action="store_true",
                   help="Llama 3.x rope scaling (low/high frequency factors 1/4, original "
                   "context 8192)")
    g.add_argument("--rope-scaling-factor", type=float, default=8.0)
    g.add_argument("--normalization", default="LayerNorm", choices=["LayerNorm", "RMSNorm"])
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--openai-gelu", action="store_true", help="tanh-approximated GELU (GPT-2)")
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--add-qkv-bias", action="store_true",
                   help="bias on the qkv projection even with --disable-bias-linear")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--vocab-size", type=int, default=None,
                   help="the vocabulary before padding (default: the tokenizer's)")
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None)
    g.add_argument("--recompute-num-layers", type=int, default=None)


def add_parallel_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("parallelism and batch (Megatron-LM flags)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--seed", type=int, default=1234)


def add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data (Megatron-LM flags)")
    g.add_argument("--data-path", nargs="+", required=True,
                   help="PREFIX [PREFIX ...] or a blend: W1 PREFIX1 W2 PREFIX2 ...")
    g.add_argument("--split", default="949,50,1")
    g.add_argument("--data-cache-path", default=None)
    add_tokenizer_args(parser)


def add_tokenizer_args(parser: argparse.ArgumentParser) -> None:
    from megatron_espace.tokenizer import TOKENIZER_TYPES

    g = parser.add_argument_group("tokenizer (Megatron-LM flags)")
    g.add_argument("--tokenizer-type", default="ByteLevel", choices=TOKENIZER_TYPES)
    g.add_argument("--vocab-file", default=None)
    g.add_argument("--merge-file", default=None)
    g.add_argument("--tokenizer-model", default=None,
                   help="HuggingFaceTokenizer: tokenizer.json, or a directory holding it")


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("checkpoints (Megatron-LM flags)")
    g.add_argument("--load", default=None, help="a torch_dist checkpoint directory, or a "
                   "Megatron-LM save directory holding latest_checkpointed_iteration.txt")


def tokenizer(args):
    """The tokenizer the ``--tokenizer-*`` flags describe."""
    from megatron_espace.tokenizer import build_tokenizer

    return build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file,
                           args.tokenizer_model)


def padded_vocab_size(vocab_size: int, args) -> int:
    """Megatron-LM's padding: a multiple of make_vocab_size_divisible_by × TP."""
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def tanh_gelu(x):
    """GELU's tanh approximation (``--openai-gelu``; GPT-2's ``gelu_new``). megatron-core's
    ``openai_gelu`` is the same formula under ``torch.compile``, which on CPU means a C++ build
    at the first call."""
    return torch.nn.functional.gelu(x, approximate="tanh")


def transformer_config(args):
    from megatron.core.transformer import TransformerConfig

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    tp = args.tensor_model_parallel_size
    if args.swiglu:
        activation = torch.nn.functional.silu
    elif args.openai_gelu:
        activation = tanh_gelu
    else:
        activation = torch.nn.functional.gelu
    return TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size or 4 * args.hidden_size,
        num_attention_heads=args.num_attention_heads, kv_channels=args.kv_channels,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        normalization=args.normalization, layernorm_epsilon=args.norm_epsilon,
        gated_linear_unit=args.swiglu, activation_func=activation,
        add_bias_linear=not args.disable_bias_linear, add_qkv_bias=args.add_qkv_bias,
        hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        sequence_parallel=args.sequence_parallel and tp > 1,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=args.bf16,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method, recompute_num_layers=args.recompute_num_layers,
        use_cpu_initialization=True,
        # the fused kernels need apex / Transformer Engine; megatron falls back otherwise
        gradient_accumulation_fusion=False, persist_layer_norm=False,
        apply_rope_fusion=False, bias_dropout_fusion=torch.cuda.is_available(),
        bias_activation_fusion=torch.cuda.is_available() and not args.openai_gelu,
        masked_softmax_fusion=torch.cuda.is_available(),
    )


def build_model(args, vocab_size: int, spec=None):
    """The GPTModel of this pipeline stage (local spec unless ``spec`` is given)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    config = transformer_config(args)
    if args.vocab_size is not None:
        if vocab_size > args.vocab_size:
            raise ValueError(f"the tokenizer has {vocab_size} ids, more than --vocab-size "
                             f"{args.vocab_size}")
        vocab_size = args.vocab_size
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec or get_gpt_layer_local_spec(
            normalization=args.normalization),
        vocab_size=padded_vocab_size(vocab_size, args),
        max_sequence_length=args.max_position_embeddings or args.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_base=args.rotary_base, rotary_percent=args.rotary_percent,
        rope_scaling=args.use_rope_scaling, rope_scaling_factor=args.rope_scaling_factor)
    if args.bf16:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(config, model)
    return model


def checkpoint_dir(load) -> Path:
    """The torch_dist directory behind ``--load`` (Megatron-LM's ``iter_XXXXXXX`` layout too)."""
    from megatron_espace.save_dir import TRACKER, tracker_iteration

    path = Path(load)
    if (path / TRACKER).is_file():
        try:
            it = tracker_iteration(path)
        except ValueError as e:
            raise SystemExit(f"--load {load}: {e}") from None
        path = path / ("release" if it is None else f"iter_{it:07d}")
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(f"--load {load}: no torch_dist checkpoint at {path} "
                                "(expected metadata.json)")
    return path


def load_model(model, load) -> Path:
    """Load ``model``'s weights (not the optimizer) from ``--load``; returns the directory."""
    from megatron_espace import checkpointing
    from megatron_espace.surgery import unwrap

    path = checkpoint_dir(load)
    state = checkpointing.load({"model": checkpointing.model_sharded_state_dict(model)}, path)
    unwrap(model).load_state_dict(state["model"])
    return path


# ------------------------------------------------------------ the model a checkpoint describes

MODEL_ARGS = "model_args.json"
ARGS_TXT = "args.txt"
#: flags that fix the model's shapes and math: an explicit value must agree with the checkpoint's
MODEL_FLAGS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "kv_channels",
    "group_query_attention", "num_query_groups", "max_position_embeddings",
    "position_embedding_type", "rotary_base", "rotary_percent", "use_rope_scaling",
    "rope_scaling_factor", "normalization", "norm_epsilon", "swiglu", "openai_gelu",
    "disable_bias_linear", "add_qkv_bias", "untie_embeddings_and_output_weights",
    "make_vocab_size_divisible_by", "vocab_size")
#: flags the checkpoint only suggests: an explicit value replaces them
DEFAULT_FLAGS = ("seq_length", "tokenizer_type", "tokenizer_model", "hidden_dropout",
                 "attention_dropout")
#: HuggingFace files kept beside an imported checkpoint (export-hf writes them back)
HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json")


def checkpoint_root(load) -> Path:
    """The directory that holds ``--load``'s model description (the tracker's directory)."""
    path = Path(load)
    if not (path / MODEL_ARGS).is_file() and (path / "metadata.json").is_file():
        return path.parent  # --load pointed at iter_XXXXXXX/ or release/ itself
    return path


def read_model_args(load) -> dict:
    """``{dest: value}`` from ``--load``'s model_args.json ({} when it has none)."""
    file = checkpoint_root(load) / MODEL_ARGS
    if not file.is_file():
        return {}
    values = atomic.read_json_object(file)
    unknown = sorted(set(values) - set(MODEL_FLAGS) - set(DEFAULT_FLAGS))
    if unknown:
        raise ValueError(f"{file}: unknown field(s) {', '.join(unknown)}")
    return values


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """``parser.parse_args(argv)`` that takes the model flags from the checkpoint.

    The flags of ``--load``'s ``model_args.json`` (written by ``import-hf`` and by every
    save) become defaults, so ``--load DIR`` alone describes the model. An explicit
    MODEL_FLAGS value that differs from the checkpoint's is an error naming both;
    DEFAULT_FLAGS (sequence length, tokenizer, dropout) are replaced by explicit values.
    ``@FILE`` reads flags from a file, one per line (``@DIR/args.txt``).
    """
    parser.fromfile_prefix_chars, parser.allow_abbrev = "@", False
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False, fromfile_prefix_chars="@", allow_abbrev=False)
    pre.add_argument("--load", default=None)
    load = pre.parse_known_args(argv)[0].load
    stored = read_model_args(load) if load else {}
    actions = {a.dest: a for a in parser._actions}
    stored = {k: v for k, v in stored.items() if k in actions}
    unset = object()
    for dest in stored:
        actions[dest].required = False
    args = parser.parse_args(argv, argparse.Namespace(**{d: unset for d in stored}))
    for dest, value in stored.items():
        given = getattr(args, dest)
        if given is unset:
            setattr(args, dest, value)
        elif dest in MODEL_FLAGS and given != value:
            flag = actions[dest].option_strings[0]
            parser.error(f"{flag} {given} conflicts with {flag} {value} in "
                         f"{checkpoint_root(load) / MODEL_ARGS}")
    return args


def flag_lines(values: dict) -> list:
    """``{dest: value}`` as command-line arguments (true switches as the bare flag)."""
    lines = []
    for dest, value in values.items():
        flag = "--" + dest.replace("_", "-")
        if value is True:
            lines.append(flag)
        elif value is not None and value is not False:
            lines += [flag, str(value)]
    return lines


def write_model_args(args, directory) -> None:
    """Write ``args``' model description into ``directory``: model_args.json and args.txt.

    Also copies the HuggingFace files (HF_FILES) of ``args.load``'s directory, if any, so
    the description, tokenizer and HuggingFace config travel from checkpoint to checkpoint.
    Written atomically; called by rank 0.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    values = {d: getattr(args, d) for d in MODEL_FLAGS + DEFAULT_FLAGS
              if getattr(args, d, None) is not None}
    if values.get("tokenizer_model"):
        values["tokenizer_model"] = os.path.abspath(values["tokenizer_model"])
    source = checkpoint_root(args.load) if getattr(args, "load", None) else None
    if source is not None and source.resolve() != directory.resolve():
        for name in HF_FILES:
            if (source / name).is_file():
                with atomic.replacing(directory / name) as tmp:
                    shutil.copyfile(source / name, tmp)
    atomic.write_json(directory / MODEL_ARGS, values)
    atomic.write_text(directory / ARGS_TXT, "".join(f"{line}\n" for line in flag_lines(values)))
