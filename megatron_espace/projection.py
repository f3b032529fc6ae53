"""Projection matrices: eigendecomposition, ordering, rank choice, compression accounting.

Pure torch (paper Section 3). A layer ``Y = Wᵀ X`` with ``W`` K×N keeps ``K·N``
parameters dense and ``L·(K+N)`` with ESPACE at inference (``B = Pᵀ W`` L×N
plus ``P`` K×L).
"""

import dataclasses
import json
import math
import os
import re
import shutil
import struct
import uuid
from fractions import Fraction
from pathlib import Path
from typing import Optional

import safetensors
import torch
from safetensors import safe_open

from megatron_espace.atomic import replacing, write_json
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
VERSION = 2
INDEX = "index.json"
_PART_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _vecs_key(layer: str, method: str) -> str:
    return f"{layer}::{method}::vecs_t"  # stored transposed, [R, K]: the first L rows are P's columns


def _vals_key(layer: str, method: str) -> str:
    return f"{layer}::{method}::vals"


def write_part(path, part: str, items, info: dict) -> dict:
    """Write one rank's share of the projections file ``path`` (a directory); returns its manifest.

    ``items``: iterable of ``(layer, method, vecs [K, R], vals [K])``, consumed one at a time
    (vectors go straight to disk, so a generator of eigendecompositions never holds more than
    one). Stored as ``vecs`` transposed in float32 ([R, K], so the first L columns are one
    contiguous block) and ``vals`` in float64, in ``part-{part}-{uid}.safetensors``, written
    atomically. The JSON-able manifest goes to :func:`write_index` (global rank 0, once every
    part exists); until then the file at ``path`` is unchanged.
    """
    if not _PART_NAME.fullmatch(part):
        raise ValueError(f"{path}: part name {part!r} must match {_PART_NAME.pattern}")
    directory = _directory_for_writing(path)
    uid = uuid.uuid4().hex
    name = f"part-{part}-{uid[:12]}.safetensors"
    final, body = directory / name, directory / f".{name}.vecs{os.getpid()}"
    header, vals, entries, offset = {}, [], [], 0
    try:
        with open(body, "wb") as out:
            for layer, method, vecs, val in items:
                _check_item(path, layer, method, vecs, val)
                if any(e[:2] == [layer, method] for e in entries):
                    raise ValueError(f"{path}: part {part!r} has {layer}/{method} twice")
                vecs_t = vecs.detach().to("cpu", torch.float32).t().contiguous()
                header[_vecs_key(layer, method)] = (list(vecs_t.shape), offset)
                offset += _write_tensor(out, vecs_t)
                del vecs_t
                vals.append((_vals_key(layer, method),
                             val.detach().to("cpu", torch.float64).contiguous()))
                entries.append([layer, method, vecs.shape[0], vecs.shape[1]])
        meta = {"format": FORMAT, "version": str(VERSION), "part": part, "uid": uid,
                "info": json.dumps(info)}
        with replacing(final) as tmp:
            _assemble(tmp, body, vals, header, meta)
    finally:
        body.unlink(missing_ok=True)
    return {"file": name, "uid": uid, "bytes": final.stat().st_size, "entries": entries}


def write_index(path, parts: list, info: dict, chosen: Optional[dict] = None) -> None:
    """Make ``path`` one logical projections file of the ``parts`` (manifests of :func:`write_part`).

    Call once (global rank 0) after every part is on disk. The index is written atomically
    and last, so readers see the previous file or the complete new one; part files of earlier
    writes that the new index does not name are removed afterwards.
    """
    directory = _directory_for_writing(path)
    seen = {}
    for manifest in parts:
        file = directory / manifest["file"]
        if not file.is_file() or file.stat().st_size != manifest["bytes"]:
            raise ValueError(f"{file}: part missing or of another size than written "
                             f"({manifest['bytes']} bytes); the projections file is incomplete")
        for layer, method, _, _ in manifest["entries"]:
            if (layer, method) in seen:
                raise ValueError(f"{path}: {layer}/{method} is in both {seen[layer, method]} "
                                 f"and {manifest['file']}")
            seen[layer, method] = manifest["file"]
    index = {"format": FORMAT, "version": VERSION, "parts": list(parts), "info": info,
             "chosen": dict(chosen or {})}
    write_json(directory / INDEX, index)
    named = {m["file"] for m in parts}
    for stale in directory.glob("part-*.safetensors"):
        if stale.name not in named:
            stale.unlink(missing_ok=True)


