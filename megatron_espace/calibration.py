"""Calibration on a megatron-core model: hooks, distributed reduction, distributed eigh.

``stats = calibrate(model, forward_loop, cfg)`` hooks every linear the config selects,
runs ``forward_loop(model)`` (which also calls backward when a gradient statistic is
asked for) and returns :class:`CalibrationStatistics` reduced across ranks:

* **TP**: every layer's statistic is taken over the full K. Column-parallel inputs are
  full already (all-gathered along the sequence under sequence parallelism); row-parallel
  inputs and their gradients are all-gathered along K. The TP ranks then split the
  sequences of each micro-batch between them and the sums are all-reduced, so each token
  is counted once and no rank does all the work.
* **DP**: sums and counts are all-reduced across the data-parallel group.
* **PP**: layers are named by global layer number; each stage holds its own layers.

Forward statistics are skipped for forwards run inside a backward pass (activation
recomputation), and gradient statistics are taken by a hook on the input tensor that is
actually differentiated, so nothing is counted twice.

``stats.projections()`` eigendecomposes every (layer, method) in float64 on one rank of
the layer's stage, spreading the work over all ranks, and broadcasts the result, so every
rank holds bit-identical projections. The math lives in :mod:`statistics` and
:mod:`projection`; this module only moves tensors.
"""

import json
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import _gather_along_first_dim, _gather_along_last_dim

from megatron_espace.config import ESPACEConfig
from megatron_espace.projection import Projections, sorted_eigh
from megatron_espace.runtime import device
from megatron_espace.statistics import (
    NEEDS, GradientCrossMoment, Moment, SecondMoment, accumulator_dtype, method_matrix,
    weight_moment)
from megatron_espace.surgery import linear_layers, plan_espace

FORWARD_KEYS = ("x", "xn")
GRADIENT_KEYS = ("nl", "nln")
WEIGHT_KEYS = ("w", "wn")


class LayerStatistics:
    """One layer's accumulated moments (sum + count), weight moments and skip counts."""

    def __init__(self, kind: str, k: int, n: int, keys, dtype, device=None):
        self.kind, self.K, self.N = kind, k, n
        self.moments: Dict[str, Moment] = {}
        for key in keys:
            if key in ("x", "xn"):
                self.moments[key] = SecondMoment(k, key == "xn", dtype, device)
            elif key in ("nl", "nln"):
                self.moments[key] = GradientCrossMoment(k, key == "nln", dtype, device)
        self.weights: Dict[str, torch.Tensor] = {}
        self.updates = 0
        self.skipped = 0

    def means(self) -> Dict[str, torch.Tensor]:
        out = {key: m.mean().to(torch.float64) for key, m in self.moments.items()}
        out.update({key: w.to(torch.float64) for key, w in self.weights.items()})
        return out

    @property
    def tokens(self) -> int:
        return max((m.count for k, m in self.moments.items() if k in FORWARD_KEYS), default=0)


