"""Tests for sdict_ext.staging.PinnedStager, the AsyncStager for DCP's async_save.

Staged results are compared bit-exactly with a snapshot of the source taken at staging
time and with what PyTorch's ``_create_cpu_state_dict`` + ``_copy_state_dict`` produce;
checkpoints written through ``async_save`` are read back with ``dcp.load``, and those of
DCP's process-based upload (and torchtitan's ``CheckpointManager``, which uses it) are
compared with what ``DefaultStager`` writes.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import subprocess
import sys
import threading
import time
import warnings
import weakref
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse

from sdict_ext import staging, tree
from sdict_ext.staging import PinnedStager
from tests.mp import run_fresh, run_on_ranks

CALL_TIMEOUT_S = 120

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _sample_state_dict(device: str = "cpu") -> dict:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, generator=g)
    return {
        "model": {
            "w": w.to(device),
            "b": torch.randn(16, generator=g).to(torch.bfloat16).to(device),
            "idx": torch.arange(12).view(3, 4).t().to(device),  # non-contiguous int64
            "mask": (torch.randn(5, generator=g) > 0).to(device),
            "empty": torch.empty(0, 4, device=device),
            "scalar": torch.tensor(2.5, device=device),
        },
        "optim": {
            "state": {"w": {"step": torch.tensor(3.0), "exp_avg": torch.randn(8, 16).to(device)}},
            "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": ["w"]}],
        },
        "extra": io.BytesIO(b"abc"),
        "name": "run",
        "n": 7,
        "none": None,
    }


def _snapshot(obj):
    """A deep copy of a state dict with every tensor cloned to the CPU."""
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_snapshot(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_snapshot(v) for v in obj)
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, io.BytesIO):
        return io.BytesIO(obj.getvalue())
    return obj


def _mutate(obj) -> None:
    """Changes every tensor and BytesIO of a state dict in place."""
    if isinstance(obj, dict):
        for v in obj.values():
            _mutate(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _mutate(v)
    elif isinstance(obj, torch.Tensor):
        if obj.dtype == torch.bool:
            obj.logical_not_()
        else:
            obj.add_(1)
    elif isinstance(obj, io.BytesIO):
        obj.seek(0)
        obj.write(b"zzz")


def _assert_equal(staged, expected, path: str = "") -> None:
    assert type(staged) is type(expected), path
    if isinstance(expected, dict):
        assert list(staged) == list(expected), path
        for k in expected:
            _assert_equal(staged[k], expected[k], f"{path}.{k}")
    elif isinstance(expected, (list, tuple)):
        assert len(staged) == len(expected), path
        for i, (s, e) in enumerate(zip(staged, expected)):
            _assert_equal(s, e, f"{path}.{i}")
    elif isinstance(expected, torch.Tensor):
        assert staged.device.type == "cpu", path
        assert staged.dtype == expected.dtype and staged.shape == expected.shape, path
        assert torch.equal(staged, expected.cpu()), path
    elif isinstance(expected, io.BytesIO):
        assert staged.getvalue() == expected.getvalue(), path
    else:
        assert staged == expected, path


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return [obj] if isinstance(obj, torch.Tensor) else []


def _stage_now(stager: PinnedStager, state_dict: dict) -> dict:
    future = stager.stage(state_dict)
    stager.synchronize_staging()
    return future.result()


def test_pinned_stager_is_an_async_stager_that_needs_no_sync_after_execute():
    stager = PinnedStager(pin_memory=False)
    assert isinstance(stager, AsyncStager)
    assert stager.should_synchronize_after_execute is False
    stager.close()


def _check_snapshot_survives_source_changes(device: str, pin_memory: bool) -> None:
    state_dict = _sample_state_dict(device)
    expected = _snapshot(state_dict)
    with PinnedStager(pin_memory=pin_memory) as stager:
        future = stager.stage(state_dict)
        stager.synchronize_staging()
        _mutate(state_dict)  # what optimizer.step() does once staging is synchronized
        state_dict["optim"]["param_groups"][0]["lr"] = 0.5
        _assert_equal(future.result(), expected)


def test_stage_returns_future_with_bit_exact_snapshot_cpu():
    _check_snapshot_survives_source_changes("cpu", pin_memory=False)


@pytest.mark.cuda
@needs_cuda
def test_stage_returns_future_with_bit_exact_snapshot_cuda():
    _check_snapshot_survives_source_changes("cuda", pin_memory=True)


def test_staged_state_dict_matches_pytorch_create_and_copy():
    state_dict = _sample_state_dict()
    del state_dict["extra"]  # PyTorch's type check rejects BytesIO in _copy_state_dict
    reference = _copy_state_dict(state_dict, _create_cpu_state_dict(state_dict))
    with PinnedStager(pin_memory=False) as stager:
        _assert_equal(_stage_now(stager, state_dict), reference)


def test_synchronous_staging_returns_the_state_dict():
    state_dict = _sample_state_dict()
    expected = _snapshot(state_dict)
    with PinnedStager(pin_memory=False, async_staging=False) as stager:
        staged = stager.stage(state_dict)
        assert isinstance(staged, dict)
        _mutate(state_dict)
        stager.synchronize_staging()  # a no-op here: nothing is in flight
        _assert_equal(staged, expected)


def test_three_stages_of_one_layout_allocate_one_slab(monkeypatch):
    calls = []
    real = staging.create_cpu_state_dict

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(staging, "create_cpu_state_dict", counting)
    state_dict = _sample_state_dict()
    with PinnedStager(pin_memory=False) as stager:
        pointers = []
        for _ in range(3):
            expected = _snapshot(state_dict)
            staged = _stage_now(stager, state_dict)
            _assert_equal(staged, expected)
            pointers.append([t.data_ptr() for t in _tensors(staged) if t.numel()])
            _mutate(state_dict)
        assert calls == [{"pin_memory": False, "share_memory": False}]
        assert pointers[0] == pointers[1] == pointers[2]
        # Each tensor has a storage of its own (as with DefaultStager), a slice of one slab.
        slabs = {staging._slabs.at(t.untyped_storage().data_ptr()).start
                 for t in _tensors(staged) if t.numel()}
        assert len(slabs) == 1
        stats = stager.stats
        assert (stats.stages, stats.allocations) == (3, 1)
        assert stats.staged_bytes == sum(
            t.numel() * t.element_size() for t in _tensors(_sample_state_dict())
        )


def test_fresh_state_dict_objects_of_one_layout_reuse_the_slab():
    # model.state_dict() detaches into new tensor objects on every call.
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with PinnedStager(pin_memory=False) as stager:
        first = _stage_now(stager, model.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(2)
        second = _stage_now(stager, model.state_dict())
        assert stager.stats.allocations == 1
        for key, value in model.state_dict().items():
            assert second[key].data_ptr() == first[key].data_ptr()
            assert torch.equal(second[key], value)


def test_plain_values_are_refreshed_on_every_stage():
    state_dict = _sample_state_dict()
    with PinnedStager(pin_memory=False) as stager:
        first = _stage_now(stager, state_dict)
        state_dict["optim"]["param_groups"][0]["lr"] = 0.01
        state_dict["name"] = "renamed"
        second = _stage_now(stager, state_dict)
        assert stager.stats.allocations == 1
        assert first["optim"]["param_groups"][0]["lr"] == 0.1
        assert second["optim"]["param_groups"][0]["lr"] == 0.01
        assert second["name"] == "renamed"
        assert second["optim"]["param_groups"][0]["betas"] == (0.9, 0.999)


def _add_key(sd):
    sd["model"]["new"] = torch.ones(3)


def _change_shape(sd):
    sd["model"]["w"] = torch.zeros(4, 16)


def _change_dtype(sd):
    sd["model"]["w"] = sd["model"]["w"].double()


def _remove_key(sd):
    del sd["optim"]["state"]["w"]["exp_avg"]


def _value_for_tensor(sd):
    # "model" is a level of tensors only (staged in bulk); now one leaf is a plain value.
    sd["model"]["mask"] = 7


@pytest.mark.parametrize(
    "change", [_add_key, _change_shape, _change_dtype, _remove_key, _value_for_tensor]
)
def test_layout_change_reallocates_and_releases_the_old_slab(change):
    state_dict = _sample_state_dict()
    with PinnedStager(pin_memory=False) as stager:
        staged = _stage_now(stager, state_dict)
        old = weakref.ref(staged["model"]["w"])
        old_storage = weakref.ref(staged["model"]["w"].untyped_storage())
        del staged
        change(state_dict)
        expected = _snapshot(state_dict)
        _assert_equal(_stage_now(stager, state_dict), expected)
        assert stager.stats.allocations == 2
        gc.collect()
        assert old() is None
        assert old_storage() is None


def test_layout_is_keyed_on_the_tree_signature_so_a_stride_change_replans():
    state_dict = {"w": torch.zeros(4, 3), "step": 1}
    with PinnedStager(pin_memory=False) as stager:
        _stage_now(stager, state_dict)
        assert stager._layout.sig == tree.flatten(state_dict, type_check=False).signature
        state_dict["w"] = torch.arange(12.0).reshape(3, 4).t()
        staged = _stage_now(stager, state_dict)
        assert torch.equal(staged["w"], state_dict["w"]) and staged["step"] == 1
        assert stager.stats.allocations == 2


class _Blocker:
    """A plain leaf whose staging waits for ``release`` and records when it finished."""

    def __init__(self, release: threading.Event, order: list[str]) -> None:
        self.release = release
        self.order = order

    def __deepcopy__(self, memo):
        if not self.release.wait(timeout=30):
            raise TimeoutError("the test never released the blocked staging")
        self.order.append("staged")
        return "blocker"


class _Boom:
    """A plain leaf whose staging fails."""

    def __deepcopy__(self, memo):
        raise ValueError("boom while staging")


def _model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(torch.ones(2, 4)).sum().backward()
    return model, optimizer


def test_guard_optimizer_makes_step_wait_for_staging():
    model, optimizer = _model_and_optimizer()
    before = _snapshot(model.state_dict())
    release, order = threading.Event(), []
    with PinnedStager(pin_memory=False) as stager:
        stager.guard_optimizer(optimizer)
        future = stager.stage({"model": model.state_dict(), "gate": _Blocker(release, order)})

        def step():
            optimizer.step()
            order.append("step")

        stepper = threading.Thread(target=step)
        stepper.start()
        stepper.join(timeout=0.3)
        assert stepper.is_alive(), "optimizer.step() ran while staging was in flight"
        release.set()
        stepper.join(timeout=30)
        assert order == ["staged", "step"]
        _assert_equal(future.result()["model"], before)
        assert not torch.equal(model.weight.detach(), before["weight"])


def test_staging_failure_surfaces_from_future_synchronize_and_guarded_step():
    model, optimizer = _model_and_optimizer()
    with PinnedStager(pin_memory=False) as stager:
        future = stager.stage({"model": model.state_dict(), "bad": _Boom()})
        assert isinstance(future.exception(timeout=30), ValueError)
        with pytest.raises(ValueError, match="boom while staging"):
            stager.synchronize_staging()
        stager.synchronize_staging()  # delivered once; the future keeps it

        stager.guard_optimizer(optimizer)
        stager.stage({"bad": _Boom()})
        with pytest.raises(ValueError, match="boom while staging"):
            optimizer.step()

        # The stager stays usable after a failed staging.
        expected = _snapshot(model.state_dict())
        _assert_equal(_stage_now(stager, model.state_dict()), expected)


def test_synchronous_staging_failure_raises_from_stage():
    with PinnedStager(pin_memory=False, async_staging=False) as stager:
        with pytest.raises(ValueError, match="boom while staging"):
            stager.stage({"bad": _Boom()})


def test_unstageable_tensor_is_named_by_key_path():
    state_dict = {"model": {"ok": torch.ones(2), "sp": torch.eye(3).to_sparse()}}
    with PinnedStager(pin_memory=False) as stager:
        future = stager.stage(state_dict)
        with pytest.raises(ValueError, match=r"'model\.sp'.*sparse"):
            future.result()
        assert stager.stats.allocations == 0


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="bucket_bytes"):
        PinnedStager(pin_memory=False, bucket_bytes=0)
    with PinnedStager(pin_memory=False) as stager:
        with pytest.raises(TypeError, match="state_dict must be a dict"):
            stager.stage([torch.ones(2)])
        with pytest.raises(TypeError, match="torch.optim.Optimizer"):
            stager.guard_optimizer(object())


def test_small_buckets_stage_the_same_values():
    state_dict = _sample_state_dict()
    expected = _snapshot(state_dict)
    with PinnedStager(pin_memory=False, bucket_bytes=64) as stager:
        _assert_equal(_stage_now(stager, state_dict), expected)


def test_shared_memory_staging():
    state_dict = _sample_state_dict()
    with PinnedStager(pin_memory=False, share_memory=True) as stager:
        staged = _stage_now(stager, state_dict)
        # Storages of their own, sliced from one shared segment (which is what goes to
        # another process, see _reduce_tensor).
        slabs = {staging._slabs.at(t.untyped_storage().data_ptr())
                 for t in _tensors(staged) if t.dim() and t.numel()}
        assert len(slabs) == 1
        (slab,) = slabs
        assert slab.shared and slab.storage().is_shared()
        _assert_equal(staged, _snapshot(state_dict))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback")
def test_pin_memory_without_cuda_warns_and_stages_pageable():
    with pytest.warns(UserWarning, match="pin_memory"):
        stager = PinnedStager(pin_memory=True)
    with stager:
        staged = _stage_now(stager, {"w": torch.ones(3)})
        assert torch.equal(staged["w"], torch.ones(3))


def test_closed_stager_raises_and_close_is_idempotent():
    model, optimizer = _model_and_optimizer()
    stager = PinnedStager(pin_memory=False)
    stager.guard_optimizer(optimizer)
    stager.close()
    stager.close()
    assert stager.closed
    for call in (
        lambda: stager.stage({"w": torch.ones(2)}),
        stager.synchronize_staging,
        lambda: stager.guard_optimizer(optimizer),
    ):
        with pytest.raises(RuntimeError, match="closed"):
            call()
    optimizer.step()  # close() removed the guard


def test_close_waits_for_staging_and_releases_the_slab():
    state_dict = _sample_state_dict()
    stager = PinnedStager(pin_memory=False)
    future = stager.stage(state_dict)
    stager.close()  # waits for the staging in flight
    staged = future.result()
    refs = [weakref.ref(t) for t in _tensors(staged)]
    storages = [weakref.ref(t.untyped_storage()) for t in _tensors(staged) if t.numel()]
    del staged, future
    gc.collect()
    assert all(r() is None for r in refs)
    assert all(r() is None for r in storages)


# DCP warns about single-process saves and loads even with no_dist=True.
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_async_save_round_trip_single_process(tmp_path):
    state_dict = _sample_state_dict()
    del state_dict["extra"]
    with PinnedStager(pin_memory=False) as stager:
        for step in range(2):
            expected = _snapshot(state_dict)
            path = tmp_path / f"step{step}"
            response = dcp.async_save(
                state_dict, checkpoint_id=path, async_stager=stager, no_dist=True
            )
            assert isinstance(response, AsyncSaveResponse)
            response.staging_completion.result(timeout=60)
            _mutate(state_dict)  # training goes on once staging completed
            response.upload_completion.result(timeout=60)

            loaded = _snapshot(expected)
            _mutate(loaded)
            loaded["n"] = loaded["name"] = loaded["none"] = None
            loaded["optim"]["param_groups"][0]["lr"] = None
            dcp.load(loaded, checkpoint_id=path, no_dist=True)
            _assert_equal(loaded, expected)
        assert stager.stats.allocations == 1


def _rank_values(shape, rank_offset=0.0):
    return torch.arange(torch.Size(shape).numel(), dtype=torch.float32).view(shape) + rank_offset


def _local(value):
    """The local data of a DTensor, ShardedTensor (one local shard) or plain tensor."""
    if hasattr(value, "to_local"):
        return value.to_local()
    if hasattr(value, "local_shards"):
        (shard,) = value.local_shards()
        return shard.tensor
    return value


def _on_rank_sharded_async_save(path: str) -> dict:
    from torch.distributed._shard.sharded_tensor import zeros as sharded_zeros
    from torch.distributed._shard.sharding_spec import ChunkShardingSpec
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    spec = ChunkShardingSpec(dim=0, placements=[f"rank:{r}/cpu" for r in range(world)])

    def build(fill: bool) -> dict:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ShardedTensor is deprecated
            st = sharded_zeros(spec, 6, 3)
        dt_full = _rank_values((10, 4)) if fill else torch.zeros(10, 4)
        if fill:
            st.local_shards()[0].tensor.copy_(_rank_values(st.local_shards()[0].tensor.shape, rank))
        return {
            "dt_shard": distribute_tensor(dt_full, mesh, [Shard(0)]),
            "dt_repl": distribute_tensor(dt_full * 2, mesh, [Replicate()]),
            "dt_scalar": distribute_tensor(torch.tensor(float(fill) + 0.5), mesh, [Replicate()]),
            "st": st,
            "plain": torch.full((3,), float(fill)),
            "step": 5 if fill else 0,
        }

    source = build(fill=True)
    with PinnedStager(pin_memory=False) as stager:
        staged = _stage_now(stager, source)
        staged_meta = {
            "dt_type": type(staged["dt_shard"]).__name__,
            "placements": [str(p) for p in staged["dt_shard"].placements],
            "local_equal": torch.equal(_local(staged["dt_shard"]), _local(source["dt_shard"])),
            "local_shape": tuple(_local(staged["dt_shard"]).shape),
            "st_offsets": [s.metadata.shard_offsets for s in staged["st"].local_shards()],
            "st_equal": torch.equal(_local(staged["st"]), _local(source["st"])),
        }
        response = dcp.async_save(source, checkpoint_id=path, async_stager=stager)
        response.upload_completion.result(timeout=60)

    target = build(fill=False)
    dcp.load(target, checkpoint_id=path)
    metadata = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    return {
        **staged_meta,
        "dt_chunks": len(metadata["dt_shard"].chunks),
        "st_chunks": len(metadata["st"].chunks),
        "loaded_equal": {
            key: torch.equal(_local(target[key]), _local(source[key]))
            for key in ("dt_shard", "dt_repl", "dt_scalar", "st", "plain")
        },
        "step": target["step"],
    }


@pytest.mark.dist
def test_async_save_writes_sharded_checkpoint_from_two_ranks(tmp_path):
    results = run_on_ranks(2, _on_rank_sharded_async_save, str(tmp_path), timeout=CALL_TIMEOUT_S)
    for rank, result in enumerate(results):
        assert result["dt_type"] == "DTensor"
        assert result["placements"] == ["S(0)"]
        assert result["local_shape"] == (5, 4)
        assert result["local_equal"] and result["st_equal"]
        assert result["st_offsets"] == [[3 * rank, 0]]
        assert result["dt_chunks"] == 2 and result["st_chunks"] == 2
        assert result["loaded_equal"] == dict.fromkeys(
            ("dt_shard", "dt_repl", "dt_scalar", "st", "plain"), True
        )
        assert result["step"] == 5


def test_first_staging_finds_the_devices_of_nested_and_sharded_leaves():
    meta = torch.empty(2, device="meta")
    tree = {"a": [torch.zeros(1), {"b": (meta, 3)}], "c": "text"}
    assert staging._devices_in(tree) == {torch.device("cpu"), torch.device("meta")}
    assert staging._devices_in({"x": [1, 2.0], "y": {}}) == set()


@pytest.mark.cuda
@needs_cuda
def test_cuda_snapshot_orders_after_work_queued_on_the_current_stream():
    source = torch.zeros(1 << 22, device="cuda")
    update = torch.full_like(source, 3.0)
    with PinnedStager(pin_memory=True) as stager:
        # A first stage sets up the slab, so the timed one below only enqueues copies.
        stager.stage({"w": source}).result()
        stager.synchronize_staging()
        # About a second of GPU time before the write: still queued when stage() returns
        # (a copy not ordered after it would read the zeros).
        torch.cuda._sleep(2_000_000_000)
        source.copy_(update)
        future = stager.stage({"w": source})
        stager.synchronize_staging()
        source.zero_()
        staged = future.result()["w"]
        assert staged.is_pinned()
        assert torch.equal(staged, torch.full((1 << 22,), 3.0))


@pytest.mark.cuda
@needs_cuda
def test_cuda_three_stages_reuse_the_pinned_slab():
    state_dict = _sample_state_dict("cuda")
    with PinnedStager(pin_memory=True) as stager:
        pointers = []
        for _ in range(3):
            expected = _snapshot(state_dict)
            staged = _stage_now(stager, state_dict)
            _assert_equal(staged, expected)
            pointers.append([t.data_ptr() for t in _tensors(staged) if t.numel()])
            _mutate(state_dict)
        assert pointers[0] == pointers[1] == pointers[2]
        assert stager.stats.allocations == 1


def _on_rank_failing_staging(failing: tuple[int, ...], async_staging: bool) -> list[str]:
    """Stages twice on every rank; the ranks in `failing` fail the first time.
    Returns, per staging, "ok" or the exception's type and message."""
    rank = dist.get_rank()
    outcomes = []
    with PinnedStager(pin_memory=False, async_staging=async_staging) as stager:
        for attempt in range(2):
            state_dict = {"w": torch.full((4,), float(rank)), "step": attempt}
            if attempt == 0 and rank in failing:
                state_dict["bad"] = _Boom()
            try:
                out = stager.stage(state_dict)
                staged = out.result(timeout=60) if async_staging else out
                assert torch.equal(staged["w"], state_dict["w"])
                outcomes.append("ok")
            except Exception as exc:  # noqa: BLE001 - the test reports what was raised
                outcomes.append(f"{type(exc).__name__}: {exc}")
        try:
            stager.synchronize_staging()
        except Exception:  # noqa: BLE001 - the failure was already seen through the future
            pass
    return outcomes


