"""Convolutional networks whose output is itself a map (segmentation): the error feeds the feature maps position by
position (``positionwise_maps``), resampled to each map's resolution."""

from __future__ import annotations

from typing import Any

import torch
import transformers as hf
from torch import nn
from torch.nn import functional as F

from benchmarks.segmentation import CLASSES, FCN, Hourglass, glyphs
from lightning_dfa import FeedbackEngine


def _step(
    net: nn.Module, size: int = 8, **options: Any
) -> tuple[FeedbackEngine, torch.Tensor, dict[str, torch.Tensor]]:
    """One step: the engine (detached), the error at the output and the feedback of every 4-D point."""
    engine = FeedbackEngine(seed=0, **options)
    engine.attach(net)
    fed: dict[str, torch.Tensor] = {}
    engine.point_observers.append(
        lambda key, t: t.register_hook(lambda g, key=key: fed.update({key: g})) if t.dim() == 4 else None
    )
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 1, size, size, generator=g), torch.randint(0, CLASSES, (2, size, size), generator=g)
    out = net(x)
    error = torch.autograd.grad(F.cross_entropy(out, y), out, retain_graph=True)[0]
    F.cross_entropy(out, y).backward()
    engine.end_backward()
    engine.detach()
    return engine, error, fed


def _fit_per_position(error: torch.Tensor, feedback: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The ``[classes, channels]`` matrix that best maps the error at each position to the feedback there, and the
    relative residual of that fit (0: the feedback is one linear map of the error, position by position)."""
    e = error.movedim(1, -1).reshape(-1, error.shape[1]).double()
    f = feedback.movedim(1, -1).reshape(-1, feedback.shape[1]).double()
    m = torch.linalg.lstsq(e, f).solution
    return m, float((e @ m - f).norm() / f.norm())


def test_a_segmentation_error_feeds_each_position_from_the_error_there() -> None:
    torch.manual_seed(0)
    net = FCN(width=8)
    engine, error, fed = _step(net)
    assert sorted(fed) == ["1", "3", "5"]
    maps = []
    for key, feedback in fed.items():
        assert feedback.shape == (2, 8, 8, 8) and feedback.abs().sum() > 0
        m, residual = _fit_per_position(error, feedback)
        assert residual < 1e-6, key
        maps.append(m)
    torch.testing.assert_close(maps[0], maps[1])  # the one shared projection, as for tokens
    assert engine.bank.nbytes <= CLASSES * 8 * 4  # a [classes, channels] matrix, whatever the image size
    notes = engine.recipe_notes()
    assert any(n.startswith("positionwise_maps: on: the error of 6 is a map") for n in notes)
    assert any(n.startswith("pooled_channels: on: no output reads a feature map through a global") for n in notes)
    for options in ({"positionwise_maps": False}, {"recipe": "paper"}):  # one matrix over all positions
        engine, error, fed = _step(net, **options)
        assert all(_fit_per_position(error, f)[1] > 0.1 for f in fed.values()), options
        assert engine.bank.nbytes >= (CLASSES * 64) * (8 * 64) * 4
        assert not any(n.startswith("positionwise_maps") for n in engine.recipe_notes())


def test_a_coarser_map_gets_the_error_averaged_over_the_positions_it_covers() -> None:
    torch.manual_seed(0)
    net = Hourglass(width=8)
    _, error, fed = _step(net)
    assert {k: tuple(v.shape) for k, v in fed.items()} == {
        "c2:in": (2, 8, 8, 8), "c3:in": (2, 16, 4, 4), "up:in": (2, 16, 4, 4), "out:in": (2, 8, 8, 8),
    }  # fmt: skip
    m, residual = _fit_per_position(error, fed["c2:in"])  # at the error's resolution
    assert residual < 1e-6
    assert _fit_per_position(error, fed["out:in"])[1] < 1e-6  # the head's input (a 1x1 convolution's) too
    coarse = F.avg_pool2d(error, 2)  # each coarse position: the error's mean over the 2x2 positions it covers
    m16, residual = _fit_per_position(coarse, fed["c3:in"])
    assert residual < 1e-6
    # the same projection, scaled for the wider map (seen only on errors that sum to zero over the classes)
    torch.testing.assert_close(m16[:, :8] - m16[:, :8].mean(0), (m - m.mean(0)) / 2**0.5)


def test_the_feedback_matrix_stays_small_at_any_image_size() -> None:
    torch.manual_seed(0)
    small, _, _ = _step(FCN(width=8), size=8)
    large, _, fed = _step(FCN(width=8), size=64)
    assert large.bank.nbytes == small.bank.nbytes and fed["1"].shape == (2, 8, 64, 64)


def test_a_checkpoint_written_before_positionwise_feedback_keeps_its_matrix() -> None:
    torch.manual_seed(0)
    net = FCN(width=8)
    written, _, _ = _step(net, positionwise_maps=False)
    state = {k: v for k, v in written.state_dict().items() if k != "positionwise_maps"}  # before the option
    engine = FeedbackEngine(seed=0)
    engine.load_state_dict(state)
    engine.attach(net)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 1, 8, 8, generator=g), torch.randint(0, CLASSES, (2, 8, 8), generator=g)
    F.cross_entropy(net(x), y).backward()
    engine.end_backward()
    assert engine.config.positionwise_maps is False
    engine.detach()


def _train(mode: str, steps: int = 150) -> float:
    torch.manual_seed(0)
    net = FCN(width=16)
    engine = FeedbackEngine(mode=mode, seed=0)
    engine.attach(net)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(100)
    for _ in range(steps):
        x, y = glyphs(16, 16, g)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        engine.end_backward()
        opt.step()
    engine.detach()
    with torch.no_grad():
        x, y = glyphs(64, 16, torch.Generator().manual_seed(999))
        return float(F.cross_entropy(net(x), y))


def test_the_default_learns_a_segmentation_the_shallow_baseline_cannot() -> None:
    """Per-pixel plus/cross glyphs: the default closes most of the shallow -> backprop gap."""
    bp, shallow, dfa = (_train(mode) for mode in ("bp", "shallow", "dfa"))
    assert bp < shallow - 0.3
    assert (shallow - dfa) / (shallow - bp) > 0.6, (bp, shallow, dfa)


class _DepthHead(nn.Module):
    """A 1x1 convolution to one channel, squeezed: a depth map ``[batch, height, width]``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0)).squeeze(1)


