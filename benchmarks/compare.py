"""Train one LightningModule three times (``bp``, ``dfa``, ``shallow``), everything else equal, and compare.

Usage (from the repository root; the default model is an MLP on scikit-learn's digits, offline, under a minute
on a CPU)::

    python -m benchmarks.compare                                  # -> compare_out/
    python -m benchmarks.compare --tsne last --align-every 10     # the run of docs/alignment.md
    python -m benchmarks.compare --factory mypkg.mymod:make      # your model: make(seed) -> (module, train, val)

Writes to ``--out``:

* ``compare_curves.png``: validation accuracy and loss per epoch and training loss, one line per mode;
* ``compare.md``: a markdown table of the final metrics (and the final alignment with ``--align-every``);
* ``compare.json``: the same, with the per-epoch curves, the command and the machine;
* ``compare_tsne.png`` with ``--tsne LAYER``: t-SNE (scikit-learn) of that module's output on the validation
  set, one panel per mode, coloured by label (``last`` = the last DFA block);
* ``<mode>/``: each run's CSV logs, and with ``--align-every N`` the run's ``alignment.png``.

Every run starts from the same seed, hence the same initial weights, data order, dropout masks and feedback
matrices; only the training rule changes. The module must log ``val_loss``/``val_acc`` (or name others with
``--metrics``) and ``train_loss``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dfa import DFAStrategy
from lightning_dfa.alignment import AlignmentMonitor, plot_alignment

MODES = ("bp", "dfa", "shallow")
Factory = Callable[[int], tuple[pl.LightningModule, DataLoader, DataLoader]]


# ---------------------------------------------------------------------------------------------- default model
class DigitsMLP(pl.LightningModule):
    """A 64-128-128-10 tanh MLP classifier for scikit-learn's 8x8 digits (two DFA blocks: ``net.1``, ``net.3``)."""

    def __init__(self, hidden: int = 128, lr: float = 1e-3) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 10)
        )
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def digits(seed: int, batch_size: int = 64) -> tuple[pl.LightningModule, DataLoader, DataLoader]:
    """The default factory: :class:`DigitsMLP` and digits split 80/20 (fixed split; shuffling seeded by ``seed``)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    cut = int(0.8 * len(y))
    train, val = order[:cut], order[cut:]
    shuffle = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(TensorDataset(x[train], y[train]), batch_size=batch_size, shuffle=True, generator=shuffle)
    val_loader = DataLoader(TensorDataset(x[val], y[val]), batch_size=512)
    return DigitsMLP(), train_loader, val_loader


# ---------------------------------------------------------------------------------------------- runs
class _Curves(pl.Callback):
    """Records the logged metrics after each epoch (training and validation)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        row = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
        row["epoch"] = trainer.current_epoch + 1
        self.rows.append(row)


def run_mode(
    factory: Factory,
    mode: str,
    out: Path,
    *,
    seed: int = 0,
    epochs: int = 15,
    align_every: int | None = None,
    strategy_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one mode; return its curves, final metrics, wall time, trained module, validation loader, engine."""
    pl.seed_everything(seed, verbose=False)
    module, train_loader, val_loader = factory(seed)
    curves = _Curves()
    callbacks: list[pl.Callback] = [curves]
    monitor = None
    if align_every:
        monitor = AlignmentMonitor(every_n_steps=align_every)
        callbacks.append(monitor)
    strategy = DFAStrategy(mode=mode, seed=seed, verbose=False, **(strategy_options or {}))
    trainer = pl.Trainer(
        strategy=strategy,
        max_epochs=epochs,
        callbacks=callbacks,
        logger=pl.loggers.CSVLogger(out, name=mode, version=""),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
    )
    start = time.perf_counter()
    trainer.fit(module, train_loader, val_loader)
    wall = time.perf_counter() - start
    final = dict(curves.rows[-1]) if curves.rows else {}
    if monitor is not None and monitor.latest is not None:
        last = strategy.dfa_engine.target.blocks[-1].name
        point = monitor.latest.points.get(last)
        final["alignment (last block)"] = point.mean if point else float("nan")
    return {
        "mode": mode,
        "curves": curves.rows,
        "final": final,
        "wall_s": wall,
        "steps": trainer.global_step,
        "module": module,
        "val_loader": val_loader,
        "blocks": [b.name for b in strategy.dfa_engine.target.blocks],
        "alignment_png": monitor.plot_path if monitor is not None else None,
        "monitor": monitor,
    }


def markdown_table(runs: Sequence[dict[str, Any]], metrics: Sequence[str]) -> str:
    """The final metrics of each run as a markdown table."""
    extra = ["alignment (last block)"] if any("alignment (last block)" in r["final"] for r in runs) else []
    cols = [*metrics, *extra]
    lines = ["| mode | " + " | ".join(cols) + " | steps | wall (s) |", "|---" * (len(cols) + 3) + "|"]
    for r in runs:
        cells = [f"{r['final'][c]:.4f}" if c in r["final"] else "-" for c in cols]
        lines.append(f"| {r['mode']} | " + " | ".join(cells) + f" | {r['steps']} | {r['wall_s']:.1f} |")
    return "\n".join(lines)


def plot_curves(runs: Sequence[dict[str, Any]], metrics: Sequence[str], path: Path, title: str) -> Path:
    """One panel per metric, one line per mode, over epochs (matplotlib Agg canvas, pyplot untouched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(metrics), 3.8), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        for r in runs:
            xs = [row["epoch"] for row in r["curves"] if metric in row]
            ax.plot(xs, [row[metric] for row in r["curves"] if metric in row], marker=".", label=r["mode"])
        ax.set_title(metric)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path)
    return path


