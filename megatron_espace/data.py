"""Training and calibration data: megatron-core ``GPTDataset`` splits over indexed datasets.

``parse_data_path`` reads Megatron-LM's ``--data-path``, ``build_datasets`` builds the
train/valid/test splits with ``BlendedMegatronDatasetBuilder`` (the datasets written by
:mod:`megatron_espace.preprocess_data` or Megatron-LM's ``tools/preprocess_data.py``), and
``batch_iterator`` deals consecutive samples out to data-parallel ranks.
"""

import contextlib
import fcntl
import hashlib
import json
import math
import os

import torch

SPLITS = ("train", "valid", "test")
BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def _number(token: str):
    try:
        return float(token)
    except ValueError:
        return None


def parse_data_path(tokens):
    """``--data-path``: ``PREFIX [PREFIX ...]`` or a weighted blend ``0.3 A 0.7 B``.

    ``tokens`` is the list of words (or one string). Returns ``(prefixes, weights or None)``,
    the ``blend`` of megatron's ``GPTDatasetConfig``; weights are not normalised.
    """
    words = tokens.split() if isinstance(tokens, str) else list(tokens)
    where = f"--data-path {' '.join(words)}"
    if not words:
        raise ValueError("--data-path: no dataset prefix given")
    weights = [_number(w) for w in words[0::2]]
    if len(words) % 2 == 0 and all(w is not None for w in weights):
        if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"{where}: weights must be finite, >= 0 and not all 0")
        prefixes = words[1::2]
        bad = [p for p in prefixes if _number(p) is not None]
        if bad:
            raise ValueError(f"{where}: {bad[0]!r} stands where a dataset prefix should")
        return prefixes, weights
    bad = [w for w in words if _number(w) is not None]
    if bad:
        raise ValueError(f"{where}: expected PREFIX [PREFIX ...] or WEIGHT PREFIX [WEIGHT PREFIX "
                         f"...]; {bad[0]!r} is neither")
    return words, None


