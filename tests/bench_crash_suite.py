"""A benchmark suite for the harness's own specs (``tests/test_bench.py``), injected by
its module path as a case's suite: its implementation kills rank 0 with a fatal
signal, as a segfault in native code would, while the other ranks carry on."""

from __future__ import annotations

import os
import signal

from bench.harness import ROLE_SDICT, ROLE_TORCH, CaseSpec, Ctx

__all__ = ["CASE", "IMPL", "cases", "run"]

CASE = "killed by SIGSEGV on rank 0"
IMPL = "sdict_ext crashing implementation"


def cases(size: str, device: str) -> list[CaseSpec]:
    """The one case, whatever the size and device."""
    return [CaseSpec(__name__, CASE, multi_rank=True)]


def _segfault() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


def run(spec: CaseSpec, ctx: Ctx) -> None:
    """Measures a harmless baseline, then the implementation that dies on rank 0."""
    ctx.measure("torch no-op", ROLE_TORCH, lambda: None, nbytes=0, tensors=0)
    crash = _segfault if ctx.rank == 0 else (lambda: None)
    ctx.measure(IMPL, ROLE_SDICT, crash, nbytes=0, tensors=0)
