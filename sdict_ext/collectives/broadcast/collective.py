"""The collective route of ``broadcast_state_dict``: packed, pipelined broadcasts.

The route NCCL and GPU users run (``route="collective"``, and ``route="auto"`` on
every device group); on CPU groups it also carries the transfers the point-to-point
route leaves to it. Rank 0 packs the tensors into slices of ``slice_bytes(bucket)``
(a tensor of a quarter slice or more travels alone), one asynchronous broadcast per
slice, and every rank unpacks each slot straight into its destinations. Two slice
buffers: slice ``k`` is packed and its broadcast started before slice ``k - 1`` is
waited for and unpacked, so the process group moves one slice while this thread
copies the neighbouring ones. A tensor travelling alone is sent from the source
tensor itself, and received into the destination itself where that holds the whole
tensor: no buffer, no pack, no unpack.

A CPU source on a device wire (rank 0 holding a CPU full state dict, the usual
checkpoint load) travels through the :class:`~sdict_ext.host.pipeline.HostPipeline`:
the CPU ``pack`` kernel writes slice ``k`` into pinned host bucket ``k % 2``, then ONE
asynchronous host-to-device copy per slice, on the pipeline's own stream, fills the
wire buffer; the broadcast is ordered after it by an event, and the next slice is
packed on the host while this one uploads and travels. The wire device is a
parameter: given a pipeline on the CPU (plain buckets, a plain ``copy_``), the tests
drive this same code.
"""

from __future__ import annotations

import math
from collections import deque
from itertools import accumulate
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from sdict_ext import ops
from sdict_ext.collectives.broadcast.dests import Dest, flat_bytes
from sdict_ext.collectives.buckets import buckets_with_solos
from sdict_ext.host.pipeline import HostPipeline

__all__ = ["Plan", "plan", "run"]


class Plan(NamedTuple):
    """The broadcasts of one call: per run (the transfers of one slice) its slot
    offsets and size, the tensor it travels in place from / into (else None), and the
    (at most two) slice buffers on the wire device."""

    runs: list[list[int]]
    layouts: list[tuple[list[int], int]]
    in_place: list[tuple[torch.Tensor | None, Dest | None]]
    flats: list[torch.Tensor]


