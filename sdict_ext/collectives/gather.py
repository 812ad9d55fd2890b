"""``gather_state_dict``: full tensors from DTensor / ShardedTensor leaves, coalesced.

PyTorch gathers tensor by tensor: one ``redistribute`` (one or more all-gathers) per
DTensor, one padded all-gather per ShardedTensor. Here the local shards of many
tensors are packed into one buffer per slice, one bulk exchange moves the slice,
and one op call rebuilds all of its tensors:

* DTensors sharded along one mesh dim (FSDP ``[Shard(0)]``, TP ``[Shard(1)]``, HSDP
  ``[Replicate(), Shard(0)]``): every rank's slot has the same layout (the
  ``torch.chunk`` split), and :func:`sdict_ext.ops.gather_concat_into` rebuilds, on
  that mesh dim's process group.
* Everything else that is a dense box per rank (several sharded mesh dims, uneven
  splits where some ranks hold nothing, ShardedTensors with other shard layouts): each
  rank packs its own pieces, and one :func:`sdict_ext.ops.batched_copy_` places every
  piece into its box of the output.
* ``Partial`` and ``_StridedShard`` placements (a reduction or an interleaving, not a
  box), and several sharded mesh dims on a mesh smaller than the world, fall back to
  PyTorch's per-tensor ``redistribute`` after the coalesced part. Fully replicated
  DTensors need no exchange: their local tensor is the result, as in PyTorch.

The exchange: one in-place, asynchronous ``all_gather_single`` per slice of
``min(bucket_bytes / 2, 8 MiB)`` on every backend (``ceil(total gathered bytes /
slice)`` slices per process group, plus one tiny agreement before them), pipelined:
the next slice is packed and the previous one rebuilt while one travels, in two slice
buffers. A slice holding only a ``Shard(0)`` tensor split evenly has the output's own
layout (rank r's slot is rows ``r * n / world`` on), so ranks that keep results gather
it straight into the output; until its turn (such slices go last) that output also
serves them as the buffer of the other slices (then one buffer, no overlap). The extra
memory beyond the results is then at most one bucket (two slices).

With ``cpu_offload`` from an accelerator, each gathered slice crosses to the host in
one copy into a pinned :class:`~sdict_ext.host.pipeline.HostPipeline` bucket, and the
CPU kernels rebuild the final CPU tensors from it while the next slice's copy is in
flight: no device temporaries, no device-to-host copy per tensor.

ShardedTensors are read through their metadata and local shards only (a tensor method
of the ShardedTensor itself goes through its ``__torch_function__``, a Python dispatch
per call that, over many small ShardedTensors, would cost more than the exchange);
one laid out as ``ChunkShardingSpec`` makes it (``torch.chunk`` on one dim) is gathered
exactly like the ``Shard(dim)`` DTensor it matches.

Why slices rather than one buffer of the whole bucket: pipelined slices cost about
what one all-gather of the same bytes from an existing buffer costs, while a fresh
bucket-sized buffer is first-touched page by page, which can cost as much as the
exchange itself; slice-sized buffers come back from the allocator's cache call after
call. (Measurements: BENCHMARKS.md.)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.tensor import DTensor, Replicate, Shard

from sdict_ext import ops
from sdict_ext._gc import gc_paused
from sdict_ext.collectives.agreement import agree, digest
from sdict_ext.collectives.boxes import box_of, is_plain_placement, mesh_coordinates, mesh_shape
from sdict_ext.collectives.buckets import DEFAULT_BUCKET_BYTES, buckets_with_solos, slice_bytes
from sdict_ext.host.copies import batched_copy_pairs, indexed_device, offload_leaves
from sdict_ext.host.pipeline import HostPipeline
from sdict_ext.tree import (
    LEAF_DTENSOR,
    LEAF_OTHER,
    LEAF_SHARDED,
    Flat,
    flatten,
    format_path,
    leaf_kind,
)

__all__ = ["gather_state_dict"]

_CPU = torch.device("cpu")
_ALIGN = ops.ALIGNMENT


def _aligned(nbytes: int) -> int:
    return (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN


class _Item:
    """One tensor to rebuild from the pieces every rank of a group holds."""

    __slots__ = ("leaf", "shape", "dtype", "mine", "pieces", "shard_dim", "out", "out_device")

    def __init__(self, leaf: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.leaf = leaf
        self.shape = shape
        self.dtype = dtype
        # This rank's piece tensors, in the order of pieces[my rank].
        self.mine: list[torch.Tensor] = []
        # pieces[r]: (shape, start) boxes of the full tensor that group rank r sends.
        self.pieces: list[list[tuple[tuple[int, ...], tuple[int, ...]]]] = []
        # Set for the torch.chunk layout that gather_concat_into rebuilds.
        self.shard_dim: int | None = None
        self.out: torch.Tensor | None = None
        self.out_device = _CPU

    def slot_bytes(self, rank: int) -> int:
        size = self.dtype.itemsize
        return sum(_aligned(math.prod(shape) * size) for shape, _ in self.pieces[rank])


class _Stream:
    """Items exchanged on one process group through buffers on one device."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device, chunked: bool) -> None:
        self.group = group
        self.device = device
        self.chunked = chunked
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.items: list[_Item] = []

    def cost(self, item: _Item) -> int:
        if self.chunked:  # every rank's slot is rank 0's, the largest torch.chunk piece
            return self.world * item.slot_bytes(0)
        return self.world * max(item.slot_bytes(r) for r in range(self.world))

    def layout(self, items: Sequence[_Item]) -> tuple[list[list[int]], int]:
        """Per-rank byte offsets of every piece in a bucket, and the slot size.

        Chunked items use one layout for every rank (rank 0's piece is the largest
        ``torch.chunk`` piece); others pack each rank's own pieces densely.
        """
        if self.chunked:
            offsets, total = ops.pack_layout([(it.pieces[0][0][0], it.dtype) for it in items])
            return [offsets] * self.world, total
        per_rank: list[list[int]] = []
        chunk = 0
        for r in range(self.world):
            specs = [(shape, it.dtype) for it in items for shape, _ in it.pieces[r]]
            offsets, total = ops.pack_layout(specs)
            per_rank.append(offsets)
            chunk = max(chunk, total)
        return per_rank, chunk


