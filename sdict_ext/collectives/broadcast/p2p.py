"""The point-to-point route of ``broadcast_state_dict``: each rank receives only its boxes.

A broadcast ships every byte of a tensor to every rank, which keeps its box of it and
drops the rest. Here every rank first says which box of each tensor it needs (its row
of the needs table, which travels through the one agreement,
:func:`~sdict_ext.collectives.agreement.agree`'s ``share``), and where the receivers
together need no more bytes than the tensor holds (every tensor held sharded over the
group, or one other rank in all), rank 0 packs each rank's boxes into messages of that
rank's own and sends them by ``isend``; the rank receives them by ``irecv`` and unpacks
them into its shards. Rank 0 copies its own boxes straight from the source while its
messages travel. Nothing depends on the ranks laying out a tensor alike: each rank asks
for what its own local value needs. The other transfers take the collective route
(:mod:`.collective`) in the same call.

Chosen with ``route="p2p"`` (or ``"direct"``, which adds :mod:`.direct`'s reads), and
by ``route="auto"`` on CPU groups (gloo): there every byte that travels is copied by
both CPUs, so bytes not sent are the time saved. Device groups keep the broadcast,
whose ring / tree moves each byte over each link once and whose packing runs on the
device; this route refuses them (it is built for, and tested on, CPU groups).

Every needs row a rank receives from a peer is checked as user input
(:func:`check_needs_table`) before rank 0 cuts a box from it.
"""

from __future__ import annotations

import math
from collections import deque
from itertools import accumulate, zip_longest
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from sdict_ext import ops
from sdict_ext.collectives.broadcast import direct
from sdict_ext.collectives.broadcast.dests import Dest, Transfers, flat_bytes
from sdict_ext.collectives.buckets import buckets_with_solos
from sdict_ext.host.copies import batched_copy_pairs

__all__ = [
    "Message", "Plan", "ReceivePlan", "SendPlan", "check_needs_table", "decode_row",
    "encode_needs", "needs_row", "plan", "plan_messages", "receive", "row_len",
    "row_positions", "run", "send",
]

# Buffers rank 0 may have in flight: packing runs ahead of the sends by this much.
SEND_BUFFERS = 4


def encode_needs(
    shapes: list[tuple[int, ...]],
    itemsizes: list[int],
    boxes: list[tuple[tuple[int, ...], tuple[int, ...]] | None],
    reads: list[bool] | None = None,
) -> list[int]:
    """This rank's row of the needs table: per transfer ``[bytes, *start, *shape]``,
    bytes negated where this rank reads the transfer itself (``reads``).

    A transfer this rank needs nothing of is all zeros (so is an empty box). Every
    rank's row has the same length, ``sum(1 + 2 * ndim)``, known from the metadata.
    """
    row: list[int] = []
    for j, (shape, itemsize, box) in enumerate(zip(shapes, itemsizes, boxes)):
        if box is None:
            row.extend([0] * (1 + 2 * len(shape)))
            continue
        box_shape, box_start = box
        n = math.prod(box_shape) * itemsize
        if n == 0:
            row.extend([0] * (1 + 2 * len(shape)))
            continue
        row.append(-n if reads is not None and reads[j] else n)
        row.extend(box_start)
        row.extend(box_shape)
    return row


def row_positions(shapes: list[tuple[int, ...]]) -> list[int]:
    """Where each transfer's entry starts in a needs row (after the row's flag)."""
    return list(accumulate((1 + 2 * len(s) for s in shapes), initial=1))


