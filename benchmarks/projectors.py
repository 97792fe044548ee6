"""How DFA holds up when the feedback projection is done by imperfect hardware: dense, sketch, a ternarised error,
a simulated optical unit with 8-, 6- and 4-bit camera read-out, and additive noise at 20, 10 and 0 dB SNR.

Two models, every arm from the same seed, data order and budget; only ``DFAStrategy(projector=...)`` differs:

* ``mlp``: the Fashion-MNIST MLP of :mod:`examples.images` (784-800-800-10, tanh, Adam 1e-3 with a cosine decay);
* ``lm``: the character-level GPT-2 of :mod:`examples.language_model` (the demo's model, 1000 steps, cosine decay).

For each arm: the final metric (test error %, test bits/char), the alignment of the delivered signal with the
backprop gradient at the last feedback point (cosine, :class:`lightning_dfa.AlignmentMonitor`, last measurement),
and the median training-step time against the dense arm's. Each arm is written to its own JSON file as soon as
it ends, so a long run can be stopped and resumed arm by arm; ``--render`` writes ``docs/projectors.md`` and its
plot from the stored files::

    python -m benchmarks.projectors --domain mlp                 # every arm of the MLP (about 1-2 min per arm)
    python -m benchmarks.projectors --domain lm --arms dense,optical-4bit
    python -m benchmarks.projectors --render
    python -m benchmarks.projectors --domain mlp --quick --out /tmp/p   # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from lightning_dfa import AlignmentMonitor, DFAStrategy
from lightning_dfa.projectors import Dense, Noisy, Optical, Projector, Sketch, Ternarized

RESULTS = Path(__file__).resolve().parent / "results" / "projectors"
DOCS = Path(__file__).resolve().parents[1] / "docs"

#: the arms: name -> (what it is, the projector; ``None`` with mode ``shallow``/``bp`` for the references)
ARMS: dict[str, tuple[str, Callable[[], Projector] | None]] = {
    "dense": ("`Dense()`: the dense uniform matrix", Dense),
    "sketch": ("`Sketch(min_ratio=0)`: the structured matrix, also for a narrow error", lambda: Sketch(0)),
    "ternary": ("`Ternarized(Dense(), threshold=0.5)`", lambda: Ternarized(Dense(), 0.5)),
    "optical-8bit": ("`Optical(bits=8)`: ternary input (threshold 0.5), holography, 8-bit camera", lambda: Optical(8)),
    "optical-6bit": ("`Optical(bits=6)`", lambda: Optical(bits=6)),
    "optical-4bit": ("`Optical(bits=4)`", lambda: Optical(bits=4)),
    "noise-20db": ("`Noisy(Dense(), snr_db=20)`", lambda: Noisy(Dense(), 20.0)),
    "noise-10db": ("`Noisy(Dense(), snr_db=10)`", lambda: Noisy(Dense(), 10.0)),
    "noise-0db": ("`Noisy(Dense(), snr_db=0)`", lambda: Noisy(Dense(), 0.0)),
    "ternary-0.1": ("`Ternarized(Dense(), threshold=0.1)`", lambda: Ternarized(Dense(), 0.1)),
    "optical-8bit-0.1": ("`Optical(bits=8, threshold=0.1)`", lambda: Optical(bits=8, threshold=0.1)),
    "optical-6bit-0.1": ("`Optical(bits=6, threshold=0.1)`", lambda: Optical(bits=6, threshold=0.1)),
    "optical-4bit-0.1": ("`Optical(bits=4, threshold=0.1)`", lambda: Optical(bits=4, threshold=0.1)),
    "shallow": ('`mode="shallow"`: no feedback (reference)', None),
    "bp": ("backprop (reference)", None),
}
DOMAINS = ("mlp", "lm")
#: the MLP's budget: epochs of Fashion-MNIST (batch 128)
MLP_EPOCHS = 1
LM_STEPS = 1000


FINDINGS = """\
## What the numbers show

One seed per arm: differences under about 0.5 point of test error (MLP) or 0.02 bits/char (language model) are
within seed noise.

- **Noise is not where DFA breaks.** Additive Gaussian noise on the projection, independent per row and step,
  costs nothing measurable at 20 and 10 dB, and at 0 dB (noise as strong as the signal) 0.6 point of test error
  on the MLP and nothing on the language model (3.301 against 3.311 bits/char), although the alignment at the
  last point falls (MLP 0.40 to 0.32, language model 0.77 to 0.54). The update averages the noise over the rows
  and the steps; what the layers align with is the fixed part, `B e`.
