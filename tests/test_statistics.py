"""Streaming statistics against their explicit formulas in float64."""

import pytest
import torch

from megatron_espace.projection import layer_compression, rank_for_compression, sorted_eigh
from megatron_espace.statistics import MomentSum, unpack_upper


def test_moment_sum_streams_to_the_batch_formula():
    """float32 per-batch buffers flushed into float64 upper triangles give the batch
    formula; the blocked (K >= 1024) upper-block Gram too."""
    g = torch.Generator().manual_seed(0)
    for k, flush_every in ((16, 1), (16, 3), (1030, 2)):
        mix = torch.randn(k, k, generator=g) / k**0.5
        batches = [torch.randn(5, 3, k, generator=g) @ mix for _ in range(4)]
        acc, nacc = MomentSum(k), MomentSum(k)
        acc.open(torch.float32, "cpu")
        nacc.open(torch.float32, "cpu")
        for i, b in enumerate(batches):
            assert acc.add_tokens(b) and nacc.add_tokens(b, normalize=True)
            if (i + 1) % flush_every == 0:
                acc.flush()
        acc.close()
        nacc.close()
        assert acc.buffer is None and acc.host.shape == (k * (k + 1) // 2,)
        x = torch.cat([b.reshape(-1, k) for b in batches]).double()
        torch.testing.assert_close(acc.mean(), x.t() @ x / 60, rtol=1e-5, atol=1e-5)
        u = x / x.norm(dim=1, keepdim=True)
        torch.testing.assert_close(nacc.mean(), u.t() @ u / 60, rtol=1e-5, atol=1e-5)
        assert acc.count == nacc.count == 60 and acc.batches == 4


def test_upper_triangle_round_trip():
    a = torch.randn(7, 7, dtype=torch.float64)
    a = a + a.t()
    rows, cols = torch.triu_indices(7, 7)
    torch.testing.assert_close(unpack_upper(a[rows, cols], 7), a, rtol=0, atol=0)


def test_sorted_eigh_orders_and_fixes_signs():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(12, 12, generator=g, dtype=torch.float64)
    c = a + a.t()  # indefinite
    vecs, vals = sorted_eigh(c, by_magnitude=True)
    assert torch.all(vals.abs()[:-1] >= vals.abs()[1:])
    torch.testing.assert_close(vecs @ torch.diag(vals) @ vecs.t(), c)
    assert torch.all(vecs[vecs.abs().argmax(0), torch.arange(12)] > 0)
    vecs2, _ = sorted_eigh(c.clone(), by_magnitude=True)
    assert torch.equal(vecs, vecs2)
    _, psd_vals = sorted_eigh(a @ a.t())
    assert torch.all(psd_vals[:-1] >= psd_vals[1:])


def test_rank_for_compression_reaches_the_target_as_closely_as_the_granularity_allows():
    # K = N = 1024 at 50%: L(K+N) <= KN/2 -> L <= 256, exactly 50% either way
    assert rank_for_compression(1024, 1024, 0.5) == 256
    assert rank_for_compression(1024, 1024, 0.5, "pow2") == 256
    assert layer_compression(1024, 1024, 256) == 0.5
    # K=4096, N=16384 (fc2-like, transposed): limit 0.5*K*N/(K+N) = 1638.4
    assert rank_for_compression(4096, 16384, 0.5) == 1600  # 50.2%
    assert rank_for_compression(4096, 16384, 0.5, "pow2") == 1024  # 68.7%
    # SmolLM2-135M's attention output (K=N=576) at 25%: limit 216
    assert rank_for_compression(576, 576, 0.25) == 192  # 33.3% (a power of two: 128, 55.6%)
    assert rank_for_compression(576, 576, 0.25, 8) == 216  # exactly 25%
    assert rank_for_compression(576, 576, 0.25, "pow2") == 128
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        k, n = (int(x) for x in torch.randint(64, 8192, (2,), generator=g))
        c = float(torch.rand((), generator=g)) * 0.9 + 0.05
        for multiple in (1, 8, 64, 128):
            try:
                r = rank_for_compression(k, n, c, multiple)
            except ValueError as e:  # only when no multiple of it reaches the target
                assert layer_compression(k, n, multiple) < c, (k, n, c, multiple)
                assert f"below rank_multiple {multiple}" in str(e)
                continue
            assert r % multiple == 0  # reached, and one step more would miss it
            assert layer_compression(k, n, r) >= c > layer_compression(k, n, r + multiple)
        r = rank_for_compression(k, n, c, "pow2")
        assert r & (r - 1) == 0
        assert layer_compression(k, n, r) >= c > layer_compression(k, n, 2 * r)
    with pytest.raises(ValueError, match=r"compression 0.5 needs L <= 21 for K=64, N=128, "
                                         r"below rank_multiple 64: set a smaller"):
        rank_for_compression(64, 128, 0.5)

