"""Specs of the compiled ops: bit-exact against plain torch, on CPU and (when present) CUDA."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from sdict_ext import ops

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.complex64,
    torch.complex128,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]

HAS_CUDA = torch.cuda.is_available() and ops.has_cuda()
_needs_cuda = pytest.mark.skipif(
    not HAS_CUDA, reason="needs a CUDA device and sdict_ext built with CUDA"
)


def cuda(test):
    """Skipped without a CUDA device, and marked `cuda` so `pytest -m cuda` selects it."""
    return pytest.mark.cuda(_needs_cuda(test))


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes in logical order: NaN payloads and float8 compare exactly."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).cpu()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bytes(a), _bytes(b))


def _random(shape, dtype, device="cpu", gen=None) -> torch.Tensor:
    """Random bit patterns of `dtype` (bool restricted to 0/1)."""
    numel = 1
    for s in shape:
        numel *= s
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool().to(device)
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape).to(device)


def _layouts(dtype, device):
    """Tensors of every awkward layout: 0-dim, empty, transposed, stepped, offset."""
    g = torch.Generator().manual_seed(0)
    base = _random((7, 9, 5), dtype, device, g)
    return [
        _random((), dtype, device, g),
        _random((0, 3), dtype, device, g),
        _random((13,), dtype, device, g),
        base,
        base.transpose(0, 2),
        base[:, ::2, 1:],
        _random((33,), dtype, device, g)[1:],  # storage offset: misaligned for 16-byte loads
        base.select(1, 3),
    ]


# batched_copy_


def _check_batched_copy_every_dtype_and_layout(device):
    for dtype in DTYPES:
        srcs = _layouts(dtype, device)
        dsts = [torch.empty_like(s) for s in srcs]
        ops.batched_copy_(dsts, srcs)
        for i, (d, s) in enumerate(zip(dsts, srcs)):
            assert _same(d, s), (dtype, i)


def test_batched_copy_every_dtype_and_layout_cpu():
    _check_batched_copy_every_dtype_and_layout("cpu")


@cuda
def test_batched_copy_every_dtype_and_layout_cuda():
    _check_batched_copy_every_dtype_and_layout("cuda")


def test_batched_copy_into_strided_destinations_matches_copy_():
    srcs = _layouts(torch.float32, "cpu")
    def column_major(s):
        return torch.zeros(s.shape[::-1]).permute(tuple(reversed(range(s.dim()))))

    dsts = [column_major(s) for s in srcs]
    ref = [column_major(s) for s in srcs]
    ops.batched_copy_(dsts, srcs)
    for r, s in zip(ref, srcs):
        r.copy_(s)
    assert all(_same(d, r) for d, r in zip(dsts, ref))


def test_batched_copy_thousands_of_tiny_tensors_matches_foreach_copy():
    g = torch.Generator().manual_seed(1)
    sizes = torch.randint(0, 24, (5000,), generator=g).tolist()
    srcs = [_random((n,), DTYPES[i % len(DTYPES)], "cpu", g) for i, n in enumerate(sizes)]
    dsts = [torch.empty_like(s) for s in srcs]
    ops.batched_copy_(dsts, srcs)
    assert all(_same(d, s) for d, s in zip(dsts, srcs))


def test_batched_copy_bumps_version_counters_like_copy_():
    dsts = [torch.zeros(3), torch.nn.Parameter(torch.zeros(2))]
    refs = [torch.zeros(3), torch.nn.Parameter(torch.zeros(2))]
    srcs = [torch.ones(3), torch.ones(2)]
    with torch.no_grad():
        ops.batched_copy_(dsts, srcs)
        for r, s in zip(refs, srcs):
            r.copy_(s)
    assert [d._version for d in dsts] == [r._version for r in refs]
    assert all(torch.equal(d, s) for d, s in zip(dsts, srcs))


def test_batched_copy_goes_through_the_dispatcher_for_tensor_subclasses():
    class Logged(torch.Tensor):
        seen: list = []

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            cls.seen.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    dst = torch.zeros(4).as_subclass(Logged)
    ops.batched_copy_([dst], [torch.arange(4.0)])
    assert torch.equal(dst.as_subclass(torch.Tensor), torch.arange(4.0))
    assert Logged.seen, "a subclass must reach its __torch_function__ through the registered op"


def test_plain_cpu_entry_declines_anything_else_before_refusing_a_bad_pair():
    # Pair 0 is bad, but item 1 is a subclass: the call belongs to the dispatcher, so
    # the C++ entry declines (False) instead of raising, and writes nothing.
    class Sub(torch.Tensor):
        pass

    d0, d1 = torch.zeros(2), torch.zeros(2).as_subclass(Sub)
    wrong = torch.ones(2, dtype=torch.float64)
    assert ops.copy_if_plain_cpu([d0, d1], [wrong, torch.ones(2)]) is False
    assert ops.copy_if_plain_cpu([d0, {"not": "a tensor"}], [torch.ones(2), torch.ones(2)]) is False
    assert torch.equal(d0, torch.zeros(2))
    with pytest.raises(RuntimeError, match="pair 0: dtype mismatch"):
        ops.copy_if_plain_cpu([d0, torch.zeros(2)], [wrong, torch.ones(2)])
    assert torch.equal(d0, torch.zeros(2))


def test_plain_cpu_entry_over_many_pairs_scanned_in_parallel_ranges():
    # Enough pairs for the C++ entry to scan ranges on several threads: the first bad
    # pair is named whichever range finds it, a subclass in a late range still makes
    # the whole call decline, and a strided pair late on takes the general plan.
    class Sub(torch.Tensor):
        pass

    n = 9000
    srcs = [torch.full((3,), float(i)) for i in range(n)]
    dsts = [torch.zeros(3) for _ in range(n)]
    bad_srcs = list(srcs)
    bad_srcs[7000] = srcs[7000].double()
    bad_srcs[2500] = torch.ones(4)
    with pytest.raises(RuntimeError, match="pair 2500: shape mismatch"):
        ops.copy_if_plain_cpu(dsts, bad_srcs)
    declining = list(dsts)
    declining[8999] = torch.zeros(3).as_subclass(Sub)
    assert ops.copy_if_plain_cpu(declining, bad_srcs) is False
    assert all(not d.any() for d in dsts), "a refused or declined call wrote"

    strided = list(dsts)
    strided[8000] = torch.zeros(3, 2)[:, 1]
    assert ops.copy_if_plain_cpu(strided, srcs) is True
    assert all(torch.equal(d, s) for d, s in zip(strided, srcs))


def test_plain_cpu_entry_mixes_contiguous_strided_and_empty_pairs():
    base = torch.arange(24.0).reshape(4, 6)
    srcs = [torch.arange(5.0), base.t(), torch.empty(0, 3), torch.tensor(7.0), base[:, 1::2]]
    dsts = [
        torch.zeros(5), torch.zeros(6, 4), torch.zeros(0, 3), torch.zeros(()), torch.zeros(3, 4).t()
    ]
    refs = [torch.zeros_like(d).copy_(s) for d, s in zip(dsts, srcs)]
    assert ops.copy_if_plain_cpu(dsts, srcs) is True
    assert all(torch.equal(d, r) and d.shape == r.shape for d, r in zip(dsts, refs))


def test_batched_copy_columns_of_one_matrix_are_disjoint_destinations():
    m = torch.zeros(6, 4, dtype=torch.int64)
    ops.batched_copy_([m[:, 0], m[:, 3]], [torch.arange(6), torch.arange(6) + 10])
    ref = torch.zeros(6, 4, dtype=torch.int64)
    ref[:, 0] = torch.arange(6)
    ref[:, 3] = torch.arange(6) + 10
    assert torch.equal(m, ref)


def test_batched_copy_tensor_over_2_pow_31_bytes_cpu():
    n = 2**31 + 4099  # more elements and bytes than int32 can index
    src = torch.empty(n, dtype=torch.uint8)
    src[:8] = torch.arange(8, dtype=torch.uint8)
    src[-8:] = torch.arange(100, 108, dtype=torch.uint8)
    src[2**31 - 4 : 2**31 + 4] = 7
    dst = torch.zeros(n, dtype=torch.uint8)
    ops.batched_copy_([dst], [src])
    assert torch.equal(dst[:8], src[:8])
    assert torch.equal(dst[-8:], src[-8:])
    assert torch.equal(dst[2**31 - 4 : 2**31 + 4], src[2**31 - 4 : 2**31 + 4])
    del src, dst


def _expect_error(match, fn, *untouched):
    before = [t.clone() for t in untouched]
    with pytest.raises((RuntimeError, ValueError), match=match):
        fn()
    for t, b in zip(untouched, before):
        assert torch.equal(t, b), "a failed call wrote into a destination"


def test_batched_copy_rejects_bad_pairs_before_writing_anything():
    d0, d1, d2 = torch.zeros(3), torch.zeros(3), torch.zeros(3)
    s = torch.ones(3)
    _expect_error("1 sources", lambda: ops.batched_copy_([d0, d1], [s]), d0, d1)
    _expect_error(
        "pair 2: dtype mismatch",
        lambda: ops.batched_copy_([d0, d1, d2], [s, s, s.double()]),
        d0, d1, d2,
    )
    _expect_error(
        "pair 1: shape mismatch",
        lambda: ops.batched_copy_([d0, d1], [s, torch.ones(4)]),
        d0, d1,
    )
    big = torch.zeros(6)
    _expect_error(
        "destination 1 overlaps destination 2|destination 2 overlaps destination 1",
        lambda: ops.batched_copy_([d0, big[:4], big[2:]], [s, torch.ones(4), torch.ones(4)]),
        d0, big,
    )
    _expect_error(
        "destination 1 overlaps source 0|must not alias",
        lambda: ops.batched_copy_([d0, d1], [d1, s]),
        d0, d1,
    )
    _expect_error(
        "overlaps itself",
        lambda: ops.batched_copy_([d0, torch.zeros(1).expand(3)], [s, s]),
        d0,
    )


def _declined_calls():
    """Calls a pair-by-pair ``copy_`` would serve but one batched call declines."""
    d0, d1, d2 = torch.zeros(3), torch.zeros(3), torch.zeros(3)
    s = torch.ones(3)
    wide = torch.zeros(3, 4)
    return {
        "dtype": ([d0, d1], [s, s.double()]),
        "shape": ([d0, d1], [s, torch.ones(1)]),
        "tied destination": ([d0, d1, d0], [s, s, s * 2]),
        "destination is another pair's source": ([d0, d1], [d1, s]),
        "strided destinations overlap": ([wide[:, :2], wide[:, 1:3]], [torch.ones(3, 2)] * 2),
        "not strided": ([d2], [torch.ones(3).to_sparse()]),
    }


@pytest.mark.parametrize("entry", ["fast", "registered"])
@pytest.mark.parametrize("case", sorted(_declined_calls()))
def test_batched_copy_declines_what_a_pair_by_pair_copy_would_serve_with_not_implemented_error(
    case, entry
):
    copy = ops.batched_copy_ if entry == "fast" else torch.ops.sdict_ext.batched_copy_.default
    dsts, srcs = _declined_calls()[case]
    before = [d.clone() for d in dsts]
    # (A sparse tensor is declined by the dispatcher itself: no kernel for its backend.)
    with pytest.raises(NotImplementedError, match="sdict_ext(.|::)batched_copy_") as caught:
        copy(dsts, srcs)
    assert caught.type is NotImplementedError
    for d, b in zip(dsts, before):
        assert torch.equal(d, b), f"{case}: a declined call wrote into a destination"


@pytest.mark.parametrize("entry", ["fast", "registered"])
def test_batched_copy_raises_a_plain_runtime_error_for_what_no_route_serves(entry):
    copy = ops.batched_copy_ if entry == "fast" else torch.ops.sdict_ext.batched_copy_.default
    d0 = torch.zeros(3)
    with torch.inference_mode():
        frozen = torch.zeros(3)
    # copy_ refuses both too: a retry pair by pair would fail the same way.
    failures = {
        "overlaps itself": ([d0, torch.zeros(1).expand(3)], [torch.ones(3), torch.ones(3)]),
        "inference tensor": ([d0, frozen], [torch.ones(3), torch.ones(3)]),
    }
    for match, (dsts, srcs) in failures.items():
        with pytest.raises(RuntimeError, match=match) as caught:
            copy(dsts, srcs)
        assert caught.type is RuntimeError, f"{match}: {caught.type.__name__}"
        assert torch.equal(d0, torch.zeros(3)) and torch.equal(frozen, torch.zeros(3))


def test_direct_read_is_available_exactly_on_linux_builds():
    available = ops.direct_read_available()
    assert isinstance(available, bool)
    assert available is sys.platform.startswith("linux")
    assert "direct_read_available" in ops.__all__

def _self_copies(device):
    """Tensors of every layout copied onto themselves, expanded views included."""
    return _layouts(torch.float32, device) + [
        torch.arange(3.0, device=device).expand(4, 3),
        torch.arange(12, dtype=torch.int16, device=device).view(3, 4)[:, 1:3],
    ]


def _check_batched_copy_of_a_tensor_onto_itself_is_a_no_op(device, entry):
    # t.copy_(t) returns at once; so must batched_copy_, alone or among other pairs.
    copy = ops.batched_copy_ if entry == "fast" else torch.ops.sdict_ext.batched_copy_.default
    for t in _self_copies(device):
        ref = t.clone()
        before = t._version
        ref_version = ref._version
        ref.copy_(ref)
        copy([t], [t])
        assert _same(t, ref)
        if entry == "fast":  # (the registered op leaves version counters alone)
            assert t._version - before == ref._version - ref_version
    # Among other pairs: self-copies of tensors that share no memory with each other.
    g = torch.Generator().manual_seed(6)
    ts = [
        _random((4, 5), torch.float32, device, g).t(),
        _random((6,), torch.float32, device, g).expand(2, 6),
        _random((), torch.float32, device, g),
        _random((9,), torch.float32, device, g)[1::2],
        _random((3, 3), torch.float32, device, g),
    ]
    expected = [t.clone() for t in ts]
    others = [torch.zeros(5, device=device), torch.zeros(2, 3, device=device).t()]
    srcs = [torch.arange(5.0, device=device), torch.arange(6.0, device=device).view(3, 2)]
    copy(others[:1] + ts + others[1:], srcs[:1] + ts + srcs[1:])
    assert all(_same(t, e) for t, e in zip(ts, expected))
    assert all(_same(o, s) for o, s in zip(others, srcs))


@pytest.mark.parametrize("entry", ["fast", "registered"])
def test_batched_copy_of_a_tensor_onto_itself_is_a_no_op_cpu(entry):
    _check_batched_copy_of_a_tensor_onto_itself_is_a_no_op("cpu", entry)


@cuda
@pytest.mark.parametrize("entry", ["fast", "registered"])
def test_batched_copy_of_a_tensor_onto_itself_is_a_no_op_cuda(entry):
    _check_batched_copy_of_a_tensor_onto_itself_is_a_no_op("cuda", entry)


@pytest.mark.parametrize("entry", ["fast", "registered"])
@pytest.mark.parametrize("strided", [False, True])
def test_batched_copy_self_copy_still_overlaps_other_pairs(entry, strided):
    # Only a pair whose two sides are the same elements is exempt: a partial overlap
    # (which copy_ rejects too), the same destination in another pair, or another
    # pair reading what a self-copy "writes" stay errors, raised before any write.
    copy = ops.batched_copy_ if entry == "fast" else torch.ops.sdict_ext.batched_copy_.default
    buf = torch.zeros(4, 6)
    t = buf[:, 1:4] if strided else buf[1]
    other = torch.zeros(t.shape)
    src = torch.ones(t.shape)
    flat = torch.zeros(6)
    with pytest.raises(RuntimeError, match="clone"):
        flat[1:].copy_(flat[:-1])
    _expect_error("must not alias", lambda: copy([flat[1:]], [flat[:-1]]), flat)
    _expect_error("must not alias", lambda: copy([buf[1:, 1:]], [buf[:-1, :-1]]), buf)
    _expect_error(
        "destination 0 overlaps destination 1|destination 1 overlaps destination 0",
        lambda: copy([t, t], [t, src]),
        buf,
    )
    _expect_error(
        "destination 1 overlaps destination 2|destination 2 overlaps destination 1",
        lambda: copy([other, t, t], [src, src, t]),
        buf, other,
    )
    _expect_error(
        "destination 0 overlaps source 1|must not alias",
        lambda: copy([t, other], [t, t]),
        buf, other,
    )
    # The same memory seen conjugated holds other values: not a self-copy, so not a
    # silent no-op; copied as copy_ does (the dispatcher resolves the view first).
    z = torch.randn(4, dtype=torch.complex64)
    ref = z.clone()
    ref.copy_(ref.conj())
    copy([z], [z.conj()])
    assert torch.equal(z, ref)


@pytest.mark.parametrize("entry", ["fast", "registered"])
def test_batched_copy_of_conjugate_and_negative_views_matches_copy_(entry):
    copy = ops.batched_copy_ if entry == "fast" else torch.ops.sdict_ext.batched_copy_.default
    x = torch.randn(5, dtype=torch.complex128)
    srcs = [x.conj(), torch._neg_view(x), x.conj()[1:]]
    dsts = [torch.zeros(s.shape, dtype=s.dtype) for s in srcs]
    refs = [torch.zeros(s.shape, dtype=s.dtype) for s in srcs]
    copy(dsts, srcs)
    for r, s in zip(refs, srcs):
        r.copy_(s)
    assert all(torch.equal(d, r) for d, r in zip(dsts, refs))


def _slices(buf: torch.Tensor, order: list[int], width: int) -> list[torch.Tensor]:
    return [buf[k * width:(k + 1) * width] for k in order]


@pytest.mark.parametrize("order", ["ascending", "few_runs", "shuffled"])
@pytest.mark.parametrize("entry", ["fast", "registered"])
def test_batched_copy_overlap_check_in_any_address_order(order, entry):
    # Destinations and sources in rising address order (a state dict allocated in
    # order), a few runs of it, and no order at all: every case copies exactly, and a
    # destination hidden in the middle overlapping another is found in each.
    n, width = 3000, 5
    gen = torch.Generator().manual_seed(3)
    positions = list(range(n))
    if order == "few_runs":
        positions = positions[2000:] + positions[:700] + positions[1500:2000] + positions[700:1500]
    elif order == "shuffled":
        positions = torch.randperm(n, generator=gen).tolist()
    assert sorted(positions) == list(range(n))
    copy = ops.batched_copy_ if entry == "fast" else torch.ops.sdict_ext.batched_copy_.default
    src_buf = torch.randn(n * width, generator=gen)
    dst_buf = torch.zeros(n * width)
    srcs = _slices(src_buf, list(reversed(positions)), width)
    dsts = _slices(dst_buf, positions, width)
    copy(dsts, srcs)
    assert all(torch.equal(d, s) for d, s in zip(dsts, srcs))

    dst_buf.zero_()
    # Starts inside the destination in the middle of the buffer and ends two
    # destinations later: in address order, others sit between it and some it overlaps.
    start = (n // 2) * width + 2
    wide = dst_buf[start:start + 3 * width]
    bad_dsts = dsts + [wide]
    bad_srcs = srcs + [torch.ones(wide.numel())]
    _expect_error(
        f"destination {n} overlaps destination|overlaps destination {n}",
        lambda: copy(bad_dsts, bad_srcs),
        dst_buf,
    )
    # A source spanning several destinations.
    _expect_error(
        "overlaps source 0|must not alias",
        lambda: copy(dsts, [dst_buf[start:start + width]] + srcs[1:]),
        dst_buf,
    )


def test_big_cpu_copies_let_other_python_threads_run():
    # With forced GIL switches pushed out of reach, the main thread can only run while
    # the copying thread releases the GIL: a big copy must (a checkpoint staged on a
    # worker thread must not stall the trainer's thread), and still copy exactly.
    import threading

    dsts = [torch.zeros(1 << 20) for _ in range(2)]
    srcs = [torch.randn(1 << 20) for _ in range(2)]
    seen = threading.Event()
    copies_before_seen = []

    def worker():
        for k in range(200):
            if seen.is_set():
                copies_before_seen.append(k)
                return
            ops.batched_copy_(dsts, srcs)

    old = sys.getswitchinterval()
    sys.setswitchinterval(100.0)
    try:
        thread = threading.Thread(target=worker)
        thread.start()
        seen.set()
        thread.join(timeout=60)
    finally:
        sys.setswitchinterval(old)
    assert not thread.is_alive()
    assert copies_before_seen, "the main thread never ran during 200 big copies"
    assert all(torch.equal(d, s) for d, s in zip(dsts, srcs))


def test_cpu_kernels_run_on_torchs_threads():
    # at::parallel_for is a header template: compiled without OpenMP, where torch
    # uses OpenMP, every CPU kernel silently runs on one thread.
    from sdict_ext import _C

    assert _C.built_with_openmp() == torch.backends.openmp.is_available()
    # ... and on torch's own OpenMP runtime: a second libgomp is a second thread pool.
    if sys.platform.startswith("linux"):
        with open("/proc/self/maps") as maps:
            runtimes = {line.split()[-1] for line in maps if "libgomp" in line}
        assert len(runtimes) <= 1, f"several OpenMP runtimes loaded: {sorted(runtimes)}"


# pack / unpack


def _check_pack_equals_cat_of_bytes(device):
    tensors = [t for dtype in DTYPES for t in _layouts(dtype, device)]
    flat = ops.pack(tensors, alignment=1)
    ref = torch.cat([t.reshape(-1).view(torch.uint8) for t in tensors])
    assert torch.equal(flat.cpu(), ref.cpu())
    offsets, total = ops.pack_layout(tensors)
    aligned = ops.pack(tensors)
    assert aligned.numel() == total and all(o % ops.ALIGNMENT == 0 for o in offsets)
    for t, o in zip(tensors, offsets):
        n = t.numel() * t.element_size()
        assert torch.equal(aligned[o : o + n].cpu(), _bytes(t))
    outs = [torch.empty_like(t) for t in tensors]
    ops.unpack(aligned, outs)
    assert all(_same(o, t) for o, t in zip(outs, tensors))


def test_pack_equals_cat_of_bytes_and_unpack_inverts_it_cpu():
    _check_pack_equals_cat_of_bytes("cpu")


@cuda
def test_pack_equals_cat_of_bytes_and_unpack_inverts_it_cuda():
    _check_pack_equals_cat_of_bytes("cuda")


def test_pack_layout_from_shapes_and_dtypes_matches_layout_from_tensors():
    tensors = _layouts(torch.bfloat16, "cpu") + _layouts(torch.complex128, "cpu")
    specs = [(tuple(t.shape), t.dtype) for t in tensors]
    assert ops.pack_layout(specs) == ops.pack_layout(tensors)


def _gappy_tensors(device):
    """Mixed dtypes and sizes that leave alignment gaps of every width between slots."""
    g = torch.Generator().manual_seed(5)
    base = _random((6, 7), torch.float64, device, g)
    return [
        _random((3,), torch.int8, device, g),
        _random((5,), torch.int16, device, g),
        base.t(),
        _random((), torch.complex128, device, g),
        _random((7,), torch.bool, device, g),
        _random((0, 4), torch.float32, device, g),
        _random((33,), torch.bfloat16, device, g)[1::2],
        _random((2, 3), torch.float8_e4m3fn, device, g),
        _random((1,), torch.int64, device, g),
        _random((17,), torch.uint8, device, g),
    ]


def _zero_padded_reference(tensors, offsets, size) -> torch.Tensor:
    """What pack must produce, built with torch: each tensor's bytes at its offset."""
    ref = torch.zeros(size, dtype=torch.uint8)
    for t, o in zip(tensors, offsets):
        ref[o : o + t.numel() * t.element_size()] = _bytes(t)
    return ref


