"""Tests of the NeRF example: the Blender-layout scene writer/loader, the renderer, and every arm on a tiny scene."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from examples.data import scenes
from examples.nerf import NeRF, SceneDataModule, baselines, positional_encoding, psnr, volume_render
from lightning_dfa import DFAStrategy


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("scene"))
    return scenes.write_scene(root, size=8, n_train=6, n_test=3, n_val=1, supersample=1)


def test_scene_round_trips_the_blender_layout(scene: str) -> None:
    with open(f"{scene}/transforms_train.json") as f:
        meta = json.load(f)
    assert set(meta) >= {"camera_angle_x", "frames"}
    assert meta["frames"][0]["file_path"] == "./train/r_0"
    assert np.array(meta["frames"][0]["transform_matrix"]).shape == (4, 4)
    for split, n in (("train", 6), ("val", 1), ("test", 3)):
        views = scenes.load_blender(scene, split)
        assert views.images.shape == (n, 8, 8, 3) and views.poses.shape == (n, 4, 4)
    views = scenes.load_blender(scene, "test")
    assert views.focal == pytest.approx(4.0 / math.tan(0.5 * meta["camera_angle_x"]))
    # the loaded image (composited on white) is the rendering, to PNG precision
    rgba = scenes.render_view(views.poses[1].astype(np.float64), 8, views.focal, supersample=1)
    expected = rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:])
    assert np.abs(views.images[1] - expected).max() <= 1.0 / 255 + 1e-6
    # on black instead of white, background pixels change and object pixels do not
    black = scenes.load_blender(scene, "test", white_background=False)
    alpha = rgba[..., 3]
    assert np.allclose(black.images[1][alpha == 1], views.images[1][alpha == 1], atol=1e-6)
    assert (views.images[1][alpha == 0] == 1.0).all() and (black.images[1][alpha == 0] == 0.0).all()
    # a second write with the same settings keeps the files
    assert scenes.write_scene(scene, size=8, n_train=6, n_test=3, n_val=1) == scene


def test_cameras_look_at_the_scene() -> None:
    c2w = scenes.look_at(np.array([3.0, 1.0, 2.0]))
    assert np.allclose(c2w[:3, :3] @ c2w[:3, :3].T, np.eye(3), atol=1e-9)
    o, d = scenes.camera_rays(c2w, 9, 9, 10.0)
    centre = d[4, 4] / np.linalg.norm(d[4, 4])
    to_target = scenes.LOOK_AT - o[4, 4]
    assert np.allclose(centre, to_target / np.linalg.norm(to_target), atol=1e-9)
    assert d[0, 4, 2] > d[8, 4, 2]  # image row 0 is the top (+y up)


def test_volume_render_limits() -> None:
    t = torch.linspace(2, 6, 8).expand(2, 8)
    d = torch.tensor([[0.0, 0.0, -1.0]] * 2)
    raw = torch.zeros(2, 8, 4)
    raw[0, :, 3] = -50.0  # empty space: background
    raw[1, 0] = torch.tensor([5.0, -5.0, 0.0, 50.0])  # opaque first sample
    rgb, acc = volume_render(raw, t, d)
    assert torch.allclose(rgb[0], torch.ones(3), atol=1e-4) and acc[0] < 1e-4
    assert torch.allclose(rgb[1], torch.sigmoid(raw[1, 0, :3]), atol=1e-4) and acc[1] > 0.999
    assert positional_encoding(torch.zeros(5, 3), 4).shape == (5, 27)
    assert psnr(0.01) == pytest.approx(20.0)


def test_baselines_nearest_view_finds_identical_view(scene: str) -> None:
    train = scenes.load_blender(scene, "train")
    out = baselines(train, scenes.Views(train.images[:2], train.poses[:2], train.focal))
    assert out["nearest_view_psnr"] >= 99.0
    assert out["mean_colour_psnr"] < 30.0


def test_every_arm_trains_the_right_parameters(scene: str) -> None:
    data = SceneDataModule(root=scene, size=8, batch_size=32, val_views=1)
    weights = {}
    for arm in ("bp", "dfa", "shallow"):
        pl.seed_everything(0, verbose=False)
        model = NeRF(width=16, depth=3, skip=1, n_samples=6, lr=1e-2)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        trainer = pl.Trainer(strategy=DFAStrategy(mode=arm, verbose=False), max_steps=3, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, limit_val_batches=1)  # fmt: skip
        trainer.fit(model, datamodule=data)
        keys = [p.key for p in trainer.strategy.dfa_engine.last_points]
        assert keys == (["mlp.layers.0", "mlp.layers.1", "mlp.layers.2"] if arm == "dfa" else [])
        trainer.test(model, datamodule=data, verbose=False)
        assert len(model.test_renders) == 3 and np.isfinite(model.last_metrics["test_psnr"])
        after = model.state_dict()
        weights[arm] = after
        hidden = "mlp.layers.0.0.weight"
        assert torch.equal(before[hidden], after[hidden]) == (arm == "shallow")
        assert not torch.equal(before["mlp.out.weight"], after["mlp.out.weight"])
    assert not torch.allclose(weights["bp"]["mlp.layers.0.0.weight"], weights["dfa"]["mlp.layers.0.0.weight"])


def test_quality_rows_quick_write_the_side_by_side_png(tmp_path, monkeypatch) -> None:
    from benchmarks.domains import nerf

    monkeypatch.setattr("tempfile.mkdtemp", lambda prefix="": str(tmp_path))
    rows = nerf.quality_runs(quick=True)
    arms = [r["arm"] for r in rows]
    assert arms[-3:] == ["bp", "dfa", "shallow"]
    assert all(np.isfinite(r["value"]) for r in rows)
    from PIL import Image

    img = Image.open(tmp_path / "nerf_test_views.png")
    assert img.size == (4 * 8 * 4, 14 + 3 * 8 * 4)  # truth + 3 arms, 3 test views, zoom 4


def test_cli_fit_prints_the_test_psnr_last(tmp_path, monkeypatch, capsys) -> None:
    from examples.nerf import main

    monkeypatch.setenv("LIGHTNING_DFA_DATA", str(tmp_path))
    main(
        [
            "fit", "--data.size=8", "--data.n_train=6", "--data.n_test=3", "--data.batch_size=64",
            "--data.val_views=1", "--model.width=16", "--model.depth=3", "--model.skip=1", "--model.n_samples=8",
            "--trainer.strategy=dfa", "--trainer.max_steps=3", "--trainer.logger=false",
            "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )  # fmt: skip
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("test PSNR: ") and "the 3 test views (8x8) of the procedural scene" in last
