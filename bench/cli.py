"""``python -m bench``: the command line, and one run from arguments to report.

Exit status: 0 when every case ran or was skipped for a stated reason, 1 when any row
is an error or any sdict_ext result differs from PyTorch's on the same inputs (so
``make bench`` in CI notices a broken case), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import warnings
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from bench.suites import SIZES, SUITES, get_suite

__all__ = ["build_parser", "main"]

# repeat, warmup, time budget per implementation (s), multi-rank case timeout (s),
# collective timeout (s), per size.
_DEFAULTS = {
    "tiny": (3, 1, 1.0, 120.0, 60.0),
    "small": (5, 1, 2.0, 300.0, 120.0),
    "medium": (10, 2, 15.0, 900.0, 300.0),
    "large": (10, 2, 60.0, 1800.0, 600.0),
}


def _number(convert: Callable[[str], Any], ok: Callable[[Any], bool], expected: str):
    """An argparse type: ``convert`` the text, then require ``ok`` of the value."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return parse


_positive = _number(int, lambda v: v >= 1, "a positive integer")
_non_negative = _number(int, lambda v: v >= 0, "an integer >= 0")
_seconds = _number(float, lambda v: v > 0, "a positive number of seconds")


def _png(text: str) -> str:
    if not text.lower().endswith(".png"):
        raise argparse.ArgumentTypeError(
            f"the plot is a PNG file: expected a name ending in .png, got {text!r}"
        )
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Side-by-side benchmark of sdict_ext against PyTorch's state-dict utilities, "
            "on the same inputs in the same run, and against the measured hardware bound."
        ),
        epilog=(
            "Multi-rank cases start their own gloo (cpu) / NCCL (cuda) ranks on 127.0.0.1, "
            "or use the job's ranks under `torchrun --nproc-per-node N -m bench ...`. "
            "The limits cases the selected suites are compared with always run."
        ),
    )
    parser.add_argument("--suite", action="append", choices=SUITES, metavar="NAME",
                        help=f"suite to run, repeatable (default: all of {', '.join(SUITES)})")
    parser.add_argument("--size", choices=[s for s in SIZES if s != "tiny"], default="small",
                        help="workload size (default: small, a few minutes on 2 CPU cores)")
    parser.add_argument("--tiny", action="store_true",
                        help="the smallest workloads, for CI smoke runs (overrides --size)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the state dicts live (default: cpu)")
    parser.add_argument("--repeat", type=_positive, help="most timed runs per implementation")
    parser.add_argument("--warmup", type=_non_negative, help="untimed runs before timing")
    parser.add_argument("--world-size", type=_positive, default=2,
                        help="spawned ranks for multi-rank cases (default: 2; torchrun: its own)")
    parser.add_argument("--timeout", type=_seconds, help="seconds allowed per multi-rank case")
    parser.add_argument("--case", action="append", metavar="TEXT",
                        help="only cases whose name contains TEXT (repeatable: any of them)")
    parser.add_argument("--json", metavar="FILE", help="write every row and the header as JSON")
    parser.add_argument("--plot", metavar="FILE.png", type=_png,
                        help="write a PNG of GB/s vs tensor size / per case (needs matplotlib; "
                             "default with --json: beside it, FILE.json -> FILE.png)")
    parser.add_argument("--no-plot", action="store_true", help="write no PNG")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    return parser


def _picked(args: argparse.Namespace, name: str) -> bool:
    return args.case is None or any(text in name for text in args.case)


def _select(args: argparse.Namespace, size: str):
    """The cases to run: the chosen suites (filtered), plus the limits they are compared with."""
    from bench.suites import limits

    suites = args.suite or list(SUITES)
    specs = []
    for name in suites:
        if name == "limits":
            continue
        for spec in get_suite(name).cases(size, args.device):
            if _picked(args, spec.name):
                specs.append(spec)
    wanted = {s.bound for s in specs if s.bound}
    for spec in limits.cases(size, args.device):
        listed = "limits" in suites and _picked(args, spec.name)
        if listed or spec.bound in wanted:
            specs.append(spec)
    return specs


def _settings(args: argparse.Namespace, size: str):
    from bench.case import Settings

    repeat, warmup, budget, case_timeout, pg_timeout = _DEFAULTS[size]
    return Settings(
        size=size, device=args.device, repeat=args.repeat or repeat,
        warmup=warmup if args.warmup is None else args.warmup, budget_s=budget,
        case_timeout_s=args.timeout or case_timeout,
        pg_timeout_s=min(pg_timeout, args.timeout or pg_timeout),
        world_size=args.world_size,
    )


