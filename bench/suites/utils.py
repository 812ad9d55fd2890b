"""Suite ``utils``: ``sdict_ext.utils`` against ``torch.distributed._state_dict_utils``.

One process: ``copy_state_dict`` (issue 3's 20,000 small tensors, and a few large ones,
which should come within 1.2x of a memcpy), ``create_cpu_state_dict`` and
``offload_state_dict_to_cpu``. On CUDA the state dict lives on the GPU and is copied into
pinned host memory, which is what a checkpoint does.

Several ranks (gloo on CPU, NCCL on CUDA): ``gather_state_dict`` of DTensors sharded
unevenly on dim 0 (some ranks hold nothing for the smallest tensors),
``broadcast_state_dict`` from rank 0's full state dict into every rank's DTensor shards,
and ``distribute_state_dict`` from a full state dict present on every rank.

``reshard_state_dict`` (issue 25) moves a transformer-shaped state dict (bf16 and fp32,
odd sizes) from FSDP's Shard(0) into tensor parallelism's Shard(1) (norms replicated):
over the same 2 ranks, and from 4 ranks to 2 (ranks 2 and 3 source only; such cases
get a group of 4 ranks whatever ``--world-size`` says). PyTorch's way is gather then
distribute, and ``DTensor.redistribute`` key by key where both layouts share one mesh;
the bound is one ``all_to_all_single`` (and one batch of isend/irecv) of exactly the
bytes per rank pair that the layouts make any plan move.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._state_dict_utils as tsu
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from bench.harness import (
    ROLE_BOUND,
    ROLE_SDICT,
    ROLE_TORCH,
    ROLE_VARIANT,
    CaseSpec,
    Ctx,
    load_sdict,
)
from bench.suites._inputs import DTYPE_MIX, fmt_bytes, make_tensors, random_numels, total_bytes
from bench.suites._reshard import Layout, model_tensors

__all__ = ["cases", "run"]

KB, MB = 1024, 1024 * 1024

# gather / bcast / distribute: (tensors, columns); rows run from 1 to 2 * columns, so the
# total is about 4 * tensors * columns**2 bytes (medium: 105 MB gathered, 211 MB broadcast).
# shared: (count, bytes) of the create_cpu_state_dict(share_memory=True) case.
# sharded: whether the gather case also runs on ShardedTensors (not at small, whose
# run time stays what it was; tiny keeps it for CI's check of the results).
# reshard: the model (hidden, ffn, vocab, layers; medium: 191 MB) and the small bucket of
# a variant row (rounds are at most 16 MiB anyway: this one bounds memory tighter).
_SIZES = {
    "tiny": dict(small=(1_000, 256, 16 * KB), large=(4, 4 * MB), gather=(64, 64), bcast=(64, 64),
                 distribute=(64, 64), shared=(4, 4 * MB), sharded=True,
                 reshard=(63, 171, 251, 2), reshard_bucket=64 * KB),
    "small": dict(small=(20_000, 256, 16 * KB), large=(16, 16 * MB), gather=(1_000, 64),
                  bcast=(2_000, 64), distribute=(1_000, 64), shared=(4, 16 * MB),
                  sharded=False, reshard=(509, 1367, 4001, 2), reshard_bucket=1 * MB),
    "medium": dict(small=(20_000, 1 * KB, 64 * KB), large=(64, 64 * MB), gather=(1_000, 162),
                   bcast=(2_000, 162), distribute=(2_000, 162), shared=(64, 16 * MB),
                   sharded=True, reshard=(1021, 2741, 8009, 4), reshard_bucket=4 * MB),
    "large": dict(small=(100_000, 1 * KB, 64 * KB), large=(256, 64 * MB), gather=(5_000, 1024),
                  bcast=(10_000, 1024), distribute=(10_000, 1024), shared=(256, 16 * MB),
                  sharded=True, reshard=(2053, 5483, 32003, 8), reshard_bucket=16 * MB),
}


def cases(size: str, device: str) -> list[CaseSpec]:
    """The suite's cases at ``size`` for ``device``."""
    p = _SIZES[size]
    copy_bound = "memcpy" if device == "cpu" else "d2h"
    out = []
    small = dict(count=p["small"][0], lo=p["small"][1], hi=p["small"][2])
    large = dict(count=p["large"][0], lo=p["large"][1], hi=p["large"][1])
    label_small = f"{small['count']}x{fmt_bytes(small['lo'])}-{fmt_bytes(small['hi'])}"
    label_large = f"{large['count']}x{fmt_bytes(large['lo'])}"
    for label, shape in ((label_small, small), (label_large, large)):
        out.append(CaseSpec("utils", f"copy_state_dict {label}", bound=copy_bound,
                            params=dict(kind="copy", **shape)))
    out.append(CaseSpec("utils", f"create_cpu_state_dict {label_small}",
                        params=dict(kind="create", **small)))
    # A process-based async checkpoint's staging copy: big float32 tensors in shared
    # memory. Creating it is page allocation (the tensors are uninitialised), so its
    # bound is populating a fresh shared segment of the same size.
    count, nbytes = p["shared"]
    out.append(CaseSpec("utils", f"create_cpu_state_dict(share_memory) {count}x"
                        f"{fmt_bytes(nbytes)} float32", bound="shm_populate",
                        params=dict(kind="create", count=count, lo=nbytes, hi=nbytes,
                                    share=True, dtypes="float32")))
    # On CPU, offloading CPU tensors moves nothing: it measures the traversal alone, so
    # no bandwidth bound applies.
    for label, shape in ((label_small, small), (label_large, large)):
        out.append(CaseSpec("utils", f"offload_state_dict_to_cpu {label}",
                            bound=None if device == "cpu" else "d2h",
                            params=dict(kind="offload", **shape)))
    count, cols = p["gather"]
    out.append(CaseSpec("utils", f"gather_state_dict {count} DTensors Shard(0) uneven",
                        multi_rank=True, bound="all_gather",
                        params=dict(kind="gather", count=count, cols=cols)))
    # The same tensors as ShardedTensors (ChunkShardingSpec on dim 0, the layout
    # PyTorch's gather assumes), to compare with the DTensor row above.
    if p["sharded"]:
            out.append(CaseSpec("utils", f"gather_state_dict {count} ShardedTensors dim 0 uneven",
                            multi_rank=True, bound="all_gather",
                            params=dict(kind="gather", count=count, cols=cols, sharded=True)))
    count, cols = p["bcast"]
    out.append(CaseSpec("utils", f"broadcast_state_dict {count} tensors into DTensor shards",
                        multi_rank=True, bound="broadcast",
                        params=dict(kind="broadcast", count=count, cols=cols)))
    count, cols = p["distribute"]
    out.append(CaseSpec("utils", f"distribute_state_dict {count} tensors into DTensor shards",
                        multi_rank=True, params=dict(kind="distribute", count=count, cols=cols)))
    hidden, ffn, vocab, layers = p["reshard"]
    nbytes = sum(t.nbytes for t in model_tensors(hidden, ffn, vocab, layers))
    model = dict(hidden=hidden, ffn=ffn, vocab=vocab, layers=layers, bucket=p["reshard_bucket"])
    label = f"reshard_state_dict {layers}-layer model {fmt_bytes(nbytes)} bf16/fp32"
    # Each case is its own bound family: the bound moves that case's bytes.
    out.append(CaseSpec("utils", f"{label} FSDP Shard(0) x2 -> TP Shard(1) x2 (same ranks)",
                        multi_rank=True, bound="reshard 2->2",
                        params=dict(kind="reshard", src=2, dst=2, **model)))
    out.append(CaseSpec("utils", f"{label} Shard(0) x4 -> TP Shard(1) x2 (ranks 2,3 source only)",
                        multi_rank=True, bound="reshard 4->2", min_world_size=4,
                        params=dict(kind="reshard", src=4, dst=2, **model)))
    return out


