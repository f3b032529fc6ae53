"""A and dW once per optimizer step (``accumulation.defer_weight_grads``): a step of 4
micro-batches gives the per-micro-batch implementation's losses, gradients and updated
weights, at TP=2 with and without sequence parallelism and with full activation recompute,
PP=2 (1F1B; also with overlapped reduction through ``grad_sync_func``, where stage 1 runs its
last backward inside ``no_sync``) and DP=2 with the distributed optimizer and overlapped
gradient reduction; it
saves exactly
``(n-1)·4·N·K·L`` matmul FLOPs per layer and rank."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import megatron_espace as espace
from tests.common import (global_param_names, gpt_model, pipeline_forward_backward,
                          random_projections, reinit_by_global_name, token_batch,
                          transformer_config)
from tests.harness import run_distributed

MICRO = 4
RULES = {"layers": [{"match": "*", "rank": 16, "method": "mse"}]}


def _run(defer, tp, pp, sp, dist_opt, overlap, recompute, grad_sync):
    from megatron.core.distributed import DistributedDataParallel as DDP
    from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_espace.accumulation import defer_weight_grads

    # megatron's distributed optimizer takes float32 (not float64) parameters
    dtype = torch.float32 if dist_opt else torch.float64
    extra = dict(recompute_granularity="full", recompute_method="uniform",
                 recompute_num_layers=1) if recompute else {}
    cfg = transformer_config(tp=tp, sp=sp, pp=pp, dtype=dtype, **extra)
    model = gpt_model(cfg, share_embeddings_and_output_weights=False).to(dtype)
    reinit_by_global_name(model)
    espace.apply_espace(model, espace.ESPACEConfig.from_dict(RULES), random_projections(model))
    ddp = DDP(cfg, DistributedDataParallelConfig(use_distributed_optimizer=dist_opt,
                                                 overlap_grad_reduce=overlap), model)
    layers = defer_weight_grads([ddp]) if defer else 0
    cfg.no_sync_func, cfg.finalize_model_grads_func = ddp.no_sync, finalize_model_grads
    if grad_sync:  # Megatron-LM's --align-grad-reduce: later stages' last backward in no_sync
        cfg.grad_sync_func = ddp.start_grad_sync
    opt = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=1e-3, use_distributed_optimizer=dist_opt, params_dtype=dtype,
        clip_grad=0.0), [ddp])
    tokens, pos, labels = token_batch(batch=2 * MICRO, seq_length=16)
    micro = [(tokens[i:i + 2], pos[i:i + 2], labels[i:i + 2]) for i in range(0, 2 * MICRO, 2)]
    out = {"layers": layers, "losses": []}
    for step in range(2):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        with FlopCounterMode(display=False) as flops:
            out["losses"].append(pipeline_forward_backward(ddp, micro))
        if step == 0:
            out["flops"] = flops.get_total_flops()
            for name, p in global_param_names(model).items():
                out[f"grad:{name}"] = p.main_grad.clone()
        opt.step()
    for name, p in global_param_names(model).items():
        out[f"param:{name}"] = p.detach().clone()
    # what deferring saves on this rank: A and dW, 2·N·K·L each, on n-1 micro-batches
    out["saved"] = sum(4 * (MICRO - 1) * m.weight.numel() * m.projection_rank
                       for m in model.modules() if isinstance(m, espace.ESPACEColumnParallelLinear)
                       or isinstance(m, espace.ESPACERowParallelLinear))
    return out


def _both(tp=1, pp=1, sp=False, dist_opt=False, overlap=False, recompute=False,
          grad_sync=False):
    from megatron_espace import runtime

    runtime.initialize(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    kw = dict(tp=tp, pp=pp, sp=sp, dist_opt=dist_opt, overlap=overlap, recompute=recompute,
              grad_sync=grad_sync)
    return {f"{mode}/{k}": v for mode, defer in (("plain", False), ("deferred", True))
            for k, v in _run(defer, **kw).items()}


LAYOUTS = {
    "tp2": dict(tp=2),
    "tp2-sp": dict(tp=2, sp=True),
    "tp2-recompute": dict(tp=2, recompute=True),
    "pp2": dict(pp=2),
    "pp2-overlap-grad-sync-func": dict(pp=2, overlap=True, grad_sync=True),
    "dp2-distopt-overlap": dict(dist_opt=True, overlap=True),
    "dp2-overlap": dict(overlap=True),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_deferred_weight_grads_equal_per_microbatch(layout):
    for rank in run_distributed(_both, nprocs=2, **LAYOUTS[layout]):
        plain, deferred = ({k.split("/", 1)[1]: v for k, v in rank.items()
                            if k.startswith(mode + "/")} for mode in ("plain", "deferred"))
        assert deferred["layers"] > 0
        # float64, or float32 for the distributed optimizer: Σ dW_i against (Σ dA_i) Pᵀ
        tol = dict(rtol=1e-5, atol=1e-7) if "distopt" in layout else dict(rtol=1e-10,
                                                                          atol=1e-13)
        assert deferred["losses"] == pytest.approx(plain["losses"], rel=tol["rtol"])
        keys = [k for k in plain if k.startswith(("grad:", "param:"))]
        assert keys and keys == [k for k in deferred if k.startswith(("grad:", "param:"))]
        for k in keys:
            if k.startswith("param:") and "distopt" in layout:
                # Adam's first steps move each weight by about ±lr whatever the gradient's
                # size, so float32 rounding of near-zero gradients shows up to ~3e-7 here
                tol = dict(rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(deferred[k], plain[k], **tol, msg=k)
        # only the W-side work differs (the layers split their tokens alike in both): 2(n-1)
        # GEMMs of 2·N·K·L per layer
        if "recompute" not in layout:
            assert plain["flops"] - deferred["flops"] == plain["saved"] > 0
        else:  # each forward runs twice: 3n-2 such GEMMs, and the no_grad first forward of
            # a row layer may split its tokens where the per-micro-batch one did not
            saved = plain["saved"] * (3 * MICRO - 2) // (2 * MICRO - 2)
            assert plain["flops"] - deferred["flops"] >= saved > 0


# a row layer whose per-micro-batch A and dA all-reduces (4·N·L) make in-layer sequence
# parallelism cost more bytes than dense at M = 64 tokens (test_layers keeps it replicated);
# once per step of n >= 2 micro-batches they fit, so every micro-batch splits its GEMMs
ROW = dict(kind="row", sp=False, bias=False, skip_bias_add=False, K=192, N=64, L=16)


def _row_step(tp):
    import os

    from megatron_espace import runtime
    from tests.common import collective_bytes
    from tests.test_layers import S, B, _build, _full_tensors, _local_slices

    runtime.initialize(tensor_model_parallel_size=tp)
    rank = int(os.environ["RANK"])
    w, _, _, _, p = _full_tensors(ROW, torch.float64)
    sl = _local_slices(ROW, tp, rank)
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(S, B, ROW["K"], generator=g, dtype=torch.float64) for _ in range(MICRO)]
    gys = [torch.randn(S, B, ROW["N"], generator=g, dtype=torch.float64) for _ in range(MICRO)]
    out = {}
    for espace_on in (True, False):
        layer = _build(ROW, tp, torch.float64, espace_on)
        with torch.no_grad():
            layer.weight.copy_(w[sl["w"]])
        layer.weight.main_grad = torch.zeros_like(layer.weight)
        layer.weight.grad_added_to_main_grad = False
        if espace_on:
            layer.set_projection(p)
        with FlopCounterMode(display=False) as flops, collective_bytes() as sent:
            for i, (x, gy) in enumerate(zip(xs, gys)):
                if espace_on:  # what defer_weight_grads' no_sync does
                    layer.espace_step.deferring = i < MICRO - 1
                y, _ = layer(x[sl["x"]].requires_grad_(True))
                y.backward(gy[sl["y"]])
        kind = "espace" if espace_on else "dense"
        out[f"{kind}:bytes"] = sent["bytes"]
        out[f"{kind}:flops"] = flops.get_total_flops()
        if espace_on:
            pp = p @ p.t()
            dw_ref = sum(gy.reshape(-1, ROW["N"]).t() @ (x @ pp).reshape(-1, ROW["K"])
                         for x, gy in zip(xs, gys))
            out["err_dw"] = (layer.weight.main_grad - dw_ref[sl["w"]]).abs().max().item()
            out["split"] = layer._splits_tokens(S * B)
    return out


def test_row_layer_splits_its_work_once_a_and_da_are_reduced_once_per_step():
    k, n, l, m = ROW["K"], ROW["N"], ROW["L"], 64
    # paper Eq. 1's GEMMs on one device: per micro-batch xP, ZAᵀ, dA, dZ, dx; A and dW once
    one_device = MICRO * 2 * m * (k * l + l * n + n * l + n * l + l * k) + 2 * 2 * n * k * l
    for res in run_distributed(_row_step, nprocs=2, tp=2):
        assert res["err_dw"] < 1e-11
        assert res["split"] is False  # outside a step: the replicated form (test_layers)
        assert res["espace:flops"] <= 1.05 * one_device / 2
        assert 0 < res["espace:bytes"] <= res["dense:bytes"]


def test_a_step_that_never_leaves_no_sync_is_refused(megatron_tp1):
    """Σ dA kept for a last micro-batch that never came: the next step's zero_grad_buffer
    says so (the update it preceded lacked those gradients) instead of dropping them."""
    from megatron.core.distributed import DistributedDataParallel as DDP
    from megatron.core.distributed import DistributedDataParallelConfig

    from megatron_espace.accumulation import defer_weight_grads, step_bytes

    cfg = transformer_config()
    model = gpt_model(cfg)
    espace.apply_espace(model, espace.ESPACEConfig.from_dict(RULES), random_projections(model))
    with pytest.raises(TypeError, match="not a megatron DistributedDataParallel"):
        defer_weight_grads([model])
    ddp = DDP(cfg, DistributedDataParallelConfig(), model)
    assert defer_weight_grads([ddp]) == 8
    tokens, pos, labels = token_batch(batch=2, seq_length=16)
    with ddp.no_sync():
        ddp(tokens, pos, None, labels=labels).sum().backward()
    layers = [m for m in model.modules() if hasattr(m, "espace_step")]
    held = sum(m.espace_step.nbytes() for m in layers)  # A and Σ dA, float32 here
    assert held == step_bytes([ddp], torch.float32) == sum(
        8 * m.weight.shape[0] * m.projection_rank for m in layers) > 0
    with pytest.raises(RuntimeError, match="decoder.layers.0.self_attention.linear_qkv.*never"):
        ddp.zero_grad_buffer()
    ddp.zero_grad_buffer()  # reported once; the next step starts clean
