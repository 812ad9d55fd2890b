"""Multi-process specs for ``sdict_ext.utils.reshard_state_dict`` (issue 25).

Every case builds its inputs from seeded full tensors on every rank of a 4-rank gloo
group, then computes the REFERENCE with PyTorch's own functions, gather then
distribute: ``torch.distributed._state_dict_utils._gather_state_dict`` on the source
ranks (``DTensor.redistribute`` to Replicate, the ShardedTensor all-gather), the full
tensors shared with ``dist.all_gather_object`` (each key taken from the lowest rank
that had it, so destination-only ranks get them from a source rank), then
``distribute_tensor(full, dst_mesh, dst_placements)`` on the destination ranks. The
reference full tensors are also checked against the seeded ones every rank builds
itself. Results are compared bit for bit (the bytes, so -0.0 and NaN count), with
their types, dtypes, shapes, strides, meshes, placements, key sets and containers.

Workers are module-level functions run by ``tests.mp.run_on_ranks`` (or ``run_fresh``
where a test needs a cold plan cache or a short collective timeout); they return a list
of what they found wrong (empty when all is well) and the call's statistics. The error
cases run one after another in one fresh group per family (a module fixture), since each
raises on every rank and leaves the group in step; each kind is still its own test.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed import _state_dict_utils as ref
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

from sdict_ext import utils
from tests.mp import run_fresh, run_on_ranks
from tests.test_utils_dist import _chunked_boxes, _full, _sharded_tensor, _st_from_boxes

pytestmark = pytest.mark.dist

WORLD = 4
ALL = [0, 1, 2, 3]
HSDP = [[0, 1], [2, 3]]
# Small enough that the cases' bigger tensors take several buckets.
SMALL_BUCKET = 4096

_MESHES: dict[str, DeviceMesh] = {}


def _mesh(ranks: list) -> DeviceMesh:
    """The mesh over ``ranks`` (nested for 2-D), one per worker process.

    Creating a mesh creates process groups collectively, so every rank calls this for
    every mesh of a case, in the same order, before anything rank-dependent.
    """
    key = repr(ranks)
    if key not in _MESHES:
        _MESHES[key] = DeviceMesh("cpu", ranks)
    return _MESHES[key]


def _src(full: torch.Tensor, ranks: list, placements: list) -> DTensor | None:
    """This rank's source DTensor of ``full``; ``None`` off the mesh."""
    mesh = _mesh(ranks)
    if mesh.get_coordinate() is None:
        return None
    return distribute_tensor(full.clone(), mesh, placements, src_data_rank=None)


def _dst(full: torch.Tensor, ranks: list, placements: list, meta: bool = False):
    """This rank's destination DTensor for ``full``'s layout, filled with 7 (or meta);
    ``None`` off the mesh."""
    mesh = _mesh(ranks)
    if mesh.get_coordinate() is None:
        return None
    if meta:
        blank = torch.empty(full.shape, dtype=full.dtype, device="meta")
    else:
        blank = torch.full(full.shape, 7, dtype=full.dtype)
    return distribute_tensor(blank, mesh, placements, src_data_rank=None)


def _present(d: dict) -> dict:
    """``d`` without the keys this rank does not hold (keys live where they are owned)."""
    return {k: v for k, v in d.items() if v is not None}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _leaves(obj: Any, path: tuple = ()) -> list[tuple[tuple, Any]]:
    """(key path, leaf) pairs of a nested dict / list / tuple, in walk order."""
    if isinstance(obj, dict):
        return [kv for k, v in obj.items() for kv in _leaves(v, path + (k,))]
    if isinstance(obj, (list, tuple)):
        return [kv for i, v in enumerate(obj) for kv in _leaves(v, path + (i,))]
    return [(path, obj)]


def _name(path: tuple) -> str:
    return ".".join(map(str, path)) or "<root>"


# ---------------------------------------------------------------- the reference


def _reference_full(src: Any) -> dict[tuple, Any]:
    """PyTorch's gather of every rank's source, shared: key path -> full tensor (or
    non-tensor value) as the lowest rank whose source has that path holds it."""
    gathered = ref._gather_state_dict(src) if src else {}
    mine = {
        path: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
        for path, v in _leaves(gathered)
    }
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    full: dict[tuple, Any] = {}
    for rank_values in every:
        for path, v in rank_values.items():
            full.setdefault(path, v)
    return full


def _reference_dst(dst: Any, full: dict[tuple, Any], path: tuple = ()) -> Any:
    """``dst``'s layout filled from ``full`` the way PyTorch distributes a tensor."""
    if isinstance(dst, dict):
        return {k: _reference_dst(v, full, path + (k,)) for k, v in dst.items()}
    if isinstance(dst, (list, tuple)):
        return type(dst)(_reference_dst(v, full, path + (i,)) for i, v in enumerate(dst))
    if isinstance(dst, DTensor):
        # Contiguous: the destination's strides are its own, not the source's (a
        # transposed source would otherwise give the reference DTensor its strides).
        return distribute_tensor(
            full[path].contiguous(), dst.device_mesh, list(dst.placements), src_data_rank=None
        )
    if isinstance(dst, torch.Tensor):
        return full[path].clone()
    return full.get(path, dst)


# ---------------------------------------------------------------- comparison


def _compare(got: Any, want: Any, dst: Any, ptrs: dict[int, int], path: tuple,
             out: list[str]) -> None:
    """Appends to ``out`` every way ``got`` differs from ``want``; ``dst`` is the
    destination leaf the result stands for (written in place unless it was meta)."""
    where = _name(path)
    if type(got) is not type(want):
        out.append(f"{where}: type {type(got).__name__}, want {type(want).__name__}")
        return
    if isinstance(want, dict):
        if list(got) != list(want):
            out.append(f"{where}: keys {list(got)}, want {list(want)}")
            return
        for k in want:
            _compare(got[k], want[k], dst[k], ptrs, path + (k,), out)
        return
    if isinstance(want, (list, tuple)):
        if len(got) != len(want):
            out.append(f"{where}: length {len(got)}, want {len(want)}")
            return
        for i, (g, w) in enumerate(zip(got, want)):
            _compare(g, w, dst[i], ptrs, path + (i,), out)
        return
    if not isinstance(want, torch.Tensor):
        if type(got) is not type(want) or got != want:
            out.append(f"{where}: value {got!r}, want {want!r}")
        return
    # Tensors: written in place when the destination was real, new when it was meta.
    if dst.is_meta:
        if got is dst or got.is_meta:
            out.append(f"{where}: a meta destination was not replaced by a real tensor")
    elif got is not dst:
        out.append(f"{where}: a real destination was not written in place (new object)")
    elif _local(got).data_ptr() != ptrs[id(dst)]:
        out.append(f"{where}: a real destination's storage was replaced")
    if isinstance(want, DTensor):
        if got.device_mesh != want.device_mesh:
            out.append(f"{where}: mesh {got.device_mesh}, want {want.device_mesh}")
        if tuple(got.placements) != tuple(want.placements):
            out.append(f"{where}: placements {got.placements}, want {want.placements}")
        if got.stride() != want.stride():
            out.append(f"{where}: stride {got.stride()}, want {want.stride()}")
    for name in ("shape", "dtype", "requires_grad"):
        if getattr(got, name) != getattr(want, name):
            out.append(f"{where}: {name} {getattr(got, name)}, want {getattr(want, name)}")
    g, w = _local(got), _local(want)
    if g.device != w.device:
        out.append(f"{where}: device {g.device}, want {w.device}")
    elif g.shape != w.shape:
        out.append(f"{where}: local shape {tuple(g.shape)}, want {tuple(w.shape)}")
    elif g.dtype == w.dtype and not _same_bits(g, w):
        out.append(f"{where}: values differ from PyTorch's gather + distribute")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


def _pointers(dst: Any) -> dict[int, int]:
    return {
        id(v): _local(v).data_ptr()
        for _, v in _leaves(dst)
        if isinstance(v, torch.Tensor) and not v.is_meta
    }


def _parts(value: Any) -> list[torch.Tensor]:
    """The real tensors holding ``value``'s bytes on this rank (none for a non-tensor
    or a meta tensor)."""
    if isinstance(value, ShardedTensor):
        return [shard.tensor for shard in value.local_shards()]
    if isinstance(value, torch.Tensor) and not value.is_meta:
        return [_local(value)]
    return []


def _snapshot(obj: Any) -> Callable[[], list[str]]:
    """Remembers ``obj``'s leaves (objects and bytes); the returned check lists the
    key paths whose object or bytes changed since."""
    held = [(path, v, [_bits(t).clone() for t in _parts(v)]) for path, v in _leaves(obj)]

    def changed() -> list[str]:
        now = dict(_leaves(obj))
        bad = []
        for path, v, data in held:
            if now.get(path) is not v:
                bad.append(f"{_name(path)}: object replaced")
            elif not all(torch.equal(_bits(t), d) for t, d in zip(_parts(v), data)):
                bad.append(f"{_name(path)}: bytes changed")
        return bad

    return changed