def test_a_one_value_per_pixel_error_feeds_each_position_too() -> None:
    """An output of one value per pixel (``[batch, height, width]``: depth, a mask's logits), here at twice the
    feature maps' resolution, feeds them position by position: the error averaged over the pixels each covers."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), _DepthHead(8)
    )
    engine = FeedbackEngine(seed=0, blocks=["0", "2"], output="4")
    engine.attach(net)
    fed: dict[str, torch.Tensor] = {}
    engine.point_observers.append(lambda key, t: t.register_hook(lambda g, key=key: fed.update({key: g})))
    x = torch.randn(2, 1, 8, 8)
    out = net(x)
    target = torch.rand_like(out)
    error = torch.autograd.grad(F.mse_loss(out, target), out, retain_graph=True)[0]
    F.mse_loss(out, target).backward()
    engine.end_backward()
    engine.detach()
    assert out.shape == (2, 16, 16) and engine.bank.nbytes <= 8 * 4
    coarse = F.avg_pool2d(error.unsqueeze(1), 2)  # [2, 1, 8, 8]
    for key, feedback in fed.items():
        assert feedback.shape == (2, 8, 8, 8)
        assert _fit_per_position(coarse, feedback)[1] < 1e-6, key


def test_a_channels_first_norm_point_of_a_segmenters_backbone_is_a_feature_map() -> None:
    """UperNet on ConvNeXt: the channels-first LayerNorm before a downsampling is a point (``norm_points``) that is a
    feature map like the stages' outputs, so it is fed position by position, with no matrix over all positions."""
    torch.manual_seed(0)
    backbone = hf.ConvNextConfig(
        num_channels=1, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], out_features=["stage1", "stage2"]
    )
    model = hf.UperNetForSemanticSegmentation(
        hf.UperNetConfig(backbone_config=backbone, hidden_size=16, num_labels=CLASSES, use_auxiliary_head=False)
    )
    engine = FeedbackEngine(seed=0)
    engine.attach(model)
    fed: dict[str, torch.Tensor] = {}
    engine.point_observers.append(lambda key, t: t.register_hook(lambda g, key=key: fed.update({key: g})))
    errors: list[torch.Tensor] = []  # at the decode head's output, [2, classes, 8, 8], before the upsampling to 32x32
    model.decode_head.register_forward_hook(lambda m, a, out: [out.register_hook(errors.append), None][1])
    logits = model(pixel_values=torch.randn(2, 1, 32, 32)).logits
    F.cross_entropy(logits, torch.zeros(2, 32, 32, dtype=torch.long)).backward()
    engine.end_backward()
    engine.detach()
    norm = "backbone.encoder.stages.1.downsampling_layer.0"
    assert norm in fed and engine.bank.nbytes <= CLASSES * 16 * 4
    assert fed[norm].shape == (2, 8, 8, 8) and _fit_per_position(errors[0], fed[norm])[1] < 1e-6
    assert _fit_per_position(errors[0], fed["backbone.encoder.stages.0:in"])[1] < 1e-6  # the stem's output too
