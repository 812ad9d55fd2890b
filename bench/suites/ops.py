"""Suite ``ops``: the compiled kernels against the PyTorch expressions they replace.

* ``batched_copy_`` against per-tensor ``copy_`` and ``torch._foreach_copy_``, for many
  small tensors, a few large ones, and a sweep of tensor sizes at a fixed total (the
  --plot figure). On CPU the copies are host to host; on CUDA, device to pinned host and
  pinned host to device (issue 2's 20,000 x 1-64 KB and 64 x 64 MB cases), each also
  with every dense copy forced through the mapped-memory kernel and through the copy
  engines ("variant" rows), to place the routing thresholds.
* ``pack`` / ``unpack`` against ``torch.cat`` of byte views / ``_foreach_copy_`` from views.
* ``gather_concat`` and ``gather_concat_into`` against ``torch.cat`` of the shards of an
  all-gathered buffer (simulated here for 4 ranks: no collective, just the rebuild).
* CUDA only, one case per slow path of issue 23: big strided (transposed) device
  tensors into pinned memory (gathered on the device, one transfer each), copies into
  pageable memory (through pinned buckets), and many small copies into mapped memory
  while a matrix product runs on another stream (the kernel's grid capped for PCIe).
"""

from __future__ import annotations

import torch

from bench.harness import ROLE_SDICT, ROLE_TORCH, ROLE_VARIANT, CaseSpec, Ctx, load_sdict
from bench.suites._inputs import DTYPE_MIX, fmt_bytes, make_tensors, random_numels, total_bytes

__all__ = ["cases", "run"]

KB, MB = 1024, 1024 * 1024

# count / lo / hi for the many-small-tensors copy; count / bytes for the large one;
# total / sizes of the sweep; the other ops' workloads.
_SIZES = {
    "tiny": dict(
        strided=(4, 4 * MB), matmul=1024,
        small=(1_000, 1 * KB, 16 * KB), large=(4, 4 * MB),
        sweep=(8 * MB, (4 * KB, 64 * KB, 1 * MB)),
        pack=(500, 256, 16 * KB), gc=(8, (257, 129)), gci=(200, 8, 64),
    ),
    "small": dict(
        strided=(16, 16 * MB), matmul=4096,
        small=(20_000, 1 * KB, 16 * KB), large=(16, 16 * MB),
        sweep=(64 * MB, (4 * KB, 16 * KB, 64 * KB, 256 * KB, 1 * MB, 16 * MB)),
        pack=(2_000, 256, 64 * KB), gc=(16, (1027, 513)), gci=(2_000, 16, 128),
    ),
    "medium": dict(
        strided=(64, 16 * MB), matmul=8192,
        small=(20_000, 1 * KB, 64 * KB), large=(64, 64 * MB),
        sweep=(256 * MB, (4 * KB, 16 * KB, 64 * KB, 256 * KB, 1 * MB, 4 * MB, 16 * MB, 64 * MB)),
        pack=(20_000, 256, 64 * KB), gc=(64, (4099, 1027)), gci=(10_000, 16, 256),
    ),
    "large": dict(
        strided=(256, 16 * MB), matmul=8192,
        small=(100_000, 1 * KB, 64 * KB), large=(256, 64 * MB),
        sweep=(1024 * MB, (4 * KB, 64 * KB, 1 * MB, 16 * MB, 64 * MB, 256 * MB)),
        pack=(100_000, 256, 64 * KB), gc=(64, (16387, 4099)), gci=(50_000, 16, 256),
    ),
}

#: Copy direction -> (source device kind, destination device kind, bound).
_PAIRS = {
    "h2h": ("cpu", "cpu", "memcpy"),
    "d2h": ("cuda", "cpu", "d2h"),
    "h2d": ("cpu", "cuda", "h2d"),
}

_GATHER_WORLD = 4


