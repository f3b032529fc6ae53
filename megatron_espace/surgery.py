"""Model surgery: turn a built megatron-core model's linears into ESPACE layers, in place.

``apply_espace(model, cfg, projections)`` follows the config's first-match-wins
rules over module names. A matched ``ColumnParallelLinear`` / ``RowParallelLinear``
becomes its ESPACE subclass by a class swap: the same module object, the same
``weight``/``bias`` Parameter objects, so it works before or after DDP and optimizer
creation and leaves checkpoint keys unchanged. ``output_layer`` and embeddings are
never candidates.

Layer names are module paths relative to the unwrapped model (DDP / Float16Module
removed) with transformer layers numbered globally (``TransformerLayer.layer_number - 1``),
so the same names hold at any pipeline-parallel size.
"""

import copy
import dataclasses
import functools
from typing import Dict, Optional

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from megatron_espace.config import AUTO, ESPACEConfig
from megatron_espace.layers import (
    CompressedColumnParallelLinear,
    CompressedRowParallelLinear,
    ESPACEColumnParallelLinear,
    ESPACERowParallelLinear,
)
from megatron_espace.projection import Projections, layer_compression, rank_for_compression

_ESPACE_CLASS = {ColumnParallelLinear: ESPACEColumnParallelLinear,
                 RowParallelLinear: ESPACERowParallelLinear}


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """What ``apply_espace`` does to one layer. ``K`` input, ``N`` output features (full);
    ``target``: the rule's ``compression`` (None for a ``rank`` rule)."""

    kind: str  # "column" | "row"
    K: int
    N: int
    rank: int
    method: str
    target: Optional[float] = None

    @property
    def compression(self) -> float:
        """The layer compression this rank reaches, ``1 − L(K+N)/(KN)``."""
        return layer_compression(self.K, self.N, self.rank)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip megatron's DDP and Float16Module wrappers."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import Float16Module

    while isinstance(model, (DistributedDataParallel, Float16Module)):
        model = model.module
    return model


def linear_layers(model: torch.nn.Module) -> Dict[str, torch.nn.Module]:
    """Candidate linears by global name: megatron's column/row linears and TE linears.

    Excludes ``output_layer`` (the LM head) and embeddings.
    """
    from megatron.core.transformer.transformer_layer import TransformerLayer

    model = unwrap(model)
    renames = {}
    for name, module in model.named_modules():
        if isinstance(module, TransformerLayer):
            head, _, _ = name.rpartition(".")
            renames[name] = f"{head}.{module.layer_number - 1}" if head else str(
                module.layer_number - 1)
    out = {}
    for name, module in model.named_modules():
        if not (isinstance(module, (ColumnParallelLinear, RowParallelLinear)) or _is_te_linear(
                module)):
            continue
        if name.split(".")[-1] == "output_layer" or "embedding" in name:
            continue
        out[_global_name(name, renames)] = module
    return out


def _global_name(name, renames):
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in renames:
            return ".".join([renames[prefix]] + parts[i:])
    return name


def _is_te_linear(module) -> bool:
    return type(module).__module__.startswith("megatron.core.extensions.transformer_engine") and (
        "Linear" in type(module).__name__)


def _kind(module) -> str:
    return "row" if isinstance(module, RowParallelLinear) else "column"


def plan_espace(model: torch.nn.Module, cfg: ESPACEConfig,
                projections: Optional[Projections] = None) -> Dict[str, LayerPlan]:
    """Resolve ``cfg`` against ``model``: which layers get which rank and method.

    Raises :class:`ConfigError` naming the field for a pattern that matches no layer (on any
    pipeline stage), a rank ``>= K``, an unreachable compression, ``method: auto`` without a
    per-layer choice in ``projections``, or a match on a Transformer Engine fused layer.
    """
    layers = linear_layers(model)
    for name, module in layers.items():
        rule = cfg.rule_for(name)
        if rule is not None and _is_te_linear(module):
            raise cfg.error(rule, "match", f"'{name}' is a Transformer Engine layer "
                            f"({type(module).__name__}); ESPACE needs the unfused layer spec "
                            "(megatron_espace.surgery.get_gpt_layer_espace_spec)")
    return plan_layers(cfg, layer_shapes(model), projections)


def layer_shapes(model: torch.nn.Module) -> Dict[str, tuple]:
    """``{global name: (kind, K, N)}`` of the candidate linears (:func:`linear_layers`)."""
    return {name: (_kind(m), m.input_size, m.output_size)
            for name, m in linear_layers(model).items()}


