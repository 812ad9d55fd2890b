"""Single-process specs for the pieces of broadcast_state_dict's point-to-point route."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import sdict_ext.collectives.broadcast.p2p as route
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


def _table(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64)


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ([24, 2**63 - 1, 0, 1, 4], "start (9223372036854775807, 0)"),  # the item 11 row
        ([24, 0, 2**62, 1, 2**62], "shape (1, 4611686018427387904)"),
        ([24, -1, 0, 1, 4], "start (-1, 0)"),
        ([-16, 4, 0, 1, 4], "bytes -16"),  # a direct read of a tensor not announced
        ([24, 0, 0, 1, 4], "bytes 24"),  # the box holds 16 bytes
        ([16, 5, 0, 1, 4], "start (5, 0)"),
        ([0, 1, 0, 1, 4], "bytes 0"),  # nothing asked, yet a box
        ([16, 0, 0, 1, -4], "shape (1, -4)"),
    ],
)
def test_check_needs_table_raises_for_a_row_that_is_no_box_of_its_tensor(entry, why):
    shapes, itemsizes, keys = [(5, 4), (3,)], [4, 8], ["w", "b"]
    at = route.row_positions(shapes)
    good = [0] + route.encode_needs(shapes, itemsizes, [((1, 4), (4, 0)), ((2,), (1,))])
    route.check_needs_table(_table([[0] * len(good), good]), shapes, itemsizes, at, keys,
                            [False, False])
    crafted = [0] + entry + good[at[1]:]
    with pytest.raises(ValueError, match=r"rank 1's needs row .*key 'w'") as info:
        route.check_needs_table(_table([[0] * len(good), crafted]), shapes, itemsizes, at,
                                keys, [False, False])
    assert why in str(info.value)


def test_check_needs_table_accepts_direct_reads_only_of_announced_tensors():
    shapes, itemsizes, keys = [(5, 4)], [4], ["w"]
    at = route.row_positions(shapes)
    row = [0] + route.encode_needs(shapes, itemsizes, [((1, 4), (4, 0))], [True])
    table = _table([[0] * len(row), row])
    route.check_needs_table(table, shapes, itemsizes, at, keys, [True])
    with pytest.raises(ValueError, match="bytes -16"):
        route.check_needs_table(table, shapes, itemsizes, at, keys, [False])