@pytest.mark.dist
@pytest.mark.parametrize("async_staging", [True, False])
def test_staging_failure_on_one_rank_fails_it_on_every_rank(async_staging):
    results = run_on_ranks(3, _on_rank_failing_staging, (1,), async_staging,
                           timeout=CALL_TIMEOUT_S)
    assert results[1][0] == "ValueError: boom while staging"
    for rank in (0, 2):
        assert results[rank][0].startswith("RuntimeError: PinnedStager.stage: staging failed "
                                           "on rank(s) [1]"), results[rank]
    assert all(r[1] == "ok" for r in results)  # the stagers stay usable


@pytest.mark.dist
def test_staging_failure_on_two_ranks_names_both():
    results = run_on_ranks(3, _on_rank_failing_staging, (0, 2), True, timeout=CALL_TIMEOUT_S)
    assert results[0][0] == results[2][0] == "ValueError: boom while staging"
    assert "staging failed on rank(s) [0, 2]" in results[1][0]


def _on_rank_local_only_staging() -> list[str]:
    rank = dist.get_rank()
    with PinnedStager(pin_memory=False, all_ranks=False) as stager:
        state_dict = {"w": torch.ones(2)}
        if rank == 1:
            state_dict["bad"] = _Boom()
        exc = stager.stage(state_dict).exception(timeout=60)
        return ["ok" if exc is None else type(exc).__name__]


