"""Batched tensor copies and CPU offload over flat leaf lists.

The shared back end of copy / offload / create-CPU in :mod:`sdict_ext.utils`: pairs are
grouped by (destination device, source device) and each group is one
:func:`sdict_ext.ops.batched_copy_` call, instead of one ``copy_`` per tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from sdict_ext import ops
from sdict_ext._traverse import LEAF_DTENSOR, LEAF_OTHER, LEAF_SHARDED, LEAF_TENSOR

__all__ = ["batched_copy_pairs", "offload_leaves", "view_key"]

_CPU = torch.device("cpu")


def view_key(t: torch.Tensor) -> tuple[Any, ...]:
    """What makes two tensors the very same memory view (equal keys: identical tensors)."""
    return (
        t.device,
        t.untyped_storage().data_ptr(),
        t.storage_offset(),
        tuple(t.shape),
        tuple(t.stride()),
        t.dtype,
    )


def _dedupe(
    dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The pairs that copying one by one would leave visible, without aliasing.

    A destination that is its own source is dropped (``copy_`` would be a no-op,
    leaving any earlier write in place); a destination named several times (tied
    weights in a model state dict) keeps only its last pair, the one whose data a
    pair-by-pair copy leaves behind.
    """
    by_dst: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}
    for dst, src in zip(dsts, srcs):
        key = view_key(dst)
        if src is dst or (src.device == dst.device and view_key(src) == key):
            continue
        by_dst.pop(key, None)
        by_dst[key] = (dst, src)
    return list(by_dst.values())


def _groups(
    dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor]
) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    groups: dict[tuple[torch.device, torch.device], tuple[list, list]] = {}
    for dst, src in zip(dsts, srcs):
        group = groups.get((dst.device, src.device))
        if group is None:
            group = groups[(dst.device, src.device)] = ([], [])
        group[0].append(dst)
        group[1].append(src)
    return list(groups.values())


def batched_copy_pairs(
    dsts: Sequence[torch.Tensor],
    srcs: Sequence[torch.Tensor],
    non_blocking: bool = False,
    validate: Callable[[], None] | None = None,
) -> None:
    """``dsts[i].copy_(srcs[i])`` for every i, in as few batched op calls as possible.

    The first attempt is one op call for every pair: the op checks devices, dtypes,
    shapes and aliasing in C++ before writing, so the common case pays no per-tensor
    Python work at all (asking each tensor for its device alone costs more than the
    rest of a 20,000-tensor copy's Python side). Only when it refuses does this look
    closer, nothing having been written: ``validate`` (if given) raises the caller's
    precise error, naming the key path; aliased pairs (tied weights, self-copies) are
    reduced as a pair-by-pair copy would see them; and pairs spanning several devices
    (which one call cannot take) get one call per (destination, source) device pair.

    Args:
        dsts: destinations.
        srcs: sources, one per destination.
        non_blocking: passed to the op.
        validate: raises if some pair cannot be copied; called only after the op
            refused the pairs, before anything is written.
    """
    with torch.no_grad():
        try:
            ops.batched_copy_(dsts, srcs, non_blocking=non_blocking)
            return
        except RuntimeError as exc:
            refused = exc
        if validate is not None:
            validate()
        pairs = _dedupe(dsts, srcs)
        groups = _groups([d for d, _ in pairs], [s for _, s in pairs])
        if len(pairs) == len(dsts) and len(groups) <= 1:
            raise refused
        for group_dsts, group_srcs in groups:
            ops.batched_copy_(group_dsts, group_srcs, non_blocking=non_blocking)


def offload_leaves(values: Sequence[Any], kinds: Sequence[int]) -> list[Any]:
    """What ``value.to("cpu")`` returns for each tensor leaf, with the copies batched.

    Like ``Tensor.to``, a value already on the CPU is returned as is (no copy); other
    plain tensors get new pageable CPU tensors with the same strides. DTensors keep
    their spec around a CPU local tensor; ShardedTensors (rare off the CPU) use their
    own ``to``. Non-tensor values pass through. A value that stands at several places
    (a tied weight) and moves crosses from the device once, but, as with one ``to``
    per place, each place gets a copy of its own (separate storages).
    """
    out = list(values)
    dsts: list[torch.Tensor] = []
    srcs: list[torch.Tensor] = []
    first: dict[int, int] = {}
    repeats: list[tuple[int, int]] = []
    for i, (value, kind) in enumerate(zip(values, kinds)):
        if kind == LEAF_OTHER:
            continue
        seen = first.setdefault(id(value), i)
        if seen != i:
            repeats.append((i, seen))
        elif kind == LEAF_TENSOR:
            if not value.is_cpu:
                new = torch.empty_like(value, device=_CPU)
                dsts.append(new)
                srcs.append(value)
                out[i] = new
        elif kind == LEAF_DTENSOR:
            local = value._local_tensor
            if not local.is_cpu:
                new = torch.empty_like(local, device=_CPU)
                dsts.append(new)
                srcs.append(local)
                out[i] = DTensor(new, value._spec, requires_grad=value.requires_grad)
        elif kind == LEAF_SHARDED:
            out[i] = value.to(_CPU)
    batched_copy_pairs(dsts, srcs)
    if repeats:
        _copy_repeats(values, kinds, out, repeats)
    return out


def _copy_repeats(
    values: Sequence[Any], kinds: Sequence[int], out: list[Any], repeats: list[tuple[int, int]]
) -> None:
    """Fill the repeated places of :func:`offload_leaves` from the host copy made once."""
    dsts: list[torch.Tensor] = []
    srcs: list[torch.Tensor] = []
    for i, seen in repeats:
        moved, value, kind = out[seen], values[i], kinds[i]
        if moved is value:  # already on the CPU: ``to`` returns the value itself
            out[i] = moved
        elif kind == LEAF_TENSOR:
            out[i] = torch.empty_like(moved)
            dsts.append(out[i])
            srcs.append(moved)
        elif kind == LEAF_DTENSOR:
            new = torch.empty_like(moved._local_tensor)
            dsts.append(new)
            srcs.append(moved._local_tensor)
            out[i] = DTensor(new, value._spec, requires_grad=value.requires_grad)
        else:
            out[i] = value.to(_CPU)
    batched_copy_pairs(dsts, srcs)
