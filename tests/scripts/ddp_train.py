"""Train a tiny MLP with DFA over DDP (CPU, gloo) in several configurations; used by ``tests/test_ddp.py``.

``python tests/scripts/ddp_train.py OUT_DIR CONFIG [CONFIG ...]`` starts rank 0; Lightning's ``popen`` launcher
starts rank 1 (which re-runs this script). Every configuration is trained in turn in the same process group, and
each process writes ``OUT_DIR/<config>.rank<r>.pt`` with its final weights, a hash of its feedback matrices and
a hash of every feedback signal it delivered. Rank 0 then waits for the process it launched and writes its exit
code to ``OUT_DIR/children.json``. The ``fork_*`` configurations use Lightning's fork launcher instead (run
them in a separate invocation). ``train()`` also gives the tests their single-process reference.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import lightning_dfa  # noqa: E402  (registers "dfa", "dfa_ddp", ...)

STEPS = 3
BATCH = 8

# strategy: "dfa_ddp" (DFADDPStrategy), "ddp" (Lightning's own) or a registered name; ddp: keyword arguments of
# the strategy; automatic: automatic optimization; callback: add the DFA callback; split: rank r trains on the
# r-th half of each batch of 2 * BATCH (otherwise every rank gets the same batch of BATCH); returns:
# training_step returns the loss; accumulate: accumulate_grad_batches (non-final micro-batches run under no_sync);
# aux: the layers are attributes and an auxiliary head reads the first one (made an output after the first step).
DEFAULTS: dict[str, Any] = {
    "strategy": "dfa_ddp",
    "ddp": {},
    "automatic": True,
    "callback": False,
    "split": False,
    "returns": True,
    "accumulate": 1,
    "aux": False,
}
CONFIGS: dict[str, dict[str, Any]] = {
    "auto_default": {},
    "auto_unused": {"ddp": {"find_unused_parameters": True}},
    "auto_static": {"ddp": {"static_graph": True}},
    "manual_default": {"automatic": False},
    "manual_unused": {"automatic": False, "ddp": {"find_unused_parameters": True}},
    "manual_static": {"automatic": False, "ddp": {"static_graph": True}},
    "manual_static_none": {"automatic": False, "ddp": {"static_graph": True}, "returns": False},
    "callback_auto": {"strategy": "ddp", "callback": True},
    "callback_manual": {"strategy": "ddp", "callback": True, "automatic": False},
    "callback_static": {"strategy": "ddp", "callback": True, "ddp": {"static_graph": True}},
    "split_auto": {"split": True},
    "split_static": {"split": True, "ddp": {"static_graph": True}},
    "split_manual_static": {"split": True, "automatic": False, "ddp": {"static_graph": True}},
    "split_callback": {"split": True, "strategy": "ddp", "callback": True},
    "split_accumulate": {"split": True, "accumulate": 2},
    # learned feedback: the processes average their updates of the feedback matrices (one all-reduce per backward)
    "split_learned": {"split": True, "ddp": {"feedback_learning": "kolen_pollack", "feedback_decay": 0.3}},
    # a head on the middle layer, found at the first loss and made an output: every process attaches again
    "split_aux": {"split": True, "aux": True},
    "split_aux_static": {"split": True, "aux": True, "ddp": {"static_graph": True}},
    # Lightning's fork launcher, the strategy by its registered name (a separate invocation of this script)
    "fork_split": {"strategy": "dfa_ddp_fork", "split": True},
    "fork_callback_split": {"strategy": "ddp_fork", "callback": True, "split": True},
    # control arm: plain backprop through Lightning's own DDP
    "bp_manual_static": {"strategy": "ddp", "automatic": False, "ddp": {"static_graph": True}},
}


def config(name: str) -> dict[str, Any]:
    """The full settings of a named configuration."""
    return {**DEFAULTS, **CONFIGS[name]}


def digest(tensor: torch.Tensor) -> str:
    """A hash of a tensor's exact values."""
    return hashlib.sha256(tensor.detach().to("cpu", torch.float64).contiguous().numpy().tobytes()).hexdigest()[:16]