@pytest.mark.dist
def test_all_ranks_false_keeps_failures_local():
    assert run_on_ranks(2, _on_rank_local_only_staging, timeout=CALL_TIMEOUT_S) == [
        ["ok"], ["ValueError"]
    ]


def test_all_ranks_true_needs_torch_distributed():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="all_ranks=True needs torch.distributed"):
        PinnedStager(pin_memory=False, all_ranks=True)


def _on_rank_one_never_stages(timeout_s: float | None, fail_here: bool = False) -> str:
    """Rank 1 builds its stager but never stages (holding it open until rank 0 has its
    answer); returns rank 0's staging outcome (and its notes)."""
    store = dist.distributed_c10d._get_default_store()
    given = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    with PinnedStager(pin_memory=False, **given) as stager:
        if dist.get_rank() == 1:
            store.wait(["never-stages/rank0-done"], timedelta(seconds=CALL_TIMEOUT_S))
            store.delete_key("never-stages/rank0-done")
            return "did not stage"
        state_dict = {"w": torch.ones(4)}
        if fail_here:
            state_dict["bad"] = _Boom()
        try:
            exc = stager.stage(state_dict).exception(timeout=CALL_TIMEOUT_S)
        finally:
            store.set("never-stages/rank0-done", "1")
        return " | ".join([f"{type(exc).__name__}: {exc}", *getattr(exc, "__notes__", [])])


