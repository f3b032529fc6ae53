"""The calibration command: statistics of a baseline checkpoint on your data -> projections.

    torchrun --nproc_per_node=N -m megatron_espace.calibrate \\
        --load CKPT --data-path PREFIX --espace-config cfg.yaml --calib-samples 512 \\
        --out projections.safetensors  [model and parallelism flags as for Megatron-LM]

(``espace calibrate ...`` is the same command.) Each data-parallel rank takes its own
calibration sequences; tensor and pipeline parallelism follow the flags. The run starts by
printing its memory plan (``--dry-run`` prints only that, from the flags alone; add
``--world-size N`` and ``--vocab-size N``, no data or checkpoint needed). Each rank saves
its share of the statistics every ``--save-interval`` samples under ``--statistics-dir``
(default ``OUT.stats/``); a rerun of the same command resumes from them with the same
result, a different one (checkpoint, data, methods, lengths, layout, fewer samples) is
refused unless ``--overwrite``. Each rank writes its part of the projections file, rank 0
the index, a per-layer summary and a PNG of the eigenvalue spectra.
"""

import argparse
import json
import math
import shutil
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
    for action in p._actions:  # --dry-run needs no data; checked below otherwise
        if action.dest == "data_path":
            action.required = False
    g = p.add_argument_group("calibration")
    g.add_argument("--espace-config", required=True)
    g.add_argument("--calib-samples", type=int, default=512,
                   help="calibration sequences over all data-parallel ranks (paper: 512)")
    g.add_argument("--out", help="the projections file to write")
    g.add_argument("--statistics-dir", default=None,
                   help="where partial statistics go for resuming (default: OUT.stats/)")
    g.add_argument("--save-interval", type=int, default=128,
                   help="save statistics every this many samples")
    g.add_argument("--max-rank", type=int, default=None,
                   help="eigenvectors kept per layer and method (default: the layer's rank in "
                   "the config, at most K·N/(K+N))")
    g.add_argument("--calib-memory-gib", type=float, default=None,
                   help="statistics budget per GPU in GiB (default: calibration.max_device_gib "
                   "of the config, else unbounded); more passes over the data when exceeded")
    g.add_argument("--calib-flush-interval", type=int, default=8,
                   help="micro-batches summed in float32 on the device before the float64 "
                   "host sums take them")
    g.add_argument("--overwrite", action="store_true",
                   help="discard statistics saved by an earlier run instead of resuming")
    g = p.add_argument_group("memory plan")
    g.add_argument("--dry-run", action="store_true",
                   help="print the memory plan from the flags alone (one CPU process, no data, "
                   "tokenizer or checkpoint) and exit")
    g.add_argument("--json", action="store_true", help="with --dry-run: one JSON object")
    g.add_argument("--world-size", type=int, default=None,
                   help="with --dry-run: the number of GPUs (default TP x PP)")
    args = arguments.parse_args(p, argv)
    if not args.dry_run:
        for flag, value in (("--data-path", args.data_path), ("--out", args.out)):
            if value is None:
                p.error(f"{flag} is required (unless --dry-run)")
        if args.load is None:
            p.error("--load is required: calibration runs on a trained baseline checkpoint")
    if args.calib_memory_gib is not None and not args.calib_memory_gib > 0:
        p.error(f"--calib-memory-gib must be positive, got {args.calib_memory_gib}")
    if args.calib_flush_interval < 1:
        p.error(f"--calib-flush-interval must be >= 1, got {args.calib_flush_interval}")
    args.hidden_dropout = args.attention_dropout = 0.0  # calibration sees the deterministic model
    return args


