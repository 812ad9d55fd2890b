"""``broadcast_state_dict`` and ``distribute_state_dict``: a full state dict into a sharded one.

PyTorch's ``_broadcast_state_dict`` broadcasts one tensor at a time and builds every
full tensor on every rank before slicing out the local shard. Here rank 0 packs the
tensors into bucketed flat buffers, one broadcast per bucket, and every rank unpacks
each slot straight into its destination: the DTensor's local shard (only its box is
read, so no rank other than 0 ever holds a full copy of a sharded tensor) or a new
full tensor where the local value is a plain tensor.

``distribute_state_dict`` needs no communication at all: every rank has the full state
dict, so each slices its own box out locally, with one batched copy per device pair
(PyTorch scatters each tensor from rank 0 with ``distribute_tensor``).
"""

from __future__ import annotations

from itertools import accumulate
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from sdict_ext import ops
from sdict_ext._collectives import (
    DEFAULT_BUCKET_BYTES,
    RankFailure,
    agree,
    box_of,
    buckets_with_solos,
    dtensor_of,
    is_plain_placement,
    mesh_coordinates,
    mesh_shape,
    slice_bytes,
)
from sdict_ext._copies import batched_copy_pairs, offload_leaves, view_key
from sdict_ext._gc import gc_paused
from sdict_ext._traverse import LEAF_TENSOR, leaf_kind

__all__ = ["broadcast_state_dict", "distribute_state_dict"]


class _TensorInfo(NamedTuple):
    """What rank 0 announces for a tensor it is about to broadcast.

    ``same_as`` names an earlier key whose tensor is this very one (tied weights, or a
    loaded checkpoint's shared storage): it travels once, and fills both keys.
    """

    size: torch.Size
    dtype: torch.dtype
    same_as: str | None = None


def _pg_device(group: dist.ProcessGroup, device: torch.device) -> torch.device:
    # As PyTorch: the caller's device when the group can move it, else the group's first.
    types = group._device_types
    if device.type in {t.type for t in types}:
        return device
    return types[0]


def _announce(full_state_dict: dict[str, Any]) -> list[tuple[str, Any]]:
    """Rank 0's metadata: plain values and 0-dim tensors travel as objects."""
    meta: list[tuple[str, Any]] = []
    first_key: dict[tuple[Any, ...], str] = {}
    for key, value in full_state_dict.items():
        if not torch.is_tensor(value):
            meta.append((key, value))
            continue
        if leaf_kind(value) != LEAF_TENSOR:
            raise ValueError(
                f"broadcast_state_dict: full_state_dict[{key!r}] is a "
                f"{type(value).__name__}; the full state dict must hold plain tensors"
            )
        if value.dim() == 0:
            meta.append((key, value.cpu()))
            continue
        first = first_key.setdefault(view_key(value), key) if value.numel() else key
        meta.append((key, _TensorInfo(value.size(), value.dtype, None if first == key else first)))
    return meta


class _Scalar(NamedTuple):
    """A 0-dim tensor on the wire: element ``index`` of the raw ``dtype`` array."""

    dtype: torch.dtype
    index: int


# Dtypes whose 0-dim tensors round-trip through raw bytes (sub-byte and quantized
# dtypes have no element copy to rebuild them with).
_RAW_DTYPES = frozenset(
    {
        torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
        torch.uint16, torch.uint32, torch.uint64, torch.float16, torch.bfloat16,
        torch.float32, torch.float64, torch.complex64, torch.complex128,
    }
)


def _is_raw_scalar(value: Any) -> bool:
    # Only what its raw bytes fully describe; anything else (a Parameter, a tensor
    # that requires grad, a conjugate / negative view, an exotic dtype) is pickled
    # with the rest of the metadata, as PyTorch sends every 0-dim tensor.
    return (
        type(value) is torch.Tensor
        and value.dim() == 0
        and value.dtype in _RAW_DTYPES
        and value.layout == torch.strided
        and not value.requires_grad
        and not value.is_conj()
        and not value.is_neg()
    )


def _to_wire(meta: list[tuple[str, Any]]) -> tuple[list[tuple[str, Any]], dict[Any, bytes]]:
    """The metadata with its plain 0-dim tensors as raw bytes, one byte string per dtype.

    Pickling a tensor (``broadcast_object_list`` does for every optimizer ``step``)
    goes through torch's storage serialisation, about 0.2 ms per tensor on each side;
    raw bytes cost a few microseconds.
    """
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    wire: list[tuple[str, Any]] = []
    for key, value in meta:
        if _is_raw_scalar(value):
            same = by_dtype.setdefault(value.dtype, [])
            wire.append((key, _Scalar(value.dtype, len(same))))
            same.append(value)
        else:
            wire.append((key, value))
    blobs = {
        dtype: torch.stack(values).view(torch.uint8).numpy().tobytes()
        for dtype, values in by_dtype.items()
    }
    return wire, blobs


