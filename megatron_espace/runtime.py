"""Process setup for megatron-core: torch.distributed, parallel state, RNG.

``initialize`` works under torchrun (RANK/WORLD_SIZE/MASTER_ADDR set) and in a
plain single process (world size 1). Without CUDA it uses gloo and installs the
CPU shims of :mod:`megatron_espace.cpu_shims`; with CUDA it uses nccl and
megatron's own CUDA RNG tracker.
"""

import os
import socket

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    seed: int = 1234,
    *,
    virtual_pipeline_model_parallel_size=None,
    context_parallel_size: int = 1,
    timeout_minutes: int = 10,
) -> None:
    """Initialise torch.distributed, megatron parallel state and the RNG tracker.

    World size must be a multiple of TP×PP; the rest is data parallel.
    """
    from datetime import timedelta

    from megatron.core import parallel_state, tensor_parallel

    has_cuda = torch.cuda.is_available()
    if not has_cuda:
        from megatron_espace import cpu_shims

        cpu_shims.install()

    if not torch.distributed.is_initialized():
        if "RANK" not in os.environ:  # plain single process
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        if has_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.distributed.init_process_group(
            backend="nccl" if has_cuda else "gloo",
            timeout=timedelta(minutes=timeout_minutes),
        )

    world = torch.distributed.get_world_size()
    mp = tensor_model_parallel_size * pipeline_model_parallel_size * context_parallel_size
    if world % mp != 0:
        raise ValueError(
            f"world size {world} is not divisible by tensor_model_parallel_size "
            f"({tensor_model_parallel_size}) x pipeline_model_parallel_size "
            f"({pipeline_model_parallel_size}) x context_parallel_size ({context_parallel_size})"
        )
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    torch.manual_seed(seed)
    if has_cuda:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        from megatron_espace import cpu_shims

        cpu_shims.install_rng_tracker(seed, parallel_state.get_tensor_model_parallel_rank())


def destroy() -> None:
    """Tear down what :func:`initialize` set up (parallel state, process group)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def device() -> torch.device:
    """The device this rank computes on."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def run_main(main, *args, **kwargs) -> int:
    """Run a command's ``main``; if it raises, print the error with this rank and exit at once.

    ``os._exit`` skips interpreter shutdown (which could wait on a collective), so peers
    blocked on this rank see their connections close and fail too, instead of hanging until
    the process-group timeout; torchrun then tears the job down.
    """
    import sys
    import traceback

    try:
        return main(*args, **kwargs)
    except SystemExit:
        raise
    except BaseException:
        import multiprocessing

        rank = os.environ.get("RANK", "0")
        sys.stderr.write(f"[rank {rank}] {traceback.format_exc()}")
        sys.stderr.flush()
        sys.stdout.flush()
        for child in multiprocessing.active_children():  # e.g. dist_checkpointing's Manager
            child.kill()
        os._exit(1)
