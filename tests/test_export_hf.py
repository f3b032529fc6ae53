"""espace export-hf: the imported tiny models come back bit for bit; an ESPACE model comes
back as W P Pᵀ whose transformers logits equal the megatron ESPACE model's."""

import pytest
import torch
from safetensors.torch import load_file

import megatron_espace as espace
from megatron_espace import arguments, checkpointing
from megatron_espace.export_hf import main
from tests import hf_models
from tests.common import random_projections

TOL = 1e-4
RANK8 = """
calibration: {methods: [mse]}
layers:
  - match: "decoder.layers.0.*"
    rank: 8
    method: mse
  - match: "decoder.layers.1.mlp.*"
    rank: 16
    method: mse
"""


def _weights(directory):
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def test_export_of_an_import_gives_back_the_original_tensors(hf_cases, tmp_path):
    for name, case in hf_cases.items():
        out = tmp_path / name
        assert main(["--load", str(case / "ckpt"), "--save", str(out)]) == 0
        original, exported = _weights(case / "hf"), _weights(out)
        assert sorted(original) == sorted(exported), name
        for key, tensor in original.items():
            assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), \
                (name, key)
        assert (out / "config.json").is_file()
    assert (tmp_path / "llama" / "tokenizer.json").read_bytes() == \
        (hf_cases["llama"] / "hf" / "tokenizer.json").read_bytes()


def _espace_checkpoint(case, tmp_path):
    """An ESPACE model from the imported checkpoint (random orthonormal P), saved in
    Megatron-LM's layout with the model description carried over; returns (model, dir)."""
    cfg_file = tmp_path / "espace.yaml"
    cfg_file.write_text(RANK8)
    model, args = hf_models.load_imported(case / "ckpt")
    projections = random_projections(model, seed=3)
    projections.save(tmp_path / "proj.safetensors")
    espace.apply_espace(model, espace.ESPACEConfig.from_yaml(cfg_file), projections)
    root = tmp_path / "espace_ckpt"
    root.mkdir()
    checkpointing.save({"model": checkpointing.model_sharded_state_dict(model)},
                       root / "iter_0000001")
    (root / "latest_checkpointed_iteration.txt").write_text("1")
    arguments.write_model_args(args, root)
    return model, root, cfg_file


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_export_of_an_espace_model_runs_its_accuracy_in_transformers(hf_cases, tmp_path, name,
                                                                    capsys):
    from transformers import AutoModelForCausalLM

    case = hf_cases[name]
    model, root, cfg_file = _espace_checkpoint(case, tmp_path)
    ref = load_file(str(case / "ref.safetensors"))
    vocab = ref["logits"].shape[-1]
    want = hf_models.megatron_logits(model, ref["tokens"], vocab)
    # without its projections the checkpoint would export the dense W: refused
    with pytest.raises(SystemExit, match="holds ESPACE projections"):
        main(["--load", str(root), "--save", str(tmp_path / "bad")])
    out = tmp_path / "hf_espace"
    assert main(["--load", str(root), "--save", str(out), "--espace-config", str(cfg_file),
                 "--espace-projections", str(tmp_path / "proj.safetensors")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf(ref["tokens"]).logits
    diff = (got - want).abs().max().item()
    dense = (ref["logits"] - want).abs().max().item()
    print(f"{name}: ESPACE export max |transformers - megatron ESPACE| = {diff:.2e} "
          f"(ESPACE vs dense: {dense:.2e})")
    assert diff <= TOL and dense > 100 * TOL  # the projection changed the model