def run(spec: CaseSpec, ctx: Ctx) -> None:
    """Builds the case's inputs and measures every implementation."""
    kind = spec.params["kind"]
    runner = {
        "copy": _run_copy, "create": _run_create, "offload": _run_offload,
        "gather": _run_gather, "broadcast": _run_broadcast, "distribute": _run_distribute,
        "reshard": _run_reshard,
    }.get(kind)
    if runner is None:
        raise ValueError(f"utils: unknown case kind {kind!r}")
    runner(spec, ctx)


def _state_dict(spec: CaseSpec, device: torch.device) -> dict:
    """A model-like nested state dict: tensors plus the non-tensor leaves PyTorch allows."""
    p = spec.params
    dtypes = (getattr(torch, p["dtypes"]),) if "dtypes" in p else DTYPE_MIX
    specs = random_numels(p["count"], p["lo"], p["hi"], dtypes, seed=11)
    tensors = make_tensors(specs, device, seed=12)
    model = {f"layers.{i // 8}.w{i % 8}": t for i, t in enumerate(tensors)}
    return {"model": model, "meta": {"step": 100, "tag": "bench", "lr": 1e-3}}


def _tensors(sd: dict) -> list[torch.Tensor]:
    return list(sd["model"].values())


def _same_values(a: dict, b: dict) -> bool:
    return a["meta"] == b["meta"] and a["model"].keys() == b["model"].keys() and all(
        torch.equal(x.cpu(), b["model"][k].cpu()) for k, x in a["model"].items()
    )


