"""Optimizer half of ``sdict_ext.state_dict``: FQN-keyed optimizer state dicts.

``torch.optim`` keys state by parameter position; these helpers re-key it by canonical
FQN (so it survives resharding and changes of parallelism), flatten it for pipeline
resharding, split a combined state dict back per optimizer, and load it. As for models,
loading is :func:`prepare_optim_load` (split, check; writes only the lazy state
initialisation PyTorch also does) then :func:`run_optim_load` (collectives and writes).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from sdict_ext.state_dict.fsdp import fsdp_process_group
from sdict_ext.state_dict.gather_offload import (
    failure_reaches_the_gather,
    full_or_offload,
    storage_ptr,
    storage_ptrs,
)
from sdict_ext.state_dict.load import unloadable
from sdict_ext.state_dict.model import target_device, tensor_problem
from sdict_ext.state_dict.options import (
    BUCKET_BYTES,
    PARAM_GROUPS,
    PARAMS,
    STATE,
    Info,
    state_dict_fn,
)
from sdict_ext.tree import flatten
from sdict_ext.utils import (
    broadcast_state_dict,
    distribute_state_dict,
    flatten_state_dict,
    unflatten_state_dict,
)

__all__: list[str] = []

_COMPILE_PREFIX = "_orig_mod."


def init_optim_state(optim: torch.optim.Optimizer) -> None:
    """Create an optimizer's lazily-initialised state, changing no parameter.

    ``torch.optim`` creates state on the first ``step()``; a state dict taken before that
    has no tensors to save into or load from. As PyTorch does, we step once with zero
    gradients and a zero learning rate. Skipped when state exists or any gradient is
    set (a stateless optimizer such as plain SGD must not be stepped on real gradients).
    """
    if optim.state:
        return
    params = [p for group in optim.param_groups for p in group[PARAMS]]
    if any(p.grad is not None for p in params):
        return
    for p in params:
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    saved_lrs = []
    for group in optim.param_groups:
        if "lr" in group:
            saved_lrs.append(group["lr"])
            group["lr"] = torch.tensor(0.0) if isinstance(group["lr"], torch.Tensor) else 0.0
    try:
        optim.step(closure=None)
    finally:
        for group in optim.param_groups:
            if "lr" in group:
                group["lr"] = saved_lrs.pop(0)
        optim.zero_grad(set_to_none=True)


def _fqn_keyed(model: nn.Module, optim: torch.optim.Optimizer, info: Info) -> dict[str, Any] | None:
    """One optimizer's local (unsharded-by-us) state dict keyed by FQN; None: nothing here."""
    init_optim_state(optim)
    osd = state_dict_fn(optim, "state_dict")()
    if info.fsdp_modules:
        with info.fsdp_context():
            osd = FSDP.optim_state_dict(model, optim, osd, group=fsdp_process_group(model, info))
        if not osd:
            return None
        # FSDP1 names parameters of a compiled submodule with its _orig_mod component.
        osd[STATE] = {k.replace(_COMPILE_PREFIX, ""): v for k, v in osd[STATE].items()}
        for group in osd[PARAM_GROUPS]:
            group[PARAMS] = [k.replace(_COMPILE_PREFIX, "") for k in group[PARAMS]]
        return osd

    pid_of = {
        id(p): i for i, p in enumerate(chain.from_iterable(g[PARAMS] for g in optim.param_groups))
    }
    fqn_of: dict[int, str] = {}
    for name, param in model.named_parameters():
        pid = pid_of.get(id(param))
        if pid is not None:
            fqn_of[pid] = info.resolver.fqn(name)

    def fqn(pid: Any) -> str:
        try:
            return fqn_of[pid]
        except KeyError:
            raise ValueError(
                f"the optimizer's parameter #{pid} is not a parameter of the model, "
                "so it has no FQN"
            ) from None

    osd[STATE] = {fqn(pid): value for pid, value in osd[STATE].items()}
    for group in osd[PARAM_GROUPS]:
        group[PARAMS] = [fqn(pid) for pid in group[PARAMS]]
    return osd


