"""Gradient accumulation for ESPACE layers: ``A = W P`` and ``dW = (Σ dA) Pᵀ`` once per step.

With ``n`` micro-batches per optimizer step, each ESPACE layer would otherwise compute
``A = W P`` and ``dW = dA Pᵀ`` ``n`` times (``2·N·K·L`` FLOPs each), although ``W`` only
changes at the optimizer step and ``P`` never does. :func:`defer_weight_grads` hooks the
signal megatron's schedules already give: every backward but a model chunk's last in the
step runs inside the chunk's ``no_sync()``. Inside it the layers keep ``Σ dA``
(``projected_linear.StepState``); the last backward expands ``dW`` once into
``weight.main_grad``, in that backward, so megatron DDP's gradient hooks (and
``--overlap-grad-reduce``), the gradient reduction that follows, the distributed
optimizer and ``--gradient-accumulation-fusion`` see what they saw before. Where a schedule
runs even the last backward inside ``no_sync`` and reduces through ``config.grad_sync_func``
(``--align-grad-reduce``: pipeline stages after the first, interleaved chunks), the chunk's
``start_grad_sync`` / ``finish_grad_sync`` expand what is pending first.

Per-rank cost of a layer with ``N`` outputs (its rank's), rank ``L``, ``n`` micro-batches:
``A`` and ``dW`` ``2·N·K·L`` FLOPs once instead of ``n`` times each; memory
(:func:`step_bytes`): ``Σ dA``, ``N·L`` float32 through the step, and ``A`` (each
micro-batch held one for its backward before; now one copy serves them all).
Row-parallel layers all-reduce ``A`` and ``dA`` once per step.
"""

import contextlib
from typing import Iterable

import torch

from megatron_espace.layers import _ESPACEMixin


def _espace_layers(chunk):
    return [m for m in chunk.modules() if isinstance(m, _ESPACEMixin)]


def step_bytes(model_chunks, activation_dtype) -> int:
    """Bytes the deferred layers of ``model_chunks`` hold through a step on this rank:
    per layer ``A`` (``[N_local, L]`` in ``activation_dtype``; the full N for row-parallel
    layers) and ``Σ dA`` (the same shape, float32; float64 for float64 weights), where
    ``N_local`` is the rows of the rank's ``weight``. (A row-parallel layer whose
    micro-batches differ in token count may split some and not others: it then holds two
    ``Σ dA``.)
    """
    size = torch.empty(0, dtype=activation_dtype).element_size()
    total = 0
    for chunk in model_chunks:
        for m in _espace_layers(chunk):
            if m.projection_rank is None or m.weight is None or not m.weight.requires_grad:
                continue
            sums = 8 if m.weight.dtype == torch.float64 else 4
            total += m.weight.shape[0] * m.projection_rank * (size + sums)
    return total


def defer_weight_grads(model_chunks: Iterable) -> int:
    """Make each megatron DDP chunk's ``no_sync`` also defer its ESPACE layers' weight work.

    Wraps the chunks' ``no_sync``, ``zero_grad_buffer``, ``start_grad_sync`` and
    ``finish_grad_sync`` (on the instances), so the schedule's ``config.no_sync_func`` (and
    ``grad_sync_func``) must be the chunks' own, taken after this call (megatron-core's default with ``--overlap-grad-reduce``; set it otherwise: DDP's
    ``no_sync`` changes nothing else then). ``zero_grad_buffer``, called at the start of
    every step, drops any ``A`` of the last step and raises if a ``Σ dA`` was never expanded
    (a step whose last backward ran inside ``no_sync``). Returns the number of layers.
    """
    count = 0
    for chunk in model_chunks:
        if not all(hasattr(chunk, f) for f in ("no_sync", "zero_grad_buffer",
                                                 "start_grad_sync", "finish_grad_sync")):
            raise TypeError(f"defer_weight_grads: {type(chunk).__name__} is not a megatron "
                            "DistributedDataParallel chunk (no no_sync, zero_grad_buffer, "
                            "start_grad_sync, finish_grad_sync)")
        layers = _espace_layers(chunk)
        missing = [m.espace_name for m in layers
                   if m.weight is not None and m.weight.requires_grad
                   and not hasattr(m.weight, "main_grad")]
        if missing:
            raise TypeError(f"defer_weight_grads: the weights of {', '.join(missing[:4])} "
                            "have no main_grad (wrap the model in megatron DDP first)")
        _wrap(chunk, layers)
        count += len(layers)
    return count


def _wrap(chunk, layers) -> None:
    no_sync, zero_grad_buffer = chunk.no_sync, chunk.zero_grad_buffer

    def flushing(sync):
        def call(*args, **kwargs):
            for m in layers:
                if m.espace_step.pending:
                    m.espace_step.flush(m.weight, m.espace_proj)
            return sync(*args, **kwargs)
        return call

    @contextlib.contextmanager
    def deferring_no_sync():
        before = [m.espace_step.deferring for m in layers]
        with no_sync():
            for m in layers:
                m.espace_step.deferring = True
            try:
                yield
            finally:
                for m, was in zip(layers, before):
                    m.espace_step.deferring = was

    def checked_zero_grad_buffer():
        lost = [m.espace_name for m in layers if m.espace_step.pending]
        for m in layers:
            m.espace_step.reset()
        if lost:
            raise RuntimeError(
                f"ESPACE: the last step's weight gradients of {', '.join(lost[:4])} were kept "
                "for a later micro-batch that never came (its last backward ran inside "
                "no_sync): that step's update lacked them")
        zero_grad_buffer()

    chunk.no_sync = deferring_no_sync
    chunk.zero_grad_buffer = checked_zero_grad_buffer
    chunk.start_grad_sync = flushing(chunk.start_grad_sync)
    chunk.finish_grad_sync = flushing(chunk.finish_grad_sync)