def _exchange(stream: _Stream, gathered: torch.Tensor, chunk: int) -> Any:
    """Starts filling every rank's slot of ``gathered`` (this rank's slot is already
    packed); returns the collective's work, to wait for."""
    mine = gathered[stream.rank * chunk : (stream.rank + 1) * chunk]
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return all_gather(gathered, mine, group=stream.group, async_op=True)


def _rebuild(
    stream: _Stream,
    items: Sequence[_Item],
    gathered: torch.Tensor,
    offsets: list[list[int]],
    chunk: int,
    outs: Sequence[torch.Tensor],
) -> None:
    if stream.chunked:
        ops.gather_concat_into(
            gathered[: stream.world * chunk],
            stream.world,
            offsets[0],
            outs,
            [it.shard_dim for it in items],
        )
        return
    srcs: list[torch.Tensor] = []
    boxes: list[tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]] = []
    for r in range(stream.world):
        base = r * chunk
        k = 0
        for it, out in zip(items, outs):
            for shape, start in it.pieces[r]:
                offset = offsets[r][k]
                k += 1
                numel = math.prod(shape)
                if numel == 0:
                    continue
                nbytes = numel * it.dtype.itemsize
                src = gathered[base + offset : base + offset + nbytes].view(it.dtype).view(shape)
                boxes.append((out, tuple(start), tuple(shape)))
                srcs.append(src)
    dsts = ops.box_views(*zip(*boxes)) if boxes else []
    ops.batched_copy_(dsts, srcs)


def _mesh_dim_route(
    mesh: Any, md: int, cache: dict
) -> tuple[dist.ProcessGroup, list[tuple[int, ...]], bool]:
    """For exchanges along mesh dim ``md``: its group, each group rank's mesh
    coordinate, and whether group rank order is coordinate order (the chunk layout).

    Cached per call of gather_state_dict: every tensor on a mesh shares the answer.
    """
    key = (id(mesh), md)
    route = cache.get(key)
    if route is None:
        group = mesh.get_group(md)
        coords = mesh_coordinates(mesh)
        me = coords[dist.get_rank()]
        row = [
            g for g, c in coords.items()
            if all(c[i] == me[i] for i in range(len(me)) if i != md)
        ]
        row.sort(key=lambda g: coords[g][md])
        group_ranks = [dist.get_group_rank(group, g) for g in row]
        by_group_rank = [coords[g] for _, g in sorted(zip(group_ranks, row))]
        route = cache[key] = (group, by_group_rank, group_ranks == list(range(len(row))))
    return route