@torch.no_grad()
def hidden_features(module: nn.Module, layer: str, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """The output of ``module.<layer>`` (flattened per sample) and the labels over ``loader`` (eval mode)."""
    target = module.get_submodule(layer)
    feats: list[torch.Tensor] = []
    handle = target.register_forward_hook(lambda m, a, o: feats.append((o[0] if isinstance(o, tuple) else o).cpu()))
    labels = []
    was_training = module.training
    module.eval()
    try:
        for x, y in loader:
            module(x.to(next(module.parameters()).device))
            labels.append(y)
    finally:
        handle.remove()
        module.train(was_training)
    return torch.cat([f.flatten(1) for f in feats]), torch.cat(labels)


def _thread_limit(threads: int | None) -> contextlib.AbstractContextManager[Any]:
    """Limit OpenMP/BLAS threads (scikit-learn's t-SNE is many times slower oversubscribed on a shared CPU)."""
    if threads is None:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads)


def plot_tsne(
    runs: Sequence[dict[str, Any]],
    layer: str,
    path: Path,
    seed: int = 0,
    max_points: int = 1000,
    threads: int | None = 1,
) -> Path:
    """t-SNE of ``layer``'s features on the validation set, one panel per run, points coloured by label."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.manifold import TSNE

    fig = Figure(figsize=(4.2 * len(runs), 4.2), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(runs), squeeze=False)[0]
    for ax, r in zip(axes, runs):
        name = r["blocks"][-1] if layer == "last" else layer
        feats, labels = hidden_features(r["module"], name, r["val_loader"])
        feats, labels = feats[:max_points], labels[:max_points]
        perplexity = min(30.0, max(2.0, (len(feats) - 1) / 3))
        tsne = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed, max_iter=500)
        with _thread_limit(threads):
            emb = tsne.fit_transform(feats.numpy())
        sc = ax.scatter(emb[:, 0], emb[:, 1], c=labels.numpy(), cmap="tab10", s=6)
        ax.set_title(f"{r['mode']}: {name}")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(sc, ax=list(axes), label="label", fraction=0.02)
    fig.suptitle(f"t-SNE of hidden features ({'last DFA block' if layer == 'last' else layer}) on the validation set")
    fig.savefig(path)
    return path


def compare(
    factory: Factory = digits,
    *,
    out: str | Path = "compare_out",
    modes: Sequence[str] = MODES,
    epochs: int = 15,
    seed: int = 0,
    metrics: Sequence[str] = ("val_acc", "val_loss", "train_loss"),
    tsne: str | None = None,
    tsne_points: int = 1000,
    align_every: int | None = None,
    strategy_options: dict[str, Any] | None = None,
    title: str | None = None,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Train ``factory(seed)``'s module once per mode and write the curves PNG, the table and (opt.) the t-SNE.

    Returns ``{"runs": [...], "table": str, "files": [Path, ...]}``.

    Example::

        from benchmarks.compare import compare
        result = compare(epochs=5, out="/tmp/cmp", tsne="last")
        print(result["table"])
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = "scikit-learn digits (8x8), MLP 64-128-128-10" if factory is digits else getattr(factory, "__name__", "")
    if title is None:
        title = f"{data}: bp vs dfa vs shallow".lstrip(": ")
    runs = [
        run_mode(factory, m, out, seed=seed, epochs=epochs, align_every=align_every, strategy_options=strategy_options)
        for m in modes
    ]
    table = markdown_table(runs, metrics)
    files = [plot_curves(runs, metrics, out / "compare_curves.png", title)]
    (out / "compare.md").write_text(f"# {title}\n\n{table}\n")
    files.append(out / "compare.md")
    record = {
        "title": title,
        "epochs": epochs,
        "seed": seed,
        "machine": _machine(),
        "runs": [{k: r[k] for k in ("mode", "final", "steps", "wall_s", "blocks", "curves")} for r in runs],
    }
    (out / "compare.json").write_text(json.dumps(record, indent=1) + "\n")
    files.append(out / "compare.json")
    if tsne:
        tsne_png = plot_tsne(runs, tsne, out / "compare_tsne.png", seed=seed, max_points=tsne_points, threads=threads)
        files.append(tsne_png)
    for r in runs:  # redraw each run's alignment plot with the data set in its title
        if r["monitor"] is not None and r["monitor"].history and r["alignment_png"] is not None:
            name = f"{data}: alignment with backprop (mode={r['mode']})".lstrip(": ")
            plot_alignment(r["monitor"].history, r["alignment_png"], title=name)
    files += [r["alignment_png"] for r in runs if r["alignment_png"] is not None and r["alignment_png"].exists()]
    return {"runs": runs, "table": table, "files": files}


def _machine() -> dict[str, Any]:
    """Where the comparison ran: CPU model and cores, torch threads and version, date, load average."""
    import os
    import platform

    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average": load,
    }


def _load_factory(spec: str) -> Factory:
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise SystemExit(f"--factory must look like package.module:function, got {spec!r}")
    return getattr(importlib.import_module(module_name), attr)


_EXAMPLES = """examples:
  python -m benchmarks.compare                               # an MLP on scikit-learn's digits -> compare_out/
  python -m benchmarks.compare --tsne last --align-every 10  # with a t-SNE and alignment plots
  python -m benchmarks.compare --factory mypkg.mymod:make    # your model: make(seed) -> (module, train, val)
