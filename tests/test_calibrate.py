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


def _loop(xs, rs, batches=None):
    def forward_loop(m):
        for i in range(len(xs)) if batches is None else batches:
            (m(xs[i].clone().requires_grad_(True)) * rs[i]).sum().backward()
    return forward_loop


def _run(kind, cfg=ALL, **kw):
    torch.manual_seed(0)
    model = OneLayer(kind)
    xs, rs = _data()
    stats = calibrate(model, _loop(xs, rs), espace.ESPACEConfig.from_dict(cfg), **kw)
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
    assert stats.tokens(name) == S * B * BATCHES
    for method in METHODS:
        c, by_magnitude = stats.matrix(name, method)
        np.testing.assert_allclose(c.numpy(), ref[method], rtol=1e-10, atol=1e-12 * abs(
            ref[method]).max(), err_msg=method)
        vals, vecs = np.linalg.eigh(ref[method])
        order = np.argsort(-(np.abs(vals) if by_magnitude else vals), kind="stable")
        top = vecs[:, order[:L]]
        p = projs.projection(name, method, L).numpy()
        np.testing.assert_allclose(p @ p.T, top @ top.T, atol=1e-6, err_msg=method)  # float32
        np.testing.assert_allclose(projs.eigen(name, method)[1].numpy(), vals[order],
                                   rtol=1e-9, atol=1e-12 * abs(vals).max())


def _reconstruction_error(p, xs):
    tokens = torch.cat([x.reshape(-1, K) for x in xs])
    p = p.to(tokens.dtype)
    return ((tokens - tokens @ p @ p.t()) ** 2).sum(1).mean().item()


def test_mse_theorem1_and_against_baselines(megatron_tp1):
    model, stats, xs, _ = _run("column", max_rank=K)
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
    s = stats.moment("block.linear_fc1", "x")
    assert (s.skipped, s.batches, s.count) == (1, BATCHES, S * B * (BATCHES - 1))
    assert torch.isfinite(stats.projections().eigen("block.linear_fc1", "mse")[0]).all()
    cfg["calibration"]["max_skipped_fraction"] = 0.1
    with pytest.raises(RuntimeError, match=r"block.linear_fc1.*1 of 4 batches had NaN/Inf"):
        calibrate(model, loop, espace.ESPACEConfig.from_dict(cfg))


def test_passes_flushes_and_resume_equal_one_pass(megatron_tp1, tmp_path):
    """Moment passes, layer passes, flushing every micro-batch and a resume between chunks
    (a fresh process reloading the shard) all give the one-pass sums; the plan's bytes are
    the live tensors' bytes; a resume keyed on another run is refused."""
    from megatron_espace.calibration import StaleStatistics

    model, whole, xs, rs = _run("row")
    cfg = espace.ESPACEConfig.from_dict(ALL)
    name = "block.linear_fc2"
    # a budget of one K×K float64 buffer: x, xn, nl, nln in four passes
    stats = calibrate(model, _loop(xs, rs), cfg, max_device_gib=8 * K * K / 2**30,
                      flush_interval=1)
    assert [p.items[0] for p in stats.plan.passes] == [((name, m),) for m in
                                                       ("x", "xn", "nl", "nln")]
    assert stats.peak_device_bytes == 8 * K * K
    for method in METHODS:
        torch.testing.assert_close(stats.matrix(name, method)[0], whole.matrix(name, method)[0],
                                   rtol=1e-12, atol=1e-15)
    assert whole.peak_device_bytes == whole.plan.device_bytes_per_gpu == 4 * 8 * K * K
    assert sum(s.host.nbytes for s in whole.sums.values()) == whole.plan.host_bytes_per_rank \
        == 4 * 8 * K * (K + 1) // 2

    key = {"checkpoint": "a", "calib_samples": 2}
    first = espace.calibration.CalibrationStatistics.build(model, cfg)
    first.accumulate(_loop(xs, rs, [0, 1]), 0)
    first.done = [2]
    first.save(tmp_path / "stats", key)  # ... the job dies here; a new one resumes:
    resumed = espace.calibration.CalibrationStatistics.build(model, cfg)
    with pytest.raises(StaleStatistics, match=r"checkpoint: saved 'a', now 'b'"):
        resumed.load(tmp_path / "stats", {"checkpoint": "b", "calib_samples": 4})
    with pytest.raises(StaleStatistics, match=r"calib_samples: saved 2, now 1"):
        resumed.load(tmp_path / "stats", {"checkpoint": "a", "calib_samples": 1})
    resumed.load(tmp_path / "stats", {"checkpoint": "a", "calib_samples": 4})
    assert resumed.done == [2]
    resumed.accumulate(_loop(xs, rs, [2, 3]), 0)
    for method in METHODS:
        torch.testing.assert_close(resumed.matrix(name, method)[0], whole.matrix(name, method)[0],
                                   rtol=1e-12, atol=1e-15)
    assert resumed.tokens(name) == whole.tokens(name)


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
    model, stats, xs, _ = _run("column", cfg, max_rank=K)
    projs = stats.projections()
    w = model.layer.weight.detach()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    for rank in (L, K):
        p = projs.projection("block.linear_fc1", "weight_svd", rank).double()
        best = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
        torch.testing.assert_close(w @ p @ p.t(), best, rtol=1e-6, atol=1e-6)
    p = projs.projection("block.linear_fc1", "weight_svd", K).double()
    torch.testing.assert_close(w @ p @ p.t(), w, rtol=1e-6, atol=1e-6)
    # as an ESPACE layer it holds what the SVD factors hold: L(K+N) = U_L S_L (N×L) + V_L (K×L)
    espace.apply_espace(model, espace.ESPACEConfig.from_dict(cfg), projs)
    assert espace.count_parameters(model)["gemm"] == L * (K + N)
    assert layer_compression(K, N, L) == pytest.approx(1 - L * (K + N) / (K * N))