def cases(size: str, device: str) -> list[CaseSpec]:
    """The suite's cases at ``size`` for ``device`` (``cpu`` or ``cuda``)."""
    p = _SIZES[size]
    pairs = ["h2h"] if device == "cpu" else ["d2h", "h2d"]
    out: list[CaseSpec] = []
    for pair in pairs:
        bound = _PAIRS[pair][2]
        count, lo, hi = p["small"]
        out.append(CaseSpec(
            "ops", f"batched_copy_ {count}x{fmt_bytes(lo)}-{fmt_bytes(hi)} {pair}", bound=bound,
            params=dict(kind="copy", pair=pair, count=count, lo=lo, hi=hi),
        ))
        count, nbytes = p["large"]
        out.append(CaseSpec(
            "ops", f"batched_copy_ {count}x{fmt_bytes(nbytes)} {pair}", bound=bound,
            params=dict(kind="copy", pair=pair, count=count, lo=nbytes, hi=nbytes),
        ))
        total, sizes = p["sweep"]
        for each in sizes:
            out.append(CaseSpec(
                "ops", f"batched_copy_ sweep {total // each}x{fmt_bytes(each)} {pair}",
                bound=bound,
                params=dict(kind="copy", pair=pair, count=total // each, lo=each, hi=each),
                plot=dict(
                    group=f"batched_copy_ {pair}, {fmt_bytes(total)} in total",
                    xlabel="bytes per tensor", x=each,
                ),
            ))
    if device == "cuda":
        out += _slow_path_cases(p)
    bound = "memcpy" if device == "cpu" else "d2d"
    count, lo, hi = p["pack"]
    for op in ("pack", "unpack"):
        out.append(CaseSpec(
            "ops", f"{op} {count}x{fmt_bytes(lo)}-{fmt_bytes(hi)} mixed dtypes", bound=bound,
            params=dict(kind=op, count=count, lo=lo, hi=hi),
        ))
    count, shape = p["gc"]
    for dim in (0, 1):
        out.append(CaseSpec(
            "ops", f"gather_concat {count}x{shape[0]}x{shape[1]} dim{dim} world{_GATHER_WORLD}",
            bound=bound, params=dict(kind="gather_concat", count=count, shape=list(shape), dim=dim),
        ))
    count, lo, hi = p["gci"]
    out.append(CaseSpec(
        "ops", f"gather_concat_into {count} tensors world{_GATHER_WORLD}", bound=bound,
        params=dict(kind="gather_concat_into", count=count, lo=lo, hi=hi),
    ))
    return out


def _slow_path_cases(p: dict) -> list[CaseSpec]:
    count, nbytes = p["strided"]
    small, lo, hi = p["small"]
    label = f"{small}x{fmt_bytes(lo)}-{fmt_bytes(hi)}"
    return [
        CaseSpec("ops", f"batched_copy_ {count}x{fmt_bytes(nbytes)} transposed d2h pinned",
                 bound="d2h", params=dict(kind="copy_strided", count=count, bytes=nbytes)),
        CaseSpec("ops", f"batched_copy_ {label} d2h pageable", bound="d2h",
                 params=dict(kind="copy", pair="d2h", count=small, lo=lo, hi=hi,
                             pageable=True)),
        CaseSpec("ops", f"batched_copy_ {label} d2h beside a {p['matmul']}^2 matmul",
                 params=dict(kind="copy_beside_matmul", count=small, lo=lo, hi=hi,
                             n=p["matmul"])),
    ]


def run(spec: CaseSpec, ctx: Ctx) -> None:
    """Builds the case's inputs and measures every implementation."""
    kind = spec.params["kind"]
    runner = {
        "copy": _run_copy, "copy_strided": _run_copy_strided,
        "copy_beside_matmul": _run_copy_beside_matmul, "pack": _run_pack,
        "unpack": _run_unpack, "gather_concat": _run_gather_concat,
        "gather_concat_into": _run_gather_concat_into,
    }.get(kind)
    if runner is None:
        raise ValueError(f"ops: unknown case kind {kind!r}")
    runner(spec, ctx)


def _sdict_op(ctx: Ctx, name: str):
    """The op, or the reason it cannot run on this case's device."""
    fn, why = load_sdict("ops", name)
    if fn is None:
        return None, why
    from sdict_ext import ops

    if not ops.is_compiled():
        return None, "sdict_ext._C is not built (run `make build`)"
    if ctx.device.type == "cuda" and not ops.has_cuda():
        return None, "sdict_ext was built without its CUDA kernels"
    return fn, None


def _run_copy(spec: CaseSpec, ctx: Ctx) -> None:
    p = spec.params
    src_kind, dst_kind, _ = _PAIRS[p["pair"]]
    src_dev = ctx.device if src_kind == "cuda" else torch.device("cpu")
    dst_dev = ctx.device if dst_kind == "cuda" else torch.device("cpu")
    specs = random_numels(p["count"], p["lo"], p["hi"], DTYPE_MIX, seed=1)
    # Host memory on the far side of a device copy is pinned: pageable memory makes a
    # "non-blocking" copy synchronous and measures the staging buffer, not the copy
    # (which the pageable case measures on purpose).
    pin = p["pair"] != "h2h" and not p.get("pageable", False)
    srcs = make_tensors(specs, src_dev, pin=pin and src_kind == "cpu", seed=2)
    dsts = make_tensors(specs, dst_dev, pin=pin and dst_kind == "cpu", fill=False)
    nbytes, n = total_bytes(srcs), len(srcs)
    nb = p["pair"] != "h2h"

    ctx.measure("torch copy_ per tensor", ROLE_TORCH, _per_tensor_copy(dsts, srcs, nb),
                nbytes=nbytes, tensors=n)
    ctx.measure(
        "torch._foreach_copy_", ROLE_TORCH,
        lambda: torch._foreach_copy_(dsts, srcs, non_blocking=nb), nbytes=nbytes, tensors=n,
    )
    call, verify = _measure_batched_copy(ctx, dsts, srcs, nb, nbytes, n)
    if call is not None and ctx.device.type == "cuda" and pin:
        _measure_routes(ctx, call, verify, nbytes, n)


def _per_tensor_copy(dsts: list[torch.Tensor], srcs: list[torch.Tensor], non_blocking: bool):
    """torch's baseline for a batch of copies: one ``copy_`` per pair."""

    def per_tensor():
        for d, s in zip(dsts, srcs, strict=True):
            d.copy_(s, non_blocking=non_blocking)

    return per_tensor


def _measure_batched_copy(
    ctx: Ctx, dsts: list[torch.Tensor], srcs: list[torch.Tensor], non_blocking: bool,
    nbytes: int, n: int,
):
    """Measures ``sdict_ext.batched_copy_(dsts, srcs)``, checked bit-exact against srcs.

    Returns the call and its check, for variants of the same copy, or ``(None, None)``
    where the op cannot run here (the row then says why).
    """
    fn, why = _sdict_op(ctx, "batched_copy_")
    if fn is None:
        ctx.measure("sdict_ext.batched_copy_", ROLE_SDICT, None, nbytes=nbytes, tensors=n,
                    missing=why)
        return None, None

    def call():
        fn(dsts, srcs, non_blocking=non_blocking)

    def verify() -> bool:
        # Zeroed first, so a copy that wrote nothing fails.
        for d in dsts:
            d.zero_()
        call()
        ctx.sync()
        return all(torch.equal(d.cpu(), s.cpu()) for d, s in zip(dsts, srcs, strict=True))

    ctx.measure("sdict_ext.batched_copy_", ROLE_SDICT, call, nbytes=nbytes, tensors=n,
                verify=verify)
    return call, verify


def _measure_at_threshold(ctx: Ctx, label: str, limit: int, call, verify, nbytes: int,
                          n: int) -> None:
    """Measures ``call`` with both mapped-memory routing thresholds set to ``limit``."""
    from sdict_ext.ops import copy_thresholds

    before = copy_thresholds(limit, limit)
    try:
        ctx.measure(f"sdict_ext.batched_copy_ ({label})", ROLE_VARIANT, call,
                    nbytes=nbytes, tensors=n, verify=verify)
    finally:
        copy_thresholds(*before)


def _run_copy_strided(spec: CaseSpec, ctx: Ctx) -> None:
    """Transposed float32 device tensors into contiguous pinned memory."""
    p = spec.params
    side = int((p["bytes"] // 4) ** 0.5)
    gen = torch.Generator().manual_seed(7)
    srcs = [torch.rand(side, side, generator=gen).to(ctx.device).t() for _ in range(p["count"])]
    dsts = [torch.empty(side, side, pin_memory=True) for _ in srcs]
    nbytes, n = total_bytes(srcs), len(srcs)

    ctx.measure("torch copy_ per tensor", ROLE_TORCH, _per_tensor_copy(dsts, srcs, True),
                nbytes=nbytes, tensors=n)
    call, verify = _measure_batched_copy(ctx, dsts, srcs, True, nbytes, n)
    if call is None:
        return
    # Thresholds out of reach: every strided copy read element by element over PCIe
    # by the kernel, as before the device-side gather.
    _measure_at_threshold(ctx, "kernel over PCIe", 1 << 62, call, verify, nbytes, n)


def _run_copy_beside_matmul(spec: CaseSpec, ctx: Ctx) -> None:
    """Small device->pinned copies while a matrix product runs on another stream: how
    much the copy slows the product down (the kernel's grid is capped for PCIe)."""
    p = spec.params
    specs = random_numels(p["count"], p["lo"], p["hi"], DTYPE_MIX, seed=8)
    srcs = make_tensors(specs, ctx.device, seed=9)
    dsts = make_tensors(specs, torch.device("cpu"), pin=True, fill=False)
    nbytes, n = total_bytes(srcs), len(srcs)
    a = torch.randn(p["n"], p["n"], device=ctx.device, dtype=torch.bfloat16)
    compute = torch.cuda.Stream(ctx.device)

    def beside(copy):
        def run_both():
            compute.wait_stream(torch.cuda.current_stream(ctx.device))
            with torch.cuda.stream(compute):
                for _ in range(8):
                    a @ a
            if copy is not None:
                copy()
            compute.synchronize()
        return run_both

    ctx.measure("matmul alone", ROLE_VARIANT, beside(None), nbytes=nbytes, tensors=n)
    ctx.measure("matmul + torch copy_ per tensor", ROLE_TORCH,
                beside(_per_tensor_copy(dsts, srcs, True)),
                nbytes=nbytes, tensors=n)
    fn, why = _sdict_op(ctx, "batched_copy_")
    ctx.measure("matmul + sdict_ext.batched_copy_", ROLE_SDICT,
                beside(lambda: fn(dsts, srcs, non_blocking=True)) if fn else None,
                nbytes=nbytes, tensors=n, missing=why)


def _measure_routes(ctx: Ctx, call, verify, nbytes: int, n: int) -> None:
    """The same copy with every dense host<->device pair forced onto one CUDA route.

    Where the kernel's and the copy engines' rows cross along the sweep is where the
    mapped-memory thresholds (sdict_ext/tuning.h, ``ops.copy_thresholds``) belong.
    """
    side = torch.cuda.Stream(ctx.device)

    def on_side_stream():
        # The legacy default stream rules out cudaMemcpyBatchAsync; a side stream (as
        # PinnedStager uses) gets one batched command for all engine copies.
        side.wait_stream(torch.cuda.current_stream(ctx.device))
        with torch.cuda.stream(side):
            call()
        side.synchronize()

    variants = (
        ("mapped kernel only", 1 << 62, call),
        ("copy engines only", 0, call),
        ("copy engines only, side stream", 0, on_side_stream),
    )
    for label, limit, fn in variants:
        _measure_at_threshold(ctx, label, limit, fn, verify, nbytes, n)


def _packed_inputs(spec: CaseSpec, ctx: Ctx) -> list[torch.Tensor]:
    p = spec.params
    specs = random_numels(p["count"], p["lo"], p["hi"], DTYPE_MIX, seed=3)
    return make_tensors(specs, ctx.device, seed=4)


def _torch_pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).view(torch.uint8) for t in tensors])


