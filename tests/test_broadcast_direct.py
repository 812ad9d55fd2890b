"""Single-process specs for broadcast_state_dict's direct-read route (process_vm_readv)."""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch

import sdict_ext.collectives.broadcast.direct as route
from sdict_ext import ops

# ------------------------------------------------------------------ direct reads (own pid)
# process_vm_readv may read this very process: the specs below read boxes of our own
# tensors through the same path a rank takes to read rank 0's.

DTYPES = [torch.bool, torch.uint8, torch.int16, torch.int64, torch.bfloat16, torch.float16,
          torch.float32, torch.float64, torch.complex64, torch.complex128, torch.float8_e4m3fn]


def _source(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # (A bool byte other than 0 / 1 would not survive the reference's own copy.)
    high = 2 if dtype == torch.bool else 256
    raw = torch.randint(0, high, (math.prod(shape) * dtype.itemsize,), dtype=torch.uint8,
                        generator=g)
    return raw.view(dtype).reshape(shape)


def _read(srcs, starts, shapes):
    dsts = [torch.empty(shape, dtype=src.dtype) for src, shape in zip(srcs, shapes)]
    n = route._read_boxes(
        os.getpid(), [s.data_ptr() for s in srcs], [tuple(s.shape) for s in srcs], starts,
        dsts,
    )
    return dsts, n


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)
    )


def test_read_process_boxes_reads_every_box_of_a_3d_tensor_like_narrow():
    src = _source((3, 4, 5), torch.float32, 0)
    srcs, starts, shapes = [], [], []
    for shape in itertools.product(range(0, 4), range(1, 5), range(1, 6)):
        for start in itertools.product(*(range(f - n + 1) for n, f in zip(shape, src.shape))):
            srcs.append(src)
            starts.append(start)
            shapes.append(shape)
    # Thousands of boxes in one call: several system calls of IOV_MAX runs each.
    dsts, n = _read(srcs, starts, shapes)
    assert n == sum(math.prod(s) * 4 for s in shapes)
    for dst, start, shape in zip(dsts, starts, shapes):
        (ref,) = ops.box_views([src], [start], [shape])
        assert _same_bytes(dst, ref), (start, shape)


def test_read_process_boxes_is_bit_exact_for_every_dtype_and_odd_shape():
    cases = [((7, 3), (2, 1), (4, 2)), ((), (), ()), ((0, 5), (0, 0), (0, 5)),
             ((5,), (1,), (3,)), ((2, 1, 9), (1, 0, 3), (1, 1, 5)), ((4, 6), (0, 0), (4, 6))]
    for k, dtype in enumerate(DTYPES):
        for full, start, shape in cases:
            src = _source(full, dtype, k)
            (dst,), _ = _read([src], [start], [shape])
            (ref,) = ops.box_views([src], [start], [shape])
            assert _same_bytes(dst, ref), (dtype, full, start, shape)
            assert dst._version == 1


def test_read_process_boxes_from_a_misaligned_offset_and_adjacent_tensors():
    # Views at odd byte offsets of one buffer: their runs touch and are merged.
    base = _source((1001,), torch.uint8, 3)
    srcs = [base[1:301].view(3, 100), base[301:601].view(3, 100), base[601:1001].view(4, 100)]
    dsts, n = _read(srcs, [(0, 0), (1, 0), (0, 7)], [(3, 100), (2, 100), (4, 93)])
    assert n == 300 + 200 + 372
    for dst, src, (lo, n_rows) in zip(dsts, srcs, [(0, 3), (1, 2), (0, 4)]):
        assert _same_bytes(dst, src[lo:lo + n_rows, -dst.shape[1]:])


def test_read_process_boxes_with_one_side_merging_past_iov_max():
    # Adjacent source rows (one merged remote run) into 1,100 separate destinations, and
    # the reverse: one side fills its 1,024 iovecs while the other keeps merging.
    src = _source((1100, 4), torch.float32, 7)
    buf = torch.zeros(2200, 4)
    n = route._read_boxes(os.getpid(), [src.data_ptr()] * 1100, [(1100, 4)] * 1100,
                               [(i, 0) for i in range(1100)],
                               [buf[2 * i].view(1, 4) for i in range(1100)])
    assert n == 1100 * 16
    assert _same_bytes(buf[::2], src) and not buf[1::2].any()
    wide = _source((2200, 4), torch.float32, 8)
    out = torch.zeros(1100, 4)
    route._read_boxes(os.getpid(), [wide.data_ptr()] * 1100, [(2200, 4)] * 1100,
                           [(2 * i, 0) for i in range(1100)],
                           [out[i].view(1, 4) for i in range(1100)])
    assert _same_bytes(out, wide[::2].contiguous())


def test_read_process_boxes_checks_every_box_before_reading_any():
    src = _source((4, 4), torch.float32, 5)
    first = torch.zeros(2, 4)
    with pytest.raises(RuntimeError, match="leaves dim 0 of size 4"):
        route._read_boxes(os.getpid(), [src.data_ptr()] * 2, [(4, 4)] * 2,
                               [(0, 0), (3, 0)], [first, torch.zeros(2, 4)])
    assert not first.any() and first._version == 0
    with pytest.raises(RuntimeError, match="contiguous CPU tensor"):
        route._read_boxes(os.getpid(), [src.data_ptr()], [(4, 4)], [(0, 0)],
                               [torch.zeros(4, 4).t()])
    with pytest.raises(RuntimeError, match="one address, full shape and start"):
        route._read_boxes(os.getpid(), [src.data_ptr()], [], [(0, 0)], [first])


