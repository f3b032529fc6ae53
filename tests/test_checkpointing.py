"""Checkpoints (DESIGN section 3): P saved and loaded, per-layer ranks, baseline -> ESPACE
with optimizer state, TP=2 -> TP=1."""

import pytest
import torch
from megatron.core import dist_checkpointing

import megatron_espace as espace
from megatron_espace import checkpointing
from megatron_espace.surgery import linear_layers
from tests.common import (gpt_model, random_projections, token_batch, train_steps,
                          transformer_config)
from tests.harness import run_distributed

PER_LAYER = {"layers": [
    {"match": "decoder.layers.0.mlp.linear_fc1", "rank": 16, "method": "mse"},
    {"match": "decoder.layers.1.mlp.linear_fc1", "rank": 8, "method": "mse"},
    {"match": "*.linear_qkv", "rank": 16, "method": "mse"},
    {"match": "decoder.layers.0.*.linear_proj", "rank": 32, "method": "mse"},
    {"match": "decoder.layers.1.*.linear_proj", "rank": 16, "method": "mse"},
    {"match": "*.linear_fc2", "rank": 64, "method": "mse"},
]}


def espace_model(tp=1, seed=0, proj_seed=0, cfg=PER_LAYER):
    config = transformer_config(tp=tp, sp=tp > 1)
    torch.manual_seed(seed)
    model = gpt_model(config)
    espace.apply_espace(model, espace.ESPACEConfig.from_dict(cfg),
                        random_projections(model, seed=proj_seed))
    return model


def eval_loss(model):
    tokens, pos, labels = token_batch(seed=7)
    with torch.no_grad():
        return model(tokens, pos, None, labels=labels).float().mean().item()


def test_projections_round_trip_with_per_layer_ranks(megatron_tp1, tmp_path):
    saved = espace_model(seed=0, proj_seed=0)
    checkpointing.save(saved.sharded_state_dict(), tmp_path / "ckpt")

    meta = dist_checkpointing.load_tensors_metadata(str(tmp_path / "ckpt"))
    shapes = {k: tuple(v.global_shape) for k, v in meta.items()}
    assert shapes["decoder.layers.mlp.linear_fc1.espace_proj.L0"] == (64, 16)
    assert shapes["decoder.layers.mlp.linear_fc1.espace_proj.L1"] == (64, 8)
    assert shapes["decoder.layers.self_attention.linear_proj.espace_proj.L1"] == (64, 16)
    assert shapes["decoder.layers.mlp.linear_fc1.weight"] == (2, 128, 64)  # baseline's key

    loaded = espace_model(seed=1, proj_seed=1)  # other weights, other projections
    assert eval_loss(loaded) != eval_loss(saved)
    loaded.load_state_dict(checkpointing.load(loaded.sharded_state_dict(), tmp_path / "ckpt"))
    for name, layer in linear_layers(saved).items():
        other = linear_layers(loaded)[name]
        assert torch.equal(other.espace_proj, layer.espace_proj), name
        assert torch.equal(other.weight, layer.weight), name
    assert eval_loss(loaded) == eval_loss(saved)


def test_baseline_checkpoint_loads_into_espace_model_with_optimizer_state(megatron_tp1,
                                                                          tmp_path):
    config = transformer_config()
    torch.manual_seed(0)
    baseline = gpt_model(config)
    _, ddp, opt = train_steps(baseline, steps=3)
    model_sd = ddp.module.sharded_state_dict()
    checkpointing.save({"model": model_sd, "optimizer": opt.sharded_state_dict(model_sd)},
                       tmp_path / "base")
    base_opt = {n: {k: v.clone() for k, v in opt.optimizer.state[p].items()}
                for n, p in baseline.named_parameters()}

    esp = espace_model(seed=1)
    projections = {n: m.espace_proj.clone() for n, m in linear_layers(esp).items()}
    _, ddp2, opt2 = train_steps(esp, steps=1)  # an optimizer with its own state
    model_sd = ddp2.module.sharded_state_dict()
    state = checkpointing.load({"model": model_sd,
                                "optimizer": opt2.sharded_state_dict(model_sd, is_loading=True)},
                               tmp_path / "base")
    ddp2.module.load_state_dict(state["model"])  # strict: P missing from the baseline is kept
    opt2.load_state_dict(state["optimizer"])

    for (name, p), (name2, p2) in zip(baseline.named_parameters(), esp.named_parameters()):
        assert name == name2 and torch.equal(p, p2), name
        st, st2 = base_opt[name], opt2.optimizer.state[p2]
        assert st.keys() == st2.keys() and st.keys() >= {"exp_avg", "exp_avg_sq", "step"}
        for k in st:
            assert torch.equal(torch.as_tensor(st[k]), torch.as_tensor(st2[k])), (name, k)
    for name, layer in linear_layers(esp).items():
        assert torch.equal(layer.espace_proj, projections[name]), name


def test_projection_checkpoint_refuses_other_ranks(megatron_tp1, tmp_path):
    saved = espace_model()
    checkpointing.save(saved.sharded_state_dict(), tmp_path / "ckpt")
    other = espace_model(cfg={"layers": [{"match": "*", "rank": 4, "method": "mse"}]})
    with pytest.raises(BaseException, match="espace_proj"):
        checkpointing.load(other.sharded_state_dict(), tmp_path / "ckpt")


def test_save_refuses_to_overwrite(megatron_tp1, tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        checkpointing.save(espace_model().sharded_state_dict(), tmp_path / "ckpt")


def _save_tp2(path):
    from megatron_espace import runtime

    runtime.initialize(tensor_model_parallel_size=2)
    model = espace_model(tp=2, seed=0, proj_seed=0)
    train_steps(model, steps=2)
    checkpointing.save(model.sharded_state_dict(), path)
    return {"loss": eval_loss(model)}


def test_tp2_checkpoint_reloads_at_tp1(megatron_tp1, tmp_path):
    path = str(tmp_path / "tp2")
    tp2_loss = run_distributed(_save_tp2, nprocs=2, path=path)[0]["loss"]
    model = espace_model(tp=1, seed=3, proj_seed=5)
    model.load_state_dict(checkpointing.load(model.sharded_state_dict(), path))
    reference = random_projections(model, seed=0)
    for name, layer in linear_layers(model).items():
        full = reference.projection(name, "mse", layer.projection_rank).float()
        assert torch.equal(layer.espace_proj, full), name
    assert eval_loss(model) == pytest.approx(tp2_loss, rel=1e-5)
