"""The foundation demo: baseline -> ESPACE -> retrain -> reload, on real text, on CPU.

    python -m megatron_espace.demo --output-dir demo-output      (what `make demo` runs)

Five stages, each a fresh process group (the TP=2 ones under torchrun, 2 processes):

1. pretrain  (TP=2, sequence parallel) a small byte-level GPT on the running
   interpreter's standard-library sources; save a torch_dist checkpoint with the
   optimizer state.
2. continue  (TP=2) the fair reference: the baseline trained as many more iterations as
   the ESPACE model will be retrained, same data and learning rate.
3. calibrate (TP=2) ``espace.calibrate`` on the baseline: the statistics the config
   asks for (``mse``: each GEMM input's second moment ``E[x xᵀ]``), eigendecomposed in
   float64 into the projections file.
4. retrain   (TP=2) build the model, ``apply_espace`` with ``examples/espace-demo.yaml``
   (all four GEMM kinds at 50% compression), load the *baseline* checkpoint, weights
   and Adam state, measure out-of-the-box validation loss, retrain, save.
5. verify    (TP=1) reload the TP=2 ESPACE checkpoint at TP=1 and re-measure.

It prints one table and writes it, the raw numbers and a loss plot under the output
directory. Numbers depend on the machine only through float rounding.
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

import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
VOCAB = 256  # bytes


# --------------------------------------------------------------------------- data


def stdlib_text(max_bytes: int) -> torch.Tensor:
    """The standard library's top-level ``*.py`` sources, in name order, as byte tokens."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long()