def memory_plan(args, cfg):
    """The plan of ``args``' model, layout and config, from shapes alone (no Megatron)."""
    from megatron_espace.calibration_plan import GIB, Layer, gpt_layers, make_plan
    from megatron_espace.projection import rank_for_compression

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    world = args.world_size or tp * pp
    if world % (tp * pp) or args.num_layers % pp:
        raise SystemExit(f"--world-size {world} is not a multiple of TP x PP = {tp * pp}, or "
                         f"--num-layers {args.num_layers} does not split over PP={pp}")
    heads = args.num_attention_heads
    layers = []
    for name, kind, k, n, stage in gpt_layers(
            args.num_layers, args.hidden_size, args.ffn_hidden_size or 4 * args.hidden_size,
            heads, args.num_query_groups if args.group_query_attention else heads,
            args.kv_channels or args.hidden_size // heads, args.swiglu, pp):
        rule = cfg.rule_for(name)
        if rule is not None:
            rank = rule.rank or rank_for_compression(k, n, rule.compression, cfg.rank_multiple)
            layers.append(Layer(name, kind, k, n, stage, rank))
    gib = args.calib_memory_gib or cfg.calibration.max_device_gib
    elem = 8 if cfg.calibration.dtype == "float64" else 4  # bf16 and float32 models
    return make_plan(layers, cfg.calibration.methods, tp, pp, world // (tp * pp), elem,
                     None if gib is None else int(gib * GIB), args.max_rank)


def run_key(args, checkpoint_dir, plan) -> dict:
    """What the statistics depend on: checkpoint, data, methods, lengths, layout, passes."""
    from megatron_espace import fingerprint

    prefixes = [p for p in args.data_path if not _is_number(p)]
    return {"format": "calibration-statistics-2",
            "checkpoint": fingerprint.checkpoint(checkpoint_dir),
            "data": {"prefixes": [fingerprint.dataset(p) for p in prefixes],
                     "data_path": list(args.data_path), "split": args.split, "seed": args.seed},
            "methods": list(plan.methods), "seq_length": args.seq_length,
            "calib_samples": args.calib_samples,
            "layers": [[lay.name, lay.K, lay.N] for lay in plan.layers],
            "layout": {"tensor_model_parallel_size": plan.tp,
                       "pipeline_model_parallel_size": plan.pp, "data_parallel_size": plan.dp,
                       "sequence_parallel": bool(args.sequence_parallel),
                       "micro_batch_size": args.micro_batch_size},
            "passes": {"budget_bytes": plan.budget, "element_bytes": plan.elem,
                       "moments": ["+".join(p.moments) for p in plan.passes]}}


def _is_number(text) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def main(argv=None) -> int:
    args = parse_args(argv)
    import megatron_espace as espace

    cfg = espace.ESPACEConfig.from_yaml(args.espace_config)  # fail before any process group
    if args.dry_run:
        try:
            plan = memory_plan(args, cfg)
        except ValueError as e:
            raise SystemExit(f"{args.espace_config}: {e}") from None
        print(json.dumps(plan.summary()) if args.json else plan.describe())
        return 0

    from megatron.core import parallel_state

    from megatron_espace import runtime
    from megatron_espace.calibration import CalibrationStatistics, StaleStatistics
    from megatron_espace.data import batch_iterator, build_datasets

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
    stats = CalibrationStatistics.build(
        model, cfg, args.calib_memory_gib, args.calib_flush_interval, args.max_rank,
        data=f"{' '.join(args.data_path)} split {args.split}")
    key = [run_key(args, ckpt, stats.plan) if rank0 else None]
    dist.broadcast_object_list(key, src=0)
    key = key[0]
    if rank0:
        print(stats.plan.describe())

    stats_dir = Path(args.statistics_dir or f"{args.out}.stats")
    if args.overwrite and rank0 and stats_dir.exists():
        shutil.rmtree(stats_dir)
    dist.barrier()
    if any(stats_dir.glob("statistics-pp*.safetensors")):
        raise SystemExit(f"{stats_dir}: statistics of an earlier version of this tool, which "
                         "cannot be resumed; pass --overwrite to calibrate again from scratch")
    if any(stats_dir.glob("rank*.safetensors")):
        try:
            stats.load(stats_dir, key)
            error = None
        except StaleStatistics as e:
            error = str(e)
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
        if error:
            raise SystemExit(f"{error}. Pass --overwrite to discard them, or choose a fresh "
                             "--out (or --statistics-dir)")
        if rank0:
            print(f"resuming from {stats_dir}: {stats.done} of {args.calib_samples} samples "
                  "done per pass")

    step = args.micro_batch_size * dp
    total = args.calib_samples - args.calib_samples % step
    if total == 0:
        raise SystemExit(f"--calib-samples {args.calib_samples} is smaller than one global "
                         f"batch (micro-batch {args.micro_batch_size} x DP {dp})")
    from tqdm import tqdm

    passes = stats.plan.passes
    bar = tqdm(total=total * len(passes), initial=sum(stats.done), unit="seq",
               disable=not rank0, file=sys.stderr, desc="calibrating")
    start, seen = time.monotonic(), 0
    for p, ps in enumerate(passes):
        while stats.done[p] < total:
            chunk = min(args.save_interval - args.save_interval % step or step,
                        total - stats.done[p])
            micro = _take(batch_iterator(train, args.micro_batch_size, start=stats.done[p],
                                         dp_rank=dp_rank, dp_size=dp), chunk // step)
            stats.accumulate(lambda m: _forward(m, micro, ps.backward, args), p)
            model.zero_grad(set_to_none=True)
            stats.done[p] += chunk
            stats.save(stats_dir, key)
            seen += chunk
            bar.update(chunk)
            bar.set_postfix(tok_s=f"{seen * args.seq_length / (time.monotonic() - start):.0f}",
                            p=f"{p + 1}/{len(passes)}")
    bar.close()

    held = [None] * dist.get_world_size()  # what the run held, against the plan printed
    dist.all_gather_object(held, [stats.peak_device_bytes, sum(
        s.host.nbytes for s in stats.sums.values()), _tensor_bytes(stats.shard_path(stats_dir))])
    memory = {"device_bytes_per_gpu": max(h[0] for h in held),
              "host_bytes_per_rank": max(h[1] for h in held), "passes": len(passes),
              "resume_bytes_per_rank": max(h[2] for h in held)}
    info = {"checkpoint": key["checkpoint"], "samples": total, "seq_length": args.seq_length,
            "data_fingerprint": key["data"], "memory": memory}
    projections = stats.projections(args.out, info=info)
    if rank0:
        print(summary(projections))
        spectra_plot(projections, Path(args.out).with_suffix(".png"))
        print(f"wrote {args.out} and {Path(args.out).with_suffix('.png')}")
    runtime.destroy()
    return 0


def _tensor_bytes(path) -> int:
    """Bytes of the (float64) tensors in a resume shard (0 when there is none)."""
    from safetensors import safe_open

    if not Path(path).is_file():
        return 0
    with safe_open(str(path), framework="pt") as f:
        return sum(8 * math.prod(f.get_slice(k).get_shape()) for k in f.keys())


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
            vals = projections.eigenvalues(layer, method)
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
            vals = projections.eigenvalues(layer, method).abs()
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
