"""The feedback engine on its own (no Trainer): the DFA rule, the matrices, shapes, modes."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import hooks_of, mlp
from torch import nn

from lightning_dfa import DFAConfig, FeedbackBank, FeedbackEngine
from lightning_dfa.projectors.bank import draw


def _ce_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = net(x)
    nn.functional.cross_entropy(out, y).backward()
    return out


def test_hidden_signal_is_projected_error_and_head_gets_true_gradient() -> None:
    net = mlp(width=16, depth=3)
    acts: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}
    for name in ("1", "3", "5"):  # registered before the engine's hooks: they see the block outputs
        net.get_submodule(name).register_forward_hook(lambda m, a, o, n=name: acts.__setitem__(n, o))
    engine = FeedbackEngine(seed=0)
    engine.attach(net)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    logits = net(x)
    for name, h in acts.items():
        h.register_hook(lambda g, n=name: grads.__setitem__(n, g))
    nn.functional.cross_entropy(logits, y).backward()
    engine.end_backward()
    e = (torch.softmax(logits.detach(), 1) - nn.functional.one_hot(y, 3)) / 8
    matrix = engine.bank.matrix(3, 16, torch.device("cpu"), torch.float32)  # [16, 3]
    for name in ("1", "3", "5"):
        torch.testing.assert_close(grads[name], e @ matrix.t() / math.sqrt(16))
    h3 = acts["5"].detach()
    torch.testing.assert_close(net[6].weight.grad, e.t() @ h3)
    torch.testing.assert_close(net[6].bias.grad, e.sum(0))


def test_no_gradient_crosses_between_blocks() -> None:
    """The layers after each feedback point read a cut value; in the first forward the cuts stay in the graph (so
    that the first loss shows which points it reads directly) but pass no gradient either: the first step's
    gradients are the second's on the same batch."""
    net = mlp(depth=3)
    engine = FeedbackEngine()
    engine.attach(net)
    seen: list[bool] = []
    for i in (2, 4, 6):  # the Linear after each feedback point
        net[i].register_forward_pre_hook(lambda m, a: seen.append(a[0].requires_grad))
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    grads = []
    for _ in range(2):
        seen.clear()
        net.zero_grad(set_to_none=True)
        _ce_step(net, x, y)
        engine.end_backward()
        grads.append([p.grad for p in net.parameters()])
    assert seen == [False, False, False]
    assert all(g is not None for g in grads[1])
    for first, second in zip(*grads):
        torch.testing.assert_close(first, second)


