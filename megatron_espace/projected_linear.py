"""The ESPACE GEMM ``Ŷ = Wᵀ P Pᵀ X`` in the efficient order (paper Section 3, Eq. 1).

Pure torch. Shapes use megatron's storage: ``x [..., K]``, ``weight [N, K]``,
``proj [K, L]`` (orthonormal columns), output ``[..., N]``. With ``M`` tokens:

    forward   Z = x P  [M, L]      A = W P  [N, L]      Ŷ = Z Aᵀ  [M, N]
    backward  dA = dŶᵀ Z           dW = dA Pᵀ            dZ = dŶ A      dx = dZ Pᵀ

``P Pᵀ`` (K×K) is never formed and ``x`` itself is not saved for backward (only
the L-wide ``Z``). Tensor parallelism enters through four collectives, one on
each side of the two products; a :class:`ProjectionComm` supplies them
(identity by default, so this module knows nothing about process groups).
"""

import torch


class ProjectionComm:
    """Collectives around ``Z`` and ``A``; all identity (a single device)."""

    def z_forward(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def z_backward(self, dz: torch.Tensor) -> torch.Tensor:
        return dz

    def a_forward(self, a: torch.Tensor) -> torch.Tensor:
        return a

    def a_backward(self, da: torch.Tensor) -> torch.Tensor:
        return da


IDENTITY = ProjectionComm()


class _ProjectedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, proj, comm, accumulate_main_grad, precomputed):
        p = proj.to(x.dtype)
        z = comm.z_forward(torch.matmul(x, p))
        a = weight if precomputed else comm.a_forward(torch.matmul(weight, p))
        ctx.save_for_backward(z, a, p)
        ctx.comm = comm
        ctx.precomputed = precomputed
        ctx.weight = weight if accumulate_main_grad else None
        return torch.matmul(z, a.t())

    @staticmethod
    def backward(ctx, dy):
        z, a, p = ctx.saved_tensors
        comm = ctx.comm
        dx = dw = None
        if ctx.needs_input_grad[1]:
            da = comm.a_backward(dy.reshape(-1, dy.shape[-1]).t() @ z.reshape(-1, z.shape[-1]))
            dw = da if ctx.precomputed else da @ p.t()
            weight = ctx.weight
            if weight is not None and hasattr(weight, "main_grad"):
                # megatron gradient_accumulation_fusion: add into the fp32 main grad.
                weight.main_grad.add_(dw)
                if hasattr(weight, "grad_added_to_main_grad"):
                    weight.grad_added_to_main_grad = True
                    dw = torch.zeros_like(dw)
                else:
                    dw = None
        if ctx.needs_input_grad[0]:
            dx = torch.matmul(comm.z_backward(torch.matmul(dy, a)), p.t())
        return dx, dw, None, None, None, None


def projected_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    proj: torch.Tensor,
    comm: ProjectionComm = IDENTITY,
    accumulate_main_grad: bool = False,
    precomputed: bool = False,
) -> torch.Tensor:
    """``x [..., K_local] -> [..., N_local]``: ``(x P)(W P)ᵀ`` with the collectives of ``comm``.

    With ``precomputed`` ``weight`` is already ``A = W P`` ``[N, L]`` (the compressed
    inference layer, paper Eq. 3: ``Ŷ = Bᵀ (Pᵀ X)`` with ``B = Aᵀ``) and its gradient is
    ``dA``. ``proj`` is cast to ``x.dtype`` for the GEMMs. With ``accumulate_main_grad``
    the weight gradient is added to ``weight.main_grad`` (megatron's
    gradient-accumulation fusion) instead of being returned.
    """
    return _ProjectedLinear.apply(x, weight, proj, comm, accumulate_main_grad, precomputed)
