"""Specs for ``sdict_ext.tree``: the one walk, its flat view and its layout signature."""

from __future__ import annotations

import io
from collections import OrderedDict, namedtuple

import pytest
import torch

from sdict_ext import tree
from sdict_ext.tree import (
    LEAF_OTHER,
    LEAF_TENSOR,
    LEAF_VALUE,
    NODE_DICT,
    NODE_LIST,
    NODE_TUPLE,
    PLAIN_KINDS,
    TENSOR_KINDS,
    flatten,
)

Pair = namedtuple("Pair", "first second")


class _Custom:
    """A leaf type no walk knows (accepted with type_check=False)."""


def _nested() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "model": OrderedDict(w=torch.randn(4, 3, generator=g), b=torch.arange(5)),
        "optim": {
            "state": {0: {"step": torch.tensor(7.0), "exp_avg": torch.randn(3, generator=g)}},
            "param_groups": [{"lr": 0.1, "params": [0], "betas": Pair(0.9, 0.99)}],
        },
        "extra": io.BytesIO(b"x"),
    }


def _signature(obj) -> object:
    return flatten(obj, type_check=False).signature


def test_flat_view_lists_leaves_kinds_paths_locals_and_plain_values_in_traversal_order():
    sd = _nested()
    flat = flatten(sd)
    assert flat.paths == [
        ("model", "w"), ("model", "b"),
        ("optim", "state", 0, "step"), ("optim", "state", 0, "exp_avg"),
        ("optim", "param_groups", 0, "lr"), ("optim", "param_groups", 0, "params", 0),
        ("optim", "param_groups", 0, "betas", 0), ("optim", "param_groups", 0, "betas", 1),
        ("extra",),
    ]
    assert flat.kinds == [LEAF_TENSOR] * 4 + [LEAF_VALUE] * 5
    assert flat.leaves[0] is sd["model"]["w"] and flat.leaves[-1] is sd["extra"]
    assert [id(t) for t in flat.locals] == [id(flat.leaves[i]) for i in range(4)]
    assert flat.plain_indices == [4, 5, 6, 7, 8]
    assert flat.tensor_indices() == [0, 1, 2, 3]
    assert flat.local_owners() == [(0, -1), (1, -1), (2, -1), (3, -1)]
    assert flat.top_is_dict


def test_rebuild_puts_new_leaves_into_plain_containers_of_the_same_shape():
    sd = _nested()
    flat = flatten(sd)
    out = flat.rebuild(list(range(len(flat.leaves))))
    assert out == {
        "model": {"w": 0, "b": 1},
        "optim": {"state": {0: {"step": 2, "exp_avg": 3}},
                  "param_groups": [{"lr": 4, "params": [5], "betas": (6, 7)}]},
        "extra": 8,
    }
    assert type(out["model"]) is dict and type(out["optim"]["param_groups"][0]["betas"]) is tuple
    with pytest.raises(ValueError, match="expected 9 leaves, got 8"):
        flat.rebuild(list(range(8)))


def test_leaf_kind_classifies_containers_tensors_and_plain_values():
    assert tree.leaf_kind({}) == NODE_DICT and tree.leaf_kind(OrderedDict()) == NODE_DICT
    assert tree.leaf_kind([]) == NODE_LIST
    assert tree.leaf_kind(()) == NODE_TUPLE and tree.leaf_kind(Pair(1, 2)) == NODE_TUPLE
    assert tree.leaf_kind(torch.zeros(1)) == LEAF_TENSOR
    assert tree.leaf_kind(torch.nn.Parameter(torch.zeros(1))) == LEAF_TENSOR
    assert tree.leaf_kind(3) == LEAF_VALUE and tree.leaf_kind(None) == LEAF_VALUE
    assert tree.leaf_kind(_Custom()) == LEAF_OTHER
    assert TENSOR_KINDS.isdisjoint(PLAIN_KINDS)
    assert PLAIN_KINDS == {LEAF_VALUE, LEAF_OTHER}


def test_unsupported_leaf_is_rejected_with_its_key_path():
    with pytest.raises(ValueError, match=r"key path 'a\.1\.b'"):
        flatten({"a": [1, {"b": _Custom()}]})
    flat = flatten({"a": [1, {"b": _Custom()}]}, type_check=False)
    assert flat.kinds == [LEAF_VALUE, LEAF_OTHER] and flat.plain_indices == [0, 1]


def test_signature_is_equal_for_the_same_layout_whatever_the_values():
    a = {"m": {"w": torch.zeros(2, 3), "b": torch.zeros(3)}, "step": 1, "x": [torch.ones(1)]}
    b = {"m": {"w": torch.ones(2, 3), "b": torch.ones(3)}, "step": 7, "x": [torch.zeros(1)]}
    assert _signature(a) == _signature(b)
    assert hash(_signature(a)) == hash(_signature(b))


@pytest.mark.parametrize(
    "change",
    ["key", "key order", "nesting", "list to tuple", "shape", "dtype", "stride", "device",
     "tensor to value", "value to other"],
)
def test_signature_differs_when_the_layout_changes(change):
    def make(which: str) -> dict:
        w = torch.zeros(2, 3)
        sd = {"w": w, "b": torch.zeros(3), "items": [1, 2], "step": 5}
        if which == "key":
            sd["v"] = sd.pop("w")
        elif which == "key order":
            sd = {"b": sd["b"], "w": w, "items": [1, 2], "step": 5}
        elif which == "nesting":
            sd["items"] = [[1], 2]
        elif which == "list to tuple":
            sd["items"] = (1, 2)
        elif which == "shape":
            sd["w"] = torch.zeros(3, 2)
        elif which == "dtype":
            sd["w"] = w.double()
        elif which == "stride":
            sd["w"] = torch.zeros(3, 2).t()
        elif which == "device":
            sd["w"] = torch.zeros(2, 3, device="meta")
        elif which == "tensor to value":
            sd["b"] = 0
        elif which == "value to other":
            sd["step"] = _Custom()
        return sd

    assert _signature(make("none")) == _signature(make("none"))
    assert _signature(make(change)) != _signature(make("none"))


def test_signature_does_not_depend_on_what_the_kind_cache_holds(monkeypatch):
    sd = {"m": {"w": torch.zeros(2), "b": torch.zeros(3)}, "step": 1, "x": (torch.ones(1), "s")}
    monkeypatch.setattr(tree, "_KINDS", {})  # as in a process that has walked nothing yet
    first = flatten(sd, type_check=False)
    second = flatten(sd, type_check=False)
    assert first.signature == second.signature
    assert first.paths == second.paths and first.kinds == second.kinds


def test_signature_of_a_sparse_tensor_is_its_layout_not_an_error():
    sparse = torch.zeros(3, 3).to_sparse()
    assert _signature({"s": sparse}) == _signature({"s": torch.zeros(3, 3).to_sparse()})
    assert _signature({"s": sparse}) != _signature({"s": torch.zeros(3, 3)})


def test_fast_walks_rebuild_plain_state_dicts_and_leave_the_rest_to_flatten():
    recipe, tensors = tree.plain_tensors({"a": {"w": torch.zeros(1)}, "n": 3})
    assert len(tensors) == 1
    assert tree.rebuild_plain(recipe, [torch.ones(1)])["a"]["w"].item() == 1.0
    with pytest.raises(tree.NotPlain):
        tree.plain_tensors({"a": _Custom()}, type_check=True)
    with pytest.raises(tree.NotPlain):
        tree.pair_tensors({"a": torch.zeros(1)}, {"b": torch.zeros(1)}, True)