def _plan_dtensor(value: DTensor, leaf: int, streams: dict, order: list, cache: dict) -> bool:
    """Adds a coalesced item for ``value``; False when it needs PyTorch's path.

    ``cache`` holds what every tensor of one call shares: mesh routes, the
    classification of each distinct placements tuple, this rank's rank in each group.
    """
    placements = value.placements
    # Placements repeat across a model's tensors: classify each distinct tuple once
    # (isinstance on placement types goes through a metaclass check).
    sharded = cache.get(placements)
    if sharded is None:
        sharded = cache[placements] = (
            [md for md, p in enumerate(placements) if not isinstance(p, Replicate)]
            if is_plain_placement(placements)
            else False
        )
    if sharded is False:
        return False
    if not sharded:
        return False  # fully replicated: PyTorch's path is a no-op returning the local
    mesh = value.device_mesh
    local = value._local_tensor
    item = _Item(leaf, tuple(value.shape), value.dtype)
    item.out_device = local.device
    if len(sharded) == 1:
        md = sharded[0]
        group, coords_by_rank, chunked = _mesh_dim_route(mesh, md, cache)
        if chunked:
            # torch.chunk layout: rank 0's piece is the largest, and the only one the
            # slot layout and the rebuild need.
            box0 = box_of(item.shape, mesh_shape(mesh), coords_by_rank[0], placements)
            item.pieces = [[box0]] * len(coords_by_rank)
            item.shard_dim = placements[md].dim % max(1, len(item.shape))
        else:
            item.pieces = [
                [box_of(item.shape, mesh_shape(mesh), c, placements)] for c in coords_by_rank
            ]
    else:
        # Several sharded mesh dims: exchange on the default group, whose ranks are
        # the global ranks, when the mesh covers all of it.
        group = dist.group.WORLD
        world = dist.get_world_size(group)
        if mesh.size() != world:
            return False
        chunked = False
        coords = mesh_coordinates(mesh)
        dims = mesh_shape(mesh)
        replicated = [md for md, p in enumerate(placements) if isinstance(p, Replicate)]
        for g in range(world):
            c = coords[g]
            # Replicas hold the same box; only coordinate 0 of replicated dims sends it.
            sends = all(c[md] == 0 for md in replicated)
            item.pieces.append([box_of(item.shape, dims, c, placements)] if sends else [])
    rank_key = ("rank", id(group))
    group_rank = cache.get(rank_key)
    if group_rank is None:
        group_rank = cache[rank_key] = dist.get_rank(group)
    if item.pieces[group_rank]:
        item.mine = [local]
    key = (id(group), local.device, chunked)
    stream = streams.get(key)
    if stream is None:
        stream = streams[key] = _Stream(group, local.device, chunked)
        order.append(key)
    stream.items.append(item)
    return True


