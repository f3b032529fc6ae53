"""Training-iteration time of an ESPACE model at ~50% GEMM compression over the baseline's.

What it measures: one full training step (forward, backward, gradient finalisation, Adam
step) of a GPT with hidden 512, FFN 2048, 4 layers, seq 512, micro-batch 4, float32 on CPU
(bf16 on CUDA), at tensor-parallel size ``--tp`` (under torchrun; with TP > 1 both without and
with sequence parallelism); the ESPACE model has every GEMM at 50% layer compression
(L = KN / 2(K+N) rounded down to a multiple of 64) and keeps W trainable, as in retraining.
Same shapes, same data, interleaved iterations, the slowest rank's medians.

It also measures the W-side work of the ESPACE step, ``A = W P`` and ``dW = dA Pᵀ`` of every
layer (the GEMMs that do not depend on the tokens), as a share of the step's time and FLOPs.

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


def step_fn(model, batch):
    from tests.common import train_steps

    # train_steps builds DDP + Adam once; reuse its pieces for repeated single steps
    _, ddp, opt = train_steps(model, steps=1, batch=batch)

    def one_step():
        from megatron.core.distributed import finalize_model_grads

        ddp.zero_grad_buffer()
        opt.zero_grad()
        tokens, pos, labels = batch
        ddp(tokens, pos, None, labels=labels).float().mean().backward()
        finalize_model_grads([ddp])
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
    p.add_argument("--iters", type=int, default=6)
    args = p.parse_args()

    import torch.distributed as dist
    from torch.utils.flop_counter import FlopCounterMode

    import megatron_espace as espace
    from megatron_espace import runtime
    from tests.common import gpt_model, random_projections, token_batch, transformer_config

    runtime.initialize(tensor_model_parallel_size=args.tp)
    rank0 = dist.get_rank() == 0
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    batch = token_batch(batch=args.micro_batch_size, seq_length=args.seq_length,
                        vocab_size=1024)
    if rank0:
        print(f"device={'cuda' if torch.cuda.is_available() else 'cpu'} dtype={dtype} "
              f"tp={args.tp} threads/rank={torch.get_num_threads()} hidden={args.hidden_size} "
              f"layers={args.num_layers} seq={args.seq_length} "
              f"micro-batch={args.micro_batch_size}")

    def slowest(seconds):
        t = torch.tensor([statistics.median(seconds)], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    for sp in ([False, True] if args.tp > 1 else [False]):
        cfg = transformer_config(tp=args.tp, sp=sp, num_layers=args.num_layers,
                                 hidden_size=args.hidden_size, num_attention_heads=8,
                                 ffn_hidden_size=4 * args.hidden_size, params_dtype=dtype,
                                 pipeline_dtype=dtype, bf16=dtype == torch.bfloat16)
        steps, counts = {}, {}
        for name in ("dense", "espace"):
            torch.manual_seed(0)
            model = gpt_model(cfg, vocab_size=1024, seq_length=args.seq_length)
            if name == "espace":
                h, f = args.hidden_size, 4 * args.hidden_size
                shapes = {"linear_qkv": (h, 3 * h), "linear_proj": (h, h),
                          "linear_fc1": (h, f), "linear_fc2": (f, h)}
                rules = espace.ESPACEConfig.from_dict({"layers": [  # 50%, L a multiple of 64
                    {"match": f"*.{kind}", "rank": (k * n // (2 * (k + n))) // 64 * 64,
                     "method": "mse"} for kind, (k, n) in shapes.items()]})
                espace.apply_espace(model, rules, random_projections(model))
                w_side_pass = w_side(model)
            counts[name] = espace.count_parameters(model)
            steps[name] = step_fn(model, batch)
        times = {"dense": [], "espace": [], "w_side": []}
        for i in range(args.iters + 2):
            for name in (("dense", "espace") if i % 2 else ("espace", "dense")):
                start = time.perf_counter()
                steps[name]()
                if i >= 2:  # warm-up
                    times[name].append(time.perf_counter() - start)
            start = time.perf_counter()
            w_side_pass()
            times["w_side"].append(time.perf_counter() - start)
        with FlopCounterMode(display=False) as step_flops:
            steps["espace"]()
        with FlopCounterMode(display=False) as w_flops:
            w_side_pass()
        dense, esp, w_time = (slowest(times[k]) for k in ("dense", "espace", "w_side"))
        comp = 1 - counts["espace"]["gemm"] / counts["espace"]["gemm_dense"]
        if rank0:
            layout = ("SP" if sp else "no SP") if args.tp > 1 else "TP=1"
            print(f"[{layout}] GEMM compression {comp:.1%} (inference parameters), "
                  f"W kept trainable")
            print(f"[{layout}] training step: dense {dense * 1e3:.0f} ms, ESPACE {esp * 1e3:.0f} "
                  f"ms, ratio {esp / dense:.2f} (target <= 0.80)")
            print(f"[{layout}] W-side work (A = W P, dW = dA P^T) per micro-batch: "
                  f"{w_time * 1e3:.0f} ms = {w_time / esp:.1%} of the ESPACE step's time, "
                  f"{w_flops.get_total_flops() / step_flops.get_total_flops():.1%} of its FLOPs")
    runtime.destroy()


if __name__ == "__main__":
    main()
