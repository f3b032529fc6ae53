"""Calibration overhead against the plain passes it rides on, and distributed eigh.

What it measures, on a small GPT (4 layers, hidden 256, seq 256, micro-batch 8, float32):

* ``mse``: ``espace.calibrate`` over B forward passes / the same B plain forward passes;
* ``nl_mse``: ``espace.calibrate`` over B forward+backward passes / the same plain passes;
* eigh: ``stats.projections()`` for every layer and all six methods at world size 1, then
  at world size 2 (data parallel, launched with torchrun): each (layer, method) is
  decomposed on one DP peer of its statistic's owner (balanced by K³) and written into that
  rank's part of the file, so the work splits.

Run it from the repository root, on a quiet machine:

    .venv/bin/python benchmarks/bench_calibration.py

It asserts nothing; it prints the ratios (targets: <= 2.0 for both) and the times.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore")

METHODS = ["mse", "nmse", "go_mse", "go_mse_l2", "nl_mse", "nl_mse_l2"]


def build(args):
    from tests.common import gpt_model, transformer_config

    cfg = transformer_config(num_layers=4, hidden_size=args.hidden_size,
                             num_attention_heads=8, ffn_hidden_size=4 * args.hidden_size)
    torch.manual_seed(0)
    return gpt_model(cfg, vocab_size=512, seq_length=args.seq_length)


def batches(args):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(args.batches):
        data = torch.randint(0, 512, (args.micro_batch_size, args.seq_length + 1), generator=g)
        pos = torch.arange(args.seq_length).unsqueeze(0).expand(args.micro_batch_size, -1)
        out.append((data[:, :-1], pos, data[:, 1:]))
    return out


def loop(data, backward):
    def forward_loop(model):
        for tokens, pos, labels in data:
            if backward:
                model(tokens, pos, None, labels=labels).float().mean().backward()
            else:
                with torch.no_grad():
                    model(tokens, pos, None, labels=labels)
    return forward_loop


def config(methods):
    import megatron_espace as espace

    return espace.ESPACEConfig.from_dict({
        "calibration": {"methods": methods},
        "layers": [{"match": "decoder.layers.*", "rank": 64, "method": methods[0]}]})


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def eigh_time(model, data):
    import megatron_espace as espace

    stats = espace.calibrate(model, loop(data[:1], backward=True), config(METHODS))
    if torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()
    start = time.perf_counter()
    stats.projections()
    return time.perf_counter() - start, len(stats.plan.layers) * len(METHODS)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--eigh-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()

    import megatron_espace as espace
    from megatron_espace import runtime

    runtime.initialize()
    model, data = build(args), batches(args)
    if args.eigh_only:  # the world-size-2 leg, under torchrun
        seconds, count = eigh_time(model, data)
        if torch.distributed.get_rank() == 0:
            print(f"EIGH {seconds:.3f} {count}")
        return

    print(f"device=cpu dtype=float32 threads={torch.get_num_threads()} "
          f"hidden={args.hidden_size} seq={args.seq_length} micro-batch={args.micro_batch_size} "
          f"batches={args.batches} (M={args.batches * args.seq_length * args.micro_batch_size} "
          f"tokens)")
    rows = []
    for method, backward in (("mse", False), ("nl_mse", True)):
        plain = loop(data, backward)
        cfg = config([method])
        plain(model)  # warm up
        espace.calibrate(model, plain, cfg)
        t_plain = timed(lambda: plain(model), args.repeats)
        t_cal = timed(lambda: espace.calibrate(model, plain, cfg), args.repeats)
        what = "forward+backward" if backward else "forward"
        rows.append((method, what, t_plain, t_cal))
    print(f"\n{'statistic':<10} {'against':<17} {'plain s':>8} {'calibrate s':>12} {'ratio':>6}")
    for method, what, t_plain, t_cal in rows:
        print(f"{method:<10} {what:<17} {t_plain:>8.3f} {t_cal:>12.3f} {t_cal / t_plain:>6.2f}")

    threads = torch.get_num_threads()
    one, count = eigh_time(model, data)
    torch.set_num_threads(1)  # what each of the two torchrun processes gets
    one_single, _ = eigh_time(model, data)
    torch.set_num_threads(threads)
    runtime.destroy()
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", __file__,
         "--eigh-only", "--hidden-size", str(args.hidden_size), "--seq-length",
         str(args.seq_length), "--micro-batch-size", str(args.micro_batch_size)],
        capture_output=True, text=True, env=env, check=True).stdout
    two = float(next(line.split()[1] for line in out.splitlines() if line.startswith("EIGH")))
    print(f"\neigh of {count} (layer, method) matrices, float64 (projections(): eigh on the "
          f"owners, each rank writes its part):\n  world size 1: {one:.2f} s with {threads} threads, {one_single:.2f} s "
          f"with 1 thread\n  world size 2: {two:.2f} s, 1 thread per rank "
          f"(x{one_single / two:.2f} against 1 rank x 1 thread)")
    print(f"ratio mse={rows[0][3] / rows[0][2]:.2f} nl_mse={rows[1][3] / rows[1][2]:.2f} "
          "(targets <= 2.0)")


if __name__ == "__main__":
    main()