def test_one_backward_call_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = torch.autograd.backward
    monkeypatch.setattr(torch.autograd, "backward", lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    net = mlp()
    engine = FeedbackEngine()
    engine.attach(net)
    _ce_step(net, torch.randn(4, 6), torch.randint(0, 3, (4,)))
    assert calls == [1]
    assert engine.end_backward().deliveries == 1


def test_forward_outputs_unchanged_and_inert_under_no_grad() -> None:
    net = mlp()
    plain = copy.deepcopy(net)
    x = torch.randn(5, 6)
    engine = FeedbackEngine()
    engine.attach(net)
    assert torch.equal(net(x), plain(x))
    with torch.no_grad():
        assert torch.equal(net(x), plain(x))
    assert engine.report.points_recorded == 3  # only the grad-enabled forward recorded
    with torch.inference_mode():
        assert torch.equal(net(x), plain(x))
    engine.detach()
    assert hooks_of(net) == 0


def test_deepcopy_of_attached_model_is_plain() -> None:
    net = mlp()
    engine = FeedbackEngine()
    engine.attach(net)
    twin = copy.deepcopy(net)
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    _ce_step(twin, x, y)  # a plain backprop model: no feedback, no engine involvement
    assert engine.report.deliveries == 0 and engine.report.points_recorded == 0
    reference = copy.deepcopy(twin)
    for p in reference.parameters():
        p.grad = None
    _ce_step(reference, x, y)
    for a, b in zip(twin.parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_global_rng_untouched_and_matrices_reproducible() -> None:
    state = torch.get_rng_state()
    a = FeedbackBank(seed=3, distribution="gaussian").matrix(10, 40, torch.device("cpu"), torch.float32)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(1234)  # the global seed plays no role
    b = FeedbackBank(seed=3, distribution="gaussian").matrix(10, 40, torch.device("cpu"), torch.float32)
    assert torch.equal(a, b)
    c = FeedbackBank(seed=4, distribution="gaussian").matrix(10, 40, torch.device("cpu"), torch.float32)
    assert not torch.equal(a, c)


def test_growing_matrix_keeps_its_first_rows() -> None:
    bank = FeedbackBank(seed=0)
    small = bank.matrix(7, 30, torch.device("cpu"), torch.float32).clone()
    big = bank.matrix(7, 300, torch.device("cpu"), torch.float32)
    assert torch.equal(big[:30], small)


@pytest.mark.parametrize(("distribution", "var"), [("gaussian", 1.0), ("uniform", 1 / 3), ("rademacher", 1.0)])
def test_distributions(distribution: str, var: float) -> None:
    m = draw((200, 100), distribution, 0, "x")
    assert abs(m.mean().item()) < 0.02
    assert m.var().item() == pytest.approx(var, rel=0.05)
    if distribution == "uniform":
        assert m.min() >= -1 and m.max() < 1
    if distribution == "rademacher":
        assert set(m.unique().tolist()) == {-1.0, 1.0}


def test_unknown_options_are_refused() -> None:
    assert DFAConfig(mode="DFA").mode == "dfa"  # case-insensitive, never a silent fallback
    for bad in ("dfa2", "backprop", "", None):
        with pytest.raises(ValueError, match="unknown mode"):
            DFAConfig(mode=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="distribution"):
        DFAConfig(distribution="normal")
    with pytest.raises(ValueError, match="placement"):
        DFAConfig(placement="nano")


def test_shared_signal_by_default_distinct_on_request() -> None:
    def signals(distinct: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        net = mlp(depth=3)
        acts: list[torch.Tensor] = []
        for name in ("1", "3", "5"):
            net.get_submodule(name).register_forward_hook(lambda m, a, o: acts.append(o))
        FeedbackEngine(distinct=distinct).attach(net)
        out = net(torch.randn(4, 6))
        got: list[torch.Tensor] = [torch.empty(0)] * 3
        for i, h in enumerate(acts):
            h.register_hook(lambda g, i=i: got.__setitem__(i, g))
        nn.functional.cross_entropy(out, torch.randint(0, 3, (4,))).backward()
        return got

    shared = signals(False)
    assert torch.equal(shared[0], shared[1]) and torch.equal(shared[1], shared[2])
    distinct = signals(True)
    assert not torch.equal(distinct[0], distinct[1])
    for a, b in zip(shared, distinct):  # sign flips of the same projection
        torch.testing.assert_close(a.abs(), b.abs())


def test_feedback_dtype_follows_incoming_gradient() -> None:
    net = mlp().to(torch.bfloat16)
    engine = FeedbackEngine()
    engine.attach(net)
    _ce_step(net, torch.randn(4, 6, dtype=torch.bfloat16), torch.randint(0, 3, (4,)))
    assert all(p.grad.dtype == torch.bfloat16 for p in net.parameters())
    assert engine.end_backward().deliveries == 1


def test_conv_points_are_flattened() -> None:
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64, 5),
    )
    engine = FeedbackEngine()
    target = engine.attach(net)
    assert [b.name for b in target.blocks] == ["1", "3"]
    _ce_step(net, torch.randn(2, 1, 4, 4), torch.randint(0, 5, (2,)))
    assert engine.bank.widths["1"] == [5, 64]  # error width 5, point width 4*4*4
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_sequence_output_broadcasts_over_positions() -> None:
    class SeqCls(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2)])
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = layer(x)
            return self.head(x.mean(1))

    net = SeqCls()
    grads: list[torch.Tensor] = []
    net.layers[1].register_forward_hook(lambda m, a, o: [o.register_hook(grads.append)] and None)
    engine = FeedbackEngine()
    engine.attach(net)
    _ce_step(net, torch.randn(2, 5, 8), torch.randint(0, 3, (2,)))
    assert grads[0].shape == (2, 5, 8)
    assert torch.equal(grads[0][:, 0], grads[0][:, 4])  # same signal at every position
    assert engine.bank.widths["layers.1"] == [3, 8]


def test_misaligned_error_is_a_clear_error() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
            self.head = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x).t().mean(1, keepdim=True).expand(8, 8))

    net = Odd()
    FeedbackEngine(blocks=["body.1", "body.3"], output="head").attach(net)
    with pytest.raises(RuntimeError, match="cannot line up the error"):
        net(torch.randn(3, 4)).sum().backward()


def test_shallow_cuts_everything_before_the_head() -> None:
    net = mlp(depth=3)
    engine = FeedbackEngine(mode="shallow")
    engine.attach(net)
    _ce_step(net, torch.randn(4, 6), torch.randint(0, 3, (4,)))
    assert [p.grad is None for p in net.parameters()] == [True] * 6 + [False] * 2
    engine.end_backward()  # no feedback is expected in shallow mode: no error


