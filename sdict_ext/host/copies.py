"""Batched tensor copies and CPU offload over flat leaf lists.

The shared back end of copy / offload / create-CPU in :mod:`sdict_ext.utils`: pairs are
grouped by (destination device, source device) and each group is one
:func:`sdict_ext.ops.batched_copy_` call, instead of one ``copy_`` per tensor; a group
between two different accelerators (which one op call cannot span) is one
``torch._foreach_copy_``, whose peer copies order both devices' streams.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch.distributed.tensor import DTensor

from sdict_ext import ops
from sdict_ext.tree import LEAF_DTENSOR, LEAF_SHARDED, LEAF_TENSOR, TENSOR_KINDS

__all__ = [
    "ROUTE_OP",
    "ROUTE_PEER",
    "batched_copy_pairs",
    "copy_groups",
    "indexed_device",
    "offload_leaves",
    "view_key",
]

#: A group copied by one :func:`sdict_ext.ops.batched_copy_` call: host memory and at
#: most one accelerator, which is what one op call takes.
ROUTE_OP = "op"
#: A group between two different accelerators: ``torch._foreach_copy_`` (peer copies).
ROUTE_PEER = "peer"

Route = Literal["op", "peer"]

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


def indexed_device(device: torch.device | str | None) -> torch.device | None:
    """``device`` with an index: a bare accelerator type means its current device.

    ``torch.device("cuda")`` compares unequal to the ``cuda:3`` every tensor reports, so
    a device argument taken as given would never match where tensors already are (and,
    e.g., nothing would be received in place). The API entry points that take a device
    normalise it here, as ``Tensor.to("cuda")`` resolves it. None (torch's default
    device, where a caller passes it) stays None.
    """
    if device is None:
        return None
    device = torch.device(device)
    if device.index is not None or device.type in ("cpu", "meta"):
        return device
    module = getattr(torch, device.type, None)
    current = getattr(module, "current_device", None)
    if current is None:
        return device
    return torch.device(device.type, current())


def copy_groups(devices: Sequence[tuple[Any, Any]]) -> list[tuple[Route, list[int]]]:
    """How pairs on several devices are copied: ``(route, pair indices)`` per group.

    Pairs are grouped by (destination device, source device), in order of first
    appearance. A group that touches host memory and at most one accelerator is one op
    call (:data:`ROUTE_OP`); a group between two different accelerators
    (``cuda:1 <- cuda:0``) is one :data:`ROUTE_PEER` copy, because an op call works on
    a single device and refuses it.

    Args:
        devices: ``(destination device, source device)`` of each pair, as
            ``torch.device`` objects or strings (only the devices matter, so the plan
            can be checked without the devices themselves).
    """
    groups: dict[tuple[torch.device, torch.device], list[int]] = {}
    for i, (dst, src) in enumerate(devices):
        key = (torch.device(dst), torch.device(src))
        groups.setdefault(key, []).append(i)
    plan: list[tuple[Route, list[int]]] = []
    for (dst, src), indices in groups.items():
        peer = dst != src and dst.type != "cpu" and src.type != "cpu"
        plan.append((ROUTE_PEER if peer else ROUTE_OP, indices))
    return plan


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
    rest of a 20,000-tensor copy's Python side). Only when its planner refuses (a plain
    ``RuntimeError``, nothing written) does this look closer: ``validate`` (if given)
    raises the caller's precise error, naming the key path; aliased pairs (tied
    weights, self-copies) are reduced as a pair-by-pair copy would see them; and pairs
    spanning several devices get one call per (destination, source) device pair, a
    copy between two accelerators going through ``torch._foreach_copy_``
    (:func:`copy_groups`). A failure once copies started (``torch.AcceleratorError``,
    ``torch.OutOfMemoryError``) may have written part of the destinations: it is
    raised as it is, never retried.

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
        except NotImplementedError as exc:
            # Declined by the planner before anything was written (ops.py, "Errors").
            refused = exc
        if validate is not None:
            validate()
        pairs = _dedupe(dsts, srcs)
        groups = copy_groups([(d.device, s.device) for d, s in pairs])
        if len(pairs) == len(dsts) and [route for route, _ in groups] == [ROUTE_OP]:
            raise refused
        for route, indices in groups:
            group_dsts = [pairs[i][0] for i in indices]
            group_srcs = [pairs[i][1] for i in indices]
            if route == ROUTE_PEER:
                torch._foreach_copy_(group_dsts, group_srcs, non_blocking=non_blocking)
            else:
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
        if kind not in TENSOR_KINDS:
            continue  # a plain value (see sdict_ext.tree.PLAIN_KINDS) passes through
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