def _owned_bytes(dst: Any) -> int:
    """Bytes of the destination tensors this rank holds, each tied tensor once (one
    object at several keys, or several views of the same bytes)."""
    seen: dict[Any, int] = {}
    for _, v in _leaves(dst):
        if isinstance(v, ShardedTensor):
            seen[id(v)] = sum(t.numel() * t.element_size() for t in _parts(v))
        elif isinstance(v, torch.Tensor):
            local = _local(v)
            tie = id(v) if local.is_meta else (
                local.untyped_storage().data_ptr(), local.storage_offset(),
                tuple(local.shape), local.stride(), local.dtype,
            )
            seen[tie] = local.numel() * local.element_size()
    return sum(seen.values())


def _reshard_checked(
    src: Any,
    dst: Any,
    expect: dict[tuple, torch.Tensor],
    *,
    bucket_bytes: int | None = None,
    tied: tuple[tuple[tuple, tuple], ...] = (),
    gathered: dict[tuple, Any] | None = None,
) -> tuple[list[str], dict]:
    """Runs the reference, then ``reshard_state_dict``, and lists what differs.

    ``expect`` maps key paths to the seeded full tensors (cross-check of the
    reference); ``tied`` holds pairs of destination paths that share one object (where
    this rank holds them), whose results must be one object too. ``gathered`` replaces
    the reference's gather, for source layouts PyTorch's gather cannot take (then only
    the distribute half of the reference is PyTorch's).
    """
    full = _reference_full(src) if gathered is None else gathered
    problems = [
        f"reference {_name(p)} differs from the seeded full tensor"
        for p, t in expect.items()
        if not _same_bits(full[p], t)
    ]
    want = _reference_dst(dst, full)
    ptrs = _pointers(dst)
    src_unchanged = _snapshot(src)
    kwargs = {} if bucket_bytes is None else {"bucket_bytes": bucket_bytes}
    got = utils.reshard_state_dict(src, dst, **kwargs)
    stats = dict(utils.last_reshard_stats())
    if dst is None or dst == {}:
        if got is not dst and not (got == {} and dst == {}):
            problems.append(f"an empty destination came back as {got!r}")
    else:
        _compare(got, want, dst, ptrs, (), problems)
        results = dict(_leaves(got))
        for a, b in tied:
            if a in results and results[a] is not results[b]:
                problems.append(f"tied {_name(a)} and {_name(b)} are not one object")
    problems += [f"source {p}" for p in src_unchanged()]
    problems += _stats_problems(stats, dst, bucket_bytes)
    return problems, stats


def _stats_problems(stats: dict, dst: Any, bucket_bytes: int | None) -> list[str]:
    out = []
    owned = _owned_bytes(dst)
    if stats["bytes_owned"] != owned:
        out.append(f"stats bytes_owned {stats['bytes_owned']}, want {owned}")
    if stats["bytes_received"] + stats["bytes_local"] != stats["bytes_owned"]:
        out.append(f"stats received + local != owned: {stats}")
    if stats["buffer_bytes"] > 2 * stats["bucket_bytes"]:
        out.append(f"stats buffer_bytes over two buckets: {stats}")
    if bucket_bytes is not None and stats["bucket_bytes"] != bucket_bytes:
        out.append(f"stats bucket_bytes {stats['bucket_bytes']}, want {bucket_bytes}")
    return out


def _assert_all_ranks_clean(results: list[tuple[list[str], dict]]) -> list[dict]:
    for rank, (problems, _) in enumerate(results):
        assert problems == [], f"rank {rank}"
    stats = [s for _, s in results]
    # Every byte sent is received by someone.
    assert sum(s["bytes_sent"] for s in stats) == sum(s["bytes_received"] for s in stats)
    return stats


# ---------------------------------------------------------------- 1. FSDP2 -> TP


def _fsdp_to_tp(bucket_bytes: int):
    full = {
        "w1": _full((16, 12), torch.float32, 1),
        "w2": _full((12, 10), torch.bfloat16, 2),
        "b": _full((10,), torch.float32, 3),
        "odd": _full((9, 7), torch.float32, 4),
    }
    tp = {"w1": [Shard(1)], "w2": [Shard(0)], "b": [Replicate()], "odd": [Shard(1)]}
    src = {k: _src(v, ALL, [Shard(0)]) for k, v in full.items()}
    dst: Any = _present({k: _dst(v, [0, 1], tp[k]) for k, v in full.items()})
    rank = dist.get_rank()
    if rank == 2:
        dst = None  # source-only ranks: None or {}
    return _reshard_checked(src, dst, {(k,): v for k, v in full.items()},
                            bucket_bytes=bucket_bytes)


@pytest.mark.parametrize("bucket_bytes", [1 << 20, SMALL_BUCKET])
def test_reshard_fsdp_shard0_over_4_to_tp_shard1_over_2_matches_gather_distribute(
    bucket_bytes,
):
    stats = _assert_all_ranks_clean(
        run_on_ranks(WORLD, _fsdp_to_tp, bucket_bytes, timeout=120)
    )
    # Source-only ranks own and receive nothing; the TP ranks receive from the others.
    for rank in (2, 3):
        assert stats[rank]["bytes_owned"] == stats[rank]["bytes_received"] == 0
        assert stats[rank]["bytes_sent"] > 0
    for rank in (0, 1):
        assert stats[rank]["bytes_received"] > 0


# ---------------------------------------------------------------- 2. world size change


_WORLD_CHANGES = {
    "4_to_2": (ALL, [0, 1]),
    "4_to_2_reversed_mesh": (ALL, [3, 1]),
    "2_to_4": ([0, 1], ALL),
    "2_to_2_with_a_bystander": ([0, 1], [2, 1]),  # rank 3 is in neither layout
}


def _shard0_world_change(change: str):
    src_ranks, dst_ranks = _WORLD_CHANGES[change]
    full = {
        "a": _full((13, 5), torch.float32, 10),
        "b": _full((8, 3), torch.float64, 11),
        "c": _full((3, 4), torch.int32, 12),  # fewer rows than ranks
        "d": _full((2,), torch.bfloat16, 13),
    }
    src = _present({k: _src(v, src_ranks, [Shard(0)]) for k, v in full.items()})
    dst = _present({k: _dst(v, dst_ranks, [Shard(0)]) for k, v in full.items()})
    return _reshard_checked(src or None, dst, {(k,): v for k, v in full.items()},
                            bucket_bytes=SMALL_BUCKET)


@pytest.mark.parametrize("change", list(_WORLD_CHANGES))
def test_reshard_shard0_to_shard0_on_another_world_size_matches_gather_distribute(change):
    stats = _assert_all_ranks_clean(
        run_on_ranks(WORLD, _shard0_world_change, change, timeout=120)
    )
    src_ranks, dst_ranks = _WORLD_CHANGES[change]
    for rank in set(ALL) - set(dst_ranks):
        assert stats[rank]["bytes_owned"] == 0
    for rank in set(ALL) - set(src_ranks):
        assert stats[rank]["bytes_sent"] == stats[rank]["bytes_local"] == 0


# ---------------------------------------------------------------- 3. HSDP -> 1-D


def _hsdp_to_1d():
    full = {
        "a": _full((8, 6), torch.float32, 20),
        "b": _full((7, 5), torch.bfloat16, 21),
        "c": _full((3, 9), torch.float32, 22),
        "d": _full((5,), torch.float32, 23),
        "e": _full((6, 5), torch.float32, 24),
    }
    hsdp = {k: [Replicate(), Shard(0)] for k in full}
    hsdp["e"] = [Shard(0), Shard(1)]  # 2-D sharded both ways
    flat = {"a": [Shard(0)], "b": [Shard(1)], "c": [Shard(1)], "d": [Shard(0)],
            "e": [Shard(1)]}
    src = {k: _src(v, HSDP, hsdp[k]) for k, v in full.items()}
    dst = {k: _dst(v, ALL, flat[k]) for k, v in full.items()}
    return _reshard_checked(src, dst, {(k,): v for k, v in full.items()},
                            bucket_bytes=SMALL_BUCKET)


def test_reshard_hsdp_2d_mesh_to_1d_shards_matches_gather_distribute():
    _assert_all_ranks_clean(run_on_ranks(WORLD, _hsdp_to_1d, timeout=120))


# ---------------------------------------------------------------- 4. mixed state dict


