"""Which layers to compress: the paper's sensitivity study and progressive application.

    torchrun --nproc_per_node=N -m megatron_espace.sensitivity \\
        --load BASELINE --data-path PREFIX --espace-config candidates.yaml \\
        --espace-projections projections.safetensors --eval-iters 32 \\
        --target-compression 0.5 --out-config espace.yaml [model and parallelism flags]

(``espace sensitivity ...`` is the same command.) Following Section 4.2 and Appendix C:

1. every layer the config selects is compressed alone, out of the box, at its rank, with
   every method in the projections file, and validation loss is measured on a fixed
   held-out set; each layer keeps its best method and the layers are ranked from least to
   most harmful;
2. ESPACE is applied cumulatively along that ranking, recording (GEMM compression, model
   size, validation perplexity) after each added layer (the paper's Figures 3 and 8);
3. a layer set is picked by rule (``--target-compression``, ``--max-ppl-increase`` or
   ``--inflection``) and written as an ESPACE config for the trainer, with a markdown
   report and the curve as a PNG.

Every measurement is cached in ``--cache`` (JSON) as soon as it is made; a rerun resumes.
The cache is keyed on the content of what the measurements depend on (:func:`fingerprint`:
the checkpoint, the projections, the evaluation set, the layers and ranks); a cache made
from other inputs is refused, naming what differs, unless ``--overwrite`` discards it.
"""

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_espace import arguments, atomic


class SensitivityStudy:
    """Out-of-the-box validation loss per (layer, method), then along the ranking.

    ``evaluate(model) -> float`` must return the same validation loss on every rank
    (collective). ``layers`` maps every selected layer of the whole model (all pipeline
    stages) to its rank; the model's own stage holds some of them. ``cache`` is a JSON path
    written by rank 0 after every measurement; it is resumed only when it holds the same
    ``fingerprint`` (else ``ValueError`` naming the fields that differ), and ignored (then
    overwritten) with ``overwrite``.
    """

    def __init__(self, model, projections, layers: Dict[str, int],
                 evaluate: Callable[[torch.nn.Module], float], cache=None,
                 fingerprint: Optional[dict] = None, overwrite: bool = False):
        from megatron_espace.surgery import as_espace_layers

        self.model, self.projections, self.layers = model, projections, dict(layers)
        self.evaluate, self.cache = evaluate, Path(cache) if cache else None
        self.local = as_espace_layers(model, list(layers))
        self.fingerprint = fingerprint or {}
        self.results = {"fingerprint": self.fingerprint, "baseline": None, "single": {},
                        "progressive": []}
        if not overwrite:
            self._load()

    # -------------------------------------------------------------- bookkeeping

    def _load(self):
        data = None
        if _rank() == 0 and self.cache and self.cache.is_file():
            data = json.loads(self.cache.read_text())
        if dist.is_initialized() and dist.get_world_size() > 1:
            box = [data]
            dist.broadcast_object_list(box, src=0)
            data = box[0]
        if data is None:
            return
        if data.get("fingerprint") != self.fingerprint:
            from megatron_espace.fingerprint import differences

            what = "; ".join(differences(data.get("fingerprint"), self.fingerprint))
            raise ValueError(f"{self.cache}: this cache belongs to another study ({what}); "
                             "pass --overwrite to measure again, or another --cache / "
                             "--out-config")
        self.results = data

    def _save(self):
        if _rank() == 0 and self.cache:
            atomic.write_json(self.cache, self.results)

    def _set(self, name: str, method: Optional[str]):
        """Give (or take away, with None) one layer's projection, on the stage that holds it."""
        from megatron_espace.surgery import install_projection

        layer = self.local.get(name)
        if layer is None:
            return
        if method is None:
            layer.set_projection(None)
        else:  # reads this rank's slice only: first L columns, its K rows if row-parallel
            install_projection(layer, self.projections, name, method, self.layers[name])

    # -------------------------------------------------------------- the study

    def run(self, progress=None) -> dict:
        """Measure everything not in the cache yet; returns the results dict."""
        if self.results["baseline"] is None:
            self.results["baseline"] = self.evaluate(self.model)
            self._save()
        methods = {n: self.projections.methods(n) for n in self.layers}
        for name in self.layers:
            done = self.results["single"].setdefault(name, {})
            for method in methods[name]:
                if method in done:
                    continue
                self._set(name, method)
                done[method] = self.evaluate(self.model)
                self._set(name, None)
                self._save()
                if progress:
                    progress(f"{name} {method}: loss {done[method]:.4f}")
        self._progressive(progress)
        return self.results

    def ranking(self) -> List[dict]:
        """Layers from least to most harmful, each with its best method and loss."""
        rows = []
        for name, losses in self.results["single"].items():
            method = min(losses, key=losses.get)
            rows.append({"layer": name, "method": method, "loss": losses[method],
                         "rank": self.layers[name]})
        return sorted(rows, key=lambda r: (r["loss"], r["layer"]))

    def _progressive(self, progress=None):
        from megatron_espace.surgery import count_parameters

        order = self.ranking()
        curve = self.results["progressive"]
        if [p["layer"] for p in curve[1:]] != [r["layer"] for r in order[:len(curve) - 1]]:
            curve.clear()  # the ranking changed (more methods measured): start again
        if not curve:
            counts = count_parameters(self.model)
            curve.append(self._point(None, None, self.results["baseline"], counts))
        for row in order[:len(curve) - 1]:  # the prefix measured before an interruption
            self._set(row["layer"], row["method"])
        for row in order[len(curve) - 1:]:
            self._set(row["layer"], row["method"])
            counts = count_parameters(self.model)
            curve.append(self._point(row["layer"], row["method"], self.evaluate(self.model),
                                     counts))
            self._save()
            if progress:
                progress(f"+{row['layer']}: loss {curve[-1]['loss']:.4f}, "
                         f"GEMM compression {curve[-1]['gemm_compression']:.1%}")
        for row in order:
            self._set(row["layer"], None)

    @staticmethod
    def _point(layer, method, loss, counts):
        dense_total = counts["total"] - counts["gemm"] + counts["gemm_dense"]
        return {"layer": layer, "method": method, "loss": loss, "ppl": math.exp(loss),
                "gemm_compression": 1 - counts["gemm"] / counts["gemm_dense"],
                "model_size": counts["total"] / dense_total}


