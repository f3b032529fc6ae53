"""Calibration is layout-invariant: DP=2, TP=2 (column and row, with and without sequence
parallelism) and PP=2 give what one process gives; every rank holds bit-identical P."""

import hashlib
import os

import pytest
import torch

import megatron_espace as espace
from megatron_espace.config import METHODS
from tests.common import (gpt_model, pipeline_forward_backward, reinit_by_global_name,
                          token_batch, transformer_config)
from tests.harness import run_distributed

CFG = {"calibration": {"methods": list(METHODS)},
       "layers": [{"match": "decoder.layers.*", "rank": 8, "method": "mse"}]}
MICRO = 4  # micro-batches of 2 sequences each


def _calibrate(tp=1, pp=1, sp=False, recompute=False, out=""):
    """Calibrate a tiny GPT; weights depend only on global names (use_cpu_initialization
    makes full weights TP-invariant, and the re-init makes them PP-invariant)."""
    from megatron.core import parallel_state

    from megatron_espace import runtime

    runtime.initialize(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    extra = dict(recompute_granularity="full", recompute_method="uniform",
                 recompute_num_layers=1) if recompute else {}
    torch.manual_seed(0)
    model = gpt_model(transformer_config(tp=tp, pp=pp, sp=sp, **extra),
                      share_embeddings_and_output_weights=False)
    if pp > 1 or out:
        reinit_by_global_name(model)  # shard shapes equal full shapes at TP=1
    dp, dp_rank = (parallel_state.get_data_parallel_world_size(),
                   parallel_state.get_data_parallel_rank())
    micro = []
    for i in range(MICRO)[dp_rank::dp]:  # each DP rank its own micro-batches
        t, p, lab = token_batch(batch=2, seed=100 + i)
        micro.append((t, p, lab))

    stats = espace.calibrate(model, lambda m: pipeline_forward_backward(m, micro),
                             espace.ESPACEConfig.from_dict(CFG))
    projs = stats.projections()
    if out and int(os.environ["RANK"]) == 0:
        projs.save(out)
    res = {}
    for name in stats.layers:
        for method in METHODS:
            res[f"{name}|{method}"] = stats.matrix(name, method)[0]
        res[f"{name}|tokens"] = stats.layers[name].tokens
    digest = hashlib.sha256()
    for layer in projs.layers():
        for method in projs.methods(layer):
            digest.update(projs.eigen(layer, method)[0].numpy().tobytes())
    res["p_digest"] = digest.hexdigest()
    return res


def _matrices(res):
    return {k: v for k, v in res.items() if "|" in k}


@pytest.fixture(scope="module")
def reference():
    (ref,) = run_distributed(_calibrate, nprocs=1)
    return ref


def _assert_same(got, ref):
    for key, value in _matrices(got).items():
        if isinstance(value, torch.Tensor):
            # the model runs in float32: agreement to float32 rounding of the largest entry
            torch.testing.assert_close(value, ref[key], rtol=0, atol=2e-6 * ref[key].abs().max(),
                                       msg=key)
        else:
            assert value == ref[key], key


@pytest.mark.parametrize("layout", [
    dict(tp=1, nprocs=2),                  # DP=2
    dict(tp=2, sp=False, nprocs=2),        # TP=2
    dict(tp=2, sp=True, nprocs=2),         # TP=2 with sequence parallelism
])
def test_layouts_equal_one_process(reference, layout):
    nprocs = layout.pop("nprocs")
    ranks = run_distributed(_calibrate, nprocs=nprocs, **layout)
    for res in ranks:
        assert _matrices(res).keys() == _matrices(reference).keys()
        _assert_same(res, reference)
    assert len({r["p_digest"] for r in ranks}) == 1  # bit-identical P on every rank


def test_pipeline_parallel_equals_one_stage_through_the_file(tmp_path):
    (reference,) = run_distributed(_calibrate, nprocs=1, out=str(tmp_path / "pp1.safetensors"))
    stages = run_distributed(_calibrate, nprocs=2, pp=2, out=str(tmp_path / "pp2.safetensors"))
    assert stages[0]["p_digest"] == stages[1]["p_digest"]
    merged = {**_matrices(stages[0]), **_matrices(stages[1])}
    assert merged.keys() == _matrices(reference).keys()
    _assert_same(merged, reference)
    one = espace.Projections.load(tmp_path / "pp1.safetensors")
    two = espace.Projections.load(tmp_path / "pp2.safetensors")
    assert one.layers() == two.layers() and len(one.layers()) == 8
    for layer in one.layers():
        for method in METHODS:
            p1, p2 = one.projection(layer, method, 8), two.projection(layer, method, 8)
            torch.testing.assert_close(p1 @ p1.t(), p2 @ p2.t(), atol=1e-4, rtol=0,
                                       msg=f"{layer} {method}")
    assert two.info["pipeline_model_parallel_size"] == 2
    assert two.info["layers"]["decoder.layers.1.mlp.linear_fc2"]["K"] == 128


def test_activation_recompute_counts_nothing_twice(reference):
    (res,) = run_distributed(_calibrate, nprocs=1, recompute=True)
    _assert_same(res, reference)