def _command(argv: list[str] | None, trun: tuple[int, int, int] | None, world_size: int) -> str:
    """The command line to rerun this measurement with."""
    text = " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    if trun is None:
        return f"python -m bench {text}".rstrip()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    nodes = world_size // max(per_node, 1)
    nnodes = f" --nnodes {nodes}" if nodes > 1 else ""
    return f"torchrun{nnodes} --nproc-per-node {per_node} -m bench {text}".rstrip()


def main(argv: list[str] | None = None) -> int:
    """Parses ``argv``, runs the selected cases, reports; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.world_size < 2:
        parser.error("--world-size must be at least 2 (multi-rank cases need two ranks)")
    for path in (args.json, args.plot):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            parser.error(f"cannot write {path!r}: its directory does not exist")
    if args.no_plot:
        args.plot = None
    elif args.plot is None and args.json:
        args.plot = os.path.splitext(args.json)[0] + ".png"
    size = "tiny" if args.tiny else args.size
    specs = _select(args, size)
    if not specs:
        parser.error(f"no case matches --case {' or '.join(map(repr, args.case))}")
    if args.list:
        for spec in specs:
            where = "all ranks" if spec.multi_rank else "1 process"
            print(f"{spec.suite:<11} {spec.name}  [{where}, bound {spec.bound or '-'}]")
        return 0

    import torch

    from bench import launch, report, runner
    from bench.case import case_row
    from bench.ranks import init_rank, print_stacks_on_fatal_signal

    # Single-process cases and torchrun ranks run here; the running case is on the
    # progress line.
    print_stacks_on_fatal_signal()
    warnings.filterwarnings("ignore", category=FutureWarning)
    settings = _settings(args, size)
    trun = launch.torchrun_env()
    if trun is not None:
        settings = replace(settings, world_size=trun[1])
    started = report.now_iso()
    progress = runner.Progress(len(specs), enabled=trun is None or trun[0] == 0)
    if args.device == "cuda" and not torch.cuda.is_available():
        why = (f"--device cuda: CUDA is not available on this machine (torch "
               f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}, "
               f"{torch.cuda.device_count()} devices); skipping all {len(specs)} cuda cases")
        progress.note(why)
        rows = [case_row(s, settings, "skipped", why) for s in specs]
    elif trun is not None:
        rank, world, local_rank = trun
        device = init_rank(args.device, rank, world, local_rank, settings.pg_timeout_s)
        try:
            rows = runner.run_torchrun(specs, settings, progress, device)
        finally:
            torch.distributed.destroy_process_group()
        if rows is None:  # not rank 0: rank 0 reports
            return 0
    else:
        multi_skip = None
        if args.device == "cuda" and torch.cuda.device_count() < settings.world_size:
            multi_skip = (f"needs {settings.world_size} GPUs for NCCL ranks, found "
                          f"{torch.cuda.device_count()}; use --world-size or torchrun on a "
                          f"multi-GPU machine")
        rows = runner.run_cases(specs, settings, progress, multi_skip)

    meta = {
        "command": _command(argv, trun, settings.world_size),
        "cwd": os.getcwd(),
        "date": started,
        "size": size,
        "device": args.device,
        "suites": args.suite or list(SUITES),
        "repeat": settings.repeat,
        "warmup": settings.warmup,
        "budget_s": settings.budget_s,
        "world_size": settings.world_size,
        "launcher": "torchrun" if trun else "spawned on 127.0.0.1",
        "backend": "nccl" if args.device == "cuda" else "gloo",
        **report.machine_info(),
    }
    bounds = report.finalize(rows)
    report.print_report(meta, bounds, rows)
    doc = report.to_json(meta, bounds, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        progress.note(f"wrote {args.json}")
    if args.plot:
        from bench.plot import plot

        problem = plot(doc, args.plot)
        progress.note(f"--plot: {problem}" if problem else f"wrote {args.plot}")
    counts = runner.describe_rows(rows)
    differ = [f"{r.suite}: {r.case}: {r.impl}" for r in rows if r.verified is False]
    progress.note("rows: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    if differ:
        progress.note("results that differ from PyTorch's: " + "; ".join(differ))
    return 1 if counts.get("error") or differ else 0
