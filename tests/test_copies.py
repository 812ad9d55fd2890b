"""Specs of ``sdict_ext.host.copies``: how batched copies are grouped by device, retried,
and how a device argument is normalised. The grouping is checked with devices as data
(and fake tensors), so it runs without GPUs; the copies between two real GPUs run where
two are visible."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from sdict_ext import ops
from sdict_ext.host import copies as _copies
from sdict_ext.host.copies import (
    ROUTE_OP,
    ROUTE_PEER,
    batched_copy_pairs,
    copy_groups,
    indexed_device,
)
from tests.mp import run_on_ranks

TWO_GPUS = torch.cuda.is_available() and torch.cuda.device_count() >= 2 and ops.has_cuda()


def test_copy_groups_sends_a_group_between_two_gpus_to_peer_copies():
    devices = [
        ("cuda:1", "cuda:0"),
        ("cpu", "cuda:0"),
        (torch.device("cuda", 1), torch.device("cuda", 0)),
        ("cuda:0", "cuda:0"),
        ("cuda:0", "cpu"),
        ("cpu", "cpu"),
        ("cuda:0", "cuda:1"),
    ]
    assert copy_groups(devices) == [
        (ROUTE_PEER, [0, 2]),
        (ROUTE_OP, [1]),
        (ROUTE_OP, [3]),
        (ROUTE_OP, [4]),
        (ROUTE_OP, [5]),
        (ROUTE_PEER, [6]),
    ]


def test_copy_groups_of_one_device_pair_is_one_group():
    assert copy_groups([("cpu", "cuda:3")] * 4) == [(ROUTE_OP, [0, 1, 2, 3])]
    assert copy_groups([]) == []


class _Recorder:
    """Stands for the op (refusing the first call, as the planner refuses several CUDA
    devices) and for ``torch._foreach_copy_``, recording each call's devices."""

    def __init__(self, first_error: BaseException) -> None:
        self.first_error = first_error
        self.calls: list[tuple[str, list[tuple[str, str]]]] = []

    def _record(self, name, dsts, srcs) -> None:
        self.calls.append((name, [(str(d.device), str(s.device)) for d, s in zip(dsts, srcs)]))

    def op(self, dsts, srcs, non_blocking=False) -> None:
        self._record("op", dsts, srcs)
        if len(self.calls) == 1:
            raise self.first_error

    def foreach(self, dsts, srcs, non_blocking=False) -> None:
        self._record("foreach", dsts, srcs)


