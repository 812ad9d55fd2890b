"""Multi-rank cases: spawned gloo / NCCL ranks on 127.0.0.1, or the ranks of ``torchrun``.

Spawned mode: the parent hosts the rendezvous ``TCPStore`` on a port the kernel picks
(no free-port race with other programs), starts ``world_size`` processes, and feeds them
one case at a time over pipes. Every wait has a deadline: a group that does not come up,
a rank that raises, dies, or does not finish a case in time, gets the whole group killed
and the case reported as an error; the next case gets a fresh group, because a group
whose ranks stopped at different collectives cannot be trusted again.

torchrun mode: this process is one of the ranks already; the caller runs the cases in
place on the default process group.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import time
import traceback
import warnings
from contextlib import contextmanager
from datetime import timedelta
from multiprocessing.connection import wait
from typing import Any

__all__ = ["CaseFailed", "RankGroup", "init_rank", "torchrun_env"]

#: Bound on forming a group: importing torch in several processes on two busy cores can
#: take tens of seconds.
STARTUP_TIMEOUT_S = 180.0

#: Bytes of the shared record in which each rank says what it is running.
_RUNNING_BYTES = 512

_CTX = multiprocessing.get_context("spawn")


class CaseFailed(RuntimeError):
    """A multi-rank case failed or timed out; ``rows`` holds what rank 0 measured first."""

    def __init__(self, message: str, rows: list[Any], details: str = "") -> None:
        super().__init__(message)
        self.rows = rows
        self.details = details


def torchrun_env() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` when launched by torchrun, else None."""
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    if not all(k in os.environ for k in keys):
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])


def init_rank(
    device_type: str, rank: int, world_size: int, local_rank: int, pg_timeout_s: float,
    store: Any = None,
):
    """Joins the default process group (gloo on CPU, NCCL on CUDA); returns the device."""
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


def _worker_main(
    rank: int, world_size: int, port: int, device_type: str, threads: int,
    pg_timeout_s: float, conn: Any, running: Any,
) -> None:
    warnings.filterwarnings("ignore")
    try:
        import torch
        import torch.distributed as dist

        from bench.harness import print_stacks_on_fatal_signal, record_running_in
        from bench.runner import run_case_here

        # A fatal signal leaves no exception to send back: the stacks go onto the
        # stderr the bench shares.
        print_stacks_on_fatal_signal()
        record_running_in(running)

        torch.set_num_threads(threads)
        store = dist.TCPStore(
            "127.0.0.1", port, is_master=False, timeout=timedelta(seconds=STARTUP_TIMEOUT_S)
        )
        device = init_rank(device_type, rank, world_size, rank, pg_timeout_s, store=store)
    except BaseException:
        conn.send_bytes(pickle.dumps((False, traceback.format_exc(), [])))
        return
    conn.send_bytes(pickle.dumps((True, None, [])))
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError, KeyboardInterrupt):
            break
        if not data:
            break
        spec, settings = pickle.loads(data)
        rows: list[Any] = []
        try:
            run_case_here(spec, settings, device, rows, multi_rank=True)
            conn.send_bytes(pickle.dumps((True, None, rows if rank == 0 else [])))
        except BaseException:
            # The group may be stuck mid-collective: report and leave; the parent
            # replaces the group.
            reply = (False, traceback.format_exc(), rows if rank == 0 else [])
            conn.send_bytes(pickle.dumps(reply))
            break
    # Skip interpreter teardown: tearing down a process group whose peers are gone can
    # block, and the parent joins with a short deadline anyway.
    os._exit(0)


def _last_frame(text: str) -> str:
    """``'ValueError: bad (at utils.py:12)'`` from a formatted traceback."""
    lines = text.strip().splitlines()
    where = ""
    for line in reversed(lines):
        line = line.strip()
        if line.startswith('File "'):
            path, _, rest = line[6:].partition('", line ')
            where = f" (at {os.path.basename(path)}:{rest.split(',')[0]})"
            break
    return (lines[-1] if lines else "no traceback") + where