def _plan_sharded(
    value: Any,
    leaf: int,
    group: dist.ProcessGroup,
    device: torch.device,
    streams: dict,
    order: list,
    cache: dict,
) -> _Item:
    # Only the metadata and the local shards are read: any tensor method of the
    # ShardedTensor itself (size(), dtype) goes through its __torch_function__
    # dispatch, which would be most of a gather of many small ShardedTensors.
    meta = value.metadata()
    sizes = cache.get(("world", id(group)))
    if sizes is None:
        sizes = cache[("world", id(group))] = (dist.get_world_size(group), dist.get_rank(group))
    world, me = sizes
    item = _Item(leaf, tuple(meta.size), meta.tensor_properties.dtype)
    local_shards = value.local_shards()
    item.out_device = local_shards[0].tensor.device if local_shards else _CPU
    item.pieces = [[] for _ in range(world)]
    for shard_meta in meta.shards_metadata:
        rank = shard_meta.placement.rank()
        item.pieces[rank].append((tuple(shard_meta.shard_sizes), tuple(shard_meta.shard_offsets)))
    by_offset = {tuple(s.metadata.shard_offsets): s.tensor for s in local_shards}
    for _, start in item.pieces[me]:
        if start not in by_offset:
            raise ValueError(
                f"gather_state_dict: rank {me} has no local shard at offsets {start} that "
                "the ShardedTensor's metadata places on it"
            )
        item.mine.append(by_offset[start])
    # Decided from the metadata alone, so that every rank picks the same stream.
    on_device = all(m.placement.device().type == device.type for m in meta.shards_metadata)
    dim = None
    if on_device:
        # A model repeats a few layouts many times: each is checked once per call.
        layout = ("chunk", item.shape, tuple(map(tuple, item.pieces)))
        dim = cache.get(layout, cache)
        if dim is cache:
            dim = cache[layout] = _chunk_dim(item.shape, item.pieces)
    if dim is not None:
        # ChunkShardingSpec's layout is the torch.chunk split of a Shard(dim) DTensor:
        # the same slots, and the same one-call rebuild, as for the DTensor.
        item.out_device = device
        box0 = item.pieces[0][0]
        if not item.mine:  # a rank past the last chunk sends an empty piece
            shape = list(item.shape)
            shape[dim] = 0
            item.mine = [torch.empty(shape, dtype=item.dtype, device=device)]
        item.pieces = [[box0]] * world
        item.shard_dim = dim
    key = (id(group), device, dim is not None)
    stream = streams.get(key)
    if stream is None:
        stream = streams[key] = _Stream(group, device, dim is not None)
        order.append(key)
    stream.items.append(item)
    return item


def _chunk_dim(
    shape: tuple[int, ...], pieces: list[list[tuple[tuple[int, ...], tuple[int, ...]]]]
) -> int | None:
    """The dim whose ``torch.chunk`` split across the ranks (in rank order) the pieces
    are, ranks past the last chunk holding none; None for any other layout."""
    world = len(pieces)
    if not shape or not pieces[0] or any(len(p) > 1 for p in pieces):
        return None
    for dim in range(len(shape)):
        chunks = [box_of(shape, (world,), (r,), [Shard(dim)]) for r in range(world)]
        if all(
            p == [box] if box[0][dim] else not p or p == [box]
            for p, box in zip(pieces, chunks)
        ):
            return dim
    return None


def _pytorch_dtensor_gather(value: DTensor) -> torch.Tensor:
    full = value.redistribute(
        device_mesh=value.device_mesh, placements=[Replicate()] * len(value.placements)
    ).to_local()
    if isinstance(full, AsyncCollectiveTensor):
        full = full.wait()
    return full


def _default_device(group: dist.ProcessGroup) -> torch.device:
    return dist.distributed_c10d._get_pg_default_device(group)


