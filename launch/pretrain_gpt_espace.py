#!/usr/bin/env python
"""Megatron-LM's ``pretrain_gpt.py`` with ESPACE, without editing a Megatron-LM file.

    export MEGATRON_LM_PATH=/path/to/Megatron-LM   # checkout at tag core_vX for megatron-core X
    torchrun --nproc_per_node=8 launch/pretrain_gpt_espace.py \\
        <your usual pretrain_gpt.py flags> --transformer-impl local \\
        --load /ckpt/baseline --save /ckpt/espace \\
        --espace-config espace.yaml --espace-projections projections.safetensors

(``launch/megatron_lm_espace.sh`` sets this up from environment variables.)

What it does, in Megatron-LM's own ``pretrain()``:

* **flags**: ``--espace-config`` and ``--espace-projections`` (both or neither; without them
  this is exactly ``pretrain_gpt.py``), ``--espace-keep-dropout`` and
  ``--no-espace-step-wgrad``, added through
  ``extra_args_provider`` next to ModelOpt's flags when ModelOpt is installed.
* **model**: the provider is ``pretrain_gpt.model_provider`` with ``gpt_builder``, imported,
  not re-implemented. ESPACE is applied to the built model *inside* the provider, before it
  is returned: ``setup_model_and_optimizer`` creates DDP and the optimizer before it loads the
  checkpoint, so every module change must already be done. ``P`` is a buffer, so the optimizer
  never sees it and the baseline's optimizer state fits the ESPACE model unchanged.
* **layer spec**: Transformer Engine's ``TELayerNormColumnParallelLinear`` fuses the
  LayerNorm into the qkv / fc1 GEMM, so no projection can sit between them. Megatron-LM
  defaults to ``--transformer-impl transformer_engine``; the wrapper refuses it with a message
  asking for ``--transformer-impl local`` (megatron-core's local spec). Checkpoint keys stay
  those of the fused layers: the local spec saves its norms under them
  (``input_layernorm.`` -> ``self_attention.linear_qkv.layer_norm_``), so a baseline trained
  with Transformer Engine offers the tensors the ESPACE model asks for, and the checkpoint
  check below names any it does not. ``--spec`` users pass a spec of their own; a Transformer
  Engine linear matched by the config is then refused by ``plan_espace``.
* **dropout**: off while ESPACE retrains (paper, Section 4.3): ``--hidden-dropout`` and
  ``--attention-dropout`` are set to 0 before the model is built, as ``megatron_espace.train``
  does; ``--espace-keep-dropout`` keeps them.
* **gradient accumulation**: ``setup_model_and_optimizer`` is wrapped
  (:func:`step_wgrad_setup`) so that the DDP chunks it builds compute ``A = W P`` and
  ``dW = (Σ dA) Pᵀ`` once per step (``megatron_espace.accumulation``);
  ``--no-espace-step-wgrad`` keeps them per micro-batch.
* **data**: ``train_valid_test_datasets_provider.is_distributed = True`` as in
  ``pretrain_gpt.py``'s ``__main__``, with the same ``forward_step``, ``args_defaults``,
  ``get_embedding_ranks`` and in-process-restart wrapping.

Loading a baseline checkpoint (one without ``P``)
-------------------------------------------------
The ESPACE model asks ``dist_checkpointing`` for one key per projection,
``…espace_proj.L{layer}``, which a baseline checkpoint does not hold. With Megatron-LM's
default ``--dist-ckpt-strictness assume_ok_unexpected`` the load then dies with
``CheckpointException`` (a ``BaseException``). In megatron-core's terms these are
*unexpected* keys (requested, not in the checkpoint); ``log_unexpected`` drops them from the
request with a warning, and ``model.load_state_dict(strict=True)`` then still succeeds because
each ESPACE layer's load pre-hook supplies its own ``P`` when the state dict has none.

Relaxing strictness blindly would also let a checkpoint of another model load half-empty, so
the provider decides it per run, from the checkpoint ``--load`` will actually resolve to
(tracker file, ``--ckpt-step``, ``--pretrained-checkpoint`` fallback, as Megatron-LM does):

1. it compares every key and global shape of the model's sharded state dict with the
   checkpoint's metadata (``load_sharded_metadata``: the metadata file only, no tensor data);
2. any missing or differently shaped key other than a projection is an error naming the keys
   (another model shape, or projections of another rank) -- before any load is attempted;
3. if only projections are missing, on any rank, every rank switches
   ``args.dist_ckpt_strictness`` to the tolerant mode of the same family
   (``assume_ok_unexpected``/``raise_unexpected`` -> ``log_unexpected``, ``raise_all`` ->
   ``log_all``; see :func:`strictness_for`) and says so; otherwise it is left alone.

The alternatives were worse: dropping the P entries from the requested state dict (what
``megatron_espace.checkpointing.load`` does in our own trainer) would mean wrapping
Megatron-LM's internal ``generate_state_dict``/``load_checkpoint``, and the model's
``sharded_state_dict`` is also what saving uses, so a wrapper there must tell loading from
saving; rewriting the baseline checkpoint with P added costs a copy of the model on disk and an
extra step. The strictness flag is public, documented and applied in exactly one place
(``dist_checkpointing.load`` in ``_load_global_dist_base_checkpoint``); the check in step 1
restores the safety the default gave. Legacy ``--ckpt-format torch`` checkpoints go straight to
``load_state_dict``: the ESPACE layers' pre-hook supplies P, and a baseline written with
Transformer Engine holds its norms under the fused names (``…linear_qkv.layer_norm_weight``),
which the local spec's plain ``state_dict`` calls ``input_layernorm.weight``; the provider
registers megatron-core's ``mcore_gpt_load_te_state_dict_pre_hook`` on the model, which renames
them (see :func:`register_te_checkpoint_hook`). ``torch_dcp``/``fsdp_dtensor`` and
non-persistent local checkpoints are not inspected (left to Megatron-LM).

Mixture-of-experts models are refused (:func:`layer_spec_problem`): the local spec saves
``pre_mlp_layernorm`` under the fused name ``mlp.linear_fc1.layer_norm_`` even in MoE layers,
where Transformer Engine's spec keeps ``pre_mlp_layernorm`` separate, so an MoE baseline's norms
would not load across the specs.

Without ``--finetune`` Megatron-LM continues the baseline's iteration count, learning-rate
schedule and Adam moments (the paper's "continue pre-training"): set ``--train-iters`` to the
baseline's plus the retraining iterations, and pass ``--override-opt-param-scheduler`` (or the
baseline's ``--lr-decay-iters``): Megatron-LM refuses a checkpoint whose schedule length
differs otherwise. ``--finetune`` (or ``--pretrained-checkpoint``) starts at iteration 0
without the optimizer state. The vocabulary is padded to a multiple of
``--make-vocab-size-divisible-by`` x TP, so a baseline saved at another TP size may need that
flag adjusted; the checkpoint check names the embedding whose shape differs.

The decision functions (:func:`espace_args`, :func:`resolve_checkpoint_dir`,
:func:`compare_with_checkpoint`, :func:`checkpoint_lacks_projections`,
:func:`strictness_for`, :func:`layer_spec_problem`) need only megatron-core; Megatron-LM is
imported inside :func:`main` and the provider.
"""

