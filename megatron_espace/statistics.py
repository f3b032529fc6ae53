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

Each batch's product is computed in float32 on the device (float64 for float64 activations;
never in bf16) into a per-batch buffer that is flushed every few micro-batches into a float64
upper triangle on the host, with an explicit count; no activation is kept between updates.
``C_W`` is not accumulated: it is recomputed from the weight when the matrix is formed.
"""

from typing import Dict, Optional, Tuple

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


def device_dtype(activation_dtype: torch.dtype, choice: str = "auto") -> torch.dtype:
    """Per-batch products: float32 (float64 for float64 activations) under ``auto``."""
    if choice == "auto":
        return torch.float64 if activation_dtype == torch.float64 else torch.float32
    return {"float64": torch.float64, "float32": torch.float32}[choice]


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)


def _upper_blocks(k: int):
    """Column blocks for the blocked Gram: 4 for wide inputs (10 block products instead of 16:
    only the upper triangle is ever read), else one."""
    b = -(-k // 4) if k >= 1024 else k
    return [(i, min(i + b, k)) for i in range(0, k, b)]


def _is_finite(*ts) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in ts)


class MomentSum:
    """One symmetric K×K moment: a per-batch buffer on the device and a float64 host sum.

    Products of a batch go into ``buffer`` (K×K, float32 for float32/bf16 activations; only
    its upper triangle is meaningful); :meth:`flush` adds the buffer's upper triangle into
    ``host`` (``K(K+1)/2`` float64 on the CPU, row-major) and clears it. ``count`` is the
    number of terms (tokens or sequences) in ``host``; ``batches`` and ``skipped`` tally the
    batches offered and those refused for a NaN/Inf.
    """

    def __init__(self, k: int):
        self.K = k
        self.host = torch.zeros(k * (k + 1) // 2, dtype=torch.float64)
        self.count = 0
        self.batches = 0
        self.skipped = 0
        self.buffer: Optional[torch.Tensor] = None
        self.pending = 0

    def open(self, dtype: torch.dtype, device) -> None:
        """Allocate the per-batch buffer (zeros) for a pass."""
        self.buffer = torch.zeros(self.K, self.K, dtype=dtype, device=device)
        self.pending = 0

    def close(self) -> None:
        """Flush and free the per-batch buffer."""
        self.flush()
        self.buffer = None

    @torch.no_grad()
    def flush(self) -> None:
        if self.buffer is None or self.pending == 0:
            return
        k, off = self.K, 0
        for r0 in range(0, k, 1024):  # bounded transient: 1024 rows at a time
            rows = self.buffer[r0:r0 + 1024]
            mask = torch.ones_like(rows, dtype=torch.bool).triu(r0)
            part = rows[mask].to("cpu", torch.float64)
            self.host[off:off + part.numel()] += part
            off += part.numel()
        self.count += self.pending
        self.buffer.zero_()
        self.pending = 0

    def _accept(self, ok: bool) -> bool:
        self.batches += 1
        self.skipped += not ok
        return ok

    @torch.no_grad()
    def add_tokens(self, x: torch.Tensor, normalize: bool = False) -> bool:
        """``Σ x xᵀ`` over the tokens of ``x [..., K]`` (Thm 1); False if a value is not finite."""
        x = x.detach().reshape(-1, x.shape[-1]).to(self.buffer.device, self.buffer.dtype)
        if not self._accept(_is_finite(x)):
            return False
        if normalize:
            x = _unit(x)
        blocks = _upper_blocks(self.K)
        for i, (a0, a1) in enumerate(blocks):
            for b0, b1 in blocks[i:]:
                self.buffer[a0:a1, b0:b1].addmm_(x[:, a0:a1].t(), x[:, b0:b1])
        self.pending += x.shape[0]
        return True

    @torch.no_grad()
    def add_sequences(self, x: torch.Tensor, g: torch.Tensor, normalize: bool = False) -> bool:
        """``Σ_seq (X Xᵀ G Gᵀ + G Gᵀ X Xᵀ) / M²`` (App. A.4) of ``x, g [s, b, K]``."""
        dt, dev = self.buffer.dtype, self.buffer.device
        xs = x.detach().to(device=dev, dtype=dt).transpose(0, 1)  # [b, M, K]
        gs = g.detach().to(device=dev, dtype=dt).transpose(0, 1)
        if not self._accept(_is_finite(xs, gs)):
            return False
        if normalize:
            xs, gs = _unit(xs), _unit(gs)
        b, m, k = xs.shape
        if m <= k:  # X (Xᵀ G) Gᵀ through the M×M cross-gram: 2M²K + 2MK² per sequence
            u = (xs.transpose(1, 2) @ (xs @ gs.transpose(1, 2))) @ gs
        else:  # (X Xᵀ)(G Gᵀ): 4MK² + 2K³ per sequence
            u = (xs.transpose(1, 2) @ xs) @ (gs.transpose(1, 2) @ gs)
        u = u.sum(0)
        self.buffer += (u + u.t()) / (m * m)
        self.pending += b
        return True

    def mean(self, device=None) -> torch.Tensor:
        """The full symmetric K×K mean (float64)."""
        if self.count == 0:
            raise ValueError("no samples were accumulated")
        return unpack_upper(self.host, self.K, device) / self.count


def unpack_upper(packed: torch.Tensor, k: int, device=None) -> torch.Tensor:
    """The symmetric K×K float64 matrix whose row-major upper triangle is ``packed``."""
    full = torch.zeros(k, k, dtype=torch.float64, device=device)
    rows, cols = torch.triu_indices(k, k, device=device)
    full[rows, cols] = packed.to(device=device, dtype=torch.float64)
    return full + full.triu(1).t()


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
