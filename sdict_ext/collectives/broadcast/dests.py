"""Where each tensor of ``broadcast_state_dict`` lands on this rank, whatever the route.

Every route fills the same destinations: a :class:`Dest` per announced key (the local
shard a DTensor's box is unpacked into, a new full tensor, or nothing), grouped per
*transfer* (one per distinct source tensor: tied keys travel once and fill each key).
The plan is made from rank 0's metadata alone, so every rank derives the same
transfers; each rank's destinations are its own.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch.distributed.tensor import DTensor

from sdict_ext.collectives.boxes import BoxCache, dtensor_boxes, dtensor_of, local_box
from sdict_ext.collectives.broadcast.meta import TensorInfo
from sdict_ext.host.copies import batched_copy_pairs, offload_leaves, view_key
from sdict_ext.tree import leaf_kind

__all__ = [
    "Dest", "Transfers", "finish", "flat_bytes", "plan_transfers", "preplan", "store_results",
]


class Dest:
    """Where one broadcast tensor lands on this rank."""

    __slots__ = (
        "key", "full_shape", "unpack_into", "box_shape", "box_start", "finish", "result", "slot"
    )

    def __init__(
        self,
        key: str,
        full_shape: tuple[int, ...],
        unpack_into: torch.Tensor | None = None,
        box_shape: tuple[int, ...] = (),
        box_start: tuple[int, ...] = (),
        finish: torch.Tensor | None = None,
        result: Any = None,
    ) -> None:
        self.key = key
        self.full_shape = full_shape
        # The tensor unpack() writes this slot into (None: this rank keeps nothing).
        self.unpack_into = unpack_into
        # This rank's box of the full tensor (the shape of ``unpack_into``).
        self.box_shape = box_shape
        self.box_start = box_start
        # A tensor to cast / move the unpacked data into afterwards, if any.
        self.finish = finish
        self.result = result
        # Index of the transfer (one per distinct source tensor) this key is filled from.
        self.slot = 0


class Transfers(NamedTuple):
    """This rank's plan of one call: every key's destination, and per transfer (a
    distinct source tensor) its (shape, dtype), the index of its first announced
    tensor, and the destinations it fills."""

    dests: list[Dest]
    specs: list[tuple[tuple[int, ...], torch.dtype]]
    src_of: list[int]
    slot_dests: list[list[Dest]]


def _plan_dest(
    key: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    local: Any,
    full: torch.Tensor | None,
    device: torch.device,
    flat_device: torch.device,
    rank: int,
    boxes: BoxCache,
) -> Dest:
    if local is None:
        return Dest(key, shape)
    if not isinstance(local, DTensor):
        if full is not None:  # rank 0 keeps its own tensor, as PyTorch does
            return Dest(key, shape, result=full.detach().to(device))
        new = torch.empty(shape, dtype=dtype, device=device)
        zeros = (0,) * len(shape)
        if device == flat_device:
            return Dest(key, shape, new, shape, zeros, None, new)
        staged = torch.empty(shape, dtype=dtype, device=flat_device)
        return Dest(key, shape, staged, shape, zeros, new, new)
    box = local_box(shape, local, rank, boxes)
    if box is None:
        return Dest(key, shape)  # this rank is not part of the DTensor's mesh
    box_shape, box_start = box
    # The local tensor itself (to_local() would only add an autograd view of it); a
    # meta DTensor's is meta too (asking the local tensor skips DTensor's dispatch).
    new = local._local_tensor
    if new.is_meta:
        new = torch.empty(box_shape, dtype=dtype, device=device)
        result: Any = dtensor_of(new, local)
    else:
        if new.shape != box_shape:
            raise ValueError(
                f"broadcast_state_dict: key {key!r}: the local shard has shape "
                f"{tuple(new.shape)}, but the full tensor {shape} with placements "
                f"{local.placements} gives this rank {box_shape}"
            )
        result = local
    # (is_cpu: cheaper than building a torch.device to compare, once per key.)
    on_flat = new.is_cpu if flat_device.type == "cpu" else new.device == flat_device
    if new.dtype == dtype and on_flat:
        return Dest(key, shape, new, box_shape, box_start, None, result)
    # PyTorch's copy_ casts to the local dtype; unpack is byte-exact, so stage.
    staged = torch.empty(box_shape, dtype=dtype, device=flat_device)
    return Dest(key, shape, staged, box_shape, box_start, new, result)


def preplan(local_state_dict: dict[str, Any], rank: int) -> dict[str, tuple[Dest, int]] | None:
    """A receiver's destinations for the usual checkpoint, made while rank 0 builds the
    metadata: for each DTensor with a CPU local shard, its box of a full tensor of the
    DTensor's own global shape (with the address the shard starts at, 0 if it is
    empty). :func:`plan_transfers` takes one where rank 0's tensor has that shape and
    the shard's dtype, and plans anything else as usual. None where it fails: the
    usual planning then finds, and reports, the problem."""
    keys = list(local_state_dict)
    values = list(local_state_dict.values())
    try:
        hits = dtensor_boxes(values, None, None, rank)
    except Exception:  # noqa: BLE001 (planned, and reported, the usual way)
        return None
    return {
        key: (Dest(key, hit[4], hit[0], hit[1], hit[2], None, value), hit[3])
        for key, value, hit in zip(keys, values, hits)
        if hit is not None
    }


def plan_transfers(
    tensors: list[TensorInfo],
    keys: list[str],
    dtypes: list[torch.dtype],
    local_state_dict: dict[str, Any],
    full_state_dict: dict[str, Any] | None,
    device: torch.device,
    flat_device: torch.device,
    rank: int,
    pre: dict[str, tuple[Dest, int]] | None = None,
) -> Transfers:
    """This rank's destinations of every announced tensor, grouped per transfer: a
    tensor several keys share (``same`` links of the metadata) travels once.

    :func:`_plan_dest` of each tensor, the usual case in one C++ call
    (:func:`dtensor_boxes`: a DTensor whose local shard has the box's shape and the
    full tensor's dtype, on the CPU group's device) or taken from :func:`preplan`.
    Where two keys may share a local tensor, :func:`_one_writer_per_target` picks
    their writer.
    """
    pre_get = (pre or {}).get
    dests: list[Any] = [None] * len(tensors)
    ptrs: list[int] = []
    misses = []
    for i, (pos, shape, code, _, _) in enumerate(tensors):
        got = pre_get(keys[pos])
        d = None if got is None else got[0]
        if d is not None and d.full_shape == shape and d.unpack_into.dtype == dtypes[code]:
            dests[i] = d
            ptrs.append(got[1])
        else:
            misses.append(i)
    values = [local_state_dict.get(keys[tensors[i][0]]) for i in misses]
    if flat_device.type == "cpu":
        hits = dtensor_boxes(
            values, [tensors[i][1] for i in misses], [dtypes[tensors[i][2]] for i in misses],
            rank,
        )
        for i, value, hit in zip(misses, values, hits):
            if hit is not None:
                dests[i] = Dest(keys[tensors[i][0]], tensors[i][1], hit[0], hit[1], hit[2],
                                None, value)
                ptrs.append(hit[3])
    boxes: BoxCache = {}
    shared = False
    for i, value in zip(misses, values):
        if dests[i] is None:
            pos, shape, code, _, _ = tensors[i]
            key = keys[pos]
            full = None if full_state_dict is None else full_state_dict[key]
            dests[i] = d = _plan_dest(key, shape, dtypes[code], value, full, device,
                                      flat_device, rank, boxes)
            shared = shared or isinstance(d.result, DTensor)
    # A repeated address makes the writers be checked (empty shards, 0, write nothing).
    written = [p for p in ptrs if p]
    if shared or len(set(written)) < len(written):
        _one_writer_per_target(dests)
    src_of: list[int] = []
    slot_of: list[int] = []
    for dest, tensor in zip(dests, tensors):
        same = tensor[3]
        if same < 0:
            dest.slot = len(src_of)
            src_of.append(len(slot_of))
        else:
            dest.slot = slot_of[same]
        slot_of.append(dest.slot)
    slot_dests: list[list[Dest]] = [[] for _ in src_of]
    for dest in dests:
        if dest.unpack_into is not None:
            slot_dests[dest.slot].append(dest)
    specs = [(tensors[i][1], dtypes[tensors[i][2]]) for i in src_of]
    return Transfers(dests, specs, src_of, slot_dests)


def _one_writer_per_target(dests: list[Dest]) -> None:
    """Let one key write each local tensor that several keys share (tied weights).

    Two keys holding the same local shard would make ``unpack`` refuse the overlapping
    destinations; the last key writes, as PyTorch's key-by-key copies leave it, and
    every key still gets the tensor as its result. Only DTensor shards can be shared:
    other keys receive new tensors. Targets are compared by address first (cheap), by
    their whole view only where an address repeats.
    """
    by_ptr: dict[int, Dest] = {}
    repeated: list[Dest] = []
    for d in dests:
        target = d.finish if d.finish is not None else d.unpack_into
        if target is None or not isinstance(d.result, DTensor) or 0 in d.box_shape:
            continue
        earlier = by_ptr.setdefault(target.data_ptr(), d)
        if earlier is not d:
            if not repeated or repeated[-1] is not earlier:
                repeated.append(earlier)
            repeated.append(d)
    if not repeated:
        return
    # The keys whose targets start at a repeated address, in key order.
    order = {id(d): n for n, d in enumerate(dests)}
    writer: dict[tuple[Any, ...], Dest] = {}
    for d in sorted({id(d): d for d in repeated}.values(), key=lambda d: order[id(d)]):
        target = d.finish if d.finish is not None else d.unpack_into
        earlier = writer.get(key := view_key(target))
        if earlier is not None:
            earlier.unpack_into = earlier.finish = None
        writer[key] = d


def flat_bytes(t: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """``t``'s bytes as a flat uint8 view, when a transfer can use them in place (on
    ``device``, contiguous, not empty): a big tensor is then sent from, or received
    into, the tensor itself."""
    if t.device != device or not t.is_contiguous() or t.numel() == 0:
        return None
    return t.reshape(-1).view(torch.uint8)


def finish(dests: list[Dest]) -> None:
    """Moves staged slots into their real destinations (other device or dtype)."""
    same_dtype = [
        d for d in dests if d.finish is not None and d.finish.dtype == d.unpack_into.dtype
    ]
    batched_copy_pairs([d.finish for d in same_dtype], [d.unpack_into for d in same_dtype])
    with torch.no_grad():
        for d in dests:
            if d.finish is not None and d.finish.dtype != d.unpack_into.dtype:
                d.finish.copy_(d.unpack_into)


def store_results(
    local_state_dict: dict[str, Any],
    keys: list[str],
    objects: dict[int, Any],
    dests: list[Dest],
    strict: bool,
    cpu_offload: bool,
) -> None:
    """Writes the call's results into ``local_state_dict``, as PyTorch leaves it: the
    objects where the local dict has their key, every received tensor (on the CPU with
    ``cpu_offload``), and with ``strict`` no key the full state dict lacks."""
    for pos, value in objects.items():
        if keys[pos] in local_state_dict:
            local_state_dict[keys[pos]] = value
    received = [d for d in dests if d.result is not None]
    if cpu_offload:
        moved = offload_leaves(
            [d.result for d in received], [leaf_kind(d.result) for d in received]
        )
        for d, value in zip(received, moved):
            d.result = value
    for d in received:
        local_state_dict[d.key] = d.result
    if strict:
        global_keys = set(keys)
        for key in [k for k in local_state_dict if k not in global_keys]:
            del local_state_dict[key]
