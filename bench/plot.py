"""``--plot``: bandwidth against tensor size (sweep cases) and per case, as a PNG.

Works from the JSON document alone and imports neither torch nor the suites, so a
results file can be plotted elsewhere: ``python -m bench.plot results.json out.png``.
matplotlib is optional (the ``bench`` extra): without it :func:`plot` says so and the
run carries on.
"""

from __future__ import annotations

import json
import sys
from typing import Any

__all__ = ["main", "plot"]


def _import_pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on CI machines
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot(doc: dict[str, Any], path: str) -> str | None:
    """Writes the figure for a results document.

    Returns:
        None on success, else why nothing was written.
    """
    plt = _import_pyplot()
    if plt is None:
        return "matplotlib is not installed (pip install 'sdict_ext[bench]'); no plot written"
    rows = [r for r in doc["rows"] if r["status"] == "ok" and r["gbps"]]
    sweeps: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["plot"]:
            sweeps.setdefault(row["plot"]["group"], []).append(row)
    cases: dict[str, dict[str, float]] = {}
    for row in rows:
        if not row["plot"] and row["role"] in ("sdict_ext", "torch"):
            label = f"{row['suite']}: {row['case']}"
            best = cases.setdefault(label, {})
            key = "sdict_ext" if row["role"] == "sdict_ext" else "best PyTorch"
            best[key] = max(best.get(key, 0.0), row["gbps"])
    panels = len(sweeps) + (1 if cases else 0)
    if panels == 0:
        return "no measured rows to plot"

    heights = [4.0] * len(sweeps) + ([max(3.0, 0.32 * len(cases))] if cases else [])
    fig, axes = plt.subplots(panels, 1, figsize=(11, sum(heights)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    meta = doc["meta"]
    fig.suptitle(f"sdict_ext bench ({meta['size']}, {meta['device']}): "
                 f"{meta['machine']['cpu_model']}, {meta['date']}", fontsize=10)
    for ax, (group, group_rows) in zip(axes[:, 0], sweeps.items(), strict=False):
        by_impl: dict[str, list[tuple[float, float]]] = {}
        for row in group_rows:
            by_impl.setdefault(row["impl"], []).append((row["plot"]["x"], row["gbps"]))
        for impl, points in sorted(by_impl.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=impl)
        bound = next((r["bound_gbps"] for r in group_rows if r["bound_gbps"]), None)
        if bound:
            ax.axhline(bound, linestyle="--", color="gray",
                       label=f"bound: {group_rows[0]['bound']} {bound:.1f} GB/s")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(group_rows[0]["plot"]["xlabel"])
        ax.set_ylabel("GB/s")
        ax.set_title(group, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if cases:
        ax = axes[-1, 0]
        labels = list(cases)
        ys = range(len(labels))
        for offset, key in ((-0.2, "sdict_ext"), (0.2, "best PyTorch")):
            ax.barh([y + offset for y in ys], [cases[k].get(key, 0.0) for k in labels],
                    height=0.4, label=key)
        ax.set_yticks(list(ys))
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        # Log scale: cases span from collectives at MB/s to traversal-only offloads.
        ax.set_xscale("log")
        ax.set_xlabel("GB/s")
        ax.set_title("every other case", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.plot RESULTS.json OUT.png``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        sys.stderr.write("usage: python -m bench.plot RESULTS.json OUT.png\n")
        return 2
    with open(args[0]) as f:
        doc = json.load(f)
    problem = plot(doc, args[1])
    if problem:
        sys.stderr.write(problem + "\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