def _mixed(bucket_bytes: int, tie: str = "same_object"):
    """``tie``: how the destination's tied keys share: one object at both keys (a
    ``keep_vars`` state dict), or two objects over one storage (``module.state_dict()``
    detaches each key), which come back as themselves, each written in place."""
    rank = dist.get_rank()
    full = {
        ("model", "emb"): _full((5, 3), torch.float32, 30),
        ("model", "norm"): _full((7,), torch.bfloat16, 31),
        ("model", "empty_rows"): _full((0, 4), torch.float32, 32),
        ("model", "empty_cols"): _full((3, 0), torch.bfloat16, 33),
        ("model", "scale"): torch.tensor(2.5),
        ("model", "count"): _full((6, 2), torch.int64, 34),
        ("optim", "state", "model.emb", "exp_avg"): _full((5, 3), torch.float32, 35),
        ("optim", "state", "model.emb", "exp_avg_sq"): _full((5, 3), torch.bfloat16, 36),
        ("optim", "state", "model.emb", "step"): torch.tensor(3.0),
    }
    f = {path[-1]: v for path, v in full.items()}
    # Sources: FSDP-like Shard(0) over all ranks (uneven: some ranks hold nothing).
    emb = _src(f["emb"], ALL, [Shard(0)])
    src = {
        "model": {
            "emb": emb,
            "head": emb,  # tied
            "norm": _src(f["norm"], ALL, [Shard(0)]),
            "empty_rows": _src(f["empty_rows"], ALL, [Shard(0)]),
            "empty_cols": _src(f["empty_cols"], ALL, [Shard(0)]),
            "scale": _src(f["scale"], ALL, [Replicate()]),
            "count": _src(f["count"], ALL, [Shard(1)]),
        },
        "optim": {
            "state": {"model.emb": {
                "exp_avg": _src(f["exp_avg"], ALL, [Shard(0)]),
                "exp_avg_sq": _src(f["exp_avg_sq"], ALL, [Shard(0)]),
                "step": f["step"].clone(),  # a plain 0-dim tensor every rank holds
            }},
            "param_groups": [{
                "lr": 0.1 * (rank + 1),  # the lowest source rank's value wins
                "betas": (0.9, 0.999),
                "params": ["model.emb", "model.head"],
                "name": f"from rank {rank}",
            }],
        },
    }
    if rank >= 2:
        src["extra"] = {"seen_by": rank}  # only ranks 2 and 3 have it: rank 2's wins
    # Destinations: other meshes and placements, keys only where owned.
    dst_emb = _dst(f["emb"], ALL, [Shard(1)])  # 3 columns over 4 ranks: rank 3 empty
    dst = {
        "model": _present({
            "emb": dst_emb,
            "head": dst_emb if tie == "same_object" else dst_emb.detach(),  # tied
            "norm": _dst(f["norm"], [2, 3], [Shard(0)]),
            "empty_rows": _dst(f["empty_rows"], ALL, [Shard(1)]),
            "empty_cols": _dst(f["empty_cols"], [0, 1], [Replicate()]),
            "scale": _dst(f["scale"], [1, 2], [Replicate()]),
            "count": _dst(f["count"], ALL, [Shard(0)]),
        }),
        "optim": {
            "state": {"model.emb": _present({
                "exp_avg": _dst(f["exp_avg"], [0, 1], [Shard(1)]),
                "exp_avg_sq": _dst(f["exp_avg_sq"], ALL, [Replicate()]),
                "step": torch.zeros(()),
            })},
            "param_groups": [{
                "lr": 0.0,
                "betas": (0.0, 0.0),
                "params": ["", ""],
                "name": "",
                "only_in_dst": "kept",  # no source has it: unchanged
            }],
        },
        "extra": {"seen_by": -1},
    }
    expect = dict(full)
    expect[("model", "head")] = f["emb"]
    return _reshard_checked(
        src, dst, expect, bucket_bytes=bucket_bytes,
        tied=((("model", "emb"), ("model", "head")),) if tie == "same_object" else (),
    )


@pytest.mark.parametrize("tie", ["same_object", "shared_storage"])
@pytest.mark.parametrize("bucket_bytes", [1 << 20, 1024])  # 1024: the smallest allowed
def test_reshard_mixed_uneven_tied_empty_scalar_optimizer_state_matches_gather_distribute(
    bucket_bytes, tie
):
    # Non-tensor leaves are compared with the reference's rule: the lowest rank whose
    # source has the key path (lr 0.1 from rank 0, extra.seen_by 2 from rank 2), the
    # destination's own value where no source has it (only_in_dst).
    _assert_all_ranks_clean(run_on_ranks(WORLD, _mixed, bucket_bytes, tie, timeout=120))


def _int_keyed_optimizer():
    """torch.optim's own layout: state keyed by int parameter ids, the destination's
    keys in another order than the source's."""
    full = {
        ("state", 0, "exp_avg"): _full((6, 4), torch.float32, 37),
        ("state", 1, "exp_avg"): _full((5,), torch.float32, 38),
        ("state", 1, "step"): torch.tensor(7.0),
    }
    src = {
        "state": {
            0: {"exp_avg": _src(full[("state", 0, "exp_avg")], ALL, [Shard(0)])},
            1: {"exp_avg": _src(full[("state", 1, "exp_avg")], ALL, [Shard(0)]),
                "step": torch.tensor(7.0)},
        },
        "param_groups": [{"lr": 0.5, "params": [0, 1]}],
    }
    dst = {
        "param_groups": [{"lr": 0.0, "params": [-1, -1]}],
        "state": {
            1: _present({"step": torch.zeros(()),
                         "exp_avg": _dst(full[("state", 1, "exp_avg")], [2, 3], [Shard(0)])}),
            0: _present({"exp_avg": _dst(full[("state", 0, "exp_avg")], [0, 1], [Shard(1)])}),
        },
    }
    return _reshard_checked(src, dst, full, bucket_bytes=1024)


def test_reshard_optimizer_state_keyed_by_int_ids_in_another_order():
    _assert_all_ranks_clean(run_on_ranks(WORLD, _int_keyed_optimizer, timeout=60))


# ---------------------------------------------------------------- 5. disjoint ranks


def _disjoint():
    full = {
        "s0": _full((9, 4), torch.float32, 40),
        "s1": _full((4, 7), torch.bfloat16, 41),
        "rep": _full((3, 3), torch.float32, 42),
        "n": 11,
    }
    src = _present({
        "s0": _src(full["s0"], [0, 1], [Shard(0)]),
        "s1": _src(full["s1"], [0, 1], [Shard(1)]),
        "rep": _src(full["rep"], [0, 1], [Replicate()]),
    })
    dst = _present({
        "s0": _dst(full["s0"], [2, 3], [Shard(1)]),
        "s1": _dst(full["s1"], [2, 3], [Shard(0)]),
        "rep": _dst(full["rep"], [2, 3], [Shard(0)]),
    })
    rank = dist.get_rank()
    if rank < 2:
        src["n"] = full["n"]
    else:
        dst["n"] = 0
    expect = {(k,): full[k] for k in ("s0", "s1", "rep")}
    return _reshard_checked(src or None, dst or None, expect, bucket_bytes=SMALL_BUCKET)


def test_reshard_between_disjoint_rank_subsets_of_one_group_matches_gather_distribute():
    stats = _assert_all_ranks_clean(run_on_ranks(WORLD, _disjoint, timeout=120))
    for rank in (0, 1):
        assert stats[rank]["bytes_owned"] == stats[rank]["bytes_received"] == 0
        assert stats[rank]["bytes_sent"] > 0
    for rank in (2, 3):
        assert stats[rank]["bytes_sent"] == stats[rank]["bytes_local"] == 0
        assert stats[rank]["bytes_received"] == stats[rank]["bytes_owned"] > 0


def _in_subgroup():
    """A group of global ranks 1, 2 and 3; rank 0 does not take part."""
    group = dist.new_group([1, 2, 3])
    full = {"w": _full((7, 6), torch.float32, 45), "b": _full((5,), torch.bfloat16, 46)}
    src = _present({k: _src(v, [1, 2], [Shard(0)]) for k, v in full.items()})
    dst = _present({"w": _dst(full["w"], [3, 2], [Shard(1)]),
                    "b": _dst(full["b"], [3, 2], [Replicate()])})
    if dist.get_rank() == 0:
        return None
    # The reference's exchange runs in the group too.
    gathered = ref._gather_state_dict(src) if src else {}
    every: list[Any] = [None] * 3
    dist.all_gather_object(every, {k: v.clone() for k, v in gathered.items()}, group=group)
    ref_full = {}
    for values in every:
        for k, v in values.items():
            ref_full.setdefault((k,), v)
    problems = [f"reference {k}" for k, v in full.items() if not _same_bits(ref_full[(k,)], v)]
    want = _reference_dst(dst, ref_full)
    ptrs = _pointers(dst)
    got = utils.reshard_state_dict(src or None, dst or None, group)
    stats = dict(utils.last_reshard_stats())
    if dst:
        _compare(got, want, dst, ptrs, (), problems)
    problems += _stats_problems(stats, dst or None, None)
    return problems, stats


