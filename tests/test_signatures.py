"""Every public function keeps PyTorch's parameter names, kinds and defaults.

A drop-in replacement must accept the calls written for PyTorch's function, keyword
arguments included: ``iterate_state_dict(iter_object=sd, ...)``,
``create_file_view(file=f, offset=0, length=8)``. Each public function of
``sdict_ext.utils``, ``sdict_ext.dist`` and ``sdict_ext.state_dict`` (and every method
of ``DistWrapper``) is compared with its counterpart named in docs/API.md. Our only
allowed additions are keyword-only parameters with a default that the docstring's
``Args`` and docs/API.md both document.
"""

from __future__ import annotations

import inspect
import pathlib
import re

import pytest
import torch.distributed._state_dict_utils as torch_utils
import torch.distributed.checkpoint.state_dict as torch_state_dict
import torch.distributed.checkpoint.utils as torch_dist

from sdict_ext import dist, state_dict, utils

_API_MD = (pathlib.Path(__file__).parent.parent / "docs" / "API.md").read_text()

# Public names that are not functions with a PyTorch signature to match: PyTorch's
# CompanionMismatch has no inspectable signature (ours subclasses it, tested in
# test_utils), and DistWrapper is compared method by method below.
_NOT_FUNCTIONS = {"CompanionMismatch", "DistWrapper"}
# Ours alone: PyTorch has no function that reshards a state dict without gathering it.
_NO_COUNTERPART = {"reshard_state_dict", "last_reshard_stats"}


def _counterpart(module_name: str, name: str):
    if module_name == "utils":
        return getattr(torch_utils, f"_{name}")
    if module_name == "dist":
        return getattr(torch_dist, f"_{name}", None) or getattr(torch_dist, name)
    # state_dict: the same names, except the patch helpers (underscored in PyTorch).
    return getattr(torch_state_dict, name, None) or getattr(torch_state_dict, f"_{name}")


def _pairs():
    for module_name, module in (("utils", utils), ("dist", dist), ("state_dict", state_dict)):
        for name in module.__all__:
            if name in _NOT_FUNCTIONS or name in _NO_COUNTERPART:
                continue
            yield f"{module_name}.{name}", getattr(module, name), _counterpart(module_name, name)
    ours, theirs = dist.DistWrapper, torch_dist._DistWrapper
    public = sorted(n for n in dir(theirs) if not n.startswith("_")) + ["__init__"]
    for name in public:
        yield f"dist.DistWrapper.{name}", getattr(ours, name), getattr(theirs, name)


_PAIRS = list(_pairs())


def _documented_extra(qualname: str, fn, param: inspect.Parameter) -> bool:
    """Whether an extra parameter is documented in the docstring and in docs/API.md."""
    doc = inspect.getdoc(fn) or ""
    in_args = re.search(rf"^\s+{re.escape(param.name)}:", doc.split("Args:", 1)[-1], re.M)
    short = qualname.split(".", 1)[1]
    api_row = next((line for line in _API_MD.splitlines() if f"`{short}(" in line), "")
    return bool(in_args) and param.name in api_row


@pytest.mark.parametrize("qualname, ours, theirs", _PAIRS, ids=[p[0] for p in _PAIRS])
def test_parameters_match_pytorch(qualname, ours, theirs):
    mine = list(inspect.signature(ours).parameters.values())
    ref = list(inspect.signature(theirs).parameters.values())
    described = [(p.name, p.kind, p.default) for p in mine[: len(ref)]]
    assert described == [(p.name, p.kind, p.default) for p in ref], (
        f"{qualname}{inspect.signature(ours)} != PyTorch's {inspect.signature(theirs)}"
    )
    for extra in mine[len(ref) :]:
        assert extra.kind is inspect.Parameter.KEYWORD_ONLY, (qualname, extra.name)
        assert extra.default is not inspect.Parameter.empty, (qualname, extra.name)
        assert _documented_extra(qualname, ours, extra), (
            f"{qualname}: extra parameter {extra.name!r} is not documented in its docstring "
            "and in docs/API.md"
        )


def test_every_public_function_is_compared():
    # A public function added later cannot skip the comparison above.
    compared = {q for q, _, _ in _PAIRS}
    for module_name, module in (("utils", utils), ("dist", dist), ("state_dict", state_dict)):
        for name in set(module.__all__) - _NOT_FUNCTIONS - _NO_COUNTERPART:
            assert f"{module_name}.{name}" in compared
    ours = {n for n in dir(dist.DistWrapper) if not n.startswith("_")}
    theirs = {n for n in dir(torch_dist._DistWrapper) if not n.startswith("_")}
    assert ours == theirs


def test_keyword_calls_written_for_pytorch_work():
    import io

    import torch

    sd = {"a": torch.arange(3.0)}
    keep = lambda value, pg, device, companion: value  # noqa: E731
    got = utils.iterate_state_dict(
        iter_object=sd, sharded_tensor_func=keep, dtensor_func=keep, tensor_func=keep
    )
    assert torch.equal(got["a"], sd["a"])
    view = dist.create_file_view(file=io.BytesIO(b"0123456789"), offset=2, length=5)
    assert view.read() == b"23456"
