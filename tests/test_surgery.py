"""apply_espace on a built GPTModel, the ESPACE layer spec, the Projections file."""

import os

import pytest
import torch

import megatron_espace as espace
from megatron_espace.surgery import linear_layers
from tests.common import gpt_model, random_projections, train_steps, transformer_config
from tests.harness import run_distributed

ALL_FOUR = {"layers": [
    {"match": "*.linear_qkv", "rank": 16, "method": "mse"},
    {"match": "*.linear_proj", "rank": 32, "method": "mse"},
    {"match": "*.linear_fc1", "compression": 0.5, "method": "mse"},
    {"match": "*.linear_fc2", "rank": 64, "method": "mse"},
], "rank_multiple": 8}


def test_apply_espace_converts_the_four_kinds_in_place(megatron_tp1):
    torch.manual_seed(0)
    model = gpt_model(transformer_config())
    params_before = {n: p for n, p in model.named_parameters()}
    projs = random_projections(model)
    plans = espace.apply_espace(model, espace.ESPACEConfig.from_dict(ALL_FOUR), projs)

    assert sorted(plans) == sorted(
        f"decoder.layers.{i}.{m}" for i in range(2)
        for m in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1",
                  "mlp.linear_fc2"))
    # K=64, N=128 at compression 0.5: L <= 0.5*64*128/192 = 21.3 -> 16 (rank_multiple 8)
    fc1 = plans["decoder.layers.0.mlp.linear_fc1"]
    assert (fc1.rank, fc1.target, fc1.compression) == (16, 0.5, 1 - 16 * 192 / (64 * 128))
    layers = linear_layers(model)
    for name, plan in plans.items():
        layer = layers[name]
        assert type(layer).__name__ == ("ESPACE" + ("Row" if plan.kind == "row" else "Column")
                                        + "ParallelLinear")
        assert layer.projection_rank == plan.rank
        vecs, _ = projs.eigen(name, "mse")
        assert torch.equal(layer.espace_proj, vecs[:, :plan.rank].float())
    assert type(model.output_layer).__name__ == "ColumnParallelLinear"
    # same Parameter objects under the same names; P is a buffer, not a parameter
    assert {n: p for n, p in model.named_parameters()} == params_before
    assert all("espace_proj" not in n for n, _ in model.named_parameters())
    assert "decoder.layers.0.mlp.linear_fc1.espace_proj" in model.state_dict()


def _losses(model, steps=4):
    return train_steps(model, steps=steps)[0]


def test_espace_spec_without_projection_equals_local_spec(megatron_tp1):
    cfg = transformer_config()
    torch.manual_seed(0)
    dense = gpt_model(cfg)
    torch.manual_seed(0)
    spec_model = gpt_model(cfg, spec=espace.get_gpt_layer_espace_spec())
    kinds = {type(m).__name__ for m in linear_layers(spec_model).values()}
    assert kinds == {"ESPACEColumnParallelLinear", "ESPACERowParallelLinear"}
    assert _losses(dense) == _losses(spec_model)  # bit-identical training

    torch.manual_seed(0)
    spec_model = gpt_model(cfg, spec=espace.get_gpt_layer_espace_spec())
    plans = espace.apply_espace(spec_model, espace.ESPACEConfig.from_dict(ALL_FOUR),
                                random_projections(spec_model))
    assert all(linear_layers(spec_model)[n].projection_rank == p.rank for n, p in plans.items())


def test_config_errors_that_need_the_model(megatron_tp1):
    model = gpt_model(transformer_config())
    projs = random_projections(model)

    def apply(layers):
        return espace.apply_espace(model, espace.ESPACEConfig.from_dict(
            {"layers": layers}, source="c.yaml"), projs)

    with pytest.raises(espace.ConfigError,
                       match=r"c\.yaml: layers\[0\]\.rank: 64 >= K=64 .*linear_qkv"):
        apply([{"match": "*.linear_qkv", "rank": 64, "method": "mse"}])
    with pytest.raises(espace.ConfigError,
                       match=r"c\.yaml: layers\[1\]\.match: pattern '\*\.linear_fc3' matches no"):
        apply([{"match": "*.linear_qkv", "rank": 8, "method": "mse"},
               {"match": "*.linear_fc3", "rank": 8, "method": "mse"}])
    with pytest.raises(espace.ConfigError, match=r"layers\[0\]\.match: .*output_layer|matches no"):
        apply([{"match": "output_layer", "rank": 8, "method": "mse"}])
    with pytest.raises(espace.ConfigError, match=r"layers\[0\]\.compression: no rank reaches"):
        apply([{"match": "*.linear_qkv", "compression": 0.999, "method": "mse"}])
    with pytest.raises(espace.ConfigError, match=r"layers\[0\]\.method: 'auto' needs"):
        apply([{"match": "*.linear_qkv", "rank": 8}])
    with pytest.raises(KeyError, match=r"no projection for layer .* method 'go_mse'"):
        apply([{"match": "*.linear_qkv", "rank": 8, "method": "go_mse"}])