def check_needs_table(
    table: torch.Tensor, shapes: list[tuple[int, ...]], itemsizes: list[int], at: list[int],
    keys: list[str], readable: list[bool],
) -> None:
    """Raises ``ValueError`` unless every row of the all-gathered needs table (one per
    rank, each ``[flag, *per transfer [bytes, *start, *shape]]``) is what
    :func:`encode_needs` makes for this call: per transfer all zeros, or a box that lies
    in the tensor (no negative start or size, start + size within each dim) and bytes
    equal to the box's (negated only where rank 0 announced the tensor for direct
    reads, ``readable[j]``). The rows come from peers: rank 0 cuts each rank's boxes
    from its row, so a crafted one would make it read outside a tensor. Every rank
    checks the same table, so every rank raises the same error. ``keys[j]`` names
    transfer ``j``."""
    by_dims: dict[int, list[int]] = {}
    for j, shape in enumerate(shapes):
        by_dims.setdefault(len(shape), []).append(j)
    bad: list[tuple[int, int]] = []
    for nd, js in by_dims.items():
        pos = torch.tensor([at[j] for j in js], dtype=torch.int64)
        n = table[:, pos]  # (ranks, transfers)
        entries = table[:, pos[:, None] + 1 + torch.arange(2 * nd)]  # (ranks, transfers, 2 nd)
        starts, sizes = entries[..., :nd], entries[..., nd:]
        full = torch.tensor([shapes[j] for j in js], dtype=torch.int64).view(len(js), nd)
        # (Sizes clamped first, so that full - size cannot wrap.)
        inside = ((starts >= 0) & (sizes >= 0) & (starts <= full - sizes.clamp(min=0))).all(-1)
        # Within the tensor, the box's bytes count no more than the tensor's own.
        box_bytes = torch.where(inside[..., None], sizes, 0).prod(-1)
        box_bytes *= torch.tensor([itemsizes[j] for j in js], dtype=torch.int64)
        may_read = torch.tensor([readable[j] for j in js], dtype=torch.bool)
        asked = inside & (box_bytes > 0) & ((n == box_bytes) | ((n == -box_bytes) & may_read))
        nothing = (n == 0) & (entries == 0).all(-1)
        for r, k in (~(asked | nothing)).nonzero().tolist():
            bad.append((r, js[k]))
    if not bad:
        return
    r, j = min(bad)
    p, nd = at[j], len(shapes[j])
    row = table[r].tolist()
    raise ValueError(
        f"broadcast_state_dict: rank {r}'s needs row asks for bytes {row[p]} of key "
        f"{keys[j]!r} at start {tuple(row[p + 1:p + 1 + nd])} with shape "
        f"{tuple(row[p + 1 + nd:p + 1 + 2 * nd])}, which is no box of its tensor of shape "
        f"{shapes[j]}; every rank's row must be made from this call's metadata (a peer sent "
        "a corrupted or crafted row)"
    )


def decode_row(
    row: list[int], shapes: list[tuple[int, ...]], at: list[int], js: list[int]
) -> list[Any]:
    """(bytes, start, shape) of transfers ``js`` from one rank's needs row."""
    out = []
    for j in js:
        p, nd = at[j], len(shapes[j])
        out.append((row[p], tuple(row[p + 1:p + 1 + nd]), tuple(row[p + 1 + nd:p + 1 + 2 * nd])))
    return out


class Message:
    """One message of the route: transfers ``js`` of one receiver's boxes, packed."""

    __slots__ = ("peer", "js", "boxes", "offsets", "total", "solo")

    def __init__(self, peer: int, js: list[int], boxes: list[Any], offsets: list[int],
                 total: int, solo: bool) -> None:
        self.peer = peer  # the receiver's global rank
        self.js = js
        self.boxes = boxes  # per transfer: (start, shape) of the receiver's box
        self.offsets = offsets
        self.total = total
        self.solo = solo  # one transfer, sent as its exact bytes


