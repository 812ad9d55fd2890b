"""What a run reports: machine and software, derived columns, the table, the JSON.

Derived columns, filled once every row exists:

* ``bound_gbps`` / ``pct_of_bound``: the best GB/s of the ``bound`` rows of the family
  a case names (``memcpy``, ``d2h``, ...), measured in the same run.
* ``ratio_torch_over_sdict``: on a PyTorch row, its median time over sdict_ext's median
  on the same case (above 1: sdict_ext is faster); on the sdict_ext row, the same against
  the fastest PyTorch row of the case.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any, TextIO

from bench.harness import ROLE_BOUND, ROLE_SDICT, ROLE_TORCH, Row
from bench.suites import SUITES

__all__ = ["SCHEMA_VERSION", "finalize", "machine_info", "now_iso", "print_report", "to_json"]

SCHEMA_VERSION = 1


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _git_commit(root: Path) -> str | None:
    """The checked-out commit, read from .git without running git."""
    head = _read(str(root / ".git" / "HEAD")).strip()
    if not head.startswith("ref: "):
        return head or None
    ref = head[5:]
    loose = _read(str(root / ".git" / ref)).strip()
    if loose:
        return loose
    for line in _read(str(root / ".git" / "packed-refs")).splitlines():
        if line.endswith(" " + ref):
            return line.split()[0]
    return None


def machine_info() -> dict[str, Any]:
    """The machine and software versions a result depends on."""
    import torch

    cpu = re.search(r"^model name\s*:\s*(.+)$", _read("/proc/cpuinfo"), re.MULTILINE)
    mem = re.search(r"^MemTotal:\s+(\d+) kB", _read("/proc/meminfo"), re.MULTILINE)
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    machine = {
        "hostname": platform.node(),
        "cpu_model": cpu.group(1).strip() if cpu else platform.processor(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "memory_bytes": int(mem.group(1)) * 1024 if mem else None,
        "os": platform.platform(),
        "kernel": platform.release(),
        "arch": platform.machine(),
        "gpus": [],
    }
    software = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
        "nccl": None,
        "sdict_ext": None,
        "sdict_ext_compiled": False,
        "sdict_ext_cuda": False,
        "git_commit": _git_commit(Path(__file__).resolve().parent.parent),
        "matplotlib": None,
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            machine["gpus"].append({"name": props.name, "memory_bytes": props.total_memory})
        try:
            software["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:
            software["nccl"] = None
    try:
        import sdict_ext
        from sdict_ext import ops

        software["sdict_ext"] = getattr(sdict_ext, "__version__", None)
        software["sdict_ext_compiled"] = ops.is_compiled()
        software["sdict_ext_cuda"] = ops.has_cuda()
    except Exception as exc:  # the report must still say what was measured
        software["sdict_ext"] = f"import failed: {exc}"
    try:
        import matplotlib

        software["matplotlib"] = matplotlib.__version__
    except ImportError:
        pass
    return {"machine": machine, "software": software}


def finalize(rows: list[Row]) -> dict[str, dict[str, Any]]:
    """Fills the derived columns in place; returns the bounds by family."""
    bounds: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row.role == ROLE_BOUND and row.status == "ok" and row.bound and row.gbps:
            best = bounds.get(row.bound)
            if best is None or row.gbps > best["gbps"]:
                bounds[row.bound] = {"gbps": row.gbps, "case": row.case, "impl": row.impl}
    for row in rows:
        if row.status == "ok" and row.gbps and row.bound in bounds:
            row.bound_gbps = bounds[row.bound]["gbps"]
            row.pct_of_bound = 100.0 * row.gbps / row.bound_gbps

    by_case: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        by_case.setdefault((row.suite, row.case), []).append(row)
    for case_rows in by_case.values():
        ok = [r for r in case_rows if r.status == "ok" and r.times_s]
        ours = [r for r in ok if r.role == ROLE_SDICT]
        theirs = [r for r in ok if r.role == ROLE_TORCH]
        if len(ours) != 1 or not theirs:
            continue
        mine = ours[0].times_s["median"]
        if mine <= 0:
            continue
        for row in theirs:
            row.ratio_torch_over_sdict = row.times_s["median"] / mine
        ours[0].ratio_torch_over_sdict = min(r.times_s["median"] for r in theirs) / mine
    return bounds


def to_json(meta: dict[str, Any], bounds: dict[str, Any], rows: list[Row]) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "meta": meta,
        "bounds": bounds,
        "rows": [r.to_json() for r in rows],
    }


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    return f"{ms:.2f}" if ms >= 0.1 else f"{ms:.3f}"


def _mb(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.1f}"


def _gbps(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if value >= 0.1 else f"{value:.3g}"


def _info(key: str, value: Any) -> str:
    """A suite's counter for the notes: per-rank lists as ``a/b/c``, bytes in MB."""
    if isinstance(value, list):
        return "/".join(_info(key, v) for v in value)
    if key.endswith("_bytes") and isinstance(value, int) and not isinstance(value, bool):
        return _mb(value)
    return str(value)


