"""Typed wrappers over the compiled ``torch.ops.sdict_ext`` kernels.

Every op reduces to "copy these N strided byte layouts", planned and validated in C++
before the first byte moves, so a bad argument never leaves a destination half-written.
CPU kernels always exist; CUDA kernels exist when the extension was built against a
CUDA torch (:func:`has_cuda`). Each op also has a fake kernel, so it traces under
``torch.compile`` and ``FakeTensorMode``.

Streams: CUDA work is enqueued on the current stream of the device involved. With
``non_blocking=False`` the call returns after the copies finished; with
``non_blocking=True`` the data is valid once the current stream reaches this point
(record an event, or synchronize the stream). On CPU every op is synchronous.

Errors: every op checks its arguments before the first byte moves. A refusal of a
request that copying pair by pair (``Tensor.copy_``) would serve but one call of the op
does not is *declined* with ``NotImplementedError`` (a ``RuntimeError`` subclass):
:func:`batched_copy_` pairs whose dtypes or shapes differ, or that are not strided,
pairs that overlap each other (a destination named twice, a destination that is
another pair's source), and tensors on devices one call cannot span (several CUDA
devices, or a device the kernel cannot reach). Nothing was written, so a caller may
split or reduce the call and retry. Every other error (a plain ``RuntimeError``,
``ValueError``, ``torch.AcceleratorError``, ...) is a request no route serves, or a
failure once copies started, and is not to be retried.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType

import torch

from sdict_ext.host.memory import note_async_access

__all__ = [
    "ALIGNMENT",
    "batched_copy_",
    "copy_thresholds",
    "direct_read_available",
    "extension_entry",
    "gather_concat",
    "gather_concat_into",
    "has_cuda",
    "is_compiled",
    "pack",
    "pack_layout",
    "unpack",
]

#: Byte alignment of every slot in a packed buffer: 16 bytes lets CUDA kernels use
#: vector loads and any dtype (complex128 included) be viewed in place.
ALIGNMENT = 16

_BUILD_HINT = (
    "the sdict_ext._C extension is not built; build it with "
    "`pip install --no-build-isolation .` (or `make test`) in the sdict_ext checkout"
)


def _installed_extension() -> str | None:
    """The compiled ``_C`` of another ``sdict_ext`` on ``sys.path`` (an installed build)."""
    here = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))
    for entry in sys.path:
        package = os.path.join(os.path.abspath(entry or os.getcwd()), "sdict_ext")
        if os.path.realpath(package) == here:
            continue
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            candidate = os.path.join(package, "_C" + suffix)
            if os.path.isfile(candidate):
                return candidate
    return None


def _load_extension() -> tuple[ModuleType | None, ImportError | None]:
    """Import ``sdict_ext._C`` (which registers the ops); ``(module, None)`` or ``(None, why)``.

    A checkout imported from its own directory (``python -m bench`` run there after
    ``pip install --no-build-isolation .``) has no in-place build, but the installed
    copy's extension holds the same ops: use it, and say so, rather than fail every op.
    An in-place build that exists but does not load is never replaced: that error shows.
    """
    try:
        return importlib.import_module("sdict_ext._C"), None
    except ModuleNotFoundError as exc:
        if exc.name != "sdict_ext._C":
            return None, exc
        error = exc
    except ImportError as exc:
        return None, exc
    path = _installed_extension()
    if path is None:
        return None, error
    spec = importlib.util.spec_from_file_location("sdict_ext._C", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:
        return None, ImportError(f"{error}; the installed build at {path} does not load: {exc}")
    sys.modules["sdict_ext._C"] = module
    warnings.warn(
        f"sdict_ext is imported from {os.path.dirname(os.path.abspath(__file__))}, which has no "
        f"compiled extension; using the installed build's kernels ({path}). To run this "
        "checkout's own C++ (after changing csrc/), build it in place: `make build`, or "
        "`python setup.py build_ext --inplace`.",
        RuntimeWarning,
        stacklevel=2,
    )
    return module, None


_C, _IMPORT_ERROR = _load_extension()


def is_compiled() -> bool:
    """Whether the compiled extension (and so every op) is available."""
    return _IMPORT_ERROR is None


def has_cuda() -> bool:
    """Whether the extension was built with its CUDA kernels."""
    return is_compiled() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "sdict_ext::batched_copy_", "CUDA"
    )


def _extension():
    """The compiled ``sdict_ext._C`` module; an ImportError naming the build when absent."""
    if _IMPORT_ERROR is not None:
        raise ImportError(f"{_BUILD_HINT} (import failed: {_IMPORT_ERROR})")
    return _C


def extension_entry(name: str):
    """The compiled extension's direct Python entry point ``name`` (a binding of
    csrc/python/, not a torch op), or None where the extension is not built or
    predates it: callers then take their Python path."""
    return getattr(_C, name, None) if _IMPORT_ERROR is None else None


def direct_read_available() -> bool:
    """Whether this build can read another process's tensors in place.

    The direct read (broadcast's direct route) is Linux's ``process_vm_readv``; a build
    elsewhere (macOS) compiles without it and its entry points raise
    ``NotImplementedError``, so a caller asks here before choosing that route. False
    where the extension is not built. Whether the kernel lets this process read a given
    peer (ptrace rules) is found only by trying.
    """
    query = extension_entry("direct_read_available")
    return query is not None and bool(query())


def _ops():
    _extension()
    return torch.ops.sdict_ext


def copy_thresholds(
    mapped_d2h_max_bytes: int | None = None, mapped_h2d_max_bytes: int | None = None
) -> tuple[int, int]:
    """The CUDA copy routing thresholds, optionally setting new ones (process-wide).

    Dense device->pinned-host copies under ``mapped_d2h_max_bytes`` (and
    pinned-host->device ones under ``mapped_h2d_max_bytes``) run in the copy kernel
    through mapped pinned memory, one launch for all of them; larger ones go to the
    copy engines. Returns the values in force before the call. For measuring (the
    benchmark's sweep times both routes at each size); results never depend on them.
    """
    return tuple(_extension().copy_thresholds(mapped_d2h_max_bytes, mapped_h2d_max_bytes))


def _round_up(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def pack_layout(
    specs: Sequence[torch.Tensor | tuple[Sequence[int], torch.dtype]],
    alignment: int = ALIGNMENT,
) -> tuple[list[int], int]:
    """Byte offsets of each tensor in a packed buffer, and the buffer's size.

    The layout depends only on shapes and dtypes, so every rank of a broadcast computes
    the same one from metadata without exchanging it.

    Args:
        specs: tensors, or ``(shape, dtype)`` pairs, in packing order.
        alignment: every slot starts at a multiple of this many bytes (a power of two).

    Returns:
        ``(offsets, total_bytes)``.
    """
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"pack_layout: alignment must be a power of two, got {alignment}")
    offsets: list[int] = []
    cursor = 0
    for i, spec in enumerate(specs):
        if isinstance(spec, torch.Tensor):
            nbytes = spec.numel() * spec.element_size()
        elif isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], torch.dtype):
            numel = 1
            for s in spec[0]:
                numel *= int(s)
            nbytes = numel * spec[1].itemsize
        else:
            raise TypeError(
                f"pack_layout: spec {i} must be a tensor or a (shape, dtype) pair, "
                f"got {type(spec).__name__}"
            )
        cursor = _round_up(cursor, alignment)
        offsets.append(cursor)
        cursor += nbytes
    return offsets, _round_up(cursor, alignment)


def batched_copy_(
    dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor], non_blocking: bool = False
) -> None:
    """Copies ``srcs[i]`` into ``dsts[i]`` for every i, in one call.

    Same result as ``d.copy_(s)`` per pair, but planned once and executed as one
    parallel CPU pass or one batched CUDA launch. Pairs must match in dtype and shape
    (no casting, no broadcasting); destinations must be disjoint and must not alias a
    source. A tensor copied onto itself (same memory, sizes and strides) is a no-op,
    as ``t.copy_(t)`` is, but its destination still must not overlap another pair's
    destination or source; a partial overlap of a pair's own two sides is an error.
    Everything is checked before anything is written. Non-contiguous and misaligned
    tensors are copied correctly.

    Raises:
        NotImplementedError: the pairs are declined (nothing written): a pair's dtypes
            or shapes differ, or a tensor is not strided; pairs overlap each other (a
            destination named twice, a destination that is another pair's source); the
            tensors span devices one call cannot (several CUDA devices). Copying pair by
            pair, or one call per device, may serve what this refused.
        RuntimeError: a request no route serves (a destination that overlaps itself, an
            inference tensor written outside inference mode), or a device failure once
            copies started (``torch.AcceleratorError``), which may have written part of
            the destinations.

    Args:
        dsts: destination tensors, written in place.
        srcs: source tensors.
        non_blocking: for device copies, return once the copies are enqueued on the
            current stream instead of waiting for them. Device-to-host copies into
            pageable memory are always synchronous; use pinned destinations.
    """
    dsts, srcs = list(dsts), list(srcs)
    if len(dsts) != len(srcs):
        raise ValueError(
            f"batched_copy_: got {len(dsts)} destinations and {len(srcs)} sources; "
            "pass one source per destination"
        )
    if not dsts:
        return
    ops = _ops()
    # The direct entry point declines anything the dispatcher must see (subclasses,
    # modes, devices, autograd); tracing always goes through the registered op.
    if not copy_if_plain_cpu(dsts, srcs):
        ops.batched_copy_(dsts, srcs, non_blocking)
        if non_blocking:
            # A pinned slab these copies use must outlive them (its finalizer waits).
            note_async_access(dsts, srcs)


def copy_if_plain_cpu(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> bool:
    """``batched_copy_(dsts, srcs)`` when every item is a plain CPU tensor; else False.

    For callers that hold lists which may contain anything (a state dict's values): the
    C++ entry point looks at each item once, declines (False, nothing written) on the
    first that is not a plain CPU tensor the dispatcher would pass through unchanged,
    and raises for a bad pair of plain tensors (nothing written) what
    :func:`batched_copy_` raises: ``NotImplementedError`` where it declines,
    ``RuntimeError`` otherwise.
    """
    if _IMPORT_ERROR is not None or torch.compiler.is_compiling():
        return False
    if len(dsts) != len(srcs):
        return False
    return bool(_C.batched_copy_cpu_fast(dsts, srcs))


def carve_views(
    slab: torch.Tensor,
    dtypes: list[torch.dtype],
    shapes: list[tuple[int, ...]],
    strides: list[tuple[int, ...]],
    offsets: list[int],
) -> list[torch.Tensor]:
    """Tensors sharing ``slab``'s storage: tensor i has ``dtypes[i]``, ``shapes[i]``,
    ``strides[i]`` and starts ``offsets[i]`` elements (of its dtype) into the storage.

    The same tensors as ``slab.view(dtype).as_strided(shape, stride, offset)``, but
    independent (no autograd view of the slab) and made in one C++ call. Raises before
    making any when a spec reaches past the storage.
    """
    return _extension().carve_views(slab, dtypes, shapes, strides, offsets)


def box_views(
    tensors: Sequence[torch.Tensor],
    starts: Sequence[tuple[int, ...]],
    shapes: Sequence[tuple[int, ...]],
) -> list[torch.Tensor]:
    """``tensors[i]``'s box of ``shapes[i]`` elements starting at index ``starts[i]``
    (one entry per dim), as a tensor sharing its storage.

    The same tensors as chained ``narrow`` calls, but independent (no autograd view)
    and made in one C++ call, without a Python-level view per dim and tensor. A box
    that is the whole tensor is the tensor itself. Subclasses and conjugate / negative
    views are narrowed in Python. Raises before making any when a box leaves its tensor.
    """
    tensors, starts, shapes = list(tensors), [tuple(s) for s in starts], [tuple(s) for s in shapes]
    made = getattr(_extension(), "box_views", None)
    views = made(tensors, starts, shapes) if made is not None and tensors else None
    if views is not None:
        return views
    out = []
    for i, (t, start, shape) in enumerate(zip(tensors, starts, shapes)):
        if len(start) != t.dim() or len(shape) != t.dim() or any(
            lo < 0 or n < 0 or lo + n > size for lo, n, size in zip(start, shape, t.shape)
        ):
            raise RuntimeError(
                f"sdict_ext.box_views: the box of tensor {i} (start {start}, size {shape}) "
                f"does not fit its tensor of shape {tuple(t.shape)}"
            )
    for t, start, shape in zip(tensors, starts, shapes):
        for d, (lo, n) in enumerate(zip(start, shape)):
            if n != t.shape[d]:
                t = t.narrow(d, lo, n)
        out.append(t)
    return out


def pack(
    tensors: Sequence[torch.Tensor],
    out: torch.Tensor | None = None,
    *,
    offsets: Sequence[int] | None = None,
    alignment: int = ALIGNMENT,
) -> torch.Tensor:
    """Packs tensors byte-exactly into one flat uint8 buffer.

    Equivalent to ``torch.cat([t.reshape(-1).view(torch.uint8) for t in tensors])``
    except that each slot starts at an aligned offset (:func:`pack_layout`), any dtype
    mix is allowed and non-contiguous tensors are read in place. Every byte of the
    buffer outside the slots (alignment gaps, the tail, all of a larger ``out``) is set
    to zero, so the result depends only on the tensors, never on what the memory held
    before: a broadcast of it ships no stale bytes. Only those bytes are written, not
    the whole buffer twice.

    Args:
        tensors: tensors to pack, in order.
        out: optional 1-D uint8 buffer of at least the layout's size; allocated on the
            first tensor's device when omitted. No tensor may overlap it.
        offsets: slot offsets; default :func:`pack_layout` of ``tensors``.
        alignment: slot alignment used when ``offsets`` is omitted.

    Returns:
        The packed buffer (``out`` when given).
    """
    tensors = list(tensors)
    if offsets is None:
        offsets, total = pack_layout(tensors, alignment)
    else:
        offsets = list(offsets)
        total = max(
            (o + t.numel() * t.element_size() for o, t in zip(offsets, tensors)), default=0
        )
    if out is None:
        device = tensors[0].device if tensors else torch.device("cpu")
        out = torch.empty(total, dtype=torch.uint8, device=device)
    if tensors:
        _ops().pack_into(tensors, offsets, out)
    return out


def unpack(
    flat: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    offsets: Sequence[int] | None = None,
    full_shapes: Sequence[Sequence[int]] | None = None,
    starts: Sequence[Sequence[int]] | None = None,
    alignment: int = ALIGNMENT,
) -> None:
    """Writes the packed contents of ``flat`` into ``tensors``, the inverse of :func:`pack`.

    With ``full_shapes`` and ``starts``, slot i holds a tensor of shape
    ``full_shapes[i]`` and ``tensors[i]`` receives only its box starting at
    ``starts[i]`` (e.g. the rows / columns a rank owns), so a rank never materialises
    the full tensor.

    Args:
        flat: 1-D uint8 packed buffer.
        tensors: destinations, written in place.
        offsets: slot offsets; default :func:`pack_layout` of the packed shapes.
        full_shapes: shape of each packed tensor when destinations are boxes of it.
        starts: where each destination's box starts in its packed tensor.
        alignment: slot alignment used when ``offsets`` is omitted.
    """
    tensors = list(tensors)
    if (full_shapes is None) != (starts is None):
        raise ValueError("unpack: full_shapes and starts go together; pass both or neither")
    flat_full: list[int] | None = None
    flat_starts: list[int] | None = None
    if full_shapes is not None:
        if len(full_shapes) != len(tensors) or len(starts) != len(tensors):
            raise ValueError(
                f"unpack: got {len(tensors)} destinations, {len(full_shapes)} full_shapes "
                f"and {len(starts)} starts"
            )
        flat_full = [int(s) for shape in full_shapes for s in shape]
        flat_starts = [int(s) for st in starts for s in st]
    if offsets is None:
        shapes = full_shapes if full_shapes is not None else [t.shape for t in tensors]
        offsets, _ = pack_layout(
            [(tuple(s), t.dtype) for s, t in zip(shapes, tensors)], alignment
        )
    if tensors:
        _ops().unpack(flat, list(offsets), tensors, flat_full, flat_starts)


def gather_concat(
    gathered: torch.Tensor,
    chunk_numel: int,
    world_size: int,
    size: Sequence[int],
    shard_dim: int,
) -> torch.Tensor:
    """Rebuilds a full tensor from an all-gathered buffer of padded shards.

    ``gathered`` is 1-D with ``world_size`` chunks of ``chunk_numel`` elements; chunk r
    starts with rank r's shard, ``torch.chunk(full, world_size, shard_dim)[r]`` stored
    contiguously (empty for trailing ranks when the split is uneven). Equivalent to
    ``torch.cat([chunk[:n_r].view(shape_r) for r ...], shard_dim)`` without the temporaries.

    Returns:
        A new contiguous tensor of ``size``, dtype and device of ``gathered``.
    """
    return _ops().gather_concat(gathered, chunk_numel, world_size, list(size), shard_dim)


def gather_concat_into(
    gathered: torch.Tensor,
    world_size: int,
    offsets: Sequence[int],
    outs: Sequence[torch.Tensor],
    shard_dims: Sequence[int],
) -> None:
    """Rebuilds many tensors from one coalesced all-gather buffer, in one call.

    ``gathered`` is a 1-D uint8 buffer of ``world_size`` equal chunks (what
    ``all_gather_into_tensor`` returns for one packed buffer per rank). In every rank's
    chunk, the shard of ``outs[j]`` along ``shard_dims[j]`` (torch.chunk semantics) is
    stored densely at byte ``offsets[j]``.
    """
    outs = list(outs)
    if outs:
        _ops().gather_concat_into(gathered, world_size, list(offsets), outs, list(shard_dims))


def _reject_meta_mixed_with_real(name: str, args) -> None:
    # The dispatcher sends a call that mixes meta and real tensors to the fake kernel,
    # which would silently copy nothing into the real ones.
    devices = {
        t.device.type
        for a in args
        for t in (a if isinstance(a, (list, tuple)) else [a])
        if isinstance(t, torch.Tensor)
    }
    if "meta" in devices and len(devices) > 1:
        raise ValueError(
            f"sdict_ext.{name}: meta tensors mixed with real ones ({sorted(devices)}); "
            "a meta tensor has no data to copy: materialize it (e.g. to_empty) first"
        )


def _register_fakes() -> None:
    # Mutating ops have nothing to compute on fake tensors; gather_concat allocates.
    for name in ("batched_copy_", "pack_into", "unpack", "gather_concat_into"):
        torch.library.register_fake(f"sdict_ext::{name}")(
            lambda *args, _name=name: _reject_meta_mixed_with_real(_name, args)
        )

    @torch.library.register_fake("sdict_ext::gather_concat")
    def _(gathered, chunk_numel, world_size, size, shard_dim):
        return gathered.new_empty(size)


if _IMPORT_ERROR is None:
    _register_fakes()
