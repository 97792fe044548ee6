"""Per-pixel classification (segmentation) by backprop, the default flag, the shallow baseline and the flattened
feedback of the paper's rule: the error is itself a map, and the default feeds the feature maps position by position
(``positionwise_maps``).

::

    python -m benchmarks.segmentation             # about 8 minutes on one CPU thread -> results/segmentation.json
    python -m benchmarks.segmentation --sizes 16  # the 16x16 runs only

Task: grey images of Gaussian noise (std 0.3) with 3x3 glyphs added at random places (one per 40 pixels), a plus
or a cross; every pixel is labelled background, plus or cross (the glyph's box it lies in), so the class of a pixel
depends on the pattern around it. Three networks: ``fcn`` (width 16), three 3x3 convolutions and a 1x1 classifier
at the input's resolution; ``hourglass`` (width 16), down to half the resolution by a strided convolution and back
up by a transposed one (the feature maps at two resolutions, so the coarse ones get the error averaged over the
pixels they cover); ``unet`` (width 8), a two-level U-Net with batch norm, the encoder's maps concatenated into the
decoder. Adam, lr 3e-3, batch 16, 300 steps on fresh images; test loss (nats per pixel) on 128 held-out images.
Arms: ``bp``; ``dfa`` (the default flag); ``shallow`` (the classifier alone); ``dfa_flat`` (the default with
``positionwise_maps=False``: one random matrix from the whole error map to each whole feature map, the paper's rule).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.speed.machine import write_cpu_rows
from lightning_dfa import FeedbackEngine

RESULTS = Path(__file__).parent / "results" / "segmentation.json"
ARMS: dict[str, tuple[str, dict[str, Any]]] = {
    "bp": ("bp", {}),
    "dfa": ("dfa", {}),
    "shallow": ("shallow", {}),
    "dfa_flat": ("dfa", {"positionwise_maps": False}),
}
CLASSES = 3
PLUS = torch.tensor([[0.0, 1, 0], [1, 1, 1], [0, 1, 0]])
CROSS = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 1]])


def glyphs(n: int, size: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``[n, 1, size, size]`` and their labels ``[n, size, size]`` (0 background, 1 plus, 2 cross)."""
    x, y = 0.3 * torch.randn(n, 1, size, size, generator=g), torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        for _ in range(size * size // 40):
            r, c = (int(v) for v in torch.randint(0, size - 2, (2,), generator=g))
            k = int(torch.randint(0, 2, (1,), generator=g))
            x[i, 0, r : r + 3, c : c + 3] += (PLUS, CROSS)[k]
            y[i, r : r + 3, c : c + 3] = k + 1
    return x, y


class FCN(nn.Sequential):
    """Three 3x3 convolutions with ReLU and a 1x1 classifier, at the input's resolution."""

    def __init__(self, width: int = 16) -> None:
        super().__init__(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, CLASSES, 1),
        )  # fmt: skip


class Hourglass(nn.Module):
    """A 3x3 convolution, a strided one to half the resolution, a 3x3 there, a transposed convolution back up and a
    1x1 classifier (a U-Net without its skip connections)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, width, 3, padding=1)
        self.c2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.up = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.out = nn.Conv2d(width, CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c3(F.relu(self.c2(F.relu(self.c1(x))))))
        return self.out(F.relu(self.up(h)))


def _double_conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
    )  # fmt: skip


class UNet(nn.Module):
    """A two-level U-Net (Ronneberger et al. 2015, as usually written): double 3x3 convolutions with batch norm, max
    pooling down, a transposed convolution up, the encoder's full-resolution maps concatenated into the decoder."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.enc1, self.pool, self.enc2 = _double_conv(1, width), nn.MaxPool2d(2), _double_conv(width, 2 * width)
        self.up = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.dec1, self.out = _double_conv(2 * width, width), nn.Conv2d(width, CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        return self.out(self.dec1(torch.cat([self.up(e2), e1], 1)))


MODELS = {"fcn": FCN, "hourglass": Hourglass, "unet": UNet}


def train(model: str, size: int, arm: str, seed: int, steps: int = 300) -> dict[str, Any]:
    """Train one arm from the seed's initialisation on the seed's stream of images; its test loss and accuracy."""
    torch.manual_seed(seed)
    net = MODELS[model]()
    mode, options = ARMS[arm]
    engine = FeedbackEngine(mode=mode, seed=seed, **options)
    engine.attach(net)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(100 + seed)
    for _ in range(steps):
        x, y = glyphs(16, size, g)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        engine.end_backward()
        opt.step()
    feedback_bytes = engine.bank.nbytes
    engine.detach()
    net.eval()
    with torch.no_grad():
        x, y = glyphs(128, size, torch.Generator().manual_seed(999))
        logits = net(x)
    return {
        "test_loss": round(F.cross_entropy(logits, y).item(), 3),
        "accuracy": round((logits.argmax(1) == y).float().mean().item(), 3),
        "feedback_bytes": feedback_bytes,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.segmentation", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="fcn,hourglass,unet", help="comma-separated: fcn, hourglass, unet")
    p.add_argument("--sizes", default="16,32", help="image sizes, comma-separated (default: 16,32)")
    p.add_argument("--seeds", default="0,1", help="comma-separated (default: 0,1)")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"results JSON (default: {RESULTS})")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    start = time.time()
    rows: list[dict[str, Any]] = []
    for model in args.models.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            for seed in (int(s) for s in args.seeds.split(",")):
                losses = {}
                for arm in ARMS:
                    result = train(model, size, arm, seed)
                    rows.append({"model": model, "size": size, "seed": seed, "arm": arm, "steps": 300, **result})
                    losses[arm] = result["test_loss"]
                gap = losses["shallow"] - losses["bp"]
                shares = {a: round((losses["shallow"] - losses[a]) / gap, 3) for a in ("dfa", "dfa_flat")}
                print(f"{model} {size}x{size} seed {seed}: {losses} | share of the gap closed {shares}", flush=True)
    return write_cpu_rows(args.out, rows, start)


if __name__ == "__main__":
    main()