def get_optim(
    model: nn.Module, optims: tuple[torch.optim.Optimizer, ...], info: Info
) -> dict[str, Any]:
    """The optimizers' combined state dict keyed by FQN, gathered / offloaded per ``info``."""
    if not info.handle_optim:
        return {}
    combined: dict[str, Any] = {STATE: {}, PARAM_GROUPS: []}
    params = lambda: (p for o in optims for g in o.param_groups for p in g[PARAMS])  # noqa: E731
    for optim in optims:
        with failure_reaches_the_gather(info, params):
            osd = _fqn_keyed(model, optim, info)
        if osd is None:
            continue
        combined[STATE].update(osd[STATE])
        combined[PARAM_GROUPS].extend(osd[PARAM_GROUPS])
    if info.flatten_optimizer_state_dict:
        combined = flatten_optim(combined)
    return full_or_offload(
        combined,
        info,
        lambda: storage_ptrs([o.state for o in optims]) | storage_ptrs(list(info.fqns_of)),
    )


def flatten_optim(osd: dict[str, Any]) -> dict[str, Any]:
    """``{"state": {fqn: {k: v}}, "param_groups": [...]}`` -> one flat dict.

    Keys become ``state.<fqn>.<k>`` (nested state dicts recurse with dots) and
    ``param_groups.<fqn>.<hyperparameter>`` (one copy per parameter), so every entry
    names a parameter and a pipeline stage can load just the entries of its own.
    """
    flat: dict[str, Any] = {}

    def add_state(prefix: str, values: dict[Any, Any]) -> None:
        for key, value in values.items():
            path = f"{prefix}.{key}"
            if isinstance(value, dict):
                add_state(path, value)
            elif isinstance(value, (torch.Tensor, int, float)):
                flat[path] = value
            else:
                raise NotImplementedError(
                    f"flatten_optimizer_state_dict supports tensor, int, float and dict states; "
                    f"{path!r} is a {type(value).__name__}"
                )

    for fqn, values in osd[STATE].items():
        add_state(f"{STATE}.{fqn}", values)
    for group in osd[PARAM_GROUPS]:
        for fqn in group[PARAMS]:
            for key, value in group.items():
                if key != PARAMS:
                    flat[f"{PARAM_GROUPS}.{fqn}.{key}"] = value
    return flat


