"""Model half of ``sdict_ext.state_dict``: get a model state dict, check and load one.

Loading is split in two so :mod:`sdict_ext.state_dict` can check the model *and* the
optimizer input on every rank before anything is written: :func:`prepare_model_load`
renames keys and validates (no collectives, no writes); :func:`run_model_load` moves the
data (broadcast / distribute) and calls ``load_state_dict``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor
from torch.nn.modules.module import _IncompatibleKeys

from sdict_ext.collectives.agreement import digest
from sdict_ext.host.copies import view_key
from sdict_ext.state_dict.fqn import ExtraState, iter_model_state
from sdict_ext.state_dict.gather_offload import (
    failure_reaches_the_gather,
    full_or_offload,
    model_tensors,
    storage_ptrs,
)
from sdict_ext.state_dict.load import agree_load, unloadable
from sdict_ext.state_dict.options import BUCKET_BYTES, Info, state_dict_fn
from sdict_ext.utils import broadcast_state_dict, distribute_state_dict

__all__: list[str] = []

_FLAT_PARAM = "_flat_param"


def _quoted(keys: list[str]) -> str:
    return ", ".join(f'"{k}"' for k in keys)


def _key_errors(model: nn.Module, missing: list[str], unexpected: list[str]) -> str:
    """The strict-load complaint in ``nn.Module.load_state_dict``'s words.

    Code that matches on PyTorch's message (``Missing key(s) in state_dict``) keeps
    working; the keys are the canonical FQNs the caller passed.
    """
    lines = []
    if missing:
        lines.append(f"Missing key(s) in state_dict: {_quoted(missing)}. ")
    if unexpected:
        lines.append(f"Unexpected key(s) in state_dict: {_quoted(unexpected)}. ")
    return f"Error(s) in loading state_dict for {type(model).__name__}:\n\t" + "\n\t".join(lines)


@torch.no_grad()
def get_model(model: nn.Module, info: Info) -> dict[str, Any]:
    """The model state dict keyed by canonical FQNs, gathered / offloaded per ``info``."""
    if not info.handle_model:
        return {}
    with info.fsdp_context(), failure_reaches_the_gather(info, lambda: model_tensors(info)):
        state_dict = state_dict_fn(model, "state_dict")()

    # Renamed in place (pop + re-insert, as PyTorch does) so the result keeps the type,
    # key order and ``_metadata`` of model.state_dict(); load_state_dict reads the latter.
    for key in list(state_dict):
        fqn = info.resolver.fqn(key)
        if fqn != key:
            state_dict[fqn] = state_dict.pop(key)

    if info.submodule_prefixes:
        kept: dict[str, Any] = {}
        for fqn, value in state_dict.items():
            for prefix in info.submodule_prefixes:
                if fqn.startswith(prefix):
                    kept[fqn if info.keep_submodule_prefixes else fqn[len(prefix) :]] = value
        state_dict = kept

    if info.ignore_frozen_params:
        for name, param in model.named_parameters():
            if not param.requires_grad:
                for fqn in info.resolver.fqns(name):
                    state_dict.pop(fqn, None)

    if not (info.full_state_dict or info.cpu_offload):
        return state_dict
    tied = _one_value_per_tied_tensor(state_dict, info)
    result = full_or_offload(state_dict, info, lambda: storage_ptrs(list(info.fqns_of)))
    # PyTorch returns a value object per key: where the tied value came back as one
    # object (nothing moved it, or one offloaded copy stands for the live storage
    # that every name shares), each other name gets its own alias of that storage.
    # What the gather or the offload copied is already separate per key, as PyTorch's is.
    for fqn, first in tied:
        if fqn in result and result[fqn] is result[first]:
            result[fqn] = result[fqn].detach()
    return result


def _one_value_per_tied_tensor(state_dict: dict[str, Any], info: Info) -> list[tuple[str, str]]:
    """Give every FQN of a tied tensor the same value object, in place.

    ``state_dict()`` returns a separate detached view per name; as one object, the
    gather and offload that follow move the tensor once (and hand each key its own
    result). DTensors of one parameter are joined by their layout, never by memory
    addresses, so all ranks join alike (a rank's shard may be empty) and the gather's
    collectives match. Plain tensors only where they are views of the very same
    memory: FSDP1's full state dict has a separate tensor per name, and a flat
    parameter's FQNs also name untied parameters.

    Returns:
        ``(fqn, first fqn)`` for every key now holding its first name's value object.
    """
    tied: list[tuple[str, str]] = []
    if not info.shared_fqns:
        return tied  # no tied tensor: nothing to walk
    for fqns in info.fqns_of.values():
        if len(fqns) < 2:
            continue
        first_of: dict[tuple[Any, ...], str] = {}
        for fqn in fqns:
            value = state_dict.get(fqn)
            key = _memory_key(value)
            if key is None:
                continue
            first = first_of.setdefault(key, fqn)
            if first != fqn:
                state_dict[fqn] = state_dict[first]
                tied.append((fqn, first))
    return tied


def _memory_key(value: Any) -> tuple[Any, ...] | None:
    """What two values of one parameter's FQNs must share to be joined; None: never."""
    if isinstance(value, DTensor):
        return (value.device_mesh, value.placements, tuple(value.shape), value.dtype)
    if type(value) is torch.Tensor and value.device.type != "meta":
        return view_key(value)
    return None  # ShardedTensors (FSDP1's, one per name), meta tensors, other values


@dataclass
class ModelLoad:
    """A checked model load, ready for :func:`run_model_load`."""

    state_dict: dict[str, Any]
    local: dict[str, Any]
    # Raw key -> the canonical FQN the caller knows it by (for messages).
    clean_of: dict[str, str] = field(default_factory=dict)
    # Full / broadcast loads: the device the data travels to, and whether the model is
    # on the meta device (filled by assigning the received tensors).
    device: torch.device | None = None
    assign: bool = False
    # A rank other than rank 0 (broadcast_from_rank0) that cannot take the model load:
    # raised only if rank 0 loads the model (see agree_with_source).
    problem: str | None = None


def tensor_problem(
    key: str, given: Any, expected: Any, *, check_dtype: bool, owner: str = "model"
) -> str | None:
    """Describe a shape (and optionally dtype) mismatch of two tensors; None if they fit.

    Sizes are global (a DTensor's full shape), so sharded and full inputs are both checked.
    """
    if not isinstance(given, torch.Tensor) or not isinstance(expected, torch.Tensor):
        return None
    given_shape, expected_shape = tuple(given.size()), tuple(expected.size())
    if given_shape != expected_shape:
        return f"{key!r}: shape {given_shape} does not match the {owner}'s {expected_shape}"
    if check_dtype and given.dtype != expected.dtype:
        return f"{key!r}: dtype {given.dtype} does not match the {owner}'s {expected.dtype}"
    return None


def prepare_model_load(
    model: nn.Module, state_dict: dict[str, Any], info: Info
) -> tuple[ModelLoad | None, str | None]:
    """Rename ``state_dict`` to the model's raw keys and check it; writes nothing.

    Returns:
        ``(plan, error)``: ``plan`` is None when there is nothing to load; ``error`` names
        every missing / unexpected key (strict) and every shape or dtype mismatch.
    """
    if not info.handle_model or (not state_dict and not info.broadcast_from_rank0):
        return None, None
    if not isinstance(state_dict, dict):
        return None, f"model_state_dict must be a dict, got {type(state_dict).__name__}"
    is_source = not info.broadcast_from_rank0 or dist.get_rank() == 0
    # Our own copy: PyTorch renames keys in the caller's dict and replaces its values.
    state_dict = dict(state_dict) if is_source else {}
    resolver = info.resolver
    local: dict[str, Any] = {}
    clean_of: dict[str, str] = {}
    for name, value in iter_model_state(model, info.dsd_fqn_modifiers):
        clean = resolver.fqns(name)
        raw = resolver.fqns(name, keep_ddp=True, keep_compile=True)
        for fqn, raw_fqn in zip(clean, raw, strict=True):
            if is_source and fqn != raw_fqn and fqn in state_dict:
                state_dict[raw_fqn] = state_dict.pop(fqn)
            local[raw_fqn] = value
            clean_of[raw_fqn] = fqn
    device, assign = None, False
    if info.broadcast_from_rank0 or info.full_state_dict:
        # Decided here, not at the load: a rank that failed only then would leave rank 0
        # waiting in the broadcast, with the optimizers already loaded.
        devices = {v.device for v in local.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
        # A model built on the meta device (e.g. LoRA-style partial materialisation) is
        # filled by assigning the received tensors instead of copying into them.
        if torch.device("meta") in devices:
            devices.discard(torch.device("meta"))
            assign = True
        device, problem = target_device(devices, "the model's tensors are")
        if problem:
            if not is_source:
                return ModelLoad(state_dict, local, clean_of, problem=problem), None
            return None, f"set_model_state_dict: {problem}"
    if not is_source:
        return ModelLoad(state_dict, local, clean_of, device, assign), None

    problems: list[str] = []
    for key in state_dict:
        if _FLAT_PARAM in key:
            problems.append(
                f"{key!r} contains {_FLAT_PARAM}: pass the root module, not an FSDP submodule"
            )
    if info.strict:
        missing = [clean_of[k] for k in local if k not in state_dict]
        unexpected = [k for k in state_dict if k not in local]
        if missing or unexpected:
            problems.append(_key_errors(model, missing, unexpected))
    # FSDP1's local tensors are flat-parameter shards whose shapes say nothing about the
    # original parameters; FSDP checks those itself when it unflattens.
    if not info.fsdp_modules:
        for key, given in state_dict.items():
            expected = local.get(key)
            if expected is None or isinstance(expected, ExtraState):
                continue
            problem = tensor_problem(clean_of.get(key, key), given, expected, check_dtype=True)
            if problem:
                problems.append(problem)
    if not problems:
        problems = unloadable(state_dict, info, lambda key: clean_of.get(key, key))
    if problems:
        return None, "set_model_state_dict: " + "; ".join(problems)
    return ModelLoad(state_dict, local, clean_of, device, assign), None


def _facts(value: Any, info: Info) -> Any:
    # FSDP1's local tensors are flat-parameter shards: only their keys say anything.
    if isinstance(value, torch.Tensor) and not info.fsdp_modules:
        return tuple(value.shape), value.dtype
    return None


def model_signature(plan: ModelLoad | None, info: Info) -> int:
    """A digest of the model's keys, global shapes and dtypes (0: nothing to load).

    With ``broadcast_from_rank0`` only rank 0 checks the input against its model; a
    rank whose model has the same signature would find the same, so only ranks whose
    signature differs from rank 0's need :func:`agree_with_source`. A rank's own
    ``problem`` is part of its signature, so it reaches that check, and only when rank 0
    loads the model.
    """
    if plan is None:
        return 0
    facts = sorted((k, repr(_facts(v, info))) for k, v in plan.local.items())
    return digest([*facts, plan.problem] if plan.problem else facts)


def agree_with_source(model: nn.Module, plan: ModelLoad | None, info: Info) -> None:
    """Checks every rank's model against rank 0's input; raises on every rank if any
    fails, before anything is written (all ranks must call it).

    Rank 0 has checked its input against its own model; here it shares the input's
    keys, shapes and dtypes, and each other rank checks them as a strict load on that
    rank fails in PyTorch: its model's keys the input lacks (``strict``), and shape or
    dtype mismatches. Keys only the input has are dropped on such a rank, as PyTorch's
    broadcast drops them.
    """
    table: list[Any] = [None]
    if dist.get_rank() == 0 and plan is not None:
        table[0] = {k: _facts(v, info) for k, v in plan.state_dict.items()}
    dist.broadcast_object_list(table, src=0)
    problems: list[str] = []
    if dist.get_rank() != 0 and plan is not None and plan.problem:
        problems.append(plan.problem)
    if dist.get_rank() != 0 and plan is not None and table[0] is not None:
        given = table[0]
        if info.strict:
            missing = [plan.clean_of[k] for k in plan.local if k not in given]
            if missing:
                problems.append(_key_errors(model, missing, []))
        for key, facts in given.items():
            expected = plan.local.get(key)
            if facts is None or expected is None or isinstance(expected, ExtraState):
                continue
            shape, dtype = facts
            problem = tensor_problem(
                plan.clean_of.get(key, key), torch.empty(shape, dtype=dtype, device="meta"),
                expected, check_dtype=True,
            )
            if problem:
                problems.append(problem)
    agree_load("set_model_state_dict: " + "; ".join(problems) if problems else None, ())


def collective_device() -> torch.device:
    if "nccl" in str(dist.get_backend()) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def target_device(
    devices: set[torch.device], what: str
) -> tuple[torch.device | None, str | None]:
    """The device a full load's data travels to, from the devices of the local tensors.

    One device: that one; none: :func:`collective_device`. Several: ``(None, problem)``
    naming them (``what``: whose tensors), as the model's and each optimizer's check
    must report it before anything loads.
    """
    if len(devices) > 1:
        return None, f"{what} on several devices {sorted(map(str, devices))}"
    return (next(iter(devices)) if devices else collective_device()), None


@torch.no_grad()
def run_model_load(model: nn.Module, plan: ModelLoad | None, info: Info) -> _IncompatibleKeys:
    """Move the checked data to the model's tensors and call ``load_state_dict``."""
    if plan is None:
        return _IncompatibleKeys([], [])
    state_dict, local, device, assign = plan.state_dict, plan.local, plan.device, plan.assign
    if info.broadcast_from_rank0 or info.full_state_dict:
        if info.broadcast_from_rank0:
            broadcast_state_dict(
                state_dict,
                local,
                device=device,
                strict=info.strict,
                cpu_offload=info.cpu_offload,
                bucket_bytes=BUCKET_BYTES,
            )
        else:
            distribute_state_dict(state_dict, local, device=device)
        # Extra-state keys are in ``local`` only so the broadcast delivers their values;
        # one that received nothing must not be loaded as our placeholder.
        state_dict.update((k, v) for k, v in local.items() if not isinstance(v, ExtraState))
    with info.fsdp_context():
        return state_dict_fn(model, "load_state_dict")(
            state_dict=state_dict, strict=info.strict, assign=assign
        )
