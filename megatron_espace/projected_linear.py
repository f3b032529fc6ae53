"""The ESPACE GEMM ``Ŷ = Wᵀ P Pᵀ X`` in the efficient order (paper Section 3, Eq. 1).

Pure torch. Shapes use megatron's storage: ``x [..., K]``, ``weight [N, K]``,
``proj [K, L]`` (orthonormal columns), output ``[..., N]``. With ``M`` tokens:

    forward   Z = x P  [M, L]      A = W P  [N, L]      Ŷ = Z Aᵀ  [M, N]
    backward  dA = dŶᵀ Z           dW = dA Pᵀ            dZ = dŶ A      dx = dZ Pᵀ

``P Pᵀ`` (K×K) is never formed and ``x`` itself is not saved for backward (only
the L-wide ``Z``). Tensor parallelism enters through four collectives, one on
each side of the two products, and optionally a token split of ``x`` whose ``dx`` is
gathered while the weight gradient is computed; a :class:`ProjectionComm` supplies them
(identity by default, so this module knows nothing about process groups).

``A`` and ``dW`` depend on the micro-batch only through ``dA``: within one optimizer step
``W`` is fixed and ``P`` never changes, so with gradient accumulation over ``n``
micro-batches a :class:`StepState` computes ``A`` once and ``dW = (Σ dA) Pᵀ`` once (at the
last micro-batch's backward) instead of ``n`` times each: ``2·N·K·L`` FLOPs saved twice per
extra micro-batch, for an ``N×L`` float32 ``Σ dA`` kept through the step.
"""

from typing import Optional

import torch


class ProjectionComm:
    """Collectives around ``x``, ``Z`` and ``A``; all identity (a single device)."""

    #: whether ``a_backward`` reduces (``dA`` holds this rank's tokens only)
    reduces_da = False

    def x_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The rows of ``x`` this rank computes with."""
        return x

    def x_backward(self, dx: torch.Tensor):
        """Start turning this rank's ``dx`` rows into the gradient of the whole ``x``;
        returns a callable that finishes it (called after the weight gradient)."""
        return lambda: dx

    def z_forward(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def z_backward(self, dz: torch.Tensor) -> torch.Tensor:
        return dz

    def a_forward(self, a: torch.Tensor) -> torch.Tensor:
        return a

    def a_backward(self, da: torch.Tensor) -> torch.Tensor:
        return da


IDENTITY = ProjectionComm()


class StepState:
    """One layer's weight-side work for one optimizer step: ``A`` once, ``dW`` once.

    ``deferring`` is set while the backward passes are not the step's last (megatron's
    ``no_sync``); the backward then only adds ``dA`` (``[N, L]``, float32, float64 for
    float64 models) to the running sum. The first backward with ``deferring`` unset
    expands ``dW = (Σ dA) Pᵀ`` into ``weight.main_grad`` and ends the step: ``A`` is
    dropped, so the next forward computes it from the updated ``W``.
    """

    def __init__(self):
        self.deferring = False
        self.a: Optional[torch.Tensor] = None
        self._sums = {}  # reduces_da -> (Σ dA, the comm that reduces it)

    @property
    def active(self) -> bool:
        """Whether a forward now belongs to a multi-micro-batch step."""
        return self.deferring or self.a is not None

    @property
    def pending(self) -> bool:
        """Whether ``dA`` was kept that no ``dW`` has taken yet."""
        return bool(self._sums)

    def nbytes(self) -> int:
        """Bytes held now: ``A`` and the ``Σ dA`` parts."""
        held = [t for t, _ in self._sums.values()] + ([self.a] if self.a is not None else [])
        return sum(t.nbytes for t in held)

    def projected_weight(self, weight, p, comm) -> torch.Tensor:
        """``A = W P`` (after ``comm.a_forward``), computed at the step's first forward."""
        if self.a is None:
            with torch.no_grad():
                self.a = comm.a_forward(torch.matmul(weight, p))
        return self.a

    def add(self, da: torch.Tensor, comm: ProjectionComm) -> None:
        """Keep ``da``, this micro-batch's ``dA`` before ``comm.a_backward``."""
        dtype = torch.float64 if da.dtype == torch.float64 else torch.float32
        total, _ = self._sums.get(comm.reduces_da, (None, None))
        total = da.to(dtype) if total is None else total.add_(da)
        self._sums[comm.reduces_da] = (total, comm)

    def flush(self, weight: torch.Tensor, proj: torch.Tensor) -> None:
        """End the step: ``weight.main_grad += (Σ dA) Pᵀ`` (each part of ``Σ dA`` reduced
        once; collective where they reduce), and forget ``A``."""
        if self._sums:
            parts = [comm.a_backward(total) for total, comm in self._sums.values()]
            total = parts[0] if len(parts) == 1 else parts[0] + parts[1]
            weight.main_grad.add_(total @ proj.to(total.dtype).t())
        self.reset()

    def reset(self) -> None:
        self.a = None
        self._sums = {}


