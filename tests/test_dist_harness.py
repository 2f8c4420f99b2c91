"""The multi-process test harness (dist_harness.run_ranks) itself: it returns every rank's value, re-raises
the failing rank's exception with its rank and traceback at once, and fails a hung world after its timeout."""

import time

import pytest
import torch.distributed as dist

from lora_ext_dev.dist_harness import RankError, run_ranks


def _rank1_raises(rank, world_size):
    if rank == 1:
        raise KeyError("boom in rank 1")
    dist.barrier()  # waits for rank 1, which never comes


def _rank1_hangs(rank, world_size):
    if rank == 0:
        dist.barrier()
    else:
        time.sleep(60)


def test_run_ranks_reraises_with_the_rank_and_does_not_hang():
    start = time.perf_counter()
    with pytest.raises(RankError, match="rank 1 of 2 raised") as info:
        run_ranks(_rank1_raises, 2, timeout=60)
    assert "boom in rank 1" in str(info.value) and "_rank1_raises" in info.value.remote_traceback
    assert isinstance(info.value.__cause__, KeyError)
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\] of 2 did not finish within 3"):
        run_ranks(_rank1_hangs, 2, timeout=3)
    assert time.perf_counter() - start < 30
    assert run_ranks(lambda rank, n, k: (rank, n, k, dist.get_world_size()), 3, "x") == [
        (r, 3, "x", 3) for r in range(3)
    ]
