"""Train a GPT on megatron-core: the baseline trainer, and ESPACE retraining with one flag.

    torchrun --nproc_per_node=N -m megatron_espace.train \\
        --num-layers 24 --hidden-size 2048 --num-attention-heads 16 --seq-length 2048 \\
        --micro-batch-size 4 --global-batch-size 256 --train-iters 10000 --lr 3e-4 \\
        --data-path data/corpus_text_document --save ckpt/ --load ckpt/ \\
        [--espace-config espace.yaml --espace-projections projections.safetensors]

Flags are Megatron-LM's. Checkpoints use Megatron-LM's layout (``iter_XXXXXXX/`` torch_dist
directories and ``latest_checkpointed_iteration.txt``, updated only after a save completes)
and hold the model, the optimizer, and in ``espace_state.json`` / ``rng/`` the iteration,
scheduler, consumed samples and every rank's RNG state: a resumed run repeats the
uninterrupted one exactly.

With ``--espace-config``, ESPACE is applied to the built model before DDP and the optimizer
exist; ``--load`` may then point at a *baseline* checkpoint: W and its optimizer state are
loaded (unless ``--no-load-optim``), the iteration count starts again at 0, and dropout is
off (paper Section 4.3; ``--espace-keep-dropout`` keeps it).

Failures and restarts: when ``--save`` already holds a checkpoint, the run resumes from it
whatever ``--load`` says (so one command serves the first launch and every requeue; the
baseline is read only while ``--save`` is empty, as with Megatron-LM's
``--pretrained-checkpoint``). A run never overwrites a checkpoint newer than the one it
starts from, holds an exclusive lock on ``--save``, and stops with an error at the first
NaN/Inf loss or gradient norm (``--no-check-for-nan-in-loss-and-grad`` trains on) before
that state can be saved.
"""

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_espace import arguments, atomic, compat, save_dir
from megatron_espace.schedule import run_microbatches
from megatron_espace.save_dir import TRACKER

STATE = "espace_state.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m megatron_espace.train",
                                description=__doc__.split("\n\n")[0])
    arguments.add_model_args(p)
    arguments.add_parallel_args(p)
    arguments.add_data_args(p)
    arguments.add_checkpoint_args(p)
    g = p.add_argument_group("training (Megatron-LM flags)")
    g.add_argument("--train-iters", type=int, required=True)
    g.add_argument("--lr", type=float, required=True)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", default="cosine",
                   choices=["constant", "linear", "cosine", "inverse-square-root"])
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--save", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--exit-interval", type=int, default=None,
                   help="save and exit after an iteration divisible by this (the schedule still "
                   "runs to --train-iters, so a resumed run continues it exactly)")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--finetune", action="store_true",
                   help="load weights (and optimizer) but start again at iteration 0")
    g.add_argument("--pretrained-checkpoint", default=None,
                   help="the checkpoint to start from (with --finetune semantics) while "
                   "--load holds none yet; Megatron-LM's flag")
    g.add_argument("--check-for-nan-in-loss-and-grad", action=argparse.BooleanOptionalAction,
                   default=True, help="stop at the first NaN/Inf loss or gradient norm, "
                   "before that state is saved (default on, as in Megatron-LM)")
    g.add_argument("--skip-train", action="store_true", help="only evaluate")
    g.add_argument("--metrics-json", default=None,
                   help="also write the run's losses and parameter counts here (rank 0)")
    e = p.add_argument_group("ESPACE")
    e.add_argument("--espace-config", default=None)
    e.add_argument("--espace-projections", default=None)
    e.add_argument("--espace-keep-dropout", action="store_true")
    e.add_argument("--espace-step-wgrad", action=argparse.BooleanOptionalAction, default=True,
                   help="with several micro-batches per step, compute A = W P and "
                   "dW = (sum dA) P^T once per step instead of once per micro-batch (default "
                   "on; the gradients are the same)")
    e.add_argument("--espace-compressed", action="store_true",
                   help="build the compressed inference model (export_compressed) before "
                   "loading: for checkpoints written by `espace convert`")
    e.add_argument("--espace-drop-projections", action="store_true",
                   help="load an ESPACE checkpoint's weights into a model without ESPACE, "
                   "dropping its projections (refused without this flag)")
    args = arguments.parse_args(p, argv)
    if (args.espace_config is None) != (args.espace_projections is None):
        p.error("--espace-config and --espace-projections go together")
    args.split_weights = weights = _split_weights(p, args.split)
    if args.eval_iters > 0 and weights[1] == 0:
        p.error(f"--split {args.split} leaves no validation data, but --eval-iters "
                f"{args.eval_iters} evaluates on it; give the validation split a weight "
                "(e.g. --split 98,2,0) or pass --eval-iters 0")
    if args.skip_train and args.eval_iters == 0:
        p.error("--skip-train only evaluates: it needs --eval-iters > 0")
    if args.espace_config and not args.espace_keep_dropout:
        args.hidden_dropout = args.attention_dropout = 0.0
    args.baseline = None  # set by load(): the checkpoint training started from
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    history = run(args)
    if args.metrics_json and int(os.environ.get("RANK", "0")) == 0:
        atomic.write_json(args.metrics_json, history)
    return 0


