"""One walk over a nested state dict: flat leaves, their key paths, and a rebuild recipe.

Every utility in :mod:`sdict_ext.utils` (and the staging / state-dict modules) works on
flat lists instead of recursing tensor by tensor: :func:`flatten` walks the nested
dict / list / tuple structure once, checking a companion structure alongside when one
is given, and :meth:`Flat.rebuild` puts new leaves back into the same shape. The
containers follow ``torch.distributed._state_dict_utils._iterate_state_dict``: any
``dict`` (``OrderedDict`` included) is rebuilt as a plain ``dict``, lists as lists,
tuples (named ones included) as plain tuples.

:func:`pair_tensors` and :func:`plain_tensors` are the hot paths of copy and create:
they handle state dicts made of containers, plain tensors and values (DTensors too, for
copies) with bulk, C-level work per dict level instead of Python work per leaf, and
raise :class:`NotPlain` for anything else, so the caller falls back to :func:`flatten`,
which names the key path of every problem.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Sequence
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
    "NotPlain",
    "flatten",
    "format_path",
    "leaf_kind",
    "pair_tensors",
    "plain_tensors",
    "rebuild_plain",
]

#: Leaf kinds, as returned by :func:`leaf_kind`.
LEAF_TENSOR = 0
LEAF_DTENSOR = 1
LEAF_SHARDED = 2
#: A supported non-tensor value (int, float, str, bytes, io.BytesIO, None).
LEAF_VALUE = 3
#: Any other object, accepted only with ``type_check=False``.
LEAF_OTHER = 4

_VALUE_TYPES = (int, float, str, bytes, io.BytesIO, type(None))

# Recipe nodes: a leaf slot, or a container with the recipes of its children.
_LEAF = 0
_DICT = 1
_LIST = 2
_TUPLE = 3
# Only in the recipes of plain_tensors: a dict whose values are all plain tensors, and a
# value leaf kept in the recipe itself.
_TENSOR_DICT = 4
_VALUE = 5


class CompanionMismatch(_torch_utils.CompanionMismatch):
    """A companion state dict does not have the structure of the state dict it follows.

    Raised with the key path of the first difference, before anything is written. A
    subclass of PyTorch's ``CompanionMismatch``, so handlers written for it still catch
    ours.
    """


def format_path(path: Sequence[Any]) -> str:
    """``('model', 'layers', 0, 'w')`` -> ``"model.layers.0.w"`` (``"<root>"`` when empty)."""
    return ".".join(map(str, path)) if path else "<root>"


_KIND_BY_TYPE: dict[type, int] = {}


def _classify(value: Any) -> int:
    if isinstance(value, ShardedTensor):
        return LEAF_SHARDED
    if isinstance(value, DTensor):
        return LEAF_DTENSOR
    if isinstance(value, torch.Tensor):
        return LEAF_TENSOR
    if isinstance(value, _VALUE_TYPES):
        return LEAF_VALUE
    return LEAF_OTHER


def leaf_kind(value: Any) -> int:
    """The ``LEAF_*`` kind of a non-container value.

    The kind depends only on the type, so it is cached per type: the traversal of a
    20,000-tensor state dict then costs one dict lookup per leaf instead of a chain of
    ``isinstance`` checks (ShardedTensor and DTensor, being tensor subclasses, are
    tested first).
    """
    kind = _KIND_BY_TYPE.get(type(value))
    if kind is None:
        kind = _KIND_BY_TYPE[type(value)] = _classify(value)
    return kind


class Flat:
    """A state dict flattened into parallel lists.

    Attributes:
        leaves: every non-container value, in traversal order (dict insertion order,
            list index order).
        paths: the key path of each leaf (dict keys as they are, list indices as ints).
        kinds: the ``LEAF_*`` kind of each leaf.
        companions: the companion structure's value at each leaf's path, or ``None``
            when no companion was given.
        top_is_dict: whether the root is a dict (PyTorch returns ``{}`` rather than
            ``None`` for it on ranks outside ``ranks_only``).
    """

    __slots__ = ("leaves", "paths", "kinds", "companions", "top_is_dict", "_recipe")

    def __init__(self) -> None:
        self.leaves: list[Any] = []
        self.paths: list[tuple[Any, ...]] = []
        self.kinds: list[int] = []
        self.companions: list[Any] | None = None
        self.top_is_dict = False
        self._recipe: Any = None

    def tensor_indices(self) -> list[int]:
        """Indices of the tensor leaves (plain, DTensor and ShardedTensor)."""
        return [i for i, k in enumerate(self.kinds) if k <= LEAF_SHARDED]

    def rebuild(self, leaves: Sequence[Any]) -> Any:
        """The original structure with ``leaves[i]`` in place of leaf i (new containers)."""
        if len(leaves) != len(self.leaves):
            raise ValueError(
                f"rebuild: expected {len(self.leaves)} leaves, got {len(leaves)}"
            )
        it = iter(leaves)
        return _build(self._recipe, it)


def _build(recipe: Any, it: Any) -> Any:
    tag = recipe[0]
    if tag == _LEAF:
        return next(it)
    if tag == _DICT:
        return {key: _build(child, it) for key, child in zip(recipe[1], recipe[2])}
    items = [_build(child, it) for child in recipe[1]]
    return tuple(items) if tag == _TUPLE else items


def flatten(
    obj: Any,
    *,
    type_check: bool = True,
    companion: Any = None,
    use_companion: bool = False,
) -> Flat:
    """Flattens ``obj`` into a :class:`Flat`, checking ``companion`` alongside.

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
    flat.top_is_dict = isinstance(obj, dict)
    if use_companion:
        flat.companions = []
    flat._recipe = _walk(obj, (), flat, type_check, companion, use_companion)
    return flat


