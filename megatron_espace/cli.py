"""The ``espace`` command.

    espace check-config CONFIG.yaml        validate an ESPACE config and print its rules
    espace inspect PROJECTIONS.safetensors list layers, methods, K and the energy kept
    espace demo [--output-dir DIR]         the end-to-end CPU demo (what `make demo` runs)
    espace preprocess ...                  = python -m megatron_espace.preprocess_data
    espace calibrate ...                   = python -m megatron_espace.calibrate (torchrun)
    espace convert ...                     = python -m megatron_espace.convert (torchrun)
    espace sensitivity ...                 = python -m megatron_espace.sensitivity (torchrun)
    espace train ...                       = python -m megatron_espace.train (torchrun)

Jobs that run under torchrun are modules: ``python -m megatron_espace.<tool>``; the
subcommands above run the same module in this process.
"""

import argparse
import sys

from megatron_espace.config import ConfigError, ESPACEConfig


def check_config(args) -> int:
    cfg = ESPACEConfig.from_yaml(args.config)
    print(f"{args.config}: OK")
    print(f"  calibration methods: {', '.join(cfg.calibration.methods)}")
    for rule in cfg.layers:
        size = f"rank {rule.rank}" if rule.rank is not None else f"compression {rule.compression}"
        print(f"  layers[{rule.index}]  {rule.match:<48} {size:<18} method {rule.method}")
    return 0


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
    for layer in projs.layers():
        for method in projs.methods(layer):
            vecs, vals = projs.eigen(layer, method)
            energy = "".join(f" {energy_kept(vals, r):>9.3f}" for r in ranks)
            mark = " *" if projs.chosen.get(layer) == method else ""
            print(f"  {layer:<48} {method + mark:<10} {vecs.shape[0]:>6} {vecs.shape[1]:>6}"
                  f"{energy}")
    return 0


#: subcommands that run a tool module as __main__: name -> (module, help)
MODULES = {
    "demo": ("megatron_espace.demo", "the end-to-end CPU demo"),
    "preprocess": ("megatron_espace.preprocess_data", "text/jsonl -> Megatron indexed dataset"),
    "calibrate": ("megatron_espace.calibrate", "calibration statistics -> projections file"),
    "convert": ("megatron_espace.convert", "ESPACE checkpoint -> compressed checkpoint"),
    "sensitivity": ("megatron_espace.sensitivity", "per-layer sensitivity -> ESPACE config"),
    "train": ("megatron_espace.train", "train a baseline, or retrain with --espace-config"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="espace", description="ESPACE for Megatron models")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check-config", help="validate an ESPACE config YAML")
    p.add_argument("config")
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
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"espace {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