def run(args) -> dict:
    """Train as the flags say; returns {"train_loss": [...], "valid_loss": [...], "iteration"}."""
    import megatron_espace as espace
    from megatron.core import parallel_state

    from megatron_espace import runtime

    # ---------------------------------------------------------------- setup
    cfg = projections = None
    if args.espace_config:  # bad input fails before any process group or model exists
        cfg = espace.ESPACEConfig.from_yaml(args.espace_config)
        projections = espace.Projections.load(args.espace_projections)
    runtime.initialize(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                       seed=args.seed)
    dp = parallel_state.get_data_parallel_world_size()
    gbs = args.global_batch_size or args.micro_batch_size * dp
    if gbs % (args.micro_batch_size * dp):
        raise SystemExit(f"--global-batch-size {gbs} is not a multiple of --micro-batch-size "
                         f"{args.micro_batch_size} x data-parallel size {dp}")
    num_micro = gbs // (args.micro_batch_size * dp)
    rank0 = dist.get_rank() == 0
    if args.save and not args.skip_train:
        runtime.agree(lambda: save_dir.lock(args.save))  # one job per --save
    source = _start_point(args)

    tokenizer = arguments.tokenizer(args)
    model = arguments.build_model(args, tokenizer.vocab_size)
    if cfg is not None:
        plans = espace.apply_espace(model, cfg, projections)
        if args.espace_compressed:
            espace.export_compressed(model)
        if rank0:
            print(f"ESPACE on {len(plans)} layers of this stage"
                  + (" (compressed inference form)" if args.espace_compressed else "")
                  + (f", layer compression {min(p.compression for p in plans.values()):.1%}"
                     f" to {max(p.compression for p in plans.values()):.1%}" if plans else ""))
    ddp, optimizer, scheduler = _wrap(model, args)
    counts = espace.count_parameters(model)
    if rank0:
        print(f"parameters: {counts['total']:,} ({counts['gemm']:,} in GEMM layers, "
              f"{1 - counts['gemm'] / counts['gemm_dense']:.1%} fewer than dense)")

    iteration, consumed = 0, 0
    if source is not None:
        iteration, consumed = load(args, model, optimizer, scheduler, source)
    elif rank0 and args.load:
        print(f"--load {args.load}: no checkpoint there yet; starting from scratch")
    if args.save and not args.skip_train:
        _refuse_overwriting(args.save, iteration)
    if projections is not None and rank0:
        _warn_other_checkpoint(args, projections)
    train_ds, valid_ds, test_ds = _datasets(args, tokenizer, gbs)

    # ---------------------------------------------------------------- the loop
    history = {"train_loss": [], "lr": [], "valid_loss": [], "iteration": iteration,
               "parameters": counts}

    def evaluate_now(tag, dataset=valid_ds, name="validation"):
        if args.eval_iters == 0:
            return None
        loss = evaluate(ddp, dataset, args, num_micro)
        if name == "validation":
            history["valid_loss"].append(loss)
        else:
            history["test_loss"] = loss
        if rank0:
            print(f" {name} loss at {tag} | lm loss value: {loss:.6E} | lm loss PPL: "
                  f"{math.exp(min(loss, 20)):.6E} |", flush=True)
        return loss

    if args.skip_train:
        tag = "iteration 0" if not args.load else f"{args.load}"
        evaluate_now(tag)
        if test_ds is not None and len(test_ds):
            evaluate_now(tag, test_ds, "test")
        runtime.destroy()
        return history
    from megatron_espace.data import batch_iterator

    data = batch_iterator(train_ds, args.micro_batch_size, start=consumed,
                          dp_rank=parallel_state.get_data_parallel_rank(), dp_size=dp)
    window, start, first = [], time.monotonic(), iteration
    while iteration < args.train_iters:
        micro = [next(data) for _ in range(num_micro)]
        loss, grad_norm = train_step(ddp, optimizer, micro, args)
        if args.check_for_nan_in_loss_and_grad:
            _stop_on_nan(args, iteration + 1, loss, grad_norm)
        scheduler.step(increment=gbs)
        iteration += 1
        consumed += gbs
        window.append(loss)
        history["train_loss"].append(loss)
        history["lr"].append(optimizer.param_groups[0]["lr"])
        if iteration % args.log_interval == 0 and rank0:
            ms = (time.monotonic() - start) * 1000 / len(window)
            print(f" iteration {iteration:8d}/{args.train_iters:8d} | consumed samples: "
                  f"{consumed:12d} | elapsed time per iteration (ms): {ms:.1f} | learning "
                  f"rate: {optimizer.param_groups[0]['lr']:.3E} | global batch size: {gbs:5d} "
                  f"| lm loss: {sum(window) / len(window):.6E} | grad norm: {grad_norm:.3f} |",
                  flush=True)
        if iteration % args.log_interval == 0:
            window, start = [], time.monotonic()
        if args.eval_interval and iteration % args.eval_interval == 0:
            evaluate_now(f"iteration {iteration}")
        if args.save and args.save_interval and iteration % args.save_interval == 0:
            save(args, model, optimizer, scheduler, iteration, consumed)
        if args.exit_interval and iteration % args.exit_interval == 0:
            break
    if args.save and iteration > first and not (args.save_interval
                                                and iteration % args.save_interval == 0):
        save(args, model, optimizer, scheduler, iteration, consumed)
    evaluate_now(f"the end of training (iteration {iteration})")
    if test_ds is not None and len(test_ds):
        evaluate_now(f"the end of training (iteration {iteration})", test_ds, "test")
    history["iteration"] = iteration
    runtime.destroy()
    save_dir.release_all()
    return history


