"""Single-process specs for the pieces of broadcast_state_dict's point-to-point route."""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch

from sdict_ext import _box_route as route
from sdict_ext import ops

CPU = torch.device("cpu")


def test_contiguous_box_says_exactly_when_the_box_view_is_contiguous():
    src = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    seen = 0
    for shape in itertools.product(range(1, 3), range(1, 4), range(1, 5)):
        for start in itertools.product(*(range(full - n + 1) for n, full in zip(shape, src.shape))):
            (view,) = ops.box_views([src], [start], [shape])
            claimed = route._contiguous_box(src, (start, shape), CPU)
            assert claimed == view.is_contiguous(), (start, shape)
            seen += claimed
    assert seen > 10
    # Never for a source that is not contiguous itself, or on another device.
    assert not route._contiguous_box(src.transpose(0, 1), ((0, 0, 0), (3, 2, 4)), CPU)
    assert not route._contiguous_box(src, ((0, 0, 0), (2, 3, 4)), torch.device("meta"))


def test_needs_rows_round_trip_and_messages_cover_each_box_once():
    shapes = [(6, 4), (5,), (0, 3), (2, 3, 4), (1000, 10)]
    itemsizes = [4, 8, 2, 1, 4]
    boxes = [
        ((3, 4), (3, 0)), None, ((0, 3), (0, 0)), ((2, 1, 4), (0, 2, 0)), ((500, 10), (500, 0)),
    ]
    row = [0] + route.encode_needs(shapes, itemsizes, boxes)
    at = route.row_positions(shapes)
    assert len(row) == at[-1] == 1 + sum(1 + 2 * len(s) for s in shapes)
    # Nothing needed (None, or an empty box): all zeros.
    assert row[at[1]:at[2]] == [0] * 3 and row[at[2]:at[3]] == [0] * 5
    js = [0, 3, 4]
    needs = route.decode_row(row, shapes, at, js)
    for (n, start, shape), j in zip(needs, js):
        assert (shape, start) == boxes[j]
        assert n == math.prod(shape) * itemsizes[j]
    # A 256-byte slice: the 20,000-byte box travels alone, the other two share one.
    messages = route.plan_messages(3, needs, js, 256)
    assert sorted(j for m in messages for j in m.js) == js
    solo = [m for m in messages if m.solo]
    assert [m.js for m in solo] == [[4]] and solo[0].total == 20000
    (shared,) = [m for m in messages if not m.solo]
    a = ops.ALIGNMENT
    first, second = -(-48 // a) * a, -(-8 // a) * a  # 3x4 float32, 2x1x4 bytes
    assert shared.peer == 3 and shared.offsets == [0, first] and shared.total == first + second


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
    n = ops.read_process_boxes(
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
    n = ops.read_process_boxes(os.getpid(), [src.data_ptr()] * 1100, [(1100, 4)] * 1100,
                               [(i, 0) for i in range(1100)],
                               [buf[2 * i].view(1, 4) for i in range(1100)])
    assert n == 1100 * 16
    assert _same_bytes(buf[::2], src) and not buf[1::2].any()
    wide = _source((2200, 4), torch.float32, 8)
    out = torch.zeros(1100, 4)
    ops.read_process_boxes(os.getpid(), [wide.data_ptr()] * 1100, [(2200, 4)] * 1100,
                           [(2 * i, 0) for i in range(1100)],
                           [out[i].view(1, 4) for i in range(1100)])
    assert _same_bytes(out, wide[::2].contiguous())


def test_read_process_boxes_checks_every_box_before_reading_any():
    src = _source((4, 4), torch.float32, 5)
    first = torch.zeros(2, 4)
    with pytest.raises(RuntimeError, match="leaves dim 0 of size 4"):
        ops.read_process_boxes(os.getpid(), [src.data_ptr()] * 2, [(4, 4)] * 2,
                               [(0, 0), (3, 0)], [first, torch.zeros(2, 4)])
    assert not first.any() and first._version == 0
    with pytest.raises(RuntimeError, match="contiguous CPU tensor"):
        ops.read_process_boxes(os.getpid(), [src.data_ptr()], [(4, 4)], [(0, 0)],
                               [torch.zeros(4, 4).t()])
    with pytest.raises(RuntimeError, match="one address, full shape and start"):
        ops.read_process_boxes(os.getpid(), [src.data_ptr()], [], [(0, 0)], [first])


def test_read_process_boxes_names_the_cause_when_the_kernel_refuses():
    dst = torch.zeros(4)
    with pytest.raises(RuntimeError, match="not mapped in the source process"):
        ops.read_process_boxes(os.getpid(), [4096], [(4,)], [(0,)], [dst])
    with pytest.raises(RuntimeError, match="the source process is gone"):
        ops.read_process_boxes(2**22 + 7, [4096], [(4,)], [(0,)], [dst])
    assert not dst.any()


def test_can_read_only_the_announced_probe_bytes():
    probe, source = route.source_probe()
    assert route.can_read(source)
    pid, addr, nonce = source
    assert not route.can_read((pid, addr, bytes(16)))  # the wrong bytes: not rank 0
    assert not route.can_read((2**22 + 7, addr, nonce))  # no such process
    assert not route.can_read(None)
    before = route.DIRECT_READ
    route.DIRECT_READ = False
    try:
        assert not route.can_read(source)
    finally:
        route.DIRECT_READ = before
    del probe
