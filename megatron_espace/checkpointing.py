"""megatron-core ``dist_checkpointing`` for ESPACE models (DESIGN section 3).

ESPACE layers keep the baseline's ``weight``/``bias`` keys and add one key per
projection, ``…espace_proj.L{global_layer}``. A *baseline* checkpoint has no such
keys; :func:`load` drops the projections the checkpoint lacks from the request and
leaves those layers' ``P`` as set by ``apply_espace`` (the plain ``load`` would raise
``CheckpointException``, a ``BaseException``). Weights and optimizer state load as
usual, so retraining starts from the baseline's weights *and* Adam moments.

The other way round is refused: a checkpoint holding projections does not load into a
model without them (that would silently be the dense model) unless ``drop_projections``;
a compressed checkpoint (``espace.json`` beside it, written by ``espace convert``) loads
only into a compressed model. A failed load raises :class:`CheckpointError` whose
message starts with the root cause (missing key, both shapes, the truncated file), uncut.
"""

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedTensor

logger = logging.getLogger(__name__)

PROJECTION_KEY = "espace_proj"
COMPRESSED_KEY = "espace_weight"
MANIFEST = "espace.json"


class CheckpointError(SystemExit):
    """A checkpoint that is incomplete or does not load; the message names the cause (a
    user error: ``runtime.run_main`` prints it as one line)."""


def _is_projection(value) -> bool:
    if not isinstance(value, ShardedTensor):
        return False
    return _is_projection_key(value.key)


def model_sharded_state_dict(model) -> dict:
    """``model.sharded_state_dict()`` (wrappers removed), per-layer keys for compressed models.

    torch_dist stacks each layer kind's tensors under one key across layers, which needs
    every layer to hold them; a model where only some layers are compressed has ``weight``
    in some and ``espace_weight`` in others, so it is saved with megatron's per-layer keys
    (``non_homogeneous_layers``). Save and load call this alike.
    """
    from megatron_espace.layers import _CompressedMixin
    from megatron_espace.surgery import unwrap

    inner = unwrap(model)
    compressed = any(isinstance(m, _CompressedMixin) for m in inner.modules())
    return inner.sharded_state_dict(
        metadata={"non_homogeneous_layers": True} if compressed else None)


def drop_missing_projections(sharded_state_dict: dict, checkpoint_dir) -> list:
    """Remove, in place, the projection entries ``checkpoint_dir`` does not hold.

    Returns the checkpoint keys that were dropped.
    """
    present = set(dist_checkpointing.load_tensors_metadata(str(checkpoint_dir)).keys())
    dropped = []

    def visit(d):
        for k in list(d):
            v = d[k]
            if isinstance(v, dict):
                visit(v)
            elif _is_projection(v) and v.key not in present:
                dropped.append(v.key)
                del d[k]

    visit(sharded_state_dict)
    return dropped


def _keys(sharded_state_dict: dict) -> set:
    out = set()

    def visit(d):
        for v in d.values():
            if isinstance(v, dict):
                visit(v)
            elif isinstance(v, ShardedTensor):
                out.add(v.key)

    visit(sharded_state_dict)
    return out


def manifest(checkpoint_dir) -> dict:
    """The ``espace.json`` of a compressed checkpoint, or None."""
    file = Path(checkpoint_dir) / MANIFEST
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None


def check_kind(sharded_state_dict: dict, checkpoint_dir, drop_projections: bool = False,
               flag: str = "--load") -> None:
    """Refuse a checkpoint of another kind than the model: compressed (its ``espace.json``
    manifest, or its keys) vs not, projections the model would drop. The message names the
    flags that load it."""
    path = Path(checkpoint_dir)
    wanted = _keys(sharded_state_dict)
    stored = list(dist_checkpointing.load_tensors_metadata(str(path)))
    compressed_model = any(k.split(".")[-1] == COMPRESSED_KEY for k in wanted)
    info = manifest(path)
    if (info is not None or any(k.split(".")[-1] == COMPRESSED_KEY for k in stored)) \
            and not compressed_model:
        why = (f"{MANIFEST}: {len(info.get('layers', {}))} compressed layers, converted from "
               f"{info.get('source')}" if info is not None else f"its layers hold {COMPRESSED_KEY}")
        info = info or {}
        raise CheckpointError(
            f"{flag} {path}: a compressed ESPACE checkpoint ({why}); load it with "
            f"--espace-compressed --espace-config {info.get('espace_config', 'CONFIG')} "
            f"--espace-projections {info.get('projections', 'PROJECTIONS')}")
    if compressed_model and not any(k.split(".")[-1] == COMPRESSED_KEY for k in stored):
        raise CheckpointError(
            f"{flag} {path}: not a compressed checkpoint (no compressed layers, no "
            f"{MANIFEST}; `espace convert` writes one); drop --espace-compressed")
    if drop_projections or any(_is_projection_key(k) for k in wanted):
        return
    projections = [k for k in stored if _is_projection_key(k)]
    if projections:
        state = _run_state(path)
        hint = (f" --espace-config {state.get('espace_config')} --espace-projections "
                f"{state.get('espace_projections')}" if state.get("espace_config") else "")
        raise CheckpointError(
            f"{flag} {path}: an ESPACE checkpoint ({len(projections)} projection keys, e.g. "
            f"{projections[0]}) but this model has no projections; it would load as the dense "
            f"model. Pass the ESPACE flags it was trained with{hint}, or "
            "--espace-drop-projections to load its weights without them")