def _directory_for_writing(path) -> Path:
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{path}: a file is in the way (a version-1 projections file?); the "
                         "projections file is now a directory: remove it or write elsewhere")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _check_item(path, layer, method, vecs, vals):
    if vecs.dim() != 2 or vals.dim() != 1 or vals.shape[0] != vecs.shape[0]:
        raise ValueError(f"{path}: {layer}/{method}: expected vecs [K, R] and vals [K], got "
                         f"{tuple(vecs.shape)} and {tuple(vals.shape)}")
    if "::" in layer or "::" in method:
        raise ValueError(f"{path}: layer or method name with '::': {layer}/{method}")


def _write_tensor(out, tensor: torch.Tensor) -> int:
    data = tensor.numpy().data.cast("B")
    out.write(data)
    return len(data)


def _assemble(tmp: Path, body: Path, vals, header, meta) -> None:
    """safetensors file: 8-byte header length, JSON header, float64 values, float32 vectors."""
    entries, offset = {"__metadata__": meta}, 0
    for key, tensor in vals:
        size = tensor.numel() * 8
        entries[key] = {"dtype": "F64", "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    for key, (shape, start) in header.items():
        entries[key] = {"dtype": "F32", "shape": shape,
                        "data_offsets": [offset + start, offset + start + 4 * shape[0] * shape[1]]}
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keeps every tensor 8-byte aligned
    with open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(text)))
        out.write(text)
        for _, tensor in vals:
            _write_tensor(out, tensor)
        with open(body, "rb") as src:
            shutil.copyfileobj(src, out, 16 << 20)
        out.flush()
        os.fsync(out.fileno())


@dataclasses.dataclass(frozen=True)
class _Stored:
    """Where one (layer, method) lives on disk, read lazily."""

    file: Path
    uid: Optional[str]  # the part's id the index names (None: a version-1 file)
    k: int
    r: int
    transposed: bool  # vectors stored [R, K] (version 2) or [K, R] (version 1)
    vecs_key: str
    vals_key: str


