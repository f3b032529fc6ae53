"""The CPU stand-ins for megatron's CUDA calls (megatron_espace.cpu_shims)."""

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU shims are CPU-only")


def test_cuda_devices_map_to_cpu(megatron_tp1):
    assert torch.empty(3, device="cuda").device.type == "cpu"
    assert torch.zeros(2, device=torch.cuda.current_device()).device.type == "cpu"
    t = torch.ones(2).cuda()
    assert t.device.type == "cpu" and t.to("cuda").device.type == "cpu"
    assert torch.ones(2).type() == "torch.cuda.FloatTensor"  # what grad clipping asserts
    torch.cuda.synchronize()
    stream = torch.cuda.current_stream()  # megatron-core 0.19's DDP waits on it
    stream.wait_event(None)
    stream.wait_stream(torch.cuda.default_stream())


def test_rng_tracker_forks_reproducibly(megatron_tp1):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    outer = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), outer)  # the default stream is untouched
    states = tracker.get_states()
    saved = {k: v.clone() for k, v in states.items()}
    with tracker.fork():
        b = torch.rand(4)
    tracker.set_states(saved)
    with tracker.fork():
        c = torch.rand(4)
    assert not torch.equal(a, b) and torch.equal(b, c)


def test_torch_norm_accepts_sequence_parallel(megatron_tp1):
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from tests.common import transformer_config

    cfg = transformer_config(tp=2, sp=True)
    norm = WrappedTorchNorm(cfg, 8)
    assert isinstance(norm, torch.nn.LayerNorm)
    assert all(p.sequence_parallel for p in norm.parameters())
