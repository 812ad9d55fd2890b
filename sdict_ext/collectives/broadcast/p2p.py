"""The point-to-point route of ``broadcast_state_dict``: each rank receives only its boxes.

A broadcast ships every byte of a tensor to every rank, which keeps its box of it and
drops the rest. Here every rank first says which box of each tensor it needs (one
``all_gather`` of a small int64 table, which is also the agreement step), and where
the receivers together need no more bytes than the tensor holds (every tensor held
sharded over the group, or one other rank in all), rank 0 packs each rank's boxes
into messages of that rank's own and sends them by ``isend``; the rank receives them
by ``irecv`` and unpacks them into its shards. Rank 0 copies its own boxes straight
from the source while its messages travel. Nothing depends on the ranks laying out
a tensor alike: each rank asks for what its own local value needs.

Direct reads (opt-in: ``SDICT_EXT_DIRECT_READ=1``, read at every call, on rank 0 and on
each reader). A rank on rank 0's host then needs no message: rank 0 announces its pid,
the address of each contiguous source tensor, a 16-byte random probe, and two sampled
8-byte windows of each of those tensors, taken from the tensor itself at a position
drawn per call. A rank that reads the probe back (``process_vm_readv``: same host, same
pid namespace, ptrace access) reads the sample windows at the announced addresses;
only the transfers whose windows match (the address is rank 0's tensor, mapped, with
those bytes) are marked as read by the rank itself (negative bytes in its needs row);
any other transfer falls back to a message. After the agreement it reads each of its
boxes straight out of rank 0's tensors into its own shards, every read inside a tensor
rank 0 announced for this call, one system call per ~1,000 runs of bytes. That is one
copy per byte, made by the receiver while rank 0 copies its own boxes, where a message
costs four (pack, socket in, socket out, unpack). Rank 0's tensors must outlive the
reads: one more agreement after them keeps rank 0 in the call, and raises a refused
read on every rank. It is off by default: it needs ptrace access to rank 0 and trusts
rank 0's announced addresses as far as the samples can check them, and its gain is on
CPU ranks of one host only.

Every needs row a rank receives from a peer is checked as user input
(:func:`check_needs_table`) before rank 0 cuts a box from it.

Used for CPU groups (gloo): there every byte that travels is copied by both CPUs,
so bytes not sent are the time saved. On the 2-core dev VM, 105 MB in 8 MiB messages
took 21-28 ms where one broadcast of the full 211 MB took 71-85 ms (gloo, 2 ranks,
2026-12-03, twice; BENCHMARKS.md has more runs); read directly, 105 MB took 12-13 ms,
as long as one memcpy of it. Device groups keep
the broadcast, whose ring / tree moves each byte over each link once and whose
packing runs on the device.
"""

from __future__ import annotations

import math
import os
from collections import deque
from itertools import accumulate
from typing import Any

import torch
import torch.distributed as dist

from sdict_ext import ops
from sdict_ext.collectives.buckets import buckets_with_solos

__all__ = [
    "ENV_DIRECT_READ", "Message", "ReceivePlan", "SendPlan", "can_read", "check_needs_table",
    "decode_row", "direct_read_enabled", "direct_transfers", "encode_needs", "flat_bytes",
    "plan_messages", "read_plan", "readable", "receive", "row_positions", "send",
    "source_probe",
]

# Buffers rank 0 may have in flight: packing runs ahead of the sends by this much.
SEND_BUFFERS = 4

#: The setting that turns direct reads on (``1``); read at every call, on every rank.
ENV_DIRECT_READ = "SDICT_EXT_DIRECT_READ"

# Bytes of sample windows per announced tensor (csrc: kSampleBytes).
_SAMPLE_BYTES = 16

# What rank 0 announces so that ranks can read its tensors: (pid, probe address, probe,
# sample seed, the sample windows of every tensor announced with an address, in order).
Source = tuple[int, int, bytes, int, bytes]


def direct_read_enabled() -> bool:
    """Whether this process takes part in direct reads: ``SDICT_EXT_DIRECT_READ=1`` in
    its environment now (rank 0 then announces its tensors; another rank reads them).
    Off by default: the messages route needs no access to another process."""
    return os.environ.get(ENV_DIRECT_READ, "0") == "1"