import time

_PROGRAM_START_TIME = time.time()  # as pretrain_gpt.py, before the heavy imports

import dataclasses  # noqa: E402
import os  # noqa: E402

# megatron-core >= 0.18 runs `git rev-parse` on every import to stamp its version: off
os.environ.setdefault("NO_VCS_VERSION", "1")
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import List, Optional, Tuple  # noqa: E402

#: the Megatron-LM tags this wrapper was written against (pretrain_gpt.py, training.py); it
#: works with any core_vX from the first to the last, paired with pip megatron-core X
MEGATRON_LM_TAGS = ("core_v0.16.1", "core_v0.19.2")
MEGATRON_LM_TAG = "core_vX (X = the installed megatron-core, from 0.16.1 to 0.19.2)"
#: pretrain_gpt.py's args_defaults at every supported tag
ARGS_DEFAULTS = {"tokenizer_type": "GPT2BPETokenizer"}
#: the buffer name of P in ESPACE layers (``megatron_espace.checkpointing.PROJECTION_KEY``)
PROJECTION_KEY = "espace_proj"
TRACKER = "latest_checkpointed_iteration.txt"

#: --dist-ckpt-strictness -> the mode that tolerates missing projections, same family
_TOLERANT = {
    "assume_ok_unexpected": "log_unexpected",
    "raise_unexpected": "log_unexpected",
    "return_unexpected": "log_unexpected",  # Megatron-LM cannot take a tuple back anyway
    "log_unexpected": "log_unexpected",
    "raise_all": "log_all",
    "return_all": "log_all",
    "log_all": "log_all",
    "ignore_all": "ignore_all",
}


