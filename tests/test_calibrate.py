"""Calibration: the six statistics against the paper's formulas in float64 numpy, Theorem 1,
and exactness under DP, TP and PP (DESIGN sections 1-2)."""

import numpy as np
import pytest
import torch

import megatron_espace as espace
from megatron_espace.calibration import CalibrationStatistics, calibrate
from megatron_espace.config import METHODS
from tests.common import orthonormal, transformer_config

K, N, S, B, BATCHES, L = 16, 24, 6, 3, 4, 4
ALL = {"calibration": {"methods": list(METHODS)},
       "layers": [{"match": "block.*", "rank": L, "method": "mse"}]}


class OneLayer(torch.nn.Module):
    """A megatron linear under the module name ``block.linear_fc1`` (or ``linear_fc2``)."""

    def __init__(self, kind):
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        super().__init__()
        cfg = transformer_config(dtype=torch.float64)
        self.block = torch.nn.Module()
        if kind == "column":
            self.block.linear_fc1 = ColumnParallelLinear(
                K, N, config=cfg, init_method=torch.nn.init.normal_, bias=False)
        else:
            self.block.linear_fc2 = RowParallelLinear(
                K, N, config=cfg, init_method=torch.nn.init.normal_, bias=False,
                input_is_parallel=True, skip_bias_add=False)
        self.layer = next(iter(self.block.children()))

    def forward(self, x):
        return self.layer(x)[0]


def _data(seed=0):
    """Correlated tokens with varying norms, and the output gradients to backpropagate."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=g, dtype=torch.float64) * torch.logspace(
        0, -2, K, dtype=torch.float64)
    xs, rs = [], []
    for _ in range(BATCHES):
        scale = torch.rand(S, B, 1, generator=g, dtype=torch.float64) * 3 + 0.1
        xs.append(torch.randn(S, B, K, generator=g, dtype=torch.float64) @ mix * scale)
        rs.append(torch.randn(S, B, N, generator=g, dtype=torch.float64))
    return xs, rs


def _run(kind, cfg=ALL):
    torch.manual_seed(0)
    model = OneLayer(kind)
    xs, rs = _data()

    def forward_loop(m):
        for x, r in zip(xs, rs):
            (m(x.clone().requires_grad_(True)) * r).sum().backward()

    stats = calibrate(model, forward_loop, espace.ESPACEConfig.from_dict(cfg))
    return model, stats, xs, rs


def _reference(w, xs, rs):
    """The paper's matrices, in numpy float64, from the raw batches."""
    w = w.detach().numpy()
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    tokens = np.concatenate([x.numpy().reshape(-1, K) for x in xs])
    cx = tokens.T @ tokens / len(tokens)
    cxn = unit(tokens).T @ unit(tokens) / len(tokens)
    cw = w.T @ w / N
    cwn = unit(w).T @ unit(w) / N
    nl = np.zeros((K, K))
    nln = np.zeros((K, K))
    count = 0
    for x, r in zip(xs, rs):
        grads = r.numpy() @ w  # dLoss/dx for loss = sum(r * x Wᵀ)
        for j in range(B):
            X, G = x.numpy()[:, j, :].T, grads[:, j, :].T  # K×M, paper layout
            nl += (X @ X.T @ G @ G.T + G @ G.T @ X @ X.T) / S**2
            Xn, Gn = unit(X.T).T, unit(G.T).T
            nln += (Xn @ Xn.T @ Gn @ Gn.T + Gn @ Gn.T @ Xn @ Xn.T) / S**2
            count += 1
    return {"mse": cx, "nmse": cxn, "go_mse": cx @ cw + cw @ cx,
            "go_mse_l2": cxn @ cwn + cwn @ cxn, "nl_mse": nl / count, "nl_mse_l2": nln / count}


@pytest.mark.parametrize("kind", ["column", "row"])
def test_six_statistics_match_the_paper_formulas(megatron_tp1, kind):
    model, stats, xs, rs = _run(kind)
    name = "block.linear_fc1" if kind == "column" else "block.linear_fc2"
    ref = _reference(model.layer.weight, xs, rs)
    projs = stats.projections()
    assert stats.layers[name].tokens == S * B * BATCHES
    for method in METHODS:
        c, by_magnitude = stats.matrix(name, method)
        np.testing.assert_allclose(c.numpy(), ref[method], rtol=1e-10, atol=1e-12 * abs(
            ref[method]).max(), err_msg=method)
        vals, vecs = np.linalg.eigh(ref[method])
        order = np.argsort(-(np.abs(vals) if by_magnitude else vals), kind="stable")
        top = vecs[:, order[:L]]
        p = projs.projection(name, method, L).numpy()
        np.testing.assert_allclose(p @ p.T, top @ top.T, atol=1e-8, err_msg=method)
        np.testing.assert_allclose(projs.eigen(name, method)[1].numpy(), vals[order],
                                   rtol=1e-9, atol=1e-12 * abs(vals).max())


def _reconstruction_error(p, xs):
    tokens = torch.cat([x.reshape(-1, K) for x in xs])
    return ((tokens - tokens @ p @ p.t()) ** 2).sum(1).mean().item()


