"""Run a test function on N processes with torchrun semantics (gloo), collect per-rank results.

``run_distributed(fn, nprocs=2, **kwargs)`` starts ``nprocs`` fresh interpreters with
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set, each importing the file
that defines ``fn`` and calling ``fn(**kwargs)``. ``fn`` returns a dict of tensors and
JSON-able values; the parent gets a list of those dicts, one per rank.

A rank that raises fails the test with that rank's traceback; a hang is killed (the
whole process group) after ``timeout`` seconds. Results travel as safetensors + JSON.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent


class RankFailed(AssertionError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distributed(fn, nprocs: int = 2, timeout: float = 240, **kwargs):
    """Run ``fn(**kwargs)`` on ``nprocs`` ranks; return the per-rank result dicts."""
    source = Path(sys.modules[fn.__module__].__file__).resolve()
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="espace-dist-") as tmp:
        procs = []
        for rank in range(nprocs):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(nprocs), LOCAL_RANK=str(rank),
                       LOCAL_WORLD_SIZE=str(nprocs), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                       PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
            log = open(Path(tmp) / f"rank{rank}.log", "w")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "tests.harness", str(source), fn.__name__, tmp,
                 json.dumps(kwargs)],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + timeout
        failed = None
        while True:
            codes = [p.poll() for p in procs]
            failed = next((r for r, c in enumerate(codes) if c not in (None, 0)), None)
            if failed is not None or all(c == 0 for c in codes):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if failed is not None:  # let peers hit their own errors, then blame the first
            grace = time.monotonic() + 2
            while time.monotonic() < grace and any(p.poll() is None for p in procs):
                time.sleep(0.05)
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        if failed is not None:
            errs = sorted(Path(tmp).glob("rank*.err"), key=lambda f: f.stat().st_mtime_ns)
            if errs:
                failed = int(errs[0].stem[4:])
            log = Path(tmp) / f"rank{failed}.err"
            log = log if log.exists() else Path(tmp) / f"rank{failed}.log"
            raise RankFailed(f"rank {failed} of {nprocs} failed first in {fn.__name__}:\n"
                             f"{log.read_text()[-6000:]}")
        if any(p.returncode != 0 for p in procs):
            tail = (Path(tmp) / "rank0.log").read_text()[-3000:]
            raise RankFailed(f"{fn.__name__} on {nprocs} ranks timed out after {timeout:.0f}s; "
                             f"rank 0 output:\n{tail}")
        return [_load(Path(tmp), r) for r in range(nprocs)]


def _save(tmp: Path, rank: int, result) -> None:
    result = result or {}
    tensors = {k: v.detach().contiguous().cpu() for k, v in result.items()
               if isinstance(v, torch.Tensor)}
    save_file(tensors, tmp / f"rank{rank}.safetensors")
    other = {k: v for k, v in result.items() if not isinstance(v, torch.Tensor)}
    (tmp / f"rank{rank}.json").write_text(json.dumps(other))


def _load(tmp: Path, rank: int) -> dict:
    out = json.loads((tmp / f"rank{rank}.json").read_text())
    out.update(load_file(tmp / f"rank{rank}.safetensors"))
    return out


def _child(source: str, name: str, tmp: str, kwargs: str) -> None:
    import importlib.util
    import traceback

    rank = int(os.environ["RANK"])
    try:
        spec = importlib.util.spec_from_file_location(f"_espace_test_{Path(source).stem}", source)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _save(Path(tmp), rank, getattr(module, name)(**json.loads(kwargs)))
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # peers may still need rank 0's store
    except BaseException:
        (Path(tmp) / f"rank{rank}.err").write_text(traceback.format_exc())
        sys.stderr.write(traceback.format_exc())
        _exit_now(1)  # do not wait for peers blocked in a collective
    _exit_now(0)


def _exit_now(code: int) -> None:
    """``os._exit`` skips multiprocessing's clean-up: end our helper processes first (e.g.
    dist_checkpointing's Manager server), or each test would leak one."""
    import multiprocessing

    for child in multiprocessing.active_children():
        child.kill()
    os._exit(code)


if __name__ == "__main__":
    _child(*sys.argv[1:5])
