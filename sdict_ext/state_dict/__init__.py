"""Get and set model / optimizer state dicts of any parallelism, keyed by canonical FQN.

Drop-in counterpart of ``torch.distributed.checkpoint.state_dict``: the same functions,
signatures, options and results, for plain, DDP, FSDP1, FSDP2 (``fully_shard``), tensor
parallel (DTensor), ``torch.compile``d and activation-checkpointed models, in any
combination. Full-state-dict gathers, CPU offload and ``broadcast_from_rank0`` loads go
through :mod:`sdict_ext.utils` (coalesced, bucketed collectives and batched copies).

Where PyTorch 2.13 misbehaves, these functions do not:

* ``set_state_dict(broadcast_from_rank0=True)`` with ``{}`` on ranks other than 0 still
  runs the model broadcast on every rank (whether to load the model is rank 0's call).
* Every load is checked first, on every rank: missing / unexpected keys (``strict``),
  shape and dtype mismatches are reported together, naming the keys, raised on all
  ranks, and nothing is loaded. With ``broadcast_from_rank0`` each rank's model is
  checked against rank 0's input, and rank 0's input against what the broadcast can
  send, before the optimizers are loaded; with several optimizers, every optimizer's
  part is checked before the first is loaded. The caller's dicts are never modified.
* A rank whose ``state_dict()`` raises in a ``full_state_dict`` get makes every rank
  raise, instead of leaving the others waiting in the gather.
* ``cpu_offload`` results are fresh copies, never the live parameters or optimizer
  ``step`` tensors; loaded optimizers never adopt the caller's tensors.
* FSDP1 with ``full_state_dict`` and ``cpu_offload`` on a CPU compute device works
  (PyTorch segfaults).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.modules.module import _IncompatibleKeys

from sdict_ext._gc import gc_paused
from sdict_ext.state_dict.fqn import FqnResolver
from sdict_ext.state_dict.gather_offload import storage_ptrs
from sdict_ext.state_dict.load import agree_load
from sdict_ext.state_dict.model import (
    agree_with_source,
    get_model,
    model_signature,
    prepare_model_load,
    run_model_load,
)
from sdict_ext.state_dict.optim import get_optim, prepare_optim_load, run_optim_load
from sdict_ext.state_dict.options import (
    PATCHED,
    Info,
    StateDictOptions,
    as_optimizers,
    build_info,
    is_multi_rank,
)

__all__ = [
    "StateDictOptions",
    "get_model_state_dict",
    "get_optimizer_state_dict",
    "get_state_dict",
    "patch_model_state_dict",
    "patch_optimizer_state_dict",
    "set_model_state_dict",
    "set_optimizer_state_dict",
    "set_state_dict",
]

_FLAT_PARAM = "_flat_param"


def _check_result(model_sd: dict[str, Any], optim_sd: dict[str, Any], info: Info) -> None:
    """Reject results PyTorch rejects: an empty dict where one is required, flat params."""
    offloaded_full = info.cpu_offload and info.full_state_dict
    if (
        info.handle_model
        and not model_sd
        and not info.submodule_prefixes
        and not info.ignore_frozen_params
        and not offloaded_full
        and info.strict
        and not info.broadcast_from_rank0
    ):
        raise RuntimeError(
            "The options require a model state_dict, but the model state_dict is empty."
        )
    if info.handle_optim and not optim_sd and not offloaded_full and not info.broadcast_from_rank0:
        raise RuntimeError("The options require an optimizer state_dict, but it is empty.")
    for key in model_sd:
        if _FLAT_PARAM in key:
            raise RuntimeError(
                f"{key} contains {_FLAT_PARAM}: this happens when the model is not the root module."
            )


def _from_submodule_keys(model: nn.Module, state_dict: Any) -> dict[str, Any]:
    """Accept the deprecated ``{submodule: its state dict}`` form, as PyTorch does."""
    if not state_dict or not isinstance(state_dict, dict):
        return state_dict
    if not isinstance(next(iter(state_dict)), nn.Module):
        return state_dict
    warnings.warn(
        "Passing model_state_dict as a Dict[nn.Module, Dict[str, Any]] is deprecated (as in "
        "PyTorch); prefix the keys yourself.",
        FutureWarning,
        stacklevel=3,
    )
    resolver = FqnResolver(model, StateDictOptions.dsd_fqn_modifiers)
    flat: dict[str, Any] = {}
    for submodule, sub_state in state_dict.items():
        for name, module in model.named_modules():
            if module is submodule:
                prefix = f"{resolver.fqn(name)}."
                flat.update({prefix + key: value for key, value in sub_state.items()})
    return flat


@torch.no_grad()
def get_model_state_dict(
    model: nn.Module,
    *,
    submodules: set[nn.Module] | None = None,
    options: StateDictOptions | None = None,
) -> dict[str, Any]:
    """Return ``model``'s state dict keyed by canonical FQN.

    See :func:`get_state_dict`.

    Args:
        model: the (possibly wrapped / parallelized) root module.
        submodules: deprecated; only return entries under these submodules.
        options: see :class:`StateDictOptions`.
    """
    with gc_paused():
        info = build_info(model, (), optim_only=False, submodules=submodules, options=options)
        model_sd = get_model(model, info)
        _check_result(model_sd, {}, info)
        return model_sd


@torch.no_grad()
def get_optimizer_state_dict(
    model: nn.Module,
    optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer],
    *,
    submodules: set[nn.Module] | None = None,
    options: StateDictOptions | None = None,
) -> dict[str, Any]:
    """Return the combined state dict of ``optimizers``, keyed by parameter FQN.

    See :func:`get_state_dict`.
    """
    with gc_paused():
        optims = as_optimizers(optimizers)
        info = build_info(model, optims, optim_only=True, submodules=submodules, options=options)
        optim_sd = get_optim(model, optims, info)
        _check_result({}, optim_sd, info)
        return optim_sd


@torch.no_grad()
def get_state_dict(
    model: nn.Module,
    optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer],
    *,
    submodules: set[nn.Module] | None = None,
    options: StateDictOptions | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return ``(model state dict, optimizers state dict)``, both keyed by canonical FQN.

    A canonical FQN is the name ``named_parameters()`` / ``named_buffers()`` gives in the
    unwrapped model, so a state dict saved under one parallelism loads under another
    (and reshards through ``torch.distributed.checkpoint``). Without ``full_state_dict``
    sharded tensors stay DTensors / ShardedTensors that are views of the live parameters
    and optimizer state, as in PyTorch; a lazily initialised optimizer is initialised
    first (one step with zero gradients and learning rate).

    Args:
        model: the (possibly wrapped / parallelized) root module.
        optimizers: the optimizer(s) of ``model``.
        submodules: deprecated; only return entries under these submodules.
        options: see :class:`StateDictOptions`.
    """
    with gc_paused():
        optims = as_optimizers(optimizers)
        info = build_info(model, optims, optim_only=False, submodules=submodules, options=options)
        model_sd = get_model(model, info)
        optim_sd = get_optim(model, optims, info)
        _check_result(model_sd, optim_sd, info)
        return model_sd, optim_sd


