"""Checks that every load runs before anything is written, and their agreement.

A load into a distributed model must succeed or fail on every rank together: each
rank checks its input (:func:`unloadable`, :func:`meta_problems`), then
:func:`agree_load` exchanges the verdicts (and small per-rank flags) before the first
collective that moves data.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from sdict_ext.collectives import agreement as _collectives
from sdict_ext.collectives.broadcast.meta import check_source
from sdict_ext.state_dict.options import Info

__all__ = ["agree_load", "meta_problems", "unloadable"]


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
