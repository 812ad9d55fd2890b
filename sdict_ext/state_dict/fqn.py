"""Canonical FQNs for ``sdict_ext.state_dict``: wrapper-free names for every model tensor.

A *canonical FQN* is the name a parameter or buffer would have in the unwrapped model.
Wrappers insert path components that must disappear from it: DDP's ``module.``,
``torch.compile``'s ``_orig_mod.``, FSDP1's ``_fsdp_wrapped_module.`` and the activation
checkpoint wrapper's ``_checkpoint_wrapped_module.``. FSDP1 without ``use_orig_params``
also hides many original parameters behind one ``_flat_param``, so one raw name can stand
for several FQNs. The rules follow ``torch.distributed.checkpoint.state_dict._get_fqns``;
the walk here is memoised per module prefix, so resolving N keys costs O(N) attribute
look-ups instead of O(N * depth).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.nn.parallel import DistributedDataParallel as DDP

__all__: list[str] = []

_CHECKPOINT_PREFIX = "_checkpoint_wrapped_module."
_FSDP_WRAPPED = "_fsdp_wrapped_module"
_FLAT_PARAM = "_flat_param"
_EXTRA_STATE_KEY = nn.modules.module._EXTRA_STATE_KEY_SUFFIX

# Tags for the path components a wrapper inserts; they decide which name variant keeps them.
_PLAIN, _DDP, _COMPILE = 0, 1, 2

# ``torch.compile``'s wrapper class; imported lazily because importing dynamo is slow.
_OPTIMIZED_MODULE: type | None = None


def _optimized_module_type() -> type:
    global _OPTIMIZED_MODULE
    if _OPTIMIZED_MODULE is None:
        from torch._dynamo.eval_frame import OptimizedModule

        _OPTIMIZED_MODULE = OptimizedModule
    return _OPTIMIZED_MODULE


class ExtraState:
    """Marker yielded by :func:`iter_model_state` for a module's ``_extra_state`` entry."""


Parts = tuple[tuple[str, int], ...]


class FqnResolver:
    """Maps raw names (``state_dict`` keys, ``named_parameters`` names) to canonical FQNs.

    Args:
        model: the root module, possibly wrapped.
        fqn_modifiers: name of the optional method a module defines to declare path
            components that state-dict hooks drop (``StateDictOptions.dsd_fqn_modifiers``).
    """

    def __init__(self, model: nn.Module, fqn_modifiers: str) -> None:
        self._modifiers = fqn_modifiers
        self._prefixes: dict[str, tuple[Any, Parts]] = {"": (model, ())}
        self._cache: dict[str, tuple[Parts, ...]] = {}
        # Raw flat-parameter name -> positions, in parts(name), of its tied parameters.
        self._tied: dict[str, tuple[int, ...]] = {}

    def _step(self, obj: Any, parts: Parts, name: str) -> tuple[Any, Parts]:
        if isinstance(obj, DDP):
            if name != "module":
                raise RuntimeError(f"expected DDP's 'module' path component, found {name!r}")
            return obj.module, parts + ((name, _DDP),)
        if isinstance(obj, FSDP):
            inner = getattr(obj, _FSDP_WRAPPED)
            if name == _FSDP_WRAPPED:
                return inner, parts
            return getattr(inner, name), parts + ((name, _PLAIN),)
        if isinstance(obj, _optimized_module_type()):
            if name != "_orig_mod":
                raise RuntimeError(
                    f"expected torch.compile's '_orig_mod' path component, found {name!r}"
                )
            return obj._orig_mod, parts + ((name, _COMPILE),)
        modifiers = getattr(obj, self._modifiers, None)
        if modifiers is not None:
            redirected = modifiers().get(name)
            if redirected and hasattr(obj, redirected):
                obj = getattr(obj, redirected)
        return getattr(obj, name), parts + ((name, _PLAIN),)

    def _walk(self, prefix: str) -> tuple[Any, Parts]:
        hit = self._prefixes.get(prefix)
        if hit is None:
            head, _, last = prefix.rpartition(".")
            obj, parts = self._walk(head)
            hit = self._prefixes[prefix] = self._step(obj, parts, last)
        return hit

    def _flat_param_owner(self, head: str) -> tuple[Any, Parts] | None:
        """The FSDP1 module (and its path) whose flat parameter ``<head>._flat_param`` is.

        FSDP registers it on the module it wraps, so the raw name ends in
        ``<fsdp path>._fsdp_wrapped_module._flat_param``.
        """
        obj, parts = self._walk(head)
        if isinstance(obj, FSDP):
            return obj, parts
        owner_path, _, last = head.rpartition(".")
        if last == _FSDP_WRAPPED:
            owner, owner_parts = self._walk(owner_path)
            if isinstance(owner, FSDP):
                return owner, owner_parts
        return None

    def parts(self, name: str) -> tuple[Parts, ...]:
        """Tagged path components of every FQN ``name`` stands for."""
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        clean = name.replace(_CHECKPOINT_PREFIX, "")
        if "." not in clean:
            result: tuple[Parts, ...] = (((clean, _PLAIN),),)
        else:
            head, _, leaf = clean.rpartition(".")
            owner = self._flat_param_owner(head) if leaf == _FLAT_PARAM else None
            if owner is not None:
                # FlatParameter._fqns is FSDP1's only record of which original parameters
                # a flat parameter holds (no public API exposes it); PyTorch reads it too.
                # A tied parameter is flattened once, under its first name; its other
                # names are in _shared_param_infos, and FSDP's state dict has them all.
                fsdp, parts = owner
                flat = getattr(fsdp, _FLAT_PARAM)
                infos = getattr(flat, "_shared_param_infos", ())
                shared = [_joined(i.module_name, i.param_name) for i in infos]
                names = (*flat._fqns, *shared)
                result = tuple(parts + tuple((p, _PLAIN) for p in fqn.split(".")) for fqn in names)
                tied = {*shared, *(_joined(i.prim_module_name, i.prim_param_name) for i in infos)}
                if tied:
                    self._tied[name] = tuple(i for i, fqn in enumerate(names) if fqn in tied)
            else:
                result = (self._walk(head)[1] + ((leaf, _PLAIN),),)
        self._cache[name] = result
        return result

    def fqns(self, name: str, *, keep_ddp: bool = False, keep_compile: bool = False) -> list[str]:
        """FQNs of ``name``; ``keep_*`` keep the DDP / ``torch.compile`` components."""
        keep = {_PLAIN}
        if keep_ddp:
            keep.add(_DDP)
        if keep_compile:
            keep.add(_COMPILE)
        return [".".join(p for p, tag in parts if tag in keep) for parts in self.parts(name)]

    def tied_fqns(self, name: str) -> list[str]:
        """The FQNs of ``name`` that name one tied parameter inside a flat parameter.

        A tied parameter is flattened once, so its names are all FQNs of a single raw
        name and only FSDP1's shared-parameter record tells them from the untied ones.
        """
        clean = self.fqns(name)
        return [clean[i] for i in self._tied.get(name, ())]

    def fqn(self, name: str) -> str:
        """The single canonical FQN of ``name`` (an error if it stands for several)."""
        fqns = self.fqns(name)
        if len(fqns) != 1:
            raise RuntimeError(f"{name!r} stands for {len(fqns)} parameters ({fqns}); expected one")
        return fqns[0]