def _check_pack_zeroes_everything_outside_the_slots(device):
    # The same tensors packed into buffers that held different garbage give the same
    # bytes: the slots' bytes and zeros everywhere else (gaps, tail, a larger out).
    tensors = _gappy_tensors(device)
    offsets, total = ops.pack_layout(tensors)
    ref = _zero_padded_reference(tensors, offsets, total)
    for fill in (0xEE, 0x11, None):
        out = torch.randint(0, 256, (total,), dtype=torch.uint8) if fill is None else (
            torch.full((total,), fill, dtype=torch.uint8))
        out = out.to(device)
        assert ops.pack(tensors, out) is out
        assert torch.equal(out.cpu(), ref), fill
    # A larger out than the layout needs: all of the rest is zeroed too.
    big = torch.full((total + 100,), 0xAB, dtype=torch.uint8, device=device)
    ops.pack(tensors, out=big)
    assert torch.equal(big.cpu(), torch.cat([ref, torch.zeros(100, dtype=torch.uint8)]))
    # Offsets of the caller's: unaligned, in reverse order, gaps of 5 to 14 bytes, on
    # an out that starts at an odd address (a view into a bigger buffer).
    custom = [0] * len(tensors)
    pos = 7
    for i in reversed(range(len(tensors))):
        custom[i] = pos
        pos += tensors[i].numel() * tensors[i].element_size() + 5 + i
    host = torch.full((3 + pos + 50,), 0x5A, dtype=torch.uint8, device=device)
    odd = host[3:]
    ops.pack(tensors, out=odd, offsets=custom)
    assert torch.equal(host[:3].cpu(), torch.full((3,), 0x5A, dtype=torch.uint8))
    assert torch.equal(odd.cpu(), _zero_padded_reference(tensors, custom, odd.numel()))
    # Without out: the new buffer is fully written whatever the allocator hands out.
    for _ in range(3):
        garbage = torch.full((total,), 0xCD, dtype=torch.uint8, device=device)
        del garbage
        assert torch.equal(ops.pack(tensors).cpu(), ref)