def _run_copy(spec: CaseSpec, ctx: Ctx) -> None:
    src = _state_dict(spec, ctx.device)
    pin = ctx.device.type == "cuda"
    dst = tsu._create_cpu_state_dict(src, pin_memory=pin)
    nbytes, n = total_bytes(_tensors(src)), len(_tensors(src))
    nb = ctx.device.type == "cuda"
    ctx.measure(
        "torch _copy_state_dict", ROLE_TORCH,
        lambda: tsu._copy_state_dict(src, dst, non_blocking=nb), nbytes=nbytes, tensors=n,
    )
    fn, why = load_sdict("utils", "copy_state_dict")

    def verify() -> bool:
        for t in _tensors(dst):
            t.zero_()
        fn(src, dst, non_blocking=nb)
        ctx.sync()
        return _same_values(src, dst)

    ctx.measure(
        "sdict_ext.copy_state_dict", ROLE_SDICT,
        (lambda: fn(src, dst, non_blocking=nb)) if fn else None,
        nbytes=nbytes, tensors=n, missing=why, verify=verify if fn else None,
    )


def _run_create(spec: CaseSpec, ctx: Ctx) -> None:
    src = _state_dict(spec, ctx.device)
    pin = ctx.device.type == "cuda"
    share = spec.params.get("share", False)
    args = f"pin_memory={pin}" + (", share_memory=True" if share else "")
    nbytes, n = total_bytes(_tensors(src)), len(_tensors(src))
    ctx.measure(
        f"torch _create_cpu_state_dict({args})", ROLE_TORCH,
        lambda: tsu._create_cpu_state_dict(src, pin_memory=pin, share_memory=share),
        nbytes=nbytes, tensors=n,
    )
    fn, why = load_sdict("utils", "create_cpu_state_dict")

    def verify() -> bool:
        ours = fn(src, pin_memory=pin, share_memory=share)
        ref = tsu._create_cpu_state_dict(src, pin_memory=pin, share_memory=share)
        return ours["meta"] == ref["meta"] and ours["model"].keys() == ref["model"].keys() and all(
            o.shape == r.shape and o.dtype == r.dtype and o.device == r.device
            and o.is_shared() == r.is_shared() and o.is_pinned() == r.is_pinned()
            for o, r in zip(ours["model"].values(), ref["model"].values(), strict=True)
        )

    ctx.measure(
        f"sdict_ext.create_cpu_state_dict({args})", ROLE_SDICT,
        (lambda: fn(src, pin_memory=pin, share_memory=share)) if fn else None,
        nbytes=nbytes, tensors=n, missing=why, verify=verify if fn else None,
    )


def _run_offload(spec: CaseSpec, ctx: Ctx) -> None:
    src = _state_dict(spec, ctx.device)
    nbytes, n = total_bytes(_tensors(src)), len(_tensors(src))
    ctx.measure(
        "torch _offload_state_dict_to_cpu", ROLE_TORCH,
        lambda: tsu._offload_state_dict_to_cpu(src), nbytes=nbytes, tensors=n,
    )
    fn, why = load_sdict("utils", "offload_state_dict_to_cpu")
    ctx.measure(
        "sdict_ext.offload_state_dict_to_cpu", ROLE_SDICT, (lambda: fn(src)) if fn else None,
        nbytes=nbytes, tensors=n, missing=why,
        verify=(lambda: _same_values(fn(src), src)) if fn else None,
    )


