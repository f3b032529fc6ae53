"""The trainer: exact resume (weights, optimizer, schedule, RNG with dropout on, data position),
baseline -> ESPACE retraining, and TP/PP/DP layouts against one process."""

import sysconfig
from pathlib import Path

import pytest
import torch

import megatron_espace as espace
from tests.harness import run_distributed

MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
         "--seq-length", "32", "--make-vocab-size-divisible-by", "256", "--micro-batch-size",
         "2", "--global-batch-size", "8", "--lr", "2e-3", "--lr-warmup-iters", "1",
         "--eval-iters", "2", "--eval-interval", "0", "--log-interval", "100",
         "--split", "90,10,0", "--weight-decay", "0.01"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from megatron_espace.preprocess_data import preprocess
    from megatron_espace.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("train")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    preprocess([str(stdlib / "json"), str(stdlib / "argparse.py")], str(root / "text"),
               build_tokenizer("ByteLevel"), file_glob="*.py")
    return root


def _argv(root, *extra):
    return MODEL + ["--data-path", str(root / "text_text_document"),
                    "--data-cache-path", str(root / "cache"), *extra]


def _train(argv):
    from megatron_espace import train

    return train.run(train.parse_args(argv))


def _model(argv):
    """The trainer's flags parsed, and the (ESPACE) model they describe, at TP=1."""
    from megatron_espace import arguments, runtime, train

    args = train.parse_args(argv)
    runtime.initialize()
    model = arguments.build_model(args, vocab_size=257)
    if args.espace_config:
        espace.apply_espace(model, espace.ESPACEConfig.from_yaml(args.espace_config),
                            espace.Projections.load(args.espace_projections))
    return args, model


def _weights(argv):
    """Every parameter of the model a checkpoint holds, loaded at TP=1."""
    from megatron_espace import arguments

    args, model = _model(argv)
    arguments.load_model(model, args.load)
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("layout", [
    ["--tensor-model-parallel-size", "2", "--sequence-parallel"],  # dropout on: RNG restored
    ["--use-distributed-optimizer"],  # DP=2, optimizer state sharded over the DP ranks
], ids=["tp2", "distributed-optimizer"])
def test_resume_is_exact(data, layout):
    tag = layout[0].strip("-")
    straight = data / f"straight-{tag}"
    run_distributed(_train, nprocs=2, argv=_argv(
        data, *layout, "--train-iters", "6", "--save", str(straight)))
    split = data / f"split-{tag}"
    first = run_distributed(_train, nprocs=2, argv=_argv(
        data, *layout, "--train-iters", "6", "--exit-interval", "3", "--save", str(split)))[0]
    second = run_distributed(_train, nprocs=2, argv=_argv(
        data, *layout, "--train-iters", "6", "--save", str(split), "--load", str(split)))[0]
    assert first["iteration"] == 3 and second["iteration"] == 6
    assert (split / "latest_checkpointed_iteration.txt").read_text() == "6"
    (a,) = run_distributed(_weights, nprocs=1, argv=_argv(data, "--train-iters", "1", "--load",
                                                          str(straight)))
    (b,) = run_distributed(_weights, nprocs=1, argv=_argv(data, "--train-iters", "1", "--load",
                                                          str(split)))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit-identical to training straight through


def _calibrate_random(root, argv):
    """Projections for the baseline model's layers (random PSD statistics suffice here)."""
    from megatron_espace import arguments, runtime, train
    from tests.common import random_projections

    args = train.parse_args(argv)
    runtime.initialize()
    model = arguments.build_model(args, vocab_size=257)
    random_projections(model).save(Path(root) / "projections.safetensors")


