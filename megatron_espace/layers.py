"""ESPACE tensor-parallel linears: megatron-core's linears with a frozen input projection.

``ESPACEColumnParallelLinear`` / ``ESPACERowParallelLinear`` subclass
``ColumnParallelLinear`` / ``RowParallelLinear`` with the same constructor, so
they drop into a ``ModuleSpec``; ``weight`` and ``bias`` keep their names, so
baseline checkpoints and optimizer state load unchanged. The projection ``P``
(K×L, orthonormal columns) is the persistent buffer ``espace_proj``: never a
parameter, never seen by the optimizer or DDP.

Tensor parallelism (DESIGN section 2), with ``projected_linear`` computing
``Z = x P``, ``A = W P``, ``Ŷ = Z Aᵀ``:

* column-parallel: ``P`` is replicated. Under sequence parallelism ``Z`` is
  all-gathered along the sequence (L wide instead of K) and ``dZ``
  reduce-scattered.
* row-parallel: rank r holds the rows ``P_r`` of ``P`` matching its K-slice of
  the input. ``A = Σ_r W_r P_r`` is one all-reduce of the N×L ``A`` (independent
  of the token count). Under sequence parallelism ``Z = Σ_r x_r P_r`` is
  reduce-scattered along the sequence, after which ``Ŷ = Z Aᵀ`` is already the
  rank's output (no N-wide reduction); backwards ``dZ`` is all-gathered and
  ``dA`` all-reduced.

Without sequence parallelism the layers run **sequence-parallel inside**: the
tokens ``[s, b]`` are flattened (zero-padded to a multiple of TP when they do
not divide), a column layer splits its replicated input locally and gathers
``dx`` back (started before, and waited for after, its weight gradient), a row layer all-gathers its token-split output (its output gradient
is replicated, so each rank takes its slice), and in between the layer is
exactly its sequence-parallel self. Every GEMM is then split across TP. It is
done where it moves no more bytes than the dense layer, fwd + bwd, counted as
ring collectives (all-reduce ``2(t-1)/t`` of the tensor, all-gather and
reduce-scatter ``(t-1)/t`` of the full one), with ``M`` tokens:

* column: ``(2L + K)·M`` against dense's ``2K·M`` (its ``dx`` all-reduce):
  whenever ``L ≤ K/2``, which any power-of-two ``L`` below a power-of-two
  ``K`` meets;
* row: ``2L·M + N·M + 4N·L`` (``2N·L`` once compressed: ``A`` is not reduced)
  against dense's ``2N·M`` (its output all-reduce): roughly ``L ≤ N/2`` for
  ``M ≫ N``, less for short inputs. In a step of ``n ≥ 2`` micro-batches under a
  :class:`~megatron_espace.projected_linear.StepState` (``accumulation.py``) ``A`` and
  ``dA`` are reduced once per step, counted as ``2N·L`` per call (their ``4N·L`` over
  at least two calls), so the step as a whole still moves no more than dense.

Under ``torch.no_grad`` (inference) the forward's bytes alone decide: a column
layer then stays replicated (dense sends nothing forward), a row layer sends
``(L + N)·M`` (``+ 2N·L`` for ``A``) against ``2N·M``.

Otherwise (the rule is evaluated per call, on shapes and grad mode only, the same
on every rank) they keep the replicated form: column all-reduces ``dZ`` (L wide),
row all-reduces ``Z`` and ``A`` and computes ``Ŷ = Z Aᵀ`` on all ``M`` tokens.

For training ``P`` is stored in float32 (float64 for float64 weights) whatever later
casts the module gets (``Float16Module`` casts buffers to bf16; ours is exempt, so
checkpoints keep the exact P) and is cast to the activation dtype in each GEMM. The
compressed inference layers store it in the model's dtype, like ``A`` (bf16 for a bf16
model: the GEMMs used it in that dtype anyway, and it halves P's bytes).
"""

import inspect
import math
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron.core.tensor_parallel.mappings import (
    _gather_along_first_dim,
    _reduce,
    _reduce_scatter_along_first_dim,
    _split_along_first_dim,
)

from megatron_espace.projected_linear import ProjectionComm, StepState, projected_linear
from megatron_espace.projection import orthonormality_error

