"""Calibration on a megatron-core model: hooks, one owner per statistic, eigh on the owner.

``stats = calibrate(model, forward_loop, cfg)`` hooks every linear the config selects and
runs ``forward_loop(model)`` once per pass of the plan (:mod:`calibration_plan`; which also
calls backward when a gradient statistic is asked for). DESIGN section 9:

* **TP**: every layer's statistic is taken over the full K and the full sequence: column-
  parallel inputs are full already (all-gathered along the sequence under sequence
  parallelism); row-parallel inputs and their gradients are all-gathered along K. Each
  (layer, moment) then has one owning TP rank, which accumulates it; the others skip it.
  There is no TP reduction of statistics, and the work is balanced at any micro-batch size.
* **Sums**: per-batch products in float32 on the device, flushed into float64 upper
  triangles on the host every ``flush_interval`` micro-batches. ``C_W`` is recomputed from
  the weight when a matrix is formed, never accumulated.
* **DP**: each owner's host sums are all-reduced over its data-parallel group only, once.
* **PP**: layers are named by global layer number; each stage holds its own layers.
* **Eigh**: each (layer, method) is decomposed on one DP peer of its moment's owner, on that
  rank's device, one at a time, and written by that rank into its part of the projections
  file (``R`` float32 columns, all K eigenvalues). Nothing is broadcast.

Forward statistics are skipped for forwards run inside a backward pass (activation
recomputation), and gradient statistics are taken by a hook on the input tensor that is
actually differentiated, so nothing is counted twice.
"""

import json
import tempfile
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import _gather_along_first_dim, _gather_along_last_dim

from megatron_espace import projection
from megatron_espace.calibration_plan import (FORWARD, GIB, GRADIENT, SOURCE, Layer, Plan,
                                              make_plan)
from megatron_espace.config import ESPACEConfig
from megatron_espace.projection import sorted_eigh
from megatron_espace.runtime import device
from megatron_espace.statistics import NEEDS, MomentSum, device_dtype, method_matrix, weight_moment
from megatron_espace.surgery import linear_layers, plan_espace

SHARD_FORMAT = "megatron-espace-statistics-shard"
SHARD_VERSION = 2


