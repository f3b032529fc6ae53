"""espace convert: an ESPACE checkpoint becomes a compressed one that computes the same logits
at another TP size, and the input checkpoint is left byte-for-byte untouched."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from tests.harness import RankFailed, run_distributed

MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
         "--seq-length", "32", "--make-vocab-size-divisible-by", "256"]
CONFIG = ("layers:\n  - match: 'decoder.layers.*'\n    compression: 0.5\n    method: mse\n"
          "rank_multiple: pow2\n")  # hidden 64: L <= 16..24 at 50%, below the default 64


def _args(root, tp=1, save="compressed"):
    return MODEL + ["--load", str(root / "espace_ckpt"), "--save", str(root / save),
                    "--espace-config", str(root / "espace.yaml"), "--espace-projections",
                    str(root / "projections.safetensors"),
                    "--tensor-model-parallel-size", str(tp)]


def _make_espace_checkpoint(root):
    import megatron_espace as espace
    from megatron_espace import arguments, checkpointing, runtime
    from megatron_espace.convert import parse_args
    from tests.common import random_projections

    root = Path(root)
    args = parse_args(_args(root))
    runtime.initialize()
    torch.manual_seed(1)
    model = arguments.build_model(args, vocab_size=257)
    projs = random_projections(model)
    projs.save(root / "projections.safetensors")
    espace.apply_espace(model, espace.ESPACEConfig.from_yaml(root / "espace.yaml"), projs)
    checkpointing.save({"model": model.sharded_state_dict()}, root / "espace_ckpt")


def _logits(argv, compressed):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_espace import runtime
    from megatron_espace.convert import build, parse_args
    from megatron_espace.surgery import linear_layers
    from tests.common import token_batch

    args = parse_args(argv)
    runtime.initialize(args.tensor_model_parallel_size)
    if compressed:
        model = build(args, compressed_checkpoint=args.save)
        assert all(m.weight is None for m in linear_layers(model).values())
    else:  # the ESPACE model itself, from the input checkpoint
        import megatron_espace as espace
        from megatron_espace import arguments

        model = arguments.build_model(args, vocab_size=257)
        espace.apply_espace(model, espace.ESPACEConfig.from_yaml(args.espace_config),
                            espace.Projections.load(args.espace_projections))
        arguments.load_model(model, args.load)
    tokens, pos, _ = token_batch(seed=9, vocab_size=257)
    with torch.no_grad():
        return {"logits": gather_from_tensor_model_parallel_region(model(tokens, pos, None))}


def _convert(argv):
    from megatron_espace import convert

    return {"rc": convert.main(argv)}


def _digest(path):
    h = hashlib.sha256()
    for f in sorted(Path(path).rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(path)).encode() + f.read_bytes())
    return h.hexdigest()


def test_convert_at_tp2_reload_at_tp1(tmp_path):
    (tmp_path / "espace.yaml").write_text(CONFIG)
    run_distributed(_make_espace_checkpoint, nprocs=1, root=str(tmp_path))
    before = _digest(tmp_path / "espace_ckpt")

    run_distributed(_convert, nprocs=2, argv=_args(tmp_path, tp=2))
    assert _digest(tmp_path / "espace_ckpt") == before  # the input is only read
    manifest = json.loads((tmp_path / "compressed" / "espace.json").read_text())
    assert len(manifest["layers"]) == 8
    assert manifest["parameters"]["gemm"] < 0.5 * manifest["parameters"]["gemm_dense"]

    (ref,) = run_distributed(_logits, nprocs=1, argv=_args(tmp_path), compressed=False)
    (got,) = run_distributed(_logits, nprocs=1, argv=_args(tmp_path), compressed=True)
    torch.testing.assert_close(got["logits"], ref["logits"], rtol=1e-4, atol=1e-4)

    with pytest.raises(RankFailed, match="already exists; not overwriting"):
        run_distributed(_convert, nprocs=1, argv=_args(tmp_path))
