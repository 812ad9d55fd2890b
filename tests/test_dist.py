"""Tests for sdict_ext.dist: DistWrapper, MetadataIndex lookups and file views.

Multi-process tests run module-level ``_on_rank_*`` functions on every rank of a gloo
group through ``tests.mp`` and compare with PyTorch's ``_DistWrapper`` in the same
worker call, except where PyTorch hangs (those cases check ours alone).
"""

from __future__ import annotations

import io
import os
import threading
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.utils import _create_file_view as torch_create_file_view
from torch.distributed.checkpoint.utils import _DistWrapper
from torch.distributed.checkpoint.utils import (
    find_state_dict_object as torch_find_state_dict_object,
)
from torch.distributed.checkpoint.utils import find_tensor_shard as torch_find_tensor_shard

from sdict_ext.dist import DistWrapper, create_file_view, find_state_dict_object, find_tensor_shard
from tests.mp import run_fresh, run_on_ranks

CALL_TIMEOUT_S = 60

_IMPLS = {"ours": DistWrapper, "torch": _DistWrapper}


def _describe(fn, *args):
    """Run ``fn``; return ``("ok", value)`` or a comparable description of what it raised."""
    try:
        return ("ok", fn(*args))
    except CheckpointException as exc:
        return (
            "CheckpointException",
            exc.args[0],
            {rank: (type(e).__name__, str(e)) for rank, (e, _) in exc.failures.items()},
        )
    except Exception as exc:
        return (type(exc).__name__, str(exc))


def _checkpoint_failure(step, failures):
    return ("CheckpointException", step, failures)


class _Unpicklable:
    """A value that cannot cross ranks: pickling it raises."""

    def __init__(self):
        self.lock = threading.Lock()


class _TwoArgError(Exception):
    """Pickles, but cannot be unpickled: ``__init__`` needs two arguments, args has one."""

    def __init__(self, path, code):
        super().__init__(f"{path} failed with {code}")


def _raise_on(failing_ranks, value):
    def map_fun():
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank in failing_ranks:
            raise ValueError(f"map failed on rank {rank}")
        return value

    return map_fun


def _raise_in_reduce(values):
    raise KeyError(f"reduce saw {len(values)} values")


# -- single process (use_dist=False) ---------------------------------------------------


def _single_process_calls(wrapper):
    return {
        "rank": wrapper.get_rank(),
        "world": wrapper.get_world_size(),
        "is_coordinator": wrapper.is_coordinator,
        "global_coordinator_rank": wrapper.global_coordinator_rank,
        "broadcast_object": wrapper.broadcast_object({"a": 1}),
        "gather_object": wrapper.gather_object([1, 2]),
        "all_gather_object": wrapper.all_gather_object("x"),
        "scatter_object": wrapper.scatter_object(["only"]),
        "reduce_scatter": wrapper.reduce_scatter("rs", lambda: 3, lambda xs: [sum(xs) + 1]),
        "all_reduce": wrapper.all_reduce("ar", lambda: 4, lambda xs: xs * 2),
        "all_gather": wrapper.all_gather("ag", lambda: "v"),
        "broadcast": wrapper.broadcast("b", lambda: ("coord", 0)),
        "barrier": wrapper.barrier(),
    }


def test_single_process_wrapper_matches_pytorch():
    ours = _single_process_calls(DistWrapper(None, False, 0))
    assert ours == _single_process_calls(_DistWrapper(None, False, 0))
    assert ours == {
        "rank": 0,
        "world": 1,
        "is_coordinator": True,
        "global_coordinator_rank": 0,
        "broadcast_object": {"a": 1},
        "gather_object": [[1, 2]],
        "all_gather_object": ["x"],
        "scatter_object": "only",
        "reduce_scatter": 4,
        "all_reduce": [4, 4],
        "all_gather": ["v"],
        "broadcast": ("coord", 0),
        "barrier": None,
    }


def test_single_process_object_collectives_return_the_same_objects_without_pickling():
    wrapper = DistWrapper(None, False, 0)
    value = _Unpicklable()
    assert wrapper.broadcast_object(value) is value
    assert wrapper.gather_object(value)[0] is value
    assert wrapper.all_gather(step="ag", map_fun=lambda: value)[0] is value


@pytest.mark.parametrize("method", ["reduce_scatter", "all_reduce", "all_gather", "broadcast"])
def test_single_process_map_failure_raises_checkpoint_exception_for_rank_0(method):
    wrapper = DistWrapper(None, False, 0)
    args = [f"{method}-step", _raise_on({0}, 1)]
    if method in ("reduce_scatter", "all_reduce"):
        args.append(lambda xs: xs)
    ours = _describe(getattr(wrapper, method), *args)
    theirs = _describe(getattr(_DistWrapper(None, False, 0), method), *args)
    assert (
        ours
        == theirs
        == _checkpoint_failure(f"{method}-step", {0: ("ValueError", "map failed on rank 0")})
    )