class CalibrationStatistics:
    """This rank's share of the statistics: the host sums of the (layer, moment) it owns.

    ``plan`` is the whole world's :class:`~megatron_espace.calibration_plan.Plan`; ``sums``
    maps ``(layer, moment)`` to a :class:`~megatron_espace.statistics.MomentSum` for every
    item this rank owns (in any pass). ``done[p]`` counts the calibration sequences pass ``p``
    has consumed (the command's resume point).
    """

    def __init__(self, model, cfg: ESPACEConfig, plan: Plan, elem_dtype: torch.dtype,
                 flush_interval: int = 8, data: str = ""):
        self.model, self.cfg, self.plan = model, cfg, plan
        self.methods = tuple(cfg.calibration.methods)
        self.dtype, self.flush_interval, self.data = elem_dtype, flush_interval, data
        self.stage, self.tp_rank, self.dp_rank = _pp_rank(), _tp_rank(), _dp_rank()
        self.modules = {n: m for n, m in linear_layers(model).items()
                        if n in {lay.name for lay in plan.layers}}
        self.sums: Dict[tuple, MomentSum] = {
            (name, m): MomentSum(plan.layer(name).K)
            for _, name, m in plan.owned(self.stage, self.tp_rank)}
        self.done = [0] * len(plan.passes)
        self.peak_device_bytes = 0
        self.reduced = False

    @classmethod
    def build(cls, model, cfg: ESPACEConfig, max_device_gib: Optional[float] = None,
              flush_interval: int = 8, max_rank: Optional[int] = None,
              data: str = "") -> "CalibrationStatistics":
        """Plan the calibration of ``model`` (collective): owners, passes, kept ranks.

        ``max_device_gib`` (default ``cfg.calibration.max_device_gib``) bounds the per-batch
        buffers per GPU; ``max_rank`` overrides the columns kept per (layer, method).
        """
        if parallel_state.get_context_parallel_world_size() > 1:
            raise NotImplementedError("calibration under context parallelism is not supported")
        if flush_interval < 1:
            raise ValueError(f"flush interval must be >= 1, got {flush_interval}")
        plans = plan_espace(model, cfg)
        modules = linear_layers(model)
        mine = [(n, p.kind, p.K, p.N, p.rank) for n, p in plans.items()]
        reports = [(_pp_rank(), mine)]
        if _world() > 1:
            reports = [None] * _world()
            dist.all_gather_object(reports, (_pp_rank(), mine))
        layers, seen = [], set()
        for stage, items in sorted(reports, key=lambda r: r[0]):
            for n, kind, k, nn, rank in items:
                if n not in seen:
                    seen.add(n)
                    layers.append(Layer(n, kind, k, nn, stage, rank))
        weight = next((modules[n].weight for n in plans), None)
        dtype = device_dtype(weight.dtype if weight is not None else torch.float32,
                             cfg.calibration.dtype)
        gib = max_device_gib if max_device_gib is not None else cfg.calibration.max_device_gib
        plan = make_plan(layers, cfg.calibration.methods, _tp_size(), _pp_size(), _dp_size(),
                         elem=torch.finfo(dtype).bits // 8,
                         budget=None if gib is None else int(gib * GIB), max_rank=max_rank)
        return cls(model, cfg, plan, dtype, flush_interval, data)

    # ------------------------------------------------------------------ accumulation

    def accumulate(self, forward_loop: Callable, pass_index: int) -> None:
        """Run ``forward_loop(model)`` with the hooks of pass ``pass_index``; its per-batch
        buffers live only during the call and are flushed into the host sums at its end."""
        if self.reduced:
            raise RuntimeError("these statistics were already reduced over data parallelism")
        ps = self.plan.passes[pass_index]
        owned = [(n, m) for _, n, m in self.plan.owned(self.stage, self.tp_rank, pass_index)]
        handles = []
        try:
            for key in owned:
                self.sums[key].open(self.dtype, device())
            self.peak_device_bytes = max(self.peak_device_bytes, sum(
                self.sums[key].buffer.nbytes for key in owned))
            for name, moments in ps.layer_moments(self.stage).items():
                tap = _Tap(self.modules[name], self.plan.layer(name).kind, moments,
                           {m: self.sums[name, m] for m in moments if (name, m) in owned},
                           self.flush_interval)
                handles.append(self.modules[name].register_forward_pre_hook(tap))
            forward_loop(self.model)
        finally:
            for h in handles:
                h.remove()
            for key in owned:
                self.sums[key].close()

    def reduce(self) -> None:
        """Sum every owned moment over this rank's data-parallel group (once), then refuse
        layers with too many NaN/Inf batches (collective)."""
        if self.reduced:
            return
        group = parallel_state.get_data_parallel_group() if _world() > 1 else None
        if group is not None and dist.get_world_size(group) > 1:
            for key in sorted(self.sums):
                s = self.sums[key]
                _all_reduce_host(s.host, group)
                tally = torch.tensor([s.count, s.batches, s.skipped], dtype=torch.float64,
                                     device=device())
                dist.all_reduce(tally, group=group)
                s.count, s.batches, s.skipped = (int(v) for v in tally.tolist())
        self.reduced = True
        limit = self.cfg.calibration.max_skipped_fraction
        errors = [f"calibration of '{n}': {s.skipped} of {s.batches} batches had NaN/Inf "
                  f"activations or gradients, more than calibration.max_skipped_fraction={limit}"
                  for (n, m), s in sorted(self.sums.items())
                  if s.skipped and s.skipped > limit * s.batches]
        if _world() > 1:
            everyone = [None] * _world()
            dist.all_gather_object(everyone, errors)
            errors = sorted({e for es in everyone for e in es})
        if errors:
            raise RuntimeError(errors[0])

    # ------------------------------------------------------------------ results

    def moment(self, layer: str, key: str) -> Optional[MomentSum]:
        """The sum of ``key`` for ``layer`` if this rank owns it, else None."""
        return self.sums.get((layer, key))

    def matrix(self, layer: str, method: str, weights: Optional[dict] = None):
        """The K×K float64 matrix of ``method`` for ``layer`` and whether to rank by |λ|.

        On the owner of its moment (``weight_svd``: anywhere) after :meth:`reduce`; weight
        moments come from ``weights`` (``w``/``wn``) or, without TP, from the layer itself.
        """
        self.reduce()
        need = NEEDS[method]
        moments = {}
        for key in need:
            if key in ("w", "wn"):
                moments[key] = (weights[key] if weights is not None else weight_moment(
                    _full_weight(self.modules[layer], self.plan.layer(layer).kind), key == "wn"))
            else:
                s = self.sums.get((layer, key))
                if s is None:
                    raise KeyError(f"'{layer}' {key}: not accumulated on this rank (owner: TP "
                                   f"rank {self.plan.owner(layer, key)})")
                moments[key] = s.mean(device())
        return method_matrix(method, moments)

    def tokens(self, layer: str) -> int:
        """Tokens counted for ``layer``'s forward moments (0 if this rank owns none)."""
        return max((self.sums[layer, k].count for k in FORWARD if (layer, k) in self.sums),
                   default=0)

    def eigen_items(self):
        """Yield ``(layer, method, vecs [K, R] float32, vals [K] float64)`` for every item
        this rank decomposes, one at a time on its device (collective over the stage: the
        weights of go_mse/weight_svd layers are gathered over TP)."""
        self.reduce()
        assignment = self.plan.eigh_assignment(self.stage)
        weighted = [k for k in ("w", "wn") if any(k in NEEDS[m] for m in self.methods)]
        for name in [lay.name for lay in self.plan.layers if lay.stage == self.stage]:
            lay = self.plan.layer(name)
            mine = [m for n, m, t, d in assignment
                    if n == name and (t, d) == (self.tp_rank, self.dp_rank)]
            weights = None
            if weighted:
                w = _full_weight(self.modules[name], lay.kind)
                weights = ({k: weight_moment(w.to(device()), k == "wn") for k in weighted}
                           if mine else None)
                del w
            for method in mine:
                vecs, vals = sorted_eigh(*self.matrix(name, method, weights))
                keep = self.plan.kept(lay)
                yield (name, method, vecs[:, :keep].to("cpu", torch.float32).contiguous(),
                       vals.cpu())
                del vecs, vals

    def info(self) -> dict:
        """What the projections file records about the layers and the run (collective)."""
        mine = {n: {"tokens": max((s.count for (nn, k), s in self.sums.items()
                                   if nn == n and k in FORWARD), default=None),
                    "sequences": max((s.count for (nn, k), s in self.sums.items()
                                      if nn == n and k in GRADIENT), default=None),
                    "skipped_batches": max((s.skipped for (nn, _), s in self.sums.items()
                                            if nn == n), default=None)}
                for n in {n for n, _ in self.sums}}
        parts = [mine]
        if _world() > 1:
            parts = [None] * _world()
            dist.all_gather_object(parts, mine)
        layers = {}
        for lay in self.plan.layers:
            rec = {"kind": lay.kind, "K": lay.K, "N": lay.N, "kept": self.plan.kept(lay),
                   "tokens": 0, "sequences": 0, "skipped_batches": 0}
            for part in parts:
                for key, v in part.get(lay.name, {}).items():
                    if v is not None:
                        rec[key] = max(rec[key], v)
            layers[lay.name] = rec
        return {"layers": layers, "data": self.data, "methods": list(self.methods),
                "tensor_model_parallel_size": self.plan.tp,
                "pipeline_model_parallel_size": self.plan.pp,
                "data_parallel_size": self.plan.dp}

    def projections(self, path=None, info: Optional[dict] = None):
        """Decompose and write the projections file at ``path`` (a temporary directory when
        None); returns ``Projections.load(path)``. Collective over the world: each rank
        writes its own items' part; global rank 0 writes the index."""
        meta = {**self.info(), **(info or {})}
        if path is None:
            tmp = [tempfile.mkdtemp(prefix="espace-projections-")] if _rank() == 0 else [None]
            if _world() > 1:
                dist.broadcast_object_list(tmp, src=0)
            path = Path(tmp[0]) / "projections.safetensors"
        part = projection.write_part(path, f"pp{self.stage}-r{_rank()}", self.eigen_items(),
                                     meta)
        parts = [part]
        if _world() > 1:
            parts = [None] * _world()
            dist.all_gather_object(parts, part)
        if _rank() == 0:
            projection.write_index(path, parts, meta)
        if _world() > 1:
            dist.barrier()
        return projection.Projections.load(path)

    # ------------------------------------------------------------------ resume shards

    def shard_path(self, directory) -> Path:
        return Path(directory) / f"rank{_rank():05d}.safetensors"

    def save(self, directory, key: dict) -> None:
        """Write this rank's host sums and progress under ``directory`` (atomic, collective).

        ``key`` (JSON-able) records what produced the sums; :meth:`load` compares it.
        """
        from megatron_espace.atomic import save_safetensors

        if self.reduced:
            raise RuntimeError("reduced statistics are not a resume point")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"{n}::{m}": s.host for (n, m), s in self.sums.items()}
        meta = {n + "::" + m: [s.count, s.batches, s.skipped] for (n, m), s in self.sums.items()}
        save_safetensors(self.shard_path(directory), tensors, metadata={
            "format": SHARD_FORMAT, "version": str(SHARD_VERSION), "key": json.dumps(key),
            "done": json.dumps(self.done), "counts": json.dumps(meta)})
        if _world() > 1:
            dist.barrier()

    def load(self, directory, key: dict) -> None:
        """Reload this rank's shard written by :meth:`save` into the host sums.

        Raises :class:`StaleStatistics` naming what differs when ``key`` does not match
        (``calib_samples`` may grow).
        """
        from safetensors import safe_open

        path = self.shard_path(directory)
        if not path.is_file():
            raise StaleStatistics(f"{path}: missing (the statistics were written by another "
                                  "layout or an interrupted first save)")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != SHARD_FORMAT or meta.get("version") != str(SHARD_VERSION):
                raise StaleStatistics(f"{path}: not a statistics shard of this version")
            check_key(json.loads(meta["key"]), key, path)
            counts = json.loads(meta["counts"])
            if set(counts) != {f"{n}::{m}" for n, m in self.sums}:
                raise StaleStatistics(f"{path}: holds other statistics than this plan assigns "
                                      "to this rank")
            for (n, m), s in self.sums.items():
                s.host = f.get_tensor(f"{n}::{m}").to(torch.float64)
                s.count, s.batches, s.skipped = counts[f"{n}::{m}"]
            self.done = json.loads(meta["done"])


