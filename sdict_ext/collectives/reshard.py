"""``reshard_state_dict``: a sharded state dict moved into another layout, never gathered.

PyTorch's way to change a state dict's layout (FSDP over some ranks into tensor
parallelism over others, another world size, another mesh) goes through full tensors:
``_gather_state_dict`` then ``_distribute_state_dict`` / ``_broadcast_state_dict``, or
``DTensor.full_tensor()`` key by key, funnelling every byte through every rank (or one)
and materialising every tensor. ``DTensor.redistribute`` works per tensor, within one
mesh. Here every byte goes once, straight from a rank that holds it in the source
layout to the rank that owns it in the destination layout:

1. **Describe.** Each rank lists the boxes (start, shape) of the full tensors it holds
   in the source layout and owns in the destination layout, per key path; the boxes
   come from :mod:`.boxes` (DTensors of ``Shard`` / ``Replicate`` placements on any
   mesh), a ShardedTensor's shard metadata, or the whole tensor for a plain one.
2. **Plan.** From every rank's description (one ``all_gather_object``), every rank
   computes the same plan: per key and destination box, its intersection with each
   distinct source box; a region several ranks hold (``Replicate``, HSDP's replicas)
   is split across them by the bytes each already sends; a region the destination rank
   holds itself is a local copy. The pieces to other ranks are then cut to at most half
   a round and packed into *rounds*: in a round, each rank sends and receives at most
   ``min(bucket_bytes, ROUND_BYTES)`` in all, one message per peer. Every check
   (global shapes and dtypes agree for one key, every destination byte has a source,
   source boxes do not overlap partially, the descriptions are well formed: peers are
   not trusted) is made before anything moves, and the plan is agreed through
   :func:`.agreement.agree`.
3. **Move.** Round k is packed (:func:`sdict_ext.ops.pack` of the source boxes'
   views, one call) into buffer k % 2, sent with one ``batch_isend_irecv`` to every
   peer of the round, and unpacked (:func:`sdict_ext.ops.unpack` into the destination
   boxes' views, one call) once received; round k + 1 is posted before round k is
   waited for, so at most two rounds are in flight and the extra memory is at most two
   buckets. Local pieces are one batched copy, made while round 0 travels.

The plan of this rank is cached per (group, bucket size, device, source layout,
destination layout): a training loop's second call agrees on it with one tiny
collective and plans nothing.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from sdict_ext import ops
from sdict_ext._gc import gc_paused
from sdict_ext.collectives.agreement import agree, digest, status_device
from sdict_ext.collectives.boxes import compute_box, dtensor_of, is_plain_placement
from sdict_ext.collectives.buckets import DEFAULT_BUCKET_BYTES, PIPELINE_SLICE_BYTES, buckets
from sdict_ext.host.copies import batched_copy_pairs, indexed_device
from sdict_ext.tree import (
    LEAF_DTENSOR,
    LEAF_SHARDED,
    LEAF_TENSOR,
    PLAIN_KINDS,
    flatten,
    format_path,
)

__all__ = [
    "MIN_BUCKET_BYTES",
    "ROUND_BYTES",
    "ReshardStats",
    "last_reshard_stats",
    "reshard_state_dict",
]

_WHAT = "reshard_state_dict"

#: Smallest accepted ``bucket_bytes``: a piece is cut to at most half a bucket less the
#: alignment of two message starts, and must still hold the widest element.
MIN_BUCKET_BYTES = 1024

#: Where each peer's message starts in a round's buffer (bytes). Within a message the
#: pieces are ordered by element size, widest first, so each lies at a multiple of its
#: element size with no padding: a message carries exactly its payload.
_MESSAGE_ALIGNMENT = 64

#: A region several source ranks hold is split across them only from this size on;
#: below, one rank (the least loaded) sends it whole.
_SPREAD_MIN_BYTES = 1 << 20

#: Most bytes a rank sends plus receives in one round (and ``bucket_bytes`` where
#: smaller): two slices of the collective routes. Rounds pipeline, packing round k + 1
#: while k travels; one bucket-sized round leaves nothing to overlap with. The
#: measurement behind it: BENCHMARKS.md, "Measurements behind constants in the code".
ROUND_BYTES = 2 * PIPELINE_SLICE_BYTES

#: A piece of at least this many bytes that is one contiguous range of its tensor (on
#: the sending or the receiving side) travels as its own message, straight from or
#: into that tensor, instead of being packed or unpacked: a model's per-rank pieces of
#: one weight are commonly a few hundred KiB to a few MiB. At most
#: ``ROUND_BYTES / _SOLO_MIN_BYTES`` (64) of them per peer and round: message tags
#: leave ``_TAG_BITS`` for the index.
_SOLO_MIN_BYTES = 1 << 18
_TAG_BITS = 8

#: Plans kept per process (least recently used dropped first).
_CACHE_SIZE = 16

_DTYPES = {
    str(d): d for d in (getattr(torch, n) for n in dir(torch)) if isinstance(d, torch.dtype)
}


class ReshardStats(dict):
    """What this process's last :func:`reshard_state_dict` call did, on this rank.

    Keys: ``planned`` (this call built the plan; False when the cache served it),
    ``rounds`` (pipelined rounds), ``p2p_ops`` (isend + irecv this rank posted),
    ``collectives`` (``batch_isend_irecv`` calls of the data phase, one per round this
    rank takes part in), ``bytes_sent`` / ``bytes_received`` (payload to / from other
    ranks), ``bytes_local`` (copied on this rank), ``bytes_owned`` (of the destination
    boxes this rank owns, each tied tensor once: ``bytes_received + bytes_local``),
    ``buffer_bytes`` (staging buffers held at the peak, at most two buckets),
    ``bucket_bytes``.
    """


_LAST = ReshardStats()


def last_reshard_stats() -> ReshardStats:
    """A copy of the statistics of this process's last :func:`reshard_state_dict`."""
    return ReshardStats(_LAST)