def test_silent_backward_is_an_error() -> None:
    net = mlp()
    engine = FeedbackEngine()
    engine.attach(net)
    h = net[:6](torch.randn(4, 6))  # the output module is never called
    ((h**2).sum() + net[0].weight.sum()).backward()
    with pytest.raises(RuntimeError, match="was not called after the blocks"):
        engine.end_backward()


def test_loss_without_grad_is_refused() -> None:
    engine = FeedbackEngine()
    engine.attach(mlp())
    with pytest.raises(RuntimeError, match="does not depend on the output module"):
        engine.check_loss(torch.tensor(1.0))


def test_several_forwards_before_one_backward_each_get_feedback() -> None:
    net = mlp()
    engine = FeedbackEngine()
    engine.attach(net)
    x1, x2 = torch.randn(4, 6), torch.randn(4, 6)
    y1, y2 = torch.randint(0, 3, (4,)), torch.randint(0, 3, (4,))
    loss = nn.functional.cross_entropy(net(x1), y1) + nn.functional.cross_entropy(net(x2), y2)
    loss.backward()
    assert engine.end_backward().deliveries == 2
    grad_two = net[0].weight.grad.clone()
    net.zero_grad()
    nn.functional.cross_entropy(net(x1), y1).backward()
    nn.functional.cross_entropy(net(x2), y2).backward()
    torch.testing.assert_close(net[0].weight.grad, grad_two)


def test_checkpoint_state_round_trip_and_shape_mismatch() -> None:
    net = mlp(width=16)
    engine = FeedbackEngine(seed=5)
    engine.attach(net)
    _ce_step(net, torch.randn(4, 6), torch.randint(0, 3, (4,)))
    state = engine.state_dict()
    resumed = FeedbackEngine(seed=99)  # the checkpoint's feedback wins over the new seed
    resumed.load_state_dict(state)
    assert torch.equal(
        resumed.bank.matrix(3, 16, torch.device("cpu"), torch.float32),
        engine.bank.matrix(3, 16, torch.device("cpu"), torch.float32),
    )
    wider = mlp(width=32)
    other = FeedbackEngine()
    other.load_state_dict(state)
    other.attach(wider)
    with pytest.raises(RuntimeError, match="shapes changed since the checkpoint"):
        _ce_step(wider, torch.randn(4, 6), torch.randint(0, 3, (4,)))


def test_feedback_transform_is_applied_and_checked() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    error = torch.randn(4, 2)
    plain = FeedbackEngine(seed=1)
    plain.attach(net)
    with plain.capture() as cap:
        net(torch.randn(4, 3))
    base = plain.feedback_for(error, cap.points)[0]
    plain.detach()
    doubled = FeedbackEngine(seed=1, feedback_transform=lambda key, fb: 2 * fb)
    torch.testing.assert_close(doubled.feedback_for(error, cap.points)[0], 2 * base)
    wrong = FeedbackEngine(seed=1, feedback_transform=lambda key, fb: fb[:1])
    with pytest.raises(RuntimeError, match="same shape"):
        wrong.feedback_for(error, cap.points)
    with pytest.raises(TypeError, match="callable"):
        FeedbackEngine(feedback_transform=3)


def test_views_of_the_layers_under_other_names_change_no_blocks() -> None:
    """``self.backbone = self.net[:-1]`` or ``nn.ModuleList(self.layers[:2])`` re-register modules under a second
    name: the blocks, the output and the gradients are those of the model without the views."""

    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.layers = nn.ModuleList(nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(3))
            self.head = nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = layer(x)
            return self.head(x)

    plain_mlp, viewed_mlp = mlp(), mlp()
    viewed_mlp.load_state_dict(plain_mlp.state_dict())
    holder = nn.Module()
    holder.net = viewed_mlp
    holder.backbone = viewed_mlp[:-1]
    holder.forward = viewed_mlp.forward  # type: ignore[method-assign]
    plain_stack, viewed_stack = Stack(), Stack()
    viewed_stack.first = nn.ModuleList(viewed_stack.layers[:2])
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    for plain, viewed, prefix in ((plain_mlp, holder, "net."), (plain_stack, viewed_stack, "")):
        found = {}
        for name, model in (("plain", plain), ("viewed", viewed)):
            engine = FeedbackEngine(seed=0)
            target = engine.attach(model)
            _ce_step(model, x, y)
            engine.end_backward()
            found[name] = (
                [b.name for b in target.blocks],
                target.output_name,
                {n: p.grad.clone() for n, p in model.named_parameters()},
            )
            engine.detach()
        assert found["viewed"][0] == [prefix + n for n in found["plain"][0]]
        assert found["viewed"][1] == prefix + found["plain"][1]
        for n, g in found["plain"][2].items():
            torch.testing.assert_close(found["viewed"][2][prefix + n], g, rtol=0, atol=0)