@pytest.mark.dist
def test_staging_fails_within_the_job_timeout_when_a_rank_never_stages():
    # The job's timeout is 5 s; the stager's group had 30 min, so this call hung.
    results = run_fresh(2, _on_rank_one_never_stages, None, timeout=60, pg_timeout=5)
    assert results[1] == "did not stage"
    assert results[0].startswith(
        "RuntimeError: PinnedStager.stage: the other ranks did not report their staging "
        "within the stager's timeout (0:00:05)"
    ), results[0]


@pytest.mark.dist
def test_staging_fails_within_the_timeout_given_to_the_stager():
    # The pooled group's timeout is 30 s; the stager's own, 2 s, applies to the exchange.
    results = run_on_ranks(2, _on_rank_one_never_stages, 2.0, timeout=25)
    assert results[1] == "did not stage"
    assert "within the stager's timeout (0:00:02)" in results[0], results[0]


@pytest.mark.dist
def test_local_staging_failure_is_raised_when_the_exchange_times_out_too():
    results = run_on_ranks(2, _on_rank_one_never_stages, 2.0, True, timeout=25)
    assert results[0].startswith("ValueError: boom while staging | PinnedStager: the "
                                 "exchange with the other ranks failed too"), results[0]


def test_timeout_must_be_a_positive_timedelta():
    for bad in (5, timedelta(0)):
        with pytest.raises(ValueError, match="timeout must be a positive timedelta"):
            PinnedStager(pin_memory=False, timeout=bad)


def _open_fds_and_threads() -> tuple[int, int]:
    return len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task"))


def _make_stage_close(cycles: int) -> list[tuple[int, int]]:
    """Makes, stages with and closes (or, every other time, drops) a stager ``cycles``
    times after a warm-up; returns the (fds, threads) counts before and after."""
    state_dict = {"w": torch.full((4,), float(dist.get_rank()))}

    def cycle(i: int) -> None:
        stager = PinnedStager(pin_memory=False)
        staged = stager.stage(state_dict).result(timeout=60)
        assert torch.equal(staged["w"], state_dict["w"])
        if i % 2 == 0:
            stager.close()
        del stager  # unclosed: its group goes with it

    for i in range(10):
        cycle(i)
    counts = [_open_fds_and_threads()]
    for i in range(cycles):
        cycle(i)
    # A dropped stager's worker thread exits once it sees its executor gone.
    deadline = time.monotonic() + 30
    while any(t.name.startswith("PinnedStager") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "a dropped stager's thread did not exit"
        time.sleep(0.01)
    counts.append(_open_fds_and_threads())
    return counts


@pytest.mark.dist
def test_two_hundred_stagers_leak_no_file_descriptors_or_threads():
    # Each stager's gloo group held 5 descriptors and 3 threads past close() (and past
    # the stager's life): 200 cycles made 1,000 descriptors.
    for rank, (before, after) in enumerate(
        run_on_ranks(2, _make_stage_close, 200, timeout=CALL_TIMEOUT_S)
    ):
        assert after[0] <= before[0] + 4, (rank, before, after)
        assert after[1] <= before[1] + 2, (rank, before, after)


@pytest.mark.parametrize("async_staging", [True, False])
def test_staging_runs_under_the_callers_cuda_device(async_staging):
    # The worker thread starts on device 0; its first staging's cudaHostRegister (and
    # the slab's finalizer) made a context on GPU 0 whatever the rank's device. Here a
    # caller "on device 1" must see the whole staging run under that device's guard.
    guards: list[tuple[int | None, str]] = []
    active = threading.local()

    class Stager(PinnedStager):
        @staticmethod
        def _caller_device() -> int:
            return 1

        @staticmethod
        @contextlib.contextmanager
        def _device_guard(device):
            guards.append((device, threading.current_thread().name))
            active.device = device
            try:
                yield
            finally:
                active.device = None

    seen: list[int | None] = []

    class Probe:  # deep-copied by the staging's walk, wherever that runs
        def __deepcopy__(self, memo):
            seen.append(getattr(active, "device", None))
            return Probe()

    with Stager(pin_memory=False, async_staging=async_staging) as stager:
        out = stager.stage({"w": torch.ones(3), "probe": Probe()})
        staged = out.result(timeout=60) if async_staging else out
    assert torch.equal(staged["w"], torch.ones(3))
    assert seen == [1]
    assert [device for device, _ in guards] == [1]
    assert guards[0][1].startswith("PinnedStager") == async_staging


_NO_CONTEXT_ON_GPU0 = """
import ctypes, gc, torch
from sdict_ext.staging import PinnedStager

def gpu0_active():
    cuda = ctypes.CDLL("libcuda.so.1")
    dev, flags, active = ctypes.c_int(), ctypes.c_uint(), ctypes.c_int()
    assert cuda.cuInit(0) == 0 and cuda.cuDeviceGet(ctypes.byref(dev), 0) == 0
    assert cuda.cuDevicePrimaryCtxGetState(dev, ctypes.byref(flags), ctypes.byref(active)) == 0
    return active.value

torch.cuda.set_device(1)
sd = {"w": torch.randn(1 << 16, device="cuda:1"), "b": torch.arange(7, device="cuda:1")}
before = gpu0_active()
with PinnedStager(pin_memory=True) as stager:
    for _ in range(2):
        staged = stager.stage(sd).result(timeout=60)
        assert all(torch.equal(staged[k], sd[k].cpu()) for k in sd)
        assert staged["w"].is_pinned()
    del staged
gc.collect()
print("GPU0", before, gpu0_active())
"""


@pytest.mark.cuda
@pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (stages on device 1)"
)
def test_staging_on_device_one_makes_no_context_on_device_zero():
    done = subprocess.run(
        [sys.executable, "-c", _NO_CONTEXT_ON_GPU0],
        capture_output=True, text=True, timeout=180, check=False,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-3:] == ["GPU0", "0", "0"], done.stdout