# ---------------------------------------------------------------------------------
# Describe: what this rank holds (source) and owns (destination), per key path.
# ---------------------------------------------------------------------------------

# An entry as it travels: (path, global shape, dtype name, boxes, alias, dense), a box
# being (start, shape) in the full tensor. ``alias`` is the index of an earlier
# destination entry of this rank whose tensor is this one (tied weights), or -1;
# ``dense`` tells per box whether its local tensor is contiguous (row-major), so that
# every rank knows which pieces can travel straight from or into their tensors.
_Box = tuple[tuple[int, ...], tuple[int, ...]]
_Entry = tuple[tuple[Any, ...], tuple[int, ...], str, list[_Box], int, list[bool]]


class _Side:
    r"""One side (source or destination) of this rank: the wire description, and for
    each entry the leaf index and local tensors its boxes are in.

    The plan keeps a :meth:`skeleton` (no tensors: a cache must not keep a call's
    state dict alive); a later call of the same layout :meth:`bind`\s it to its own
    tensors without describing anything again.
    """

    def __init__(self) -> None:
        self.entries: list[_Entry] = []
        self.leaf_of: list[int] = []
        self.locals: list[list[torch.Tensor]] = []
        self.values: list[tuple[Any, ...]] = []  # key paths of the plain values
        self.value_leaf: list[int] = []
        self.value_objects: list[Any] = []

    def skeleton(self) -> _Side:
        out = _Side()
        out.entries, out.leaf_of = self.entries, self.leaf_of
        out.values, out.value_leaf = self.values, self.value_leaf
        out.locals = [len(tensors) for tensors in self.locals]  # counts only
        return out

    def bind(self, flat: Any) -> _Side:
        """This skeleton with ``flat``'s tensors and values (a layout equal to the one
        it was described from: same leaves, kinds and local tensor counts)."""
        out = _Side()
        out.entries, out.leaf_of = self.entries, self.leaf_of
        out.values, out.value_leaf = self.values, self.value_leaf
        tensors, at = flat.locals, 0
        for n in self.locals:
            out.locals.append(tensors[at:at + n])
            at += n
        out.value_objects = [flat.leaves[i] for i in self.value_leaf]
        return out


def _ties(src: Any, dst: Any) -> list[int]:
    """The destination's tie structure: per local tensor of ``dst``, a number equal for
    exactly the tensors that are one tensor (tied keys). Part of the plan cache's key (the
    layout signature does not see which leaves share memory, and a plan writes a tied
    tensor once) and where :func:`_describe` takes its ties from.

    Checked on every call, since memory is not part of the layout: destinations that
    share memory without being one view (``buf[0:8]`` and ``buf[4:12]`` at two keys),
    or a destination that shares memory with a source other than as the same view,
    raise ``ValueError`` naming both keys before anything moves. One C++ pass over the
    local tensors (:func:`_shared_memory_in_python` where the extension lacks it).
    """
    shared_memory = ops.extension_entry("shared_memory") or _shared_memory_in_python
    n = len(src.locals)
    same, clash = shared_memory(src.locals + dst.locals, [0] * n + [1] * len(dst.locals))
    if clash is not None:
        sides = [("source", src, i) if i < n else ("destination", dst, i - n) for i in clash]
        raise _clash(src, dst, *(
            (name, flat.local_owners()[i][0]) for name, flat, i in sides
        ))
    ties = same[n:]
    if -1 in ties:  # meta tensors have no address: one tensor is one object
        owners = dst.local_owners()
        first: dict[int, int] = {}
        ties = [t if t >= 0 else first.setdefault(id(dst.leaves[owners[i][0]]), -2 - i)
                for i, t in enumerate(ties)]
    return ties


def _clash(src: Any, dst: Any, a: tuple[str, int], b: tuple[str, int]) -> ValueError:
    """The error for two local tensors, (side, leaf index) each, that share memory."""
    path_a = format_path((src if a[0] == "source" else dst).paths[a[1]])
    path_b = format_path((src if b[0] == "source" else dst).paths[b[1]])
    return ValueError(
        f"{_WHAT}: {a[0]} key {path_a!r} and {b[0]} key {path_b!r} share memory "
        "without being the same tensor: a destination must not overlap another "
        "destination or a source (tied keys must be one view of one storage)"
    )


def _shared_memory_in_python(
    tensors: list[torch.Tensor], sides: list[int]
) -> tuple[list[int], tuple[int, int] | None]:
    """``sdict_ext._C.shared_memory``, tensor by tensor in Python, for a build without
    it: per tensor the index of the first that is the same view (-1 without an
    address), and the first pair whose spans overlap, not as one view, with a
    destination (side 1) in it."""
    views: dict[Any, int] = {}
    same = []
    spans = []
    for i, t in enumerate(tensors):
        if t.is_meta or t.layout != torch.strided or not t.data_ptr():
            same.append(-1)
            continue
        first = t.data_ptr()
        same.append(views.setdefault((first, t.shape, t.stride(), t.dtype, t.device), i))
        if t.numel():
            extent = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
            spans.append((first, first + extent * t.element_size(), i))
    spans.sort(key=lambda x: x[0])
    reach = None
    for first, end, i in spans:
        if reach is not None and first < reach[1] and same[i] != same[reach[2]] and (
            sides[i] == 1 or sides[reach[2]] == 1
        ):
            return same, (min(i, reach[2]), max(i, reach[2]))
        if reach is None or end > reach[1]:
            reach = (first, end, i)
    return same, None


def _where(side: str, path: tuple[Any, ...]) -> str:
    return f"{_WHAT}: {side} key {format_path(path)!r}"


