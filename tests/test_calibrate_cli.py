"""The calibration command under torchrun semantics: real data files, a real checkpoint,
the projections file, summary and plot; TP=2 equals TP=1; an interrupted run resumes."""

import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

import megatron_espace as espace
from tests.harness import run_distributed

MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
         "--seq-length", "32", "--make-vocab-size-divisible-by", "256", "--micro-batch-size",
         "2", "--hidden-dropout", "0", "--attention-dropout", "0"]
CONFIG = """calibration:
  methods: [mse, go_mse, nl_mse]
layers:
  - match: "decoder.layers.*"
    compression: 0.5
    method: mse
rank_multiple: pow2
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Stdlib text preprocessed into an indexed dataset, and a baseline checkpoint."""
    from megatron_espace.preprocess_data import preprocess
    from megatron_espace.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("calib")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    preprocess([str(stdlib / "json"), str(stdlib / "argparse.py")], str(root / "text"),
               build_tokenizer("ByteLevel"), append_eod=True, file_glob="*.py")
    (root / "espace.yaml").write_text(CONFIG)
    run_distributed(_save_baseline, nprocs=1, path=str(root / "baseline"))
    return root


def _save_baseline(path):
    from megatron_espace import arguments, checkpointing, runtime
    from megatron_espace.calibrate import parse_args

    args = parse_args(MODEL + ["--data-path", "x", "--load", "x", "--espace-config", "x",
                               "--out", "x"])
    runtime.initialize()
    torch.manual_seed(3)
    model = arguments.build_model(args, vocab_size=257)
    checkpointing.save({"model": model.sharded_state_dict()}, path)


def _calibrate(argv):
    import importlib

    command = importlib.import_module("megatron_espace.calibrate")
    rc = command.main(argv)
    assert espace.calibrate is command and callable(espace.calibrate)  # still the API
    return {"rc": rc}


def _argv(root, out, tp=1, samples=16, extra=()):
    return MODEL + ["--data-path", str(root / "text_text_document"), "--split", "98,1,1",
                    "--load", str(root / "baseline"), "--espace-config",
                    str(root / "espace.yaml"), "--calib-samples", str(samples),
                    "--tensor-model-parallel-size", str(tp), "--save-interval", "8",
                    "--data-cache-path", str(root / "cache"), "--out", str(out), *extra]


def _projectors(path, rank=8):
    projs = espace.Projections.load(path)
    return {(layer, m): projs.projection(layer, m, rank) @ projs.projection(layer, m, rank).t()
            for layer in projs.layers() for m in projs.methods(layer)}


def _dry_run(root, tp=1, world=1):
    """``calibrate --dry-run --json`` for the test model, in this process (no Megatron init)."""
    import contextlib
    import importlib
    import io
    import json

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        importlib.import_module("megatron_espace.calibrate").main(
            MODEL + ["--dry-run", "--json", "--tensor-model-parallel-size", str(tp),
                     "--world-size", str(world), "--vocab-size", "257",
                     "--espace-config", str(root / "espace.yaml")])
    return json.loads(out.getvalue())


def _assert_plan_held(path, plan):
    """The run's measured bytes (recorded in the file) are the dry run's, exactly."""
    projs = espace.Projections.load(path)
    held = dict(projs.info["memory"])
    assert held.pop("passes") == plan["passes"]
    for key, value in held.items():
        assert value == plan[key], key
    file_bytes = 0
    for layer in projs.layers():
        for m in projs.methods(layer):
            k, r = projs.shape(layer, m)
            file_bytes += 4 * k * r + 8 * k
    assert file_bytes == plan["projections_file_bytes"]


