"""Convert an ESPACE checkpoint into the compressed inference checkpoint.

    torchrun --nproc_per_node=N -m megatron_espace.convert \\
        --load ESPACE_CKPT --save OUT --espace-config cfg.yaml \\
        --espace-projections projections.safetensors [model and parallelism flags]

(``espace convert ...`` is the same command.) The model is built as it was trained (the
config and projections file give each layer's rank), the ESPACE checkpoint's weights and
projections are loaded, ``export_compressed`` replaces each ``W`` by ``A = W P``, and the
result is written as a torch_dist checkpoint under ``--save`` (atomically; an existing
directory is refused). The input checkpoint is only read. ``OUT/espace.json`` records
the layers and ranks; the checkpoint reloads at any TP/PP size through :func:`load`.
"""

import argparse
import sys
from pathlib import Path

import torch.distributed as dist

from megatron_espace import arguments, atomic

MANIFEST = "espace.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="espace convert", description=__doc__.split("\n\n")[0])
    arguments.add_model_args(p)
    arguments.add_parallel_args(p)
    arguments.add_tokenizer_args(p)
    arguments.add_checkpoint_args(p)
    g = p.add_argument_group("conversion")
    g.add_argument("--save", required=True, help="the compressed checkpoint directory to write")
    g.add_argument("--espace-config", required=True)
    g.add_argument("--espace-projections", required=True)
    args = arguments.parse_args(p, argv)
    if args.load is None:
        p.error("--load is required: the ESPACE checkpoint to convert")
    return args


def build(args, compressed_checkpoint=None):
    """The compressed model of this rank; with ``compressed_checkpoint``, its weights loaded."""
    import megatron_espace as espace
    from megatron_espace import checkpointing
    from megatron_espace.surgery import unwrap

    tokenizer = arguments.tokenizer(args)
    model = arguments.build_model(args, tokenizer.vocab_size)
    cfg = espace.ESPACEConfig.from_yaml(args.espace_config)
    espace.apply_espace(model, cfg, espace.Projections.load(args.espace_projections))
    if compressed_checkpoint is None:
        arguments.load_model(model, args.load)  # the ESPACE checkpoint: W and P
    espace.export_compressed(model)
    if compressed_checkpoint is not None:
        state = checkpointing.load({"model": checkpointing.model_sharded_state_dict(model)},
                                   compressed_checkpoint)
        unwrap(model).load_state_dict(state["model"])
    return model


def main(argv=None) -> int:
    args = parse_args(argv)
    import megatron_espace as espace
    from megatron_espace import checkpointing, runtime
    from megatron_espace.surgery import linear_layers

    if Path(args.save).exists():
        raise SystemExit(f"--save {args.save}: already exists; not overwriting")
    runtime.initialize(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                       seed=args.seed)
    model = build(args)
    counts = espace.count_parameters(model)
    checkpointing.save({"model": checkpointing.model_sharded_state_dict(model)}, args.save)
    ranks = {n: m.projection_rank for n, m in linear_layers(model).items()
             if getattr(m, "projection_rank", None) is not None}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, ranks)  # every pipeline stage's layers
    if dist.get_rank() == 0:
        manifest = {"format": "megatron-espace-compressed", "source": str(args.load),
                    "espace_config": str(args.espace_config),
                    "projections": str(args.espace_projections),
                    "layers": dict(sorted({k: v for g in gathered for k, v in g.items()}
                                          .items())),
                    "parameters": counts}
        atomic.write_json(Path(args.save) / MANIFEST, manifest)
        arguments.write_model_args(args, args.save)
        print(f"wrote {args.save}: {len(manifest['layers'])} compressed layers, "
              f"{counts['total']:,} parameters ({counts['gemm']:,} in GEMMs, "
              f"{1 - counts['gemm'] / counts['gemm_dense']:.1%} fewer)")
    runtime.destroy()
    return 0


if __name__ == "__main__":
    from megatron_espace.runtime import run_main

    sys.exit(run_main(main))
