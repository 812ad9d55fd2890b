"""State-dict utilities: the counterpart of ``torch.distributed._state_dict_utils``.

Same signatures and results as PyTorch's underscore functions, built on one traversal
(:mod:`sdict_ext.tree`) and batched ops instead of Python work and a collective per
tensor:

* copies and offloads are one :func:`sdict_ext.ops.batched_copy_` call (one per
  device pair only when the pairs span several CUDA devices), and state dicts of
  plain tensors and values take a fast path with bulk work per dict level
  (:func:`sdict_ext.tree.pair_tensors`) instead of Python work per tensor;
* :func:`create_cpu_state_dict` carves every tensor out of one host slab (one
  allocation, one pin registration, one shared-memory segment);
* :func:`gather_state_dict` and :func:`broadcast_state_dict` move packed slices (half
  a bucket, 8 MiB at most), one asynchronous bulk collective per slice, pipelined with
  the packing and unpacking (see :mod:`sdict_ext.collectives`).

Where PyTorch's behaviour is a trap we differ, and the docstring says so: structure,
dtype and shape mismatches raise :class:`CompanionMismatch` naming the key path before
anything is written; :func:`check_state_dict_similarity` never writes; a failure on one
rank of a collective function is raised on every rank instead of leaving them waiting.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from operator import attrgetter
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor

from sdict_ext import ops
from sdict_ext.collectives.broadcast.main import broadcast_state_dict
from sdict_ext.collectives.distribute import distribute_state_dict
from sdict_ext.collectives.gather import gather_state_dict
from sdict_ext.collectives.reshard import last_reshard_stats, reshard_state_dict
from sdict_ext.host.copies import batched_copy_pairs, offload_leaves
from sdict_ext.host.slab import carve
from sdict_ext.tree import (
    LEAF_DTENSOR,
    LEAF_OTHER,
    LEAF_SHARDED,
    LEAF_TENSOR,
    CompanionMismatch,
    Flat,
    NotPlain,
    flatten,
    format_path,
    leaf_kind,
    pair_tensors,
    plain_tensors,
    rebuild_plain,
)

__all__ = [
    "CompanionMismatch",
    "broadcast_state_dict",
    "check_state_dict_similarity",
    "copy_state_dict",
    "create_cpu_state_dict",
    "distribute_state_dict",
    "flatten_state_dict",
    "gather_state_dict",
    "iterate_state_dict",
    "last_reshard_stats",
    "offload_state_dict_to_cpu",
    "reshard_state_dict",
    "traverse_state_dict",
    "unflatten_state_dict",
]

_CPU = torch.device("cpu")
_NO_ELEMENTS = torch.Size((0,))
_SHAPE = attrgetter("shape")
_DTYPE = attrgetter("dtype")
_IS_META = attrgetter("is_meta")
_IS_CPU = attrgetter("is_cpu")
_LAYOUT = attrgetter("layout")
_STRIDED_ONLY = {torch.strided}

PathItem = str | int
ObjPath = tuple[PathItem, ...]


def _outside_ranks_only(ranks_only: tuple[int, ...], pg: dist.ProcessGroup | None) -> bool:
    return bool(ranks_only) and dist.get_rank(pg) not in ranks_only


def _empty_result(flat: Flat) -> Any:
    # What PyTorch returns on ranks outside ``ranks_only``: {} for a dict root, else None.
    return {} if flat.top_is_dict else None


def _copy_value(value: Any, kind: int) -> Any:
    # Unsupported leaves (accepted with type_check=False) are deep-copied, as PyTorch does.
    return copy.deepcopy(value) if kind == LEAF_OTHER else value


def _leaf_values(flat: Flat) -> list[Any]:
    """The leaves as the result starts out: as they are, unsupported ones deep-copied."""
    out = list(flat.leaves)
    if LEAF_OTHER in flat.kinds:
        for i, kind in enumerate(flat.kinds):
            if kind == LEAF_OTHER:
                out[i] = copy.deepcopy(out[i])
    return out


def _local_pairs(
    src: Any, dst: Any, path: tuple[Any, ...]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The (destination, source) plain tensors that copying ``src`` into ``dst`` writes.

    Raises CompanionMismatch, naming ``path``, when the two cannot be copied without
    casting, broadcasting or guessing.
    """
    where = f"at key path {format_path(path)!r}"
    src_kind, dst_kind = leaf_kind(src), leaf_kind(dst)
    if dst_kind != src_kind:
        names = {
            LEAF_TENSOR: "a tensor",
            LEAF_DTENSOR: "a DTensor",
            LEAF_SHARDED: "a ShardedTensor",
        }
        raise CompanionMismatch(
            f"{where}: the source is {names[src_kind]}, the destination "
            f"{names.get(dst_kind, 'a ' + type(dst).__name__)}"
        )
    if src_kind == LEAF_DTENSOR:
        if src.shape != dst.shape:
            raise CompanionMismatch(
                f"{where}: DTensor shapes differ: source {tuple(src.shape)}, "
                f"destination {tuple(dst.shape)}"
            )
        pairs = [(dst._local_tensor, src._local_tensor)]
    elif src_kind == LEAF_SHARDED:
        src_shards, dst_shards = src.local_shards(), dst.local_shards()
        if len(src_shards) != len(dst_shards):
            raise CompanionMismatch(
                f"{where}: the source has {len(src_shards)} local shards, the destination "
                f"{len(dst_shards)}"
            )
        pairs = [(d.tensor, s.tensor) for d, s in zip(dst_shards, src_shards)]
    else:
        pairs = [(dst, src)]
    for d, s in pairs:
        if d.dtype != s.dtype:
            raise CompanionMismatch(
                f"{where}: dtypes differ: source {s.dtype}, destination {d.dtype} "
                "(copy_state_dict does not cast)"
            )
        if d.shape != s.shape:
            raise CompanionMismatch(
                f"{where}: shapes differ: source {tuple(s.shape)}, destination "
                f"{tuple(d.shape)}"
            )
    return [d for d, _ in pairs], [s for _, s in pairs]