def _describe(flat: Any, rank: int, side: str, ties: list[int] | None = None) -> _Side:
    """This rank's side of the layout; ``ties`` (:func:`_ties`, per local tensor) for a
    destination, whose tied keys are written once."""
    dst = ties is not None
    out = _Side()
    # Key paths are made once per call (the cached route needs them for the values and
    # the wire description only when it plans); error messages build theirs lazily.
    paths = flat.paths
    seen: dict[int, int] = {}
    at = 0  # this leaf's first local tensor
    for i, (leaf, kind) in enumerate(zip(flat.leaves, flat.kinds)):
        path = paths[i]
        if not _is_path(path):
            raise ValueError(
                f"{_where(side, path)}: a key of type "
                f"{next(type(k).__name__ for k in path if type(k) not in (str, int))}; "
                "key paths are matched across ranks by str and int keys only"
            )
        if kind in PLAIN_KINDS:
            out.values.append(path)
            out.value_leaf.append(i)
            out.value_objects.append(leaf)
            continue
        if kind == LEAF_DTENSOR:
            placements = leaf.placements
            if not is_plain_placement(placements):
                raise ValueError(
                    f"{_where(side, path)} is a DTensor placed {placements}; only Shard and "
                    "Replicate placements describe a box of the full tensor per rank: "
                    "reduce Partial (and redistribute _StridedShard) before resharding"
                )
            shape = tuple(leaf.shape)
            box = compute_box(shape, leaf.device_mesh, placements, rank)
            if box is None:
                raise ValueError(f"{_where(side, path)}: this rank is not in the DTensor's mesh")
            box_shape, start = box
            tensors, boxes = [leaf._local_tensor], [(tuple(start), tuple(box_shape))]
        elif kind == LEAF_SHARDED:
            shape = tuple(leaf.size())
            tensors, boxes = [], []
            for shard in leaf.local_shards():
                md = shard.metadata
                tensors.append(shard.tensor)
                boxes.append((tuple(md.shard_offsets), tuple(md.shard_sizes)))
        elif kind == LEAF_TENSOR:
            shape = tuple(leaf.shape)
            tensors, boxes = [leaf], [((0,) * len(shape), shape)]
        else:
            raise ValueError(
                f"{_where(side, path)} has unsupported type {type(leaf).__name__}"
            )
        dtype = tensors[0].dtype if tensors else leaf.metadata().tensor_properties.dtype
        for t, (_, box_shape) in zip(tensors, boxes):
            if t.layout != torch.strided:
                raise ValueError(
                    f"{_where(side, path)}: a {t.layout} tensor; only strided tensors move"
                )
            if t.shape != box_shape:
                raise ValueError(
                    f"{_where(side, path)}: its local tensor has shape {tuple(t.shape)} but "
                    f"its placement gives this rank a box of {box_shape}"
                )
            if t.dtype != dtype:
                raise ValueError(
                    f"{_where(side, path)}: local shards of dtypes {t.dtype} and {dtype}"
                )
            if not dst and t.is_meta:
                raise ValueError(
                    f"{_where(side, path)} is on the meta device: a source must hold data"
                )
        alias = -1
        if dst and kind != LEAF_SHARDED:
            # Tied destinations (one tensor at several keys) are written once.
            alias = seen.setdefault(ties[at], len(out.entries))
            if alias == len(out.entries):
                alias = -1
        at += len(tensors)
        dense = [t.is_contiguous() for t in tensors]
        out.entries.append((path, shape, str(dtype), boxes, alias, dense))
        out.leaf_of.append(i)
        out.locals.append(tensors)
    return out


# ---------------------------------------------------------------------------------
# Plan: computed identically on every rank from every rank's description.
# ---------------------------------------------------------------------------------


def _volume(shape: Sequence[int]) -> int:
    return math.prod(shape)


def _intersect(a_start, a_shape, b_start, b_shape):
    start, shape = [], []
    for s1, n1, s2, n2 in zip(a_start, a_shape, b_start, b_shape):
        lo, hi = max(s1, s2), min(s1 + n1, s2 + n2)
        if hi <= lo:
            return None
        start.append(lo)
        shape.append(hi - lo)
    return tuple(start), tuple(shape)


def _split(start, shape, parts: int):
    """``parts`` near-equal boxes along the first dim longer than one element."""
    for d, n in enumerate(shape):
        if n > 1:
            parts = min(parts, n)
            out = []
            for p in range(parts):
                lo, hi = n * p // parts, n * (p + 1) // parts
                out.append((start[:d] + (start[d] + lo,) + start[d + 1:],
                            shape[:d] + (hi - lo,) + shape[d + 1:]))
            return out
    return [(start, shape)]