def _load(
    model: nn.Module,
    optims: tuple[torch.optim.Optimizer, ...],
    model_sd: dict[str, Any],
    optim_sd: dict[str, Any],
    info: Info,
) -> _IncompatibleKeys:
    """Check both inputs on every rank, then load the optimizers, then the model.

    Whatever can make the model load fail (keys, shapes, what the broadcast can send)
    is checked before the optimizers load, so a failure loads neither.

    With ``broadcast_from_rank0`` only rank 0 reads its inputs, and rank 0 alone decides
    whether the model is loaded: every rank then joins the model broadcast, whatever it
    passed (PyTorch lets a rank that passed ``{}`` skip it, so collectives mismatch).
    """
    is_source = not info.broadcast_from_rank0 or not is_multi_rank() or dist.get_rank() == 0
    must_agree = is_multi_rank() and (info.broadcast_from_rank0 or info.distributed)
    errors: list[str] = []
    model_plan, optim_plans = None, []
    try:
        if is_source:
            try:
                _check_result(model_sd, optim_sd, info)
            except RuntimeError as exc:
                errors.append(str(exc))
        if is_source and not errors:
            model_plan, error = prepare_model_load(model, model_sd, info)
            errors += [error] if error else []
        elif not is_source:
            # This rank's own keys, whatever it passed: checked against rank 0's below.
            model_plan, _ = prepare_model_load(
                model, {}, dataclasses.replace(info, handle_model=True)
            )
        optim_plans, error = prepare_optim_load(model, optims, optim_sd, info)
        errors += [error] if error else []
    except Exception as exc:
        if not must_agree:
            raise
        # Anything unexpected must still reach the other ranks, or they would wait forever.
        errors.append(f"{type(exc).__name__}: {exc}")
    error = "\n".join(errors) or None
    if not must_agree:
        if error:
            raise RuntimeError(error)
    elif info.broadcast_from_rank0:
        loads = agree_load(error, (info.handle_model, model_signature(model_plan, info)))
        info.handle_model = bool(loads[0][0])
        if not info.handle_model:
            model_plan = None
        elif len({signature for _, signature in loads}) > 1:
            # A rank's model differs from rank 0's: its keys are checked against rank
            # 0's input, on every rank, before anything is written.
            agree_with_source(model, model_plan, info)
    else:
        # Every rank must load the same parts, or the FSDP / DTensor collectives of the
        # load would not match (a rank-0-only cpu_offload state dict needs the broadcast).
        loads = agree_load(error, (model_plan is not None, bool(optim_sd) and bool(optims)))
        if len(set(loads)) > 1:
            empty = [r for r, (m, o) in enumerate(loads) if (m, o) != max(loads)]
            raise RuntimeError(
                f"state dict load rejected, nothing was loaded: ranks {empty} passed empty "
                "state dicts where other ranks did not; to load a state dict that only rank 0 "
                "holds (e.g. from full_state_dict with cpu_offload), pass "
                "broadcast_from_rank0=True"
            )
    run_optim_load(model, optims, optim_plans, storage_ptrs(optim_sd) if is_source else set(), info)
    return run_model_load(model, model_plan, info)


