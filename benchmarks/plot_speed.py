"""The plot at the top of ``docs/performance.md``: DFA step time / backprop step time per arm, with its 25-75 %
range, next to the FLOP limit, from stored ``benchmarks/results/speed_*.json`` files (nothing is measured here).

Usage::

    python -m benchmarks.plot_speed                  # the default files -> docs/img/speed_ratios.png
    python -m benchmarks.plot_speed --files speed_cpu_v8k_sketch_keep.json --out /tmp/speed.png
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
#: (file, panel title): the default flag's runs of the headline table of docs/performance.md, then the GPU runs
DEFAULT_FILES = (
    ("speed_cpu_v8k_default_system.json", "GPT-2 d 256, V 8192, 2-core AMD EPYC CPU, glibc default malloc"),
    ("speed_cpu_v50k_default_system.json", "GPT-2 d 256, V 50257, 2-core AMD EPYC CPU, glibc default malloc"),
    ("speed_cpu_v50k_default_keep.json", "GPT-2 d 256, V 50257, 2-core AMD EPYC CPU, --malloc keep"),
    ("speed_cuda_gpt2small_32_h200.json", "GPT-2 small, V 50257, one H200, fp32"),
    ("speed_cuda_gpt2small_bf16-mixed_h200.json", "GPT-2 small, V 50257, one H200, bf16-mixed"),
)


def plot(files: Sequence[tuple[str, str]], out: Path) -> Path:
    """One panel per file: a bar per DFA arm (median wall ratio, 25-75 % range) and a tick at its FLOP limit."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11.0, 2.4 * len(files)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(files), 1, squeeze=False)[:, 0]
    for ax, (name, title) in zip(axes, files):
        record = json.loads((RESULTS / name).read_text())
        rows = [r for case in record["cases"] for r in case["rows"] if r.get("wall_ratio")]
        # in the runs of the default flag (the CPU's "default" runs, the H200's), the arm "dfa" is
        # Trainer(strategy="dfa") with no options
        default = "default" in name or "h200" in name
        labels = [r["arm"] + (" (default flag)" if r["arm"] == "dfa" and default else "") for r in rows]
        low, mid, high = zip(*(r["wall_ratio"] for r in rows))
        y = range(len(rows))
        ax.barh(y, mid, xerr=[[m - lo for m, lo in zip(mid, low)], [hi - m for m, hi in zip(mid, high)]],
                color="tab:blue", alpha=0.6, ecolor="dimgrey", label="measured (median, 25-75 %)")  # fmt: skip
        ax.plot([r["limit"] for r in rows], list(y), "|", color="tab:red", ms=14, mew=2.5, label="FLOP limit")
        ax.axvline(1.0, color="grey", lw=1, ls="--")
        ax.set_yticks(list(y), labels, fontsize=8)
        ax.set_xlim(0.6, 1.3)
        ax.set_title(f"{title} ({name})", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    axes[-1].set_xlabel("DFA step time / backprop step time (1 = as fast as backprop; lower is faster)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    return out


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plot_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", default=None,
                        help="comma-separated JSON files in benchmarks/results/ (default: the runs of the "
                             "headline table of docs/performance.md)")  # fmt: skip
    parser.add_argument("--out", default="docs/img/speed_ratios.png", help="PNG to write")
    args = parser.parse_args(argv)
    files = [(f, f.removesuffix(".json")) for f in args.files.split(",")] if args.files else list(DEFAULT_FILES)
    return plot(files, Path(args.out))


if __name__ == "__main__":
    print(main())
