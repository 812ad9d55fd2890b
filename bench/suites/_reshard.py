"""Layouts for the reshard cases: a transformer-shaped state dict, where each rank's box
of every tensor lies in the source and destination layouts, and the bytes that the
move between them takes per (source rank, destination rank) pair.

The per-pair bytes come from the layouts alone: every destination box intersects the
source boxes of dim-0 shards, which never overlap, so each destination byte has exactly
one source rank and any correct plan moves exactly these bytes. The bound rows move the
same matrix with one collective, so they need nothing from sdict_ext.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from bench.suites._inputs import make_tensors

__all__ = ["Layout", "TensorSpec", "chunk_range", "model_tensors"]


@dataclass(frozen=True)
class TensorSpec:
    """One entry of the state dict: its key, global shape, dtype and destination
    placement (``dst_dim`` is the sharded dim, None for Replicate)."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    dst_dim: int | None

    @property
    def nbytes(self) -> int:
        numel = 1
        for n in self.shape:
            numel *= n
        return numel * self.dtype.itemsize


def model_tensors(hidden: int, ffn: int, vocab: int, layers: int) -> list[TensorSpec]:
    """A decoder's parameters, mixed precision, with odd sizes so no shard is even.

    Layers alternate bf16 and fp32 (a partly upcast model), norms stay fp32. Every 2-D
    weight goes to TP Shard(1), 1-D norms are replicated, as tensor parallelism keeps
    them. A 3-row classifier head leaves some ranks an empty dim-0 shard.
    """
    bf16, fp32 = torch.bfloat16, torch.float32
    out = [TensorSpec("model.embed_tokens.weight", (vocab, hidden), bf16, 1)]
    for i in range(layers):
        dtype = bf16 if i % 2 == 0 else fp32
        pre = f"model.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out.append(TensorSpec(f"{pre}.self_attn.{name}.weight", (hidden, hidden), dtype, 1))
        for name in ("gate_proj", "up_proj"):
            out.append(TensorSpec(f"{pre}.mlp.{name}.weight", (ffn, hidden), dtype, 1))
        out.append(TensorSpec(f"{pre}.mlp.down_proj.weight", (hidden, ffn), dtype, 1))
        for name in ("input_layernorm", "post_attention_layernorm"):
            out.append(TensorSpec(f"{pre}.{name}.weight", (hidden,), fp32, None))
    out.append(TensorSpec("model.norm.weight", (hidden,), fp32, None))
    out.append(TensorSpec("lm_head.weight", (vocab, hidden), fp32, 1))
    out.append(TensorSpec("score.weight", (3, hidden), fp32, 1))
    return out


def chunk_range(length: int, parts: int, index: int) -> tuple[int, int]:
    """``[lo, hi)`` of chunk ``index`` of ``torch.chunk(length, parts)``, DTensor's
    Shard split (trailing chunks empty when ``length`` is small)."""
    step = -(-length // parts) if length else 0
    lo = min(index * step, length)
    return lo, min(lo + step, length)


def _box(spec: TensorSpec, dim: int | None, parts: int, index: int) -> list[tuple[int, int]]:
    box = [(0, n) for n in spec.shape]
    if dim is not None:
        box[dim] = chunk_range(spec.shape[dim], parts, index)
    return box


def _volume(box: list[tuple[int, int]]) -> int:
    numel = 1
    for lo, hi in box:
        numel *= max(0, hi - lo)
    return numel


@dataclass(frozen=True)
class Layout:
    """Source: Shard(0) over ranks ``0..src-1``; destination: each tensor's placement over
    ranks ``0..dst-1``; ranks past both hold nothing (a larger torchrun world)."""

    tensors: tuple[TensorSpec, ...]
    src: int
    dst: int

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def src_box(self, spec: TensorSpec, rank: int) -> list[tuple[int, int]]:
        return _box(spec, 0, self.src, rank)

    def dst_box(self, spec: TensorSpec, rank: int) -> list[tuple[int, int]]:
        return _box(spec, spec.dst_dim, self.dst, rank)

    def pair_bytes(self, world: int) -> list[list[int]]:
        """``m[r][s]``: bytes source rank ``r`` sends destination rank ``s`` (the
        diagonal is the local copy of a rank that is both)."""
        m = [[0] * world for _ in range(world)]
        for spec in self.tensors:
            for r in range(self.src):
                a = self.src_box(spec, r)
                for s in range(self.dst):
                    b = self.dst_box(spec, s)
                    both = [(max(x[0], y[0]), min(x[1], y[1])) for x, y in zip(a, b, strict=True)]
                    m[r][s] += _volume(both) * spec.dtype.itemsize
        return m

    def owned_bytes(self, rank: int) -> int:
        """Bytes of this rank's destination boxes."""
        if rank >= self.dst:
            return 0
        return sum(_volume(self.dst_box(t, rank)) * t.dtype.itemsize for t in self.tensors)

    def meshes(self, device_type: str) -> tuple[DeviceMesh, DeviceMesh]:
        """The source and destination meshes (one object when they are the same ranks,
        so ``DTensor.redistribute`` applies). Every rank builds both: a mesh's groups
        are made collectively, members or not."""
        src = DeviceMesh(device_type, list(range(self.src)))
        dst = src if self.dst == self.src else DeviceMesh(device_type, list(range(self.dst)))
        return src, dst

    def source(self, rank: int, mesh: DeviceMesh, device: torch.device) -> dict[str, DTensor]:
        """This rank's source state dict (empty on a rank outside the source mesh).

        The values are the same on every machine (fixed seed); each full tensor lives
        only while its shard is cut out of it.
        """
        if rank >= self.src:
            return {}
        out = {}
        for i, spec in enumerate(self.tensors):
            numel = spec.nbytes // spec.dtype.itemsize
            full = make_tensors([(numel, spec.dtype)], "cpu", seed=100 + i)[0].view(spec.shape)
            lo, hi = chunk_range(spec.shape[0], self.src, rank)
            local = full[lo:hi].clone().to(device)
            out[spec.key] = DTensor.from_local(
                local, mesh, [Shard(0)], run_check=False, shape=full.shape, stride=full.stride()
            )
        return out

    def destination(self, rank: int, mesh: DeviceMesh) -> dict[str, DTensor]:
        """This rank's destination state dict of meta DTensors (empty outside its mesh):
        resharding allocates it, as PyTorch's distribute does."""
        if rank >= self.dst:
            return {}
        out = {}
        for spec in self.tensors:
            box = self.dst_box(spec, rank)
            local = torch.empty([hi - lo for lo, hi in box], dtype=spec.dtype, device="meta")
            placement = Replicate() if spec.dst_dim is None else Shard(spec.dst_dim)
            stride = torch.empty(spec.shape, device="meta").stride()
            out[spec.key] = DTensor.from_local(
                local, mesh, [placement], run_check=False, shape=spec.shape, stride=stride
            )
        return out

    @staticmethod
    def allocate(meta: dict[str, DTensor], device: torch.device) -> dict[str, DTensor]:
        """Real (zeroed, so every page is resident) DTensors shaped like ``meta``'s."""
        return {
            key: DTensor.from_local(
                torch.zeros(v.to_local().shape, dtype=v.dtype, device=device), v.device_mesh,
                v.placements,
                run_check=False, shape=v.shape, stride=v.stride(),
            )
            for key, v in meta.items()
        }