def _cut(start, shape, itemsize: int, cap: int):
    """Boxes of at most ``cap`` bytes covering the box (row-major blocks)."""
    if _volume(shape) * itemsize <= cap:
        return [(start, shape)]
    ndim = len(shape)
    d = 0
    while d < ndim and _volume(shape[d + 1:]) * itemsize > cap:
        d += 1
    # Rows of dim d (each the rest of the box beyond d) fit; take cap's worth at a time.
    row = _volume(shape[d + 1:]) * itemsize
    per = max(1, cap // row)
    out = []
    for lead in itertools.product(*(range(n) for n in shape[:d])):
        for lo in range(0, shape[d], per):
            n = min(per, shape[d] - lo)
            out.append((
                tuple(s + i for s, i in zip(start[:d], lead)) + (start[d] + lo,) + start[d + 1:],
                (1,) * d + (n,) + shape[d + 1:],
            ))
    return out


def _overlapping(boxes: list[_Box]):
    """Pairs of the (distinct) boxes that intersect, by a sweep along the dim with the
    most distinct starts: a mesh's shards are disjoint along the dims they split, so each
    box meets only its neighbours there, instead of every pair being compared."""
    if len(boxes) < 2 or not boxes[0][0]:
        return []  # (a 0-dim tensor has one box: the whole)
    d = max(range(len(boxes[0][0])), key=lambda i: len({b[0][i] for b in boxes}))
    active: list[_Box] = []
    out = []
    for box in sorted(boxes, key=lambda b: b[0][d]):
        lo = box[0][d]
        active = [a for a in active if a[0][d] + a[1][d] > lo]
        out += [(a, box) for a in active if _intersect(a[0], a[1], box[0], box[1])]
        active.append(box)
    return out


def _is_path(path: Any) -> bool:
    return isinstance(path, tuple) and all(type(k) in (str, int) for k in path)


def _bad(rank: int, what: str) -> ValueError:
    return ValueError(f"{_WHAT}: rank {rank} sent a malformed layout description: {what}")


def _check_description(rank: int, desc: Any) -> None:
    """A peer's description is input like any other: every field is checked before
    anything is computed from it."""
    if not (isinstance(desc, tuple) and len(desc) == 4):
        raise _bad(rank, "not a (sources, destinations, source values, destination values) tuple")
    src, dst, src_values, dst_values = desc
    if not all(isinstance(x, list) for x in desc):
        raise _bad(rank, "lists expected")
    if not all(_is_path(p) for p in src_values + dst_values):
        raise _bad(rank, "a value's key path is not a tuple of str / int")
    for side, entries in (("source", src), ("destination", dst)):
        for j, entry in enumerate(entries):
            if not (isinstance(entry, tuple) and len(entry) == 6):
                raise _bad(rank, f"{side} entry {j} is not a 6-tuple")
            path, shape, dtype, boxes, alias, dense = entry
            where = f"{side} entry {j}"
            if not _is_path(path):
                raise _bad(rank, f"{where}: the key path is not a tuple of str / int")
            if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)):
                raise _bad(rank, f"{where}: shape {shape!r}")
            if dtype not in _DTYPES:
                raise _bad(rank, f"{where}: unknown dtype {dtype!r}")
            if math.prod(shape) * _DTYPES[dtype].itemsize >= 1 << 62:
                raise _bad(rank, f"{where}: shape {shape!r} of {dtype} overflows int64 bytes")
            if type(alias) is not int or not -1 <= alias < (j if side == "destination" else 0):
                raise _bad(rank, f"{where}: tie index {alias!r}")
            if not isinstance(boxes, list) or not all(
                isinstance(box, tuple) and len(box) == 2 for box in boxes
            ):
                raise _bad(rank, f"{where} ({format_path(path)!r}): boxes are not a list of "
                           "(start, size) pairs")
            if not (isinstance(dense, list) and len(dense) == len(boxes)
                    and all(type(x) is bool for x in dense)):
                raise _bad(rank, f"{where}: contiguity flags {dense!r}")
            for start, size in boxes:
                ok = (isinstance(start, tuple) and isinstance(size, tuple)
                      and len(start) == len(shape) == len(size))
                ok = ok and all(
                    type(s) is int and type(n) is int and s >= 0 and n >= 0 and s + n <= full
                    for s, n, full in zip(start, size, shape)
                )
                if not ok:
                    raise _bad(rank, f"{where} ({format_path(path)!r}): box {start!r} of "
                               f"{size!r} does not lie in the tensor of shape {shape!r}")


class _Rank:
    """What one rank does: its local copies, and per round its sends and receives."""

    def __init__(self) -> None:
        # Groups of local copies, one group run per round: (src entry, box, start in
        # the source local, dst entry, box, start in the destination local, shape).
        self.local: list[list[tuple[int, int, tuple, int, int, tuple, tuple]]] = []
        # Per round this rank takes part in: (round, messages, pieces packed into the
        # buffer with their offsets, pieces unpacked from it, end of the sends' part of
        # the buffer, end of the buffer); see _messages.
        self.rounds: list[tuple[int, list[Any], list[Any], list[Any], int, int]] = []
        self.bytes_owned = 0
        self.bytes_local = 0
        self.buffer_bytes = 0
        self.p2p_ops = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.digest = 0
        self.buffers: tuple[int, int] = (0, 0)  # bytes of the even / odd rounds' buffer
        # This rank's destination values: key path -> the group rank providing it.
        self.value_providers: dict[Any, int] = {}
        self.provides: set[Any] = set()  # key paths this rank sends to others
        self.needs_values = False  # whether any rank needs a value from another
        self.sides: tuple[_Side, _Side] | None = None  # skeletons: source, destination