def batches(tokens: torch.Tensor, count: int, batch: int, seq: int, seed: int):
    """``count`` batches of random windows: (tokens, positions, labels), each [batch, seq]."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(seq).unsqueeze(0).expand(batch, -1)
    for _ in range(count):
        start = torch.randint(0, len(tokens) - seq - 1, (batch,), generator=g)
        windows = torch.stack([tokens[s:s + seq + 1] for s in start.tolist()])
        yield windows[:, :-1], pos, windows[:, 1:]


def splits(args):
    tokens = stdlib_text(args.text_bytes)
    cut = int(len(tokens) * 0.9)
    return tokens[:cut], tokens[cut:]


# --------------------------------------------------------------------------- model


def build(args, tp: int, espace_cfg=None, projections=None):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    import megatron_espace as espace

    config = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads, ffn_hidden_size=4 * args.hidden_size,
        tensor_model_parallel_size=tp, sequence_parallel=tp > 1, use_cpu_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0, gradient_accumulation_fusion=False,
        bias_dropout_fusion=False, bias_activation_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, apply_rope_fusion=False, pipeline_dtype=torch.float32)
    torch.manual_seed(args.seed)
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(),
                     vocab_size=VOCAB, max_sequence_length=args.seq_length)
    if espace_cfg is not None:
        espace.apply_espace(model, espace_cfg, projections)
    return model


def trainer(model, lr: float):
    from megatron.core.distributed import DistributedDataParallel as DDP
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp = DDP(model.config, DistributedDataParallelConfig(), model)
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=lr, weight_decay=0.01, clip_grad=1.0), [ddp])
    return ddp, opt


def train(ddp, opt, data, steps: int, desc: str):
    from megatron.core.distributed import finalize_model_grads
    from tqdm import tqdm

    losses = []
    bar = tqdm(data, total=steps, desc=desc, disable=torch.distributed.get_rank() != 0,
               mininterval=2, file=sys.stdout)
    for tokens, pos, labels in bar:
        ddp.zero_grad_buffer()
        opt.zero_grad()
        loss = ddp(tokens, pos, None, labels=labels).float().mean()
        loss.backward()
        finalize_model_grads([ddp])
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return losses


@torch.no_grad()
def evaluate(model, args, tokens) -> float:
    model.eval()
    total = [model(t, p, None, labels=lab).float().mean().item()
             for t, p, lab in batches(tokens, args.eval_iters, args.micro_batch_size,
                                      args.seq_length, seed=12345)]
    model.train()
    return sum(total) / len(total)


def model_sd(model):
    from megatron_espace.surgery import unwrap

    return unwrap(model).sharded_state_dict()


# --------------------------------------------------------------------------- stages


def stage_pretrain(args, out: Path):
    from megatron_espace import checkpointing, count_parameters

    train_tokens, val_tokens = splits(args)
    model = build(args, tp=2)
    ddp, opt = trainer(model, args.lr)
    losses = train(ddp, opt, batches(train_tokens, args.train_iters, args.micro_batch_size,
                                     args.seq_length, seed=1), args.train_iters, "pretrain")
    sd = model_sd(model)
    checkpointing.save({"model": sd, "optimizer": opt.sharded_state_dict(sd)}, out / "baseline")
    return {"losses": losses, "val_loss": evaluate(model, args, val_tokens),
            "params": count_parameters(model)}


def stage_calibrate(args, out: Path):
    import megatron_espace as espace
    from megatron_espace import checkpointing

    train_tokens, _ = splits(args)
    cfg = espace.ESPACEConfig.from_yaml(args.espace_config)
    model = build(args, tp=2)
    model.load_state_dict(checkpointing.load({"model": model.sharded_state_dict()},
                                             out / "baseline")["model"])
    model.eval()

    def forward_loop(m):
        with torch.no_grad():
            for t, p, _ in batches(train_tokens, args.calib_iters, args.micro_batch_size,
                                   args.seq_length, seed=2):
                m(t, p, None)

    stats = espace.calibrate(model, forward_loop, cfg, data="python stdlib sources (train)")
    projections = stats.projections()  # collective; bit-identical on every rank
    if torch.distributed.get_rank() == 0:
        projections.save(out / "projections.safetensors")
    return {"layers": len(stats.layers),
            "tokens": max(s.tokens for s in stats.layers.values())}


def stage_retrain(args, out: Path, with_espace: bool = True):
    import megatron_espace as espace
    from megatron_espace import checkpointing, count_parameters

    train_tokens, val_tokens = splits(args)
    if with_espace:
        model = build(args, tp=2, espace_cfg=espace.ESPACEConfig.from_yaml(args.espace_config),
                      projections=espace.Projections.load(out / "projections.safetensors"))
    else:
        model = build(args, tp=2)
    ddp, opt = trainer(model, args.retrain_lr)
    sd = model_sd(model)
    state = checkpointing.load({"model": sd, "optimizer": opt.sharded_state_dict(
        sd, is_loading=True)}, out / "baseline")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])  # Adam moments carried over from the baseline
    start = evaluate(model, args, val_tokens)
    losses = train(ddp, opt, batches(train_tokens, args.retrain_iters, args.micro_batch_size,
                                     args.seq_length, seed=3), args.retrain_iters,
                   "retrain" if with_espace else "continue baseline")
    if with_espace:
        checkpointing.save({"model": model_sd(model)}, out / "espace")
    return {"losses": losses, "val_loss_start": start,
            "val_loss": evaluate(model, args, val_tokens), "params": count_parameters(model)}


def stage_continue(args, out: Path):
    """The fair reference: the baseline trained as many more steps, same data and lr."""
    return stage_retrain(args, out, with_espace=False)


def stage_verify(args, out: Path):
    import megatron_espace as espace
    from megatron_espace import checkpointing

    _, val_tokens = splits(args)
    model = build(args, tp=1, espace_cfg=espace.ESPACEConfig.from_yaml(args.espace_config),
                  projections=espace.Projections.load(out / "projections.safetensors"))
    model.load_state_dict(checkpointing.load({"model": model.sharded_state_dict()},
                                             out / "espace")["model"])
    return {"val_loss": evaluate(model, args, val_tokens)}


STAGES = {"pretrain": (2, stage_pretrain), "continue": (2, stage_continue),
          "calibrate": (2, stage_calibrate), "retrain": (2, stage_retrain),
          "verify": (1, stage_verify)}


def run_stage(args):
    from megatron_espace import runtime

    tp = STAGES[args.stage][0]
    runtime.initialize(tensor_model_parallel_size=tp, seed=args.seed)
    result = STAGES[args.stage][1](args, Path(args.output_dir))
    if torch.distributed.get_rank() == 0:
        (Path(args.output_dir) / f"{args.stage}.json").write_text(json.dumps(result, indent=1))
    runtime.destroy()


# --------------------------------------------------------------------------- driver


def launch(args, stage: str, argv):
    nproc = STAGES[stage][0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={port}", "-m", "megatron_espace.demo", *argv, "--stage", stage]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // nproc)),
               PYTHONWARNINGS="ignore")
    start = time.monotonic()
    print(f"\n== {stage} ({'TP=2, 2 processes' if nproc == 2 else 'TP=1'})", flush=True)
    subprocess.run(cmd, env=env, check=True)
    print(f"   {stage} took {time.monotonic() - start:.0f} s", flush=True)
    return json.loads((Path(args.output_dir) / f"{stage}.json").read_text())


def report(out: Path, r: dict) -> str:
    base, esp, cont = r["pretrain"], r["retrain"], r["continue"]
    n = len(esp["losses"])
    rows = [
        ("baseline (TP=2)", base["params"], base["val_loss"]),
        (f"baseline trained {n} more iterations (TP=2)", cont["params"], cont["val_loss"]),
        ("ESPACE out of the box (TP=2)", esp["params"], esp["val_loss_start"]),
        (f"ESPACE after retraining {n} iterations (TP=2)", esp["params"], esp["val_loss"]),
        ("ESPACE checkpoint reloaded at TP=1", esp["params"], r["verify"]["val_loss"]),
    ]
    lines = ["| model | parameters | GEMM parameters | GEMM compression | validation loss "
             "| validation perplexity |", "|---|---|---|---|---|---|"]
    for name, params, loss in rows:
        comp = 1 - params["gemm"] / params["gemm_dense"]
        lines.append(f"| {name} | {params['total']:,} | {params['gemm']:,} | {comp:.1%} "
                     f"| {loss:.4f} | {math.exp(loss):.3f} |")
    return "\n".join(lines)


def plot(out: Path, r: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pre, re_ = r["pretrain"]["losses"], r["retrain"]["losses"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(len(pre)), pre, label="baseline pretraining (train loss)", lw=1)
    ax.plot(range(len(pre), len(pre) + len(re_)), re_, label="ESPACE retraining (train loss)",
            lw=1)
    ax.axhline(r["pretrain"]["val_loss"], color="C0", ls="--", lw=1, label="baseline val")
    ax.axhline(r["continue"]["val_loss"], color="C2", ls=":", lw=1,
               label="baseline trained as long (val)")
    ax.scatter([len(pre)], [r["retrain"]["val_loss_start"]], color="C3", zorder=3,
               label="ESPACE out of the box (val)")
    ax.axhline(r["retrain"]["val_loss"], color="C1", ls="--", lw=1, label="ESPACE retrained val")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (nats/byte)")
    ax.set_title("byte-level GPT on stdlib sources, CPU, TP=2")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "losses.png", dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output-dir", default="demo-output")
    p.add_argument("--espace-config", default=str(EXAMPLES / "espace-demo.yaml"))
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--train-iters", type=int, default=400)
    p.add_argument("--retrain-iters", type=int, default=150)
    p.add_argument("--calib-iters", type=int, default=32)
    p.add_argument("--eval-iters", type=int, default=24)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--retrain-lr", type=float, default=5e-4)
    p.add_argument("--text-bytes", type=int, default=4_000_000)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--stage", choices=list(STAGES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.stage:
        return run_stage(args)

    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out}: output directory exists and is not empty; "
                         "remove it or pass --output-dir")
    out.mkdir(parents=True, exist_ok=True)
    forwarded = [*(argv if argv is not None else sys.argv[1:]), "--output-dir", str(out)]
    results = {stage: launch(args, stage, forwarded) for stage in STAGES}
    table = report(out, results)
    plot(out, results)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(table + "\n")
    print("\n" + table)
    print(f"\nwritten: {out}/results.md, results.json, losses.png, checkpoints baseline/ espace/, "
          "projections.safetensors")


if __name__ == "__main__":
    main()
