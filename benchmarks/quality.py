"""Quality benchmark: every example domain trained by backprop (``bp``), DFA (``dfa``) and the shallow baseline
(``shallow``: only the layers after the last feedback point learn), with fixed seeds and a stated budget.

Usage (from the repository root)::

    python -m benchmarks.quality                            # every domain, full budget -> docs/
    python -m benchmarks.quality --domains images,graphs    # some domains (the others' stored rows are kept)
    python -m benchmarks.quality --quick                    # smoke run: a few steps per arm, tiny data, -> a tmp dir
    python -m benchmarks.quality --jobs 4 --threads 1       # each (domain, part, arm) in its own process, 4 at a time
    python -m benchmarks.quality --render-only              # re-render the pages and plots from the stored rows

Output under ``--out`` (default ``docs/``): ``results.md`` (one summary table over the domains, linking each
domain's page), ``results_<domain>.md`` (the domain's tables and learning curves first, then its setup, how to
reproduce it, and what the numbers show and what did not work), the plots ``img/<domain>-<table>.png``, and the
raw rows with the run's date, machine and command in ``results/<domain>.json``. The pages are rendered from every
stored JSON, so a run of some domains keeps the rows of the others.

The contract for a domain (add a line to :data:`DOMAINS`)
---------------------------------------------------------
A domain is a module (``benchmarks.domains.<name>``) exposing::

    def quality_runs(quick: bool, seed: int = 0, arms: Sequence[str] = ("bp", "dfa", "shallow")) -> list[dict]

Each returned dict is one row (one trained arm, or a reference):

* ``table`` (str): sub-table title naming the data set, e.g. ``"Fashion-MNIST, MLP"`` (rows with the same title
  share a table and a plot);
* ``arm`` (str): ``"bp"``, ``"dfa"``, ``"shallow"``, a variant such as ``"dfa, feedback not propagated"``, or a
  reference (``"reference: ..."``, ``"ref: ..."``, ``"oracle ..."``);
* ``metric`` (str): what ``value`` is, e.g. ``"test error (%)"``; ``value`` (float);
* ``higher_is_better`` (bool, default ``False``);
* ``steps`` (int): optimizer steps; ``wall_s`` (float): training wall time in seconds;
* optional ``curve``: ``[[step, value], ...]`` for the learning-curve plot, with ``curve_metric`` (its label);
* optional ``config`` (str, shown in the table), ``extra`` (dict of other metrics, shown in the table; the key
  ``"4 d.p."`` holds the value printed to four decimals instead of two).

The module also defines ``TITLE`` (the page title, with the data set's name), ``NOTE`` (markdown: data, model,
budget; stored with the rows at run time) and ``FINDINGS`` (markdown: what the numbers show and what did not work;
read when rendering, so it can be edited and applied with ``--render-only``). Optional: ``PARTS`` (e.g.
``("mlp", "cnn")``: then ``quality_runs`` also takes ``part=``, and ``--jobs N`` runs each (domain, part, arm) in its
own process), ``BEST_VALIDATION = True`` (the tested weights are those of the best validation point: the plots
circle it), ``ARMS`` (the domain's arms when it has more than the three; ``--arms`` picks some) and
``plot_extra(record, img_dir) -> {caption: file name}`` (figures of its own, shown under its tables).
:func:`fit_arm` trains one arm of a LightningModule/LightningDataModule pair through ``DFAStrategy`` and returns
steps, wall time, curve and test metrics.

Quick mode (``--quick``) must finish in seconds per arm on a CPU without network: tiny data, a few steps.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ARMS = ("bp", "dfa", "shallow")

#: domain name -> module (see the contract above).
DOMAINS: dict[str, str] = {
    "images": "benchmarks.domains.images",
    "graphs": "benchmarks.domains.graphs",
    "language_model": "benchmarks.domains.language_model",
    "recommenders": "benchmarks.domains.recommenders",
    "nerf": "benchmarks.domains.nerf",
    "finetune": "benchmarks.domains.finetune",
}
_REFERENCE = re.compile(r"^(ref(erence)?\b|oracle\b)", re.IGNORECASE)
_PRECISE = "4 d.p."  # an ``extra`` key: the value printed to four decimals (AUC, RMSE)


def describe_machine() -> str:
    """The machine as a paper names it, e.g. ``"a 2-core CPU (AMD EPYC)"``; ``$QUALITY_MACHINE`` overrides it."""
    if os.environ.get("QUALITY_MACHINE"):
        return os.environ["QUALITY_MACHINE"]
    model = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.lower().startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    return f"a {os.cpu_count()}-core CPU ({model})"


# ---------------------------------------------------------------------------------------------- one arm
def fit_arm(
    make_model: Callable[[Any], Any],
    make_data: Callable[[], Any],
    arm: str,
    *,
    seed: int = 0,
    max_steps: int = -1,
    max_epochs: int | None = None,
    curve_metric: str = "val_loss",
    test_metrics: Sequence[str] = (),
    strategy_options: dict[str, Any] | None = None,
    trainer_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one arm with ``Trainer(strategy=DFAStrategy(mode=arm))`` and test it.

    Args:
        make_model: builds the LightningModule from the data module (after ``seed_everything``).
        make_data: builds the LightningDataModule.
        arm: ``"bp"``, ``"dfa"`` or ``"shallow"``.
        seed: seeds Lightning (weights, shuffling) and the feedback matrices.
        max_steps, max_epochs: the budget (as the Trainer's arguments).
        curve_metric: logged metric recorded after each validation for the learning curve.
        test_metrics: logged metrics read after ``trainer.test``.
        strategy_options: extra ``DFAStrategy`` options (``scale``, ``distinct``...).
        trainer_options: extra Trainer options (``check_val_every_n_epoch``...).

    Returns:
        ``{"steps", "wall_s" (fit only), "curve" ([[step, value]]), "metrics" ({name: value})}``.
    """
    import pytorch_lightning as pl

    from lightning_dfa import DFAStrategy

    if arm not in ARMS:
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
    pl.seed_everything(seed, workers=True, verbose=False)
    data = make_data()
    if hasattr(data, "setup"):
        data.setup("fit")
    model = make_model(data)
    curve = _CurveRecorder(curve_metric)
    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=max_steps,
        max_epochs=max_epochs,
        num_sanity_val_steps=0,
        deterministic=False,
    )
    options.update(trainer_options or {})
    strategy = DFAStrategy(mode=arm, seed=seed, verbose=False, **(strategy_options or {}))
    trainer = pl.Trainer(strategy=strategy, callbacks=[curve], **options)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    wall = time.perf_counter() - start
    metrics: dict[str, float] = {}
    if test_metrics:
        results = trainer.test(model, datamodule=data, verbose=False)
        metrics = {k: float(v) for k, v in (results[0] if results else {}).items() if k in test_metrics}
    return {"steps": int(trainer.global_step), "wall_s": wall, "curve": curve.points, "metrics": metrics}


