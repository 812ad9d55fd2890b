"""Multi-process test harness: run a function on every rank of a gloo process group.

Tests that need ``torch.distributed`` call a *module-level* (picklable) function on
every rank of a CPU/gloo process group and get the per-rank return values back::

    from tests.mp import run_on_ranks

    def _sum_ranks():                      # module level, so it pickles by name
        t = torch.tensor([dist.get_rank()])
        dist.all_reduce(t)
        return t.item()

    @pytest.mark.dist
    def test_all_reduce_sums_ranks():
        assert run_on_ranks(2, _sum_ranks, timeout=30) == [1, 1]

API
---
``run_on_ranks(world_size, fn, *args, timeout=60.0, **kwargs) -> list``
    Runs ``fn(*args, **kwargs)`` on every rank of a persistent pool of ``world_size``
    spawned workers (one pool per world size, created on first use and reused by every
    later call in the session, so only the first call pays for process start-up and
    ``import torch``). Inside ``fn`` the default process group is initialised (gloo,
    127.0.0.1, timeout ``PG_TIMEOUT_S``), so ``dist.get_rank()`` etc. work. Returns the
    return values ordered by rank; they must be picklable. ``timeout`` bounds the call
    itself (pool start-up has its own, generous, ``STARTUP_TIMEOUT_S``).
``run_fresh(world_size, fn, *args, timeout=60.0, pg_timeout=10.0, allow_exit=(),
device_type="cpu", **kwargs) -> list``
    The same on a brand-new throwaway group that is torn down afterwards, for tests
    that kill a rank or leave the group unusable. ``pg_timeout`` (seconds) is that
    group's collective timeout. ``device_type="cuda"`` makes it an NCCL group, rank
    ``r`` on GPU ``r`` (the CUDA tests). A rank listed in ``allow_exit`` may exit its
    process during the call; its slot in the result is then an ``Exited`` (with
    ``exitcode``) instead of a failure.
``RankFailure(AssertionError)``
    Raised when any rank raised (or a worker died): the message holds every failing
    rank's number and full traceback text; ``.failures`` maps rank -> that text.
``TimeoutError``
    Raised when the call does not finish within ``timeout``; the pool is killed first
    (the next call builds a fresh one), so nothing is left hanging.
``shutdown_pools()``
    Stops every cached pool; called at exit and by the session fixture in
    ``tests/conftest.py``.

``timeout``, ``pg_timeout``, ``allow_exit`` and ``device_type`` are consumed by the
harness, never passed to ``fn``. A pool whose call failed or timed out is discarded,
because a rank that raised between collectives leaves the group's collective sequence
out of step, and the next test must not inherit that.

Workers import ``fn``'s module by name, so test modules must be importable from the
repository root (``tests`` is a package; pytest runs with ``pythonpath = ["."]``). Every
rank has loaded ``fn`` (imported its module) before any rank starts running it, so
import times never eat into a collective's timeout.
A worker killed by a fatal signal prints the Python stacks of its threads
(``faulthandler``) and its native stack (torch's handler) on stderr.
Workers run single-threaded (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``)
because the CI machine has two cores shared by every rank.

The processes, the group, the deadlines and the crash reports are
:class:`bench.ranks.RankPool`, the one rank pool that the benchmark's multi-rank cases
use too; this module adds the tests' API on top: pools cached per world size, and
failures as :class:`RankFailure` / ``TimeoutError`` with every rank's traceback.
"""

from __future__ import annotations

import atexit
from collections.abc import Callable, Collection
from typing import Any

from bench.ranks import STARTUP_TIMEOUT_S, Exited, RankPool, RanksFailed, pickle_call

__all__ = [
    "PG_TIMEOUT_S",
    "STARTUP_TIMEOUT_S",
    "Exited",
    "RankFailure",
    "run_fresh",
    "run_on_ranks",
    "shutdown_pools",
]