class Projections:
    """Per layer and statistic: eigenvectors (best first) and eigenvalues.

    ``eigen(layer, method) -> (vecs [K, R], vals [K])`` with ``R <= K`` kept columns;
    ``P = vecs[:, :L]``; ``projection(layer, method, L, rows=(a, b))`` reads only
    ``vecs[a:b, :L]``. ``chosen[layer]`` records the statistic picked for the layer (by
    validation loss) when a sensitivity pass has run.

    On disk (version 2) a projections file is a directory: ``index.json`` (format, version,
    ``info``, ``chosen`` and the parts with the (layer, method, K, R) each holds) and
    ``part-*.safetensors`` files (see :func:`write_part`). :meth:`load` reads the index only;
    tensors are read on demand as safetensors slices and not kept (``bytes_read`` counts
    them). Version-1 files (one safetensors file, index in its header) load the same way.
    """

    def __init__(self, source: str = "<memory>"):
        self._eigen = {}  # (layer, method) -> (vecs, vals) held in memory
        self._stored = {}  # (layer, method) -> _Stored
        self.chosen = {}
        self.info = {}  # free-form JSON-able provenance (calibration data, counts, ...)
        self.source = source
        self.bytes_read = 0  # tensor bytes read from disk so far

    def add(self, layer: str, method: str, vecs: torch.Tensor, vals: torch.Tensor) -> None:
        _check_item(self.source, layer, method, vecs, vals)
        self._stored.pop((layer, method), None)
        self._eigen[(layer, method)] = (vecs.detach().cpu(), vals.detach().cpu())

    def _entry(self, layer: str, method: str):
        key = (layer, method)
        if key in self._eigen:
            return self._eigen[key]
        if key in self._stored:
            return self._stored[key]
        have = self.methods(layer)
        what = (f"has methods {have} for it" if have else "has no entry for it")
        raise KeyError(f"{self.source}: no projection for layer '{layer}' with method "
                       f"'{method}' (the file {what})")

    def shape(self, layer: str, method: str):
        """``(K, R)``: input features and kept eigenvectors, without reading any tensor."""
        entry = self._entry(layer, method)
        return (entry.k, entry.r) if isinstance(entry, _Stored) else tuple(entry[0].shape)

    def eigenvalues(self, layer: str, method: str) -> torch.Tensor:
        """All K eigenvalues, best first."""
        entry = self._entry(layer, method)
        return self._read(entry, entry.vals_key, ()) if isinstance(entry, _Stored) else entry[1]

    def eigen(self, layer: str, method: str):
        """``(vecs [K, R], vals [K])``: everything kept for the pair (reads it all)."""
        return self.projection(layer, method, self.shape(layer, method)[1]), self.eigenvalues(
            layer, method)

    def projection(self, layer: str, method: str, rank: int, rows=None) -> torch.Tensor:
        """``P = vecs[:, :rank]`` (K×rank), or its rows ``rows = (start, stop)`` only."""
        entry = self._entry(layer, method)
        k, r = self.shape(layer, method)
        if rank > r:
            raise ValueError(f"{self.source}: layer '{layer}' method '{method}' keeps "
                             f"{r} eigenvectors, rank {rank} asked")
        start, stop = (0, k) if rows is None else rows
        if not 0 <= start <= stop <= k:
            raise ValueError(f"{self.source}: layer '{layer}': rows {rows} outside K={k}")
        if not isinstance(entry, _Stored):
            return entry[0][start:stop, :rank]
        if entry.transposed:
            return self._read(entry, entry.vecs_key, (slice(0, rank), slice(start, stop)), True)
        return self._read(entry, entry.vecs_key, (slice(start, stop), slice(0, rank)))

    def _read(self, entry: _Stored, key: str, index, transpose: bool = False) -> torch.Tensor:
        """A contiguous copy of ``tensor[index]`` (transposed), read through a safetensors slice;
        the file's mapping is released on return."""
        try:
            with safe_open(str(entry.file), framework="pt") as f:
                if entry.uid is not None and (f.metadata() or {}).get("uid") != entry.uid:
                    raise ValueError(f"{entry.file}: this part was not written with the index "
                                     f"of {self.source} (another calibration's?); recalibrate")
                view = f.get_slice(key)[index] if index else f.get_tensor(key)
                view = view.t() if transpose else view
                part = torch.empty(view.shape, dtype=view.dtype)
                part.copy_(view)
                del view
        except (safetensors.SafetensorError, OSError) as e:
            raise ValueError(f"{entry.file}: corrupt or unreadable projections part: {e}") from None
        self.bytes_read += part.numel() * part.element_size()
        return part

    def layers(self):
        return sorted({n for (n, _) in (*self._eigen, *self._stored)})

    def methods(self, layer: str):
        return sorted({m for (n, m) in (*self._eigen, *self._stored) if n == layer})

    def save(self, path, max_rank: Optional[int] = None) -> None:
        """Write to ``path`` (a directory), atomically; ``max_rank`` keeps that many eigenvectors.

        Parts already in ``path`` that this object loaded from it and keeps whole are reused,
        so updating ``chosen`` or ``info`` rewrites the index only. A version-1 file at
        ``path`` is replaced.
        """
        path = Path(path)
        if path.exists() and not path.is_dir():  # a version-1 file: build beside, then swap
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            try:
                self.save(tmp, max_rank)
                os.replace(path, old)
                os.replace(tmp, path)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
                old.unlink(missing_ok=True)
            self._restore_from(path)
            return
        index = _read_index(path) if (path / INDEX).is_file() else {"parts": []}
        keep, rest = [], set(self._eigen) | set(self._stored)
        for manifest in index["parts"]:
            pairs = {(layer, method) for layer, method, _, _ in manifest["entries"]}
            if all(self._stored.get(p) is not None and self._stored[p].uid == manifest["uid"]
                   and (max_rank is None or self._stored[p].r <= max_rank) for p in pairs):
                keep.append(manifest)
                rest -= pairs
        items = ((layer, method, *self._truncated(layer, method, max_rank))
                 for layer, method in sorted(rest))
        if rest:
            keep.append(write_part(path, "main", items, self.info))
        write_index(path, keep, self.info, self.chosen)
        self._restore_from(path)

    def _truncated(self, layer, method, max_rank):
        k, r = self.shape(layer, method)
        return (self.projection(layer, method, r if max_rank is None else min(r, max_rank)),
                self.eigenvalues(layer, method))

    def _restore_from(self, path: Path) -> None:
        """After writing ``path``: entries that lived there now point at the new parts."""
        where = path.resolve()
        if any(where in (s.file.resolve(), s.file.resolve().parent) for s in self._stored.values()):
            fresh = Projections.load(path)
            self._stored = {p: s for p, s in fresh._stored.items() if p not in self._eigen}

    @classmethod
    def load(cls, path) -> "Projections":
        """Read the index of ``path`` (a version-2 directory or a version-1 file); no tensors."""
        path = Path(path)
        if path.is_dir():
            return cls._load_index(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: projections file not found")
        return cls._load_version1(path)

    @classmethod
    def _load_index(cls, path: Path) -> "Projections":
        index = _read_index(path)
        out = cls(source=str(path))
        try:
            for manifest in index["parts"]:
                file = path / manifest["file"]
                if not file.is_file():
                    raise ValueError(f"{file}: part missing; the projections file is incomplete "
                                     "(recalibrate, or copy the whole directory)")
                if file.stat().st_size != manifest["bytes"]:
                    raise ValueError(f"{file}: {file.stat().st_size} bytes, the index says "
                                     f"{manifest['bytes']}: truncated or replaced; recalibrate")
                for layer, method, k, r in manifest["entries"]:
                    out._stored[layer, method] = _Stored(
                        file, manifest["uid"], int(k), int(r), True, _vecs_key(layer, method),
                        _vals_key(layer, method))
            out.chosen, out.info = dict(index["chosen"]), dict(index["info"])
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ValueError) and str(e).startswith(str(path)):
                raise
            raise ValueError(f"{path / INDEX}: corrupt projections index: {e!r}") from None
        return out

    @classmethod
    def _load_version1(cls, path: Path) -> "Projections":
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise ValueError(f"{path}: not an ESPACE projections file "
                                     f"(metadata 'format' is {meta.get('format')!r})")
                if meta.get("version") != "1":
                    raise ValueError(f"{path}: projections format version "
                                     f"{meta.get('version')!r} in a single file; this build "
                                     f"reads 1 (single file) and {VERSION} (directory)")
                out = cls(source=str(path))
                for layer, method in json.loads(meta["index"]):
                    key = f"{layer}::{method}::vecs"
                    k, r = f.get_slice(key).get_shape()
                    out._stored[layer, method] = _Stored(path, None, k, r, False, key,
                                                         _vals_key(layer, method))
                out.chosen = json.loads(meta.get("chosen", "{}"))
                out.info = json.loads(meta.get("info", "{}"))
        except (safetensors.SafetensorError, json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{path}: corrupt projections file: {e}") from None
        return out


def _read_index(path: Path) -> dict:
    file = path / INDEX
    try:
        index = json.loads(file.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: projections file not found (a directory without "
                                f"{INDEX}: its writing did not finish?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: corrupt projections index: {e}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ValueError(f"{file}: not an ESPACE projections index (format "
                         f"{index.get('format') if isinstance(index, dict) else None!r})")
    if index.get("version") != VERSION:
        raise ValueError(f"{file}: projections format version {index.get('version')!r}, this "
                         f"build reads {VERSION}; recalibrate with this build")
    return index


def energy_kept(vals: torch.Tensor, rank: int) -> float:
    """Fraction ``Σ_{i<L} |λ_i| / Σ |λ_i|`` of a sorted spectrum kept by the top ``rank``."""
    mags = vals.abs().to(torch.float64)
    total = mags.sum().item()
    return mags[:rank].sum().item() / total if total > 0 else 0.0
