"""A LightningCLI entry point training a tiny MLP; used by ``tests/test_cli.py``.

``python tests/scripts/cli_train.py fit --trainer.strategy=dfa --model.report=out.json ...`` trains and writes
the strategy's class, its seed, the first and last losses and the number of feedback deliveries to ``report``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import lightning_dfa  # noqa: E402, F401  (registers "dfa")


class TinyModel(pl.LightningModule):
    """An MLP classifier on fixed random data with learnable labels."""

    def __init__(self, hidden: int = 16, lr: float = 0.5, report: str = "") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 3)
        )
        self.lr = lr
        self.report = report
        self.losses: list[float] = []
        self.deliveries = 0

    def on_fit_start(self) -> None:
        engine = getattr(self.trainer.strategy, "dfa_engine", None)
        if engine is not None:
            engine.feedback_observers.append(self._count)

    def _count(self, *args: Any) -> None:
        self.deliveries += 1

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = nn.functional.cross_entropy(self.net(batch[0]), batch[1])
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(96, 6, generator=g)
        y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()
        return DataLoader(TensorDataset(x, y), batch_size=16)

    def on_fit_end(self) -> None:
        if self.report:
            strategy = self.trainer.strategy
            engine = getattr(strategy, "dfa_engine", None)
            Path(self.report).write_text(
                json.dumps(
                    {
                        "strategy": type(strategy).__name__,
                        "seed": engine.config.seed if engine is not None else None,
                        "losses": self.losses,
                        "deliveries": self.deliveries,
                    }
                )
            )


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build the CLI (``args=None`` reads the command line)."""
    return LightningCLI(
        TinyModel,
        args=args,
        run=run,
        save_config_callback=None,
        trainer_defaults={"logger": False, "enable_checkpointing": False, "enable_progress_bar": False},
    )


if __name__ == "__main__":
    main()
