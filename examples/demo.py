"""The main demo: backprop, DFA and the shallow baseline side by side on the character-level language model.

::

    python -m examples.demo            # a few minutes on a laptop CPU; Jane Austen's novels (offline source)
    python -m examples.demo --quick    # seconds: a smoke test on a tiny synthetic corpus

Each arm trains the same :class:`~examples.language_model.CharGPT` from the same seed with the same data order;
only the Trainer's ``strategy`` differs (backprop: ``"auto"``; DFA: :class:`lightning_dfa.DFAStrategy` with the
recommended recipe; shallow: ``DFAStrategy(mode="shallow")``, where only the layers after the last block
learn). At the end it prints a table (arm, steps, wall time, test loss and bits per character on Persuasion)
with the unigram/bigram/trigram references fitted on the same split, and a generated line per arm.

Experiments (``docs/results_language_model.md``) use the same script with other arms: ``--arm NAME:k=v,k=v``
where the keys are :class:`lightning_dfa.DFAConfig` options (``mode``, ``norm_jacobian``, ``distinct``,
``error_at``, ``placement``, ``distribution``, ``scale``...) or :class:`~examples.language_model.CharGPT`
arguments (``lr``, ``beta2``, ``n_layer``...); ``mode=bp`` trains with the plain ``"auto"`` strategy.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import sys
import time
import warnings
from typing import Any

import pytorch_lightning as pl
import torch

import lightning_dfa
from examples.language_model import LN2, AustenDataModule, CharGPT

#: The recommended DFA recipe for Transformers (see docs/results_language_model.md).
DFA_RECIPE: dict[str, Any] = {"mode": "dfa", "norm_jacobian": True}

#: The arms of the demo, in order.
ARMS: dict[str, dict[str, Any]] = {
    "backprop": {"mode": "bp"},
    "dfa": dict(DFA_RECIPE),
    "shallow": {"mode": "shallow"},
}

_DFA_KEYS = {f.name for f in dataclasses.fields(lightning_dfa.DFAConfig)}
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
            raise ValueError(f"Arm {name!r}: unknown option {key!r} (DFA: {sorted(_DFA_KEYS)}; "
                             f"model: {sorted(_MODEL_KEYS)}).")
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
            self.points.append({"step": trainer.global_step, "wall_s": round(self.train_seconds(), 1),
                                "bpc": round(bpc, 4)})
            print(f"  step {trainer.global_step}: {self.points[-1]['wall_s']:.0f} s, {bpc:.3f} bits/char (curve)",
                  flush=True)
            self._paused += time.perf_counter() - t0


def run_arm(name: str, options: dict[str, Any], dm: AustenDataModule, args: argparse.Namespace) -> dict[str, Any]:
    """Train one arm and evaluate it on the test text."""
    model_kw = {"n_layer": args.n_layer, "n_embd": args.n_embd, "n_head": args.n_head, "block_size": args.block_size,
                "lr": args.lr, "lr_decay": args.lr_decay}
    model_kw.update({k: v for k, v in options.items() if k in _MODEL_KEYS})
    dfa_kw = {k: v for k, v in options.items() if k in _DFA_KEYS}
    mode = dfa_kw.get("mode", "dfa")
    strategy: Any = "auto" if mode == "bp" else lightning_dfa.DFAStrategy(verbose=False, **dfa_kw)
    pl.seed_everything(args.seed, verbose=False)
    model = CharGPT(**model_kw)
    curve = CurveRecorder(dm._eval_loader("curve"), args.eval_every)
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=1,
        strategy=strategy,
        max_steps=args.steps,
        max_time={"seconds": args.time} if args.time else None,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=not args.no_progress,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[curve],
    )
    print(f"\n=== {name}: {mode} {dfa_kw if mode != 'bp' else ''} model {model_kw}", flush=True)
    trainer.fit(model, datamodule=dm)
    wall = curve.train_seconds()
    t0 = time.perf_counter()
    loss = model.evaluate(dm.test_dataloader())
    eval_s = time.perf_counter() - t0
    sample = model.sample("\n", args.sample_chars, seed=args.seed) if args.sample_chars else ""
    return {"arm": name, "options": options, "steps": trainer.global_step, "wall_s": round(wall, 1),
            "s_per_step": round(wall / max(trainer.global_step, 1), 3), "test_loss": round(loss, 4),
            "test_bpc": round(loss / LN2, 4), "eval_s": round(eval_s, 1), "curve": curve.points, "sample": sample}


def format_table(results: list[dict[str, Any]], refs: dict[str, float], test_chars: int) -> str:
    """The results table (markdown)."""
    lines = [f"Test: Persuasion ({test_chars} characters). Bits/char: lower is better.", "",
             "| arm | steps | wall time (s) | test loss (nats) | bits/char |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['arm']} | {r['steps']} | {r['wall_s']:.0f} | {r['test_loss']:.3f} | {r['test_bpc']:.3f} |")
    for k, v in refs.items():
        lines.append(f"| {k} reference | - | - | {v * LN2:.3f} | {v:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Parse arguments, train every arm, print the table; returns the per-arm results."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="seconds: tiny model, synthetic text, a few steps (CI)")
    p.add_argument("--arm", action="append", default=None,
                   help=f"an arm: a name from {list(ARMS)} or NAME:key=value,... (repeatable)")
    p.add_argument("--steps", type=int, default=None, help="training steps per arm (default 300; --quick: 8)")
    p.add_argument("--time", type=float, default=None, help="also stop each arm after this many seconds")
    p.add_argument("--source", default="auto", help="auto | debian | gutenberg | synthetic")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lr-decay", default="none", choices=["none", "cosine"], help="cosine: decay to 0 over --steps")
    p.add_argument("--test-chars", type=int, default=50_000, help="score this many characters of Persuasion")
    p.add_argument("--eval-every", type=int, default=0, help="record a learning curve every N steps")
    p.add_argument("--curve-chars", type=int, default=20_000, help="characters scored for the learning curve")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--accelerator", default="cpu", help="Lightning accelerator: cpu (default), gpu or auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-chars", type=int, default=160)
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs)")
    p.add_argument("--json", default=None, help="also write the results here")
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
    arms = [parse_arm(a) for a in (args.arm or list(ARMS))]

    start = time.perf_counter()
    dm = AustenDataModule(source=args.source, block_size=args.block_size, batch_size=args.batch_size,
                          test_chars=args.test_chars, eval_batch_size=64)
    dm.setup()
    dm.texts["curve"], dm.ids["curve"] = dm.texts["test"][: args.curve_chars], dm.ids["test"][: args.curve_chars]
    refs = dm.references()
    results = [run_arm(name, opts, dm, args) for name, opts in arms]
    total = time.perf_counter() - start

    print("\n" + format_table(results, refs, len(dm.texts["test"])))
    decay = "" if args.lr_decay == "none" else " with cosine decay"
    print(f"\nModel: GPT-2, {args.n_layer} layers, d {args.n_embd}, context {args.block_size}, "
          f"batch {args.batch_size}, Adam lr {args.lr}{decay}; {torch.get_num_threads()} torch threads; "
          f"total {total:.0f} s.")
    for r in results:
        first = next((ln for ln in r["sample"].splitlines() if ln.strip()), "")
        print(f"  {r['arm']:>10}: {first[:100]!r}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv, "args": vars(args), "refs": refs, "results": results, "total_s": total},
                      f, indent=1)
    return results


if __name__ == "__main__":
    main()