_LEAF_RECIPE = (_LEAF,)
_CONTAINERS = (dict, list, tuple)


def _walk(
    obj: Any, path: tuple[Any, ...], flat: Flat, type_check: bool, comp: Any, use_comp: bool
) -> Any:
    if isinstance(obj, dict):
        # A None companion below the root means "no companion here", as in PyTorch.
        has_comp = use_comp and comp is not None
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
        keys = list(obj.keys())
        children = [
            _child(obj[key], path + (key,), flat, type_check,
                   comp[key] if has_comp else None, use_comp)
            for key in keys
        ]
        return (_DICT, keys, children)
    if isinstance(obj, (list, tuple)):
        has_comp = use_comp and comp is not None
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
        children = [
            _child(value, path + (i,), flat, type_check, comp[i] if has_comp else None, use_comp)
            for i, value in enumerate(obj)
        ]
        return (_TUPLE if isinstance(obj, tuple) else _LIST, children)
    return _child(obj, path, flat, type_check, comp, use_comp)


def _child(
    value: Any, path: tuple[Any, ...], flat: Flat, type_check: bool, comp: Any, use_comp: bool
) -> Any:
    # Leaves are recorded here without another call level: this runs once per tensor.
    if isinstance(value, _CONTAINERS):
        return _walk(value, path, flat, type_check, comp, use_comp)
    kind = _KIND_BY_TYPE.get(type(value))
    if kind is None:
        kind = leaf_kind(value)
    if kind == LEAF_OTHER and type_check:
        raise ValueError(
            f"Unexpected value type {type(value)} at key path {format_path(path)!r}; "
            "pass type_check=False to accept it"
        )
    flat.leaves.append(value)
    flat.paths.append(path)
    flat.kinds.append(kind)
    if flat.companions is not None:
        flat.companions.append(comp)
    return _LEAF_RECIPE


# ---------------------------------------------------------------- fast walks

#: Node kinds of the fast walks: the LEAF_* kinds, plus the containers.
_NODE_DICT = 5
_NODE_LIST = 6
_NODE_TUPLE = 7