def _on_fresh_process_three_stages() -> dict:
    """Three stagings of one layout in a process that has never staged before."""
    assert not tree._KINDS, "this process has walked a state dict; the test needs a fresh one"
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))
    state_dict = {"model": model.state_dict(), "step": 3}
    pointers, equal = [], []
    with PinnedStager(pin_memory=False) as stager:
        for _ in range(3):
            staged = _stage_now(stager, state_dict)
            pointers.append([t.data_ptr() for t in _tensors(staged)])
            equal.append(all(
                torch.equal(staged["model"][k], v) for k, v in state_dict["model"].items()
            ))
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1)
        return {"allocations": stager.stats.allocations, "pointers": pointers, "equal": equal}


@pytest.mark.dist
def test_fresh_process_reuses_the_slab_from_its_second_staging_on():
    # The first walk of a process must sign the layout as every later walk does, even
    # though it is the walk that first sees these leaf types.
    (result,) = run_fresh(1, _on_fresh_process_three_stages, timeout=CALL_TIMEOUT_S)
    assert result["equal"] == [True, True, True]
    assert result["allocations"] == 1
    assert result["pointers"][0] == result["pointers"][1] == result["pointers"][2]


# ------------------------------------------------ process-based async_save (DCP's PROCESS)


def _start_checkpoint_processes_here() -> None:
    """Lets this rank worker (a daemonic process of tests.mp) start DCP's checkpoint process.

    multiprocessing refuses children to daemonic processes; the checkpoint process still
    ends with this rank: :func:`_end_checkpoint_process` stops it, and without that it
    exits when its pipe to this process closes.
    """
    import multiprocessing

    multiprocessing.current_process()._config["daemon"] = False


def _end_checkpoint_process() -> None:
    """Stops DCP's checkpoint process of this rank (one per trainer process, kept by DCP)."""
    from torch.distributed.checkpoint import _async_process_executor as executor

    process = executor._CHECKPOINT_PROCESS
    executor._CHECKPOINT_PROCESS = None
    if process is not None and process._save_process.is_alive():
        process._send(executor._CheckpointSaveProcessControlOpts.TERMINATE)
        process._save_process.join(timeout=30)
        if process._save_process.is_alive():
            process._save_process.kill()
            process._save_process.join(timeout=30)