PG_TIMEOUT_S = 30.0
"""Collective timeout of the pooled groups: a collective that cannot complete fails
in this many seconds instead of hanging (well inside the default call timeout)."""


class RankFailure(AssertionError):
    """One or more ranks raised, or a worker died, during a harness call.

    Attributes:
        failures: rank -> traceback text (or a description of how the worker died).
    """

    def __init__(self, message: str, failures: dict[int, str]) -> None:
        super().__init__(message)
        self.failures = failures


def _text(failure: str | Exited) -> str:
    if not isinstance(failure, Exited):
        return failure
    how = f"exit code {failure.exitcode}"
    if failure.signal:
        # Its Python and native stacks are on stderr (faulthandler, torch's handler).
        how += f", killed by {failure.signal}; stacks on stderr"
    return f"worker process exited ({how}) before replying"


def _describe(headline: str, failures: dict[int, str], pending: Collection[int]) -> str:
    parts = [headline]
    for rank in sorted(failures):
        parts.append(f"\n----- rank {rank} -----\n{failures[rank].rstrip()}")
    for rank in sorted(pending):
        parts.append(
            f"\n----- rank {rank} -----\nno reply (probably blocked in a collective "
            "waiting for a failed rank)"
        )
    return "\n".join(parts)


def _test_error(failed: RanksFailed, timeout: float) -> Exception:
    """The pool's failure in the tests' terms (see the module doc)."""
    failures = {rank: _text(f) for rank, f in failed.failures.items()}
    size = failed.world_size
    if failed.phase == "start":
        return RuntimeError(
            _describe(f"starting a {size}-rank gloo group failed", failures, failed.pending)
        )
    if not failures:
        did = "load the call" if failed.phase == "load" else "finish"
        return TimeoutError(
            f"ranks {sorted(failed.pending)} of a {size}-rank group did not {did} within "
            f"{timeout:g}s; the group was killed"
        )
    headline = f"{len(failures)} of {size} ranks failed"
    return RankFailure(_describe(headline, failures, failed.pending), failures)


def _start(world_size: int, pg_timeout: float, device_type: str = "cpu") -> RankPool:
    try:
        return RankPool(world_size, pg_timeout, device_type, name="mp")
    except RanksFailed as failed:
        raise _test_error(failed, STARTUP_TIMEOUT_S) from None


def _call(
    pool: RankPool, payload: bytes, timeout: float, allow_exit: Collection[int]
) -> list[Any]:
    try:
        return pool.call(payload, timeout, allow_exit)
    except RanksFailed as failed:
        raise _test_error(failed, timeout) from None


_POOLS: dict[int, RankPool] = {}


def run_on_ranks(
    world_size: int, fn: Callable[..., Any], *args: Any, timeout: float = 60.0, **kwargs: Any
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on every rank of the cached ``world_size`` pool.

    See the module docstring for the contract.
    """
    payload = pickle_call(fn, args, kwargs)
    pool = _POOLS.get(world_size)
    if pool is None:
        pool = _POOLS[world_size] = _start(world_size, PG_TIMEOUT_S)
    try:
        return _call(pool, payload, timeout, ())
    finally:
        # A failed call killed the pool: the next test gets a fresh one.
        if not pool.alive:
            _POOLS.pop(world_size, None)


def run_fresh(
    world_size: int,
    fn: Callable[..., Any],
    *args: Any,
    timeout: float = 60.0,
    pg_timeout: float = 10.0,
    allow_exit: Collection[int] = (),
    device_type: str = "cpu",
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on a new throwaway group, then tear it down.

    See the module docstring for the contract.
    """
    payload = pickle_call(fn, args, kwargs)
    pool = _start(world_size, pg_timeout, device_type)
    try:
        return _call(pool, payload, timeout, allow_exit)
    finally:
        pool.close()


def shutdown_pools() -> None:
    """Stop every cached pool (idempotent)."""
    for pool in list(_POOLS.values()):
        pool.close()
    _POOLS.clear()


atexit.register(shutdown_pools)