def set_model_state_dict(
    model: nn.Module,
    model_state_dict: dict[str, Any],
    *,
    options: StateDictOptions | None = None,
) -> _IncompatibleKeys:
    """Load a state dict keyed by canonical FQN into ``model``.

    The counterpart of :func:`get_model_state_dict`; see :func:`set_state_dict`.

    Returns:
        ``_IncompatibleKeys(missing_keys, unexpected_keys)`` as ``load_state_dict`` does.
    """
    model_state_dict = _from_submodule_keys(model, model_state_dict)
    with gc_paused():
        info = build_info(model, (), optim_only=False, options=options)
        return _load(model, (), model_state_dict, {}, info)


def set_optimizer_state_dict(
    model: nn.Module,
    optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer],
    optim_state_dict: dict[str, Any],
    *,
    options: StateDictOptions | None = None,
) -> None:
    """Load an FQN-keyed optimizer state dict into ``optimizers``.

    The counterpart of :func:`get_optimizer_state_dict`; see :func:`set_state_dict`.
    Call it before ``backward()`` or after ``step()``, so that lazily created state is
    initialised correctly.
    """
    with gc_paused():
        optims = as_optimizers(optimizers)
        info = build_info(model, optims, optim_only=True, options=options)
        _load(model, optims, {}, optim_state_dict, info)


def set_state_dict(
    model: nn.Module,
    optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer],
    *,
    model_state_dict: dict[str, Any],
    optim_state_dict: dict[str, Any],
    options: StateDictOptions | None = None,
) -> _IncompatibleKeys:
    """Load model and optimizer state dicts keyed by canonical FQN.

    The inputs need not come from :func:`get_state_dict`, but their keys must be
    canonical FQNs and sharded tensors must be DTensors or ShardedTensors. Both inputs
    are checked on every rank before anything is written; a problem on any rank raises
    ``RuntimeError`` on all of them, naming the keys, with nothing loaded. With
    ``broadcast_from_rank0`` only rank 0's inputs are read (other ranks may pass ``{}``);
    every rank's model is checked against them (a rank whose model has keys they lack
    fails a strict load, as in PyTorch, but on every rank and before any write).
    Call it before ``backward()`` or after ``step()``.

    Returns:
        ``_IncompatibleKeys(missing_keys, unexpected_keys)`` of the model load.
    """
    model_state_dict = _from_submodule_keys(model, model_state_dict)
    with gc_paused():
        optims = as_optimizers(optimizers)
        opts = options or StateDictOptions()
        broadcast = opts.broadcast_from_rank0
        info = build_info(
            model, optims, optim_only=not model_state_dict and not broadcast, options=opts
        )
        # Whether to load the model: each rank's own input decides in PyTorch; with
        # broadcast_from_rank0 this is rank 0's proposal, which _load makes everyone's.
        info.handle_model = bool(model_state_dict)
        return _load(model, optims, model_state_dict, optim_state_dict, info)


def patch_model_state_dict(model: nn.Module, *, options: StateDictOptions | None = None) -> None:
    """Make ``model.state_dict()`` / ``model.load_state_dict()`` call our get / set.

    Counterpart of PyTorch's private ``_patch_model_state_dict``.
    """

    def state_dict_call() -> dict[str, Any]:
        return get_model_state_dict(model, options=options)

    def load_state_dict_call(state_dict: dict[str, Any]) -> None:
        set_model_state_dict(model, model_state_dict=state_dict, options=options)

    model.state_dict = state_dict_call  # type: ignore[method-assign]
    model.load_state_dict = load_state_dict_call  # type: ignore[method-assign,assignment]
    PATCHED.update((state_dict_call, load_state_dict_call))


def patch_optimizer_state_dict(
    model: nn.Module,
    *,
    optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer],
    options: StateDictOptions | None = None,
) -> None:
    """Make every optimizer's ``state_dict()`` / ``load_state_dict()`` call our get / set.

    Each patched optimizer returns / loads the state of *all* ``optimizers``. Counterpart
    of PyTorch's private ``_patch_optimizer_state_dict``.
    """
    optims = as_optimizers(optimizers)

    def state_dict_call() -> dict[str, Any]:
        return get_optimizer_state_dict(model, optims, options=options)

    def load_state_dict_call(state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(model, optims, optim_state_dict=state_dict, options=options)

    PATCHED.update((state_dict_call, load_state_dict_call))
    for optim in optims:
        optim.state_dict = state_dict_call  # type: ignore[method-assign]
        optim.load_state_dict = load_state_dict_call  # type: ignore[method-assign]
