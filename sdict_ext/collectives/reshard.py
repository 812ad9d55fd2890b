"""``reshard_state_dict``: a sharded state dict moved into another layout, never gathered.

(Interface committed first so tests and bench can be written against it; the
implementation follows in the next commit.)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from sdict_ext.collectives.buckets import DEFAULT_BUCKET_BYTES

__all__ = ["ReshardStats", "last_reshard_stats", "reshard_state_dict"]


class ReshardStats(dict):
    """What this process's last :func:`reshard_state_dict` call did (a dict)."""


_LAST = ReshardStats()


def last_reshard_stats() -> ReshardStats:
    return ReshardStats(_LAST)


def reshard_state_dict(
    src_state_dict: Any,
    dst_state_dict: Any,
    pg: dist.ProcessGroup | None = None,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    device: torch.device | str | None = None,
) -> Any:
    raise NotImplementedError("reshard_state_dict: implementation in progress")
