"""Many host tensors carved out of one allocation (optionally pinned and/or shared).

PyTorch's ``_create_cpu_state_dict`` allocates, pins and shares every tensor on its own:
one pinned-allocator block (rounded up to a power of two) per tensor, one
``cudaHostRegister`` per tensor with ``share_memory=True`` (slow per byte on some hosts),
and one shared-memory segment plus one open file per tensor, so 20,000 tensors exhaust
the file descriptors. Here a state dict gets one slab: one allocation, at most one
shared-memory segment and one registration, released when the last tensor carved out
of it dies.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from itertools import accumulate, repeat
from operator import add, and_, floordiv, itemgetter, mul

import torch

from sdict_ext import ops
from sdict_ext.host.memory import check_fits, fit_limits, pin_storage, shared_storage

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
            # The caller of create_cpu_state_dict (through _allocate, carve,
            # _host_tensors and create_cpu_state_dict itself).
            stacklevel=6,
        )


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
    if share_memory:
        # One segment, allocated and mapped once (share_memory_() would allocate a
        # segment, then copy the fresh tensor into it, faulting every page twice).
        slab = torch.empty(0, dtype=torch.uint8).set_(shared_storage(nbytes, pin_memory))
    else:
        if pin_memory:
            # Registering populates and locks every page: refuse what cannot fit first.
            check_fits(nbytes, "create_cpu_state_dict(pin_memory=True): pinned memory",
                       fit_limits(pinned=True, shared=False))
        slab = torch.empty(nbytes, dtype=torch.uint8)
    if pin_memory:
        # Registering our own allocation, rather than taking a block from the pinned
        # caching allocator, avoids its power-of-two round-up and lets the memory go
        # back to the system when the state dict dies. Under the current device, which
        # a stager's worker sets to its caller's.
        pin_storage(slab.untyped_storage(), torch.cuda.current_device())
    return slab


def _contiguous(shape: Sequence[int]) -> tuple[int, tuple[int, ...]]:
    """``(numel, strides)`` of a contiguous tensor of ``shape``."""
    if len(shape) == 1:  # most distinct shapes (biases, norms, flat buffers)
        return shape[0], (1,)
    strides = []
    numel = 1
    for size in reversed(shape):
        strides.append(numel)
        numel *= size
    return numel, tuple(reversed(strides))


def carve(
    shapes: Sequence[Sequence[int]],
    dtypes: Sequence[torch.dtype],
    *,
    pin_memory: bool = False,
    share_memory: bool = False,
) -> tuple[list[torch.Tensor | None], list[int]]:
    """Contiguous, uninitialised host tensors of the given shapes, all views of one slab.

    This is the per-tensor part of :func:`sdict_ext.utils.create_cpu_state_dict`, so
    every per-tensor step is a C-level ``map`` over the specs (no Python bytecode runs
    per tensor): the layout from lookups in per-shape and per-dtype tables and an
    ``accumulate`` of slot sizes, then one C++ call that makes every tensor on the
    slab's storage.

    Args:
        shapes: the shape of each tensor to create (hashable: tuples or torch.Size).
        dtypes: the dtype of each tensor.
        pin_memory: pin the slab (one registration). Without an accelerator this
            warns once and returns pageable memory.
        share_memory: put the slab in one shared-memory segment.

    Returns:
        ``(tensors, empty)``: one tensor per spec on the slab's storage, 16-byte aligned,
        zero for a 0-dim spec (as PyTorch makes them) and uninitialised otherwise; None
        for the zero-element specs, whose indices ``empty`` lists (they need no bytes,
        and the caller knows what they should be).
    """
    align = ops.ALIGNMENT
    # Shapes repeat (every layer has the same ones): numel and strides once per shape.
    geometry = {shape: _contiguous(shape) for shape in set(shapes)}
    itemsize = {dtype: dtype.itemsize for dtype in set(dtypes)}
    numels = list(map(geometry.__getitem__, shapes))
    strides = list(map(itemgetter(1), numels))
    numels = list(map(itemgetter(0), numels))
    itemsizes = list(map(itemsize.__getitem__, dtypes))
    # Every slot is rounded up to the alignment, so every offset is aligned (for
    # every dtype too): (nbytes + align - 1) & -align.
    slots = map(and_, map(add, map(mul, numels, itemsizes), repeat(align - 1)), repeat(-align))
    offsets = list(accumulate(slots, initial=0))
    total = offsets.pop()
    empty = [i for i, numel in enumerate(numels) if not numel] if 0 in numels else []
    if not total:
        return [None] * len(numels), empty
    slab = _allocate(total, pin_memory, share_memory)
    elements = list(map(floordiv, offsets, itemsizes))
    out: list[torch.Tensor | None]
    if type(slab) is torch.Tensor:
        # One C++ call makes every tensor: as_strided from Python goes through the
        # dispatcher per tensor, which would dominate 20,000 small tensors.
        out = ops.carve_views(slab, list(dtypes), list(shapes), strides, elements)
    else:  # a tensor subclass (FakeTensorMode...): views through the dispatcher
        typed = {dtype: slab.view(dtype) for dtype in itemsize}
        out = list(map(
            torch.Tensor.as_strided, map(typed.__getitem__, dtypes), shapes, strides, elements
        ))
    for i in empty:
        out[i] = None
    if () in geometry:
        for i in [i for i, shape in enumerate(shapes) if not shape]:
            out[i].zero_()
    return out, empty
