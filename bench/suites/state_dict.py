"""Suite ``state_dict``: ``sdict_ext.state_dict`` vs ``torch.distributed.checkpoint.state_dict``.

A small decoder-only transformer with AdamW state (one training step taken, so every
parameter has ``step``, ``exp_avg`` and ``exp_avg_sq``) is sharded over every rank with
FSDP2 (``fully_shard``) and with FSDP1 (``FullyShardedDataParallel``, one unit per
block, ``use_orig_params=True``). Cases, from issue 4:

* ``get_state_dict(full_state_dict=True, cpu_offload=True)``: the checkpoint-saving path.
  On FSDP1 without ``cpu_offload``, because PyTorch 2.13 crashes the process with it.
* A trainer library's checkpoint round trip, written against PyTorch's names (imported
  at call time, as accelerate and Lightning do): ``get_state_dict(full_state_dict=True)``
  then ``set_state_dict`` of that on every rank; once on PyTorch, once with
  ``sdict_ext.patch_torch()`` on, the library code unchanged.
* ``set_state_dict(full_state_dict=True, broadcast_from_rank0=True)``: only rank 0 holds
  the full state dict; every rank receives its shards. PyTorch's ``set_state_dict`` with
  ``{}`` on the other ranks skips the model broadcast there and leaves rank 0 waiting
  (a defect listed in API.md), so PyTorch's side is the working equivalent:
  ``set_model_state_dict`` then ``set_optimizer_state_dict``.

The loading cases load the saved state of one model into a differently initialised one,
so a verified result means the values really moved.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint import state_dict as tsd
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from bench.harness import ROLE_SDICT, ROLE_TORCH, CaseSpec, Ctx, load_sdict
from bench.suites._inputs import shallow_copy

__all__ = ["Transformer", "cases", "run"]

# dim, layers, vocab
_SIZES = {
    "tiny": (64, 2, 512),
    "small": (256, 4, 8192),
    "medium": (1024, 8, 32000),
    "large": (2048, 16, 32000),
}


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(att.transpose(1, 2).reshape(b, s, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Transformer(nn.Module):
    """A decoder-only transformer: enough structure for realistic state-dict keys."""

    def __init__(self, dim: int, layers: int, vocab: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(_Block(dim, max(1, dim // 64)) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def cases(size: str, device: str) -> list[CaseSpec]:
    """The suite's cases at ``size`` (all on every rank)."""
    dim, layers, vocab = _SIZES[size]
    model = dict(dim=dim, layers=layers, vocab=vocab)
    label = f"d{dim} L{layers} V{vocab} + AdamW"
    return [
        CaseSpec("state_dict", f"FSDP2 get_state_dict(full, cpu_offload) {label}",
                 multi_rank=True, params=dict(kind="get", wrap="fsdp2", **model)),
        CaseSpec("state_dict", f"FSDP2 set_state_dict(broadcast_from_rank0) {label}",
                 multi_rank=True, params=dict(kind="set", wrap="fsdp2", **model)),
        CaseSpec("state_dict", f"FSDP1 get_state_dict(full) {label}",
                 multi_rank=True, params=dict(kind="get", wrap="fsdp1", **model)),
        CaseSpec("state_dict", f"FSDP1 set_state_dict(broadcast_from_rank0) {label}",
                 multi_rank=True, params=dict(kind="set", wrap="fsdp1", **model)),
        CaseSpec("state_dict", f"FSDP2 patch_torch: library get -> set_state_dict {label}",
                 multi_rank=True, params=dict(kind="library", wrap="fsdp2", **model)),
    ]


def _build(spec: CaseSpec, ctx: Ctx, seed: int) -> tuple[nn.Module, torch.optim.Optimizer, int]:
    """A sharded model that took one AdamW step, and its full state's size in bytes."""
    p = spec.params
    torch.manual_seed(seed)
    model = Transformer(p["dim"], p["layers"], p["vocab"]).to(ctx.device)
    # Parameters, exp_avg and exp_avg_sq: three full-size copies.
    nbytes = 3 * sum(t.numel() * t.element_size() for t in model.parameters())
    if p["wrap"] == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        model = FullyShardedDataParallel(
            model, auto_wrap_policy=ModuleWrapPolicy({_Block}), device_id=ctx.device,
            use_orig_params=True,
        )
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, p["vocab"], (2, 16), generator=gen).to(ctx.device)
    model(tokens).float().pow(2).mean().backward()
    optim.step()
    optim.zero_grad()
    return model, optim, nbytes


def _options(module: Any, p: dict, *, load: bool):
    opts = dict(full_state_dict=True)
    if load:
        opts["broadcast_from_rank0"] = True
    elif p["wrap"] == "fsdp2":
        opts["cpu_offload"] = True
    return module.StateDictOptions(**opts)


def _tree_equal(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(
            _tree_equal(v, b[k]) for k, v in a.items()
        )
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_tree_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor):
            return False
        a = a.full_tensor() if isinstance(a, DTensor) else a
        b = b.full_tensor() if isinstance(b, DTensor) else b
        return a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())
    return a == b