def test_reshard_in_a_subgroup_addresses_global_ranks():
    results = run_on_ranks(WORLD, _in_subgroup, timeout=120)
    assert results[0] is None
    stats = _assert_all_ranks_clean(results[1:])
    assert stats[0]["bytes_owned"] == 0 and stats[0]["bytes_sent"] > 0  # global rank 1


def _same_tensor_both_sides():
    full = {"w": _full((9, 4), torch.float32, 47), "r": _full((3, 3), torch.bfloat16, 48)}
    both = {"w": _src(full["w"], ALL, [Shard(0)]), "r": _src(full["r"], ALL, [Replicate()])}
    return _reshard_checked(both, both, {(k,): v for k, v in full.items()})


def test_reshard_of_a_state_dict_onto_itself_copies_nothing_across_ranks():
    for s in _assert_all_ranks_clean(run_on_ranks(WORLD, _same_tensor_both_sides, timeout=60)):
        assert s["bytes_received"] == s["bytes_sent"] == 0
        assert s["bytes_local"] == s["bytes_owned"]


# ---------------------------------------------------------------- 6. meta destinations


def _meta_destinations():
    rank = dist.get_rank()
    full = {
        "meta_s1": _full((8, 6), torch.float32, 50),
        "real_s0": _full((6, 4), torch.bfloat16, 51),
        "meta_rep": _full((4, 4), torch.float32, 52),
        "meta_plain": _full((5,), torch.float32, 53),
        "tied_a": _full((7, 2), torch.float32, 54),
    }
    src = {k: _src(v, ALL, [Shard(0)]) for k, v in full.items()}
    src["tied_b"] = src["tied_a"]  # tied on both sides
    full["tied_b"] = full["tied_a"]
    tied = _dst(full["tied_a"], [0, 1], [Shard(0)], meta=True)
    dst = _present({
        "meta_s1": _dst(full["meta_s1"], [0, 1], [Shard(1)], meta=True),
        "real_s0": _dst(full["real_s0"], [0, 1], [Shard(0)]),
        "meta_rep": _dst(full["meta_rep"], ALL, [Replicate()], meta=True),
        "tied_a": tied,
        "tied_b": tied,
    })
    if rank == 1:
        dst["meta_plain"] = torch.empty(5, device="meta")
    expect = {(k,): v for k, v in full.items()}
    return _reshard_checked(src, dst, expect, tied=((("tied_a",), ("tied_b",)),))


def test_reshard_replaces_meta_destinations_and_writes_real_ones_in_place():
    # The in-place / replaced checks are in _compare (same object and storage for real
    # destinations; a new, real DTensor on the same mesh and placements for meta ones).
    _assert_all_ranks_clean(run_on_ranks(WORLD, _meta_destinations, timeout=120))


def _parameters():
    """keep_vars state dicts: DTensor and plain ``nn.Parameter``s that require grad, on
    both sides (an FSDP2 trainer's parameters into a TP copy's)."""
    full = {"w": _full((8, 6), torch.float32, 55), "b": _full((6,), torch.float32, 56)}
    src = {k: torch.nn.Parameter(_src(v, ALL, [Shard(0)])) for k, v in full.items()}
    dst: dict[str, Any] = {}
    w = _dst(full["w"], [0, 1], [Shard(1)])
    if w is not None:
        dst["w"] = torch.nn.Parameter(w)
        dst["b"] = torch.nn.Parameter(torch.zeros(6))
    before = {k: (v, _local(v).data_ptr()) for k, v in dst.items()}
    got = utils.reshard_state_dict(src, dst or None)
    problems = []
    for k, (obj, ptr) in before.items():
        want = distribute_tensor(full[k], w.device_mesh, [Shard(1)], src_data_rank=None) \
            if isinstance(obj, DTensor) else full[k]
        if got[k] is not obj or _local(obj).data_ptr() != ptr:
            problems.append(f"{k}: not written in place")
        if not isinstance(got[k], torch.nn.Parameter) or not got[k].requires_grad:
            problems.append(f"{k}: no longer a Parameter that requires grad")
        if not _same_bits(_local(got[k]).detach(), _local(want)):
            problems.append(f"{k}: values differ from PyTorch's distribute")
    problems += _stats_problems(dict(utils.last_reshard_stats()), dst or None, None)
    return problems, dict(utils.last_reshard_stats())


def test_reshard_between_parameters_that_require_grad_writes_them_in_place():
    _assert_all_ranks_clean(run_on_ranks(WORLD, _parameters, timeout=60))


# ---------------------------------------------------------------- 7. replicated sources


def _replicated_to_other_ranks():
    full = {f"r{i}": _full((16, 8), torch.float32, 60 + i) for i in range(8)}
    full["plain"] = _full((32,), torch.float32, 70)
    src = _present({k: _src(v, [0, 1], [Replicate()]) for k, v in full.items()
                    if k != "plain"})
    if dist.get_rank() < 2:
        src["plain"] = full["plain"].clone()  # a plain tensor both hold whole
    dst = _present({
        k: _dst(v, [2, 3], [Shard(0)] if i % 2 else [Replicate()])
        for i, (k, v) in enumerate(full.items())
    })
    return _reshard_checked(src or None, dst or None, {(k,): v for k, v in full.items()},
                            bucket_bytes=SMALL_BUCKET)


def test_reshard_spreads_replicated_sources_over_the_ranks_that_hold_them():
    stats = _assert_all_ranks_clean(
        run_on_ranks(WORLD, _replicated_to_other_ranks, timeout=120)
    )
    total = stats[0]["bytes_sent"] + stats[1]["bytes_sent"]
    assert total == stats[2]["bytes_owned"] + stats[3]["bytes_owned"]
    # Both holders send, neither carries (nearly) everything.
    assert min(stats[0]["bytes_sent"], stats[1]["bytes_sent"]) >= total // 4, stats


def _replicated_everywhere():
    full = {
        "a": _full((8, 6), torch.float32, 80),
        "b": _full((6, 9), torch.bfloat16, 81),
    }
    src = {k: _src(v, ALL, [Replicate()]) for k, v in full.items()}
    dst = {"a": _dst(full["a"], ALL, [Shard(0)]), "b": _dst(full["b"], ALL, [Shard(1)])}
    return _reshard_checked(src, dst, {(k,): v for k, v in full.items()})


def test_reshard_copies_locally_what_a_rank_already_holds():
    for s in _assert_all_ranks_clean(run_on_ranks(WORLD, _replicated_everywhere, timeout=120)):
        assert s["bytes_received"] == s["bytes_sent"] == 0
        assert s["bytes_local"] == s["bytes_owned"] > 0


def _large_replicated(bucket_bytes: int):
    # Over 1 MiB each: regions several ranks hold are split between them.
    full = {
        "big_rep": _full((640, 512), torch.float32, 75),  # 1.25 MiB
        "big_hsdp": _full((1024, 384), torch.bfloat16, 76),  # 0.75 MiB a replica half
    }
    src = {
        "big_rep": _src(full["big_rep"], [0, 1], [Replicate()]),
        "big_hsdp": _src(full["big_hsdp"], HSDP, [Replicate(), Shard(0)]),
    }
    dst = _present({
        "big_rep": _dst(full["big_rep"], [2, 3], [Replicate()]),
        "big_hsdp": _dst(full["big_hsdp"], [3, 2, 1, 0], [Shard(1)]),
    })
    return _reshard_checked(_present(src), dst, {(k,): v for k, v in full.items()},
                            bucket_bytes=bucket_bytes)


@pytest.mark.parametrize("bucket_bytes", [1 << 20, 64 << 10])
def test_reshard_splits_large_replicated_regions_across_their_holders(bucket_bytes):
    stats = _assert_all_ranks_clean(
        run_on_ranks(WORLD, _large_replicated, bucket_bytes, timeout=300)
    )
    # Rank 2 and 3's copies of big_rep come from both rank 0 and rank 1.
    assert min(stats[0]["bytes_sent"], stats[1]["bytes_sent"]) > 640 * 512 * 4 // 2, stats


