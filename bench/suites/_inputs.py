"""Input builders shared by the suites: many small tensors, big tensors, size labels.

Inputs are built once per case (outside every timing) from a fixed seed, so the same
command builds the same workload on every machine.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "DTYPE_MIX",
    "fmt_bytes",
    "make_tensors",
    "pinned_ok",
    "random_numels",
    "shallow_copy",
    "total_bytes",
]

#: The dtypes of a typical mixed-precision state dict, cycled over a tensor list so that
#: batched paths see several element sizes in one call.
DTYPE_MIX: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float32, torch.int64)

# Extra pool elements, so tensors of equal size start at different pool offsets.
_POOL_SLACK = 1024


def fmt_bytes(n: float) -> str:
    """``1536 -> '1.5KB'``: short labels for case names (powers of 1024)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            text = f"{n:.1f}".rstrip("0").rstrip(".")
            return f"{text}{unit}"
        n /= 1024
    raise AssertionError("unreachable")


def random_numels(
    count: int, lo_bytes: int, hi_bytes: int, dtypes: Sequence[torch.dtype], seed: int
) -> list[tuple[int, torch.dtype]]:
    """``count`` (numel, dtype) pairs whose byte sizes are uniform in [lo, hi]."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        dtype = dtypes[i % len(dtypes)]
        nbytes = rng.randint(lo_bytes, hi_bytes)
        out.append((max(1, nbytes // dtype.itemsize), dtype))
    return out


def pinned_ok() -> bool:
    """Pinned host memory needs a CUDA runtime; on a CPU build asking for it raises."""
    return torch.cuda.is_available()


def make_tensors(
    specs: Sequence[tuple[int, torch.dtype]],
    device: torch.device | str,
    *,
    pin: bool = False,
    fill: bool = True,
    seed: int = 0,
) -> list[torch.Tensor]:
    """One separate allocation per tensor, like the parameters of a real model.

    Values come from one random pool per dtype (each tensor a slice of it at a varying
    offset): drawing random numbers per tensor would make building 20,000 tensors take
    longer than measuring them. Values are finite, so results compare with torch.equal.
    """
    device = torch.device(device)
    pools: dict[torch.dtype, torch.Tensor] = {}
    if fill:
        gen = torch.Generator().manual_seed(seed)
        longest = max((numel for numel, _ in specs), default=0) + _POOL_SLACK
        for dtype in {dtype for _, dtype in specs}:
            if dtype.is_floating_point:
                pool = torch.empty(longest).uniform_(-1, 1, generator=gen).to(dtype)
            else:
                pool = torch.randint(0, 1 << 20, (longest,), generator=gen).to(dtype)
            pools[dtype] = pool
    out = []
    for i, (numel, dtype) in enumerate(specs):
        t = torch.empty(numel, dtype=dtype, pin_memory=pin and device.type == "cpu")
        if fill:
            start = (i * 7) % _POOL_SLACK
            t.copy_(pools[dtype][start : start + numel])
        out.append(t.to(device) if device.type != "cpu" else t)
    return out


def total_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def shallow_copy(tree: Any) -> Any:
    """Copies the dict / list containers of a state dict, sharing the tensors.

    PyTorch's loaders mutate the dicts they are given (keys replaced, popped or added),
    so every timed run gets fresh containers; copying tensors would time the wrong thing.
    """
    if isinstance(tree, dict):
        return {k: shallow_copy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [shallow_copy(v) for v in tree]
    return tree
