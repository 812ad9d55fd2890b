"""``distribute_state_dict``: a full state dict every rank holds into a sharded one.

It needs no communication at all: every rank has the full state dict, so each slices
its own box out locally, with one batched copy per device pair (PyTorch scatters each
tensor from rank 0 with ``distribute_tensor``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from sdict_ext import ops
from sdict_ext._gc import gc_paused
from sdict_ext.collectives.boxes import BoxCache, dtensor_of, is_plain_placement, local_box
from sdict_ext.host.copies import batched_copy_pairs, indexed_device

__all__ = ["distribute_state_dict"]


@gc_paused()
def distribute_state_dict(
    full_state_dict: dict[str, Any],
    local_state_dict: dict[str, Any],
    device: torch.device,
    pg: dist.ProcessGroup | None = None,
) -> None:
    """Loads a full state dict that every rank holds into the local one, in place.

    Counterpart of ``_distribute_state_dict``.

    Same results as PyTorch: non-tensor values and 0-dim tensors (moved to the CPU) are
    assigned; a DTensor local value is replaced by a new DTensor of the same mesh and
    placements holding this rank's box; any other present local value is replaced by
    the full tensor moved to ``device`` (the same tensor when it is already there).

    Difference: each rank slices its box out of its own copy, with one batched copy per
    device pair and no communication, where PyTorch's ``distribute_tensor`` scatters
    every tensor from rank 0; the full state dicts must therefore be equal on every
    rank, as the function's contract already says. ``Partial`` and ``_StridedShard``
    placements still go through ``distribute_tensor``.

    Args:
        full_state_dict: the flat full state dict (plain tensors), on every rank.
        local_state_dict: this rank's state dict, updated in place.
        device: where new tensors are placed.
        pg: unused (the DTensors carry their meshes); kept for the signature.
    """
    del pg
    device = indexed_device(device)
    rank = dist.get_rank()
    boxes: BoxCache = {}
    results: dict[str, Any] = {}
    dsts: list[torch.Tensor] = []
    sliced: list[tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]] = []
    # A tied weight (one full tensor, one local DTensor, at several keys) is sliced once.
    done: dict[tuple[int, int], str] = {}
    for key, value in full_state_dict.items():
        if not torch.is_tensor(value):
            results[key] = value
            continue
        if value.dim() == 0:
            results[key] = value.cpu()
            continue
        local = local_state_dict.get(key)
        if local is None:
            continue
        earlier = done.setdefault((id(value), id(local)), key)
        if earlier != key:
            if earlier in results:
                results[key] = results[earlier]
            continue
        if not isinstance(local, DTensor):
            results[key] = value.detach().to(device)
            continue
        mesh, placements = local.device_mesh, local.placements
        if not is_plain_placement(placements):
            results[key] = distribute_tensor(value.detach().to(device), mesh, placements)
            continue
        box = local_box(tuple(value.shape), local, rank, boxes)
        if box is None:
            continue  # this rank is not part of the DTensor's mesh
        shape, start = box
        new = torch.empty(shape, dtype=value.dtype, device=device)
        dsts.append(new)
        sliced.append((value.detach(), start, shape))
        results[key] = dtensor_of(new, local, value.shape, value.stride())
    srcs = ops.box_views(*zip(*sliced)) if sliced else []
    batched_copy_pairs(dsts, srcs)
    local_state_dict.update(results)