def _nested(flat: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Rebuild the nested dict stored under ``prefix.`` in a flat optimizer state dict."""
    out: dict[str, Any] = {}
    dotted = f"{prefix}."
    for key, value in flat.items():
        if not key.startswith(dotted):
            continue
        *heads, last = key[len(dotted) :].split(".")
        node = out
        for head in heads:
            node = node.setdefault(head, {})
        node[last] = value
    return out


def unflatten_optim(
    optim: torch.optim.Optimizer, flat: dict[str, Any], info: Info
) -> dict[str, Any]:
    """Inverse of :func:`flatten_optim` for ``optim``'s parameters (FQN keyed)."""
    state: dict[str, Any] = {}
    groups: list[dict[str, Any]] = []
    for group in optim.param_groups:
        out_group: dict[str, Any] = {PARAMS: []}
        groups.append(out_group)
        hyper_keys = [k for k in group if k != PARAMS]
        for param in group[PARAMS]:
            for fqn in _fqns_of(param, info):
                # A tied parameter is saved under one of its names only: the one whose
                # hyperparameters were written.
                if (
                    fqn in info.shared_fqns
                    and hyper_keys
                    and f"{PARAM_GROUPS}.{fqn}.{hyper_keys[0]}" not in flat
                ):
                    continue
                out_group[PARAMS].append(fqn)
                if not param.requires_grad:
                    continue
                values = state[fqn] = {}
                for name in optim.state[param]:
                    key = f"{STATE}.{fqn}.{name}"
                    values[name] = flat[key] if key in flat else _nested(flat, key)
        if not out_group[PARAMS]:
            raise ValueError(
                "cannot unflatten the optimizer state of a parameter group with no parameters"
            )
        first = out_group[PARAMS][0]
        for key in hyper_keys:
            flat_key = f"{PARAM_GROUPS}.{first}.{key}"
            if flat_key not in flat:
                raise ValueError(f"flattened optimizer state dict has no {flat_key!r}")
            out_group[key] = flat[flat_key]
            for fqn in out_group[PARAMS][1:]:
                other = flat.get(f"{PARAM_GROUPS}.{fqn}.{key}", out_group[key])
                if other != out_group[key]:
                    raise ValueError(
                        f"parameters of one parameter group must share hyperparameters, but "
                        f"{first}.{key} is {out_group[key]!r} while {fqn}.{key} is {other!r}"
                    )
    return {STATE: state, PARAM_GROUPS: groups}


def _fqns_of(param: torch.Tensor, info: Info) -> list[str]:
    fqns = info.fqns_of.get(param)
    if fqns is None:
        raise ValueError(
            f"an optimizer parameter of shape {tuple(param.shape)} is not a tensor of the model"
        )
    return fqns


def split_optim(optim: torch.optim.Optimizer, osd: dict[str, Any], info: Info) -> dict[str, Any]:
    """The part of a combined FQN-keyed state dict that belongs to ``optim``."""
    saved_state = osd[STATE]
    if saved_state and all(isinstance(k, int) for k in saved_state):
        return osd  # already positional: a plain torch.optim state dict
    saved_groups = osd[PARAM_GROUPS]
    groups_of: dict[str, list[int]] = {}
    for index, group in enumerate(saved_groups):
        for fqn in group[PARAMS]:
            groups_of.setdefault(fqn, []).append(index)

    state: dict[str, Any] = {}
    groups: list[dict[str, Any]] = []
    target_of: dict[int, int] = {}  # saved group index -> index in ``groups``
    for group in optim.param_groups:
        groups.append({PARAMS: []})
        for param in group[PARAMS]:
            for fqn in _fqns_of(param, info):
                if fqn in info.shared_fqns and fqn not in groups_of:
                    continue
                groups[-1][PARAMS].append(fqn)
                if param.requires_grad:
                    if fqn in saved_state:
                        state[fqn] = saved_state[fqn]
                    elif info.strict:
                        raise ValueError(
                            f"missing optimizer state for parameter {fqn!r}, which requires grad; "
                            "use StateDictOptions(strict=False) to load anyway"
                        )
                for index in groups_of.get(fqn, ()):
                    target_of[index] = len(groups) - 1
        if not group[PARAMS]:
            empty = [i for i, g in enumerate(saved_groups) if not g[PARAMS]]
            if len(empty) != 1:
                raise ValueError(
                    "a parameter group has no parameters; the saved state dict must then have "
                    f"exactly one such group, it has {len(empty)}"
                )
            if len(saved_groups) != len(optim.param_groups):
                raise ValueError(
                    "with an empty parameter group, several optimizers are not supported"
                )
            target_of[empty[0]] = len(groups) - 1

    for index, saved in enumerate(saved_groups):
        target = target_of.get(index)
        if target is not None:
            groups[target].update((k, v) for k, v in saved.items() if k != PARAMS)
    return {STATE: state, PARAM_GROUPS: groups}


@dataclass
class OptimLoad:
    """One optimizer's checked load, ready for :func:`run_optim_load`."""

    # FQN-keyed state dict of this optimizer ({} on ranks that only receive).
    state_dict: dict[str, Any]
    # Full loads (not FSDP1): the optimizer's own FQN-keyed state dict, which the
    # broadcast / distribute fills, and the device the data travels to.
    local: dict[str, Any] | None = None
    device: torch.device | None = None


def _state_devices(local: dict[str, Any]) -> set[torch.device]:
    """The devices of an FQN-keyed optimizer state dict's tensors; 0-dim ones (``step``)
    are left out, as optimizers keep them on the CPU whatever the parameters' device."""
    return {
        t.device
        for values in local[STATE].values()
        for t in (values.values() if isinstance(values, dict) else ())
        if isinstance(t, torch.Tensor) and t.dim() > 0
    }


def prepare_optim_load(
    model: nn.Module,
    optims: tuple[torch.optim.Optimizer, ...],
    osd: dict[str, Any],
    info: Info,
) -> tuple[list[OptimLoad], str | None]:
    """Split ``osd`` per optimizer and check it against each optimizer's state.

    Everything that would make one optimizer's load fail is found here, for all of
    them, before the first is written: a failure at the load of the second optimizer
    would leave the first loaded (and, on one rank only, the others waiting in its
    broadcast).

    Returns:
        ``(per-optimizer loads, error)``; ``error`` names every problem found.
    """
    if not info.handle_optim:
        return [], None
    is_source = not info.broadcast_from_rank0 or dist.get_rank() == 0
    if is_source and osd and not isinstance(osd, dict):
        return [], f"optim_state_dict must be a dict, got {type(osd).__name__}"
    full = info.full_state_dict and not info.fsdp_modules
    plans: list[OptimLoad] = []
    problems: list[str] = []
    for index, optim in enumerate(optims):
        init_optim_state(optim)
        found = len(problems)
        local, device = None, None
        if full:
            # Every rank, whatever it passed: a rank that failed only at the load would
            # leave the others waiting in the broadcast.
            local = _fqn_keyed(model, optim, info) or {STATE: {}, PARAM_GROUPS: []}
            device, problem = target_device(_state_devices(local), "the optimizer state is")
            if problem:
                problems.append(f"optimizer {index}: {problem}")
                continue
        if not (is_source and osd):
            plans.append(OptimLoad({}, local, device))
            continue
        try:
            if STATE in osd:
                per = split_optim(optim, osd, info)
            else:
                per = unflatten_optim(optim, osd, info)
        except (KeyError, ValueError, NotImplementedError) as exc:
            problems.append(f"optimizer {index}: {exc}")
            continue
        if len(per[PARAM_GROUPS]) != len(optim.param_groups):
            problems.append(
                f"optimizer {index}: {len(per[PARAM_GROUPS])} saved parameter groups, "
                f"the optimizer has {len(optim.param_groups)}"
            )
        if not info.fsdp_modules:
            for number, (saved, group) in enumerate(zip(per[PARAM_GROUPS], optim.param_groups)):
                given, held = len(saved[PARAMS]), len(group[PARAMS])
                # load_state_dict refuses groups of other sizes; a full load first merges
                # the saved names into the optimizer's own, one per parameter.
                if given > held or (given < held and not info.full_state_dict):
                    problems.append(
                        f"optimizer {index}: saved parameter group {number} has {given} "
                        f"parameters, the optimizer's has {held}"
                    )
            for fqn, values in per[STATE].items():
                current = (
                    optim.state.get(info.tensor_of.get(fqn), {}) if fqn in info.tensor_of else {}
                )
                if not isinstance(values, dict):
                    kind = type(values).__name__
                    problems.append(f"optimizer {index}: state of {fqn!r} is a {kind}, not a dict")
                    continue
                for name, value in values.items():
                    expected = current.get(name)
                    if isinstance(expected, torch.Tensor) and expected.dim() == 0:
                        continue  # scalars such as `step` are stored in several ways
                    problem = tensor_problem(
                        f"state.{fqn}.{name}", value, expected, check_dtype=False, owner="optimizer"
                    )
                    if problem:
                        problems.append(f"optimizer {index}: {problem}")
        if len(problems) == found:
            flat, _ = flatten_state_dict(per)
            problems += [f"optimizer {index}: {p}" for p in unloadable(flat, info)]
        plans.append(OptimLoad(per, local, device))
    if problems:
        return [], "set_optimizer_state_dict: " + "; ".join(problems)
    return plans, None


def _compile_renames(model: nn.Module, info: Info) -> dict[str, str]:
    renames: dict[str, str] = {}
    for name, _ in model.named_parameters():
        for clean, with_compile in zip(
            info.resolver.fqns(name), info.resolver.fqns(name, keep_compile=True), strict=True
        ):
            if clean != with_compile:
                renames[clean] = with_compile
    return renames


def _distribute_full(plan: OptimLoad, info: Info) -> dict[str, Any]:
    """Turn a full (or, on non-source ranks, empty) state dict into the optimizer's local one."""
    per, local, device = plan.state_dict, plan.local, plan.device
    flat, mapping = flatten_state_dict(per)
    flat_local, local_mapping = flatten_state_dict(local)
    if info.broadcast_from_rank0:
        broadcast_state_dict(flat, flat_local, device=device, bucket_bytes=BUCKET_BYTES)
    else:
        distribute_state_dict(flat, flat_local, device=device)
    # Entries the optimizer does not hold yet (e.g. state of a parameter that never had
    # a gradient) are taken as they are.
    for key, value in flat.items():
        if key not in flat_local:
            flat_local[key] = value
            local_mapping[key] = mapping[key]
    out = unflatten_state_dict(flat_local, local_mapping)
    # Flattening turns tuples (Adam's ``betas``) into lists. PyTorch loads them as lists
    # too, and code compares ``optimizer.state_dict()`` across the two: keep its types.
    for group in out[PARAM_GROUPS]:
        group.setdefault(PARAMS, [])
    return out


def _own_copies(value: Any, foreign: set[int]) -> Any:
    """``value`` with every tensor whose storage is in ``foreign`` replaced by a clone."""
    flat = flatten(value, type_check=False)
    hits = {
        leaf
        for (leaf, _), ptr in zip(flat.local_owners(), map(storage_ptr, flat.locals))
        if ptr in foreign
    }
    if not hits:
        return flat.rebuild(flat.leaves)
    return flat.rebuild([leaf.clone() if i in hits else leaf for i, leaf in enumerate(flat.leaves)])


@torch.no_grad()
def run_optim_load(
    model: nn.Module,
    optims: tuple[torch.optim.Optimizer, ...],
    plans: list[OptimLoad],
    caller_ptrs: set[int],
    info: Info,
) -> None:
    """Convert each checked per-optimizer state dict to the optimizer's layout and load it.

    ``caller_ptrs`` are the storages of the caller's tensors: the optimizer gets clones
    of those it would otherwise adopt (``Optimizer.load_state_dict`` keeps a same-device
    ``step`` tensor as is, so the caller's dict would change with every step).
    """
    if not info.handle_optim:
        return
    renames = _compile_renames(model, info) if info.fsdp_modules else {}
    for optim, plan in zip(optims, plans, strict=True):
        per = plan.state_dict
        if info.fsdp_modules:
            if per and renames:
                per = {
                    STATE: {renames.get(k, k): v for k, v in per[STATE].items()},
                    PARAM_GROUPS: [
                        {**g, PARAMS: [renames.get(k, k) for k in g[PARAMS]]}
                        for g in per[PARAM_GROUPS]
                    ],
                }
            with info.fsdp_context():
                per = FSDP.optim_state_dict_to_load(
                    model, optim, per, group=fsdp_process_group(model, info)
                )
        elif info.full_state_dict:
            per = _distribute_full(plan, info)
        foreign = caller_ptrs - storage_ptrs(optim.state)
        if foreign:
            per = {STATE: _own_copies(per[STATE], foreign), PARAM_GROUPS: per[PARAM_GROUPS]}
        state_dict_fn(optim, "load_state_dict")(per)
