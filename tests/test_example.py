"""Runs examples/train_async_checkpoint.py briefly on 2 CPU ranks with FSDP2.

A run is stopped after step 7 (its last checkpoint is step 4's); a second run resumes
from that checkpoint. Steps 5-7 of the resumed run must reproduce the first run's losses
bit for bit, since the first run computed them uninterrupted after its checkpoint.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "train_async_checkpoint.py"
RUN_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path: Path, name: str, *args: str) -> tuple[dict[int, float], str]:
    losses = tmp_path / f"{name}.json"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc-per-node", "2", "--master-port", str(_free_port()),
        str(EXAMPLE),
        "--device", "cpu", "--steps", "10", "--ckpt-every", "4", "--log-every", "1",
        "--dim", "32", "--layers", "2", "--seq", "16",
        "--ckpt-dir", str(tmp_path / "ckpt"), "--losses-out", str(losses), *args,
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return {int(k): v for k, v in json.loads(losses.read_text()).items()}, proc.stdout


@pytest.mark.dist
def test_resumed_run_reproduces_the_uninterrupted_losses(tmp_path):
    first, first_out = _torchrun(tmp_path, "first", "--stop-after", "7")
    assert sorted(first) == list(range(1, 8))
    assert "checkpoint step 4: trainer blocked" in first_out
    assert "staging" in first_out

    resumed, resumed_out = _torchrun(tmp_path, "resumed", "--resume")
    assert "at step 4" in resumed_out
    assert sorted(resumed) == list(range(5, 11))
    assert [resumed[s] for s in (5, 6, 7)] == [first[s] for s in (5, 6, 7)]
    assert "checkpoint step 8: trainer blocked" in resumed_out
    assert resumed[10] < first[1]  # it trains
