"""A pool of spawned ranks: one picklable function run on every rank of one process group.

The one rank pool of the repository. The benchmark's multi-rank cases
(:mod:`bench.launch`) and the multi-process tests (``tests/mp.py``) both run on it; it
lives here because ``python -m bench`` must run from a clean clone without the test
tree, while the tests already import ``bench`` (see the project's design notes).

What every user gets:

* Fresh processes (``spawn``), joined in one process group on 127.0.0.1: gloo on CPU,
  NCCL on CUDA. The parent hosts the rendezvous ``TCPStore`` on a port the kernel picks,
  so no other program can take the port between choosing and binding it.
* A deadline on everything: forming the group (:data:`STARTUP_TIMEOUT_S`), loading a
  call and running it (the caller's ``timeout_s``), collectives inside the group
  (``pg_timeout_s``). A rank that raises, dies or does not answer in time gets the whole
  pool killed and :class:`RanksFailed` raised: a group whose ranks stopped at different
  collectives cannot be trusted again, so nothing ever waits on it.
* Crash stacks: a rank killed by a fatal signal prints the Python stacks of its threads
  (``faulthandler``) and torch's native stack on the shared stderr, and its slot says
  how it died (:class:`Exited`) and what it was running (:func:`note_running`).
* Ranks that may exit: ``allow_exit`` turns a rank's death into an :class:`Exited`
  result instead of a failure (tests that kill a rank on purpose).

A call has two phases: every rank loads it (unpickles the function, importing its
module) and answers, and only then does any rank run it, so import times never eat into
the first collective's timeout.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import pickle
import signal
import sys
import time
import traceback
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import wait
from typing import Any

__all__ = [
    "FAILURE_GRACE_S",
    "STARTUP_TIMEOUT_S",
    "Exited",
    "FailedWith",
    "RankPool",
    "RanksFailed",
    "init_rank",
    "note_running",
    "pickle_call",
    "print_stacks_on_fatal_signal",
]

STARTUP_TIMEOUT_S = 180.0
"""Bound on spawning the ranks and forming their group; generous because importing
torch in several processes on a few busy cores can take tens of seconds."""

FAILURE_GRACE_S = 5.0
"""After one rank fails, how long to wait for the others' answers: ranks blocked in a
collective on the failed rank would otherwise hold the caller for its full timeout, and
the first traceback is the useful one."""

#: Bytes of the shared record in which each rank says what it is running.
_RUNNING_BYTES = 512

_CTX = multiprocessing.get_context("spawn")

# In a rank: the shared ``c_char`` array that :func:`note_running` writes to.
_running: Any = None


def print_stacks_on_fatal_signal() -> None:
    """Makes a fatal signal (a segfault or an abort in native code), which leaves no
    exception to report, print the Python stack of every thread and torch's native one.

    They go to the process's own stderr: a caller may have swapped ``sys.stderr`` for an
    object with no file descriptor.
    """
    import torch

    faulthandler.enable(file=sys.__stderr__, all_threads=True)
    torch._C._set_print_stack_traces_on_fatal_signal(True)


def note_running(text: str) -> None:
    """Records what this rank runs now, so a crash that leaves no Python exception (a
    fatal signal) can still be attributed; a no-op outside a pool's rank."""
    if _running is not None:
        _running.value = text.encode("utf-8", "replace")[: len(_running) - 1]


def init_rank(
    device_type: str, rank: int, world_size: int, local_rank: int, pg_timeout_s: float,
    store: Any = None,
):
    """Joins the default process group (gloo on CPU, NCCL on CUDA); returns the device.

    Without ``store`` the group comes from the environment (torchrun's ranks).
    """
    import torch
    import torch.distributed as dist

    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend, extra = "nccl", {"device_id": device}
    else:
        device = torch.device("cpu")
        backend, extra = "gloo", {}
    kwargs = dict(backend=backend, timeout=timedelta(seconds=pg_timeout_s), **extra)
    if store is not None:
        kwargs.update(store=store, rank=rank, world_size=world_size)
    dist.init_process_group(**kwargs)
    return device


class Exited:
    """How a rank's process ended without answering.

    The result of a rank listed in ``allow_exit``, or (in :attr:`RanksFailed.failures`)
    the failure of one that was not. Two are equal when their exit codes are, so a test
    can compare a result with ``Exited(0)``.

    Attributes:
        exitcode: the process's exit code (negative: killed by that signal).
        running: what the rank last recorded with :func:`note_running` ("" if nothing).
    """

    def __init__(self, exitcode: int | None, running: str = "") -> None:
        self.exitcode = exitcode
        self.running = running

    @property
    def signal(self) -> str | None:
        """The name of the signal that killed the process, if one did."""
        if self.exitcode is None or self.exitcode >= 0:
            return None
        try:
            return signal.Signals(-self.exitcode).name
        except ValueError:  # a real-time signal has no name
            return f"signal {-self.exitcode}"

    def __repr__(self) -> str:
        return f"Exited(exitcode={self.exitcode})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Exited) and other.exitcode == self.exitcode

    __hash__ = None  # type: ignore[assignment]