class StaleStatistics(ValueError):
    """Saved statistics that do not belong to this run."""


def check_key(saved: dict, wanted: dict, path) -> None:
    """Refuse ``saved`` statistics unless they come from what ``wanted`` describes; a larger
    ``calib_samples`` than saved resumes, a smaller one does not."""
    def walk(a, b, prefix=""):
        for k in sorted(set(a) | set(b)):
            x, y = a.get(k), b.get(k)
            if isinstance(x, dict) and isinstance(y, dict):
                yield from walk(x, y, f"{prefix}{k}.")
            elif x != y and f"{prefix}{k}" != "calib_samples":
                yield f"{prefix}{k}: saved {x!r}, now {y!r}"

    diffs = list(walk(saved, wanted))
    if saved.get("calib_samples", 0) > wanted.get("calib_samples", 0):
        diffs.append(f"calib_samples: saved {saved.get('calib_samples')}, now "
                     f"{wanted.get('calib_samples')} (fewer samples cannot be taken back out)")
    if diffs:
        raise StaleStatistics(f"{path}: these statistics come from another run; "
                              + "; ".join(diffs))


# ---------------------------------------------------------------------- the hooks


class _Tap:
    """Forward pre-hook (and input-gradient hook) feeding the moments this rank owns."""

    def __init__(self, module, kind: str, moments, owned: Dict[str, MomentSum], flush: int):
        self.module, self.kind, self.owned, self.flush = module, kind, owned, flush
        self.forward = [k for k in moments if k in FORWARD]
        self.gradient = [k for k in moments if k in GRADIENT]
        self.tp_group = module.tp_group
        self.tp = 1 if self.tp_group is None else self.tp_group.size()

    def full(self, t: torch.Tensor) -> torch.Tensor:
        """The layer input (or its gradient) with the full sequence and all K: [s, b, K]
        (collective over TP)."""
        if self.tp == 1:
            return t
        if self.kind == "column":
            if self.module.sequence_parallel:
                return _gather_along_first_dim(t.contiguous(), self.tp_group)
            return t
        if self.module.input_is_parallel:
            return _gather_along_last_dim(t.contiguous(), self.tp_group)
        return t

    def __call__(self, module, args):
        x = args[0]
        if self.forward and torch._C._current_graph_task_id() == -1:  # not a recompute
            xs = self.full(x.detach())
            for k in self.forward:
                if k in self.owned:
                    self._done(self.owned[k], self.owned[k].add_tokens(xs, k == "xn"))
        if self.gradient and x.requires_grad:
            x.register_hook(lambda g, x=x.detach(): self._on_grad(x, g))

    def _on_grad(self, x, g):
        xs, gs = self.full(x), self.full(g.detach())
        for k in self.gradient:
            if k in self.owned:
                self._done(self.owned[k], self.owned[k].add_sequences(xs, gs, k == "nln"))

    def _done(self, s: MomentSum, _accepted: bool) -> None:
        if s.batches % self.flush == 0:
            s.flush()


