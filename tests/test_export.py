"""Compressed export: the inference form computes what the ESPACE model computes (TP=1, TP=2,
sequence parallel), holds L(K+N) parameters per layer, and round-trips through torch_dist."""

import pytest
import torch

import megatron_espace as espace
from megatron_espace import checkpointing
from megatron_espace.surgery import linear_layers
from tests.common import gpt_model, random_projections, token_batch, transformer_config
from tests.harness import run_distributed

CFG = {"layers": [
    {"match": "decoder.layers.0.mlp.linear_fc1", "rank": 16, "method": "mse"},
    {"match": "decoder.layers.1.mlp.linear_fc1", "rank": 32, "method": "mse"},
    {"match": "*.linear_qkv", "rank": 16, "method": "mse"},
    {"match": "*.linear_proj", "rank": 32, "method": "mse"},
    {"match": "*.linear_fc2", "rank": 64, "method": "mse"},
]}


def espace_model(tp=1, seed=0):
    torch.manual_seed(seed)
    model = gpt_model(transformer_config(tp=tp, sp=tp > 1))
    espace.apply_espace(model, espace.ESPACEConfig.from_dict(CFG), random_projections(model))
    return model


@torch.no_grad()
def logits(model):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    tokens, pos, _ = token_batch(seed=5)
    return gather_from_tensor_model_parallel_region(model(tokens, pos, None))


def _compare(tp):
    from megatron_espace import runtime

    runtime.initialize(tensor_model_parallel_size=tp)
    return _compare_in_process(tp)


def _compare_in_process(tp):
    model = espace_model(tp)
    before, count_before = logits(model), espace.count_parameters(model)
    exported = espace.export_compressed(model)
    layers = linear_layers(model)
    return {"espace": before, "compressed": logits(model), "exported": len(exported),
            "no_dense_weight": all(m.weight is None for m in layers.values()),
            "same_count": espace.count_parameters(model) == count_before,
            "real_params": sum(p.numel() for m in layers.values() for p in m.parameters())
            + sum(m.espace_proj.numel() for m in layers.values())}


def test_compressed_logits_equal_espace_logits(megatron_tp1):
    one = _compare_in_process(1)
    assert one["exported"] == 8 and one["no_dense_weight"] and one["same_count"]
    torch.testing.assert_close(one["compressed"], one["espace"], rtol=1e-5, atol=1e-5)
    # the parameters actually held are the paper's count: L(K+N) + bias per layer
    counts = espace.count_parameters(espace_model())
    assert one["real_params"] == counts["gemm"]
    for res in run_distributed(_compare, nprocs=2, tp=2):
        assert res["no_dense_weight"] and res["same_count"]
        torch.testing.assert_close(res["compressed"], res["espace"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(res["compressed"], one["compressed"], rtol=1e-4, atol=1e-4)


def _save_compressed_tp2(path):
    from megatron_espace import runtime

    runtime.initialize(tensor_model_parallel_size=2)
    model = espace_model(tp=2)
    espace.export_compressed(model)
    checkpointing.save({"model": model.sharded_state_dict()}, path)
    return {"logits": logits(model)}


def test_compressed_checkpoint_reloads_at_another_tp(megatron_tp1, tmp_path):
    path = tmp_path / "compressed"
    saved = run_distributed(_save_compressed_tp2, nprocs=2, path=str(path))[0]["logits"]
    model = espace_model(tp=1, seed=7)  # other weights; the checkpoint brings the right ones
    espace.export_compressed(model)
    assert not torch.allclose(logits(model), saved, atol=1e-3)
    model.load_state_dict(checkpointing.load({"model": model.sharded_state_dict()},
                                             path)["model"])
    torch.testing.assert_close(logits(model), saved, rtol=1e-4, atol=1e-4)


def test_compressed_layers_can_be_fine_tuned(megatron_tp1):
    """dA of the compressed layer = dW P of the ESPACE layer (since PᵀP = I)."""
    tokens, pos, labels = token_batch()
    grads = []
    for compress in (False, True):
        model = espace_model()
        if compress:
            espace.export_compressed(model)
        model(tokens, pos, None, labels=labels).mean().backward()
        grads.append(linear_layers(model))
    for name in ("decoder.layers.0.mlp.linear_fc1", "decoder.layers.1.mlp.linear_fc2"):
        esp, comp = grads[0][name], grads[1][name]
        torch.testing.assert_close(comp.espace_weight.grad, esp.weight.grad @ esp.espace_proj,
                                   rtol=1e-4, atol=1e-6)
    layer = grads[1]["decoder.layers.0.mlp.linear_fc1"]
    with pytest.raises(RuntimeError, match="takes no weight argument"):
        layer(torch.randn(4, 2, 64), weight=torch.zeros(128, 64))