def test_calibrate_command_layouts_plan_and_resume(workdir):
    one = workdir / "tp1.safetensors"
    run_distributed(_calibrate, nprocs=1, argv=_argv(workdir, one))
    assert one.with_suffix(".png").stat().st_size > 10_000
    projs = espace.Projections.load(one)
    assert len(projs.layers()) == 8 and projs.methods(projs.layers()[0]) == [
        "go_mse", "mse", "nl_mse"]
    assert projs.info["layers"]["decoder.layers.0.mlp.linear_fc2"]["tokens"] == 16 * 32
    assert projs.info["checkpoint"]["iteration"] and projs.info["checkpoint"]["metadata"]
    _assert_plan_held(one, _dry_run(workdir))

    two = workdir / "tp2.safetensors"
    run_distributed(_calibrate, nprocs=2, argv=_argv(workdir, two, tp=2))
    dp2 = workdir / "dp2.safetensors"
    run_distributed(_calibrate, nprocs=2, argv=_argv(workdir, dp2))
    _assert_plan_held(two, _dry_run(workdir, tp=2, world=2))
    _assert_plan_held(dp2, _dry_run(workdir, world=2))
    assert (_dry_run(workdir, tp=2, world=2)["host_bytes_per_rank"]
            < 0.6 * _dry_run(workdir)["host_bytes_per_rank"])
    ref = _projectors(one)
    for other in (two, dp2):
        for key, value in _projectors(other).items():
            torch.testing.assert_close(value, ref[key], atol=1e-3, rtol=0, msg=str(key))

    # the first of two save-interval chunks is saved, then the job stops (here: it was asked
    # for 8 samples); the same command with 16 resumes from the shard after that chunk
    part = workdir / "resumed.safetensors"
    run_distributed(_calibrate, nprocs=1, argv=_argv(workdir, part, samples=8))
    run_distributed(_calibrate, nprocs=1, argv=_argv(workdir, part, samples=16))
    for key, value in _projectors(part).items():
        torch.testing.assert_close(value, ref[key], atol=1e-6, rtol=0, msg=str(key))

    # statistics of another run are refused, naming every difference
    with pytest.raises(Exception, match=r"seq_length: saved 32, now 16.*calib_samples: saved "
                                        r"16, now 8 \(fewer samples.*--overwrite"):
        run_distributed(_calibrate, nprocs=1, argv=_argv(
            workdir, part, samples=8, extra=["--seq-length", "16",
                                             "--max-position-embeddings", "32"]))

    shutil.copytree(workdir / "baseline", workdir / "other")
    (workdir / "mse.yaml").write_text(CONFIG.replace("mse, go_mse, nl_mse", "mse"))
    other = _argv(workdir, part, extra=["--load", str(workdir / "other"), "--espace-config",
                                        str(workdir / "mse.yaml")])
    with pytest.raises(Exception, match=r"checkpoint\.path: saved .*baseline', now .*other'.*; methods: saved "
                                        r"\['mse', 'go_mse', 'nl_mse'\], now \['mse'\]"):
        run_distributed(_calibrate, nprocs=1, argv=other)


def test_bad_config_fails_before_any_work(workdir, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("layers:\n  - match: '*'\n    rank: 8\n    method: pca\n")
    argv = _argv(workdir, tmp_path / "p.safetensors")
    argv[argv.index("--espace-config") + 1] = str(bad)
    with pytest.raises(Exception, match=r"bad.yaml: layers\[0\].method: unknown method 'pca'"):
        run_distributed(_calibrate, nprocs=1, argv=argv)


def _sensitivity(argv):
    from megatron_espace import sensitivity

    return {"rc": sensitivity.main(argv)}


def _sens_argv(root, projections, out, tp=1, extra=()):
    return MODEL + ["--data-path", str(root / "text_text_document"), "--split", "90,10,0",
                    "--load", str(root / "baseline"), "--espace-config",
                    str(root / "espace.yaml"), "--espace-projections", str(projections),
                    "--eval-iters", "2", "--tensor-model-parallel-size", str(tp),
                    "--data-cache-path", str(root / "cache"), "--out-config", str(out), *extra]


def test_sensitivity_command_at_tp2(workdir):
    import yaml

    projections = workdir / "sens.safetensors"
    run_distributed(_calibrate, nprocs=1, argv=_argv(workdir, projections, samples=8))
    out = workdir / "chosen.yaml"
    run_distributed(_sensitivity, nprocs=2, argv=_sens_argv(
        workdir, projections, out, tp=2, extra=["--target-compression", "0.3"]))
    chosen = espace.ESPACEConfig.from_yaml(out)  # the trainer's input, as written
    assert 1 <= len(chosen.layers) <= 8
    assert {r.method for r in chosen.layers} <= {"mse", "go_mse", "nl_mse"}
    assert "Chosen by --target-compression 0.3" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 10_000
    cache = yaml.safe_load(Path(f"{out}.json").read_text())  # JSON is YAML
    assert len(cache["single"]) == 8 and len(cache["progressive"]) == 9

    with pytest.raises(Exception, match=r"target compression 99.0% is unreachable"):
        run_distributed(_sensitivity, nprocs=1, argv=_sens_argv(
            workdir, projections, out, extra=["--target-compression", "0.99"]))
    wrong = espace.Projections()  # the right layer names, another model's widths
    for layer in espace.Projections.load(projections).layers():
        wrong.add(layer, "mse", torch.eye(32, dtype=torch.float64), torch.ones(32))
    wrong.save(workdir / "wrong.safetensors")
    with pytest.raises(Exception, match=r"wrong.safetensors: layer .* has K=32, but the model's"):
        run_distributed(_sensitivity, nprocs=1, argv=_sens_argv(
            workdir, workdir / "wrong.safetensors", out, extra=["--inflection"]))
    empty = _sens_argv(workdir, projections, workdir / "x.yaml",
                       extra=["--inflection"])
    empty[empty.index("--split") + 1] = "100,0,0"
    with pytest.raises(Exception, match=r"the validation split holds 0 samples"):
        run_distributed(_sensitivity, nprocs=1, argv=empty)
