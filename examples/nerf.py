"""Neural view synthesis: a small NeRF trained with backprop, DFA or the shallow baseline by flag only.

The model is the NeRF recipe at a CPU-friendly size: positional encoding of the 3-D sample points, an MLP of
``depth`` hidden Linear+ReLU layers with a skip connection (the encoded input is concatenated again halfway),
a linear output of colour and density per point, and volume rendering along each ray (stratified samples
between ``near`` and ``far``, white background). The loss is the MSE of the rendered pixel colours.

Where DFA feedback goes (as in the DFA paper): after every hidden ReLU (each ``layers.<k>`` is a block, found
automatically in the ``nn.ModuleList``). The error is read at the output layer's ``[points, 4]`` output: autograd
carries the pixel error back through the (parameter-free) volume rendering, so each sample point gets its own
4-dimensional error, projected to every hidden layer of that point.

Data: :mod:`examples.data.scenes` renders a procedural scene (100 training, 25 test views, Blender-NeRF layout)
on first use; a real Blender scene loads with ``--data.root=path/to/lego --data.size=64``.

Usage (the defaults are the budget of ``docs/results_nerf.md``: 10,000 steps of 512 rays, 24 samples per ray)::

    python -m examples.nerf fit --trainer.strategy=dfa
    python -m examples.nerf fit --trainer.strategy=dfa --trainer.max_epochs=10
    python -m examples.nerf fit --trainer.strategy=lightning_dfa.DFAStrategy --trainer.strategy.mode=shallow

After ``fit`` the test views are rendered and the last line printed is the test PSNR with the scene it was
measured on. :func:`baselines` gives the mean-colour and nearest-training-view references and
:func:`save_side_by_side` a PNG of renders next to the ground truth.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from examples.data.scenes import Views, load_blender, write_scene


# ---------------------------------------------------------------------------------------------- model
def positional_encoding(x: torch.Tensor, n_freqs: int) -> torch.Tensor:
    """``[x, sin(2^k pi x), cos(2^k pi x)]`` for ``k < n_freqs``: ``[..., 3]`` -> ``[..., 3 (1 + 2 n_freqs)]``."""
    freqs = (2.0 ** torch.arange(n_freqs, device=x.device, dtype=x.dtype)) * math.pi
    angles = x[..., None] * freqs  # [..., 3, F]
    return torch.cat([x, torch.sin(angles).flatten(-2), torch.cos(angles).flatten(-2)], dim=-1)


class NeRFMLP(nn.Module):
    """Hidden Linear+ReLU layers (``layers``), the encoded input concatenated again before layer ``skip``, and a
    linear output ``out`` of ``[r, g, b, sigma]`` (pre-activation) per point."""

    def __init__(self, n_in: int, width: int = 64, depth: int = 4, skip: int = 2) -> None:
        super().__init__()
        self.skip = skip
        dims = [n_in] + [width] * depth
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(dims[k] + (n_in if k == skip else 0), dims[k + 1]), nn.ReLU()) for k in range(depth)
        )
        self.out = nn.Linear(width, 4)

    def forward(self, encoded: torch.Tensor) -> torch.Tensor:
        h = encoded
        for k, layer in enumerate(self.layers):
            if k == self.skip:
                h = torch.cat([h, encoded], dim=-1)
            h = layer(h)
        return self.out(h)


def volume_render(
    raw: torch.Tensor, t: torch.Tensor, rays_d: torch.Tensor, background: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """NeRF's quadrature: ``raw`` [R, S, 4], sample depths ``t`` [R, S] -> pixel colours [R, 3] and opacity [R]."""
    rgb = torch.sigmoid(raw[..., :3])
    sigma = nn.functional.softplus(raw[..., 3] - 1.0)
    delta = torch.cat([t[:, 1:] - t[:, :-1], torch.full_like(t[:, :1], 1e10)], dim=1) * rays_d.norm(
        dim=-1, keepdim=True
    )
    alpha = 1.0 - torch.exp(-sigma * delta)
    trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1.0 - alpha + 1e-10], dim=1), dim=1)[:, :-1]
    weights = alpha * trans
    acc = weights.sum(1)
    return (weights[..., None] * rgb).sum(1) + background * (1.0 - acc[..., None]), acc


def psnr(mse: torch.Tensor | float) -> float:
    """Peak signal-to-noise ratio (dB) of images in [0, 1] from their MSE."""
    return float(-10.0 * math.log10(max(float(mse), 1e-10)))


