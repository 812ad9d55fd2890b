"""Suite ``limits``: the hardware bounds every other case is compared with.

* ``memcpy``: one big host buffer copied with ``Tensor.copy_`` (parallel over PyTorch's
  threads) and with libc ``memcpy`` (one thread); the bound is the faster of the two.
* On CUDA: one big pinned device-to-host and host-to-device copy (a single
  ``cudaMemcpyAsync``: the PCIe bound) and one device-to-device copy.
* On several ranks: one ``broadcast`` and one all-gather of a single big buffer, the most
  a collective-based state-dict function can reach on this process group.
* ``shm_populate``: allocating and mapping a fresh shared-memory segment, every page
  (``memfd_create`` + ``mmap(MAP_POPULATE)``, Linux), the floor of creating tensors in
  shared memory: they must get pages, and the kernel's page allocation, not copying,
  is the cost.

The bound of a family is the best GB/s of its ``bound`` rows; a case's "% of bound" is
its GB/s over that. sdict_ext's ``batched_copy_`` of the same single buffer counts as a
bound row too: the bound is the fastest single-buffer copy measured, whoever does it.
"""

from __future__ import annotations

import ctypes
import mmap
import os

import torch
import torch.distributed as dist

from bench.harness import ROLE_BOUND, CaseSpec, Ctx, load_sdict
from bench.suites._inputs import fmt_bytes

__all__ = ["BOUNDS", "cases", "run"]

MB = 1024 * 1024

#: Bound families and the device they need ("any", "cuda") and whether they are
#: measured on every rank of a process group.
BOUNDS = {
    "memcpy": ("any", False),
    "d2h": ("cuda", False),
    "h2d": ("cuda", False),
    "d2d": ("cuda", False),
    "broadcast": ("any", True),
    "all_gather": ("any", True),
    "shm_populate": ("any", False),
}

# Host/device copy bytes, collective bytes.
_SIZES = {
    "tiny": (64 * MB, 16 * MB),
    "small": (256 * MB, 64 * MB),
    "medium": (1024 * MB, 256 * MB),
    "large": (4096 * MB, 1024 * MB),
}


def cases(size: str, device: str) -> list[CaseSpec]:
    """One case per bound family available on ``device``."""
    copy_bytes, coll_bytes = _SIZES[size]
    out = []
    for bound, (needs, multi_rank) in BOUNDS.items():
        if needs == "cuda" and device != "cuda":
            continue
        nbytes = coll_bytes if multi_rank else copy_bytes
        out.append(CaseSpec(
            "limits", f"{bound} {fmt_bytes(nbytes)}", multi_rank=multi_rank, bound=bound,
            params=dict(kind=bound, bytes=nbytes),
        ))
    return out


def run(spec: CaseSpec, ctx: Ctx) -> None:
    """Measures the bound rows of one family (and sdict_ext's single-buffer copy)."""
    kind, nbytes = spec.params["kind"], spec.params["bytes"]
    if kind in ("broadcast", "all_gather"):
        _run_collective(kind, nbytes, ctx)
        return
    if kind == "shm_populate":
        _run_shm_populate(nbytes, ctx)
        return
    cpu, dev = torch.device("cpu"), ctx.device
    pinned = torch.cuda.is_available()
    ends = {"memcpy": (cpu, cpu), "d2h": (dev, cpu), "h2d": (cpu, dev), "d2d": (dev, dev)}
    src_dev, dst_dev = ends[kind]
    src = torch.ones(nbytes, dtype=torch.uint8, device=src_dev,
                     pin_memory=pinned and src_dev == cpu)
    dst = torch.zeros(nbytes, dtype=torch.uint8, device=dst_dev,
                      pin_memory=pinned and dst_dev == cpu)
    nb = kind != "memcpy"
    ctx.measure(
        "torch copy_ (one buffer)", ROLE_BOUND, lambda: dst.copy_(src, non_blocking=nb),
        nbytes=nbytes, tensors=1,
    )
    if kind == "memcpy":
        memmove = ctypes.memmove
        ctx.measure(
            "libc memcpy (one thread)", ROLE_BOUND,
            lambda: memmove(dst.data_ptr(), src.data_ptr(), nbytes), nbytes=nbytes, tensors=1,
        )
    fn, why = load_sdict("ops", "batched_copy_")
    if fn is not None and dev.type == "cuda":
        from sdict_ext import ops

        if not ops.has_cuda():
            fn, why = None, "sdict_ext was built without its CUDA kernels"
    # A bound row too: the bound is the fastest single-buffer copy this machine does,
    # whoever does it.
    ctx.measure(
        "sdict_ext.batched_copy_ (one buffer)", ROLE_BOUND,
        (lambda: fn([dst], [src], non_blocking=nb)) if fn else None,
        nbytes=nbytes, tensors=1, missing=why,
    )


def _run_collective(kind: str, nbytes: int, ctx: Ctx) -> None:
    world = ctx.world_size
    if kind == "broadcast":
        buf = torch.ones(nbytes, dtype=torch.uint8, device=ctx.device)
        ctx.measure(
            "dist.broadcast (one buffer)", ROLE_BOUND, lambda: dist.broadcast(buf, 0),
            nbytes=nbytes, tensors=1,
        )
        return
    # The all-gathered output is nbytes in total, each rank contributing its share.
    per_rank = nbytes // world
    inp = torch.ones(per_rank, dtype=torch.uint8, device=ctx.device)
    out = torch.empty(per_rank * world, dtype=torch.uint8, device=ctx.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    ctx.measure(
        f"dist.{gather.__name__} (one buffer)", ROLE_BOUND, lambda: gather(out, inp),
        nbytes=per_rank * world, tensors=1,
    )


def _run_shm_populate(nbytes: int, ctx: Ctx) -> None:
    impl = "memfd + mmap(MAP_POPULATE) (one thread)"
    if not hasattr(os, "memfd_create") or not hasattr(mmap, "MAP_POPULATE"):
        ctx.skip(impl, ROLE_BOUND, "needs Linux (memfd_create, MAP_POPULATE)", nbytes, 1)
        return

    def populate() -> None:
        fd = os.memfd_create("bench", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, nbytes)
            mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE).close()
        finally:
            os.close(fd)

    ctx.measure(impl, ROLE_BOUND, populate, nbytes=nbytes, tensors=1)
    # A bound row too (as batched_copy_ is for memcpy): the same pages populated with
    # MADV_POPULATE_WRITE on all of torch's threads, the fastest way found here.
    fn, why = load_sdict("host.memory", "shared_storage")
    ctx.measure(
        "sdict_ext shared_storage (MADV_POPULATE_WRITE, all threads)", ROLE_BOUND,
        (lambda: fn(nbytes)) if fn else None, nbytes=nbytes, tensors=1, missing=why,
    )
