"""reshard_state_dict on GPUs with NCCL: device buffers, stream-ordered rounds.

The same route as the gloo tests in test_reshard.py, on the device the GPU users run:
NCCL groups, CUDA tensors, meta destinations allocated on the current device. One GPU
runs a one-rank group (every piece a local device copy); the message rounds need two
GPUs (NCCL refuses two ranks on one device). Skipped without enough GPUs.
"""

from __future__ import annotations

import pytest
import torch

from tests.mp import run_fresh

pytestmark = pytest.mark.cuda

_TIMEOUT_S = 180


def _full(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed": torch.randn(37, 12, generator=g).to(torch.bfloat16),
        "w": torch.randn(64, 48, generator=g),
        "b": torch.randn(5, generator=g),
        "empty": torch.empty(0, 4),
        "step": torch.tensor(7.0),
    }


def _layouts(world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cuda", (world,))
    full = {k: v.cuda() for k, v in _full(0).items()}
    src = {k: distribute_tensor(v, mesh, [Shard(0)]) if v.dim() else v for k, v in full.items()}
    placements = {k: [Shard(1)] if v.dim() == 2 else [Replicate()] for k, v in full.items()}
    expected = {
        k: distribute_tensor(v, mesh, placements[k]).to_local() if v.dim() else v
        for k, v in full.items()
    }
    real = {
        k: distribute_tensor(torch.zeros_like(v), mesh, placements[k]) if v.dim() else
        torch.zeros((), device="cuda")
        for k, v in full.items()
    }
    # src_data_rank=None: each rank takes its box without a scatter (none of a meta one).
    meta = {
        k: distribute_tensor(torch.empty_like(v, device="meta"), mesh, placements[k],
                             src_data_rank=None)
        if v.dim() else torch.zeros((), device="meta")
        for k, v in full.items()
    }
    return src, real, meta, expected


def _on_rank() -> list:
    """One rank of an NCCL group (tests/mp.run_fresh with device_type="cuda")."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from sdict_ext.utils import last_reshard_stats, reshard_state_dict

    src, real, meta, expected = _layouts(dist.get_world_size())
    checks = []
    for dst in (real, meta):
        out = reshard_state_dict(src, dst)
        torch.cuda.synchronize()
        for key, want in expected.items():
            got = out[key]
            local = got.to_local() if isinstance(got, DTensor) else got
            checks.append((key, local.device.type, torch.equal(local, want)))
        stats = last_reshard_stats()
        checks.append(("bytes", stats["bytes_received"] + stats["bytes_local"],
                       stats["bytes_owned"]))
    out = reshard_state_dict(src, real)
    assert all(out[k] is real[k] for k in real)
    checks.append(("cached", last_reshard_stats()["planned"]))
    return checks


def _run(world: int) -> list:
    return run_fresh(world, _on_rank, timeout=_TIMEOUT_S, pg_timeout=60, device_type="cuda")


def _assert_checks(per_rank: list) -> None:
    for checks in per_rank:
        for check in checks:
            if check[0] == "bytes":
                assert check[1] == check[2]
            elif check[0] == "cached":
                assert check[1] is False
            else:
                key, device, same = check
                assert device == "cuda", key
                assert same, key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_reshard_on_one_gpu_copies_every_box_on_the_device():
    _assert_checks(_run(1))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (NCCL)")
def test_reshard_over_nccl_moves_shard0_to_shard1_bit_exact():
    _assert_checks(_run(2))