@pytest.mark.parametrize("method", ["reduce_scatter", "all_reduce"])
def test_single_process_reduce_failure_raises_checkpoint_exception_for_rank_0(method):
    args = ("step", lambda: 1, _raise_in_reduce)
    ours = _describe(getattr(DistWrapper(None, False, 0), method), *args)
    theirs = _describe(getattr(_DistWrapper(None, False, 0), method), *args)
    assert ours == theirs == _checkpoint_failure("step", {0: ("KeyError", "'reduce saw 1 values'")})


def test_single_process_checkpoint_exception_keeps_the_user_traceback():
    with pytest.raises(CheckpointException) as info:
        DistWrapper(None, False, 0).all_gather("step", _raise_on({0}, 1))
    exc, summary = info.value.failures[0]
    assert isinstance(exc, ValueError)
    assert summary[-1].name == "map_fun"
    assert "map failed on rank 0" in str(info.value)
    assert "(RANK 0)" in str(info.value)


@pytest.mark.parametrize("object_list", [None, [], ["a", "b"]])
def test_single_process_scatter_object_needs_exactly_one_item(object_list):
    with pytest.raises(CheckpointException) as info:
        DistWrapper(None, False, 0).scatter_object(object_list)
    exc, _ = info.value.failures[0]
    assert isinstance(exc, ValueError)
    assert "one item per rank (1)" in str(exc)


def test_single_process_reduce_scatter_needs_one_result_per_rank():
    with pytest.raises(CheckpointException) as info:
        DistWrapper(None, False, 0).reduce_scatter("rs", lambda: 1, lambda xs: [1, 2])
    assert list(info.value.failures) == [0]
    assert "one item per rank (1), got 2 items" in str(info.value.failures[0][0])


@pytest.mark.parametrize("coordinator_rank", [1, -1, 7])
def test_out_of_range_coordinator_rank_raises_value_error(coordinator_rank):
    with pytest.raises(ValueError, match=r"coordinator_rank must be in \[0, 1\)"):
        DistWrapper(None, False, coordinator_rank)


@pytest.mark.parametrize("coordinator_rank", ["0", 0.0, None, True])
def test_non_integer_coordinator_rank_raises_type_error(coordinator_rank):
    with pytest.raises(TypeError, match="coordinator_rank must be an int"):
        DistWrapper(None, False, coordinator_rank)


def test_use_dist_without_a_process_group_raises_value_error():
    if dist.is_initialized():
        pytest.skip("this test process has a default process group")
    with pytest.raises(ValueError, match="init_process_group"):
        DistWrapper(None, True, 0)


# -- multi-process: object collectives ---------------------------------------------------


def _on_rank_object_collectives(coordinator_rank):
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for name, cls in _IMPLS.items():
        wrapper = cls(None, True, coordinator_rank)
        results[name] = {
            "rank": wrapper.get_rank(),
            "world": wrapper.get_world_size(),
            "is_coordinator": wrapper.is_coordinator,
            "global_coordinator_rank": wrapper.global_coordinator_rank,
            "broadcast_object": wrapper.broadcast_object({"from": rank}),
            "gather_object": wrapper.gather_object(("r", rank, [rank] * rank)),
            "all_gather_object": wrapper.all_gather_object(rank * 10),
            "scatter_object": wrapper.scatter_object([f"item{i}" for i in range(world)]),
            "barrier": wrapper.barrier(),
        }
    return results


@pytest.mark.dist
@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("coordinator", ["first", "last"])
def test_object_collectives_match_pytorch(world_size, coordinator):
    coordinator_rank = 0 if coordinator == "first" else world_size - 1
    per_rank = run_on_ranks(
        world_size, _on_rank_object_collectives, coordinator_rank, timeout=CALL_TIMEOUT_S
    )
    for rank, results in enumerate(per_rank):
        assert results["ours"] == results["torch"]
        is_coordinator = rank == coordinator_rank
        assert results["ours"] == {
            "rank": rank,
            "world": world_size,
            "is_coordinator": is_coordinator,
            "global_coordinator_rank": coordinator_rank,
            "broadcast_object": {"from": coordinator_rank},
            "gather_object": [("r", r, [r] * r) for r in range(world_size)]
            if is_coordinator
            else None,
            "all_gather_object": [r * 10 for r in range(world_size)],
            "scatter_object": f"item{rank}",
            "barrier": None,
        }


def _on_rank_coordinator_keeps_its_own_broadcast_object():
    wrapper = DistWrapper(None, True, 0)
    value = [dist.get_rank()]
    received = wrapper.broadcast_object(value)
    return received is value, received


@pytest.mark.dist
def test_broadcast_object_returns_the_coordinators_own_object_on_the_coordinator():
    assert run_on_ranks(
        2, _on_rank_coordinator_keeps_its_own_broadcast_object, timeout=CALL_TIMEOUT_S
    ) == [
        (True, [0]),
        (False, [0]),
    ]


