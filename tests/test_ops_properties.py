"""Property specs of every op in ``sdict_ext.ops`` under extreme offsets, shapes and starts.

Each op is driven with values near 0 and near 2^63 (offsets, packed shapes, box starts,
chunk sizes, world sizes, strides): the result must equal PyTorch's own reference
(``torch.cat``, ``narrow``, ``as_strided``, ``copy_``) bit for bit, or the op must raise
``RuntimeError`` and leave every tensor it would write untouched. Never a crash: each
op's examples run in a child process, so a segfault fails its test instead of the run.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sdict_ext import ops  # noqa: E402

INT64_MAX = 2**63 - 1

# Values where a bound written without overflow checks wraps, and small ones that fit.
EXTREME = st.sampled_from(
    [2**31, 2**32, 2**62, 2**62 + 1, 2**63 - 8, INT64_MAX, -1, -(2**63), -(2**62)]
)


def _small_or_extreme(lo: int, hi: int) -> st.SearchStrategy[int]:
    return st.one_of(st.integers(lo, hi), st.integers(lo, hi), EXTREME)


DTYPES = st.sampled_from(
    [torch.uint8, torch.int16, torch.float32, torch.float64, torch.complex128, torch.bool]
)
SHAPES = st.lists(st.integers(0, 4), min_size=1, max_size=3).map(tuple)
# The examples are modest so that the whole file runs in a few tens of seconds.
PROPERTY = settings(max_examples=40, deadline=None, database=None, derandomize=True)


def _tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape) * dtype.itemsize
    high = 2 if dtype == torch.bool else 256
    return torch.randint(0, high, (n,), dtype=torch.uint8, generator=g).view(dtype).reshape(shape)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    # (A fresh tensor: contiguous() keeps a size-1 dim's stride, which view() may refuse.)
    return torch.empty(t.shape, dtype=t.dtype).copy_(t).reshape(-1).view(torch.uint8)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bytes(a), _bytes(b))


def _refused(call) -> bool:
    """Whether ``call()`` raised the ops' error (never anything else, never a crash)."""
    try:
        call()
    except RuntimeError:
        return True
    return False


def _box(t: torch.Tensor, start, shape) -> torch.Tensor:
    for d, (lo, n) in enumerate(zip(start, shape)):
        t = t.narrow(d, lo, n)
    return t


def _fits(start: int, n: int, size: int) -> bool:
    return 0 <= start and 0 <= n and start + n <= size


# ---------------------------------------------------------------- the properties


@PROPERTY
@given(st.data())
def _prop_pack(data) -> None:
    specs = data.draw(st.lists(st.tuples(SHAPES, DTYPES), min_size=1, max_size=3))
    tensors = [_tensor(s, dt, k) for k, (s, dt) in enumerate(specs)]
    if data.draw(st.booleans()):
        tensors = [t.t() if t.dim() == 2 else t for t in tensors]  # read in place, strided
    laid, total = ops.pack_layout(tensors)
    offsets = data.draw(st.one_of(st.just(laid), st.lists(
        _small_or_extreme(-2, 96), min_size=len(tensors), max_size=len(tensors))))
    out = torch.full((data.draw(st.sampled_from([total, 0, 7, 96, 128])),), 0xAB,
                     dtype=torch.uint8)
    nbytes = [t.numel() * t.element_size() for t in tensors]
    slots = sorted((o, n) for o, n in zip(offsets, nbytes) if n)
    valid = all(_fits(o, n, out.numel()) for o, n in zip(offsets, nbytes)) and all(
        a + n <= b for (a, n), (b, _) in zip(slots, slots[1:]))
    before = out.clone()
    if not valid:
        assert _refused(lambda: ops.pack(tensors, out=out, offsets=offsets)), offsets
        assert torch.equal(out, before)
        return
    ops.pack(tensors, out=out, offsets=offsets)
    expected = torch.zeros_like(out)
    for o, t, n in zip(offsets, tensors, nbytes):
        expected[o:o + n] = _bytes(t)
    assert torch.equal(out, expected)


@PROPERTY
@given(st.data())
def _prop_unpack(data) -> None:
    dtype = data.draw(DTYPES)
    shape = data.draw(SHAPES)
    flat = _tensor((data.draw(st.integers(0, 160)),), torch.uint8, 1)
    offset = data.draw(_small_or_extreme(-2, 160))
    boxed = data.draw(st.booleans())
    full = tuple(data.draw(st.lists(_small_or_extreme(-1, 6), min_size=len(shape),
                                    max_size=len(shape)))) if boxed else shape
    start = tuple(data.draw(st.lists(_small_or_extreme(-1, 6), min_size=len(shape),
                                     max_size=len(shape)))) if boxed else (0,) * len(shape)
    dst = _tensor(shape, dtype, 2)
    before = dst.clone()
    packed = math.prod(full) * dtype.itemsize if all(f >= 0 for f in full) else -1
    valid = (
        all(_fits(s, n, f) for s, n, f in zip(start, shape, full))
        and 0 <= packed <= INT64_MAX
        and _fits(offset, packed, flat.numel())
    )
    kwargs = {"full_shapes": [full], "starts": [start]} if boxed else {}
    if not valid:
        assert _refused(lambda: ops.unpack(flat, [dst], offsets=[offset], **kwargs))
        assert _same(dst, before)
        return
    ops.unpack(flat, [dst], offsets=[offset], **kwargs)
    whole = flat[offset:offset + packed].clone().view(dtype).reshape(full)
    assert _same(dst, _box(whole, start, shape))


