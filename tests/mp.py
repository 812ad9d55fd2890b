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
``run_fresh(world_size, fn, *args, timeout=60.0, pg_timeout=10.0, allow_exit=(), **kwargs) -> list``
    The same on a brand-new throwaway group that is torn down afterwards, for tests
    that kill a rank or leave the group unusable. ``pg_timeout`` (seconds) is that
    group's collective timeout. A rank listed in ``allow_exit`` may exit its process
    during the call; its slot in the result is then an ``Exited`` (with ``exitcode``)
    instead of a failure.
``RankFailure(AssertionError)``
    Raised when any rank raised (or a worker died): the message holds every failing
    rank's number and full traceback text; ``.failures`` maps rank -> that text.
``TimeoutError``
    Raised when the call does not finish within ``timeout``; the pool is killed first
    (the next call builds a fresh one), so nothing is left hanging.
``shutdown_pools()``
    Stops every cached pool; called at exit and by the session fixture in
    ``tests/conftest.py``.

``timeout``, ``pg_timeout`` and ``allow_exit`` are consumed by the harness, never passed
to ``fn``. A pool whose call failed or timed out is discarded, because a rank that
raised between collectives leaves the group's collective sequence out of step, and
the next test must not inherit that.

Workers import ``fn``'s module by name, so test modules must be importable from the
repository root (``tests`` is a package; pytest runs with ``pythonpath = ["."]``). Every
rank has loaded ``fn`` (imported its module) before any rank starts running it, so
import times never eat into a collective's timeout.
A worker killed by a fatal signal prints the Python stacks of its threads
(``faulthandler``) and its native stack (torch's handler) on stderr.
Workers run single-threaded (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``)
because the CI machine has two cores shared by every rank.
"""

from __future__ import annotations

import atexit
import faulthandler
import multiprocessing
import os
import pickle
import signal
import sys
import time
import traceback
from collections.abc import Callable, Collection
from datetime import timedelta
from multiprocessing.connection import wait
from typing import Any

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

STARTUP_TIMEOUT_S = 180.0
"""Bound on spawning a pool and forming its group; generous because importing torch
in four processes on two busy cores can take tens of seconds."""

_FAILURE_GRACE_S = 5.0
"""After one rank fails, how long to wait for the others' tracebacks: ranks blocked in
a collective on the failed rank would otherwise hold the test for the full timeout."""

_CTX = multiprocessing.get_context("spawn")


class RankFailure(AssertionError):
    """One or more ranks raised, or a worker died, during a harness call.

    Attributes:
        failures: rank -> traceback text (or a description of how the worker died).
    """

    def __init__(self, message: str, failures: dict[int, str]) -> None:
        super().__init__(message)
        self.failures = failures


class Exited:
    """Result placeholder for a rank that was allowed to exit (``run_fresh(allow_exit=...)``)."""

    def __init__(self, exitcode: int | None) -> None:
        self.exitcode = exitcode

    def __repr__(self) -> str:
        return f"Exited(exitcode={self.exitcode})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Exited) and other.exitcode == self.exitcode

    __hash__ = None  # type: ignore[assignment]


def _receive(conn: Any) -> bytes:
    try:
        return conn.recv_bytes()
    except (EOFError, OSError, KeyboardInterrupt):
        return b""


def _send(conn: Any, data: bytes) -> bool:
    try:
        conn.send_bytes(data)
        return True
    except (OSError, KeyboardInterrupt):
        return False


def _worker_main(rank: int, world_size: int, port: int, pg_timeout: float, conn: Any) -> None:
    # A rank killed by a fatal signal sends no traceback: print the Python stacks of
    # its threads and (torch's handler, below) the native one onto the shared stderr.
    faulthandler.enable(all_threads=True)
    # Thread limits must be in the environment before torch starts its OpenMP pool.
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    try:
        import torch
        import torch.distributed as dist

        torch._C._set_print_stack_traces_on_fatal_signal(True)
        torch.set_num_threads(1)
        store = dist.TCPStore(
            "127.0.0.1",
            port,
            is_master=False,
            timeout=timedelta(seconds=STARTUP_TIMEOUT_S),
        )
        # Meet every rank in the store first: on a loaded machine the ranks finish
        # importing torch seconds apart, and the group's own rendezvous waits only the
        # (possibly short) group timeout.
        store.set(f"tests.mp/arrived/{rank}", "1")
        store.wait(
            [f"tests.mp/arrived/{r}" for r in range(world_size)],
            timedelta(seconds=STARTUP_TIMEOUT_S),
        )
        dist.init_process_group(
            "gloo",
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=pg_timeout),
        )
    except BaseException:
        conn.send_bytes(pickle.dumps((False, traceback.format_exc())))
        return
    conn.send_bytes(pickle.dumps((True, None)))

    # Each call has two phases: load (unpickle fn, importing its module) and reply, then
    # wait for the parent's go-ahead and run. Only once every rank has loaded does any
    # rank start, so fn's first collective never waits out another rank's imports.
    while True:
        data = _receive(conn)
        if not data:  # the shutdown request, or the parent is gone
            break
        try:
            call = pickle.loads(data)
            loaded = pickle.dumps((True, None))
        except BaseException:
            call, loaded = None, pickle.dumps((False, traceback.format_exc()))
        if not _send(conn, loaded):
            break
        if call is None:
            continue
        if not _receive(conn):
            break
        fn, args, kwargs = call
        try:
            reply = pickle.dumps((True, fn(*args, **kwargs)))
        except BaseException:
            reply = pickle.dumps((False, traceback.format_exc()))
        if not _send(conn, reply):
            break
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: destroying a process group whose peers are gone can
    # block, and the parent joins this process with a short deadline anyway.
    os._exit(0)


class _Group:
    """``world_size`` spawned workers joined in one gloo process group."""

    def __init__(self, world_size: int, pg_timeout: float) -> None:
        import torch.distributed as dist

        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        # The parent hosts the rendezvous store on a port the kernel picks, so there is
        # no window in which another process (another engineer's tests) can take it.
        self._store = dist.TCPStore(
            "127.0.0.1",
            0,
            is_master=True,
            wait_for_workers=False,
            timeout=timedelta(seconds=STARTUP_TIMEOUT_S),
        )
        self._conns: list[Any] = []
        self._procs: list[Any] = []
        try:
            for rank in range(world_size):
                parent_end, child_end = _CTX.Pipe()
                proc = _CTX.Process(
                    target=_worker_main,
                    args=(rank, world_size, self._store.port, pg_timeout, child_end),
                    name=f"mp-rank{rank}-of{world_size}",
                    daemon=True,
                )
                proc.start()
                child_end.close()
                self._conns.append(parent_end)
                self._procs.append(proc)
            results, failures, pending = self._collect(STARTUP_TIMEOUT_S, ())
            if failures or pending:
                raise RuntimeError(
                    _describe(f"starting a {world_size}-rank gloo group failed", failures, pending)
                )
        except BaseException:
            self.kill()
            raise

    def call(self, payload: bytes, timeout: float, allow_exit: Collection[int]) -> list[Any]:
        """Send one pickled call to every rank and gather the replies (see module doc)."""
        deadline = time.monotonic() + timeout
        self._send_all(payload)
        self._phase(timeout, (), f"load the call within {timeout:g}s")
        self._send_all(b"go")
        return self._phase(deadline - time.monotonic(), allow_exit, f"finish within {timeout:g}s")

    def _send_all(self, data: bytes) -> None:
        for conn in self._conns:
            try:
                conn.send_bytes(data)
            except OSError:
                pass  # a dead worker is reported by _collect through its sentinel

    def _phase(self, timeout: float, allow_exit: Collection[int], what: str) -> list[Any]:
        results, failures, pending = self._collect(timeout, allow_exit)
        if pending and not failures:
            self.kill()
            raise TimeoutError(
                f"ranks {sorted(pending)} of a {self.world_size}-rank group did not {what}; "
                "the group was killed"
            )
        if failures:
            self.kill()
            raise RankFailure(
                _describe(f"{len(failures)} of {self.world_size} ranks failed", failures, pending),
                failures,
            )
        return results

    def _collect(
        self, timeout: float, allow_exit: Collection[int]
    ) -> tuple[list[Any], dict[int, str], set[int]]:
        results: list[Any] = [None] * self.world_size
        failures: dict[int, str] = {}
        pending = set(range(self.world_size))
        deadline = time.monotonic() + timeout
        first_failure_at = 0.0
        while pending:
            limit = deadline
            if failures:
                limit = min(deadline, first_failure_at + _FAILURE_GRACE_S)
            remaining = limit - time.monotonic()
            if remaining <= 0:
                break
            waitables = {}
            for rank in pending:
                waitables[self._conns[rank]] = rank
                waitables[self._procs[rank].sentinel] = rank
            for ready in wait(list(waitables), remaining):
                rank = waitables[ready]
                if rank not in pending:
                    continue
                conn = self._conns[rank]
                if conn.poll():
                    try:
                        ok, value = pickle.loads(conn.recv_bytes())
                    except (EOFError, OSError):
                        ok, value = self._death(rank, allow_exit)
                    except BaseException:
                        ok, value = (
                            False,
                            "could not unpickle the reply:\n" + traceback.format_exc(),
                        )
                elif not self._procs[rank].is_alive():
                    ok, value = self._death(rank, allow_exit)
                else:
                    continue
                pending.discard(rank)
                if ok:
                    results[rank] = value
                else:
                    if not failures:
                        first_failure_at = time.monotonic()
                    failures[rank] = value
        return results, failures, pending

    def _death(self, rank: int, allow_exit: Collection[int]) -> tuple[bool, Any]:
        proc = self._procs[rank]
        proc.join(1.0)
        if rank in allow_exit:
            return True, Exited(proc.exitcode)
        how = f"exit code {proc.exitcode}"
        if proc.exitcode is not None and proc.exitcode < 0:
            # Its Python and native stacks are on stderr (faulthandler, torch's handler).
            try:
                name = signal.Signals(-proc.exitcode).name
            except ValueError:  # a real-time signal has no name
                name = f"signal {-proc.exitcode}"
            how += f", killed by {name}; stacks on stderr"
        return False, f"worker process exited ({how}) before replying"

    def shutdown(self) -> None:
        """Ask the workers to exit, then kill whatever has not within a short grace."""
        for conn in self._conns:
            try:
                conn.send_bytes(b"")
            except OSError:
                pass
        deadline = time.monotonic() + 5.0
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        self.kill()

    def kill(self) -> None:
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
        for proc in self._procs:
            proc.join(5.0)
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []
        if _POOLS.get(self.world_size) is self:
            del _POOLS[self.world_size]


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


def _pickle_call(fn: Callable[..., Any], args: tuple, kwargs: dict) -> bytes:
    # Pickled once here, so a bad argument fails in the test process before any rank
    # starts (rather than reaching some ranks and not others).
    try:
        return pickle.dumps((fn, args, kwargs))
    except Exception as exc:
        raise TypeError(
            f"{fn!r} and its arguments must be picklable (a module-level function in an "
            f"importable module): {exc}"
        ) from exc


_POOLS: dict[int, _Group] = {}


def run_on_ranks(
    world_size: int, fn: Callable[..., Any], *args: Any, timeout: float = 60.0, **kwargs: Any
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on every rank of the cached ``world_size`` pool.

    See the module docstring for the contract.
    """
    payload = _pickle_call(fn, args, kwargs)
    group = _POOLS.get(world_size)
    if group is None:
        group = _POOLS[world_size] = _Group(world_size, PG_TIMEOUT_S)
    return group.call(payload, timeout, ())


def run_fresh(
    world_size: int,
    fn: Callable[..., Any],
    *args: Any,
    timeout: float = 60.0,
    pg_timeout: float = 10.0,
    allow_exit: Collection[int] = (),
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on a new throwaway group, then tear it down.

    See the module docstring for the contract.
    """
    payload = _pickle_call(fn, args, kwargs)
    group = _Group(world_size, pg_timeout)
    try:
        return group.call(payload, timeout, allow_exit)
    finally:
        group.shutdown()


def shutdown_pools() -> None:
    """Stop every cached pool (idempotent)."""
    for group in list(_POOLS.values()):
        group.shutdown()
    _POOLS.clear()


atexit.register(shutdown_pools)
