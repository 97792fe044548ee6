"""The ``feedback_learning="kolen_pollack"`` option: per-point feedback matrices learned from local information."""

from __future__ import annotations

import pytest
import torch
from conftest import mlp
from torch import nn

from lightning_dfa import DFAConfig, FeedbackEngine


def _recorder(net: nn.Sequential, names: list[str]) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    for name in names:
        net.get_submodule(name).register_forward_hook(lambda m, i, o, n=name: seen.__setitem__(n, o.detach()))
    return seen


def _rule(b: torch.Tensor, b0: torch.Tensor, h: torch.Tensor, e: torch.Tensor, decay: float) -> torch.Tensor:
    n = h * h.pow(2).mean(-1, keepdim=True).add(1e-12).rsqrt()
    g = n.t() @ e
    return (1 - decay) * b - decay * b0.norm() * g / g.norm()


def test_matrices_follow_the_rule_and_feed_the_next_step() -> None:
    torch.manual_seed(0)
    net = mlp(width=16, n_in=6, n_out=3, depth=2)  # points "1" and "3", output "4"
    twin = mlp(width=16, n_in=6, n_out=3, depth=2)
    twin.load_state_dict(net.state_dict())
    decay = 0.3
    learned, fixed = (
        FeedbackEngine(seed=1, feedback_learning="kolen_pollack", feedback_decay=decay),
        FeedbackEngine(seed=1),
    )
    learned.attach(net)
    fixed.attach(twin)
    acts = _recorder(net, ["1", "3"])
    b0 = learned.bank.matrix(3, 16, torch.device("cpu"), torch.float32).clone()

    # step 1: B_p = B(0), so the gradients are plain DFA's
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    logits = net(x)
    e = torch.autograd.grad(nn.functional.cross_entropy(logits, y), logits, retain_graph=True)[0]
    nn.functional.cross_entropy(logits, y).backward()
    learned.end_backward()
    nn.functional.cross_entropy(twin(x), y).backward()
    fixed.end_backward()
    torch.testing.assert_close(net[0].weight.grad, twin[0].weight.grad)
    for key in ("1", "3"):
        torch.testing.assert_close(learned.learned.matrices[key], _rule(b0, b0, acts[key], e, decay))
    assert not torch.allclose(learned.learned.matrices["1"], learned.learned.matrices["3"])

    # step 2: point "1" receives scale / sqrt(d) * e @ B_1^T, with B_1 rescaled to ||B(0)||
    b1 = learned.learned.matrices["1"].clone()
    net.zero_grad()
    x2, y2 = torch.randn(8, 6), torch.randint(0, 3, (8,))
    logits = net(x2)
    e2 = torch.autograd.grad(nn.functional.cross_entropy(logits, y2), logits, retain_graph=True)[0]
    nn.functional.cross_entropy(logits, y2).backward()
    learned.end_backward()
    feedback = e2 @ (b1 * (b0.norm() / b1.norm())).t() / 4.0  # scale 1 / sqrt(16)
    want = torch.autograd.grad(torch.tanh(net[0](x2)), net[0].weight, feedback)[0]
    torch.testing.assert_close(net[0].weight.grad, want, rtol=1e-5, atol=1e-7)
    learned.detach()
    fixed.detach()


def test_head_input_feedback_learns_the_heads_direction() -> None:
    """The Kolen-Pollack property without weight transport: the matrix of the point the head reads follows the same
    outer products as the head's weight, so it lines up with it, far more than the head lines up with the fixed
    matrix it started from (feedback alignment)."""
    torch.manual_seed(0)
    teacher = mlp(width=32, n_in=8, n_out=5, depth=1)
    net = mlp(width=32, n_in=8, n_out=5, depth=2)
    engine = FeedbackEngine(seed=0, feedback_learning="kolen_pollack", feedback_decay=0.02)
    engine.attach(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.2)
    for _ in range(300):
        x = torch.randn(64, 8)
        y = teacher(x).argmax(-1)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        engine.end_backward()
        opt.step()
    head = net[4].weight.detach().t()  # [32, 5]: what backprop would use at the head's input

    def cosine(b: torch.Tensor) -> float:
        return float(nn.functional.cosine_similarity(b.flatten(), head.flatten(), dim=0))

    b0 = engine.bank.matrix(5, 32, torch.device("cpu"), torch.float32)
    learned = cosine(engine.learned.matrices["3"])
    assert learned > 0.8 and learned > cosine(b0) + 0.2  # about 0.90 against 0.48
    engine.detach()


def test_state_round_trip_and_off_by_default() -> None:
    torch.manual_seed(0)
    net = mlp(width=16, n_in=6, n_out=3, depth=2)
    engine = FeedbackEngine(seed=2, feedback_learning="kolen_pollack")
    engine.attach(net)
    nn.functional.cross_entropy(net(torch.randn(4, 6)), torch.randint(0, 3, (4,))).backward()
    engine.end_backward()
    state = engine.state_dict()
    resumed = FeedbackEngine(seed=2, feedback_learning="kolen_pollack")
    resumed.load_state_dict(state)
    for key, m in engine.learned.matrices.items():
        assert torch.equal(resumed.learned.matrices[key], m)
    plain = FeedbackEngine(seed=2)
    assert plain.learned is None and "learned_feedback" not in plain.state_dict()


@pytest.mark.parametrize(
    "options, words",
    [({"feedback_learning": "kp"}, "feedback_learning"), ({"feedback_decay": 0.0}, "feedback_decay")],
)
def test_bad_options_are_refused(options: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        DFAConfig(**options)


def test_a_pooled_maps_matrix_learns_from_each_channels_mean_activation() -> None:
    """Under ``pooled_channels`` a feature map is fed one vector per channel; its learned matrix is as wide as the
    channels and follows the rule with each channel's activation averaged over the positions."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))  # fmt: skip
    decay = 0.3
    engine = FeedbackEngine(seed=1, feedback_learning="kolen_pollack", feedback_decay=decay)
    engine.attach(net)
    acts = _recorder(net, ["1"])
    fed: dict[str, torch.Tensor] = {}
    engine.point_observers.append(lambda key, t: t.register_hook(lambda g, key=key: fed.update({key: g})))
    x, y = torch.randn(4, 1, 6, 6), torch.tensor([0, 1, 2, 0])
    logits = net(x)
    e = torch.autograd.grad(nn.functional.cross_entropy(logits, y), logits, retain_graph=True)[0]
    nn.functional.cross_entropy(logits, y).backward()
    engine.end_backward()
    b0 = engine.bank.matrix(3, 8, torch.device("cpu"), torch.float32)
    assert engine.learned.matrices["1"].shape == (8, 3)
    torch.testing.assert_close(engine.learned.matrices["1"], _rule(b0, b0, acts["1"].mean((-2, -1)), e, decay))
    feedback = fed["1"]
    assert feedback.shape == (4, 8, 6, 6) and feedback.abs().sum() > 0
    torch.testing.assert_close(feedback, feedback[..., :1, :1].expand_as(feedback))  # the same at every position
    engine.detach()
