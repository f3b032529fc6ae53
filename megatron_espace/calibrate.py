"""The calibration command: statistics of a baseline checkpoint on your data -> projections.

    torchrun --nproc_per_node=N -m megatron_espace.calibrate \\
        --load CKPT --data-path PREFIX --espace-config cfg.yaml --calib-samples 512 \\
        --out projections.safetensors  [model and parallelism flags as for Megatron-LM]

(``espace calibrate ...`` is the same command.) Each data-parallel rank takes its own
calibration sequences; tensor and pipeline parallelism follow the flags. Statistics are
saved every ``--save-interval`` samples under ``--statistics-dir`` (default: next to
``--out``) and an interrupted run resumes from them with the same result. Rank 0 writes
the projections file, a per-layer summary and a PNG of the eigenvalue spectra.
"""

import argparse
import sys
import time
import types
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_espace import arguments, atomic


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="espace calibrate", description=__doc__.split("\n\n")[0])
    arguments.add_model_args(p)
    arguments.add_parallel_args(p)
    arguments.add_data_args(p)
    arguments.add_checkpoint_args(p)
    g = p.add_argument_group("calibration")
    g.add_argument("--espace-config", required=True)
    g.add_argument("--calib-samples", type=int, default=512,
                   help="calibration sequences over all data-parallel ranks (paper: 512)")
    g.add_argument("--out", required=True, help="the projections file to write")
    g.add_argument("--statistics-dir", default=None,
                   help="where partial statistics go for resuming (default: OUT.stats/)")
    g.add_argument("--save-interval", type=int, default=128,
                   help="save statistics every this many samples")
    g.add_argument("--max-rank", type=int, default=None,
                   help="keep only this many eigenvectors per layer and method in the file")
    args = p.parse_args(argv)
    if args.load is None:
        p.error("--load is required: calibration runs on a trained baseline checkpoint")
    args.hidden_dropout = args.attention_dropout = 0.0  # calibration sees the deterministic model
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron.core import parallel_state

    import megatron_espace as espace
    from megatron_espace import runtime
    from megatron_espace.calibration import CalibrationStatistics
    from megatron_espace.data import batch_iterator, build_datasets
    from megatron_espace.statistics import NEEDS

    cfg = espace.ESPACEConfig.from_yaml(args.espace_config)  # fail before any process group
    runtime.initialize(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                       seed=args.seed)
    rank0 = dist.get_rank() == 0
    tokenizer = arguments.tokenizer(args)
    model = arguments.build_model(args, tokenizer.vocab_size)
    ckpt = arguments.load_model(model, args.load)
    dp, dp_rank = (parallel_state.get_data_parallel_world_size(),
                   parallel_state.get_data_parallel_rank())
    train, _, _ = build_datasets(args.data_path, seq_length=args.seq_length, split=args.split,
                                 num_samples=(args.calib_samples, None, None),
                                 tokenizer=tokenizer, seed=args.seed,
                                 path_to_cache=args.data_cache_path)
    needs_grad = any(k in ("nl", "nln") for m in cfg.calibration.methods for k in NEEDS[m])

    stats_dir = Path(args.statistics_dir or f"{args.out}.stats")
    done, stats = 0, None
    if any(stats_dir.glob("statistics-pp*.safetensors")):
        # the sample count is saved in the same file as the sums: they cannot disagree
        stats = CalibrationStatistics.load(stats_dir)
        done = stats.samples
        seen = [None] * dist.get_world_size()
        dist.all_gather_object(seen, done)
        if len(set(seen)) > 1:
            raise SystemExit(f"{stats_dir}: the pipeline stages' statistics stopped at "
                             f"different points ({sorted(set(seen))} samples); remove the "
                             "directory and calibrate again")
        if rank0:
            print(f"resuming from {stats_dir}: {done} of {args.calib_samples} samples done")

    step = args.micro_batch_size * dp
    total = args.calib_samples - args.calib_samples % step
    if total == 0:
        raise SystemExit(f"--calib-samples {args.calib_samples} is smaller than one global "
                         f"batch (micro-batch {args.micro_batch_size} x DP {dp})")
    from tqdm import tqdm

    bar = tqdm(total=total, initial=done, unit="seq", disable=not rank0, file=sys.stderr,
               desc="calibrating")
    start = time.monotonic()
    while done < total:
        chunk = min(args.save_interval - args.save_interval % step or step, total - done)
        micro = _take(batch_iterator(train, args.micro_batch_size, start=done,
                                     dp_rank=dp_rank, dp_size=dp), chunk // step)
        stats = espace.calibrate(model, lambda m: _forward(m, micro, needs_grad, args), cfg,
                                 statistics=stats, data=f"{args.data_path} split {args.split}")
        model.zero_grad(set_to_none=True)
        done += chunk
        stats.samples = done
        stats.save(stats_dir)
        bar.update(chunk)
        bar.set_postfix(tok_s=f"{(done * args.seq_length) / (time.monotonic() - start):.0f}")
    bar.close()

    projections = stats.projections(max_rank=args.max_rank)
    projections.info.update(checkpoint=str(ckpt), samples=total, seq_length=args.seq_length)
    if rank0:
        projections.save(args.out)
        print(summary(projections))
        spectra_plot(projections, Path(args.out).with_suffix(".png"))
        print(f"wrote {args.out} and {Path(args.out).with_suffix('.png')}")
    runtime.destroy()
    return 0


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _forward(model, micro, needs_grad, args):
    """The calibration micro-batches through the schedule (backward for gradient statistics)."""
    from megatron_espace.schedule import run_microbatches

    with torch.enable_grad() if needs_grad else torch.no_grad():
        run_microbatches(model, micro, args.seq_length, args.micro_batch_size,
                         forward_only=not needs_grad, per_microbatch=True)


def summary(projections, fractions=(1 / 8, 1 / 4, 1 / 2)) -> str:
    """A markdown table: per layer and method, K, tokens and the energy kept at L = f·K."""
    from megatron_espace.projection import energy_kept

    info = projections.info.get("layers", {})
    head = " | ".join(f"E(K/{round(1 / f)})" for f in fractions)
    lines = [f"| layer | method | K | tokens | {head} |",
             "|---|---|---|---|" + "---|" * len(fractions)]
    for layer in projections.layers():
        for method in projections.methods(layer):
            vecs, vals = projections.eigen(layer, method)
            k = vals.shape[0]
            cells = " | ".join(f"{energy_kept(vals, max(1, int(f * k))):.3f}" for f in fractions)
            lines.append(f"| {layer} | {method} | {k} | {info.get(layer, {}).get('tokens', '')} "
                         f"| {cells} |")
    return "\n".join(lines)


def spectra_plot(projections, path: Path) -> None:
    """Cumulative |eigenvalue| share against L/K: one panel per method, one line per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({m for layer in projections.layers() for m in projections.methods(layer)})
    cols = min(3, len(methods))
    rows = -(-len(methods) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    kinds = {"linear_qkv": "C0", "linear_proj": "C1", "linear_fc1": "C2", "linear_fc2": "C3"}
    for ax, method in zip(axes.flat, methods):
        for layer in projections.layers():
            if method not in projections.methods(layer):
                continue
            vals = projections.eigen(layer, method)[1].abs()
            share = torch.cumsum(vals, 0) / vals.sum().clamp_min(1e-300)
            color = next((c for k, c in kinds.items() if layer.endswith(k)), "C7")
            ax.plot(torch.linspace(0, 1, len(vals) + 1)[1:], share, color=color, lw=0.8,
                    alpha=0.8)
        ax.set_title(method)
        ax.set_xlabel("L / K")
        ax.set_ylabel("energy kept")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=c, label=k) for k, c in kinds.items()]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    atomic.savefig(fig, path, dpi=110)
    plt.close(fig)


class _CallableModule(types.ModuleType):
    """Importing this module makes Python set ``megatron_espace.calibrate`` to it, shadowing
    the function ``espace.calibrate``; being callable as that function keeps both working."""

    def __call__(self, *args, **kwargs):
        from megatron_espace.calibration import calibrate

        return calibrate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    from megatron_espace.runtime import run_main

    sys.exit(run_main(main))
