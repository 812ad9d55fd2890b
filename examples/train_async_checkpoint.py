"""Train a small transformer, checkpointing asynchronously through ``PinnedStager``.

Every ``--ckpt-every`` steps the model and optimizer state go to
``torch.distributed.checkpoint.async_save`` with an ``sdict_ext.staging.PinnedStager``:
the trainer pays only for collecting the state dict and launching the copy; the copy
into the reused host slab overlaps the next forward/backward, and the write to disk runs
in DCP's upload thread. Per checkpoint it prints how long the trainer was blocked, how
long staging took, and how long the upload took.

Run on one process (CPU, or CUDA when available)::

    python examples/train_async_checkpoint.py --steps 200 --ckpt-every 50

or on several ranks with FSDP2 (``fully_shard``)::

    torchrun --nproc-per-node 2 examples/train_async_checkpoint.py --steps 200

``--resume`` continues from the newest complete checkpoint in ``--ckpt-dir``; the loss
curve from there on is identical to an uninterrupted run's, because every batch is a
function of (seed, step, rank) and the checkpoint holds the model, the optimizer state
and the step. ``--stop-after N`` ends the run after step N, as a preemption would.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from sdict_ext.staging import PinnedStager
from sdict_ext.state_dict import get_state_dict, set_state_dict


class Block(nn.Module):
    """A pre-norm causal self-attention + MLP block."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, dim: int, heads: int, layers: int, seq: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(seq, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean next-token cross-entropy (returned rather than the logits, which are
        a view that FSDP2 warns about at the root module's output)."""
        x = self.tok(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def batch(args: argparse.Namespace, step: int, rank: int, device: torch.device):
    """Sequences of an affine recurrence mod vocab: learnable, and a pure function of
    (seed, step, rank), so a resumed run sees exactly the batches it would have seen."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 1_009 + rank)
    start = torch.randint(args.vocab, (args.batch, 1), generator=g)
    mult = torch.randint(1, 8, (args.batch, 1), generator=g)
    seq = (start + mult * torch.arange(args.seq + 1)) % args.vocab
    return seq[:, :-1].to(device), seq[:, 1:].to(device)


def latest_checkpoint(ckpt_dir: Path) -> tuple[int, Path] | None:
    """The newest checkpoint whose metadata was written (DCP writes it last)."""
    done = [
        (int(m.group(1)), p)
        for p in ckpt_dir.glob("step_*")
        if (m := re.fullmatch(r"step_(\d+)", p.name)) and (p / ".metadata").exists()
    ]
    return max(done) if done else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--ckpt-every", type=int, default=50)
    parser.add_argument("--ckpt-dir", type=Path, default=Path("checkpoints"))
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--stop-after", type=int, default=None)
    parser.add_argument("--losses-out", type=Path, default=None,
                        help="write {step: loss} of this run as JSON (rank 0)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=128)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--log-every", type=int, default=10)
    args = parser.parse_args()

    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    distributed = "WORLD_SIZE" in os.environ
    ckpt_pg = None
    if distributed:
        # async_save needs a CPU backend; CUDA tensors use NCCL.
        dist.init_process_group("cpu:gloo,cuda:nccl" if use_cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        # The upload thread's collectives get their own group, so they never interleave
        # with the training collectives issued meanwhile on the default group.
        ckpt_pg = dist.new_group(backend="gloo")
    else:
        rank, world = 0, 1
        # DCP warns on every single-process save and load, even with no_dist=True.
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")

    torch.manual_seed(args.seed)
    model = TinyGPT(args.vocab, args.dim, args.heads, args.layers, args.seq).to(device)
    if distributed:
        mesh = init_device_mesh(device.type, (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    step = 0
    if args.resume and (found := latest_checkpoint(args.ckpt_dir)) is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd, "step": 0}
        dcp.load(state, checkpoint_id=found[1], process_group=ckpt_pg, no_dist=not distributed)
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
        step = state["step"]
        if rank == 0:
            print(f"resumed from {found[1]} at step {step}", flush=True)

    stager = PinnedStager(pin_memory=device.type == "cuda")
    # optimizer.step() is the first thing that modifies the staged state: it waits for
    # the staging in flight; forward and backward overlap it.
    stager.guard_optimizer(optimizer)
    in_flight = None  # (step, response, (collect_s, async_save_s), start time)
    losses: dict[int, float] = {}

    def finish_checkpoint() -> None:
        nonlocal in_flight
        if in_flight is None:
            return
        ckpt_step, response, (collect_s, save_s), started = in_flight
        response.upload_completion.result()
        staged = stager.stats
        if rank == 0:
            print(
                f"checkpoint step {ckpt_step}: trainer blocked {(collect_s + save_s) * 1e3:.2f} ms "
                f"(get_state_dict {collect_s * 1e3:.2f} ms, async_save {save_s * 1e3:.2f} ms, "
                f"of which stage() {staged.last_blocking_s * 1e3:.2f} ms); "
                f"staging {staged.last_staging_s * 1e3:.2f} ms "
                f"({staged.staged_bytes / 2**20:.2f} MiB/rank); "
                f"on disk {(time.perf_counter() - started) * 1e3:.0f} ms after the call",
                flush=True,
            )
        in_flight = None

    stop = min(args.steps, args.stop_after or args.steps)
    while step < stop:
        step += 1
        inputs, targets = batch(args, step, rank, device)
        loss = model(inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        reported = loss.detach().clone()
        if distributed:
            dist.all_reduce(reported)  # gloo has no AVG
            reported /= world
        losses[step] = reported.item()
        if rank == 0 and (step % args.log_every == 0 or step == stop):
            print(f"step {step} loss {losses[step]:.4f}", flush=True)

        if step % args.ckpt_every == 0:
            # The slab is reused: the previous checkpoint must be on disk before the
            # next staging overwrites it.
            finish_checkpoint()
            started = time.perf_counter()
            model_sd, optim_sd = get_state_dict(model, optimizer)
            collected = time.perf_counter()
            response = dcp.async_save(
                {"model": model_sd, "optim": optim_sd, "step": step},
                checkpoint_id=args.ckpt_dir / f"step_{step}",
                async_stager=stager,
                process_group=ckpt_pg,
                no_dist=not distributed,
            )
            blocked = (collected - started, time.perf_counter() - collected)
            in_flight = (step, response, blocked, started)

    finish_checkpoint()
    stager.close()
    if rank == 0 and args.losses_out is not None:
        args.losses_out.write_text(json.dumps({s: v for s, v in losses.items()}))
    if rank == 0 and losses:
        last = losses[max(losses)]
        print(f"done at step {step}: loss {last:.4f} (uniform guess {math.log(args.vocab):.4f})")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
