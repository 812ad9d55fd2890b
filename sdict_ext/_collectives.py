"""Shared pieces of the coalesced collectives: agreement, buckets, DTensor boxes.

Used by :mod:`sdict_ext._gather` and :mod:`sdict_ext._broadcast`.

*Agreement.* Before any bulk collective, every rank reports whether building its plan
(validation, allocations) failed, plus a digest of the plan, in one tiny
``all_reduce``. If any rank failed, or the plans differ, every rank raises, so no rank
is ever left waiting in a bulk collective that another rank will never enter.

*Buckets.* Tensors are split into ``ceil(total / bucket_bytes)`` contiguous runs of
nearly equal bytes, so the number of bulk collectives is exactly the ceiling of the
total over the bucket size (each bucket holds at most ``bucket_bytes`` plus one tensor).
"""

from __future__ import annotations

import hashlib
import math
import traceback
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DeviceMesh, DTensor, Replicate, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from sdict_ext import ops

__all__ = [
    "BoxCache",
    "DEFAULT_BUCKET_BYTES",
    "RankFailure",
    "agree",
    "box_of",
    "buckets",
    "buckets_with_solos",
    "compute_box",
    "digest",
    "dtensor_boxes",
    "is_plain_placement",
    "local_box",
    "mesh_coordinates",
    "mesh_shape",
    "dtensor_of",
    "slice_bytes",
    "status_device",
]

#: Default bytes per bucket: one bucket is the extra memory a gather / broadcast needs.
DEFAULT_BUCKET_BYTES = 256 << 20

#: Most bytes per pipelined exchange slice. A bucket's worth of data is exchanged in
#: slices, one asynchronous collective each, while this thread packs the next slice
#: and unpacks the previous one (two slice buffers, so at most one bucket of extra
#: memory). Small enough for the buffers to come from the allocator's reused memory
#: call after call: on the 2-core dev VM, first-touching a fresh 200 MB buffer took
#: longer than broadcasting it (~3 us per 4 KiB page fault).
PIPELINE_SLICE_BYTES = 8 << 20


def slice_bytes(bucket_bytes: int) -> int:
    """The pipelined slice size for ``bucket_bytes``: half a bucket, at most
    :data:`PIPELINE_SLICE_BYTES`."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    return max(1, min(bucket_bytes // 2, PIPELINE_SLICE_BYTES))


class RankFailure(RuntimeError):
    """Raised on the ranks that did not fail themselves when another rank's plan failed.

    Attributes:
        failures: rank -> the failing rank's error text.
    """

    def __init__(self, message: str, failures: dict[int, str]) -> None:
        super().__init__(message)
        self.failures = failures


def status_device(group: dist.ProcessGroup) -> torch.device:
    """The device a small control tensor must live on for collectives on ``group``."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def digest(items: Sequence[Any]) -> int:
    """A 56-bit digest of ``repr(items)``, identical on every rank for equal plans.

    Python's ``hash`` of strings differs between processes, so a real hash is used;
    56 bits keep both the digest and its negation inside int64.
    """
    h = hashlib.blake2b(repr(items).encode(), digest_size=7)
    return int.from_bytes(h.digest(), "little")


def agree(
    group: dist.ProcessGroup, error: BaseException | None, plan_digest: int, what: str
) -> None:
    """Makes every rank of ``group`` raise if any rank failed or the plans differ.

    One ``all_reduce(MAX)`` of ``[failed, digest, -digest]`` on the happy path; only
    when something is wrong, one ``all_gather_object`` collects the messages. The rank
    that failed re-raises its own exception; the others raise :class:`RankFailure`
    naming it.

    Args:
        group: every rank of it must call this.
        error: this rank's failure, or None.
        plan_digest: :func:`digest` of what this rank is about to send and expect.
        what: the calling function's name, for messages.
    """
    flags = torch.tensor(
        [1 if error is not None else 0, plan_digest, -plan_digest],
        dtype=torch.int64,
        device=status_device(group),
    )
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    failed, high, neg_low = flags.tolist()
    if not failed and high == -neg_low:
        return
    text = None
    if error is not None:
        text = "".join(traceback.format_exception_only(type(error), error)).strip()
    reports: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(reports, (text, plan_digest), group=group)
    failures = {r: t for r, (t, _) in enumerate(reports) if t is not None}
    if not failures:
        groups: dict[int, list[int]] = {}
        for r, (_, d) in enumerate(reports):
            groups.setdefault(d, []).append(r)
        failures = {
            ranks[0]: f"ranks {ranks} see a different state dict (keys, shapes, dtypes or "
            "placements) than the other ranks"
            for ranks in groups.values()
        }
        message = (
            f"{what}: the ranks disagree on the state dict; every rank must pass the same "
            f"keys, shapes, dtypes and placements: rank groups {sorted(groups.values())}"
        )
        raise RankFailure(message, failures)
    if error is not None:
        raise error
    lines = "; ".join(f"rank {r}: {t}" for r, t in sorted(failures.items()))
    raise RankFailure(f"{what} failed on another rank, so no rank proceeded: {lines}", failures)


