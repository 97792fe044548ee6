"""Faults in a real process, for ``tests/test_reliability.py``: a ``kill -9`` mid-fit and a crashing DDP rank.

``python tests/scripts/fault_train.py OUT kill9 [strategy|callback]``: trains the tests' ``Classifier`` (Adam)
for 3 epochs with a checkpoint at the end of every epoch (``OUT/last.ckpt``) and sends itself ``SIGKILL`` at the
start of epoch 2, so it dies with no clean-up at all; the test resumes from ``OUT/last.ckpt``.

``python tests/scripts/fault_train.py OUT rank_crash``: trains with ``strategy="dfa_ddp"`` on 2 CPU processes
(gloo, Lightning's ``popen`` launcher); rank 1 raises at its third step. Every process writes
``OUT/rank<r>.json`` (the error it saw and the forward hooks left on its model) before it exits.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import Classifier, hooks_of, loader, mlp, trainer  # noqa: E402

import lightning_dfa  # noqa: E402  (registers "dfa", "dfa_ddp", ...)

EPOCHS = 3
KILLED_AT_EPOCH = 2


class KillAt(pl.Callback):
    """``SIGKILL`` this process at the start of an epoch: no exception, no teardown, nothing flushed."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == KILLED_AT_EPOCH:
            os.kill(os.getpid(), signal.SIGKILL)


def classifier() -> Classifier:
    torch.manual_seed(0)
    return Classifier(mlp(), lr=0.05, optimizer="adam")


def form(name: str) -> dict[str, Any]:
    """Trainer arguments of a DFA form."""
    if name == "callback":
        return {"callbacks": [lightning_dfa.DFA(verbose=False)]}
    return {"strategy": lightning_dfa.DFAStrategy(verbose=False), "callbacks": []}


def kill9(out: Path, name: str) -> None:
    args = form(name)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=out, filename="{epoch}", save_top_k=-1, save_last=True)
    args["callbacks"] += [checkpoint, KillAt()]
    trainer(max_epochs=EPOCHS, enable_checkpointing=True, default_root_dir=out, **args).fit(classifier(), loader())


class CrashingRank(Classifier):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.global_rank == 1 and self.global_step == 2:
            raise RuntimeError("rank 1 fails on purpose")
        return super().training_step(batch, batch_idx)


def rank_crash(out: Path) -> None:
    torch.manual_seed(0)
    model = CrashingRank(mlp())
    error = ""
    try:
        trainer(strategy="dfa_ddp", devices=2, max_epochs=1, use_distributed_sampler=False).fit(model, loader())
    except BaseException as exc:  # noqa: BLE001  (record what this process saw, then fail as it would)
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        (out / f"rank{rank}.json").write_text(json.dumps({"error": error[:500], "hooks": hooks_of(model)}))


if __name__ == "__main__":
    target, what = Path(sys.argv[1]), sys.argv[2]
    if what == "kill9":
        kill9(target, sys.argv[3] if len(sys.argv) > 3 else "strategy")
    else:
        rank_crash(target)