def test_projections_for_another_model_are_refused(megatron_tp1, tmp_path):
    model = gpt_model(transformer_config())
    other = gpt_model(transformer_config(hidden_size=32, ffn_hidden_size=64))
    path = tmp_path / "other.safetensors"
    random_projections(other).save(path)
    with pytest.raises(ValueError, match=r"other\.safetensors: layer 'decoder.layers.0.self_"
                                         r"attention.linear_\w+' has K=32.*input_size=64"):
        espace.apply_espace(model, espace.ESPACEConfig.from_dict(ALL_FOUR),
                            espace.Projections.load(path))
    assert not any(type(m).__name__.startswith("ESPACE") for m in linear_layers(model).values())


def test_projections_with_other_output_sizes_are_refused(megatron_tp1, tmp_path):
    model = gpt_model(transformer_config())
    projs = random_projections(model)
    projs.info["layers"] = {"decoder.layers.0.mlp.linear_fc1": {"kind": "column", "K": 64,
                                                                "N": 256}}
    projs.save(tmp_path / "p.safetensors")
    with pytest.raises(ValueError, match=r"p\.safetensors: layer 'decoder.layers.0.mlp.linear"
                                         r"_fc1' was calibrated as a column-parallel layer "
                                         r"with N=256, the model's is column-parallel with "
                                         r"N=128"):
        espace.apply_espace(model, espace.ESPACEConfig.from_dict(ALL_FOUR),
                            espace.Projections.load(tmp_path / "p.safetensors"))


def test_auto_method_uses_the_recorded_choice(megatron_tp1):
    model = gpt_model(transformer_config())
    projs = random_projections(model, methods=("mse", "nmse"))
    for name in linear_layers(model):
        projs.chosen[name] = "nmse"
    plans = espace.apply_espace(model, espace.ESPACEConfig.from_dict(
        {"layers": [{"match": "*", "rank": 8, "method": "auto"}]}), projs)
    assert {p.method for p in plans.values()} == {"nmse"}


def test_projections_file_round_trip(tmp_path):
    projs = espace.Projections()
    vecs, vals = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))[0], torch.randn(16)
    projs.add("a.linear_qkv", "mse", vecs, vals)
    projs.add("a.linear_qkv", "nmse", vecs.flip(1), vals)
    projs.chosen["a.linear_qkv"] = "nmse"
    projs.info["sequences"] = 8
    path = tmp_path / "p.safetensors"
    projs.save(path, max_rank=4)
    assert sorted(os.listdir(tmp_path)) == ["p.safetensors"]  # no temporary left behind
    back = espace.Projections.load(path)
    v, w = back.eigen("a.linear_qkv", "nmse")
    assert v.shape == (16, 4) and torch.equal(v, vecs.flip(1)[:, :4].float())
    assert torch.equal(w, vals.double())
    assert back.chosen == {"a.linear_qkv": "nmse"} and back.info == {"sequences": 8}
    assert back.methods("a.linear_qkv") == ["mse", "nmse"]
    with pytest.raises(ValueError, match="keeps 4 eigenvectors, rank 8 asked"):
        back.projection("a.linear_qkv", "mse", 8)


