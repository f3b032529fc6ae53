"""Every file we write gets the mode the umask gives (safetensors alone would give 0600)."""

import os
import stat

import pytest
import torch

from megatron_espace import atomic
from tests.common import gpt_model, transformer_config


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def _modes(root):
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = stat.S_IMODE(os.stat(path).st_mode)
    return out


def test_written_files_follow_the_umask(megatron_tp1, umask_027, tmp_path):
    from megatron_espace import checkpointing, train
    from megatron_espace.projection import Projections
    from megatron_espace.sensitivity import write_config

    assert atomic.umask() == 0o027 and atomic.file_mode() == 0o640
    projs = Projections()
    projs.add("decoder.layers.0.mlp.linear_fc1", "mse", torch.eye(4), torch.ones(4))
    projs.save(tmp_path / "projections.safetensors")
    atomic.write_json(tmp_path / "report.json", {"a": 1})
    write_config(tmp_path / "espace.yaml", [{"layer": "x", "rank": 2, "method": "mse"}], 1,
                 ["mse"])
    model = gpt_model(transformer_config(num_layers=1, hidden_size=32, ffn_hidden_size=64))
    ckpt = tmp_path / "ckpt" / "iter_0000001"
    checkpointing.save({"model": checkpointing.model_sharded_state_dict(model)}, ckpt)
    train._save_rng(ckpt)

    modes = _modes(tmp_path)
    assert {"projections.safetensors", "report.json", "espace.yaml",
            "ckpt/iter_0000001/metadata.json",
            "ckpt/iter_0000001/rng/rank0.safetensors"} <= set(modes)
    files = {p: m for p, m in modes.items() if os.path.isfile(tmp_path / p)}
    dirs = {p: m for p, m in modes.items() if os.path.isdir(tmp_path / p)}
    assert files and all(m == 0o640 for m in files.values()), files
    assert all(m == 0o750 for m in dirs.values()), dirs
    assert not [p for p in modes if ".tmp" in p]  # no temporary left behind


def test_a_failed_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "a.json"
    atomic.write_json(target, [1])
    with pytest.raises(RuntimeError):
        with atomic.replacing(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "[\n 1\n]" and os.listdir(tmp_path) == ["a.json"]
