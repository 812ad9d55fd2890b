"""Suite ``staging``: ``sdict_ext.staging.PinnedStager`` against PyTorch's stagers.

A checkpoint stager snapshots the (device) state dict into host memory so training can
go on while the snapshot is written. Two numbers matter per checkpoint, and both are
recorded for every stager:

* the *blocking* time: how long ``stage()`` holds the trainer (``extra.blocking_s``),
* the *total* staging time: until the snapshot is complete (the row's time and GB/s).

Stagers are reused across checkpoints, as a trainer does, so the timed runs measure the
steady state (the warm-up run pays for allocating and pinning the host copy).
Compared: ``DefaultStager`` (async, its storage cache; on a torch whose DefaultStager
cannot stage twice, such as 2.11, a new one per checkpoint: "one per stage"), a plain
``_copy_state_dict`` into a host copy made once with ``_create_cpu_state_dict`` (what
``BlockingAsyncStager`` with ``cache_staged_state_dict=True`` does), and ``PinnedStager``.
Two workloads from issue 6: ~300 large tensors (a model) and 20,000 small ones.
"""

from __future__ import annotations

import functools
import time
from concurrent.futures import Future

import torch
import torch.distributed._state_dict_utils as tsu
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from bench.harness import ROLE_SDICT, ROLE_TORCH, CaseSpec, Ctx, load_sdict
from bench.suites._inputs import DTYPE_MIX, fmt_bytes, make_tensors, random_numels, total_bytes

__all__ = ["cases", "run"]

KB, MB = 1024, 1024 * 1024

_SIZES = {
    "tiny": dict(large=(32, 256 * KB), small=(1_000, 256, 4 * KB)),
    "small": dict(large=(300, 512 * KB), small=(20_000, 256, 16 * KB)),
    "medium": dict(large=(300, 4 * MB), small=(20_000, 1 * KB, 64 * KB)),
    "large": dict(large=(300, 32 * MB), small=(100_000, 1 * KB, 64 * KB)),
}


def cases(size: str, device: str) -> list[CaseSpec]:
    """The suite's cases at ``size`` for ``device``."""
    p = _SIZES[size]
    bound = "memcpy" if device == "cpu" else "d2h"
    count, each = p["large"]
    count_s, lo, hi = p["small"]
    return [
        CaseSpec("staging", f"stage {count}x{fmt_bytes(each)} (model-like)", bound=bound,
                 params=dict(count=count, lo=each, hi=each)),
        CaseSpec("staging", f"stage {count_s}x{fmt_bytes(lo)}-{fmt_bytes(hi)} small tensors",
                 bound=bound, params=dict(count=count_s, lo=lo, hi=hi)),
    ]


def _timed_stage(stage, state_dict, synchronize) -> dict[str, float]:
    """Runs one checkpoint's staging; returns the trainer's blocking time."""
    t0 = time.perf_counter()
    out = stage(state_dict)
    blocking = time.perf_counter() - t0
    if isinstance(out, Future):
        out.result()
    synchronize()
    return {"blocking_s": blocking}


@functools.cache
def _default_stager_stages_twice() -> bool:
    """Whether one DefaultStager can stage again (torch 2.13 can).

    torch 2.11's DefaultStager closes its StateDictStager at the end of every stage,
    which clears the copier table (and the storage cache) that the next stage needs: the
    second stage raises KeyError. Such a DefaultStager serves one checkpoint.
    """
    probe = DefaultStager(StagingOptions(False, False, False, False))
    try:
        sd = {"x": torch.zeros(2)}
        probe.stage(sd)
        probe.stage(sd)
        return True
    except Exception:
        return False
    finally:
        probe.close()


def _measure_default_stager(ctx: Ctx, sd: dict, nbytes: int, n: int, options) -> None:
    """DefaultStager reused across checkpoints; one per checkpoint where it must be.

    A new one is made (and the previous one closed) untimed, before each run. Such a
    torch keeps no storage cache across stages either, so that is its steady state.
    """
    reusable = _default_stager_stages_twice()
    live: list = []

    def stager_for_run() -> tuple:
        if not (reusable and live):
            while live:
                live.pop().close()
            live.append(DefaultStager(options))
        return (live[-1],)

    try:
        ctx.measure(
            "torch DefaultStager (async)" if reusable
            else "torch DefaultStager (async, one per stage)", ROLE_TORCH,
            lambda stager: _timed_stage(stager.stage, sd, stager.synchronize_staging),
            nbytes=nbytes, tensors=n, setup=stager_for_run, reports_times=True,
        )
    finally:
        while live:
            live.pop().close()


def _measure_plain_copy(ctx: Ctx, sd: dict, nbytes: int, n: int) -> None:
    """``_copy_state_dict`` into a host copy made once; the copy dies with this frame."""
    cached = tsu._create_cpu_state_dict(sd, pin_memory=ctx.device.type == "cuda")

    def plain_copy():
        t0 = time.perf_counter()
        tsu._copy_state_dict(sd, cached)
        return {"blocking_s": time.perf_counter() - t0}

    ctx.measure(
        "torch _copy_state_dict into cached host copy", ROLE_TORCH, plain_copy,
        nbytes=nbytes, tensors=n, reports_times=True,
    )


def run(spec: CaseSpec, ctx: Ctx) -> None:
    """Builds the state dict and measures every stager on it."""
    p = spec.params
    specs = random_numels(p["count"], p["lo"], p["hi"], DTYPE_MIX, seed=21)
    tensors = make_tensors(specs, ctx.device, seed=22)
    sd = {f"layers.{i // 8}.w{i % 8}": t for i, t in enumerate(tensors)}
    nbytes, n = total_bytes(tensors), len(tensors)
    cuda = ctx.device.type == "cuda"

    _measure_default_stager(ctx, sd, nbytes, n, StagingOptions(
        use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=True,
        use_non_blocking_copy=cuda,
    ))
    _measure_plain_copy(ctx, sd, nbytes, n)

    cls, why = load_sdict("staging", "PinnedStager")
    if cls is None:
        ctx.skip("sdict_ext PinnedStager (async)", ROLE_SDICT, why, nbytes, n)
        return
    try:
        stager = cls(pin_memory=cuda, share_memory=False, async_staging=True)
    except Exception as exc:
        ctx.skip("sdict_ext PinnedStager (async)", ROLE_SDICT,
                 f"PinnedStager(...) failed: {type(exc).__name__}: {exc}", nbytes, n)
        return

    def verify() -> bool:
        out = stager.stage(sd)
        staged = out.result() if isinstance(out, Future) else out
        stager.synchronize_staging()
        return staged.keys() == sd.keys() and all(
            torch.equal(staged[k].cpu(), v.cpu()) for k, v in sd.items()
        )

    try:
        ctx.measure(
            "sdict_ext PinnedStager (async)", ROLE_SDICT,
            lambda: _timed_stage(stager.stage, sd, stager.synchronize_staging),
            nbytes=nbytes, tensors=n, verify=verify, reports_times=True,
        )
    finally:
        stager.close()
