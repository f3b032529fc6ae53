"""Who accumulates which statistic, in how many passes, and what it costs (DESIGN section 9).

Pure Python (no torch, no Megatron): the calibration runtime and ``calibrate --dry-run`` both
use it, so the printed plan is the plan that runs.

* **One owner per statistic.** Each (layer, moment) of a pipeline stage is accumulated by one
  TP rank (the same TP rank in every data-parallel replica), packed greedily by bytes.
* **Passes under a budget.** When one TP rank's per-batch buffers (``elem·K²`` bytes per owned
  moment) would exceed the budget, forward moments (``x, xn``) and gradient moments
  (``nl, nln``) get separate passes over the same data, then each of those is split into
  consecutive runs of (layer, moment). Stages run the same number of passes (they share the schedule).
* **Host sums** are float64 upper triangles, ``8·K(K+1)/2`` bytes per owned moment, kept for
  all passes until the eigendecompositions; the resume shard of a rank holds exactly these.
* **Eigh** of each (layer, method) runs on a DP peer of its moment's owner, balanced by K³.
* **Projections file**: ``R`` float32 columns and ``K`` float64 eigenvalues per (layer, method),
  ``R`` = the layer's rank in the config (or ``--max-rank``), at most ``K·N/(K+N)``.
"""

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

FORWARD = ("x", "xn")
GRADIENT = ("nl", "nln")
ACCUMULATED = FORWARD + GRADIENT
#: the accumulated moment each method's matrix is built from (None: the weight alone)
SOURCE = {"mse": "x", "nmse": "xn", "go_mse": "x", "go_mse_l2": "xn", "nl_mse": "nl",
          "nl_mse_l2": "nln", "weight_svd": None}
GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Layer:
    """One selected linear: global name, ``column``/``row``, full K and N, stage, config rank."""

    name: str
    kind: str
    K: int
    N: int
    stage: int
    rank: int


@dataclasses.dataclass(frozen=True)
class Pass:
    """One pass over the calibration data: per stage, the (layer, moment) it accumulates."""

    moments: Tuple[str, ...]  # the moment group (forward, gradient, or all)
    items: Dict[int, Tuple[Tuple[str, str], ...]]

    @property
    def backward(self) -> bool:
        return any(m in GRADIENT for m in self.moments)

    def layer_moments(self, stage: int) -> Dict[str, Tuple[str, ...]]:
        """Layer -> its moments in this pass, for one stage."""
        out: Dict[str, Tuple[str, ...]] = {}
        for name, m in self.items.get(stage, ()):
            out[name] = out.get(name, ()) + (m,)
        return out


def moments_for(methods: Sequence[str]) -> Tuple[str, ...]:
    """The accumulated moments the methods need, in a fixed order."""
    need = {SOURCE[m] for m in methods}
    return tuple(m for m in ACCUMULATED if m in need)


