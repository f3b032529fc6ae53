"""The ``espace`` console script."""

import subprocess
import sys
from pathlib import Path

import torch

import megatron_espace as espace
from megatron_espace import cli


def test_check_config_ok_and_bad(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("layers:\n  - match: '*.linear_fc1'\n    rank: 8\n    method: mse\n")
    assert cli.main(["check-config", str(good)]) == 0
    assert "layers[0]" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("layers:\n  - match: '*.linear_fc1'\n    rnk: 8\n")
    assert cli.main(["check-config", str(bad)]) == 2
    assert "bad.yaml: layers[0].rnk: unknown key" in capsys.readouterr().err


MODEL = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
         "--seq-length", "16"]


def _table(out):
    return [ln.split() for ln in out.splitlines() if ln.startswith("  decoder.layers.")]


def test_check_config_resolves_patterns_against_the_model(megatron_tp1, tmp_path, capsys):
    import argparse

    from megatron_espace import arguments, checkpointing

    cfg = tmp_path / "espace.yaml"
    cfg.write_text("layers:\n  - match: '*.linear_fc1'\n    compression: 0.25\n    method: mse\n"
                   "  - match: '*.linear_qkv'\n    rank: 8\n    method: mse\n"
                   "rank_multiple: 4\n")
    assert cli.main(["check-config", str(cfg)]) == 0
    assert "layer names NOT checked" in capsys.readouterr().out
    assert cli.main(["check-config", str(cfg), *MODEL]) == 0
    rows = _table(capsys.readouterr().out)
    # fc1: K=32, N=128 at 25%: L <= 0.75*32*128/160 = 19.2 -> 16 (rank_multiple 4), 37.5%
    assert ["decoder.layers.1.mlp.linear_fc1", "32", "128", "16", "37.5%", "mse"] in rows
    assert ["decoder.layers.0.self_attention.linear_qkv", "32", "96", "8", "66.7%", "mse"] in rows
    assert len(rows) == 4

    # the same from a checkpoint's metadata alone
    parser = argparse.ArgumentParser()
    arguments.add_model_args(parser)
    arguments.add_parallel_args(parser)
    args = parser.parse_args(MODEL)
    model = arguments.build_model(args, vocab_size=256)
    checkpointing.save({"model": checkpointing.model_sharded_state_dict(model)},
                       tmp_path / "ckpt")
    assert cli.main(["check-config", str(cfg), "--load", str(tmp_path / "ckpt")]) == 0
    assert _table(capsys.readouterr().out) == rows

    cfg.write_text("layers:\n  - match: '*.linear_fc1'\n    rank: 8\n    method: mse\n"
                   "  - match: 'decoder.layers.*.mlp.fc2'\n    rank: 8\n    method: mse\n")
    for where in (MODEL, ["--load", str(tmp_path / "ckpt")]):
        assert cli.main(["check-config", str(cfg), *where]) == 2
        err = capsys.readouterr().err
        assert ("espace.yaml: layers[1].match: pattern 'decoder.layers.*.mlp.fc2' matches no "
                "linear layer") in err and "decoder.layers.0.self_attention.linear_qkv" in err


def test_inspect_reports_energy(tmp_path, capsys):
    projs = espace.Projections()
    projs.add("decoder.layers.0.mlp.linear_fc1", "mse", torch.eye(4),
              torch.tensor([3.0, 1.0, 0.0, 0.0]))
    projs.save(tmp_path / "p.safetensors")
    assert cli.main(["inspect", str(tmp_path / "p.safetensors"), "--ranks", "1", "2"]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if "linear_fc1" in ln][0]
    assert line.split()[-2:] == ["0.750", "1.000"]


def test_inspect_warns_on_non_finite_eigenvalues(tmp_path, capsys):
    projs = espace.Projections()
    projs.add("decoder.layers.0.mlp.linear_fc1", "mse", torch.eye(4),
              torch.tensor([float("nan"), 1.0, 0.0, 0.0]))
    projs.add("decoder.layers.0.mlp.linear_fc2", "mse", torch.eye(4), torch.ones(4))
    projs.save(tmp_path / "p.safetensors")
    assert cli.main(["inspect", str(tmp_path / "p.safetensors"), "--ranks", "1", "2"]) == 0
    captured = capsys.readouterr()
    line = [ln for ln in captured.out.splitlines() if "linear_fc1" in ln][0]
    assert "0.000" not in line and line.split()[-2:] == ["non-finite", "non-finite"]
    assert ("non-finite (NaN/Inf) eigenvalues" in captured.err
            and "decoder.layers.0.mlp.linear_fc1 mse: 1 of 4" in captured.err
            and "linear_fc2" not in captured.err)


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "espace"  # installed by setup.py's console_scripts
    out = subprocess.run([str(script), "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "check-config" in out and "inspect" in out and "demo" in out