def _big_pieces(bucket_bytes: int):
    """Pieces of 1 MiB and more, which may travel straight from or into the tensors
    where they are one contiguous range of a local tensor: on both sides, on the
    source side only, on the destination side only, split between two holders; next to
    small pieces in the same rounds."""
    full = {
        # Row halves into row halves (1 MiB each): contiguous on both sides.
        "both": _full((1024, 512), torch.float32, 77),
        # Column shards (each its own 1 MiB local) into one whole tensor on rank 3:
        # a column block there.
        "src_only": _full((1024, 512), torch.float32, 78),
        # A whole tensor on rank 0 into column shards: a column block of the source.
        "dst_only": _full((1024, 1024), torch.bfloat16, 79),
        # 3 MiB two ranks hold, to two ranks: split between the holders.
        "split": _full((768, 1024), torch.float32, 80),
        "small": _full((5, 3), torch.float32, 81),
    }
    src = _present({
        "both": _src(full["both"], [0, 1], [Shard(0)]),
        "src_only": _src(full["src_only"], [0, 1], [Shard(1)]),
        "dst_only": _src(full["dst_only"], [0], [Replicate()]),
        "split": _src(full["split"], [0, 1], [Replicate()]),
        "small": _src(full["small"], ALL, [Shard(0)]),
    })
    dst = _present({
        "both": _dst(full["both"], [3, 2], [Shard(0)]),
        "src_only": _dst(full["src_only"], [3], [Replicate()]),
        "dst_only": _dst(full["dst_only"], [2, 3], [Shard(1)]),
        "split": _dst(full["split"], [2, 3], [Replicate()]),
        "small": _dst(full["small"], [2, 3], [Shard(1)]),
    })
    # Contiguous views at an offset into bigger buffers, on both sides: the bytes
    # around them must stay as they were.
    full["offset_view"] = _full((1024, 512), torch.float32, 82)
    rank = dist.get_rank()
    padded = None
    if rank == 1:
        padded = torch.full((1027, 512), 5.0)
        padded[2:1026].copy_(full["offset_view"])
        src["offset_view"] = padded[2:1026]
    if rank == 2:
        padded = torch.full((1027, 512), 7.0)
        dst["offset_view"] = padded[1:1025]
    problems, stats = _reshard_checked(src, dst, {(k,): v for k, v in full.items()},
                                       bucket_bytes=bucket_bytes)
    if rank == 2 and not (bool((padded[0] == 7).all()) and bool((padded[1025:] == 7).all())):
        problems.append("bytes around the offset destination view were overwritten")
    return problems, stats


@pytest.mark.parametrize("bucket_bytes", [256 << 20, 64 << 10])
def test_reshard_of_pieces_over_a_mebibyte_is_bit_exact(bucket_bytes):
    for rank, s in enumerate(_assert_all_ranks_clean(
            run_on_ranks(WORLD, _big_pieces, bucket_bytes, timeout=300))):
        assert s["buffer_bytes"] <= 2 * bucket_bytes, (rank, s)


def _every_dtype():
    # (Not int16: gloo cannot all-gather it, so PyTorch's reference cannot run.)
    dtypes = [torch.float64, torch.complex64, torch.int64, torch.float32, torch.int32,
              torch.float16, torch.bfloat16, torch.uint8, torch.int8, torch.bool]
    full = {}
    for i, dtype in enumerate(dtypes):
        # Odd sizes: no piece's byte count is a multiple of the widest element.
        base = _full((5, 3 + i), torch.int64, 700 + i)
        full[str(dtype)] = (base % 2).bool() if dtype == torch.bool else base.to(dtype)
    full["neg_zero_nan"] = torch.tensor([-0.0, float("nan"), float("inf"), 1e-45, 0.0])
    src = {k: _src(v, ALL, [Shard(0)]) for k, v in full.items()}
    dst = _present({k: _dst(v, [1, 3], [Shard(1) if v.dim() > 1 else Shard(0)])
                    for k, v in full.items()})
    return _reshard_checked(src, dst, {(k,): v for k, v in full.items()},
                            bucket_bytes=1024)


def test_reshard_of_every_dtype_in_shared_messages_is_bit_exact():
    _assert_all_ranks_clean(run_on_ranks(WORLD, _every_dtype, timeout=120))


def _non_contiguous():
    rank = dist.get_rank()
    full = {
        "t_src": _full((6, 10), torch.float32, 710),
        "sliced_dst": _full((4, 6), torch.float32, 711),
        "to_dtensor": _full((8, 5), torch.float32, 712),
    }
    src: dict[str, Any] = {"sliced_dst": _src(full["sliced_dst"], ALL, [Shard(1)])}
    if rank == 0:
        # A transposed view: the whole tensor, not contiguous.
        src["t_src"] = full["t_src"].t().contiguous().t()
        src["to_dtensor"] = full["to_dtensor"].t().contiguous().t()
    dst = _present({
        "t_src": _dst(full["t_src"], [1, 2], [Shard(1)]),
        "to_dtensor": _dst(full["to_dtensor"], ALL, [Shard(0)]),
    })
    if rank == 3:
        # A plain destination that is a column slice of a wider buffer.
        dst["sliced_dst"] = torch.full((4, 9), 7.0)[:, 2:8]
    return _reshard_checked(src, dst or None, {(k,): v for k, v in full.items()},
                            bucket_bytes=1024)


def test_reshard_reads_and_writes_non_contiguous_tensors_in_place():
    _assert_all_ranks_clean(run_on_ranks(WORLD, _non_contiguous, timeout=120))


# ---------------------------------------------------------------- 8. ShardedTensor, plain


def _sharded_and_plain_sources():
    rank = dist.get_rank()
    full = {
        "st": _full((9, 4), torch.float32, 90),  # what _sharded_tensor(9, 4, 90) holds
        "st_few_rows": _full((3, 5), torch.float32, 91),
        "whole_on_0": _full((10, 3), torch.bfloat16, 92),
        "whole_everywhere": _full((4, 6), torch.float32, 93),
        "to_plain": _full((6, 2), torch.float32, 94),
    }
    src: dict[str, Any] = {
        "st": _sharded_tensor(9, 4, 90),  # ChunkShardingSpec dim 0: 3, 3, 3, 0 rows
        "st_few_rows": _sharded_tensor(3, 5, 91),
        "whole_everywhere": full["whole_everywhere"].clone(),
        "to_plain": _src(full["to_plain"], ALL, [Shard(0)]),
    }
    if rank == 0:
        src["whole_on_0"] = full["whole_on_0"].clone()
    dst = _present({
        "st": _dst(full["st"], [0, 1], [Shard(1)]),
        "st_few_rows": _dst(full["st_few_rows"], ALL, [Shard(0)]),
        "whole_on_0": _dst(full["whole_on_0"], ALL, [Shard(0)]),
        "whole_everywhere": _dst(full["whole_everywhere"], [2, 3], [Shard(1)]),
    })
    if rank == 3:
        dst["to_plain"] = torch.zeros(6, 2)  # a plain destination takes the whole tensor
    return _reshard_checked(src, dst, {(k,): v for k, v in full.items()},
                            bucket_bytes=SMALL_BUCKET)


def test_reshard_sharded_tensor_and_whole_plain_sources_match_gather_distribute():
    _assert_all_ranks_clean(run_on_ranks(WORLD, _sharded_and_plain_sources, timeout=120))


def _sharded_tensor_grids():
    """ShardedTensors of arbitrary disjoint boxes (several per rank, interleaved), not
    the dim-0 chunks PyTorch's gather assumes: the reference distributes the seeded full
    tensors, and the plan's overlap check must accept them."""
    full = {
        "grid": _full((6, 7), torch.float32, 950),
        "interleaved": _full((10,), torch.bfloat16, 951),
    }
    grid = [
        [((3, 2), (0, 0)), ((1, 5), (5, 2))],  # rank 0: two shards
        [((1, 5), (0, 2))],
        [((4, 5), (1, 2))],
        [((3, 2), (3, 0))],
    ]
    interleaved = [[((1,), (i,)) for i in range(r, 10, 4)] for r in range(WORLD)]
    src = {"grid": _st_from_boxes(full["grid"], grid),
           "interleaved": _st_from_boxes(full["interleaved"], interleaved)}
    dst = _present({"grid": _dst(full["grid"], ALL, [Shard(1)]),
                    "interleaved": _dst(full["interleaved"], [2, 1], [Shard(0)])})
    if dist.get_rank() == 0:
        dst["whole_grid"] = torch.zeros(6, 7)
        src["whole_grid"] = full["grid"].clone()
    expect = {(k,): v for k, v in full.items()}
    gathered = {**expect, ("whole_grid",): full["grid"]}
    return _reshard_checked(src, dst, expect, bucket_bytes=1024, gathered=gathered)


def test_reshard_sharded_tensors_of_arbitrary_disjoint_boxes_match_distribute():
    _assert_all_ranks_clean(run_on_ranks(WORLD, _sharded_tensor_grids, timeout=120))