def test_an_output_named_where_discovery_found_a_block_keeps_the_blocks_before_it() -> None:
    """Two Sequentials, the model and a critic registered after it: discovery runs one chain through both and takes
    the model's head for a block. ``output=`` naming the head keeps the blocks before it (not the head, not the
    critic's), and the model trains by feedback; an output that no block overlaps leaves the blocks as found."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
            self.critic = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.encoder(x)

    torch.manual_seed(0)
    net = Net()
    first = FeedbackEngine()
    found = [b.name for b in first.attach(net).blocks]
    first.detach()
    assert "encoder.4" in found and "critic.1" in found
    engine = FeedbackEngine(output="encoder.4")
    target = engine.attach(net)
    assert [b.name for b in target.blocks] == ["encoder.1", "encoder.3"] and target.output_name == "encoder.4"
    nn.functional.cross_entropy(net(torch.randn(4, 6)), torch.tensor([0, 1, 2, 0])).backward()
    assert engine.end_backward().deliveries == 1
    engine.detach()
    assert [b.name for b in FeedbackEngine(output="critic.2").attach(net).blocks] == found[:-1] + ["critic.1"]


def test_blocks_named_as_the_summary_lists_them_give_the_discovered_feedback() -> None:
    """The summary lists an ``nn.Sequential``'s Linear+Tanh groups by their activations (``'1'``, ``'3'``): naming
    those as ``blocks=`` gives the discovered groups' gradients (feedback through the activation's derivative), not
    feedback at the activations' inputs (which ``blocks=['0', '2']`` asks for)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))

    def grads(**options: object) -> list[torch.Tensor]:
        engine = FeedbackEngine(**options)
        engine.attach(net)
        net.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        assert engine.end_backward().deliveries == 1
        engine.detach()
        return [p.grad.clone() for p in net.parameters()]

    found, named, layers = grads(), grads(blocks=["1", "3"], output="4"), grads(blocks=["0", "2"], output="4")
    for a, b in zip(found, named):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(found[0], layers[0])


class _ParentAdds(nn.Module):
    """A stem, three blocks whose residual adds the parent writes (``h = h + block(h)``, as in lucidrains' models),
    a norm and a head; ``inside=True`` holds each add in its block instead."""

    def __init__(self, inside: bool) -> None:
        super().__init__()
        self.inside = inside
        self.stem = nn.Linear(20, 16)
        self.blocks = nn.ModuleList(
            [_Residual(nn.Linear(16, 16)) if inside else nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(3)]
        )
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.stem(x))
        for block in self.blocks:
            h = block(h) if self.inside else h + block(h)
        return self.head(self.norm(h))


