"""Pictures of benchmark results (matplotlib, Agg backend, PNG), drawn from the dicts the benchmarks produce.

- coldstart_plot: per image and network setting, a horizontal bar per contender split into its phases
  (pull, then the first run until the command's output), and the bytes each fetched (registry + store);
- weights_plot: GB/s per contender, grouped by network setting and checkpoint layout;
- compaction_plot: $/h and worker nodes over the trace per policy (the simulator's own plot_results).

Each writes the PNG atomically (a temporary name, then rename) and returns its path.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

BENCH_DIR = Path("/var/tmp/liftoff-bench")  # where the benchmarks leave their results and pictures
COLDSTART_LABELS = {
    "a": "(a) overlayfs",
    "b": "(b) liftoff, no profile",
    "c": "(c) liftoff + profile",
    "d": "(d) (c), no passthrough",
    "e": "(e) (c) by CRI PullImage",
    "p": "(p) (c) + passthrough",
    "r": "(r) (c), EROFS view",
    "s": "(s) (e), EROFS view",
}
PHASES = (("pull", "pull", "#4c72b0"), ("run", "first run (until its output)", "#dd8452"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    """Write `fig` as a PNG at `path` (nothing half-written under that name) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.partial")
    fig.savefig(temp, dpi=100, format="png", bbox_inches="tight")
    _pyplot().close(fig)
    os.replace(temp, path)
    return path


def coldstart_plot(report: dict, path: str | Path) -> Path:
    """benchmarks/coldstart.py's report ({"results": {"SETTING/IMAGE": {KEY: [sample dicts]}}}) as timelines:
    per SETTING/IMAGE, median pull then median first run per contender, and the median bytes fetched."""
    plt = _pyplot()
    groups = list(report["results"].items())
    if not groups:
        raise ValueError("the cold-start report has no results to plot")
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 1.0 + 1.7 * len(groups)), squeeze=False, width_ratios=[3, 1])
    for (group, by_key), (timeline, fetched) in zip(groups, axes, strict=True):
        keys = [k for k in COLDSTART_LABELS if by_key.get(k)][::-1]  # (a) on top
        labels = [COLDSTART_LABELS[k] for k in keys]
        left = [0.0] * len(keys)
        for phase, legend, color in PHASES:
            widths = [statistics.median(s[phase] for s in by_key[k]) for k in keys]
            timeline.barh(labels, widths, left=left, color=color, label=legend)
            left = [a + b for a, b in zip(left, widths, strict=True)]
        for y, total in enumerate(left):
            timeline.text(total, y, f" {total:.1f} s", va="center", fontsize=8)
        timeline.set_xlim(0, max(left) * 1.15 or 1)
        timeline.set_title(f"{group}: pull + first run (median of {len(by_key[keys[0]])})", fontsize=9)
        timeline.set_xlabel("seconds", fontsize=8)
        megabytes = [statistics.median(s["registry_bytes"] + s["store_bytes"] for s in by_key[k]) / 1e6 for k in keys]
        fetched.barh(labels, megabytes, color="#55a868")
        fetched.set_yticks(range(len(keys)), [""] * len(keys))
        fetched.set_title("fetched (MB)", fontsize=9)
        fetched.set_xlim(0, max(megabytes) * 1.3 or 1)
        for y, mb in enumerate(megabytes):
            fetched.text(mb, y, f" {mb:.0f}", va="center", fontsize=8)
        for ax in (timeline, fetched):
            ax.tick_params(labelsize=8)
            ax.grid(axis="x", alpha=0.3)
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def weights_plot(rows: list[dict], path: str | Path) -> Path:
    """benchmarks/weights.py's rows ({"setting", "layout", "contender", "gbps"} each) as GB/s bars, one group per
    setting and layout, a bar per contender in the order they ran."""
    plt = _pyplot()
    if not rows:
        raise ValueError("no weights results to plot")
    groups = list(dict.fromkeys((r["setting"], r["layout"]) for r in rows))
    contenders = list(dict.fromkeys(r["contender"] for r in rows))
    rate = {(r["setting"], r["layout"], r["contender"]): r["gbps"] for r in rows}
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.28 * len(groups) * len(contenders)))
    height = 0.8 / len(contenders)
    colors = plt.get_cmap("tab10")
    for i, contender in enumerate(contenders):
        ys = [g - 0.4 + height * (i + 0.5) for g in range(len(groups))]
        values = [rate.get((s, layout, contender), 0.0) for s, layout in groups]
        ax.barh(ys, values, height=height * 0.9, color=colors(i % 10), label=contender)
        for y, value in zip(ys, values, strict=True):
            if value:
                ax.text(value, y, f" {value:.2f}", va="center", fontsize=7)
    ax.set_yticks(range(len(groups)), [f"{s}\n{layout}" for s, layout in groups], fontsize=8)
    ax.invert_yaxis()  # the first group on top
    ax.set_xlabel("GB/s into memory (median run)")
    ax.set_xlim(0, max(rate.values()) * 1.15 or 1)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    fig.tight_layout()
    return _save(fig, path)


def compaction_plot(res: dict, path: str | Path) -> Path:
    """The compaction simulator's results (run with series=True) as $/h and nodes over the trace per policy."""
    from serve_integration.compaction.simulate import plot_results

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.partial.png")
    plot_results(res, str(temp))
    os.replace(temp, path)
    return path