def _on_rank_subgroup(members, coordinator_rank):
    group = dist.new_group(members)
    rank = dist.get_rank()
    if rank not in members:
        return _describe(DistWrapper, group, True, coordinator_rank)
    try:
        results = {}
        for name, cls in _IMPLS.items():
            wrapper = cls(group, True, coordinator_rank)
            results[name] = (
                wrapper.get_rank(),
                wrapper.get_world_size(),
                wrapper.global_coordinator_rank,
                wrapper.broadcast_object(rank),
                wrapper.all_reduce("sum", lambda: rank, sum),
                wrapper.reduce_scatter("rs", lambda: rank, lambda xs: [x * 100 for x in xs]),
            )
        return results
    finally:
        dist.destroy_process_group(group)


@pytest.mark.dist
def test_subgroup_coordinator_rank_is_a_group_rank_and_outsiders_are_refused():
    per_rank = run_on_ranks(4, _on_rank_subgroup, [1, 3], 1, timeout=CALL_TIMEOUT_S)
    for rank in (1, 3):
        assert per_rank[rank]["ours"] == per_rank[rank]["torch"]
    assert per_rank[1]["ours"] == (0, 2, 3, 3, 4, 100)
    assert per_rank[3]["ours"] == (1, 2, 3, 3, 4, 300)
    for rank in (0, 2):
        kind, message = per_rank[rank]
        assert kind == "ValueError"
        assert "not a member of the given process group" in message


def _on_rank_bad_coordinator(coordinator_rank):
    return _describe(DistWrapper, None, True, coordinator_rank)


@pytest.mark.dist
@pytest.mark.parametrize("coordinator_rank", [2, -1])
def test_out_of_range_coordinator_rank_raises_value_error_on_every_rank(coordinator_rank):
    per_rank = run_on_ranks(2, _on_rank_bad_coordinator, coordinator_rank, timeout=CALL_TIMEOUT_S)
    message = f"coordinator_rank must be in [0, 2) for a group of 2 rank(s), got {coordinator_rank}"
    assert per_rank == [("ValueError", message)] * 2


# -- multi-process: map/reduce steps -----------------------------------------------------


def _on_rank_steps(coordinator_rank):
    rank = dist.get_rank()
    results = {}
    for name, cls in _IMPLS.items():
        wrapper = cls(None, True, coordinator_rank)
        broadcast_calls: list[int] = []

        def record_broadcast(calls=broadcast_calls):
            calls.append(rank)
            return ("coord", rank)

        results[name] = {
            "reduce_scatter": wrapper.reduce_scatter(
                "plan", lambda: rank * 2, lambda xs: [(sum(xs), i) for i in range(len(xs))]
            ),
            "all_reduce": wrapper.all_reduce(
                "merge", lambda: [rank], lambda xs: sorted(sum(xs, []))
            ),
            "all_gather": wrapper.all_gather("collect", lambda: {"rank": rank}),
            "broadcast": wrapper.broadcast("meta", record_broadcast),
            "broadcast_calls": broadcast_calls,
        }
    return results


@pytest.mark.dist
@pytest.mark.parametrize("world_size", [2, 4])
def test_map_reduce_steps_match_pytorch(world_size):
    coordinator_rank = world_size - 1
    per_rank = run_on_ranks(world_size, _on_rank_steps, coordinator_rank, timeout=CALL_TIMEOUT_S)
    total = sum(r * 2 for r in range(world_size))
    for rank, results in enumerate(per_rank):
        assert results["ours"] == results["torch"]
        assert results["ours"] == {
            "reduce_scatter": (total, rank),
            "all_reduce": list(range(world_size)),
            "all_gather": [{"rank": r} for r in range(world_size)],
            "broadcast": ("coord", coordinator_rank),
            # map_fun of broadcast runs on the coordinator only.
            "broadcast_calls": [rank] if rank == coordinator_rank else [],
        }


def _on_rank_map_failure(failing_ranks, coordinator_rank):
    results = {}
    for name, cls in _IMPLS.items():
        wrapper = cls(None, True, coordinator_rank)
        map_fun = _raise_on(failing_ranks, dist.get_rank())
        results[name] = {
            "reduce_scatter": _describe(wrapper.reduce_scatter, "rs", map_fun, lambda xs: xs),
            "all_reduce": _describe(wrapper.all_reduce, "ar", map_fun, sum),
            "all_gather": _describe(wrapper.all_gather, "ag", map_fun),
            "broadcast": _describe(wrapper.broadcast, "b", map_fun),
            # The group must still be in step after the failures.
            "after": wrapper.all_gather_object(dist.get_rank()),
        }
    return results


@pytest.mark.dist
@pytest.mark.parametrize(
    ("world_size", "failing_rank", "coordinator_rank"), [(2, 1, 0), (4, 2, 2), (4, 0, 3)]
)
def test_map_failure_on_one_rank_surfaces_on_every_rank(world_size, failing_rank, coordinator_rank):
    per_rank = run_on_ranks(
        world_size, _on_rank_map_failure, {failing_rank}, coordinator_rank, timeout=CALL_TIMEOUT_S
    )
    failure = {failing_rank: ("ValueError", f"map failed on rank {failing_rank}")}
    for results in per_rank:
        assert results["ours"] == results["torch"]
        ours = results["ours"]
        assert ours["reduce_scatter"] == _checkpoint_failure("rs", failure)
        assert ours["all_reduce"] == _checkpoint_failure("ar", failure)
        assert ours["all_gather"] == _checkpoint_failure("ag", failure)
        if failing_rank == coordinator_rank:
            assert ours["broadcast"] == _checkpoint_failure("b", failure)
        else:  # broadcast maps on the coordinator only, which does not fail
            assert ours["broadcast"] == ("ok", coordinator_rank)
        assert ours["after"] == list(range(world_size))


