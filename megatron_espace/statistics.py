"""Streaming accumulators for the six calibration statistics (paper Section 3). Pure torch.

Shapes follow megatron: activations and their gradients are ``[s, b, K]`` (``s`` tokens of
each of ``b`` sequences); a weight is ``[N, K]``. With ``C_X = E[x xᵀ]`` and
``C_W = W Wᵀ / N`` in the paper's K×N notation (``Wᵀ W / N`` in megatron's storage):

=============  ============================================================  ==========
method         K×K matrix whose top eigenvectors form P                      reference
=============  ============================================================  ==========
``mse``        ``C_X``                                                       Thm 1, Eq. 4
``nmse``       ``C_X`` of unit-norm tokens                                   Cor. 2
``go_mse``     ``C_X C_W + C_W C_X``                                         Thm 4, Eq. 10
``go_mse_l2``  the same with unit-norm tokens and unit-norm weight columns   Sec. 3
``nl_mse``     mean over sequences of ``(X Xᵀ G Gᵀ + G Gᵀ X Xᵀ) / M²``       App. A.4
``nl_mse_l2``  the same with unit-norm token and gradient vectors            Sec. 3
``weight_svd`` ``C_W``: W's top right singular vectors (``W P Pᵀ`` is W's     baseline
               truncated SVD), the weight-side approach, for comparison
=============  ============================================================  ==========

Each batch's product is computed in float32 (float64 for float64 activations; never in
bf16), and added to a running sum kept in float64 (or float32 for very wide layers) with an
explicit count; no activation is kept between updates.
"""

from typing import Dict, Tuple

import torch

#: which accumulated moments each method needs
NEEDS = {
    "mse": ("x",), "nmse": ("xn",),
    "go_mse": ("x", "w"), "go_mse_l2": ("xn", "wn"),
    "nl_mse": ("nl",), "nl_mse_l2": ("nln",),
    "weight_svd": ("w",),
}
#: methods whose matrix is indefinite: eigenvectors are ranked by |eigenvalue|
INDEFINITE = frozenset({"go_mse", "go_mse_l2", "nl_mse", "nl_mse_l2"})


def accumulator_dtype(k: int, choice: str = "auto") -> torch.dtype:
    """float64 for K ≤ 8192 under ``auto``, else float32; or the explicit choice."""
    if choice == "auto":
        return torch.float64 if k <= 8192 else torch.float32
    return {"float64": torch.float64, "float32": torch.float32}[choice]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def gram(x: torch.Tensor) -> torch.Tensor:
    """``xᵀ x`` (K×K) for ``x [M, K]``.

    On CPU, wide inputs are done as the upper triangle of a 4×4 grid of column blocks,
    mirrored: 10 block products instead of 16, about 30% faster than one GEMM (torch has no
    symmetric rank-k update).
    """
    k = x.shape[1]
    if x.device.type != "cpu" or k < 1024:
        return x.t() @ x
    b = -(-k // 4)
    cols = [x[:, i:i + b] for i in range(0, k, b)]
    out = torch.empty(k, k, dtype=x.dtype)
    for i, ci in enumerate(cols):
        for j in range(i, len(cols)):
            block = ci.t() @ cols[j]
            out[i * b:i * b + block.shape[0], j * b:j * b + block.shape[1]] = block
            if j != i:
                out[j * b:j * b + block.shape[1], i * b:i * b + block.shape[0]] = block.t()
    return out


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)


class Moment:
    """A running sum of K×K terms and how many terms (tokens or sequences) it holds."""

    def __init__(self, k: int, dtype=torch.float64, device=None):
        self.sum = torch.zeros(k, k, dtype=dtype, device=device)
        self.count = 0

    def mean(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no samples were accumulated")
        return self.sum / self.count

    def _add(self, term: torch.Tensor, count: int) -> bool:
        # NaN/Inf anywhere in the inputs (or an overflow) shows up in the K×K term and then in
        # its float64 sum: one reduction instead of a check over the [M, K] inputs.
        if not bool(torch.isfinite(term.sum(dtype=torch.float64))):
            return False
        self.sum += term
        self.count += count
        return True


class SecondMoment(Moment):
    """``C_X = (1/M) Σ x xᵀ`` over all tokens seen, optionally of unit-norm tokens."""

    def __init__(self, k: int, normalize: bool = False, dtype=torch.float64, device=None):
        super().__init__(k, dtype, device)
        self.normalize = normalize

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> bool:
        """Add the tokens of ``x [..., K]``; False (and nothing added) if a value is not finite."""
        x = x.detach().reshape(-1, x.shape[-1]).to(self.sum.device, _compute_dtype(x))
        if self.normalize:
            x = _unit(x)
        return self._add(gram(x), x.shape[0])


class GradientCrossMoment(Moment):
    """Σ over sequences of ``(X Xᵀ G Gᵀ + G Gᵀ X Xᵀ) / M²`` (App. A.4), counted in sequences.

    ``X``, ``G`` (K×M) are one sequence's activations and loss gradients.
    """

    def __init__(self, k: int, normalize: bool = False, dtype=torch.float64, device=None):
        super().__init__(k, dtype, device)
        self.normalize = normalize

    @torch.no_grad()
    def update(self, x: torch.Tensor, g: torch.Tensor) -> bool:
        """Add the ``b`` sequences of ``x, g [s, b, K]``; False if a value is not finite."""
        dt, dev = _compute_dtype(x), self.sum.device
        xs = x.detach().to(device=dev, dtype=dt).transpose(0, 1)  # [b, M, K]
        gs = g.detach().to(device=dev, dtype=dt).transpose(0, 1)
        if self.normalize:
            xs, gs = _unit(xs), _unit(gs)
        b, m, k = xs.shape
        if m <= k:  # X (Xᵀ G) Gᵀ through the M×M cross-gram: 2M²K + 2MK² per sequence
            u = (xs.transpose(1, 2) @ (xs @ gs.transpose(1, 2))) @ gs
        else:  # (X Xᵀ)(G Gᵀ): 4MK² + 2K³ per sequence
            u = (xs.transpose(1, 2) @ xs) @ (gs.transpose(1, 2) @ gs)
        u = u.sum(0)
        return self._add((u + u.t()) / (m * m), b)


def weight_moment(weight: torch.Tensor, normalize: bool = False, dtype=torch.float64):
    """``C_W = W Wᵀ / N`` (paper notation) from megatron's ``weight [N, K]``: K×K."""
    w = weight.detach().to(dtype)
    if normalize:
        w = _unit(w)
    return w.t() @ w / w.shape[0]


def method_matrix(method: str, moments: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, bool]:
    """The K×K matrix of ``method`` from averaged moments; and whether to rank by |λ|.

    ``moments`` maps ``x, xn, nl, nln`` to their means and ``w, wn`` to weight moments.
    """
    if method in ("mse", "nmse"):
        c = moments["x" if method == "mse" else "xn"]
    elif method in ("go_mse", "go_mse_l2"):
        cx, cw = (moments["x"], moments["w"]) if method == "go_mse" else (moments["xn"],
                                                                          moments["wn"])
        c = cx @ cw + cw @ cx
    elif method in ("nl_mse", "nl_mse_l2"):
        c = moments["nl" if method == "nl_mse" else "nln"]
    elif method == "weight_svd":
        c = moments["w"]
    else:
        raise ValueError(f"unknown method {method!r}")
    return c, method in INDEFINITE