def _inner_cuts():
    """Rows wider than a bucket: pieces are cut inside the innermost dimension."""
    full = {
        "wide3d": _full((3, 2, 700), torch.float64, 960),
        "wide2d": _full((5, 300), torch.float32, 961),
    }
    src = _present({"wide3d": _src(full["wide3d"], ALL, [Shard(2)]),
                    "wide2d": _src(full["wide2d"], [2, 3], [Replicate()])})
    dst = _present({"wide3d": _dst(full["wide3d"], [0, 1], [Shard(0)]),
                    "wide2d": _dst(full["wide2d"], ALL, [Shard(1)])})
    return _reshard_checked(src, dst, {(k,): v for k, v in full.items()}, bucket_bytes=1024)


def test_reshard_cuts_rows_wider_than_a_bucket_and_stays_bit_exact():
    for s in _assert_all_ranks_clean(run_on_ranks(WORLD, _inner_cuts, timeout=180)):
        assert s["buffer_bytes"] <= 2 * 1024, s


# Several shards per rank (rank 0 two, rank 2 three), boxes along both dims.
_GRID_9x4 = [
    [((2, 4), (0, 0)), ((1, 2), (8, 2))],
    [((3, 2), (2, 0))],
    [((3, 2), (2, 2)), ((2, 4), (5, 0)), ((1, 2), (7, 2))],
    [((1, 2), (7, 0)), ((1, 2), (8, 0))],
]


def _sharded_tensor_destination(layout: str):
    full = _full((9, 4), torch.float32, 970)
    src = {"st": _src(full, ALL, [Shard(1)])}
    boxes = _chunked_boxes((9, 4), 0, WORLD) if layout == "chunks" else _GRID_9x4
    dst = {"st": _st_from_boxes(torch.full((9, 4), 7.0), boxes)}
    shards = [(shard.tensor, shard.tensor.data_ptr(), tuple(shard.metadata.shard_offsets))
              for shard in dst["st"].local_shards()]
    got = utils.reshard_state_dict(src, dst)
    problems = []
    if got["st"] is not dst["st"]:
        problems.append("the ShardedTensor destination was replaced")
    now = dst["st"].local_shards()
    for (tensor, ptr, (r, c)), shard in zip(shards, now):
        if shard.tensor is not tensor or tensor.data_ptr() != ptr:
            problems.append(f"shard at {(r, c)} was not written in place")
        want = full[r : r + tensor.shape[0], c : c + tensor.shape[1]]
        if not _same_bits(tensor, want):
            problems.append(f"shard at {(r, c)}: values differ from the full tensor")
    problems += _stats_problems(dict(utils.last_reshard_stats()), dst, None)
    return problems, dict(utils.last_reshard_stats())


@pytest.mark.parametrize("layout", ["chunks", "grid"])
def test_reshard_into_a_sharded_tensor_writes_its_local_shards_in_place(layout):
    _assert_all_ranks_clean(
        run_on_ranks(WORLD, _sharded_tensor_destination, layout, timeout=60)
    )


def _no_tensors(kind: str):
    rank = dist.get_rank()
    if kind == "none":
        src = dst = None
    elif kind == "empty":
        src, dst = {}, {}
    elif kind == "unused_sources":
        # Sources that no destination wants are not sent.
        src = {"w": _src(_full((8, 4), torch.float32, 980), ALL, [Shard(0)])}
        dst = {}
    else:
        src = {"a": 1, "b": [2, "x"], "c": None} if rank == 0 else {}
        dst = {"a": 0, "b": [0, ""], "kept": 5}
    got = utils.reshard_state_dict(src, dst)
    return got, dict(utils.last_reshard_stats())


def test_reshard_without_tensors_returns_the_values_and_moves_no_bytes():
    for got, s in run_on_ranks(WORLD, _no_tensors, "none", timeout=60):
        assert got is None and s["bytes_owned"] == s["bytes_sent"] == 0
    for got, s in run_on_ranks(WORLD, _no_tensors, "empty", timeout=60):
        assert got == {} and s["bytes_owned"] == s["bytes_sent"] == 0
    for got, s in run_on_ranks(WORLD, _no_tensors, "unused_sources", timeout=60):
        assert got == {} and s["bytes_sent"] == s["p2p_ops"] == 0, s
    for got, s in run_on_ranks(WORLD, _no_tensors, "values", timeout=60):
        assert got == {"a": 1, "b": [2, "x"], "kept": 5}
        assert s["bytes_owned"] == s["bytes_sent"] == s["bytes_received"] == 0
        assert s["p2p_ops"] == 0


# ---------------------------------------------------------------- 9. plan cache


def _layout(seed: int, dst_placement: Any):
    full = {
        "w": _full((12, 8), torch.float32, seed),
        "b": _full((8,), torch.bfloat16, seed + 1),
    }
    src: dict[str, Any] = {k: _src(v, ALL, [Shard(0)]) for k, v in full.items()}
    dst = _present({
        "w": _dst(full["w"], [0, 1], [dst_placement]),
        "b": _dst(full["b"], [0, 1], [Replicate()]),
    })
    # A non-tensor value that changes from call to call: the cached plan must carry
    # this call's value, not the first one's.
    src["seed"] = seed
    dst["seed"] = -1
    return src, dst, {(k,): v for k, v in full.items()}


def _plan_cache():
    seen = []
    src, dst, expect = _layout(100, Shard(1))
    seen.append(("first", *_reshard_checked(src, dst or None, expect)))
    src2, dst2, expect2 = _layout(200, Shard(1))  # new objects, same layouts
    seen.append(("same layouts", *_reshard_checked(src2, dst2 or None, expect2)))
    # The same objects again, new source values written in place.
    src3, _, expect3 = _layout(300, Shard(1))
    for k in ("w", "b"):
        src2[k]._local_tensor.copy_(src3[k]._local_tensor)
    src2["seed"] = 300
    seen.append(("same objects", *_reshard_checked(src2, dst2 or None, expect3)))
    src4, dst4, expect4 = _layout(400, Shard(0))  # another destination layout
    seen.append(("other layout", *_reshard_checked(src4, dst4 or None, expect4)))
    # Only rank 3's layout changes (it wants "b" whole too): every rank must replan.
    src5, dst5, expect5 = _layout(500, Shard(0))
    if dist.get_rank() == 3:
        dst5["b"] = torch.zeros(8, dtype=torch.bfloat16)
    seen.append(("one rank's layout", *_reshard_checked(src5, dst5 or None, expect5)))
    return [(what, problems, stats["planned"]) for what, problems, stats in seen]


def test_reshard_plan_is_cached_per_layout_and_reused_with_new_values():
    # A fresh group: no earlier test has warmed this process's plan cache.
    results = run_fresh(WORLD, _plan_cache, pg_timeout=30, timeout=180)
    for rank, calls in enumerate(results):
        for what, problems, _ in calls:
            assert problems == [], f"rank {rank}, {what}"
        planned = {what: p for what, _, p in calls}
        assert planned == {
            "first": True, "same layouts": False, "same objects": False,
            "other layout": True, "one rank's layout": True,
        }, f"rank {rank}"


def _long_run():
    """A training loop's syncs, many calls in one process: layouts cycling through more
    distinct plans than the cache keeps (the least recently used one goes), values new
    on every call, then a stretch of one layout that the cache serves."""
    seen = []
    layouts = 18  # more than the cache's 16 plans
    for call in range(2 * layouts):
        src, dst, expect = _layout(1000 + call, Shard(1))
        bucket = 1024 + 64 * (call % layouts)  # a distinct plan per bucket size
        problems, stats = _reshard_checked(src, dst or None, expect, bucket_bytes=bucket)
        seen.append((call, problems, stats["planned"], True))
    for call in range(2 * layouts, 2 * layouts + 6):
        src, dst, expect = _layout(1000 + call, Shard(1))
        problems, stats = _reshard_checked(src, dst or None, expect, bucket_bytes=4096)
        seen.append((call, problems, stats["planned"], call == 2 * layouts))
    return seen


def test_reshard_long_run_evicts_old_plans_and_stays_bit_exact():
    # A fresh group: the cache starts empty, as in a new trainer process.
    results = run_fresh(WORLD, _long_run, pg_timeout=60, timeout=400)
    for rank, calls in enumerate(results):
        for call, problems, planned, want_planned in calls:
            assert problems == [], f"rank {rank}, call {call}"
            assert planned == want_planned, f"rank {rank}, call {call}"