def plan_messages(
    peer: int, needs: list[tuple[int, tuple[int, ...], tuple[int, ...]]], js: list[int],
    slice_bytes: int,
) -> list[Message]:
    """One receiver's messages: its boxes of transfers ``js`` in slices of at most
    ``slice_bytes`` (+ one box), a box of a quarter slice or more alone where the count
    allows. Rank 0 and the receiver compute the same from the same row."""
    align = ops.ALIGNMENT
    costs = [-(-n // align) * align for n, _, _ in needs]
    out = []
    for run in buckets_with_solos(costs, slice_bytes, [True] * len(costs), slice_bytes // 4):
        if len(run) == 1:
            n, start, shape = needs[run[0]]
            out.append(Message(peer, [js[run[0]]], [(start, shape)], [0], n, True))
            continue
        offsets = list(accumulate((costs[k] for k in run), initial=0))
        out.append(Message(peer, [js[k] for k in run], [needs[k][1:] for k in run],
                           offsets[:-1], offsets[-1], False))
    return out


class SendPlan:
    """Rank 0's side of the route: its messages and buffers. Source views are made as
    the messages go, so the work overlaps the sends."""

    __slots__ = ("messages", "srcs", "from_source", "pool")

    def __init__(self, messages: list[Message], srcs: list[torch.Tensor], device: torch.device,
                 n_buffers: int) -> None:
        self.messages = messages
        self.srcs = srcs
        # A solo box whose bytes are contiguous is sent from the source itself.
        self.from_source = [m.solo and _contiguous_box(srcs[m.js[0]], m.boxes[0], device)
                            for m in messages]
        size = max((m.total for m, d in zip(messages, self.from_source) if not d), default=0)
        self.pool = [torch.empty(size, dtype=torch.uint8, device=device)
                     for _ in range(min(n_buffers, self.from_source.count(False)))]


def _contiguous_box(src: torch.Tensor, box: Any, device: torch.device) -> bool:
    """Whether ``src``'s box (start, shape) is one contiguous run of its bytes: ``src``
    contiguous on ``device``, the box whole in every dim after the last one it cuts, and
    one element wide in every dim before that one."""
    if src.device != device or not src.is_contiguous():
        return False
    shape, full = box[1], src.shape
    last = max((d for d, (n, size) in enumerate(zip(shape, full)) if n != size), default=0)
    return all(n == 1 for n in shape[:last])


def send(
    group: dist.ProcessGroup,
    plan: SendPlan,
    n_own: int,
    copy_own: Any,
) -> None:
    """Rank 0: packs and sends the plan's messages (in order, several receivers
    interleaved), and copies its own boxes: ``copy_own(lo, hi)`` copies items
    ``lo:hi`` of ``n_own``, in as many chunks as there are messages, one after each
    message is posted. At most one message per buffer is in flight."""
    free = list(range(len(plan.pool)))
    works: deque[tuple[Any, int | None]] = deque()
    messages, srcs = plan.messages, plan.srcs
    per = -(-n_own // max(1, len(messages))) if n_own else 0
    for k, (m, from_source) in enumerate(zip(messages, plan.from_source)):
        b = None
        views = ops.box_views([srcs[j] for j in m.js], [box[0] for box in m.boxes],
                              [box[1] for box in m.boxes])
        if from_source:
            buf = views[0].reshape(-1).view(torch.uint8)
        else:
            while not free:
                work, done = works.popleft()
                work.wait()
                if done is not None:
                    free.append(done)
            b = free.pop()
            buf = plan.pool[b][:m.total]
            views = [v if v.device == buf.device else v.to(buf.device) for v in views]
            ops.pack(views, out=buf, offsets=m.offsets)
        works.append((dist.isend(buf, dst=m.peer, group=group), b))
        if k * per < n_own:
            copy_own(k * per, min(n_own, (k + 1) * per))
    if len(messages) * per < n_own or not messages:
        copy_own(len(messages) * per, n_own)
    for work, _ in works:
        work.wait()


class ReceivePlan:
    """A receiver's side: its messages, where each lands, two buffers; and the boxes it
    reads from rank 0's memory itself."""

    __slots__ = ("messages", "into", "pool", "reads")

    def __init__(self, messages: list[Message], slot_dests: list[list[Any]],
                 device: torch.device, reads: Any = None) -> None:
        self.messages = messages
        # (pid, addresses, full shapes, starts, destinations) for read_process_boxes.
        self.reads = reads
        # (destination, its bytes) for a solo box a destination holds whole and
        # contiguous: received there directly.
        self.into: list[Any] = []
        for m in messages:
            into = None
            if m.solo:
                start, shape = m.boxes[0]
                for d in slot_dests[m.js[0]]:
                    if d.box_start == start and d.box_shape == shape:
                        view = flat_bytes(d.unpack_into, device)
                        if view is not None:
                            into = (d, view)
                            break
            self.into.append(into)
        buffered = [m.total for m, into in zip(messages, self.into) if into is None]
        self.pool = [torch.empty(max(buffered), dtype=torch.uint8, device=device)
                     for _ in range(min(2, len(buffered)))]


def receive(group: dist.ProcessGroup, src: int, plan: ReceivePlan,
            slot_dests: list[list[Any]]) -> BaseException | None:
    """A receiver: ``irecv`` of each message, the next one posted before the previous
    one is unpacked into ``slot_dests``; the direct reads while the first message
    travels. A failed read is returned, not raised, so that every message is still
    received (the caller reports it to every rank)."""
    pending: deque[tuple[Any, Message, torch.Tensor, Any, int | None]] = deque()
    n_buffered = 0
    error: BaseException | None = None
    for k, (m, into) in enumerate(zip(plan.messages, plan.into)):
        b = None
        if into is None:
            b = n_buffered % len(plan.pool)
            n_buffered += 1
            while any(p[4] == b for p in pending):
                _unpack(*pending.popleft(), slot_dests)
            buf = plan.pool[b][:m.total]
            receiver = None
        else:
            receiver, buf = into
        pending.append((dist.irecv(buf, src=src, group=group), m, buf, receiver, b))
        if k == 0:
            error = direct.read(plan.reads)
        if len(pending) > 1:
            _unpack(*pending.popleft(), slot_dests)
    if not plan.messages:
        error = direct.read(plan.reads)
    while pending:
        _unpack(*pending.popleft(), slot_dests)
    return error


def _unpack(work: Any, m: Message, buf: torch.Tensor, receiver: Any, _b: int | None,
            slot_dests: list[list[Any]]) -> None:
    work.wait()
    dsts, offsets, fulls, starts = [], [], [], []
    for offset, j, (start, shape) in zip(m.offsets, m.js, m.boxes):
        for d in slot_dests[j]:
            if d is receiver:
                continue
            dsts.append(d.unpack_into)
            offsets.append(offset)
            fulls.append(shape)
            starts.append(tuple(a - b for a, b in zip(d.box_start, start)))
    if dsts:
        ops.unpack(buf, dsts, offsets=offsets, full_shapes=fulls, starts=starts)


# ----------------------------------------------------------------------------- the route


def row_len(tensors: list[Any]) -> int:
    """The length of every rank's needs row for rank 0's announced ``tensors`` (one
    entry per transfer, ``1 + 2 * ndim``, after the row's flag): known from the
    metadata alone, so every rank can join the agreement even if its planning failed."""
    return 1 + sum(1 + 2 * len(t[1]) for t in tensors if t[3] < 0)


def _need_of(slot_dests: list[Dest], shape: tuple[int, ...]) -> Any:
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


def needs_row(transfers: Transfers, is_src: bool, tensors: list[Any], n: int,
              source: direct.Source | None, reads: bool) -> list[int]:
    """This rank's row of the needs table (``n`` entries): the box of each transfer its
    keys need; the transfers it reads itself (``reads``: it takes part in direct reads,
    and they pass :mod:`.direct`'s checks) marked by negative bytes. Rank 0 needs
    nothing."""
    if is_src:
        return [0] * n
    specs, slot_dests = transfers.specs, transfers.slot_dests
    needs = [_need_of(ds, shape) for ds, (shape, _) in zip(slot_dests, specs)]
    # A rank on rank 0's host reads what it can out of rank 0's memory itself.
    by_read = None
    if direct.can_read(source, reads):
        by_read = direct.direct_transfers(source, tensors, transfers.src_of, specs, [
            need is not None and direct.readable(ds) for need, ds in zip(needs, slot_dests)
        ])
    return [0] + encode_needs(
        [s for s, _ in specs], [dt.itemsize for _, dt in specs], needs, by_read
    )


class Plan(NamedTuple):
    """This rank's side of the route for one call: the transfers it routes (the others
    are broadcast), rank 0's sends and own keys or a receiver's messages and reads, and
    whether any rank reads directly (then rank 0 must stay until the reads are done)."""

    routed: list[int]
    broadcast: list[int]
    sending: SendPlan | None
    receiving: ReceivePlan | None
    own: list[Dest]
    direct_reads: bool


def plan(
    group: dist.ProcessGroup,
    table: torch.Tensor,
    row: list[int],
    is_src: bool,
    srcs: list[torch.Tensor],
    transfers: Transfers,
    flat_device: torch.device,
    cut: int,
    bucket_bytes: int,
    addrs: list[int],
    pid: int,
    keys: list[str],
) -> Plan:
    """Which transfers take this route (every rank decides the same from the gathered
    needs ``table``), and this rank's side of it. ``row`` is this rank's own row, as it
    sent it; ``addrs`` the transfers' addresses in rank 0's memory (0: not announced
    for direct reads), ``pid`` its process (0: none announced), ``keys`` name the
    transfers. Raises, on every rank alike, when a rank's row is not one of this
    call's."""
    specs, slot_dests = transfers.specs, transfers.slot_dests
    shapes = [s for s, _ in specs]
    at = row_positions(shapes)
    check_needs_table(
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
    own: list[Dest] = []
    if is_src:
        per_peer = []
        for r in range(1, table.shape[0]):
            js = (by_route & (sent[r] > 0)).nonzero().flatten().tolist()
            if js:
                needs = decode_row(table[r].tolist(), shapes, at, js)
                per_peer.append(plan_messages(dist.get_global_rank(group, r), needs, js, cut))
        # Interleaved, so every receiver has its first message as early as possible.
        messages = [m for ms in zip_longest(*per_peer) for m in ms if m is not None]
        n_buffers = max(1, min(SEND_BUFFERS, bucket_bytes // cut))
        sending = SendPlan(messages, srcs, flat_device, n_buffers)
        own = [d for j in routed for d in slot_dests[j]]
    else:
        r = dist.get_rank(group)
        js = (by_route & (sent[r] > 0)).nonzero().flatten().tolist()
        needs = decode_row(row, shapes, at, js) if js else []
        messages = plan_messages(dist.get_rank(), needs, js, cut) if js else []
        reads = None
        if direct_reads:
            mine = (by_route & (nbytes[r] < 0)).nonzero().flatten().tolist()
            reads = direct.read_plan(pid, mine, addrs, shapes, slot_dests)
        receiving = ReceivePlan(messages, slot_dests, flat_device, reads)
    return Plan(routed, broadcast, sending, receiving, own, direct_reads)


def run(group: dist.ProcessGroup, p: Plan, srcs: list[torch.Tensor],
        slot_dests: list[list[Dest]]) -> BaseException | None:
    """Moves the routed transfers: rank 0 sends (and copies its own boxes while its
    messages travel), a receiver receives and reads. Returns a refused direct read,
    which the caller reports to every rank."""
    if p.sending is not None:
        own = p.own
        send(group, p.sending, len(own), lambda lo, hi: _copy_own(own[lo:hi], srcs))
        return None
    if p.receiving is not None:
        return receive(group, dist.get_global_rank(group, 0), p.receiving, slot_dests)
    return None


def _copy_own(dests: list[Dest], srcs: list[torch.Tensor]) -> None:
    """Rank 0's keys of routed transfers: their boxes copied straight from the source;
    a key whose local dtype differs is cast by ``finish()`` from the source box instead."""
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
            d.unpack_into = view  # finish() casts it into d.finish
            continue
        sources.append(view)
    batched_copy_pairs(dsts, sources)