@pytest.mark.dist
def test_map_failures_on_several_ranks_are_all_reported_everywhere():
    per_rank = run_on_ranks(4, _on_rank_map_failure, {1, 3}, 0, timeout=CALL_TIMEOUT_S)
    failure = {r: ("ValueError", f"map failed on rank {r}") for r in (1, 3)}
    for results in per_rank:
        assert results["ours"] == results["torch"]
        assert results["ours"]["all_gather"] == _checkpoint_failure("ag", failure)
        assert results["ours"]["reduce_scatter"] == _checkpoint_failure("rs", failure)
        assert results["ours"]["all_reduce"] == _checkpoint_failure("ar", failure)


def _on_rank_reduce_failure(coordinator_rank):
    results = {}
    for name, cls in _IMPLS.items():
        wrapper = cls(None, True, coordinator_rank)
        results[name] = {
            "reduce_scatter": _describe(wrapper.reduce_scatter, "rs", lambda: 1, _raise_in_reduce),
            "all_reduce": _describe(wrapper.all_reduce, "ar", lambda: 1, _raise_in_reduce),
        }
    return results


@pytest.mark.dist
@pytest.mark.parametrize("world_size", [2, 4])
def test_reduce_failure_on_the_coordinator_surfaces_on_every_rank(world_size):
    coordinator_rank = 1
    per_rank = run_on_ranks(
        world_size, _on_rank_reduce_failure, coordinator_rank, timeout=CALL_TIMEOUT_S
    )
    failure = {coordinator_rank: ("KeyError", f"'reduce saw {world_size} values'")}
    for results in per_rank:
        assert results["ours"] == results["torch"]
        assert results["ours"] == {
            "reduce_scatter": _checkpoint_failure("rs", failure),
            "all_reduce": _checkpoint_failure("ar", failure),
        }


def _on_rank_failure_traceback():
    try:
        DistWrapper(None, True, 0).all_gather("ag", _raise_on({1}, 0))
    except CheckpointException as exc:
        ((rank, (error, summary)),) = exc.failures.items()
        return rank, type(error).__name__, [frame.name for frame in summary], str(exc)
    return None


@pytest.mark.dist
def test_failure_carries_the_failing_ranks_traceback_to_every_rank():
    for rank, kind, frames, text in run_on_ranks(
        2, _on_rank_failure_traceback, timeout=CALL_TIMEOUT_S
    ):
        assert (rank, kind, frames[-1]) == (1, "ValueError", "map_fun")
        assert "Traceback (most recent call last): (RANK 1)" in text
        assert "ValueError: map failed on rank 1" in text


# -- multi-process: failures that hang PyTorch (ours only) -------------------------------


def _on_rank_failures_pytorch_hangs_on():
    rank, world = dist.get_rank(), dist.get_world_size()
    wrapper = DistWrapper(None, True, 0)
    identity = lambda xs: xs  # noqa: E731

    def unpicklable_on(target):
        return lambda: _Unpicklable() if rank == target else rank

    def two_arg_error_on_rank_1():
        if rank == 1:
            raise _TwoArgError("/ckpt/shard1", 5)
        return rank

    return {
        "unpicklable map value in reduce_scatter": _describe(
            wrapper.reduce_scatter, "rs", unpicklable_on(1), identity
        ),
        "unpicklable map value in all_reduce": _describe(
            wrapper.all_reduce, "ar", unpicklable_on(1), len
        ),
        "unpicklable map value in all_gather": _describe(
            wrapper.all_gather, "ag", unpicklable_on(1)
        ),
        "unpicklable broadcast value": _describe(wrapper.broadcast, "b", unpicklable_on(0)),
        "unpicklable reduce result": _describe(
            wrapper.all_reduce, "ar", lambda: rank, lambda xs: _Unpicklable()
        ),
        "unpicklable reduce_scatter item": _describe(
            wrapper.reduce_scatter,
            "rs",
            lambda: rank,
            lambda xs: [_Unpicklable() if i else i for i in xs],
        ),
        "reduce_scatter result too short": _describe(
            wrapper.reduce_scatter, "rs", lambda: rank, lambda xs: xs[:1]
        ),
        "reduce_scatter result not a sequence": _describe(
            wrapper.reduce_scatter, "rs", lambda: rank, sum
        ),
        "exception that cannot be unpickled": _describe(
            wrapper.all_reduce, "ar", two_arg_error_on_rank_1, sum
        ),
        "unpicklable broadcast_object": _describe(
            wrapper.broadcast_object, _Unpicklable() if rank == 0 else None
        ),
        "unpicklable all_gather_object": _describe(
            wrapper.all_gather_object, _Unpicklable() if rank == 1 else rank
        ),
        "unpicklable gather_object": _describe(
            wrapper.gather_object, _Unpicklable() if rank == 1 else rank
        ),
        "scatter_object too few items": _describe(wrapper.scatter_object, list(range(world - 1))),
        "scatter_object without a list": _describe(wrapper.scatter_object, None),
        "after": wrapper.all_gather_object(rank),
    }


