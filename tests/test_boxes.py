"""Specs for sdict_ext.collectives.boxes' per-mesh cache."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from sdict_ext.collectives import boxes
from tests.mp import run_on_ranks

pytestmark = pytest.mark.dist


def _mesh_cache_lifetime():
    ws = dist.get_world_size()
    mesh = DeviceMesh("cpu", [[r] for r in range(ws)])
    facts = (boxes.mesh_coordinates(mesh), boxes.mesh_shape(mesh))
    # A second mesh of the same ranks is a different object with its own entry.
    other = DeviceMesh("cpu", [[r] for r in range(ws)])
    same_for_other = (boxes.mesh_coordinates(other), boxes.mesh_shape(other)) == facts
    key, ref = id(mesh), weakref.ref(mesh)
    cached_while_alive = key in boxes._MESHES
    del mesh
    gc.collect()
    return facts, same_for_other, cached_while_alive, ref() is None, key in boxes._MESHES


def test_mesh_facts_are_cached_without_keeping_a_dropped_mesh_alive():
    for facts, same_for_other, cached, collected, still_cached in run_on_ranks(
        2, _mesh_cache_lifetime, timeout=60
    ):
        assert facts == ({0: (0, 0), 1: (1, 0)}, (2, 1))
        assert same_for_other
        assert cached
        assert collected  # the cache held no strong reference to the mesh
        assert not still_cached  # and its entry left with the mesh
