"""Specs of the rank pool (``bench/ranks.py``) and of the tests' harness on it
(``tests/mp.py``)."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch.distributed as dist

from bench.ranks import Exited, FailedWith, RankPool, RanksFailed, note_running, pickle_call
from tests import mp
from tests.mp import RankFailure, run_fresh, run_on_ranks


def _segfault_on_rank_1() -> int:
    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGSEGV)
    return dist.get_rank()


@pytest.mark.dist
def test_a_rank_killed_by_a_signal_leaves_its_stacks_and_names_the_signal(capfd):
    with pytest.raises(RankFailure) as failed:
        run_fresh(2, _segfault_on_rank_1, timeout=60)
    assert set(failed.value.failures) == {1}
    assert "exit code -11, killed by SIGSEGV; stacks on stderr" in failed.value.failures[1]
    stderr = capfd.readouterr().err
    assert "Fatal Python error: Segmentation fault" in stderr  # faulthandler: Python stack
    assert "in _segfault_on_rank_1" in stderr
    assert "SIGSEGV(11)" in stderr and "frame #0:" in stderr  # torch's handler: native stack


def _rank() -> int:
    return dist.get_rank()


@pytest.mark.dist
def test_tests_run_on_the_rank_pool_that_bench_uses():
    assert run_on_ranks(2, _rank, timeout=60) == [0, 1]
    assert isinstance(mp._POOLS[2], RankPool)


def _rank_1_fails_with_what_it_had() -> str:
    if dist.get_rank() == 1:
        try:
            raise ValueError("bad input on rank 1")
        except ValueError as exc:
            raise FailedWith(["measured before the error"]) from exc
    return "rank 0 done"


@pytest.mark.dist
def test_a_failing_rank_sends_back_its_partial_result_and_the_pool_is_killed():
    pool = RankPool(2, pg_timeout_s=10.0)
    try:
        with pytest.raises(RanksFailed) as failed:
            pool.call(pickle_call(_rank_1_fails_with_what_it_had, (), {}), timeout_s=60)
        assert failed.value.phase == "run" and failed.value.pending == set()
        assert failed.value.results == ["rank 0 done", None]
        assert failed.value.partial == {1: ["measured before the error"]}
        text = failed.value.failures[1]
        # The failure is the error's traceback, not the wrapper's.
        assert text.rstrip().endswith("ValueError: bad input on rank 1")
        assert "FailedWith" not in text
        assert not pool.alive
        with pytest.raises(RuntimeError, match="closed or killed"):
            pool.call(pickle_call(_rank, (), {}), timeout_s=60)
    finally:
        pool.kill()


def _rank_1_exits_while_running_step_3() -> int:
    if dist.get_rank() == 1:
        note_running("step 3")
        os._exit(3)
    return dist.get_rank()


@pytest.mark.dist
def test_a_rank_that_dies_says_its_exit_code_and_what_it_was_running():
    pool = RankPool(2, pg_timeout_s=10.0)
    try:
        with pytest.raises(RanksFailed) as failed:
            pool.call(pickle_call(_rank_1_exits_while_running_step_3, (), {}), timeout_s=60)
        exited = failed.value.failures[1]
        assert isinstance(exited, Exited)
        assert (exited.exitcode, exited.running, exited.signal) == (3, "step 3", None)
        assert failed.value.results[0] == 0
    finally:
        pool.kill()


def _sleep_on_rank_1(seconds: float) -> int:
    if dist.get_rank() == 1:
        time.sleep(seconds)
    return dist.get_rank()


@pytest.mark.dist
def test_a_call_past_its_timeout_raises_timeout_error_instead_of_hanging():
    # Rank 1 sleeps far past the call's timeout: the pool is killed, not waited for.
    with pytest.raises(TimeoutError, match=r"ranks \[1\] of a 2-rank group did not finish"):
        run_fresh(2, _sleep_on_rank_1, 3600.0, timeout=20)


def test_an_unpicklable_call_fails_before_any_rank_starts():
    with pytest.raises(TypeError, match="must be picklable"):
        run_fresh(2, lambda: 0)