def _fsdp2_training_state(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import init_device_mesh

    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Embedding(10, 8), torch.nn.Linear(8, 16), torch.nn.ReLU(),
        torch.nn.Linear(16, 5, bias=False),
    )
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in (model[0], model[1], model[3]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(
        [{"params": [model[0].weight]}, {"params": list(model[1:].parameters()), "lr": 0.01}]
    )
    return model, optimizer


def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model(torch.arange(6).view(2, 3) % 10).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def _training_state_dict(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd, "step": 7, "note": "process route"}


def _local_values(obj):
    """Every leaf of a state dict, DTensors as clones of their local shards, in order."""
    if isinstance(obj, dict):
        return {k: _local_values(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_local_values(v) for v in obj)
    if isinstance(obj, torch.Tensor):
        return _local(obj).detach().clone()
    return obj


def _load_local_values(path: str, like: dict) -> dict:
    """``dcp.load`` of ``path`` into zeros shaped (and sharded) like ``like``; local values."""
    target = _zeros_like_tree(like)
    dcp.load(target, checkpoint_id=path)
    return _local_values(target)


def _checkpoint_layout(path: str) -> dict:
    """Each key's chunks (offsets and sizes) and dtype as written in ``path``'s metadata."""
    layout = {}
    for key, meta in dcp.FileSystemReader(path).read_metadata().state_dict_metadata.items():
        chunks = getattr(meta, "chunks", None)
        layout[key] = (
            type(meta).__name__,
            str(getattr(getattr(meta, "properties", None), "dtype", None)),
            sorted((tuple(c.offsets), tuple(c.sizes)) for c in chunks) if chunks else None,
        )
    return layout


def _on_rank_process_async_save(root: str) -> dict:
    """Two process-based async saves of one FSDP2 training state (a training step between
    them) by DefaultStager and by PinnedStagers with and without shared memory; what each
    wrote, loaded back."""
    import os

    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    os.environ["MASTER_ADDR"] = "127.0.0.1"  # where DCP's checkpoint processes meet
    _start_checkpoint_processes_here()
    model, optimizer = _fsdp2_training_state(seed=0)
    _train_step(model, optimizer)
    stagers = {
        "default": DefaultStager(StagingOptions(
            use_pinned_memory=False, use_shared_memory=True, use_non_blocking_copy=False
        )),
        "shared": PinnedStager(pin_memory=False, share_memory=True),
        "private": PinnedStager(pin_memory=False, share_memory=False),
    }
    expected = []
    try:
        for step in range(2):
            state_dict = _training_state_dict(model, optimizer)
            expected.append(_local_values(state_dict))
            for name, stager in stagers.items():
                response = dcp.async_save(
                    state_dict, checkpoint_id=f"{root}/{name}{step}", async_stager=stager,
                    async_checkpointer_type=AsyncCheckpointerType.PROCESS,
                )
                response.upload_completion.result(timeout=120)
            _train_step(model, optimizer)
        allocations = {name: stagers[name].stats.allocations for name in ("shared", "private")}
    finally:
        for stager in stagers.values():
            stager.close()
        _end_checkpoint_process()
    like = _training_state_dict(model, optimizer)
    out = {"allocations": allocations, "same_layout": [], "same_values": [], "as_staged": []}
    for step in range(2):
        default = f"{root}/default{step}"
        reference = _load_local_values(default, like)
        for name in ("shared", "private"):
            written = f"{root}/{name}{step}"
            loaded = _load_local_values(written, like)
            out["same_layout"].append(_checkpoint_layout(written) == _checkpoint_layout(default))
            out["same_values"].append(_equal_trees(loaded, reference))
            out["as_staged"].append(_equal_trees(loaded, expected[step]))
    return out


def _equal_trees(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_equal_trees(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal_trees(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    return a == b


@pytest.mark.dist
def test_process_async_save_of_fsdp2_state_writes_what_default_stager_writes(tmp_path):
    results = run_fresh(2, _on_rank_process_async_save, str(tmp_path), timeout=300,
                        pg_timeout=60)
    for result in results:
        assert result == {
            "allocations": {"shared": 1, "private": 1},
            "same_layout": [True] * 4,
            "same_values": [True] * 4,
            "as_staged": [True] * 4,
        }


def _on_rank_pickle_staged_dtensors_for_a_process() -> dict:
    """multiprocessing's pickling (what DCP's PROCESS upload sends) of a staged state dict
    with DTensors on one slab, unpickled here; and of a DTensor no stager made."""
    import pickle
    from multiprocessing.reduction import ForkingPickler

    from torch.distributed.tensor import DTensor, Replicate, Shard, init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    source = {
        "a": DTensor.from_local(_rank_values((2, 3), dist.get_rank()), mesh, [Shard(0)]),
        "b": DTensor.from_local(_rank_values((4,)), mesh, [Replicate()]),
        "p": _rank_values((5,)),
    }
    with PinnedStager(pin_memory=False, share_memory=True) as stager:
        staged = _stage_now(stager, source)
        back = pickle.loads(ForkingPickler.dumps(staged))
    user = DTensor.from_local(torch.ones(2), mesh, [Replicate()])
    return {
        "types": {k: type(v).__name__ for k, v in back.items()},
        "placements": [str(back[k].placements) for k in ("a", "b")],
        "equal": all(torch.equal(_local(back[k]), _local(source[k])) for k in source),
        # A storage of its own each (as staged), all within the one segment received.
        "own_storages": len({_local(v).untyped_storage().data_ptr() for v in back.values()}),
        "one_segment": max(_local(v).untyped_storage().data_ptr() for v in back.values())
        - min(_local(v).untyped_storage().data_ptr() for v in back.values()) < 4096,
        "user_reduction": staging._reduce_dtensor(user)[0] is user.__reduce_ex__(2)[0],
    }


@pytest.mark.dist
def test_staged_dtensors_pickle_for_a_process_as_views_of_one_shared_slab():
    for result in run_on_ranks(2, _on_rank_pickle_staged_dtensors_for_a_process,
                               timeout=CALL_TIMEOUT_S):
        assert result == {
            "types": {"a": "DTensor", "b": "DTensor", "p": "Tensor"},
            "placements": ["(Shard(dim=0),)", "(Replicate(),)"],
            "equal": True,
            "own_storages": 3,
            "one_segment": True,
            "user_reduction": True,
        }


def _open_descriptors(pid: int | str = "self") -> int:
    import os

    return len(os.listdir(f"/proc/{pid}/fd"))


def _on_rank_process_async_save_of_many_tensors(root: str, count: int) -> dict:
    """A process-based async save of ``count`` tensors (half DTensors) staged by a
    PinnedStager; the descriptors it took, and what it wrote, loaded back."""
    import os

    from torch.distributed.checkpoint import _async_process_executor as executor
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
    from torch.distributed.tensor import DTensor, Shard, init_device_mesh

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    _start_checkpoint_processes_here()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    base = torch.arange(4 * count, dtype=torch.float32).view(count, 4)
    state_dict = {
        "dt": {
            str(i): DTensor.from_local(base[i].clone(), mesh, [Shard(0)])
            for i in range(count // 2)
        },
        "plain": {str(i): base[i, :3] * 2 for i in range(count // 2, count)},
    }
    expected = _local_values(state_dict)
    before = _open_descriptors()
    with PinnedStager(pin_memory=False, share_memory=True) as stager:
        try:
            response = dcp.async_save(
                state_dict, checkpoint_id=root, async_stager=stager,
                async_checkpointer_type=AsyncCheckpointerType.PROCESS,
            )
            response.upload_completion.result(timeout=240)
            # DCP's checkpoint process still holds the request it just wrote, and with
            # it whatever it mapped to receive the staged state dict.
            receiver = _open_descriptors(executor._CHECKPOINT_PROCESS._save_process.pid)
            sender = _open_descriptors() - before
        finally:
            _end_checkpoint_process()
    loaded = _load_local_values(root, state_dict)
    return {"sender": sender, "receiver": receiver, "equal": _equal_trees(loaded, expected)}


@pytest.mark.dist
def test_process_async_save_of_20000_tensors_passes_one_descriptor_for_the_slab(tmp_path):
    # PyTorch's own route shares each tensor's storage: one descriptor per tensor on
    # both sides (20,000 is this machine's limit of open files). One rank: the 2-rank
    # process route is covered above, and 20,000 tensors take DCP minutes per rank here.
    (result,) = run_fresh(
        1, _on_rank_process_async_save_of_many_tensors, str(tmp_path), 20_000,
        timeout=400, pg_timeout=120,
    )
    assert result["equal"]
    # The process-group and pipe descriptors of the checkpoint process, not thousands.
    assert result["sender"] < 64, result
    assert result["receiver"] < 64, result


def _on_rank_process_async_save_with_unpicklable_value(root: str) -> dict:
    """Rank 1's state dict holds a value no pickler can send; then both save a good one."""
    import os

    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    _start_checkpoint_processes_here()
    rank = dist.get_rank()
    state_dict = {"w": torch.arange(4.0), "extra": {"step": 3, "hook": None}}
    outcomes = []
    with PinnedStager(pin_memory=False, share_memory=True) as stager:
        try:
            for attempt, path in enumerate((f"{root}/bad", f"{root}/good")):
                state_dict["extra"]["hook"] = (lambda: rank) if attempt == 0 and rank == 1 else None
                response = dcp.async_save(
                    state_dict, checkpoint_id=path, async_stager=stager,
                    async_checkpointer_type=AsyncCheckpointerType.PROCESS,
                )
                exc = response.upload_completion.exception(timeout=120)
                outcomes.append("ok" if exc is None else f"{type(exc).__name__}: {exc}")
        finally:
            _end_checkpoint_process()
    loaded = {"w": torch.zeros(4), "extra": {"step": 0, "hook": 1}}
    dcp.load(loaded, checkpoint_id=f"{root}/good")
    return {
        "outcomes": outcomes,
        "bad_written": os.path.exists(f"{root}/bad/.metadata"),
        "good_loaded": torch.equal(loaded["w"], state_dict["w"]) and loaded["extra"]["step"] == 3,
    }


@pytest.mark.dist
def test_process_async_save_of_an_unpicklable_value_fails_staging_on_every_rank(tmp_path):
    results = run_fresh(2, _on_rank_process_async_save_with_unpicklable_value, str(tmp_path),
                        timeout=300, pg_timeout=60)
    bad, failed_elsewhere = results[1]["outcomes"][0], results[0]["outcomes"][0]
    assert bad.startswith("TypeError: PinnedStager(share_memory=True): cannot stage "
                          "'extra.hook' for a process-based upload: its function value "
                          "cannot be pickled"), bad
    assert failed_elsewhere.startswith(
        "RuntimeError: PinnedStager.stage: staging failed on rank(s) [1]"
    ), failed_elsewhere
    for result in results:
        assert result["outcomes"][1] == "ok"
        assert not result["bad_written"]
        assert result["good_loaded"]


class _StatefulDict:
    """A Stateful stand-in for torchtitan's dataloader and LR schedulers."""

    def __init__(self, **state) -> None:
        self.state = state

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state_dict: dict) -> None:
        self.state = dict(state_dict)


class _Optimizers:
    """What torchtitan's OptimizersContainer is to DCP: the optimizer's FQN-keyed state."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state_dict: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizer, state_dict)


def _titan_manager(root: str, model, optimizer, async_mode: str):
    from torchtitan.components.checkpoint import CheckpointManager

    config = CheckpointManager.Config(
        enable=True, folder="checkpoint", interval=1, async_mode=async_mode, keep_latest_k=0
    )
    return CheckpointManager(
        config,
        dataloader=_StatefulDict(sample_index=0),
        model_parts=[model],
        optimizers=_Optimizers(model, optimizer),
        lr_schedulers=_StatefulDict(last_epoch=0),
        states={},
        sd_adapter=None,
        base_folder=root,
    )


def _titan_state(manager) -> dict:
    """What a torchtitan checkpoint holds: model entries, then each Stateful's state."""
    return _local_values({
        key: value.state_dict() if hasattr(value, "state_dict") else value
        for key, value in manager._flattened_model_states_sd().items()
    })


def _on_rank_torchtitan_pinned_mem_saves(root: str) -> dict:
    """torchtitan's CheckpointManager in async_with_pinned_mem mode with a PinnedStager
    (two saves, a training step between them); a fresh model and optimizer resumed from
    each, compared with the state at its save."""
    import os

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    _start_checkpoint_processes_here()
    model, optimizer = _fsdp2_training_state(seed=0)
    manager = _titan_manager(root, model, optimizer, "async_with_pinned_mem")
    # What a trainer does to use sdict_ext: hand the manager its stager before saving
    # (torchtitan makes a DefaultStager only when it has none).
    manager.stager = PinnedStager(pin_memory=False, share_memory=True)
    expected = {}
    try:
        for step in (1, 2):
            _train_step(model, optimizer)
            manager.states["lr_scheduler"].state["last_epoch"] = step
            expected[step] = _titan_state(manager)
            assert manager.save(curr_step=step)
            manager.maybe_wait_for_saving()
        allocations = manager.stager.stats.allocations
    finally:
        manager.close()
        _end_checkpoint_process()
    resumed = {}
    for step in (1, 2):
        fresh_model, fresh_optimizer = _fsdp2_training_state(seed=1)
        reader = _titan_manager(root, fresh_model, fresh_optimizer, "disabled")
        assert reader.load(step=step)
        resumed[step] = _equal_trees(_titan_state(reader), expected[step])
        reader.close()
    return {"allocations": allocations, "resumed": resumed}


@pytest.mark.dist
def test_torchtitan_checkpoint_manager_async_with_pinned_mem_resumes_bit_exactly(tmp_path):
    pytest.importorskip("torchtitan.components.checkpoint", reason="torchtitan is not installed")
    results = run_fresh(2, _on_rank_torchtitan_pinned_mem_saves, str(tmp_path), timeout=300,
                        pg_timeout=60)
    assert results == [{"allocations": 1, "resumed": {1: True, 2: True}}] * 2


# ---------------------------------------------------------------- tied tensors and views


def _tied_state_dict(mesh) -> dict:
    """Ties (one object under several keys), views of one storage (distinct objects, as
    FSDP's state dicts have), and the same for DTensors, beside unrelated tensors."""
    from torch.distributed.tensor import DTensor, Shard

    # Plain tensors are replicated for DCP (one rank writes each): equal on every rank.
    rank = dist.get_rank()
    weight = _rank_values((4, 3))
    flat = _rank_values((10,), 100)
    local = _rank_values((8,), 200 + rank)
    dtensor = DTensor.from_local(_rank_values((4, 2), 300 + rank), mesh, [Shard(0)])
    # DefaultStager cannot stage a DTensor whose local tensor starts past its storage's
    # first element (it reads the wrapper's data_ptr), so these views start at 0.
    return {
        "embed": weight,
        "head": weight,
        "first": flat[:5],
        "second": flat[5:],
        "grid": flat.view(2, 5),
        "alone": _rank_values((2,), 400),
        "d": dtensor,
        "d_tied": dtensor,
        "dv": DTensor.from_local(local, mesh, [Shard(0)], run_check=False),
        "dv_grid": DTensor.from_local(local.view(2, 4), mesh, [Shard(0)], run_check=False),
        "nested": {"w": weight, "pair": [weight, dtensor]},
        "step": torch.tensor(3.0),
    }


def _flat_tensors(obj, prefix="") -> dict:
    if isinstance(obj, (dict, list, tuple)):
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        out = {}
        for key, value in items:
            out.update(_flat_tensors(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: obj} if isinstance(obj, torch.Tensor) else {}


def _sharing_pattern(state_dict) -> dict:
    """Which keys hold one object, and which keys' (local) tensors share a storage."""
    flat = _flat_tensors(state_dict)
    keys = sorted(flat)
    pairs = [(a, b) for a in keys for b in keys if a < b]
    storage = {k: _local(flat[k]).untyped_storage().data_ptr() for k in keys}
    return {
        "same_object": [(a, b) for a, b in pairs if flat[a] is flat[b]],
        "same_storage": [(a, b) for a, b in pairs if storage[a] == storage[b]],
        "types": {k: type(v).__name__ for k, v in flat.items()},
    }


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _zeros_like_tree(obj):
    """Separate zero tensors (DTensors) of the same structure: a load target."""
    if isinstance(obj, dict):
        return {k: _zeros_like_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_zeros_like_tree(v) for v in obj)
    return torch.zeros_like(obj) if isinstance(obj, torch.Tensor) else obj


def _default_stage(source: dict) -> dict:
    """What PyTorch's DefaultStager stages from ``source``: synchronous, private memory."""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    default = DefaultStager(StagingOptions(
        use_pinned_memory=False, use_shared_memory=False, use_async_staging=False,
        use_non_blocking_copy=False,
    ))
    try:
        return default.stage(source)
    finally:
        default.close()


def _on_rank_tied_staging_against_default_stager(root: str) -> dict:
    from torch.distributed.tensor import init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    source = _tied_state_dict(mesh)
    expected = _default_stage(source)
    with PinnedStager(pin_memory=False) as stager:
        first = _stage_now(stager, source)
        pointers = {k: _local(v).data_ptr() for k, v in _flat_tensors(first).items()}
        flat_expected = _flat_tensors(expected)
        as_default = sorted(flat_expected) == sorted(_flat_tensors(first)) and all(
            _same(_local(v), _local(flat_expected[k]))
            for k, v in _flat_tensors(first).items()
        )
        with torch.no_grad():
            for value in (source["embed"], source["grid"], source["d"]._local_tensor,
                          source["dv"]._local_tensor):
                value.add_(1000)
        staged = _stage_now(stager, source)
        after = {k: _local(v).clone() for k, v in _flat_tensors(staged).items()}
        stable = (stager.stats.allocations == 1 and pointers == {
            k: _local(v).data_ptr() for k, v in _flat_tensors(staged).items()
        })
        dcp.save(staged, checkpoint_id=root)
        flat_source = _flat_tensors(source)
        equal = all(_same(after[k], _local(flat_source[k])) for k in after)
        pattern = _sharing_pattern(staged)
    back = _zeros_like_tree(source)
    dcp.load(back, checkpoint_id=root)
    back = _flat_tensors(back)
    return {
        "pattern": pattern,
        "default_pattern": _sharing_pattern(expected),
        "as_default": as_default,
        "equal": equal,
        "stable_slab": stable,
        "not_loaded_back": [
            k for k in back if not torch.equal(_local(back[k]), _local(flat_source[k]))
        ],
    }


@pytest.mark.dist
def test_tied_and_view_tensors_stage_with_default_stagers_object_and_storage_sharing(tmp_path):
    for result in run_on_ranks(2, _on_rank_tied_staging_against_default_stager,
                               str(tmp_path), timeout=CALL_TIMEOUT_S):
        assert result["pattern"] == result["default_pattern"]
        # The pattern is not trivial: ties, views and separate storages all occur.
        assert ("embed", "head") in result["pattern"]["same_object"]
        assert ("first", "second") in result["pattern"]["same_storage"]
        assert ("dv", "dv_grid") in result["pattern"]["same_storage"]
        assert ("dv", "dv_grid") not in result["pattern"]["same_object"]
        assert ("alone", "embed") not in result["pattern"]["same_storage"]
        assert result["as_default"] and result["equal"] and result["stable_slab"]
        assert result["not_loaded_back"] == []


def test_view_group_copies_only_its_range_once_and_keeps_views_apart():
    flat = torch.arange(12, dtype=torch.float32)
    source = {"a": flat[2:6], "b": flat[4:10], "t": flat[2:10].view(2, 4).t()}
    with PinnedStager(pin_memory=False) as stager:
        staged = _stage_now(stager, source)
        layout = stager._layout
        assert [(g.lo, g.span) for g in layout.views] == [(8, 32)]
        assert layout.nbytes == 32
        for key, value in source.items():
            assert torch.equal(staged[key], value)
            assert staged[key].stride() == value.stride()
        staged["a"][2] = -1.0  # overlapping views stay views of one storage
        assert staged["b"][0].item() == -1.0
        # A source that is no longer a view of the others is a new layout.
        source["b"] = source["b"].clone()
        again = _stage_now(stager, source)
        assert stager.stats.allocations == 2
        assert again["a"].untyped_storage().data_ptr() != again["b"].untyped_storage().data_ptr()


# ---------------------------------------------------------------- sending to a process


def test_pickling_a_tensor_of_a_pinned_unshared_slab_for_a_process_raises_before_moving():
    from multiprocessing.reduction import ForkingPickler

    # A pinned slab is a property of the slab record; register a CPU storage as one.
    slab = torch.arange(64, dtype=torch.uint8)
    record = staging._register_slab(slab.untyped_storage(), pinned=True, shared=False)
    staged = staging._own_storage(slab[16:32].view(torch.float32))
    before = slab.untyped_storage().data_ptr(), staged.untyped_storage().data_ptr()
    with pytest.raises(RuntimeError, match=r"share_memory=True"):
        ForkingPickler.dumps({"w": staged})
    assert (slab.untyped_storage().data_ptr(), staged.untyped_storage().data_ptr()) == before
    assert not staged.is_shared() and not slab.is_shared()
    # Not pinned: PyTorch's reduction moves the tensor's own storage, not the slab.
    record.pinned = False
    back = pickle_round_trip(staged)
    assert torch.equal(back, staged) and slab.untyped_storage().data_ptr() == before[0]
    # An unrelated tensor is PyTorch's business.
    assert torch.equal(pickle_round_trip(torch.ones(3)), torch.ones(3))


def pickle_round_trip(value):
    import pickle
    from multiprocessing.reduction import ForkingPickler

    return pickle.loads(ForkingPickler.dumps(value))


def test_shared_stager_tensors_go_to_a_process_as_one_slab():
    source = {"a": torch.randn(5), "b": torch.randn(2, 3), "c": torch.randn(7)}
    with PinnedStager(pin_memory=False, share_memory=True) as stager:
        staged = _stage_now(stager, source)
        back = pickle_round_trip(staged)
        for key, value in source.items():
            assert torch.equal(back[key], value)
        slab = staging._slabs.at(staged["a"].untyped_storage().data_ptr())
        reduced = [staging._reduce_tensor(t)[1][0] for t in staged.values()]
        assert all(storage is slab.storage() for storage in reduced)


@needs_cuda
def test_pinned_unshared_stager_refuses_a_process_upload_and_keeps_its_pinning():
    from multiprocessing.reduction import ForkingPickler

    source = {"w": torch.randn(64, device="cuda"), "b": torch.randn(3, device="cuda")}
    with PinnedStager(pin_memory=True, share_memory=False) as stager:
        staged = _stage_now(stager, source)
        with pytest.raises(RuntimeError, match=r"share_memory=True"):
            ForkingPickler.dumps(staged)
        assert all(t.is_pinned() for t in staged.values())
        again = _stage_now(stager, source)
        for key, value in source.items():
            assert torch.equal(again[key], value.cpu())


def test_a_sparse_tensor_in_place_of_a_dense_one_of_one_shape_is_refused_by_key():
    with PinnedStager(pin_memory=False) as stager:
        _stage_now(stager, {"w": torch.ones(3, 3)})
        with pytest.raises(ValueError, match=r"cannot stage 'w': a torch.sparse_coo tensor"):
            _stage_now(stager, {"w": torch.ones(3, 3).to_sparse()})


@needs_cuda
def test_tied_and_view_cuda_tensors_stage_pinned_with_default_stagers_sharing():
    weight = torch.randn(4, 3, device="cuda")
    flat = torch.randn(10, device="cuda")
    source = {"embed": weight, "head": weight, "first": flat[:5], "second": flat[5:],
              "grid": flat.view(2, 5), "alone": torch.randn(7, device="cuda")}
    expected = _default_stage(source)
    with PinnedStager(pin_memory=True) as stager:
        for _ in range(2):
            staged = _stage_now(stager, source)
            assert _sharing_pattern(staged) == _sharing_pattern(expected)
            for key, value in source.items():
                assert torch.equal(staged[key], value.cpu()) and staged[key].is_pinned()
            flat.add_(1)
        assert stager.stats.allocations == 1


def test_unshared_slab_tensors_moved_to_shared_memory_by_pickling_keep_receiving_stages():
    # PyTorch's reduction moves each staged tensor's own storage into shared memory; the
    # copies of later stages (a view group's included) must land where they moved.
    flat = torch.arange(10, dtype=torch.float32)
    source = {"first": flat[:5], "second": flat[5:], "alone": torch.zeros(3)}
    with PinnedStager(pin_memory=False, share_memory=False) as stager:
        staged = _stage_now(stager, source)
        back = pickle_round_trip(staged)
        assert all(t.is_shared() for t in staged.values())
        flat.add_(100)
        source["alone"].fill_(7)
        again = _stage_now(stager, source)
        assert stager.stats.allocations == 1
        for key, value in source.items():
            assert torch.equal(again[key], value)
            assert torch.equal(back[key], value)  # the receiver maps the same memory