class CalibrationStatistics:
    """The statistics of this pipeline stage's selected layers, reduced over TP and DP."""

    def __init__(self, methods, data: str = ""):
        self.methods = tuple(methods)
        self.layers: Dict[str, LayerStatistics] = {}
        self.data = data
        self.samples = 0  # calibration sequences consumed so far (for resuming)

    def matrix(self, layer: str, method: str):
        """The K×K matrix of ``method`` for ``layer`` (float64) and whether to rank by |λ|."""
        return method_matrix(method, self.layers[layer].means())

    def add(self, other: "CalibrationStatistics") -> None:
        """Add another (reduced) run's sums and counts into this one (resuming)."""
        for name, theirs in other.layers.items():
            mine = self.layers.setdefault(name, theirs)
            if mine is theirs:
                continue
            for key, m in theirs.moments.items():
                mine.moments[key].sum += m.sum
                mine.moments[key].count += m.count
            mine.weights = theirs.weights  # the weights as of the latest run
            mine.updates += theirs.updates
            mine.skipped += theirs.skipped

    # ------------------------------------------------------------------ projections

    def projections(self, max_rank: Optional[int] = None) -> Projections:
        """Float64 eigendecomposition of every (layer, method), spread over all ranks.

        Collective over the world: every rank returns the same :class:`Projections`
        (bit-identical: each result is computed once and broadcast).
        """
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        pp_rank = parallel_state.get_pipeline_model_parallel_rank() if world > 1 else 0
        mine = sorted((n, m, s.K) for n, s in self.layers.items() for m in self.methods)
        reports = [(rank, pp_rank, mine, self._layer_info())]
        if world > 1:
            reports = [None] * world
            dist.all_gather_object(reports, (rank, pp_rank, mine, self._layer_info()))
        stages: Dict[int, list] = {}
        items, info = {}, {}
        for r, p, its, inf in reports:
            stages.setdefault(p, []).append(r)
            items[p] = its
            info.update(inf)
        plan = []  # (name, method, K, kept columns, owner), in one global order
        for p in sorted(items):
            owners = sorted(stages[p])
            plan += [(n, m, k, k if max_rank is None else min(k, max_rank),
                      owners[i % len(owners)]) for i, (n, m, k) in enumerate(items[p])]
        results = {}
        for name, method, k, keep, owner in plan:  # first every rank decomposes its share...
            if rank == owner:
                vecs, vals = sorted_eigh(*self.matrix(name, method))
                results[name, method] = vecs[:, :keep].contiguous(), vals
        out = Projections()
        for name, method, k, keep, owner in plan:  # ...then the results are broadcast
            vecs, vals = results.get((name, method)) or (
                torch.empty(k, keep, dtype=torch.float64), torch.empty(k, dtype=torch.float64))
            if world > 1:
                vecs, vals = vecs.to(device()), vals.to(device())
                dist.broadcast(vecs, src=owner)
                dist.broadcast(vals, src=owner)
            out.add(name, method, vecs.cpu(), vals.cpu())
        out.info = {"layers": info, "data": self.data,
                    "tensor_model_parallel_size": _tp_size(),
                    "pipeline_model_parallel_size": _pp_size()}
        return out

    def _layer_info(self):
        return {n: {"kind": s.kind, "K": s.K, "N": s.N, "tokens": s.tokens,
                    "sequences": max((m.count for k, m in s.moments.items()
                                      if k in GRADIENT_KEYS), default=0),
                    "skipped_batches": s.skipped}
                for n, s in self.layers.items()}

    # ------------------------------------------------------------------ files

    def save(self, directory) -> None:
        """Write this stage's statistics (safetensors + JSON) under ``directory``, atomically.

        One file per pipeline stage, written by its first TP/DP rank; collective.
        """
        from megatron_espace.atomic import save_safetensors

        directory = Path(directory)
        if _is_stage_writer():
            directory.mkdir(parents=True, exist_ok=True)
            tensors, meta = {}, {}
            for name, s in self.layers.items():
                for key, m in s.moments.items():
                    tensors[f"{name}::{key}"] = m.sum.cpu().contiguous()
                for key, w in s.weights.items():
                    tensors[f"{name}::{key}"] = w.cpu().contiguous()
                meta[name] = {"kind": s.kind, "K": s.K, "N": s.N, "updates": s.updates,
                              "skipped": s.skipped,
                              "counts": {k: m.count for k, m in s.moments.items()},
                              "weights": sorted(s.weights)}
            path = directory / f"statistics-pp{_pp_rank()}.safetensors"
            save_safetensors(path, tensors, metadata={
                "format": "megatron-espace-statistics", "methods": json.dumps(self.methods),
                "data": self.data, "samples": str(self.samples), "layers": json.dumps(meta)})
        if dist.is_initialized():
            dist.barrier()

    @classmethod
    def load(cls, directory) -> "CalibrationStatistics":
        """Read this rank's pipeline stage's statistics written by :meth:`save`."""
        from safetensors import safe_open

        path = Path(directory) / f"statistics-pp{_pp_rank()}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: calibration statistics not found")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "megatron-espace-statistics":
                raise ValueError(f"{path}: not an ESPACE statistics file")
            out = cls(json.loads(meta["methods"]), meta.get("data", ""))
            out.samples = int(meta.get("samples", 0))
            for name, m in json.loads(meta["layers"]).items():
                keys = list(m["counts"])
                s = LayerStatistics(m["kind"], m["K"], m["N"], keys,
                                    f.get_tensor(f"{name}::{keys[0]}").dtype if keys
                                    else torch.float64)
                for key in keys:
                    s.moments[key].sum = f.get_tensor(f"{name}::{key}")
                    s.moments[key].count = m["counts"][key]
                s.weights = {key: f.get_tensor(f"{name}::{key}") for key in m["weights"]}
                s.updates, s.skipped = m["updates"], m["skipped"]
                out.layers[name] = s
        return out


# ---------------------------------------------------------------------- the hooks


class _Tap:
    """Forward pre-hook (and input-gradient hook) feeding one layer's local moments."""

    def __init__(self, module, stats: LayerStatistics):
        self.module, self.stats = module, stats
        self.forward_keys = [k for k in stats.moments if k in FORWARD_KEYS]
        self.gradient_keys = [k for k in stats.moments if k in GRADIENT_KEYS]
        self.tp_group = module.tp_group
        self.tp = 1 if self.tp_group is None else self.tp_group.size()
        self.tp_rank = 0 if self.tp == 1 else self.tp_group.rank()

    def full(self, t: torch.Tensor) -> torch.Tensor:
        """The layer input (or its gradient) with the full sequence and all K: [s, b, K]."""
        if self.tp == 1:
            return t
        if self.stats.kind == "column":
            if self.module.sequence_parallel:
                return _gather_along_first_dim(t.contiguous(), self.tp_group)
            return t
        if self.module.input_is_parallel:
            return _gather_along_last_dim(t.contiguous(), self.tp_group)
        return t

    def share(self, t: torch.Tensor) -> torch.Tensor:
        """This TP rank's sequences of a full ``[s, b, K]`` tensor."""
        return t if self.tp == 1 else t[:, self.tp_rank::self.tp]

    def __call__(self, module, args):
        x = args[0]
        if self.forward_keys and torch._C._current_graph_task_id() == -1:  # not a recompute
            xs = self.share(self.full(x.detach()))
            self._count([self.stats.moments[k].update(xs) for k in self.forward_keys])
        if self.gradient_keys and x.requires_grad:
            x.register_hook(lambda g, x=x.detach(): self._on_grad(x, g))

    def _on_grad(self, x, g):
        xs, gs = self.share(self.full(x)), self.share(self.full(g.detach()))
        self._count([self.stats.moments[k].update(xs, gs) for k in self.gradient_keys])

    def _count(self, accepted) -> None:
        """One batch seen; skipped if any of its statistics met a NaN/Inf."""
        self.stats.updates += 1
        self.stats.skipped += not all(accepted)


