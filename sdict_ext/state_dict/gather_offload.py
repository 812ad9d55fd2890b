"""What ``get_*`` return: gathered (``full_state_dict``), offloaded (``cpu_offload``) and
never sharing storage with the live model or optimizer.

Also the storage look-ups that loads use to keep the caller's tensors out of the
optimizer (:func:`storage_ptrs`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor

from sdict_ext.collectives import agreement as _collectives
from sdict_ext.collectives.boxes import dtensor_of
from sdict_ext.ops import batched_copy_
from sdict_ext.state_dict.options import BUCKET_BYTES, Info, is_multi_rank
from sdict_ext.tree import LEAF_DTENSOR, LEAF_SHARDED, LEAF_TENSOR, flatten
from sdict_ext.utils import gather_state_dict, offload_state_dict_to_cpu

__all__ = [
    "failure_reaches_the_gather",
    "full_or_offload",
    "model_tensors",
    "storage_ptr",
    "storage_ptrs",
]


def _has_sharded(obj: Any) -> bool:
    kinds = flatten(obj, type_check=False).kinds
    return LEAF_DTENSOR in kinds or LEAF_SHARDED in kinds


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
            if storage_ptr(local) in live:
                copy = torch.empty_like(local)
                dsts.append(copy)
                srcs.append(local)
                leaves[i] = dtensor_of(copy, value)
        elif kind == LEAF_TENSOR and storage_ptr(value) in live:
            leaves[i] = torch.empty_like(value)
            dsts.append(leaves[i])
            srcs.append(value.detach())
    if dsts:
        batched_copy_(dsts, srcs)
    return flat.rebuild(leaves)


def storage_ptr(t: torch.Tensor) -> int | None:
    """The data pointer of ``t``'s storage (None for a meta tensor or one without bytes)."""
    if t.device.type == "meta":
        return None
    storage = t.untyped_storage()
    return storage.data_ptr() if storage.nbytes() else None


def storage_ptrs(obj: Any) -> set[int]:
    """Data pointers of the storages of every tensor (DTensor: its local shard) in ``obj``."""
    ptrs = set(map(storage_ptr, flatten(obj, type_check=False).locals))
    ptrs.discard(None)
    return ptrs