def test_projections_file_errors(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="missing.safetensors: projections file not"):
        espace.Projections.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors: corrupt projections file"):
        espace.Projections.load(tmp_path / "junk.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="other.safetensors: not an ESPACE projections file"):
        espace.Projections.load(tmp_path / "other.safetensors")


def _train(tp):
    from megatron_espace import runtime

    runtime.initialize(tensor_model_parallel_size=tp)
    return _train_in_process(tp)


def _train_in_process(tp):
    cfg = transformer_config(tp=tp, sp=tp > 1)
    torch.manual_seed(0)  # use_cpu_initialization: the same full weights at any TP
    model = gpt_model(cfg)
    espace.apply_espace(model, espace.ESPACEConfig.from_dict(ALL_FOUR), random_projections(model))
    layers = linear_layers(model)
    proj_before = {n: m.espace_proj.clone() for n, m in layers.items()}
    w_before = {n: m.weight.detach().clone() for n, m in layers.items()}
    losses, ddp, opt = train_steps(model, steps=8)
    optimizer_params = [p for g in opt.param_groups for p in g["params"]]
    projs_ids = {id(m.espace_proj) for m in layers.values()}
    return {
        "losses": losses,
        "p_unchanged": all(torch.equal(layers[n].espace_proj, p) for n, p in proj_before.items()),
        "p_not_in_optimizer": not any(id(p) in projs_ids for p in optimizer_params)
        and len(optimizer_params) == len(list(model.parameters())),
        "w_moved": all(not torch.equal(layers[n].weight, w) for n, w in w_before.items()),
    }


def test_gpt_with_espace_trains_at_tp2_like_tp1(megatron_tp1):
    tp1 = _train_in_process(1)
    tp2 = run_distributed(_train, nprocs=2, tp=2)
    for res in [tp1] + tp2:
        assert res["p_unchanged"] and res["p_not_in_optimizer"] and res["w_moved"], res
        assert res["losses"][-1] < res["losses"][0] - 0.3, res["losses"]
        torch.testing.assert_close(res["losses"], tp1["losses"], rtol=2e-5, atol=0)


def _count(tp, pp=1, tied=False):
    from megatron_espace import runtime

    runtime.initialize(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    return _count_in_process(tp, pp, tied)


def _count_in_process(tp, pp=1, tied=False):
    model = gpt_model(transformer_config(tp=tp, pp=pp), share_embeddings_and_output_weights=tied)
    before = espace.count_parameters(model)
    espace.apply_espace(model, espace.ESPACEConfig.from_dict(ALL_FOUR), random_projections(model))
    return {"before": before, "after": espace.count_parameters(model)}


def test_count_parameters_by_the_paper_formula(megatron_tp1):
    res = _count_in_process(1)
    dense = sum(p.numel() for p in gpt_model(transformer_config()).parameters())
    assert res["before"]["total"] == dense
    # per layer, K=64, hidden 64, ffn 128: qkv 64->192 (L=16), proj 64->64 (L=32),
    # fc1 64->128 (L=16 from compression 0.5), fc2 128->64 (L=64); biases unchanged
    espace_gemm = 16 * (64 + 192) + 32 * 128 + 16 * (64 + 128) + 64 * (128 + 64)
    dense_gemm = 64 * 192 + 64 * 64 + 64 * 128 + 128 * 64
    biases = 192 + 64 + 128 + 64
    assert res["after"]["gemm"] == 2 * (espace_gemm + biases)
    assert res["after"]["gemm_dense"] == res["before"]["gemm"] == 2 * (dense_gemm + biases)
    assert res["after"]["total"] == dense - 2 * (dense_gemm - espace_gemm)
    for r in run_distributed(_count, nprocs=2, tp=2):
        assert r == res


def test_count_parameters_with_tied_embeddings_is_pipeline_invariant(megatron_tp1):
    """The last stage's copy of a tied embedding is not counted twice (PP=2 == PP=1)."""
    res = _count_in_process(1, tied=True)
    dense = sum(p.numel() for p in gpt_model(
        transformer_config(), share_embeddings_and_output_weights=True).parameters())
    assert res["before"]["total"] == dense and res["before"]["output_layer"] == 0
    for r in run_distributed(_count, nprocs=2, tp=1, pp=2, tied=True):
        assert r == res


def test_parameter_parts_and_layer_table(megatron_tp1):
    from megatron_espace.surgery import layer_table

    model = gpt_model(transformer_config())
    espace.apply_espace(model, espace.ESPACEConfig.from_dict(ALL_FOUR), random_projections(model))
    counts = espace.count_parameters(model)
    assert counts["embedding"] == 128 * 64 + 32 * 64  # word + position embeddings
    assert counts["output_layer"] == 128 * 64  # untied (GPTModel's default)
    assert counts["other"] == 2 * 4 * 64 + 2 * 64  # two norms per layer + the final norm
    rows = layer_table(model)
    assert [r["layer"] for r in rows][:2] == ["decoder.layers.0.self_attention.linear_qkv",
                                              "decoder.layers.0.self_attention.linear_proj"]
    qkv = rows[0]
    assert (qkv["K"], qkv["N"], qkv["rank"]) == (64, 192, 16)
    assert qkv["params"] == 16 * (64 + 192) + 192 and qkv["dense"] == 64 * 192 + 192