def test_baseline_to_espace_retraining(data):
    base = data / "base"
    run_distributed(_train, nprocs=1, argv=_argv(data, "--train-iters", "4", "--save",
                                                  str(base)))
    (data / "espace.yaml").write_text(
        "layers:\n  - match: 'decoder.layers.*'\n    compression: 0.5\n    method: mse\n"
        "rank_multiple: pow2\n")
    run_distributed(_calibrate_random, nprocs=1, root=str(data),
                    argv=_argv(data, "--train-iters", "1"))
    esp = data / "esp"
    flags = ["--espace-config", str(data / "espace.yaml"), "--espace-projections",
             str(data / "projections.safetensors")]
    res = run_distributed(_train, nprocs=2, argv=_argv(
        data, "--tensor-model-parallel-size", "2", "--train-iters", "8", "--load", str(base),
        "--save", str(esp), "--lr", "1e-3", *flags))[0]
    assert res["iteration"] == 8  # started again at 0 from the baseline
    # the new run's schedule, not the baseline's lr range that came with its Adam state
    assert 0 < max(res["lr"]) <= 1e-3  # the baseline ran at 2e-3
    assert res["train_loss"][-1] < res["train_loss"][0]
    (w,) = run_distributed(_weights, nprocs=1, argv=_argv(
        data, "--train-iters", "1", "--load", str(esp), *flags))
    projs = espace.Projections.load(data / "projections.safetensors")
    for key, value in w.items():
        if key.endswith("espace_proj"):  # P is unchanged by training
            layer = key[:-len(".espace_proj")]
            assert torch.equal(value, projs.projection(layer, "mse", value.shape[1]).float()), key


def _initial_checkpoint(argv, path):
    """One set of initial weights for every layout (initialisation itself depends on PP)."""
    from megatron_espace import arguments, checkpointing, runtime, train

    args = train.parse_args(argv)
    runtime.initialize()
    model = arguments.build_model(args, vocab_size=257)
    checkpointing.save({"model": model.sharded_state_dict()}, Path(path) / "iter_0000000")
    (Path(path) / "latest_checkpointed_iteration.txt").write_text("0")


def test_layouts_agree_with_one_process(data):
    common = ["--train-iters", "3", "--hidden-dropout", "0", "--attention-dropout", "0"]
    run_distributed(_initial_checkpoint, nprocs=1, argv=_argv(data, *common),
                    path=str(data / "init"))
    start = ["--load", str(data / "init"), "--finetune", "--no-load-optim"]
    (ref,) = run_distributed(_train, nprocs=1, argv=_argv(data, *common, *start))
    for layout in (["--tensor-model-parallel-size", "2", "--sequence-parallel"],
                   ["--pipeline-model-parallel-size", "2"], []):  # [] at 2 ranks: DP=2
        res = run_distributed(_train, nprocs=2, argv=_argv(data, *common, *start, *layout))
        for r in res:
            torch.testing.assert_close(r["train_loss"], ref["train_loss"], rtol=1e-4, atol=0,
                                       msg=str(layout))
            torch.testing.assert_close(r["valid_loss"], ref["valid_loss"], rtol=1e-4, atol=0,
                                       msg=str(layout))


def _loaded_state(argv):
    """What the trainer's load puts in the model and the optimizer (TP=1, one process)."""
    from megatron_espace import train

    args, model = _model(argv)
    _, optimizer, scheduler = train._wrap(model, args)
    train.load(args, model, optimizer, scheduler)
    out = {}
    inner = optimizer.chained_optimizers[0].optimizer if hasattr(
        optimizer, "chained_optimizers") else optimizer.optimizer
    for name, p in model.named_parameters():
        out[f"w|{name}"] = p.detach()
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"{key}|{name}"] = inner.state[p][key]
    return out


def test_retraining_loads_the_baselines_weights_and_adam_moments(data):
    """The baseline model and the ESPACE model read the same W, exp_avg and exp_avg_sq."""
    base = data / "base-moments"
    run_distributed(_train, nprocs=1, argv=_argv(data, "--train-iters", "3", "--save",
                                                  str(base)))
    (data / "espace2.yaml").write_text(
        "layers:\n  - match: '*.linear_fc1'\n    rank: 16\n    method: mse\n")
    run_distributed(_calibrate_random, nprocs=1, root=str(data),
                    argv=_argv(data, "--train-iters", "1"))
    common = _argv(data, "--train-iters", "3", "--load", str(base))
    (plain,) = run_distributed(_loaded_state, nprocs=1, argv=common)
    (esp,) = run_distributed(_loaded_state, nprocs=1, argv=common + [
        "--espace-config", str(data / "espace2.yaml"),
        "--espace-projections", str(data / "projections.safetensors")])
    assert plain.keys() == esp.keys() and any(k.startswith("exp_avg_sq|") for k in plain)
    for key in plain:
        assert torch.equal(plain[key], esp[key]), key
    assert any(esp[k].abs().sum() > 0 for k in esp if k.startswith("exp_avg|"))
