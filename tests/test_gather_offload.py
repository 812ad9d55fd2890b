"""Specs for ``gather_state_dict(cpu_offload=True)``: from an accelerator, gathered
slices reach the host through :class:`sdict_ext.host.pipeline.HostPipeline`, one
download copy per slice, and the CPU kernels rebuild the results from the host bucket.

The CPU cases run that same route with plain buckets and synchronous copies, through
the gather's ``host_buckets_on_cpu`` seam (a CPU exchange otherwise rebuilds straight
from its buffer, which already is host memory), so they drive the code GPU users run;
the CUDA cases repeat them where a GPU is present, through the public path.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed import _state_dict_utils as ref
from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh
from torch.utils._python_dispatch import TorchDispatchMode

from sdict_ext import utils
from sdict_ext.collectives import gather
from tests.mp import run_on_ranks

pytestmark = pytest.mark.dist

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]

# The in-place all-gather the gather issues per slice (all_gather_single where torch
# has it).
ALL_GATHER = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"

_MESHES: dict[str, Any] = {}


class _Transfers(TorchDispatchMode):
    """Records every copy between tensors: ``(op, dst device, src device, dst dtype,
    dst numel)``. A per-tensor device-to-host move shows as ``copy_`` or ``_to_copy``.

    Copies inside the all-gather (gloo stages CUDA tensors through host memory on the
    calling thread) are the backend's, not the gather's: :func:`_count_all_gathers`
    pauses the record around them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[tuple[str, str, str, torch.dtype, int]] = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.paused:
            return out
        if func is torch.ops.aten.copy_.default:
            dst, src = args[0], args[1]
            self.copies.append(("copy_", dst.device.type, src.device.type, dst.dtype, dst.numel()))
        elif func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy.default):
            self.copies.append((func.__name__, out.device.type, args[0].device.type,
                                out.dtype, out.numel()))
        return out


class _Unrecorded:
    """Runs ``fn`` with ``transfers`` paused."""

    def __init__(self, transfers: _Transfers) -> None:
        self.transfers = transfers

    def __call__(self, fn, *args, **kwargs):
        self.transfers.paused = True
        try:
            return fn(*args, **kwargs)
        finally:
            self.transfers.paused = False


class _Work:
    """A collective's work whose ``wait`` (gloo's copy back to CUDA) is not recorded."""

    def __init__(self, work: Any, unrecorded: _Unrecorded) -> None:
        self.work = work
        self.unrecorded = unrecorded

    def wait(self, *args, **kwargs):
        return self.unrecorded(self.work.wait, *args, **kwargs)


def _mesh(device: str):
    # Meshes create process groups collectively: one per device type and worker.
    if device not in _MESHES:
        _MESHES[device] = init_device_mesh(device, (dist.get_world_size(),))
    return _MESHES[device]


def _full(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-50, 50, shape, generator=g).to(dtype)


def _state_dict(device: str) -> dict[str, Any]:
    """Uneven Shard(0) (never gathered in place), Shard(1), mixed dtypes, a tied
    DTensor, a replicated one and a plain tensor: several slices at a small bucket."""
    ws = dist.get_world_size()
    mesh = _mesh(device)

    def dt(shape, dtype, seed, placements):
        return distribute_tensor(
            _full(shape, dtype, seed).to(device), mesh, placements, src_data_rank=None
        )

    sd: dict[str, Any] = {
        f"layer{i}.w": dt((4 * ws + 1, 16), torch.float32, i, [Shard(0)]) for i in range(12)
    }
    sd["cols"] = dt((5, 8 * ws - 1), torch.bfloat16, 50, [Shard(1)])
    sd["ints"] = dt((3 * ws + 2,), torch.int64, 51, [Shard(0)])
    sd["tied"] = sd["layer0.w"]
    sd["replicated"] = dt((3, 3), torch.float32, 52, [Replicate()])
    sd["plain"] = _full((2, 2), torch.float32, 53)
    return sd


def _count_all_gathers(transfers: _Transfers) -> tuple[list[int], Any]:
    """Wraps the all-gather to record each exchange's gathered bytes, keeping the
    backend's own copies out of ``transfers``."""
    sizes: list[int] = []
    original = getattr(dist, ALL_GATHER)
    unrecorded = _Unrecorded(transfers)

    def counted(output, *args, **kwargs):
        sizes.append(output.numel() * output.element_size())
        work = unrecorded(original, output, *args, **kwargs)
        return None if work is None else _Work(work, unrecorded)

    setattr(dist, ALL_GATHER, counted)
    return sizes, original


def _offload_transfers(device: str, bucket_bytes: int):
    sd = _state_dict(device)
    transfers = _Transfers()
    sizes, original = _count_all_gathers(transfers)
    try:
        with transfers:
            # The seam only changes a CPU exchange: on CUDA this is the public path.
            ours = gather._gather(
                sd, None, None, True, (), True, bucket_bytes, host_buckets_on_cpu=True
            )
    finally:
        setattr(dist, ALL_GATHER, original)
    theirs = ref._gather_state_dict(sd, cpu_offload=True)
    same = ours.keys() == theirs.keys() and all(
        ours[k].device == theirs[k].device
        and ours[k].dtype == theirs[k].dtype
        and torch.equal(ours[k], theirs[k])
        for k in theirs
    )
    tied_apart = (
        ours["tied"].untyped_storage().data_ptr()
        != ours["layer0.w"].untyped_storage().data_ptr()
    )
    return transfers.copies, sizes, same, tied_apart


@pytest.mark.parametrize("device", DEVICES)
def test_cpu_offload_downloads_each_gathered_slice_in_exactly_one_copy(device):
    results = run_on_ranks(2, _offload_transfers, device, 1024, timeout=120)
    for copies, sizes, same, tied_apart in results:
        assert same  # bit-exact with PyTorch's gather, devices and dtypes too
        assert tied_apart  # a tied value still gets its own storage at each place
        assert len(sizes) > 2  # several slices, so the buckets take turns
        # One copy per exchanged slice, of the slice's bytes, to the host; no copy of
        # any tensor on its own (the tied value's own copy is a batched op call).
        downloads = [(op, dst, dt, n) for op, dst, _, dt, n in copies]
        assert downloads == [("copy_", "cpu", torch.uint8, n) for n in sizes]
        assert all(src == torch.device(device).type for _, _, src, _, _ in copies)


def _public_transfers(device: str, cpu_offload: bool):
    sd = _state_dict(device)
    transfers = _Transfers()
    _, original = _count_all_gathers(transfers)
    try:
        with transfers:
            ours = utils.gather_state_dict(sd, cpu_offload=cpu_offload, bucket_bytes=1024)
    finally:
        setattr(dist, ALL_GATHER, original)
    theirs = ref._gather_state_dict(sd, cpu_offload=cpu_offload)
    same = all(torch.equal(ours[k], theirs[k]) and ours[k].device == theirs[k].device
               for k in theirs)
    return transfers.copies, same


@pytest.mark.parametrize("device", DEVICES)
def test_gather_without_cpu_offload_moves_nothing_to_the_host(device):
    for copies, same in run_on_ranks(2, _public_transfers, device, False, timeout=120):
        assert same
        assert copies == []


def test_cpu_offload_of_a_cpu_exchange_rebuilds_straight_from_its_buffer():
    # The exchange buffer already is host memory: no download, and no copy per tensor.
    for copies, same in run_on_ranks(2, _public_transfers, "cpu", True, timeout=120):
        assert same
        assert copies == []