def _plan(descs: list[Any], me: int, bucket_bytes: int) -> _Rank:
    world = len(descs)
    for r, desc in enumerate(descs):
        _check_description(r, desc)
    # Per key path: its facts, the source boxes (by distinct box: the holders), the
    # destination boxes.
    facts: dict[Any, tuple[tuple[int, ...], str, int, int]] = {}
    sources: dict[Any, dict[tuple, list[tuple[int, int, int]]]] = {}
    owners: dict[Any, list[tuple[int, int, tuple, tuple]]] = {}
    order: list[Any] = []
    for r, (src, dst, _, _) in enumerate(descs):
        for side, entries in (("source", src), ("destination", dst)):
            for j, (path, shape, dtype, boxes, alias, dense) in enumerate(entries):
                seen = facts.setdefault(path, (shape, dtype, r, side == "source"))
                if seen[:2] != (shape, dtype):
                    raise ValueError(
                        f"{_WHAT}: key {format_path(path)!r} is a tensor of shape "
                        f"{list(seen[0])} and dtype {seen[1]} in the "
                        f"{'source' if seen[3] else 'destination'} of rank {seen[2]}, but "
                        f"of shape {list(shape)} and dtype {dtype} in the {side} of rank "
                        f"{r}; reshard moves bytes, it does not reshape or cast"
                    )
                if side == "source":
                    held = sources.setdefault(path, {})
                    for b, box in enumerate(boxes):
                        if _volume(box[1]):
                            held.setdefault(box, []).append((r, j, b, dense[b]))
                elif alias < 0:
                    if path not in owners:
                        owners[path] = []
                        order.append(path)
                    for b, (start, size) in enumerate(boxes):
                        owners[path].append((r, j, b, start, size, dense[b]))
    load = [0] * world  # bytes each rank sends, for spreading replicated regions
    local_pieces: list[Any] = []
    remote: list[Any] = []  # (src rank, src entry, box, src start, dst rank, ...)
    owned = [0] * world
    for path in order:
        shape, dtype, _, _ = facts[path]
        itemsize = _DTYPES[dtype].itemsize
        held = sources.get(path, {})
        boxes = list(held)
        for a, b in _overlapping(boxes)[:1]:
            raise ValueError(
                f"{_WHAT}: key {format_path(path)!r}: source boxes overlap without "
                f"being equal: ranks {[h[0] for h in held[a]]} hold start {list(a[0])} "
                f"size {list(a[1])}, ranks {[h[0] for h in held[b]]} start "
                f"{list(b[0])} size {list(b[1])}"
            )
        for d, dj, db, dstart, dsize, ddense in owners[path]:
            need = _volume(dsize)
            owned[d] += need * itemsize
            covered = 0
            for box in boxes:
                cut = _intersect(box[0], box[1], dstart, dsize)
                if cut is None:
                    continue
                covered += _volume(cut[1])
                holders = held[box]
                mine = [h for h in holders if h[0] == d]
                if mine:
                    local_pieces.append((mine[0], box[0], d, dj, db, dstart, cut, itemsize))
                    continue
                nbytes = _volume(cut[1]) * itemsize
                parts = [cut]
                if len(holders) > 1 and nbytes >= _SPREAD_MIN_BYTES:
                    parts = _split(cut[0], cut[1], len(holders))
                ranked = sorted(holders, key=lambda h: (load[h[0]], h[0]))
                for k, part in enumerate(parts):
                    h = ranked[k % len(ranked)]
                    load[h[0]] += _volume(part[1]) * itemsize
                    remote.append((h, box, d, dj, db, (dstart, dsize), ddense, part, itemsize))
            if covered != need:
                ranks = sorted({h[0] for hs in held.values() for h in hs})
                raise ValueError(
                    f"{_WHAT}: key {format_path(path)!r}: rank {d} owns the box at "
                    f"{list(dstart)} of size {list(dsize)} in the destination, but only "
                    f"{covered} of its {need} elements are held by a source "
                    f"(source ranks holding any of it: {ranks or 'none'})"
                )
    # Rounds: each rank sends plus receives at most ``budget`` per round, counting a
    # message start's alignment; first fit, in order for each (source, destination).
    budget = min(bucket_bytes, ROUND_BYTES)
    cap = max(1, (budget - 2 * _MESSAGE_ALIGNMENT) // 2)
    used: list[list[int]] = [[] for _ in range(world)]
    opened: list[list[set]] = [[] for _ in range(world)]
    last: dict[tuple[int, int], int] = {}
    rounds: list[list[Any]] = []

    def room(r: int, k: int, peer: int, n: int) -> bool:
        while len(used[r]) <= k:
            used[r].append(0)
            opened[r].append(set())
        extra = 0 if peer in opened[r][k] else _MESSAGE_ALIGNMENT
        return used[r][k] + n + extra <= budget

    def take(r: int, k: int, peer: int, n: int) -> None:
        if peer not in opened[r][k]:
            opened[r][k].add(peer)
            used[r][k] += _MESSAGE_ALIGNMENT
        used[r][k] += n

    for (s, sj, sb, sdense), sbox, d, dj, db, dbox, ddense, (start, size), itemsize in remote:
        for cstart, csize in _cut(start, size, itemsize, cap):
            n = _volume(csize) * itemsize
            if n == 0:
                continue
            k = last.get((s, d), 0)
            while not (room(s, k, ("to", d), n) and room(d, k, ("from", s), n)):
                k += 1
            take(s, k, ("to", d), n)
            take(d, k, ("from", s), n)
            last[(s, d)] = k
            while len(rounds) <= k:
                rounds.append([])
            rounds[k].append((s, sj, sb, sbox, sdense, d, dj, db, dbox, ddense, cstart, csize,
                              itemsize))
    plan = _Rank()
    plan.bytes_owned = owned[me]
    local: list[Any] = []
    costs: list[int] = []
    for (_, sj, sb, _), sstart, d, dj, db, dstart, (start, size), itemsize in local_pieces:
        if d != me or not _volume(size):
            continue
        # Cut like the messages, so the copies can be spread over the rounds below.
        for cstart, csize in _cut(start, size, itemsize, budget):
            local.append((sj, sb, _minus(cstart, sstart), dj, db, _minus(cstart, dstart), csize))
            costs.append(_volume(csize) * itemsize)
    plan.bytes_local = sum(costs)
    peak = [0, 0]
    for k, pieces in enumerate(rounds):
        sends: dict[int, list[Any]] = {}
        recvs: dict[int, list[Any]] = {}
        for s, sj, sb, sbox, sdense, d, dj, db, dbox, ddense, start, size, itemsize in pieces:
            if s != me and d != me:
                continue
            # A big piece that is one range of its tensor on either side travels as its
            # own message, read from / written into that tensor where it is one range
            # there (no pack or unpack on that side); every rank decides the same, from
            # the descriptions' contiguity flags.
            straight_src = sdense and _is_range(size, sbox[1])
            straight_dst = ddense and _is_range(size, dbox[1])
            solo = (straight_src or straight_dst) and _volume(size) * itemsize >= _SOLO_MIN_BYTES
            if s == me:
                sends.setdefault(d, []).append(
                    ((sj, sb, _minus(start, sbox[0]), size, itemsize), solo, straight_src))
            if d == me:
                recvs.setdefault(s, []).append(
                    ((dj, db, _minus(start, dbox[0]), size, itemsize), solo, straight_dst))
        if not sends and not recvs:
            continue
        msgs: list[Any] = []
        packs: list[Any] = []
        unpacks: list[Any] = []
        send_end = _messages(sends, True, k, 0, packs, msgs)
        end = _messages(recvs, False, k, send_end, unpacks, msgs)
        parity = len(plan.rounds) % 2
        plan.rounds.append((k, msgs, packs, unpacks, send_end, end))
        plan.p2p_ops += len(msgs)
        plan.bytes_sent += sum(m[4] for m in msgs if m[0])
        plan.bytes_received += sum(m[4] for m in msgs if not m[0])
        peak[parity] = max(peak[parity], end)
    # The local copies run while the rounds travel, a share after each round is posted,
    # instead of all at once between the first two rounds (which would hold back the
    # second round's pack and so the wire).
    share = math.ceil(plan.bytes_local / max(1, len(plan.rounds))) or 1
    plan.local = [[local[i] for i in run] for run in buckets(costs, share)]
    plan.buffers = tuple(peak)
    plan.buffer_bytes = sum(peak)
    # Plain values: each from the lowest rank whose source has its key path; one
    # exchange of objects when any rank needs one from another rank.
    providers: dict[Any, int] = {}
    for r, desc in enumerate(descs):
        for path in desc[2]:
            providers.setdefault(path, r)
    for r, desc in enumerate(descs):
        for path in desc[3]:
            source = providers.get(path)
            if source is None:
                continue
            if source != r:
                plan.needs_values = True
                if source == me:
                    plan.provides.add(path)
            if r == me:
                plan.value_providers[path] = source
    plan.digest = digest((descs, bucket_bytes))
    return plan


def _is_range(shape: Sequence[int], box: Sequence[int]) -> bool:
    """Whether a sub-box of ``shape`` is one contiguous range of a row-major tensor of
    shape ``box``: ones first, then one dim of any extent, then only whole dims."""
    i = 0
    while i < len(shape) and shape[i] == 1:
        i += 1
    return all(n == full for n, full in zip(shape[i + 1:], box[i + 1:]))


def _messages(per_peer: dict[int, list[Any]], is_send: bool, k: int, cursor: int,
              placed: list[Any], msgs: list[Any]) -> int:
    """A round's messages to (or from) each peer, in the order both sides derive: the
    packed message of the small pieces, then each solo piece; a message's tag is unique
    in the call for its pair (round k, index). Appends ``(is_send, peer, tag, buffer
    start, bytes, piece)`` to ``msgs`` (``piece`` set where it travels straight from /
    into its tensor, else the buffer range is used) and the buffered pieces with their
    offsets to ``placed``; returns the buffer's end."""
    for peer in sorted(per_peer):
        items = per_peer[peer]
        tag = k << _TAG_BITS
        packed = [piece for piece, solo, _ in items if not solo]
        if packed:
            (start, slots, n), cursor = _layout(packed, cursor)
            placed += slots
            msgs.append((is_send, peer, tag, start, n, None))
            tag += 1
        for piece, solo, straight in items:
            if not solo:
                continue
            if straight:
                msgs.append((is_send, peer, tag, -1, _volume(piece[3]) * piece[4], piece))
            else:
                (start, slots, n), cursor = _layout([piece], cursor)
                placed += slots
                msgs.append((is_send, peer, tag, start, n, None))
            tag += 1
    return cursor


def _minus(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x - y for x, y in zip(a, b))


def _layout(pieces: list[Any], cursor: int) -> tuple[tuple[int, list[Any], int], int]:
    """One message at ``cursor`` (aligned): its pieces widest element first, so each
    starts at a multiple of its element size with no padding (both sides sort the same
    list the same way). Returns ``((start, [(piece, offset)], payload bytes), end)``."""
    start = (cursor + _MESSAGE_ALIGNMENT - 1) // _MESSAGE_ALIGNMENT * _MESSAGE_ALIGNMENT
    at = start
    placed = []
    for piece in sorted(pieces, key=lambda p: -p[4]):
        placed.append((piece, at))
        at += _volume(piece[3]) * piece[4]
    return (start, placed, at - start), at


# ---------------------------------------------------------------------------------
# The call.
# ---------------------------------------------------------------------------------

# (key, plan) pairs, most recently used last. A list searched with ``==`` rather than
# a dict: a layout signature may hold unhashable parts (a ShardedTensor's metadata).
_CACHE: list[tuple[Any, _Rank]] = []


def _cached(key: Any) -> _Rank | None:
    for i, (k, plan) in enumerate(_CACHE):
        if k == key:
            _CACHE.append(_CACHE.pop(i))
            return plan
    return None


def _remember(key: Any, plan: _Rank) -> None:
    _CACHE[:] = [(k, p) for k, p in _CACHE if k != key][-(_CACHE_SIZE - 1):]
    _CACHE.append((key, plan))


def _run(plan: _Rank, src: _Side, dst: _Side, group: dist.ProcessGroup,
         wire: torch.device) -> None:
    """The data phase: local copies, and the rounds, two in flight."""
    rounds = plan.rounds
    buffers = [
        torch.empty(n, dtype=torch.uint8, device=wire) if n else None for n in plan.buffers
    ]

    def post(i: int) -> list[Any]:
        _, msgs, packs, _, send_end, _ = rounds[i]
        buf = buffers[i % 2]
        if packs:
            ops.pack(_views(src, packs), buf.narrow(0, 0, send_end),
                     offsets=[at for _, at in packs])
        straight = {
            is_send: iter(_byte_views(src if is_send else dst,
                                      [m[5] for m in msgs if m[0] is is_send and m[5]]))
            for is_send in (True, False)
        }
        p2p = []
        for is_send in (False, True):  # receives posted first
            for _, peer, tag, start, n, piece in (m for m in msgs if m[0] is is_send):
                tensor = buf.narrow(0, start, n) if piece is None else next(straight[is_send])
                p2p.append(dist.P2POp(dist.isend if is_send else dist.irecv, tensor,
                                      group=group, group_peer=peer, tag=tag))
        return dist.batch_isend_irecv(p2p)

    def finish(i: int, works: list[Any]) -> None:
        for work in works:
            work.wait()
        _, _, _, unpacks, _, end = rounds[i]
        if unpacks:
            ops.unpack(buffers[i % 2].narrow(0, 0, end), _views(dst, unpacks),
                       offsets=[at for _, at in unpacks])

    def copy(pieces: list[Any]) -> None:
        srcs = ops.box_views([src.locals[j][b] for j, b, _, _, _, _, _ in pieces],
                             [p[2] for p in pieces], [p[6] for p in pieces])
        dsts = ops.box_views([dst.locals[j][b] for _, _, _, j, b, _, _ in pieces],
                             [p[5] for p in pieces], [p[6] for p in pieces])
        # On an accelerator the copies are enqueued on the current stream, ordered
        # with the packs and unpacks: nothing waits on the host.
        batched_copy_pairs(dsts, srcs, non_blocking=wire.type != "cpu")

    with torch.no_grad():
        pending = post(0) if rounds else None
        shares = iter(plan.local)
        for i in range(len(rounds)):
            following = post(i + 1) if i + 1 < len(rounds) else None
            share = next(shares, None)
            if share:
                copy(share)
            finish(i, pending)
            pending = following
        for share in shares:  # a rank with no rounds: all of them
            copy(share)


def _byte_views(side: _Side, pieces: list[Any]) -> list[torch.Tensor]:
    """The bytes of pieces that are each one contiguous range of their tensor, as 1-D
    uint8 views of it (``view`` raises rather than copy, so a message can never land
    in a temporary)."""
    if not pieces:
        return []
    views = ops.box_views([side.locals[j][b] for j, b, _, _, _ in pieces],
                          [p[2] for p in pieces], [p[3] for p in pieces])
    return [v.view(-1).view(torch.uint8) for v in views]


def _exchange_values(plan: _Rank, src: _Side, group: dist.ProcessGroup) -> list[Any]:
    """Every rank's plain values that other ranks need from it, in one object exchange
    (none when no rank needs one from another). Only the supported kinds travel (int,
    float, str, bytes, ``io.BytesIO``, None: the walk's ``type_check`` refused anything
    else before the agreement), so the exchange cannot fail on pickling."""
    if not plan.needs_values:
        return []
    mine = dict(zip(src.values, src.value_objects))
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, {p: mine[p] for p in plan.provides}, group=group)
    return gathered