@contextlib.contextmanager
def _cache_lock(path_to_cache: str):
    """Serialise index-cache writers across independent jobs sharing ``path_to_cache``.

    Within one job megatron builds on global rank 0, barriers, then lets the other ranks
    read; only the writer (rank 0, or every process without torch.distributed) takes the
    lock, so ranks waiting on rank 0 cannot deadlock on it.
    """
    dist = torch.distributed
    if dist.is_initialized() and dist.get_rank() != 0:
        yield
        return
    os.makedirs(path_to_cache, exist_ok=True)
    with open(os.path.join(path_to_cache, ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _content_cache(prefixes, path_to_cache: str) -> str:
    """The index cache directory for the datasets' current contents,
    ``path_to_cache/data-<digest of each prefix's .idx and .bin size>``.

    megatron keys its cached document/sample/shuffle indices on the prefix's path, split,
    seed and sequence length, not on the data: a prefix preprocessed again with other text
    would reuse indices into the old documents (stale samples, then an ``IndexError``).
    Here changed data gets new indices, and the writer says so, naming what changed.
    """
    from megatron_espace import atomic
    from megatron_espace.fingerprint import dataset, differences

    current = {p: dataset(p) for p in prefixes}
    digest = hashlib.blake2b(json.dumps(sorted(current.values(), key=str)).encode(),
                             digest_size=8).hexdigest()
    directory = os.path.join(path_to_cache, f"data-{digest}")
    dist = torch.distributed
    if dist.is_initialized() and dist.get_rank() != 0:
        return directory
    manifest = os.path.join(path_to_cache, "datasets.json")
    with _cache_lock(path_to_cache):
        with open(manifest) if os.path.isfile(manifest) else contextlib.nullcontext() as f:
            known = json.load(f) if f else {}
        for prefix, now in current.items():
            before = known.get(now["prefix"])
            if before is not None and before != now:
                changed = ", ".join(d.split(":")[0] for d in differences(before, now))
                print(f"--data-path {prefix}: the dataset changed since its index cache was "
                      f"built ({changed} differ); building new indices in {directory}",
                      flush=True)
            known[now["prefix"]] = now
        atomic.write_json(manifest, known)
    return directory


def _check_splits(prefixes, config, num_samples) -> None:
    """Refuse a split with no document but a sample count: megatron would loop forever."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for prefix in prefixes:
        count = len(IndexedDataset(prefix).sequence_lengths)
        for name, bookend, size in zip(SPLITS, config.split_matrix, num_samples):
            if bookend is None or size is None:
                continue
            if int(round(bookend[1] * count)) == int(round(bookend[0] * count)):
                raise ValueError(
                    f"{prefix}: the {name} split of --split {config.split} gets none of its "
                    f"{count} documents, but {size} {name} samples were asked for; use more "
                    f"documents, another --split, or num_samples None for {name}")


def build_datasets(data_path, *, seq_length: int, num_samples, tokenizer, split: str = "949,50,1",
                   seed: int = 1234, reset_position_ids: bool = False,
                   reset_attention_mask: bool = False, eod_mask_loss: bool = False,
                   path_to_cache=None):
    """The (train, valid, test) datasets of ``--data-path``, each a ``GPTDataset``, a
    ``BlendedDataset`` for several prefixes, or None for a split of weight 0.

    ``num_samples``: (train, valid, test) sample counts, each dataset holding at least that
    many (whole epochs); None builds one epoch (not allowed with weights). A sample ``ds[i]``
    holds ``tokens``, ``labels`` (shifted by one), ``position_ids`` [seq_length] int64 and
    ``loss_mask`` [seq_length] float32.
    ``tokenizer`` needs ``eod``, ``vocab_size`` and ``unique_identifiers``.
    Index caches go to ``path_to_cache`` (default: ``cache/`` beside the first prefix), in a
    subdirectory keyed on the datasets' content (:func:`_content_cache`).
    Call on every rank: with torch.distributed, rank 0 builds first and the others then read
    its cache. Several prefixes need torch.distributed (``runtime.initialize()``).
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder)
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefixes, weights = parse_data_path(data_path)
    num_samples = tuple(num_samples)
    if len(num_samples) != 3:
        raise ValueError(f"num_samples: expected (train, valid, test), got {num_samples}")
    for prefix in prefixes:
        if not IndexedDataset.exists(prefix):
            raise FileNotFoundError(f"--data-path: no dataset {prefix}.bin / {prefix}.idx")
    if len(prefixes) > 1 and not torch.distributed.is_initialized():
        raise RuntimeError("a blend of several --data-path prefixes needs torch.distributed: "
                           "call megatron_espace.runtime.initialize() first")
    if path_to_cache is None:
        path_to_cache = os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), "cache")
    path_to_cache = _content_cache(prefixes, path_to_cache)
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=(prefixes, weights), split=split,
        path_to_cache=path_to_cache, tokenizer=tokenizer, reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask, eod_mask_loss=eod_mask_loss,
        create_attention_mask=False)  # megatron-core models build the causal mask themselves
    if weights is not None and None in num_samples:
        raise ValueError(f"--data-path with weights needs all three sample counts (0 for an "
                         f"unused split), got num_samples={num_samples}")
    if weights is not None or len(prefixes) == 1:  # then each prefix's split gets a size
        _check_splits(prefixes, config, num_samples)
    with _cache_lock(path_to_cache):
        datasets = BlendedMegatronDatasetBuilder(
            GPTDataset, list(num_samples), lambda: True, config).build()
    return tuple(datasets)


def batch_iterator(dataset, micro_batch_size: int, start: int = 0, dp_rank: int = 0,
                   dp_size: int = 1):
    """Yield this data-parallel rank's micro-batches, in order, from sample ``start`` on.

    Step k takes the global batch of ``micro_batch_size * dp_size`` samples from
    ``start + k * micro_batch_size * dp_size``; rank r takes its r-th slice of
    ``micro_batch_size`` consecutive samples. Stops before a global batch would run past the
    end, so all ranks yield the same number of steps. Each batch maps ``tokens``, ``labels``,
    ``position_ids`` ([b, s] int64) and ``loss_mask`` ([b, s] float32) to CPU tensors.
    Resuming at ``start = consumed samples`` repeats exactly what continuing would give.
    """
    if dataset is None:
        raise ValueError("batch_iterator: no dataset (a split of weight 0 in --split)")
    if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size or start < 0:
        raise ValueError(f"batch_iterator: bad micro_batch_size={micro_batch_size}, "
                         f"dp_rank={dp_rank}, dp_size={dp_size} or start={start}")
    global_batch = micro_batch_size * dp_size
    for first in range(start, len(dataset) - global_batch + 1, global_batch):
        mine = first + dp_rank * micro_batch_size
        samples = [dataset[i] for i in range(mine, mine + micro_batch_size)]
        yield {key: torch.stack([s[key] for s in samples]) for key in BATCH_KEYS}
