"""``broadcast_state_dict``: rank 0's full state dict into every rank's sharded one.

PyTorch's ``_broadcast_state_dict`` broadcasts one tensor at a time and builds every
full tensor on every rank before slicing out the local shard. Here rank 0 packs the
tensors into bucketed flat buffers, one broadcast per bucket, and every rank unpacks
each slot straight into its destination: the DTensor's local shard (only its box is
read, so no rank other than 0 ever holds a full copy of a sharded tensor) or a new
full tensor where the local value is a plain tensor. On CPU groups the point-to-point
route of ``_box_route`` replaces the broadcast where it moves fewer bytes (and a rank on
rank 0's host reads its boxes out of rank 0's memory); the metadata rank 0 announces
first is built in ``_broadcast_meta``.
"""

from __future__ import annotations

import math
from itertools import accumulate, zip_longest
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from sdict_ext import ops
from sdict_ext._gc import gc_paused
from sdict_ext.collectives.agreement import RankFailure, agree
from sdict_ext.collectives.boxes import BoxCache, dtensor_boxes, dtensor_of, local_box
from sdict_ext.collectives.broadcast import p2p as _box_route
from sdict_ext.collectives.broadcast.meta import (
    Announced,
    TensorInfo,
    announce,
    from_wire,
    post_metadata_receive,
    receive_metadata,
    send_metadata,
    to_wire,
    wait_sent,
)
from sdict_ext.collectives.buckets import DEFAULT_BUCKET_BYTES, buckets_with_solos, slice_bytes
from sdict_ext.host.copies import batched_copy_pairs, indexed_device, offload_leaves, view_key
from sdict_ext.tree import leaf_kind

__all__ = ["broadcast_state_dict"]

#: Whether CPU groups may take the point-to-point route (tests turn it off to run the
#: broadcast route, the one device groups take, on gloo).
_BOX_ROUTE = True


def _pg_device(group: dist.ProcessGroup, device: torch.device) -> torch.device:
    # As PyTorch: the caller's device when the group can move it, else the group's first.
    types = group._device_types
    if device.type in {t.type for t in types}:
        return device
    return types[0]


class _Dest:
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
) -> _Dest:
    if local is None:
        return _Dest(key, shape)
    if not isinstance(local, DTensor):
        if full is not None:  # rank 0 keeps its own tensor, as PyTorch does
            return _Dest(key, shape, result=full.detach().to(device))
        new = torch.empty(shape, dtype=dtype, device=device)
        zeros = (0,) * len(shape)
        if device == flat_device:
            return _Dest(key, shape, new, shape, zeros, None, new)
        staged = torch.empty(shape, dtype=dtype, device=flat_device)
        return _Dest(key, shape, staged, shape, zeros, new, new)
    box = local_box(shape, local, rank, boxes)
    if box is None:
        return _Dest(key, shape)  # this rank is not part of the DTensor's mesh
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
    # (is_cpu: comparing devices builds a torch.device, ~1 us.)
    on_flat = new.is_cpu if flat_device.type == "cpu" else new.device == flat_device
    if new.dtype == dtype and on_flat:
        return _Dest(key, shape, new, box_shape, box_start, None, result)
    # PyTorch's copy_ casts to the local dtype; unpack is byte-exact, so stage.
    staged = torch.empty(box_shape, dtype=dtype, device=flat_device)
    return _Dest(key, shape, staged, box_shape, box_start, new, result)


def _preplan(local_state_dict: dict[str, Any], rank: int) -> dict[str, tuple[_Dest, int]]:
    """A receiver's destinations for the usual checkpoint, made while rank 0 builds the
    metadata: for each DTensor with a CPU local shard, its box of a full tensor of the
    DTensor's own global shape (with the address the shard starts at, 0 if it is
    empty). :func:`_plan_dests` takes one where rank 0's tensor has that shape and the
    shard's dtype, and plans anything else as usual."""
    keys = list(local_state_dict)
    values = list(local_state_dict.values())
    return {
        key: (_Dest(key, hit[4], hit[0], hit[1], hit[2], None, value), hit[3])
        for key, value, hit in zip(keys, values, dtensor_boxes(values, None, None, rank))
        if hit is not None
    }


