"""Training-iteration time of an ESPACE model at ~50% GEMM compression over the baseline's.

What it measures: one full training step (forward, backward, gradient finalisation, Adam
step) of a GPT with hidden 512, FFN 2048, 4 layers, seq 512, micro-batch 4, float32 on CPU
(bf16 on CUDA), TP=1; the ESPACE model has every GEMM at 50% layer compression (L = KN / 2(K+N)
rounded down to a multiple of 64) and keeps W trainable, as in retraining. Same shapes, same
data, interleaved iterations, medians.

    .venv/bin/python benchmarks/bench_train_step.py

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


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--iters", type=int, default=6)
    args = p.parse_args()

    import megatron_espace as espace
    from megatron_espace import runtime
    from tests.common import gpt_model, random_projections, token_batch, transformer_config

    runtime.initialize()
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    cfg = transformer_config(num_layers=args.num_layers, hidden_size=args.hidden_size,
                             num_attention_heads=8, ffn_hidden_size=4 * args.hidden_size)
    batch = token_batch(batch=args.micro_batch_size, seq_length=args.seq_length,
                        vocab_size=1024)
    steps, counts = {}, {}
    for name in ("dense", "espace"):
        torch.manual_seed(0)
        model = gpt_model(cfg, vocab_size=1024, seq_length=args.seq_length)
        if name == "espace":
            h, f = args.hidden_size, 4 * args.hidden_size
            shapes = {"linear_qkv": (h, 3 * h), "linear_proj": (h, h), "linear_fc1": (h, f),
                      "linear_fc2": (f, h)}
            rules = espace.ESPACEConfig.from_dict({"layers": [  # 50%, L a multiple of 64
                {"match": f"*.{kind}", "rank": (k * n // (2 * (k + n))) // 64 * 64,
                 "method": "mse"} for kind, (k, n) in shapes.items()]})
            espace.apply_espace(model, rules, random_projections(model))
        counts[name] = espace.count_parameters(model)
        steps[name] = step_fn(model, batch)
    times = {"dense": [], "espace": []}
    for i in range(args.iters + 2):
        for name in (("dense", "espace") if i % 2 else ("espace", "dense")):
            start = time.perf_counter()
            steps[name]()
            if i >= 2:  # warm-up
                times[name].append(time.perf_counter() - start)
    dense, esp = statistics.median(times["dense"]), statistics.median(times["espace"])
    comp = 1 - counts["espace"]["gemm"] / counts["espace"]["gemm_dense"]
    print(f"device={'cuda' if torch.cuda.is_available() else 'cpu'} dtype={dtype} "
          f"threads={torch.get_num_threads()} hidden={args.hidden_size} "
          f"layers={args.num_layers} seq={args.seq_length} micro-batch={args.micro_batch_size}")
    print(f"GEMM compression {comp:.1%} (inference parameters), W kept trainable")
    print(f"training step: dense {dense * 1e3:.0f} ms, ESPACE {esp * 1e3:.0f} ms, "
          f"ratio {esp / dense:.2f} (target <= 0.80)")


if __name__ == "__main__":
    main()