class CheckpointMismatch(ValueError):
    """The checkpoint behind ``--load`` does not fit the ESPACE model beyond its projections."""


# ------------------------------------------------------------------------------------------
# flags


def espace_args(parser):
    """Add the ESPACE flags to Megatron-LM's parser (an ``extra_args_provider``)."""
    g = parser.add_argument_group(title="ESPACE")
    g.add_argument("--espace-config", type=str, default=None,
                   help="ESPACE config YAML: which linears to project, at which rank and "
                   "statistic (with --espace-projections)")
    g.add_argument("--espace-projections", type=str, default=None,
                   help="projections file written by `espace calibrate` (with --espace-config)")
    g.add_argument("--espace-keep-dropout", action="store_true",
                   help="keep --hidden-dropout/--attention-dropout while ESPACE retrains "
                   "(default: both set to 0, as in the paper)")
    g.add_argument("--no-espace-step-wgrad", dest="espace_step_wgrad", action="store_false",
                   help="compute A = W P and dW = dA P^T on every micro-batch instead of once "
                   "per step (the default; the gradients are the same)")
    return parser


def check_espace_args(args) -> bool:
    """Whether ESPACE is on; raises ``SystemExit`` for one flag without the other or a
    missing file."""
    config = getattr(args, "espace_config", None)
    projections = getattr(args, "espace_projections", None)
    if (config is None) != (projections is None):
        raise SystemExit("--espace-config and --espace-projections go together: pass both "
                         "(ESPACE) or neither (plain pretrain_gpt.py)")
    if config is None:
        return False
    for flag, path in (("--espace-config", config), ("--espace-projections", projections)):
        if not Path(path).exists():  # projections are a directory, older ones a file
            raise SystemExit(f"{flag} {path}: no such file")
    return True


def layer_spec_problem(args) -> Optional[str]:
    """Why the model ``args`` describe cannot take ESPACE layers, or None.

    ``args`` is Megatron-LM's namespace (``transformer_impl``, ``spec``, ``use_legacy_models``,
    ``init_model_with_meta_device``).
    """
    if getattr(args, "use_legacy_models", False):
        return ("--use-legacy-models builds megatron.legacy's GPT, whose linears are not "
                "megatron-core's: drop the flag")
    if getattr(args, "init_model_with_meta_device", False):
        return ("--init-model-with-meta-device: projections set on meta tensors would be "
                "replaced by uninitialised memory when the model is materialised; drop the flag")
    if getattr(args, "num_experts", None):
        return ("--num-experts: mixture-of-experts models are not supported. megatron-core's "
                "local spec saves pre_mlp_layernorm under Transformer Engine's fused name "
                "(mlp.linear_fc1.layer_norm_*) even in MoE layers, where Transformer Engine's "
                "spec keeps it as pre_mlp_layernorm.*, so an MoE baseline's norms would not "
                "load into the local-spec ESPACE model")
    impl = getattr(args, "transformer_impl", "transformer_engine")
    if getattr(args, "spec", None) is None and impl != "local":
        return (f"--transformer-impl {impl} builds "
                + ("Transformer Engine's fused LayerNorm+Linear layers (TELayerNorm"
                   "ColumnParallelLinear), which leave no place for a projection between the "
                   "norm and the GEMM" if impl == "transformer_engine" else
                   "inference-optimised layers that are not megatron-core's tensor-parallel "
                   "linears")
                + ". ESPACE needs megatron-core's local (unfused) layer spec: pass "
                "--transformer-impl local (its checkpoint keys are the fused layers': the "
                "local spec saves its norms under them).")
    return None


# ------------------------------------------------------------------------------------------
# the checkpoint --load resolves to, and how it compares with the model


def resolve_checkpoint_dir(load, pretrained_checkpoint=None, ckpt_step=None) -> Optional[Path]:
    """The directory Megatron-LM's ``load_checkpoint`` will read, or None when it loads none.

    Megatron-LM's rules at core_v0.16.1: ``--pretrained-checkpoint`` is used when ``--load``
    holds no tracker file; the tracker gives the iteration (or ``release``); ``--ckpt-step``
    overrides the iteration; without a tracker (and no ``--ckpt-step``) nothing is loaded.
    """
    load_dir = load
    if pretrained_checkpoint is not None and not (
            load is not None and (Path(load) / TRACKER).is_file()):
        load_dir = pretrained_checkpoint
    if load_dir is None:
        return None
    iteration, release = -1, False
    tracker = Path(load_dir) / TRACKER
    if tracker.is_file():
        text = tracker.read_text().strip()
        try:
            iteration = int(text)
        except ValueError:
            if text != "release":
                return None  # Megatron-LM exits on it with its own message
            release, iteration = True, 0
    if ckpt_step:
        iteration = ckpt_step
    if iteration == -1:
        return None
    return Path(load_dir) / ("release" if release else f"iter_{iteration:07d}")