# ------------------------------------------------------------------ choosing a layer set


def select(curve: List[dict], target_compression=None, max_ppl_increase=None,
           inflection=False) -> int:
    """How many layers of the ranking to compress (points ``curve[1:]`` add one each)."""
    if (target_compression is not None) + (max_ppl_increase is not None) + bool(inflection) != 1:
        raise ValueError("choose exactly one of --target-compression, --max-ppl-increase, "
                         "--inflection")
    if target_compression is not None:
        for n, point in enumerate(curve):
            if point["gemm_compression"] >= target_compression - 1e-12:
                return n
        raise ValueError(
            f"target compression {target_compression:.1%} is unreachable: compressing all "
            f"{len(curve) - 1} selected layers at their ranks reaches "
            f"{curve[-1]['gemm_compression']:.1%} of GEMM parameters; select more layers or "
            "lower the ranks")
    if max_ppl_increase is not None:
        limit = curve[0]["ppl"] * (1 + max_ppl_increase)
        n = 0
        while n + 1 < len(curve) and curve[n + 1]["ppl"] <= limit:
            n += 1
        return n
    return knee([p["gemm_compression"] for p in curve], [p["ppl"] for p in curve])


def knee(xs, ys) -> int:
    """The point farthest below the chord from the first to the last point (normalised axes):
    where the curve turns from flat to steep."""
    if len(xs) < 3:
        return len(xs) - 1
    x0, x1, y0, y1 = xs[0], xs[-1], min(ys), max(ys)
    nx = [(x - x0) / ((x1 - x0) or 1) for x in xs]
    ny = [(y - y0) / ((y1 - y0) or 1) for y in ys]
    chord = [ny[0] + (ny[-1] - ny[0]) * x for x in nx]
    gaps = [c - y for c, y in zip(chord, ny)]
    return max(range(len(xs)), key=lambda i: gaps[i])


def write_config(path, ranking: List[dict], count: int, methods) -> None:
    """The chosen layers as an ESPACE config the trainer consumes directly."""
    import yaml

    chosen = sorted(ranking[:count], key=lambda r: r["layer"])
    data = {"calibration": {"methods": sorted(set(methods))},
            "layers": [{"match": r["layer"], "rank": r["rank"], "method": r["method"]}
                       for r in chosen]}
    atomic.write_text(path, "# written by espace sensitivity\n" + yaml.safe_dump(
        data, sort_keys=False))


