"""One case in this process: its settings, and running it on this process's device.

Every process that runs cases uses this: the parent for single-process cases, each
spawned rank (:mod:`bench.launch`) and each torchrun rank for multi-rank ones.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch

from bench.harness import ROLE_CASE, CaseSpec, Ctx, DistInfo, HostMemory, Row
from bench.ranks import note_running
from bench.suites import get_suite

__all__ = ["Settings", "case_row", "local_device", "run_case_here"]


@dataclass
class Settings:
    """How every case is measured (picklable: it travels to the spawned ranks)."""

    size: str
    device: str
    repeat: int
    warmup: int
    budget_s: float
    case_timeout_s: float
    pg_timeout_s: float
    world_size: int


_HOST_MEMORY: HostMemory | None = None


def _freeze_heap() -> None:
    """Moves every object alive now (torch's modules, mostly) out of the cyclic garbage
    collector's reach, so the ``gc.collect()`` before each memory probe walks only the
    case's own objects, not every object torch created at import: that walk would be
    part of every probe and grow with what happens to be imported."""
    gc.collect()
    gc.freeze()


def _host_memory() -> HostMemory:
    global _HOST_MEMORY
    if _HOST_MEMORY is None:
        _HOST_MEMORY = HostMemory()
    return _HOST_MEMORY


def case_row(spec: CaseSpec, settings: Settings, status: str, reason: str, world: int = 1) -> Row:
    """A row standing for a whole case that could not run (device missing, setup failed)."""
    return Row(
        suite=spec.suite, case=spec.name, impl="(case)", role=ROLE_CASE, status=status,
        reason=reason, device=settings.device, world_size=world, bytes=0, tensors=0,
        bound=spec.bound, params=dict(spec.params), plot=spec.plot,
    )


def local_device(settings: Settings) -> torch.device:
    """This process's device for ``settings.device`` (a rank's GPU is already current)."""
    if settings.device == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def run_case_here(
    spec: CaseSpec, settings: Settings, device: torch.device, rows: list[Row], multi_rank: bool
) -> None:
    """Runs one case in this process (on every rank when ``multi_rank``), appending rows.

    Rows measured before a failure are kept: they are appended even when the case raises.
    """
    info = None
    if multi_rank:
        import torch.distributed as dist

        info = DistInfo(dist.get_rank(), dist.get_world_size(), device)
    suite = get_suite(spec.suite)
    _freeze_heap()  # after the suite's imports, before the case's inputs exist
    ctx = Ctx(
        spec, device, settings.repeat, settings.warmup, settings.budget_s, info, _host_memory()
    )
    note_running(f"{spec.suite}: {spec.name}: building its inputs")
    try:
        suite.run(spec, ctx)
    finally:
        rows.extend(ctx.rows)