def _set_values(plan: _Rank, src: _Side, dst: _Side, leaves: list[Any],
                gathered: list[Any], me: int) -> None:
    """This rank's destination values, from their providers' sources."""
    mine = dict(zip(src.values, src.value_objects))
    for path, i in zip(dst.values, dst.value_leaf):
        source = plan.value_providers.get(path)
        if source is not None:
            leaves[i] = mine[path] if source == me else gathered[source][path]


def _check_wire(plan: _Rank, src: _Side, dst: _Side, wire: torch.device) -> None:
    """Every tensor a message touches must be on the group's device."""
    for _, msgs, packs, unpacks, _, _ in plan.rounds:
        pieces = [(src, p, "source") for p, _ in packs] + [
            (dst, p, "destination") for p, _ in unpacks] + [
            (src if m[0] else dst, m[5], "source" if m[0] else "destination")
            for m in msgs if m[5]]
        for side, (j, b, _, _, _), name in pieces:
            t = side.locals[j][b]
            if t.device != wire and not t.is_meta:
                raise ValueError(
                    f"{_WHAT}: {name} key {format_path(side.entries[j][0])!r} is on "
                    f"{t.device}, but this group ({dist.get_backend()}) moves "
                    f"tensors on {wire}: move it there, or use a group of its device"
                )


