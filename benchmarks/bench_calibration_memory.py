"""Calibration memory at the paper's scale: ``calibrate --dry-run --json`` against the first
design's formulas (issue #8), all six statistics, every layer at compression 0.5.

    python benchmarks/bench_calibration_memory.py [--markdown]

"before": every TP and DP rank held all of its stage's K×K sums (x, xn, nl, nln and the
weight moments w, wn): 48·K² bytes per GEMM in float64 (32·K² for K > 8192, whose four
activation sums were float32); ``projections()`` broadcast every (layer, method) with all K
columns in float64 to every rank; the file held all K columns in float32.
"after": the plan of this version (one owner per statistic, float32 per-batch buffers on the
GPU, float64 upper triangles on the host, passes under ``--calib-memory-gib``, R columns).
Printed, not asserted; targets: <= 4 GiB of statistics per GPU for GPT3-22B TP=8 PP=4 and
GPT3-8B TP=8 PP=1, <= 8 GiB elsewhere, a projections file <= 200 GiB for GPT3-22B.
"""

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GIB = 1 << 30
CONFIG = """calibration:
  methods: [mse, nmse, go_mse, go_mse_l2, nl_mse, nl_mse_l2]
layers:
  - match: "decoder.layers.*"
    compression: 0.5
    method: auto
"""
MODELS = {  # layers, hidden, heads, ffn, swiglu
    "GPT3-8B": (32, 4096, 32, 16384, False),
    "GPT3-22B": (48, 6144, 48, 24576, False),
    "Llama2-7B": (32, 4096, 32, 11008, True),
}
ROWS = [  # model, TP, PP, world size, budget GiB (the target)
    ("GPT3-8B", 8, 1, 8, 4), ("GPT3-22B", 8, 4, 32, 4), ("GPT3-22B", 8, 1, 8, 8),
    ("Llama2-7B", 8, 1, 8, 8), ("Llama2-7B", 2, 1, 8, 8),
]
METHODS = 6


def before(layers, hidden, ffn, swiglu, pp):
    """The first design's bytes: statistics per GPU, host after projections(), file."""
    ks = [hidden, hidden, hidden, ffn]  # qkv, proj, fc1, fc2 inputs
    per_gemm = sum((48 if k <= 8192 else 32) * k * k for k in ks)
    squares = sum(k * k for k in ks)
    return {"device": per_gemm * layers // pp, "host": 8 * METHODS * squares * layers,
            "file": 4 * METHODS * squares * layers}


def after(model, tp, pp, world, budget, config):
    import importlib

    calibrate = importlib.import_module("megatron_espace.calibrate")

    layers, hidden, heads, ffn, swiglu = MODELS[model]
    argv = ["--dry-run", "--json", "--num-layers", str(layers), "--hidden-size", str(hidden),
            "--num-attention-heads", str(heads), "--ffn-hidden-size", str(ffn),
            "--seq-length", "2048", "--tensor-model-parallel-size", str(tp),
            "--pipeline-model-parallel-size", str(pp), "--world-size", str(world),
            "--vocab-size", "50257", "--espace-config", config,
            "--calib-memory-gib", str(budget)] + (["--swiglu"] if swiglu else [])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        calibrate.main(argv)
    return json.loads(out.getvalue())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--markdown", action="store_true", help="print a README table")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = str(Path(tmp) / "espace.yaml")
        Path(config).write_text(CONFIG)
        rows = []
        for model, tp, pp, world, budget in ROWS:
            layers, hidden, heads, ffn, swiglu = MODELS[model]
            rows.append((model, tp, pp, world, budget, before(layers, hidden, ffn, swiglu, pp),
                         after(model, tp, pp, world, budget, config)))
    g = lambda b: f"{b / GIB:,.1f}"  # noqa: E731
    head = ("| model, layout | statistics per GPU, before → after (GiB) | passes | host per rank "
            "after (GiB) | projections left on each rank's host, before → after (GiB) | "
            "projections file, before → after (GiB) | resume shard per rank (GiB) |")
    print(head)
    print("|---|---|---|---|---|---|---|")
    for model, tp, pp, world, budget, b, a in rows:
        print(f"| {model} TP={tp} PP={pp} DP={world // (tp * pp)} (budget {budget} GiB) "
              f"| {g(b['device'])} → {g(a['device_bytes_per_gpu'])} | {a['passes']} "
              f"| {g(a['host_bytes_per_rank'])} | {g(b['host'])} → 0 "
              f"| {g(b['file'])} → {g(a['projections_file_bytes'])} "
              f"| {g(a['resume_bytes_per_rank'])} |")
    if not args.markdown:
        ok = all(a["device_bytes_per_gpu"] <= budget * GIB for *_, budget, _, a in rows)
        big = max(a["projections_file_bytes"] for m, *_, a in rows if m == "GPT3-22B")
        print(f"\nstatistics within the per-row target: {ok}; GPT3-22B projections file "
              f"{big / GIB:.1f} GiB (target <= 200)")


if __name__ == "__main__":
    main()