def _ties_change(first: str, second: str):
    """Two calls of one layout (shapes, dtypes, meshes, placements), where the
    destination's keys "emb" and "head" are tied in one call and not in the other."""
    seen = []
    for seed, tie in ((800, first), (810, second)):
        full = {"emb": _full((6, 4), torch.float32, seed), "head": _full((6, 4), torch.float32,
                                                                        seed)}
        if tie == "untied":
            full["head"] = _full((6, 4), torch.float32, seed + 1)
        src = {k: _src(v, ALL, [Shard(0)]) for k, v in full.items()}
        if tie != "untied":
            src["head"] = src["emb"]
        emb = _dst(full["emb"], [0, 1], [Shard(1)])
        head = _dst(full["head"], [0, 1], [Shard(1)])
        if tie == "tied" and emb is not None:
            head = emb
        dst = _present({"emb": emb, "head": head})
        pairs = ((("emb",), ("head",)),) if tie == "tied" else ()
        problems, stats = _reshard_checked(src, dst or None,
                                           {(k,): v for k, v in full.items()}, tied=pairs)
        seen.append((tie, problems))
    return seen


@pytest.mark.parametrize(("first", "second"), [("tied", "untied"), ("untied", "tied")])
def test_reshard_cached_plan_follows_destinations_that_stop_or_start_being_tied(
    first, second
):
    for rank, calls in enumerate(run_on_ranks(WORLD, _ties_change, first, second, timeout=120)):
        for tie, problems in calls:
            assert problems == [], f"rank {rank}, {tie}"


# ---------------------------------------------------------------- 10. bounded buckets


# Every torch.distributed call the bucket tests count (the data phase and the agreement).
_COUNTED = ["batch_isend_irecv", "isend", "irecv", "send", "recv", "all_to_all_single",
            "all_gather", "all_gather_into_tensor", "all_gather_object", "all_reduce",
            "broadcast", "broadcast_object_list", "gather_object", "scatter_object_list"]


def _counting() -> tuple[dict[str, int], Callable[[], None]]:
    """Counts the calls of ``_COUNTED`` (and the operations handed to
    ``batch_isend_irecv``, under ``"p2p_ops"``) until the returned undo is called."""
    counts = dict.fromkeys([*_COUNTED, "p2p_ops"], 0)
    originals = {name: getattr(dist, name) for name in _COUNTED}

    def wrap(name: str) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            if name == "batch_isend_irecv":
                counts["p2p_ops"] += len(args[0])
            return originals[name](*args, **kwargs)

        return counted

    # isend / irecv stay themselves: P2POp checks its op against them.
    for name in _COUNTED:
        if name not in ("isend", "irecv"):
            setattr(dist, name, wrap(name))

    def undo() -> None:
        for name, fn in originals.items():
            setattr(dist, name, fn)

    return counts, undo


def _many_small(count: int, rows: int, cols: int, bucket_bytes: int | None):
    full = {f"p{i}": _full((rows, cols), torch.float32, 500 + i) for i in range(count)}
    src = {k: _src(v, ALL, [Shard(0)]) for k, v in full.items()}
    dst = _present({k: _dst(v, [0, 1], [Shard(1)]) for k, v in full.items()})
    # The reference's own collectives are not counted: _reshard_checked runs it first.
    want_full = _reference_full(src)
    counts, undo = _counting()
    try:
        got = utils.reshard_state_dict(src, dst or None, bucket_bytes=bucket_bytes)
    finally:
        undo()
    stats = dict(utils.last_reshard_stats())
    want = _reference_dst(dst, want_full)
    problems: list[str] = []
    if dst:
        _compare(got, want, dst, {id(v): _local(v).data_ptr() for v in dst.values()}, (),
                 problems)
    problems += _stats_problems(stats, dst or None, bucket_bytes)
    total = sum(v.numel() * v.element_size() for v in full.values())
    return problems, stats, total, counts


def _assert_counts_match_stats(rank: int, stats: dict, counts: dict) -> None:
    # The statistics tell the truth about the calls made.
    assert counts["batch_isend_irecv"] == stats["collectives"], (rank, stats, counts)
    assert counts["p2p_ops"] == stats["p2p_ops"], (rank, stats, counts)
    # Nothing goes around the batched point-to-point route.
    for name in ("isend", "irecv", "send", "recv", "all_to_all_single", "broadcast",
                 "broadcast_object_list", "gather_object", "scatter_object_list"):
        assert counts[name] == 0, (rank, name, counts)


def test_reshard_in_small_buckets_holds_at_most_two_and_sends_per_bucket():
    bucket = SMALL_BUCKET
    # 64 tensors of 2 KiB: 128 KiB, all of it moving (every rank sends, two receive).
    results = run_on_ranks(WORLD, _many_small, 64, 32, 16, bucket, timeout=180)
    stats = _assert_all_ranks_clean([(p, s) for p, s, _, _ in results])
    # A round carries at most one bucket of what a rank sends plus receives.
    busiest = max(s["bytes_sent"] + s["bytes_received"] for s in stats)
    for rank, (s, (_, _, _, counts)) in enumerate(zip(stats, results)):
        assert s["buffer_bytes"] <= 2 * bucket, (rank, s)
        assert s["rounds"] >= math.ceil((s["bytes_sent"] + s["bytes_received"]) / bucket)
        # About one round per bucket of the busiest rank's bytes, never one per tensor.
        assert s["rounds"] <= 2 * math.ceil(busiest / bucket) + 2, (rank, s)
        assert s["collectives"] <= s["rounds"], (rank, s)
        assert s["p2p_ops"] <= 2 * (WORLD - 1) * s["rounds"], (rank, s)
        _assert_counts_match_stats(rank, s, counts)
    assert max(s["rounds"] for s in stats) > 1


def test_reshard_of_200_small_tensors_in_one_bucket_takes_one_round():
    results = run_on_ranks(WORLD, _many_small, 200, 4, 4, 1 << 20, timeout=180)
    stats = _assert_all_ranks_clean([(p, s) for p, s, _, _ in results])
    for rank, (s, (_, _, _, counts)) in enumerate(zip(stats, results)):
        assert s["rounds"] == 1, (rank, s)
        assert s["collectives"] == 1, (rank, s)
        # At most one message to and from each peer, whatever the tensor count.
        assert s["p2p_ops"] <= 2 * (WORLD - 1), (rank, s)
        _assert_counts_match_stats(rank, s, counts)
        # The agreement is a few small collectives, not one per tensor.
        assert sum(counts[n] for n in _COUNTED) <= 5, (rank, counts)


# ---------------------------------------------------------------- 11. errors


def _error_inputs(kind: str) -> tuple[Any, Any]:
    """Sources and destinations with one problem (about key ``mlp_w3``) of ``kind``,
    next to a good key."""
    rank = dist.get_rank()
    good = _full((8, 4), torch.float32, 600)
    bad = _full((8, 4), torch.float32, 601)
    src: dict[str, Any] = {"good": _src(good, ALL, [Shard(0)])}
    dst: dict[str, Any] = _present({"good": _dst(good, [0, 1], [Shard(1)])})
    # Meshes used on some ranks only are created on every rank, in one order.
    _mesh([1, 2])
    _mesh([2, 3])
    bad_dst = _dst(bad, [0, 1], [Shard(1)])
    if kind == "dst_shape":
        bad_dst = _dst(_full((8, 5), torch.float32, 601), [0, 1], [Shard(1)])
    if kind == "dtype":
        bad_dst = _dst(bad.to(torch.bfloat16), [0, 1], [Shard(1)])
    src["mlp_w3"] = _src(bad, ALL, [Shard(0)])
    if kind == "src_shapes":
        # Plain whole tensors that disagree on the global shape.
        src["mlp_w3"] = bad.clone() if rank == 0 else _full((9, 4), torch.float32, 601)
    if kind == "src_dtypes":
        # Plain whole tensors that disagree on the dtype.
        src["mlp_w3"] = bad.clone() if rank == 0 else bad.to(torch.float64)
    if kind == "overlap_2d":
        # Ranks 0, 1 hold row halves, ranks 2, 3 column halves: every box partly
        # overlaps two others.
        src["mlp_w3"] = (_src(bad, [0, 1], [Shard(0)]) if rank < 2
                         else _src(bad, [2, 3], [Shard(1)]))
    if kind == "no_source":
        del src["mlp_w3"]
    if kind == "uncovered" and rank == 3:
        del src["mlp_w3"]  # rows 6 and 7 are then held by no source
    if kind == "overlap":
        # Rank 0 holds it whole, ranks 1 and 2 a half each: overlapping, unequal boxes.
        src["mlp_w3"] = bad.clone() if rank == 0 else _src(bad, [1, 2], [Shard(0)])
    if kind == "partial":
        src["mlp_w3"] = DTensor.from_local(bad.clone(), _mesh(ALL), [Partial()],
                                           run_check=False)
    if kind == "strided":
        src["mlp_w3"] = DTensor.from_local(
            bad[2 * rank : 2 * rank + 2].clone(), _mesh(ALL),
            [_StridedShard(0, split_factor=2)], run_check=False,
        )
    if kind == "bad_leaf" and rank == 2:
        src["mlp_w3_extra"] = {1, 2}  # a set: not a supported leaf
    if kind == "unpicklable_leaf":
        # Rank 2 alone holds a value that cannot be sent; ranks 0 and 1 want it.
        if rank == 2:
            src["mlp_w3_lock"] = threading.Lock()
        if rank < 2:
            dst["mlp_w3_lock"] = None
    if kind == "dst_overlap":
        # Rank 0's destinations for two keys are views that partly share memory (not a
        # tie: the result would depend on the order of the copies).
        src["mlp_w3_b"] = _src(_full((8, 4), torch.float32, 602), ALL, [Shard(0)])
        if rank == 0:
            buf = torch.full((12, 4), 7.0)
            bad_dst = buf[0:8]
            dst["mlp_w3_b"] = buf[4:12]
    if kind == "dst_overlaps_src":
        # Rank 0 reads a source from and writes a destination into overlapping memory.
        buf = torch.full((12, 4), 7.0)
        buf[0:8].copy_(good)
        src["mlp_w3_b"] = buf[0:8] if rank == 0 else _full((8, 4), torch.float32, 600)
        if rank == 0:
            dst["mlp_w3_c"] = buf[4:12]
        src["mlp_w3_c"] = _src(_full((8, 4), torch.float32, 603), ALL, [Shard(0)])
    if kind == "sparse_leaf":
        # Rank 2 alone holds it, as a sparse tensor; ranks 0 and 1 want it dense.
        if rank == 2:
            src["mlp_w3_sparse"] = torch.eye(3).to_sparse()
        if rank < 2:
            dst["mlp_w3_sparse"] = torch.zeros(3, 3)
    if bad_dst is not None:
        dst["mlp_w3"] = bad_dst
    return _present(src) or None, dst or None


