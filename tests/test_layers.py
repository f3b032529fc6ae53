"""ESPACE linears against a float64 dense reference ``Ŷ = Wᵀ P Pᵀ X`` (DESIGN sections 1-2)."""

import functools
import itertools

import pytest
import torch

from torch.utils.flop_counter import FlopCounterMode

from tests.common import collective_bytes, orthonormal, transformer_config
from tests.harness import run_distributed

# (K, N, L) at S·B = 64 tokens: both layouts split every GEMM across TP (in-layer sequence
# parallelism without SP), and move fewer bytes than the dense layer
SHAPES = [(64, 96, 8), (96, 64, 8)]
S, B = 16, 4  # sequence, micro-batch: M = 64 tokens


def _cases():
    for kind, sp, (k, n, l) in itertools.product(["column", "row"], [False, True], SHAPES):
        yield dict(kind=kind, sp=sp, bias=True, skip_bias_add=False, K=k, N=n, L=l)
    k, n, l = SHAPES[0]
    for kind, sp, (bias, skip) in itertools.product(["column", "row"], [False, True],
                                                    [(False, False), (True, True)]):
        yield dict(kind=kind, sp=sp, bias=bias, skip_bias_add=skip, K=k, N=n, L=l)
    # gathered output (column), replicated input (row)
    yield dict(kind="column", sp=False, bias=True, skip_bias_add=False, K=k, N=n, L=l,
               gather_output=True)
    yield dict(kind="row", sp=False, bias=True, skip_bias_add=False, K=k, N=n, L=l,
               input_is_parallel=False)
    # a token count TP=4 does not divide: padded inside the layer (66 -> 68 tokens)
    yield dict(kind="column", sp=False, bias=True, skip_bias_add=False, K=k, N=n, L=l,
               S=33, B=2)
    yield dict(kind="row", sp=False, bias=True, skip_bias_add=False, K=k, N=n, L=4,
               S=33, B=2)
    # where in-layer SP would move more bytes than dense, the replicated form is kept:
    # column with L > K/2 (17% compression), row with few tokens for its N·L
    yield dict(kind="column", sp=False, bias=True, skip_bias_add=False, K=64, N=192, L=40,
               replicated=True)
    yield dict(kind="row", sp=False, bias=True, skip_bias_add=False, K=192, N=64, L=16,
               replicated=True)


def _name(c):
    return "-".join(f"{k}={v}" for k, v in c.items())


def _build(case, tp, dtype, espace=True):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    import megatron_espace as espace_mod

    cfg = transformer_config(tp=tp, sp=case["sp"], dtype=dtype)
    init = torch.nn.init.zeros_
    if case["kind"] == "column":
        cls = espace_mod.ESPACEColumnParallelLinear if espace else ColumnParallelLinear
        return cls(case["K"], case["N"], config=cfg, init_method=init, bias=case["bias"],
                   skip_bias_add=case["skip_bias_add"],
                   gather_output=case.get("gather_output", False))
    cls = espace_mod.ESPACERowParallelLinear if espace else RowParallelLinear
    return cls(case["K"], case["N"], config=cfg, init_method=init, bias=case["bias"],
               skip_bias_add=case["skip_bias_add"],
               input_is_parallel=case.get("input_is_parallel", True))


def _full_tensors(case, dtype):
    g = torch.Generator().manual_seed(case["K"] * 1000 + case["N"] + case["L"])
    k, n = case["K"], case["N"]
    seq, mb = case.get("S", S), case.get("B", B)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) / k**0.5
    b = torch.randn(n, generator=g, dtype=torch.float64)
    x = torch.randn(seq, mb, k, generator=g, dtype=torch.float64)
    gy = torch.randn(seq, mb, n, generator=g, dtype=torch.float64)
    p = orthonormal(k, case["L"], seed=case["L"])
    return [t.to(dtype) for t in (w, b, x, gy, p)]