def _allocate(
    dst: _Side, dst_flat: Any, device: torch.device | None, wire: torch.device
) -> list[Any]:
    """The destination leaves to return: meta ones replaced by new tensors (once per
    tie), every other leaf as it is."""
    leaves = list(dst_flat.leaves)
    for j, (entry, i) in enumerate(zip(dst.entries, dst.leaf_of)):
        alias = entry[4]
        tensors = dst.locals[j]
        if alias >= 0:
            # A real tied key keeps its own object (it shares the memory written once);
            # a meta one shares its twin's new tensor.
            if tensors and tensors[0].is_meta:
                leaves[i] = leaves[dst.leaf_of[alias]]
            dst.locals[j] = dst.locals[alias]
            continue
        leaf = leaves[i]
        if not tensors or not tensors[0].is_meta:
            continue
        if dst_flat.kinds[i] == LEAF_SHARDED:
            raise ValueError(
                f"{_WHAT}: destination key {format_path(entry[0])!r} is a ShardedTensor on "
                "the meta device; pass one with real local shards"
            )
        local = tensors[0]
        if isinstance(leaf, DTensor):
            mesh_type = leaf.device_mesh.device_type
            where = device or indexed_device(torch.device(mesh_type))
        else:
            where = device or wire
        new = torch.empty(local.shape, dtype=local.dtype, device=where)
        dst.locals[j] = [new]
        leaves[i] = dtensor_of(new, leaf) if isinstance(leaf, DTensor) else new
    return leaves


def _views(side: _Side, placed: list[Any]) -> list[torch.Tensor]:
    tensors = [side.locals[j][b] for (j, b, _, _, _), _ in placed]
    starts = [p[2] for p, _ in placed]
    shapes = [p[3] for p, _ in placed]
    return ops.box_views(tensors, starts, shapes)