def test_pack_zeroes_everything_outside_the_slots_cpu():
    _check_pack_zeroes_everything_outside_the_slots("cpu")


@cuda
def test_pack_zeroes_everything_outside_the_slots_cuda():
    _check_pack_zeroes_everything_outside_the_slots("cuda")


def test_pack_rejects_a_tensor_inside_out_before_writing():
    # Every byte of out is written, so a source anywhere in it (even outside the
    # slots, where pack used to leave memory alone) would be clobbered.
    out = torch.arange(64, dtype=torch.uint8)
    _expect_error(
        "out overlaps tensor 0 in memory",
        lambda: ops.pack([out[40:48]], out=out, offsets=[0]),
        out,
    )


def _check_unpack_writes_only_the_owned_box(device):
    g = torch.Generator().manual_seed(2)
    fulls = [_random((10, 7), torch.float32, device, g), _random((4, 6, 5), torch.int16, device, g)]
    flat = ops.pack(fulls)
    boxes = [((3, 2), (5, 4)), ((1, 0, 2), (2, 6, 3))]  # (start, shape)
    dsts = [torch.empty(shape, dtype=f.dtype, device=device) for f, (_, shape) in zip(fulls, boxes)]
    ops.unpack(
        flat,
        dsts,
        full_shapes=[f.shape for f in fulls],
        starts=[start for start, _ in boxes],
    )
    for d, f, (start, shape) in zip(dsts, fulls, boxes):
        ref = f
        for dim, (s, n) in enumerate(zip(start, shape)):
            ref = ref.narrow(dim, s, n)
        assert _same(d, ref)