def _local_slices(case, tp, rank):
    """Which parts of the full W, x, output and dx this rank holds."""
    full = slice(None)
    k, n = case["K"], case["N"]
    seq = case.get("S", S)
    seq = slice(rank * seq // tp, (rank + 1) * seq // tp) if case["sp"] and tp > 1 else full
    if case["kind"] == "column":
        cols = slice(rank * n // tp, (rank + 1) * n // tp)
        out_cols = full if case.get("gather_output") else cols
        return dict(w=(cols, full), b=cols, x=(seq, full, full), y=(full, full, out_cols))
    ks = slice(rank * k // tp, (rank + 1) * k // tp)
    x_k = ks if case.get("input_is_parallel", True) else full
    return dict(w=(full, ks), b=full, x=(full, full, x_k), y=(seq, full, full))


def run_case(case, tp, rank, dtype=torch.float64, espace=True):
    """Forward + backward of one layer on this rank's shard; returns local results and errors."""
    w, b, x, gy, p = _full_tensors(case, dtype)
    sl = _local_slices(case, tp, rank)
    layer = _build(case, tp, dtype, espace)
    with torch.no_grad():
        layer.weight.copy_(w[sl["w"]])
        if layer.bias is not None:
            layer.bias.copy_(b[sl["b"]])
    if espace:
        layer.set_projection(p)
    x_local = x[sl["x"]].clone().requires_grad_(True)
    gy_local = gy[sl["y"]]
    with FlopCounterMode(display=False) as flops, collective_bytes() as sent:
        out, out_bias = layer(x_local)
        if out_bias is not None:
            assert case["skip_bias_add"] and out_bias is layer.bias
            out = out + out_bias
        out.backward(gy_local)

    # float64 dense reference, from the full tensors: Ŷ = x P Pᵀ Wᵀ + b
    w64, b64, x64, gy64, p64 = (t.double() for t in (w, b, x, gy, p))
    pp = p64 @ p64.t() if espace else torch.eye(case["K"], dtype=torch.float64)
    y_ref = x64 @ pp @ w64.t() + (b64 if case["bias"] else 0)
    dx_ref = gy64 @ w64 @ pp
    dw_ref = gy64.reshape(-1, case["N"]).t() @ (x64 @ pp).reshape(-1, case["K"])
    if case["kind"] == "column":
        db_ref = gy64.reshape(-1, case["N"]).sum(0)[sl["b"]]
    else:
        db_ref = gy64[sl["y"]].reshape(-1, case["N"]).sum(0)
    result = {
        "y": out.detach(), "dx": x_local.grad, "dw": layer.weight.grad,
        "flops": flops.get_total_flops(), "bytes": sent["bytes"],
        "err_y": (out.double() - y_ref[sl["y"]]).abs().max().item(),
        "err_dx": (x_local.grad.double() - dx_ref[sl["x"]]).abs().max().item(),
        "err_dw": (layer.weight.grad.double() - dw_ref[sl["w"]]).abs().max().item(),
    }
    if case["bias"]:
        result["err_db"] = (layer.bias.grad.double() - db_ref).abs().max().item()
    return result


def _tp_all_cases(tp, dtypes):
    """Every case on this rank: ESPACE in each dtype, and the dense parent (float64)."""
    import os

    from megatron_espace import runtime

    runtime.initialize(tensor_model_parallel_size=tp)
    rank = int(os.environ["RANK"])
    with collective_bytes() as probe:  # the counter itself: a ring all-reduce of 80 bytes
        torch.distributed.all_reduce(torch.ones(10, dtype=torch.float64))
    out = {"probe_bytes": probe["bytes"]}
    for i, case in enumerate(_cases()):
        for dtype_name in dtypes:
            r = run_case(case, tp, rank, getattr(torch, dtype_name))
            out.update({f"{i}:{dtype_name}:{key}": value for key, value in r.items()})
        out[f"{i}:dense_bytes"] = run_case(case, tp, rank, espace=False)["bytes"]
    out.update(_inference_bytes(tp, rank))
    return out


def _inference_bytes(tp, rank):
    """Bytes sent by a forward under no_grad, ESPACE and dense, per kind (no SP)."""
    out = {}
    for kind in ("column", "row"):
        case = dict(kind=kind, sp=False, bias=False, skip_bias_add=False, K=64, N=96, L=8)
        x = _full_tensors(case, torch.float64)[2][_local_slices(case, tp, rank)["x"]]
        for espace in (True, False):
            layer = _build(case, tp, torch.float64, espace)
            if espace:
                layer.set_projection(orthonormal(64, 8))
            with torch.no_grad(), collective_bytes() as sent:
                layer(x)
            out[f"inference:{kind}:{'espace' if espace else 'dense'}"] = sent["bytes"]
    return out


def _check_errors(case, result, tol):
    for key in ("err_y", "err_dx", "err_dw", "err_db"):
        if key in result:
            assert result[key] < tol, f"{key}={result[key]:.2e} for {_name(case)}"


@pytest.mark.parametrize("case", list(_cases()), ids=_name)
def test_tp1_matches_float64_dense_reference(megatron_tp1, case):
    _check_errors(case, run_case(case, tp=1, rank=0), 1e-11)


@pytest.fixture(scope="module")
def tp2_results():
    return run_distributed(_tp_all_cases, nprocs=2, tp=2, dtypes=["float64", "float32"])


@functools.lru_cache(maxsize=None)
def _one_device_flops(i):
    return run_case(list(_cases())[i], tp=1, rank=0)["flops"]


def _check_tp(per_rank, tp):
    """float64 exactness, FLOPs per rank <= 1.05 x one-device / TP (split work), bytes sent
    per rank <= the dense layer's, for every case on every rank."""
    assert all(res["probe_bytes"] == 2 * 80 * (tp - 1) / tp for res in per_rank)
    for res in per_rank:  # forward only: the column layer stays replicated, sends nothing
        assert res["inference:column:espace"] == res["inference:column:dense"] == 0
        assert 0 < res["inference:row:espace"] <= res["inference:row:dense"]
    for i, case in enumerate(_cases()):
        one_device = _one_device_flops(i)
        for rank, res in enumerate(per_rank):
            got = {k.split(":", 2)[2]: v for k, v in res.items()
                   if k.startswith(f"{i}:float64:")}
            _check_errors(case, got, 1e-11)
            where = f"{_name(case)} rank {rank} at TP={tp}"
            assert 0 < got["bytes"] <= res[f"{i}:dense_bytes"], (
                f"{where}: sent {got['bytes']:.0f} bytes, dense {res[f'{i}:dense_bytes']:.0f}")
            if not case.get("replicated"):
                assert got["flops"] <= 1.05 * one_device / tp, (
                    f"{where}: {got['flops']} FLOPs, one device {one_device}")


def test_tp2_matches_reference_splits_flops_and_sends_less_than_dense(megatron_tp1, tp2_results):
    _check_tp(tp2_results, 2)


def test_tp4_matches_reference_splits_flops_and_sends_less_than_dense(megatron_tp1):
    _check_tp(run_distributed(_tp_all_cases, nprocs=4, tp=4, dtypes=["float64"]), 4)


def test_tp2_outputs_equal_tp1_outputs_float32(megatron_tp1, tp2_results):
    """Same full W and P in float32: the gathered TP=2 outputs and grads equal TP=1's."""
    for i, case in enumerate(_cases()):
        ref = run_case(case, tp=1, rank=0, dtype=torch.float32)
        for name in ("y", "dx", "dw"):
            parts = [res[f"{i}:float32:{name}"] for res in tp2_results]
            sl = [_local_slices(case, 2, r) for r in range(2)]
            key = {"y": "y", "dx": "x", "dw": "w"}[name]
            full = ref[name].clone().zero_()
            for r in range(2):
                full[sl[r][key]] = parts[r]
            # an unsharded tensor is held whole by both ranks, and identically
            torch.testing.assert_close(full, ref[name], rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{name} of {_name(case)}: {m}")


def test_float32_matches_reference(megatron_tp1):
    case = dict(kind="row", sp=False, bias=True, skip_bias_add=False, K=256, N=128, L=64)
    _check_errors(case, run_case(case, 1, 0, dtype=torch.float32), 1e-4)


@pytest.mark.parametrize("kind", ["column", "row"])
def test_projection_changes_output_and_can_be_removed(megatron_tp1, kind):
    case = dict(kind=kind, sp=False, bias=True, skip_bias_add=False, K=64, N=96, L=16)
    parent = run_case(case, 1, 0, torch.float32, espace=False)
    ours = run_case(case, 1, 0, torch.float32, espace=True)
    assert not torch.equal(parent["y"], ours["y"])  # the projection does change things
    layer = _build(case, 1, torch.float32)
    layer.set_projection(orthonormal(64, 16))
    layer.set_projection(None)
    assert layer.projection_rank is None


def _parent_vs_unprojected(kind, tp, rank, sp):
    case = dict(kind=kind, sp=sp, bias=True, skip_bias_add=False, K=64, N=96, L=16)
    torch.manual_seed(0)
    results = []
    for espace in (False, True):
        layer = _build(case, tp, torch.float32, espace)
        w, b, x, gy, _ = _full_tensors(case, torch.float32)
        sl = _local_slices(case, tp, rank)
        with torch.no_grad():
            layer.weight.copy_(w[sl["w"]])
            layer.bias.copy_(b[sl["b"]])
        xl = x[sl["x"]].clone().requires_grad_(True)
        y, _ = layer(xl)
        (y * gy[sl["y"]]).sum().backward()
        results.append((y, xl.grad, layer.weight.grad, layer.bias.grad))
    return all(torch.equal(a, b) for a, b in zip(*results))


def _tp2_unprojected():
    import os

    from megatron_espace import runtime

    runtime.initialize(tensor_model_parallel_size=2)
    rank = int(os.environ["RANK"])
    return {f"{kind}-{sp}": _parent_vs_unprojected(kind, 2, rank, sp)
            for kind in ("column", "row") for sp in (False, True)}


def test_rank_none_is_bit_identical_to_parent(megatron_tp1):
    assert _parent_vs_unprojected("column", 1, 0, False)
    assert _parent_vs_unprojected("row", 1, 0, False)
    for res in run_distributed(_tp2_unprojected, nprocs=2):
        assert all(res.values()), res


def test_main_grad_accumulation(megatron_tp1):
    """gradient_accumulation_fusion: dW lands in weight.main_grad, as megatron's DDP expects."""
    case = dict(kind="column", sp=False, bias=False, skip_bias_add=False, K=64, N=32, L=8)
    w, _, x, gy, p = _full_tensors(case, torch.float64)
    layer = _build(case, 1, torch.float64)
    layer.set_projection(p)
    with torch.no_grad():
        layer.weight.copy_(w)
    layer.gradient_accumulation_fusion = True
    layer.weight.main_grad = torch.ones_like(layer.weight)
    layer.weight.grad_added_to_main_grad = False
    y, _ = layer(x)
    (y * gy).sum().backward()
    dw_ref = gy.reshape(-1, 32).t() @ (x @ p @ p.t()).reshape(-1, 64)
    torch.testing.assert_close(layer.weight.main_grad, 1 + dw_ref)
    assert layer.weight.grad_added_to_main_grad
    assert layer.weight.grad.abs().max() == 0


def test_projection_stays_float32_under_bf16_cast(megatron_tp1):
    case = dict(kind="row", sp=False, bias=True, skip_bias_add=False, K=64, N=32, L=8)
    layer = _build(case, 1, torch.float32)
    p = orthonormal(64, 8, dtype=torch.float32)
    layer.set_projection(p)
    layer.bfloat16()
    assert layer.weight.dtype == torch.bfloat16
    assert layer.espace_proj.dtype == torch.float32
    assert torch.equal(layer.espace_proj, p)
    y, _ = layer(torch.randn(4, 2, 64, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


# --- bad input --------------------------------------------------------------------------


def test_wrong_shape_names_layer(megatron_tp1):
    layer = _build(dict(kind="column", sp=False, bias=True, skip_bias_add=False, K=64, N=32,
                        L=8), 1, torch.float32)
    layer.espace_name = "decoder.layers.0.mlp.linear_fc1"
    with pytest.raises(ValueError, match=r"decoder.layers.0.mlp.linear_fc1.*\[64, L\]"):
        layer.set_projection(orthonormal(32, 8))
    with pytest.raises(ValueError, match="exceeds K"):
        layer.set_projection(torch.randn(64, 65))


def test_non_orthonormal_reports_deviation(megatron_tp1):
    layer = _build(dict(kind="row", sp=False, bias=True, skip_bias_add=False, K=64, N=32,
                        L=8), 1, torch.float32)
    bad = orthonormal(64, 8) * 1.01
    with pytest.raises(ValueError, match=r"not orthonormal: max \|PᵀP - I\| = 2\.010e-02"):
        layer.set_projection(bad)
    assert layer.projection_rank is None  # nothing was installed


def _tp2_disagreeing_projection():
    import os

    from megatron_espace import runtime

    runtime.initialize(tensor_model_parallel_size=2)
    rank = int(os.environ["RANK"])
    layer = _build(dict(kind="column", sp=False, bias=True, skip_bias_add=False, K=64, N=32,
                        L=8), 2, torch.float32)
    try:
        layer.set_projection(orthonormal(64, 8, seed=rank))
    except ValueError as e:
        return {"error": str(e)}
    return {"error": ""}


def test_projection_differing_across_tp_ranks_is_refused(megatron_tp1):
    for res in run_distributed(_tp2_disagreeing_projection, nprocs=2):
        assert "differs across tensor-parallel ranks" in res["error"]


def test_projection_follows_double_but_not_half(megatron_tp1):
    case = dict(kind="column", sp=False, bias=True, skip_bias_add=False, K=64, N=32, L=8)
    layer = _build(case, 1, torch.float32)
    layer.set_projection(orthonormal(64, 8))
    assert layer.double().espace_proj.dtype == torch.float64
    assert layer.half().espace_proj.dtype == torch.float32
