"""Many host tensors carved out of one allocation (optionally pinned and/or shared).

PyTorch's ``_create_cpu_state_dict`` allocates, pins and shares every tensor on its own:
one pinned-allocator block (rounded up to a power of two) per tensor, one
``cudaHostRegister`` per tensor with ``share_memory=True`` (about 1 GB/s on some hosts),
and one shared-memory segment plus one open file per tensor, so 20,000 tensors exhaust
the file descriptors. Here a state dict gets one slab: one allocation, at most one
shared-memory segment and one registration, released when the last tensor carved out
of it dies.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence

import torch

from sdict_ext import ops

__all__ = ["carve", "pinning_available"]

_warned_no_pinning = False


def pinning_available() -> bool:
    """Whether this torch can pin host memory (a CUDA or other accelerator build with a device)."""
    if torch.cuda.is_available():
        return True
    accelerator = getattr(torch, "accelerator", None)
    return accelerator is not None and accelerator.is_available()


def _warn_no_pinning() -> None:
    global _warned_no_pinning
    if not _warned_no_pinning:
        _warned_no_pinning = True
        # PyTorch raises here; DataLoader(pin_memory=True) warns and goes on instead,
        # which is what a CPU-only test or CI run of a trainer needs.
        warnings.warn(
            "create_cpu_state_dict(pin_memory=True): no accelerator is available, so host "
            "memory cannot be pinned; returning pageable tensors",
            stacklevel=4,
        )


def _unregister(ptr: int) -> None:
    err = int(torch.cuda.cudart().cudaHostUnregister(ptr))
    if err != 0:
        # Runs from a finalizer, where raising is swallowed; a warning at least surfaces.
        warnings.warn(f"cudaHostUnregister failed with cudaError {err}", stacklevel=1)


def _register(slab: torch.Tensor) -> None:
    storage = slab.untyped_storage()
    ptr, nbytes = storage.data_ptr(), storage.nbytes()
    # cudaHostRegisterPortable (1): pinned for every CUDA context, as PyTorch registers it.
    err = int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 1))
    if err != 0:
        raise RuntimeError(f"create_cpu_state_dict: cudaHostRegister of {nbytes} bytes failed "
                           f"with cudaError {err}")
    # The storage object is preserved while any view of it lives, so this fires exactly
    # when the last carved tensor is gone, and the range can be registered again later.
    weakref.finalize(storage, _unregister, ptr)


def _allocate(nbytes: int, pin_memory: bool, share_memory: bool) -> torch.Tensor:
    if pin_memory and not pinning_available():
        _warn_no_pinning()
        pin_memory = False
    if pin_memory and not torch.cuda.is_available():
        if share_memory:
            raise RuntimeError(
                "create_cpu_state_dict: pin_memory=True with share_memory=True needs CUDA "
                "(it registers a shared segment with cudaHostRegister)"
            )
        return torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    slab = torch.empty(nbytes, dtype=torch.uint8)
    if share_memory:
        slab.share_memory_()
    if pin_memory:
        # Registering our own allocation, rather than taking a block from the pinned
        # caching allocator, avoids its power-of-two round-up and lets the memory go
        # back to the system when the state dict dies.
        _register(slab)
    return slab


def carve(
    specs: Sequence[tuple[Sequence[int], torch.dtype]],
    *,
    pin_memory: bool = False,
    share_memory: bool = False,
) -> list[torch.Tensor]:
    """Contiguous, uninitialised host tensors of the given shapes, all views of one slab.

    Args:
        specs: ``(shape, dtype)`` of each tensor to create.
        pin_memory: pin the slab (one registration). Without an accelerator this
            warns once and returns pageable memory.
        share_memory: put the slab in one shared-memory segment.

    Returns:
        One tensor per spec. Zero-element tensors are ordinary empty tensors (they
        need no bytes); every other tensor is a view into the slab, 16-byte aligned.
    """
    align = ops.ALIGNMENT
    # Shapes repeat (every layer has the same ones), so their numel and contiguous
    # strides are computed once per shape.
    geometry: dict[tuple[int, ...], tuple[int, tuple[int, ...]]] = {}
    layout: list[tuple[tuple[int, ...], tuple[int, ...], torch.dtype, int]] = []
    cursor = 0
    for shape, dtype in specs:
        shape = tuple(shape)
        geo = geometry.get(shape)
        if geo is None:
            strides = []
            numel = 1
            for s in reversed(shape):
                strides.append(numel)
                numel *= s
            geo = geometry[shape] = (numel, tuple(reversed(strides)))
        numel, stride = geo
        if numel == 0:
            layout.append((shape, stride, dtype, -1))
            continue
        cursor = (cursor + align - 1) // align * align
        layout.append((shape, stride, dtype, cursor // dtype.itemsize))
        cursor += numel * dtype.itemsize
    total = (cursor + align - 1) // align * align
    slab = _allocate(total, pin_memory, share_memory) if total else None
    # One typed view of the slab per dtype, then one as_strided per tensor: the
    # cheapest way to make many views (slab offsets are aligned for every dtype).
    typed: dict[torch.dtype, torch.Tensor] = {}
    out: list[torch.Tensor] = []
    for shape, stride, dtype, offset in layout:
        if offset < 0:
            out.append(torch.empty(shape, dtype=dtype))
            continue
        view = typed.get(dtype)
        if view is None:
            view = typed[dtype] = slab.view(dtype)
        out.append(view.as_strided(shape, stride, offset))
    return out