def _read_boxes(pid: int, addrs: list[int], full_shapes: list[tuple[int, ...]],
                starts: list[tuple[int, ...]], dsts: list[torch.Tensor]) -> int:
    """Box ``i`` (``dsts[i]``'s shape from index ``starts[i]``) of the C-contiguous tensor
    of ``full_shapes[i]`` at ``addrs[i]`` in process ``pid``, read into ``dsts[i]`` (see
    csrc/cpu/remote_read.cpp); every box is checked to lie in its tensor before any
    byte is read. Private: only this route's validated reads call it."""
    entry = ops.extension_entry("_read_process_boxes")
    if entry is None:
        raise ImportError("sdict_ext: the compiled extension has no direct reads")
    return entry(int(pid), addrs, full_shapes, starts, dsts)


def _read_samples(
    pid: int, addrs: list[int], nbytes: list[int], ids: list[int], seed: int
) -> tuple[bytes, list[bool]]:
    """The sample windows of each range ``[addrs[i], addrs[i] + nbytes[i])`` of process
    ``pid`` (``_SAMPLE_BYTES`` each, at a position drawn from ``(seed, ids[i])``), and
    whether each could be read."""
    entry = ops.extension_entry("_read_samples")
    if entry is None:
        return bytes(_SAMPLE_BYTES * len(addrs)), [False] * len(addrs)
    return entry(int(pid), addrs, nbytes, ids, seed)


def _announced(tensors: list[Any]) -> list[int]:
    """Positions (in ``tensors``, rank 0's TensorInfo list) of the tensors announced with
    an address, in order: the i-th of them owns sample window i."""
    return [i for i, t in enumerate(tensors) if t[4] != 0]


def source_probe(full_state_dict: dict[str, Any], keys: list[str],
                 tensors: list[Any]) -> tuple[torch.Tensor | None, Source | None]:
    """Rank 0's probe: 16 random bytes in a tensor it keeps alive during the call, their
    address and value, and sample windows of every tensor announced with an address,
    taken from the tensor itself (its ``data_ptr``, not the announced address) at
    positions drawn from a per-call seed. A rank that reads exactly the probe's bytes at
    that address in that pid is on rank 0's host, in its pid namespace, and allowed to
    read its memory; it then reads only tensors whose samples it finds at the announced
    address. ``(None, None)`` when rank 0 cannot sample its own tensors."""
    nonce = os.urandom(16)
    seed = int.from_bytes(os.urandom(8), "little")
    probe = torch.tensor(list(nonce), dtype=torch.uint8)
    values = [full_state_dict[keys[tensors[i][0]]] for i in _announced(tensors)]
    samples, ok = _read_samples(
        os.getpid(), [v.data_ptr() for v in values],
        [v.numel() * v.element_size() for v in values], list(range(len(values))), seed,
    )
    if not all(ok):
        return None, None
    return probe, (os.getpid(), probe.data_ptr(), nonce, seed, samples)


def can_read(source: Source | None) -> bool:
    """Whether this rank reads rank 0's memory directly: it opted in
    (:func:`direct_read_enabled`), rank 0 announced a source, and the probe reads back
    (see :func:`source_probe`); False, never an error, when it cannot (another host, no
    permission, no extension)."""
    if not direct_read_enabled() or source is None:
        return False
    pid, addr, nonce = source[:3]
    got = torch.zeros(len(nonce), dtype=torch.uint8)
    try:
        _read_boxes(pid, [addr], [(len(nonce),)], [(0,)], [got])
    except (RuntimeError, ImportError):
        return False
    return got.numpy().tobytes() == nonce


