"""Training-iteration time of an ESPACE model at ~50% GEMM compression over the baseline's.

What it measures: one full training step (``--micro-batches`` forward/backward passes through
megatron-core's schedule, gradient finalisation, Adam step) of a GPT with hidden 512, FFN
2048, 4 layers, seq 512, micro-batch 4, float32 on CPU (bf16 on CUDA), at tensor-parallel
size ``--tp`` (under torchrun; with TP > 1 both without and with sequence parallelism); the
ESPACE model has every GEMM at 50% layer compression (L = KN / 2(K+N) rounded down to a
multiple of 64) and keeps W trainable, as in retraining. Same shapes, same data, interleaved
iterations, the slowest rank's medians.

Two ESPACE steps are timed: the default (``A = W P`` and ``dW = (Σ dA) Pᵀ`` once per step,
``accumulation.defer_weight_grads``) and ``--no-espace-step-wgrad``'s (both per micro-batch).
It also prints the W-side work (``A = W P`` and ``dW = dA Pᵀ`` of every layer, the GEMMs that
do not depend on the tokens) of one micro-batch as a share of the per-micro-batch step's time
and FLOPs, and the matmul FLOPs of both steps.

    .venv/bin/python benchmarks/bench_train_step.py
    .venv/bin/torchrun --nproc_per_node 2 benchmarks/bench_train_step.py --tp 2

It asserts nothing (target <= 0.80 on CPU; the paper reports up to 15% faster iterations).
"""

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore")


def step_fn(model, micro, step_wgrad):
    """One optimizer step over the micro-batches ``micro``, with megatron DDP + Adam."""
    from megatron.core.distributed import DistributedDataParallel as DDP
    from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_espace.accumulation import defer_weight_grads
    from tests.common import pipeline_forward_backward

    config = model.config
    ddp = DDP(config, DistributedDataParallelConfig(grad_reduce_in_fp32=config.bf16), model)
    opt = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=3e-3, weight_decay=0.01, clip_grad=1.0, bf16=config.bf16,
        params_dtype=config.params_dtype), [ddp])
    if step_wgrad:
        defer_weight_grads([ddp])
    config.no_sync_func, config.finalize_model_grads_func = ddp.no_sync, finalize_model_grads

    def one_step():
        ddp.zero_grad_buffer()
        opt.zero_grad()
        pipeline_forward_backward(ddp, micro)
        opt.step()

    return one_step


