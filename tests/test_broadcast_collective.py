"""Specs for broadcast_state_dict's collective route: the pipelined broadcasts, and
rank 0's CPU source crossing to the wire through double-buffered host buckets.

The route takes the wire device and the host pipeline as parameters, so the CPU tests
below run the very code a GPU user's checkpoint load runs (a CPU full state dict on
rank 0, a device wire), with plain buckets and a plain upload copy; the CUDA variants
(skipped without a GPU) run it with pinned buckets and asynchronous uploads.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from sdict_ext import utils
from sdict_ext.collectives.broadcast import collective
from sdict_ext.collectives.broadcast.dests import Dest
from sdict_ext.host.pipeline import HostPipeline
from tests.mp import run_on_ranks
from tests.test_utils_dist import metadata_call, watch_metadata

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
WIRES = ["cpu", pytest.param("cuda", marks=CUDA)]

# A slice of 2 KiB: the 200 small tensors below (none of a quarter slice, so none
# travels alone) take several.
CUT = 2048


class _Uploads(TorchDispatchMode):
    """Counts the copies from host memory into a flat byte buffer on ``wire`` (a host
    bucket uploaded to the wire buffer), and the host-to-``wire`` ``.to()`` calls."""

    def __init__(self, wire: torch.device) -> None:
        super().__init__()
        self.wire = wire
        self.uploads = 0
        self.moves = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.copy_.default:
            dst, src = args[0], args[1]
            if (src.is_cpu and dst.device.type == self.wire.type and dst.dtype == torch.uint8
                    and src.dtype == torch.uint8 and dst.dim() == 1):
                self.uploads += 1
        elif func is torch.ops.aten._to_copy.default and self.wire.type != "cpu":
            if args[0].is_cpu and torch.device(kwargs.get("device") or "cpu").type != "cpu":
                self.moves += 1
        return func(*args, **kwargs)


def _sources() -> dict[str, torch.Tensor]:
    """200 small CPU tensors of mixed dtypes and shapes (one not contiguous)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for i in range(200):
        dtype = (torch.float32, torch.bfloat16, torch.int64, torch.uint8)[i % 4]
        shape = (1 + i % 5, 3 + i % 7)
        out[f"t{i}"] = torch.randint(0, 100, shape, generator=g).to(dtype)
    out["t7"] = out["t7"].t()
    return out


def _count_broadcasts() -> tuple[list[int], object]:
    """Wraps ``dist.broadcast`` to count the calls that carry tensor data."""
    watch_metadata()
    calls = [0]
    original = dist.broadcast

    def counted(*args, **kwargs):
        if not metadata_call():
            calls[0] += 1
        return original(*args, **kwargs)

    dist.broadcast = counted
    return calls, original


def _route_uploads(wire_name: str) -> tuple[int, int, int, bool]:
    """The collective route on its own: rank 0's CPU sources through a host pipeline
    onto ``wire``, every other rank receiving each whole tensor. Returns (uploads,
    broadcasts, runs, every received tensor bit-exact)."""
    wire = torch.device(wire_name, 0) if wire_name == "cuda" else torch.device(wire_name)
    is_src = dist.get_rank() == 0
    sources = _sources()
    specs = [(tuple(t.shape), t.dtype) for t in sources.values()]
    srcs = list(sources.values()) if is_src else []
    slot_dests: list[list[Dest]] = []
    for key, (shape, dtype) in zip(sources, specs):
        if is_src:
            slot_dests.append([])
            continue
        into = torch.empty(shape, dtype=dtype, device=wire)
        slot_dests.append([Dest(key, shape, into, shape, (0,) * len(shape), None, into)])
    js = list(range(len(specs)))
    plan = collective.plan(js, is_src, srcs, specs, slot_dests, wire, CUT)
    pipeline = HostPipeline(wire) if is_src else None
    counter = _Uploads(wire)
    calls, original = _count_broadcasts()
    try:
        with counter, torch.no_grad():
            collective.run(dist.group.WORLD, plan, is_src, srcs, specs, slot_dests, pipeline)
    finally:
        dist.broadcast = original
    same = all(
        torch.equal(ds[0].unpack_into.cpu(), t) for ds, t in zip(slot_dests, sources.values())
    ) if not is_src else True
    return counter.uploads, calls[0], len(plan.runs), same


@pytest.mark.parametrize("wire", WIRES)
def test_collective_route_uploads_each_host_bucket_once_per_broadcast(wire):
    results = run_on_ranks(2, _route_uploads, wire, timeout=120)
    (uploads0, broadcasts0, runs, _), (uploads1, broadcasts1, _, same) = results
    assert same
    # Several slices; one broadcast each on every rank.
    total = sum(math.prod(t.shape) * t.element_size() for t in _sources().values())
    assert runs >= 5 and runs >= math.ceil(total / CUT)
    assert broadcasts0 == broadcasts1 == runs
    # Rank 0 packed each slice into a host bucket and uploaded it in ONE copy; the
    # receiver uploads nothing.
    assert uploads0 == runs
    assert uploads1 == 0


def _load_onto_device(wire_name: str) -> tuple[int, int, int, bool]:
    """broadcast_state_dict from a CPU full state dict onto ``wire`` (the GPU user's
    checkpoint load): rank 0 keeps no local keys, rank 1 receives every tensor."""
    device = torch.device(wire_name, 0)
    rank = dist.get_rank()
    sources = _sources()
    local = {} if rank == 0 else {k: torch.empty(0, device=device) for k in sources}
    counter = _Uploads(device)
    calls, original = _count_broadcasts()
    try:
        with counter:
            utils.broadcast_state_dict(sources if rank == 0 else {}, local, device,
                                       bucket_bytes=2 * CUT, route="collective")
    finally:
        dist.broadcast = original
    same = all(torch.equal(local[k].cpu(), v) and local[k].device == device
               for k, v in sources.items()) if rank else True
    return counter.uploads, counter.moves, calls[0], same


@CUDA
def test_broadcast_of_a_cpu_state_dict_onto_cuda_uploads_one_bucket_per_broadcast():
    results = run_on_ranks(2, _load_onto_device, "cuda", timeout=120)
    (uploads0, moves0, broadcasts0, _), (uploads1, _, broadcasts1, same) = results
    assert same
    assert broadcasts0 == broadcasts1 >= 3
    assert uploads0 == broadcasts0 and uploads1 == 0
    # Never a per-tensor .to(device) of a source: at most the metadata's own parts.
    assert moves0 <= 2
