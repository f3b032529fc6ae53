"""The multi-process harness itself: results come back, a failing rank fails the test with
its traceback, a hang is bounded."""

import os
import time

import pytest
import torch

from tests.harness import RankFailed, run_distributed


def _all_reduce_rank():
    from megatron_espace import runtime

    runtime.initialize()
    t = torch.tensor([float(os.environ["RANK"]) + 1])
    torch.distributed.all_reduce(t)
    return {"sum": t, "rank": int(os.environ["RANK"]),
            "world": torch.distributed.get_world_size()}


def _rank1_raises():
    from megatron_espace import runtime

    runtime.initialize()
    if os.environ["RANK"] == "1":
        raise ValueError("rank one is broken")
    torch.distributed.barrier()  # rank 0 would wait here forever


def _sleeps():
    time.sleep(60)


def test_results_per_rank():
    res = run_distributed(_all_reduce_rank, nprocs=2)
    assert [r["rank"] for r in res] == [0, 1]
    assert all(r["world"] == 2 and r["sum"].item() == 3.0 for r in res)


def test_failing_rank_reports_its_traceback_without_hanging():
    start = time.monotonic()
    with pytest.raises(RankFailed, match=r"(?s)rank 1 of 2 failed first.*ValueError: rank one is broken"):
        run_distributed(_rank1_raises, nprocs=2, timeout=120)
    assert time.monotonic() - start < 60


def test_hang_is_killed_at_the_timeout():
    start = time.monotonic()
    with pytest.raises(RankFailed, match="timed out after 3s"):
        run_distributed(_sleeps, nprocs=2, timeout=3)
    assert time.monotonic() - start < 20
