"""Projection matrices: eigendecomposition, ordering, rank choice, compression accounting.

Pure torch (paper Section 3). A layer ``Y = Wᵀ X`` with ``W`` K×N keeps ``K·N``
parameters dense and ``L·(K+N)`` with ESPACE at inference (``B = Pᵀ W`` L×N
plus ``P`` K×L).
"""

import json
import math
from fractions import Fraction
from pathlib import Path
from typing import Optional

import safetensors
import torch
from safetensors import safe_open

from megatron_espace.atomic import save_safetensors
from megatron_espace.config import POW2, RANK_MULTIPLE


def layer_compression(k: int, n: int, rank: int) -> float:
    """``1 − L(K+N)/(KN)``: the fraction of a layer's parameters ESPACE removes."""
    return 1.0 - rank * (k + n) / (k * n)


def rank_for_compression(k: int, n: int, compression: float,
                         multiple=RANK_MULTIPLE) -> int:
    """The largest ``L`` with ``layer_compression(k, n, L) >= compression`` that is a
    multiple of ``multiple`` (or, with ``multiple="pow2"``, a power of two): the compression
    reached is at least the target and as close to it as that granularity allows.

    Raises ``ValueError`` saying what the target needs when no such ``L`` reaches it.
    """
    if not 0.0 < compression < 1.0:
        raise ValueError(f"compression must lie in (0, 1), got {compression}")
    limit = math.floor((1 - Fraction(compression)) * k * n / (k + n))  # exact: L(K+N) <= (1-c)KN
    if limit < 1:
        raise ValueError(f"no rank reaches compression {compression} for K={k}, N={n}")
    if multiple == POW2:
        return 1 << (limit.bit_length() - 1)
    rank = limit - limit % multiple
    if rank < 1:
        raise ValueError(f"compression {compression} needs L <= {limit} for K={k}, N={n}, "
                         f"below rank_multiple {multiple}: set a smaller rank_multiple (or "
                         f"{POW2}), or give the rank")
    return rank


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


FORMAT = "megatron-espace-projections"
VERSION = 1


class Projections:
    """Per layer and statistic: eigenvectors (best first) and eigenvalues.

    ``eigen(layer, method) -> (vecs [K, R], vals [K])`` with ``R <= K`` kept columns;
    ``P = vecs[:, :L]``. ``chosen[layer]`` records the statistic picked for the
    layer (by validation loss) when a sensitivity pass has run. Stored as one
    safetensors file (tensors ``{layer}::{method}::vecs`` / ``::vals``) whose
    header metadata holds the JSON index; no pickle.
    """

    def __init__(self, source: str = "<memory>"):
        self._eigen = {}
        self.chosen = {}
        self.info = {}  # free-form JSON-able provenance (calibration data, counts, ...)
        self.source = source

    def add(self, layer: str, method: str, vecs: torch.Tensor, vals: torch.Tensor) -> None:
        if vecs.dim() != 2 or vals.dim() != 1 or vals.shape[0] != vecs.shape[0]:
            raise ValueError(f"{layer}/{method}: expected vecs [K, R] and vals [K], got "
                             f"{tuple(vecs.shape)} and {tuple(vals.shape)}")
        self._eigen[(layer, method)] = (vecs.detach().cpu(), vals.detach().cpu())

    def eigen(self, layer: str, method: str):
        try:
            return self._eigen[(layer, method)]
        except KeyError:
            have = sorted(m for (n, m) in self._eigen if n == layer)
            what = (f"has methods {have} for it" if have else "has no entry for it")
            raise KeyError(f"{self.source}: no projection for layer '{layer}' with method "
                           f"'{method}' (the file {what})") from None

    def projection(self, layer: str, method: str, rank: int) -> torch.Tensor:
        """``P = vecs[:, :rank]`` (K×rank)."""
        vecs, _ = self.eigen(layer, method)
        if rank > vecs.shape[1]:
            raise ValueError(f"{self.source}: layer '{layer}' method '{method}' keeps "
                             f"{vecs.shape[1]} eigenvectors, rank {rank} asked")
        return vecs[:, :rank]

    def layers(self):
        return sorted({n for (n, _) in self._eigen})

    def methods(self, layer: str):
        return sorted(m for (n, m) in self._eigen if n == layer)

    def save(self, path, max_rank: Optional[int] = None, dtype=torch.float32) -> None:
        """Write atomically to ``path``; ``max_rank`` keeps only that many eigenvectors."""
        tensors, index = {}, []
        for (layer, method), (vecs, vals) in sorted(self._eigen.items()):
            keep = vecs if max_rank is None else vecs[:, :max_rank]
            tensors[f"{layer}::{method}::vecs"] = keep.to(dtype).contiguous()
            tensors[f"{layer}::{method}::vals"] = vals.to(torch.float64).contiguous()
            index.append([layer, method])
        meta = {"format": FORMAT, "version": str(VERSION), "index": json.dumps(index),
                "chosen": json.dumps(self.chosen), "info": json.dumps(self.info)}
        save_safetensors(path, tensors, meta)

    @classmethod
    def load(cls, path) -> "Projections":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: projections file not found")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise ValueError(f"{path}: not an ESPACE projections file "
                                     f"(metadata 'format' is {meta.get('format')!r})")
                if meta.get("version") != str(VERSION):
                    raise ValueError(f"{path}: projections format version "
                                     f"{meta.get('version')!r}, this build reads {VERSION}")
                out = cls(source=str(path))
                for layer, method in json.loads(meta["index"]):
                    out.add(layer, method, f.get_tensor(f"{layer}::{method}::vecs"),
                            f.get_tensor(f"{layer}::{method}::vals"))
                out.chosen = json.loads(meta.get("chosen", "{}"))
                out.info = json.loads(meta.get("info", "{}"))
        except (safetensors.SafetensorError, json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{path}: corrupt projections file: {e}") from None
        return out


def energy_kept(vals: torch.Tensor, rank: int) -> float:
    """Fraction ``Σ_{i<L} |λ_i| / Σ |λ_i|`` of a sorted spectrum kept by the top ``rank``."""
    mags = vals.abs().to(torch.float64)
    total = mags.sum().item()
    return mags[:rank].sum().item() / total if total > 0 else 0.0