# -------------------------------------------------------------------- pieces


def _split_weights(parser, split: str) -> list:
    """``--split``'s three weights (missing ones are 0)."""
    try:
        weights = [float(w) for w in split.replace("/", ",").split(",")]
    except ValueError:
        parser.error(f"--split {split}: expected up to three numbers, e.g. 949,50,1")
    if len(weights) > 3 or any(not math.isfinite(w) or w < 0 for w in weights) or \
            sum(weights) <= 0:
        parser.error(f"--split {split}: expected up to three weights >= 0, not all 0")
    return weights + [0.0] * (3 - len(weights))


def _start_point(args):
    """The checkpoint directory this run starts from, or None for a fresh model.

    ``--save`` holding a checkpoint wins (a restarted or requeued run resumes it); else
    ``--load``; else ``--pretrained-checkpoint`` (as ``--finetune``). ``--load`` naming the
    still-empty ``--save`` (the resume idiom, on the first launch) starts from scratch.
    """
    def tracked(directory, flag):
        try:
            return save_dir.tracker_iteration(directory)
        except ValueError as e:
            raise SystemExit(f"{flag} {directory}: {e}") from None

    same = args.load and args.save and Path(args.load).resolve() == Path(args.save).resolve()
    if args.save and tracked(args.save, "--save") is not None:
        args.resuming = True
        if dist.get_rank() == 0:
            print(f"resuming from --save {args.save} (this run's checkpoint)"
                  + (f"; --load {args.load} is not read" if args.load and not same else ""),
                  flush=True)
        return arguments.checkpoint_dir(args.save)
    args.resuming = False
    if args.load and ((Path(args.load) / TRACKER).is_file()
                      or (Path(args.load) / "metadata.json").is_file()):
        return arguments.checkpoint_dir(args.load)
    if args.pretrained_checkpoint:
        args.finetune = True
        return arguments.checkpoint_dir(args.pretrained_checkpoint)
    if args.load and not same:
        arguments.checkpoint_dir(args.load)  # raises, naming what is missing
    return None


