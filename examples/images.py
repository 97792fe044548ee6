"""Image classifiers (an MLP and a small CNN) on Fashion-MNIST, trained by backprop, DFA or the shallow baseline.

The model and the data module know nothing of DFA: the training method is a Trainer flag only::

    python -m examples.images fit --model.arch=mlp                          # backprop
    python -m examples.images fit --model.arch=mlp --trainer.strategy=dfa   # Direct Feedback Alignment
    python -m examples.images fit --model.arch=cnn --trainer.strategy=dfa --trainer.max_epochs=5
    python -m examples.images fit --trainer.strategy=lightning_dfa.DFAStrategy --trainer.strategy.mode=shallow

Data (``examples/data/images.py``): Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (fetched
once with ``apt-get download`` into the cache directory), ``--data.dataset=torchvision`` to download it instead,
``--data.dataset=digits`` for scikit-learn's 8x8 digits. The last line printed after ``fit`` is the test error,
with the data set it was measured on (and the fallback, if Fashion-MNIST could not be had). Both networks are
plain ``nn.Sequential`` stacks, so DFA finds its feedback points by itself: after each Linear/Conv + activation
(+ pooling) group; the last Linear is the output. Measured results: ``docs/results_images.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from examples.data.images import ImageDataModule

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


def build_mlp(in_features: int, hidden: Sequence[int], num_classes: int, activation: str) -> nn.Sequential:
    """Flatten, then ``Linear + activation`` per hidden width, then a Linear output layer."""
    act = ACTIVATIONS[activation]
    layers: list[nn.Module] = [nn.Flatten()]
    d = in_features
    for h in hidden:
        layers += [nn.Linear(d, h), act()]
        d = h
    layers.append(nn.Linear(d, num_classes))
    return nn.Sequential(*layers)


def build_cnn(
    image_size: int, in_channels: int, channels: Sequence[int], fc: int, num_classes: int, activation: str
) -> nn.Sequential:
    """``Conv5x5 + activation + MaxPool2`` per channel width, then ``Linear(fc) + activation`` and the output."""
    act = ACTIVATIONS[activation]
    layers: list[nn.Module] = []
    c, side = in_channels, image_size
    for ch in channels:
        layers += [nn.Conv2d(c, ch, 5, padding=2), act(), nn.MaxPool2d(2)]
        c, side = ch, side // 2
    layers += [nn.Flatten(), nn.Linear(c * side * side, fc), act(), nn.Linear(fc, num_classes)]
    return nn.Sequential(*layers)


class ImageClassifier(pl.LightningModule):
    """An MLP or a small CNN for grey images; logs ``val_err``/``test_err`` (%) and accuracies.

    Args:
        arch: ``"mlp"`` or ``"cnn"``.
        hidden: hidden widths of the MLP.
        channels: channels of the CNN's conv layers (5x5, each followed by 2x2 max pooling).
        fc: width of the CNN's fully connected hidden layer.
        activation: ``"tanh"`` or ``"relu"``.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        schedule: ``"cosine"`` (decay the learning rate to zero over the Trainer's budget) or ``"constant"``.
        image_size, in_channels, num_classes: linked from the data module by the CLI.
    """

    def __init__(
        self,
        arch: str = "mlp",
        hidden: Sequence[int] = (800, 800),
        channels: Sequence[int] = (16, 32),
        fc: int = 128,
        activation: str = "tanh",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        schedule: str = "cosine",
        image_size: int = 28,
        in_channels: int = 1,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if arch not in ("mlp", "cnn"):
            raise ValueError(f"arch must be 'mlp' or 'cnn', got {arch!r}")
        if schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.save_hyperparameters()
        if arch == "mlp":
            self.net = build_mlp(in_channels * image_size * image_size, hidden, num_classes, activation)
        else:
            self.net = build_cnn(image_size, in_channels, channels, fc, num_classes, activation)
        self.last_metrics: dict[str, float] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch: Any, stage: str) -> None:
        x, y = batch
        logits = self(x)
        acc = (logits.argmax(-1) == y).float().mean()
        n = len(y)
        self.log(f"{stage}_loss", nn.functional.cross_entropy(logits, y), batch_size=n)
        self.log(f"{stage}_acc", 100.0 * acc, batch_size=n, prog_bar=True)
        self.log(f"{stage}_err", 100.0 * (1 - acc), batch_size=n, prog_bar=stage == "test")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if self.hparams.schedule == "constant":
            return opt
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# ------------------------------------------------------------------------------------------- CLI
def main(args: Any = None) -> Any:
    """LightningCLI entry point; prints the test error after ``fit``."""
    from pytorch_lightning.cli import LightningCLI

    import lightning_dfa  # noqa: F401  (registers strategy="dfa"; the model knows nothing of DFA)

    class ImagesCLI(LightningCLI):
        def add_arguments_to_parser(self, parser: Any) -> None:
            for key in ("image_size", "in_channels", "num_classes"):
                parser.link_arguments(f"data.{key}", f"model.{key}", apply_on="instantiate")
            parser.set_defaults({"trainer.max_epochs": 6})  # the MLP budget of docs/results_images.md

        def after_fit(self) -> None:
            if not self.trainer.fast_dev_run:
                results = self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
                if results:
                    r, dm = results[0], self.datamodule
                    print(f"test error: {r['test_err']:.2f}% (test accuracy {r['test_acc']:.2f}%) on the "
                          f"{len(dm.test_set):,} test images of {dm.describe()}")  # fmt: skip

    return ImagesCLI(ImageClassifier, ImageDataModule, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