- **Neither are the camera's bits.** The simulated read-out reaches 37, 25 and 13 dB SNR with 8, 6 and 4 bits
  (table above), and neither model tells them apart (MLP 16.2 / 16.3 / 16.0 % test error; language model 3.493
  with 8 bits, 3.496 with 4): consistent with the noise arms, 13 dB is already harmless.
- **The encoding is what costs, and where learning breaks down.** Ternarising the error (threshold 0.5 of each
  row's largest entry, rescaled to its norm) costs the MLP about 1 point (15.9 against 15.0 %) and the language
  model 0.19 bits/char (3.498 against 3.311, still 0.22 ahead of shallow); the simulated optical unit, which adds
  the Gaussian complex matrix and the camera to the same encoding, lands on the ternarised arm (MLP 16.0-16.3 %,
  language model 3.49-3.50). With a threshold of 0.1 learning breaks down: MLP 24.6 % with `Ternarized` and
  25.9-28.1 % through the optical unit, language model 4.067 bits/char, *worse than training no hidden layer at
  all* (shallow: 21.3 %, 3.718). The reason is the shape of a softmax + cross-entropy error: one negative entry
  (the target, `p - 1`) balanced by many small positive ones. At a low threshold most positive entries survive
  as `+1`, each as large as the target's `-1`, so every row's code is dominated by the same all-ones direction
  whatever its class: the feedback pushes every sample the same way (MLP alignment 0.06). At 0.5 only the target
  and its strongest competitors survive. `Optical` and `Ternarized` therefore default to 0.5.
- **Sketch** (forced onto these narrow errors with `min_ratio=0`) learns as the dense matrix does (MLP 14.9
  against 15.0 %, language model 3.322 against 3.311); its speed pays only on wide errors, where the `"auto"`
  recipe uses it ([performance](performance.md)).
- **Step time.** Everything here runs the projection on the CPU: the simulated unit (four complex products and
  the camera model per ternary error) costs 1.13-1.14x a dense DFA step on the MLP, whose step is little more
  than its three GEMMs, and 1.01-1.04x on the language model, where the projection is a small part of the step;
  the hashed noise of `Noisy` costs 1.23x and 1.02-1.04x. On a co-processor the projection would leave the host
  altogether.

Not measured here: a GPU (no GPU was available to this study), several seeds, and budgets beyond one epoch
(MLP) or 1000 steps (language model).
"""


class StepTimer(pl.Callback):
    """Wall time of each training step (batch start to batch end; place it last, after the alignment monitor,
    whose backprop probe runs at batch start)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu: list[float] = []
        self._t = self._c = 0.0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._t, self._c = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.times.append(time.perf_counter() - self._t)
        self.cpu.append(time.process_time() - self._c)


def _strategy(arm: str, seed: int) -> Any:
    if arm == "bp":
        return "auto"
    if arm == "shallow":
        return DFAStrategy(mode="shallow", seed=seed, verbose=False)
    make = ARMS[arm][1]
    assert make is not None
    return DFAStrategy(projector=make(), seed=seed, verbose=False)


def _fit(model: Any, data: Any, arm: str, seed: int, every: int, trainer_options: dict[str, Any]) -> dict[str, Any]:
    timer = StepTimer()
    monitor = AlignmentMonitor(every_n_steps=max(every, 1), plot=False)
    callbacks: list[pl.Callback] = [timer] if arm == "bp" or every <= 0 else [monitor, timer]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=_strategy(arm, seed),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
        **trainer_options,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    wall = time.perf_counter() - start
    history = [
        {"step": r.step, "mean": r.mean, "points": {k: p.mean for k, p in r.points.items()}} for r in monitor.history
    ]
    last_point = list(history[-1]["points"])[-1] if history else None
    return {
        "steps": int(trainer.global_step),
        "wall_s": round(wall, 1),
        "step_ms": round(1000 * statistics.median(timer.times[5:] or timer.times), 2),
        "step_cpu_ms": round(1000 * statistics.median(timer.cpu[5:] or timer.cpu), 2),
        "alignment": history,
        "last_point": last_point,
        "alignment_last": history[-1]["points"][last_point] if history else None,
    }


def run_mlp(arm: str, seed: int, quick: bool, timing_steps: int = 0) -> dict[str, Any]:
    from examples.data.images import ImageDataModule
    from examples.images import ImageClassifier

    pl.seed_everything(seed, workers=True, verbose=False)
    if quick:
        data = ImageDataModule(dataset="digits", batch_size=64, seed=seed)
    else:
        data = ImageDataModule(dataset="fashion_mnist", batch_size=128, seed=seed, fallback=False)
    data.setup("fit")
    small = {"hidden": (64, 64)} if quick else {}
    model = ImageClassifier(
        arch="mlp", lr=1e-3, image_size=data.image_size, in_channels=data.in_channels,
        num_classes=data.num_classes, **small,
    )  # fmt: skip
    options = {"max_steps": 6, "max_epochs": 1} if quick else {"max_epochs": MLP_EPOCHS}
    if timing_steps:
        return _fit(model, data, arm, seed, every=0, trainer_options={"max_steps": timing_steps})
    row = _fit(model, data, arm, seed, every=2 if quick else 143, trainer_options=options)
    results = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False).test(
        model, datamodule=data, verbose=False
    )
    row.update(metric="test error (%)", value=float(results[0]["test_err"]), higher_is_better=False)
    row["config"] = (
        "digits, 6 steps (quick)" if quick else f"Fashion-MNIST, {MLP_EPOCHS} epoch(s), batch 128"
    ) + ", Adam lr 1e-3, cosine decay"
    return row