#: tolerance of the orthonormality check ``max |PᵀP − I|`` in ``set_projection``
ORTHONORMAL_ATOL = 1e-4

_IDENTITY = lambda t: t  # noqa: E731


def _all_reduce(group):
    return lambda t: _reduce(t.contiguous(), group)


def _all_gather_seq(group):
    return lambda t: _gather_along_first_dim(t.contiguous(), group)


def _reduce_scatter_seq(group):
    return lambda t: _reduce_scatter_along_first_dim(t.contiguous(), group)


def _all_gather_rows_async(group):
    """All-gather along dim 0, started now; the returned callable waits for it."""
    def start(t):
        out = t.new_empty((t.shape[0] * group.size(), *t.shape[1:]))
        handle = dist.all_gather_into_tensor(out, t.contiguous(), group=group, async_op=True)
        return lambda: (handle.wait(), out)[1]
    return start


def _unpadded(t: torch.Tensor, tokens: int) -> torch.Tensor:
    """The first ``tokens`` rows of ``t``; ``t`` itself when there is no padding (a slice's
    backward would build a zero-filled copy of the whole gradient)."""
    return t if t.shape[0] == tokens else t[:tokens]


def _flat_tokens(x: torch.Tensor, tp: int) -> torch.Tensor:
    """``[s, b, K] -> [M', K]``: the ``M = s·b`` tokens in one dim, zero rows appended up to
    ``M'``, the next multiple of ``tp``."""
    flat = x.reshape(-1, x.shape[-1])
    pad = -flat.shape[0] % tp
    return F.pad(flat, (0, 0, 0, pad)) if pad else flat


def _known_kwargs(parent, kwargs):
    """Drop keyword arguments ``parent`` does not take (``pg_collection=`` of newer cores)."""
    accepted = inspect.signature(parent.__init__).parameters
    return {k: v for k, v in kwargs.items() if k in accepted}


class _Collectives(ProjectionComm):
    """A :class:`ProjectionComm` made of four callables."""

    def __init__(self, z_forward=_IDENTITY, z_backward=_IDENTITY, a_forward=_IDENTITY,
                 a_backward=_IDENTITY, x_forward=_IDENTITY, x_backward=None):
        self.z_forward, self.z_backward = z_forward, z_backward
        self.a_forward, self.a_backward = a_forward, a_backward
        self.reduces_da = a_backward is not _IDENTITY
        self.x_forward = x_forward
        if x_backward is not None:
            self.x_backward = x_backward


def _load_projection_hook(module, state_dict, prefix, *args):
    """``load_state_dict``: a state dict without P (a baseline's) keeps the layer's P; a P
    for a layer that has none yet is taken (its local part, as saved)."""
    key = prefix + "espace_proj"
    if key not in state_dict:
        if module.espace_proj is not None:
            state_dict[key] = module.espace_proj
    elif module.espace_proj is None and state_dict[key] is not None:
        module.espace_proj = torch.empty_like(state_dict[key], device=module.weight.device)


