"""The ``espace`` command.

    espace check-config CONFIG.yaml [--load CKPT | model flags]
                                           validate an ESPACE config; with a checkpoint or
                                           the model flags, resolve it against the layers
    espace inspect PROJECTIONS.safetensors list layers, methods, K and the energy kept
    espace demo [--output-dir DIR]         the end-to-end CPU demo (what `make demo` runs)
    espace preprocess ...                  = python -m megatron_espace.preprocess_data
    espace calibrate ...                   = python -m megatron_espace.calibrate (torchrun)
    espace convert ...                     = python -m megatron_espace.convert (torchrun)
    espace evaluate ...                    = python -m megatron_espace.evaluate (torchrun)
    espace sensitivity ...                 = python -m megatron_espace.sensitivity (torchrun)
    espace train ...                       = python -m megatron_espace.train (torchrun)
    espace import-hf HF_DIR --save DIR     = python -m megatron_espace.import_hf
    espace export-hf --load DIR --save HF  = python -m megatron_espace.export_hf

Jobs that run under torchrun are modules: ``python -m megatron_espace.<tool>``; the
subcommands above run the same module in this process.
"""

import argparse
import sys

from megatron_espace.config import ConfigError, ESPACEConfig


def check_config(args, model_flags=()) -> int:
    """Validate the config; with ``--load`` or the model flags, also resolve every rule
    against the model's layer names (a pattern matching no layer is an error) and print
    each layer's rank and the compression it reaches."""
    cfg = ESPACEConfig.from_yaml(args.config)
    shapes, model = _layer_shapes(args.load, model_flags)
    if shapes is None:
        print(f"{args.config}: OK (fields only; layer names NOT checked: pass --load CKPT or "
              "the model flags to resolve the patterns against a model)")
    else:
        from megatron_espace.surgery import layer_order, plan_layers

        plans = plan_layers(cfg, shapes)
        print(f"{args.config}: OK for {model}: {len(plans)} of {len(shapes)} linear layers")
    print(f"  calibration methods: {', '.join(cfg.calibration.methods)}; rank_multiple "
          f"{cfg.rank_multiple}")
    for rule in cfg.layers:
        size = f"rank {rule.rank}" if rule.rank is not None else f"compression {rule.compression}"
        print(f"  layers[{rule.index}]  {rule.match:<48} {size:<18} method {rule.method}")
    if shapes is not None:
        print(f"  {'layer':<48} {'K':>6} {'N':>6} {'L':>6} {'compression':>12}  method")
        for name in sorted(plans, key=layer_order):
            p = plans[name]
            print(f"  {name:<48} {p.K:>6} {p.N:>6} {p.rank:>6} {p.compression:>12.1%}  "
                  f"{p.method}")
    return 0


def _layer_shapes(load, model_flags):
    """``({name: (kind, K, N)}, description)`` of the checkpoint's or the flags' model, or
    ``(None, None)`` when neither is given."""
    if model_flags:
        from megatron_espace import arguments, runtime
        from megatron_espace.surgery import layer_shapes

        parser = argparse.ArgumentParser(prog="espace check-config")
        arguments.add_model_args(parser)
        flags = parser.parse_args(list(model_flags))
        flags.tensor_model_parallel_size = flags.pipeline_model_parallel_size = 1
        flags.sequence_parallel = False
        import torch

        fresh = not torch.distributed.is_initialized()  # else: in a process that has it
        if fresh:
            runtime.initialize()
        try:
            model = arguments.build_model(flags, vocab_size=flags.make_vocab_size_divisible_by)
            return layer_shapes(model), "the model of these flags"
        finally:
            if fresh:
                runtime.destroy()
    if load:
        from megatron_espace.arguments import checkpoint_dir
        from megatron_espace.checkpointing import linear_shapes

        path = checkpoint_dir(load)
        return linear_shapes(path), f"the model of {path}"
    return None, None


def inspect(args) -> int:
    from megatron_espace.projection import Projections, energy_kept

    projs = Projections.load(args.projections)
    ranks = args.ranks
    head = "".join(f" {'E(L=' + str(r) + ')':>9}" for r in ranks)
    print(f"{args.projections}: {len(projs.layers())} layers")
    if projs.info:
        print(f"  info: {projs.info}")
    print(f"  {'layer':<48} {'method':<10} {'K':>6} {'kept':>6}{head}")
    print("  (E(L): share of the spectrum's |eigenvalue| mass in the top L; * = chosen method)")
    bad = []
    for layer in projs.layers():
        for method in projs.methods(layer):
            (k, kept), vals = projs.shape(layer, method), projs.eigenvalues(layer, method)
            finite = int(vals.isfinite().sum())
            if finite < vals.numel():
                bad.append(f"{layer} {method}: {vals.numel() - finite} of {vals.numel()}")
                energy = "".join(f" {'non-finite':>9}" for _ in ranks)
            else:
                energy = "".join(f" {energy_kept(vals, r):>9.3f}" for r in ranks)
            mark = " *" if projs.chosen.get(layer) == method else ""
            print(f"  {layer:<48} {method + mark:<10} {k:>6} {kept:>6}"
                  f"{energy}")
    if bad:
        print(f"warning: {args.projections}: non-finite (NaN/Inf) eigenvalues, so these "
              f"projections are unusable (recalibrate): {'; '.join(bad)}", file=sys.stderr)
    return 0


#: subcommands that run a tool module as __main__: name -> (module, help)
MODULES = {
    "demo": ("megatron_espace.demo", "the end-to-end CPU demo"),
    "preprocess": ("megatron_espace.preprocess_data", "text/jsonl -> Megatron indexed dataset"),
    "calibrate": ("megatron_espace.calibrate", "calibration statistics -> projections file"),
    "convert": ("megatron_espace.convert", "ESPACE checkpoint -> compressed checkpoint"),
    "evaluate": ("megatron_espace.evaluate", "perplexity and lm-evaluation-harness tasks"),
    "sensitivity": ("megatron_espace.sensitivity", "per-layer sensitivity -> ESPACE config"),
    "train": ("megatron_espace.train", "train a baseline, or retrain with --espace-config"),
    "import-hf": ("megatron_espace.import_hf", "HuggingFace model -> torch_dist checkpoint"),
    "export-hf": ("megatron_espace.export_hf", "checkpoint (dense or ESPACE) -> HuggingFace"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="espace", description="ESPACE for Megatron models")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check-config", help="validate an ESPACE config YAML",
                       description="Validate an ESPACE config. With --load (a torch_dist "
                       "checkpoint) or Megatron-LM's model flags (--num-layers, --hidden-size, "
                       "...), every pattern is resolved against the model's layer names.")
    p.add_argument("config")
    p.add_argument("--load", default=None, help="a checkpoint whose layers the config is for")
    p.set_defaults(func=check_config)
    p = sub.add_parser("inspect", help="summarise a projections file")
    p.add_argument("projections")
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 64, 256])
    p.set_defaults(func=inspect)
    for name, help_ in MODULES.items():
        sub.add_parser(name, help=help_[1], add_help=False)

    args, rest = parser.parse_known_args(argv)
    if args.command in MODULES:
        import runpy

        sys.argv = [f"espace {args.command}", *rest]
        try:
            runpy.run_module(MODULES[args.command][0], run_name="__main__", alter_sys=True)
        except SystemExit as e:
            return e.code or 0
        return 0
    if rest and args.command != "check-config":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args, rest) if args.command == "check-config" else args.func(args)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"espace {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