@pytest.mark.dist
@pytest.mark.parametrize("world_size", [2, 4])
def test_failures_that_hang_pytorch_surface_on_every_rank_and_keep_the_group_in_step(world_size):
    per_rank = run_on_ranks(world_size, _on_rank_failures_pytorch_hangs_on, timeout=CALL_TIMEOUT_S)

    def only_failure(outcome, step, rank, kind, *fragments):
        assert outcome[:2] == ("CheckpointException", step), outcome
        assert list(outcome[2]) == [rank], outcome
        failed_kind, message = outcome[2][rank]
        assert failed_kind == kind, outcome
        for fragment in fragments:
            assert fragment in message, outcome

    for rank, results in enumerate(per_rank):
        cannot_pickle = "could not pickle"
        only_failure(
            results["unpicklable map value in reduce_scatter"], "rs", 1, "TypeError", cannot_pickle
        )
        only_failure(
            results["unpicklable map value in all_reduce"], "ar", 1, "TypeError", cannot_pickle
        )
        only_failure(
            results["unpicklable map value in all_gather"], "ag", 1, "TypeError", cannot_pickle
        )
        only_failure(results["unpicklable broadcast value"], "b", 0, "TypeError", cannot_pickle)
        only_failure(results["unpicklable reduce result"], "ar", 0, "TypeError", cannot_pickle)
        only_failure(
            results["unpicklable reduce_scatter item"], "rs", 0, "TypeError", cannot_pickle
        )
        only_failure(
            results["reduce_scatter result too short"],
            "rs",
            0,
            "ValueError",
            f"one item per rank ({world_size}), got 1 items",
        )
        only_failure(
            results["reduce_scatter result not a sequence"], "rs", 0, "ValueError", "got int"
        )
        only_failure(
            results["exception that cannot be unpickled"],
            "ar",
            1,
            "RuntimeError",
            "_TwoArgError: /ckpt/shard1 failed with 5",
            "could not be sent to other ranks",
        )
        only_failure(
            results["unpicklable broadcast_object"],
            "broadcast_object",
            0,
            "TypeError",
            cannot_pickle,
        )
        only_failure(
            results["unpicklable all_gather_object"],
            "all_gather_object",
            1,
            "TypeError",
            cannot_pickle,
        )
        if rank in (0, 1):  # the coordinator, and the rank whose object failed
            only_failure(
                results["unpicklable gather_object"], "gather_object", 1, "TypeError", cannot_pickle
            )
        else:
            assert results["unpicklable gather_object"] == ("ok", None)
        only_failure(
            results["scatter_object too few items"],
            "scatter_object",
            0,
            "ValueError",
            f"one item per rank ({world_size}) on the coordinator, got {world_size - 1} items",
        )
        only_failure(
            results["scatter_object without a list"], "scatter_object", 0, "ValueError", "got None"
        )
        assert results["after"] == list(range(world_size))


# -- multi-process: dead and missing ranks (fresh groups) --------------------------------

_SHORT_PG_TIMEOUT_S = 4.0


def _on_rank_dies_in_map():
    rank = dist.get_rank()
    wrapper = DistWrapper(None, True, 0)

    def map_fun():
        if rank == 1:
            os._exit(0)
        return rank

    start = time.monotonic()
    outcome = _describe(wrapper.all_reduce, "ar", map_fun, sum)
    return outcome, time.monotonic() - start


@pytest.mark.dist
def test_rank_that_exits_mid_step_makes_the_others_fail_within_the_group_timeout():
    start = time.monotonic()
    (outcome, elapsed), exited = run_fresh(
        2,
        _on_rank_dies_in_map,
        pg_timeout=_SHORT_PG_TIMEOUT_S,
        allow_exit={1},
        timeout=CALL_TIMEOUT_S,
    )
    assert exited.exitcode == 0
    kind, message = outcome
    # A transport error from the backend, not a CheckpointException: no rank reported
    # a map failure, a peer vanished.
    assert kind in ("RuntimeError", "DistBackendError"), outcome
    assert elapsed < _SHORT_PG_TIMEOUT_S + 2.0
    assert time.monotonic() - start < CALL_TIMEOUT_S


def _on_rank_never_arrives():
    if dist.get_rank() == 1:
        return "skipped"
    start = time.monotonic()
    outcome = _describe(DistWrapper(None, True, 0).all_gather, "ag", lambda: 0)
    return outcome, time.monotonic() - start


