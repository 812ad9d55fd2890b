"""The one walk over a nested state dict: a flat view of its leaves, and the way back.

Every function of the package that looks inside a state dict goes through this module:
the utilities (:mod:`sdict_ext.utils`), get / set (:mod:`sdict_ext.state_dict`), the
gather, broadcast and distribute collectives, the host copies and the stager
(:mod:`sdict_ext.staging`). :func:`flatten` walks the nested dict / list / tuple
structure once (checking a companion structure alongside when one is given) and
returns a :class:`Flat`: the leaves in traversal order, their ``LEAF_*`` kinds, their
key paths, their local tensors, a rebuild recipe (:meth:`Flat.rebuild` puts new leaves
back into the same shape) and a layout signature (:attr:`Flat.signature`, what a cache
of per-layout work keys on). The containers follow
``torch.distributed._state_dict_utils._iterate_state_dict``: any ``dict``
(``OrderedDict`` included) is rebuilt as a plain ``dict``, lists as lists, tuples
(named ones included) as plain tuples.

Kinds are a function of the type alone, so they are classified once per type and kept
in one cache (:func:`leaf_kind`); nothing that the walk returns depends on what that
cache held before the call. A *plain value* is a leaf that is not a tensor
(:data:`PLAIN_KINDS`): :data:`LEAF_VALUE` for the types PyTorch's ``type_check``
accepts, :data:`LEAF_OTHER` for anything else.

:func:`pair_tensors` and :func:`plain_tensors` are the fast paths of copy and create:
they handle state dicts made of containers, plain tensors and values (DTensors too, for
copies) with bulk, C-level work per dict level instead of Python work per leaf, and
raise :class:`NotPlain` for anything else, so the caller falls back to :func:`flatten`,
which names the key path of every problem.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Sequence
from operator import attrgetter
from typing import Any

import torch
from torch.distributed import _state_dict_utils as _torch_utils
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor

__all__ = [
    "CompanionMismatch",
    "Flat",
    "LEAF_DTENSOR",
    "LEAF_OTHER",
    "LEAF_SHARDED",
    "LEAF_TENSOR",
    "LEAF_VALUE",
    "NODE_DICT",
    "NODE_LIST",
    "NODE_TUPLE",
    "NotPlain",
    "PLAIN_KINDS",
    "TENSOR_KINDS",
    "flatten",
    "format_path",
    "leaf_kind",
    "pair_tensors",
    "plain_tensors",
    "rebuild_plain",
]

#: Leaf kinds, as returned by :func:`leaf_kind` (tensor kinds first: ``kind <=
#: LEAF_SHARDED`` tells a tensor leaf).
LEAF_TENSOR = 0
LEAF_DTENSOR = 1
LEAF_SHARDED = 2
#: A supported non-tensor value (int, float, str, bytes, io.BytesIO, None).
LEAF_VALUE = 3
#: Any other object, accepted only with ``type_check=False``.
LEAF_OTHER = 4
#: The kinds of containers (what :func:`leaf_kind` answers for them).
NODE_DICT = 5
NODE_LIST = 6
NODE_TUPLE = 7

#: Kinds of the tensor leaves: plain tensors, DTensors and ShardedTensors.
TENSOR_KINDS = frozenset((LEAF_TENSOR, LEAF_DTENSOR, LEAF_SHARDED))
#: Kinds of the plain values: every leaf that is not a tensor.
PLAIN_KINDS = frozenset((LEAF_VALUE, LEAF_OTHER))

_VALUE_TYPES = (int, float, str, bytes, io.BytesIO, type(None))

# Recipe nodes: a leaf slot, or a container with the recipes of its children. Recipes
# are nested tuples (hashable, compared by value), so a recipe is part of the layout
# signature.
_LEAF = 0
_DICT = 1
_LIST = 2
_TUPLE = 3
# A dict whose values are all plain tensors: its keys only (the leaves follow in order).
_TENSOR_DICT = 4
# Only in the recipes of plain_tensors: a value leaf kept in the recipe itself.
_VALUE = 5

_LEAF_RECIPE = (_LEAF,)
_SHAPE = attrgetter("shape")
_DTYPE = attrgetter("dtype")
_DEVICE = attrgetter("device")
_STRIDE = torch.Tensor.stride


class CompanionMismatch(_torch_utils.CompanionMismatch):
    """A companion state dict does not have the structure of the state dict it follows.

    Raised with the key path of the first difference, before anything is written. A
    subclass of PyTorch's ``CompanionMismatch``, so handlers written for it still catch
    ours.
    """


class NotPlain(Exception):
    """A fast walk met something it leaves to :func:`flatten` (which explains problems)."""


def format_path(path: Sequence[Any]) -> str:
    """``('model', 'layers', 0, 'w')`` -> ``"model.layers.0.w"`` (``"<root>"`` when empty)."""
    return ".".join(map(str, path)) if path else "<root>"


# The one type -> kind cache of the package. A kind depends only on the type, so every
# walk costs one dict lookup per value instead of a chain of subclass checks (DTensor's
# goes through the tensor metaclass, the slowest part of classifying a leaf).
_KINDS: dict[type, int] = {}


def _type_kind(cls: type) -> int:
    """The kind of values of type ``cls``, classified on first sight and cached."""
    kind = _KINDS.get(cls)
    if kind is None:
        if issubclass(cls, dict):
            kind = NODE_DICT
        elif issubclass(cls, tuple):
            kind = NODE_TUPLE
        elif issubclass(cls, list):
            kind = NODE_LIST
        # ShardedTensor and DTensor, being tensor subclasses, are tested first.
        elif issubclass(cls, ShardedTensor):
            kind = LEAF_SHARDED
        elif issubclass(cls, DTensor):
            kind = LEAF_DTENSOR
        elif issubclass(cls, torch.Tensor):
            kind = LEAF_TENSOR
        elif issubclass(cls, _VALUE_TYPES):
            kind = LEAF_VALUE
        else:
            kind = LEAF_OTHER
        _KINDS[cls] = kind
    return kind


def leaf_kind(value: Any) -> int:
    """The kind of ``value``: a ``LEAF_*`` kind, or a ``NODE_*`` one for a container."""
    kind = _KINDS.get(type(value))
    return _type_kind(type(value)) if kind is None else kind


def _all_tensors(values: list[Any]) -> bool:
    # One C-level pass builds the set of types (usually one or two), each classified
    # (not only looked up): the answer, and the recipe that follows from it, must not
    # depend on which types the cache had seen before.
    return all(_type_kind(t) == LEAF_TENSOR for t in set(map(type, values)))


class Flat:
    """A state dict flattened into parallel lists: the flat view every walker uses.

    Attributes:
        leaves: every non-container value, in traversal order (dict insertion order,
            list index order).
        kinds: the ``LEAF_*`` kind of each leaf.
        locals: the local tensors of the tensor leaves, in leaf order: a plain tensor
            itself, a DTensor's local tensor, each local shard of a ShardedTensor.
        plain_indices: the indices of the plain-value leaves (see :data:`PLAIN_KINDS`).
        companions: the companion structure's value at each leaf's path, or ``None``
            when no companion was given.
        top_is_dict: whether the root is a dict (PyTorch returns ``{}`` rather than
            ``None`` for it on ranks outside ``ranks_only``).
    """

    __slots__ = (
        "leaves", "kinds", "locals", "plain_indices", "companions", "top_is_dict",
        "_recipe", "_paths", "_signature",
    )

    def __init__(self) -> None:
        self.leaves: list[Any] = []
        self.kinds: list[int] = []
        self.locals: list[torch.Tensor] = []
        self.plain_indices: list[int] = []
        self.companions: list[Any] | None = None
        self.top_is_dict = False
        self._recipe: Any = None
        self._paths: list[tuple[Any, ...]] | None = None
        self._signature: Any = None

    @property
    def paths(self) -> list[tuple[Any, ...]]:
        """The key path of each leaf (dict keys as they are, list indices as ints).

        Made from the recipe on first use: most calls need a path only for an error.
        """
        if self._paths is None:
            paths: list[tuple[Any, ...]] = []
            _paths_of(self._recipe, (), paths)
            self._paths = paths
        return self._paths

    @property
    def signature(self) -> Any:
        """The layout signature: equal for two views exactly when their layouts match.

        The layout is the nesting and dict keys (the recipe), every leaf's kind, and
        for every local tensor its shape, dtype, device and strides (plus a DTensor's
        spec, a ShardedTensor's metadata and shard count). Plain values count by kind
        only. Compared with ``==``; it is computed once per view, with C-level passes.
        """
        if self._signature is None:
            tensors = self.locals
            try:
                strides = tuple(map(_STRIDE, tensors))
            except RuntimeError:  # sparse and other layouts without strides
                strides = tuple(t.stride() if t.layout == torch.strided else t.layout
                                for t in tensors)
            extras: tuple[Any, ...] = ()
            kinds = self.kinds
            if LEAF_DTENSOR in kinds or LEAF_SHARDED in kinds:
                extras = tuple(
                    (i, leaf._spec) if kind == LEAF_DTENSOR
                    else (i, leaf.metadata(), len(leaf.local_shards()))
                    for i, (leaf, kind) in enumerate(zip(self.leaves, kinds))
                    if kind == LEAF_DTENSOR or kind == LEAF_SHARDED
                )
            self._signature = (
                self._recipe,
                tuple(kinds),
                tuple(map(_SHAPE, tensors)),
                tuple(map(_DTYPE, tensors)),
                tuple(map(_DEVICE, tensors)),
                strides,
                extras,
            )
        return self._signature

    def tensor_indices(self) -> list[int]:
        """Indices of the tensor leaves (plain, DTensor and ShardedTensor)."""
        return [i for i, k in enumerate(self.kinds) if k <= LEAF_SHARDED]

    def local_owners(self) -> list[tuple[int, int]]:
        """For each of :attr:`locals`: its leaf index and shard index (-1 unless the
        leaf is a ShardedTensor)."""
        owners: list[tuple[int, int]] = []
        for i, (leaf, kind) in enumerate(zip(self.leaves, self.kinds)):
            if kind == LEAF_SHARDED:
                owners += [(i, j) for j in range(len(leaf.local_shards()))]
            elif kind <= LEAF_SHARDED:
                owners.append((i, -1))
        return owners

    def rebuild(self, leaves: Sequence[Any]) -> Any:
        """The original structure with ``leaves[i]`` in place of leaf i (new containers)."""
        if len(leaves) != len(self.leaves):
            raise ValueError(
                f"rebuild: expected {len(self.leaves)} leaves, got {len(leaves)}"
            )
        return _build(self._recipe, iter(leaves))


def _build(recipe: Any, it: Any) -> Any:
    tag = recipe[0]
    if tag == _LEAF:
        return next(it)
    if tag == _TENSOR_DICT:
        # zip stops on the keys before taking another leaf from the shared iterator.
        return dict(zip(recipe[1], it))
    if tag == _DICT:
        return {key: _build(child, it) for key, child in zip(recipe[1], recipe[2])}
    items = [_build(child, it) for child in recipe[1]]
    return tuple(items) if tag == _TUPLE else items


def _paths_of(recipe: Any, path: tuple[Any, ...], out: list[tuple[Any, ...]]) -> None:
    tag = recipe[0]
    if tag == _LEAF:
        out.append(path)
    elif tag == _TENSOR_DICT:
        out += [path + (key,) for key in recipe[1]]
    elif tag == _DICT:
        for key, child in zip(recipe[1], recipe[2]):
            _paths_of(child, path + (key,), out)
    else:
        for i, child in enumerate(recipe[1]):
            _paths_of(child, path + (i,), out)


def flatten(
    obj: Any,
    *,
    type_check: bool = True,
    companion: Any = None,
    use_companion: bool = False,
) -> Flat:
    """Flattens ``obj`` into a :class:`Flat`, checking ``companion`` alongside.

    A dict level whose values are all plain tensors (a model's parameters) is taken in
    a few C-level passes instead of a step per leaf.

    Args:
        obj: a state dict (or any nesting of dict / list / tuple and leaves).
        type_check: raise ``ValueError`` for leaves that are not tensors or supported
            values, as PyTorch's ``type_check=True`` does; otherwise accept them.
        companion: a structure that must mirror ``obj``: the same dict keys and list
            lengths at every level. Leaf values are not checked here.
        use_companion: whether ``companion`` is given (``None`` is a valid companion
            leaf, so it cannot mark "absent").

    Raises:
        CompanionMismatch: the companion's structure differs; the message names the
            key path.
        ValueError: an unsupported leaf with ``type_check=True``; the message names
            the key path.
    """
    flat = Flat()
    kind = leaf_kind(obj)
    flat.top_is_dict = kind == NODE_DICT
    if use_companion:
        flat.companions = []
    if kind >= NODE_DICT:
        flat._recipe = _walk(obj, kind, (), flat, type_check, companion, use_companion)
    else:
        _check_leaf(obj, kind, (), type_check)
        flat._recipe = _record(obj, kind, flat, companion)
    return flat


def _check_leaf(value: Any, kind: int, path: tuple[Any, ...], type_check: bool) -> None:
    if kind == LEAF_OTHER and type_check:
        raise ValueError(
            f"Unexpected value type {type(value)} at key path {format_path(path)!r}; "
            "pass type_check=False to accept it"
        )


def _record(value: Any, kind: int, flat: Flat, comp: Any) -> Any:
    flat.leaves.append(value)
    flat.kinds.append(kind)
    if kind == LEAF_TENSOR:
        flat.locals.append(value)
    elif kind == LEAF_DTENSOR:
        # What DCP itself reads: the public to_local() goes through autograd.
        flat.locals.append(value._local_tensor)
    elif kind == LEAF_SHARDED:
        flat.locals += [shard.tensor for shard in value.local_shards()]
    else:
        flat.plain_indices.append(len(flat.leaves) - 1)
    if flat.companions is not None:
        flat.companions.append(comp)
    return _LEAF_RECIPE


def _walk(
    obj: Any, kind: int, path: tuple[Any, ...], flat: Flat, type_check: bool, comp: Any,
    use_comp: bool,
) -> Any:
    # A None companion below the root means "no companion here", as in PyTorch.
    has_comp = use_comp and comp is not None
    if kind == NODE_DICT:
        if has_comp:
            if not isinstance(comp, dict):
                raise CompanionMismatch(
                    f"at key path {format_path(path)!r}: the state dict has a dict, "
                    f"the companion a {type(comp).__name__}"
                )
            if comp.keys() != obj.keys():
                missing = sorted(map(str, obj.keys() - comp.keys()))
                extra = sorted(map(str, comp.keys() - obj.keys()))
                raise CompanionMismatch(
                    f"at key path {format_path(path)!r}: keys differ; missing in the "
                    f"companion: {missing}, only in the companion: {extra}"
                )
        keys = tuple(obj)
        values = list(obj.values())
        if values and _all_tensors(values):
            flat.leaves += values
            flat.kinds += [LEAF_TENSOR] * len(values)
            flat.locals += values
            if flat.companions is not None:
                flat.companions += (
                    list(map(comp.__getitem__, keys)) if has_comp else [None] * len(values)
                )
            return (_TENSOR_DICT, keys)
        children = tuple(
            _visit(value, path, key, flat, type_check, comp[key] if has_comp else None, use_comp)
            for key, value in zip(keys, values)
        )
        return (_DICT, keys, children)
    if has_comp:
        if not isinstance(comp, (list, tuple)):
            raise CompanionMismatch(
                f"at key path {format_path(path)!r}: the state dict has a "
                f"{type(obj).__name__}, the companion a {type(comp).__name__}"
            )
        if len(comp) != len(obj):
            raise CompanionMismatch(
                f"at key path {format_path(path)!r}: the state dict's "
                f"{type(obj).__name__} has {len(obj)} items, the companion's {len(comp)}"
            )
    children = tuple(
        _visit(value, path, i, flat, type_check, comp[i] if has_comp else None, use_comp)
        for i, value in enumerate(obj)
    )
    return (_TUPLE if kind == NODE_TUPLE else _LIST, children)


def _visit(
    value: Any, path: tuple[Any, ...], key: Any, flat: Flat, type_check: bool, comp: Any,
    use_comp: bool,
) -> Any:
    # Runs once per leaf outside all-tensor dict levels: the child's path is made only
    # for a container or an error.
    kind = _KINDS.get(type(value))
    if kind is None:
        kind = _type_kind(type(value))
    if kind >= NODE_DICT:
        return _walk(value, kind, path + (key,), flat, type_check, comp, use_comp)
    if kind == LEAF_OTHER and type_check:
        _check_leaf(value, kind, path + (key,), type_check)
    return _record(value, kind, flat, comp)


# ---------------------------------------------------------------- fast walks


def pair_tensors(
    obj: Any, companion: Any, type_check: bool
) -> tuple[Any, list[torch.Tensor], list[torch.Tensor]]:
    """The result and the tensor pairs of copying ``obj`` into ``companion``, quickly.

    Dict levels holding only plain tensors (on both sides) cost a few C-level passes;
    other levels are walked value by value. Only the structure is checked here; the
    tensors' dtypes, shapes and aliasing are left to the copy op, which checks them
    before writing.

    Returns:
        ``(out, dsts, srcs)``: ``out`` is ``obj``'s structure (new containers) with the
        companion's tensors at tensor leaves and ``obj``'s values elsewhere (deep-copied
        when unsupported); ``dsts[i]`` receives ``srcs[i]`` (local tensors for DTensors).

    Raises:
        NotPlain: anything :func:`flatten` must look at: a structural difference, a
            None or non-matching companion leaf, a ShardedTensor, DTensors of different
            global shapes, or an unsupported leaf with ``type_check``.
    """
    dsts: list[torch.Tensor] = []
    srcs: list[torch.Tensor] = []
    out = _pairs(obj, companion, type_check, dsts, srcs)
    return out, dsts, srcs


def _pairs(obj: Any, comp: Any, type_check: bool, dsts: list, srcs: list) -> Any:
    kind = _KINDS.get(type(obj))
    if kind is None:
        kind = _type_kind(type(obj))
    if kind == NODE_DICT:
        if not isinstance(comp, dict):
            raise NotPlain
        values = list(obj.values())
        if type(comp) is dict and list(obj) == list(comp):
            # The usual companion (made from the source): same keys in the same order,
            # so the result is a plain copy of it, with no hashing at all.
            comps = list(comp.values())
            if _all_tensors(values) and _all_tensors(comps):
                srcs += values
                dsts += comps
                return comp.copy()
        elif comp.keys() != obj.keys():
            raise NotPlain
        comps = list(map(comp.__getitem__, obj))
        if _all_tensors(values) and _all_tensors(comps):
            srcs += values
            dsts += comps
            return dict(zip(obj, comps))
        return {
            key: _pairs(value, c, type_check, dsts, srcs)
            for key, value, c in zip(obj, values, comps)
        }
    if kind == NODE_LIST or kind == NODE_TUPLE:
        if not isinstance(comp, (list, tuple)) or len(comp) != len(obj):
            raise NotPlain
        items = [_pairs(value, c, type_check, dsts, srcs) for value, c in zip(obj, comp)]
        return tuple(items) if kind == NODE_TUPLE else items
    if kind == LEAF_VALUE:
        return obj
    comp_kind = _KINDS.get(type(comp))
    if comp_kind is None:
        comp_kind = _type_kind(type(comp))
    if kind == LEAF_TENSOR and comp_kind == LEAF_TENSOR:
        srcs.append(obj)
        dsts.append(comp)
        return comp
    if kind == LEAF_DTENSOR and comp_kind == LEAF_DTENSOR and obj.shape == comp.shape:
        srcs.append(obj._local_tensor)
        dsts.append(comp._local_tensor)
        return comp
    if kind == LEAF_OTHER and not type_check:
        return copy.deepcopy(obj)
    raise NotPlain


def plain_tensors(obj: Any, type_check: bool = False) -> tuple[Any, list[torch.Tensor]]:
    """The plain tensors of ``obj`` and a recipe to rebuild it around new ones, quickly.

    Unsupported leaves are deep-copied into the recipe, as the utilities return them.

    Args:
        obj: the state dict.
        type_check: leave unsupported leaves to :func:`flatten`, which rejects them.

    Returns:
        ``(recipe, tensors)``, for :func:`rebuild_plain`.

    Raises:
        NotPlain: ``obj`` holds a DTensor or ShardedTensor, or an unsupported leaf
            with ``type_check``.
    """
    tensors: list[torch.Tensor] = []
    return _plain(obj, tensors, type_check), tensors


def _plain(obj: Any, tensors: list[torch.Tensor], type_check: bool) -> Any:
    kind = _KINDS.get(type(obj))
    if kind is None:
        kind = _type_kind(type(obj))
    if kind == NODE_DICT:
        values = list(obj.values())
        if _all_tensors(values):
            tensors += values
            return (_TENSOR_DICT, list(obj))
        return (_DICT, list(obj), [_plain(value, tensors, type_check) for value in values])
    if kind == NODE_LIST or kind == NODE_TUPLE:
        return (
            _TUPLE if kind == NODE_TUPLE else _LIST,
            [_plain(value, tensors, type_check) for value in obj],
        )
    if kind == LEAF_TENSOR:
        tensors.append(obj)
        return _LEAF_RECIPE
    if kind == LEAF_VALUE:
        return (_VALUE, obj)
    if kind == LEAF_OTHER and not type_check:
        return (_VALUE, copy.deepcopy(obj))
    raise NotPlain


def rebuild_plain(recipe: Any, tensors: Sequence[torch.Tensor]) -> Any:
    """:func:`plain_tensors`' structure (new containers) with ``tensors`` in order."""
    return _rebuild_plain(recipe, iter(tensors))


def _rebuild_plain(recipe: Any, it: Any) -> Any:
    tag = recipe[0]
    if tag == _VALUE:
        return recipe[1]
    if tag == _DICT:
        return {key: _rebuild_plain(child, it) for key, child in zip(recipe[1], recipe[2])}
    if tag == _LIST or tag == _TUPLE:
        items = [_rebuild_plain(child, it) for child in recipe[1]]
        return tuple(items) if tag == _TUPLE else items
    return _build(recipe, it)  # a tensor leaf or an all-tensor dict: as in a Flat