class FailedWith(Exception):
    """Raised by a rank's function (``raise FailedWith(value) from error``) to fail with
    ``error`` and still send ``value`` back, e.g. what it measured before the error.

    The failure's text is ``error``'s traceback; ``value`` lands in
    :attr:`RanksFailed.partial`.
    """

    def __init__(self, value: Any) -> None:
        super().__init__("a rank failed and sent back a partial result")
        self.value = value


@dataclass(eq=False)
class RanksFailed(Exception):
    """A pool could not start, or a call on it failed; the pool is already killed.

    Attributes:
        phase: ``"start"`` (forming the group), ``"load"`` (unpickling the call) or
            ``"run"``.
        results: each rank's return value where it returned (None elsewhere).
        failures: rank -> the traceback text of what it raised, or an :class:`Exited`
            for a rank whose process died.
        pending: ranks that gave no answer before the deadline (or the grace after the
            first failure).
        partial: rank -> the value a rank sent with its failure (:class:`FailedWith`).
    """

    phase: str
    results: list[Any]
    failures: dict[int, str | Exited]
    pending: set[int]
    partial: dict[int, Any]

    @property
    def world_size(self) -> int:
        """Ranks in the pool."""
        return len(self.results)

    def __str__(self) -> str:
        return (
            f"{self.phase}: ranks {sorted(self.failures)} of {self.world_size} failed, "
            f"ranks {sorted(self.pending)} gave no answer"
        )


def pickle_call(fn: Callable[..., Any], args: tuple, kwargs: dict) -> bytes:
    """``fn(*args, **kwargs)`` as the bytes :meth:`RankPool.call` sends.

    Pickled once, in the caller, so a bad argument fails here before any rank starts
    (rather than reaching some ranks and not others).

    Raises:
        TypeError: ``fn`` or an argument does not pickle.
    """
    try:
        return pickle.dumps((fn, args, kwargs))
    except Exception as exc:
        raise TypeError(
            f"{fn!r} and its arguments must be picklable (a module-level function in an "
            f"importable module): {exc}"
        ) from exc


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


def _failure_text(exc: BaseException) -> str:
    shown = exc.__cause__ if isinstance(exc, FailedWith) and exc.__cause__ else exc
    return "".join(traceback.format_exception(type(shown), shown, shown.__traceback__))


def _run(call: tuple) -> bytes:
    """Runs a loaded call; the pickled reply ``(ok, value or traceback, partial)``."""
    fn, args, kwargs = call
    try:
        return pickle.dumps((True, fn(*args, **kwargs), None))
    except FailedWith as exc:
        reply = (False, _failure_text(exc), exc.value)
    except BaseException as exc:
        reply = (False, _failure_text(exc), None)
    try:
        return pickle.dumps(reply)
    except BaseException:
        text = f"{reply[1]}\n(its partial result does not pickle:\n{traceback.format_exc()})"
        return pickle.dumps((False, text, None))


def _rank_main(
    rank: int, world_size: int, port: int, device_type: str, threads: int,
    pg_timeout_s: float, conn: Any, running: Any,
) -> None:
    global _running
    _running = running
    # Thread limits must be in the environment before torch starts its OpenMP pool.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    try:
        import torch
        import torch.distributed as dist

        # A rank killed by a fatal signal sends no traceback: its stacks go onto the
        # stderr it shares with the parent.
        print_stacks_on_fatal_signal()
        torch.set_num_threads(threads)
        store = dist.TCPStore(
            "127.0.0.1", port, is_master=False, timeout=timedelta(seconds=STARTUP_TIMEOUT_S)
        )
        # Meet every rank in the store first: on a loaded machine the ranks finish
        # importing torch seconds apart, and the group's own rendezvous waits only the
        # (possibly short) group timeout.
        store.set(f"bench.ranks/arrived/{rank}", "1")
        store.wait(
            [f"bench.ranks/arrived/{r}" for r in range(world_size)],
            timedelta(seconds=STARTUP_TIMEOUT_S),
        )
        init_rank(device_type, rank, world_size, rank, pg_timeout_s, store=store)
    except BaseException:
        conn.send_bytes(pickle.dumps((False, traceback.format_exc(), None)))
        return
    conn.send_bytes(pickle.dumps((True, None, None)))

    while True:
        data = _receive(conn)
        if not data:  # the shutdown request, or the parent is gone
            break
        try:
            call = pickle.loads(data)
            loaded = pickle.dumps((True, None, None))
        except BaseException:
            call, loaded = None, pickle.dumps((False, traceback.format_exc(), None))
        if not _send(conn, loaded):
            break
        if call is None:
            continue
        if not _receive(conn):  # the go-ahead, sent once every rank has loaded
            break
        if not _send(conn, _run(call)):
            break
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: destroying a process group whose peers are gone can
    # block, and the parent joins this process with a short deadline anyway.
    os._exit(0)


