"""Quality runs of the NeRF example (:mod:`examples.nerf`) on the procedural scene; also writes the renders."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from benchmarks.quality import ARMS, fit_arm
from examples.data.scenes import write_scene
from examples.nerf import NeRF, SceneDataModule, baselines, save_side_by_side

TITLE = "NeRF on a procedurally rendered scene"

#: Budget of the full run: image size, optimizer steps, rays per step, samples per ray; every arm the same.
BUDGET = {"size": 32, "steps": 10000, "batch_size": 512, "n_samples": 24, "lr": 5e-3}
RENDER_PNG = os.path.join("docs", "img", "nerf_test_views.png")

NOTE = """\
Procedural scene (`examples/data/scenes.py`: SDF sphere, box, torus and pedestal, Lambertian shading, 100
training and 25 test views of {size}x{size} pixels around a hemisphere, Blender-NeRF layout). NeRF: positional
encoding (6 frequencies), 4 hidden Linear+ReLU layers of width 64 with a skip connection, {n_samples} stratified
samples per ray, volume rendering on white; {steps} steps of {batch_size} rays, Adam with the learning rate decayed
10x over the run. Feedback after every hidden ReLU; the error is read at the `[points, 4]` output, behind the
volume rendering. Test PSNR is the mean over the 25 test views. Reference rows: the mean training colour and the
nearest training view (closest camera direction). Renders: `docs/img/nerf_test_views.png` (ground truth, bp, dfa,
shallow).""".format(**BUDGET)

FINDINGS = """\
![test views: ground truth, bp, dfa, shallow](img/nerf_test_views.png)

**What the numbers show.** DFA reaches 29.5 dB test PSNR, above the nearest training view (23.7) and 2.2 dB
behind backprop (the DFA paper's gap was about 6 dB). Shallow stays at 11.8: trained on random features only, it
cannot place density anywhere. The renders above (six test views; columns: ground truth, bp, dfa, shallow) show
every shape in place under backprop and DFA, DFA's edges a little softer; shallow is a flat beige texture.

DFA learns NeRF slowly at first, then fast: its validation PSNR stays below the nearest-view reference for the
first 2000 steps (the geometry is found between steps 2000 and 3000) and then closes most of the gap. A budget of
1200 steps leaves it at 15.8 dB, 11 dB behind backprop: this is why the budget is 10,000 steps.

**What we tried that did not work** (on one H100 80GB,
[`benchmarks/gpu_nerf_sweep.py`](../benchmarks/gpu_nerf_sweep.py), results in
[`benchmarks/results/gpu_nerf_sweep_h100.jsonl`](../benchmarks/results/gpu_nerf_sweep_h100.jsonl); same code and
settings): a wider MLP (width 256, as the original NeRF) makes DFA **collapse** at lr 5e-3 to a constant image
(9.54 dB at 1200 and at 3000 steps), while backprop reaches 29.54 / 31.32 and shallow 11.88 there; the width stays
64. A lower DFA learning rate (1e-3) was worse at 1200 steps (14.79 dB, one run of this benchmark, not stored).
"""


def quality_runs(quick: bool, seed: int = 0, arms: Sequence[str] = ARMS) -> list[dict[str, Any]]:
    """Test PSNR of each arm and of the two baselines; saves the side-by-side renders.

    ``quick`` renders a tiny scene (8x8, 6 + 3 views) into a temporary folder and trains a few steps per arm.
    """
    if quick:
        tmp = tempfile.mkdtemp(prefix="nerf-quick-")
        root = write_scene(os.path.join(tmp, "scene"), size=8, n_train=6, n_test=3, n_val=1, supersample=1)
        data = SceneDataModule(root=root, size=8, batch_size=64, val_views=1, seed=seed)
        model_opts: dict[str, Any] = {"width": 16, "depth": 3, "skip": 1, "n_samples": 8}
        steps, png = 3, os.path.join(tmp, "nerf_test_views.png")
    else:
        data = SceneDataModule(size=BUDGET["size"], batch_size=BUDGET["batch_size"], seed=seed)
        model_opts = {"n_samples": BUDGET["n_samples"]}
        steps, png = BUDGET["steps"], RENDER_PNG
    data.setup()
    table = "Procedural scene, NeRF" + (" (quick)" if quick else "")
    rows: list[dict[str, Any]] = []
    refs = baselines(data.views["train"], data.views["test"])
    for label, key in (
        ("reference: mean colour", "mean_colour_psnr"),
        ("reference: nearest training view", "nearest_view_psnr"),
    ):
        rows.append({"table": table, "arm": label, "metric": "test PSNR (dB)", "value": refs[key],
                     "higher_is_better": True, "steps": 0, "wall_s": 0.0})  # fmt: skip
    renders: dict[str, np.ndarray] = {}
    lr = BUDGET["lr"]
    test = data.views["test"]
    for arm in arms:
        built: list[NeRF] = []

        def make(dm: Any, built: list[NeRF] = built) -> NeRF:
            built.append(NeRF(lr=lr, **model_opts))
            return built[-1]

        epoch_steps = len(data.train_dataloader())
        res = fit_arm(make, lambda: data, arm, seed=seed, max_steps=steps, curve_metric="val_psnr",
                      test_metrics=("test_psnr",),
                      trainer_options={"check_val_every_n_epoch": max(1, steps // (10 * epoch_steps))})  # fmt: skip
        shape = (len(test.images), test.height, test.width, 3)
        renders[arm] = torch.stack(built[-1].test_renders).view(*shape).numpy()
        rows.append({"table": table, "arm": arm, "metric": "test PSNR (dB)", "value": res["metrics"]["test_psnr"],
                     "higher_is_better": True, "steps": res["steps"], "wall_s": res["wall_s"], "curve": res["curve"],
                     "curve_metric": "validation PSNR (dB)", "config": f"Adam lr {lr:g}"})  # fmt: skip
    save_side_by_side(png, test.images, renders, views=list(range(min(6, len(test.images)))))
    return rows
