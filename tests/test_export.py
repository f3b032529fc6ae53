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


def espace_model(tp=1, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = gpt_model(transformer_config(tp=tp, sp=tp > 1, dtype=dtype))
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


@pytest.mark.parametrize("kind", ["column", "row"])
def test_compressed_layer_stores_p_in_the_model_dtype(megatron_tp1, kind):
    """A bf16 model's compressed layer holds P in bf16 (half its float32 bytes) and computes
    (x P)(W P)ᵀ with it; training P stays float32; casting the compressed layer moves P along."""
    from tests.common import orthonormal

    k, n, l = 64, 96, 16
    cls = espace.ESPACEColumnParallelLinear if kind == "column" else espace.ESPACERowParallelLinear
    layer = cls(k, n, config=transformer_config(dtype=torch.bfloat16), bias=False,
                init_method=lambda w: torch.nn.init.normal_(w, std=0.1), skip_bias_add=False,
                **({} if kind == "column" else {"input_is_parallel": True}))
    p = orthonormal(k, l, seed=3, dtype=torch.float32)
    layer.set_projection(p)
    assert layer.espace_proj.dtype == torch.float32  # training keeps the exact P
    w = layer.weight.detach().double()
    model = torch.nn.Sequential(layer)
    assert espace.export_compressed(model) == {"0": l}
    assert layer.espace_proj.dtype == layer.espace_weight.dtype == torch.bfloat16
    assert layer.state_dict()["espace_proj"].nbytes == k * l * 2
    assert torch.equal(layer.espace_proj, p.to(torch.bfloat16))
    x = torch.randn(8, 2, k, dtype=torch.bfloat16)
    y, _ = layer(x)
    p64 = p.double()
    ref = x.double() @ p64 @ (w @ p64).t()
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), ref, rtol=0.05, atol=0.05)
    assert layer.float().espace_proj.dtype == torch.float32


def test_bf16_compressed_checkpoint_holds_bf16_p_and_reloads(megatron_tp1, tmp_path):
    model = espace_model(dtype=torch.bfloat16)
    espace.export_compressed(model)
    layers = linear_layers(model)
    assert {m.espace_proj.dtype for m in layers.values()} == {torch.bfloat16}
    checkpointing.save({"model": checkpointing.model_sharded_state_dict(model)}, tmp_path / "c")
    other = espace_model(seed=7, dtype=torch.bfloat16)
    espace.export_compressed(other)
    other.load_state_dict(checkpointing.load(
        {"model": checkpointing.model_sharded_state_dict(other)}, tmp_path / "c")["model"])
    for name, module in linear_layers(other).items():
        assert torch.equal(module.espace_proj, layers[name].espace_proj), name
        assert torch.equal(module.espace_weight, layers[name].espace_weight), name
    float32 = espace_model()
    espace.export_compressed(float32)
    assert {m.espace_proj.dtype for m in linear_layers(float32).values()} == {torch.float32}
