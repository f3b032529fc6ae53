"""ESPACE linears against a float64 dense reference ``Ŷ = Wᵀ P Pᵀ X`` (DESIGN sections 1-2)."""

import itertools

import pytest
import torch

from tests.common import orthonormal, transformer_config
from tests.harness import run_distributed

SHAPES = [(64, 96, 16), (96, 64, 32), (64, 64, 64)]  # (K, N, L)
S, B = 8, 3  # sequence, micro-batch: M = 24 tokens


def _cases():
    for kind, sp, bias, skip, (k, n, l) in itertools.product(
        ["column", "row"], [False, True], [True, False], [False, True], SHAPES
    ):
        if skip and not bias:
            continue
        yield dict(kind=kind, sp=sp, bias=bias, skip_bias_add=skip, K=k, N=n, L=l)
    # the fallbacks: gathered output (column), replicated input (row)
    for k, n, l in SHAPES[:1]:
        yield dict(kind="column", sp=False, bias=True, skip_bias_add=False, K=k, N=n, L=l,
                   gather_output=True)
        yield dict(kind="row", sp=False, bias=True, skip_bias_add=False, K=k, N=n, L=l,
                   input_is_parallel=False)


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
    w = torch.randn(n, k, generator=g, dtype=torch.float64) / k**0.5
    b = torch.randn(n, generator=g, dtype=torch.float64)
    x = torch.randn(S, B, k, generator=g, dtype=torch.float64)
    gy = torch.randn(S, B, n, generator=g, dtype=torch.float64)
    p = orthonormal(k, case["L"], seed=case["L"])
    return [t.to(dtype) for t in (w, b, x, gy, p)]


def _local_slices(case, tp, rank):
    """Which parts of the full W, x, output and dx this rank holds."""
    full = slice(None)
    k, n = case["K"], case["N"]
    seq = slice(rank * S // tp, (rank + 1) * S // tp) if case["sp"] and tp > 1 else full
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
    out, out_bias = layer(x_local)
    if out_bias is not None:
        assert case["skip_bias_add"] and out_bias is layer.bias
        out = out + out_bias
    gy_local = gy[sl["y"]]
    (out * gy_local).sum().backward()

    # float64 dense reference, from the full tensors: Ŷ = x P Pᵀ Wᵀ + b
    w64, b64, x64, gy64, p64 = (t.double() for t in (w, b, x, gy, p))
    pp = p64 @ p64.t() if espace else torch.eye(case["K"], dtype=torch.float64)
    y_ref = x64 @ pp @ w64.t() + (b64 if case["bias"] else 0)
    dx_ref = gy64 @ w64 @ pp
    dw_ref = gy64.reshape(-1, case["N"]).t() @ (x64 @ pp).reshape(-1, case["K"])
    db_ref = gy64[sl["y"]].reshape(-1, gy64.shape[-1]).sum(0)
    if case["kind"] == "column":
        db_ref = gy64.reshape(-1, case["N"]).sum(0)[sl["b"]]
    result = {
        "y": out.detach(), "dx": x_local.grad, "dw": layer.weight.grad,
        "err_y": (out.double() - y_ref[sl["y"]]).abs().max().item(),
        "err_dx": (x_local.grad.double() - dx_ref[sl["x"]]).abs().max().item(),
        "err_dw": (layer.weight.grad.double() - dw_ref[sl["w"]]).abs().max().item(),
    }
    if case["bias"]:
        result["err_db"] = (layer.bias.grad.double() - db_ref).abs().max().item()
    return result


def _tp2_all_cases(dtype_name="float64"):
    import os

    from megatron_espace import runtime

    runtime.initialize(tensor_model_parallel_size=2)
    rank = int(os.environ["RANK"])
    dtype = getattr(torch, dtype_name)
    out = {}
    for i, case in enumerate(_cases()):
        r = run_case(case, 2, rank, dtype)
        for key, value in r.items():
            out[f"{i}:{key}"] = value
    return out


def _check_errors(case, result, tol):
    for key in ("err_y", "err_dx", "err_dw", "err_db"):
        if key in result:
            assert result[key] < tol, f"{key}={result[key]:.2e} for {_name(case)}"


@pytest.mark.parametrize("case", list(_cases()), ids=_name)
def test_tp1_matches_float64_dense_reference(megatron_tp1, case):
    _check_errors(case, run_case(case, tp=1, rank=0), 1e-11)


def test_tp2_matches_float64_dense_reference(megatron_tp1):
    cases = list(_cases())
    per_rank = run_distributed(_tp2_all_cases, nprocs=2)
    for rank, res in enumerate(per_rank):
        for i, case in enumerate(cases):
            _check_errors(case, {k.split(":", 1)[1]: v for k, v in res.items()
                                 if k.startswith(f"{i}:")}, 1e-11)


def test_tp2_outputs_equal_tp1_outputs_float32(megatron_tp1):
    """Same full W and P in float32: the gathered TP=2 outputs and grads equal TP=1's."""
    cases = list(_cases())
    per_rank = run_distributed(_tp2_all_cases, nprocs=2, dtype_name="float32")
    for i, case in enumerate(cases):
        ref = run_case(case, tp=1, rank=0, dtype=torch.float32)
        for name in ("y", "dx", "dw"):
            parts = [res[f"{i}:{name}"] for res in per_rank]
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
