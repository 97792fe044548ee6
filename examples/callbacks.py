"""Callbacks shared by the examples (they know nothing of DFA)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch


class KeepBest(pl.Callback):
    """Keeps the weights of the best validation score and restores them when ``fit`` ends (early stopping
    without stopping: the Planetoid/GCN protocol, or the best epoch of a recommender).

    ``metric`` is read from ``trainer.callback_metrics`` (what the module logged), else from the module's
    ``last_metrics`` dict. The weights are kept in memory (a copy of the ``state_dict``), not on disk.

    Example:
        >>> cb = KeepBest("val_acc", higher_is_better=True)
        >>> cb.best is None
        True
    """

    def __init__(self, metric: str, higher_is_better: bool) -> None:
        self.metric, self.sign = metric, 1.0 if higher_is_better else -1.0
        self.best: float | None = None
        self.state: dict[str, torch.Tensor] | None = None
        self.step = 0

    def _value(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float | None:
        value = trainer.callback_metrics.get(self.metric)
        if value is None:
            value = getattr(pl_module, "last_metrics", {}).get(self.metric)
        return None if value is None else float(value)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = self._value(trainer, pl_module)
        if trainer.sanity_checking or value is None:
            return
        if self.best is None or self.sign * value > self.sign * self.best:
            self.best, self.step = value, trainer.global_step
            self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.state is not None:
            pl_module.load_state_dict(self.state)