def _curve_recorder_base() -> type:
    import pytorch_lightning as pl

    return pl.Callback


class _CurveRecorder(_curve_recorder_base()):  # type: ignore[misc]
    """Records ``(global_step, metric)`` after each validation run."""

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.points: list[list[float]] = []

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.metric)
        if value is not None:
            self.points.append([int(trainer.global_step), float(value)])


# ---------------------------------------------------------------------------------------------- running domains
def _module(domain: str) -> Any:
    """The domain's module, or ``None`` if it cannot be imported."""
    try:
        return importlib.import_module(DOMAINS[domain])
    except ImportError:
        return None


def run_domain(
    name: str, quick: bool, seed: int = 0, arms: Sequence[str] = ARMS, part: str | None = None
) -> dict[str, Any]:
    """Import the domain's module and call its ``quality_runs`` (with ``part=`` if given); returns the record."""
    module_name = DOMAINS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            return {"domain": name, "pending": f"`{module_name}` does not exist yet."}
        raise
    runner = getattr(module, "quality_runs", None)
    if runner is None:
        return {"domain": name, "pending": f"`{module_name}` has no `quality_runs(quick, seed, arms)` yet."}
    start = time.perf_counter()
    rows = runner(quick=quick, seed=seed, arms=tuple(arms), **({"part": part} if part is not None else {}))
    load = f" (load average {os.getloadavg()[0]:.1f} at the end)" if hasattr(os, "getloadavg") else ""
    return {
        "domain": name,
        "part": part,
        "rows": [_check_row(name, r) for r in rows],
        "note": getattr(module, "NOTE", ""),
        "quick": quick,
        "seed": seed,
        "total_s": time.perf_counter() - start,
        "machine": describe_machine() + load,
        "platform": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "torch_threads": _torch_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _check_row(domain: str, row: dict[str, Any]) -> dict[str, Any]:
    missing = [k for k in ("table", "arm", "metric", "value", "steps", "wall_s") if k not in row]
    if missing:
        raise ValueError(f"quality row of domain {domain!r} lacks {missing}: {row}")
    out = dict(row)
    out.setdefault("higher_is_better", False)
    out["value"] = float(out["value"])
    out["steps"] = int(out["steps"])
    out["wall_s"] = float(out["wall_s"])
    return out


# ---------------------------------------------------------------------------------------------- rendering
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def plot_curves(record: dict[str, Any], img_dir: Path) -> dict[str, str]:
    """One PNG per sub-table with each arm's learning curve; returns ``{table: file name}``.

    The title names the data set (the sub-table's title), the legend sits beside the axes, and when the domain
    tests the weights of the best validation point (``BEST_VALIDATION``), that point is circled on each curve.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    module = _module(record["domain"])
    best_validation = bool(getattr(module, "BEST_VALIDATION", False))
    files = {}
    tables: dict[str, list[dict[str, Any]]] = {}
    for row in record.get("rows", []):
        if row.get("curve"):
            tables.setdefault(row["table"], []).append(row)
    img_dir.mkdir(parents=True, exist_ok=True)
    for table, rows in tables.items():
        fig = Figure(figsize=(7.0, 3.6))
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        for row in rows:
            steps, values = zip(*row["curve"])
            (line,) = ax.plot(steps, values, marker="." if len(steps) < 40 else None, label=row["arm"])
            if best_validation:
                pick = max if row.get("higher_is_better") else min
                k = values.index(pick(values))
                ax.plot([steps[k]], [values[k]], "o", mfc="none", ms=10, color=line.get_color())
        if best_validation:
            ax.plot([], [], "o", mfc="none", ms=10, color="grey", label="best validation\n(weights tested)")
        ax.set_xlabel("optimizer steps")
        ax.set_ylabel(rows[0].get("curve_metric", rows[0]["metric"]))
        ax.set_title(table, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
        fig.tight_layout()
        name = f"{_slug(record['domain'])}-{_slug(table)}.png"
        fig.savefig(img_dir / name, dpi=90)
        files[table] = name
    extra = getattr(module, "plot_extra", None)  # a domain's own figures: {caption: file name}
    if callable(extra):
        files.update(extra(record, img_dir))
    return files


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """One sentence per sub-table comparing DFA with backprop and with the shallow baseline."""
    out = []
    tables: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        tables.setdefault(row["table"], {})[row["arm"]] = row
    for table, arms in tables.items():
        if not {"bp", "dfa", "shallow"} <= set(arms):
            continue
        d = 4 if any(_PRECISE in (r.get("extra") or {}) for r in arms.values()) else 2
        sign = 1.0 if arms["dfa"].get("higher_is_better") else -1.0
        bp, dfa, sh = (arms[a]["value"] for a in ("bp", "dfa", "shallow"))
        gain = sign * (dfa - sh)
        gap = sign * (bp - dfa)
        verdict = f"beats shallow by {gain:.{d}f}" if gain > 0 else f"does NOT beat shallow ({gain:+.{d}f})"
        out.append(
            f"{table}: DFA {verdict} ({arms['dfa']['metric']}: DFA {dfa:.{d}f}, shallow {sh:.{d}f}, backprop "
            f"{bp:.{d}f}); backprop is {abs(gap):.{d}f} {'better' if gap >= 0 else 'worse'} than DFA."
        )
    return out


def page_name(domain: str) -> str:
    """The file name of a domain's page, e.g. ``results_images.md``."""
    return f"results_{domain}.md"


def _value(row: dict[str, Any]) -> str:
    return str((row.get("extra") or {}).get(_PRECISE) or _fmt(row["value"]))


def _title(domain: str) -> str:
    return str(getattr(_module(domain), "TITLE", "") or domain)


def render_index(records: list[dict[str, Any]]) -> str:
    """``results.md``: one row per sub-table of every domain (backprop, DFA, shallow, references)."""
    lines = [
        "# Results: backprop, DFA and the shallow baseline",
        "",
        "Every example trained three ways from the same seed, with the same data and budget: `bp` (backprop), `dfa` "
        '(Direct Feedback Alignment, `Trainer(strategy="dfa")`) and `shallow` (only the layers after the last '
        "feedback point learn: the baseline DFA must beat). Each domain's page has the full tables, the learning "
        "curves, the setup, how to reproduce it and what did not work; its JSON file holds the raw rows with the "
        "run's date, machine and command. Written by `python -m benchmarks.quality` (rerun it rather than edit).",
        "",
        "| domain | table | metric | backprop | DFA | shallow | reference |",
        "|---|---|---|---|---|---|---|",
    ]
    for rec in records:
        domain = rec["domain"]
        link = f"[{domain}]({page_name(domain)}) ([json](results/{domain}.json))"
        if "pending" in rec:
            lines.append(f"| {link} | pending: {rec['pending']} | | | | | |")
            continue
        tables: dict[str, list[dict[str, Any]]] = {}
        for row in rec["rows"]:
            tables.setdefault(row["table"], []).append(row)
        for table, rows in tables.items():
            arms = {r["arm"]: r for r in rows}
            refs = "; ".join(
                f"{re.sub(r'^ref(erence)?: ', '', r['arm'])} {_value(r)}" for r in rows if _REFERENCE.match(r["arm"])
            )
            cells = [_value(arms[a]) if a in arms else "" for a in ARMS]
            direction = "higher is better" if rows[0].get("higher_is_better") else "lower is better"
            quick = " (quick smoke run, not a result)" if rec.get("quick") else ""
            lines.append(f"| {link} | {table}{quick} | {rows[0]['metric']}, {direction} | " + " | ".join(cells)
                         + f" | {refs} |")  # fmt: skip
    lines += [
        "",
        "Reproduce everything with `python -m benchmarks.quality --jobs 2 --threads 1` (hours on a 2-core CPU), one "
        "domain with `--domains NAME`, or check that it runs with `--quick` (seconds per arm, tiny data).",
    ]
    return "\n".join(lines) + "\n"


def render_page(rec: dict[str, Any], img_prefix: str = "img/") -> str:
    """A domain's page: its tables and plots first, then setup, how to reproduce, and its findings."""
    domain = rec["domain"]
    lines = [f"# {_title(domain)}", ""]
    if "pending" in rec:
        return "\n".join(lines + [f"Pending: {rec['pending']}", ""])
    if rec.get("quick"):
        lines += ["**Quick smoke run (not a result):** a few steps on tiny data.", ""]
    tables: dict[str, list[dict[str, Any]]] = {}
    for row in rec["rows"]:
        tables.setdefault(row["table"], []).append(row)
    images = rec.get("images", {})
    for table, rows in tables.items():
        extra_keys = sorted({k for r in rows for k in (r.get("extra") or {})} - {_PRECISE})
        head = ["arm", rows[0]["metric"], *extra_keys, "steps", "training time (s)", "config"]
        lines += [f"### {table}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            extra = [_fmt(r.get("extra", {}).get(k)) for k in extra_keys]
            cells = [r["arm"], _value(r), *extra, str(r["steps"]), f"{r['wall_s']:.1f}", r.get("config", "")]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        if table in images:
            lines += [f"![{table}]({img_prefix}{images[table]})", ""]
    for caption, image in images.items():
        if caption not in tables:
            lines += [f"![{caption}]({img_prefix}{image})", "", f"*{caption}*", ""]
    found = verdicts(rec["rows"])
    if found:
        lines += ["Computed from the rows above:", ""] + [f"- {v}" for v in found] + [""]
    threads = rec.get("torch_threads", 1)
    lines += [
        "## Setup",
        "",
        rec.get("note", ""),
        "",
        f"Machine: {rec.get('machine', 'not recorded')}, {threads} torch thread{'s' if threads != 1 else ''} per "
        f"process. Training times are comparable within a table only roughly when the machine was shared. Date, "
        f"command and timings of the run: [`results/{domain}.json`](results/{domain}.json).",
        "",
        "## How to reproduce",
        "",
        "```bash",
        f"python -m benchmarks.quality --domains {domain} --threads 1",
        "```",
        "",
    ]
    findings = str(getattr(_module(domain), "FINDINGS", "") or "")
    if findings:
        lines += ["## What the numbers show, and what did not work", "", findings.strip(), ""]
    return "\n".join(lines).rstrip() + "\n"


def render(records: list[dict[str, Any]], img_prefix: str = "img/") -> dict[str, str]:
    """``{file name: markdown}``: ``results.md`` and one ``results_<domain>.md`` per stored record."""
    pages = {"results.md": render_index(records)}
    for rec in records:
        pages[page_name(rec["domain"])] = render_page(rec, img_prefix)
    return pages


def write_pages(out: Path, records: list[dict[str, Any]]) -> list[Path]:
    """Write :func:`render`'s pages into ``out``; returns their paths."""
    paths = []
    for name, text in render(records).items():
        (out / name).write_text(text)
        paths.append(out / name)
    return paths


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 0.01 or value == 0 else f"{value:.3g}"
    return str(value)


def load_records(results_dir: Path) -> list[dict[str, Any]]:
    """Stored records in :data:`DOMAINS` order (then any other)."""
    found = {p.stem: json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))}
    order = [d for d in DOMAINS if d in found] + [d for d in found if d not in DOMAINS]
    return [found[d] for d in order]


