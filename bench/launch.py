"""Where multi-rank cases run: ranks spawned on 127.0.0.1, or the ranks of ``torchrun``.

Spawned mode: a :class:`RankGroup` is a :class:`bench.ranks.RankPool` (the rank pool the
tests use too) that runs one case at a time on every rank and reports in the
benchmark's terms: rank 0's rows, or a :class:`CaseFailed` that names each failing
rank's last frame. A failed case kills the group; the runner starts a fresh one for the
next case, because a group whose ranks stopped at different collectives cannot be
trusted again.

torchrun mode: this process is one of the ranks already; :func:`torchrun_env` says so,
and the caller runs the cases in place on the default process group.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from bench.case import Settings, local_device, run_case_here
from bench.harness import CaseSpec, Row
from bench.ranks import STARTUP_TIMEOUT_S, Exited, FailedWith, RankPool, RanksFailed, pickle_call

__all__ = ["CaseFailed", "RankGroup", "torchrun_env"]


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


def _case_on_rank(spec: CaseSpec, settings: Settings) -> list[Row]:
    """Runs on every rank of the pool: one case; rank 0's rows (the others' are empty)."""
    import torch.distributed as dist

    warnings.filterwarnings("ignore")
    rows: list[Row] = []
    reported = dist.get_rank() == 0
    try:
        run_case_here(spec, settings, local_device(settings), rows, multi_rank=True)
    except BaseException as exc:
        raise FailedWith(rows if reported else []) from exc
    return rows if reported else []


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


def _death(exited: Exited) -> str:
    """How a rank died, and what it was running then (its stacks, for a fatal signal,
    are on stderr above)."""
    how = f"exit code {exited.exitcode}"
    if exited.signal:
        how += f", {exited.signal}"
    return f"rank process exited ({how}) while running {exited.running or 'nothing yet'}"


def _case_failed(failed: RanksFailed, what: str, timeout_s: float) -> CaseFailed:
    texts = {
        rank: _death(f) if isinstance(f, Exited) else f for rank, f in failed.failures.items()
    }
    parts = [f"{what} failed on {failed.world_size} ranks"]
    parts += [f"rank {rank}: {_last_frame(texts[rank])}" for rank in sorted(texts)]
    if failed.pending:
        parts.append(f"ranks {sorted(failed.pending)} gave no answer within {timeout_s:g}s")
    details = "\n".join(
        f"----- rank {rank} -----\n{texts[rank].rstrip()}" for rank in sorted(texts)
    )
    rows = []
    for rank in range(failed.world_size):
        rows.extend(failed.results[rank] or failed.partial.get(rank) or [])
    return CaseFailed("; ".join(parts), rows, details)


class RankGroup:
    """``world_size`` spawned ranks joined in one process group, running cases on request.

    Raises:
        CaseFailed: the group did not form.
    """

    def __init__(self, world_size: int, device_type: str, pg_timeout_s: float) -> None:
        self.world_size = world_size
        # The ranks share the cores: one rank's threads must not steal another's.
        threads = max(1, (os.cpu_count() or 1) // world_size)
        try:
            self._pool = RankPool(world_size, pg_timeout_s, device_type, threads, name="bench")
        except RanksFailed as failed:
            raise _case_failed(failed, "starting the rank group", STARTUP_TIMEOUT_S) from None

    def run_case(self, spec: CaseSpec, settings: Settings, timeout_s: float) -> list[Row]:
        """Runs one case on every rank; returns rank 0's rows or raises :class:`CaseFailed`
        (the group is killed then)."""
        try:
            results = self._pool.call(pickle_call(_case_on_rank, (spec, settings), {}), timeout_s)
        except RanksFailed as failed:
            raise _case_failed(failed, f"case {spec.name!r}", timeout_s) from None
        return results[0]

    def close(self) -> None:
        """Asks the ranks to exit, then kills whatever is left after a short grace."""
        self._pool.close()

    def kill(self) -> None:
        """Kills every rank now."""
        self._pool.kill()