@contextmanager
def _thread_env(threads: int):
    """Children read OpenMP's thread count from the environment when torch starts."""
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class RankGroup:
    """``world_size`` spawned ranks joined in one process group, running cases on request."""

    def __init__(self, world_size: int, device_type: str, pg_timeout_s: float) -> None:
        import torch.distributed as dist

        self.world_size = world_size
        threads = max(1, (os.cpu_count() or 1) // world_size)
        self._store = dist.TCPStore(
            "127.0.0.1", 0, is_master=True, wait_for_workers=False,
            timeout=timedelta(seconds=STARTUP_TIMEOUT_S),
        )
        self._procs: list[Any] = []
        self._conns: list[Any] = []
        self._running: list[Any] = []
        try:
            with _thread_env(threads):
                for rank in range(world_size):
                    parent_end, child_end = _CTX.Pipe()
                    running = _CTX.Array("c", _RUNNING_BYTES, lock=False)
                    self._running.append(running)
                    proc = _CTX.Process(
                        target=_worker_main,
                        args=(rank, world_size, self._store.port, device_type, threads,
                              pg_timeout_s, child_end, running),
                        name=f"bench-rank{rank}", daemon=True,
                    )
                    proc.start()
                    child_end.close()
                    self._procs.append(proc)
                    self._conns.append(parent_end)
            self._collect(STARTUP_TIMEOUT_S, "starting the rank group")
        except BaseException:
            self.kill()
            raise

    def run_case(self, spec: Any, settings: Any, timeout_s: float) -> list[Any]:
        """Runs one case on every rank; returns rank 0's rows or raises :class:`CaseFailed`."""
        payload = pickle.dumps((spec, settings))
        for conn in self._conns:
            try:
                conn.send_bytes(payload)
            except OSError:
                pass  # a dead rank is reported by _collect
        return self._collect(timeout_s, f"case {spec.name!r}")

    def _collect(self, timeout_s: float, what: str) -> list[Any]:
        pending = set(range(self.world_size))
        failures: dict[int, str] = {}
        rows: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while pending:
            remaining = deadline - time.monotonic()
            if failures:
                # Ranks blocked on a failed peer only fail at the collective timeout;
                # the first traceback is the useful one.
                remaining = min(remaining, 5.0)
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
                try:
                    if conn.poll():
                        ok, error, rank_rows = pickle.loads(conn.recv_bytes())
                    elif not self._procs[rank].is_alive():
                        ok, error, rank_rows = False, self._exit_text(rank), []
                    else:
                        continue
                except (EOFError, OSError):
                    ok, error, rank_rows = False, self._exit_text(rank), []
                pending.discard(rank)
                rows.extend(rank_rows)
                if not ok:
                    failures[rank] = error
        if failures or pending:
            parts = [f"{what} failed on {self.world_size} ranks"]
            for rank in sorted(failures):
                parts.append(f"rank {rank}: {_last_frame(failures[rank])}")
            if pending:
                parts.append(f"ranks {sorted(pending)} gave no answer within {timeout_s:g}s")
            details = "\n".join(
                f"----- rank {rank} -----\n{failures[rank].rstrip()}" for rank in sorted(failures)
            )
            self.kill()
            raise CaseFailed("; ".join(parts), rows, details)
        return rows

    def _exit_text(self, rank: int) -> str:
        """How rank ``rank`` died, and what it was running then (its stacks, for a fatal
        signal, are on stderr just above)."""
        self._procs[rank].join(1.0)
        code = self._procs[rank].exitcode
        how = f"exit code {code}"
        if code is not None and code < 0:
            try:
                how += f", {signal.Signals(-code).name}"
            except ValueError:
                pass
        running = self._running[rank].value.decode("utf-8", "replace") or "nothing yet"
        return f"rank process exited ({how}) while running {running}"

    def close(self) -> None:
        """Asks the ranks to exit, then kills whatever is left after a short grace."""
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
        self._procs, self._conns, self._running = [], [], []