def _reshard_error(kind: str):
    src, dst = _error_inputs(kind)
    unchanged = _snapshot(dst)
    try:
        utils.reshard_state_dict(src, dst)
    except Exception as exc:  # noqa: BLE001 - the spec is about which exception
        return type(exc).__name__, str(exc), unchanged()
    return None, "", unchanged()


ERRORS = ["dst_shape", "src_shapes", "dtype", "src_dtypes", "no_source", "uncovered",
          "overlap", "overlap_2d", "partial", "strided", "bad_leaf", "unpicklable_leaf",
          "sparse_leaf",
          # Last: where it fails in the data phase it must not disturb the other kinds.
          "dst_overlap", "dst_overlaps_src"]


def _each(worker: Callable[[str], Any], kinds: list[str]) -> list[Any]:
    """``worker(kind)`` for every kind in turn, in one group: each case raises on every
    rank (through the agreement), which leaves the group's collectives in step."""
    return [worker(kind) for kind in kinds]


def _by_kind(results: list[list[Any]], kinds: list[str]) -> dict[str, list[Any]]:
    """Per kind, every rank's result."""
    return {kind: [per_rank[i] for per_rank in results] for i, kind in enumerate(kinds)}


@pytest.fixture(scope="module")
def error_results() -> dict[str, list[Any]]:
    # One fresh group with a short collective timeout for every kind: a rank left
    # waiting on one that raised fails in seconds (and shows as another exception).
    results = run_fresh(WORLD, _each, _reshard_error, ERRORS, pg_timeout=20, timeout=300)
    return _by_kind(results, ERRORS)


@pytest.mark.parametrize("kind", ERRORS)
def test_reshard_raises_on_every_rank_naming_the_key_before_writing(kind, error_results):
    results = error_results[kind]
    for rank, (name, text, changed) in enumerate(results):
        assert name in ("ValueError", "RankFailure"), (rank, name, text)
        assert "mlp_w3" in text, (rank, text)
        assert changed == [], (rank, changed)
    if kind in ("bad_leaf", "unpicklable_leaf", "sparse_leaf"):
        # Only rank 2 can see it; the others learn it from rank 2.
        assert [name for name, _, _ in results] == [
            "RankFailure", "RankFailure", "ValueError", "RankFailure"]


# ---------------------------------------------------------------- 12. untrusted peers


def _craft(kind: str, desc: tuple) -> Any:
    """Rank 1's layout description as a faulty or hostile peer could send it. The wire
    format (docs: (source entries, destination entries, source value paths, destination
    value paths), an entry (path, global shape, dtype name, [(start, size)], tie)) is
    what the planner must check before using."""
    if kind == "not_a_tuple":
        return "garbage"
    src = [list(e) for e in desc[0]]
    first = src[0]
    if kind == "box_outside":
        first[3] = [((6, 0), (4, 4))]
    elif kind == "negative_start":
        first[3] = [((-2, 0), (2, 4))]
    elif kind == "huge_shape":
        first[1] = (1 << 40, 1 << 40)
        first[3] = [((0, 0), (1 << 40, 1 << 40))]
    elif kind == "unknown_dtype":
        first[2] = "torch.not_a_dtype"
    elif kind == "box_not_a_pair":
        first[3] = [5]
    elif kind == "float_sizes":
        first[3] = [((2.0, 0), (2, 4))]
    elif kind == "unhashable_path":
        first[0] = (["mlp_w3"],)
    return ([tuple(e) for e in src], *desc[1:])


def _reshard_with_a_lying_peer(kind: str):
    rank = dist.get_rank()
    full = _full((8, 4), torch.float32, 900)
    src = {"mlp_w3": _src(full, ALL, [Shard(0)])}
    dst = _present({"mlp_w3": _dst(full, [0, 1], [Shard(1)])}) or None
    unchanged = _snapshot(dst)
    original = dist.all_gather_object

    def lying(object_list, obj, group=None):
        if isinstance(obj, tuple) and len(obj) == 4 and isinstance(obj[0], list):
            obj = _craft(kind, obj)
        return original(object_list, obj, group=group)

    if rank == 1:
        dist.all_gather_object = lying
    try:
        utils.reshard_state_dict(src, dst)
    except Exception as exc:  # noqa: BLE001 - the spec is about which exception
        return type(exc).__name__, str(exc), unchanged()
    finally:
        dist.all_gather_object = original
    return None, "", unchanged()


LIES = ["not_a_tuple", "box_outside", "negative_start", "huge_shape", "unknown_dtype",
        "box_not_a_pair", "float_sizes", "unhashable_path"]


@pytest.fixture(scope="module")
def lie_results() -> dict[str, list[Any]]:
    results = run_fresh(WORLD, _each, _reshard_with_a_lying_peer, LIES, pg_timeout=20,
                        timeout=300)
    return _by_kind(results, LIES)


@pytest.mark.parametrize("kind", LIES)
def test_reshard_raises_on_every_rank_for_a_malformed_peer_description(kind, lie_results):
    for rank, (name, text, changed) in enumerate(lie_results[kind]):
        # A clear error that blames rank 1, the same on every rank, nothing written.
        assert name in ("ValueError", "RankFailure"), (rank, name, text)
        assert "rank 1" in text, (rank, text)
        assert changed == [], (rank, changed)


# ---------------------------------------------------------------- memory checks, in process


@pytest.fixture(params=["extension", "python"])
def memory_pass(request, monkeypatch):
    """reshard's per-call memory check, through the extension's pass or the Python one
    taken where the extension lacks it: both must answer alike."""
    from sdict_ext import ops

    if request.param == "python":
        real = ops.extension_entry
        monkeypatch.setattr(ops, "extension_entry",
                            lambda name: None if name == "shared_memory" else real(name))
    from sdict_ext.collectives import reshard
    from sdict_ext.tree import flatten

    return lambda src, dst: reshard._ties(flatten(src), flatten(dst))


def test_memory_check_sees_tied_destinations_as_one_tensor(memory_pass):
    buf = torch.zeros(16)
    meta = torch.empty(4, device="meta")
    ties = memory_pass({"s": torch.ones(3)}, {"a": buf[0:8], "b": buf[0:8], "c": buf[8:16],
                                               "m": meta, "n": meta})
    assert ties[0] == ties[1] != ties[2]
    assert ties[3] == ties[4] not in ties[:3]


@pytest.mark.parametrize("case", ["destinations", "source"])
def test_memory_check_rejects_destinations_sharing_memory_naming_both_keys(memory_pass, case):
    buf = torch.zeros(16)
    if case == "destinations":
        src, dst, names = {}, {"a": buf[0:8], "b": buf[4:12]}, ("'a'", "'b'")
    else:
        src, dst, names = {"w": buf[2:10]}, {"x": buf[0:8]}, ("'w'", "'x'")
    with pytest.raises(ValueError, match="share memory") as err:
        memory_pass(src, dst)
    assert all(name in str(err.value) for name in names)
