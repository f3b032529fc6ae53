"""CPU stand-ins for the CUDA calls megatron-core (0.16.1 to 0.19.2) makes unconditionally.

Test and demo infrastructure, not the product: :func:`install` is called by
:func:`megatron_espace.runtime.initialize` only when ``torch.cuda.is_available()``
is false, and it is never imported on a GPU run.

What megatron-core does on CPU without these (DESIGN section 6):

* ``torch.cuda.current_device()`` / ``device="cuda"`` / ``.cuda()`` in tensor
  factories, the GlobalMemoryBuffer, pipeline schedules and the optimizer;
* ``torch.cuda.synchronize()`` and the CUDA RNG state (RNG tracker, activation
  recomputation);
* ``p.type() == 'torch.cuda.FloatTensor'`` checks in grad clipping and the optimizer;
* from 0.19, ``torch.cuda.current_stream()`` in DDP's ``start_grad_sync``.

A :class:`torch.overrides.TorchFunctionMode` rewrites CUDA devices to CPU and
reports CPU tensors under their CUDA type names; the RNG tracker keeps CPU
generator states.
"""

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_installed = None  # the active _CudaToCpuMode, or None


def _is_cuda_device(device) -> bool:
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


def _map_device(device):
    return torch.device("cpu") if _is_cuda_device(device) else device


class _CudaToCpuMode(TorchFunctionMode):
    """Maps every CUDA device argument to CPU; ``Tensor.cuda()`` becomes a no-op."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        if "device" in kwargs:
            kwargs["device"] = _map_device(kwargs["device"])
        if func in (torch.Tensor.to,) and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], torch.device("cpu")) + tuple(args[2:])
        if func is torch.Tensor.pin_memory or func is torch.Tensor.is_pinned:
            return args[0] if func is torch.Tensor.pin_memory else False
        return func(*args, **kwargs)


class CPURNGStatesTracker:
    """megatron's ``CudaRNGStatesTracker`` with CPU generator states.

    Same interface (``add``, ``fork``, ``get_states``, ``set_states``, ``reset``),
    so dropout in tensor-parallel regions is reproducible on CPU.
    """

    def __init__(self, *_, **__):
        self.reset()

    def is_initialized(self):
        return self._is_initialized

    def reset(self):
        self._is_initialized = False
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = states

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def install_rng_tracker(seed: int, tp_rank: int, ep_rank: int = 0, etp_rank: int = 0) -> None:
    """CPU version of ``model_parallel_cuda_manual_seed`` (same seeds and names)."""
    from megatron.core.tensor_parallel import random as mrandom

    tracker = CPURNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    torch.manual_seed(seed)
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)


class _CPUStream:
    """``torch.cuda.current_stream()`` on the CPU: work runs in program order, so waiting
    on a stream or an event has nothing to wait for (megatron-core 0.19's DDP waits on
    the current stream before every gradient reduction)."""

    def wait_event(self, event=None):
        pass

    def wait_stream(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


_STREAM = _CPUStream()

_PATCHED = {
    # "cpu", not 0: factories called inside backward (where no TorchFunctionMode is
    # active) get a usable device straight from the call.
    "current_device": lambda: torch.device("cpu"),
    "synchronize": lambda *a, **k: None,
    "device_count": lambda: 1,
    "set_device": lambda *a, **k: None,
    "manual_seed": lambda *a, **k: None,
    "manual_seed_all": lambda *a, **k: None,
    "empty_cache": lambda *a, **k: None,
    "current_stream": lambda *a, **k: _STREAM,
    "default_stream": lambda *a, **k: _STREAM,
}


def _patch_torch_norm() -> None:
    """Let megatron's ``WrappedTorchNorm`` run under sequence parallelism.

    A per-token norm is exact on a sequence shard; only its parameters need the
    ``sequence_parallel`` mark so ``finalize_model_grads`` all-reduces their
    gradients across the TP group (what apex/TE norms do on GPU).
    """
    import dataclasses

    from megatron.core.transformer import torch_norm

    original = torch_norm.WrappedTorchNorm.__new__

    def __new__(cls, config, hidden_size, *args, **kwargs):
        norm = original(cls, dataclasses.replace(config, sequence_parallel=False), hidden_size,
                        *args, **kwargs)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm

    torch_norm.WrappedTorchNorm._espace_orig_new = original
    torch_norm.WrappedTorchNorm.__new__ = __new__


def _patch_rng_state() -> None:
    """megatron's "CUDA" RNG state (saved and restored around activation recomputation) is
    the CPU generator's state here, the one the CPU tracker forks."""
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._espace_orig_rng = (mrandom._get_cuda_rng_state, mrandom._set_cuda_rng_state)
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # The recomputed forward runs inside autograd's backward, where no TorchFunctionMode
    # is active: re-enter ours there so its "cuda" tensors land on the CPU too.
    for fn in (mrandom.CheckpointFunction, mrandom.CheckpointWithoutOutputFunction):
        fn._espace_orig_backward = fn.backward
        fn.backward = staticmethod(_with_mode(fn.backward))


def _with_mode(backward):
    def wrapped(ctx, *args):
        with _CudaToCpuMode():
            return backward(ctx, *args)

    return wrapped


def install() -> None:
    """Activate the shims for this process (idempotent). Refuses when CUDA is present."""
    global _installed
    if torch.cuda.is_available():
        raise RuntimeError("cpu_shims must not be installed on a machine with CUDA")
    if _installed is not None:
        return
    for name, fn in _PATCHED.items():
        setattr(torch.cuda, f"_espace_orig_{name}", getattr(torch.cuda, name))
        setattr(torch.cuda, name, fn)
    _patch_torch_norm()
    _patch_rng_state()
    _installed = _CudaToCpuMode()
    _installed.__enter__()


def uninstall() -> None:
    """Undo :func:`install`."""
    global _installed
    if _installed is None:
        return
    _installed.__exit__(None, None, None)
    _installed = None
    for name in _PATCHED:
        setattr(torch.cuda, name, getattr(torch.cuda, f"_espace_orig_{name}"))
    from megatron.core.transformer import torch_norm

    torch_norm.WrappedTorchNorm.__new__ = torch_norm.WrappedTorchNorm._espace_orig_new
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state, mrandom._set_cuda_rng_state = mrandom._espace_orig_rng
    for fn in (mrandom.CheckpointFunction, mrandom.CheckpointWithoutOutputFunction):
        fn.backward = staticmethod(fn._espace_orig_backward)


def installed() -> bool:
    return _installed is not None