@PROPERTY
@given(st.data())
def _prop_box_views(data) -> None:
    base = _tensor(data.draw(SHAPES), data.draw(DTYPES), 3)
    t = base.t() if base.dim() == 2 and data.draw(st.booleans()) else base
    start = data.draw(st.lists(_small_or_extreme(-1, 5), min_size=t.dim(), max_size=t.dim()))
    shape = data.draw(st.lists(_small_or_extreme(-1, 5), min_size=t.dim(), max_size=t.dim()))
    if not all(_fits(s, n, size) for s, n, size in zip(start, shape, t.shape)):
        assert _refused(lambda: ops.box_views([t], [tuple(start)], [tuple(shape)]))
        return
    (view,) = ops.box_views([t], [tuple(start)], [tuple(shape)])
    ref = _box(t, start, shape)
    assert _same(view, ref)
    assert view.storage_offset() == ref.storage_offset() >= 0
    assert view.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()


@PROPERTY
@given(st.data())
def _prop_carve_views(data) -> None:
    slab = _tensor((data.draw(st.integers(0, 96)),), torch.uint8, 4)
    dtype = data.draw(DTYPES)
    shape = tuple(data.draw(st.lists(_small_or_extreme(-1, 5), min_size=1, max_size=3)))
    strides = tuple(data.draw(st.lists(_small_or_extreme(-1, 9), min_size=len(shape),
                                       max_size=len(shape))))
    offset = data.draw(_small_or_extreme(-1, 40))
    empty = any(s == 0 for s in shape)
    sane = offset >= 0 and all(s >= 0 for s in shape) and all(s >= 0 for s in strides)
    end = (offset + sum((n - 1) * s for n, s in zip(shape, strides)) + 1) * dtype.itemsize
    valid = sane and (empty or end <= slab.numel())

    def call():
        return ops.carve_views(slab, [dtype], [shape], [strides], [offset])

    if not valid:
        assert _refused(call)
        return
    (view,) = call()
    assert view.shape == shape and view.stride() == strides and view.storage_offset() == offset
    assert view.untyped_storage().data_ptr() == slab.untyped_storage().data_ptr()
    # (A view of 2**62 elements at stride 0 is valid: its values are not materialised.)
    if not empty and math.prod(shape) <= 4096:
        ref = torch.empty(0, dtype=dtype).set_(slab.untyped_storage(), offset, shape, strides)
        assert _same(view, ref)