def _refuse_overwriting(save, iteration: int) -> None:
    newer = save_dir.newer_than(save, iteration)
    if newer:
        names = ", ".join(p.name for p in newer[:3]) + (" ..." if len(newer) > 3 else "")
        raise SystemExit(
            f"--save {save}: holds {names}, newer than iteration {iteration} this run starts "
            f"from; a run never overwrites newer checkpoints. Resume them (fix {TRACKER} "
            "if it lags), move them away, or use another --save")


def _warn_other_checkpoint(args, projections) -> None:
    """Warn when the projections were calibrated on another checkpoint than the run's
    baseline. ``info['checkpoint']`` (written by calibrate) is a ``fingerprint.checkpoint``
    (compared by content while the baseline exists) or, in older files, a path."""
    from megatron_espace import fingerprint

    calibrated, baseline = projections.info.get("checkpoint"), args.baseline
    if not calibrated or baseline is None:
        return
    if isinstance(calibrated, dict) and "metadata" in calibrated and Path(baseline).is_dir():
        same = calibrated["metadata"] == fingerprint.checkpoint(baseline)["metadata"]
    else:
        path = calibrated.get("path", "") if isinstance(calibrated, dict) else calibrated
        same = Path(path).resolve() == Path(baseline).resolve()
    if not same:
        where = calibrated.get("path") if isinstance(calibrated, dict) else calibrated
        print(f"WARNING: {args.espace_projections} was calibrated on {where}, but this "
              f"run's baseline is {baseline}: the projections may not fit its weights",
              flush=True)


def _stop_on_nan(args, iteration: int, loss: float, grad_norm: float) -> None:
    """Raise ``SystemExit`` on every rank when the loss or the gradient norm is not finite."""
    bad = torch.tensor([not math.isfinite(loss), not math.isfinite(grad_norm)],
                       dtype=torch.float32)
    if dist.get_world_size() > 1:
        from megatron_espace.runtime import device

        bad = bad.to(device())
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.any():
        what = " and ".join(w for w, b in zip(("loss", "gradient norm"), bad.tolist()) if b)
        what += " are" if bad.all() else " is"
        last = save_dir.tracker_iteration(args.save) if args.save else None
        kept = (f"; {args.save}/{TRACKER} stays on iteration {last}" if last is not None
                else "; nothing was saved")
        raise SystemExit(
            f"iteration {iteration}: {what} NaN/Inf (lm loss {loss}, grad norm {grad_norm}); "
            f"stopped without saving this state{kept}. Lower --lr or check the data; "
            "--no-check-for-nan-in-loss-and-grad trains on")


def _wrap(model, args):
    """megatron DDP, optimizer and learning-rate schedule around ``model``."""
    from megatron.core.distributed import DistributedDataParallel as DDP
    from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = model.config
    ddp = DDP(config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=args.bf16, use_distributed_optimizer=args.use_distributed_optimizer),
        model)
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, clip_grad=args.clip_grad,
        bf16=args.bf16, params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_distributed_optimizer=args.use_distributed_optimizer), [ddp])
    config.finalize_model_grads_func = finalize_model_grads
    if args.espace_step_wgrad:
        from megatron_espace.accumulation import defer_weight_grads, step_bytes

        if defer_weight_grads([ddp]) and dist.get_rank() == 0:  # wraps ddp.no_sync: first
            held = step_bytes([ddp], torch.bfloat16 if args.bf16 else torch.float32)
            print(f"ESPACE: A = W P and dW = (sum dA) P^T once per step, holding "
                  f"{held / 2**20:.1f} MiB on rank 0 through each step "
                  "(--no-espace-step-wgrad: per micro-batch)", flush=True)
    config.no_sync_func = ddp.no_sync
    if args.bf16:
        config.grad_scale_func = optimizer.scale_loss
    gbs = args.global_batch_size or args.micro_batch_size
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if args.lr_warmup_iters else args.lr, max_lr=args.lr,
        min_lr=args.min_lr, lr_warmup_steps=args.lr_warmup_iters * gbs,
        lr_decay_steps=(args.lr_decay_iters or args.train_iters) * gbs,
        lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay,
        end_wd=args.weight_decay, wd_incr_steps=args.train_iters * gbs, wd_incr_style="constant")
    return ddp, optimizer, scheduler