def calibrate(model: torch.nn.Module, forward_loop: Callable[[torch.nn.Module], None],
              cfg: ESPACEConfig, statistics: Optional[CalibrationStatistics] = None,
              data: str = "") -> CalibrationStatistics:
    """Accumulate the config's statistics for the layers it selects while ``forward_loop`` runs.

    ``forward_loop(model)`` runs the calibration batches (and backward, for ``nl_mse*``).
    Hooks are removed afterwards, even on error. Returns the statistics reduced across TP
    and DP (collective); with ``statistics`` given (e.g. loaded after an interruption) the new
    sums are added to it and it is returned.
    """
    if parallel_state.get_context_parallel_world_size() > 1:
        raise NotImplementedError("calibration under context parallelism is not supported")
    methods = cfg.calibration.methods
    keys = sorted({k for m in methods for k in NEEDS[m]})
    plans = plan_espace(model, cfg)
    layers = linear_layers(model)
    local = CalibrationStatistics(methods, data)
    handles = []
    try:
        for name, plan in plans.items():
            dtype = accumulator_dtype(plan.K, cfg.calibration.dtype)
            local.layers[name] = LayerStatistics(plan.kind, plan.K, plan.N, keys, dtype,
                                                 device())
            tap = _Tap(layers[name], local.layers[name])
            handles.append(layers[name].register_forward_pre_hook(tap))
        forward_loop(model)
    finally:
        for h in handles:
            h.remove()
    for name, s in local.layers.items():
        s.weights = {key: _weight_moment(layers[name], s.kind, key == "wn")
                     for key in keys if key in WEIGHT_KEYS}
    _reduce(local)
    if statistics is None:
        statistics = local
    else:
        statistics.add(local)
    limit = cfg.calibration.max_skipped_fraction
    for name, s in statistics.layers.items():
        if s.skipped and s.skipped > limit * s.updates:
            raise RuntimeError(
                f"calibration of '{name}': {s.skipped} of {s.updates} batches had NaN/Inf "
                f"activations or gradients, more than calibration.max_skipped_fraction={limit}")
    return statistics


def _weight_moment(module, kind: str, normalize: bool) -> torch.Tensor:
    """``C_W`` of the full weight: rows (paper: columns w ∈ R^K) over all N, all K."""
    w = module.weight.detach()
    group = module.tp_group
    if group is None or group.size() == 1:
        return weight_moment(w, normalize)
    if kind == "row":  # [N, K/tp]: gather K so each row is whole (and normalisable)
        return weight_moment(_gather_along_last_dim(w.contiguous(), group), normalize)
    # column: [N/tp, K] rows are whole; C_W = Σ_r W_rᵀ W_r / N
    part = weight_moment(w, normalize) * (w.shape[0] / module.output_size)
    dist.all_reduce(part, group=group)
    return part


def _reduce(stats: CalibrationStatistics) -> None:
    """Sum every layer's sums and counts over the TP and then the DP group.

    Batch tallies (updates, skipped) are per TP rank's share of a batch: summed over TP they
    are divided by the TP size again.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    groups = [parallel_state.get_tensor_model_parallel_group(),
              parallel_state.get_data_parallel_group()]
    tp = dist.get_world_size(groups[0])
    for s in stats.layers.values():
        counts = torch.tensor([m.count for m in s.moments.values()] + [s.updates, s.skipped],
                              dtype=torch.float64, device=device())
        sums = [m.sum.to(device()) for m in s.moments.values()]
        for group in groups:
            if dist.get_world_size(group) > 1:
                for t in sums + [counts]:
                    dist.all_reduce(t, group=group)
        for m, t, c in zip(s.moments.values(), sums, counts.tolist()):
            m.sum, m.count = t.to(m.sum.device), int(c)
        s.updates, s.skipped = int(counts[-2]) // tp, -(-int(counts[-1]) // tp)


def _tp_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size() if dist.is_initialized() else 1


def _pp_size() -> int:
    return parallel_state.get_pipeline_model_parallel_world_size() if dist.is_initialized() else 1


def _pp_rank() -> int:
    return parallel_state.get_pipeline_model_parallel_rank() if dist.is_initialized() else 0


def _is_stage_writer() -> bool:
    if not dist.is_initialized():
        return True
    return (parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0)