def run_lm(arm: str, seed: int, quick: bool, timing_steps: int = 0) -> dict[str, Any]:
    from examples.language_model import LN2, AustenDataModule, CharGPT

    data = AustenDataModule(
        source="synthetic" if quick else "auto", block_size=32 if quick else 64, batch_size=8 if quick else 32,
        test_chars=2000 if quick else 50_000, eval_batch_size=64,
    )  # fmt: skip
    data.setup()
    steps = 6 if quick else LM_STEPS
    size = {"n_layer": 2, "n_embd": 32, "n_head": 2, "block_size": 32} if quick else {}
    pl.seed_everything(seed, verbose=False)
    model = CharGPT(**{"n_layer": 4, "n_embd": 128, "n_head": 4, "block_size": 64, **size}, lr=2e-3, lr_decay="cosine")
    if timing_steps:
        return _fit(model, data, arm, seed, every=0, trainer_options={"max_steps": timing_steps})
    row = _fit(model, data, arm, seed, every=2 if quick else 333, trainer_options={"max_steps": steps})
    row.update(
        metric="test bits/char",
        value=round(model.evaluate(data.test_dataloader()) / LN2, 4),
        higher_is_better=False,
        config=f"{steps} steps, batch {data.hparams.batch_size}, AdamW lr 2e-3, cosine decay"
        + (" (quick: synthetic text, tiny model)" if quick else ", test: first 50,000 characters of Persuasion"),
    )
    return row


def run(domain: str, arm: str, seed: int, quick: bool, out: Path) -> dict[str, Any]:
    torch.set_num_threads(1)
    row = (run_mlp if domain == "mlp" else run_lm)(arm, seed, quick)
    row.update(domain=domain, arm=arm, seed=seed, quick=quick, projector=ARMS[arm][0])
    row["run"] = {"date": time.strftime("%Y-%m-%d %H:%M"), "torch_threads": torch.get_num_threads()}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{domain}_{arm}.json").write_text(json.dumps(row, indent=1))
    return row


def timing(domain: str, arms: list[str], seed: int, rounds: int, steps: int, out: Path) -> dict[str, Any]:
    """Step time of each arm, interleaved: ``rounds`` rounds over the arms, ``steps`` training steps each (no
    alignment probe), the median per-step CPU time of the process (robust to other jobs on the machine) per round.
    Written to ``<out>/<domain>_timing.json``; the page reports each arm's median over rounds against dense's."""
    torch.set_num_threads(1)
    runner = run_mlp if domain == "mlp" else run_lm
    record: dict[str, Any] = {"domain": domain, "rounds": rounds, "steps": steps, "cpu_ms": {}, "wall_ms": {}}
    for _ in range(rounds):
        for arm in arms:
            row = runner(arm, seed, False, timing_steps=steps)
            record["cpu_ms"].setdefault(arm, []).append(row["step_cpu_ms"])
            record["wall_ms"].setdefault(arm, []).append(row["step_ms"])
            print(f"[projectors] timing {domain} {arm}: {row['step_cpu_ms']} ms CPU per step", flush=True)
    record["run"] = {"date": time.strftime("%Y-%m-%d %H:%M"), "torch_threads": torch.get_num_threads()}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{domain}_timing.json").write_text(json.dumps(record, indent=1))
    return record


