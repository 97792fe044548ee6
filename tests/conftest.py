"""Shared tiny models and helpers for the tests (CPU, seeded, no downloads)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_dfa  # noqa: F401  (registers the strategy names)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # tiny models: one thread is fastest and deterministic


def mlp(
    width: int = 16, n_in: int = 6, n_out: int = 3, depth: int = 3, act: type[nn.Module] = nn.Tanh
) -> nn.Sequential:
    """``depth`` x (Linear + act), then a Linear head."""
    layers: list[nn.Module] = []
    d = n_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), act()]
        d = width
    layers.append(nn.Linear(d, n_out))
    return nn.Sequential(*layers)


class Classifier(pl.LightningModule):
    """A plain LightningModule around any classifier network (knows nothing of DFA)."""

    def __init__(self, net: nn.Module | None = None, lr: float = 0.1, optimizer: str = "sgd") -> None:
        super().__init__()
        self.net = net if net is not None else mlp()
        self.lr = lr
        self.optimizer = optimizer
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.losses.append(loss.item())
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def blobs(n: int = 128, n_in: int = 6, n_out: int = 3, seed: int = 0) -> TensorDataset:
    """A small, learnable classification set."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_in, generator=g)
    w = torch.randn(n_in, n_out, generator=g)
    return TensorDataset(x, (x @ w).argmax(1))


def loader(n: int = 128, batch_size: int = 16, **kw: Any) -> DataLoader:
    return DataLoader(blobs(n, **kw), batch_size=batch_size, shuffle=False)


def trainer(package: Any = pl, **kw: Any) -> pl.Trainer:
    """A quiet CPU Trainer (of ``package``: ``pytorch_lightning`` or ``lightning.pytorch``)."""
    opts: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=1,
    )
    opts.update(kw)
    return package.Trainer(**opts)


class GradRecorder(pl.Callback):
    """Copies every parameter's ``.grad`` after each backward."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor | None]] = []

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.grads.append(
            {n: None if p.grad is None else p.grad.detach().clone() for n, p in pl_module.named_parameters()}
        )


def hooks_of(module: nn.Module) -> int:
    """Number of forward (pre-)hooks left anywhere in ``module``."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` run only when asked for (``python -m pytest -m slow``, a separate CI step)."""
    if "slow" in (config.getoption("markexpr", "") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with `python -m pytest -m slow`")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class Said(logging.Handler):
    """Collects what is said through Lightning's ``rank_zero_info`` (the logger of Lightning's own messages)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def said() -> Iterator[Said]:
    from lightning_utilities.core import rank_zero

    logger = rank_zero.log  # the logger both Lightning packages' rank_zero_info write to
    handler, level = Said(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)
