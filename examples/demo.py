"""The main demo: backprop, DFA and the shallow baseline side by side on the character-level language model.

::

    python -m examples.demo            # about 3 minutes on an idle 2-core CPU; Jane Austen's novels (offline source)
    python -m examples.demo --quick    # seconds: a smoke test on a tiny synthetic corpus

Each arm trains the same :class:`~examples.language_model.CharGPT` from the same seed with the same data order;
only the Trainer's ``strategy`` differs (backprop: ``"auto"``; DFA: :class:`lightning_dfa.DFAStrategy` with the
library's default recipe; shallow: ``DFAStrategy(mode="shallow")``, where only the layers after the last block
learn). Progress shows as a bar in a terminal and as a line every tenth of the run when the output is redirected.
At the end it prints a table (arm, steps, training time, test loss and bits per character on the first 50,000
characters of Persuasion) with the unigram/bigram/trigram references fitted on the same split, a generated line
per arm, and the data set the numbers were measured on.

Other arms: ``--arm NAME:k=v,k=v`` where the keys are :class:`lightning_dfa.DFAConfig` options (``mode``,
``norm_jacobian``, ``distinct``, ``error_at``, ``placement``, ``distribution``, ``scale``...) or
:class:`~examples.language_model.CharGPT` arguments (``lr``, ``beta2``, ``n_layer``...); ``mode=bp`` trains with the
plain ``"auto"`` strategy. ``benchmarks/domains/language_model.py`` runs the same arms with a longer budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import os
import sys
import time
import warnings
from typing import Any

import pytorch_lightning as pl
import torch

import lightning_dfa
from examples.language_model import LN2, AustenDataModule, CharGPT

_DFA_KEYS = {f.name for f in dataclasses.fields(lightning_dfa.DFAConfig)}

#: The DFA arm: the library's default recipe, which on this pre-LN GPT-2 passes the feedback through the
#: LayerNorm Jacobian at each block output. (A DFAConfig without a ``recipe`` option needs it asked for.)
DFA_RECIPE: dict[str, Any] = {"mode": "dfa"}

#: The arms of the demo, in order.
ARMS: dict[str, dict[str, Any]] = {
    "backprop": {"mode": "bp"},
    "dfa": dict(DFA_RECIPE),
    "shallow": {"mode": "shallow"},
}

_ARCH_NAMES = {"gpt2": "GPT-2", "llama": "Llama"}
_MODEL_KEYS = set(inspect.signature(CharGPT.__init__).parameters) - {"self"}


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_arm(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name:k=v,k=v"`` (or a name from :data:`ARMS`) into ``(name, options)``.

    Example:
        >>> parse_arm("fast:mode=dfa,lr=0.003,distinct=true")
        ('fast', {'mode': 'dfa', 'lr': 0.003, 'distinct': True})
    """
    name, _, rest = spec.partition(":")
    if not rest:
        if name not in ARMS:
            raise ValueError(f"Unknown arm {name!r}: use one of {list(ARMS)} or NAME:key=value,...")
        return name, dict(ARMS[name])
    options = {}
    for item in rest.split(","):
        key, _, val = item.partition("=")
        if key not in _DFA_KEYS | _MODEL_KEYS:
            raise ValueError(
                f"Arm {name!r}: unknown option {key!r} (DFA: {sorted(_DFA_KEYS)}; model: {sorted(_MODEL_KEYS)})."
            )
        options[key] = _value(val)
    return name, options


class CurveRecorder(pl.Callback):
    """Every ``every`` steps: bits/char on ``loader`` and training wall time (evaluation time excluded)."""

    def __init__(self, loader: Any, every: int) -> None:
        self.loader, self.every = loader, every
        self.points: list[dict[str, float]] = []
        self._start, self._paused = 0.0, 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start, self._paused = time.perf_counter(), 0.0

    def train_seconds(self) -> float:
        """Wall time spent training so far (without the curve evaluations)."""
        return time.perf_counter() - self._start - self._paused

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.every and trainer.global_step % self.every == 0:
            t0 = time.perf_counter()
            bpc = pl_module.evaluate(self.loader) / LN2
            self.points.append(
                {"step": trainer.global_step, "wall_s": round(self.train_seconds(), 1), "bpc": round(bpc, 4)}
            )
            print(
                f"  step {trainer.global_step}: {self.points[-1]['wall_s']:.0f} s, {bpc:.3f} bits/char (curve)",
                flush=True,
            )
            self._paused += time.perf_counter() - t0