def _datasets(args, tokenizer, gbs):
    from megatron_espace.data import build_datasets

    # every evaluation uses the same held-out batches, so perplexities compare exactly
    wanted = (args.train_iters * gbs, args.eval_iters * gbs, args.eval_iters * gbs)
    sizes = tuple(n if w > 0 else None for w, n in zip(args.split_weights, wanted))
    return build_datasets(args.data_path, seq_length=args.seq_length, split=args.split,
                          num_samples=sizes, tokenizer=tokenizer, seed=args.seed,
                          path_to_cache=args.data_cache_path)


def train_step(ddp, optimizer, micro, args):
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    loss = run_microbatches(ddp, micro, args.seq_length, args.micro_batch_size,
                            forward_only=False)
    _, grad_norm, _ = optimizer.step()
    if grad_norm is None:  # --clip-grad 0: the norm was not needed for clipping
        grad_norm = optimizer.get_grad_norm() if args.check_for_nan_in_loss_and_grad else 0.0
    return loss, grad_norm


@torch.no_grad()
def evaluate(ddp, dataset, args, num_micro) -> float:
    from megatron.core import parallel_state

    from megatron_espace.data import batch_iterator

    ddp.eval()
    batches = batch_iterator(dataset, args.micro_batch_size,
                             dp_rank=parallel_state.get_data_parallel_rank(),
                             dp_size=parallel_state.get_data_parallel_world_size())
    micro = [b for _, b in zip(range(args.eval_iters * num_micro), batches)]
    if not micro:
        raise SystemExit(f"--split {args.split}: the evaluation split is empty")
    loss = run_microbatches(ddp, micro, args.seq_length, args.micro_batch_size,
                            forward_only=True)
    ddp.train()
    return loss


# -------------------------------------------------------------------- checkpoints