def _is_projection_key(key: str) -> bool:
    return PROJECTION_KEY in key.split(".")[-2:]  # "...espace_proj" or "...espace_proj.L3"


def _run_state(path: Path) -> dict:
    try:
        return json.loads((path / "espace_state.json").read_text())
    except (OSError, ValueError):
        return {}


def verify_complete(checkpoint_dir, flag: str = None) -> None:
    """Raise ``CheckpointError`` naming the first data file the checkpoint's metadata
    refers to that is missing or shorter than the metadata says (a truncated shard)."""
    from torch.distributed.checkpoint import FileSystemReader

    path = Path(checkpoint_dir)
    where = f"{flag} {path}: " if flag else ""
    try:
        storage = FileSystemReader(str(path)).read_metadata().storage_data
    except Exception as e:
        raise CheckpointError(f"{where}{path}/.metadata: unreadable ({type(e).__name__}: {e}); "
                              "the checkpoint is incomplete or corrupt") from None
    need = {}
    for item in storage.values():
        need[item.relative_path] = max(need.get(item.relative_path, 0), item.offset + item.length)
    for name, size in sorted(need.items()):
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{where}{file}: missing; the checkpoint is incomplete (its "
                                  "metadata lists this shard)")
        if file.stat().st_size < size:
            raise CheckpointError(f"{where}{file}: truncated, {file.stat().st_size} bytes where "
                                  f"the checkpoint's metadata needs {size}")


def root_causes(error: BaseException) -> list:
    """The innermost exceptions behind ``error``: per failed rank of a torch
    ``CheckpointException``, and down ``__cause__``/``__context__``."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        out = []
        for rank, failure in sorted(failures.items()):
            exc = failure[0] if isinstance(failure, tuple) else failure
            out += [(f"rank {rank}: " + cause) for cause in root_causes(exc)]
        return list(dict.fromkeys(out))
    inner = error.__cause__ or error.__context__
    if inner is not None and inner is not error:
        deeper = root_causes(inner)
        if deeper:
            return deeper
    text = str(error).strip()
    return [f"{type(error).__name__}: {text}" if text else type(error).__name__]


def load(sharded_state_dict: dict, checkpoint_dir, drop_projections: bool = False,
         flag: str = "--load", **kwargs) -> dict:
    """``dist_checkpointing.load`` that also accepts checkpoints saved without ESPACE.

    Layers whose projection the checkpoint lacks keep their current ``P``; the
    returned state dict then holds their current ``P`` too, so a strict
    ``model.load_state_dict`` succeeds. See the module docstring for what is refused.
    """
    check_kind(sharded_state_dict, checkpoint_dir, drop_projections, flag)
    verify_complete(checkpoint_dir, flag)
    dropped = drop_missing_projections(sharded_state_dict, checkpoint_dir)
    if dropped:
        logger.info("%s has no ESPACE projections for %d layers (a baseline checkpoint?): "
                    "keeping the projections already set on the model", checkpoint_dir,
                    len(dropped))
    try:
        return dist_checkpointing.load(sharded_state_dict, str(checkpoint_dir), **kwargs)
    except BaseException as e:  # CheckpointException is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        causes = root_causes(e)
        raise CheckpointError(
            f"{flag} {checkpoint_dir}: does not load into this model: " + "; ".join(causes)
            + " (check the model, parallelism and ESPACE flags against the ones it was "
            "saved with)") from e


def save(sharded_state_dict: dict, checkpoint_dir, before_commit=None, **kwargs) -> None:
    """``dist_checkpointing.save`` into ``checkpoint_dir``, atomically.

    Every rank writes into ``<dir>.tmp`` (then calls ``before_commit(tmp)``, e.g. to add
    its own files); rank 0 checks that every shard the metadata lists is there in full and
    only then renames it, so an interrupted or raced save never leaves a checkpoint that
    looks complete under the final name. An existing ``checkpoint_dir`` is refused rather
    than overwritten. A full disk raises ``SystemExit`` saying so.
    """
    final = Path(checkpoint_dir)
    tmp = final.with_name(final.name + ".tmp")
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if final.exists():
        raise FileExistsError(f"{final}: checkpoint directory already exists; not overwriting")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    _helpers_die_with_rank()
    try:
        dist_checkpointing.save(sharded_state_dict, str(tmp), **kwargs)
        if before_commit is not None:
            before_commit(tmp)
    except BaseException as e:
        from megatron_espace.save_dir import is_disk_full

        if not isinstance(e, (KeyboardInterrupt, SystemExit)) and is_disk_full(e, tmp.parent):
            free = shutil.disk_usage(tmp.parent).free
            raise SystemExit(f"{tmp}: no space left on device ({free / 2**20:.1f} MiB free "
                             f"on the file system of {tmp.parent}); the checkpoint was not "
                             "saved") from e
        raise
    _barrier()
    if rank == 0:
        verify_complete(tmp)
        os.replace(tmp, final)
    _barrier()


def _helpers_die_with_rank() -> None:
    """dist_checkpointing's save keeps a multiprocessing ``Manager`` (a spawned server,
    ~350 MB) for its results; a rank killed by SIGKILL would leave it, and the resource
    tracker it holds open, running under init. Start that server here instead, with an
    initializer that makes it die with this rank."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa
    except ImportError:
        return
    if getattr(fsa, "_results_queue", "absent") is not None:
        return  # started already, or a megatron-core without this helper
    from multiprocessing.managers import SyncManager

    from torch import multiprocessing as mp

    from megatron_espace.runtime import die_with_parent

    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(initializer=die_with_parent)
    fsa._results_queue = manager.Queue()