class StepProgress(pl.Callback):
    """Training progress by optimizer step: a bar in a terminal, else a line every ``every`` steps (so that
    redirected output shows progress too).

    Args:
        name: the arm's name, shown in front.
        total: the step budget.
        every: steps between two lines when the output is not a terminal (default: a tenth of ``total``).
        bar: draw a bar (default: when standard output is a terminal).
    """

    def __init__(self, name: str, total: int, every: int | None = None, bar: bool | None = None) -> None:
        self.name, self.total = name, total
        self.every = every or max(1, total // 10)
        self.bar = sys.stdout.isatty() if bar is None else bar
        self._tqdm: Any = None
        self._start = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()
        if self.bar:
            from tqdm import tqdm

            self._tqdm = tqdm(total=self.total, desc=f"{self.name:>10}", unit="step", file=sys.stdout, leave=True)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        step = trainer.global_step
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        loss_value = float(loss) if isinstance(loss, torch.Tensor) else float("nan")
        if self._tqdm is not None:
            self._tqdm.update(step - self._tqdm.n)
            self._tqdm.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
        elif step % self.every == 0 or step == self.total:
            elapsed = time.perf_counter() - self._start
            print(f"  {self.name}: step {step}/{self.total}, {elapsed:.0f} s, loss {loss_value:.3f}", flush=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None


def run_arm(name: str, options: dict[str, Any], dm: AustenDataModule, args: argparse.Namespace) -> dict[str, Any]:
    """Train one arm and evaluate it on the test text."""
    model_kw = dict(
        n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, block_size=args.block_size, lr=args.lr,
        lr_decay=args.lr_decay,
    )  # fmt: skip
    model_kw.update({k: v for k, v in options.items() if k in _MODEL_KEYS})
    dfa_kw = {k: v for k, v in options.items() if k in _DFA_KEYS}
    mode = dfa_kw.get("mode", "dfa")
    # the DFA arm shows where its feedback goes (a table at fit start); the shallow arm is the same model
    strategy: Any = "auto" if mode == "bp" else lightning_dfa.DFAStrategy(verbose=mode == "dfa", **dfa_kw)
    pl.seed_everything(args.seed, verbose=False)
    model = CharGPT(**model_kw)
    curve = CurveRecorder(dm._eval_loader("curve"), args.eval_every)
    callbacks: list[pl.Callback] = [curve]
    if not args.no_progress:
        callbacks.append(StepProgress(name, args.steps))
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=1,
        strategy=strategy,
        max_steps=args.steps,
        max_time={"seconds": args.time} if args.time else None,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    described = "backprop" if mode == "bp" else f"DFAStrategy({', '.join(f'{k}={v!r}' for k, v in dfa_kw.items())})"
    print(f"\n=== {name}: {described}", flush=True)
    trainer.fit(model, datamodule=dm)
    wall = curve.train_seconds()
    t0 = time.perf_counter()
    loss = model.evaluate(dm.test_dataloader())
    eval_s = time.perf_counter() - t0
    print(f"  {name}: {trainer.global_step} steps in {wall:.0f} s, test {loss / LN2:.3f} bits/char", flush=True)
    sample = model.sample("\n", args.sample_chars, seed=args.seed) if args.sample_chars else ""
    return {
        "arm": name, "options": options, "steps": trainer.global_step, "wall_s": round(wall, 1),
        "s_per_step": round(wall / max(trainer.global_step, 1), 3), "test_loss": round(loss, 4),
        "test_bpc": round(loss / LN2, 4), "eval_s": round(eval_s, 1), "curve": curve.points, "sample": sample,
    }  # fmt: skip


def format_table(results: list[dict[str, Any]], refs: dict[str, float], test_text: str) -> str:
    """The results table (markdown) with the n-gram references; ``test_text`` names what was scored."""
    lines = [
        f"Test: {test_text}. Bits/char: lower is better.",
        "",
        "| arm | steps | training time (s) | test loss (nats) | bits/char |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['arm']} | {r['steps']} | {r['wall_s']:.0f} | {r['test_loss']:.3f} | {r['test_bpc']:.3f} |")
    for k, v in refs.items():
        lines.append(f"| {k} reference | - | - | {v * LN2:.3f} | {v:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Parse arguments, train every arm, print the table; returns the per-arm results."""
    p = argparse.ArgumentParser(
        prog="python -m examples.demo",
        description=(__doc__ or "").split("\n\n")[0],
        epilog="Example: python -m examples.demo --steps 600 --arm backprop --arm dfa",
    )
    p.add_argument("--quick", action="store_true", help="seconds: tiny model, synthetic text, a few steps (CI)")
    p.add_argument("--arm", action="append", default=None, metavar="ARM",
                   help=f"an arm: one of {', '.join(ARMS)}, or NAME:key=value,... with DFAConfig options and "
                        "CharGPT arguments (repeatable; default: the three arms)")  # fmt: skip
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per arm (default 300; --quick: 8)")
    p.add_argument("--time", type=float, default=None, help="also stop each arm after this many seconds")
    p.add_argument("--source", default="auto",
                   help="text source: auto (Debian package, else a synthetic text, said in the output), debian, "
                        "gutenberg (online) or synthetic")  # fmt: skip
    p.add_argument("--n-layer", type=int, default=4, help="layers (default 4)")
    p.add_argument("--n-embd", type=int, default=128, help="width (default 128)")
    p.add_argument("--n-head", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--block-size", type=int, default=64, help="context in characters (default 64)")
    p.add_argument("--batch-size", type=int, default=32, help="windows per batch (default 32)")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default 2e-3)")
    p.add_argument("--lr-decay", default="none", choices=["none", "cosine"],
                   help="none (default) or cosine: decay the learning rate to 0 over --steps")  # fmt: skip
    p.add_argument("--test-chars", type=int, default=50_000,
                   help="score this many characters of Persuasion (default 50,000)")  # fmt: skip
    p.add_argument("--eval-every", type=int, default=0,
                   help="record a learning curve every N steps (default 0: none)")  # fmt: skip
    p.add_argument("--curve-chars", type=int, default=20_000,
                   help="characters of Persuasion scored for the learning curve (default 20,000)")  # fmt: skip
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: fastest for this small model, and much faster than "
                        "several on a shared machine)")  # fmt: skip
    p.add_argument("--accelerator", default="cpu", help="Lightning accelerator: cpu (default), gpu or auto")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, data order and feedback (default 0)")
    p.add_argument("--sample-chars", type=int, default=160, help="characters generated per arm (default 160)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.source, args.n_layer, args.n_embd, args.n_head = "synthetic", 2, 32, 2
        args.steps = args.steps or 8
        args.block_size, args.batch_size, args.test_chars, args.sample_chars = 32, 8, 2000, 40
        args.curve_chars = 1000
    args.steps = args.steps or 300
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*(does not have many workers|LeafSpec|tensorboardX).*")
    for logger_name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(logger_name).setLevel(logging.WARNING)  # no "GPU available" lines per arm
    arms = [parse_arm(a) for a in (args.arm or list(ARMS))]

    models = ", ".join(sorted({_ARCH_NAMES.get(opts.get("arch", "gpt2"), "?") for _, opts in arms}))
    start = time.perf_counter()
    dm = AustenDataModule(
        source=args.source, block_size=args.block_size, batch_size=args.batch_size, test_chars=args.test_chars,
        eval_batch_size=64,
    )  # fmt: skip
    dm.setup()
    dm.texts["curve"], dm.ids["curve"] = dm.texts["test"][: args.curve_chars], dm.ids["test"][: args.curve_chars]
    refs = dm.references()
    print(
        f"Data: {len(dm.texts['train']):,} training characters; test: {dm.describe()}. Model: {models}, "
        f"{args.n_layer} layers, d {args.n_embd}, context {args.block_size}; {args.steps} steps per arm, "
        f"{torch.get_num_threads()} torch thread(s).",
        flush=True,
    )
    results = [run_arm(name, opts, dm, args) for name, opts in arms]
    total = time.perf_counter() - start

    print()
    for r in results:
        first = next((ln for ln in r["sample"].splitlines() if ln.strip()), "")
        if first:
            print(f"  sample, {r['arm']:>10}: {first[:100]!r}")
    decay = "" if args.lr_decay == "none" else " with cosine decay"
    print(
        f"\nModel: {models}, {args.n_layer} layers, d {args.n_embd}, context {args.block_size}, "
        f"batch {args.batch_size}, AdamW lr {args.lr}{decay}; {torch.get_num_threads()} torch "
        f"thread(s); total {total:.0f} s.\n"
    )
    print(format_table(results, refs, dm.describe()))
    if args.json:
        with open(args.json, "w") as f:
            record = {"argv": sys.argv, "args": vars(args), "refs": refs, "results": results, "total_s": total}
            json.dump(record, f, indent=1)
    return results


if __name__ == "__main__":
    main()
