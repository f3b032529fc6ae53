"""Time one ESPACE linear against the dense megatron-core linear it replaces.

What it measures: wall-clock time of forward + backward (dX and dW) of

* ``ColumnParallelLinear``  vs ``ESPACEColumnParallelLinear``
* ``RowParallelLinear``     vs ``ESPACERowParallelLinear``

at tensor-parallel size 1, with identical weights, on activations of shape
[seq, batch, K]. The ESPACE layer computes ``(x P)(W P)^T`` with a K x L
orthonormal projection P; the table reports ESPACE time / dense time next to
the analytic FLOP ratio of the same work.

Defaults: K = N = 1024, L = 256 (50% layer compression, 1 - L(K+N)/(KN) = 0.5),
M = seq * batch = 512 * 8 = 4096 tokens; float32 on CPU, bfloat16 on CUDA.
Dense and ESPACE iterations are interleaved so machine noise hits both; each
number is the median of the timed iterations after a warmup.

Run it from the repository root:

    .venv/bin/python benchmarks/bench_layers.py
    .venv/bin/python benchmarks/bench_layers.py --rank 128 --iters 20

This is a measurement, not a test: it asserts nothing about the timings.
Run it on a quiet machine: on CPU another busy process (a test run, say)
preempts one of torch's threads, and the ESPACE layer, with seven smaller GEMMs
to the dense layer's three, loses proportionally more at every thread barrier,
so its ratio climbs (about 0.48 -> 0.67 on a 2-core box; both times then roughly
double or triple). ``OMP_NUM_THREADS=1`` pins torch to one thread.
"""

import argparse
import os
import statistics
import sys
import time

import torch

# the repository root, for tests.common (tiny TransformerConfig builder, random orthonormal P)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear  # noqa: E402

from megatron_espace import ESPACEColumnParallelLinear, ESPACERowParallelLinear  # noqa: E402
from megatron_espace import runtime  # noqa: E402
from tests.common import orthonormal, transformer_config  # noqa: E402

# -----------------------------------------------------------------------------
# settings

has_cuda = torch.cuda.is_available()
parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--hidden-in", type=int, default=1024, help="K, input features")
parser.add_argument("--hidden-out", type=int, default=1024, help="N, output features")
parser.add_argument("--rank", type=int, default=256, help="L, projection rank")
parser.add_argument("--seq-length", type=int, default=512)
parser.add_argument("--micro-batch-size", type=int, default=8)
parser.add_argument("--iters", type=int, default=10, help="timed iterations per layer")
parser.add_argument("--warmup", type=int, default=3, help="untimed iterations per layer")
parser.add_argument("--dtype", choices=["float32", "bfloat16"],
                    default="bfloat16" if has_cuda else "float32")
args = parser.parse_args()

K, N, L = args.hidden_in, args.hidden_out, args.rank
S, B = args.seq_length, args.micro_batch_size
M = S * B
dtype = getattr(torch, args.dtype)

runtime.initialize(tensor_model_parallel_size=1)
device = runtime.device()


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


# -----------------------------------------------------------------------------
# analytic FLOPs (multiply-adds count 2)

dense_flops = 6 * K * N * M                                   # Y = XW^T, dX, dW
espace_fwd = 2 * K * L * M + 2 * K * N * L + 2 * L * N * M    # Z = XP, A = WP, Y = ZA^T
espace_bwd = 2 * L * N * M + 2 * K * N * L + 2 * L * N * M + 2 * K * L * M  # dA, dW, dZ, dX
flop_ratio = (espace_fwd + espace_bwd) / dense_flops
flop_ratio_fwd = espace_fwd / (2 * K * N * M)
compression = 1 - L * (K + N) / (K * N)

# -----------------------------------------------------------------------------
# the layers: dense and ESPACE with identical weights, P installed on the ESPACE one

config = transformer_config(dtype=dtype)  # use_cpu_initialization, no fusions, TP = 1
init = lambda w: torch.nn.init.normal_(w, std=0.02)  # noqa: E731
proj = orthonormal(K, L, seed=0)


def column(cls):
    return cls(K, N, config=config, init_method=init, bias=False, skip_bias_add=False,
               gather_output=False)


def row(cls):
    return cls(K, N, config=config, init_method=init, bias=False, skip_bias_add=False,
               input_is_parallel=True)


def build_pair(make, dense_cls, espace_cls):
    dense = make(dense_cls).to(device)
    espace = make(espace_cls).to(device)
    with torch.no_grad():
        espace.weight.copy_(dense.weight)
    espace.set_projection(proj)
    return dense, espace


pairs = {
    "column": build_pair(column, ColumnParallelLinear, ESPACEColumnParallelLinear),
    "row": build_pair(row, RowParallelLinear, ESPACERowParallelLinear),
}

# fixed inputs and output gradient, shared by every layer
gen = torch.Generator().manual_seed(0)
x = torch.randn(S, B, K, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
g = torch.randn(S, B, N, generator=gen).to(device=device, dtype=dtype)

# -----------------------------------------------------------------------------
# timing


def step(layer):
    """One forward + backward; returns its wall-clock seconds."""
    x.grad = None
    layer.zero_grad(set_to_none=True)
    sync()
    t0 = time.perf_counter()
    out, _ = layer(x)
    out.backward(g)
    sync()
    return time.perf_counter() - t0


def bench(dense, espace):
    """Median seconds of dense and ESPACE, measured alternately."""
    for _ in range(args.warmup):
        step(dense)
        step(espace)
    times = {"dense": [], "espace": []}
    for i in range(args.iters):
        order = [("dense", dense), ("espace", espace)]
        if i % 2:  # alternate who goes first, so neither always follows the other
            order.reverse()
        for name, layer in order:
            times[name].append(step(layer))
    return statistics.median(times["dense"]), statistics.median(times["espace"])


print(f"device={device.type} dtype={args.dtype} threads={torch.get_num_threads()} "
      f"cores={os.cpu_count()} torch={torch.__version__}")
print(f"K={K} N={N} L={L} M={M} (seq={S} x batch={B})  compression={compression:.2f}  "
      f"warmup={args.warmup} iters={args.iters}")
print(f"FLOP ratio espace/dense: fwd+bwd={flop_ratio:.3f}  fwd only={flop_ratio_fwd:.3f}")
print()
print(f"{'layer':<8}{'dense ms':>10}{'espace ms':>11}{'ratio':>8}{'FLOP ratio':>12}")

ratios = {}
for kind, (dense, espace) in pairs.items():
    t_dense, t_espace = bench(dense, espace)
    ratios[kind] = t_espace / t_dense
    print(f"{kind:<8}{t_dense * 1e3:>10.2f}{t_espace * 1e3:>11.2f}{ratios[kind]:>8.2f}"
          f"{flop_ratio:>12.3f}")

print()
print(f"ratio column={ratios['column']:.2f} row={ratios['row']:.2f} (target <= 0.65)")

runtime.destroy()
