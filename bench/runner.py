"""Runs the selected cases: single-process ones here, multi-rank ones on a rank group.

Single-process cases run first, then the multi-rank ones, so spawning the ranks (each
imports torch) never competes for the CPU with a timing in this process.
"""

from __future__ import annotations

import sys
import time
import traceback
from typing import Any, TextIO

import torch

from bench.case import Settings, case_row, local_device, run_case_here
from bench.harness import CaseSpec, Row
from bench.launch import CaseFailed, RankGroup

__all__ = ["Progress", "describe_rows", "run_cases", "run_torchrun"]


class Progress:
    """One line per case on stderr; a redrawn bar when stderr is a terminal."""

    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.total = max(total, 1)
        self.done = 0
        # Looked up now, not at import, so a redirected stderr is honoured.
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self._t0 = 0.0

    def _bar(self) -> str:
        width = 24
        filled = width * self.done // self.total
        return "[" + "#" * filled + "." * (width - filled) + f"] {self.done}/{self.total}"

    def start(self, spec: CaseSpec) -> None:
        self._t0 = time.perf_counter()
        if self.enabled and self.tty:
            self.stream.write(f"\r\033[K{self._bar()} {spec.suite}: {spec.name}")
            self.stream.flush()

    def finish(self, spec: CaseSpec, rows: list[Row]) -> None:
        self.done += 1
        seconds = time.perf_counter() - self._t0
        statuses = sorted({r.status for r in rows}) or ["no rows"]
        line = f"{self._bar()} {spec.suite}: {spec.name} ({seconds:.1f}s, {'/'.join(statuses)})"
        if not self.enabled:
            return
        if self.tty:
            self.stream.write(f"\r\033[K{line}")
            if self.done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.stream.flush()


def _run_single(spec: CaseSpec, settings: Settings, progress: Progress) -> list[Row]:
    progress.start(spec)
    rows: list[Row] = []
    try:
        run_case_here(spec, settings, local_device(settings), rows, multi_rank=False)
    except Exception as exc:
        progress.note(f"{spec.suite}: {spec.name} failed:\n{traceback.format_exc().rstrip()}")
        rows.append(case_row(spec, settings, "error", f"{type(exc).__name__}: {exc}"))
    progress.finish(spec, rows)
    return rows


def _world(spec: CaseSpec, settings: Settings) -> int:
    """Ranks a multi-rank case runs on when the benchmark spawns them."""
    return max(settings.world_size, spec.min_world_size or 0)


def run_cases(
    specs: list[CaseSpec], settings: Settings, progress: Progress, multi_rank_skip: str | None
) -> list[Row]:
    """Runs every case (multi-rank ones on spawned ranks) and returns all rows.

    Args:
        multi_rank_skip: when set, why multi-rank cases cannot run here (they are
            reported as skipped with this reason).
    """
    rows: list[Row] = []
    for spec in [s for s in specs if not s.multi_rank]:
        rows.extend(_run_single(spec, settings, progress))

    # A case needing more ranks than --world-size gets a group of its own size; running
    # the cases by group size (stable, so the listed order holds within a size) starts
    # each size's group once.
    multi = sorted((s for s in specs if s.multi_rank), key=lambda s: _world(s, settings))
    group: RankGroup | None = None
    try:
        for spec in multi:
            progress.start(spec)
            ws = _world(spec, settings)
            if multi_rank_skip:
                case_rows = [case_row(spec, settings, "skipped", multi_rank_skip, ws)]
            else:
                case_rows = []
                try:
                    if group is not None and group.world_size != ws:
                        group.close()
                        group = None
                    if group is None:
                        backend = "NCCL" if settings.device == "cuda" else "gloo"
                        progress.note(f"starting {ws} {backend} ranks on 127.0.0.1")
                        group = RankGroup(ws, settings.device, settings.pg_timeout_s)
                    case_rows = group.run_case(spec, settings, settings.case_timeout_s)
                except CaseFailed as exc:
                    group = None  # killed by the failure; the next case gets a new one
                    if exc.details:
                        progress.note(f"{spec.suite}: {spec.name} failed:\n{exc.details}")
                    case_rows = list(exc.rows) + [
                        case_row(spec, settings, "error", str(exc), ws)
                    ]
                except Exception as exc:
                    if group is not None:
                        group.kill()
                    group = None
                    case_rows = [case_row(spec, settings, "error",
                                          f"{type(exc).__name__}: {exc}", ws)]
            rows.extend(case_rows)
            progress.finish(spec, case_rows)
    finally:
        if group is not None:
            group.close()
    return rows


def run_torchrun(
    specs: list[CaseSpec], settings: Settings, progress: Progress, device: torch.device
) -> list[Row] | None:
    """Runs the cases as one rank of a torchrun job (the default group is initialised).

    Every rank runs the multi-rank cases (rank 0's rows carry the slowest rank's times);
    rank 0 then runs the single-process ones alone and returns all rows; the other ranks
    return None (give them a disabled :class:`Progress`). After a failed multi-rank case the
    group may be out of step, so the remaining multi-rank cases are skipped.
    """
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    rows: list[Row] = []
    broken: str | None = None
    for spec in [s for s in specs if s.multi_rank]:
        progress.start(spec)
        case_rows: list[Row] = []
        if broken:
            case_rows.append(case_row(spec, settings, "skipped", broken, world))
        elif (spec.min_world_size or 0) > world:
            why = f"needs {spec.min_world_size} ranks, torchrun started {world}"
            case_rows.append(case_row(spec, settings, "skipped", why, world))
        else:
            try:
                run_case_here(spec, settings, device, case_rows, multi_rank=True)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                case_rows.append(case_row(spec, settings, "error", reason, world))
                broken = f"not run: an earlier multi-rank case failed ({spec.name})"
        progress.finish(spec, case_rows)
        rows.extend(case_rows)
    if rank != 0:
        return None
    for spec in [s for s in specs if not s.multi_rank]:
        rows.extend(_run_single(spec, settings, progress))
    return rows


def describe_rows(rows: list[Row]) -> dict[str, Any]:
    """Counts by status, for the closing line on stderr."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.status] = counts.get(row.status, 0) + 1
    return counts