def _sdict_module(names: tuple[str, ...]):
    """``sdict_ext.state_dict`` when it has ``names``, else the skip reason."""
    for name in names:
        fn, why = load_sdict("state_dict", name)
        if fn is None:
            return None, why
    import sdict_ext.state_dict as module

    return module, None


def run(spec: CaseSpec, ctx: Ctx) -> None:
    """Builds the sharded model(s) and measures both implementations."""
    {"get": _run_get, "set": _run_set, "library": _run_library}[spec.params["kind"]](spec, ctx)


def _run_get(spec: CaseSpec, ctx: Ctx) -> None:
    model, optim, nbytes = _build(spec, ctx, seed=0)
    n = 3 * len(list(model.parameters()))
    topts = _options(tsd, spec.params, load=False)
    ctx.measure(
        "torch get_state_dict", ROLE_TORCH, lambda: tsd.get_state_dict(model, optim, options=topts),
        nbytes=nbytes, tensors=n,
    )
    module, why = _sdict_module(("get_state_dict", "StateDictOptions"))
    if module is None:
        ctx.skip("sdict_ext get_state_dict", ROLE_SDICT, why, nbytes, n)
        return
    sopts = _options(module, spec.params, load=False)

    def verify() -> bool:
        ours = module.get_state_dict(model, optim, options=sopts)
        return _tree_equal(ours, tsd.get_state_dict(model, optim, options=topts))

    ctx.measure(
        "sdict_ext get_state_dict", ROLE_SDICT,
        lambda: module.get_state_dict(model, optim, options=sopts),
        nbytes=nbytes, tensors=n, verify=verify,
    )


def _run_set(spec: CaseSpec, ctx: Ctx) -> None:
    source, source_optim, nbytes = _build(spec, ctx, seed=0)
    save = tsd.StateDictOptions(full_state_dict=True, cpu_offload=spec.params["wrap"] == "fsdp2")
    msd, osd = tsd.get_state_dict(source, source_optim, options=save)
    if ctx.rank != 0:
        msd, osd = {}, {}
    del source, source_optim
    model, optim, _ = _build(spec, ctx, seed=1)
    n = 3 * len(list(model.parameters()))
    topts = _options(tsd, spec.params, load=True)

    def torch_set(m, o):
        tsd.set_model_state_dict(model, m, options=topts)
        tsd.set_optimizer_state_dict(model, optim, o, options=topts)

    ctx.measure(
        "torch set_model_ + set_optimizer_state_dict", ROLE_TORCH, torch_set,
        setup=lambda: (shallow_copy(msd), shallow_copy(osd)), nbytes=nbytes, tensors=n,
    )
    module, why = _sdict_module(("set_state_dict", "StateDictOptions"))
    if module is None:
        ctx.skip("sdict_ext set_state_dict", ROLE_SDICT, why, nbytes, n)
        return
    sopts = _options(module, spec.params, load=True)

    def sdict_set(m, o):
        module.set_state_dict(model, optim, model_state_dict=m, optim_state_dict=o, options=sopts)

    def verify() -> bool:
        # Scramble, load with ours, read back with PyTorch's getter: equal to what rank 0 saved.
        with torch.no_grad():
            for param in model.parameters():
                param.zero_()
        sdict_set(shallow_copy(msd), shallow_copy(osd))
        got = tsd.get_state_dict(model, optim, options=save)
        return ctx.rank != 0 or _tree_equal(got, (msd, osd))

    ctx.measure(
        "sdict_ext set_state_dict", ROLE_SDICT, sdict_set,
        setup=lambda: (shallow_copy(msd), shallow_copy(osd)), nbytes=nbytes, tensors=n,
        verify=verify,
    )


def _library_round_trip(model: nn.Module, optim: torch.optim.Optimizer) -> None:
    """What a trainer library's save-then-load does, through PyTorch's module names."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True)
    msd, osd = get_state_dict(model, optim, options=opts)
    set_state_dict(model, optim, model_state_dict=msd, optim_state_dict=osd, options=opts)


def _run_library(spec: CaseSpec, ctx: Ctx) -> None:
    model, optim, nbytes = _build(spec, ctx, seed=0)
    n = 3 * len(list(model.parameters()))
    full = tsd.StateDictOptions(full_state_dict=True)
    ctx.measure(
        "torch (library code on PyTorch)", ROLE_TORCH, lambda: _library_round_trip(model, optim),
        nbytes=nbytes, tensors=n,
    )
    patch_torch, why = load_sdict("_patch_torch", "patch_torch")
    if patch_torch is None:
        ctx.skip("sdict_ext.patch_torch (same library code)", ROLE_SDICT, why, nbytes, n)
        return
    get_state_dict = tsd.get_state_dict  # PyTorch's, taken before the patch
    before = get_state_dict(model, optim, options=full)

    def verify() -> bool:
        # The library really ran sdict_ext, and the round trip left every value as it was.
        ran_ours = tsd.get_state_dict is not get_state_dict
        _library_round_trip(model, optim)
        return ran_ours and _tree_equal(get_state_dict(model, optim, options=full), before)

    with patch_torch():
        ctx.measure(
            "sdict_ext.patch_torch (same library code)", ROLE_SDICT,
            lambda: _library_round_trip(model, optim), nbytes=nbytes, tensors=n, verify=verify,
        )