def kept_rank(k: int, n: int, rank: int, max_rank: Optional[int] = None) -> int:
    """Eigenvector columns kept in the file: ``max_rank`` when given, else the config's rank,
    never more than the break-even ``K·N/(K+N)`` (nor K)."""
    if max_rank is not None:
        return max(1, min(max_rank, k))
    return max(1, min(rank, k * n // (k + n), k))


def device_item_bytes(k: int, elem: int) -> int:
    """One per-batch device buffer: a K×K matrix of ``elem``-byte floats."""
    return elem * k * k


def host_item_bytes(k: int) -> int:
    """One float64 upper-triangle host sum."""
    return 8 * k * (k + 1) // 2


def assign_owners(items: Sequence[Tuple[str, str, int]], tp: int) -> Dict[Tuple[str, str], int]:
    """``(layer, moment, K)`` items -> owning TP rank: largest first onto the least-loaded
    rank (ties: the lowest rank)."""
    load = [0] * tp
    owners = {}
    for i in sorted(range(len(items)), key=lambda i: (-items[i][2], i)):
        name, moment, k = items[i]
        r = min(range(tp), key=lambda t: (load[t], t))
        owners[name, moment] = r
        load[r] += k * k
    return owners


def _per_rank(owners, items, tp, elem):
    out = [0] * tp
    for name, moment, k in items:
        out[owners[name, moment]] += device_item_bytes(k, elem)
    return out


@dataclasses.dataclass
class Plan:
    """The calibration plan of the whole world (every stage) and its byte counts."""

    layers: List[Layer]
    methods: Tuple[str, ...]
    tp: int
    pp: int
    dp: int
    elem: int  # bytes per element of the device buffers (4: float32, 8: float64)
    passes: List[Pass]
    owners: List[Dict[Tuple[str, str], int]]  # per pass: (layer, moment) -> TP rank
    max_rank: Optional[int] = None
    budget: Optional[int] = None

    # ---------------------------------------------------------------- who does what

    def layer(self, name: str) -> Layer:
        return self._by_name[name]

    def __post_init__(self):
        self._by_name = {lay.name: lay for lay in self.layers}

    def owned(self, stage: int, tp_rank: int, pass_index: Optional[int] = None):
        """``(pass, layer, moment)`` this TP rank of ``stage`` accumulates."""
        out = []
        for p, (ps, owners) in enumerate(zip(self.passes, self.owners)):
            if pass_index is not None and p != pass_index:
                continue
            out += [(p, name, m) for name, m in ps.items.get(stage, ())
                    if owners[name, m] == tp_rank]
        return out

    def owner(self, name: str, moment: str) -> int:
        for ps, owners in zip(self.passes, self.owners):
            if (name, moment) in owners:
                return owners[name, moment]
        raise KeyError((name, moment))

    def eigh_assignment(self, stage: int) -> List[Tuple[str, str, int, int]]:
        """``(layer, method, tp_rank, dp_rank)`` for every item of the stage, in one order:
        each on a DP peer of its moment's owner (any rank of the stage for ``weight_svd``),
        largest K³ first onto the least-loaded candidate."""
        names = [lay.name for lay in self.layers if lay.stage == stage]
        items = [(n, m) for n in names for m in self.methods]
        load = {(t, d): 0 for t in range(self.tp) for d in range(self.dp)}
        out = {}
        for n, m in sorted(items, key=lambda it: (-self.layer(it[0]).K, names.index(it[0]),
                                                  self.methods.index(it[1]))):
            src = SOURCE[m]
            cands = ([(self.owner(n, src), d) for d in range(self.dp)] if src is not None
                     else sorted(load))
            best = min(cands, key=lambda c: (load[c], c))
            out[n, m] = best
            load[best] += self.layer(n).K ** 3
        return [(n, m) + out[n, m] for n, m in items]

    # ---------------------------------------------------------------- bytes

    def device_bytes(self, stage: int, tp_rank: int) -> int:
        """Peak bytes of per-batch buffers this rank holds (the largest pass)."""
        per_pass = [0] * len(self.passes)
        for p, name, _ in self.owned(stage, tp_rank):
            per_pass[p] += device_item_bytes(self.layer(name).K, self.elem)
        return max(per_pass, default=0)

    def host_bytes(self, stage: int, tp_rank: int) -> int:
        """Bytes of the float64 host sums this rank holds at the end (all passes)."""
        return sum(host_item_bytes(self.layer(n).K) for _, n, _ in self.owned(stage, tp_rank))

    @property
    def device_bytes_per_gpu(self) -> int:
        return max(self.device_bytes(s, t) for s in range(self.pp) for t in range(self.tp))

    @property
    def host_bytes_per_rank(self) -> int:
        return max(self.host_bytes(s, t) for s in range(self.pp) for t in range(self.tp))

    @property
    def resume_bytes_per_rank(self) -> int:
        """Tensor bytes of the largest per-rank resume shard (the host sums)."""
        return self.host_bytes_per_rank

    def kept(self, lay: Layer) -> int:
        return kept_rank(lay.K, lay.N, lay.rank, self.max_rank)

    @property
    def projections_file_bytes(self) -> int:
        """Tensor bytes of the projections file: float32 ``[K, R]`` + float64 ``[K]`` each."""
        return sum(len(self.methods) * (4 * lay.K * self.kept(lay) + 8 * lay.K)
                   for lay in self.layers)

    def summary(self) -> dict:
        """The figures ``calibrate --dry-run --json`` prints."""
        return {"device_bytes_per_gpu": self.device_bytes_per_gpu,
                "host_bytes_per_rank": self.host_bytes_per_rank,
                "passes": len(self.passes),
                "projections_file_bytes": self.projections_file_bytes,
                "resume_bytes_per_rank": self.resume_bytes_per_rank,
                "layout": {"tensor_model_parallel_size": self.tp,
                           "pipeline_model_parallel_size": self.pp,
                           "data_parallel_size": self.dp},
                "pass_moments": [list(p.moments) for p in self.passes],
                "layers": len(self.layers), "methods": list(self.methods),
                "max_device_bytes": self.budget}

    def describe(self) -> str:
        """A few human-readable lines (printed at the start of a run and by ``--dry-run``)."""
        g = lambda b: f"{b / GIB:.3f} GiB"  # noqa: E731
        lines = [f"calibration plan: {len(self.layers)} layers x {len(self.methods)} methods, "
                 f"TP={self.tp} PP={self.pp} DP={self.dp}",
                 f"  statistics on each GPU (per-batch buffers): {g(self.device_bytes_per_gpu)}"
                 + (f" (budget {g(self.budget)})" if self.budget else ""),
                 f"  host sums per rank (float64 upper triangles): {g(self.host_bytes_per_rank)}",
                 f"  passes over the data: {len(self.passes)} "
                 f"({', '.join('+'.join(p.moments) for p in self.passes) or 'weights only'})",
                 f"  projections file: {g(self.projections_file_bytes)}",
                 f"  resume shard per rank: {g(self.resume_bytes_per_rank)}"]
        return "\n".join(lines)


def make_plan(layers: Sequence[Layer], methods: Sequence[str], tp: int, pp: int, dp: int,
              elem: int = 4, budget: Optional[int] = None,
              max_rank: Optional[int] = None) -> Plan:
    """The passes and owners for ``layers`` (all stages) under ``budget`` device bytes per GPU.

    Raises ``ValueError`` when one statistic alone exceeds the budget.
    """
    layers = list(layers)
    moments = moments_for(methods)
    stages = {s: [lay for lay in layers if lay.stage == s] for s in range(pp)}

    def peak(its):
        return max(_per_rank(assign_owners(its, tp), its, tp, elem))

    def stage_items(s, group):
        return [(lay.name, m, lay.K) for lay in stages[s] for m in group]

    groups = [moments]
    if budget is not None and moments and any(
            peak(stage_items(s, moments)) > budget for s in stages):
        groups = [g for g in (tuple(m for m in moments if m in FORWARD),
                              tuple(m for m in moments if m in GRADIENT)) if g]
    passes: List[Pass] = []
    for group in groups:
        subsets = {}
        for s in stages:  # consecutive runs of (layer, moment) that fit the budget
            chunks, current = [], []
            for item in stage_items(s, group):
                need = device_item_bytes(item[2], elem)
                if budget is not None and need > budget:
                    raise ValueError(
                        f"one statistic of '{item[0]}' (K={item[2]}) needs {need / GIB:.2f} GiB "
                        f"on the device, more than the budget of {budget / GIB:.2f} GiB "
                        "(calibration.max_device_gib / --calib-memory-gib)")
                if budget is not None and current and peak(current + [item]) > budget:
                    chunks.append(current)
                    current = []
                current.append(item)
            subsets[s] = chunks + [current]
        for i in range(max(len(c) for c in subsets.values())):
            passes.append(Pass(group, {s: tuple((n, m) for n, m, _ in c[i]) if i < len(c)
                                       else () for s, c in subsets.items()}))
    k_of = {lay.name: lay.K for lay in layers}
    owners = []
    for ps in passes:
        own = {}
        for s in stages:
            own.update(assign_owners([(n, m, k_of[n]) for n, m in ps.items[s]], tp))
        owners.append(own)
    if not passes:  # weight-only methods: one pass that accumulates nothing
        passes, owners = [Pass((), {s: () for s in stages})], [{}]
    return Plan(layers, tuple(methods), tp, pp, dp, elem, passes, owners, max_rank, budget)


def gpt_layers(num_layers: int, hidden: int, ffn: int, heads: int, query_groups: int,
               kv_channels: int, swiglu: bool, pp: int) -> List[Tuple[str, str, int, int, int]]:
    """``(name, kind, K, N, stage)`` of the linears of megatron's GPT layer, by global name
    (layers split evenly over the pipeline stages)."""
    per_stage = num_layers // pp
    out = []
    for i in range(num_layers):
        head = f"decoder.layers.{i}"
        s = i // per_stage
        out += [(f"{head}.self_attention.linear_qkv", "column", hidden,
                 (heads + 2 * query_groups) * kv_channels, s),
                (f"{head}.self_attention.linear_proj", "row", heads * kv_channels, hidden, s),
                (f"{head}.mlp.linear_fc1", "column", hidden, ffn * (2 if swiglu else 1), s),
                (f"{head}.mlp.linear_fc2", "row", ffn, hidden, s)]
    return out