def iterate_state_dict(
    iter_object: Any,
    sharded_tensor_func: Callable,
    dtensor_func: Callable,
    tensor_func: Callable,
    *,
    pg: dist.ProcessGroup | None = None,
    device: torch.device | None = None,
    cpu_offload: bool = False,
    companion_obj: Any = None,
    ranks_only: tuple[int, ...] = (),
    type_check: bool = True,
    non_blocking: bool = True,
) -> Any:
    """Applies a function per tensor kind to every tensor leaf, then offloads or copies.

    Counterpart of ``_iterate_state_dict``: each ``*_func(value, pg, device,
    companion)`` is called on its leaves in traversal order; its tensor results are
    then offloaded to the CPU (``cpu_offload`` without a companion) or copied into the
    companion's tensors, both batched. Non-tensor leaves are returned as they are
    (deep-copied when ``type_check=False`` let an unsupported type through).

    Differences from PyTorch: the companion's structure is checked before any
    function runs (PyTorch may have run collectives for earlier leaves when it
    finds a mismatch), and a leaf whose companion cannot receive it raises
    :class:`CompanionMismatch` naming the key path (PyTorch raises ``AssertionError``
    or ``AttributeError``, or casts silently).

    Args:
        iter_object: the state dict.
        sharded_tensor_func: applied to ShardedTensor leaves.
        dtensor_func: applied to DTensor leaves.
        tensor_func: applied to plain tensor leaves.
        pg: passed to the functions; also the group of ``ranks_only``.
        device: passed to the functions.
        cpu_offload: move tensor results to the CPU (ignored with a companion).
        companion_obj: a state dict of the same structure to copy results into.
        ranks_only: when non-empty, ranks outside it get ``{}`` (dict root) or None.
        type_check: raise ``ValueError`` for unsupported leaf types.
        non_blocking: passed to the copies into the companion.

    Returns:
        The new structure (new containers; leaves as described).
    """
    use_companion = companion_obj is not None
    flat = flatten(
        iter_object, type_check=type_check, companion=companion_obj, use_companion=use_companion
    )
    companions = flat.companions if use_companion else [None] * len(flat.leaves)
    funcs = {
        LEAF_SHARDED: sharded_tensor_func,
        LEAF_DTENSOR: dtensor_func,
        LEAF_TENSOR: tensor_func,
    }
    out: list[Any] = []
    for value, kind, companion in zip(flat.leaves, flat.kinds, companions):
        func = funcs.get(kind)
        out.append(
            func(value, pg, device, companion) if func is not None else _copy_value(value, kind)
        )
    if _outside_ranks_only(ranks_only, pg):
        return _empty_result(flat)

    out_kinds = [leaf_kind(v) for v in out]
    to_offload = [
        i
        for i, (k, c) in enumerate(zip(out_kinds, companions))
        if k <= LEAF_SHARDED and cpu_offload and c is None
    ]
    if to_offload:
        moved = offload_leaves([out[i] for i in to_offload], [out_kinds[i] for i in to_offload])
        for i, value in zip(to_offload, moved):
            out[i] = value
    dsts: list[torch.Tensor] = []
    srcs: list[torch.Tensor] = []
    targets: list[tuple[int, Any]] = []
    for i, (value, kind, companion) in enumerate(zip(out, out_kinds, companions)):
        if kind <= LEAF_SHARDED and companion is not None:
            d, s = _local_pairs(value, companion, flat.paths[i])
            dsts += d
            srcs += s
            targets.append((i, companion))
    batched_copy_pairs(dsts, srcs, non_blocking=non_blocking)
    for i, companion in targets:
        out[i] = companion
    return flat.rebuild(out)