@pytest.mark.dist
def test_rank_that_never_arrives_makes_the_others_time_out_instead_of_hanging():
    (outcome, elapsed), skipped = run_fresh(
        2, _on_rank_never_arrives, pg_timeout=_SHORT_PG_TIMEOUT_S, timeout=CALL_TIMEOUT_S
    )
    assert skipped == "skipped"
    kind, message = outcome
    assert kind in ("RuntimeError", "DistBackendError"), outcome
    assert "Timed out" in message
    assert _SHORT_PG_TIMEOUT_S - 0.5 <= elapsed < _SHORT_PG_TIMEOUT_S + 5.0


# -- MetadataIndex lookups -----------------------------------------------------------


def test_regular_tensor_is_found_by_no_offset_or_the_zero_offset():
    tensor = torch.arange(6.0).reshape(2, 3)
    for index in (MetadataIndex("w"), MetadataIndex("w", [0, 0])):
        assert find_tensor_shard(tensor, index) is tensor
        assert torch_find_tensor_shard(tensor, index) is tensor
        assert find_state_dict_object({"w": tensor}, index) is tensor


@pytest.mark.parametrize("offset", [[1, 0], [0, 0, 0]])
def test_regular_tensor_with_another_offset_raises_value_error(offset):
    tensor = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="'w'"):
        find_tensor_shard(tensor, MetadataIndex("w", offset))
    with pytest.raises(ValueError):
        torch_find_tensor_shard(tensor, MetadataIndex("w", offset))


def test_non_tensor_object_is_found_by_fqn_and_refuses_an_offset():
    state_dict = {"step": 7, "extra": {"k": [1]}}
    assert find_state_dict_object(state_dict, MetadataIndex("extra")) is state_dict["extra"]
    assert torch_find_state_dict_object(state_dict, MetadataIndex("extra")) is state_dict["extra"]
    with pytest.raises(ValueError, match="'step' is a int, not a tensor"):
        find_state_dict_object(state_dict, MetadataIndex("step", [0]))


def test_missing_fqn_raises_value_error_with_close_matches():
    state_dict = {"layer.0.weight": torch.zeros(1), "layer.0.bias": torch.zeros(1)}
    with pytest.raises(ValueError, match="Could not find FQN: 'layer.0.weigth'") as info:
        find_state_dict_object(state_dict, MetadataIndex("layer.0.weigth"))
    assert "close matches: 'layer.0.weight'" in str(info.value)
    with pytest.raises(ValueError):
        torch_find_state_dict_object(state_dict, MetadataIndex("layer.0.weigth"))


def _on_rank_sharded_tensor_lookup():
    from torch.distributed._shard.sharded_tensor import Shard, init_from_local_shards

    rank, world = dist.get_rank(), dist.get_world_size()
    rows = [4 * rank, 4 * rank + 2]
    local = [
        Shard.from_tensor_and_offsets(torch.full((2, 3), float(r)), [r, 0], rank) for r in rows
    ]
    sharded = init_from_local_shards(local, [4 * world, 3])
    other_rank_row = 4 * ((rank + 1) % world)
    results = {}
    for name, find in (("ours", find_tensor_shard), ("torch", torch_find_tensor_shard)):
        results[name] = {
            "hinted": find(sharded, MetadataIndex("w", [rows[1], 0], 1)) is local[1].tensor,
            "wrong hint": find(sharded, MetadataIndex("w", [rows[1], 0], 0)) is local[1].tensor,
            "hint out of range": find(sharded, MetadataIndex("w", [rows[0], 0], 9))
            is local[0].tensor,
            "no hint": find(sharded, MetadataIndex("w", [rows[0], 0])) is local[0].tensor,
            "via state dict": find_state_dict_object(
                {"w": sharded}, MetadataIndex("w", [rows[0], 0])
            )
            is local[0].tensor,
            "other rank's shard": _describe(find, sharded, MetadataIndex("w", [other_rank_row, 0]))[
                0
            ],
            "no offset": _describe(find, sharded, MetadataIndex("w"))[0],
        }
    results["messages"] = (
        _describe(find_tensor_shard, sharded, MetadataIndex("w", [other_rank_row, 0]))[1],
        _describe(find_tensor_shard, sharded, MetadataIndex("w"))[1],
    )
    return rows, other_rank_row, results


@pytest.mark.dist
def test_sharded_tensor_shards_are_found_by_offset_with_or_without_a_good_hint():
    for rows, other_row, results in run_on_ranks(
        2, _on_rank_sharded_tensor_lookup, timeout=CALL_TIMEOUT_S
    ):
        assert results["ours"] == results["torch"]
        assert results["ours"] == {
            "hinted": True,
            "wrong hint": True,
            "hint out of range": True,
            "no hint": True,
            "via state dict": True,
            "other rank's shard": "ValueError",
            "no offset": "ValueError",
        }
        missing, no_offset = results["messages"]
        assert f"offset ({other_row}, 0)" in missing
        assert f"({rows[0]}, 0), ({rows[1]}, 0)" in missing
        assert "needs MetadataIndex.offset" in no_offset


