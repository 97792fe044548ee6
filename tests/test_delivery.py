"""How the error reaches the feedback points: outputs modified in place, points laid out differently from the
output (sequence-first), several outputs and losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import mlp
from torch import nn

from lightning_dfa import FeedbackEngine


def _grads(net: nn.Module, step, seed: int = 3, **options) -> dict[str, torch.Tensor]:
    engine = FeedbackEngine(seed=seed, **options)
    engine.attach(net)
    net.zero_grad()
    step(net).backward()
    report = engine.end_backward()
    engine.detach()
    assert report.deliveries >= 1
    return {n: p.grad.clone() for n, p in net.named_parameters()}


@pytest.mark.parametrize("inplace", ["divide", "relu", "exp_"])
def test_output_modified_in_place_gets_the_same_gradients(inplace: str) -> None:
    net, x, y = mlp(), torch.randn(8, 6), torch.randint(0, 3, (8,))

    def plain(net: nn.Module) -> torch.Tensor:
        out = net(x)
        if inplace == "divide":
            out = out / 2.0
        elif inplace == "relu":
            out = F.relu(out + 0.2)
        else:
            out = out.exp()
        return F.cross_entropy(out, y)

    def in_place(net: nn.Module) -> torch.Tensor:
        out = net(x)
        if inplace == "divide":
            out /= 2.0
        elif inplace == "relu":
            out += 0.2
            F.relu(out, inplace=True)
        else:
            out.exp_()
        return F.cross_entropy(out, y)

    expected, got = _grads(net, plain), _grads(net, in_place)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=name)
    assert not torch.equal(got["0.weight"], torch.zeros_like(got["0.weight"]))


def test_delivered_output_shares_the_output_memory() -> None:
    net = mlp()
    seen: list[int] = []
    net[6].register_forward_hook(lambda m, a, o: seen.append(o.data_ptr()) and None)
    engine = FeedbackEngine()
    engine.attach(net)  # its hook is registered after ours, so it sees the delivered tensor
    out = net(torch.randn(4, 6))
    assert out.grad_fn is not None and not out._is_view()
    assert out.data_ptr() == seen[0]  # no copy of the output
    engine.detach()