def offload_state_dict_to_cpu(
    state_dict: dict[str, Any],
    *,
    ranks_only: tuple[int, ...] = (),
    type_check: bool = True,
) -> dict[str, Any]:
    """Returns the state dict with every tensor moved to the CPU (``_offload_state_dict_to_cpu``).

    Tensors already on the CPU are returned as they are, as ``Tensor.to("cpu")`` does;
    the others are copied with one batched device-to-host copy (one per device when
    they live on several). A state dict of plain tensors already on the CPU costs a
    few C-level passes per dict level.

    Args:
        state_dict: the state dict.
        ranks_only: when non-empty, ranks outside it get ``{}``.
        type_check: raise ``ValueError`` for unsupported leaf types.
    """
    try:
        recipe, tensors = plain_tensors(state_dict, type_check)
    except NotPlain:
        return _offload_general(state_dict, ranks_only, type_check)
    if _outside_ranks_only(ranks_only, None):
        return {} if isinstance(state_dict, dict) else None
    # One C-level pass answers the usual question (everything already on the CPU).
    if not all(map(_IS_CPU, tensors)):
        tensors = offload_leaves(tensors, [LEAF_TENSOR] * len(tensors))
    return rebuild_plain(recipe, tensors)


def _offload_general(state_dict: Any, ranks_only: tuple[int, ...], type_check: bool) -> Any:
    """offload_state_dict_to_cpu for DTensors, ShardedTensors and rejected leaves."""
    flat = flatten(state_dict, type_check=type_check)
    if _outside_ranks_only(ranks_only, None):
        return _empty_result(flat)
    leaves = offload_leaves(_leaf_values(flat), flat.kinds)
    return flat.rebuild(leaves)


def copy_state_dict(
    state_dict: dict[str, Any],
    copy_state_dict: dict[str, Any],
    non_blocking: bool = False,
    type_check: bool = True,
) -> dict[str, Any]:
    """Copies every tensor of ``state_dict`` into ``copy_state_dict`` (``_copy_state_dict``).

    The structures are checked first, then one batched copy takes every pair (one
    per device pair if they span several CUDA devices); the op checks dtypes, shapes
    and aliasing before it writes, so Python looks at each pair only when it refuses.
    DTensor and ShardedTensor leaves copy their local tensors. A destination tensor
    shared by several keys (tied weights) is written once.

    Unlike PyTorch, which raises ``AttributeError`` for a dict-vs-list mismatch, casts
    dtypes silently and can leave the destination half-written, every mismatch raises
    :class:`CompanionMismatch` naming the key path before the first byte is written.

    Args:
        state_dict: the source.
        copy_state_dict: the destination; same structure, dtypes and shapes.
        non_blocking: let device copies run asynchronously on the current stream.
        type_check: raise ``ValueError`` for unsupported leaf types.

    Returns:
        A new structure like ``state_dict`` whose tensors are the destination's
        tensors (its non-tensor values are the source's).
    """
    out = _copy_flat_cpu(state_dict, copy_state_dict)
    if out is not None:
        return out
    try:
        out, dsts, srcs = pair_tensors(state_dict, copy_state_dict, type_check)
    except NotPlain:
        return _copy_checked(state_dict, copy_state_dict, non_blocking, type_check)
    batched_copy_pairs(
        dsts, srcs, non_blocking=non_blocking,
        validate=lambda: _check_pairs(flatten(
            state_dict, type_check=type_check, companion=copy_state_dict, use_companion=True
        )),
    )
    return out


