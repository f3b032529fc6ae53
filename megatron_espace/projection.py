"""Projection matrices: eigendecomposition, ordering, rank choice, compression accounting.

Pure torch (paper Section 3). A layer ``Y = Wᵀ X`` with ``W`` K×N keeps ``K·N``
parameters dense and ``L·(K+N)`` with ESPACE at inference (``B = Pᵀ W`` L×N
plus ``P`` K×L).
"""

import torch


def layer_compression(k: int, n: int, rank: int) -> float:
    """``1 − L(K+N)/(KN)``: the fraction of a layer's parameters ESPACE removes."""
    return 1.0 - rank * (k + n) / (k * n)


def rank_for_compression(k: int, n: int, compression: float) -> int:
    """The largest power of two ``L`` with ``layer_compression(k, n, L) >= compression``.

    Raises ``ValueError`` when even ``L = 1`` misses the target.
    """
    if not 0.0 < compression < 1.0:
        raise ValueError(f"compression must lie in (0, 1), got {compression}")
    limit = (1.0 - compression) * k * n / (k + n)
    if limit < 1:
        raise ValueError(f"no rank reaches compression {compression} for K={k}, N={n}")
    return 1 << (int(limit).bit_length() - 1)


def orthonormality_error(proj: torch.Tensor) -> float:
    """``max |PᵀP − I|`` computed in float64, for ``proj`` K×L."""
    p = proj.detach().to(torch.float64)
    eye = torch.eye(p.shape[1], dtype=torch.float64, device=p.device)
    return (p.t() @ p - eye).abs().max().item() if p.numel() else 0.0


def sorted_eigh(c: torch.Tensor, by_magnitude: bool = False):
    """Eigenvectors of a symmetric K×K ``c``, in float64, best first.

    Returns ``(vecs [K, K], vals [K])``; ``vecs[:, :L]`` is the rank-L projection.
    ``by_magnitude`` orders by ``|λ|`` (the indefinite GO/NL statistics).
    Each eigenvector's sign is fixed so its largest-magnitude entry is positive,
    so every rank that decomposes the same matrix returns bit-identical vectors.
    """
    c = c.detach().to(torch.float64)
    c = 0.5 * (c + c.t())
    vals, vecs = torch.linalg.eigh(c)
    key = vals.abs() if by_magnitude else vals
    order = torch.argsort(key, descending=True, stable=True)
    vals, vecs = vals[order], vecs[:, order]
    pivot = vecs.abs().argmax(dim=0)
    signs = torch.sign(vecs[pivot, torch.arange(vecs.shape[1])])
    signs[signs == 0] = 1
    return vecs * signs, vals