@gc_paused()
def reshard_state_dict(
    src_state_dict: Any,
    dst_state_dict: Any,
    pg: dist.ProcessGroup | None = None,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    device: torch.device | str | None = None,
) -> Any:
    """Moves a sharded state dict into another layout, without gathering any tensor.

    Every rank of ``pg`` calls it with its local view of both layouts: a rank may be a
    source only (``dst_state_dict`` None or empty), a destination only, or both. Each
    byte a rank owns in the destination layout comes straight from one rank that holds
    it in the source layout (spread across ranks where several hold it), coalesced into
    rounds of at most ``min(bucket_bytes, ROUND_BYTES)`` (16 MiB) per rank, two rounds in
    flight: no rank holds a full tensor it does not own, the extra memory is at most two
    rounds (so two buckets), and the number of messages grows with the bytes over the
    round size, not with the tensors.

    Results are bit-exact what gathering the source (``_gather_state_dict``) and
    distributing it into the destination layout (``_distribute_state_dict``) gives.

    Args:
        src_state_dict: this rank's state dict in the source layout (nested dicts,
            lists, tuples): DTensors of ``Shard`` / ``Replicate`` placements on any
            mesh (uneven and empty shards, 2-D meshes such as HSDP), ShardedTensors,
            plain tensors a rank holds whole, and non-tensor values. Keys may exist
            only on the ranks that hold them. ``None`` on a destination-only rank.
        dst_state_dict: this rank's state dict in the destination layout, matched to
            the source by key path; its tensors may be on the meta device. ``None`` on
            a source-only rank.
        pg: the group every source and destination rank belongs to; default the world.
        bucket_bytes: the most bytes a rank sends and receives per round (at least
            :data:`MIN_BUCKET_BYTES`; rounds are at most :data:`ROUND_BYTES` anyway, to
            pipeline); two rounds are in flight, so the staging memory is at most twice
            this.
        device: where meta destinations are allocated; default a DTensor's mesh device
            (the current device of its type), for plain tensors the group's device.

    Returns:
        A structure shaped like ``dst_state_dict``: real destination tensors written
        in place (the same objects), meta ones replaced by new tensors (DTensors on
        the same mesh and placements; tied keys share one), non-tensor values taken
        from the lowest rank whose source has the key path (kept where none has).

    Raises:
        ValueError: on every rank, before anything is written, naming the key path:
            global shapes or dtypes that differ for one key, a destination byte that no
            source holds, source boxes that overlap partially, ``Partial`` or
            ``_StridedShard`` placements, unsupported leaves, a tensor that must travel
            on another device than the group's. A problem only one rank can see raises
            there, and :class:`~sdict_ext.collectives.agreement.RankFailure` (a
            ``RuntimeError`` carrying its text) on the others.
    """
    group = pg if pg is not None else dist.group.WORLD
    me = dist.get_rank(group)
    world = dist.get_world_size(group)
    wire = status_device(group)
    error: BaseException | None = None
    plan = src = dst = dst_flat = leaves = key = None
    try:
        if type(bucket_bytes) is not int or bucket_bytes < MIN_BUCKET_BYTES:
            raise ValueError(
                f"{_WHAT}: bucket_bytes must be an int of at least {MIN_BUCKET_BYTES}, "
                f"got {bucket_bytes!r}"
            )
        device = indexed_device(device)
        src_flat = flatten({} if src_state_dict is None else src_state_dict)
        dst_flat = flatten({} if dst_state_dict is None else dst_state_dict)
        ties = _ties(src_flat, dst_flat)
        key = (id(group), tuple(dist.get_process_group_ranks(group)), me, bucket_bytes,
               device, src_flat.signature, dst_flat.signature, tuple(ties))
        plan = _cached(key)
        if plan is None:
            grank = dist.get_rank()
            src = _describe(src_flat, grank, "source")
            dst = _describe(dst_flat, grank, "destination", ties)
        else:
            src, dst = plan.sides[0].bind(src_flat), plan.sides[1].bind(dst_flat)
            leaves = _allocate(dst, dst_flat, device, wire)
    except Exception as exc:  # noqa: BLE001 (every rank must learn of it)
        error = exc
    # Every rank serves the call from its cache, with the same plan, or all plan anew.
    table = agree(group, error, what=_WHAT, share_len=2,
                  share=[int(plan is not None), 0 if plan is None else plan.digest])
    planned = not (bool((table[:, 0] == 1).all()) and bool((table[:, 1] == table[0, 1]).all()))
    if planned:
        plan = None
        descs: list[Any] = [None] * world
        dist.all_gather_object(
            descs, (src.entries, dst.entries, src.values, dst.values), group=group
        )
        try:
            plan = _plan(descs, me, bucket_bytes)
            plan.sides = (src.skeleton(), dst.skeleton())
            if leaves is None:  # (a rank whose cache served it has allocated already)
                leaves = _allocate(dst, dst_flat, device, wire)
            _check_wire(plan, src, dst, wire)
        except Exception as exc:  # noqa: BLE001 (every rank must learn of it)
            error = exc
        agree(group, error, what=_WHAT, plan_digest=0 if plan is None else plan.digest)
        _remember(key, plan)
    gathered = _exchange_values(plan, src, group)
    _run(plan, src, dst, group, wire)
    _set_values(plan, src, dst, leaves, gathered, me)
    _LAST.clear()
    _LAST.update(
        planned=planned, rounds=len(plan.rounds), p2p_ops=plan.p2p_ops,
        collectives=len(plan.rounds), bytes_sent=plan.bytes_sent,
        bytes_received=plan.bytes_received, bytes_local=plan.bytes_local,
        bytes_owned=plan.bytes_owned, buffer_bytes=plan.buffer_bytes,
        bucket_bytes=bucket_bytes,
    )
    if dst_state_dict is None:
        return None
    return dst_flat.rebuild(leaves)