def _sharded(spec: CaseSpec, ctx: Ctx, fill: bool) -> tuple[dict, dict]:
    """Full tensors (identical on every rank) and DTensors sharded unevenly on dim 0.

    Row counts run from 1 up, so with several ranks the smallest tensors leave the last
    ranks with empty shards, the case PyTorch's and our gather must both get right.
    """
    p = spec.params
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    gen = torch.Generator().manual_seed(13)
    full, local = {}, {}
    for i in range(p["count"]):
        rows = 1 + (i * 7919) % (2 * p["cols"])
        t = torch.empty(rows, p["cols"]).uniform_(generator=gen).to(ctx.device)
        full[f"layers.{i // 4}.w{i % 4}"] = t
        shard = torch.chunk(t, ctx.world_size, dim=0)
        mine = shard[ctx.rank] if ctx.rank < len(shard) else t[rows:]
        mine = mine.clone() if fill else torch.zeros_like(mine)
        local[f"layers.{i // 4}.w{i % 4}"] = DTensor.from_local(
            mine, mesh, [Shard(0)], run_check=False, shape=t.shape, stride=t.stride()
        )
    return full, local


def _as_sharded_tensors(full: dict, local: dict, ctx: Ctx) -> dict:
    """The DTensors of :func:`_sharded` as ShardedTensors with the same shards.

    Built from metadata directly (``init_from_local_shards`` would run one object
    all-gather per tensor): the ``torch.chunk`` split on dim 0 that
    ``ChunkShardingSpec`` makes, ranks past the last chunk holding no shard.
    """
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard as STShard
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed._shard.sharded_tensor.metadata import (
        ShardedTensorMetadata,
        TensorProperties,
    )

    out = {}
    for key, t in full.items():
        rows = t.shape[0]
        step = -(-rows // ctx.world_size)
        shards = [
            ShardMetadata([lo, 0], [min(step, rows - lo), t.shape[1]], f"rank:{r}/{ctx.device}")
            for r, lo in enumerate(range(0, rows, step))
        ]
        meta = ShardedTensorMetadata(shards, t.shape, TensorProperties(dtype=t.dtype))
        mine = [
            STShard(local[key].to_local(), m) for m in shards if m.placement.rank() == ctx.rank
        ]
        out[key] = ShardedTensor._init_from_local_shards_and_global_metadata(mine, meta)
    return out


def _run_gather(spec: CaseSpec, ctx: Ctx) -> None:
    full, local = _sharded(spec, ctx, fill=True)
    if spec.params.get("sharded"):
        local = _as_sharded_tensors(full, local, ctx)
    nbytes, n = total_bytes(list(full.values())), len(full)
    ctx.measure(
        "torch _gather_state_dict", ROLE_TORCH, lambda: tsu._gather_state_dict(local),
        nbytes=nbytes, tensors=n,
    )
    fn, why = load_sdict("utils", "gather_state_dict")

    def verify() -> bool:
        ours = fn(local)
        return ours.keys() == full.keys() and all(torch.equal(ours[k], v) for k, v in full.items())

    ctx.measure(
        "sdict_ext.gather_state_dict", ROLE_SDICT, (lambda: fn(local)) if fn else None,
        nbytes=nbytes, tensors=n, missing=why, verify=verify if fn else None,
    )


def _shards_match(result: dict, full: dict, ctx: Ctx) -> bool:
    for key, t in full.items():
        shard = torch.chunk(t, ctx.world_size, dim=0)
        want = shard[ctx.rank] if ctx.rank < len(shard) else t[t.shape[0]:]
        got = result[key]
        got = got.to_local() if isinstance(got, DTensor) else got
        if not torch.equal(got, want):
            return False
    return True


def _run_broadcast(spec: CaseSpec, ctx: Ctx) -> None:
    full, local = _sharded(spec, ctx, fill=False)
    # Only rank 0 holds the full state dict, as with broadcast_from_rank0 loading.
    mine = full if ctx.rank == 0 else {}
    nbytes, n = total_bytes(list(full.values())), len(full)
    ctx.measure(
        "torch _broadcast_state_dict", ROLE_TORCH,
        lambda d: tsu._broadcast_state_dict(mine, d, ctx.device),
        setup=lambda: (dict(local),), nbytes=nbytes, tensors=n,
    )
    fn, why = load_sdict("utils", "broadcast_state_dict")

    def verify() -> bool:
        for v in local.values():
            v.to_local().zero_()
        result = dict(local)
        fn(mine, result, ctx.device)
        return _shards_match(result, full, ctx)

    ctx.measure(
        "sdict_ext.broadcast_state_dict", ROLE_SDICT,
        (lambda d: fn(mine, d, ctx.device)) if fn else None,
        setup=lambda: (dict(local),), nbytes=nbytes, tensors=n, missing=why,
        verify=verify if fn else None,
    )
    if fn is None or ctx.device.type != "cpu":
        return
    # Ranks on rank 0's host may read their boxes out of its memory (opt-in:
    # route="direct"); this row is what they get then.

    def by_direct_reads(d: dict) -> None:
        fn(mine, d, ctx.device, route="direct")

    ctx.measure(
        "sdict_ext.broadcast_state_dict (direct reads)", ROLE_VARIANT, by_direct_reads,
        setup=lambda: (dict(local),), nbytes=nbytes, tensors=n,
    )


def _run_distribute(spec: CaseSpec, ctx: Ctx) -> None:
    full, local = _sharded(spec, ctx, fill=False)
    nbytes, n = total_bytes(list(full.values())), len(full)
    ctx.measure(
        "torch _distribute_state_dict", ROLE_TORCH,
        lambda d: tsu._distribute_state_dict(full, d, ctx.device),
        setup=lambda: (dict(local),), nbytes=nbytes, tensors=n,
    )
    fn, why = load_sdict("utils", "distribute_state_dict")

    def verify() -> bool:
        for v in local.values():
            v.to_local().zero_()
        result = dict(local)
        fn(full, result, ctx.device)
        return _shards_match(result, full, ctx)

    ctx.measure(
        "sdict_ext.distribute_state_dict", ROLE_SDICT,
        (lambda d: fn(full, d, ctx.device)) if fn else None,
        setup=lambda: (dict(local),), nbytes=nbytes, tensors=n, missing=why,
        verify=verify if fn else None,
    )


# What an sdict_ext reshard row's info holds per rank: last_reshard_stats() keys (and
# the peak extra host memory of the verifying call) under the bound rows' names.
_RESHARD_INFO = {"sent_bytes": "bytes_sent", "received_bytes": "bytes_received",
                 "local_bytes": "bytes_local", "owned_bytes": "bytes_owned",
                 "buffer_bytes": "buffer_bytes", "host_peak_bytes": None, "rounds": "rounds",
                 "collectives": "collectives", "p2p_ops": "p2p_ops"}


def _per_rank(values: list[int], ctx: Ctx) -> list[list[int]]:
    """``values`` of every rank (one all-gather), indexed by rank."""
    mine = torch.tensor(values, dtype=torch.int64, device=ctx.dist.device)
    every = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(every, mine)
    return [t.tolist() for t in every]


def _same_shards(ours: dict, ref: dict) -> bool:
    """Same keys, placements, global shapes, dtypes and bit-equal local shards."""
    return ours.keys() == ref.keys() and all(
        isinstance(o, DTensor) and o.placements == r.placements and o.shape == r.shape
        and o.dtype == r.dtype and torch.equal(o.to_local(), r.to_local())
        for o, r in ((ours[k], ref[k]) for k in ref)
    )


def _run_reshard(spec: CaseSpec, ctx: Ctx) -> None:
    p = spec.params
    layout = Layout(tuple(model_tensors(p["hidden"], p["ffn"], p["vocab"], p["layers"])),
                    src=p["src"], dst=p["dst"])
    src_mesh, dst_mesh = layout.meshes(ctx.device.type)
    src = layout.source(ctx.rank, src_mesh, ctx.device)
    dst = layout.destination(ctx.rank, dst_mesh)
    nbytes, n = layout.total_bytes, len(layout.tensors)
    dst_ranks = tuple(range(layout.dst))

    def gather_then_distribute(d: dict) -> dict:
        full = tsu._gather_state_dict(src, ranks_only=dst_ranks)
        if d:
            tsu._distribute_state_dict(full, d, ctx.device)
        return d

    ctx.measure(
        "torch _gather_state_dict + _distribute_state_dict", ROLE_TORCH, gather_then_distribute,
        setup=lambda: (dict(dst),), nbytes=nbytes, tensors=n,
    )
    ref = gather_then_distribute(dict(dst))
    redistribute = "torch DTensor.redistribute key by key"
    if src_mesh is dst_mesh:
        ctx.measure(
            redistribute, ROLE_TORCH,
            lambda: {k: v.redistribute(dst_mesh, dst[k].placements) for k, v in src.items()},
            nbytes=nbytes, tensors=n,
        )
    else:
        ctx.skip(redistribute, ROLE_TORCH, "n/a: redistribute moves a DTensor within its own "
                 "mesh; here the source and destination meshes differ", nbytes, n)

    _measure_reshard_bounds(ctx, layout, nbytes, n)
    fn, why = load_sdict("utils", "reshard_state_dict")
    stats, _ = load_sdict("utils", "last_reshard_stats")
    # The destination exists already (an inference engine's weights, RL weight sync):
    # written in place, as the bound writes its preallocated buffer. The variants: a
    # small bucket (less staging memory, more rounds), and meta destinations, which the
    # call allocates as PyTorch's distribute does (first-touch page faults included).
    real = layout.allocate(dst, ctx.device)
    name = "sdict_ext.reshard_state_dict"
    for impl, role, into, kwargs in (
        (f"{name} (in place)", ROLE_SDICT, real, {}),
        (f"{name} (in place, bucket_bytes={fmt_bytes(p['bucket'])})", ROLE_VARIANT, real,
         dict(bucket_bytes=p["bucket"])),
        (f"{name} (meta destination, allocates)", ROLE_VARIANT, dst, {}),
    ):
        _measure_reshard(ctx, impl, role, (fn, stats, why), (src, into, ref), kwargs, nbytes, n)


def _measure_reshard(ctx: Ctx, impl: str, role: str, sdict: tuple, dicts: tuple, kwargs: dict,
                     nbytes: int, n: int) -> None:
    """One sdict_ext reshard row; its info holds each rank's bytes, rounds and calls as
    ``last_reshard_stats()`` reports them for a call whose host peak is probed too."""
    fn, stats, why = sdict
    src, dst, ref = dicts
    counters: list[list[int]] = []
    planned: list[bool] = []

    def verify() -> bool:
        for v in dst.values():
            if not v.is_meta:
                v.to_local().zero_()
        memory = ctx.host_memory
        base = memory.start() if memory.available else None
        ours = fn(src, dict(dst), **kwargs)
        peak = memory.peak_since(base) if base is not None else -1
        got = stats()
        planned.append(bool(got["planned"]))
        values = [peak if key is None else int(got[key]) for key in _RESHARD_INFO.values()]
        counters.extend(_per_rank(values, ctx))
        return _same_shards(ours, ref)

    row = ctx.measure(
        impl, role, (lambda d: fn(src, d, **kwargs)) if fn else None,
        setup=lambda: (dict(dst),), nbytes=nbytes, tensors=n, missing=why,
        verify=verify if fn else None,
    )
    if counters:
        info = {name: [c[i] for c in counters] for i, name in enumerate(_RESHARD_INFO)}
        info["bucket_bytes"] = kwargs.get("bucket_bytes", stats()["bucket_bytes"])
        info["planned"] = planned[0]
        row.info.update(info)


def _measure_reshard_bounds(ctx: Ctx, layout: Layout, nbytes: int, n: int) -> None:
    """The case's bound: exactly the layouts' bytes per rank pair, moved by one
    collective (the diagonal, a rank's own share, is copied as any plan must)."""
    world, rank = ctx.world_size, ctx.rank
    pairs = layout.pair_bytes(world)
    send = pairs[rank]
    recv = [pairs[r][rank] for r in range(world)]
    inp = torch.ones(sum(send), dtype=torch.uint8, device=ctx.device)
    out = torch.empty(sum(recv), dtype=torch.uint8, device=ctx.device)
    info = {
        "sent_bytes": [sum(pairs[r]) - pairs[r][r] for r in range(world)],
        "received_bytes": [sum(pairs[r][s] for r in range(world)) - pairs[s][s]
                           for s in range(world)],
        "local_bytes": [pairs[r][r] for r in range(world)],
    }

    def one_all_to_all() -> None:
        dist.all_to_all_single(out, inp, output_split_sizes=recv, input_split_sizes=send)

    row = ctx.measure("dist.all_to_all_single (same bytes per rank pair)", ROLE_BOUND,
                      one_all_to_all, nbytes=nbytes, tensors=n)
    row.info.update(info)
    sends, recvs = inp.split(send), out.split(recv)
    ops = [dist.P2POp(dist.isend, sends[s], s) for s in range(world) if s != rank and send[s]]
    ops += [dist.P2POp(dist.irecv, recvs[r], r) for r in range(world) if r != rank and recv[r]]

    def one_batch() -> None:
        recvs[rank].copy_(sends[rank])
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()

    row = ctx.measure("dist.batch_isend_irecv (same bytes per rank pair)", ROLE_BOUND,
                      one_batch, nbytes=nbytes, tensors=n)
    row.info.update(info)
