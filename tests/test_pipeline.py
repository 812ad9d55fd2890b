"""Tests for sdict_ext.host.pipeline: double-buffered host buckets for one device."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sdict_ext.host.pipeline import HostPipeline

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


class _CopyCounter(TorchDispatchMode):
    """Counts copies by (destination device type, source device type)."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[tuple[str, str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.copy_.default:
            dst, src = args[0], args[1]
            self.copies.append((dst.device.type, src.device.type, dst.numel()))
        elif func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy.default):
            self.copies.append(("?", args[0].device.type, args[0].numel()))
        return func(*args, **kwargs)


def _bytes(n: int, seed: int, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_upload_delivers_the_bucket_bytes_to_the_device_buffer(device):
    pipe = HostPipeline(device)
    wires = [torch.empty(100, dtype=torch.uint8, device=device) for _ in range(2)]
    for k in range(5):
        want = _bytes(100 - k, seed=k)
        pipe.bucket(k, want.numel()).copy_(want)
        wire = wires[k % 2][: want.numel()]
        pipe.upload(k, wire)
        assert torch.equal(wire.cpu(), want)


@pytest.mark.parametrize("device", DEVICES)
def test_download_returns_the_device_bytes_in_a_host_bucket(device):
    pipe = HostPipeline(device)
    for k in range(5):
        src = _bytes(64 + 8 * k, seed=10 + k, device=device)
        host = pipe.download(k, src)
        pipe.wait(k)
        assert host.device.type == "cpu"
        assert host.dtype == torch.uint8 and host.shape == (src.numel(),)
        assert torch.equal(host, src.cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_each_transfer_is_exactly_one_copy(device):
    pipe = HostPipeline(device)
    src = _bytes(256, seed=1, device=device)
    dst = torch.empty(256, dtype=torch.uint8, device=device)
    pipe.bucket(0, 256).fill_(3)  # the fill is the caller's kernel, not a transfer
    with _CopyCounter() as counter:
        pipe.upload(0, dst)
        pipe.download(1, src)
        pipe.wait(1)
    dev = torch.device(device).type
    assert counter.copies == [(dev, "cpu", 256), ("cpu", dev, 256)]


def test_transfers_alternate_between_two_buckets():
    pipe = HostPipeline("cpu")
    ptrs = [pipe.bucket(k, 32).data_ptr() for k in range(4)]
    assert ptrs[0] == ptrs[2] and ptrs[1] == ptrs[3]
    assert ptrs[0] != ptrs[1]


def test_a_bucket_is_reused_while_large_enough_and_grows_when_not():
    pipe = HostPipeline("cpu")
    first = pipe.bucket(0, 64)
    assert pipe.bucket(2, 16).data_ptr() == first.data_ptr()
    grown = pipe.bucket(4, 128)
    assert grown.numel() == 128
    assert pipe.bucket(6, 100).data_ptr() == grown.data_ptr()


def test_reserved_buckets_serve_every_transfer_up_to_their_size_without_allocating():
    pipe = HostPipeline("cpu")
    pipe.reserve(256)
    reserved = [pipe.bucket(k, 256).data_ptr() for k in range(2)]
    assert reserved[0] != reserved[1]
    assert [pipe.bucket(k, 100).data_ptr() for k in range(2, 6)] == reserved * 2


def test_reserve_of_one_bucket_leaves_the_other_to_first_use():
    pipe = HostPipeline("cpu")
    pipe.reserve(64, 1)
    assert pipe._hosts[0].numel() == 64 and pipe._hosts[1] is None


@pytest.mark.parametrize("nbytes, buckets", [(-1, 2), (8, 3)])
def test_reserve_rejects_a_negative_size_or_a_third_bucket(nbytes, buckets):
    with pytest.raises(ValueError, match="HostPipeline.reserve"):
        HostPipeline("cpu").reserve(nbytes, buckets)


def test_cpu_buckets_are_plain_memory():
    pipe = HostPipeline(torch.device("cpu"))
    assert not pipe.bucket(0, 16).is_pinned()


@CUDA
def test_accelerator_buckets_are_pinned():
    pipe = HostPipeline("cuda")
    assert pipe.bucket(0, 16).is_pinned()
    reserved = HostPipeline("cuda")
    reserved.reserve(32)
    assert reserved.bucket(1, 32).is_pinned()
    assert pipe.download(1, torch.zeros(8, dtype=torch.uint8, device="cuda")).is_pinned()


@CUDA
def test_download_waits_for_the_work_that_produced_its_source():
    pipe = HostPipeline("cuda")
    src = torch.zeros(1 << 20, dtype=torch.uint8, device="cuda")
    torch.cuda._sleep(50_000_000)  # the producer is still running when download is called
    src.fill_(7)
    host = pipe.download(0, src)
    pipe.wait(0)
    assert torch.equal(host, torch.full_like(host, 7))


@CUDA
def test_upload_is_ordered_before_later_work_on_the_current_stream():
    pipe = HostPipeline("cuda")
    dst = torch.zeros(1 << 20, dtype=torch.uint8, device="cuda")
    torch.cuda._sleep(50_000_000)  # an earlier reader of dst, still running
    pipe.bucket(0, dst.numel()).fill_(5)
    pipe.upload(0, dst)
    result = dst.clone()  # enqueued on the current stream after the upload
    assert torch.equal(result.cpu(), torch.full((1 << 20,), 5, dtype=torch.uint8))


@CUDA
def test_bucket_waits_for_the_upload_still_reading_it():
    pipe = HostPipeline("cuda")
    dst = torch.empty(1 << 20, dtype=torch.uint8, device="cuda")
    pipe.bucket(0, dst.numel()).fill_(1)
    torch.cuda._sleep(50_000_000)  # delays the upload, which waits for the current stream
    pipe.upload(0, dst)
    pipe.bucket(2, dst.numel()).fill_(2)  # must not change what the upload reads
    assert torch.equal(dst.cpu(), torch.ones(1 << 20, dtype=torch.uint8))


def test_upload_rejects_a_buffer_larger_than_the_filled_bucket():
    pipe = HostPipeline("cpu")
    pipe.bucket(0, 8)
    with pytest.raises(ValueError, match=r"dst has 16 bytes but bucket 0 holds 8"):
        pipe.upload(0, torch.empty(16, dtype=torch.uint8))


@pytest.mark.parametrize(
    "buf",
    [torch.empty(8, dtype=torch.float32), torch.empty(2, 4, dtype=torch.uint8),
     torch.empty(16, dtype=torch.uint8)[::2]],
    ids=["dtype", "2d", "strided"],
)
def test_transfers_reject_anything_but_contiguous_1d_bytes(buf):
    pipe = HostPipeline("cpu")
    pipe.bucket(0, 64)
    with pytest.raises(ValueError, match="contiguous 1-D uint8 tensor on cpu"):
        pipe.upload(0, buf)
    with pytest.raises(ValueError, match="contiguous 1-D uint8 tensor on cpu"):
        pipe.download(1, buf)


def test_bucket_rejects_a_negative_size():
    with pytest.raises(ValueError, match="nbytes must be >= 0, got -1"):
        HostPipeline("cpu").bucket(0, -1)