def _barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


#: megatron's row-parallel linears of a transformer layer (the others are column-parallel)
ROW_PARALLEL = ("linear_proj", "linear_fc2")


def linear_shapes(checkpoint_dir) -> dict:
    """The transformer layers' linears in a torch_dist checkpoint, from its metadata alone
    (no tensor is read): ``{global layer name: (kind, K, N)}``, kind ``column`` or ``row``.

    Weights of the transformer layers are stored stacked (``decoder.layers.X.weight``,
    ``[layers, N, K]``) or per layer (``decoder.layers.3.X.weight``, ``[N, K]``).
    """
    out = {}
    for key, value in dist_checkpointing.load_tensors_metadata(str(checkpoint_dir)).items():
        found = re.fullmatch(r"decoder\.layers\.(?:(\d+)\.)?(.+)\.weight", key)
        shape = tuple(getattr(value, "global_shape", ()))
        if not found or len(shape) != (2 if found.group(1) else 3):
            continue
        number, module = found.groups()
        kind = "row" if module.split(".")[-1] in ROW_PARALLEL else "column"
        numbers = [int(number)] if number else range(shape[0])
        for i in numbers:
            out[f"decoder.layers.{i}.{module}"] = (kind, shape[-1], shape[-2])
    return out


def optimizer_layout(checkpoint_dir) -> str:
    """The distributed optimizer's layout in ``checkpoint_dir`` (``distrib_optim_sharding_type``
    of its content metadata, read as Megatron-LM does); ``fully_reshardable`` when the
    checkpoint records none (ours before we recorded it)."""
    content = dist_checkpointing.load_content_metadata(str(checkpoint_dir)) or {}
    return content.get("distrib_optim_sharding_type", "fully_reshardable")


def refuse_dp_reshardable(checkpoint_dir) -> None:
    """Refuse distributed-optimizer state in Megatron-LM's default ``dp_reshardable`` layout.

    That layout stores each gradient bucket's Adam state as one flat range, zipped with the
    parameters by their position in the bucket, and records no parameter names. It would load
    right only if the saving model ordered its parameters exactly as this one does; Megatron-LM's
    default Transformer Engine spec orders them differently from the local spec ESPACE needs,
    and nothing in the checkpoint tells the orders apart: comparing the state's saved copy of
    each parameter with the loaded weight let a reordered baseline through with its moments on
    other parameters (tests/test_baselines.py). So it is never loaded.
    """
    raise SystemExit(
        f"--load {checkpoint_dir}: its distributed-optimizer state is in the dp_reshardable "
        "layout (Megatron-LM's default), which stores Adam's moments per gradient bucket by "
        "parameter position, without names: it cannot follow a change of layer spec (Megatron-"
        "LM's Transformer Engine spec orders the parameters differently from the local spec "
        "ESPACE needs) and the checkpoint cannot show that the order is the same. Either re-save "
        "the baseline once with Megatron-LM's --dist-ckpt-optim-fully-reshardable (state keyed "
        "by parameter name; it then loads here, moments included), or pass --no-load-optim "
        "(weights only, fresh Adam moments).")
