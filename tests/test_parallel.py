"""ESPACE models agree across layouts: PP=2 and DP=2 against one process (DESIGN section 2)."""

import torch

import megatron_espace as espace
from tests.common import (global_param_names, gpt_model, pipeline_forward_backward,
                          random_projections, reinit_by_global_name, token_batch, train_steps,
                          transformer_config)
from tests.harness import run_distributed

# layer 1 only: at PP=2 this pattern matches nothing on stage 0, everything on stage 1
ESPACE = {"layers": [
    {"match": "decoder.layers.1.mlp.*", "rank": 16, "method": "mse"},
    {"match": "*.linear_qkv", "rank": 16, "method": "mse"},
]}


def _pipeline_step(pp):
    from megatron_espace import runtime

    runtime.initialize(pipeline_model_parallel_size=pp)
    cfg = transformer_config(pp=pp)
    model = gpt_model(cfg, share_embeddings_and_output_weights=False)
    reinit_by_global_name(model)
    plans = espace.apply_espace(model, espace.ESPACEConfig.from_dict(ESPACE),
                                random_projections(model))
    tokens, pos, labels = token_batch(batch=4)
    micro = [(tokens[i:i + 2], pos[i:i + 2], labels[i:i + 2]) for i in (0, 2)]
    loss = pipeline_forward_backward(model, micro)
    out = {"layers": sorted(plans)}
    out["loss"] = loss
    for name, p in global_param_names(model).items():
        out[f"grad:{name}"] = p.grad
    return out


def test_pipeline_parallel_matches_one_stage():
    (ref,) = run_distributed(_pipeline_step, nprocs=1, pp=1)
    stages = run_distributed(_pipeline_step, nprocs=2, pp=2)
    # layer names are global: stage 1 names its only layer "decoder.layers.1"
    assert stages[0]["layers"] == ["decoder.layers.0.self_attention.linear_qkv"]
    assert stages[1]["layers"] == ["decoder.layers.1.mlp.linear_fc1",
                                   "decoder.layers.1.mlp.linear_fc2",
                                   "decoder.layers.1.self_attention.linear_qkv"]
    assert sorted(stages[0]["layers"] + stages[1]["layers"]) == ref["layers"]
    assert abs(stages[1]["loss"] - ref["loss"]) < 1e-5 * ref["loss"]
    grads = {k: v for s in stages for k, v in s.items() if k.startswith("grad:")}
    assert grads.keys() == {k for k in ref if k.startswith("grad:")}
    for k, g in grads.items():
        torch.testing.assert_close(g, ref[k], rtol=1e-4, atol=1e-6, msg=k)


def _data_parallel(dp):
    import os

    from megatron_espace import runtime

    runtime.initialize()
    rank = int(os.environ["RANK"])
    cfg = transformer_config()
    torch.manual_seed(0)
    model = gpt_model(cfg)
    espace.apply_espace(model, espace.ESPACEConfig.from_dict(ESPACE), random_projections(model))
    tokens, pos, labels = token_batch(batch=4)
    n = 4 // dp
    part = slice(rank * n, (rank + 1) * n)
    losses, _, _ = train_steps(model, steps=4, batch=(tokens[part], pos[part], labels[part]))
    return {"losses": losses, "fc1": model.decoder.layers[1].mlp.linear_fc1.weight}


def test_data_parallel_matches_one_process():
    (ref,) = run_distributed(_data_parallel, nprocs=1, dp=1)
    ranks = run_distributed(_data_parallel, nprocs=2, dp=2)
    mean = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
    torch.testing.assert_close(mean, ref["losses"], rtol=2e-5, atol=0)
    for r in ranks:
        torch.testing.assert_close(r["fc1"], ref["fc1"], rtol=1e-4, atol=1e-6)