class _Residual(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.f = nn.Sequential(layer, nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


@pytest.mark.parametrize("mode", ["dfa", "shallow"])
def test_a_residual_add_written_in_the_parent_is_cut_like_one_inside_the_block(mode: str) -> None:
    """The feedback point at a block's input cuts the residual stream. With the add in the parent, the identity path
    around the blocks would hand the stem the loss's true gradient (and the shallow baseline would train it). Cut,
    every parameter gets what the same network with its adds inside the blocks gets: the stem only its point's
    feedback, nothing in the shallow baseline; the final norm and the head their true gradient."""
    x, y = torch.randn(32, 20), torch.randint(0, 4, (32,))
    grads, roles = [], []
    for inside in (False, True):
        torch.manual_seed(0)
        net = _ParentAdds(inside)
        engine = FeedbackEngine(mode=mode, seed=0, norm_jacobian=False)
        engine.attach(net)
        for _ in range(2):  # the second step runs without the first forwards' probes
            net.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            engine.end_backward(loss)
        grads.append({n.replace(".f.", "."): p.grad for n, p in net.named_parameters()})
        roles.append(engine.parameter_roles(net))
        engine.detach()
    parent, inside = grads
    assert parent.keys() == inside.keys()
    for name in parent:
        assert (parent[name] is None) == (inside[name] is None), name
        if parent[name] is not None:
            torch.testing.assert_close(parent[name], inside[name], rtol=1e-5, atol=1e-7, msg=name)
    assert (parent["stem.weight"] is None) == (mode == "shallow")
    assert roles[0] == roles[1]
    assert roles[0]["true gradient"] == 16 * 2 + 16 * 4 + 4  # the final norm and the head


class _SkipLayer(nn.Module):
    """WaveNet's layer: a gated unit whose residual output goes on to the next layer and whose skip output the
    parent sums into the head."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.filt, self.res, self.skip = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 12)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.tanh(self.filt(x))
        return self.res(z) + x, self.skip(z)


class _SkipNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.layers, self.head = (
            nn.Linear(4, 8),
            nn.ModuleList([_SkipLayer() for _ in range(3)]),
            nn.Linear(12, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, skips = self.inp(x), 0
        for layer in self.layers:
            x, skip = layer(x)
            skips = skips + skip
        return self.head(torch.relu(skips))


@pytest.mark.parametrize("mode", ["dfa", "shallow"])
def test_a_blocks_second_output_summed_into_the_head_is_a_point_too(mode: str) -> None:
    """A block's other outputs of its batch are feedback points (``"<block>:out1"``), cut like its main output: no
    parameter of a block learns by backprop through them (before: every skip layer got exactly its backprop
    gradient, and the shallow baseline trained the blocks)."""
    torch.manual_seed(0)
    net, x, y = _SkipNet(), torch.randn(16, 4), torch.randint(0, 3, (16,))
    reference = copy.deepcopy(net)
    nn.functional.cross_entropy(reference(x), y).backward()
    engine = FeedbackEngine(mode=mode)
    assert [b.name for b in engine.attach(net).blocks] == ["layers.0", "layers.1", "layers.2"]
    loss = nn.functional.cross_entropy(net(x), y)
    loss.backward()
    engine.end_backward(loss)
    if mode == "dfa":
        assert [p.key for p in engine.last_points][1:3] == ["layers.0", "layers.0:out1"]
    for name, p in net.named_parameters():
        if name.startswith("layers."):
            if mode == "shallow":
                assert p.grad is None, name
            else:  # (the last layer's residual output feeds nothing: backprop gives its layer no gradient)
                true = dict(reference.named_parameters())[name].grad
                assert p.grad is not None and (true is None or not torch.allclose(p.grad, true)), name
    torch.testing.assert_close(net.head.weight.grad, reference.head.weight.grad)
    engine.detach()


class _Backcast(nn.Module):
    """N-BEATS' block: a backcast (first) and a forecast (second), the parent summing the forecasts."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.back, self.fore = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.fc(x))
        return self.back(h), self.fore(h)


def test_an_output_whose_tuple_the_loss_reads_past_its_first_item_is_named_with_what_to_pass() -> None:
    """The last block of a list taken for the output returns ``(backcast, forecast)`` and the loss reads the
    forecasts: the refusal says the output returned a tuple whose first item the loss does not read, and to pass
    ``output=`` (before: "the loss does not depend on the output module", which it did)."""
    torch.manual_seed(0)
    net = nn.Module()
    net.blocks = nn.ModuleList([_Backcast() for _ in range(3)])
    engine = FeedbackEngine()
    engine.attach(net)
    x, forecast = torch.randn(4, 8), 0
    for block in net.blocks:
        back, fore = block(x)
        x, forecast = x - back, forecast + fore
    loss = forecast.square().mean()
    loss.backward()
    with pytest.raises(RuntimeError, match=r"'blocks\.2' returned a tuple.*output="):
        engine.end_backward(loss)
    engine.detach()


def test_a_parent_residual_around_a_block_and_its_parent_side_norm_is_cut_too() -> None:
    """PyG's loop ``x = x + relu(norm(conv(x)))``, the norm the parent's: the skip around the block and its norm is
    cut as well. In the shallow baseline the stem and the norms between blocks get no gradient; the norm after the
    last block learns by its true gradient, as any layer after the blocks."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.head = nn.Linear(8, 16), nn.Linear(16, 3)
            self.blocks = nn.ModuleList([nn.Linear(16, 16) for _ in range(3)])
            self.norms = nn.ModuleList([nn.LayerNorm(16) for _ in range(3)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.stem(x)
            for block, norm in zip(self.blocks, self.norms):
                x = x + torch.relu(norm(block(x)))
            return self.head(x)

    torch.manual_seed(0)
    net, x, y = Net(), torch.randn(16, 8), torch.randint(0, 3, (16,))
    engine = FeedbackEngine(mode="shallow")
    engine.attach(net)
    loss = nn.functional.cross_entropy(net(x), y)
    loss.backward()
    engine.end_backward(loss)
    learned = sorted({n.rsplit(".", 1)[0] for n, p in net.named_parameters() if p.grad is not None})
    assert learned == ["head", "norms.2"]
    engine.detach()