"""


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse the command line, run :func:`compare`, print the table and the files written."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compare",
        description="Train one LightningModule with backprop (bp), DFA (dfa) and the shallow baseline (shallow:\n"
        "only the layers after the last feedback point learn), everything else equal, and compare the runs.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--factory",
        default=None,
        metavar="PKG.MOD:FN",
        help="your model: a function FN(seed) in module PKG.MOD returning (LightningModule, "
        "train DataLoader, validation DataLoader); default: an MLP on scikit-learn's digits",
    )
    parser.add_argument("--out", default="compare_out", help="output folder (default: compare_out)")
    parser.add_argument(
        "--modes",
        default=",".join(MODES),
        help="comma-separated modes: bp (backprop), dfa, shallow (default: all three)",
    )
    parser.add_argument("--epochs", type=int, default=15, help="training epochs per mode (default: 15)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, data order and feedback (default: 0)")
    parser.add_argument(
        "--metrics",
        default="val_acc,val_loss,train_loss",
        help="comma-separated logged metrics to plot and tabulate (default: val_acc,val_loss,train_loss)",
    )
    parser.add_argument(
        "--tsne",
        default=None,
        metavar="LAYER",
        help="also draw a t-SNE of this module's output on the validation set, one panel per mode "
        "('last': the last DFA block)",
    )
    parser.add_argument("--tsne-points", type=int, default=1000, help="validation samples in the t-SNE (default: 1000)")
    parser.add_argument(
        "--align-every",
        type=int,
        default=None,
        metavar="N",
        help="measure the alignment of the DFA signal with the true gradient every N steps "
        "(AlignmentMonitor) and write each run's alignment.png",
    )
    parser.add_argument("--title", default=None, help="title of the plots and the table (default: names the data set)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch and t-SNE CPU threads (default: 1, fastest for small models on a shared CPU)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    result = compare(
        _load_factory(args.factory) if args.factory else digits,
        out=args.out,
        modes=[m.strip() for m in args.modes.split(",") if m.strip()],
        epochs=args.epochs,
        seed=args.seed,
        metrics=[m.strip() for m in args.metrics.split(",") if m.strip()],
        tsne=args.tsne,
        tsne_points=args.tsne_points,
        align_every=args.align_every,
        title=args.title,
        threads=args.threads,
    )
    print(result["table"])
    print("wrote:", *[str(f) for f in result["files"]], sep="\n  ")
    print(f"total {time.perf_counter() - start:.1f} s")
    return result


if __name__ == "__main__":
    main()
