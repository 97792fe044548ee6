"""The ``norm_jacobian`` option: feedback passed through a parameter-free LayerNorm Jacobian at each point."""

from __future__ import annotations

import torch
from conftest import mlp
from torch import nn

import lightning_dfa
from lightning_dfa import DFAConfig, FeedbackEngine


def _net() -> nn.Sequential:
    return mlp(width=16, n_in=6, n_out=3, depth=2)  # blocks "1" and "3" (after each Tanh), output "4"


def test_default_is_the_recipes_choice_and_true_is_kept() -> None:
    assert DFAConfig().norm_jacobian is None  # recipe "auto": at points whose consumer normalises
    assert FeedbackEngine(norm_jacobian=True).norm_feedback == "layernorm"
    assert FeedbackEngine(recipe="paper").norm_feedback == "off"
    assert lightning_dfa.DFAStrategy(norm_jacobian=True).dfa.config.norm_jacobian is True


def test_feedback_is_layernorm_vjp_of_plain_feedback() -> None:
    torch.manual_seed(0)
    net, x, y = _net(), torch.randn(5, 6), torch.randint(0, 3, (5,))
    plain, shaped = FeedbackEngine(seed=3), FeedbackEngine(seed=3, norm_jacobian=True)
    plain.attach(net)
    with plain.capture() as cap:
        out = net(x)
    error = torch.autograd.grad(nn.functional.cross_entropy(out, y), cap.outputs[0])[0]
    base = plain.feedback_for(error, cap.points)
    plain.detach()
    shaped.attach(net)
    got = shaped.feedback_for(error, cap.points)
    for point, b, g in zip(cap.points, base, got):
        h = point.tensor.detach().clone().requires_grad_()
        ref = torch.autograd.grad(nn.functional.layer_norm(h, h.shape[-1:]), h, b)[0]
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-6)
        assert float((g * b).sum()) > 0  # a projection (scaled): it keeps part of the signal


def test_training_backward_delivers_shaped_feedback() -> None:
    torch.manual_seed(0)
    net, x, y = _net(), torch.randn(5, 6), torch.randint(0, 3, (5,))
    engine = FeedbackEngine(seed=1, norm_jacobian=True)
    engine.attach(net)
    with engine.capture() as cap:
        out = net(x)
    error = torch.autograd.grad(nn.functional.cross_entropy(out, y), cap.outputs[0])[0]
    expected = engine.feedback_for(error, cap.points)[0]  # for block "1" = tanh(net[0](x))
    net.zero_grad()
    nn.functional.cross_entropy(net(x), y).backward()
    assert engine.end_backward().deliveries == 1
    h1 = torch.tanh(net[0](x))
    want = torch.autograd.grad(h1, net[0].weight, expected)[0]
    torch.testing.assert_close(net[0].weight.grad, want, rtol=1e-5, atol=1e-7)
    engine.detach()


def test_flattened_points_normalise_over_all_but_batch() -> None:
    from lightning_dfa.norms import NormSpec, norm_vjp

    h, v = torch.randn(2, 3, 4, 4, dtype=torch.double), torch.randn(2, 3, 4, 4, dtype=torch.double)
    x = h.clone().requires_grad_()
    ref = torch.autograd.grad(nn.functional.layer_norm(x, (3, 4, 4)), x, v)[0]
    torch.testing.assert_close(norm_vjp(h, v, NormSpec("layer", 1e-5, -1)), ref)  # norm_jacobian=True's flattened