def test_mse_theorem1_and_against_baselines(megatron_tp1):
    model, stats, xs, _ = _run("column")
    projs = stats.projections()
    name = "block.linear_fc1"
    for rank in (2, 4, 8):
        p = projs.projection(name, "mse", rank)
        err = _reconstruction_error(p, xs)
        discarded = projs.eigen(name, "mse")[1][rank:].sum().item()
        assert err == pytest.approx(discarded, rel=1e-6)  # Theorem 1
        assert err <= _reconstruction_error(orthonormal(K, rank, seed=rank), xs)
        v = torch.linalg.svd(model.layer.weight.detach())[2].t()[:, :rank]  # weight-SVD
        assert err <= _reconstruction_error(v, xs)


def test_hooks_are_removed_even_on_error(megatron_tp1):
    model = OneLayer("column")

    def failing_loop(m):
        m(torch.randn(S, B, K, dtype=torch.float64))
        raise KeyError("data ran out")

    with pytest.raises(KeyError, match="data ran out"):
        calibrate(model, failing_loop, espace.ESPACEConfig.from_dict(ALL))
    assert not model.layer._forward_pre_hooks


def test_non_finite_batches_are_skipped_and_counted(megatron_tp1):
    model = OneLayer("column")
    xs, _ = _data()
    xs[1] = xs[1].clone()
    xs[1][0, 0, 0] = float("nan")
    cfg = {"calibration": {"methods": ["mse"], "max_skipped_fraction": 0.5},
           "layers": [{"match": "block.*", "rank": L, "method": "mse"}]}

    def loop(m):
        with torch.no_grad():
            for x in xs:
                m(x)

    stats = calibrate(model, loop, espace.ESPACEConfig.from_dict(cfg))
    s = stats.layers["block.linear_fc1"]
    assert (s.skipped, s.updates, s.tokens) == (1, BATCHES, S * B * (BATCHES - 1))
    assert torch.isfinite(stats.projections().eigen("block.linear_fc1", "mse")[0]).all()
    cfg["calibration"]["max_skipped_fraction"] = 0.1
    with pytest.raises(RuntimeError, match=r"block.linear_fc1.*1 of 4 batches had NaN/Inf"):
        calibrate(model, loop, espace.ESPACEConfig.from_dict(cfg))


def test_interrupted_and_resumed_equals_uninterrupted(megatron_tp1, tmp_path):
    model, whole, xs, rs = _run("row")
    cfg = espace.ESPACEConfig.from_dict(ALL)

    def part(batches):
        def loop(m):
            for i in batches:
                (m(xs[i].clone().requires_grad_(True)) * rs[i]).sum().backward()
        return loop

    first = calibrate(model, part([0, 1]), cfg)
    first.save(tmp_path / "stats")  # ... the job dies here; a new one resumes:
    resumed = calibrate(model, part([2, 3]), cfg,
                        statistics=CalibrationStatistics.load(tmp_path / "stats"))
    for method in METHODS:
        torch.testing.assert_close(resumed.matrix("block.linear_fc2", method)[0],
                                   whole.matrix("block.linear_fc2", method)[0],
                                   rtol=1e-12, atol=1e-15)
    assert resumed.layers["block.linear_fc2"].tokens == whole.layers["block.linear_fc2"].tokens


def test_calibrates_an_espace_model_too(megatron_tp1):
    """Hooks see ESPACE layers like the baseline's: the first GEMM's input is unchanged by
    ESPACE, a later one's is not."""
    from tests.common import gpt_model, random_projections, token_batch

    cfg = espace.ESPACEConfig.from_dict(
        {"calibration": {"methods": ["mse"]},
         "layers": [{"match": "decoder.layers.*", "rank": 16, "method": "mse"}]})
    results = []
    for with_espace in (False, True):
        torch.manual_seed(0)
        model = gpt_model(transformer_config())
        if with_espace:
            espace.apply_espace(model, cfg, random_projections(model))

        def loop(m):
            with torch.no_grad():
                t, p, _ = token_batch()
                m(t, p, None)

        results.append(calibrate(model, loop, cfg))
    first, later = "decoder.layers.0.self_attention.linear_qkv", "decoder.layers.1.mlp.linear_fc1"
    torch.testing.assert_close(results[0].matrix(first, "mse")[0],
                               results[1].matrix(first, "mse")[0])
    assert not torch.allclose(results[0].matrix(later, "mse")[0],
                              results[1].matrix(later, "mse")[0])


def test_weight_svd_is_the_truncated_svd_of_w(megatron_tp1):
    """At rank L, W P Pᵀ is W's best rank-L approximation; at full rank, W itself; and the
    layer's parameter count is ESPACE's L(K+N)."""
    from megatron_espace.projection import layer_compression

    cfg = {"calibration": {"methods": ["weight_svd", "mse"]},
           "layers": [{"match": "block.*", "rank": L, "method": "weight_svd"}]}
    model, stats, xs, _ = _run("column", cfg)
    projs = stats.projections()
    w = model.layer.weight.detach()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    for rank in (L, K):
        p = projs.projection("block.linear_fc1", "weight_svd", rank)
        best = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
        torch.testing.assert_close(w @ p @ p.t(), best, rtol=1e-9, atol=1e-9)
    p = projs.projection("block.linear_fc1", "weight_svd", K)
    torch.testing.assert_close(w @ p @ p.t(), w, rtol=1e-9, atol=1e-9)
    # as an ESPACE layer it holds what the SVD factors hold: L(K+N) = U_L S_L (N×L) + V_L (K×L)
    espace.apply_espace(model, espace.ESPACEConfig.from_dict(cfg), projs)
    assert espace.count_parameters(model)["gemm"] == L * (K + N)
    assert layer_compression(K, N, L) == pytest.approx(1 - L * (K + N) / (K * N))