def readout_snr(out: Path, seed: int = 0) -> dict[str, Any]:
    """Signal-to-noise ratio (dB) of the simulated optical read-out against the ideal one (no camera limits, same
    matrix and encoding), on softmax-minus-one-hot errors of the two models' widths (10 classes onto 800 features,
    98 characters onto 128). Written to ``<out>/readout_snr.json``."""
    g = torch.Generator().manual_seed(seed)
    record: dict[str, Any] = {}
    for name, k, width in (("mlp", 10, 800), ("lm", 98, 128)):
        logits = torch.randn(2048, k, generator=g) * 2
        error = torch.softmax(logits, -1)
        error[torch.arange(2048), torch.randint(0, k, (2048,), generator=g)] -= 1
        ideal = Optical(bits=None)
        ideal.setup(seed)
        clean = ideal.project(error, width)
        record[name] = {}
        for bits in (8, 6, 4):
            opu = Optical(bits=bits)
            opu.setup(seed)
            noise = opu.project(error, width) - clean
            record[name][f"{bits}-bit"] = round(10 * math.log10(clean.square().mean() / noise.square().mean()), 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "readout_snr.json").write_text(json.dumps(record, indent=1))
    return record


# ---------------------------------------------------------------------------------------------- the page
def load(folder: Path) -> dict[str, dict[str, dict[str, Any]]]:
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for path in sorted(folder.glob("*.json")):
        row = json.loads(path.read_text())
        if "domain" not in row:  # readout_snr.json
            continue
        if path.stem.endswith("_timing"):
            for arm, values in row["cpu_ms"].items():
                rows.setdefault(row["domain"], {}).setdefault(arm, {})["timing_cpu_ms"] = statistics.median(values)
            continue
        rows.setdefault(row["domain"], {}).setdefault(row["arm"], {}).update(row)
    return {d: {a: r for a, r in arms.items() if "value" in r} for d, arms in rows.items()}  # timed, not trained