def merge_records(records: list[dict[str, Any]], arms: Sequence[str]) -> dict[str, Any]:
    """One domain's record from records of the same domain run for different arms (rows deduplicated by
    ``(table, arm)``, arms in ``arms`` order within each table, other rows such as references last)."""
    base = next((r for r in records if "rows" in r), records[0])
    if "rows" not in base:
        return base
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for rec in records:
        for row in rec.get("rows", []):
            seen.setdefault((row["table"], row["arm"]), row)
    tables = list(dict.fromkeys(t for t, _ in seen))
    rank = {a: i for i, a in enumerate(arms)}
    rows = []
    for table in tables:
        keys = [k for k in seen if k[0] == table]
        rows += [seen[k] for k in sorted(keys, key=lambda k: rank.get(k[1], len(rank)))]
    merged = dict(base)
    merged["rows"] = rows
    merged["total_s"] = sum(r.get("total_s", 0.0) for r in records)
    return merged


def _run_jobs(domains: Sequence[str], arms: Sequence[str], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Run every (domain, arm) as its own ``python -m benchmarks.quality`` process, ``args.jobs`` at a time."""
    import subprocess

    tmp = Path(tempfile.mkdtemp(prefix="quality-jobs-"))
    pending = [(d, p, a) for d in domains for p in _parts(d) for a in _arms(d, arms)]
    running: list[tuple[str, str, Any, Any, Path]] = []
    while pending or running:
        while pending and len(running) < args.jobs:
            domain, part, arm = pending.pop(0)
            tag = f"{domain}-{part}-{arm}" if part else f"{domain}-{arm}"
            out = tmp / tag
            cmd = [sys.executable, "-m", "benchmarks.quality", "--domains", domain, "--arms", arm, "--seed",
                   str(args.seed), "--out", str(out)] + (["--quick"] if args.quick else [])  # fmt: skip
            cmd += ["--part", part] if part else []
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            log = open(tmp / f"{tag}.log", "w")  # noqa: SIM115 (closed below)
            print(f"[quality] start {tag} (log: {log.name})", flush=True)
            running.append((domain, tag, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log, out))
        time.sleep(1.0)
        for item in list(running):
            domain, tag, proc, log, out = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            if proc.returncode != 0:
                tail = Path(log.name).read_text()[-3000:]
                raise RuntimeError(f"quality job {tag} failed (exit {proc.returncode}):\n{tail}")
            print(f"[quality] done {tag}", flush=True)
    return collect(tmp, arms)


def collect(folder: Path, arms: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Merge the records that ``--jobs`` processes (or separate invocations with ``--out folder/<tag>``) stored
    in ``folder/*/results/<domain>.json``: one record per domain, with ``processes`` and ``span_s`` (from the first
    process's start to the last one's end)."""
    found: dict[str, list[tuple[dict[str, Any], float]]] = {}
    for path in sorted(Path(folder).glob("*/results/*.json")):
        found.setdefault(path.stem, []).append((json.loads(path.read_text()), path.stat().st_mtime))
    out = {}
    for domain, items in found.items():
        order = [p for p in _parts(domain) if p]
        rank = {p: i for i, p in enumerate(order)}
        items.sort(key=lambda it: min((rank[r["part"]] for r in [it[0]] if r.get("part") in rank), default=0))
        records = [r for r, _ in items]
        merged = merge_records(records, _arms(domain, arms))
        merged["processes"] = len(records)
        merged["span_s"] = max(t for _, t in items) - min(t - r.get("total_s", 0.0) for r, t in items)
        out[domain] = merged
    return out


def _arms(domain: str, arms: Sequence[str] | None) -> tuple[str, ...]:
    """``arms`` if given, else the domain module's ``ARMS`` (a domain with more arms than the three), else
    :data:`ARMS`."""
    return tuple(arms) if arms else tuple(getattr(_module(domain), "ARMS", None) or ARMS)


def _parts(domain: str) -> list[str | None]:
    """The domain module's ``PARTS`` (independent pieces ``--jobs`` may run apart), or ``[None]``."""
    return list(getattr(_module(domain), "PARTS", None) or [None])


_EXAMPLES = """examples:
  python -m benchmarks.quality --quick                # smoke run of every domain, to a temporary folder
  python -m benchmarks.quality --domains images --jobs 2 --threads 1   # one domain, 2 processes at a time
  python -m benchmarks.quality --render-only          # rewrite docs/results*.md from the stored rows
"""


def main(argv: Sequence[str] | None = None) -> Path:
    """Run the chosen domains, store their rows, and re-render the result pages and the plots."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.quality",
        description="Train every example domain with backprop (bp), DFA (dfa) and the shallow baseline (shallow:\n"
        "only the layers after the last feedback point learn), with fixed seeds, and write the result pages.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--domains", default=",".join(DOMAINS),
                        help=f"comma-separated domains to run (default: all of {', '.join(DOMAINS)})")  # fmt: skip
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: a few steps per arm on tiny data, seconds per arm; writes to a temporary "
                             "folder unless --out is given")  # fmt: skip
    parser.add_argument("--arms", default=None,
                        help="comma-separated arms: bp (backprop), dfa, shallow (default: all three, or the "
                             "domain's own arms)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, data order and feedback (default: 0)")
    parser.add_argument("--out", default=None,
                        help="output folder for results.md, the domain pages, img/ and results/ (default: docs/, "
                             "or a temporary folder with --quick)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads per process (default: torch's choice; 1 is fastest for these "
                             "small models on a shared machine)")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=1,
                        help="run each (domain, part, arm) as its own process, this many at a time (default: 1, "
                             "everything in this process)")  # fmt: skip
    parser.add_argument(
        "--part",
        default=None,
        help="only this part of a domain that has several (images: mlp, cnn; graphs: gcn, gat, cheb)",
    )
    parser.add_argument("--collect", default=None, metavar="FOLDER",
                        help="do not train: merge the records that separate processes stored under FOLDER/*/results/ "
                             "(as --jobs does) and render them")  # fmt: skip
    parser.add_argument("--render-only", action="store_true",
                        help="do not train: re-render the pages and redraw the plots from the stored rows in "
                             "<out>/results/")  # fmt: skip
    args = parser.parse_args(argv)
    if args.render_only:
        out = Path(args.out or "docs")
        records = load_records(out / "results")
        for record in records:
            if "rows" in record:
                record["images"] = plot_curves(record, out / "img")
        write_pages(out, records)
        return out / "results.md"

    domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown:
        parser.error(f"unknown domains {unknown}; choose from {list(DOMAINS)}")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else None
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="quality-")) if args.quick else Path("docs"))
    results_dir, img_dir = out / "results", out / "img"
    results_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.collect:
        records = {d: r for d, r in collect(Path(args.collect), arms).items() if d in domains}
    elif args.jobs > 1:
        records = _run_jobs(domains, arms, args)
    else:
        records = {}
        for name in domains:
            print(f"[quality] {name} ({'quick' if args.quick else 'full'}) ...", flush=True)
            records[name] = run_domain(name, args.quick, args.seed, _arms(name, arms), args.part)
    wall = time.perf_counter() - start
    for name, record in records.items():
        if "rows" in record:
            record["images"] = plot_curves(record, img_dir)
            record.setdefault("processes", 1)  # how many ran at a time is in record["command"] (--jobs)
            record["script_wall_s"] = record.get("span_s", wall)
            record["command"] = "python -m benchmarks.quality " + " ".join(argv if argv is not None else sys.argv[1:])
            for v in verdicts(record["rows"]):
                print(f"[quality]   {v}", flush=True)
        (results_dir / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    write_pages(out, load_records(results_dir))
    print(f"[quality] wrote {out / 'results.md'} and the domain pages ({wall / 60:.1f} min)", flush=True)
    return out / "results.md"


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