def buckets(costs: Sequence[int], bucket_bytes: int) -> list[range]:
    """Splits items (in order) into at most ``ceil(sum(costs) / bucket_bytes)`` runs.

    Each run holds nearly ``total / n`` bytes; an item goes to the run its midpoint
    falls in, so a run exceeds ``bucket_bytes`` by at most one item. Empty runs are
    dropped.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    n_items = len(costs)
    if n_items == 0:
        return []
    total = sum(costs)
    n = max(1, math.ceil(total / bucket_bytes))
    target = total / n if total else 1.0
    runs: list[range] = []
    start = 0
    cursor = 0
    current = 0
    for i, cost in enumerate(costs):
        b = min(n - 1, int((cursor + cost / 2) // target))
        if b != current and i > start:
            runs.append(range(start, i))
            start = i
        current = b
        cursor += cost
    runs.append(range(start, n_items))
    return runs


def buckets_with_solos(
    costs: Sequence[int], bucket_bytes: int, solo: Sequence[bool], min_solo: int
) -> list[list[int]]:
    """Buckets where big items may travel alone, still at most ``ceil(total / bucket_bytes)``.

    An item flagged in ``solo`` and costing at least ``min_solo`` gets a bucket of its
    own (its exchange then needs no buffer), biggest first, as long as the total count
    stays within the ceiling: an item of a bucket or more always fits. The other items
    are cut by :func:`buckets`, in order. Returns the shared buckets, then the solo ones
    (item indices in order in each); every rank computes the same from the same costs.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    total = sum(costs)
    limit = max(1, math.ceil(total / bucket_bytes)) if costs else 0
    candidates = sorted(
        (j for j, c in enumerate(costs) if solo[j] and c and c >= min_solo),
        key=lambda j: (-costs[j], j),
    )
    alone: set[int] = set()
    rest = total
    for j in candidates:
        if len(alone) + 1 + math.ceil((rest - costs[j]) / bucket_bytes) <= limit:
            alone.add(j)
            rest -= costs[j]
    others = [j for j in range(len(costs)) if j not in alone]
    shared = buckets([costs[j] for j in others], bucket_bytes)
    return [[others[k] for k in run] for run in shared] + [[j] for j in sorted(alone)]


def is_plain_placement(placements: Sequence[Any]) -> bool:
    """Whether every placement is exactly ``Shard`` or ``Replicate``.

    Only those describe a dense box of the full tensor per rank; ``Partial`` needs a
    reduction and ``_StridedShard`` an interleaving, so those go through PyTorch.
    """
    return all(type(p) is Shard or isinstance(p, Replicate) for p in placements)


_MESHES: dict[int, tuple[Any, dict[int, tuple[int, ...]], tuple[int, ...]]] = {}


def _mesh_facts(mesh: DeviceMesh) -> tuple[Any, dict[int, tuple[int, ...]], tuple[int, ...]]:
    cached = _MESHES.get(id(mesh))
    if cached is not None and cached[0] is mesh:
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
    facts = (mesh, coords, tuple(mesh.shape))
    _MESHES[id(mesh)] = facts
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
    autograd Function and wraps a view of ``local`` (~450 us per tensor on the 2-core CI
    machine), and a new ``DTensorSpec`` validates itself (~60 us), which for thousands
    of DTensors is most of a state-dict call. ``like``'s own spec is reused when it
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
    # Placements are C++ objects: hashing / comparing them costs ~0.3 us.
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