def plan_layers(cfg: ESPACEConfig, shapes: Dict[str, tuple],
                projections: Optional[Projections] = None) -> Dict[str, LayerPlan]:
    """:func:`plan_espace` on ``shapes``: ``{global layer name: (kind, K, N)}`` of the
    candidate linears (this pipeline stage's, or a checkpoint's)."""
    plans, hits = {}, [0] * len(cfg.layers)
    for name, (kind, k, n) in shapes.items():
        rule = cfg.rule_for(name)
        if rule is None:
            continue
        hits[rule.index] += 1
        if rule.rank is not None:
            rank = rule.rank
            if rank >= k:
                raise cfg.error(rule, "rank", f"{rank} >= K={k} (input features) of '{name}'")
        else:
            try:
                rank = rank_for_compression(k, n, rule.compression, cfg.rank_multiple)
            except ValueError as e:
                raise cfg.error(rule, "compression", f"{e} ('{name}')") from None
        method = rule.method
        if method == AUTO:
            method = (projections.chosen.get(name) if projections is not None else None) or AUTO
        plans[name] = LayerPlan(kind, k, n, rank, method, rule.compression)
    _check_every_rule_matched(cfg, hits, shapes)
    return plans


def _check_every_rule_matched(cfg, hits, layers):
    from megatron_espace.runtime import device

    counts = torch.tensor(hits, dtype=torch.long, device=device())
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(counts)  # a pattern may match on another pipeline stage
    for rule, count in zip(cfg.layers, counts.tolist()):
        if count == 0:
            sample = ", ".join(list(layers)[:4])
            raise cfg.error(rule, "match", f"pattern '{rule.match}' matches no linear layer "
                            f"(or every match is taken by an earlier rule); layers look like: "
                            f"{sample}, ...")


def apply_espace(model: torch.nn.Module, cfg: ESPACEConfig,
                 projections: Projections) -> Dict[str, LayerPlan]:
    """Make the matched linears of ``model`` ESPACE layers with ``P`` from ``projections``.

    In place; returns the per-layer plan. Checks that ``projections`` fits the model (each
    layer's K) and names the file and layer when it does not, before changing anything.
    Collective when distributed: every rank calls it (patterns are checked across pipeline
    stages, projections across TP ranks).
    """
    plans = plan_espace(model, cfg, projections)
    for name, plan in plans.items():  # check everything before changing anything
        if plan.method == AUTO:
            raise cfg.error(cfg.rule_for(name), "method",
                            f"'auto' needs a per-layer method choice (from the sensitivity "
                            f"pass) and {projections.source} has none for '{name}'")
        check_fits(projections, name, plan)
    layers = as_espace_layers(model, list(plans))
    for name, plan in plans.items():
        install_projection(layers[name], projections, name, plan.method, plan.rank)
    return plans


def install_projection(layer, projections: Projections, name: str, method: str,
                       rank: int) -> None:
    """``layer.set_projection`` with only what this rank keeps read from ``projections``:
    the first ``rank`` columns, and a row-parallel rank's K/TP rows. Collective over TP."""
    rows = layer.projection_rows()
    layer.set_projection(projections.projection(name, method, rank, rows=rows), rows=rows)


def check_fits(projections: Projections, name: str, plan: LayerPlan) -> None:
    """Refuse, naming the file and layer, projections made for another model's layer
    (reads the file's index only)."""
    k, kept = projections.shape(name, plan.method)
    if k != plan.K:
        raise ValueError(f"{projections.source}: layer '{name}' has K={k}, but "
                         f"the model's layer has input_size={plan.K}: the projections were "
                         "made for another model")
    if plan.rank > kept:
        raise ValueError(f"{projections.source}: layer '{name}' method '{plan.method}' keeps "
                         f"{kept} eigenvectors, rank {plan.rank} asked")
    recorded = projections.info.get("layers", {}).get(name, {})
    if recorded.get("N", plan.N) != plan.N or recorded.get("kind", plan.kind) != plan.kind:
        raise ValueError(f"{projections.source}: layer '{name}' was calibrated as a "
                         f"{recorded.get('kind')}-parallel layer with N={recorded.get('N')}, "
                         f"the model's is {plan.kind}-parallel with N={plan.N}: the "
                         "projections were made for another model")


def as_espace_layers(model: torch.nn.Module, names) -> Dict[str, torch.nn.Module]:
    """Make the named linears ESPACE layers without a projection (exactly the dense layers
    until ``set_projection``); returns those this rank holds, by name."""
    layers = linear_layers(model)
    out = {}
    for name in names:
        module = layers.get(name)
        if module is None:
            continue  # on another pipeline stage
        if type(module) in _ESPACE_CLASS:
            module.__class__ = _ESPACE_CLASS[type(module)]
            module._init_espace(name)
        module.espace_name = name
        out[name] = module
    return out


_COMPRESSED_CLASS = {ESPACEColumnParallelLinear: CompressedColumnParallelLinear,
                     ESPACERowParallelLinear: CompressedRowParallelLinear}


def export_compressed(model: torch.nn.Module) -> Dict[str, int]:
    """Turn every ESPACE layer with a projection into its compressed inference form, in place.

    Each holds ``A = W P`` (``B = Pᵀ W`` in the paper's notation) and ``P``; the dense ``W``
    is freed. Our ``merge_and_unload``. Collective over TP (row-parallel ``A`` is reduced).
    Returns ``{layer name: L}``.
    """
    done = {}
    for name, module in linear_layers(model).items():
        cls = _COMPRESSED_CLASS.get(type(module))
        if cls is None or module.projection_rank is None:
            continue
        module.__class__ = cls
        module._compress()
        done[name] = module.projection_rank
    return done