def _joined(module_name: str, param_name: str) -> str:
    return f"{module_name}.{param_name}" if module_name else param_name


def iter_model_state(model: nn.Module, fqn_modifiers: str) -> Iterator[tuple[str, Any]]:
    """Yield ``(raw name, tensor or ExtraState)`` for everything ``model.state_dict()`` saves.

    In ``state_dict()``'s order (a module's parameters, persistent buffers and extra
    state, then its children), so missing keys are listed as PyTorch lists them. Each
    module is visited once (a shared
    submodule is not repeated; a parameter tied between two modules is yielded under both
    names). Names keep the wrapper components, like ``named_parameters()``; a child that
    the module's ``fqn_modifiers`` method names is skipped in the path, as its state-dict
    hooks do.
    """
    visited: set[int] = set()

    def recurse(module: nn.Module, prefix: str) -> Iterator[tuple[str, Any]]:
        visited.add(id(module))
        dotted = f"{prefix}." if prefix else ""
        modifiers = getattr(module, fqn_modifiers, None)
        skipped = set(modifiers().values()) if modifiers is not None else set()
        for name, param in module.named_parameters(recurse=False):
            yield f"{dotted}{name}", param
        non_persistent = module._non_persistent_buffers_set
        for name, buf in module.named_buffers(recurse=False):
            if name not in non_persistent:
                yield f"{dotted}{name}", buf
        if type(module).get_extra_state is not nn.Module.get_extra_state:
            yield f"{dotted}{_EXTRA_STATE_KEY}", ExtraState()
        for name, child in module.named_children():
            if id(child) in visited:
                continue
            yield from recurse(child, prefix if name in skipped else f"{dotted}{name}")

    yield from recurse(model, "")


def param_fqn_maps(
    model: nn.Module, resolver: FqnResolver, fqn_modifiers: str
) -> tuple[dict[torch.Tensor, list[str]], dict[str, torch.Tensor], set[str]]:
    """Map every model tensor to its FQNs and back; also the FQNs of shared tensors.

    Returns:
        ``(tensor -> FQNs, FQN -> tensor, FQNs of tensors that have several FQNs)``. The
        first dict is keyed by tensor identity (tensors hash by ``id``); its FQN lists are
        in model order, so a tied parameter's names come out in a reproducible order.
    """
    fqns_of: dict[torch.Tensor, list[str]] = {}
    tensor_of: dict[str, torch.Tensor] = {}
    shared: set[str] = set()
    for name, obj in iter_model_state(model, fqn_modifiers):
        if isinstance(obj, ExtraState):
            continue
        fqns = resolver.fqns(name)
        shared.update(resolver.tied_fqns(name))
        known = fqns_of.get(obj)
        if known is None:
            fqns_of[obj] = list(fqns)
        else:
            known.extend(f for f in fqns if f not in known)
            shared.update(known)
        for fqn in fqns:
            tensor_of[fqn] = obj
    return fqns_of, tensor_of, shared
