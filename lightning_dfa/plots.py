"""Plots of the alignment history (matplotlib, imported on first use)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot_alignment(history: Sequence[Any], path: str | Path, title: str = "alignment with backprop") -> Path:
    """PNG of signal alignment per feedback point (mean, band of one std) and update alignment per block over steps.

    Uses matplotlib's Agg canvas directly (the global pyplot backend is left alone).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(11, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax_s, ax_w = fig.subplots(1, 2, sharey=True)
    steps = [r.step for r in history]
    point_keys = list(dict.fromkeys(k for r in history for k in r.points))
    for key in point_keys:
        xs = [r.step for r in history if key in r.points and not math.isnan(r.points[key].mean)]
        ms = [r.points[key].mean for r in history if key in r.points and not math.isnan(r.points[key].mean)]
        ss = [r.points[key].std for r in history if key in r.points and not math.isnan(r.points[key].mean)]
        (line,) = ax_s.plot(xs, ms, marker=".", label=key)
        ax_s.fill_between(
            xs, [m - s for m, s in zip(ms, ss)], [m + s for m, s in zip(ms, ss)], alpha=0.15, color=line.get_color()
        )
    for key in dict.fromkeys(k for r in history for k in r.weights):
        xs = [r.step for r in history if key in r.weights and not math.isnan(r.weights[key])]
        ax_w.plot(
            xs,
            [r.weights[key] for r in history if key in r.weights and not math.isnan(r.weights[key])],
            marker=".",
            label=key,
        )
    for ax, sub in ((ax_s, "signal at feedback point (mean ± std over samples)"), (ax_w, "weight update of block")):
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xlabel("optimizer step")
        ax.set_title(sub, fontsize=10)
        ax.set_ylim(-1.05, 1.05)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, title="point" if ax is ax_s else "block", title_fontsize=8)
    ax_s.set_ylabel("cosine similarity with backprop")
    if len(steps) == 1:
        for ax in (ax_s, ax_w):
            ax.set_xlim(steps[0] - 1, steps[0] + 1)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    return path