def _sharded(model, optimizer, is_loading, layout="fully_reshardable"):
    """The model's (and optimizer's) sharded state dict; ``layout`` is the distributed
    optimizer's ``distrib_optim_sharding_type`` (we save ``fully_reshardable``; a load asks
    for what the checkpoint holds)."""
    from megatron_espace.checkpointing import model_sharded_state_dict

    model_sd = model_sharded_state_dict(model)
    sd = {"model": model_sd}
    if optimizer is not None:
        meta = {"distrib_optim_sharding_type": layout}
        sd["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                       metadata=meta)
    return sd


def save(args, model, optimizer, scheduler, iteration, consumed) -> None:
    """``{save}/iter_XXXXXXX``, then the tracker file: a killed save leaves the old pointer.

    The RNG states and ``espace_state.json`` go into the checkpoint before it gets its
    final name, so every ``iter_XXXXXXX`` directory is complete.
    """
    from megatron_espace import checkpointing

    root = Path(args.save)
    path = root / f"iter_{iteration:07d}"
    old = path.with_name(path.name + ".old")
    if dist.get_rank() == 0 and path.exists():  # the same iteration again (a restarted run):
        shutil.rmtree(old, ignore_errors=True)  # keep the previous copy until this one is done
        os.replace(path, old)
    dist.barrier()

    def before_commit(tmp):
        _save_rng(tmp)
        if dist.get_rank() == 0:
            atomic.write_json(tmp / STATE, {
                "iteration": iteration, "consumed_samples": consumed,
                "scheduler": scheduler.state_dict(), "espace_config": args.espace_config,
                "espace_projections": args.espace_projections, "baseline": args.baseline})

    checkpointing.save(_sharded(model, optimizer, is_loading=False), path,
                       before_commit=before_commit,
                       content_metadata={"distrib_optim_sharding_type": "fully_reshardable"})
    if dist.get_rank() == 0:
        arguments.write_model_args(args, root)
        atomic.write_text(root / TRACKER, str(iteration))
        shutil.rmtree(old, ignore_errors=True)
        print(f"saved checkpoint at iteration {iteration} to {path}", flush=True)
    dist.barrier()


def load(args, model, optimizer, scheduler, path=None):
    """Load ``path`` (default: ``--load``); returns (iteration, consumed samples) to
    continue from. Sets ``args.baseline``: the checkpoint this run's training started from."""
    from megatron_espace import checkpointing

    from megatron.core import dist_checkpointing

    path = Path(path) if path is not None else arguments.checkpoint_dir(args.load)
    has_optim = any(k.startswith("optimizer.")
                    for k in dist_checkpointing.load_tensors_metadata(str(path)))
    load_optim = None if (args.no_load_optim or args.skip_train or not has_optim) else optimizer
    if load_optim is not None and args.use_distributed_optimizer:
        compat.distributed_optimizer_torch_adam()
        compat.allocate_adam_state(optimizer)
    layout = "fully_reshardable"
    if load_optim is not None and args.use_distributed_optimizer:
        layout = checkpointing.optimizer_layout(path)
        if layout == "dp_reshardable":
            checkpointing.refuse_dp_reshardable(path)
    sd = _sharded(model, load_optim, is_loading=True, layout=layout)
    checkpointing.check_kind(sd, path, args.espace_drop_projections)
    baseline = bool(checkpointing.drop_missing_projections(sd, path))
    if baseline and getattr(args, "resuming", False):
        raise SystemExit(f"--save {args.save}: holds a checkpoint without ESPACE projections "
                         f"({path}), not one of this ESPACE run; use a fresh --save")
    meta_file = path / STATE
    fresh = args.finetune or baseline or not meta_file.is_file()
    state = checkpointing.load(sd, path, drop_projections=args.espace_drop_projections)
    from megatron_espace.surgery import unwrap

    unwrap(model).load_state_dict(state["model"])
    if load_optim is not None:
        if fresh:  # the saved param groups carry the old run's lr range: retrain at this one
            compat.set_param_group_lr(state["optimizer"], args.lr, args.min_lr)
        optimizer.load_state_dict(state["optimizer"])
        compat.unshare_adam_steps(optimizer)
    meta = {} if not meta_file.is_file() else json.loads(meta_file.read_text())
    args.baseline = str(path) if fresh else meta.get("baseline")
    if dist.get_rank() == 0:
        what = (("baseline weights" if baseline else "checkpoint")
                + (" with optimizer state" if load_optim else " (weights only)"))
        print(f"loaded {what} from {path}" + ("; starting at iteration 0" if fresh else
                                             f" at iteration {meta['iteration']}"))
    if fresh:
        return 0, 0
    scheduler.load_state_dict(meta["scheduler"])
    _load_rng(path)
    return meta["iteration"], meta["consumed_samples"]


def _save_rng(path: Path) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    for name, state in get_cuda_rng_tracker().get_states().items():
        states[f"tracker/{name}"] = state
    atomic.save_safetensors(path / "rng" / f"rank{dist.get_rank()}.safetensors",
                            {k: v.contiguous() for k, v in states.items()})


def _load_rng(path: Path) -> None:
    from safetensors.torch import load_file

    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    file = path / "rng" / f"rank{dist.get_rank()}.safetensors"
    if not file.is_file():
        return  # saved at another world size: the RNG streams cannot carry over
    states = load_file(str(file))
    torch.set_rng_state(states.pop("cpu"))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states.pop("cuda"))
    tracker = {k.split("/", 1)[1]: v for k, v in states.items() if k.startswith("tracker/")}
    if tracker:
        get_cuda_rng_tracker().set_states(tracker)


if __name__ == "__main__":
    from megatron_espace.runtime import run_main

    sys.exit(run_main(main))
