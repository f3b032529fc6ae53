"""Content fingerprints of a command's inputs, so that caches and resumes are keyed on what
produced them, not on paths.

A fingerprint is a JSON-able dict; :func:`differences` lists the fields in which two differ,
for an error message that says what changed. Digests are BLAKE2b (16 bytes, hex).
"""

import hashlib
import json
import os
import struct
from pathlib import Path

_CHUNK = 1 << 20
#: safetensors files above this size are keyed on their size and header (names, shapes and
#: metadata, where our writers put a per-write id and the provenance), not every byte
FULL_HASH_LIMIT = 64 << 20


def _hasher():
    return hashlib.blake2b(digest_size=16)


def file_digest(path) -> str:
    """Digest of a file's bytes."""
    h = _hasher()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _safetensors_header(path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return head
        return head + f.read(min(struct.unpack("<Q", head)[0], FULL_HASH_LIMIT))


def content_digest(path) -> str:
    """Digest of a file, or of a directory's files (names and contents, hidden ones skipped).

    Works for both projections layouts: one safetensors file, or a directory holding an
    index and part files. Small files are hashed whole; a safetensors file larger than
    :data:`FULL_HASH_LIMIT` by its size and header.
    """
    path = Path(path)
    files = ([path] if path.is_file() else
             sorted(p for p in path.rglob("*") if p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(path).parts)))
    if not files:
        raise FileNotFoundError(f"{path}: no such file or directory, or an empty one")
    h = _hasher()
    for file in files:
        size = file.stat().st_size
        h.update(f"{file.relative_to(path) if file != path else ''}\0{size}\0".encode())
        if file.suffix == ".safetensors" and size > FULL_HASH_LIMIT:
            h.update(_safetensors_header(file))
        else:
            h.update(file_digest(file).encode())
    return h.hexdigest()


def dataset(prefix) -> dict:
    """An indexed dataset ``PREFIX.bin/.idx``: its path, a digest of the ``.idx`` (document
    and sequence boundaries) and the ``.bin`` size."""
    prefix = os.path.abspath(prefix)
    return {"prefix": prefix, "idx": file_digest(prefix + ".idx"),
            "bin_bytes": os.path.getsize(prefix + ".bin")}


def checkpoint(directory) -> dict:
    """A torch_dist checkpoint directory (``iter_XXXXXXX``): its path, iteration and a digest
    of its metadata files (every file but the ``.distcp`` shards, which count by size)."""
    directory = Path(directory).resolve()
    name = directory.name
    iteration = int(name[5:]) if name.startswith("iter_") and name[5:].isdigit() else name
    h = _hasher()
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = file.relative_to(directory)
        h.update(f"{rel}\0{file.stat().st_size}\0".encode())
        if file.suffix != ".distcp" and rel.parts[0] != "rng":
            h.update(file_digest(file).encode())
    return {"path": str(directory), "iteration": iteration, "metadata": h.hexdigest()}


def differences(old: dict, new: dict, prefix: str = "") -> list:
    """The dotted names of the fields in which ``old`` and ``new`` differ, with both values
    (shortened), e.g. ``["projections.content: 3f2a… -> 91c0…"]``."""
    out = []
    for key in sorted(set(old or {}) | set(new or {}), key=str):
        a, b = (old or {}).get(key), (new or {}).get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, name + ".")
        elif a != b:
            out.append(f"{name}: {_short(a)} -> {_short(b)}")
    return out


def _short(value, width: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= width else text[:width - 1] + "…"