@gc_paused()
def gather_state_dict(
    state_dict: dict[str, Any],
    *,
    pg: dist.ProcessGroup | None = None,
    device: torch.device | None = None,
    cpu_offload: bool = False,
    ranks_only: tuple[int, ...] = (),
    type_check: bool = True,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> dict[str, Any]:
    """Replaces every DTensor / ShardedTensor with its full tensor (``_gather_state_dict``).

    Every rank of ``pg`` (and of the DTensors' meshes) must call this with a state
    dict of the same structure. Shards move in coalesced slices of half a bucket (8
    MiB at most), pipelined: at most ``ceil(total gathered bytes / slice)`` bulk
    exchanges per group, and the extra memory beyond the results is one bucket. A
    failure while planning on any rank (bad leaf type, a shard that is missing)
    raises on every rank before any bulk collective starts.

    Args:
        state_dict: the sharded state dict.
        pg: group for ShardedTensors (default: each one's own group) and for the
            agreement between ranks (default: the default group); DTensors use
            their mesh.
        device: buffer device for ShardedTensors; default: the group's default.
        cpu_offload: return CPU tensors. From an accelerator, each gathered slice
            crosses to the host in one copy into a pinned bucket and the CPU kernels
            rebuild the results there, so device memory holds none of them.
        ranks_only: when non-empty, only these ranks get results; the others take part
            in the collectives and get ``{}``.
        type_check: raise ``ValueError`` for unsupported leaf types.
        bucket_bytes: bytes per bucket (all ranks' shards of its tensors together).

    Returns:
        The state dict with full plain tensors in place of sharded ones; plain tensors
        and other values as they are (the same objects), like PyTorch. A sharded
        object at several places (a tied weight) is exchanged once, and each place
        gets a tensor of its own, as PyTorch's key-by-key gather gives.
    """
    return _gather(state_dict, pg, device, cpu_offload, ranks_only, type_check, bucket_bytes)


def _gather(
    state_dict: dict[str, Any],
    pg: dist.ProcessGroup | None,
    device: torch.device | None,
    cpu_offload: bool,
    ranks_only: tuple[int, ...],
    type_check: bool,
    bucket_bytes: int,
    *,
    host_buckets_on_cpu: bool = False,
) -> dict[str, Any]:
    """:func:`gather_state_dict`'s body.

    ``host_buckets_on_cpu`` sends a CPU exchange's slices through :class:`_Offload`
    too, as an accelerator's always go: a test seam, so that CPU tests drive the
    accelerator's ``cpu_offload`` route copy for copy. Callers leave it off: on the
    CPU the exchange buffer already is host memory, and the download would be one
    more copy of every gathered byte.
    """
    # Unsupported leaves are reported after the walk, not during it, so a rank that
    # fails still knows whether it holds sharded leaves, i.e. whether the other ranks
    # wait for it in the agreement below.
    device = indexed_device(device)
    flat = flatten(state_dict, type_check=False)
    sharded = [i for i, k in enumerate(flat.kinds) if k in (LEAF_DTENSOR, LEAF_SHARDED)]
    error: BaseException | None = None
    if type_check and LEAF_OTHER in flat.kinds:
        bad = flat.kinds.index(LEAF_OTHER)
        error = ValueError(
            f"Unexpected value type {type(flat.leaves[bad])} at key path "
            f"{format_path(flat.paths[bad])!r}; pass type_check=False to accept it"
        )
    if not sharded:
        # Nothing to exchange: like PyTorch, no collective at all, so a plain state
        # dict can be "gathered" by any subset of ranks, or without a process group.
        if error is not None:
            raise error
        keep = not ranks_only or dist.get_rank(pg) in ranks_only
        return _finish(flat, list(flat.leaves), keep, cpu_offload)

    group = pg if pg is not None else dist.distributed_c10d._get_default_group()
    keep = not ranks_only or dist.get_rank(pg) in ranks_only
    streams: dict[Any, _Stream] = {}
    order: list[Any] = []
    fallback: list[int] = []
    plan: list[Any] = []
    same: list[tuple[int, int]] = []  # (leaf, the earlier leaf holding the same shards)
    try:
        routes: dict[Any, Any] = {}
        first: dict[int, int] = {}
        for i in sharded:
            value, path = flat.leaves[i], flat.paths[i]
            earlier = first.setdefault(id(value), i)
            if earlier != i:
                # One object at several places (a tied weight from get_model_state_dict):
                # gathered once, its full tensor stands at all of them. Identity, not
                # memory, decides, so every rank decides alike (an empty shard has none).
                same.append((i, earlier))
                plan.append((path, earlier))
                continue
            if flat.kinds[i] == LEAF_DTENSOR:
                if not _plan_dtensor(value, i, streams, order, routes):
                    fallback.append(i)
                plan.append((path, tuple(value.shape), value.dtype, value.placements))
            else:
                # The shard metadata numbers ranks within the tensor's own group.
                st_group = pg if pg is not None else (value._process_group or group)
                buf_device = device
                if buf_device is None:
                    buf_device = routes.get(("device", id(st_group)))
                    if buf_device is None:
                        buf_device = routes[("device", id(st_group))] = _default_device(st_group)
                item = _plan_sharded(value, i, st_group, buf_device, streams, order, routes)
                plan.append((path, item.shape, item.dtype))
        if keep:
            _allocate_outputs(streams, cpu_offload)
    except Exception as exc:  # reported to every rank by agree()
        error = exc if error is None else error
    agree(group, error, what="gather_state_dict", plan_digest=digest(plan))

    out = list(flat.leaves)
    for key in order:
        stream = streams[key]
        via_host = cpu_offload and (stream.device.type != "cpu" or host_buckets_on_cpu)
        _run_stream(stream, bucket_bytes, keep, cpu_offload, via_host, out)
    for i in fallback:
        out[i] = _pytorch_dtensor_gather(flat.leaves[i])
    for i, earlier in same:
        out[i] = out[earlier]
    return _finish(flat, out, keep, cpu_offload, same)


def _finish(
    flat: Flat,
    out: list[Any],
    keep: bool,
    cpu_offload: bool,
    same: Sequence[tuple[int, int]] = (),
) -> Any:
    if not keep:
        return {} if flat.top_is_dict else None
    for i, kind in enumerate(flat.kinds):
        if kind == LEAF_OTHER:
            out[i] = copy.deepcopy(out[i])
    if cpu_offload:
        out = offload_leaves(out, [leaf_kind(v) for v in out])
    if same:
        _separate(flat, out, same)
    return flat.rebuild(out)


def _separate(flat: Flat, out: list[Any], same: Sequence[tuple[int, int]]) -> None:
    """Give each place of a sharded tensor met several times its own result, in place.

    PyTorch gathers key by key, so a tied weight comes back as separate tensors with
    separate storages (and transformers' ``save_pretrained`` drops every key whose
    storage repeats). It crossed the wire once; the other places get local copies.
    Where the gather moved nothing (a replicated DTensor: its local tensor is the
    result, as in PyTorch) each place gets its own alias of that local tensor instead.
    """
    dsts: list[torch.Tensor] = []
    srcs: list[torch.Tensor] = []
    for i, earlier in same:
        result = out[earlier]
        if out[i] is not result:
            continue  # already a copy of its own (offloaded from an accelerator)
        source = flat.leaves[earlier]
        local = source._local_tensor if isinstance(source, DTensor) else None
        if local is not None and _same_storage(result, local):
            out[i] = result.detach()
            continue
        out[i] = torch.empty_like(result)
        dsts.append(out[i])
        srcs.append(result)
    batched_copy_pairs(dsts, srcs)


def _allocate_outputs(streams: dict[Any, _Stream], cpu_offload: bool) -> None:
    for stream in streams.values():
        for it in stream.items:
            device = _CPU if cpu_offload else it.out_device
            it.out = torch.empty(it.shape, dtype=it.dtype, device=device)


def _exchanges_in_place(stream: _Stream, item: _Item, cpu_offload: bool) -> bool:
    """Whether a bucket of ``item`` alone can be gathered straight into its output.

    A ``Shard(0)`` tensor split evenly (in aligned slots) has exactly the bucket's
    layout: rank r's slot is rows ``[r * n / world, (r + 1) * n / world)`` of the full
    tensor, so the all-gather can fill the output itself, with no bucket buffer (one
    more copy of the tensor, a gather's largest extra memory). The output must be on
    the exchange's device (not so for ``cpu_offload`` from an accelerator). Decided
    from metadata alone, so every rank orders the buckets alike.
    """
    numel = math.prod(item.shape)
    if not stream.chunked or item.shard_dim != 0 or not numel:
        return False
    if item.out_device != stream.device or (cpu_offload and stream.device.type != "cpu"):
        return False
    piece_bytes, rest = divmod(numel * item.dtype.itemsize, stream.world)
    return rest == 0 and item.shape[0] % stream.world == 0 and piece_bytes % _ALIGN == 0


def _run_stream(
    stream: _Stream,
    bucket_bytes: int,
    keep: bool,
    cpu_offload: bool,
    via_host: bool,
    out: list[Any],
) -> None:
    items = stream.items
    # A big tensor that can be gathered straight into its output gets a slice of its
    # own where the count allows (always from one slice's worth). The shared slices
    # come first, then those (the same order on every rank): until its own turn, an
    # in-place output is free space that ranks keeping results use as the slice
    # buffer, so that buffer takes no memory the results do not take anyway.
    piece = slice_bytes(bucket_bytes)
    solo = [_exchanges_in_place(stream, it, cpu_offload) for it in items]
    runs = buckets_with_solos([stream.cost(it) for it in items], piece, solo, piece // 4)
    in_place = [len(run) == 1 and solo[run[0]] for run in runs]
    runs = [r for r, p in zip(runs, in_place) if not p] + [r for r, p in zip(runs, in_place) if p]
    n_shared = in_place.count(False)
    layouts = [stream.layout([items[j] for j in run]) for run in runs]
    # In-place outputs are fresh contiguous tensors on the stream's device.
    targets = (
        [items[run[0]].out.view(-1).view(torch.uint8) for run in runs[n_shared:]] if keep else []
    )
    if not keep:  # ranks that keep nothing receive every slice into the buffer
        targets, n_shared = [], len(runs)
    biggest = max((chunk for _, chunk in layouts[:n_shared]), default=0)
    roomy = [t for t in targets if t.numel() >= stream.world * biggest]
    if roomy:
        # One lent buffer: slices then take turns in it (no second buffer to fill).
        buffers = [max(roomy, key=lambda t: t.numel())]
    else:
        buffers = [
            torch.empty(stream.world * biggest, dtype=torch.uint8, device=stream.device)
            for _ in range(min(2, n_shared))
        ]
    directs = [None] * n_shared + targets
    offload = _Offload(stream, out) if keep and via_host else None
    pending: tuple | None = None
    for n, (run, (offsets, chunk), direct) in enumerate(zip(runs, layouts, directs)):
        bucket = [items[j] for j in run]
        target = direct if direct is not None else buffers[n % len(buffers)]
        if pending is not None and _same_storage(pending[4], target):
            _finish_slice(stream, keep, offload, out, *pending)  # its last user
            pending = None
        target = target if direct is not None else target[: stream.world * chunk]
        mine_slot = target[stream.rank * chunk : (stream.rank + 1) * chunk]
        mine = [t for it in bucket for t in it.mine]
        if mine:
            ops.pack(mine, out=mine_slot, offsets=offsets[stream.rank])
        work = _exchange(stream, target, chunk)
        if pending is not None:
            _finish_slice(stream, keep, offload, out, *pending)
        pending = (work, bucket, offsets, chunk, target, direct is not None)
    if pending is not None:
        _finish_slice(stream, keep, offload, out, *pending)
    if offload is not None:
        offload.flush()


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _finish_slice(
    stream: _Stream,
    keep: bool,
    offload: _Offload | None,
    out: list[Any],
    work: Any,
    bucket: list[_Item],
    offsets: list[list[int]],
    chunk: int,
    gathered: torch.Tensor,
    direct: bool,
) -> None:
    """Waits for one slice's all-gather and rebuilds its tensors (or hands the slice
    to ``offload``, which rebuilds them on the host)."""
    work.wait()
    if not keep:
        return
    if direct:
        out[bucket[0].leaf] = bucket[0].out
        return
    if offload is not None:
        offload.take(bucket, offsets, chunk, gathered)
        return
    _rebuild(stream, bucket, gathered, offsets, chunk, [it.out for it in bucket])
    for it in bucket:
        out[it.leaf] = it.out


class _Offload:
    """Gathered slices on their way to CPU results (``cpu_offload``).

    Each gathered slice crosses to the host in one copy, into a :class:`HostPipeline`
    bucket (pinned on an accelerator), and the CPU kernels rebuild the final CPU
    tensors from it: never one device-to-host copy per tensor, and no device
    temporaries for the rebuilt tensors. A slice is rebuilt when the next one has been
    handed over, so the CPU rebuild of slice ``k - 1`` overlaps the copy of slice
    ``k``; with two buckets, the one a download lands in was rebuilt from already.
    Used for every exchange off the CPU; a CPU exchange rebuilds straight from its
    buffer, except under the tests' ``host_buckets_on_cpu``, where the same code runs
    with plain buckets and synchronous copies.
    """

    def __init__(self, stream: _Stream, out: list[Any]) -> None:
        self.stream = stream
        self.out = out
        self.pipe = HostPipeline(stream.device)
        self.count = 0
        self.waiting: tuple | None = None

    def take(
        self, bucket: list[_Item], offsets: list[list[int]], chunk: int, gathered: torch.Tensor
    ) -> None:
        """Starts the download of a gathered slice; rebuilds the previous one meanwhile."""
        k = self.count
        self.count += 1
        host = self.pipe.download(k, gathered)
        self.flush()
        self.waiting = (k, bucket, offsets, chunk, host)

    def flush(self) -> None:
        """Rebuilds the CPU tensors of the slice downloaded last, once it has arrived."""
        if self.waiting is None:
            return
        k, bucket, offsets, chunk, host = self.waiting
        self.waiting = None
        self.pipe.wait(k)
        _rebuild(self.stream, bucket, host, offsets, chunk, [it.out for it in bucket])
        for it in bucket:
            self.out[it.leaf] = it.out