def _chunks(size: int, world_size: int) -> list[tuple[int, int]]:
    """(start, length) of every non-empty torch.chunk piece, without walking all ranks."""
    if size == 0:
        return []
    chunk = -(-size // world_size)
    return [(lo, min(chunk, size - lo)) for lo in range(0, size, chunk)]


@PROPERTY
@given(st.data())
def _prop_gather_concat(data) -> None:
    dtype = data.draw(DTYPES)
    gathered = _tensor((data.draw(st.integers(0, 48)),), dtype, 5)
    size = data.draw(SHAPES)
    dim = data.draw(st.integers(-len(size) - 1, len(size)))
    chunk_numel = data.draw(_small_or_extreme(-1, 24))
    world_size = data.draw(_small_or_extreme(-1, 6))

    def call():
        return ops.gather_concat(gathered, chunk_numel, world_size, size, dim)

    valid = (world_size >= 1 and chunk_numel >= 0 and world_size * chunk_numel <= gathered.numel()
             and -len(size) <= dim < len(size))
    if valid:
        d = dim % len(size)
        rest = math.prod(size[:d] + size[d + 1:])
        pieces = _chunks(size[d], world_size)
        valid = all(n * rest <= chunk_numel for _, n in pieces) or math.prod(size) == 0
    if not valid:
        assert _refused(call)
        return
    got = call()
    shard = list(size)
    parts = []
    for r, (_, n) in enumerate(pieces):
        shard[d] = n
        parts.append(gathered[r * chunk_numel:r * chunk_numel + n * rest].view(shard))
    expected = torch.cat(parts, d) if parts else torch.empty(size, dtype=dtype)
    assert _same(got, expected)


@PROPERTY
@given(st.data())
def _prop_gather_concat_into(data) -> None:
    world_size = data.draw(_small_or_extreme(-1, 4))
    gathered = _tensor((data.draw(st.sampled_from([0, 8, 12, 48, 96])),), torch.uint8, 6)
    dtype = data.draw(DTYPES)
    size = data.draw(SHAPES)
    dim = data.draw(st.integers(-len(size) - 1, len(size)))
    offset = data.draw(_small_or_extreme(-1, 48))
    out = _tensor(size, dtype, 7)
    before = out.clone()

    def call():
        ops.gather_concat_into(gathered, world_size, [offset], [out], [dim])

    valid = (world_size >= 1 and gathered.numel() % world_size == 0
             and -len(size) <= dim < len(size))
    if valid:
        stride = gathered.numel() // world_size
        d = dim % len(size)
        rest = math.prod(size[:d] + size[d + 1:]) * dtype.itemsize
        pieces = _chunks(size[d], world_size) if out.numel() else []
        valid = 0 <= offset <= stride and all(n * rest <= stride - offset for _, n in pieces)
    if not valid:
        assert _refused(call)
        assert _same(out, before)
        return
    call()
    shard = list(size)
    parts = []
    for r, (_, n) in enumerate(pieces):
        shard[d] = n
        lo = r * stride + offset
        parts.append(gathered[lo:lo + n * rest].clone().view(dtype).view(shard))
    if parts:
        assert _same(out, torch.cat(parts, d))


@PROPERTY
@given(st.data())
def _prop_batched_copy(data) -> None:
    pairs = data.draw(st.lists(st.tuples(SHAPES, DTYPES, st.booleans()), min_size=1,
                               max_size=4))
    srcs = [_tensor(s, dt, k) for k, (s, dt, _) in enumerate(pairs)]
    dsts = []
    for k, (s, dt, strided) in enumerate(pairs):
        d = _tensor(s, dt, 100 + k)
        dsts.append(d.t().contiguous().t() if strided and d.dim() == 2 else d)
    mismatch = data.draw(st.sampled_from([None, "shape", "dtype", "alias"]))
    if mismatch == "shape":
        dsts[0] = torch.zeros(tuple(n + 1 for n in dsts[0].shape), dtype=dsts[0].dtype)
    elif mismatch == "dtype":
        other = torch.int16 if dsts[0].dtype != torch.int16 else torch.uint8
        dsts[0] = torch.zeros(dsts[0].shape, dtype=other)
    elif mismatch == "alias" and srcs[0].numel():
        dsts.append(dsts[0])  # one tensor written twice
        srcs.append(srcs[0].clone())
    before = [d.clone() for d in dsts]
    refs = [d.clone() for d in dsts]
    valid = mismatch is None or (mismatch == "alias" and not srcs[0].numel())
    # The wrapper (the C++ fast path for plain CPU tensors) or the registered op.
    copy = data.draw(st.sampled_from([ops.batched_copy_, torch.ops.sdict_ext.batched_copy_]))
    if valid:
        for r, s in zip(refs, srcs):
            r.copy_(s)
        copy(dsts, srcs)
        assert all(_same(d, r) for d, r in zip(dsts, refs))
        return
    assert _refused(lambda: copy(dsts, srcs))
    assert all(_same(d, b) for d, b in zip(dsts, before))


@PROPERTY
@given(st.lists(st.tuples(st.lists(_small_or_extreme(0, 9), max_size=3), DTYPES), max_size=4),
       st.sampled_from([1, 16, 4096]))
def _prop_pack_layout(specs, alignment) -> None:
    offsets, total = ops.pack_layout([(tuple(s), dt) for s, dt in specs], alignment)
    end = 0
    for offset, (shape, dtype) in zip(offsets, specs):
        # Aligned, in order, each slot after the last one: Python ints never wrap.
        assert offset % alignment == 0 and offset >= end
        end = offset + math.prod(shape) * dtype.itemsize
    assert total >= end and total % alignment == 0


@PROPERTY
@given(_small_or_extreme(-2, 1 << 20), _small_or_extreme(-2, 1 << 20))
def _prop_copy_thresholds(d2h, h2d) -> None:
    before = ops.copy_thresholds()
    try:
        if d2h < 0 or h2d < 0:
            try:
                ops.copy_thresholds(d2h, h2d)
            except ValueError:
                assert ops.copy_thresholds() == before  # nothing set
                return
            raise AssertionError("a negative threshold was accepted")
        assert ops.copy_thresholds(d2h, h2d) == before
        assert ops.copy_thresholds() == (d2h, h2d)
    finally:
        ops.copy_thresholds(*before)


PROPERTIES = [
    "_prop_pack", "_prop_unpack", "_prop_box_views", "_prop_carve_views",
    "_prop_gather_concat", "_prop_gather_concat_into", "_prop_batched_copy",
    "_prop_pack_layout", "_prop_copy_thresholds",
]


@pytest.mark.parametrize("prop", PROPERTIES)
def test_op_matches_torch_or_raises_for_extreme_offsets_shapes_and_starts(prop):
    root = Path(__file__).resolve().parent.parent
    code = f"import tests.test_ops_properties as m; m.{prop}()"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=root)
    # A negative return code is a signal (a segfault): the op crashed on some example.
    assert out.returncode == 0, f"{prop} exited with {out.returncode}:\n{out.stderr[-4000:]}"
