"""Streaming accumulators for the calibration statistics (paper Section 3). Pure torch.

So far the input second moment behind ``mse`` (``E[x xᵀ]``) and ``nmse`` (the same
with every token vector scaled to unit L2 norm). Sums are kept in float64 with an
explicit token count, never in the activation dtype; no activation is kept.
"""

import torch


class SecondMoment:
    """``C = (1/M) Σ x xᵀ`` over all tokens seen (K×K), optionally of unit-norm tokens."""

    def __init__(self, k: int, normalize: bool = False, dtype=torch.float64):
        self.sum = torch.zeros(k, k, dtype=dtype)
        self.count = 0
        self.normalize = normalize

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add the tokens of ``x [..., K]``."""
        x = x.detach().reshape(-1, x.shape[-1]).to(device=self.sum.device, dtype=self.sum.dtype)
        if self.normalize:
            x = x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
        self.sum.addmm_(x.t(), x)
        self.count += x.shape[0]

    def mean(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no tokens were accumulated")
        return self.sum / self.count