def plan(
    js: list[int],
    is_src: bool,
    srcs: list[torch.Tensor],
    specs: list[tuple[tuple[int, ...], torch.dtype]],
    slot_dests: list[list[Dest]],
    wire: torch.device,
    cut: int,
) -> Plan:
    """The broadcast slices of transfers ``js`` (every rank computes the same runs and
    layouts from the metadata), this rank's in-place tensors, and its slice buffers."""
    # Slot sizes as pack_layout rounds them (without its per-call checks).
    align = ops.ALIGNMENT
    slots = [-(-math.prod(specs[j][0]) * specs[j][1].itemsize // align) * align for j in js]
    # Below a quarter slice, a broadcast of its own costs more than the copy it saves.
    runs = [[js[k] for k in run]
            for run in buckets_with_solos(slots, cut, [True] * len(slots), cut // 4)]
    size_of = dict(zip(js, slots))
    # pack_layout's offsets, from the slot sizes already at hand (it would re-check
    # every spec).
    layouts = []
    for run in runs:
        offsets = list(accumulate((size_of[j] for j in run), initial=0))
        layouts.append((offsets[:-1], offsets[-1]))
    in_place: list[tuple[torch.Tensor | None, Dest | None]] = []
    for run in runs:
        view, receiver = None, None
        if len(run) == 1:
            j = run[0]
            if is_src:
                view = flat_bytes(srcs[j], wire)
            else:
                # Only a destination holding the whole tensor can receive it in place.
                for d in slot_dests[j]:
                    if d.unpack_into.shape == specs[j][0]:
                        view = flat_bytes(d.unpack_into, wire)
                        if view is not None:
                            receiver = d
                            break
        in_place.append((view, receiver))
    buffered = [total for (_, total), (v, _) in zip(layouts, in_place) if v is None]
    # Two buffers when two slices need one, so one fills while the other travels.
    flats = [
        torch.empty(max(buffered), dtype=torch.uint8, device=wire)
        for _ in range(min(2, len(buffered)))
    ]
    return Plan(runs, layouts, in_place, flats)


def run(
    group: dist.ProcessGroup,
    p: Plan,
    is_src: bool,
    srcs: list[torch.Tensor],
    specs: list[tuple[tuple[int, ...], torch.dtype]],
    slot_dests: list[list[Dest]],
    pipeline: HostPipeline | None = None,
) -> None:
    """One asynchronous broadcast per run, overlapped with packing and unpacking.

    At most two runs are in flight. Buffered runs alternate between the buffers of
    ``p.flats``, so a buffer is refilled only after the run before the previous one,
    its last user, was unpacked. ``slot_dests[j]`` are the keys that transfer ``j``
    fills (several for a tied tensor). On rank 0, ``pipeline`` (given where sources
    may lie on the host and the wire is a device, or by a test) carries every
    buffered run with a host source: packed into its host bucket, then uploaded in
    one copy.
    """
    pending: deque[tuple[Any, list[int], list[int], torch.Tensor, Dest | None]] = deque()
    n_buffered = 0
    for one_run, (offsets, total), (view, receiver) in zip(p.runs, p.layouts, p.in_place):
        if view is not None:
            # Received straight into ``receiver``; the source, and every other key of
            # the tensor, unpack their boxes from that tensor itself.
            work = dist.broadcast(view, group=group, group_src=0, async_op=True)
            pending.append((work, one_run, [0], view, receiver))
        else:
            if len(one_run) == 1:
                # Every rank sends / receives the tensor's exact bytes.
                spec = specs[one_run[0]]
                total = math.prod(spec[0]) * spec[1].itemsize
            k = n_buffered
            n_buffered += 1
            flat = p.flats[k % len(p.flats)]
            if pending and pending[0][3].data_ptr() == flat.data_ptr():
                _unpack_run(*pending.popleft(), slot_dests)  # one buffer only: wait for its user
            buf = flat[:total]
            if is_src:
                _fill(buf, [srcs[j] for j in one_run], offsets, k, pipeline)
            work = dist.broadcast(buf, group=group, group_src=0, async_op=True)
            pending.append((work, one_run, offsets, buf, None))
        if len(pending) > 1:
            _unpack_run(*pending.popleft(), slot_dests)
    while pending:
        _unpack_run(*pending.popleft(), slot_dests)


def _fill(buf: torch.Tensor, mine: list[torch.Tensor], offsets: list[int], k: int,
          pipeline: HostPipeline | None) -> None:
    """Rank 0: packs run ``k``'s source tensors into the wire buffer ``buf``. With a
    pipeline and a host source, on the host into bucket ``k % 2`` and uploaded in one
    copy (a source on a device is first brought to the host: a full state dict spread
    over devices, rare); else on the wire's device (a source elsewhere moved there)."""
    if pipeline is not None and any(t.is_cpu for t in mine):
        host = pipeline.bucket(k, buf.numel())
        ops.pack([t if t.is_cpu else t.cpu() for t in mine], out=host, offsets=offsets)
        pipeline.upload(k, buf)
        return
    mine = [t if t.device == buf.device else t.to(buf.device) for t in mine]
    ops.pack(mine, out=buf, offsets=offsets)


def _unpack_run(
    work: Any,
    one_run: list[int],
    offsets: list[int],
    buf: torch.Tensor,
    received: Dest | None,
    slot_dests: list[list[Dest]],
) -> None:
    work.wait()
    picked = [
        (offsets[n], d) for n, j in enumerate(one_run) for d in slot_dests[j]
        if d is not received
    ]
    if picked:
        ops.unpack(
            buf,
            [d.unpack_into for _, d in picked],
            offsets=[o for o, _ in picked],
            full_shapes=[d.full_shape for _, d in picked],
            starts=[d.box_start for _, d in picked],
        )
