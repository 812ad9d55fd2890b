"""Multi-process specs for the collective functions of ``sdict_ext.utils``.

Every case runs ours and PyTorch's ``torch.distributed._state_dict_utils`` function on
the same inputs in the same gloo group and requires bit-identical results. Workers are
module-level functions run by ``tests.mp.run_on_ranks``; they catch expected failures
themselves and return what they saw, so a failure test does not discard the pool.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed import _state_dict_utils as ref
from torch.distributed.tensor import (
    DTensor,
    Partial,
    Replicate,
    Shard,
    distribute_tensor,
    init_device_mesh,
)

import sdict_ext.collectives.broadcast.direct as _direct_mod
import sdict_ext.collectives.broadcast.main as _broadcast_mod
import sdict_ext.collectives.broadcast.meta as _meta_mod
import sdict_ext.collectives.broadcast.p2p as _p2p_mod
from sdict_ext import ops, utils
from tests.mp import run_fresh, run_on_ranks

# The in-place all-gather the gather issues per bucket: all_gather_single where torch
# has it (2.13), all_gather_into_tensor before (2.11, the GPU machine's torch).
ALL_GATHER = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"

pytestmark = pytest.mark.dist

_MESHES: dict[tuple[int, ...], Any] = {}


def _mesh(shape: tuple[int, ...]):
    # Device meshes create process groups (collectively), so each worker builds a
    # shape once and reuses it across calls.
    if shape not in _MESHES:
        _MESHES[shape] = init_device_mesh("cpu", shape)
    return _MESHES[shape]


def _full(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        # Integer-valued floats, so a Partial sum is exact whatever the reduction order.
        return torch.randint(-50, 50, shape, generator=g).to(dtype)
    return torch.randint(-50, 50, shape, generator=g, dtype=dtype)


def _dt(shape, dtype, seed, mesh_shape, placements) -> DTensor:
    return distribute_tensor(
        _full(shape, dtype, seed), _mesh(mesh_shape), placements, src_data_rank=None
    )


def _partial(shape, seed, mesh_shape) -> DTensor:
    rank = dist.get_rank()
    local = _full(shape, torch.float32, seed + rank)
    return DTensor.from_local(local, _mesh(mesh_shape), [Partial()], run_check=False)


def _sharded_tensor(rows: int, cols: int, seed: int):
    from torch.distributed._shard.sharded_tensor import empty as st_empty
    from torch.distributed._shard.sharding_spec import ChunkShardingSpec

    ws = dist.get_world_size()
    spec = ChunkShardingSpec(dim=0, placements=[f"rank:{r}/cpu" for r in range(ws)])
    st = st_empty(spec, rows, cols)
    full = _full((rows, cols), torch.float32, seed)
    for shard in st.local_shards():
        off = shard.metadata.shard_offsets[0]
        shard.tensor.copy_(full[off : off + shard.tensor.shape[0]])
    return st


def _describe(value: Any) -> Any:
    """A picklable, comparable description of a result (tensors by their bytes)."""
    if isinstance(value, DTensor):
        return (
            "DTensor",
            tuple(value.shape),
            tuple(value.stride()),
            str(value.dtype),
            value.requires_grad,
            value.device_mesh.mesh.tolist(),
            tuple(value.placements),
            _describe(value.to_local()),
        )
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        data = t.view(-1).view(torch.uint8).tolist() if t.numel() else []
        return ("T", tuple(t.shape), str(t.dtype), str(value.device), data)
    if isinstance(value, dict):
        return {k: _describe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [_describe(v) for v in value])
    return value


# ---------------------------------------------------------------- gather


def _gather_cases() -> dict[str, Any]:
    ws = dist.get_world_size()
    sd: dict[str, Any] = {
        "even_s0": _dt((4 * ws, 3), torch.float32, 1, (ws,), [Shard(0)]),
        "uneven_s0": _dt((ws + 1, 3), torch.float32, 2, (ws,), [Shard(0)]),
        "fewer_rows_than_ranks": _dt((ws - 1, 2), torch.bfloat16, 3, (ws,), [Shard(0)]),
        "uneven_s1": _dt((3, 2 * ws - 1), torch.int64, 4, (ws,), [Shard(1)]),
        "s2": _dt((2, 3, ws + 2), torch.float16, 5, (ws,), [Shard(2)]),
        "replicate": _dt((3, 3), torch.float32, 6, (ws,), [Replicate()]),
        "partial": _partial((2, 3), 7, (ws,)),
        "scalar": _dt((), torch.float32, 8, (ws,), [Replicate()]),
        "plain": _full((2, 2), torch.float32, 9),
        "nested": {"list": [_dt((5, 2), torch.float32, 10, (ws,), [Shard(0)]), 7, "s"],
                   "none": None, "tuple": (1.5, b"raw")},
        "sharded_tensor": _sharded_tensor(2 * ws + 1, 3, 11),
    }
    if ws == 4:
        sd.update(
            {
                "2d_s0_s1": _dt((3, 5), torch.float32, 20, (2, 2), [Shard(0), Shard(1)]),
                "2d_s0_s1_empty": _dt((1, 3), torch.float32, 21, (2, 2), [Shard(0), Shard(1)]),
                "2d_rep_s0": _dt((5, 3), torch.float32, 22, (2, 2), [Replicate(), Shard(0)]),
                "2d_s1_rep": _dt((3, 5), torch.int32, 23, (2, 2), [Shard(1), Replicate()]),
                "2d_s0_s0": _dt((7, 2), torch.float32, 24, (2, 2), [Shard(0), Shard(0)]),
            }
        )
    return sd


def _gather_matches_pytorch(cpu_offload: bool, ranks_only: tuple[int, ...], bucket: int):
    sd = _gather_cases()
    ours = utils.gather_state_dict(
        sd, cpu_offload=cpu_offload, ranks_only=ranks_only, bucket_bytes=bucket
    )
    theirs = ref._gather_state_dict(sd, cpu_offload=cpu_offload, ranks_only=ranks_only)
    return _describe(ours), _describe(theirs)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize(
    ("cpu_offload", "ranks_only", "bucket"),
    [(False, (), 1 << 20), (True, (0,), 64), (False, (1,), 200)],
)
def test_gather_matches_pytorch_bit_exact(world_size, cpu_offload, ranks_only, bucket):
    results = run_on_ranks(
        world_size, _gather_matches_pytorch, cpu_offload, ranks_only, bucket, timeout=120
    )
    for rank, (ours, theirs) in enumerate(results):
        assert ours == theirs, f"rank {rank}"
        if ranks_only and rank not in ranks_only:
            assert ours == {}
        else:
            assert ours["uneven_s0"][0] == "T"


# How deep this process is inside broadcast_state_dict's metadata exchange.
_IN_METADATA = [0]


def watch_metadata() -> None:
    """Lets :func:`metadata_call` tell the metadata exchange's broadcasts from the
    tensors': wraps ``meta.broadcast_bytes``, through which every metadata broadcast
    goes, to count its depth around the original. Once per process: the wrapper
    changes nothing else, so it may stay in the pooled workers."""
    if getattr(_meta_mod.broadcast_bytes, "watched", False):
        return
    original = _meta_mod.broadcast_bytes

    def watched(*args, **kwargs):
        _IN_METADATA[0] += 1
        try:
            return original(*args, **kwargs)
        finally:
            _IN_METADATA[0] -= 1

    watched.watched = True
    _meta_mod.broadcast_bytes = watched


def metadata_call() -> bool:
    """Whether the ``dist`` call being counted is broadcast_state_dict's metadata
    exchange (one or two broadcasts a call), which moves no tensor data. Counters call
    :func:`watch_metadata` before they wrap ``dist``."""
    return _IN_METADATA[0] > 0


def _count_calls(fn_names: list[str]):
    watch_metadata()
    counts = dict.fromkeys(fn_names, 0)
    originals = {name: getattr(dist, name) for name in fn_names}

    def wrap(name):
        def counted(*args, **kwargs):
            if not metadata_call():
                counts[name] += 1
            return originals[name](*args, **kwargs)

        return counted

    for name in fn_names:
        setattr(dist, name, wrap(name))
    return counts, originals


def _thousand_shapes(ws: int, mixed: bool) -> list[tuple[int, int]]:
    """1000 small (4 * ws, 8) float32 tensors; ``mixed`` swaps in, every 250, one of two
    64 KiB buckets per rank (even: gathered in place), one of half a bucket, and one
    uneven one of two buckets."""
    shapes = [(4 * ws, 8)] * 1000
    if mixed:
        for base in range(0, 1000, 250):
            shapes[base] = (2048 * ws, 8)
            shapes[base + 7] = (256 * ws, 8)
            shapes[base + 13] = (2048 * ws + 1, 8)
    return shapes


def _gather_thousand(bucket: int, mixed: bool = False):
    ws = dist.get_world_size()
    shapes = _thousand_shapes(ws, mixed)
    sd = {f"w{i}": _dt(s, torch.float32, i, (ws,), [Shard(0)]) for i, s in enumerate(shapes)}
    total = sum(v.numel() * v.element_size() for v in sd.values())
    counts, originals = _count_calls(["broadcast", ALL_GATHER, "all_reduce"])
    try:
        out = utils.gather_state_dict(sd, bucket_bytes=bucket)
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    keys = ("w0", "w7", "w13", "w500", "w507", "w513", "w999")
    same = all(torch.equal(out[k], sd[k].full_tensor()) for k in keys)
    return counts, total, same


@pytest.mark.parametrize("mixed", [False, True])
def test_gather_of_1000_dtensors_uses_one_exchange_per_bucket(mixed):
    bucket = 64 << 10
    results = run_on_ranks(2, _gather_thousand, bucket, mixed, timeout=120)
    # Exchanges are pipelined in slices of half a bucket (two slice buffers in flight).
    slice_bytes = bucket // 2
    for counts, total, same in results:
        assert same
        # One all-gather per slice (PyTorch: one per tensor), nothing else in bulk;
        # big tensors travelling alone stay within the same ceiling.
        assert counts[ALL_GATHER] <= math.ceil(total / slice_bytes)
        if not mixed:
            assert counts[ALL_GATHER] == math.ceil(total / slice_bytes)
        assert counts["broadcast"] == 0
        assert counts["all_reduce"] == 1  # the agreement before the bulk exchange


def _gather_failure(kind: str):
    rank = dist.get_rank()
    sd: dict[str, Any] = {"w": _dt((4, 2), torch.float32, 1, (2,), [Shard(0)])}
    if kind == "bad_leaf" and rank == 1:
        sd["oops"] = {1, 2}
    if kind == "shape" and rank == 0:
        sd["w"] = _dt((6, 2), torch.float32, 1, (2,), [Shard(0)])
    try:
        utils.gather_state_dict(sd)
    except Exception as exc:  # noqa: BLE001 - the spec is about which exception
        return type(exc).__name__, str(exc)
    return None


def test_gather_failure_on_one_rank_raises_on_every_rank():
    results = run_on_ranks(2, _gather_failure, "bad_leaf", timeout=60)
    assert results[1][0] == "ValueError" and "oops" in results[1][1]
    assert results[0][0] == "RankFailure" and "rank 1" in results[0][1]
    results = run_on_ranks(2, _gather_failure, "shape", timeout=60)
    assert [r[0] for r in results] == ["RankFailure", "RankFailure"]
    assert run_on_ranks(2, _gather_failure, "none", timeout=60) == [None, None]


def _st_from_boxes(full: torch.Tensor, boxes: list[list[tuple]]):
    """A ShardedTensor of ``full`` whose rank r holds the (sizes, offsets) ``boxes[r]``,
    built from metadata (any layout, not only what a ShardingSpec makes)."""
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard as STShard
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed._shard.sharded_tensor.metadata import (
        ShardedTensorMetadata,
        TensorProperties,
    )

    metas, mine = [], []
    for r, pieces in enumerate(boxes):
        for sizes, offsets in pieces:
            m = ShardMetadata(list(offsets), list(sizes), f"rank:{r}/cpu")
            metas.append(m)
            if r == dist.get_rank():
                box = full
                for d, (lo, n) in enumerate(zip(offsets, sizes)):
                    box = box.narrow(d, lo, n)
                mine.append(STShard(box.clone(), m))
    meta = ShardedTensorMetadata(metas, full.shape, TensorProperties(dtype=full.dtype))
    return ShardedTensor._init_from_local_shards_and_global_metadata(mine, meta)


def _chunked_boxes(shape: tuple[int, ...], dim: int, ws: int) -> list[list[tuple]]:
    """ChunkShardingSpec's split: torch.chunk on ``dim``, ranks past the last chunk empty."""
    step = -(-shape[dim] // ws)
    boxes: list[list[tuple]] = [[] for _ in range(ws)]
    for r, lo in enumerate(range(0, shape[dim], step)):
        sizes, offsets = list(shape), [0] * len(shape)
        sizes[dim], offsets[dim] = min(step, shape[dim] - lo), lo
        boxes[r].append((tuple(sizes), tuple(offsets)))
    return boxes


def _gather_sharded_tensors(bucket: int):
    ws = dist.get_world_size()
    # Layouts PyTorch's gather handles (dim-0 chunks, one shard per rank at most): odd,
    # fewer rows than ranks, one row, many small tensors of mixed dtypes.
    dim0 = {
        "odd": _full((2 * ws + 1, 3), torch.float32, 1),
        "fewer_rows": _full((ws - 1, 5), torch.bfloat16, 2),
        "one_row": _full((1, 7), torch.int64, 3),
        "3d": _full((ws + 3, 2, 3), torch.float16, 4),
    }
    for i in range(40):
        dim0[f"many.{i}"] = _full((1 + i % (2 * ws + 1), 3), [torch.float32, torch.int32][i % 2], i)
    # Layouts it does not (it assumes dim-0 chunks): chunked on dim 1, uneven boxes, a
    # rank with two shards, compared with the full tensor itself.
    other = {
        "dim1": (_full((3, 2 * ws + 1), torch.float32, 50), _chunked_boxes((3, 2 * ws + 1), 1, ws)),
        # One row each, then the last rank five.
        "uneven": (_full((ws + 4, 2), torch.float64, 51),
                   [[((1, 2), (r, 0))] for r in range(ws - 1)] + [[((5, 2), (ws - 1, 0))]]),
        "two_shards": (_full((4, 3), torch.float32, 52),
                       [[((1, 3), (0, 0)), ((1, 3), (3, 0))], [((2, 3), (1, 0))]]
                       + [[] for _ in range(ws - 2)]),
    }
    sd = {k: _st_from_boxes(v, _chunked_boxes(tuple(v.shape), 0, ws)) for k, v in dim0.items()}
    sd.update({k: _st_from_boxes(t, boxes) for k, (t, boxes) in other.items()})
    ours = utils.gather_state_dict(sd, bucket_bytes=bucket)
    theirs = ref._gather_state_dict({k: sd[k] for k in dim0})
    want = {k: t for k, (t, _) in other.items()}
    return (
        _describe({k: ours[k] for k in dim0}),
        _describe(theirs),
        _describe({k: ours[k] for k in other}),
        _describe(want),
        _describe(dim0),
    )


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("bucket", [1 << 20, 96])
def test_gather_sharded_tensors_uneven_layouts_match_pytorch(world_size, bucket):
    for rank, (ours, theirs, ours_other, want_other, full) in enumerate(
        run_on_ranks(world_size, _gather_sharded_tensors, bucket, timeout=120)
    ):
        assert ours == theirs, f"rank {rank}"
        assert ours == full, f"rank {rank}"  # and PyTorch's are the full tensors
        assert ours_other == want_other, f"rank {rank}"


# ---------------------------------------------------------------- broadcast / distribute


def _load_inputs(meta_ok: bool = True):
    ws = dist.get_world_size()
    full = {
        "s0": _full((ws + 1, 3), torch.float32, 1),
        "s1": _full((3, 2 * ws - 1), torch.int64, 2),
        "rep": _full((2, 2), torch.bfloat16, 3),
        "plain": _full((3,), torch.float32, 4),
        "cast": _full((4, 2), torch.float32, 5),
        "to_none": _full((2,), torch.float32, 6),
        "meta": _full((ws + 2, 2), torch.float32, 7),
        "only_full": _full((2, 2), torch.float32, 8),
        "step": torch.tensor(3.0),
        "hparam": {"lr": 0.1},
    }
    mesh1 = _mesh((ws,))
    local: dict[str, Any] = {
        "s0": distribute_tensor(torch.zeros(ws + 1, 3), mesh1, [Shard(0)], src_data_rank=None),
        "s1": distribute_tensor(
            torch.zeros(3, 2 * ws - 1, dtype=torch.int64), mesh1, [Shard(1)], src_data_rank=None
        ),
        "rep": distribute_tensor(
            torch.zeros(2, 2, dtype=torch.bfloat16), mesh1, [Replicate()], src_data_rank=None
        ),
        "plain": torch.zeros(3),
        "cast": distribute_tensor(
            torch.zeros(4, 2, dtype=torch.bfloat16), mesh1, [Shard(0)], src_data_rank=None
        ),
        "to_none": None,
        "step": torch.tensor(0.0),
        "hparam": None,
        "local_only": torch.ones(1),
    }
    if meta_ok:
        with torch.device("meta"):
            meta_full = torch.empty(ws + 2, 2)
        local["meta"] = distribute_tensor(meta_full, mesh1, [Shard(0)], src_data_rank=None)
    if ws == 4:
        full["2d"] = _full((3, 5), torch.float32, 9)
        local["2d"] = distribute_tensor(
            torch.zeros(3, 5), _mesh((2, 2)), [Shard(0), Shard(1)], src_data_rank=None
        )
    return full, local


def _two_copies(local: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The local state dict for sdict_ext and for PyTorch: fresh DTensors for PyTorch's
    side, since a loaded DTensor is written in place (meta ones are replaced anyway)."""
    ours, theirs = copy.copy(local), copy.copy(local)
    for key, value in local.items():
        if isinstance(value, DTensor) and not value.is_meta:
            theirs[key] = copy.deepcopy(value)
    return ours, theirs


def _broadcast_matches_pytorch(strict: bool, bucket: int):
    full, local = _load_inputs()
    if dist.get_rank() != 0:
        full = {}
    ours, theirs = _two_copies(local)
    utils.broadcast_state_dict(full, ours, torch.device("cpu"), strict=strict,
                               bucket_bytes=bucket)
    ref._broadcast_state_dict(full, theirs, torch.device("cpu"), strict=strict)
    return _describe(ours), _describe(theirs), list(ours), list(theirs)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize(("strict", "bucket"), [(False, 1 << 20), (True, 48)])
def test_broadcast_matches_pytorch_bit_exact(world_size, strict, bucket):
    results = run_on_ranks(world_size, _broadcast_matches_pytorch, strict, bucket, timeout=120)
    for rank, (ours, theirs, our_keys, their_keys) in enumerate(results):
        assert ours == theirs, f"rank {rank}"
        assert our_keys == their_keys
        assert ours["s0"][0] == "DTensor" and ours["plain"][0] == "T"


def _broadcast_cpu_offload():
    full, local = _load_inputs(meta_ok=False)
    if dist.get_rank() != 0:
        full = {}
    ours = copy.copy(local)
    for key, value in local.items():
        if isinstance(value, DTensor):
            ours[key] = copy.deepcopy(value)
    utils.broadcast_state_dict(full, ours, torch.device("cpu"), cpu_offload=True)
    # PyTorch raises KeyError for a tensor the local state dict lacks ("only_full",
    # "meta") and AttributeError for a None local value, so compare against it on the
    # keys it can handle.
    theirs_full = {k: v for k, v in full.items() if k not in ("only_full", "meta", "to_none")}
    theirs_local = {k: v for k, v in local.items() if k != "to_none"}
    ref._broadcast_state_dict(theirs_full, theirs_local, torch.device("cpu"), cpu_offload=True)
    mine = {k: v for k, v in ours.items() if k != "to_none"}
    return _describe(mine), _describe(theirs_local), "only_full" in ours, ours["to_none"]


def test_broadcast_cpu_offload_skips_keys_only_in_the_full_state_dict():
    for ours, theirs, has_only_full, to_none in run_on_ranks(2, _broadcast_cpu_offload,
                                                             timeout=60):
        assert ours == theirs
        assert not has_only_full and to_none is None


#: The routes a CPU broadcast_state_dict can take: the point-to-point route with direct
#: reads of rank 0's memory (opt-in), with messages only (the default), or none; and
#: the value of its ``route`` keyword that chooses each.
ROUTES = ["direct", "messages", "broadcast"]
ROUTE_KEYWORD = {"direct": "direct", "messages": "p2p", "broadcast": "collective"}


@contextlib.contextmanager
def _swapped(module: Any, name: str, replacement: Any):
    """``module.name`` is ``replacement`` inside the block (left alone when it is None);
    the workers are pooled, so the original is put back."""
    before = getattr(module, name)
    if replacement is not None:
        setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, before)


def _broadcast_thousand(bucket: int, mixed: bool = False, route: str = "messages"):
    ws = dist.get_world_size()
    mesh = _mesh((ws,))
    shapes = _thousand_shapes(ws, mixed)
    full = {f"w{i}": _full(shape, torch.float32, i) for i, shape in enumerate(shapes)}
    local = {
        k: distribute_tensor(torch.zeros(v.shape), mesh, [Shard(0)], src_data_rank=None)
        for k, v in full.items()
    }
    total = sum(v.numel() * v.element_size() for v in full.values())
    # What rank 1 needs of them: its own shards, each slot aligned as pack lays it out.
    shard_bytes = [
        v._local_tensor.numel() * v._local_tensor.element_size() for v in local.values()
    ]
    mine = sum(-(-n // ops.ALIGNMENT) * ops.ALIGNMENT for n in shard_bytes)
    counts, originals = _count_calls(["broadcast", "all_reduce", "isend", "irecv"])
    try:
        utils.broadcast_state_dict(full if dist.get_rank() == 0 else {}, local,
                                   torch.device("cpu"), bucket_bytes=bucket,
                                   route=ROUTE_KEYWORD[route])
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    keys = ("w0", "w7", "w13", "w500", "w507", "w513", "w999")
    same = all(torch.equal(local[k].full_tensor(), full[k]) for k in keys)
    return counts, total, mine, same


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("mixed", [False, True])
def test_broadcast_of_1000_tensors_uses_one_message_per_slice(mixed, route):
    bucket = 64 << 10
    # Exchanges are pipelined in slices of half a bucket (two slice buffers in flight).
    slice_bytes = bucket // 2
    results = run_on_ranks(2, _broadcast_thousand, bucket, mixed, route, timeout=120)
    for rank, (counts, total, _, same) in enumerate(results):
        assert same
        if route == "direct":
            # Rank 1 read its shards out of rank 0's memory: nothing sent; one
            # all_reduce agreed before, one after the reads.
            assert counts["all_reduce"] == 2
            assert counts["broadcast"] == counts["isend"] == counts["irecv"] == 0
            continue
        # One all_reduce: the agreement (the box route's needs table is an all-gather).
        assert counts["all_reduce"] == 1
        if route == "broadcast":
            assert counts["isend"] == counts["irecv"] == 0
            assert counts["broadcast"] <= math.ceil(total / slice_bytes)
            if not mixed:
                assert counts["broadcast"] == math.ceil(total / slice_bytes)
            continue
        # Sharded over the group: rank 1 receives only its own shards, in messages of a
        # slice each, from rank 0; nothing is broadcast.
        assert counts["broadcast"] == 0
        sends, recvs = (counts["isend"], 0) if rank == 0 else (0, counts["irecv"])
        assert (counts["isend"], counts["irecv"]) == (sends, recvs)
    sent, received = results[0][0]["isend"], results[1][0]["irecv"]
    if route == "messages":
        limit = math.ceil(results[1][2] / slice_bytes)
        assert sent == received and 0 < sent <= limit
        if not mixed:
            assert sent == limit


def _hold(local: dict) -> Callable[[], bool]:
    """Snapshots ``local``; the returned check says whether it still holds the same
    objects with the same bytes (nothing may be written when a rank fails)."""
    before = dict(local)
    held = {
        k: (v.to_local() if isinstance(v, DTensor) else v).clone()
        for k, v in local.items() if isinstance(v, torch.Tensor) and not v.is_meta
    }

    def untouched() -> bool:
        return all(local[k] is v for k, v in before.items()) and all(
            torch.equal(local[k].to_local() if isinstance(local[k], DTensor) else local[k], v)
            for k, v in held.items()
        )

    return untouched


def _broadcast_failure(kind: str, route: str):
    full, local = _load_inputs(meta_ok=False)
    rank = dist.get_rank()
    if kind == "source" and rank == 0:
        full["bad"] = local["s0"]  # a DTensor in the full state dict
    if kind == "unpicklable" and rank == 0:
        full["hook"] = lambda: None  # cannot reach the other ranks
    if kind == "local_shape" and rank == 1:
        local["s0"] = distribute_tensor(
            torch.zeros(2 * dist.get_world_size(), 3), _mesh((dist.get_world_size(),)),
            [Shard(0)], src_data_rank=None,
        )
    untouched = _hold(local)
    try:
        utils.broadcast_state_dict(full if rank == 0 else {}, local, torch.device("cpu"),
                                   route=ROUTE_KEYWORD[route])
    except Exception as exc:  # noqa: BLE001
        return type(exc).__name__, untouched()
    return None


@pytest.mark.parametrize("route", ROUTES)
def test_broadcast_failure_on_one_rank_raises_on_every_rank_before_loading(route):
    assert run_on_ranks(2, _broadcast_failure, "source", route, timeout=60) == [
        ("ValueError", True), ("RankFailure", True)]
    assert run_on_ranks(2, _broadcast_failure, "unpicklable", route, timeout=60) == [
        ("ValueError", True), ("RankFailure", True)]
    assert run_on_ranks(2, _broadcast_failure, "local_shape", route, timeout=60) == [
        ("RankFailure", True), ("ValueError", True)]


def _unsendable_source(kind: str) -> torch.Tensor:
    """A tensor rank 0 cannot pack and send, of one kind."""
    if kind == "meta":
        return torch.empty(4, 3, device="meta")
    if kind == "meta_scalar":
        return torch.empty((), device="meta")
    if kind == "sparse_coo":
        return torch.eye(3).to_sparse()
    if kind == "sparse_csr":
        return torch.eye(3).to_sparse_csr()
    if kind == "nested":
        return torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
    if kind == "jagged":
        return torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.jagged)
    if kind == "quantized":
        return torch.quantize_per_tensor(torch.ones(3), 0.5, 0, torch.qint8)
    return torch.ones(2, 2).to_mkldnn()


UNSENDABLE = {
    "meta": "a meta tensor", "meta_scalar": "a meta tensor",
    "sparse_coo": "a torch.sparse_coo tensor", "sparse_csr": "a torch.sparse_csr tensor",
    "nested": "a nested tensor", "jagged": "a nested tensor",
    "quantized": "a quantized tensor", "mkldnn": "a torch._mkldnn tensor",
}


def _broadcast_unsendable_sources(route: str):
    """Per kind of UNSENDABLE: rank 0's full state dict holds such a tensor after the
    good ones, and every rank has a plain local tensor for it (so every route would
    send it). Returns (kind, exception type, message, every local tensor unchanged)."""
    rank = dist.get_rank()
    seen = []
    for kind in UNSENDABLE:
        if kind == "mkldnn" and not torch.backends.mkldnn.is_available():
            continue
        full, local = _load_inputs(meta_ok=False)
        bad = _unsendable_source(kind)
        full["zz_bad"] = bad
        local["zz_bad"] = torch.zeros(() if kind == "meta_scalar" else (3, 3))
        untouched = _hold(local)
        try:
            utils.broadcast_state_dict(full if rank == 0 else {}, local, torch.device("cpu"),
                                       route=ROUTE_KEYWORD[route])
        except Exception as exc:  # noqa: BLE001
            seen.append((kind, type(exc).__name__, str(exc), untouched()))
        else:
            seen.append((kind, None, "", False))
    return seen


@pytest.mark.parametrize("route", ROUTES)
def test_broadcast_raises_on_every_rank_for_unsendable_source_naming_its_key(route):
    # A fresh group with a short collective timeout: a rank left receiving what rank 0
    # fails to send times out (DistBackendError) instead of raising our error.
    ranks = run_fresh(2, _broadcast_unsendable_sources, route, pg_timeout=20, timeout=120)
    expected = [k for k in UNSENDABLE if k != "mkldnn" or torch.backends.mkldnn.is_available()]
    assert [kind for kind, *_ in ranks[0]] == [kind for kind, *_ in ranks[1]] == expected
    for (kind, kind0, text0, untouched0), (_, kind1, text1, untouched1) in zip(*ranks):
        assert (kind0, kind1) == ("ValueError", "RankFailure"), (kind, text0, text1)
        for text in (text0, text1):
            assert "full_state_dict['zz_bad']" in text and UNSENDABLE[kind] in text, text
        assert untouched0 and untouched1, kind


def _broadcast_some_ranks_read(unreadable: int):
    """Rank ``unreadable`` fails its probe of rank 0's memory: it takes messages while
    the other ranks read directly, in the same call."""
    full, local = _load_inputs()
    rank = dist.get_rank()
    if rank != 0:
        full = {}
    ours, theirs = _two_copies(local)
    refused = (lambda source, opted_in: False) if rank == unreadable else None
    counts, originals = _count_calls(["isend", "irecv"])
    try:
        with _swapped(_direct_mod, "can_read", refused):
            utils.broadcast_state_dict(full, ours, torch.device("cpu"), bucket_bytes=4096,
                                       route="direct")
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    ref._broadcast_state_dict(full, theirs, torch.device("cpu"))
    return _describe(ours), _describe(theirs), counts


def test_broadcast_mixes_direct_reads_and_messages_per_rank_like_pytorch():
    results = run_on_ranks(4, _broadcast_some_ranks_read, 2, timeout=120)
    for rank, (ours, theirs, _) in enumerate(results):
        assert ours == theirs, f"rank {rank}"
    counts = [c for _, _, c in results]
    # Only rank 2 was sent anything; ranks 1 and 3 read all of theirs.
    assert counts[0]["isend"] == counts[2]["irecv"] > 0
    assert counts[1]["irecv"] == counts[3]["irecv"] == 0


def _broadcast_read_refused():
    """Rank 1's direct read is refused after every rank agreed (rank 0's process
    vanishing mid-call would look so): every rank must raise, none may hang."""
    full, local = _load_inputs(meta_ok=False)
    rank = dist.get_rank()
    before = _direct_mod._read_boxes
    calls = []

    def refuse(pid, addrs, *args):
        calls.append(len(addrs))
        if len(addrs) > 1:  # the probe (one box) passes; the reads do not
            raise RuntimeError("sdict_ext.read_process_boxes: refused for the test")
        return before(pid, addrs, *args)

    try:
        with _swapped(_direct_mod, "_read_boxes", refuse if rank == 1 else None):
            utils.broadcast_state_dict(full if rank == 0 else {}, local, torch.device("cpu"),
                                       route="direct")
    except Exception as exc:  # noqa: BLE001
        return type(exc).__name__, str(exc)[:200], calls
    return None, "", calls


def test_broadcast_direct_read_refused_raises_on_every_rank():
    (kind0, text0, _), (kind1, text1, calls) = run_on_ranks(
        2, _broadcast_read_refused, timeout=60
    )
    assert calls and calls[0] == 1 and calls[-1] > 1
    assert (kind0, kind1) == ("RankFailure", "RuntimeError")
    assert "refused for the test" in text0 and "refused for the test" in text1


def _count_direct_reads() -> tuple[list[int], Any]:
    """Wraps the route's read primitive: the box counts of its calls, and the original."""
    before = _direct_mod._read_boxes
    calls: list[int] = []

    def counted(pid, addrs, *args):
        calls.append(len(addrs))
        return before(pid, addrs, *args)

    _direct_mod._read_boxes = counted
    return calls, before


def _broadcast_default_route():
    """No opt-in in the environment: the route must read nothing out of rank 0."""
    full, local = _load_inputs()
    rank = dist.get_rank()
    ours, theirs = _two_copies(local)
    env = _direct_mod.ENV_DIRECT_READ
    before = os.environ.pop(env, None)
    calls, read = _count_direct_reads()
    counts, originals = _count_calls(["isend", "irecv"])
    try:
        utils.broadcast_state_dict(full if rank == 0 else {}, ours, torch.device("cpu"))
    finally:
        _direct_mod._read_boxes = read
        for name, fn in originals.items():
            setattr(dist, name, fn)
        if before is not None:
            os.environ[env] = before
    ref._broadcast_state_dict(full if rank == 0 else {}, theirs, torch.device("cpu"))
    return _describe(ours) == _describe(theirs), calls, counts


def test_broadcast_reads_nothing_out_of_rank0_unless_opted_in():
    results = run_on_ranks(2, _broadcast_default_route, timeout=60)
    for same, calls, _ in results:
        assert same and calls == []
    # Rank 1's boxes came as messages.
    assert results[0][2]["isend"] == results[1][2]["irecv"] > 0


def _broadcast_with_bad_address(kind: str):
    """Rank 0 announces the address of key "big" a page off (inside the tensor: mapped,
    other bytes) or unmapped; the other ranks read everything else directly."""
    ws = dist.get_world_size()
    full, local = _load_inputs(meta_ok=False)
    full["big"] = _full((64 * ws, 64), torch.float32, 11)
    local["big"] = distribute_tensor(torch.zeros(64 * ws, 64), _mesh((ws,)), [Shard(0)],
                                     src_data_rank=None)
    rank = dist.get_rank()
    ours, theirs = _two_copies(local)
    announce = _broadcast_mod.announce

    def misannounce(full_state_dict, addresses=False):
        keys, objects, tensors, dtypes = announce(full_state_dict, addresses)
        big = keys.index("big")
        tensors = [
            (pos, shape, code, same, (addr + 4096 if kind == "off_by_page" else 4096))
            if pos == big else (pos, shape, code, same, addr)
            for pos, shape, code, same, addr in tensors
        ]
        return keys, objects, tensors, dtypes

    calls, read = _count_direct_reads()
    counts, originals = _count_calls(["isend", "irecv"])
    try:
        with _swapped(_broadcast_mod, "announce", misannounce if rank == 0 else None):
            utils.broadcast_state_dict(full if rank == 0 else {}, ours, torch.device("cpu"),
                                       route="direct")
    finally:
        _direct_mod._read_boxes = read
        for name, fn in originals.items():
            setattr(dist, name, fn)
    ref._broadcast_state_dict(full if rank == 0 else {}, theirs, torch.device("cpu"))
    return _describe(ours), _describe(theirs), calls, counts


@pytest.mark.parametrize("kind", ["off_by_page", "unmapped"])
def test_broadcast_direct_read_of_a_misannounced_address_falls_back_to_a_message(kind):
    results = run_on_ranks(2, _broadcast_with_bad_address, kind, timeout=60)
    for rank, (ours, theirs, _, _) in enumerate(results):
        assert ours == theirs, f"rank {rank}"
    _, _, calls, counts = results[1]
    # Rank 1 read its other boxes (the probe, then the reads), and was sent "big".
    assert calls[0] == 1 and len(calls) == 2 and calls[1] > 0
    assert counts["irecv"] == results[0][3]["isend"] == 1


def _broadcast_crafted_needs_row():
    """Rank 1 sends a needs row whose box of one tensor starts at 2**63 - 1."""
    full, local = _load_inputs(meta_ok=False)
    rank = dist.get_rank()
    untouched = _hold(local)
    encode = _p2p_mod.encode_needs

    def crafted(shapes, itemsizes, boxes, direct=None):
        row = encode(shapes, itemsizes, boxes, direct)
        p = 0
        for shape in shapes:
            if row[p] != 0:
                row[p + 1] = 2**63 - 1
                break
            p += 1 + 2 * len(shape)
        return row

    try:
        with _swapped(_p2p_mod, "encode_needs", crafted if rank == 1 else None):
            utils.broadcast_state_dict(full if rank == 0 else {}, local, torch.device("cpu"),
                                       route="p2p")
    except Exception as exc:  # noqa: BLE001
        return type(exc).__name__, str(exc), untouched()
    return None


def test_broadcast_raises_on_every_rank_for_a_crafted_needs_row():
    for kind, text, untouched in run_on_ranks(2, _broadcast_crafted_needs_row, timeout=60):
        assert kind == "ValueError" and untouched
        assert "rank 1's needs row" in text and "9223372036854775807" in text


def _dtensor_boxes_agree_with_local_box():
    """The C++ box of each DTensor (``dtensor_boxes``) is ``local_box``'s, and every
    value it cannot box is left to the caller (None)."""
    from torch.distributed.tensor.placement_types import _StridedShard

    from sdict_ext.collectives.boxes import dtensor_boxes, local_box

    rank = dist.get_rank()
    mesh1, mesh2 = _mesh((4,)), _mesh((2, 2))
    values, expected = [], []

    def dt(shape, mesh, placements, dtype=torch.float32):
        return distribute_tensor(torch.zeros(shape, dtype=dtype), mesh, placements,
                                 src_data_rank=None)

    for shape in [(9, 5), (3, 4), (1, 7), (0, 3), (8, 6, 2)]:
        for mesh, placements in [
            (mesh1, [Shard(0)]), (mesh1, [Shard(1)]), (mesh1, [Replicate()]),
            (mesh1, [Shard(-1)]), (mesh2, [Shard(0), Shard(1)]),
            (mesh2, [Shard(0), Shard(0)]), (mesh2, [Replicate(), Shard(1)]),
            (mesh2, [Shard(1), Replicate()]),
        ]:
            value = dt(shape, mesh, placements)
            values.append(value)
            expected.append(local_box(shape, value, rank))
    # Left to the caller: not a DTensor, Partial, a strided shard, a meta shard.
    values += [torch.zeros(4), None, 3,
               dt((4, 2), mesh1, [Partial()]),
               DTensor.from_local(torch.zeros(2, 2), mesh1, [_StridedShard(0, split_factor=2)],
                                  run_check=False, shape=(8, 2), stride=(2, 1))]
    with torch.device("meta"):
        meta = torch.empty(8, 3)
    values.append(distribute_tensor(meta, mesh1, [Shard(0)], src_data_rank=None))
    expected += [None] * 6
    own = dtensor_boxes(values, None, None, rank)
    got = [None if hit is None else (hit[1], hit[2]) for hit in own]
    fulls = [None if hit is None else hit[4] for hit in own]
    addrs_ok = all(
        hit is None or hit[3] == (hit[0].data_ptr() if hit[0].numel() else 0) for hit in own
    )
    # With announced shapes / dtypes: a mismatch in either leaves the value to the caller.
    shapes = [tuple(v.shape) if isinstance(v, torch.Tensor) else (1,) for v in values]
    dtypes = [torch.float32] * len(values)
    dtypes[0] = torch.float64
    shapes[1] = (10, 5)
    announced = dtensor_boxes(values, shapes, dtypes, rank)
    return got, expected, fulls, [tuple(v.shape) for v in values[:40]], addrs_ok, [
        None if hit is None else (hit[1], hit[2]) for hit in announced
    ]


def test_dtensor_boxes_match_local_box_on_1d_and_2d_meshes():
    for rank, (got, expected, fulls, shapes, addrs_ok, announced) in enumerate(
        run_on_ranks(4, _dtensor_boxes_agree_with_local_box, timeout=120)
    ):
        assert got == expected, f"rank {rank}"
        assert fulls[:40] == shapes and addrs_ok
        assert announced[0] is None  # float64 announced, float32 shard
        assert announced[2:] == got[2:]
        # (10, 5) announced for a (9, 5) DTensor: its box of (10, 5) is not the shard's.
        assert announced[1] is None or announced[1] == got[1]


def _broadcast_metadata_beyond_first_part():
    """Metadata larger than its first broadcast (HEAD_BYTES) arrives in two parts."""
    from sdict_ext.collectives.broadcast.meta import HEAD_BYTES

    full, local = _load_inputs(meta_ok=False)
    full["notes"] = "x" * (HEAD_BYTES + 12345)
    local["notes"] = ""
    if dist.get_rank() != 0:
        full = {}
    ours, theirs = _two_copies(local)
    utils.broadcast_state_dict(full, ours, torch.device("cpu"))
    ref._broadcast_state_dict(full, theirs, torch.device("cpu"))
    return _describe(ours), _describe(theirs), len(ours["notes"])


def test_broadcast_metadata_larger_than_its_first_part_matches_pytorch():
    from sdict_ext.collectives.broadcast.meta import HEAD_BYTES

    for rank, (ours, theirs, n) in enumerate(
        run_on_ranks(2, _broadcast_metadata_beyond_first_part, timeout=60)
    ):
        assert ours == theirs, f"rank {rank}"
        assert n == HEAD_BYTES + 12345


def _distribute_matches_pytorch():
    full, local = _load_inputs()
    ours, theirs = copy.copy(local), copy.copy(local)
    utils.distribute_state_dict(full, ours, torch.device("cpu"))
    ref._distribute_state_dict(full, theirs, torch.device("cpu"))
    return _describe(ours), _describe(theirs), list(ours), list(theirs)


@pytest.mark.parametrize("world_size", [2, 4])
def test_distribute_matches_pytorch_bit_exact(world_size):
    for rank, (ours, theirs, ok, tk) in enumerate(
        run_on_ranks(world_size, _distribute_matches_pytorch, timeout=120)
    ):
        assert ours == theirs, f"rank {rank}"
        assert ok == tk


# ---------------------------------------------------------------- local functions, sharded leaves


def _local_functions_on_sharded_leaves():
    ws = dist.get_world_size()

    def make():
        return {
            "dt": _dt((ws + 1, 3), torch.float32, 1, (ws,), [Shard(0)]),
            "dt0": _dt((), torch.float32, 2, (ws,), [Replicate()]),
            "st": _sharded_tensor(2 * ws, 2, 3),
            "plain": _full((2,), torch.int64, 4),
        }

    sd = make()
    ours_cpu = utils.create_cpu_state_dict(sd)
    theirs_cpu = ref._create_cpu_state_dict(sd)
    created_same = all(
        (type(ours_cpu[k]), ours_cpu[k].shape, ours_cpu[k].dtype)
        == (type(theirs_cpu[k]), theirs_cpu[k].shape, theirs_cpu[k].dtype)
        for k in sd
    )
    placements_same = ours_cpu["dt"].placements == sd["dt"].placements
    ours = utils.copy_state_dict(sd, ours_cpu)
    ref._copy_state_dict(sd, theirs_cpu)
    similar = (
        utils.check_state_dict_similarity(sd, ours_cpu),
        ref._check_state_dict_similarity(sd, theirs_cpu),
    )
    offload_ours = utils.offload_state_dict_to_cpu(sd, ranks_only=(0,))
    offload_theirs = ref._offload_state_dict_to_cpu(sd, ranks_only=(0,))
    return (
        created_same,
        placements_same,
        ours["dt"] is ours_cpu["dt"],
        _describe({k: ours_cpu[k] for k in ("dt", "dt0", "plain")}),
        _describe({k: theirs_cpu[k] for k in ("dt", "dt0", "plain")}),
        _describe([s.tensor for s in ours_cpu["st"].local_shards()]),
        _describe([s.tensor for s in theirs_cpu["st"].local_shards()]),
        similar,
        _describe(offload_ours) if not offload_ours else sorted(offload_ours),
        _describe(offload_theirs) if not offload_theirs else sorted(offload_theirs),
    )


@pytest.mark.parametrize("world_size", [2])
def test_copy_create_similarity_offload_on_sharded_leaves_match_pytorch(world_size):
    for rank, r in enumerate(run_on_ranks(world_size, _local_functions_on_sharded_leaves,
                                          timeout=120)):
        created_same, placements_same, returns_dst, ours, theirs, ost, tst, sim, oo, ot = r
        assert created_same and placements_same and returns_dst, f"rank {rank}"
        assert ours == theirs and ost == tst
        assert sim == (True, True)
        assert oo == ot
        assert (oo == {}) == (rank != 0)


# ---------------------------------------------------------------- big tensors, in place
#
# With a small ``bucket_bytes`` the big-tensor paths trigger at test sizes: a
# ``Shard(0)`` tensor split evenly into 16-byte-aligned pieces that has a bucket to
# itself (from a bucket's worth on it always has) is all-gathered straight into its
# output (which also serves as the buffer of the other buckets before its turn); and a
# tensor of a bucket or more (from a quarter where the collective count allows) is
# broadcast alone, from rank 0's own tensor, into the destination itself where a rank
# receives the whole tensor. Every case mixes
# tensors on both sides of those thresholds and must match PyTorch bit for bit; the
# exchanges' storages are recorded to show that the in-place paths really ran.


def _record_broadcasts(call, name: str | tuple[str, ...] = "broadcast"):
    """Runs ``call()`` and returns (its result, the storage address of every tensor
    ``dist.<name>`` was given first: the broadcast / sent / received tensor, the
    all-gather output), so a test can tell which tensors were exchanged in place."""
    watch_metadata()
    seen: list[int] = []
    names = (name,) if isinstance(name, str) else name
    originals = {n: getattr(dist, n) for n in names}

    def wrap(original):
        def recording(tensor, *args, **kwargs):
            if not metadata_call():
                seen.append(tensor.untyped_storage().data_ptr())
            return original(tensor, *args, **kwargs)

        return recording

    for n, original in originals.items():
        setattr(dist, n, wrap(original))
    try:
        return call(), seen
    finally:
        for n, original in originals.items():
            setattr(dist, n, original)


def _storage(value: Any) -> int:
    if isinstance(value, DTensor):
        value = value._local_tensor
    return value.untyped_storage().data_ptr()


# Gather, bucket 1024: the in-place tensors are of 2 KiB per rank and more, and the
# biggest in-place output can host every other bucket, so ranks keeping results need no
# buffer at all. Bucket 4096: the uneven tensor's bucket is bigger than the one
# in-place output, so a separate buffer is needed beside it.
_GATHER_BUCKETS = {"lend": 1024, "own_buffer": 4096}


def _gather_big_cases(variant: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The state dict and, by name, the leaves expected to be gathered in place."""
    ws = dist.get_world_size()
    mesh = (ws,)
    if variant == "own_buffer":
        sd = {
            "in_place": _dt((128 * ws, 16), torch.float32, 30, mesh, [Shard(0)]),
            "uneven": _dt((256 * ws + 1, 16), torch.float32, 31, mesh, [Shard(0)]),
            "small": _dt((ws, 4), torch.bfloat16, 32, mesh, [Shard(0)]),
            "plain": _full((3,), torch.int64, 33),
        }
        if ws == 4:
            # Several sharded mesh dims: exchanged on a stream of their own, beside.
            sd["2d_big"] = _dt((8, 8), torch.float32, 34, (2, 2), [Shard(0), Shard(1)])
        return sd, {"in_place": sd["in_place"]}
    nested_big = _dt((64 * ws, 16), torch.float16, 40, mesh, [Shard(0)])
    sd = {
        # Even Shard(0), aligned pieces, two buckets or more: a bucket each, in place.
        "big_f32": _dt((32 * ws, 16), torch.float32, 41, mesh, [Shard(0)]),
        "big_bf16": _dt((64 * ws, 16), torch.bfloat16, 42, mesh, [Shard(0)]),
        "big_i64": _dt((16 * ws, 16), torch.int64, 43, mesh, [Shard(0)]),
        "big_f64_1d": _dt((256 * ws,), torch.float64, 44, mesh, [Shard(0)]),
        # Big but not the bucket's layout: through the buffer.
        "big_unaligned": _dt((9 * ws, 5), torch.float32, 45, mesh, [Shard(0)]),
        "big_uneven": _dt((8 * ws + 1, 16), torch.float32, 46, mesh, [Shard(0)]),
        "big_s1": _dt((16, 8 * ws), torch.float32, 47, mesh, [Shard(1)]),
        # Small (even and aligned too): shared buckets.
        "small_even": _dt((ws, 4), torch.float32, 48, mesh, [Shard(0)]),
        "small_uneven": _dt((ws + 1, 2), torch.bfloat16, 49, mesh, [Shard(0)]),
        "small_s1": _dt((2, ws), torch.int64, 50, mesh, [Shard(1)]),
        "empty": _dt((0, 4), torch.float32, 51, mesh, [Shard(0)]),
        "rep": _dt((3, 3), torch.float32, 52, mesh, [Replicate()]),
        "scalar": _dt((), torch.float64, 53, mesh, [Replicate()]),
        "plain": _full((2, 2), torch.float32, 54),
        "nested": {"list": [nested_big, 7, "s"], "none": None},
    }
    in_place = {k: sd[k] for k in ("big_f32", "big_bf16", "big_i64", "big_f64_1d")}
    in_place["nested"] = nested_big
    if ws == 4:
        # Sub-mesh groups: each sharded mesh dim of a 2x2 mesh is its own stream.
        sd.update(
            {
                "hsdp_big": _dt((64, 16), torch.float32, 60, (2, 2), [Replicate(), Shard(0)]),
                "hsdp_rows": _dt((64, 16), torch.float32, 61, (2, 2), [Shard(0), Replicate()]),
                "hsdp_small": _dt((4, 2), torch.float32, 62, (2, 2), [Replicate(), Shard(0)]),
            }
        )
        in_place.update({k: sd[k] for k in ("hsdp_big", "hsdp_rows")})
    return sd, in_place


def _gather_big_matches_pytorch(variant: str, cpu_offload: bool, ranks_only: tuple[int, ...]):
    sd, in_place = _gather_big_cases(variant)
    ours, seen = _record_broadcasts(
        lambda: utils.gather_state_dict(
            sd,
            cpu_offload=cpu_offload,
            ranks_only=ranks_only,
            bucket_bytes=_GATHER_BUCKETS[variant],
        ),
        ALL_GATHER,
    )
    theirs = ref._gather_state_dict(sd, cpu_offload=cpu_offload, ranks_only=ranks_only)
    direct: dict[str, int] = {}
    outside = len(seen)
    if ours:
        results = dict(ours)
        if "nested" in results:
            results["nested"] = results["nested"]["list"][0]
        outputs = {_storage(v) for v in results.values() if isinstance(v, torch.Tensor)}
        direct = {k: seen.count(_storage(results[k])) for k in in_place}
        outside = sum(ptr not in outputs for ptr in seen)
    return _describe(ours), _describe(theirs), direct, outside


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize(
    ("variant", "cpu_offload", "ranks_only"),
    [("lend", False, ()), ("lend", True, (1,)), ("own_buffer", False, (0,))],
)
def test_gather_big_shards_in_place_match_pytorch(world_size, variant, cpu_offload, ranks_only):
    results = run_on_ranks(
        world_size, _gather_big_matches_pytorch, variant, cpu_offload, ranks_only, timeout=120
    )
    for rank, (ours, theirs, direct, outside) in enumerate(results):
        assert ours == theirs, f"rank {rank}"
        if ranks_only and rank not in ranks_only:
            assert ours == {} and direct == {}
            continue
        assert ours["plain"][0] == "T"
        # Every in-place tensor was the output of an all-gather: its own, and (the
        # biggest, lent as the buffer) those of the buckets before it.
        assert direct and all(n >= 1 for n in direct.values()), (rank, direct)
        if variant == "lend":
            # The other buckets were received into an in-place output: no buffer.
            assert outside == 0, rank
            assert max(direct.values()) > min(direct.values())
        else:
            assert outside > 0, rank


def _broadcast_big_inputs() -> tuple[dict[str, Any], dict[str, Any]]:
    ws = dist.get_world_size()
    mesh1 = _mesh((ws,))

    def dt(shape, dtype, placements, mesh=mesh1):
        return distribute_tensor(
            torch.zeros(shape, dtype=dtype), mesh, placements, src_data_rank=None
        )

    full = {
        # Alone (a quarter of the 256-byte bucket or more) ...
        "big_s0": _full((8 * ws, 4), torch.float32, 70),
        "big_s0_uneven": _full((4 * ws + 1, 4), torch.float32, 71),
        "big_s1": _full((4, 8 * ws), torch.int64, 72),
        "big_rep": _full((16, 8), torch.bfloat16, 73),
        "big_plain": _full((64,), torch.float64, 74),
        "big_cast_rep": _full((16, 4), torch.float32, 75),
        "big_cast_s0": _full((4 * ws, 4), torch.float32, 76),
        "big_none": _full((32,), torch.float32, 77),
        "big_missing": _full((32,), torch.int32, 78),
        "big_meta": _full((4 * ws + 2, 4), torch.float32, 79),
        # ... from a non-contiguous source, which cannot be sent in place.
        "big_noncontig_plain": _full((16, 2 * ws), torch.float32, 80).t(),
        "big_noncontig_s0": _full((16, 2 * ws), torch.float16, 81).t(),
        # Bucketed.
        "small_s0": _full((ws + 1, 3), torch.float32, 82),
        "small_rep": _full((2, 2), torch.bfloat16, 83),
        "small_plain": _full((3,), torch.int64, 84),
        "small_cast": _full((2, 2), torch.float32, 85),
        "empty": _full((0, 64), torch.float32, 86),
        "step": torch.tensor(5.0),
        "hparam": {"lr": 0.5},
    }
    with torch.device("meta"):
        meta_full = torch.empty(4 * ws + 2, 4)
    local: dict[str, Any] = {
        "big_s0": dt((8 * ws, 4), torch.float32, [Shard(0)]),
        "big_s0_uneven": dt((4 * ws + 1, 4), torch.float32, [Shard(0)]),
        "big_s1": dt((4, 8 * ws), torch.int64, [Shard(1)]),
        "big_rep": dt((16, 8), torch.bfloat16, [Replicate()]),
        "big_plain": torch.zeros(64, dtype=torch.float64),
        "big_cast_rep": dt((16, 4), torch.bfloat16, [Replicate()]),
        "big_cast_s0": dt((4 * ws, 4), torch.bfloat16, [Shard(0)]),
        "big_none": None,
        "big_meta": distribute_tensor(meta_full, mesh1, [Shard(0)], src_data_rank=None),
        "big_noncontig_plain": torch.zeros(2 * ws, 16),
        "big_noncontig_s0": dt((2 * ws, 16), torch.float16, [Shard(0)]),
        "small_s0": dt((ws + 1, 3), torch.float32, [Shard(0)]),
        "small_rep": dt((2, 2), torch.bfloat16, [Replicate()]),
        "small_plain": torch.zeros(3, dtype=torch.int64),
        "small_cast": dt((2, 2), torch.bfloat16, [Shard(0)]),
        "empty": torch.zeros(0, 64),
        "step": torch.tensor(0.0),
        "hparam": None,
        "local_only": torch.ones(2),
    }
    if ws == 4:
        mesh2 = _mesh((2, 2))
        for key, placements in (
            ("big_2d", [Shard(0), Shard(1)]),
            ("big_hsdp", [Replicate(), Shard(0)]),
            ("big_2d_rep", [Replicate(), Replicate()]),
        ):
            full[key] = _full((8, 8), torch.float32, 90 + len(key))
            local[key] = dt((8, 8), torch.float32, placements, mesh2)
    return full, local


def _broadcast_big_matches_pytorch(strict: bool, cpu_offload: bool, bucket: int, route: str):
    full, local = _broadcast_big_inputs()
    rank = dist.get_rank()
    if rank != 0:
        full = {}
    ours, theirs = _two_copies(local)
    # PyTorch's broadcast needs contiguous tensors: give it the same values so.
    theirs_full = {k: v.contiguous() if torch.is_tensor(v) else v for k, v in full.items()}
    if cpu_offload:
        # PyTorch raises KeyError / AttributeError offloading a tensor whose local
        # value is missing / None; compare on the keys it can handle.
        for key in ("big_none", "big_missing"):
            theirs_full.pop(key, None)
            theirs.pop(key, None)
    _, seen = _record_broadcasts(
        lambda: utils.broadcast_state_dict(
            full, ours, torch.device("cpu"), strict=strict, cpu_offload=cpu_offload,
            bucket_bytes=bucket, route=ROUTE_KEYWORD[route],
        ),
        ("broadcast", "isend", "irecv"),
    )
    ref._broadcast_state_dict(
        theirs_full, theirs, torch.device("cpu"), strict=strict, cpu_offload=cpu_offload
    )
    # Rank 0 sends contiguous big tensors from their own storage; a rank receiving a
    # whole tensor (a plain or replicated local value) receives into the result, and by
    # the box route a rank receives a big shard into the shard itself.
    sources = [k for k, v in full.items() if torch.is_tensor(v) and k.startswith("big_")
               and v.is_contiguous()]
    whole = ["big_rep", "big_plain", "big_noncontig_plain", "big_2d_rep"]
    if route == "messages":
        whole.append("big_s0")
    if rank == 0:
        direct = {k: seen.count(_storage(full[k])) for k in sources}
    else:
        direct = {k: seen.count(_storage(ours[k])) for k in whole if k in ours}
    compared = {k: v for k, v in ours.items() if k in theirs}
    return (
        _describe(compared),
        _describe(theirs),
        list(ours),
        list(theirs),
        ours.get("big_none", "absent"),
        direct,
    )


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize(
    ("strict", "cpu_offload", "bucket", "route"),
    [(False, False, 256, "messages"), (True, False, 256, "broadcast"),
     (False, True, 64, "messages"), (False, True, 64, "broadcast"),
     (True, True, 256, "direct")],
)
def test_broadcast_big_tensors_in_place_match_pytorch(
    world_size, strict, cpu_offload, bucket, route
):
    results = run_on_ranks(
        world_size, _broadcast_big_matches_pytorch, strict, cpu_offload, bucket, route,
        timeout=120,
    )
    for rank, (ours, theirs, our_keys, their_keys, none, direct) in enumerate(results):
        assert ours == theirs, f"rank {rank}"
        if cpu_offload:
            assert [k for k in our_keys if k != "big_none"] == their_keys
        else:
            assert our_keys == their_keys
        assert "big_missing" not in our_keys and none is None
        assert ours["big_rep"][0] == "DTensor" and ours["big_plain"][0] == "T"
        assert ours["big_noncontig_plain"][1] == (2 * world_size, 16)
        if route == "direct":
            # Every contiguous source is read where it lies: nothing leaves rank 0.
            if rank == 0:
                assert direct and not any(direct.values()), sorted(direct.items())
            continue
        if route == "broadcast" or rank:
            # One broadcast / message each, straight from / into the tensor itself.
            assert direct and all(n == 1 for n in direct.values()), (rank, sorted(direct.items()))
            assert (len(direct) > 6) == (rank == 0)
            continue
        # The box route: what no rank holds is not sent at all; each other rank gets
        # its box of a tensor sharded on dim 0 straight from the source; a tensor every
        # rank needs whole is broadcast once from the source (with 2 ranks, sent once).
        assert direct["big_none"] == direct["big_missing"] == 0, direct
        assert direct["big_s0"] == world_size - 1, direct
        assert direct["big_rep"] == direct["big_plain"] == 1, direct


def _broadcast_layouts_differ(route: str):
    """Each rank lays the same keys out its own way (PyTorch loads each rank from its
    own local value, whatever the others hold); ours must give each rank the same."""
    ws, rank = dist.get_world_size(), dist.get_rank()
    mesh = _mesh((ws,))

    def dt(shape, placements, dtype=torch.float32):
        return distribute_tensor(torch.zeros(shape, dtype=dtype), mesh, placements,
                                 src_data_rank=None)

    full = {f"k{i}": _full((6 * ws + i, 4), torch.float32, 100 + i) for i in range(6)}
    full["big"] = _full((64 * ws, 16), torch.float32, 110)
    full["cast"] = _full((4 * ws, 3), torch.float32, 111)
    shape = {k: tuple(v.shape) for k, v in full.items()}
    # Rank 0 shards everything on dim 0; the other ranks vary key by key.
    layouts = [
        lambda k: dt(shape[k], [Shard(0)]),
        lambda k: dt(shape[k], [Shard(1)]),
        lambda k: dt(shape[k], [Replicate()]),
        lambda k: torch.zeros(shape[k]),
        lambda k: None,
        lambda k: dt(shape[k], [Shard(0)], torch.bfloat16),
    ]
    local: dict[str, Any] = {}
    for i, key in enumerate(full):
        pick = 0 if rank == 0 else (i + rank) % len(layouts)
        value = layouts[pick](key)
        if value is not None:
            local[key] = value
    if rank != 0:
        full = {}
    ours, theirs = _two_copies(local)
    sent, originals = _count_calls(["broadcast", "isend"])
    try:
        utils.broadcast_state_dict(full, ours, torch.device("cpu"), bucket_bytes=4096,
                                   route=ROUTE_KEYWORD[route])
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    ref._broadcast_state_dict(full, theirs, torch.device("cpu"))
    return _describe(ours), _describe(theirs), sent


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("route", ROUTES)
def test_broadcast_into_different_layouts_per_rank_matches_pytorch(world_size, route):
    results = run_on_ranks(world_size, _broadcast_layouts_differ, route, timeout=120)
    for rank, (ours, theirs, _) in enumerate(results):
        assert ours == theirs, f"rank {rank}"
    # Every rank entered the same broadcasts (the route is decided alike everywhere).
    assert len({sent["broadcast"] for _, _, sent in results}) == 1
    if route == "messages" and world_size > 1:
        # Rank 0 sent point to point what the others' layouts needed.
        assert results[0][2]["isend"] > 0
    if route == "direct":
        # Every box came out of rank 0's memory (the sources are contiguous).
        assert results[0][2]["isend"] == 0


def _broadcast_in_subgroup(route: str):
    """A process group of ranks 0, 2 and 3 of 4: messages go to global ranks."""
    members = [0, 2, 3]
    pg = dist.new_group(members)
    rank = dist.get_rank()
    if rank not in members:
        return None
    mesh = _mesh((dist.get_world_size(),))
    full = {
        "w": _full((16, 6), torch.float32, 120),
        "b": _full((9,), torch.bfloat16, 121),
        "rep": _full((3, 5), torch.int64, 122),
        "n": 3,
    }
    local = {
        "w": distribute_tensor(torch.zeros(16, 6), mesh, [Shard(0)], src_data_rank=None),
        "b": torch.zeros(9, dtype=torch.bfloat16),
        "rep": distribute_tensor(torch.zeros(3, 5, dtype=torch.int64), mesh, [Replicate()],
                                 src_data_rank=None),
        "n": 0,
    }
    if rank != 0:
        full = {}
    ours, theirs = copy.copy(local), copy.deepcopy(local)
    sent, originals = _count_calls(["isend", "irecv"])
    try:
        utils.broadcast_state_dict(full, ours, torch.device("cpu"), pg=pg,
                                   route=ROUTE_KEYWORD[route])
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    ref._broadcast_state_dict(full, theirs, torch.device("cpu"), pg=pg)
    return _describe(ours), _describe(theirs), sent


@pytest.mark.parametrize("route", ["direct", "messages"])
def test_broadcast_in_a_subgroup_matches_pytorch(route):
    results = run_on_ranks(4, _broadcast_in_subgroup, route, timeout=120)
    assert results[1] is None
    for rank in (0, 2, 3):
        ours, theirs, _ = results[rank]
        assert ours == theirs, f"rank {rank}"
    if route == "direct":
        assert results[0][2]["isend"] == results[2][2]["irecv"] == results[3][2]["irecv"] == 0
        return
    # Ranks 2 and 3 each need a quarter of "w" (and all of "b", "rep"): rank 0 sends
    # each its own messages.
    assert results[0][2]["isend"] >= 2 and results[2][2]["irecv"] >= 1
    assert results[3][2]["irecv"] >= 1


def _describe_scalar(value: Any) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    return (
        type(value).__name__,
        value.requires_grad,
        value.is_conj(),
        _describe(value.resolve_conj()),
    )


def _broadcast_scalars():
    """0-dim tensors of every common dtype, and the kinds that travel pickled."""
    full = {
        "f32": torch.tensor(3.5),
        "f64": torch.tensor(-2.25, dtype=torch.float64),
        "f16": torch.tensor(0.5, dtype=torch.float16),
        "bf16": torch.tensor(1.5, dtype=torch.bfloat16),
        "i64": torch.tensor(7),
        "i32": torch.tensor(-9, dtype=torch.int32),
        "u8": torch.tensor(200, dtype=torch.uint8),
        "bool": torch.tensor(True),
        "c64": torch.tensor(1 + 2j, dtype=torch.complex64),
        "second_f32": torch.tensor(-0.0),
        "nan": torch.tensor(float("nan")),
        "grad": torch.tensor(2.0, requires_grad=True),
        "param": torch.nn.Parameter(torch.tensor(4.0)),
        "conj": torch.tensor(1 - 3j, dtype=torch.complex64).conj(),
        "view": torch.arange(4.0)[2],
        "not_local": torch.tensor(1.0),
        "vector": torch.arange(3.0),
        "lr": 0.1,
    }
    rank = dist.get_rank()
    local = {k: torch.zeros(()) for k in full if k != "not_local"}
    ours, theirs = dict(local), dict(local)
    source = full if rank == 0 else {}
    utils.broadcast_state_dict(source, ours, torch.device("cpu"))
    ref._broadcast_state_dict(source, theirs, torch.device("cpu"))
    same_object = {k: (ours[k] is full[k], theirs[k] is full[k]) for k in ours if k in full}
    return (
        {k: _describe_scalar(v) for k, v in ours.items()},
        {k: _describe_scalar(v) for k, v in theirs.items()},
        same_object,
        ours["view"].untyped_storage().nbytes(),
    )


@pytest.mark.parametrize("world_size", [2])
def test_broadcast_zero_dim_tensors_match_pytorch(world_size):
    for rank, (ours, theirs, same_object, view_bytes) in enumerate(
        run_on_ranks(world_size, _broadcast_scalars, timeout=60)
    ):
        assert ours == theirs, f"rank {rank}"
        assert "not_local" not in ours
        assert ours["bf16"][-1][2] == "torch.bfloat16" and ours["param"][0] == "Parameter"
        assert all(a == b for a, b in same_object.values()), (rank, same_object)
        # PyTorch pickles a 0-dim view with its whole base storage (16 bytes here, all
        # of a flat buffer in general); ours sends, and allocates, the one element.
        assert view_bytes == (16 if rank == 0 else 4)