def is_projection_key(key: str) -> bool:
    """A checkpoint key of an ESPACE projection (``…espace_proj`` or ``…espace_proj.L3``)."""
    return PROJECTION_KEY in key.split(".")[-2:]


@dataclasses.dataclass
class Comparison:
    """What the model asks of a checkpoint that the checkpoint lacks."""

    missing_projections: List[str]
    missing_other: List[str]
    #: (key, model global shape, checkpoint global shape)
    shape_mismatch: List[Tuple[str, tuple, tuple]]


def compare_with_checkpoint(sharded_state_dict, checkpoint_dir) -> Comparison:
    """Compare a model's sharded state dict (this rank's) with a torch_dist checkpoint's
    metadata: keys the checkpoint lacks, and tensors whose global shapes differ."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase, ShardedTensor
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    saved = {}
    for value in load_sharded_metadata(str(checkpoint_dir)).values():
        saved[value.key] = tuple(value.global_shape) if isinstance(value, ShardedTensor) else None
    out = Comparison([], [], [])
    seen = set()
    for value in nested_values(sharded_state_dict):
        if not isinstance(value, ShardedBase) or value.key in seen:
            continue
        seen.add(value.key)
        if value.key not in saved:
            (out.missing_projections if is_projection_key(value.key)
             else out.missing_other).append(value.key)
        elif isinstance(value, ShardedTensor) and saved[value.key] is not None and (
                tuple(value.global_shape) != saved[value.key]):
            out.shape_mismatch.append((value.key, tuple(value.global_shape), saved[value.key]))
    return out


def mismatch_message(comparison: Comparison, checkpoint_dir) -> Optional[str]:
    """The error for a checkpoint that does not fit beyond missing projections, or None."""
    lines = []
    if comparison.missing_other:
        keys = comparison.missing_other
        lines.append(f"it lacks {len(keys)} entries the model needs: " + ", ".join(keys[:6])
                     + (", ..." if len(keys) > 6 else ""))
    for key, model_shape, saved_shape in comparison.shape_mismatch[:6]:
        what = ("projection (rank L is its last dimension: was the checkpoint trained with "
                "another --espace-config?)" if is_projection_key(key) else "tensor")
        lines.append(f"{what} {key}: the model's global shape is {list(model_shape)}, "
                     f"the checkpoint's {list(saved_shape)}")
    if len(comparison.shape_mismatch) > 6:
        lines.append(f"... and {len(comparison.shape_mismatch) - 6} more shape mismatches")
    if not lines:
        return None
    return (f"{checkpoint_dir} does not fit this ESPACE model (a checkpoint of another model "
            "shape?):\n  " + "\n  ".join(lines))


def checkpoint_lacks_projections(checkpoint_dir, sharded_state_dict) -> bool:
    """Whether the model's projections are missing from ``checkpoint_dir`` (a baseline's).

    Raises :class:`CheckpointMismatch` naming the keys when anything else the model needs is
    missing or shaped differently. A directory that is not a torch_dist checkpoint (legacy
    ``torch`` format, absent) returns False: nothing to decide there.
    """
    from megatron.core.dist_checkpointing import check_is_distributed_checkpoint

    if checkpoint_dir is None or not check_is_distributed_checkpoint(str(checkpoint_dir)):
        return False
    comparison = compare_with_checkpoint(sharded_state_dict, checkpoint_dir)
    message = mismatch_message(comparison, checkpoint_dir)
    if message:
        raise CheckpointMismatch(message)
    return bool(comparison.missing_projections)


def strictness_for(current: str, lacks_projections: bool) -> str:
    """The ``--dist-ckpt-strictness`` to load with.

    Unchanged unless the checkpoint lacks projections; then the tolerant mode of the same
    family: the ``*_unexpected`` modes (and the default ``assume_ok_unexpected``) become
    ``log_unexpected``, the ``*_all`` modes ``log_all``; ``log_*`` and ``ignore_all`` stay.
    Only projections can be dropped that way, because :func:`checkpoint_lacks_projections`
    has already refused anything else missing.
    """
    if not lacks_projections:
        return current
    if current not in _TOLERANT:
        raise ValueError(f"unknown --dist-ckpt-strictness {current!r}; "
                         f"known: {sorted(_TOLERANT)}")
    return _TOLERANT[current]


# ------------------------------------------------------------------------------------------
# Megatron-LM


def add_megatron_lm_to_path(path=None) -> Path:
    """Make ``pretrain_gpt`` and ``megatron.training`` importable from a Megatron-LM checkout.

    ``path`` defaults to ``$MEGATRON_LM_PATH``; without either, ``pretrain_gpt`` must already
    be importable (the checkout on ``PYTHONPATH``). The checkout is *appended* to
    ``sys.path``, so the installed ``megatron.core`` (with its compiled dataset helpers) is the
    one used and the checkout supplies ``megatron.training``; their versions must agree.
    """
    path = path or os.environ.get("MEGATRON_LM_PATH")
    if path:
        root = Path(path).resolve()
        if not (root / "pretrain_gpt.py").is_file():
            raise SystemExit(f"MEGATRON_LM_PATH={path}: no pretrain_gpt.py there; point it at "
                             f"a Megatron-LM checkout (tag {MEGATRON_LM_TAG})")
        if str(root) not in sys.path:
            sys.path.append(str(root))
    else:
        import importlib.util

        spec = importlib.util.find_spec("pretrain_gpt")
        if spec is None or spec.origin is None:
            raise SystemExit("Megatron-LM not found: set MEGATRON_LM_PATH to a checkout at tag "
                             f"{MEGATRON_LM_TAG} (or put it on PYTHONPATH)")
        root = Path(spec.origin).resolve().parent
    check_megatron_versions(root)
    return root


def checkout_core_version(root) -> Optional[str]:
    """The megatron-core version a Megatron-LM checkout carries (``package_info.py``)."""
    info = Path(root) / "megatron" / "core" / "package_info.py"
    if not info.is_file():
        return None
    values = {}
    for line in info.read_text().splitlines():
        name, _, value = line.partition("=")
        if name.strip() in ("MAJOR", "MINOR", "PATCH"):
            values[name.strip()] = value.strip()
    if len(values) != 3:
        return None
    return ".".join(values[k] for k in ("MAJOR", "MINOR", "PATCH"))


def _version_tuple(version: str) -> tuple:
    """``"0.19.2"`` / ``"0.18.0rc1+abc"`` -> ``(0, 19, 2)`` / ``(0, 18, 0)``."""
    import re

    return tuple(int(x) for x in re.findall(r"\d+", version.split("rc")[0].split("+")[0])[:3])


def check_megatron_versions(root) -> None:
    """Refuse a checkout whose megatron-core differs from the installed one (set
    ``ESPACE_ALLOW_MEGATRON_MISMATCH=1`` to go on anyway)."""
    from megatron.core.package_info import __version__ as installed

    if not (0, 16, 1) <= _version_tuple(installed) < (0, 20):
        print(f"WARNING: megatron-core {installed} is outside the range this wrapper supports "
              f"({' to '.join(MEGATRON_LM_TAGS)})", file=sys.stderr)
    theirs = checkout_core_version(root)
    if theirs is None or installed.startswith(theirs):
        return
    message = (f"Megatron-LM checkout {root} carries megatron-core {theirs}, but "
               f"megatron-core {installed} is installed: use the checkout at tag "
               f"core_v{installed.split('rc')[0]} (this wrapper targets {MEGATRON_LM_TAG})")
    if os.environ.get("ESPACE_ALLOW_MEGATRON_MISMATCH") == "1":
        print(f"WARNING: {message}", file=sys.stderr)
        return
    raise SystemExit(message)


def register_te_checkpoint_hook(model) -> None:
    """Let a legacy ``--ckpt-format torch`` checkpoint of a Transformer Engine model load into
    the local-spec ``model``: megatron-core's ``mcore_gpt_load_te_state_dict_pre_hook`` renames
    the fused norm keys (``…linear_qkv.layer_norm_weight`` -> ``…input_layernorm.weight``,
    ``…linear_fc1.layer_norm_*`` -> ``…pre_mlp_layernorm.*``); other checkpoints have no such
    keys and pass unchanged. (torch_dist checkpoints need no hook: the local spec's
    ``sharded_state_dict`` already uses the fused names.)"""
    from megatron.core.post_training.modelopt.gpt.state_dict_hooks import (
        mcore_gpt_load_te_state_dict_pre_hook)

    model._register_load_state_dict_pre_hook(mcore_gpt_load_te_state_dict_pre_hook)


class ESPACEModelProvider:
    """``pretrain_gpt``'s model provider, then ESPACE on the built model (see module doc).

    Called by ``get_model`` once per model chunk on every rank, with the same keywords as
    ``pretrain_gpt.model_provider`` minus the builder.
    """

    def __init__(self, base_provider):
        self.base_provider = base_provider
        self._espace = None  # (config, projections), loaded on first use
        self._vp_hits = None  # rule -> layers matched so far over virtual pipeline chunks

    def __call__(self, pre_process=True, post_process=True, vp_stage=None, config=None,
                 pg_collection=None):
        from megatron.training import get_args

        args = get_args()
        espace_on = check_espace_args(args)
        if espace_on:
            self._prepare(args)
        model = self.base_provider(pre_process=pre_process, post_process=post_process,
                                   vp_stage=vp_stage, config=config,
                                   pg_collection=pg_collection)
        if espace_on:
            self._apply(model, args, vp_stage)
            register_te_checkpoint_hook(model)
            self._choose_strictness(model, args)
        return model

    # -- steps

    def _prepare(self, args):
        from megatron.training import print_rank_0

        problem = layer_spec_problem(args)
        if problem:
            raise SystemExit(f"ESPACE: {problem}")
        if not args.espace_keep_dropout and (args.hidden_dropout or args.attention_dropout):
            print_rank_0(f"ESPACE: dropout off while retraining (paper, Section 4.3): "
                         f"--hidden-dropout {args.hidden_dropout} -> 0, --attention-dropout "
                         f"{args.attention_dropout} -> 0 (--espace-keep-dropout keeps them)")
            args.hidden_dropout = args.attention_dropout = 0.0
        if self._espace is None:
            import megatron_espace as espace

            self._espace = (espace.ESPACEConfig.from_yaml(args.espace_config),
                            espace.Projections.load(args.espace_projections))

    def _apply(self, model, args, vp_stage):
        import megatron_espace as espace
        from megatron.training import print_rank_0

        cfg, projections = self._espace
        vp_size = getattr(args, "virtual_pipeline_model_parallel_size", None)
        if vp_stage is None or not vp_size or vp_size == 1:
            plans = espace.apply_espace(model, cfg, projections)
        else:
            plans = self._apply_chunk(model, cfg, projections, vp_stage, vp_size)
        where = "" if vp_stage is None else f", virtual pipeline chunk {vp_stage}"
        print_rank_0(f"ESPACE: projected {len(plans)} linear layers (rank 0's pipeline stage"
                     f"{where}) with {args.espace_config} and {args.espace_projections}")

    def _apply_chunk(self, model, cfg, projections, vp_stage, vp_size):
        """apply_espace on one virtual-pipeline chunk: a rule may match layers of other chunks
        only, so each chunk gets the rules that match something in it (on any rank; first
        match still wins, as a dropped rule matches none of this chunk's layers), and every
        rule must have matched once the last chunk is built."""
        import torch

        from megatron_espace.runtime import device
        from megatron_espace.surgery import linear_layers

        hits = [0] * len(cfg.layers)
        for name in linear_layers(model):
            rule = cfg.rule_for(name)
            if rule is not None:
                hits[rule.index] += 1
        counts = torch.tensor(hits, dtype=torch.long, device=device())
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(counts)
        counts = counts.tolist()
        if vp_stage == 0 or self._vp_hits is None:
            self._vp_hits = [0] * len(cfg.layers)
        self._vp_hits = [a + b for a, b in zip(self._vp_hits, counts)]
        kept = [r for r, c in zip(cfg.layers, counts) if c]
        plans = {}
        if kept:
            import megatron_espace as espace

            # the sub-config numbers its rules 0..n-1; errors name the rule's place in the file
            sub = dataclasses.replace(cfg, layers=[dataclasses.replace(r, index=j)
                                                   for j, r in enumerate(kept)])
            try:
                plans = espace.apply_espace(model, sub, projections)
            except espace.ConfigError as e:
                prefix = f"{cfg.source}: layers["
                message = str(e)
                if message.startswith(prefix):
                    j, _, rest = message[len(prefix):].partition("]")
                    if j.isdigit() and int(j) < len(kept):
                        message = f"{prefix}{kept[int(j)].index}]{rest}"
                raise espace.ConfigError(message) from None
        if vp_stage == vp_size - 1:
            for rule, total in zip(cfg.layers, self._vp_hits):
                if total == 0:
                    raise cfg.error(rule, "match", f"pattern '{rule.match}' matches no linear "
                                    "layer on any pipeline stage")
        return plans

    def _choose_strictness(self, model, args):
        """Inspect the checkpoint --load resolves to; see the module doc (collective)."""
        import torch
        from megatron.training import print_rank_0

        from megatron_espace.runtime import device

        checkpoint = None
        if not getattr(args, "moe_use_upcycling", False):
            checkpoint = resolve_checkpoint_dir(args.load,
                                                getattr(args, "pretrained_checkpoint", None),
                                                getattr(args, "ckpt_step", None))
        lacks, error = False, None
        if checkpoint is not None:
            try:
                lacks = checkpoint_lacks_projections(checkpoint, model.sharded_state_dict())
            except CheckpointMismatch as e:
                error = str(e)
        flags = torch.tensor([int(lacks), int(error is not None)], dtype=torch.long,
                             device=device())
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        lacks, failed = bool(flags[0].item()), bool(flags[1].item())
        if failed:
            raise SystemExit(f"ESPACE: --load {error}" if error else
                             f"ESPACE: {checkpoint} does not fit this model (reported by "
                             "another rank)")
        strictness = strictness_for(args.dist_ckpt_strictness, lacks)
        if strictness != args.dist_ckpt_strictness:
            print_rank_0(f"ESPACE: {checkpoint} holds no projections (a baseline checkpoint); "
                         "every other tensor the model needs is there, so it loads with "
                         f"--dist-ckpt-strictness {strictness} (was "
                         f"{args.dist_ckpt_strictness}) and the layers keep the projections "
                         f"from {args.espace_projections}")
            args.dist_ckpt_strictness = strictness


def use_installed_dataset_helpers() -> bool:
    """Let Megatron-LM use the installed megatron-core's compiled dataset helpers.

    Megatron-LM's ``initialize_megatron`` runs ``make`` in ``megatron/core/datasets`` on rank
    0. A checkout has the Makefile there (and needs a compiler and pybind11); the
    ``megatron-core`` wheel has no Makefile but ships the compiled ``helpers_cpp``, so the
    ``make`` fails and Megatron-LM exits. When the imported megatron-core is such a wheel
    with its helpers importable, ``compile_helpers`` becomes a no-op. Returns whether it did.
    """
    import importlib

    from megatron.core.datasets import utils as dataset_utils

    here = Path(dataset_utils.__file__).parent
    if (here / "Makefile").is_file():
        return False  # a source tree: Megatron-LM compiles the helpers as usual
    try:
        importlib.import_module("megatron.core.datasets.helpers_cpp")
    except ImportError:
        return False  # nothing to fall back on: let Megatron-LM report its own error
    dataset_utils.compile_helpers = lambda: None
    return True


def extra_args_provider(parser):
    """ModelOpt's flags when ModelOpt is installed (as pretrain_gpt.py), and ESPACE's."""
    import pretrain_gpt

    if pretrain_gpt.has_nvidia_modelopt:
        parser = pretrain_gpt.add_modelopt_args(parser)
    return espace_args(parser)


def pretrain_api(pretrain) -> str:
    """Which ``pretrain()`` Megatron-LM has: ``"args"`` or ``"config"``.

    * ``"args"`` (core_v0.16.1, 0.17): ``pretrain(train_valid_test_dataset_provider,
      model_provider, model_type, forward_step_func, ..., extra_args_provider,
      args_defaults, ...)`` parses the flags itself.
    * ``"config"`` (core_v0.18, 0.19): ``pretrain(cfg_container, train_valid_test_dataset_
      provider, ...)`` takes a ``PretrainConfigContainer`` built beforehand with
      ``parse_and_validate_args`` and ``pretrain_cfg_container_from_args``; in 0.18
      ``model_provider`` is the third positional parameter, from 0.19 a keyword after
      ``forward_step_func``: :func:`main` passes it by name, which fits both.

    ``pretrain`` is the function or just its parameter names (as the tests read them from
    a wheel's source).
    """
    import inspect

    names = list(pretrain) if isinstance(pretrain, (list, tuple)) else list(
        inspect.signature(pretrain).parameters)
    needed = {"train_valid_test_dataset_provider", "model_provider", "model_type",
              "forward_step_func"}
    if not needed <= set(names):
        raise SystemExit(f"Megatron-LM's pretrain({', '.join(names[:6])}, ...) is not one this "
                         f"wrapper knows (it supports {' to '.join(MEGATRON_LM_TAGS)})")
    if names[0] == "cfg_container":
        return "config"
    if "extra_args_provider" in names and "args_defaults" in names:
        return "args"
    raise SystemExit(f"Megatron-LM's pretrain({', '.join(names[:6])}, ...) takes neither flags "
                     f"nor a config container (this wrapper supports {' to '.join(MEGATRON_LM_TAGS)})")


def step_wgrad_setup(setup_model_and_optimizer):
    """Megatron-LM's ``setup_model_and_optimizer``, then
    ``accumulation.defer_weight_grads`` on the DDP chunks it built: ``A = W P`` and
    ``dW = (Σ dA) Pᵀ`` once per step. With ``--overlap-grad-reduce`` Megatron-LM's
    ``train()`` then sets ``config.no_sync_func`` to the chunks' (now wrapped) ``no_sync``
    itself; without it it leaves the function unset, so this sets it (DDP's ``no_sync`` only
    marks the non-last micro-batches then). Off with ``--no-espace-step-wgrad``, without
    ESPACE, and for models not wrapped in megatron-core's DDP (FSDP)."""

    def setup_then_defer(*args, **kwargs):
        from megatron.core.distributed import DistributedDataParallel
        from megatron.core.utils import get_model_config
        from megatron.training import get_args, print_rank_0

        from megatron_espace.accumulation import defer_weight_grads

        model, optimizer, scheduler = setup_model_and_optimizer(*args, **kwargs)
        flags = get_args()
        if (check_espace_args(flags) and getattr(flags, "espace_step_wgrad", True)
                and all(isinstance(chunk, DistributedDataParallel) for chunk in model)):
            layers = defer_weight_grads(model)
            config = get_model_config(model[0])
            if not flags.overlap_grad_reduce and config.no_sync_func is None:
                syncs = [chunk.no_sync for chunk in model]
                config.no_sync_func = syncs[0] if len(syncs) == 1 else syncs
            print_rank_0(f"ESPACE: A = W P and dW once per step on {layers} layers of rank 0's "
                         "stage (--no-espace-step-wgrad: per micro-batch)")
        return model, optimizer, scheduler

    return setup_then_defer


def main() -> None:
    """pretrain_gpt.py's ``__main__`` block, with the ESPACE provider and flags, for either
    ``pretrain()`` (:func:`pretrain_api`). With the config container, the model still comes
    from the provider (``pretrain_cfg_container_from_args(args)`` without a model config:
    ``setup_model_and_optimizer`` then calls ``get_model(model_provider)``), so ESPACE is
    applied at the same point on every version."""
    from functools import partial

    add_megatron_lm_to_path()
    use_installed_dataset_helpers()
    import pretrain_gpt
    from megatron.core.enums import ModelType
    from megatron.training import inprocess_restart, pretrain, set_startup_timestamps

    from megatron.training import training

    training.setup_model_and_optimizer = step_wgrad_setup(training.setup_model_and_optimizer)
    set_startup_timestamps(program_start=_PROGRAM_START_TIME, main_entry=time.time())
    pretrain_gpt.train_valid_test_datasets_provider.is_distributed = True
    api = pretrain_api(pretrain)
    run, store = inprocess_restart.maybe_wrap_for_inprocess_restart(pretrain)
    common = dict(
        model_provider=ESPACEModelProvider(partial(pretrain_gpt.model_provider,
                                                   pretrain_gpt.gpt_builder)),
        model_type=ModelType.encoder_or_decoder,
        forward_step_func=pretrain_gpt.forward_step,
        store=store,
        get_embedding_ranks=pretrain_gpt.get_embedding_ranks,
    )
    if api == "args":
        run(pretrain_gpt.train_valid_test_datasets_provider, args_defaults=ARGS_DEFAULTS,
            extra_args_provider=extra_args_provider, **common)
        return
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    args = parse_and_validate_args(extra_args_provider=extra_args_provider,
                                   args_defaults=ARGS_DEFAULTS)
    run(pretrain_cfg_container_from_args(args), pretrain_gpt.train_valid_test_datasets_provider,
        **common)


if __name__ == "__main__":
    main()