def get_gpt_layer_espace_spec(**kwargs):
    """megatron's local GPT layer spec with ESPACE linears (for ``--spec`` users).

    Keyword arguments go to ``get_gpt_layer_local_spec``. The layers start with no
    projection (exactly the dense layers); ``apply_espace`` sets P. ``apply_espace`` alone
    would also do (it swaps the classes of a model built from the plain local spec); this
    spec only lets a model be built with ESPACE classes from the start.
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return _swap_linears(copy.deepcopy(get_gpt_layer_local_spec(**kwargs)))


def _swap_linears(spec):
    """``spec`` with every Column/RowParallelLinear class replaced by its ESPACE subclass.

    Walks ModuleSpecs, submodule dataclasses and ``functools.partial`` (megatron-core >= 0.18
    holds the MLP as ``partial(MLP.as_mlp_submodule, submodules=MLPSubmodules(...))``).
    """
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(spec, type):
        return _ESPACE_CLASS.get(spec, spec)
    if isinstance(spec, functools.partial):
        return functools.partial(spec.func, *[_swap_linears(a) for a in spec.args],
                                 **{k: _swap_linears(v) for k, v in spec.keywords.items()})
    if isinstance(spec, ModuleSpec):
        spec.module = _swap_linears(spec.module)
        spec.submodules = _swap_linears(spec.submodules)
    elif dataclasses.is_dataclass(spec):
        for field in dataclasses.fields(spec):
            setattr(spec, field.name, _swap_linears(getattr(spec, field.name)))
    return spec


def count_parameters(model: torch.nn.Module) -> Dict[str, int]:
    """Inference parameter counts of the whole model (all TP and PP ranks), as the paper counts.

    An ESPACE layer counts ``L·(K+N)`` (``P`` and ``Pᵀ W``) plus its bias in place of ``K·N``.
    Returns ``{"total", "gemm", "gemm_dense", "embedding", "output_layer", "other"}``: the
    candidate linear layers as they are and as they would be dense, the embeddings, an untied
    output layer, and the rest (norms). Collective over the pipeline-parallel group. With
    tied embeddings the last pipeline stage's copy of the embedding (megatron's
    ``output_layer.weight`` marked ``shared_embedding``) is not counted again.
    """
    from megatron.core import parallel_state

    from megatron_espace.runtime import device

    model = unwrap(model)
    layers = linear_layers(model)
    layer_params = {id(p) for m in layers.values() for p in m.parameters(recurse=False)}
    tp = parallel_state.get_tensor_model_parallel_world_size()
    parts = {"embedding": 0, "output_layer": 0, "other": 0}
    for name, p in model.named_parameters():
        if id(p) in layer_params or (name.startswith("output_layer.")
                                     and getattr(p, "shared_embedding", False)):
            continue
        part = ("embedding" if name.startswith("embedding.") else
                "output_layer" if name.startswith("output_layer.") else "other")
        parts[part] += p.numel() * (tp if getattr(p, "tensor_model_parallel", False) else 1)
    rows = layer_table(model, gather=False)
    parts["gemm"] = sum(r["params"] for r in rows)
    parts["gemm_dense"] = sum(r["dense"] for r in rows)
    keys = sorted(parts)
    counts = torch.tensor([parts[k] for k in keys], dtype=torch.long, device=device())
    if torch.distributed.is_initialized():
        group = parallel_state.get_pipeline_model_parallel_group()
        torch.distributed.all_reduce(counts, group=group)
    out = dict(zip(keys, counts.tolist()))
    out["total"] = sum(out[k] for k in ("embedding", "output_layer", "other", "gemm"))
    return out


def layer_table(model: torch.nn.Module, gather: bool = True) -> list:
    """Per candidate linear: kind, K, N, rank (None: dense), dense and actual parameters.

    ``gather`` collects every pipeline stage's rows on every rank (collective).
    """
    rows = []
    for name, m in linear_layers(model).items():
        k, n = m.input_size, m.output_size
        bias = 0 if m.bias is None else n
        rank = getattr(m, "projection_rank", None)
        rows.append({"layer": name, "kind": _kind(m), "K": k, "N": n, "rank": rank,
                     "dense": k * n + bias,
                     "params": (rank * (k + n) if rank else k * n) + bias})
    if gather and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        from megatron.core import parallel_state

        group = parallel_state.get_pipeline_model_parallel_group()
        gathered = [None] * torch.distributed.get_world_size(group)
        torch.distributed.all_gather_object(gathered, rows, group=group)
        rows = [r for part in gathered for r in part]
    return sorted(rows, key=lambda r: layer_order(r["layer"]))


_GEMM_ORDER = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


def layer_order(name: str):
    """Forward order: by layer number, then qkv, proj, fc1, fc2."""
    parts = name.split(".")
    number = next((int(p) for p in parts if p.isdigit()), -1)
    last = parts[-1]
    return (number, _GEMM_ORDER.index(last) if last in _GEMM_ORDER else len(_GEMM_ORDER), name)
