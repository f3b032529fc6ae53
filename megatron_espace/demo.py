"""The end-to-end demo (``make demo``): the paper's workflow, small, on CPU, 2 processes.

    python -m megatron_espace.demo --output-dir demo-output

Every step is one of the project's commands, run as a user would run it (``torchrun`` with
2 processes, tensor-parallel size 2 with sequence parallelism):

1. ``preprocess_data``: the running interpreter's standard-library sources (real text no one
   here wrote, available offline) into a Megatron indexed dataset, byte-level tokens;
2. ``train``: pretrain a small GPT baseline, saving weights and Adam state;
3. ``calibrate``: the paper's six statistics and the weight-SVD baseline on the baseline;
4. ``sensitivity``: each GEMM alone, out of the box, with each method; rank; apply
   progressively; pick the layer set reaching 50% GEMM compression; write the config;
5. ``train --espace-config``: retrain from the baseline's weights *and* Adam state;
   and, as the fair reference, the baseline trained as many more iterations;
6. ``convert``: export the compressed inference checkpoint and evaluate it.

It prints one table and writes it, the raw numbers, the sensitivity report and the plots
under the output directory.
"""

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from megatron_espace import atomic

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def stdlib_sources(max_bytes: int):
    """The interpreter's top-level standard-library ``*.py`` files, in name order."""
    files, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        files.append(str(path))
        total += path.stat().st_size
        if total >= max_bytes:
            break
    return files