def calibrate(model: torch.nn.Module, forward_loop: Callable[[torch.nn.Module], None],
              cfg: ESPACEConfig, max_device_gib: Optional[float] = None,
              flush_interval: int = 8, max_rank: Optional[int] = None,
              data: str = "") -> CalibrationStatistics:
    """Accumulate the config's statistics for the layers it selects (collective).

    ``forward_loop(model)`` runs the calibration batches (and backward, for ``nl_mse*``); it
    is called once per pass of the plan and must give the same batches each time. Hooks are
    removed afterwards, even on error. Returns the statistics reduced across DP; then
    ``stats.projections(path)`` decomposes and writes them.
    """
    stats = CalibrationStatistics.build(model, cfg, max_device_gib, flush_interval, max_rank,
                                        data)
    for p in range(len(stats.plan.passes)):
        stats.accumulate(forward_loop, p)
    stats.reduce()
    return stats


def _full_weight(module, kind: str) -> torch.Tensor:
    """The full ``[N, K]`` weight (collective over TP)."""
    w = module.weight.detach()
    group = module.tp_group
    if group is None or group.size() == 1:
        return w
    if kind == "row":  # [N, K/tp]
        return _gather_along_last_dim(w.contiguous(), group)
    return _gather_along_first_dim(w.contiguous(), group)  # column: [N/tp, K]


def _all_reduce_host(t: torch.Tensor, group, chunk: int = 1 << 25) -> None:
    """All-reduce a CPU tensor in place, through the device in chunks when there is one."""
    if device().type == "cpu":
        dist.all_reduce(t, group=group)
        return
    flat = t.view(-1)
    for i in range(0, flat.numel(), chunk):
        part = flat[i:i + chunk].to(device())
        dist.all_reduce(part, group=group)
        flat[i:i + chunk] = part.cpu()


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _tp_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size() if _world() > 1 else 1


def _pp_size() -> int:
    return parallel_state.get_pipeline_model_parallel_world_size() if _world() > 1 else 1


def _dp_size() -> int:
    return parallel_state.get_data_parallel_world_size() if _world() > 1 else 1


def _pp_rank() -> int:
    return parallel_state.get_pipeline_model_parallel_rank() if _world() > 1 else 0


def _tp_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank() if _world() > 1 else 0


def _dp_rank() -> int:
    return parallel_state.get_data_parallel_rank() if _world() > 1 else 0
