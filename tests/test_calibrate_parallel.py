"""Calibration is layout-invariant (DESIGN sections 2 and 9): DP=2, TP=2 (with and without
sequence parallelism, at micro-batch 1, under moment and layer passes) and PP=2 give what one
process gives; each statistic has one owner; the plan's bytes are the live tensors' bytes."""

import pytest
import torch

import megatron_espace as espace
from megatron_espace.config import METHODS
from tests.common import (global_param_names, gpt_model, pipeline_forward_backward,
                          token_batch, transformer_config)
from tests.harness import run_distributed

CFG = {"calibration": {"methods": list(METHODS)},
       "layers": [{"match": "decoder.layers.*", "rank": 8, "method": "mse"}]}
SEQUENCES = 8


def _calibrate(tp=1, pp=1, sp=False, micro_batch=2, recompute=False, budget=None, out=""):
    """Calibrate a tiny float64 GPT; weights depend only on global names (so they are the
    same at any TP and PP). Returns this rank's owned moments, its bytes and the plan's."""
    from megatron.core import parallel_state

    from megatron_espace import runtime
    from megatron_espace.calibration_plan import FORWARD

    runtime.initialize(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    extra = dict(recompute_granularity="full", recompute_method="uniform",
                 recompute_num_layers=1) if recompute else {}
    model = gpt_model(transformer_config(tp=tp, pp=pp, sp=sp, dtype=torch.float64, **extra),
                      share_embeddings_and_output_weights=False).double()
    _reinit(model, tp)
    dp, dp_rank = (parallel_state.get_data_parallel_world_size(),
                   parallel_state.get_data_parallel_rank())
    tokens, pos, labels = token_batch(batch=SEQUENCES, seed=100)
    micro = [(tokens[i:i + micro_batch], pos[i:i + micro_batch], labels[i:i + micro_batch])
             for i in range(0, SEQUENCES, micro_batch)][dp_rank::dp]
    stats = espace.calibrate(model, lambda m: pipeline_forward_backward(m, micro),
                             espace.ESPACEConfig.from_dict(CFG), max_device_gib=budget)
    res = {f"{n}|{m}": s.mean() for (n, m), s in stats.sums.items()}
    plan = stats.plan
    stage, tp_rank = parallel_state.get_pipeline_model_parallel_rank(), stats.tp_rank
    res.update(device=stats.peak_device_bytes, plan_device=plan.device_bytes(stage, tp_rank),
               host=sum(s.host.nbytes for s in stats.sums.values()),
               plan_host=plan.host_bytes(stage, tp_rank), passes=len(plan.passes),
               tokens=sum(s.count for (n, m), s in stats.sums.items() if m in FORWARD),
               summary=plan.summary())
    projs = stats.projections(out or None)
    for n in projs.layers():
        for m in METHODS:
            p = projs.projection(n, m, 8).double()
            res[f"P {n} {m}"] = p @ p.t()
    res["names"] = projs.layers()
    return res


def _reinit(model, tp):
    """Weights that depend only on the global parameter name, sliced for this TP rank."""
    import zlib

    from megatron.core import parallel_state

    rank = parallel_state.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, p in global_param_names(model).items():
            dim = p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
            shape = list(p.shape)
            if dim is not None:
                shape[dim] *= tp
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            full = torch.randn(shape, generator=g, dtype=torch.float64) * 0.05
            p.copy_(full if dim is None else full.chunk(tp, dim)[rank])


def _merged(ranks):
    out = {}
    for res in ranks:
        for key, value in res.items():
            if "|" in key:
                assert key not in out, f"{key} accumulated on two ranks"
                out[key] = value
    return out


@pytest.fixture(scope="module")
def reference():
    (ref,) = run_distributed(_calibrate, nprocs=1)
    return ref


def _assert_same(ranks, ref, dp=1, grad_scale=1.0):
    got = _merged(ranks[::dp] if dp > 1 else ranks)
    want = _merged([ref])
    assert got.keys() == want.keys()
    for key, value in got.items():
        # float64 model: the layouts differ only by float64 rounding of the reductions; the
        # gradients also pass through megatron's float32 cross-entropy (logits.float()), whose
        # rounding can flip by one float32 ulp between layouts
        tol = 1e-8 if key.split("|")[1] in ("nl", "nln") else 1e-12
        if key.endswith("|nl"):
            value = value / grad_scale
        torch.testing.assert_close(value, want[key], rtol=0,
                                   atol=tol * want[key].abs().max(), msg=key)
    for res in ranks:  # the file every rank reads: float32 columns
        assert res["names"] == ref["names"]
        for key in (k for k in ref if k.startswith("P ")):
            torch.testing.assert_close(res[key], ref[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("layout", [
    dict(tp=1, nprocs=2),                                  # DP=2
    dict(tp=2, sp=True, nprocs=2, budget=480_000 / 2**30),  # TP=2+SP, forward/gradient passes
    dict(tp=2, micro_batch=1, nprocs=2, budget=200_000 / 2**30),  # TP=2, mb 1, layer passes
])
def test_layouts_equal_one_process(reference, layout):
    nprocs = layout.pop("nprocs")
    ranks = run_distributed(_calibrate, nprocs=nprocs, **layout)
    dp = nprocs // layout.get("tp", 1)
    # each micro-batch's loss is its token mean: at micro-batch 1 every gradient is twice the
    # reference's (micro-batch 2), so nl (quadratic in G) is exactly 4 times it
    _assert_same(ranks, reference, dp, grad_scale=(2 / layout.get("micro_batch", 2)) ** 2)
    for res in ranks:
        assert res["device"] == res["plan_device"] and res["host"] == res["plan_host"]
        assert res["tokens"] > 0  # every TP rank does work, at micro-batch 1 too
    if layout.get("tp") == 2:
        assert ranks[0]["summary"] == ranks[1]["summary"]
        # one owner per statistic: each TP rank holds about half of what one process holds
        for res in ranks:
            assert 0.35 < res["host"] / reference["host"] < 0.65
        assert ranks[0]["passes"] == 2 if "sp" in layout else ranks[0]["passes"] > 2
        assert ranks[0]["summary"]["device_bytes_per_gpu"] <= layout["budget"] * 2**30
    else:
        assert all(r["host"] == reference["host"] for r in ranks)  # DP: the same share


def test_pipeline_parallel_equals_one_stage_through_the_file(reference, tmp_path):
    stages = run_distributed(_calibrate, nprocs=2, pp=2, out=str(tmp_path / "pp2.safetensors"))
    _assert_same(stages, reference)
    two = espace.Projections.load(tmp_path / "pp2.safetensors")
    assert len(two.layers()) == 8
    assert two.info["pipeline_model_parallel_size"] == 2
    assert two.info["layers"]["decoder.layers.1.mlp.linear_fc2"]["K"] == 128


def test_activation_recompute_counts_nothing_twice(reference):
    (res,) = run_distributed(_calibrate, nprocs=1, recompute=True)
    _assert_same([res], reference)