# type -> node kind. Like _KIND_BY_TYPE, it depends only on the type; a dict level is
# classified in bulk by looking up the set of its value types here.
_NODE_BY_TYPE: dict[type, int] = {dict: _NODE_DICT, list: _NODE_LIST, tuple: _NODE_TUPLE}


class NotPlain(Exception):
    """A fast walk met something it leaves to :func:`flatten` (which explains problems)."""


def _node_kind(value: Any) -> int:
    kind = _NODE_BY_TYPE.get(type(value))
    if kind is None:
        # Same order as _walk: dict, then list / tuple, then the leaf kinds.
        if isinstance(value, dict):
            kind = _NODE_DICT
        elif isinstance(value, tuple):
            kind = _NODE_TUPLE
        elif isinstance(value, list):
            kind = _NODE_LIST
        else:
            kind = leaf_kind(value)
        _NODE_BY_TYPE[type(value)] = kind
    return kind


def _all_plain_tensors(values: list[Any]) -> bool:
    # One C-level pass builds the set of types (usually one or two); a type not seen
    # before answers False, and the per-value walk then classifies it for next time.
    return all(_NODE_BY_TYPE.get(t) == LEAF_TENSOR for t in set(map(type, values)))


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
    kind = _NODE_BY_TYPE.get(type(obj))
    if kind is None:
        kind = _node_kind(obj)
    if kind == _NODE_DICT:
        if not isinstance(comp, dict):
            raise NotPlain
        values = list(obj.values())
        if type(comp) is dict and list(obj) == list(comp):
            # The usual companion (made from the source): same keys in the same order,
            # so the result is a plain copy of it, with no hashing at all.
            comps = list(comp.values())
            if _all_plain_tensors(values) and _all_plain_tensors(comps):
                srcs += values
                dsts += comps
                return comp.copy()
        elif comp.keys() != obj.keys():
            raise NotPlain
        comps = list(map(comp.__getitem__, obj))
        if _all_plain_tensors(values) and _all_plain_tensors(comps):
            srcs += values
            dsts += comps
            return dict(zip(obj, comps))
        return {
            key: _pairs(value, c, type_check, dsts, srcs)
            for key, value, c in zip(obj, values, comps)
        }
    if kind == _NODE_LIST or kind == _NODE_TUPLE:
        if not isinstance(comp, (list, tuple)) or len(comp) != len(obj):
            raise NotPlain
        items = [_pairs(value, c, type_check, dsts, srcs) for value, c in zip(obj, comp)]
        return tuple(items) if kind == _NODE_TUPLE else items
    if kind == LEAF_VALUE:
        return obj
    comp_kind = _NODE_BY_TYPE.get(type(comp))
    if comp_kind is None:
        comp_kind = _node_kind(comp)
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
    kind = _NODE_BY_TYPE.get(type(obj))
    if kind is None:
        kind = _node_kind(obj)
    if kind == _NODE_DICT:
        values = list(obj.values())
        if _all_plain_tensors(values):
            tensors += values
            return (_TENSOR_DICT, list(obj))
        return (_DICT, list(obj), [_plain(value, tensors, type_check) for value in values])
    if kind == _NODE_LIST or kind == _NODE_TUPLE:
        return (
            _TUPLE if kind == _NODE_TUPLE else _LIST,
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
    if tag == _LEAF:
        return next(it)
    if tag == _TENSOR_DICT:
        # zip stops on the keys before taking another tensor from the shared iterator.
        return dict(zip(recipe[1], it))
    if tag == _VALUE:
        return recipe[1]
    if tag == _DICT:
        return {key: _rebuild_plain(child, it) for key, child in zip(recipe[1], recipe[2])}
    items = [_rebuild_plain(child, it) for child in recipe[1]]
    return tuple(items) if tag == _TUPLE else items