class _ESPACEMixin:
    """The projection buffer, its validation, its dtype rule and its checkpoint entry."""

    #: axis of ``espace_proj`` sharded across TP (None: replicated)
    _proj_tp_axis: Optional[int] = None

    def __init__(self, input_size, output_size, *, config, init_method, name=None, **kwargs):
        parent = next(c for c in type(self).__mro__
                      if c in (ColumnParallelLinear, RowParallelLinear))
        super().__init__(input_size, output_size, config=config, init_method=init_method,
                         **_known_kwargs(parent, kwargs))
        self._init_espace(name)

    def _init_espace(self, name: Optional[str]):
        # Expert linears with explicit expert communication reduce outside the layer.
        self._espace_unsupported = (
            "MoE expert linears are not supported" if self.explicit_expert_comm else None
        )
        self.espace_name = name or type(self).__name__
        self.espace_step = StepState()  # A and dW once per optimizer step (accumulation.py)
        self.register_buffer("espace_proj", None, persistent=True)
        self._register_load_state_dict_pre_hook(_load_projection_hook, with_module=True)

    @property
    def projection_rank(self) -> Optional[int]:
        """``L``; None when the layer has no projection and behaves exactly like its parent."""
        return None if self.espace_proj is None else self.espace_proj.shape[1]

    def _tp_size_rank(self):
        if self.tp_group is None or self.tp_group.size() == 1:
            return 1, 0
        return self.tp_group.size(), self.tp_group.rank()

    def projection_rows(self) -> Tuple[int, int]:
        """The rows ``(start, stop)`` of the full K×L ``P`` this rank keeps (its K-slice when
        row-parallel, all K otherwise): what it needs to read from a projections file."""
        if self._proj_tp_axis is None:
            return 0, self.input_size
        tp, rank = self._tp_size_rank()
        return rank * self.input_size // tp, (rank + 1) * self.input_size // tp

    def set_projection(self, proj: Optional[torch.Tensor], *, rows=None,
                       atol: float = ORTHONORMAL_ATOL):
        """Install ``proj``: the full ``[input_size, L]`` matrix, identical on every TP rank,
        or with ``rows=self.projection_rows()`` only the rows this rank keeps.

        The layer keeps its own part (all of it, or its K-rows when row-parallel).
        Collective over the TP group (the ranks' P are compared; for row shards, the
        orthonormality ``Σ_r P_rᵀ P_r = I`` is checked across them).
        ``None`` or ``L = 0`` removes the projection. Raises ``ValueError`` naming the
        layer for a wrong shape, non-orthonormal columns or TP ranks that disagree.
        """
        if proj is None or (proj.dim() == 2 and proj.shape[1] == 0):
            self.espace_proj = None
            return
        where = f"ESPACE layer '{self.espace_name}'"
        if self._espace_unsupported:
            raise ValueError(f"{where}: {self._espace_unsupported}")
        rows = (0, self.input_size) if rows is None else tuple(rows)
        if rows != (0, self.input_size):
            if rows != self.projection_rows():
                raise ValueError(f"{where}: rows {rows} of P given, this rank keeps rows "
                                 f"{self.projection_rows()}")
            self.espace_proj = self._checked_row_shard(proj, where, atol)
            return
        if proj.dim() != 2 or proj.shape[0] != self.input_size:
            raise ValueError(
                f"{where}: projection has shape {tuple(proj.shape)}, expected "
                f"[{self.input_size}, L] (K = input_size = {self.input_size})"
            )
        if proj.shape[1] > self.input_size:
            raise ValueError(f"{where}: rank L={proj.shape[1]} exceeds K={self.input_size}")
        if not torch.isfinite(proj).all():
            raise ValueError(f"{where}: projection contains NaN or Inf")
        err = orthonormality_error(proj)
        if err > atol:
            raise ValueError(
                f"{where}: projection columns are not orthonormal: max |PᵀP - I| = {err:.3e} "
                f"> {atol:.0e}"
            )
        full = proj.detach().to(device=self.weight.device, dtype=self._proj_dtype()).contiguous()
        tp, rank = self._tp_size_rank()
        if tp > 1:
            reference = full.clone()
            dist.broadcast(reference, src=dist.get_global_rank(self.tp_group, 0),
                           group=self.tp_group)
            diff = (reference - full).abs().max().reshape(1)
            dist.all_reduce(diff, op=dist.ReduceOp.MAX, group=self.tp_group)
            if diff.item() > 0:
                raise ValueError(
                    f"{where}: projection differs across tensor-parallel ranks "
                    f"(max |P_rank - P_rank0| = {diff.item():.3e}); pass the same full P everywhere"
                )
        if self._proj_tp_axis is not None:
            full = full.chunk(tp, dim=self._proj_tp_axis)[rank].contiguous()
        self.espace_proj = full

    def _checked_row_shard(self, proj, where, atol) -> torch.Tensor:
        """This rank's rows ``P_r`` of a row-parallel P, checked against the other TP ranks'."""
        start, stop = self.projection_rows()
        if proj.dim() != 2 or proj.shape[0] != stop - start:
            raise ValueError(f"{where}: projection rows have shape {tuple(proj.shape)}, "
                             f"expected [{stop - start}, L] (rows {start}:{stop} of K)")
        local = proj.detach().to(device=self.weight.device, dtype=self._proj_dtype()).contiguous()
        rank = torch.tensor([local.shape[1], -local.shape[1]], device=local.device)
        dist.all_reduce(rank, op=dist.ReduceOp.MAX, group=self.tp_group)
        if rank[0] != -rank[1] or rank[0] > self.input_size:
            raise ValueError(f"{where}: tensor-parallel ranks pass ranks L from {-rank[1]} to "
                             f"{rank[0]} (K={self.input_size})")
        gram = local.t().to(torch.float64) @ local.to(torch.float64)
        dist.all_reduce(gram, group=self.tp_group)  # Σ_r P_rᵀ P_r = PᵀP
        err = (gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)).abs()
        err = err.max().item() if err.numel() else 0.0
        if not math.isfinite(err):
            raise ValueError(f"{where}: projection contains NaN or Inf (on some TP rank)")
        if err > atol:
            raise ValueError(f"{where}: projection columns are not orthonormal: max |PᵀP - I| = "
                             f"{err:.3e} > {atol:.0e} (P's rows gathered over TP)")
        return local

    def _proj_dtype(self) -> torch.dtype:
        return torch.float64 if self.weight.dtype == torch.float64 else torch.float32

    def _apply(self, fn, recurse=True):
        # P follows device moves; its dtype is _proj_dtype's after any cast (module doc).
        proj = self._buffers.get("espace_proj")
        self._buffers["espace_proj"] = None
        try:
            super()._apply(fn, recurse)
        finally:
            if proj is not None:
                target = fn(torch.empty(0, device=proj.device)).device
                self._buffers["espace_proj"] = proj.to(device=target, dtype=self._proj_dtype())
        return self

    def _per_layer_tensors(self) -> dict:
        """Tensors saved under per-layer keys: name -> TP-sharded axis (None: replicated)."""
        return {"espace_proj": self._proj_tp_axis}

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """The parent's entries plus ``P`` (and ``A`` once compressed) under per-layer keys.

        Layers are stacked under one key in torch_dist checkpoints, but ``L`` may differ per
        layer, so these are saved without the layer offset, as
        ``{prefix}espace_proj.L{global_layer}`` (PP-invariant, and W's keys stay baseline's).
        """
        from megatron.core.utils import (
            make_sharded_tensor_for_checkpoint,
            make_tp_sharded_tensor_for_checkpoint,
        )

        axes = self._per_layer_tensors()
        held = {n: d.pop(n) for d in (self._buffers, self._parameters) for n in list(d)
                if n in axes}
        try:
            sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        finally:
            for name, tensor in held.items():
                (self._parameters if isinstance(tensor, torch.nn.Parameter)
                 else self._buffers)[name] = tensor
        groups = dict(tp_group=self.tp_group, dp_cp_group=(metadata or {}).get("dp_cp_group"))
        if groups["dp_cp_group"] is None:
            from megatron.core import parallel_state

            groups["dp_cp_group"] = parallel_state.get_data_parallel_group(
                with_context_parallel=True
            )
        layer = f".L{sharded_offsets[0][1]}" if sharded_offsets else ""
        for name, tensor in held.items():
            if tensor is None:
                continue
            key = f"{prefix}{name}{layer}"
            if axes[name] is None:
                sharded[f"{prefix}{name}"] = make_sharded_tensor_for_checkpoint(
                    tensor, key, **groups)
            else:
                sharded[f"{prefix}{name}"] = make_tp_sharded_tensor_for_checkpoint(
                    tensor, key, tp_axis=axes[name], **groups)
        return sharded

    def _comm(self, sequence_parallel: bool, split_input: bool = False) -> ProjectionComm:
        tp, _ = self._tp_size_rank()
        if tp == 1:
            return _Collectives()
        comm = self._collectives(self.tp_group, sequence_parallel)
        if split_input:  # a replicated input's token rows; dx all-gathered back
            comm.x_forward = lambda t: _split_along_first_dim(t, self.tp_group)
            comm.x_backward = _all_gather_rows_async(self.tp_group)
        return comm

    def _splits_tokens(self, tokens: int) -> bool:
        """Whether a call on ``tokens`` tokens runs sequence-parallel inside (module doc):
        TP > 1, no sequence parallelism already, and no more bytes than the dense layer."""
        tp, _ = self._tp_size_rank()
        if tp == 1 or self.sequence_parallel:
            return False
        padded = tokens + (-tokens % tp)
        backward = torch.is_grad_enabled()  # forward-only (inference): its bytes alone
        return self._inner_sp_bytes(padded, backward) <= self._dense_bytes(tokens, backward)

    #: whether the GEMM weight is already ``A = W P`` (the compressed form)
    _precomputed = False

    def _gemm_weight(self, weight=None):
        return self.weight if weight is None else weight

    def _step(self):
        """The :class:`StepState` a training micro-batch of a multi-micro-batch step uses
        (``accumulation.defer_weight_grads`` turns it on), else None."""
        step = self.espace_step
        return step if self.training and not self._precomputed and step.active else None

    def _gemm(self, x, weight=None, sequence_parallel=None, split_input=False):
        own = weight is None
        weight = self._gemm_weight(weight)
        accumulate = bool(self.gradient_accumulation_fusion) and own
        sp = self.sequence_parallel if sequence_parallel is None else sequence_parallel
        return projected_linear(x, weight, self.espace_proj, self._comm(sp, split_input),
                                accumulate,
                                precomputed=self._precomputed,
                                step=self._step() if own else None)

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, espace_rank={self.projection_rank})"