def test_unpack_writes_only_the_owned_box_cpu():
    _check_unpack_writes_only_the_owned_box("cpu")


@cuda
def test_unpack_writes_only_the_owned_box_cuda():
    _check_unpack_writes_only_the_owned_box("cuda")


def test_unpack_into_columns_of_a_shard_matches_narrow():
    full = torch.arange(48, dtype=torch.float64).view(6, 8)
    flat = ops.pack([full])
    dst = torch.zeros(6, 3, dtype=torch.float64)
    ops.unpack(flat, [dst], full_shapes=[(6, 8)], starts=[(0, 5)])
    assert torch.equal(dst, full[:, 5:])


def test_pack_and_unpack_reject_bad_layouts_before_writing():
    t = torch.arange(4, dtype=torch.float32)
    out = torch.zeros(8, dtype=torch.uint8)
    _expect_error("does not fit", lambda: ops.pack([t], out), out)
    flat = ops.pack([t, t])
    dst = torch.zeros(4)
    _expect_error("lies outside flat", lambda: ops.unpack(flat, [dst], offsets=[32]), dst)
    _expect_error("does not fit in the packed shape", lambda: ops.unpack(
        flat, [dst], full_shapes=[(4,)], starts=[(1,)]), dst)
    _expect_error("must not alias", lambda: ops.unpack(flat, [flat[:4]]), flat)
    _expect_error("slot of tensor", lambda: ops.pack([t, t], torch.zeros(32, dtype=torch.uint8),
                                                     offsets=[0, 8]))


# gather_concat


def _padded_gather(full: torch.Tensor, world: int, dim: int) -> tuple[torch.Tensor, int]:
    """What an all-gather of torch.chunk shards padded to the largest shard returns."""
    chunks = list(torch.chunk(full, world, dim)) if full.shape[dim] else []
    chunks += [full.narrow(dim, 0, 0)] * (world - len(chunks))
    chunk_numel = max(c.numel() for c in chunks)
    gathered = torch.zeros(world * chunk_numel, dtype=full.dtype, device=full.device)
    for r, c in enumerate(chunks):
        gathered[r * chunk_numel : r * chunk_numel + c.numel()] = c.reshape(-1)
    return gathered, chunk_numel


