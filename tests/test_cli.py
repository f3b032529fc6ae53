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


def test_inspect_reports_energy(tmp_path, capsys):
    projs = espace.Projections()
    projs.add("decoder.layers.0.mlp.linear_fc1", "mse", torch.eye(4),
              torch.tensor([3.0, 1.0, 0.0, 0.0]))
    projs.save(tmp_path / "p.safetensors")
    assert cli.main(["inspect", str(tmp_path / "p.safetensors"), "--ranks", "1", "2"]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if "linear_fc1" in ln][0]
    assert line.split()[-2:] == ["0.750", "1.000"]


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "espace"  # installed by setup.py's console_scripts
    out = subprocess.run([str(script), "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "check-config" in out and "inspect" in out and "demo" in out