class RankPool:
    """``world_size`` spawned ranks joined in one process group, running calls on request.

    Args:
        world_size: ranks to start.
        pg_timeout_s: the group's collective timeout: a collective that cannot complete
            fails in this many seconds instead of hanging.
        device_type: ``"cpu"`` (gloo) or ``"cuda"`` (NCCL, rank ``r`` on GPU ``r``).
        threads: torch / OpenMP threads per rank.
        name: prefix of the processes' names.

    Raises:
        RanksFailed: (``phase="start"``) a rank failed to join, or the group did not
            form within :data:`STARTUP_TIMEOUT_S`.
    """

    def __init__(
        self, world_size: int, pg_timeout_s: float, device_type: str = "cpu",
        threads: int = 1, name: str = "rank",
    ) -> None:
        import torch.distributed as dist

        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self._store = dist.TCPStore(
            "127.0.0.1", 0, is_master=True, wait_for_workers=False,
            timeout=timedelta(seconds=STARTUP_TIMEOUT_S),
        )
        self._procs: list[Any] = []
        self._conns: list[Any] = []
        self._running: list[Any] = []
        try:
            for rank in range(world_size):
                parent_end, child_end = _CTX.Pipe()
                running = _CTX.Array("c", _RUNNING_BYTES, lock=False)
                proc = _CTX.Process(
                    target=_rank_main,
                    args=(rank, world_size, self._store.port, device_type, threads,
                          pg_timeout_s, child_end, running),
                    name=f"{name}-rank{rank}-of{world_size}",
                    daemon=True,
                )
                proc.start()
                child_end.close()
                self._procs.append(proc)
                self._conns.append(parent_end)
                self._running.append(running)
            self._phase("start", STARTUP_TIMEOUT_S, ())
        except BaseException:
            self.kill()
            raise

    @property
    def alive(self) -> bool:
        """False once the pool was closed or killed (after any failed call)."""
        return bool(self._procs)

    def call(self, payload: bytes, timeout_s: float, allow_exit: Collection[int] = ()) -> list[Any]:
        """Runs a :func:`pickle_call` payload on every rank; returns the results by rank.

        Args:
            payload: from :func:`pickle_call`.
            timeout_s: bound on the whole call, loading included.
            allow_exit: ranks whose process may end during the call; their result is an
                :class:`Exited`.

        Raises:
            RanksFailed: a rank raised or died, or the call did not finish in time.
        """
        if not self.alive:
            raise RuntimeError("this rank pool was closed or killed; start a new one")
        deadline = time.monotonic() + timeout_s
        try:
            self._send_all(payload)
            self._phase("load", timeout_s, ())
            self._send_all(b"go")
            return self._phase("run", deadline - time.monotonic(), allow_exit)
        except BaseException:
            # Whatever stopped the call (a failure, a KeyboardInterrupt), the ranks may be
            # mid-collective: nobody may use them again.
            self.kill()
            raise

    def _send_all(self, data: bytes) -> None:
        for conn in self._conns:
            try:
                conn.send_bytes(data)
            except OSError:
                pass  # a dead rank is reported by _phase through its sentinel

    def _phase(self, phase: str, timeout_s: float, allow_exit: Collection[int]) -> list[Any]:
        results: list[Any] = [None] * self.world_size
        failures: dict[int, str | Exited] = {}
        partial: dict[int, Any] = {}
        pending = set(range(self.world_size))
        deadline = time.monotonic() + timeout_s
        while pending:
            remaining = deadline - time.monotonic()
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
                ok, value, extra = self._answer(rank, allow_exit)
                if ok is None:
                    continue
                pending.discard(rank)
                if ok:
                    results[rank] = value
                    continue
                if not failures:
                    deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
                failures[rank] = value
                if extra is not None:
                    partial[rank] = extra
        if failures or pending:
            raise RanksFailed(phase, results, failures, pending, partial)
        return results

    def _answer(self, rank: int, allow_exit: Collection[int]) -> tuple[bool | None, Any, Any]:
        """Rank ``rank``'s reply ``(ok, value, partial)``; ``ok`` None: nothing yet."""
        conn, proc = self._conns[rank], self._procs[rank]
        try:
            if conn.poll():
                return pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            pass  # the process died mid-reply: reported below
        except BaseException:
            return False, "could not unpickle the reply:\n" + traceback.format_exc(), None
        if proc.is_alive():
            return None, None, None
        proc.join(1.0)
        running = self._running[rank].value.decode("utf-8", "replace")
        exited = Exited(proc.exitcode, running)
        return (True, exited, None) if rank in allow_exit else (False, exited, None)

    def close(self) -> None:
        """Asks the ranks to exit, then kills whatever is left after a short grace."""
        self._send_all(b"")
        deadline = time.monotonic() + 5.0
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        self.kill()

    def kill(self) -> None:
        """Kills every rank now (idempotent)."""
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
        for proc in self._procs:
            proc.join(5.0)
        for conn in self._conns:
            conn.close()
        self._procs, self._conns, self._running = [], [], []