def report(results: dict, ranking: List[dict], count: int, rule: str,
           compression: Optional[Dict[str, float]] = None) -> str:
    """Markdown: per-layer scores, the progressive curve, and the chosen set.
    ``compression``: each layer's compression at its rank, ``1 − L(K+N)/(KN)``."""
    base = results["baseline"]
    methods = sorted({m for v in results["single"].values() for m in v})
    compression = compression or {}
    lines = [f"# ESPACE sensitivity\n\nbaseline validation loss {base:.4f} "
             f"(perplexity {math.exp(base):.3f})\n",
             "## Each layer alone, out of the box (validation perplexity)\n",
             "| rank by harm | layer | L | layer compression | " + " | ".join(methods)
             + " | best |",
             "|---|---|---|---|" + "---|" * (len(methods) + 1)]
    for i, r in enumerate(ranking):
        cells = " | ".join(f"{math.exp(results['single'][r['layer']][m]):.3f}"
                           if m in results["single"][r["layer"]] else "" for m in methods)
        reached = (f"{compression[r['layer']]:.1%}" if r["layer"] in compression else "")
        lines.append(f"| {i + 1} | {r['layer']} | {r['rank']} | {reached} | {cells} | "
                     f"{r['method']} |")
    lines += ["\n## Progressive application along the ranking\n",
              "| layers | added | method | GEMM compression | model size | perplexity |",
              "|---|---|---|---|---|---|"]
    for n, p in enumerate(results["progressive"]):
        mark = " **chosen**" if n == count else ""
        lines.append(f"| {n} | {p['layer'] or '(baseline)'} | {p['method'] or ''} | "
                     f"{p['gemm_compression']:.1%} | {p['model_size']:.1%} | "
                     f"{p['ppl']:.3f}{mark} |")
    if "weight_svd" in methods and len(methods) > 1:
        wins = sum(min(v for m, v in results["single"][r["layer"]].items() if m != "weight_svd")
                   < results["single"][r["layer"]].get("weight_svd", math.inf) for r in ranking)
        lines.append(f"\nESPACE (best activation-side method) beats the weight-side truncated SVD "
                     f"at the same rank on {wins} of {len(ranking)} layers.")
    p = results["progressive"][count]
    lines.append(f"\nChosen by {rule}: {count} layers, GEMM compression "
                 f"{p['gemm_compression']:.1%}, model size {p['model_size']:.1%}, perplexity "
                 f"{p['ppl']:.3f} ({p['ppl'] / math.exp(base) - 1:+.2%} over the baseline).")
    return "\n".join(lines) + "\n"