def _check_gather_concat_matches_cat_of_chunks(device):
    g = torch.Generator().manual_seed(3)
    for shape in [(10, 6), (3, 5, 4), (1, 7), (0, 4), (5,)]:
        for dim in range(len(shape)):
            for world in (1, 2, 3, 4, 5):
                for dtype in (torch.float32, torch.bfloat16, torch.bool, torch.complex64):
                    full = _random(shape, dtype, device, g)
                    gathered, chunk_numel = _padded_gather(full, world, dim)
                    out = ops.gather_concat(gathered, chunk_numel, world, shape, dim)
                    assert _same(out, full), (shape, dim, world, dtype)


def test_gather_concat_matches_cat_of_chunks_even_uneven_and_empty_cpu():
    _check_gather_concat_matches_cat_of_chunks("cpu")


# Over 1 MiB, sharded on an inner dim: the plan merges the full-width ranks into one
# row-major copy and cuts the tensor into bands of rows (csrc/plan/gather_concat.cpp).
_BIG_INNER = [
    ((1027, 513), 1, 4, torch.float32),  # uneven: 129, 129, 129, 126 columns
    ((640, 800), 1, 4, torch.float32),  # even
    ((64, 33, 130), 1, 3, torch.float64),  # shard dim in the middle
    ((300, 5000), 1, 5, torch.uint8),
    ((200, 900), 1, 2, torch.complex128),
    ((3, 1000, 200), 2, 7, torch.bfloat16),  # six ranks of 29 columns, one of 26
    ((70000, 6), 1, 4, torch.int32),  # 2, 2, 2, 0: an empty trailing shard
    ((5, 70000), 0, 4, torch.float32),  # dim 0: one dense run per rank
]


@pytest.mark.parametrize("shape,dim,world,dtype", _BIG_INNER)
def test_gather_concat_big_inner_dims_match_cat_cpu(shape, dim, world, dtype):
    full = _random(shape, dtype, "cpu", torch.Generator().manual_seed(world))
    gathered, chunk_numel = _padded_gather(full, world, dim)
    out = ops.gather_concat(gathered, chunk_numel, world, shape, dim)
    assert _same(out, full)


def test_gather_concat_into_big_inner_dims_odd_spacing_and_strided_outputs():
    """Ranks' chunks 8 * n + 3 bytes apart (not a multiple of any element size: the
    per-rank path), outputs transposed or stepped views, and a band-sized tensor."""
    g = torch.Generator().manual_seed(5)
    world = 3
    fulls = [
        _random((700, 600), torch.float32, "cpu", g),
        _random((300, 400), torch.int64, "cpu", g),
        _random((512, 300), torch.float16, "cpu", g),
    ]
    dims = [1, 0, 1]
    shards = [
        [f.narrow(d, *_chunk(f.shape[d], world, r)).contiguous() for f, d in zip(fulls, dims)]
        for r in range(world)
    ]
    offsets, total = ops.pack_layout(shards[0])
    stride = total + 3
    gathered = torch.zeros(world * stride, dtype=torch.uint8)
    for r in range(world):
        ops.pack(shards[r], gathered[r * stride : r * stride + total], offsets=offsets)
    base = [torch.empty(600, 700), torch.full((300, 800), -7, dtype=torch.int64),
            torch.empty(512, 300, dtype=torch.float16)]
    outs = [base[0].t(), base[1][:, ::2], base[2]]
    ops.gather_concat_into(gathered, world, offsets, outs, dims)
    assert all(_same(o, f) for o, f in zip(outs, fulls))
    assert bool((base[1][:, 1::2] == -7).all())  # the columns between stay untouched


@cuda
def test_gather_concat_matches_cat_of_chunks_even_uneven_and_empty_cuda():
    _check_gather_concat_matches_cat_of_chunks("cuda")


def _check_gather_concat_into_rebuilds_many_tensors(device):
    g = torch.Generator().manual_seed(4)
    world = 3
    fulls = [
        _random((7, 5), torch.float32, device, g),
        _random((4, 9), torch.int64, device, g),
        _random((2, 3, 8), torch.float8_e4m3fn, device, g),
        _random((1,), torch.bool, device, g),
        _random((0, 2), torch.float16, device, g),
    ]
    dims = [0, 1, 2, 0, 0]
    shards = [
        [full.narrow(d, *_chunk(full.shape[d], world, r)) for full, d in zip(fulls, dims)]
        for r in range(world)
    ]
    offsets, total = ops.pack_layout(shards[0])  # rank 0 holds the largest shards
    gathered = torch.cat([ops.pack(s, torch.zeros(total, dtype=torch.uint8, device=device),
                                   offsets=offsets) for s in shards])
    outs = [torch.empty_like(f) for f in fulls]
    ops.gather_concat_into(gathered, world, offsets, outs, dims)
    assert all(_same(o, f) for o, f in zip(outs, fulls))