def _fake_pairs(devices: list[tuple[str, str]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    # Distinct shapes: fake tensors have no memory, and equal views would be deduplicated.
    with FakeTensorMode():
        dsts = [torch.empty(i + 1, device=d) for i, (d, _) in enumerate(devices)]
        srcs = [torch.empty(i + 1, device=s) for i, (_, s) in enumerate(devices)]
    return dsts, srcs


_NO_FAKE_POINTER_WARNING = pytest.mark.filterwarnings(
    "ignore:Accessing the data pointer of FakeTensor"
)


@_NO_FAKE_POINTER_WARNING
def test_batched_copy_pairs_copies_between_two_gpus_with_foreach_copy(monkeypatch):
    rec = _Recorder(NotImplementedError("batched_copy_: one call works on a single CUDA device"))
    monkeypatch.setattr(_copies.ops, "batched_copy_", rec.op)
    monkeypatch.setattr(torch, "_foreach_copy_", rec.foreach)
    devices = [("cuda:1", "cuda:0"), ("cpu", "cuda:0"), ("cuda:1", "cuda:0")]
    batched_copy_pairs(*_fake_pairs(devices))
    assert rec.calls == [
        ("op", devices),
        ("foreach", [("cuda:1", "cuda:0"), ("cuda:1", "cuda:0")]),
        ("op", [("cpu", "cuda:0")]),
    ]


@_NO_FAKE_POINTER_WARNING
def test_batched_copy_pairs_of_one_peer_group_does_not_reraise_the_refusal(monkeypatch):
    rec = _Recorder(NotImplementedError("batched_copy_: one call works on a single CUDA device"))
    monkeypatch.setattr(_copies.ops, "batched_copy_", rec.op)
    monkeypatch.setattr(torch, "_foreach_copy_", rec.foreach)
    devices = [("cuda:0", "cuda:1")] * 2
    batched_copy_pairs(*_fake_pairs(devices))
    assert rec.calls == [("op", devices), ("foreach", devices)]


@pytest.mark.parametrize(
    "error",
    [torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
     torch.OutOfMemoryError("CUDA out of memory")],
    ids=["device-error", "out-of-memory"],
)
def test_batched_copy_pairs_never_retries_after_a_failure_once_copies_started(monkeypatch, error):
    rec = _Recorder(error)
    monkeypatch.setattr(_copies.ops, "batched_copy_", rec.op)
    validated = []
    # A tied destination: a refusal of these pairs would be retried deduplicated.
    dst = torch.zeros(4)
    srcs = [torch.ones(4), torch.full((4,), 2.0)]
    with pytest.raises(type(error)) as raised:
        batched_copy_pairs([dst, dst], srcs, validate=lambda: validated.append(True))
    assert raised.value is error
    assert len(rec.calls) == 1 and validated == []


def test_batched_copy_pairs_retries_a_planner_refusal_of_a_tied_destination():
    dst = torch.zeros(4)
    batched_copy_pairs([dst, dst], [torch.ones(4), torch.full((4,), 2.0)])
    assert torch.equal(dst, torch.full((4,), 2.0))  # the last pair wins, as with copy_


def test_indexed_device_gives_a_bare_accelerator_the_current_index(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert indexed_device(torch.device("cuda")) == torch.device("cuda", 3)
    assert indexed_device("cuda") == torch.device("cuda", 3)
    assert indexed_device("cuda:1") == torch.device("cuda", 1)
    assert indexed_device("cpu") == torch.device("cpu")
    assert indexed_device(torch.device("meta")) == torch.device("meta")
    assert indexed_device(None) is None


def _broadcast_device_seen(device: str) -> str:
    """The device broadcast_state_dict plans with, on a rank whose current GPU is 2."""
    import sdict_ext.collectives.broadcast.main as _broadcast

    class Seen(Exception):
        pass

    def spy(group, dev):
        raise Seen(str(dev))

    saved = _broadcast._pg_device, torch.cuda.current_device
    _broadcast._pg_device, torch.cuda.current_device = spy, lambda: 2
    try:
        _broadcast.broadcast_state_dict({}, {}, device=torch.device(device))
    except Seen as seen:
        return str(seen)
    finally:
        _broadcast._pg_device, torch.cuda.current_device = saved
    return "not reached"


@pytest.mark.dist
def test_broadcast_state_dict_plans_with_an_indexed_device_for_a_bare_cuda():
    # The planner compares the device with each tensor's (cuda:N): a bare "cuda" never
    # matched, so nothing was received in place.
    assert run_on_ranks(2, _broadcast_device_seen, "cuda", timeout=120) == ["cuda:2"] * 2


@pytest.mark.cuda
@pytest.mark.skipif(not TWO_GPUS, reason="needs two CUDA devices and sdict_ext built with CUDA")
def test_batched_copy_pairs_between_two_gpus_matches_copy_():
    gen = torch.Generator().manual_seed(0)
    srcs = [torch.randn(n, generator=gen).to("cuda:0") for n in (1, 1000, 1 << 20)]
    srcs.append(torch.randn(64, 32, generator=gen).to("cuda:0").t())  # strided
    host = [torch.randn(7, generator=gen)]
    dsts = [torch.empty(s.shape, device="cuda:1") for s in srcs] + [torch.empty(7, device="cuda:1")]
    batched_copy_pairs(dsts, srcs + host)
    torch.cuda.synchronize("cuda:1")
    for d, s in zip(dsts, srcs + host):
        assert d.device == torch.device("cuda", 1)
        assert torch.equal(d.cpu(), s.cpu())


@pytest.mark.cuda
@pytest.mark.skipif(not TWO_GPUS, reason="needs two CUDA devices and sdict_ext built with CUDA")
def test_copy_state_dict_across_two_gpus_matches_pytorch():
    from torch.distributed._state_dict_utils import _copy_state_dict

    from sdict_ext.utils import copy_state_dict

    sd = {f"w{i}": torch.randn(i + 1, 16, device="cuda:0") for i in range(8)}
    ours = {k: torch.empty_like(v, device="cuda:1") for k, v in sd.items()}
    ref = {k: torch.empty_like(v, device="cuda:1") for k, v in sd.items()}
    copy_state_dict(sd, ours)
    _copy_state_dict(sd, ref)
    torch.cuda.synchronize("cuda:1")
    assert all(torch.equal(ours[k], ref[k]) for k in sd)
