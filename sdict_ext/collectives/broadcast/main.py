"""``broadcast_state_dict``: rank 0's full state dict into every rank's sharded one.

PyTorch's ``_broadcast_state_dict`` broadcasts one tensor at a time and builds every
full tensor on every rank before slicing out the local shard. Here one call announces
rank 0's metadata (:mod:`.meta`), plans where each tensor lands on this rank
(:mod:`.dests`), picks ONE route, agrees once, and moves the bytes:

* :mod:`.collective`: packed, pipelined broadcasts (every device group; the GPU
  users' road, with a CPU source uploaded through pinned host buckets);
* :mod:`.p2p`: each rank is sent only its boxes, where that moves fewer bytes than a
  broadcast (CPU groups); the other transfers still take the collective route;
* :mod:`.direct`: as p2p, but a rank on rank 0's host reads its boxes out of rank 0's
  memory instead of receiving messages.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from sdict_ext._gc import gc_paused
from sdict_ext.collectives.agreement import agree
from sdict_ext.collectives.broadcast import collective, direct, p2p
from sdict_ext.collectives.broadcast.dests import finish, plan_transfers, preplan, store_results
from sdict_ext.collectives.broadcast.meta import announce, exchange, from_wire, to_wire, wait_sent
from sdict_ext.collectives.buckets import DEFAULT_BUCKET_BYTES, slice_bytes
from sdict_ext.host.copies import indexed_device
from sdict_ext.host.pipeline import HostPipeline

__all__ = ["ROUTES", "broadcast_state_dict"]

#: The values of ``broadcast_state_dict``'s ``route``.
ROUTES = ("auto", "collective", "p2p", "direct")


def _pg_device(group: dist.ProcessGroup, device: torch.device) -> torch.device:
    # As PyTorch: the caller's device when the group can move it, else the group's first.
    types = group._device_types
    if device.type in {t.type for t in types}:
        return device
    return types[0]


def _choose_route(route: str, wire: torch.device) -> tuple[bool, bool]:
    """(point to point, direct reads) for ``route`` on a group whose wire is ``wire``.
    Raises ``ValueError`` for an unknown route, or a CPU route on a device group."""
    if route not in ROUTES:
        raise ValueError(f"broadcast_state_dict: route must be one of {ROUTES}, got {route!r}")
    cpu = wire.type == "cpu"
    if route == "auto":
        return cpu, cpu and direct.direct_read_enabled()
    if route != "collective" and not cpu:
        raise ValueError(
            f"broadcast_state_dict: route={route!r} needs a CPU group (gloo), but this "
            f"call's collectives run on {wire}; use route='collective' (or 'auto')"
        )
    return route != "collective", route == "direct"


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
    route: str = "auto",
) -> None:
    """Loads rank 0's full state dict into every rank's local state dict, in place.

    Counterpart of ``_broadcast_state_dict``. Same results as PyTorch: a DTensor local
    value receives its shard (a meta DTensor is replaced by a new one); any other
    present local value is replaced by a new full tensor on ``device`` (on rank 0, its
    own full tensor moved to ``device``); keys whose local value is missing or None
    take no tensor; non-tensor values and 0-dim tensors are assigned to keys the local
    state dict has. ``strict`` drops local keys the full state dict lacks;
    ``cpu_offload`` moves the received tensors to the CPU.

    Differences: tensors travel packed in slices of ``min(bucket_bytes / 2, 8 MiB)``,
    pipelined, each rank unpacking only its box (ranks other than 0 never build a full
    copy of a tensor they hold sharded; the ranks need not lay a tensor out alike); a
    tensor several keys share travels once; a 0-dim tensor arrives with a storage of
    its one element; ``cpu_offload=True`` does not raise ``KeyError`` for a tensor only
    the full state dict has; a failure on any rank (rank 0's metadata, a local shard
    of the wrong shape, a needs row that is no box of its tensor) is raised on every
    rank before any tensor is sent. The source is the group's rank 0.

    Args:
        full_state_dict: on the group's rank 0, the flat full state dict (plain
            tensors); ignored elsewhere.
        local_state_dict: this rank's state dict, updated in place.
        device: where new tensors are placed.
        pg: the process group; default: the default group.
        strict: remove local keys the full state dict does not have.
        cpu_offload: move the received tensors to the CPU.
        bucket_bytes: the most extra memory for message and slice buffers.
        route: how the tensors travel, the same on every rank. ``"collective"``:
            pipelined broadcasts of packed slices (a CPU source on a device group
            through pinned host buckets, one upload per slice). ``"p2p"`` (CPU groups
            only): every rank reports the box of each tensor it needs (one
            ``all_gather`` of a small table, the agreement), and a tensor whose boxes
            on the other ranks add up to no more than the tensor is sent to each rank
            as messages of its boxes only; the others are broadcast. ``"direct"`` (CPU
            groups only): as ``"p2p"``, but a rank on rank 0's host reads its boxes
            out of rank 0's memory (Linux ``process_vm_readv``, validated per tensor);
            a tensor it cannot read (not Linux, no access, another host) travels as a
            message. ``"auto"`` (default): ``"collective"`` on device groups; on CPU
            groups ``"p2p"``, or ``"direct"`` where ``SDICT_EXT_DIRECT_READ=1`` is
            set at the call (on rank 0 it announces its tensors; on another rank it
            reads them). ``"p2p"`` and ``"direct"`` on a device group raise
            ``ValueError``.
    """
    group = pg if pg is not None else dist.distributed_c10d._get_default_group()
    is_src = dist.get_rank(group) == 0
    device = indexed_device(device)  # "cuda" never equals a tensor's cuda:N
    wire = _pg_device(group, device)
    by_box, reads = _choose_route(route, wire)
    error: BaseException | None = None
    announced = meta = probe = None  # probe: lives until the call returns, read by peers
    if is_src:
        try:
            announced = announce(full_state_dict, addresses=reads)
            source = None
            if reads:
                probe, source = direct.source_probe(full_state_dict, announced[0], announced[2])
            meta = to_wire(*announced, source, p2p.row_len(announced[2]) if by_box else None)
        except Exception as exc:  # shipped to every rank by exchange()
            error = exc
    # The other ranks plan the usual checkpoint's destinations while the metadata lands.
    meta, in_flight, pre = exchange(
        group, wire, is_src, meta, error,
        lambda: preplan(local_state_dict, dist.get_rank()) if wire.type == "cpu" else None,
    )
    source, n = meta[-2], meta[-1]
    if (n is not None) != by_box:
        # Follow rank 0's route, so that every rank meets in its agreement and raises.
        kinds = ("collective", "point-to-point")
        error = ValueError(
            f"broadcast_state_dict: rank 0 takes the {kinds[n is not None]} route, but "
            f"route={route!r} gives this rank the {kinds[by_box]} one; pass the same "
            "route on every rank"
        )
        by_box = n is not None
    keys: list[str] = []
    row = transfers = None
    try:
        keys, objects, tensors, dtypes = announced if is_src else from_wire(meta)
        transfers = plan_transfers(tensors, keys, dtypes, local_state_dict,
                                   full_state_dict if is_src else None, device, wire,
                                   dist.get_rank(), pre)
        if by_box:
            row = p2p.needs_row(transfers, is_src, tensors, n, source, reads)
    except Exception as exc:  # reported to every rank by agree()
        error = error or exc
    if is_src:
        wait_sent(in_flight)  # the metadata left while this rank planned
    # The needs table is the route's plan, and where every rank learns whether any
    # rank failed (all raise before anything is sent).
    table = agree(group, error, what="broadcast_state_dict", share=row, share_len=n) \
        if by_box else None
    routed = pipeline = None
    srcs: list[torch.Tensor] = []
    try:
        specs, slot_dests = transfers.specs, transfers.slot_dests
        if is_src:
            # Plain tensors as they are; box views of them carry no autograd history.
            srcs = [full_state_dict[keys[tensors[i][0]]] for i in transfers.src_of]
            srcs = [v if type(v) is torch.Tensor and not v.requires_grad else v.detach()
                    for v in srcs]
        broadcast = list(range(len(specs)))
        cut = slice_bytes(bucket_bytes)
        if by_box and specs:
            routed = p2p.plan(group, table, row, is_src, srcs, transfers, wire, cut,
                              bucket_bytes, [tensors[i][4] for i in transfers.src_of],
                              0 if source is None else source[0],
                              [keys[tensors[i][0]] for i in transfers.src_of])
            broadcast = routed.broadcast
        broadcasts = collective.plan(broadcast, is_src, srcs, specs, slot_dests, wire, cut)
        # A CPU source crosses to a device wire through pinned host buckets; made
        # before the agreement, so a failure to make its stream or to pin its buckets
        # reaches every rank.
        if is_src and wire.type != "cpu" and any(s.is_cpu for s in srcs):
            pipeline = HostPipeline(wire)
            # Its host buckets too: a buffered run is at most a slice buffer's size.
            if broadcasts.flats:
                pipeline.reserve(broadcasts.flats[0].numel(), len(broadcasts.flats))
    except Exception as exc:  # reported to every rank by agree()
        error = error or exc
    # Every rank raises here if any failed, before anything is sent or written.
    agree(group, error, what="broadcast_state_dict")
    # Loading writes parameters in place, as PyTorch's copy_ does under no_grad.
    with torch.no_grad():
        read_error = None if routed is None else p2p.run(group, routed, srcs, slot_dests)
        collective.run(group, broadcasts, is_src, srcs, specs, slot_dests, pipeline)
        if routed is not None and routed.direct_reads:
            # Rank 0's tensors must outlive every read of them; a refused read (after
            # the probe succeeded: rare) is raised on every rank.
            agree(group, read_error, what="broadcast_state_dict")
        finish(transfers.dests)
    store_results(local_state_dict, keys, objects, transfers.dests, strict, cpu_offload)
