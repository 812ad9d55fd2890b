"""The options of ``sdict_ext.state_dict`` and what one call derives from them.

:class:`StateDictOptions` (the public options, PyTorch's fields), :class:`Info` (the
options plus the model's FQN maps, FSDP modules and context, built once per call by
:func:`build_info`), and the small helpers every get / set path shares. Everything
but ``StateDictOptions`` is private; :mod:`sdict_ext.state_dict` is the public surface.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint.state_dict as _torch_sd
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions as TorchStateDictOptions
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from sdict_ext.state_dict.fqn import FqnResolver, param_fqn_maps
from sdict_ext.state_dict.fsdp import fsdp_context_factory

__all__ = ["StateDictOptions"]

STATE = "state"
PARAM_GROUPS = "param_groups"
PARAMS = "params"

# Bytes per bucket of the gathers and broadcasts that get / set run. One bucket is the
# extra host memory beyond the result, and PyTorch, moving one tensor at a time, needs
# about one tensor: the utils' 256 MiB default would hold a whole small model twice and
# be no faster, while much smaller buckets make the exchange slower (the sweep is in
# BENCHMARKS.md).
BUCKET_BYTES = 8 << 20

# The ``state_dict`` / ``load_state_dict`` replacements installed by the patch_* functions:
# when we meet one we call the class's original method instead (else we recurse). It is
# PyTorch's own registry, so PyTorch's get/set see through our patches and we see through
# its ``_patch_*_state_dict`` ones (a torch without it gets a set of ours).
PATCHED: set[Callable[..., Any]] = getattr(_torch_sd, "_patched_state_dict", set())


@dataclass
class StateDictOptions:
    """How the get_* / set_* functions treat state dicts (same fields as PyTorch's).

    Attributes:
        full_state_dict: gather every DTensor / ShardedTensor into a plain full tensor
            on get; on set, the given state dict holds full tensors.
        cpu_offload: return CPU tensors. With ``full_state_dict`` only rank 0 gets the
            tensors and every other rank gets an empty dict, so the host holds one copy.
            Offloaded results are always fresh copies, never the live parameters or
            optimizer state (PyTorch returns live CPU tensors here).
        ignore_frozen_params: leave out parameters with ``requires_grad=False``.
        keep_submodule_prefixes: with ``submodules``, keep the submodule's prefix in keys.
        strict: the ``strict`` of ``load_state_dict``; missing / unexpected keys raise
            before anything is loaded.
        broadcast_from_rank0: on set, only rank 0 needs the full state dict; other ranks
            may pass ``{}`` and receive straight into their shards. Needs
            ``full_state_dict``.
        flatten_optimizer_state_dict: return the optimizer state dict as one flat dict
            (``state.<fqn>.<name>`` and ``param_groups.<fqn>.<key>``), so it can be resharded
            across pipeline stages.
        dsd_fqn_modifiers: name of a module method returning ``{name: attribute}`` path
            components that the module's state-dict hooks drop from keys.
    """

    full_state_dict: bool = False
    cpu_offload: bool = False
    ignore_frozen_params: bool = False
    keep_submodule_prefixes: bool = True
    strict: bool = True
    broadcast_from_rank0: bool = False
    flatten_optimizer_state_dict: bool = False
    dsd_fqn_modifiers: str = "_fqn_modifiers"


StateDictOptions.__module__ = "sdict_ext.state_dict"
_OPTION_FIELDS = tuple(f.name for f in dataclasses.fields(StateDictOptions))


@dataclass
class Info(StateDictOptions):
    """The options plus everything derived from the model once per call."""

    resolver: FqnResolver | None = None
    fqns_of: dict[torch.Tensor, list[str]] = field(default_factory=dict)
    tensor_of: dict[str, torch.Tensor] = field(default_factory=dict)
    shared_fqns: set[str] = field(default_factory=set)
    submodule_prefixes: set[str] = field(default_factory=set)
    handle_model: bool = True
    handle_optim: bool = True
    fsdp_modules: list[nn.Module] = field(default_factory=list)
    fsdp_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    distributed: bool = False  # loads must agree across ranks (see build_info)


def as_optimizers(optimizers: Any) -> tuple[torch.optim.Optimizer, ...]:
    """Normalise one optimizer or an iterable of them to a tuple, checking the types."""
    optims = (optimizers,) if isinstance(optimizers, torch.optim.Optimizer) else tuple(optimizers)
    for i, optim in enumerate(optims):
        if not isinstance(optim, torch.optim.Optimizer):
            raise TypeError(
                f"optimizers[{i}] is a {type(optim).__name__}, not a torch.optim.Optimizer"
            )
    return optims


def state_dict_fn(obj: Any, api: str) -> Callable[..., Any]:
    """``obj.<api>``, or the class's original method when ``obj`` was patched by us."""
    call = getattr(obj, api)
    if call in PATCHED:
        return functools.partial(getattr(type(obj), api), obj)
    return call


def build_info(
    model: nn.Module,
    optims: tuple[torch.optim.Optimizer, ...],
    *,
    optim_only: bool,
    submodules: set[nn.Module] | None = None,
    options: StateDictOptions | None = None,
) -> Info:
    """Check the arguments and derive the per-call :class:`Info` (no collectives)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if submodules:
        warnings.warn(
            "Getting submodules only model/optim state_dict is deprecated (as in PyTorch); "
            "filter the returned state_dict instead.",
            FutureWarning,
            stacklevel=3,
        )
    if optim_only and not optims:
        raise RuntimeError("Optimizers are not passed in but optim_only is set to True.")
    options = options or StateDictOptions()
    # PyTorch's own options class is accepted too, so a half-migrated caller still works.
    if not isinstance(options, (StateDictOptions, TorchStateDictOptions)):
        raise TypeError(f"options must be a StateDictOptions, got {type(options).__name__}")
    fields = {name: getattr(options, name) for name in _OPTION_FIELDS}
    if options.broadcast_from_rank0 and not options.full_state_dict:
        raise ValueError("full_state_dict must be True when broadcast_from_rank0 is True.")

    resolver = FqnResolver(model, options.dsd_fqn_modifiers)
    fqns_of, tensor_of, shared = param_fqn_maps(model, resolver, options.dsd_fqn_modifiers)

    prefixes: set[str] = set()
    if submodules:
        wanted = {id(m) for m in submodules}
        for name, module in model.named_modules():
            if id(module) in wanted:
                prefixes.add(f"{resolver.fqn(name)}.")

    fsdp_modules = list(FSDP.fsdp_modules(model))
    context = (
        fsdp_context_factory(model, fsdp_modules, options)
        if fsdp_modules
        else contextlib.nullcontext
    )
    # Loads into these models must succeed or fail on all ranks together: FSDP and DTensor
    # loads run collectives, and DDP replicas that load different things silently diverge.
    distributed = (
        bool(fsdp_modules)
        or any(isinstance(t, DTensor) for t in fqns_of)
        or any(isinstance(m, DDP) for m in model.modules())
    )
    return Info(
        **fields,
        resolver=resolver,
        fqns_of=fqns_of,
        tensor_of=tensor_of,
        shared_fqns=shared,
        submodule_prefixes=prefixes,
        handle_model=not optim_only,
        handle_optim=len(optims) > 0,
        fsdp_modules=fsdp_modules,
        fsdp_context=context,
        distributed=distributed,
    )


def is_multi_rank() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