def _copy_flat_cpu(state_dict: Any, copy_state_dict: Any) -> dict[str, Any] | None:
    """The commonest copy in one C++ pass, or None to take the general path.

    A flat dict of CPU tensors into a companion with the same keys in the same order
    (one made from it): the values go to the op unexamined, and the op's entry point
    checks each item once (Python checking their types first would read every tensor
    object twice, a cost proportional to the tensor count that the copy of small
    tensors cannot hide). Anything else, a bad pair included,
    is left, unwritten, to the general path, which also names the key of a bad pair.
    """
    if not isinstance(state_dict, dict) or not isinstance(copy_state_dict, dict):
        return None
    # A first value that is no plain CPU tensor (a nested level, a GPU state dict)
    # would make the C++ entry decline: spare the general path building the lists twice.
    first = next(iter(state_dict.values()), None)
    if type(first) is not torch.Tensor or first.device.type != "cpu":
        return None
    if list(state_dict) != list(copy_state_dict):
        return None
    comps = list(copy_state_dict.values())
    try:
        with torch.no_grad():
            if not ops.copy_if_plain_cpu(comps, list(state_dict.values())):
                return None
    except NotImplementedError:
        return None  # declined before writing: the general path names the key
    return copy_state_dict.copy() if type(copy_state_dict) is dict else dict(zip(state_dict, comps))


def _copy_pairs(flat: Flat) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The (destinations, sources) of a copy, checking the pairs the op cannot check."""
    dsts: list[torch.Tensor] = []
    srcs: list[torch.Tensor] = []
    for i in flat.tensor_indices():
        src, dst = flat.leaves[i], flat.companions[i]
        if flat.kinds[i] == LEAF_TENSOR and leaf_kind(dst) == LEAF_TENSOR:
            # Plain pairs are checked by the op itself (before it writes anything).
            dsts.append(dst)
            srcs.append(src)
            continue
        if dst is None:
            raise CompanionMismatch(
                f"at key path {format_path(flat.paths[i])!r}: the destination has None "
                "where the source has a tensor"
            )
        d, s = _local_pairs(src, dst, flat.paths[i])
        dsts += d
        srcs += s
    return dsts, srcs


def _check_pairs(flat: Flat) -> None:
    """Raises the first pair's error, naming its key path (every companion is set)."""
    for i in flat.tensor_indices():
        _local_pairs(flat.leaves[i], flat.companions[i], flat.paths[i])


def _copy_checked(
    state_dict: Any, copy_state_dict: Any, non_blocking: bool, type_check: bool
) -> Any:
    """copy_state_dict for what :func:`pair_tensors` leaves to the general traversal.

    ShardedTensors, and every mistake: the traversal checks the whole structure and
    raises with the key path of the first problem before anything is written.
    """
    flat = flatten(
        state_dict, type_check=type_check, companion=copy_state_dict, use_companion=True
    )
    dsts, srcs = _copy_pairs(flat)
    out = _leaf_values(flat)
    for i in flat.tensor_indices():
        out[i] = flat.companions[i]
    batched_copy_pairs(
        dsts, srcs, non_blocking=non_blocking, validate=lambda: _check_pairs(flat)
    )
    return flat.rebuild(out)