def _expected_pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """pack's result built with torch: each tensor's bytes at its slot, zeros elsewhere."""
    from sdict_ext.ops import pack_layout

    offsets, total = pack_layout(tensors)
    ref = torch.zeros(total, dtype=torch.uint8, device=tensors[0].device)
    for o, t in zip(offsets, tensors, strict=True):
        ref[o : o + t.numel() * t.element_size()] = t.reshape(-1).view(torch.uint8)
    return ref


def _run_pack(spec: CaseSpec, ctx: Ctx) -> None:
    tensors = _packed_inputs(spec, ctx)
    nbytes, n = total_bytes(tensors), len(tensors)
    ctx.measure(
        "torch.cat of byte views", ROLE_TORCH, lambda: _torch_pack(tensors),
        nbytes=nbytes, tensors=n,
    )
    fn, why = _sdict_op(ctx, "pack")
    if fn is None:
        ctx.measure("sdict_ext.pack", ROLE_SDICT, None, nbytes=nbytes, tensors=n, missing=why)
        return
    # Exact bytes, the zeroed alignment gaps included, whatever the memory held before.
    expected = _expected_pack(tensors)
    ctx.measure(
        "sdict_ext.pack", ROLE_SDICT, lambda: fn(tensors), nbytes=nbytes, tensors=n,
        verify=lambda: torch.equal(fn(tensors), expected),
    )
    # Into one reused buffer (as the broadcast and gather buckets are): no page faults
    # of a fresh allocation, so this row shows the kernel itself.
    out = torch.empty_like(expected)
    ctx.measure(
        "sdict_ext.pack (into a reused out)", ROLE_VARIANT, lambda: fn(tensors, out),
        nbytes=nbytes, tensors=n,
        verify=lambda: torch.equal(fn(tensors, out.fill_(0xFF)), expected),
    )


