"""Megatron-LM's command-line flags for a GPT model, and the model they describe.

Shared by the torchrun tools (``calibrate``, and the trainer and sensitivity tools that
follow). Flag names and defaults follow Megatron-LM's ``arguments.py`` so a user's launch
script carries over; only the flags these tools use are defined.
"""

import argparse
import math
from pathlib import Path

import torch


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model (Megatron-LM flags)")
    g.add_argument("--num-layers", type=int, required=True)
    g.add_argument("--hidden-size", type=int, required=True)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 x hidden")
    g.add_argument("--num-attention-heads", type=int, required=True)
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=int, default=1)
    g.add_argument("--seq-length", type=int, required=True)
    g.add_argument("--max-position-embeddings", type=int, default=None,
                   help="default --seq-length")
    g.add_argument("--position-embedding-type", default="learned_absolute",
                   choices=["learned_absolute", "rope", "none"])
    g.add_argument("--rotary-base", type=int, default=10000)
    g.add_argument("--normalization", default="LayerNorm", choices=["LayerNorm", "RMSNorm"])
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
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


def transformer_config(args):
    from megatron.core.transformer import TransformerConfig

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    tp = args.tensor_model_parallel_size
    return TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size or 4 * args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        normalization=args.normalization, gated_linear_unit=args.swiglu,
        activation_func=torch.nn.functional.silu if args.swiglu else torch.nn.functional.gelu,
        add_bias_linear=not args.disable_bias_linear,
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
        bias_activation_fusion=torch.cuda.is_available(),
        masked_softmax_fusion=torch.cuda.is_available(),
    )


def build_model(args, vocab_size: int, spec=None):
    """The GPTModel of this pipeline stage (local spec unless ``spec`` is given)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    config = transformer_config(args)
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
        rotary_base=args.rotary_base)
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