def _plan_dests(
    tensors: list[TensorInfo],
    keys: list[str],
    dtypes: list[torch.dtype],
    local_state_dict: dict[str, Any],
    full_state_dict: dict[str, Any] | None,
    device: torch.device,
    flat_device: torch.device,
    rank: int,
    pre: dict[str, tuple[_Dest, int]] | None = None,
) -> tuple[list[_Dest], bool]:
    """:func:`_plan_dest` of every announced tensor, the usual case in one C++ call
    (:func:`dtensor_boxes`: a DTensor whose local shard has the box's shape and the
    full tensor's dtype, on the CPU group's device) or taken from :func:`_preplan`.
    Also says whether two keys may share a local tensor (then
    :func:`_one_writer_per_target` must pick their writer)."""
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
                dests[i] = _Dest(keys[tensors[i][0]], tensors[i][1], hit[0], hit[1], hit[2],
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
    return dests, shared or len(set(written)) < len(written)


def _need_of(slot_dests: list[_Dest], shape: tuple[int, ...]) -> Any:
    """The box of a tensor this rank must receive for its keys ``slot_dests``: theirs
    when they agree (the usual case: one key), else the whole tensor."""
    if not slot_dests:
        return None
    first = slot_dests[0]
    box = (first.box_shape, first.box_start)
    for d in slot_dests[1:]:
        if (d.box_shape, d.box_start) != box:
            return shape, (0,) * len(shape)
    return box


@gc_paused()
def broadcast_state_dict(
    full_state_dict: dict[str, Any],
    local_state_dict: dict[str, Any],
    device: torch.device,
    pg: dist.ProcessGroup | None = None,
    strict: bool = False,
    cpu_offload: bool = False,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> None:
    """Loads rank 0's full state dict into every rank's local state dict, in place.

    Counterpart of ``_broadcast_state_dict``.

    Same results as PyTorch: a DTensor local value receives its shard (a meta DTensor
    is replaced by a new one); any other present local value is replaced by a new full
    tensor on ``device`` (on rank 0, its own full tensor moved to ``device``); keys
    whose local value is missing or None take no tensor; non-tensor values and 0-dim
    tensors are assigned to keys the local state dict has. ``strict`` drops local keys
    the full state dict lacks; ``cpu_offload`` moves the received tensors to the CPU.

    Differences: on a CPU group (gloo), every rank first reports which box of each
    tensor its keys need (one ``all_gather`` of a small table, which is also where a
    failure on any rank stops every rank); a tensor whose boxes on the other ranks add
    up to no more than the tensor (held sharded over the group, or needed by one other
    rank) is not broadcast: rank 0 sends each rank only its boxes, packed in messages
    of at most ``min(bucket_bytes / 2, 8 MiB)`` (one ``isend`` each, up to four in
    flight; a box of a quarter of that or more travels alone, from the source itself
    where its bytes are contiguous, and into the destination itself where that holds
    the whole box), and copies its own boxes straight from the source. With
    ``SDICT_EXT_DIRECT_READ=1`` (opt-in, read at each call on every rank), a rank on
    rank 0's host (it reads back a probe rank 0 announces) reads the boxes of contiguous
    source tensors whose announced address it validates (sample windows rank 0 took of
    each) straight out of rank 0's memory into its own shards instead
    (``process_vm_readv``: no message, one copy per byte; a tensor that fails the check
    travels as a message), and a last agreement after the reads keeps rank 0 until they
    are done; a read refused then (rare: the probe passed) is raised on every rank. Every
    rank checks every needs row as user input (a row that is no box of its tensor raises
    on every rank). The other
    tensors (and on a device group all of them) are broadcast in packed slices of the
    same size, one asynchronous broadcast each, the next slice packed and the previous
    one unpacked while one travels (two slice buffers), a tensor of a quarter slice or
    more alone from the source tensor itself, and into the destination itself where
    it receives the whole tensor. A tensor that several keys share travels once and
    fills each of them; ranks other than 0 never build a full copy of a tensor they
    hold sharded; a 0-dim tensor arrives with a storage of its one element (PyTorch
    pickles a view with its whole base storage); ``cpu_offload=True`` does not raise
    ``KeyError`` for a tensor only the full state dict has; and a failure on any rank
    (rank 0's metadata, a local shard of the wrong shape) is raised on every rank
    before any tensor is sent. The ranks need not lay a tensor out alike: each
    receives the box its own local value needs. The source is the group's rank 0.

    Args:
        full_state_dict: on the group's rank 0, the flat full state dict (plain
            tensors); ignored elsewhere.
        local_state_dict: this rank's state dict, updated in place.
        device: where new tensors are placed.
        pg: the process group; default: the default group.
        strict: remove local keys the full state dict does not have.
        cpu_offload: move the received tensors to the CPU.
        bucket_bytes: the most extra memory for message and slice buffers.
    """
    group = pg if pg is not None else dist.distributed_c10d._get_default_group()
    is_src = dist.get_rank(group) == 0
    device = indexed_device(device)  # "cuda" never equals a tensor's cuda:N
    flat_device = _pg_device(group, device)
    # Point to point where it saves bytes: CPU groups only (see _box_route).
    by_box = _BOX_ROUTE and flat_device.type == "cpu"
    error: BaseException | None = None
    announced: Announced | None = None
    wire: tuple[Any, ...] | None = None
    # Lives until the call returns: ranks on this host probe it (_box_route.can_read).
    probe: torch.Tensor | None = None
    if is_src:
        try:
            announced_source = None
            announced = announce(full_state_dict)
            if by_box and _box_route.direct_read_enabled():
                probe, announced_source = _box_route.source_probe(
                    full_state_dict, announced[0], announced[2]
                )
            wire = to_wire(*announced, announced_source)
        except Exception as exc:  # shipped to every rank below
            error = exc
    pre = None
    posted = None if is_src else post_metadata_receive(group, flat_device)
    if not is_src and flat_device.type == "cpu":
        # While rank 0 builds the metadata; anything unusual is planned after it.
        try:
            pre = _preplan(local_state_dict, dist.get_rank())
        except Exception:  # noqa: BLE001 (planned, and reported, the usual way below)
            pre = None
    if is_src:
        in_flight, error = send_metadata(wire, error, group, flat_device)
        src_error = None if error is None else ""
    else:
        wire, src_error = receive_metadata(posted, group, flat_device)
    # (pid, probe address, probe, sample seed, samples) where rank 0's tensors may be
    # read directly (it opted in), or None.
    source = None if wire is None else wire[-2]
    if src_error is not None:
        if error is not None:
            wait_sent(in_flight)
            raise error
        raise RankFailure(
            f"broadcast_state_dict failed on the source rank: {src_error}", {0: src_error}
        )

    cut = slice_bytes(bucket_bytes)
    dests: list[_Dest] = []
    keys: list[str] = []
    objects: dict[int, Any] = {}
    src_of: list[int] = []  # transfer -> index of its first tensor
    slot_dests: list[list[_Dest]] = []
    specs: list[tuple[tuple[int, ...], torch.dtype]] = []
    row: list[int] | None = None
    tensors: list[TensorInfo] = []
    try:
        keys, objects, tensors, dtypes = announced if is_src else from_wire(wire)
        dests, shared = _plan_dests(
            tensors, keys, dtypes, local_state_dict, full_state_dict if is_src else None,
            device, flat_device, dist.get_rank(), pre,
        )
        slot_of: list[int] = []
        for dest, tensor in zip(dests, tensors):
            same = tensor[3]
            if same < 0:
                dest.slot = len(src_of)
                src_of.append(len(slot_of))
            else:
                dest.slot = slot_of[same]
            slot_of.append(dest.slot)
        if shared:
            _one_writer_per_target(dests)
        slot_dests = [[] for _ in src_of]
        for dest in dests:
            if dest.unpack_into is not None:
                slot_dests[dest.slot].append(dest)
        specs = [(tensors[i][1], dtypes[tensors[i][2]]) for i in src_of]
        if by_box and is_src:
            row = [0] * wire[-1]  # the source needs nothing
        elif by_box:
            needs = [_need_of(ds, shape) for ds, (shape, _) in zip(slot_dests, specs)]
            # A rank on rank 0's host reads what it can out of rank 0's memory itself.
            direct = None
            if _box_route.can_read(source):
                direct = _box_route.direct_transfers(source, tensors, src_of, specs, [
                    need is not None and _box_route.readable(ds)
                    for need, ds in zip(needs, slot_dests)
                ])
            row = [0] + _box_route.encode_needs(
                [s for s, _ in specs], [dt.itemsize for _, dt in specs], needs, direct
            )
    except Exception as exc:  # reported to every rank below
        error = exc

    if is_src:
        wait_sent(in_flight)  # the metadata left while this rank planned
    srcs: list[torch.Tensor] = []
    sending: _box_route.SendPlan | None = None
    receiving: _box_route.ReceivePlan | None = None
    own: list[_Dest] = []
    direct_reads = False
    if by_box:
        # The needs table: the route's plan, and where every rank learns whether any
        # rank failed (all raise before anything is sent).
        table = agree(group, error, what="broadcast_state_dict", share=row, share_len=wire[-1])
    try:
        if is_src:
            # Plain tensors as they are (detach() costs ~1 us each); box views of them
            # carry no autograd history either way.
            srcs = [full_state_dict[keys[tensors[i][0]]] for i in src_of]
            srcs = [
                v if type(v) is torch.Tensor and not v.requires_grad else v.detach()
                for v in srcs
            ]
        broadcast = list(range(len(specs)))
        if by_box and specs:
            routed, broadcast, sending, receiving, own, direct_reads = _plan_box_route(
                group, table, row, is_src, srcs, specs, slot_dests, flat_device, cut,
                bucket_bytes, [tensors[i][4] for i in src_of],
                0 if source is None else source[0], [keys[tensors[i][0]] for i in src_of],
            )
        runs, layouts, in_place, flats = _plan_broadcasts(
            broadcast, is_src, srcs, specs, slot_dests, flat_device, cut
        )
    except Exception as exc:  # reported to every rank by agree()
        if error is None:
            error = exc
    # Every rank raises here if any failed, before anything is sent or written.
    agree(group, error, what="broadcast_state_dict")

    # Loading writes parameters in place, as PyTorch's copy_ does under no_grad.
    read_error: BaseException | None = None
    with torch.no_grad():
        if sending is not None:
            _box_route.send(
                group, sending, len(own), lambda lo, hi: _copy_own(own[lo:hi], srcs)
            )
        elif receiving is not None:
            read_error = _box_route.receive(
                group, dist.get_global_rank(group, 0), receiving, slot_dests
            )
        _pipelined_broadcasts(
            group, is_src, srcs, specs, slot_dests, runs, layouts, in_place, flats
        )
        if direct_reads:
            # Rank 0's tensors must outlive every read of them; a refused read (after
            # the probe succeeded: rare) is raised on every rank.
            agree(group, read_error, what="broadcast_state_dict")
        _finish(dests)

    global_keys = set(keys)
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
        for key in [k for k in local_state_dict if k not in global_keys]:
            del local_state_dict[key]


def _plan_box_route(
    group: dist.ProcessGroup,
    table: torch.Tensor,
    row: list[int],
    is_src: bool,
    srcs: list[torch.Tensor],
    specs: list[tuple[tuple[int, ...], torch.dtype]],
    slot_dests: list[list[_Dest]],
    flat_device: torch.device,
    cut: int,
    bucket_bytes: int,
    addrs: list[int],
    pid: int,
    keys: list[str],
) -> tuple[list[int], list[int], Any, Any, list[_Dest], bool]:
    """Which transfers take the point-to-point route (every rank decides the same from
    the table), this rank's side of it (rank 0: also its own keys of them), and whether
    any rank reads some directly. ``row`` is this rank's own row of the table, as it
    sent it; ``addrs`` the transfers' addresses in rank 0's memory (0: not announced for
    direct reads), ``pid`` its process (0: none announced), ``keys`` name the transfers.
    Raises, on every rank alike, when a rank's row is not one of this call's."""
    shapes = [s for s, _ in specs]
    at = _box_route.row_positions(shapes)
    _box_route.check_needs_table(
        table, shapes, [dt.itemsize for _, dt in specs], at, keys,
        [pid != 0 and a != 0 for a in addrs],
    )
    nbytes = table[:, torch.tensor(at[:-1], dtype=torch.int64)]  # (ranks, transfers)
    # What rank 0 must send: a rank that reads a transfer itself says so by -bytes.
    sent = nbytes.clamp(min=0)
    full = torch.tensor([math.prod(s) * dt.itemsize for s, dt in specs], dtype=torch.int64)
    by_route = sent[1:].sum(0) <= full
    direct_reads = bool((nbytes < 0).any())
    routed = by_route.nonzero().flatten().tolist()
    broadcast = (~by_route).nonzero().flatten().tolist()
    sending = receiving = None
    own: list[_Dest] = []
    if is_src:
        per_peer = []
        for r in range(1, table.shape[0]):
            js = (by_route & (sent[r] > 0)).nonzero().flatten().tolist()
            if js:
                needs = _box_route.decode_row(table[r].tolist(), shapes, at, js)
                per_peer.append(_box_route.plan_messages(
                    dist.get_global_rank(group, r), needs, js, cut
                ))
        # Interleaved, so every receiver has its first message as early as possible.
        messages = [m for ms in zip_longest(*per_peer) for m in ms if m is not None]
        n_buffers = max(1, min(_box_route.SEND_BUFFERS, bucket_bytes // cut))
        sending = _box_route.SendPlan(messages, srcs, flat_device, n_buffers)
        own = [d for j in routed for d in slot_dests[j]]
    else:
        r = dist.get_rank(group)
        js = (by_route & (sent[r] > 0)).nonzero().flatten().tolist()
        needs = _box_route.decode_row(row, shapes, at, js) if js else []
        messages = _box_route.plan_messages(dist.get_rank(), needs, js, cut) if js else []
        reads = None
        if direct_reads:
            mine = (by_route & (nbytes[r] < 0)).nonzero().flatten().tolist()
            reads = _box_route.read_plan(pid, mine, addrs, shapes, slot_dests)
        receiving = _box_route.ReceivePlan(messages, slot_dests, flat_device, reads)
    return routed, broadcast, sending, receiving, own, direct_reads


def _copy_own(dests: list[_Dest], srcs: list[torch.Tensor]) -> None:
    """Rank 0's keys of routed transfers: their boxes copied straight from the source;
    a key whose local dtype differs is cast by _finish() from the source box instead."""
    views = ops.box_views(
        [srcs[d.slot] for d in dests], [d.box_start for d in dests],
        [d.box_shape for d in dests],
    )
    dsts: list[torch.Tensor] = []
    sources: list[torch.Tensor] = []
    for d, view in zip(dests, views):
        if d.finish is None:
            dsts.append(d.unpack_into)
        elif d.finish.dtype == view.dtype:
            dsts.append(d.finish)
            d.finish = None
        else:
            d.unpack_into = view  # _finish() casts it into d.finish
            continue
        sources.append(view)
    batched_copy_pairs(dsts, sources)


def _plan_broadcasts(
    js: list[int],
    is_src: bool,
    srcs: list[torch.Tensor],
    specs: list[tuple[tuple[int, ...], torch.dtype]],
    slot_dests: list[list[_Dest]],
    flat_device: torch.device,
    cut: int,
) -> tuple[list[list[int]], list[tuple[list[int], int]], list[Any], list[torch.Tensor]]:
    """The broadcast slices of transfers ``js``: their runs, slot layouts, in-place
    views and the (two) slice buffers."""
    # Slot sizes as pack_layout rounds them (without its per-call checks).
    align = ops.ALIGNMENT
    slots = [-(-math.prod(specs[j][0]) * specs[j][1].itemsize // align) * align for j in js]
    runs = [[js[k] for k in run] for run in _runs(slots, cut)]
    size_of = dict(zip(js, slots))
    # pack_layout's offsets, from the slot sizes already at hand (it re-checks
    # every spec, ~10 us per tensor).
    layouts = []
    for run in runs:
        offsets = list(accumulate((size_of[j] for j in run), initial=0))
        layouts.append((offsets[:-1], offsets[-1]))
    # A big tensor travels alone and, where its bytes are contiguous, straight from
    # the source tensor / into the destination: no bucket buffer, no pack / unpack.
    in_place: list[tuple[torch.Tensor | None, _Dest | None]] = []
    for run in runs:
        view, receiver = None, None
        if len(run) == 1:
            j = run[0]
            if is_src:
                view = _box_route.flat_bytes(srcs[j], flat_device)
            else:
                # Only a destination holding the whole tensor can receive it in place.
                for d in slot_dests[j]:
                    if d.unpack_into.shape == specs[j][0]:
                        view = _box_route.flat_bytes(d.unpack_into, flat_device)
                        if view is not None:
                            receiver = d
                            break
        in_place.append((view, receiver))
    buffered = [total for (_, total), (v, _) in zip(layouts, in_place) if v is None]
    # Two buffers when two slices need one, so one fills while the other travels.
    flats = [
        torch.empty(max(buffered), dtype=torch.uint8, device=flat_device)
        for _ in range(min(2, len(buffered)))
    ]
    return runs, layouts, in_place, flats


def _one_writer_per_target(dests: list[_Dest]) -> None:
    """Let one key write each local tensor that several keys share (tied weights).

    Two keys holding the same local shard would make ``unpack`` refuse the overlapping
    destinations; the last key writes, as PyTorch's key-by-key copies leave it, and
    every key still gets the tensor as its result. Only DTensor shards can be shared:
    other keys receive new tensors. Targets are compared by address first (~0.1 us),
    by their whole view only where an address repeats.
    """
    by_ptr: dict[int, _Dest] = {}
    repeated: list[_Dest] = []
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
    writer: dict[tuple[Any, ...], _Dest] = {}
    for d in sorted({id(d): d for d in repeated}.values(), key=lambda d: order[id(d)]):
        target = d.finish if d.finish is not None else d.unpack_into
        earlier = writer.get(key := view_key(target))
        if earlier is not None:
            earlier.unpack_into = earlier.finish = None
        writer[key] = d


def _pipelined_broadcasts(
    group: dist.ProcessGroup,
    is_src: bool,
    srcs: list[torch.Tensor],
    specs: list[tuple[tuple[int, ...], torch.dtype]],
    slot_dests: list[list[_Dest]],
    runs: list[list[int]],
    layouts: list[tuple[list[int], int]],
    in_place: list[tuple[torch.Tensor | None, _Dest | None]],
    flats: list[torch.Tensor],
) -> None:
    """One asynchronous broadcast per run, overlapped with packing and unpacking.

    Run k is packed (on the source) and its broadcast started before run k - 1 is
    waited for and unpacked, so the process group's thread moves one slice while this
    thread copies the neighbouring ones: at most two runs are in flight. Buffered runs
    alternate between the buffers of ``flats``, so a buffer is refilled only after the
    run before the previous one, its last user, was unpacked. ``slot_dests[j]`` are the
    keys that transfer ``j`` fills (several for a tied tensor).
    """
    pending: list[tuple[Any, list[int], list[int], torch.Tensor, _Dest | None]] = []
    n_buffered = 0
    for run, (offsets, total), (view, receiver) in zip(runs, layouts, in_place):
        if view is not None:
            # Received straight into ``receiver``; the source, and every other key of
            # the tensor, unpack their boxes from that tensor itself.
            work = dist.broadcast(view, group=group, group_src=0, async_op=True)
            pending.append((work, run, [0], view, receiver))
        else:
            if len(run) == 1:
                # Every rank sends / receives the tensor's exact bytes.
                spec = specs[run[0]]
                total = math.prod(spec[0]) * spec[1].itemsize
            flat = flats[n_buffered % len(flats)]
            n_buffered += 1
            if pending and pending[0][3].data_ptr() == flat.data_ptr():
                _unpack_run(*pending.pop(0), slot_dests)  # one buffer only: wait for its user
            buf = flat[:total]
            if is_src:
                mine = [srcs[j] for j in run]
                mine = [t if t.device == flat.device else t.to(flat.device) for t in mine]
                ops.pack(mine, out=buf, offsets=offsets)
            work = dist.broadcast(buf, group=group, group_src=0, async_op=True)
            pending.append((work, run, offsets, buf, None))
        if len(pending) > 1:
            _unpack_run(*pending.pop(0), slot_dests)
    for entry in pending:
        _unpack_run(*entry, slot_dests)


def _unpack_run(
    work: Any,
    run: list[int],
    offsets: list[int],
    buf: torch.Tensor,
    received: _Dest | None,
    slot_dests: list[list[_Dest]],
) -> None:
    work.wait()
    picked = [
        (offsets[n], d) for n, j in enumerate(run) for d in slot_dests[j] if d is not received
    ]
    if picked:
        ops.unpack(
            buf,
            [d.unpack_into for _, d in picked],
            offsets=[o for o, _ in picked],
            full_shapes=[d.full_shape for _, d in picked],
            starts=[d.box_start for _, d in picked],
        )


def _runs(costs: list[int], bucket_bytes: int) -> list[list[int]]:
    """Buckets of tensors; one of at least a quarter bucket travels alone where the
    count allows (always from a bucket's worth on).

    Below a quarter bucket, a broadcast of its own costs more than the copy it saves.
    """
    return buckets_with_solos(costs, bucket_bytes, [True] * len(costs), bucket_bytes // 4)


def _finish(dests: list[_Dest]) -> None:
    """Moves staged slots into their real destinations (other device or dtype)."""
    same_dtype = [
        d for d in dests if d.finish is not None and d.finish.dtype == d.unpack_into.dtype
    ]
    batched_copy_pairs([d.finish for d in same_dtype], [d.unpack_into for d in same_dtype])
    with torch.no_grad():
        for d in dests:
            if d.finish is not None and d.finish.dtype != d.unpack_into.dtype:
                d.finish.copy_(d.unpack_into)
