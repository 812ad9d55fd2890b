"""Buckets: tensors are split into ``ceil(total / bucket_bytes)`` contiguous runs of
nearly equal bytes, so the number of bulk collectives is exactly the ceiling of the
total over the bucket size (each bucket holds at most ``bucket_bytes`` plus one
tensor)."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "PIPELINE_SLICE_BYTES",
    "buckets",
    "buckets_with_solos",
    "slice_bytes",
]

#: Default bytes per bucket: one bucket is the extra memory a gather / broadcast needs.
DEFAULT_BUCKET_BYTES = 256 << 20

#: Most bytes per pipelined exchange slice. A bucket's worth of data is exchanged in
#: slices, one asynchronous collective each, while this thread packs the next slice
#: and unpacks the previous one (two slice buffers, so at most one bucket of extra
#: memory). Small enough for the buffers to come from the allocator's reused memory
#: call after call: first-touching a fresh buffer of a bucket's size costs a page fault
#: per 4 KiB, which can take longer than broadcasting it.
PIPELINE_SLICE_BYTES = 8 << 20


def slice_bytes(bucket_bytes: int) -> int:
    """The pipelined slice size for ``bucket_bytes``: half a bucket, at most
    :data:`PIPELINE_SLICE_BYTES`."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    return max(1, min(bucket_bytes // 2, PIPELINE_SLICE_BYTES))


def buckets(costs: Sequence[int], bucket_bytes: int) -> list[range]:
    """Splits items (in order) into at most ``ceil(sum(costs) / bucket_bytes)`` runs.

    Each run holds nearly ``total / n`` bytes; an item goes to the run its midpoint
    falls in, so a run exceeds ``bucket_bytes`` by at most one item. Empty runs are
    dropped.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    n_items = len(costs)
    if n_items == 0:
        return []
    total = sum(costs)
    n = max(1, math.ceil(total / bucket_bytes))
    target = total / n if total else 1.0
    runs: list[range] = []
    start = 0
    cursor = 0
    current = 0
    for i, cost in enumerate(costs):
        b = min(n - 1, int((cursor + cost / 2) // target))
        if b != current and i > start:
            runs.append(range(start, i))
            start = i
        current = b
        cursor += cost
    runs.append(range(start, n_items))
    return runs


def buckets_with_solos(
    costs: Sequence[int], bucket_bytes: int, solo: Sequence[bool], min_solo: int
) -> list[list[int]]:
    """Buckets where big items may travel alone, still at most ``ceil(total / bucket_bytes)``.

    An item flagged in ``solo`` and costing at least ``min_solo`` gets a bucket of its
    own (its exchange then needs no buffer), biggest first, as long as the total count
    stays within the ceiling: an item of a bucket or more always fits. The other items
    are cut by :func:`buckets`, in order. Returns the shared buckets, then the solo ones
    (item indices in order in each); every rank computes the same from the same costs.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    total = sum(costs)
    limit = max(1, math.ceil(total / bucket_bytes)) if costs else 0
    candidates = sorted(
        (j for j, c in enumerate(costs) if solo[j] and c and c >= min_solo),
        key=lambda j: (-costs[j], j),
    )
    alone: set[int] = set()
    rest = total
    for j in candidates:
        if len(alone) + 1 + math.ceil((rest - costs[j]) / bucket_bytes) <= limit:
            alone.add(j)
            rest -= costs[j]
    others = [j for j in range(len(costs)) if j not in alone]
    shared = buckets([costs[j] for j in others], bucket_bytes)
    return [[others[k] for k in run] for run in shared] + [[j] for j in sorted(alone)]