def _host_tensors(
    sources: list[torch.Tensor], pin_memory: bool, share_memory: bool
) -> list[torch.Tensor]:
    """New CPU tensors shaped like ``sources``, carved out of one slab where they can be.

    PyTorch gives zero-element and meta tensors zero-filled, unpinned tensors of their
    own; so does this (shared when ``share_memory``). Everything else is a slab view.
    """
    # C-level maps: no Python bytecode per tensor.
    shapes = list(map(_SHAPE, sources))
    dtypes = list(map(_DTYPE, sources))
    if any(map(_IS_META, sources)):
        for i in [i for i, t in enumerate(sources) if t.is_meta]:
            shapes[i] = _NO_ELEMENTS  # no bytes in the slab: made below like empty ones
    out, empty = carve(shapes, dtypes, pin_memory=pin_memory, share_memory=share_memory)
    for i in empty:
        new = torch.zeros_like(sources[i], device=_CPU)
        out[i] = new.share_memory_() if share_memory else new
    return out


def create_cpu_state_dict(
    state_dict: dict[str, Any], pin_memory: bool = False, share_memory: bool = False
) -> dict[str, Any]:
    """A CPU state dict of the same structure, shapes and dtypes (``_create_cpu_state_dict``).

    Every new tensor is a view into one host slab: one allocation, pinned with one
    ``cudaHostRegister`` when ``pin_memory``, placed in one shared-memory segment when
    ``share_memory`` (both together work), and released (unregistered, then freed)
    when the last of its tensors dies. PyTorch instead pins and shares per tensor:
    one open file per tensor with ``share_memory=True``, and a registration that
    was once never undone.

    Values are uninitialised, except 0-dim tensors (zero, as in PyTorch) and
    zero-element / meta tensors (ordinary zero-filled CPU tensors, as in PyTorch).
    0-dim DTensors and ShardedTensors without local shards are returned as they are.
    Differences: 0-dim tensors are pinned/shared with the rest here; without an
    accelerator ``pin_memory=True`` warns once and returns pageable memory (PyTorch
    raises). A pinned or shared slab is populated at once, so a size that the machine
    or the process cannot hold (available memory, ``RLIMIT_AS`` / ``RLIMIT_DATA``,
    ``/dev/shm``'s free space) is refused first, where PyTorch's per-tensor
    allocation would fail or the OOM killer would end a process.

    Args:
        state_dict: the model.
        pin_memory: pin the slab.
        share_memory: share the slab between processes.

    Raises:
        RuntimeError: a sparse or other non-strided tensor (PyTorch raises too; ours
            names its key path), or a slab that cannot fit (naming size and limit).
    """
    try:
        recipe, tensors = plain_tensors(state_dict)
    except NotPlain:
        return _create_general(state_dict, pin_memory, share_memory)
    if set(map(_LAYOUT, tensors)) - _STRIDED_ONLY:
        return _create_general(state_dict, pin_memory, share_memory)  # it names the key
    return rebuild_plain(recipe, _host_tensors(tensors, pin_memory, share_memory))


def _create_general(state_dict: Any, pin_memory: bool, share_memory: bool) -> Any:
    """create_cpu_state_dict for state dicts holding DTensors or ShardedTensors."""
    flat = flatten(state_dict, type_check=False)
    out = _leaf_values(flat)
    sources: list[torch.Tensor] = []
    # Where each new tensor goes: (leaf index, shard index or -1).
    slots: list[tuple[int, int]] = []
    sharded: dict[int, ShardedTensor] = {}
    for i, (value, kind) in enumerate(zip(flat.leaves, flat.kinds)):
        if kind == LEAF_TENSOR:
            sources.append(value)
            slots.append((i, -1))
        elif kind == LEAF_DTENSOR:
            if value.dim() == 0:
                continue
            sources.append(value._local_tensor)
            slots.append((i, -1))
        elif kind == LEAF_SHARDED:
            if not value.local_shards():
                continue
            # Rare, legacy type: keep PyTorch's own copy of the wrapper and metadata.
            st = value.to(_CPU) if value.device != _CPU else copy.deepcopy(value)
            for j, shard in enumerate(st.local_shards()):
                sources.append(shard.tensor)
                slots.append((i, j))
            sharded[i] = st
            out[i] = st
    for (leaf, shard), src in zip(slots, sources):
        if src.layout != torch.strided:
            where = format_path(flat.paths[leaf])
            if shard >= 0:
                where += f" (local shard {shard})"
            raise RuntimeError(
                f"create_cpu_state_dict: cannot make a CPU tensor like {where!r}, a "
                f"{src.layout} tensor: only strided tensors can be; convert it first "
                "(e.g. .to_dense())"
            )
    for (leaf, shard), t in zip(slots, _host_tensors(sources, pin_memory, share_memory)):
        value = flat.leaves[leaf]
        if shard >= 0:
            sharded[leaf].local_shards()[shard].tensor = t
        elif flat.kinds[leaf] == LEAF_DTENSOR:
            out[leaf] = DTensor(t, value._spec, requires_grad=value.requires_grad)
        else:
            out[leaf] = t
    return flat.rebuild(out)


