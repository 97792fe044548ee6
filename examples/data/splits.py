"""A LightningDataModule base for data held as ``train``/``val``/``test`` TensorDatasets."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


class SplitDataModule(pl.LightningDataModule):
    """Subclasses fill ``self.datasets`` in ``setup()`` and save ``batch_size`` and ``seed`` as hyperparameters.

    Training batches are shuffled by a generator seeded with ``seed``; evaluation batches are 4x larger, in order.
    """

    datasets: dict[str, TensorDataset]

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        if not self.datasets:
            self.setup()
        bs = self.hparams.batch_size * (1 if shuffle else 4)
        g = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(self.datasets[name], batch_size=bs, shuffle=shuffle, generator=g if shuffle else None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def describe(self) -> str:
        """The data set in words (for an example's last line); subclasses name it in :attr:`DATA_NAME`."""
        if not self.datasets:
            self.setup()
        return f"{self.DATA_NAME}, {len(self.datasets['test']):,} test examples"

    #: the data set's name, as the last line of an example prints it
    DATA_NAME = "the data set"