def _dummy_grad(weight: torch.Tensor) -> torch.Tensor:
    """The placeholder gradient once the gradient went into ``main_grad``, which megatron
    DDP's hook skips (``grad_added_to_main_grad``): zeros (not megatron's ``empty``), so a
    ``.grad`` read without that hook is never garbage."""
    weight.grad_added_to_main_grad = True
    return torch.zeros_like(weight)


class _ProjectedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, proj, comm, accumulate_main_grad, precomputed, step):
        p = proj.to(x.dtype)
        z = comm.z_forward(torch.matmul(comm.x_forward(x), p))
        if precomputed:
            a = weight
        elif step is not None:
            a = step.projected_weight(weight, p, comm)
        else:
            a = comm.a_forward(torch.matmul(weight, p))
        ctx.save_for_backward(z, a, p)
        ctx.comm, ctx.precomputed, ctx.step, ctx.proj = comm, precomputed, step, proj
        ctx.weight = weight if accumulate_main_grad or step is not None else None
        return torch.matmul(z, a.t())

    @staticmethod
    def backward(ctx, dy):
        z, a, p = ctx.saved_tensors
        comm = ctx.comm
        dx = dw = None
        if ctx.needs_input_grad[0]:  # first, so that gathering dx overlaps the weight grad
            dx = comm.x_backward(torch.matmul(comm.z_backward(torch.matmul(dy, a)), p.t()))
        if ctx.needs_input_grad[1]:
            da = dy.reshape(-1, dy.shape[-1]).t() @ z.reshape(-1, z.shape[-1])
            if ctx.step is not None:
                dw = _step_weight_grad(ctx, da)
            else:
                da = comm.a_backward(da)
                dw = da if ctx.precomputed else da @ p.t()
                weight = ctx.weight
                if weight is not None and hasattr(weight, "main_grad"):
                    # megatron gradient_accumulation_fusion: add into the fp32 main grad.
                    weight.main_grad.add_(dw)
                    dw = _dummy_grad(weight) if hasattr(weight, "grad_added_to_main_grad") \
                        else None
        return (None if dx is None else dx()), dw, None, None, None, None, None


def _step_weight_grad(ctx, da):
    """The weight gradient under a :class:`StepState`: ``dA`` kept, and ``dW = (Σ dA) Pᵀ``
    added to ``main_grad`` at the step's last micro-batch (megatron DDP's placeholder)."""
    step, weight = ctx.step, ctx.weight
    step.add(da, ctx.comm)
    if not step.deferring:
        step.flush(weight, ctx.proj)
    return _dummy_grad(weight)


def projected_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    proj: torch.Tensor,
    comm: ProjectionComm = IDENTITY,
    accumulate_main_grad: bool = False,
    precomputed: bool = False,
    step: Optional[StepState] = None,
) -> torch.Tensor:
    """``x [..., K_local] -> [..., N_local]``: ``(x P)(W P)ᵀ`` with the collectives of ``comm``.

    With ``precomputed`` ``weight`` is already ``A = W P`` ``[N, L]`` (the compressed
    inference layer, paper Eq. 3: ``Ŷ = Bᵀ (Pᵀ X)`` with ``B = Aᵀ``) and its gradient is
    ``dA``. ``proj`` is cast to ``x.dtype`` for the GEMMs. With ``accumulate_main_grad``
    the weight gradient is added to ``weight.main_grad`` (megatron's
    gradient-accumulation fusion) instead of being returned. With ``step`` (a training
    micro-batch of a multi-micro-batch step; ``weight`` needs megatron DDP's ``main_grad``)
    ``A`` and ``dW`` are the step's (:class:`StepState`).
    """
    return _ProjectedLinear.apply(x, weight, proj, comm, accumulate_main_grad, precomputed,
                                  step)