def test_read_process_boxes_refuses_boxes_whose_bounds_overflow():
    src = _source((16,), torch.uint8, 6)
    dst = torch.zeros(1, dtype=torch.uint8)
    # start + size wraps: before the check was overflow-safe, this read 2**63 - 1 bytes on.
    with pytest.raises(RuntimeError, match="start 9223372036854775807, size 1.* leaves dim 0"):
        route._read_boxes(os.getpid(), [src.data_ptr()], [(16,)], [(2**63 - 1,)], [dst])
    # A tensor of more bytes than an int64 counts (its strides would wrap).
    with pytest.raises(RuntimeError, match="does not fit in the address space"):
        route._read_boxes(os.getpid(), [src.data_ptr()], [(2**62, 2**62)], [(0, 0)],
                          [dst.view(1, 1)])
    assert not dst.any()


def test_read_process_boxes_names_the_cause_when_the_kernel_refuses():
    dst = torch.zeros(4)
    with pytest.raises(RuntimeError, match="not mapped in the source process"):
        route._read_boxes(os.getpid(), [4096], [(4,)], [(0,)], [dst])
    with pytest.raises(RuntimeError, match="the source process is gone"):
        route._read_boxes(2**22 + 7, [4096], [(4,)], [(0,)], [dst])
    assert not dst.any()


def _announce(values: dict[str, torch.Tensor]) -> list[tuple]:
    """A TensorInfo list as rank 0 announces ``values`` (every one readable, none tied)."""
    return [(pos, tuple(v.shape), 0, -1, v.data_ptr()) for pos, v in enumerate(values.values())]


def test_can_read_only_the_announced_probe_bytes(monkeypatch):
    monkeypatch.setenv(route.ENV_DIRECT_READ, "1")
    probe, source = route.source_probe({}, [], [])
    assert route.can_read(source, route.direct_read_enabled())
    pid, addr, nonce = source[:3]
    assert not route.can_read((pid, addr, bytes(16), *source[3:]), True)  # the wrong bytes
    assert not route.can_read((2**22 + 7, addr, nonce, *source[3:]), True)  # no such process
    assert not route.can_read(None, True)
    del probe


def test_direct_reads_are_off_unless_the_environment_opts_in_at_call_time(monkeypatch):
    monkeypatch.delenv(route.ENV_DIRECT_READ, raising=False)
    assert not route.direct_read_enabled()
    probe, source = route.source_probe({}, [], [])
    assert not route.can_read(source, route.direct_read_enabled())  # read at the call: no opt-in
    monkeypatch.setenv(route.ENV_DIRECT_READ, "0")
    assert not route.can_read(source, route.direct_read_enabled())
    monkeypatch.setenv(route.ENV_DIRECT_READ, "1")
    assert route.direct_read_enabled() and route.can_read(source, route.direct_read_enabled())
    del probe


def test_a_build_without_direct_reads_announces_no_source_and_reads_nothing(monkeypatch):
    # Off Linux the extension has no process_vm_readv: its read entries raise. Rank 0
    # must then announce no source (every tensor travels as a message), not fail.
    def unavailable(*args, **kwargs):
        raise NotImplementedError("direct reads need Linux")

    values = {"w": _source((8, 8), torch.float32, 1)}
    keys, tensors = list(values), _announce(values)
    probe, source = route.source_probe(values, keys, tensors)
    assert source is not None and route.can_read(source, True)
    monkeypatch.setattr(route.ops, "direct_read_available", lambda: False)
    monkeypatch.setattr(route, "_read_samples", unavailable)
    monkeypatch.setattr(route, "_read_boxes", unavailable)
    assert route.source_probe(values, keys, tensors) == (None, None)
    assert not route.can_read(source, True)
    del probe


def test_the_process_read_primitive_is_not_public():
    assert "read_process_boxes" not in ops.__all__
    assert not hasattr(ops, "read_process_boxes")
    assert ops.extension_entry("read_process_boxes") is None


def test_direct_transfers_reads_only_announced_tensors_whose_samples_match():
    values = {f"t{i}": _source((64, 64 + i), torch.float32, i) for i in range(4)}
    values["small"] = _source((3,), torch.uint8, 9)
    keys = list(values)
    tensors = _announce(values)
    _, source = route.source_probe(values, keys, tensors)
    specs = [(tuple(v.shape), v.dtype) for v in values.values()]
    src_of = list(range(len(values)))
    everything = [True] * len(values)
    assert route.direct_transfers(source, tensors, src_of, specs, everything) == everything
    # A rank that wants a few of them draws each one's sample position as rank 0 did.
    some = [False, True, False, True, False]
    assert route.direct_transfers(source, tensors, src_of, specs, some) == some
    # Announced a page off (inside the same tensor: mapped, other bytes), not mapped, not
    # announced for reading at all; and a transfer this rank does not want.
    tensors[2] = (*tensors[2][:4], 0)
    _, source = route.source_probe(values, keys, tensors)
    tensors[0] = (*tensors[0][:4], tensors[0][4] + 4096)
    tensors[1] = (*tensors[1][:4], 4096)
    wanted = [True, True, True, False, True]
    assert route.direct_transfers(source, tensors, src_of, specs, wanted) == [
        False, False, False, False, True]
    tensors = _announce(values)
    # Samples are drawn per call: another call's do not validate this one's tensors.
    _, other = route.source_probe(values, keys, tensors)
    assert other[3] != source[3]
    forged = (*source[:3], other[3], source[4])
    assert not any(route.direct_transfers(forged, tensors, src_of, specs, everything)[:4])


def test_the_direct_route_reads_without_the_environment(monkeypatch):
    # route="direct" opts in by itself: the environment only steers route="auto".
    monkeypatch.delenv(route.ENV_DIRECT_READ, raising=False)
    probe, source = route.source_probe({}, [], [])
    assert route.can_read(source, True)
    del probe