def plot(rows: dict[str, dict[str, dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = [d for d in DOMAINS if d in rows]
    fig, axes = plt.subplots(len(domains), 2, figsize=(11, 3.4 * len(domains)), squeeze=False)
    for ax_row, domain in zip(axes, domains):
        arms = [a for a in ARMS if a in rows[domain]]
        values = [rows[domain][a]["value"] for a in arms]
        colors = ["#888888" if a in ("bp", "shallow") else "#3b75af" for a in arms]
        ax_row[0].barh(arms[::-1], values[::-1], color=colors[::-1])
        ax_row[0].set_xlabel(rows[domain][arms[0]]["metric"] + " (lower is better)")
        lo = min(values)
        ax_row[0].set_xlim(lo * 0.9, max(values) * 1.02)
        for a in arms:
            history = rows[domain][a].get("alignment") or []
            point = rows[domain][a].get("last_point")
            if history and point and a != "shallow":
                ax_row[1].plot([h["step"] for h in history], [h["points"][point] for h in history], marker="o", label=a)
        ax_row[1].set_xlabel("step")
        ax_row[1].set_ylabel("alignment at the last point (cosine)")
        ax_row[1].legend(fontsize=7, ncol=2)
        ax_row[0].set_title({"mlp": "Fashion-MNIST MLP", "lm": "character-level GPT-2"}[domain])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(domain_rows: dict[str, dict[str, Any]]) -> list[str]:
    dense = domain_rows.get("dense")
    metric = next(iter(domain_rows.values()))["metric"]
    lines = [
        f"| arm | projector | {metric} | alignment, last point | step time vs dense |",
        "|---|---|---|---|---|",
    ]
    for arm in ARMS:
        row = domain_rows.get(arm)
        if row is None:
            continue
        align = "-" if row.get("alignment_last") is None or arm == "shallow" else f"{row['alignment_last']:.3f}"
        if dense and "timing_cpu_ms" in row and "timing_cpu_ms" in dense:
            speed = f"{row['timing_cpu_ms'] / dense['timing_cpu_ms']:.2f}x"
        else:
            speed = "-"
        value = f"{row['value']:.2f}" if row["domain"] == "mlp" else f"{row['value']:.3f}"
        lines.append(f"| {arm} | {row['projector']} | {value} | {align} | {speed} |")
    return lines


def render(folder: Path, findings: str = "") -> str:
    rows = load(folder)
    plot(rows, DOCS / "img" / "projectors.png")
    lines = [
        "# Feedback projectors: DFA under noisy, quantised feedback",
        "",
        "`lightning_dfa.projectors` holds what computes the raw feedback `B e`: the interface (`Projector`, one",
        "method, `project(error, width)`), the random matrices (`Dense`, `Sketch`, `TopK`), a simulated optical",
        "co-processor (`Optical`) and wrappers that add a device's non-idealities to any projector (`Ternarized`,",
        "`Quantized`, `Noisy`). Usage and the interface: [options.md](options.md#projectors).",
        "",
        "## The study",
        "",
        "Each arm trains the same model from the same seed, data order and budget; only",
        "`DFAStrategy(projector=...)` differs (the rest is the default recipe). Produced by",
        "[`benchmarks/projectors.py`](../benchmarks/projectors.py); one JSON file per arm in",
        "[`benchmarks/results/projectors/`](../benchmarks/results/projectors/). Alignment: the cosine between the",
        "delivered signal and the backprop gradient at the last feedback point, per sample (MLP) or token (LM),",
        "averaged, at the last measurement (`AlignmentMonitor`). Step time: CPU time of a training step (one torch",
        "thread, a 2-core AMD EPYC CPU shared with other jobs) against the dense arm's, from a separate interleaved",
        "pass (`--timing`: rounds over the arms, 30 steps each, median per round, then median over rounds).",
        "Both models' errors are narrow (10 classes, 98 characters), so the default recipe's `Sketch` uses the",
        "dense matrix there: the dense arm is the default flag.",
        "",
    ]
    for domain in DOMAINS:
        if domain not in rows:
            continue
        first = next(iter(rows[domain].values()))
        title = {"mlp": "Fashion-MNIST MLP (784-800-800-10, tanh)", "lm": "Character-level GPT-2 (the demo's model)"}
        config = first["config"].replace(" 1 epochs", " 1 epoch")
        dense = rows[domain].get("dense", first)
        last = dense["alignment"][-1]["step"] if dense.get("alignment") else "-"
        lines += [
            f"### {title[domain]}",
            "",
            f"{config}; seed {first['seed']}. Last point: `{dense.get('last_point')}`, measured last at step "
            f"{last} of {dense['steps']}.",
            "",
        ]
        lines += table(rows[domain]) + [""]
        missing = [a for a in ARMS if a not in rows[domain] and not (domain == "lm" and a.startswith("optical-"))]
        if missing:
            lines += [f"Not run on this model: {', '.join(missing)}.", ""]
    snr = readout_snr(folder)
    lines += [
        "![test metric and alignment per arm](img/projectors.png)",
        "",
        "Read-out SNR of the simulated camera against an ideal one (same matrix, same ternary input), on",
        "softmax-minus-one-hot errors of each model's widths",
        "([`readout_snr.json`](../benchmarks/results/projectors/readout_snr.json)):",
        "",
        "| errors | " + " | ".join(snr["mlp"]) + " |",
        "|---|" + "---|" * len(snr["mlp"]),
        "| 10 classes onto 800 features | " + " | ".join(f"{v} dB" for v in snr["mlp"].values()) + " |",
        "| 98 characters onto 128 features | " + " | ".join(f"{v} dB" for v in snr["lm"].values()) + " |",
        "",
        findings,
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domain", choices=DOMAINS, help="the model to run the arms on")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {list(ARMS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="seconds per arm: tiny data and model (smoke run)")
    parser.add_argument("--out", default=str(RESULTS), help="folder of the per-arm JSON files")
    parser.add_argument("--render", action="store_true", help="write docs/projectors.md from the stored files")
    parser.add_argument(
        "--timing",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="instead of training runs: interleaved step timing, ROUNDS rounds over --arms",
    )
    parser.add_argument("--timing-steps", type=int, default=30, help="training steps per arm and round")
    parser.add_argument("--findings", default=None, help="a markdown file appended to the page")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*(does not have many workers|LeafSpec|tensorboardX).*")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    out = Path(args.out)
    if args.domain and args.timing:
        timing(args.domain, args.arms.split(","), args.seed, args.timing, args.timing_steps, out)
    elif args.domain:
        for arm in args.arms.split(","):
            if arm not in ARMS:
                parser.error(f"unknown arm {arm!r}; choose from {list(ARMS)}")
            row = run(args.domain, arm, args.seed, args.quick, out)
            align = row["alignment_last"]
            print(
                f"[projectors] {args.domain} {arm}: {row['metric']} {row['value']:.3f}, alignment "
                f"{'-' if align is None else f'{align:.3f}'}, {row['step_ms']} ms/step, {row['wall_s']} s",
                flush=True,
            )
    if args.render:
        findings = Path(args.findings).read_text() if args.findings else FINDINGS
        (DOCS / "projectors.md").write_text(render(out, findings))


if __name__ == "__main__":
    sys.exit(main())