def _chunk(n: int, world: int, r: int) -> tuple[int, int]:
    size = -(-n // world)
    start = min(r * size, n)
    return start, max(0, min(size, n - start))


def test_gather_concat_into_rebuilds_many_tensors_from_one_buffer_cpu():
    _check_gather_concat_into_rebuilds_many_tensors("cpu")


@cuda
def test_gather_concat_into_rebuilds_many_tensors_from_one_buffer_cuda():
    _check_gather_concat_into_rebuilds_many_tensors("cuda")


def test_gather_concat_rejects_inconsistent_sizes():
    gathered = torch.zeros(8)
    with pytest.raises(RuntimeError, match="fewer than world_size"):
        ops.gather_concat(gathered, 4, 3, (12,), 0)
    with pytest.raises(RuntimeError, match="shard of rank 0 has"):
        ops.gather_concat(gathered, 4, 2, (10,), 0)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.gather_concat(gathered, 4, 2, (8,), 1)
    with pytest.raises(RuntimeError, match="0-dim"):
        ops.gather_concat(gathered, 4, 2, (), 0)


# registration, tracing, build state


def test_every_op_is_tagged_cudagraph_unsafe():
    # torch.compile's cudagraph trees leave ops with this tag out of their graphs: on
    # CUDA they wait on the stream and upload a copy table from a recycled pinned block.
    names = sorted(
        s.name.split("::")[1] for s in torch._C._jit_get_all_schemas()
        if s.name.startswith("sdict_ext::")
    )
    expected = {"batched_copy_", "pack_into", "unpack", "gather_concat", "gather_concat_into"}
    assert expected <= set(names)
    for name in names:
        packet = getattr(torch.ops.sdict_ext, name)
        for overload in packet.overloads():
            assert torch.Tag.cudagraph_unsafe in getattr(packet, overload).tags, (name, overload)


def test_inductor_finds_an_op_graph_incompatible_with_cuda_graphs():
    from torch._inductor.utils import get_first_incompatible_cudagraph_node

    graph = torch.fx.Graph()
    dst, src = graph.placeholder("dst"), graph.placeholder("src")
    node = graph.call_function(torch.ops.sdict_ext.batched_copy_.default, ([dst], [src]))
    graph.output(None)
    module = torch.fx.GraphModule(torch.nn.Module(), graph)
    assert get_first_incompatible_cudagraph_node(module) is node


@cuda
def test_ops_refuse_to_run_while_a_cuda_graph_is_captured():
    src = torch.randn(1 << 16, device="cuda")
    dst = torch.zeros_like(src)
    host = torch.zeros(1 << 16).pin_memory()
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graph.capture_begin()
        try:
            for dsts, srcs in (([dst], [src]), ([host], [src])):
                with pytest.raises(RuntimeError, match="while a CUDA graph is being captured"):
                    ops.batched_copy_(dsts, srcs)
            with pytest.raises(RuntimeError, match="sdict_ext.pack: called while a CUDA graph"):
                ops.pack([src])
        finally:
            graph.capture_end()
    torch.cuda.synchronize()
    assert not dst.any() and not host.any()  # refused before anything was written


def test_copy_thresholds_set_and_restore():
    default = ops.copy_thresholds()
    assert default == (1 << 20, 64 << 10)  # sdict_ext/tuning.h
    try:
        assert ops.copy_thresholds(5) == default
        assert ops.copy_thresholds(None, 7) == (5, default[1])
        assert ops.copy_thresholds() == (5, 7)
        with pytest.raises(ValueError, match="byte count"):
            ops.copy_thresholds(-1)
        assert ops.copy_thresholds() == (5, 7)  # a refused call changes nothing
    finally:
        ops.copy_thresholds(*default)
    assert ops.copy_thresholds() == default


@cuda
@pytest.mark.parametrize("side_stream", [False, True])
@pytest.mark.parametrize("limit", [0, 1 << 62])
def test_batched_copy_every_route_is_exact_cuda(limit, side_stream):
    """Every dense host<->device copy on the copy engines (0), or in the mapped kernel.
    On a side stream the copy engines take the batch API (cudaMemcpyBatchAsync, CUDA
    >= 12.8), which the legacy default stream does not allow."""
    before = ops.copy_thresholds(limit, limit)
    stream = torch.cuda.Stream() if side_stream else torch.cuda.current_stream()
    try:
        sizes = [1, 7, 4096, 65537, 3 << 20, 5 << 20]
        srcs = [torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda") for n in sizes]
        hosts = [torch.empty(n, dtype=torch.uint8, pin_memory=True) for n in sizes]
        back = [torch.zeros_like(s) for s in srcs]
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            ops.batched_copy_(hosts, srcs, non_blocking=True)
            ops.batched_copy_(back, hosts, non_blocking=True)
        stream.synchronize()
        assert all(torch.equal(h, s.cpu()) for h, s in zip(hosts, srcs))
        assert all(torch.equal(b, s) for b, s in zip(back, srcs))
    finally:
        ops.copy_thresholds(*before)


def test_opcheck_passes_for_every_op():
    t = [torch.randn(3, 4), torch.arange(5)]
    flat = ops.pack(t)
    full = torch.randn(6, 4)
    gathered, chunk_numel = _padded_gather(full, 2, 0)
    lib = torch.ops.sdict_ext
    offsets = ops.pack_layout(t)[0]

    def outs():
        return [torch.empty(3, 4), torch.empty(5, dtype=torch.int64)]

    cases = [
        (lib.batched_copy_.default, (outs(), t, False)),
        (lib.pack_into.default, (t, offsets, torch.empty_like(flat))),
        (lib.unpack.default, (flat, offsets, outs(), None, None)),
        (lib.gather_concat.default, (gathered, chunk_numel, 2, [6, 4], 0)),
        (
            lib.gather_concat_into.default,
            (ops.pack([full[:3]]).repeat(2), 2, [0], [torch.empty(6, 4)], [0]),
        ),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_fake_tensor_mode_gives_gather_concat_shape_without_running_kernels():
    with FakeTensorMode():
        gathered = torch.empty(24)
        out = ops.gather_concat(gathered, 12, 2, (6, 4), 0)
        assert out.shape == (6, 4) and out.dtype == torch.float32
        dst = torch.empty(3)
        ops.batched_copy_([dst], [torch.empty(3)])


def test_meta_tensor_mixed_with_real_ones_raises_instead_of_copying_nothing():
    dst = torch.zeros(3)
    with pytest.raises(ValueError, match="meta tensors mixed with real ones"):
        ops.batched_copy_([dst], [torch.empty(3, device="meta")])
    meta = torch.empty(3, device="meta")
    ops.batched_copy_([meta], [torch.empty(3, device="meta")])


def test_ops_trace_under_torch_compile():
    def rebuild(gathered):
        return ops.gather_concat(gathered, 12, 2, (6, 4), 0) * 2

    full = torch.randn(6, 4)
    gathered, _ = _padded_gather(full, 2, 0)
    compiled = torch.compile(rebuild, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(gathered), full * 2)


def test_writing_ops_trace_under_torch_compile():
    # The writing ops' Autograd kernel (version counters) must not stop tracing:
    # AOTAutograd functionalizes them through their (a!) schemas.
    def stage(a, b):
        out = torch.empty(64, dtype=torch.uint8)
        torch.ops.sdict_ext.pack_into([a, b], [0, 32], out)
        copied = torch.zeros_like(a)
        torch.ops.sdict_ext.batched_copy_([copied], [a])
        return out, copied * 2

    a, b = torch.arange(4.0), torch.arange(4.0) + 10
    want = stage(a, b)
    compiled = torch.compile(stage, backend="aot_eager", fullgraph=True)
    got = compiled(a, b)
    assert all(torch.equal(x, y) for x, y in zip(want, got, strict=True))


def test_extension_is_built_here():
    assert ops.is_compiled()
    assert ops.has_cuda() == torch._C._dispatch_has_kernel_for_dispatch_key(
        "sdict_ext::batched_copy_", "CUDA"
    )


def test_unbuilt_extension_imports_and_names_the_build_command():
    code = (
        "import sys; sys.modules['sdict_ext._C'] = None\n"
        "import torch, sdict_ext\n"
        "assert not sdict_ext.ops.is_compiled()\n"
        "try:\n"
        "    sdict_ext.ops.batched_copy_([torch.zeros(1)], [torch.ones(1)])\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install --no-build-isolation ." in out.stdout


# CUDA-only directions


@cuda
def test_batched_copy_device_to_pinned_host_and_back_cuda():
    g = torch.Generator().manual_seed(5)
    srcs = [_random((n,), torch.float32, "cuda", g) for n in (1, 17, 4096, 1 << 20)]
    srcs += _layouts(torch.bfloat16, "cuda")
    host = [torch.empty(s.shape, dtype=s.dtype, pin_memory=True) for s in srcs]
    ops.batched_copy_(host, srcs, non_blocking=True)
    torch.cuda.current_stream().synchronize()
    assert all(_same(h, s) for h, s in zip(host, srcs))
    back = [torch.empty_like(s) for s in srcs]
    ops.batched_copy_(back, host)
    assert all(_same(b, s) for b, s in zip(back, srcs))
    pageable = [torch.empty(s.shape, dtype=s.dtype) for s in srcs]
    ops.batched_copy_(pageable, srcs)
    assert all(_same(p, s) for p, s in zip(pageable, srcs))


@cuda
def test_big_strided_copies_with_pinned_memory_match_copy_both_ways_cuda():
    # Above the mapped-memory thresholds a strided device side is gathered into (or
    # scattered from) a device temporary and PCIe sees one dense transfer; a strided
    # host side stays on the kernel. Every route must give copy_'s bytes.
    g = torch.Generator().manual_seed(11)

    def views(fill):
        return [fill((2048, 1024), torch.float32).t(),        # 8 MiB, transposed
                fill((256, 4096, 3), torch.bfloat16)[:, :, 1],  # inner stride 3
                fill((4, 1 << 20), torch.uint8)[:, 1:]]        # gaps between rows

    dev = views(lambda shape, dtype: _random(shape, dtype, "cuda", g))
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in dev]
    ops.batched_copy_(host, dev, non_blocking=True)
    torch.cuda.current_stream().synchronize()
    assert all(_same(h, d) for h, d in zip(host, dev))
    back = views(lambda shape, dtype: torch.zeros(shape, dtype=dtype, device="cuda"))
    ops.batched_copy_(back, host)
    assert all(_same(b, h) for b, h in zip(back, host))
    # A strided host side (a transposed pinned view) is not one run: the kernel's route.
    wide = torch.empty(1024, 2048, pin_memory=True).t()
    ops.batched_copy_([wide], [dev[0]])
    assert _same(wide, dev[0])


@cuda
@pytest.mark.parametrize("non_blocking", [False, True])
def test_copies_with_pageable_memory_through_pinned_buckets_match_copy_cuda(non_blocking):
    # More than two 32 MiB buckets, a tensor cut across buckets, and many small ones.
    g = torch.Generator().manual_seed(12)
    sizes = [40 << 20, 3, 1000, 30 << 20] + [4097] * 500 + [17 << 20]
    dev = [_random((n,), torch.uint8, "cuda", g) for n in sizes]
    host = [torch.empty(n, dtype=torch.uint8) for n in sizes]
    ops.batched_copy_(host, dev, non_blocking=non_blocking)
    assert all(_same(h, d) for h, d in zip(host, dev))  # landed when the call returns
    back = [torch.zeros_like(d) for d in dev]
    ops.batched_copy_(back, host, non_blocking=non_blocking)
    for h in host:  # the sources were read before the call returned
        h.fill_(0)
    torch.cuda.current_stream().synchronize()
    assert all(_same(b, d) for b, d in zip(back, dev))


def test_carve_views_match_as_strided_and_share_the_slab_storage():
    slab = torch.zeros(256, dtype=torch.uint8)
    specs = [
        (torch.float32, (3, 4), (4, 1), 0),
        (torch.bfloat16, (5,), (1,), 24),
        (torch.int64, (), (), 8),
        (torch.bool, (0, 3), (3, 1), 200),
        (torch.complex64, (2, 2), (1, 2), 4),  # transposed strides
    ]
    dtypes, shapes, strides, offsets = (list(x) for x in zip(*specs))
    made = ops.carve_views(slab, dtypes, shapes, strides, offsets)
    for t, (dtype, shape, stride, offset) in zip(made, specs):
        ref = slab.view(dtype).as_strided(shape, stride, offset)
        assert t.dtype == dtype and tuple(t.shape) == shape and t.stride() == stride
        assert t.storage_offset() == offset and t.data_ptr() == ref.data_ptr()
        assert t._base is None and t.untyped_storage().data_ptr() == slab.data_ptr()
    made[0].fill_(1.5)
    assert torch.equal(slab.view(torch.float32)[:12], torch.full((12,), 1.5))
    with pytest.raises(RuntimeError, match="tensor 1 reaches past the slab's 256 bytes"):
        ops.carve_views(slab, [torch.uint8, torch.float64], [(4,), (30,)], [(1,), (1,)], [0, 8])
    with pytest.raises(RuntimeError, match="dtype of tensor 0 is not a torch.dtype"):
        ops.carve_views(slab, ["float32"], [(4,)], [(1,)], [0])


def _writing_op_calls(device: str = "cpu"):
    """Each op that writes into an argument, called through torch.ops directly (not the
    Python wrappers), with the tensor(s) it writes."""
    src = torch.arange(1, 9, dtype=torch.float32, device=device)
    flat = torch.zeros(64, dtype=torch.uint8, device=device)
    flat[:32] = src.view(torch.uint8)
    out = torch.zeros(8, device=device)
    # Two ranks' chunks of 16 bytes, each holding 4 float32 rows of a (8,) tensor.
    gathered = src.view(torch.uint8).clone()
    return [
        ("batched_copy_", lambda t: torch.ops.sdict_ext.batched_copy_([t], [src]), out),
        ("pack", lambda t: torch.ops.sdict_ext.pack_into([src], [0], t), flat),
        ("unpack", lambda t: torch.ops.sdict_ext.unpack(flat, [0], [t]), out),
        ("gather_concat_into",
         lambda t: torch.ops.sdict_ext.gather_concat_into(gathered, 2, [0], [t], [0]), out),
    ]


def _check_versions_and_grad_leaves(device: str) -> None:
    for name, call, like in _writing_op_calls(device):
        target = torch.zeros_like(like)
        before = target._version
        call(target)
        assert target._version == before + 1, name
        # Like copy_ into a leaf that requires grad: refused while grad mode is on,
        # nothing written; allowed (and counted) under no_grad.
        leaf = torch.zeros_like(like, dtype=like.dtype).requires_grad_(like.is_floating_point())
        if not leaf.requires_grad:
            continue
        with pytest.raises(RuntimeError, match=rf"sdict_ext.{name}: .* requires grad.*no_grad"):
            call(leaf)
        assert leaf._version == 0 and not leaf.detach().any(), name
        with torch.no_grad():
            call(leaf)
        assert leaf._version == 1 and leaf.detach().any(), name
    # Inference tensors have no version counter: written, nothing to count.
    for name, call, like in _writing_op_calls(device):
        with torch.inference_mode():
            target = torch.zeros_like(like)
            call(target)
        assert target.is_inference() and target.any(), name


def test_ops_refuse_to_write_an_inference_tensor_outside_inference_mode_like_copy_():
    for name, call, like in _writing_op_calls():
        with torch.inference_mode():
            target, theirs = torch.zeros_like(like), torch.zeros_like(like)
        with pytest.raises(RuntimeError, match="Inplace update to inference tensor"):
            theirs.copy_(torch.ones_like(like))
        # (copy_ raises only after writing; here nothing is written.)
        with pytest.raises(RuntimeError, match=rf"sdict_ext.{name}: .* inference tensor.*"
                                               "torch.inference_mode"):
            call(target)
        assert not target.any(), name
    # Through the Python wrapper too, and reading an inference tensor is allowed, as
    # copy_ allows it.
    with torch.inference_mode():
        frozen = torch.arange(3.0)
    with pytest.raises(RuntimeError, match="destination 0 is an inference tensor"):
        ops.batched_copy_([frozen], [torch.ones(3)])
    assert torch.equal(frozen, torch.arange(3.0))
    normal = torch.zeros(3)
    ops.batched_copy_([normal], [frozen])
    assert torch.equal(normal, frozen)


def test_ops_bump_the_version_of_what_they_write_and_refuse_grad_leaves():
    _check_versions_and_grad_leaves("cpu")


@cuda
def test_ops_bump_the_version_of_what_they_write_and_refuse_grad_leaves_cuda():
    _check_versions_and_grad_leaves("cuda")


def test_an_overwritten_saved_tensor_is_caught_by_autograd():
    x = torch.randn(4, requires_grad=True)
    y = x.exp()  # exp saves its output for backward
    with torch.no_grad():
        torch.ops.sdict_ext.batched_copy_([y], [torch.zeros(4)])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_box_views_match_narrow_and_share_storage():
    base = torch.arange(4 * 6 * 5, dtype=torch.float64).reshape(4, 6, 5)
    cases = [
        (base, (1, 2, 0), (2, 3, 5)),  # an inner box
        (base.transpose(0, 2), (0, 1, 1), (5, 2, 3)),  # non-contiguous source
        (base[1:, ::2], (0, 0, 4), (3, 3, 1)),  # a strided view with an offset
        (torch.ones(3, 2, dtype=torch.bool), (2, 0), (1, 2)),
        (torch.zeros(0, 3), (0, 1), (0, 2)),  # zero-size
        (base, (0, 0, 0), (4, 6, 5)),  # the whole tensor: the tensor itself
    ]
    tensors, starts, shapes = (list(x) for x in zip(*cases))
    views = ops.box_views(tensors, starts, shapes)
    for v, (t, start, shape) in zip(views, cases):
        want = t
        for d, (lo, n) in enumerate(zip(start, shape)):
            want = want.narrow(d, lo, n)
        assert torch.equal(v, want) and v.stride() == want.stride()
        assert v.data_ptr() == want.data_ptr() and v.dtype == t.dtype
        assert v.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
    assert views[-1] is base and views[0]._base is None
    views[0].fill_(-1)
    assert base[1:3, 2:5].eq(-1).all() and base[0].ge(0).all()
    # Subclasses and conjugate views are narrowed in Python (same values).
    conj = torch.randn(3, 4, dtype=torch.complex64).conj()
    (v,) = ops.box_views([conj], [(1, 1)], [(2, 2)])
    assert torch.equal(v, conj[1:3, 1:3]) and v.is_conj()
    param = torch.nn.Parameter(torch.randn(4, 4))
    (v,) = ops.box_views([param], [(2, 0)], [(2, 4)])
    assert torch.equal(v, param[2:]) and v.data_ptr() == param[2:].data_ptr()
    for start, shape, why in (((3, 0, 0), (2, 6, 5), "leaves dim 0 of size 4"),
                              ((0, 0), (4, 6), "has 2 starts")):
        with pytest.raises(RuntimeError, match=why):
            ops.box_views([base, base], [(0, 0, 0), start], [(1, 1, 1), shape])


def test_unbuilt_checkout_uses_the_installed_builds_extension(tmp_path):
    # `pip install .` then `python -m bench` in the checkout: the checkout's sdict_ext/
    # (no _C) is imported, and the installed copy's compiled _C provides the ops.
    package = Path(ops.__file__).parent
    tree, site = tmp_path / "checkout" / "sdict_ext", tmp_path / "site" / "sdict_ext"
    shutil.copytree(package, tree, ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    site.mkdir(parents=True)
    shutil.copy(Path(ops._C.__file__), site)
    code = (
        "import torch, sdict_ext\n"
        "print(sdict_ext.__file__, sdict_ext.ops.is_compiled(), sdict_ext.ops._C.__file__)\n"
        "dst = torch.zeros(3)\n"
        "sdict_ext.ops.batched_copy_([dst], [torch.arange(3.0)])\n"
        "print(dst.tolist())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site.parent)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=tree.parent, env=env)
    assert out.returncode == 0, out.stderr
    where, compiled, extension = out.stdout.splitlines()[0].split()
    assert Path(where).parent == tree and compiled == "True"
    assert Path(extension).parent == site
    assert out.stdout.splitlines()[1] == "[0.0, 1.0, 2.0]"
    assert "which has no compiled extension; using the installed build's kernels" in out.stderr


# Bounds near 2^63: each bound below wrapped before it was overflow-checked (a segfault,
# or a read / write outside the buffer with no error). Each runs in a child process, so
# a crash fails the test instead of ending the run.

def _refused_in_child(code: str) -> str:
    """Runs ``code`` (after ``import os, torch`` and ``from sdict_ext import ops``) in a
    child; requires it to raise ``RuntimeError``; returns the message."""
    prelude = "import os, torch\nfrom sdict_ext import ops\n"
    script = prelude + "try:\n" + "".join(f"    {line}\n" for line in code.splitlines()) + (
        "except RuntimeError as e:\n    print(e)\nelse:\n    print('NO ERROR')\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, f"crashed ({out.returncode}): {out.stderr[-2000:]}"
    assert "NO ERROR" not in out.stdout, f"returned without an error: {out.stdout}"
    return out.stdout


def test_unpack_refuses_an_offset_whose_end_overflows():
    text = _refused_in_child(
        "ops.unpack(torch.zeros(64, dtype=torch.uint8), [torch.zeros(2)], offsets=[2**63 - 8])")
    assert "sdict_ext.unpack: destination 0 (8 packed bytes at offset 9223372036854775800)" in text


def test_unpack_refuses_a_start_whose_end_overflows():
    text = _refused_in_child(
        "ops.unpack(torch.arange(64, dtype=torch.uint8), [torch.zeros(1, 2, dtype=torch.uint8)],\n"
        "           offsets=[0], full_shapes=[(2, 2)], starts=[(2**63 - 1, 0)])")
    assert "at start [9223372036854775807, 0] does not fit in the packed shape [2, 2]" in text


def test_unpack_refuses_a_packed_shape_whose_size_overflows():
    text = _refused_in_child(
        "ops.unpack(torch.arange(64, dtype=torch.uint8), [torch.zeros(1, 1, dtype=torch.uint8)],\n"
        "           offsets=[0], full_shapes=[(2**62, 2**62)], starts=[(0, 0)])")
    assert "holds more bytes than an int64 counts" in text


def test_box_views_refuses_a_start_whose_end_overflows():
    text = _refused_in_child(
        "ops.box_views([torch.arange(16.0).reshape(4, 4)], [(2**63 - 1, 0)], [(1, 4)])")
    assert "(start 9223372036854775807, size 1) leaves dim 0 of size 4" in text


def test_pack_refuses_an_offset_whose_end_overflows_and_leaves_out_as_it_was():
    text = _refused_in_child(
        "out = torch.full((64,), 7, dtype=torch.uint8)\n"
        "try:\n"
        "    ops.pack([torch.ones(2)], out=out, offsets=[2**63 - 4])\n"
        "finally:\n"
        "    assert bool(out.eq(7).all()), 'out was written'")
    assert "tensor 0 (8 bytes at offset 9223372036854775804) does not fit in out of 64" in text


def test_gather_concat_refuses_a_world_size_times_chunk_that_wraps():
    # 4 * 2**62 wraps to 0 elements, which "fit" in any buffer; rank 1 would be 2**62
    # bytes away.
    text = _refused_in_child(
        "ops.gather_concat(torch.arange(8, dtype=torch.uint8), 2**62, 4, [8], 0)")
    assert "fewer than world_size * chunk_numel = 4 * 4611686018427387904" in text


def test_gather_concat_of_nothing_with_a_huge_world_size_returns_at_once():
    # No rank has a row of an empty output: the ranks are not walked one by one.
    out = ops.gather_concat(torch.zeros(0), 0, 2**62, [0, 3], 0)
    assert out.shape == (0, 3)
    dst = torch.zeros(0, 3)
    ops.gather_concat_into(torch.zeros(0, dtype=torch.uint8), 2**62, [0], [dst], [0])


def test_carve_views_refuses_a_view_whose_last_byte_overflows():
    text = _refused_in_child(
        "ops.carve_views(torch.zeros(64, dtype=torch.uint8), [torch.float32], [(2, 2)],\n"
        "                [(2**62, 1)], [0])")
    assert "reaches past the slab's 64 bytes" in text
