"""megatron-core ``dist_checkpointing`` for ESPACE models (DESIGN section 3).

ESPACE layers keep the baseline's ``weight``/``bias`` keys and add one key per
projection, ``…espace_proj.L{global_layer}``. A *baseline* checkpoint has no such
keys; :func:`load` drops the projections the checkpoint lacks from the request and
leaves those layers' ``P`` as set by ``apply_espace`` (the plain ``load`` would raise
``CheckpointException``, a ``BaseException``). Weights and optimizer state load as
usual, so retraining starts from the baseline's weights *and* Adam moments.
"""

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


def _is_projection(value) -> bool:
    if not isinstance(value, ShardedTensor):
        return False
    parts = value.key.split(".")
    return PROJECTION_KEY in parts[-2:]  # "...espace_proj" or "...espace_proj.L3"


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


def load(sharded_state_dict: dict, checkpoint_dir, **kwargs) -> dict:
    """``dist_checkpointing.load`` that also accepts checkpoints saved without ESPACE.

    Layers whose projection the checkpoint lacks keep their current ``P``; the
    returned state dict then holds their current ``P`` too, so a strict
    ``model.load_state_dict`` succeeds.
    """
    dropped = drop_missing_projections(sharded_state_dict, checkpoint_dir)
    if dropped:
        logger.info("%s has no ESPACE projections for %d layers (a baseline checkpoint?): "
                    "keeping the projections already set on the model", checkpoint_dir,
                    len(dropped))
    return dist_checkpointing.load(sharded_state_dict, str(checkpoint_dir), **kwargs)


def save(sharded_state_dict: dict, checkpoint_dir, **kwargs) -> None:
    """``dist_checkpointing.save`` into ``checkpoint_dir``, atomically.

    Every rank writes into ``<dir>.tmp``; rank 0 renames it once all have finished, so
    an interrupted save never leaves a half-written checkpoint under the final name.
    An existing ``checkpoint_dir`` is refused rather than overwritten.
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
    dist_checkpointing.save(sharded_state_dict, str(tmp), **kwargs)
    _barrier()
    if rank == 0:
        os.replace(tmp, final)
    _barrier()


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
