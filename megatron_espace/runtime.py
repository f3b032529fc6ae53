"""Process setup for megatron-core: torch.distributed, parallel state, RNG.

``initialize`` works under torchrun (RANK/WORLD_SIZE/MASTER_ADDR set) and in a
plain single process (world size 1). Without CUDA it uses gloo and installs the
CPU shims of :mod:`megatron_espace.cpu_shims`; with CUDA it uses nccl and
megatron's own CUDA RNG tracker. Under torchrun a rank dies with its launcher, and so do
the helper processes megatron's checkpointing starts (:func:`die_with_parent`).

``run_main`` runs every tool's ``main``: a user error (a ``SystemExit`` with a message, a
bad config, a missing file, a bad value) prints one line, from rank 0 only when every rank
has it, and exits 1; ``--debug`` (or ``ESPACE_DEBUG=1``) keeps the tracebacks.
"""

import os
import socket
import sys

import torch

PR_SET_PDEATHSIG = 1


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
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun: end with it
        end_with_launcher()
    if not has_cuda:
        from megatron_espace import cpu_shims

        cpu_shims.install()

    if not torch.distributed.is_initialized():
        # a plain single process picks its own port; another process may take it between the
        # pick and the store's bind, so a port taken by then is picked again (a few times)
        tries = 1
        if "RANK" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            if "MASTER_PORT" not in os.environ:
                os.environ["MASTER_PORT"], tries = str(_free_port()), 5
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        if has_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        for attempt in range(tries):
            try:
                torch.distributed.init_process_group(
                    backend="nccl" if has_cuda else "gloo",
                    timeout=timedelta(minutes=timeout_minutes),
                )
                break
            except torch.distributed.DistNetworkError:
                if attempt == tries - 1:
                    raise
                os.environ["MASTER_PORT"] = str(_free_port())

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


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent (torchrun) dies (Linux
    ``prctl(PR_SET_PDEATHSIG)``), so a ``kill -9`` of the launcher leaves no rank training."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


_forks_die_too = False


def end_with_launcher() -> None:
    """:func:`die_with_parent` for this rank and for every process it forks later: megatron's
    checkpoint writers fork per save and would outlive a killed rank (holding its files and
    its multiprocessing resource tracker). PDEATHSIG follows the forking *thread*: a child
    forked from a thread that exits before it would die then (megatron forks from the main
    thread, or from processes it forked)."""
    global _forks_die_too
    die_with_parent()
    if not _forks_die_too:
        os.register_at_fork(after_in_child=die_with_parent)
        _forks_die_too = True


def agree(fn):
    """Run ``fn`` on rank 0; if it raises ``SystemExit`` there, raise it on every rank (a
    user error all ranks share, which ``run_main`` prints once)."""
    import torch.distributed as dist

    message = None
    if dist.get_rank() == 0:
        try:
            fn()
        except SystemExit as e:
            message = str(e.code)
    if dist.get_world_size() > 1:
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if message is not None:
        error = SystemExit(message)
        error.all_ranks = True
        raise error


#: bad input, as the project reports it (ConfigError is a ValueError); --debug shows tracebacks
USER_ERRORS = (ValueError, KeyError, OSError)


def _debug(argv) -> bool:
    if "--debug" in argv[1:]:
        argv.remove("--debug")
        return True
    return os.environ.get("ESPACE_DEBUG", "") not in ("", "0")


def _quiet_argparse() -> None:
    """argparse errors become one-line ``SystemExit``s (no usage text from every rank)."""
    import argparse

    def error(self, message):
        raise SystemExit(f"{self.prog}: error: {message}")

    argparse.ArgumentParser.error = error


def _user_error_message(e: BaseException):
    """The one-line message of a user error, or None for a bug (which keeps its traceback)."""
    if isinstance(e, SystemExit):
        return None if e.code is None or isinstance(e.code, int) else str(e.code)
    if isinstance(e, USER_ERRORS):
        return f"{type(e).__name__}: {str(e).strip()}"
    return None


def run_main(main, *args, **kwargs) -> int:
    """Run a command's ``main``; on an error print it (see the module docstring) and exit.

    ``os._exit`` skips interpreter shutdown (which could wait on a collective), so peers
    blocked on this rank see their connections close and fail too, instead of hanging until
    the process-group timeout; torchrun then tears the job down.
    """
    import traceback

    if "TORCHELASTIC_RUN_ID" in os.environ:  # as early as possible: imports can take minutes
        end_with_launcher()
    debug = _debug(sys.argv)
    rank = int(os.environ.get("RANK", "0"))
    many = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if many and not debug:
        _quiet_argparse()
    try:
        return main(*args, **kwargs)
    except BaseException as e:
        message = _user_error_message(e)
        if isinstance(e, SystemExit) and message is None:
            raise  # sys.exit(code): not an error report
        try:  # whatever happens while reporting (a closed pipe), the process ends
            if message is None or debug:
                sys.stderr.write(f"[rank {rank}] {traceback.format_exc()}")
            elif rank == 0 or not many:
                sys.stderr.write(f"error: {message}\n")
            elif not getattr(e, "all_ranks", False):
                import time

                time.sleep(3)  # rank 0 failing too gets us killed by torchrun: one line in all
                sys.stderr.write(f"[rank {rank}] error: {message}\n")
        finally:
            _exit_now(1)


def _exit_now(code: int) -> None:
    """Flush, end this process's helpers (e.g. dist_checkpointing's Manager), release the
    ``--save`` lock and ``os._exit``."""
    import contextlib
    import multiprocessing

    from megatron_espace import save_dir

    try:
        for stream in (sys.stderr, sys.stdout):
            with contextlib.suppress(Exception):  # e.g. BrokenPipeError: the reader is gone
                stream.flush()
        save_dir.release_all()
        for child in multiprocessing.active_children():
            child.kill()
    finally:
        os._exit(code)