def check_state_dict_similarity(
    state_dict: dict[str, Any], compared_state_dict: dict[str, Any]
) -> bool:
    """Whether two state dicts have the same structure, tensor dtypes and sizes.

    Counterpart of ``_check_state_dict_similarity``, which copies ``state_dict`` into
    ``compared_state_dict`` while "checking"; this one only reads. A tensor whose
    counterpart is not a tensor makes the answer False (PyTorch raises
    ``AttributeError``), and DTensors are compared by global size and dtype.
    """
    try:
        flat = flatten(
            state_dict, type_check=False, companion=compared_state_dict, use_companion=True
        )
    except CompanionMismatch:
        return False
    if compared_state_dict is None:
        return True
    for i in flat.tensor_indices():
        value, other = flat.leaves[i], flat.companions[i]
        if not isinstance(other, torch.Tensor):
            return False
        if other.dtype != value.dtype or other.size() != value.size():
            return False
    return True


def traverse_state_dict(
    state_dict: Mapping[Any, Any], visitor: Callable[[ObjPath, Any], None]
) -> None:
    """Calls ``visitor(path, value)`` for every non-container value (``_traverse_state_dict``).

    Mappings, lists and tuples are walked into; mapping keys appear in paths as
    ``str(key)``, list positions as ints. Empty containers produce no call.
    """

    def walk(path: ObjPath, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(path + (str(k),), v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(path + (i,), v)
        else:
            visitor(path, value)

    for key, value in state_dict.items():
        walk((str(key),), value)


def flatten_state_dict(
    state_dict: Mapping[Any, Any],
) -> tuple[dict[str, Any], dict[str, ObjPath]]:
    """Flattens nested containers into one level keyed by dotted paths (``_flatten_state_dict``).

    Returns:
        ``(flat, mapping)``: ``flat["a.b.0"]`` is the value at path ``("a", "b", 0)``
        and ``mapping["a.b.0"] == ("a", "b", 0)``; :func:`unflatten_state_dict` undoes it.

    Raises:
        ValueError: two paths join to the same dotted key.
    """
    flat: dict[str, Any] = {}
    mapping: dict[str, ObjPath] = {}

    def add(path: ObjPath, value: Any) -> None:
        key = ".".join(map(str, path))
        if key in flat:
            raise ValueError(f"duplicated flatten key {key}")
        flat[key] = value
        mapping[key] = path

    traverse_state_dict(state_dict, add)
    return flat, mapping


def _child(container: Any, key: PathItem, next_key: PathItem) -> Any:
    # The container at ``container[key]``, created (a dict for a str key next, a list
    # for an int) when absent; lists grow with None up to the index.
    fresh: Any = {} if type(next_key) is str else []
    if isinstance(container, Mapping):
        return container.setdefault(key, fresh)
    if len(container) <= key:
        container.extend([None] * (key + 1 - len(container)))
    if container[key] is None:
        container[key] = fresh
    return container[key]


def unflatten_state_dict(
    state_dict: Mapping[str, Any], mapping: Mapping[str, ObjPath]
) -> dict[str, Any]:
    """Rebuilds the nested state dict from :func:`flatten_state_dict`'s output.

    Counterpart of ``_unflatten_state_dict``.

    Int path items become list positions (lists are padded with None), str items dict
    keys; tuples therefore come back as lists, as in PyTorch.
    """
    nested: dict[str, Any] = {}
    for key, value in state_dict.items():
        path = mapping[key]
        container: Any = nested
        for here, nxt in zip(path, path[1:]):
            container = _child(container, here, nxt)
        last = path[-1]
        if type(last) is int and len(container) <= last:
            container.extend([None] * (last + 1 - len(container)))
        container[last] = value
    return nested