def w_side(model):
    """One pass of the step's W-side GEMMs, ``A = W P`` and ``dW = dA Pᵀ``, per ESPACE layer."""
    from megatron_espace.surgery import linear_layers

    layers = [m for m in linear_layers(model).values() if m.projection_rank]

    def run():
        with torch.no_grad():
            for m in layers:
                p = m.espace_proj.to(m.weight.dtype)
                torch.matmul(torch.matmul(m.weight, p), p.t())

    return run


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (= torchrun ranks)")
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--micro-batches", type=int, default=4, help="micro-batches per step")
    p.add_argument("--iters", type=int, default=4)
    args = p.parse_args()

    import torch.distributed as dist
    from torch.utils.flop_counter import FlopCounterMode

    import megatron_espace as espace
    from megatron_espace import runtime
    from tests.common import gpt_model, random_projections, token_batch, transformer_config

    runtime.initialize(tensor_model_parallel_size=args.tp)
    rank0 = dist.get_rank() == 0
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    n_micro, mbs = args.micro_batches, args.micro_batch_size
    tokens, pos, labels = token_batch(batch=n_micro * mbs, seq_length=args.seq_length,
                                      vocab_size=1024)
    micro = [(tokens[i:i + mbs], pos[i:i + mbs], labels[i:i + mbs])
             for i in range(0, n_micro * mbs, mbs)]
    if rank0:
        print(f"device={'cuda' if torch.cuda.is_available() else 'cpu'} dtype={dtype} "
              f"tp={args.tp} threads/rank={torch.get_num_threads()} hidden={args.hidden_size} "
              f"layers={args.num_layers} seq={args.seq_length} "
              f"micro-batch={mbs} micro-batches/step={n_micro}")

    def slowest(seconds):
        t = torch.tensor([statistics.median(seconds)], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    for sp in ([False, True] if args.tp > 1 else [False]):
        steps, counts, flops = {}, {}, {}
        for name in ("dense", "espace", "espace per micro-batch"):
            torch.manual_seed(0)
            cfg = transformer_config(  # one config each: it holds the model's no_sync_func
                tp=args.tp, sp=sp, num_layers=args.num_layers, hidden_size=args.hidden_size,
                num_attention_heads=8, ffn_hidden_size=4 * args.hidden_size, params_dtype=dtype,
                pipeline_dtype=dtype, bf16=dtype == torch.bfloat16)
            model = gpt_model(cfg, vocab_size=1024, seq_length=args.seq_length)
            if name != "dense":
                h, f = args.hidden_size, 4 * args.hidden_size
                shapes = {"linear_qkv": (h, 3 * h), "linear_proj": (h, h),
                          "linear_fc1": (h, f), "linear_fc2": (f, h)}
                rules = espace.ESPACEConfig.from_dict({"layers": [  # 50%, L a multiple of 64
                    {"match": f"*.{kind}", "rank": (k * n // (2 * (k + n))) // 64 * 64,
                     "method": "mse"} for kind, (k, n) in shapes.items()]})
                espace.apply_espace(model, rules, random_projections(model))
                w_side_pass = w_side(model)
            counts[name] = espace.count_parameters(model)
            steps[name] = step_fn(model, micro, step_wgrad=name == "espace")
        times = {name: [] for name in (*steps, "w_side")}
        for i in range(args.iters + 1):
            for name in (list(steps) if i % 2 else list(steps)[::-1]):
                start = time.perf_counter()
                steps[name]()
                if i >= 1:  # warm-up
                    times[name].append(time.perf_counter() - start)
            start = time.perf_counter()
            w_side_pass()
            times["w_side"].append(time.perf_counter() - start)
        for name in ("espace", "espace per micro-batch"):
            with FlopCounterMode(display=False) as counted:
                steps[name]()
            flops[name] = counted.get_total_flops()
        with FlopCounterMode(display=False) as w_flops:
            w_side_pass()
        t = {name: slowest(v) for name, v in times.items()}
        comp = 1 - counts["espace"]["gemm"] / counts["espace"]["gemm_dense"]
        if rank0:
            layout = ("SP" if sp else "no SP") if args.tp > 1 else "TP=1"
            print(f"[{layout}] GEMM compression {comp:.1%} (inference parameters), "
                  f"W kept trainable")
            print(f"[{layout}] training step ({n_micro} micro-batches): dense {t['dense'] * 1e3:.0f} "
                  f"ms, ESPACE {t['espace'] * 1e3:.0f} ms, ratio "
                  f"{t['espace'] / t['dense']:.2f} (target <= 0.80); with A and dW per "
                  f"micro-batch {t['espace per micro-batch'] * 1e3:.0f} ms, ratio "
                  f"{t['espace per micro-batch'] / t['dense']:.2f}")
            per_micro = flops["espace per micro-batch"]
            print(f"[{layout}] W-side work (A = W P, dW = dA P^T) of one micro-batch: "
                  f"{t['w_side'] * 1e3:.0f} ms = {t['w_side'] * n_micro / t['espace per micro-batch']:.1%} "
                  f"of the per-micro-batch step's time and "
                  f"{w_flops.get_total_flops() * n_micro / per_micro:.1%} of its FLOPs; once per "
                  f"step the step does {flops['espace'] / per_micro:.3f} of those FLOPs")
    runtime.destroy()


if __name__ == "__main__":
    main()