def _note(row: Row, repeat: int) -> str:
    if row.status != "ok":
        reason = (row.reason or "").strip()
        if row.status == "error" and len(reason) > 160:
            reason = reason[:157] + "..."
        return f"{row.status}: {reason}"
    notes = []
    if row.verified is True:
        notes.append("verified")
    elif row.verified is False:
        notes.append("RESULT DIFFERS")
    for key, stats in sorted(row.extra.items()):
        label = key[:-2] if key.endswith("_s") else key
        notes.append(f"{label} {_ms(stats['median'])} ms")
    for key, value in row.info.items():
        label = f"{key[:-6]} MB" if key.endswith("_bytes") else key
        notes.append(f"{label} {_info(key, value)}")
    if row.repeats and row.repeats < repeat:
        notes.append(f"{row.repeats} of {repeat} runs (time budget)")
    return ", ".join(notes)


_COLUMNS = ("impl", "median ms", "p10-p90 ms", "GB/s", "% bound", "torch/sdict",
            "host MB", "dev MB", "colls", "notes")


def _cells(row: Row, repeat: int) -> list[str]:
    if row.status != "ok":
        return [row.impl] + ["-"] * 8 + [_note(row, repeat)]
    t = row.times_s
    return [
        row.impl,
        _ms(t["median"]),
        f"{_ms(t['p10'])}-{_ms(t['p90'])}",
        _gbps(row.gbps),
        "-" if row.pct_of_bound is None else f"{row.pct_of_bound:.0f}%",
        "-" if row.ratio_torch_over_sdict is None else f"{row.ratio_torch_over_sdict:.2f}x",
        _mb(row.host_peak_bytes),
        _mb(row.device_peak_bytes),
        "-" if row.collectives is None else str(row.collectives),
        _note(row, repeat),
    ]


def _header(meta: dict[str, Any], bounds: dict[str, Any]) -> list[str]:
    m, s = meta["machine"], meta["software"]
    gpus = ", ".join(g["name"] for g in m["gpus"]) or "no GPU"
    mem = f"{m['memory_bytes'] / 2**30:.1f} GiB RAM" if m["memory_bytes"] else "RAM unknown"
    if s["sdict_ext_compiled"]:
        ext = "compiled" + (" with CUDA kernels" if s["sdict_ext_cuda"] else ", CPU kernels only")
    else:
        ext = "NOT compiled"
    lines = [
        f"sdict_ext benchmark: size {meta['size']}, device {meta['device']}, "
        f"multi-rank cases on {meta['world_size']} ranks ({meta['launcher']}, {meta['backend']})",
        f"command : {meta['command']}",
        f"date    : {meta['date']}",
        f"machine : {m['cpu_model']} ({m['cpus_usable']} CPUs usable of {m['cpu_count']}, {mem}), "
        f"{gpus}; {m['os']}",
        f"software: Python {s['python']}, torch {s['torch']} (CUDA {s['torch_cuda'] or 'none'}, "
        f"{s['torch_threads']} threads{', NCCL ' + s['nccl'] if s['nccl'] else ''}), "
        f"sdict_ext {s['sdict_ext']} ({ext}), git {(s['git_commit'] or 'unknown')[:12]}",
        f"timing  : median and p10-p90 of up to {meta['repeat']} runs after {meta['warmup']} "
        f"warm-up run(s), each capped at {meta['budget_s']:g}s per implementation "
        f"(at least 3 runs); GB/s = payload bytes / median (1 GB = 1e9 B)",
    ]
    if bounds:
        listed = ", ".join(f"{k} {v['gbps']:.2f} GB/s" for k, v in bounds.items())
        lines.append(f"bounds  : {listed}")
    return lines


def print_report(
    meta: dict[str, Any], bounds: dict[str, Any], rows: list[Row], out: TextIO | None = None
) -> None:
    """The header and one table per suite, cases in run order (on stdout by default)."""
    out = out if out is not None else sys.stdout
    for line in _header(meta, bounds):
        out.write(line + "\n")
    order = {name: i for i, name in enumerate(SUITES)}
    for suite in sorted({r.suite for r in rows}, key=lambda s: order.get(s, len(order))):
        suite_rows = [r for r in rows if r.suite == suite]
        table = [list(_COLUMNS)]
        case_of_line = [None]
        for row in suite_rows:
            table.append(_cells(row, meta["repeat"]))
            case_of_line.append(row.case)
        widths = [max(len(line[i]) for line in table) for i in range(len(_COLUMNS) - 1)]
        out.write(f"\n== {suite} ==\n")
        previous = None
        for i, line in enumerate(table):
            if case_of_line[i] is not None and case_of_line[i] != previous:
                out.write(f"{case_of_line[i]}\n")
                previous = case_of_line[i]
            cells = [
                cell.ljust(widths[j]) if j == 0 else cell.rjust(widths[j])
                for j, cell in enumerate(line[:-1])
            ]
            out.write("  " + "  ".join(cells) + ("  " + line[-1] if line[-1] else "") + "\n")


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