def _on_rank_dtensor_lookup():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    full = torch.arange(8.0 * world).reshape(2 * world, 4)
    sharded = distribute_tensor(full, mesh, [Shard(0)])
    replicated = distribute_tensor(full, mesh, [Replicate()])
    own = MetadataIndex("w", [2 * rank, 0])
    other = MetadataIndex("w", [2 * ((rank + 1) % world), 0])
    return {
        "own shard": find_tensor_shard(sharded, own).tolist(),
        "torch own shard": torch_find_tensor_shard(sharded, own).tolist(),
        "via state dict": find_state_dict_object({"w": sharded}, own).tolist(),
        "no offset": find_tensor_shard(sharded, MetadataIndex("w")).tolist(),
        "replicated": find_tensor_shard(replicated, MetadataIndex("w", [0, 0])).tolist(),
        "other rank's shard": _describe(find_tensor_shard, sharded, other),
        # PyTorch returns the local shard whatever offset is asked for.
        "torch other rank's shard": torch_find_tensor_shard(sharded, other).tolist(),
    }


@pytest.mark.dist
def test_dtensor_local_shard_is_found_by_its_offset_and_a_wrong_offset_raises():
    full = torch.arange(16.0).reshape(4, 4)
    for rank, results in enumerate(
        run_on_ranks(2, _on_rank_dtensor_lookup, timeout=CALL_TIMEOUT_S)
    ):
        local = full[2 * rank : 2 * rank + 2].tolist()
        assert results["own shard"] == results["torch own shard"] == local
        assert results["via state dict"] == results["no offset"] == local
        assert results["replicated"] == full.tolist()
        kind, message = results["other rank's shard"]
        assert kind == "ValueError"
        assert f"offset ({2 * (1 - rank)}, 0)" in message
        assert f"starts at ({2 * rank}, 0)" in message
        assert results["torch other rank's shard"] == local


# -- file views --------------------------------------------------------------------------

_DATA = bytes(range(256)) * 4
_START, _LENGTH = 100, 300
_WINDOW = _DATA[_START : _START + _LENGTH]


@pytest.fixture(params=["bytesio", "file"])
def stream(request, tmp_path):
    if request.param == "bytesio":
        yield io.BytesIO(_DATA)
        return
    path = tmp_path / "blob.bin"
    path.write_bytes(_DATA)
    with open(path, "rb") as f:
        yield f


def test_view_reads_only_its_range(stream):
    view = create_file_view(stream, _START, _LENGTH)
    assert view.read(10) == _WINDOW[:10]
    assert view.read(5) == _WINDOW[10:15]
    assert view.read() == _WINDOW[15:]
    assert view.tell() == _LENGTH
    assert view.read() == b""
    assert view.read(1) == b""


def test_view_read_past_the_end_is_truncated(stream):
    view = create_file_view(stream, _START, _LENGTH)
    view.seek(_LENGTH - 4)
    assert view.read(100) == _WINDOW[-4:]
    assert view.read(100) == b""


def test_view_seek_positions_are_relative_to_the_range(stream):
    # seek takes and tell reports positions in the view; seek returns the position in
    # the underlying stream, as PyTorch's view does.
    view = create_file_view(stream, _START, _LENGTH)
    assert view.seek(20) == _START + 20
    assert view.tell() == 20
    assert view.read(3) == _WINDOW[20:23]
    assert view.seek(5, os.SEEK_CUR) == _START + 28
    assert view.read(2) == _WINDOW[28:30]
    assert view.seek(-10, os.SEEK_CUR) == _START + 20
    assert view.tell() == 20
    assert view.seek(-6, os.SEEK_END) == _START + _LENGTH - 6
    assert view.tell() == _LENGTH - 6
    assert view.read() == _WINDOW[-6:]
    assert view.seek(0, os.SEEK_END) == _START + _LENGTH
    assert view.read() == b""


def test_view_seek_returns_what_pytorchs_view_returns():
    # Every seek lands both views at the same place: SEEK_SET and SEEK_CUR as is,
    # SEEK_END with the sign flipped (PyTorch's counts backwards from the end).
    ours = create_file_view(io.BytesIO(_DATA), _START, _LENGTH)
    theirs = torch_create_file_view(io.BytesIO(_DATA), _START, _LENGTH)
    moves = [(50, os.SEEK_SET), (0, os.SEEK_SET), (7, os.SEEK_CUR), (_LENGTH, os.SEEK_SET),
             (-30, os.SEEK_CUR), (0, os.SEEK_CUR), (_LENGTH - 1, os.SEEK_SET)]
    for offset, whence in moves:
        assert ours.seek(offset, whence) == theirs.seek(offset, whence), (offset, whence)
        assert ours.tell() == theirs.tell()
        assert ours.read(1) == theirs.read(1)
    for back in (0, 1, 40, _LENGTH):
        assert ours.seek(-back, os.SEEK_END) == theirs.seek(back, os.SEEK_END), back
        assert ours.tell() == theirs.tell() == _LENGTH - back
    # The return value is the underlying stream's position after the same seek.
    stream = io.BytesIO(_DATA)
    assert create_file_view(stream, _START, _LENGTH).seek(50) == stream.seek(_START + 50)