class ESPACEColumnParallelLinear(_ESPACEMixin, ColumnParallelLinear):
    """``ColumnParallelLinear`` computing ``Wᵀ P Pᵀ X``; P replicated on every TP rank."""

    _proj_tp_axis = None

    def _collectives(self, group, sequence_parallel) -> ProjectionComm:
        if sequence_parallel:
            return _Collectives(z_forward=_all_gather_seq(group),
                                z_backward=_reduce_scatter_seq(group))
        if self.disable_grad_reduce:
            return _Collectives()
        return _Collectives(z_backward=_all_reduce(group))

    def _dense_bytes(self, tokens, backward):  # in elements, ring factors dropped (module doc)
        return 2 * self.input_size * tokens if backward else 0

    def _inner_sp_bytes(self, padded, backward):
        if self.disable_grad_reduce:  # the caller reduces dx: the parent moves nothing
            return float("inf")
        return (2 * self.projection_rank + self.input_size if backward
                else self.projection_rank) * padded

    def forward(self, input_, weight=None, runtime_gather_output=None):
        """``input_ [s(/tp under SP), b, K] -> ([s, b, N/tp] or gathered [s, b, N], bias)``."""
        if self.espace_proj is None:
            return super().forward(input_, weight, runtime_gather_output)
        if weight is not None and weight.shape != (self.output_size_per_partition,
                                                   self.input_size):
            raise RuntimeError(
                f"supplied weight's shape is {tuple(weight.shape)}, "
                f"not {(self.output_size_per_partition, self.input_size)} as expected"
            )
        tokens = input_.shape[:-1].numel()
        if self._splits_tokens(tokens):
            flat = _flat_tokens(input_, self._tp_size_rank()[0])
            output = _unpadded(
                self._gemm(flat, weight, sequence_parallel=True, split_input=True), tokens)
            output = output.reshape(*input_.shape[:-1], output.shape[-1])
        else:
            output = self._gemm(input_, weight)
        if self.bias is not None and not self.skip_bias_add:
            output = output + self.bias
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        if gather:
            output = gather_from_tensor_model_parallel_region(output, group=self.tp_group)
        return output, (self.bias if self.skip_bias_add else None)


