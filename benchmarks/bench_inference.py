"""Inference latency of compressed ESPACE layers against the dense layers they replace.

What it measures (forward only, no autograd, TP=1):

* per GEMM of the paper's GPT3-8B layer shapes (hidden 4096, FFN 16384; scaled by
  ``--scale``, default 1/2 to fit a small CPU): the compressed pair ``Bᵀ(PᵀX)``
  (``CompressedColumnParallelLinear`` / ``CompressedRowParallelLinear``) over the dense
  megatron-core layer, at 50% layer compression (``L = KN / 2(K+N)``, rounded down to a
  multiple of 64), for M = 2048 and M = 16 tokens. The FLOP limit is 0.5 (slightly less
  after rounding L);
* a whole small GPT's prefill (4 layers, hidden 512, seq 512, batch 4): the model
  compressed at 50% on every GEMM over the dense model.

Run it from the repository root, on a quiet machine:

    .venv/bin/python benchmarks/bench_inference.py

It asserts nothing (target: <= 0.60 for M = 2048 on CPU; the paper measured 0.55-0.65 on
A100). bf16 on CUDA when a GPU is present, float32 otherwise.
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


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn, iters, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def layer_pair(kind, k, n, rank, dtype):
    """A dense megatron linear and its compressed ESPACE twin (same W, orthonormal P)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from megatron_espace import export_compressed
    from megatron_espace.layers import ESPACEColumnParallelLinear, ESPACERowParallelLinear
    from tests.common import orthonormal, transformer_config

    cfg = transformer_config(dtype=dtype)
    common = dict(config=cfg, init_method=torch.nn.init.normal_, bias=False)
    if kind == "column":
        dense = ColumnParallelLinear(k, n, **common)
        esp = ESPACEColumnParallelLinear(k, n, **common)
    else:
        dense = RowParallelLinear(k, n, input_is_parallel=True, skip_bias_add=False, **common)
        esp = ESPACERowParallelLinear(k, n, input_is_parallel=True, skip_bias_add=False,
                                      **common)
    esp.weight.data.copy_(dense.weight.data)
    esp.set_projection(orthonormal(k, rank, dtype=torch.float32))
    holder = torch.nn.Module()
    holder.linear = esp
    export_compressed(holder)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return dense.to(device), esp.to(device)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=float, default=0.5, help="fraction of GPT3-8B's widths")
    p.add_argument("--iters", type=int, default=7)
    args = p.parse_args()

    from megatron_espace import runtime

    runtime.initialize()
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    h, f = int(4096 * args.scale), int(16384 * args.scale)
    shapes = [("QKV", "column", h, 3 * h), ("Proj", "row", h, h),
              ("FC1", "column", h, f), ("FC2", "row", f, h)]
    print(f"device={device} dtype={str(dtype).split('.')[-1]} threads={torch.get_num_threads()}"
          f" GPT3-8B shapes x{args.scale} (hidden {h}, FFN {f}); 50% layer compression")
    print(f"\n{'layer':<5} {'K':>6} {'N':>6} {'L':>5} {'M':>5} {'dense ms':>9} "
          f"{'ESPACE ms':>10} {'ratio':>6} {'FLOP ratio':>10}")
    ratios = {2048: [], 16: []}
    for name, kind, k, n in shapes:
        rank = (k * n // (2 * (k + n))) // 64 * 64
        dense, comp = layer_pair(kind, k, n, rank, dtype)
        for m in (2048, 16):
            x = torch.randn(m, 1, k, dtype=dtype, device=device)
            with torch.inference_mode():
                t_dense = median_time(lambda: dense(x), args.iters)
                t_comp = median_time(lambda: comp(x), args.iters)
            ratios[m].append(t_comp / t_dense)
            print(f"{name:<5} {k:>6} {n:>6} {rank:>5} {m:>5} {t_dense * 1e3:>9.2f} "
                  f"{t_comp * 1e3:>10.2f} {t_comp / t_dense:>6.2f} "
                  f"{rank * (k + n) / (k * n):>10.3f}")

    prefill = model_prefill(dtype, device, args.iters)
    print(f"\nsmall GPT prefill (4 layers, hidden 512, seq 512, batch 4), all GEMMs at 50%: "
          f"dense {prefill[0] * 1e3:.1f} ms, compressed {prefill[1] * 1e3:.1f} ms, "
          f"ratio {prefill[1] / prefill[0]:.2f}")
    for m in (2048, 16):
        print(f"ratio M={m}: " + " ".join(f"{s[0]}={r:.2f}" for s, r in zip(shapes, ratios[m]))
              + (" (target <= 0.60)" if m == 2048 else ""))


def model_prefill(dtype, device, iters):
    import megatron_espace as espace
    from tests.common import gpt_model, random_projections, token_batch, transformer_config

    cfg = transformer_config(num_layers=4, hidden_size=512, num_attention_heads=8,
                             ffn_hidden_size=2048, dtype=dtype)
    times = []
    for compress in (False, True):
        torch.manual_seed(0)
        model = gpt_model(cfg, vocab_size=512, seq_length=512)
        if compress:
            rules = espace.ESPACEConfig.from_dict({"layers": [
                {"match": "decoder.layers.*", "compression": 0.5, "method": "mse"}]})
            espace.apply_espace(model, rules, random_projections(model))
            espace.export_compressed(model)
        model = model.to(device).eval()
        tokens, pos, _ = token_batch(batch=4, seq_length=512, vocab_size=512)
        tokens, pos = tokens.to(device), pos.to(device)
        with torch.inference_mode():
            times.append(median_time(lambda: model(tokens, pos, None), iters))
    return times


if __name__ == "__main__":
    main()
