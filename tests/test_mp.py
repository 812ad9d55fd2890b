"""Specs of the multi-process test harness (``tests/mp.py``) itself."""

from __future__ import annotations

import os
import signal

import pytest
import torch.distributed as dist

from tests.mp import RankFailure, run_fresh


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