def _from_wire(wire: list[tuple[str, Any]], blobs: dict[Any, bytes]) -> list[tuple[str, Any]]:
    arrays = {
        dtype: torch.frombuffer(bytearray(blob), dtype=torch.uint8).view(dtype)
        for dtype, blob in blobs.items()
    }
    # clone(): each tensor owns its storage, as an unpickled one does.
    return [
        (key, arrays[v.dtype][v.index].clone() if isinstance(v, _Scalar) else v)
        for key, v in wire
    ]


class _Dest:
    """Where one broadcast tensor lands on this rank."""

    __slots__ = ("key", "full_shape", "unpack_into", "box_start", "finish", "result", "slot")

    def __init__(self, key: str, full_shape: tuple[int, ...]) -> None:
        self.key = key
        self.full_shape = full_shape
        # The tensor unpack() writes this slot into (None: this rank keeps nothing).
        self.unpack_into: torch.Tensor | None = None
        self.box_start: tuple[int, ...] = ()
        # A tensor to cast / move the unpacked data into afterwards, if any.
        self.finish: torch.Tensor | None = None
        self.result: Any = None
        # Index of the transfer (one per distinct source tensor) this key is filled from.
        self.slot = 0


_BoxCache = dict[Any, Any]


def _local_box(
    shape: tuple[int, ...], local: DTensor, rank: int, cache: _BoxCache | None = None
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """This rank's (shape, start) box of a full tensor laid out like ``local``.

    The same box as PyTorch's ``compute_local_shape_and_global_offset``, which this
    falls back to for placements other than Shard / Replicate; for those, the
    arithmetic on cached mesh coordinates costs a fraction of it (it builds index
    tensors per call). ``cache`` (one per call of a state-dict function) remembers each
    distinct (mesh, placements, shape): a model repeats a few shapes many times.
    """
    spec = local._spec
    if cache is None:
        return _compute_box(shape, spec.mesh, spec.placements, rank)
    # Placements compared by kind and dim: hashing Placement objects runs Python code.
    key = (id(spec.mesh), tuple([(type(p), getattr(p, "dim", None)) for p in spec.placements]),
           shape)
    box = cache.get(key, cache)
    if box is cache:
        box = cache[key] = _compute_box(shape, spec.mesh, spec.placements, rank)
    return box


def _compute_box(
    shape: tuple[int, ...], mesh: Any, placements: Any, rank: int
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    if not is_plain_placement(placements):
        box_shape, box_start = compute_local_shape_and_global_offset(shape, mesh, placements)
        if not box_start and tuple(box_shape) == (0,):
            return None
        return tuple(box_shape), tuple(box_start)
    coord = mesh_coordinates(mesh).get(rank)
    if coord is None:
        return None
    return box_of(shape, mesh_shape(mesh), coord, placements)


def _plan_dest(
    key: str,
    info: _TensorInfo,
    local: Any,
    full: torch.Tensor | None,
    device: torch.device,
    flat_device: torch.device,
    rank: int,
    boxes: _BoxCache,
) -> _Dest:
    shape = tuple(info.size)
    dest = _Dest(key, shape)
    if local is None:
        return dest
    if not isinstance(local, DTensor):
        if full is not None:  # rank 0 keeps its own tensor, as PyTorch does
            dest.result = full.detach().to(device)
            return dest
        new = torch.empty(shape, dtype=info.dtype, device=device)
        dest.result = new
        dest.box_start = (0,) * len(shape)
        if device == flat_device:
            dest.unpack_into = new
        else:
            dest.unpack_into = torch.empty(shape, dtype=info.dtype, device=flat_device)
            dest.finish = new
        return dest
    box = _local_box(shape, local, rank, boxes)
    if box is None:
        return dest  # this rank is not part of the DTensor's mesh
    box_shape, box_start = box
    box_shape = tuple(box_shape)
    dest.box_start = tuple(box_start)
    if local.is_meta:
        new = torch.empty(box_shape, dtype=info.dtype, device=device)
        dest.result = dtensor_of(new, local)
    else:
        # The local tensor itself (to_local() would only add an autograd view of it).
        new = local._local_tensor
        if tuple(new.shape) != box_shape:
            raise ValueError(
                f"broadcast_state_dict: key {key!r}: the local shard has shape "
                f"{tuple(new.shape)}, but the full tensor {shape} with placements "
                f"{local.placements} gives this rank {box_shape}"
            )
        dest.result = local
    if new.dtype == info.dtype and new.device == flat_device:
        dest.unpack_into = new
    else:
        # PyTorch's copy_ casts to the local dtype; unpack is byte-exact, so stage.
        dest.unpack_into = torch.empty(box_shape, dtype=info.dtype, device=flat_device)
        dest.finish = new
    return dest


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

    Differences: tensors travel in packed slices of ``min(bucket_bytes / 2, 8 MiB)``
    (one asynchronous broadcast per slice, at most ``ceil(total bytes / slice)``,
    pipelined: the next slice is packed and the previous one unpacked while one
    travels; the two slice buffers are the extra memory, at most one bucket), plus one
    per tensor of a quarter slice or more, which travels alone from the source tensor
    itself, and into the destination itself where it receives the whole tensor)
    instead of one at a time; a tensor that several keys share travels once and fills
    each of them; ranks other than 0 never build a full copy of a tensor they hold
    sharded; a 0-dim tensor arrives
    with a storage of its one element (PyTorch pickles a view with its whole base
    storage); ``cpu_offload=True`` does not raise ``KeyError`` for a tensor only the
    full state dict has; and a failure on any rank (rank 0's metadata, a local shard
    of the wrong shape) is raised on every rank before any tensor is sent. The source is the
    group's rank 0.

    Args:
        full_state_dict: on the group's rank 0, the flat full state dict (plain
            tensors); ignored elsewhere.
        local_state_dict: this rank's state dict, updated in place.
        device: where new tensors are placed.
        pg: the process group; default: the default group.
        strict: remove local keys the full state dict does not have.
        cpu_offload: move the received tensors to the CPU.
        bucket_bytes: the most extra memory for slice buffers (two slices).
    """
    group = pg if pg is not None else dist.distributed_c10d._get_default_group()
    is_src = dist.get_rank(group) == 0
    error: BaseException | None = None
    meta: list[tuple[str, Any]] | None = None
    wire: tuple[list[tuple[str, Any]], dict[Any, bytes]] | None = None
    if is_src:
        try:
            meta = _announce(full_state_dict)
            wire = _to_wire(meta)
        except Exception as exc:  # shipped to every rank below
            error = exc
    box = [(wire, None if error is None else f"{type(error).__name__}: {error}")]
    dist.broadcast_object_list(box, group=group, group_src=0)
    wire, src_error = box[0]
    if src_error is not None:
        if error is not None:
            raise error
        raise RankFailure(
            f"broadcast_state_dict failed on the source rank: {src_error}", {0: src_error}
        )

    flat_device = _pg_device(group, device)
    dests: list[_Dest] = []
    try:
        if not is_src:
            # Rank 0 keeps its own objects (0-dim tensors moved to the CPU), as PyTorch.
            meta = _from_wire(*wire)
        tensor_keys: list[tuple[str, _TensorInfo]] = [
            (k, v) for k, v in meta if isinstance(v, _TensorInfo)
        ]
        rank = dist.get_rank()
        boxes: _BoxCache = {}
        src_keys: list[str] = []
        slot_of: dict[str, int] = {}
        for key, info in tensor_keys:
            full = full_state_dict[key] if is_src else None
            local = local_state_dict.get(key)
            dest = _plan_dest(key, info, local, full, device, flat_device, rank, boxes)
            if info.same_as is None:
                slot_of[key] = len(src_keys)
                src_keys.append(key)
            dest.slot = slot_of[info.same_as or key]
            dests.append(dest)
        _one_writer_per_target(dests)
        slot_dests: list[list[_Dest]] = [[] for _ in src_keys]
        for dest in dests:
            if dest.unpack_into is not None:
                slot_dests[dest.slot].append(dest)
        infos = dict(tensor_keys)
        specs = [(tuple(infos[k].size), infos[k].dtype) for k in src_keys]
        # Slot sizes as pack_layout rounds them (without its per-call checks).
        align = ops.ALIGNMENT
        slots = [-(-_numel(shape) * dtype.itemsize // align) * align for shape, dtype in specs]
        runs = _runs(slots, slice_bytes(bucket_bytes))
        # pack_layout's offsets, from the slot sizes already at hand (it re-checks
        # every spec, ~10 us per tensor).
        layouts = []
        for run in runs:
            offsets = list(accumulate((slots[j] for j in run), initial=0))
            layouts.append((offsets[:-1], offsets[-1]))
        # A big tensor travels alone and, where its bytes are contiguous, straight from
        # the source tensor / into the destination: no bucket buffer, no pack / unpack.
        in_place: list[tuple[torch.Tensor | None, _Dest | None]] = []
        for run in runs:
            view, receiver = None, None
            if len(run) == 1:
                j = run[0]
                if is_src:
                    view = _bytes_of(full_state_dict[src_keys[j]].detach(), flat_device)
                else:
                    # Only a destination holding the whole tensor can receive it in place.
                    for d in slot_dests[j]:
                        if d.unpack_into.shape == specs[j][0]:
                            view = _bytes_of(d.unpack_into, flat_device)
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
    except Exception as exc:  # reported to every rank by agree()
        error = exc
    agree(group, error, 0, "broadcast_state_dict")

    srcs = [full_state_dict[k].detach() for k in src_keys] if is_src else []
    _pipelined_broadcasts(group, is_src, srcs, specs, slot_dests, runs, layouts, in_place, flats)
    _finish(dests)

    global_keys = {k for k, _ in meta}
    for key, value in meta:
        if not isinstance(value, _TensorInfo) and key in local_state_dict:
            local_state_dict[key] = value
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


def _one_writer_per_target(dests: list[_Dest]) -> None:
    """Let one key write each local tensor that several keys share (tied weights).

    Two keys holding the same local shard would make ``unpack`` refuse the overlapping
    destinations; the last key writes, as PyTorch's key-by-key copies leave it, and
    every key still gets the tensor as its result. Only DTensor shards can be shared:
    other keys receive new tensors.
    """
    writer: dict[tuple[Any, ...], _Dest] = {}
    for d in dests:
        target = d.finish if d.finish is not None else d.unpack_into
        if target is None or not isinstance(d.result, DTensor) or not target.numel():
            continue
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
                total = _numel(spec[0]) * spec[1].itemsize
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


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _runs(costs: list[int], bucket_bytes: int) -> list[list[int]]:
    """Buckets of tensors; one of at least a quarter bucket travels alone where the
    count allows (always from a bucket's worth on).

    Below a quarter bucket, a broadcast of its own costs more than the copy it saves.
    """
    return buckets_with_solos(costs, bucket_bytes, [True] * len(costs), bucket_bytes // 4)


def _bytes_of(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """``t``'s bytes as a flat uint8 view, when a broadcast can use them in place."""
    if t is None or t.device != device or not t.is_contiguous() or t.numel() == 0:
        return None
    return t.reshape(-1).view(torch.uint8)


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


@gc_paused()
def distribute_state_dict(
    full_state_dict: dict[str, Any],
    local_state_dict: dict[str, Any],
    device: torch.device,
    pg: dist.ProcessGroup | None = None,
) -> None:
    """Loads a full state dict that every rank holds into the local one, in place.

    Counterpart of ``_distribute_state_dict``.

    Same results as PyTorch: non-tensor values and 0-dim tensors (moved to the CPU) are
    assigned; a DTensor local value is replaced by a new DTensor of the same mesh and
    placements holding this rank's box; any other present local value is replaced by
    the full tensor moved to ``device`` (the same tensor when it is already there).

    Difference: each rank slices its box out of its own copy, with one batched copy per
    device pair and no communication, where PyTorch's ``distribute_tensor`` scatters
    every tensor from rank 0; the full state dicts must therefore be equal on every
    rank, as the function's contract already says. ``Partial`` and ``_StridedShard``
    placements still go through ``distribute_tensor``.

    Args:
        full_state_dict: the flat full state dict (plain tensors), on every rank.
        local_state_dict: this rank's state dict, updated in place.
        device: where new tensors are placed.
        pg: unused (the DTensors carry their meshes); kept for the signature.
    """
    del pg
    rank = dist.get_rank()
    boxes: _BoxCache = {}
    results: dict[str, Any] = {}
    dsts: list[torch.Tensor] = []
    srcs: list[torch.Tensor] = []
    # A tied weight (one full tensor, one local DTensor, at several keys) is sliced once.
    done: dict[tuple[int, int], str] = {}
    for key, value in full_state_dict.items():
        if not torch.is_tensor(value):
            results[key] = value
            continue
        if value.dim() == 0:
            results[key] = value.cpu()
            continue
        local = local_state_dict.get(key)
        if local is None:
            continue
        earlier = done.setdefault((id(value), id(local)), key)
        if earlier != key:
            if earlier in results:
                results[key] = results[earlier]
            continue
        if not isinstance(local, DTensor):
            results[key] = value.detach().to(device)
            continue
        mesh, placements = local.device_mesh, local.placements
        if not is_plain_placement(placements):
            results[key] = distribute_tensor(value.detach().to(device), mesh, placements)
            continue
        box = _local_box(tuple(value.shape), local, rank, boxes)
        if box is None:
            continue  # this rank is not part of the DTensor's mesh
        shape, start = box
        new = torch.empty(shape, dtype=value.dtype, device=device)
        src = value.detach()
        for d, (lo, n) in enumerate(zip(start, shape)):
            if n != src.shape[d]:
                src = src.narrow(d, lo, n)
        dsts.append(new)
        srcs.append(src)
        results[key] = dtensor_of(new, local, value.shape, value.stride())
    batched_copy_pairs(dsts, srcs)
    local_state_dict.update(results)