def test_view_seek_past_the_end_reads_nothing_unlike_pytorch(stream):
    view = create_file_view(stream, _START, _LENGTH)
    assert view.seek(_LENGTH + 50) == _START + _LENGTH + 50
    assert view.read() == b""
    assert view.readinto(bytearray(8)) == 0
    assert view.seek(10, os.SEEK_END) == _START + _LENGTH + 10
    assert view.tell() == _LENGTH + 10
    assert view.read(4) == b""


def test_view_seek_before_the_start_raises_value_error(stream):
    view = create_file_view(stream, _START, _LENGTH)
    view.seek(7)
    with pytest.raises(ValueError, match="negative seek position"):
        view.seek(-1)
    with pytest.raises(ValueError, match="negative seek position"):
        view.seek(-8, os.SEEK_CUR)
    with pytest.raises(ValueError, match="negative seek position"):
        view.seek(-_LENGTH - 1, os.SEEK_END)
    with pytest.raises(ValueError, match="invalid whence"):
        view.seek(0, 3)
    assert view.tell() == 7


@pytest.mark.parametrize("kind", ["bytearray", "memoryview", "numpy"])
def test_view_readinto_fills_up_to_the_end_of_the_range(stream, kind):
    view = create_file_view(stream, _START, _LENGTH)
    buffers = {
        "bytearray": lambda n: bytearray(n),
        "memoryview": lambda n: memoryview(bytearray(n)),
        "numpy": lambda n: np.zeros(n, dtype=np.uint8),
    }
    buffer = buffers[kind](50)
    view.seek(_LENGTH - 80)
    assert view.readinto(buffer) == 50
    assert bytes(buffer) == _WINDOW[-80:-30]
    assert view.readinto(buffer) == 30
    assert bytes(buffer[:30]) == _WINDOW[-30:]
    assert view.readinto(buffer) == 0


def test_view_matches_pytorch_within_the_range():
    # Separate streams: PyTorch's view reads from wherever its stream was left.
    ours = create_file_view(io.BytesIO(_DATA), _START, _LENGTH)
    theirs = torch_create_file_view(io.BytesIO(_DATA), _START, _LENGTH)
    ops = [
        ("read", 7),
        ("seek", 40),
        ("read", 9),
        ("readinto", 16),
        ("read", -1),
        ("seek", 290),
        ("read", 50),
    ]
    for op, arg in ops:
        if op == "seek":
            assert ours.seek(arg) == theirs.seek(arg)
        elif op == "read":
            assert ours.read(arg) == theirs.read(arg)
        else:
            a, b = bytearray(arg), bytearray(arg)
            assert ours.readinto(a) == theirs.readinto(b)
            assert a == b
        assert ours.tell() == theirs.tell()


def test_views_over_one_stream_do_not_disturb_each_other(stream):
    first = create_file_view(stream, 0, 100)
    second = create_file_view(stream, 500, 100)
    assert first.read(10) == _DATA[:10]
    assert second.read(10) == _DATA[500:510]
    stream.seek(0)
    stream.read(3)
    assert first.read(10) == _DATA[10:20]
    assert second.read() == _DATA[510:600]


def test_torch_load_reads_a_checkpoint_through_a_view(tmp_path):
    state = {"w": torch.arange(12.0).reshape(3, 4), "step": 3}
    payload = io.BytesIO()
    torch.save(state, payload)
    blob = b"header" * 11 + payload.getvalue() + b"trailer" * 5
    path = tmp_path / "ckpt.bin"
    path.write_bytes(blob)
    offset = len(b"header" * 11)
    with open(path, "rb") as f:
        for source in (f, io.BytesIO(blob)):
            loaded = torch.load(
                create_file_view(source, offset, len(payload.getvalue())), weights_only=True
            )
            assert loaded["step"] == 3
            assert torch.equal(loaded["w"], state["w"])


def test_view_is_read_only_and_closing_it_leaves_the_stream_open(stream):
    view = create_file_view(stream, _START, _LENGTH)
    assert (view.readable(), view.seekable(), view.writable()) == (True, True, False)
    with pytest.raises(io.UnsupportedOperation):
        view.write(b"x")
    view.close()
    assert not stream.closed
    with pytest.raises(ValueError):
        view.read()
    with pytest.raises(ValueError):
        view.seek(0)


def test_view_lines_iterate_within_the_range():
    view = create_file_view(io.BytesIO(b"skip\na\nb\nc\ntail"), 5, 6)
    assert list(view) == [b"a\n", b"b\n", b"c\n"]


@pytest.mark.parametrize(("offset", "length"), [(-1, 3), (0, -3)])
def test_view_with_negative_offset_or_length_raises_value_error(offset, length):
    with pytest.raises(ValueError, match=">= 0"):
        create_file_view(io.BytesIO(_DATA), offset, length)


def test_view_of_a_closed_or_unseekable_stream_raises_value_error():
    closed = io.BytesIO(_DATA)
    closed.close()
    with pytest.raises(ValueError, match="closed"):
        create_file_view(closed, 0, 1)

    class Unseekable(io.RawIOBase):
        def readable(self):
            return True

    with pytest.raises(ValueError, match="seekable"):
        create_file_view(Unseekable(), 0, 1)
