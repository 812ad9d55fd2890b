"""DTensor boxes: which box of the full tensor each rank of a mesh holds."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.tensor import DeviceMesh, DTensor, Replicate, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from sdict_ext import ops

__all__ = [
    "BoxCache",
    "box_of",
    "compute_box",
    "dtensor_boxes",
    "dtensor_of",
    "is_plain_placement",
    "local_box",
    "mesh_coordinates",
    "mesh_shape",
]


def is_plain_placement(placements: Sequence[Any]) -> bool:
    """Whether every placement is exactly ``Shard`` or ``Replicate``.

    Only those describe a dense box of the full tensor per rank; ``Partial`` needs a
    reduction and ``_StridedShard`` an interleaving, so those go through PyTorch.
    """
    return all(type(p) is Shard or isinstance(p, Replicate) for p in placements)


_Facts = tuple[weakref.ref, dict[int, tuple[int, ...]], tuple[int, ...]]

# Per mesh object, keyed by id() and holding the mesh only weakly: a training job may
# build meshes over and over (tests, elastic restarts), and a cache that kept each one
# alive would keep its process groups' Python objects alive too. The entry goes when
# its mesh is collected. A plain id-keyed dict rather than a WeakKeyDictionary: it is
# read once per tensor, and DeviceMesh's __hash__ / __eq__ (over its rank layout) cost
# far more than an int lookup; identity, not equality, is what the cache answers for.
_MESHES: dict[int, _Facts] = {}


def _forget(key: int, ref: weakref.ref) -> None:
    # Only the entry of the mesh that died: its id may already be a new mesh's.
    if _MESHES.get(key, (None,))[0] is ref:
        del _MESHES[key]


def _mesh_facts(mesh: DeviceMesh) -> _Facts:
    key = id(mesh)
    cached = _MESHES.get(key)
    if cached is not None and cached[0]() is mesh:
        return cached
    ranks = mesh.mesh.tolist()
    coords: dict[int, tuple[int, ...]] = {}

    def walk(node: Any, prefix: tuple[int, ...]) -> None:
        if isinstance(node, list):
            for i, child in enumerate(node):
                walk(child, prefix + (i,))
        else:
            coords[int(node)] = prefix

    walk(ranks, ())
    facts = (weakref.ref(mesh, lambda ref: _forget(key, ref)), coords, tuple(mesh.shape))
    _MESHES[key] = facts
    return facts


def mesh_coordinates(mesh: DeviceMesh) -> dict[int, tuple[int, ...]]:
    """Global rank -> coordinate in ``mesh`` (cached per mesh object)."""
    return _mesh_facts(mesh)[1]


def mesh_shape(mesh: DeviceMesh) -> tuple[int, ...]:
    """``mesh.shape``, cached per mesh object (the property recomputes it from the
    mesh's layout on every access: tens of microseconds, per tensor)."""
    return _mesh_facts(mesh)[2]


def dtensor_of(
    local: torch.Tensor,
    like: DTensor,
    shape: Sequence[int] | None = None,
    stride: Sequence[int] | None = None,
) -> DTensor:
    """A DTensor holding ``local``, on ``like``'s mesh and placements.

    What ``DTensor.from_local(local, like.device_mesh, like.placements,
    run_check=False, shape=shape, stride=stride)`` gives for a new local tensor that
    needs no autograd history, at a fraction of the cost: ``from_local`` runs an
    autograd Function and wraps a view of ``local``, and a new ``DTensorSpec``
    validates itself, both per tensor, which for thousands of DTensors is most of a
    state-dict call. ``like``'s own spec is reused when it
    already describes the result (same global shape, stride and dtype): the usual case
    of loading into a model of the same shapes.

    Args:
        local: the local tensor, held as it is.
        like: the DTensor whose mesh and placements the result takes.
        shape: global shape; default ``like.shape``.
        stride: global stride; default ``like.stride()``.
    """
    spec = like._spec
    shape = like.shape if shape is None else torch.Size(shape)
    stride = like.stride() if stride is None else tuple(stride)
    wanted = (shape, stride, local.dtype)
    meta = spec.tensor_meta
    if meta is None or (meta.shape, tuple(meta.stride), meta.dtype) != wanted:
        spec = DTensorSpec(spec.mesh, spec.placements, tensor_meta=TensorMeta(*wanted))
    return DTensor(local, spec, requires_grad=local.requires_grad)


def box_of(
    full_shape: Sequence[int],
    mesh_shape: Sequence[int],
    coord: Sequence[int],
    placements: Sequence[Any],
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The (shape, start) box of the full tensor held at mesh coordinate ``coord``.

    For ``Shard`` / ``Replicate`` placements only, matching
    ``torch.distributed.tensor._utils.compute_local_shape_and_global_offset`` (which
    only answers for the calling rank): each ``Shard(d)`` splits the current extent of
    dim d as ``torch.chunk`` does, mesh dims applied left to right.
    """
    shape = list(full_shape)
    start = [0] * len(shape)
    for mesh_dim, placement in enumerate(placements):
        if type(placement) is not Shard:
            continue
        d = placement.dim if placement.dim >= 0 else placement.dim + len(shape)
        n, k, r = shape[d], mesh_shape[mesh_dim], coord[mesh_dim]
        chunk = -(-n // k) if n else 0
        lo = min(chunk * r, n)
        size = max(0, min(n, lo + chunk) - lo)
        start[d] += lo
        shape[d] = size
    return tuple(shape), tuple(start)


BoxCache = dict[Any, Any]


def local_box(
    shape: tuple[int, ...], local: DTensor, rank: int, cache: BoxCache | None = None
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """This rank's (shape, start) box of a full tensor laid out like ``local``.

    The same box as PyTorch's ``compute_local_shape_and_global_offset``, which this
    falls back to for placements other than Shard / Replicate; for those, the
    arithmetic on cached mesh coordinates costs a fraction of it (it builds index
    tensors per call). ``cache`` (one per call of a state-dict function) remembers each
    distinct (mesh, placements, shape): a model repeats a few shapes many times.
    """
    spec = local._spec
    if cache is None:
        return compute_box(shape, spec.mesh, spec.placements, rank)
    # Placements are C++ objects whose hash / compare is not free, but far cheaper
    # than compute_box; the mesh by id, as DeviceMesh equality compares rank layouts.
    key = (id(spec.mesh), spec.placements, shape)
    box = cache.get(key, cache)
    if box is cache:
        box = cache[key] = compute_box(shape, spec.mesh, spec.placements, rank)
    return box


def compute_box(
    shape: tuple[int, ...], mesh: Any, placements: Any, rank: int
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    if not is_plain_placement(placements):
        box_shape, box_start = compute_local_shape_and_global_offset(shape, mesh, placements)
        if not box_start and tuple(box_shape) == (0,):
            return None
        return tuple(box_shape), tuple(box_start)
    coord = mesh_coordinates(mesh).get(rank)
    if coord is None:
        return None
    return box_of(shape, mesh_shape(mesh), coord, placements)


def dtensor_boxes(
    values: list[Any],
    shapes: list[tuple[int, ...]] | None,
    dtypes: list[torch.dtype] | None,
    rank: int,
) -> list[Any]:
    """Per value, this rank's ``(local tensor, box shape, box start, address, full
    shape)`` of a full tensor of ``shapes[i]`` (None: each value's own global shape, as
    a tuple), where the value is
    exactly a DTensor of Shard / Replicate placements whose local tensor is a CPU
    tensor of that box's shape and of ``dtypes[i]`` (None: any); else None (plan that
    value through :func:`local_box`). ``address`` is the box's first byte, 0 when the
    box is empty. The boxes are :func:`box_of`'s, computed in one C++ call; without the
    extension every entry is None.
    """
    made = ops.extension_entry("dtensor_boxes")
    if made is None or not values:
        return [None] * len(values)

    def facts(mesh: DeviceMesh) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
        return mesh_shape(mesh), mesh_coordinates(mesh).get(rank)

    return made(values, shapes, dtypes, (DTensor, Shard, Replicate), facts)

