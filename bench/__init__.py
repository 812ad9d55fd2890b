"""sdict_ext's benchmark harness: ``python -m bench`` (``make bench``).

Measures sdict_ext's functions against PyTorch's own on the same inputs in the same run,
and against the hardware bound measured in that run (one big memcpy; on a GPU one big
pinned device-to-host / host-to-device copy; one big collective on several ranks).
See BENCHMARKS.md for how to run it and the recorded results.

Layout, each module importing only those after it: ``cli`` (arguments, one run),
``runner`` (which process runs which case), ``launch`` (spawned or torchrun ranks for
multi-rank cases), ``case`` (one case in this process), ``report`` (table, JSON),
``plot`` (optional PNG), ``suites/`` (the workloads), ``harness`` (timing, memory,
collectives), ``ranks`` (the pool of spawned ranks, shared with ``tests/mp.py``).
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark with command-line arguments ``argv``; returns the exit status."""
    from bench.cli import main as cli_main

    return cli_main(argv)
