"""Shared plumbing of ``sdict_ext.state_dict``: options, per-call info, collectives helpers.

Everything here is private; :mod:`sdict_ext.state_dict` is the public surface.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint.state_dict as _torch_sd
import torch.nn as nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint.state_dict import StateDictOptions as TorchStateDictOptions
from torch.distributed.fsdp import (
    FullOptimStateDictConfig,
    FullStateDictConfig,
    ShardedOptimStateDictConfig,
    ShardedStateDictConfig,
    ShardingStrategy,
    StateDictType,
)
from torch.distributed.fsdp import (
    FullyShardedDataParallel as FSDP,
)
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from sdict_ext.collectives import agreement as _collectives
from sdict_ext.collectives.boxes import dtensor_of
from sdict_ext.collectives.broadcast.meta import check_source
from sdict_ext.ops import batched_copy_
from sdict_ext.state_dict.fqn import FqnResolver, param_fqn_maps
from sdict_ext.tree import LEAF_DTENSOR, LEAF_TENSOR, flatten
from sdict_ext.utils import gather_state_dict, offload_state_dict_to_cpu

__all__: list[str] = []

STATE = "state"
PARAM_GROUPS = "param_groups"
PARAMS = "params"

# FSDP1 strategies whose process group is a (shard, replicate) pair: FSDP picks the groups
# itself when ``group=None`` is passed to its optimizer state-dict APIs.
_HYBRID = {ShardingStrategy.HYBRID_SHARD, ShardingStrategy._HYBRID_SHARD_ZERO2}

# Bytes per bucket of the gathers and broadcasts that get / set run. One bucket is the
# extra host memory beyond the result, and PyTorch, moving one tensor at a time, needs
# about one tensor: the utils' 256 MiB default would hold a whole small model twice
# (measured on the FSDP2 transformer of bench/suites/state_dict.py, 2 gloo ranks:
# 256 MiB: +60 MiB over the result and no faster; 8 MiB: +8 MiB; 4 MiB: slower).
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


def _fsdp_runs_on_cpu(fsdp_modules: list[nn.Module]) -> bool:
    return any(getattr(m, "compute_device", None) == torch.device("cpu") for m in fsdp_modules)


def _fsdp_context_factory(
    model: nn.Module, fsdp_modules: list[nn.Module], options: StateDictOptions
) -> Callable[[], contextlib.AbstractContextManager]:
    if options.full_state_dict:
        # When the compute device already is the CPU, FSDP1's own CPU offload of a full
        # state dict returns tensors that still point into freed unsharded buffers
        # (PyTorch 2.13: the model state dict segfaults, optimizer states come back with
        # garbage values). There the tensors are on the CPU anyway, so we ask FSDP for
        # rank-0-only results without its offload; our full_or_offload copies them.
        fsdp_offload = options.cpu_offload and not _fsdp_runs_on_cpu(fsdp_modules)
        state_dict_config: Any = FullStateDictConfig(
            offload_to_cpu=fsdp_offload, rank0_only=options.cpu_offload
        )
        optim_config: Any = FullOptimStateDictConfig(
            offload_to_cpu=fsdp_offload,
            rank0_only=options.cpu_offload or options.broadcast_from_rank0,
        )
        state_dict_type = StateDictType.FULL_STATE_DICT
    else:
        state_dict_config = ShardedStateDictConfig(offload_to_cpu=options.cpu_offload)
        optim_config = ShardedOptimStateDictConfig(offload_to_cpu=options.cpu_offload)
        state_dict_type = StateDictType.SHARDED_STATE_DICT

    @contextlib.contextmanager
    def context() -> Iterator[None]:
        with warnings.catch_warnings():
            # FSDP.state_dict_type warns that it is deprecated; it is still FSDP1's only API.
            warnings.filterwarnings(
                "ignore", message="FSDP.state_dict_type", category=FutureWarning
            )
            with FSDP.state_dict_type(model, state_dict_type, state_dict_config, optim_config):
                yield

    return context


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
        _fsdp_context_factory(model, fsdp_modules, options)
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


def fsdp_process_group(model: nn.Module, info: Info) -> dist.ProcessGroup | None:
    """The group FSDP1's optimizer state-dict APIs should use (None: FSDP decides)."""
    module = (
        model if isinstance(model, FSDP) else (info.fsdp_modules[0] if info.fsdp_modules else None)
    )
    if module is None or module.sharding_strategy in _HYBRID:
        return None
    group = module.process_group
    return None if isinstance(group, tuple) else group


