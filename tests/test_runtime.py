"""runtime: a failing rank makes every rank exit (no hang in a collective)."""

import contextlib
import os
import subprocess
import sys
import textwrap
import time

from tests.harness import ROOT, _free_port

SCRIPT = textwrap.dedent("""
    import os, time, torch
    from megatron_espace import runtime

    def main():
        runtime.initialize()
        if os.environ["RANK"] == "1":
            time.sleep(1)
            raise ValueError("rank one is broken")
        torch.distributed.all_reduce(torch.ones(1))  # rank 0 waits for rank 1 here

    runtime.run_main(main)
""")


def test_failing_rank_makes_every_rank_exit():
    port = str(_free_port())
    procs = [subprocess.Popen(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=port, PYTHONWARNINGS="ignore"))
        for r in range(2)]
    start = time.monotonic()
    try:
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert time.monotonic() - start < 120
    assert [p.returncode for p in procs] == [1, 1]
    assert "[rank 1]" in outputs[1] and "ValueError: rank one is broken" in outputs[1]
    assert "[rank 0]" in outputs[0]  # rank 0 failed too, with its own error, not a hang


USER_ERROR = textwrap.dedent("""
    import sys
    from megatron_espace import runtime

    def main():
        raise ValueError("espace.yaml: layers[0].rank: must be a positive integer")

    runtime.run_main(main)
""")


def test_user_error_is_one_line_and_debug_keeps_the_traceback():
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    for key in ("RANK", "WORLD_SIZE"):
        env.pop(key, None)
    runs = [subprocess.Popen([sys.executable, "-c", USER_ERROR, *extra], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for extra in ([], ["--debug"])]
    (_, plain), (_, debug) = [p.communicate(timeout=120) for p in runs]
    assert [p.returncode for p in runs] == [1, 1]
    assert plain == "error: ValueError: espace.yaml: layers[0].rank: must be a positive " \
        "integer\n"
    assert "Traceback (most recent call last)" in debug and "[rank 0]" in debug
    assert "ValueError: espace.yaml: layers[0].rank" in debug


def test_single_process_picks_another_port_when_its_own_was_taken():
    """A plain single process chooses MASTER_PORT itself; if another process binds it before
    the store does, initialize picks again instead of failing (EADDRINUSE)."""
    code = """
import socket
from megatron_espace import runtime
taken = socket.socket(); taken.bind(("127.0.0.1", 0)); taken.listen()
ports = [taken.getsockname()[1], runtime._free_port()]
runtime._free_port = lambda: ports.pop(0)
runtime.initialize()
import os, torch
assert torch.distributed.get_world_size() == 1 and not ports
print("PORT", os.environ["MASTER_PORT"], taken.getsockname()[1])
runtime.destroy()
"""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=str(ROOT), env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    used, taken = out.stdout.split("PORT")[1].split()
    assert used != taken


def test_processes_a_rank_forks_die_with_it():
    """end_with_launcher (torchrun ranks): a process the rank forks later (megatron's
    checkpoint writers fork per save) is killed with the rank instead of outliving it."""
    import psutil

    code = """
import os, time
from megatron_espace import runtime
runtime.end_with_launcher()
pid = os.fork()
if pid == 0:
    time.sleep(120)
    os._exit(0)
print(pid, flush=True)
time.sleep(120)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=str(ROOT))
    child = psutil.Process(int(proc.stdout.readline()))
    try:
        proc.kill()
        proc.wait(timeout=30)
        _, alive = psutil.wait_procs([child], timeout=30)
        assert not alive
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
        proc.stdout.close()
