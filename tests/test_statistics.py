"""Streaming statistics against their explicit formulas in float64."""

import torch

from megatron_espace.projection import layer_compression, rank_for_compression, sorted_eigh
from megatron_espace.statistics import SecondMoment


def test_second_moment_streams_to_the_batch_formula():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(16, 16, generator=g)
    batches = [torch.randn(5, 3, 16, generator=g) @ mix for _ in range(4)]
    acc, nacc = SecondMoment(16), SecondMoment(16, normalize=True)
    for b in batches:
        acc.update(b.float())
        nacc.update(b.float())
    x = torch.cat([b.reshape(-1, 16) for b in batches]).double()
    torch.testing.assert_close(acc.mean(), x.t() @ x / 60, rtol=1e-6, atol=1e-6)
    u = x / x.norm(dim=1, keepdim=True)
    torch.testing.assert_close(nacc.mean(), u.t() @ u / 60, rtol=1e-6, atol=1e-6)
    assert acc.count == nacc.count == 60


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


def test_rank_for_compression_is_the_largest_power_of_two_meeting_the_target():
    # K = N = 1024 at 50%: L(K+N) <= KN/2 -> L <= 256
    assert rank_for_compression(1024, 1024, 0.5) == 256
    assert layer_compression(1024, 1024, 256) == 0.5
    # K=4096, N=16384 (fc2-like, transposed): limit 0.5*K*N/(K+N) = 1638.4 -> 1024
    assert rank_for_compression(4096, 16384, 0.5) == 1024
    for k, n, c in [(64, 128, 0.5), (100, 300, 0.3), (4096, 4096, 0.75)]:
        r = rank_for_compression(k, n, c)
        assert layer_compression(k, n, r) >= c > layer_compression(k, n, 2 * r)


def test_blocked_gram_equals_the_product():
    from megatron_espace.statistics import gram

    for k in (100, 1024, 1030):
        x = torch.randn(64, k, dtype=torch.float64)
        torch.testing.assert_close(gram(x), x.t() @ x, rtol=1e-12, atol=1e-12)
