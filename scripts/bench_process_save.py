"""PinnedStager vs DefaultStager in DCP's process-based async_save (BENCHMARKS.md, issue 22).

Not a bench suite: the suites time ``stage()`` in one process, while this needs a
process group and DCP's checkpoint process. One gloo rank on the CPU; the staging
suite's ``small`` workloads as DTensors (what FSDP2 gives). Per stager one warm-up save
(it starts DCP's checkpoint process and allocates the host copy), then timed saves, each
waited for before the next. Prints, per stager, the medians of: the trainer's blocking
time (the ``async_save`` call) and the ``stage()`` call inside it, the time until
``staging_completion`` and until ``upload_completion``.

    .venv/bin/python scripts/bench_process_save.py      # from the repository root
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
import traceback

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
from torch.distributed.tensor import DTensor, Shard, init_device_mesh

sys.path.insert(0, os.getcwd())
from bench.suites._inputs import DTYPE_MIX, make_tensors, random_numels, total_bytes  # noqa: E402
from sdict_ext.staging import PinnedStager  # noqa: E402

KB = 1024
WORKLOADS = {  # name: (count, smallest bytes, largest bytes, timed saves)
    "300 x 512 KB": (300, 512 * KB, 512 * KB, 3),
    "20,000 x 256 B-16 KB": (20_000, 256, 16 * KB, 2),
}
# PinnedStager first: a DefaultStager that ran out of descriptors leaves the process none.
STAGERS = {
    "PinnedStager(share_memory=True)": lambda: PinnedStager(pin_memory=False, share_memory=True),
    "DefaultStager(shared)": lambda: DefaultStager(StagingOptions(False, True, True, False)),
    "DefaultStager(private)": lambda: DefaultStager(StagingOptions(False, False, True, False)),
}


def _time_stage_calls(stager) -> list[float]:
    calls: list[float] = []
    real_stage = stager.stage

    def timed_stage(state_dict):
        start = time.perf_counter()
        try:
            return real_stage(state_dict)
        finally:
            calls.append(time.perf_counter() - start)

    stager.stage = timed_stage
    return calls


def _measure(label: str, stager, state_dict: dict, root: str, timed: int) -> None:
    calls = _time_stage_calls(stager)
    rows = []
    for run in range(1 + timed):
        staged_at: list[float] = []
        start = time.perf_counter()
        response = dcp.async_save(
            state_dict, checkpoint_id=f"{root}/{label}{run}", async_stager=stager,
            async_checkpointer_type=AsyncCheckpointerType.PROCESS,
        )
        blocking = time.perf_counter() - start
        response.staging_completion.add_done_callback(
            lambda _, at=staged_at: at.append(time.perf_counter())
        )
        response.upload_completion.result()
        written = time.perf_counter() - start
        response.staging_completion.result()
        if run:
            rows.append((blocking, calls[-1], staged_at[0] - start, written))
    med = [statistics.median(column) for column in zip(*rows)]
    print(f"{label:34s} blocking {med[0] * 1e3:8.1f} ms (stage() {med[1] * 1e3:7.1f} ms)  "
          f"staged {med[2] * 1e3:8.1f} ms  written {med[3] * 1e3:8.1f} ms  (median of "
          f"{len(rows)}: {[[round(x, 4) for x in row] for row in rows]})", flush=True)


def main() -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    dist.init_process_group("gloo", rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    root = tempfile.mkdtemp(prefix="bench_process_save_")
    for name, (count, lo, hi, timed) in WORKLOADS.items():
        specs = random_numels(count, lo, hi, DTYPE_MIX, seed=21)
        tensors = make_tensors(specs, "cpu", seed=22)
        state_dict = {f"layers.{i // 8}.w{i % 8}": DTensor.from_local(t, mesh, [Shard(0)])
                      for i, t in enumerate(tensors)}
        print(f"== {name}: {total_bytes(tensors) / 2**20:.1f} MiB", flush=True)
        for label, make in STAGERS.items():
            stager = make()
            try:
                _measure(label, stager, state_dict, root, timed)
            except Exception as exc:
                print(f"{label:34s} FAILED: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                traceback.print_exc()
            finally:
                stager.close()
    print(f"checkpoints in {root} (remove them)")
    dist.destroy_process_group()


if __name__ == "__main__":  # DCP's checkpoint process is spawned: it re-imports this file
    main()