def _has_sharded(obj: Any) -> bool:
    if isinstance(obj, (DTensor, ShardedTensor)):
        return True
    if isinstance(obj, dict):
        return any(_has_sharded(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_has_sharded(v) for v in obj)
    return False


def full_or_offload(
    state_dict: dict[str, Any], info: Info, live: Callable[[], set[int]]
) -> dict[str, Any]:
    """Gather and/or offload a state dict as ``full_state_dict`` / ``cpu_offload`` ask.

    Args:
        state_dict: the state dict as the model / optimizer returned it.
        info: the call's options.
        live: storages of the live model / optimizer tensors; an offloaded result that
            shares one is replaced by a copy (offloading a CPU tensor is a no-op, and
            PyTorch returns the live tensor, whose value then changes with training).
    """
    if not (info.full_state_dict or info.cpu_offload):
        return state_dict
    rank0_only = info.full_state_dict and info.cpu_offload and dist.is_initialized()
    ranks_only = (0,) if rank0_only else ()
    if info.full_state_dict and _has_sharded(state_dict):
        result = gather_state_dict(
            state_dict,
            cpu_offload=info.cpu_offload,
            ranks_only=ranks_only,
            bucket_bytes=BUCKET_BYTES,
        )
    elif info.cpu_offload:
        # Nothing to gather: a purely local offload, with no collective, so a rank may
        # call this alone as it may with PyTorch.
        result = offload_state_dict_to_cpu(state_dict, ranks_only=ranks_only)
    else:
        result = state_dict
    if info.cpu_offload and result:
        result = _unshare(result, live())
    return result


@contextlib.contextmanager
def failure_reaches_the_gather(info: Info, tensors: Callable[[], Iterable[Any]]) -> Iterator[None]:
    """Raises an error of the body (``state_dict()``) on every rank at once.

    With ``full_state_dict`` the other ranks take their state dicts into
    :func:`gather_state_dict`, whose first collective is its agreement: a rank whose
    ``state_dict()`` raised would leave them waiting there until the process group
    times out. That rank joins the agreement with its error instead, so the others
    raise :class:`RankFailure` naming it. ``tensors``: the tensors the state dict would
    hold; only where one is sharded do the others gather (else they run no collective,
    and this rank just raises).
    """
    try:
        yield
    except Exception as exc:
        if (
            info.full_state_dict
            and is_multi_rank()
            and any(isinstance(t, (DTensor, ShardedTensor)) for t in tensors())
        ):
            group = dist.distributed_c10d._get_default_group()
            _collectives.agree(group, exc, what="get_state_dict")  # raises exc here
        raise


def model_tensors(info: Info) -> Iterator[torch.Tensor]:
    """The model tensors ``get_model_state_dict`` keeps under ``info``'s filters."""
    prefixes = info.submodule_prefixes
    for tensor, fqns in info.fqns_of.items():
        frozen = isinstance(tensor, nn.Parameter) and not tensor.requires_grad
        if (info.ignore_frozen_params and frozen) or (
            prefixes and not any(f.startswith(p) for f in fqns for p in prefixes)
        ):
            continue
        yield tensor


def _unshare(obj: Any, live: set[int]) -> Any:
    """``obj`` with every tensor whose storage is in ``live`` replaced by a fresh copy.

    A tensor at several places (a tied weight) gets one copy, standing at all of them.
    """
    flat = flatten(obj, type_check=False)
    leaves = list(flat.leaves)
    dsts: list[torch.Tensor] = []
    srcs: list[torch.Tensor] = []
    first: dict[int, int] = {}
    for i, kind in enumerate(flat.kinds):
        value = leaves[i]
        seen = first.setdefault(id(value), i) if kind in (LEAF_DTENSOR, LEAF_TENSOR) else i
        if seen != i:
            leaves[i] = leaves[seen]
        elif kind == LEAF_DTENSOR:
            local = value.to_local()
            if _storage_ptr(local) in live:
                copy = torch.empty_like(local)
                dsts.append(copy)
                srcs.append(local)
                leaves[i] = dtensor_of(copy, value)
        elif kind == LEAF_TENSOR and _storage_ptr(value) in live:
            leaves[i] = torch.empty_like(value)
            dsts.append(leaves[i])
            srcs.append(value.detach())
    if dsts:
        batched_copy_(dsts, srcs)
    return flat.rebuild(leaves)


def is_multi_rank() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def agree_load(error: str | None, flags: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Raise on every rank if any rank found an error; else return every rank's ``flags``.

    Called before the first collective of a load, so a rank whose input is bad fails on
    all ranks instead of leaving the others blocked in a collective (and before anything
    is written, so a failed load changes nothing anywhere). Every rank raises the same
    message. Only for multi-rank groups. ``flags``: small integers (bools, digests).
    """
    table = _collectives.agree(
        dist.distributed_c10d._get_default_group(), error, what="state dict load",
        share=[int(f) for f in flags], share_len=len(flags), everyone_blamed=True,
        blame=lambda failures: RuntimeError(
            "state dict load rejected, nothing was loaded:\n"
            + "\n".join(f"rank {r}: {e}" for r, e in sorted(failures.items()))
        ),
    )
    return [tuple(row) for row in table.tolist()]


def unloadable(
    state_dict: dict[str, Any], info: Info, name: Callable[[str], str] = str
) -> list[str]:
    """What the broadcast would refuse in rank 0's flat source, or (other loads) a meta
    tensor: found before the model or any optimizer loads. ``name`` as for
    :func:`meta_problems`."""
    if not info.broadcast_from_rank0:
        return meta_problems(state_dict, name)
    try:
        check_source(state_dict)
    except ValueError as exc:
        return [str(exc)]
    return []


def meta_problems(state_dict: dict[str, Any], name: Callable[[str], str] = str) -> list[str]:
    """The keys of a state dict to load whose tensor is on the meta device, as messages.

    No load can copy out of one; found only at the load, it would fail after the other
    part (model or optimizers) was loaded. ``name``: the key as the caller knows it.
    """
    return [
        f"{name(key)!r} is a meta tensor (it has no data); a state dict to load must hold "
        "tensors with data (materialise it first)"
        for key, value in state_dict.items()
        if isinstance(value, torch.Tensor) and value.is_meta
    ]


def _storage_ptr(t: torch.Tensor) -> int | None:
    if t.device.type == "meta":
        return None
    storage = t.untyped_storage()
    return storage.data_ptr() if storage.nbytes() else None


def storage_ptrs(obj: Any) -> set[int]:
    """Data pointers of the storages of every tensor (DTensor: its local shard) in ``obj``."""
    ptrs: set[int] = set()

    def visit(value: Any) -> None:
        if isinstance(value, DTensor):
            value = value.to_local()
        if isinstance(value, ShardedTensor):
            for shard in value.local_shards():
                visit(shard.tensor)
        elif isinstance(value, torch.Tensor):
            ptrs.add(_storage_ptr(value))
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)

    visit(obj)
    ptrs.discard(None)
    return ptrs