def direct_transfers(
    source: Source, tensors: list[Any], src_of: list[int],
    specs: list[tuple[tuple[int, ...], torch.dtype]], candidates: list[bool],
) -> list[bool]:
    """Which transfers this rank reads directly: of the ``candidates`` (it needs a box and
    its destinations can take a read), those rank 0 announced with an address whose two
    sample windows this rank reads back at that address exactly as rank 0 sampled them
    from its tensor. A window that differs (an address off by a page) or that cannot be
    read (not mapped) leaves the transfer to a message: a read that cannot be validated
    is never made."""
    pid, _, _, seed, samples = source
    window = {i: k for k, i in enumerate(_announced(tensors))}
    picked = [j for j, ok in enumerate(candidates) if ok and src_of[j] in window]
    nbytes = [math.prod(specs[j][0]) * specs[j][1].itemsize for j in picked]
    got, readable_now = _read_samples(
        pid, [tensors[src_of[j]][4] for j in picked], nbytes, [window[src_of[j]] for j in picked],
        seed,
    )
    direct = [False] * len(candidates)
    for k, j in enumerate(picked):
        w = window[src_of[j]] * _SAMPLE_BYTES
        mine = got[k * _SAMPLE_BYTES:(k + 1) * _SAMPLE_BYTES]
        direct[j] = readable_now[k] and mine == samples[w:w + _SAMPLE_BYTES]
    return direct


def readable(dests: list[Any]) -> bool:
    """Whether every destination of a transfer can take its box by a direct read (a
    contiguous CPU tensor of its own, staged otherwise)."""
    for d in dests:  # (a loop: all() of a generator costs ~0.5 us more a call)
        t = d.unpack_into
        if not t.is_contiguous() or not t.is_cpu:
            return False
    return bool(dests)


def encode_needs(
    shapes: list[tuple[int, ...]],
    itemsizes: list[int],
    boxes: list[tuple[tuple[int, ...], tuple[int, ...]] | None],
    direct: list[bool] | None = None,
) -> list[int]:
    """This rank's row of the needs table: per transfer ``[bytes, *start, *shape]``,
    bytes negated where this rank reads the transfer itself (``direct``).

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
        row.append(-n if direct is not None and direct[j] else n)
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
        direct = torch.tensor([readable[j] for j in js], dtype=torch.bool)
        asked = inside & (box_bytes > 0) & ((n == box_bytes) | ((n == -box_bytes) & direct))
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


def flat_bytes(t: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """``t``'s bytes as a flat uint8 view, when a transfer can use them in place (on
    ``device``, contiguous, not empty)."""
    if t.device != device or not t.is_contiguous() or t.numel() == 0:
        return None
    return t.reshape(-1).view(torch.uint8)


class SendPlan:
    """Rank 0's side of the route: its messages and buffers. Source views are made as
    the messages go, so the work overlaps the sends."""

    __slots__ = ("messages", "srcs", "direct", "pool")

    def __init__(self, messages: list[Message], srcs: list[torch.Tensor], device: torch.device,
                 n_buffers: int) -> None:
        self.messages = messages
        self.srcs = srcs
        # A solo box whose bytes are contiguous is sent from the source itself.
        self.direct = [m.solo and _contiguous_box(srcs[m.js[0]], m.boxes[0], device)
                       for m in messages]
        size = max((m.total for m, d in zip(messages, self.direct) if not d), default=0)
        self.pool = [torch.empty(size, dtype=torch.uint8, device=device)
                     for _ in range(min(n_buffers, self.direct.count(False)))]


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
    for k, (m, direct) in enumerate(zip(messages, plan.direct)):
        b = None
        views = ops.box_views([srcs[j] for j in m.js], [box[0] for box in m.boxes],
                              [box[1] for box in m.boxes])
        if direct:
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


def read_plan(pid: int, js: list[int], addrs: list[int], shapes: list[tuple[int, ...]],
              slot_dests: list[list[Any]]) -> Any:
    """The direct reads of transfers ``js`` (validated by :func:`direct_transfers`):
    each destination's own box of its source tensor at ``addrs[j]`` in process ``pid``,
    which the read checks to lie in that tensor of ``shapes[j]``."""
    picked = [(addrs[j], shapes[j], d) for j in js for d in slot_dests[j]]
    return (pid, [a for a, _, _ in picked], [s for _, s, _ in picked],
            [d.box_start for _, _, d in picked], [d.unpack_into for _, _, d in picked])


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
            error = _read(plan.reads)
        if len(pending) > 1:
            _unpack(*pending.popleft(), slot_dests)
    if not plan.messages:
        error = _read(plan.reads)
    while pending:
        _unpack(*pending.popleft(), slot_dests)
    return error


def _read(reads: Any) -> BaseException | None:
    if not reads or not reads[1]:
        return None
    try:
        _read_boxes(*reads)
    except RuntimeError as exc:
        return exc
    return None


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
