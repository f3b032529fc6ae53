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

from megatron_espace import arguments, atomic, compat
from megatron_espace.schedule import run_microbatches

STATE = "espace_state.json"
TRACKER = "latest_checkpointed_iteration.txt"


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
    g.add_argument("--skip-train", action="store_true", help="only evaluate")
    g.add_argument("--metrics-json", default=None,
                   help="also write the run's losses and parameter counts here (rank 0)")
    e = p.add_argument_group("ESPACE")
    e.add_argument("--espace-config", default=None)
    e.add_argument("--espace-projections", default=None)
    e.add_argument("--espace-keep-dropout", action="store_true")
    e.add_argument("--espace-compressed", action="store_true",
                   help="build the compressed inference model (export_compressed) before "
                   "loading: for checkpoints written by `espace convert`")
    args = p.parse_args(argv)
    if (args.espace_config is None) != (args.espace_projections is None):
        p.error("--espace-config and --espace-projections go together")
    if args.espace_config and not args.espace_keep_dropout:
        args.hidden_dropout = args.attention_dropout = 0.0
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
    if args.load:
        iteration, consumed = load(args, model, optimizer, scheduler)
    train_ds, valid_ds, test_ds = _datasets(args, tokenizer, gbs)

    # ---------------------------------------------------------------- the loop
    history = {"train_loss": [], "lr": [], "valid_loss": [], "iteration": iteration,
               "parameters": counts}

    def evaluate_now(tag, dataset=valid_ds, name="validation"):
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
    window, start = [], time.monotonic()
    while iteration < args.train_iters:
        micro = [next(data) for _ in range(num_micro)]
        loss, grad_norm = train_step(ddp, optimizer, micro, args)
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
    if args.save and not (args.save_interval and iteration % args.save_interval == 0):
        save(args, model, optimizer, scheduler, iteration, consumed)
    evaluate_now(f"the end of training (iteration {iteration})")
    if test_ds is not None and len(test_ds):
        evaluate_now(f"the end of training (iteration {iteration})", test_ds, "test")
    history["iteration"] = iteration
    runtime.destroy()
    return history


# -------------------------------------------------------------------- pieces


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
    weights = [float(w) for w in args.split.replace("/", ",").split(",")]
    wanted = (args.train_iters * gbs, args.eval_iters * gbs, args.eval_iters * gbs)
    sizes = tuple(n if i >= len(weights) or weights[i] > 0 else None
                  for i, n in enumerate(wanted))
    return build_datasets(args.data_path, seq_length=args.seq_length, split=args.split,
                          num_samples=sizes, tokenizer=tokenizer, seed=args.seed,
                          path_to_cache=args.data_cache_path)


def train_step(ddp, optimizer, micro, args):
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    loss = run_microbatches(ddp, micro, args.seq_length, args.micro_batch_size,
                            forward_only=False)
    _, grad_norm, _ = optimizer.step()
    return loss, grad_norm or 0.0


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


def _sharded(model, optimizer, is_loading):
    from megatron_espace.checkpointing import model_sharded_state_dict

    model_sd = model_sharded_state_dict(model)
    sd = {"model": model_sd}
    if optimizer is not None:
        meta = {"distrib_optim_sharding_type": "fully_reshardable"}
        sd["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                       metadata=meta)
    return sd


def save(args, model, optimizer, scheduler, iteration, consumed) -> None:
    """``{save}/iter_XXXXXXX``, then the tracker file: a killed save leaves the old pointer."""
    from megatron_espace import checkpointing

    root = Path(args.save)
    path = root / f"iter_{iteration:07d}"
    old = path.with_name(path.name + ".old")
    if dist.get_rank() == 0 and path.exists():  # the same iteration again (a restarted run):
        shutil.rmtree(old, ignore_errors=True)  # keep the previous copy until this one is done
        os.replace(path, old)
    dist.barrier()
    checkpointing.save(_sharded(model, optimizer, is_loading=False), path)
    _save_rng(path)
    if dist.get_rank() == 0:
        atomic.write_json(path / STATE, {
            "iteration": iteration, "consumed_samples": consumed,
            "scheduler": scheduler.state_dict(), "espace_config": args.espace_config,
            "espace_projections": args.espace_projections})
        atomic.write_text(root / TRACKER, str(iteration))
        shutil.rmtree(old, ignore_errors=True)
        print(f"saved checkpoint at iteration {iteration} to {path}", flush=True)
    dist.barrier()


def load(args, model, optimizer, scheduler):
    """Load ``--load``; returns (iteration, consumed samples) to continue from."""
    from megatron_espace import checkpointing

    from megatron.core import dist_checkpointing

    path = arguments.checkpoint_dir(args.load)
    has_optim = any(k.startswith("optimizer.")
                    for k in dist_checkpointing.load_tensors_metadata(str(path)))
    load_optim = None if (args.no_load_optim or args.skip_train or not has_optim) else optimizer
    if load_optim is not None and args.use_distributed_optimizer:
        compat.distributed_optimizer_torch_adam()
        compat.allocate_adam_state(optimizer)
    sd = _sharded(model, load_optim, is_loading=True)
    baseline = bool(checkpointing.drop_missing_projections(sd, path))
    try:
        state = checkpointing.load(sd, path)
    except BaseException as e:  # CheckpointException is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise SystemExit(f"--load {path}: does not fit this model ({type(e).__name__}: "
                         f"{str(e)[:500]})") from None
    from megatron_espace.surgery import unwrap

    unwrap(model).load_state_dict(state["model"])
    if load_optim is not None:
        optimizer.load_state_dict(state["optimizer"])
        compat.unshare_adam_steps(optimizer)
    meta_file = path / STATE
    fresh = args.finetune or baseline or not meta_file.is_file()
    if dist.get_rank() == 0:
        what = (("baseline weights" if baseline else "checkpoint")
                + (" with optimizer state" if load_optim else " (weights only)"))
        print(f"loaded {what} from {path}" + ("; starting at iteration 0" if fresh else ""))
    if fresh:
        if load_optim is not None:  # the loaded param groups carry the old run's lr range
            for group in optimizer.param_groups:
                group["max_lr"], group["min_lr"] = args.lr, args.min_lr
        return 0, 0
    meta = json.loads(meta_file.read_text())
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
