"""Specs for broadcast_state_dict's orchestration: which route ``route=`` chooses."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from sdict_ext import utils
from sdict_ext.collectives.broadcast import main
from sdict_ext.collectives.broadcast.direct import ENV_DIRECT_READ
from tests.mp import run_on_ranks

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def test_auto_takes_p2p_on_cpu_groups_and_direct_reads_only_when_the_environment_opts_in(
    monkeypatch,
):
    monkeypatch.delenv(ENV_DIRECT_READ, raising=False)
    assert main._choose_route("auto", CPU) == (True, False)
    monkeypatch.setenv(ENV_DIRECT_READ, "1")
    assert main._choose_route("auto", CPU) == (True, True)
    # Device groups always take the collective route under "auto".
    assert main._choose_route("auto", CUDA) == (False, False)


def test_explicit_routes_force_their_way_whatever_the_environment(monkeypatch):
    monkeypatch.setenv(ENV_DIRECT_READ, "1")
    assert main._choose_route("collective", CPU) == (False, False)
    assert main._choose_route("collective", CUDA) == (False, False)
    assert main._choose_route("p2p", CPU) == (True, False)
    monkeypatch.delenv(ENV_DIRECT_READ)
    assert main._choose_route("direct", CPU) == (True, True)


@pytest.mark.parametrize("route", ["p2p", "direct"])
def test_cpu_routes_on_a_device_group_raise_naming_the_way_out(route):
    with pytest.raises(ValueError, match=rf"route='{route}' needs a CPU group .*cuda:0.*"
                                         r"route='collective'"):
        main._choose_route(route, CUDA)


def test_an_unknown_route_raises_naming_the_choices():
    with pytest.raises(ValueError, match=r"route must be one of \('auto', 'collective', "
                                         r"'p2p', 'direct'\), got 'fast'"):
        main._choose_route("fast", CPU)


def _mismatched_routes(routes: tuple[str, str]):
    rank = dist.get_rank()
    full = {"w": torch.arange(12.0).reshape(4, 3)} if rank == 0 else {}
    local = {"w": torch.zeros(4, 3)}
    try:
        utils.broadcast_state_dict(full, local, CPU, route=routes[rank])
    except Exception as exc:  # noqa: BLE001
        return type(exc).__name__, str(exc), bool((local["w"] == 0).all())
    return None


@pytest.mark.parametrize("routes", [("p2p", "collective"), ("collective", "direct")])
def test_ranks_passing_different_routes_raise_on_every_rank_before_loading(routes):
    (kind0, text0, untouched0), (kind1, text1, untouched1) = run_on_ranks(
        2, _mismatched_routes, routes, timeout=60
    )
    assert (kind0, kind1) == ("RankFailure", "ValueError")
    for text in (text0, text1):
        assert "pass the same route on every rank" in text, text
    assert untouched0 and untouched1