class NeRF(pl.LightningModule):
    """A small NeRF (no view directions: the scene is Lambertian).

    Args:
        n_freqs: positional-encoding frequencies.
        width, depth, skip: MLP size; the encoded input re-enters before hidden layer ``skip``.
        n_samples: samples per ray (stratified with jitter in training, evenly spaced in evaluation).
        near, far: ray interval.
        lr: Adam learning rate (decays by 10x over the Trainer's budget, ``max_steps`` or ``max_epochs``).
        chunk: rays per forward in evaluation.
    """

    def __init__(
        self,
        n_freqs: int = 6,
        width: int = 64,
        depth: int = 4,
        skip: int = 2,
        n_samples: int = 32,
        near: float = 2.4,
        far: float = 5.6,
        lr: float = 5e-3,
        chunk: int = 4096,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.mlp = NeRFMLP(3 * (1 + 2 * n_freqs), width, depth, skip)
        self.test_renders: list[torch.Tensor] = []
        self._psnrs: dict[str, list[float]] = {}
        self.last_metrics: dict[str, float] = {}

    def forward(self, rays_o: torch.Tensor, rays_d: torch.Tensor) -> torch.Tensor:
        """Render rays [R, 3] -> colours [R, 3]."""
        h = self.hparams
        s = torch.linspace(0.0, 1.0, h.n_samples + 1, device=rays_o.device)
        lower = h.near + (h.far - h.near) * s[:-1]
        step = (h.far - h.near) / h.n_samples
        if self.training:
            t = lower + step * torch.rand(rays_o.shape[0], h.n_samples, device=rays_o.device)
        else:
            t = (lower + 0.5 * step).expand(rays_o.shape[0], -1)
        points = rays_o[:, None, :] + t[..., None] * rays_d[:, None, :]  # [R, S, 3]
        raw = self.mlp(positional_encoding(points.reshape(-1, 3), h.n_freqs)).view(*points.shape[:2], 4)
        return volume_render(raw, t, rays_d)[0]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        rays_o, rays_d, target = batch
        loss = nn.functional.mse_loss(self(rays_o, rays_d), target)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_psnr", psnr(loss.detach()), prog_bar=True)
        return loss

    def _render_image(self, rays_o: torch.Tensor, rays_d: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [self(o, d) for o, d in zip(rays_o.split(self.hparams.chunk), rays_d.split(self.hparams.chunk))]
        )

    def _eval_step(self, batch: Any, stage: str) -> torch.Tensor:
        rays_o, rays_d, target = (b[0] for b in batch)  # one image per batch: [H*W, 3] each
        image = self._render_image(rays_o, rays_d)
        self._psnrs.setdefault(stage, []).append(psnr(nn.functional.mse_loss(image, target)))
        return image

    def _eval_end(self, stage: str) -> None:
        values = self._psnrs.pop(stage, [])
        if values:
            self.last_metrics[f"{stage}_psnr"] = float(np.mean(values))
            self.log(f"{stage}_psnr", float(np.mean(values)), prog_bar=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def on_test_epoch_start(self) -> None:
        self.test_renders = []

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.test_renders.append(self._eval_step(batch, "test").detach().cpu())

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        total = float(self.trainer.estimated_stepping_batches) if self.trainer is not None else math.inf
        if not math.isfinite(total) or total <= 0:
            return opt
        steps = int(total)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.1 ** min(k / steps, 1.0))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# ---------------------------------------------------------------------------------------------- data
class _Images(Dataset):
    """One item per view: all its rays and pixels (``[H*W, 3]`` each)."""

    def __init__(self, views: Views) -> None:
        o, d = views.rays()
        self.o = torch.from_numpy(o.reshape(len(o), -1, 3))
        self.d = torch.from_numpy(d.reshape(len(d), -1, 3))
        self.rgb = torch.from_numpy(views.images.reshape(len(o), -1, 3))

    def __len__(self) -> int:
        return len(self.o)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.o[k], self.d[k], self.rgb[k]


class SceneDataModule(pl.LightningDataModule):
    """Rays of a Blender-layout scene: random ray batches for training, one whole view per batch to evaluate.

    Args:
        root: scene folder; ``None`` renders the procedural scene into ``$LIGHTNING_DFA_DATA/scenes/shapes-<size>``.
        size: image size (the procedural scene is rendered at it; real scenes are resized to it).
        n_train, n_test: views of the procedural scene.
        batch_size: rays per training step.
        val_views: how many of the ``val`` views to evaluate each validation.
        seed: shuffling seed.
    """

    def __init__(
        self,
        root: str | None = None,
        size: int = 32,
        n_train: int = 100,
        n_test: int = 25,
        batch_size: int = 1024,
        val_views: int = 5,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.views: dict[str, Views] = {}

    @property
    def scene_root(self) -> str:
        h = self.hparams
        if h.root is not None:
            return h.root
        base = os.path.join(os.environ.get("LIGHTNING_DFA_DATA", ".data"), "scenes")
        name = f"shapes-{h.size}" + ("" if (h.n_train, h.n_test) == (100, 25) else f"-{h.n_train}-{h.n_test}")
        return write_scene(os.path.join(base, name), size=h.size, n_train=h.n_train, n_test=h.n_test)

    def setup(self, stage: str | None = None) -> None:
        if self.views:
            return
        root = self.scene_root
        size = self.hparams.size if self.hparams.root is not None else None
        for split in ("train", "val", "test"):
            self.views[split] = load_blender(root, split, size=size)

    def describe(self) -> str:
        """The scene in words (for the example's last line)."""
        self.setup()
        test = self.views["test"]
        what = f"the scene in {self.hparams.root}" if self.hparams.root else "the procedural scene (offline)"
        return f"the {len(test.images)} test views ({test.height}x{test.width}) of {what}"

    def train_dataloader(self) -> DataLoader:
        self.setup()
        o, d = self.views["train"].rays()
        rgb = self.views["train"].images
        ds = TensorDataset(*(torch.from_numpy(a.reshape(-1, 3)) for a in (o, d, rgb)))
        g = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(ds, batch_size=self.hparams.batch_size, shuffle=True, generator=g, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        v = self.views["val"]
        n = min(self.hparams.val_views, len(v.images))
        return DataLoader(_Images(Views(v.images[:n], v.poses[:n], v.focal)), batch_size=1)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(_Images(self.views["test"]), batch_size=1)


# ---------------------------------------------------------------------------------------------- baselines
def baselines(train: Views, test: Views) -> dict[str, float]:
    """Test PSNR of the mean training colour and of the nearest training view (closest camera direction)."""
    mean = train.images.reshape(-1, 3).mean(0)
    mean_psnr = [psnr(((img - mean) ** 2).mean()) for img in test.images]
    centre = np.array([0.0, 0.0, 0.3])
    dirs_train = train.poses[:, :3, 3] - centre
    dirs_train /= np.linalg.norm(dirs_train, axis=1, keepdims=True)
    nearest = []
    for img, pose in zip(test.images, test.poses):
        d = pose[:3, 3] - centre
        k = int(np.argmax(dirs_train @ (d / np.linalg.norm(d))))
        nearest.append(psnr(((img - train.images[k]) ** 2).mean()))
    return {"mean_colour_psnr": float(np.mean(mean_psnr)), "nearest_view_psnr": float(np.mean(nearest))}


def save_side_by_side(
    path: str, truth: np.ndarray, renders: dict[str, np.ndarray], views: Sequence[int], zoom: int = 4
) -> None:
    """A PNG grid: one row per test view, columns ground truth then each arm's render (nearest-neighbour zoom)."""
    from PIL import Image, ImageDraw

    columns = [("truth", truth), *renders.items()]
    h, w = truth.shape[1:3]
    label_h = 14
    canvas = Image.new("RGB", (len(columns) * w * zoom, label_h + len(views) * h * zoom), "white")
    draw = ImageDraw.Draw(canvas)
    for c, (name, images) in enumerate(columns):
        draw.text((c * w * zoom + 4, 1), name, fill="black")
        for r, v in enumerate(views):
            tile = Image.fromarray((np.clip(images[v], 0, 1) * 255).round().astype(np.uint8))
            canvas.paste(tile.resize((w * zoom, h * zoom), Image.NEAREST), (c * w * zoom, label_h + r * h * zoom))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    canvas.save(path)


def main(args: Any = None) -> Any:
    """LightningCLI entry point (``python -m examples.nerf fit --trainer.strategy=dfa``); prints the test PSNR last."""
    from pytorch_lightning.cli import LightningCLI

    import lightning_dfa  # noqa: F401  (registers strategy="dfa")

    class NeRFCLI(LightningCLI):
        def add_arguments_to_parser(self, parser: Any) -> None:
            # 50 epochs of the 100 training views of 32x32 pixels, 512 rays a step: 10,000 steps
            parser.set_defaults({"trainer.max_epochs": 50, "data.batch_size": 512, "model.n_samples": 24})

        def after_fit(self) -> None:
            if self.trainer.fast_dev_run:
                return
            results = self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
            if results:
                print(f"test PSNR: {results[0]['test_psnr']:.2f} dB on {self.datamodule.describe()}")

    return NeRFCLI(NeRF, SceneDataModule, args=args)


if __name__ == "__main__":
    main()
