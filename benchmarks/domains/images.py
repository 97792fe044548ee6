"""Quality runs of the image example (:mod:`examples.images`): an MLP and a CNN on Fashion-MNIST, every arm."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from benchmarks.quality import ARMS, fit_arm
from examples.data.images import ImageDataModule
from examples.images import ImageClassifier

TITLE = "Fashion-MNIST: an MLP and a CNN"

#: Budget of the full run (one seed per arm), per architecture: the same for every arm.
BUDGET: dict[str, dict[str, Any]] = {
    "mlp": {"epochs": 6, "lr": 1e-3},
    "cnn": {"epochs": 2, "lr": 1e-3},
}
PARTS = ("mlp", "cnn")

NOTE = (
    "Fashion-MNIST from the Debian package `dataset-fashion-mnist` (55k train, 5k validation, 10k test). "
    "MLP 784-800-800-10 with tanh; CNN conv5x5(16)-tanh-maxpool2, conv5x5(32)-tanh-maxpool2, Linear(1568, 128)-tanh, "
    "Linear(128, 10). Adam lr 1e-3 with a cosine decay to zero over the budget (6 epochs for the MLP, 2 for the CNN, "
    "every arm the same), batch 128, one seed (0) per arm. DFA's feedback points are found by discovery: after each "
    "Linear/Conv + tanh (+ pool) group; conv points are flattened (C*H*W); default uniform feedback. Metric: test "
    "error (%), lower is better; the curve is the validation error after each epoch."
)

FINDINGS = """\
**What the numbers show.** The MLP trained by DFA ends 0.7 points of test error behind backprop and 5.9 ahead of
the shallow baseline (biotorch reports 12.8 % for DFA on Fashion-MNIST). The CNN learns less well from feedback
than the dense layers (a 2.3-point gap to backprop after 2 epochs, against 0.7 for the MLP), yet stays far ahead of
shallow. One seed per arm: differences under about 0.5 point are within seed noise. Training times come from a
heavily shared CPU and compare the arms only roughly.

**What we tried that did not work as well** (single runs of `benchmarks.quality.fit_arm`, seed 0, full
Fashion-MNIST, test error %, not stored):

- a constant learning rate (tanh, lr 1e-3, 2 epochs): DFA 14.75, backprop 13.83; lr 3e-4 over 4 epochs: DFA 13.61;
- ReLU instead of tanh (lr 1e-3, 4 epochs): DFA 16.25, shallow 17.84;
- the CNN on 10k training images (2 epochs): DFA 24.8.

More epochs still help: the MLP with the cosine decay over 8 epochs reached 11.25 under DFA. The feedback `scale`
is not a lever with Adam: a layer trained only by its feedback sees the same update whatever constant multiplies
its feedback (Adam divides by the running RMS of the gradient); it is one with SGD.

### Per-pixel classification

Where the error is itself a map (a segmentation's per-pixel logits), the default feeds every feature map position
by position, resampled to its resolution (`positionwise_maps`). The paper's rule projects the whole error map to
each whole feature map through one random matrix. `python -m benchmarks.segmentation` (noise images with 3x3 plus
and cross glyphs, each pixel labelled background, plus or cross; Adam, 300 steps of 16 images; test loss in nats
per pixel, share of the shallow -> backprop gap closed; a 2-core AMD EPYC CPU, 1 thread, about 8 minutes;
[json](../benchmarks/results/segmentation.json)):

| network | image | seed | backprop | default flag | shallow baseline | flattened (paper's rule) | closed |
|---|---|---|---|---|---|---|---|
| fcn | 16x16 | 0 | 0.072 | **0.137** | 0.638 | 9.090 | 89% |
| fcn | 16x16 | 1 | 0.077 | **0.153** | 0.644 | 1.799 | 87% |
| fcn | 32x32 | 0 | 0.073 | **0.162** | 0.647 | 2.188 | 84% |
| fcn | 32x32 | 1 | 0.071 | **0.185** | 0.656 | 1.039 | 81% |
| hourglass | 16x16 | 0 | 0.097 | **0.255** | 0.621 | 39.750 | 70% |
| hourglass | 16x16 | 1 | 0.154 | **0.302** | 0.633 | 59.962 | 69% |
| hourglass | 32x32 | 0 | 0.078 | **0.357** | 0.634 | 10.747 | 50% |
| hourglass | 32x32 | 1 | 0.125 | **0.285** | 0.643 | 10.226 | 69% |
| unet | 16x16 | 0 | 0.058 | **0.142** | 0.598 | 0.662 | 84% |
| unet | 16x16 | 1 | 0.064 | **0.165** | 0.602 | 0.639 | 81% |
| unet | 32x32 | 0 | 0.049 | **0.132** | 0.607 | 0.672 | 85% |
| unet | 32x32 | 1 | 0.038 | **0.131** | 0.609 | 0.656 | 84% |

`fcn` is three 3x3 convolutions and a 1x1 classifier; `hourglass` goes down to half the resolution and back up, so
its coarse maps get the error averaged over the pixels they cover; `unet` is a two-level U-Net with batch norm and
the encoder's maps concatenated into the decoder. The flattened feedback made the first two diverge and left the
U-Net below the shallow baseline; its matrix grows with the square of the image (200 MB for the hourglass at 32x32;
86 GB would be needed for 16 channels and 5 classes at 128x128), where the default's is `channels x classes`.
"""


def quality_runs(
    quick: bool, seed: int = 0, arms: Sequence[str] = ARMS, part: str | None = None
) -> list[dict[str, Any]]:
    """The MLP and the CNN in every arm.

    ``quick``: scikit-learn digits, a few steps per arm (a smoke test). Otherwise Fashion-MNIST with the budget of
    :data:`BUDGET`. ``part``: only ``"mlp"`` or ``"cnn"``.
    """
    rows = []
    for arch in PARTS if part is None else (part,):
        budget = BUDGET[arch]
        lr = budget["lr"]
        for arm in arms:

            def make_data() -> ImageDataModule:
                if quick:
                    return ImageDataModule(dataset="digits", batch_size=64, seed=seed)
                return ImageDataModule(dataset="fashion_mnist", batch_size=128, seed=seed, fallback=False)

            def make_model(dm: ImageDataModule, arch: str = arch, lr: float = lr) -> ImageClassifier:
                small = {"hidden": (64, 64), "channels": (8, 16), "fc": 32} if quick else {}
                return ImageClassifier(
                    arch=arch, lr=lr, image_size=dm.image_size, in_channels=dm.in_channels,
                    num_classes=dm.num_classes, **small,
                )  # fmt: skip

            result = fit_arm(
                make_model,
                make_data,
                arm,
                seed=seed,
                max_steps=3 if quick else -1,
                max_epochs=1 if quick else budget["epochs"],
                curve_metric="val_err",
                test_metrics=("test_err", "test_acc"),
            )
            name = "Fashion-MNIST" if not quick else "digits (quick)"
            rows.append(
                {
                    "table": f"{name}, {arch.upper()}",
                    "arm": arm,
                    "metric": "test error (%)",
                    "value": result["metrics"]["test_err"],
                    "higher_is_better": False,
                    "steps": result["steps"],
                    "wall_s": result["wall_s"],
                    "curve": result["curve"],
                    "curve_metric": "validation error (%)",
                    "config": f"lr {lr:g}, {budget['epochs'] if not quick else 1} epochs",
                }
            )
    return rows