class ESPACERowParallelLinear(_ESPACEMixin, RowParallelLinear):
    """``RowParallelLinear`` computing ``Wᵀ P Pᵀ X``; rank r holds the rows ``P_r``."""

    _proj_tp_axis = 0

    def _collectives(self, group, sequence_parallel) -> ProjectionComm:
        if sequence_parallel:
            return _Collectives(z_forward=_reduce_scatter_seq(group),
                                z_backward=_all_gather_seq(group),
                                a_forward=_all_reduce(group), a_backward=_all_reduce(group))
        return _Collectives(z_forward=_all_reduce(group), a_forward=_all_reduce(group))

    def _dense_bytes(self, tokens, backward):  # in elements, ring factors dropped (module doc)
        return 2 * self.output_size * tokens

    def _inner_sp_bytes(self, padded, backward):
        n, rank = self.output_size, self.projection_rank
        # Z and Ŷ forward (dZ backward); A unless precomputed (and dA backward), once per
        # step of n ≥ 2 micro-batches under a StepState: at most half of each per call
        z_widths = 2 * rank + n if backward else rank + n
        a_reductions = (0 if self._precomputed else 2) + (2 if backward else 0)
        if self._step() is not None:
            a_reductions //= 2
        return z_widths * padded + a_reductions * n * rank

    def forward(self, input_):
        """``input_ [s, b, K/tp] -> ([s(/tp under SP), b, N], bias)``."""
        if self.espace_proj is None:
            return super().forward(input_)
        if self.input_is_parallel:
            input_parallel = input_
        else:
            input_parallel = scatter_to_tensor_model_parallel_region(input_, group=self.tp_group)
        tokens = input_parallel.shape[:-1].numel()
        if self._splits_tokens(tokens):
            flat = _flat_tokens(input_parallel, self._tp_size_rank()[0])
            local = self._gemm(flat, sequence_parallel=True)
            output = _unpadded(gather_from_sequence_parallel_region(
                local, tensor_parallel_output_grad=False, group=self.tp_group), tokens)
            output = output.reshape(*input_parallel.shape[:-1], output.shape[-1])
        else:
            output = self._gemm(input_parallel)
        if self.skip_bias_add:
            return output, self.bias
        return (output + self.bias if self.bias is not None else output), None