def plot(results: dict, count: int, path) -> None:
    """Validation perplexity against GEMM compression along the ranking (paper Fig. 3/8)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = results["progressive"]
    xs = [100 * p["gemm_compression"] for p in curve]
    ys = [p["ppl"] for p in curve]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(xs, ys, "o-", ms=3, lw=1, label="ESPACE, out of the box, progressive")
    ax.axhline(ys[0], color="gray", ls="--", lw=1, label="baseline")
    ax.scatter([xs[count]], [ys[count]], s=60, facecolors="none", edgecolors="C3", zorder=3,
               label=f"chosen: {count} layers")
    ax.set_xlabel("compression of GEMM parameters (%)")
    ax.set_ylabel("validation perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic.savefig(fig, path, dpi=120)
    plt.close(fig)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


# ------------------------------------------------------------------ the command


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="espace sensitivity", description=__doc__.split("\n\n")[0])
    arguments.add_model_args(p)
    arguments.add_parallel_args(p)
    arguments.add_data_args(p)
    arguments.add_checkpoint_args(p)
    g = p.add_argument_group("sensitivity")
    g.add_argument("--espace-config", required=True,
                   help="which layers are candidates, at which rank or compression")
    g.add_argument("--espace-projections", required=True)
    g.add_argument("--eval-iters", type=int, default=32,
                   help="validation micro-batches per data-parallel rank")
    g.add_argument("--layer-compression", type=float, default=None,
                   help="override the config's ranks: per layer the largest L reaching this "
                        "compression, a multiple of the config's rank_multiple")
    g.add_argument("--cache", default=None, help="JSON of measurements (default: OUT.json)")
    g.add_argument("--overwrite", action="store_true",
                   help="discard a --cache made from other inputs instead of refusing it")
    g.add_argument("--out-config", required=True, help="the ESPACE config YAML to write")
    rule = g.add_mutually_exclusive_group(required=True)
    rule.add_argument("--target-compression", type=float)
    rule.add_argument("--max-ppl-increase", type=float)
    rule.add_argument("--inflection", action="store_true")
    args = arguments.parse_args(p, argv)
    if args.load is None:
        p.error("--load is required: the study runs on the trained baseline")
    args.hidden_dropout = args.attention_dropout = 0.0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import megatron_espace as espace
    from megatron.core import parallel_state

    from megatron_espace import runtime
    from megatron_espace.data import batch_iterator, build_datasets
    from megatron_espace.projection import layer_compression, rank_for_compression

    cfg = espace.ESPACEConfig.from_yaml(args.espace_config)
    projections = espace.Projections.load(args.espace_projections)
    runtime.initialize(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                       seed=args.seed)
    tokenizer = arguments.tokenizer(args)
    model = arguments.build_model(args, tokenizer.vocab_size)
    arguments.load_model(model, args.load)
    model.eval()
    dp, dp_rank = (parallel_state.get_data_parallel_world_size(),
                   parallel_state.get_data_parallel_rank())
    samples = args.eval_iters * args.micro_batch_size * dp
    _, valid, _ = build_datasets(args.data_path, seq_length=args.seq_length, split=args.split,
                                 num_samples=(None, samples, None), tokenizer=tokenizer,
                                 seed=args.seed, path_to_cache=args.data_cache_path)
    if valid is None or len(valid) < samples:
        raise SystemExit(f"--data-path {' '.join(args.data_path)} --split {args.split}: the "
                         f"validation split holds {0 if valid is None else len(valid)} samples, "
                         f"{samples} are needed (--eval-iters x micro-batch x DP)")
    micro = list(batch_iterator(valid, args.micro_batch_size, dp_rank=dp_rank,
                                dp_size=dp))[:args.eval_iters]

    plans = espace.plan_espace(model, cfg, projections)
    from megatron_espace.surgery import check_fits

    for name, plan in plans.items():
        for method in projections.methods(name):
            check_fits(projections, name, dataclasses.replace(plan, method=method))
    local = {n: (rank_for_compression(p.K, p.N, args.layer_compression, cfg.rank_multiple)
                 if args.layer_compression else p.rank, p.K, p.N) for n, p in plans.items()}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    shapes = {k: v for part in gathered for k, v in part.items()}
    layers = {k: rank for k, (rank, _, _) in shapes.items()}
    compression = {k: layer_compression(kk, n, rank) for k, (rank, kk, n) in shapes.items()}
    missing = [n for n in layers if n not in projections.layers()]
    if missing:
        raise SystemExit(f"{args.espace_projections}: no projections for {missing[:3]} "
                         f"(the file has {projections.layers()[:3]}...): made for another model?")
    try:
        study = SensitivityStudy(
            model, projections, layers, lambda m: evaluate(m, micro, args),
            cache=args.cache or f"{args.out_config}.json", overwrite=args.overwrite,
            fingerprint=fingerprint(args, layers, samples, tokenizer.vocab_size))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    rank0 = dist.get_rank() == 0
    results = study.run(progress=print if rank0 else None)
    ranking = study.ranking()
    rule = ("--inflection" if args.inflection else
            f"--target-compression {args.target_compression}" if args.target_compression
            is not None else f"--max-ppl-increase {args.max_ppl_increase}")
    count = select(results["progressive"], args.target_compression, args.max_ppl_increase,
                   args.inflection)
    if rank0:
        write_config(args.out_config, ranking, count, projections.methods(ranking[0]["layer"]))
        text = report(results, ranking, count, rule, compression)
        atomic.write_text(Path(args.out_config).with_suffix(".md"), text)
        plot(results, count, Path(args.out_config).with_suffix(".png"))
        print(text)
        print(f"wrote {args.out_config} (+ .md, .png)")
    runtime.destroy()
    return 0


def fingerprint(args, layers: Dict[str, int], samples: int, vocab_size: int) -> dict:
    """What the study's measurements depend on, by content: the checkpoint (path, iteration,
    metadata digest), the projections file (digest of the file, or of its index and parts),
    the evaluation set (each prefix's ``.idx`` digest and ``.bin`` size, split, sequence
    length, sample count, seed) and the layers with their ranks."""
    from megatron_espace import fingerprint as fp
    from megatron_espace.data import parse_data_path

    prefixes, weights = parse_data_path(args.data_path)
    return {"checkpoint": fp.checkpoint(arguments.checkpoint_dir(args.load)),
            "projections": {"path": str(Path(args.espace_projections).resolve()),
                            "content": fp.content_digest(args.espace_projections)},
            "data": {"prefixes": {str(i): fp.dataset(p) for i, p in enumerate(prefixes)},
                     "weights": weights, "split": args.split, "seq_length": args.seq_length,
                     "samples": samples, "seed": args.seed, "vocab_size": vocab_size},
            "layers": dict(sorted(layers.items()))}


@torch.no_grad()
def evaluate(model, micro, args) -> float:
    """Mean validation loss over the micro-batches of every DP rank (same on every rank)."""
    from megatron_espace.schedule import run_microbatches

    return run_microbatches(model, micro, args.seq_length, args.micro_batch_size,
                            forward_only=True)


if __name__ == "__main__":
    from megatron_espace.runtime import run_main

    sys.exit(run_main(main))