class MLP(pl.LightningModule):
    """Linear+Tanh blocks and a linear head; automatic or manual optimization; records each feedback's hash.

    ``rank``: ``None`` trains on batches of ``BATCH`` rows (the same in every process), ``-1`` on the whole batches
    of ``2 * BATCH`` rows, ``"half"`` on this process's half of them (chosen in the process, at fit time).
    ``record``: a path prefix; every process writes ``<record>.rank<r>.pt`` at the end of ``fit``.
    """

    def __init__(
        self,
        automatic: bool = True,
        returns: bool = True,
        rank: int | str | None = None,
        record: str = "",
        aux: bool = False,
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
        if aux:  # the same layers as attributes, and a head on the first one
            self.l1, self.l2, self.aux, self.out = self.net[0], self.net[2], nn.Linear(16, 3), self.net[4]
            del self.net
        self.automatic_optimization = automatic
        self.returns = returns
        self.rank = rank
        self.record = record
        self.feedback_hashes: list[str] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "aux"):
            return nn.functional.cross_entropy(self(x), y)
        h = torch.tanh(self.l1(x))
        out = self.out(torch.tanh(self.l2(h)))
        return nn.functional.cross_entropy(out, y) + 0.3 * nn.functional.cross_entropy(self.aux(h), y)

    def train_dataloader(self) -> DataLoader:
        return data(self.global_rank if self.rank == "half" else self.rank)

    def on_fit_start(self) -> None:
        engine = find_engine(self.trainer)
        if engine is not None:
            engine.feedback_observers.append(self._observe)

    def _observe(self, error: torch.Tensor, points: list, feedback: list[torch.Tensor]) -> None:
        self.feedback_hashes.append(digest(torch.cat([f.flatten() for f in feedback])))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        loss = self.loss(*batch)
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return loss if self.returns else None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def on_fit_end(self) -> None:
        if not self.record:
            return
        engine = find_engine(self.trainer)
        record = {
            "weights": {k: v.detach().clone() for k, v in self.state_dict().items()},
            "feedback": self.feedback_hashes,
            "matrices": [digest(m) for _, m in sorted(engine.bank._matrices.items(), key=lambda kv: str(kv[0]))]
            if engine
            else [],
            "learned": [digest(m) for _, m in sorted(engine.learned.matrices.items())]
            if engine and engine.learned
            else [],
            "world_size": self.trainer.world_size,
            "strategy": type(self.trainer.strategy).__name__,
        }
        torch.save(record, f"{self.record}.rank{self.trainer.global_rank}.pt")


def find_engine(trainer: pl.Trainer) -> Any:
    """The DFA engine of a fit, from the strategy or the DFA callback."""
    engine = getattr(trainer.strategy, "dfa_engine", None)
    for cb in trainer.callbacks:
        engine = engine or getattr(cb, "dfa_engine", None)
    return engine


def data(rank: int | None = None) -> DataLoader:
    """``STEPS`` batches: of ``BATCH`` rows (``rank=None``), the ``rank``-th half of batches of ``2 * BATCH`` rows,
    or (``rank=-1``) the whole batches of ``2 * BATCH`` rows."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, 2 * BATCH, 6, generator=g)
    y = torch.randint(0, 3, (STEPS, 2 * BATCH), generator=g)
    if rank is None:
        x, y = x[:, :BATCH], y[:, :BATCH]
    elif rank >= 0:
        x, y = x[:, rank * BATCH : (rank + 1) * BATCH], y[:, rank * BATCH : (rank + 1) * BATCH]
    return DataLoader(TensorDataset(x.flatten(0, 1), y.flatten()), batch_size=x.shape[1], shuffle=False)


def train(
    strategy: Any,
    automatic: bool = True,
    callbacks: list | None = None,
    devices: int = 1,
    rank: int | str | None = None,
    returns: bool = True,
    record: str = "",
    accumulate: int = 1,
    aux: bool = False,
) -> tuple[MLP, pl.Trainer]:
    """Fit the MLP on the ``STEPS`` batches of :func:`data` (``rank`` as in :class:`MLP`), one optimizer step per
    ``accumulate`` batches."""
    model = MLP(automatic, returns, rank, record, aux)
    trainer = pl.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=devices,
        max_steps=STEPS // accumulate,
        accumulate_grad_batches=accumulate,
        callbacks=callbacks or [],
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model)
    return model, trainer


def main(out: Path, names: list[str]) -> None:
    procs: list = []
    for name in names:
        cfg = config(name)
        if cfg["strategy"] == "dfa_ddp":
            strategy: Any = lightning_dfa.DFADDPStrategy(verbose=False, **cfg["ddp"])
        elif cfg["strategy"] == "ddp":
            strategy = pl.strategies.DDPStrategy(**cfg["ddp"])
        else:  # a registered name
            strategy = cfg["strategy"]
        callbacks = [lightning_dfa.DFA(verbose=False)] if cfg["callback"] else []
        rank = "half" if cfg["split"] else None
        _, trainer = train(
            strategy,
            cfg["automatic"],
            callbacks,
            2,
            rank,
            cfg["returns"],
            str(out / name),
            cfg["accumulate"],
            cfg["aux"],
        )
        launched = getattr(getattr(trainer.strategy, "_launcher", None), "procs", [])
        procs = procs or [p for p in launched if isinstance(p, subprocess.Popen)]
    if procs:  # popen: rank 0 launched the other process; wait for it and report its exit code
        (out / "children.json").write_text(json.dumps([p.wait() for p in procs]))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # as PyTorch asks of a script, before the interpreter exits


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