def _run_unpack(spec: CaseSpec, ctx: Ctx) -> None:
    tensors = _packed_inputs(spec, ctx)
    nbytes, n = total_bytes(tensors), len(tensors)
    fn, why = _sdict_op(ctx, "unpack")
    pack, _ = _sdict_op(ctx, "pack")
    if pack is None:
        ctx.skip("torch._foreach_copy_ from views", ROLE_TORCH, why or "sdict_ext.pack missing")
        ctx.skip("sdict_ext.unpack", ROLE_SDICT, why or "sdict_ext.pack missing")
        return
    from sdict_ext.ops import pack_layout

    # Both sides read the same packed layout, so they do the same work.
    flat = pack(tensors)
    offsets, _ = pack_layout(tensors)
    dsts = [torch.empty_like(t) for t in tensors]

    def torch_unpack():
        views = [
            flat[o : o + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
            for o, t in zip(offsets, dsts, strict=True)
        ]
        torch._foreach_copy_(dsts, views)

    ctx.measure(
        "torch._foreach_copy_ from views", ROLE_TORCH, torch_unpack, nbytes=nbytes, tensors=n
    )

    def verify() -> bool:
        for d in dsts:
            d.zero_()
        fn(flat, dsts)
        ctx.sync()
        return all(torch.equal(d, t) for d, t in zip(dsts, tensors, strict=True))

    ctx.measure(
        "sdict_ext.unpack", ROLE_SDICT, (lambda: fn(flat, dsts)) if fn else None,
        nbytes=nbytes, tensors=n, missing=why, verify=verify if fn else None,
    )


def _chunk_lengths(length: int, world: int) -> list[int]:
    """Per-rank lengths along the shard dim under ``torch.chunk`` (trailing ranks may be 0)."""
    step = -(-length // world)
    return [max(0, min(step, length - r * step)) for r in range(world)]


def _run_gather_concat(spec: CaseSpec, ctx: Ctx) -> None:
    p = spec.params
    world, dim, shape = _GATHER_WORLD, p["dim"], tuple(p["shape"])
    lengths = _chunk_lengths(shape[dim], world)
    other = shape[1 - dim]
    chunk_numel = lengths[0] * other
    gen = torch.Generator().manual_seed(5)
    buffers = [
        torch.empty(world * chunk_numel).uniform_(generator=gen).to(ctx.device)
        for _ in range(p["count"])
    ]
    shard_shapes = [(n, other) if dim == 0 else (other, n) for n in lengths]
    nbytes = p["count"] * shape[0] * shape[1] * 4

    def torch_rebuild(buf):
        parts = [
            buf[r * chunk_numel : r * chunk_numel + lengths[r] * other].view(shard_shapes[r])
            for r in range(world)
            if lengths[r]
        ]
        return torch.cat(parts, dim=dim)

    ctx.measure(
        "torch.cat of shard views", ROLE_TORCH, lambda: [torch_rebuild(b) for b in buffers],
        nbytes=nbytes, tensors=p["count"],
    )
    fn, why = _sdict_op(ctx, "gather_concat")

    def verify() -> bool:
        return all(
            torch.equal(fn(b, chunk_numel, world, shape, dim), torch_rebuild(b)) for b in buffers
        )

    ctx.measure(
        "sdict_ext.gather_concat", ROLE_SDICT,
        (lambda: [fn(b, chunk_numel, world, shape, dim) for b in buffers]) if fn else None,
        nbytes=nbytes, tensors=p["count"], missing=why, verify=verify if fn else None,
    )


def _run_gather_concat_into(spec: CaseSpec, ctx: Ctx) -> None:
    p = spec.params
    world = _GATHER_WORLD
    gen = torch.Generator().manual_seed(6)
    shapes, dims = [], []
    for j in range(p["count"]):
        rows = int(torch.randint(p["lo"], p["hi"] + 1, (1,), generator=gen))
        cols = int(torch.randint(p["lo"], p["hi"] + 1, (1,), generator=gen))
        shapes.append((rows, cols))
        dims.append(j % 2)
    # Every rank's chunk holds each tensor's shard densely at a 16-byte aligned offset,
    # sized for the largest shard (rank 0's), as a coalesced all-gather would lay it out.
    offsets, cursor = [], 0
    for shape, dim in zip(shapes, dims, strict=True):
        cursor = (cursor + 15) // 16 * 16
        offsets.append(cursor)
        cursor += _chunk_lengths(shape[dim], world)[0] * shape[1 - dim] * 4
    chunk_bytes = (cursor + 15) // 16 * 16
    gathered = torch.randint(0, 256, (world * chunk_bytes,), dtype=torch.uint8, generator=gen)
    gathered = gathered.to(ctx.device)
    # int32, because random bytes read as floats include NaNs, which never compare equal.
    outs = [torch.empty(s, dtype=torch.int32, device=ctx.device) for s in shapes]
    refs = [torch.empty(s, dtype=torch.int32, device=ctx.device) for s in shapes]
    nbytes = total_bytes(outs)

    def torch_rebuild(dst):
        for out, shape, dim, off in zip(dst, shapes, dims, offsets, strict=True):
            other = shape[1 - dim]
            parts = []
            for r, n in enumerate(_chunk_lengths(shape[dim], world)):
                if n:
                    start = r * chunk_bytes + off
                    view = gathered[start : start + n * other * 4].view(torch.int32)
                    parts.append(view.view((n, other) if dim == 0 else (other, n)))
            torch.cat(parts, dim=dim, out=out)

    ctx.measure(
        "torch.cat of shard views", ROLE_TORCH, lambda: torch_rebuild(outs),
        nbytes=nbytes, tensors=len(outs),
    )
    fn, why = _sdict_op(ctx, "gather_concat_into")

    def verify() -> bool:
        torch_rebuild(refs)
        fn(gathered, world, offsets, outs, dims)
        ctx.sync()
        return all(torch.equal(a, b) for a, b in zip(outs, refs, strict=True))

    ctx.measure(
        "sdict_ext.gather_concat_into", ROLE_SDICT,
        (lambda: fn(gathered, world, offsets, outs, dims)) if fn else None,
        nbytes=nbytes, tensors=len(outs), missing=why, verify=verify if fn else None,
    )
