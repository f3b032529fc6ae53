"""Time one ESPACE linear against the dense megatron-core linear it replaces, per TP rank.

What it measures: wall-clock time of forward + backward (dX and dW) of

* ``ColumnParallelLinear``  vs ``ESPACEColumnParallelLinear``
* ``RowParallelLinear``     vs ``ESPACERowParallelLinear``

with identical weights, on activations of shape [seq, batch, K], at tensor-parallel size
``--tp`` (under torchrun, gloo on CPU) and, when TP > 1, both without and with sequence
parallelism (without it the ESPACE layers run sequence-parallel inside, see layers.py).
Per layout and layer it prints the ESPACE / dense ratios of

* time: the slowest rank's median (a TP group waits for its slowest rank);
* FLOPs per rank, counted with ``torch.utils.flop_counter.FlopCounterMode`` (exact);
* bytes each rank sends through collectives (ring algorithms: all-reduce 2(t-1)/t of the
  tensor, all-gather / reduce-scatter (t-1)/t of the full one).

Defaults: K = N = 1024, L = 256 (50% layer compression, 1 - L(K+N)/(KN) = 0.5),
M = seq * batch = 512 * 8 = 4096 tokens; float32 on CPU, bfloat16 on CUDA. Dense and
ESPACE iterations are interleaved so machine noise hits both; medians after a warmup.

    .venv/bin/python benchmarks/bench_layers.py                        # TP = 1
    .venv/bin/torchrun --nproc_per_node 2 benchmarks/bench_layers.py --tp 2

This is a measurement, not a test: it asserts nothing about the timings. Run it on a
quiet machine: on CPU another busy process preempts torch's threads, and the ESPACE
layer, with seven smaller GEMMs to the dense layer's three, loses proportionally more at
every thread barrier, so its ratio climbs. torchrun sets ``OMP_NUM_THREADS=1`` per rank.
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

# the repository root, for tests.common (tiny TransformerConfig builder, random orthonormal P)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear  # noqa: E402

from megatron_espace import ESPACEColumnParallelLinear, ESPACERowParallelLinear  # noqa: E402
from megatron_espace import runtime  # noqa: E402
from tests.common import collective_bytes, orthonormal, transformer_config  # noqa: E402

# -----------------------------------------------------------------------------
# settings

has_cuda = torch.cuda.is_available()
parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (= torchrun ranks)")
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
TP = args.tp
dtype = getattr(torch, args.dtype)

runtime.initialize(tensor_model_parallel_size=TP)
device = runtime.device()
rank = dist.get_rank()


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


# -----------------------------------------------------------------------------
# the layers: dense and ESPACE with identical weights, P installed on the ESPACE one

init = lambda w: torch.nn.init.normal_(w, std=0.02)  # noqa: E731
proj = orthonormal(K, L, seed=0)


def build_pair(kind, sp):
    config = transformer_config(tp=TP, sp=sp, dtype=dtype)  # use_cpu_initialization, no fusions
    if kind == "column":
        make = lambda cls: cls(K, N, config=config, init_method=init, bias=False,  # noqa: E731
                               skip_bias_add=False, gather_output=False)
        classes = ColumnParallelLinear, ESPACEColumnParallelLinear
    else:
        make = lambda cls: cls(K, N, config=config, init_method=init, bias=False,  # noqa: E731
                               skip_bias_add=False, input_is_parallel=True)
        classes = RowParallelLinear, ESPACERowParallelLinear
    dense, espace = (make(cls).to(device) for cls in classes)
    with torch.no_grad():
        espace.weight.copy_(dense.weight)
    espace.set_projection(proj)
    return dense, espace


def activations(kind, sp):
    """This rank's input and output gradient (sequence split under SP, K/N split by TP)."""
    gen = torch.Generator().manual_seed(rank)
    seq_in = S // TP if sp and kind == "column" else S
    seq_out = S // TP if sp and kind == "row" else S
    k_in = K // TP if kind == "row" else K
    n_out = N // TP if kind == "column" else N
    x = torch.randn(seq_in, B, k_in, generator=gen).to(device=device, dtype=dtype)
    g = torch.randn(seq_out, B, n_out, generator=gen).to(device=device, dtype=dtype)
    if not sp:  # replicated tensors must agree across the TP group, as in a model
        dist.broadcast(x if kind == "column" else g, src=0)
    return x.requires_grad_(True), g


# -----------------------------------------------------------------------------
# timing


def step(layer, x, g):
    """One forward + backward; returns its wall-clock seconds."""
    x.grad = None
    layer.zero_grad(set_to_none=True)
    sync()
    t0 = time.perf_counter()
    out, _ = layer(x)
    out.backward(g)
    sync()
    return time.perf_counter() - t0


def counted(layer, x, g):
    """FLOPs and bytes sent of one forward + backward on this rank."""
    with FlopCounterMode(display=False) as flops, collective_bytes() as sent:
        step(layer, x, g)
    return flops.get_total_flops(), sent["bytes"]


def bench(dense, espace, x, g):
    """Slowest rank's median seconds of dense and ESPACE, measured alternately."""
    for _ in range(args.warmup):
        step(dense, x, g)
        step(espace, x, g)
    times = {"dense": [], "espace": []}
    for i in range(args.iters):
        order = [("dense", dense), ("espace", espace)]
        if i % 2:  # alternate who goes first, so neither always follows the other
            order.reverse()
        for name, layer in order:
            times[name].append(step(layer, x, g))
    medians = torch.tensor([statistics.median(times["dense"]),
                            statistics.median(times["espace"])], dtype=torch.float64)
    dist.all_reduce(medians, op=dist.ReduceOp.MAX)
    return medians.tolist()


def report(line=""):
    if rank == 0:
        print(line, flush=True)


compression = 1 - L * (K + N) / (K * N)
report(f"device={device.type} dtype={args.dtype} tp={TP} threads/rank={torch.get_num_threads()} "
       f"cores={os.cpu_count()} torch={torch.__version__}")
report(f"K={K} N={N} L={L} M={S * B} (seq={S} x batch={B})  compression={compression:.2f}  "
       f"warmup={args.warmup} iters={args.iters}")
report()
report(f"{'layout':<8}{'layer':<8}{'dense ms':>10}{'espace ms':>11}{'time':>7}"
       f"{'FLOPs':>8}{'bytes':>8}   (ESPACE / dense, per rank)")
ratios = []
for sp in ([False, True] if TP > 1 else [False]):
    layout = "SP" if sp else ("no SP" if TP > 1 else "TP=1")
    for kind in ("column", "row"):
        dense, espace = build_pair(kind, sp)
        x, g = activations(kind, sp)
        (f_dense, b_dense), (f_espace, b_espace) = counted(dense, x, g), counted(espace, x, g)
        t_dense, t_espace = bench(dense, espace, x, g)
        ratios.append(t_espace / t_dense)
        bytes_ratio = f"{b_espace / b_dense:>8.2f}" if b_dense else f"{'-':>8}"
        report(f"{layout:<8}{kind:<8}{t_dense * 1e3:>10.1f}{t_espace * 1e3:>11.1f}"
               f"{t_espace / t_dense:>7.2f}{f_espace / f_dense:>8.3f}{bytes_ratio}")
report()
report(f"largest time ratio {max(ratios):.2f} (target <= 0.65)")
runtime.destroy()
