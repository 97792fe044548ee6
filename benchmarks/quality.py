"""Quality benchmark: every example domain trained by backprop (``bp``), DFA (``dfa``) and the shallow baseline
(``shallow``: only the layers after the last feedback point learn), with fixed seeds and a stated budget.

Usage (from the repository root)::

    python -m benchmarks.quality                            # every registered domain, full budget -> docs/
    python -m benchmarks.quality --domains images,graphs    # some domains (the others' stored rows are kept)
    python -m benchmarks.quality --quick                    # CI smoke: a few steps per arm, tiny data, -> a tmp dir
    python -m benchmarks.quality --jobs 4 --threads 1       # each (domain, arm) in its own process, 4 at a time
    python -m benchmarks.quality --render-only              # re-render docs/results.md from the stored rows

Output: ``<out>/results.md`` (one table per domain and sub-table: metric, arm, steps, wall time, machine, plus
the domain's notes), learning-curve PNGs in ``<out>/img/<domain>-<table>.png``, and the raw rows of each domain
in ``<out>/results/<domain>.json``. ``results.md`` is rendered from every stored JSON, so a run of some domains
keeps the rows of the others (each helper can run its own domain).

The contract for a domain (add a line to :data:`DOMAINS`)
---------------------------------------------------------
A domain is a module (``examples.<name>``) exposing::

    def quality_runs(quick: bool, seed: int = 0, arms: Sequence[str] = ("bp", "dfa", "shallow")) -> list[dict]

Each returned dict is one row (one trained arm):

* ``table`` (str): sub-table title, e.g. ``"Fashion-MNIST, MLP"`` (rows with the same title share a table);
* ``arm`` (str): ``"bp"``, ``"dfa"``, ``"shallow"`` (or a variant such as ``"dfa (error at head input)"``);
* ``metric`` (str): what ``value`` is, e.g. ``"test error (%)"``; ``value`` (float);
* ``higher_is_better`` (bool, default ``False``);
* ``steps`` (int): optimizer steps; ``wall_s`` (float): training wall time in seconds;
* optional ``curve``: ``[[step, value], ...]`` for the learning-curve plot, with ``curve_metric`` (its label);
* optional ``config`` (str, shown in the table), ``extra`` (dict of other metrics, shown in the table).

A module may define ``QUALITY_PARTS`` (e.g. ``("mlp", "cnn")``): then ``quality_runs`` also takes ``part=`` (one
of them, or ``None`` for all), and ``--jobs N`` runs each (domain, part, arm) in its own process, N at a time.

The module may also define ``QUALITY_NOTE`` (markdown: data, budget; stored with the rows at run time) and
``QUALITY_FINDINGS`` (markdown: what the numbers show, what else was tried; read when rendering, so it can be
written after a run and applied with ``--render-only``), both shown with its tables.
:func:`fit_arm` trains one arm of a LightningModule/LightningDataModule pair through ``DFAStrategy`` and returns
steps, wall time, curve and test metrics; domains may use it or train their own way.

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

#: domain name -> module. Modules that do not exist yet (or lack ``quality_runs``) are reported as pending.
DOMAINS: dict[str, str] = {
    "images": "examples.images",
    "graphs": "examples.graphs",
    # HOOK (language-model helper): examples/language_model.py should expose quality_runs(quick, seed, arms)
    # following the contract above; until it does, this domain is listed as pending in results.md.
    "language_model": "examples.language_model",
    # HOOK (issue 6): recommenders and NeRF add their rows the same way.
    "recommenders": "examples.recommenders",
    "nerf": "examples.nerf",
}
DEFAULT_MACHINE = "this 2-core CPU machine"


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
    return {
        "domain": name,
        "part": part,
        "rows": [_check_row(name, r) for r in rows],
        "note": getattr(module, "QUALITY_NOTE", ""),
        "quick": quick,
        "seed": seed,
        "total_s": time.perf_counter() - start,
        "machine": os.environ.get("QUALITY_MACHINE", DEFAULT_MACHINE)
        + (f" (load average {os.getloadavg()[0]:.1f} at the end)" if hasattr(os, "getloadavg") else ""),
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
    """One PNG per sub-table with each arm's curve; returns ``{table: file name}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    tables: dict[str, list[dict[str, Any]]] = {}
    for row in record.get("rows", []):
        if row.get("curve"):
            tables.setdefault(row["table"], []).append(row)
    img_dir.mkdir(parents=True, exist_ok=True)
    for table, rows in tables.items():
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        for row in rows:
            steps, values = zip(*row["curve"])
            ax.plot(steps, values, marker="." if len(steps) < 40 else None, label=row["arm"])
        ax.set_xlabel("optimizer steps")
        ax.set_ylabel(rows[0].get("curve_metric", rows[0]["metric"]))
        ax.set_title(f"{record['domain']}: {table}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        name = f"{_slug(record['domain'])}-{_slug(table)}.png"
        fig.savefig(img_dir / name, dpi=90)
        plt.close(fig)
        files[table] = name
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
        sign = 1.0 if arms["dfa"].get("higher_is_better") else -1.0
        bp, dfa, sh = (arms[a]["value"] for a in ("bp", "dfa", "shallow"))
        gain = sign * (dfa - sh)
        gap = sign * (bp - dfa)
        verdict = f"beats shallow by {gain:.2f}" if gain > 0 else f"does NOT beat shallow ({gain:+.2f})"
        out.append(
            f"{table}: DFA {verdict} ({arms['dfa']['metric']}: DFA {dfa:.2f}, shallow {sh:.2f}, backprop "
            f"{bp:.2f}); backprop is {gap:.2f} {'better' if gap >= 0 else 'worse'} than DFA."
        )
    return out


def render(records: list[dict[str, Any]], img_prefix: str = "img/") -> str:
    """The markdown of ``results.md`` from the stored domain records."""
    lines = [
        "# Quality results: backprop vs DFA vs shallow",
        "",
        "Written by `python -m benchmarks.quality` (do not edit by hand: rerun it). Arms: `bp` (backprop), `dfa` "
        "(Direct Feedback Alignment, `Trainer(strategy=\"dfa\")`), `shallow` (only the layers after the last "
        "feedback point learn). Wall time is training time only (no evaluation), on the machine named per domain.",
        "",
    ]
    for rec in records:
        lines += [f"## {rec['domain']}", ""]
        if "pending" in rec:
            lines += [f"Pending: {rec['pending']}", ""]
            continue
        mode = "quick smoke run (not a result)" if rec.get("quick") else "full run"
        processes = rec.get("processes", rec.get("jobs", 1))
        given = re.search(r"--jobs[ =](\d+)", rec.get("command", ""))  # how many ran at a time, if known
        at_once = f", at most {min(int(given.group(1)), processes)} at a time" if given else ""
        how = (
            f"its parts and arms ran as {processes} processes{at_once}, which took "
            f"{rec.get('script_wall_s', 0) / 60:.1f} min of wall time from the first start to the last end "
            f"({rec['total_s'] / 60:.1f} min summed over the processes)"
            if processes > 1
            else f"the domain's run took {rec['total_s'] / 60:.1f} min"
        )
        lines += [
            f"{mode}, seed {rec.get('seed', 0)}, {rec['date']}, machine: {rec['machine']} ({rec['platform']}, "
            f"{rec['torch_threads']} torch threads per process); {how}.",
            "",
        ]
        if rec.get("command"):
            lines += [f"Command: `{rec['command']}`", ""]
        if rec.get("note"):
            lines += [rec["note"], ""]
        tables: dict[str, list[dict[str, Any]]] = {}
        for row in rec["rows"]:
            tables.setdefault(row["table"], []).append(row)
        images = rec.get("images", {})
        for table, rows in tables.items():
            extra_keys = sorted({k for r in rows for k in (r.get("extra") or {})})
            head = ["arm", rows[0]["metric"], *extra_keys, "steps", "wall time (s)", "config", "machine"]
            lines += [f"### {table}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for r in rows:
                extra = [_fmt(r.get("extra", {}).get(k)) for k in extra_keys]
                cells = [r["arm"], _fmt(r["value"]), *extra, str(r["steps"]), f"{r['wall_s']:.1f}", r.get("config", ""),
                         rec["machine"]]  # fmt: skip
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
            if table in images:
                lines += [f"![{rec['domain']}: {table}]({img_prefix}{images[table]})", ""]
        found = verdicts(rec["rows"])
        if found:
            lines += ["Verdict (computed from the rows above):", ""] + [f"- {v}" for v in found] + [""]
        findings = _findings(rec["domain"])
        if findings:
            lines += [findings, ""]
    return "\n".join(lines).rstrip() + "\n"


def _findings(domain: str) -> str:
    """The domain module's current ``QUALITY_FINDINGS`` (markdown written after reading a run), if any."""
    module_name = DOMAINS.get(domain)
    if module_name is None:
        return ""
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return ""
    return str(getattr(module, "QUALITY_FINDINGS", "") or "")


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
    pending = [(d, p, a) for d in domains for p in _parts(d) for a in arms]
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


def collect(folder: Path, arms: Sequence[str] = ARMS) -> dict[str, dict[str, Any]]:
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
        merged = merge_records(records, arms)
        merged["processes"] = len(records)
        merged["span_s"] = max(t for _, t in items) - min(t - r.get("total_s", 0.0) for r, t in items)
        out[domain] = merged
    return out


def _parts(domain: str) -> list[str | None]:
    """The domain module's ``QUALITY_PARTS`` (independent pieces ``--jobs`` may run apart), or ``[None]``."""
    try:
        module = importlib.import_module(DOMAINS[domain])
    except ImportError:
        return [None]
    return list(getattr(module, "QUALITY_PARTS", None) or [None])


def main(argv: Sequence[str] | None = None) -> Path:
    """Run the chosen domains, store their rows, and re-render ``results.md`` and the plots."""
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--domains", default=",".join(DOMAINS), help=f"comma-separated, from {list(DOMAINS)}")
    parser.add_argument("--quick", action="store_true", help="a few steps per arm on tiny data (CI smoke)")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="output folder (default: docs/, or a tmp folder with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--jobs", type=int, default=1, help="run each (domain, arm) in its own process, N at a time")
    parser.add_argument("--part", default=None, help="only this part of the domain (see QUALITY_PARTS)")
    parser.add_argument("--collect", default=None, help="merge the records stored under this folder (see collect)")
    parser.add_argument("--render-only", action="store_true", help="re-render results.md from the stored rows")
    args = parser.parse_args(argv)
    if args.render_only:
        out = Path(args.out or "docs")
        (out / "results.md").write_text(render(load_records(out / "results")))
        return out / "results.md"

    domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown:
        parser.error(f"unknown domains {unknown}; choose from {list(DOMAINS)}")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
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
            records[name] = run_domain(name, args.quick, args.seed, arms, args.part)
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
    text = render(load_records(results_dir))
    (out / "results.md").write_text(text)
    print(f"[quality] wrote {out / 'results.md'} ({wall / 60:.1f} min)", flush=True)
    return out / "results.md"


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