class _CompressedMixin:
    """The inference form (paper Eq. 3): ``Ŷ = Bᵀ (Pᵀ X)`` with ``A = Bᵀ = W P`` precomputed.

    Holds ``P`` (``espace_proj``, as before) and the parameter ``espace_weight`` = A; the
    dense ``weight`` is gone. Column-parallel: A is ``[N/tp, L]``, sharded along N like W.
    Row-parallel: A is the full ``[N, L]`` (``Σ_r W_r P_r``, replicated), P's rows stay
    sharded and ``Z`` is all-reduced (reduce-scattered under sequence parallelism), after
    which each rank already holds its output.
    """

    _a_tp_axis: Optional[int] = None

    def _per_layer_tensors(self) -> dict:
        return {"espace_proj": self._proj_tp_axis, "espace_weight": self._a_tp_axis}

    @torch.no_grad()
    def _compress(self) -> None:
        """Replace ``weight`` by ``A = W P`` (all-reduced over TP for row-parallel layers)."""
        w = self.weight
        a = torch.matmul(w.to(self.espace_proj.dtype), self.espace_proj)
        if self._a_tp_axis is None:
            tp, _ = self._tp_size_rank()
            if tp > 1:
                dist.all_reduce(a, group=self.tp_group)
        param = torch.nn.Parameter(a.to(w.dtype), requires_grad=w.requires_grad)
        param.tensor_model_parallel = self._a_tp_axis is not None
        param.partition_dim = 0 if self._a_tp_axis is not None else -1
        param.partition_stride = 1
        param.allreduce = getattr(w, "allreduce", True)
        self.register_parameter("weight", None)
        self.espace_weight = param
        self.espace_proj = self.espace_proj.to(self._proj_dtype())

    def _proj_dtype(self) -> torch.dtype:
        return self.espace_weight.dtype  # the model's dtype (module doc)

    _precomputed = True

    def _gemm_weight(self, weight=None):
        if weight is not None:
            raise RuntimeError(f"{self.espace_name}: a compressed layer takes no weight argument")
        return self.espace_weight


class CompressedColumnParallelLinear(_CompressedMixin, ESPACEColumnParallelLinear):
    """Compressed inference form of :class:`ESPACEColumnParallelLinear`."""

    _a_tp_axis = 0


class CompressedRowParallelLinear(_CompressedMixin, ESPACERowParallelLinear):
    """Compressed inference form of :class:`ESPACERowParallelLinear`."""

    _a_tp_axis = None