class Demo:
    def __init__(self, args):
        self.args, self.out = args, Path(args.output_dir)
        self.data = self.out / "data"
        self.model = ["--num-layers", str(args.num_layers), "--hidden-size",
                      str(args.hidden_size), "--num-attention-heads",
                      str(args.num_attention_heads), "--seq-length", str(args.seq_length),
                      "--make-vocab-size-divisible-by", "256", "--hidden-dropout", "0",
                      "--attention-dropout", "0", "--tensor-model-parallel-size", "2",
                      "--sequence-parallel", "--micro-batch-size", str(args.micro_batch_size),
                      "--seed", str(args.seed)]
        self.dataset = ["--data-path", str(self.data / "text_text_document"), "--split",
                        args.split, "--data-cache-path", str(self.data / "cache"),
                        "--tokenizer-type", "ByteLevel"]

    def run(self, tool, *argv, nproc=2):
        """One command, under torchrun when ``nproc`` > 1."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                     f"--master-port={port}", "-m"] if nproc > 1 else [sys.executable, "-m"])
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // nproc)),
                   PYTHONWARNINGS="ignore")
        print(f"\n== {tool.split('.')[-1]} ({'torchrun, ' + str(nproc) + ' processes' if nproc > 1 else '1 process'})", flush=True)
        start = time.monotonic()
        subprocess.run([*launcher, tool, *argv], env=env, check=True)
        print(f"   ({time.monotonic() - start:.0f} s)", flush=True)

    def train(self, name, *extra):
        metrics = self.out / f"{name}.json"
        self.run("megatron_espace.train", *self.model, *self.dataset, "--eval-interval", "0", "--eval-iters", str(self.args.eval_iters),
                 "--log-interval", "50", "--metrics-json", str(metrics), *extra)
        return json.loads(metrics.read_text())

    def main(self):
        a, out = self.args, self.out
        self.run("megatron_espace.preprocess_data", "--input",
                 *stdlib_sources(a.text_bytes), "--output-prefix", str(self.data / "text"),
                 "--tokenizer-type", "ByteLevel", "--append-eod", nproc=1)
        r = {"pretrain": self.train("pretrain", "--train-iters", str(a.train_iters), "--lr",
                                    str(a.lr), "--lr-warmup-iters", str(a.train_iters // 20),
                                    "--save", str(out / "baseline"))}
        r["baseline"] = self.train("baseline", "--train-iters", "1", "--lr", str(a.lr),
                                   "--load", str(out / "baseline"), "--skip-train")
        self.run("megatron_espace.calibrate", *self.model, *self.dataset, "--load",
                 str(out / "baseline"), "--espace-config", str(a.espace_config),
                 "--calib-samples", str(a.calib_samples), "--out",
                 str(out / "projections.safetensors"))
        self.run("megatron_espace.sensitivity", *self.model, *self.dataset, "--load",
                 str(out / "baseline"), "--espace-config", str(a.espace_config),
                 "--espace-projections", str(out / "projections.safetensors"), "--eval-iters",
                 str(a.eval_iters), "--target-compression", str(a.target_compression),
                 "--out-config", str(out / "espace.yaml"))
        espace = ["--espace-config", str(out / "espace.yaml"), "--espace-projections",
                  str(out / "projections.safetensors")]
        retrain = ["--train-iters", str(a.retrain_iters), "--lr", str(a.retrain_lr),
                   "--load", str(out / "baseline")]
        r["out_of_the_box"] = self.train("out_of_the_box", *espace, "--train-iters", "1",
                                         "--lr", "0", "--load", str(out / "baseline"),
                                         "--skip-train")
        r["retrained"] = self.train("retrained", *espace, *retrain, "--save",
                                    str(out / "espace"))
        r["baseline_longer"] = self.train("baseline_longer", *retrain, "--finetune")
        self.run("megatron_espace.convert", *self.model, "--tokenizer-type", "ByteLevel", "--load", str(out / "espace"), "--save",
                 str(out / "compressed"), *espace)
        r["compressed"] = self.train("compressed", *espace, "--espace-compressed",
                                     "--train-iters", "1", "--lr", "0", "--load",
                                     str(out / "compressed"), "--skip-train")
        table = report(r, a.retrain_iters)
        plot(r, out / "losses.png")
        atomic.write_json(out / "results.json", r)
        atomic.write_text(out / "results.md", table + "\n")
        print("\n" + table)
        print(f"\nwritten under {out}/: results.md, results.json, losses.png, espace.yaml "
              "(+ .md sensitivity report, .png progressive curve), projections.safetensors "
              "(+ .png spectra), checkpoints baseline/ espace/ compressed/")


def report(r: dict, retrain_iters: int) -> str:
    rows = [("baseline", r["baseline"]),
            (f"baseline trained {retrain_iters} more iterations", r["baseline_longer"]),
            ("ESPACE out of the box", r["out_of_the_box"]),
            (f"ESPACE after retraining {retrain_iters} iterations", r["retrained"]),
            ("compressed export", r["compressed"])]
    lines = ["| model | parameters | GEMM parameters | GEMM compression | validation "
             "perplexity | test perplexity |", "|---|---|---|---|---|---|"]
    for name, m in rows:
        p = m["parameters"]
        lines.append(f"| {name} | {p['total']:,} | {p['gemm']:,} | "
                     f"{1 - p['gemm'] / p['gemm_dense']:.1%} | "
                     f"{math.exp(m['valid_loss'][-1]):.3f} | {math.exp(m['test_loss']):.3f} |")
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pre = r["pretrain"]["train_loss"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(pre) + 1), pre, lw=1, label="baseline pretraining (train)")
    for key, label in (("retrained", "ESPACE retraining (train)"),
                       ("baseline_longer", "baseline, trained as long (train)")):
        losses = r[key]["train_loss"]
        ax.plot(range(len(pre) + 1, len(pre) + len(losses) + 1), losses, lw=1, label=label)
    ax.scatter([len(pre)], [r["out_of_the_box"]["valid_loss"][-1]], color="C3", zorder=3,
               label="ESPACE out of the box (validation)")
    ax.axhline(r["retrained"]["valid_loss"][-1], color="C1", ls="--", lw=1,
               label="ESPACE retrained (validation)")
    ax.axhline(r["baseline_longer"]["valid_loss"][-1], color="C2", ls=":", lw=1,
               label="baseline trained as long (validation)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (nats per byte)")
    ax.set_title("byte-level GPT on the stdlib sources, CPU, TP=2")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic.savefig(fig, path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output-dir", default="demo-output")
    p.add_argument("--espace-config", default=str(EXAMPLES / "espace-demo.yaml"),
                   help="the sensitivity study's candidate layers and methods")
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--train-iters", type=int, default=400)
    p.add_argument("--retrain-iters", type=int, default=150)
    p.add_argument("--calib-samples", type=int, default=256)
    p.add_argument("--eval-iters", type=int, default=8)
    p.add_argument("--target-compression", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--retrain-lr", type=float, default=5e-4)
    p.add_argument("--text-bytes", type=int, default=3_000_000)
    p.add_argument("--split", default="90,5,5", help="train,valid,test by documents (files)")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out}: output directory exists and is not empty; "
                         "remove it or pass --output-dir")
    out.mkdir(parents=True, exist_ok=True)
    Demo(args).main()


if __name__ == "__main__":
    main()
