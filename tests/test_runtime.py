"""runtime: a failing rank makes every rank exit (no hang in a collective)."""

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
