"""How the error reaches the feedback points: outputs modified in place, points laid out differently from the
output (sequence-first), several outputs and losses."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

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
    return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in net.named_parameters()}


def _checked_step(net: nn.Module, step: Callable[[nn.Module], torch.Tensor], **options: Any) -> FeedbackEngine:
    """The engine, detached again, after one backward of ``step(net)`` whose loss it checked first
    (:meth:`FeedbackEngine.loss_readers`, as the adapters do): its points, crossings and bank are those of that step,
    and ``net`` keeps the gradients."""
    engine = FeedbackEngine(**options)
    engine.attach(net)
    loss = step(net)
    engine.loss_readers(loss)
    loss.backward()
    engine.end_backward()
    engine.detach()
    return engine


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


# ---------------------------------------------------------------------------------------------- layouts
class SeqFirstLM(nn.Module):
    """A Transformer encoder run sequence-first (``[T, B, d]``, PyTorch's default for ``nn.Transformer*``), its
    head batch-first after a transpose; ``batch_first=True`` gives the same network batch-first throughout."""

    def __init__(self, batch_first: bool = False, vocab: int = 11, d: int = 16, pool: bool = False) -> None:
        super().__init__()
        self.batch_first, self.pool = batch_first, pool
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(
            [nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=batch_first) for _ in range(2)]
        )
        self.head = nn.Linear(d, 3 if pool else vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        x = x if self.batch_first else x.transpose(0, 1)
        for layer in self.layers:
            x = layer(x)
        if self.pool:  # a sequence classifier: one error per sample, broadcast over the positions
            return self.head(x.mean(1 if self.batch_first else 0))
        return self.head(x if self.batch_first else x.transpose(0, 1))


def _lm_loss(ids: torch.Tensor, pool: bool = False):
    def step(net: nn.Module) -> torch.Tensor:
        out = net(ids)
        if pool:
            return F.cross_entropy(out, ids[:, 0] % 3)
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), ids.roll(-1, 1).reshape(-1))

    return step


@pytest.mark.parametrize("pool", [False, True], ids=["tokens", "pooled"])
@pytest.mark.parametrize("batch, length", [(4, 4), (3, 5)])
def test_sequence_first_points_line_up_with_a_batch_first_error(batch: int, length: int, pool: bool) -> None:
    """The DFA gradients of a sequence-first encoder equal those of the same network run batch-first, when the
    batch size equals the sequence length (where sizes cannot tell the layouts apart) and when it does not, at
    the first step (which probes the layout) and at later ones."""
    torch.manual_seed(0)
    seq_first, batch_first = SeqFirstLM(pool=pool), SeqFirstLM(batch_first=True, pool=pool)
    batch_first.load_state_dict(seq_first.state_dict())
    engines = [FeedbackEngine(seed=4, cut_token_embedding=False) for _ in range(2)]  # the embedding is a point
    for engine, net in zip(engines, (seq_first, batch_first)):
        engine.attach(net)
    for step in range(2):
        ids = torch.randint(0, 11, (batch, length), generator=torch.Generator().manual_seed(step))
        grads = []
        for engine, net in zip(engines, (seq_first, batch_first)):
            net.zero_grad()
            _lm_loss(ids, pool)(net).backward()
            assert engine.end_backward().deliveries == 1
            grads.append({n: p.grad.clone() for n, p in net.named_parameters()})
        for name in grads[1]:
            torch.testing.assert_close(grads[0][name], grads[1][name], msg=f"step {step}: {name}")
    assert engines[0].layouts.relations[("layers.0", "head")] == "swapped"  # probed (and confirmed where sizes differ)
    if batch == length:
        assert engines[1].layouts.relations[("layers.0", "head")] == "same"


def test_sequence_first_points_line_up_with_rows_of_a_flattened_head() -> None:
    """A head applied to ``[B * T, d]`` rows flattened from the batch-first view of sequence-first points."""

    class RowsHead(SeqFirstLM):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            x = self.embed(ids).transpose(0, 1)
            for layer in self.layers:
                x = layer(x)
            return self.head(x.transpose(0, 1).reshape(-1, x.shape[-1]))  # rows in (batch, position) order

    torch.manual_seed(0)
    rows, reference = RowsHead(), SeqFirstLM(batch_first=True)
    reference.load_state_dict(rows.state_dict())
    ids = torch.randint(0, 11, (3, 5))
    got = _grads(rows, _lm_loss(ids), seed=4)
    expected = _grads(reference, _lm_loss(ids), seed=4)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=name)


def test_a_point_whose_layout_the_data_flow_cannot_tell_is_refused() -> None:
    class Mixer(nn.Module):  # every output position depends equally on every point position
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2)])
            self.head = nn.Linear(8, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = layer(x)
            return self.head(x.mean((0, 1), keepdim=True).expand_as(x).contiguous())

    net = Mixer()
    FeedbackEngine().attach(net)
    with pytest.raises(RuntimeError, match="cannot tell how feedback point 'layers.0'"):
        net(torch.randn(4, 4, 8)).sum().backward()


def test_a_probe_through_another_outputs_tie_measures_the_data_flow_alone() -> None:
    """Two heads read a neck outside the blocks (a decoder's final norm before DETR's class and box heads), so the
    first step probes the layout of ``[B, T, d]`` points with ``B == T`` once per head, and the second head's probe
    runs through the neck's tie after the first head delivered. The probe must not pick up the feedback delivered
    so far (every item's: it was refused as depending on both dimensions), nor take it from the training backward:
    the probing step's gradients are those of the same step once the layouts are known."""

    class Heads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2)])
            self.neck, self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            for layer in self.layers:
                x = layer(x)
            h = torch.tanh(self.neck(x))
            return self.a(h), self.b(h)

    torch.manual_seed(0)
    net, x = Heads(), torch.randn(4, 4, 8)
    engine = FeedbackEngine(seed=1)
    engine.attach(net)
    grads = []
    for _ in range(2):  # the probing step, then the same step with the layouts known
        net.zero_grad()
        a, b = net(x)
        (a.square().sum() + b.square().sum()).backward()
        assert engine.end_backward().deliveries == 2
        grads.append({n: p.grad.clone() for n, p in net.named_parameters()})
    assert {engine.layouts.relations[(f"layers.{i}", h)] for i in (0, 1) for h in "ab"} == {"same"}
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------------------------------------- several outputs
class MultiTask(nn.Module):
    """A shared backbone, a classification head and a regression head, each with its own loss."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.classify = nn.Linear(16, 3)
        self.regress = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.backbone(x)
        return self.classify(h), self.regress(h)


def _multitask_grads(net: nn.Module, losses: tuple[str, ...], **options) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x, y, t = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g), torch.randn(8, 2, generator=g)

    def step(net: nn.Module) -> torch.Tensor:
        logits, values = net(x)
        terms = {"cls": F.cross_entropy(logits, y), "reg": F.mse_loss(values, t)}
        return sum(terms[name] for name in losses)

    return _grads(net, step, **options)


def test_two_heads_two_losses_each_loss_reaches_the_blocks() -> None:
    torch.manual_seed(0)
    net = MultiTask()
    heads = dict(output=["classify", "regress"])
    both = _multitask_grads(net, ("cls", "reg"), **heads)
    cls, reg = _multitask_grads(net, ("cls",), **heads), _multitask_grads(net, ("reg",), **heads)
    for name in ("backbone.0.weight", "backbone.2.weight"):
        assert not torch.allclose(both[name], cls[name]) and not torch.allclose(both[name], reg[name]), name
        torch.testing.assert_close(both[name], cls[name] + reg[name])  # each head's error, projected, summed
    # without output=, both heads are found from the forward: the same gradients
    found = _multitask_grads(net, ("cls", "reg"))
    for name in both:
        torch.testing.assert_close(found[name], both[name], msg=name)
    # each head trains by its own true gradient
    net.zero_grad()
    g = torch.Generator().manual_seed(1)
    x, y, t = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g), torch.randn(8, 2, generator=g)
    logits, values = net(x)
    (F.cross_entropy(logits, y) + F.mse_loss(values, t)).backward()
    for name in ("classify.weight", "regress.weight"):
        torch.testing.assert_close(both[name], net.get_parameter(name).grad)


class DeepSupervision(nn.Module):
    """An auxiliary classifier on a middle layer (Inception's, deep supervision): ``aux`` reads ``stage1``'s output."""

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(nn.Linear(6, 16), nn.Tanh())
        self.stage2 = nn.Sequential(nn.Linear(16, 16), nn.Tanh())
        self.aux, self.fc = nn.Linear(16, 3), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.stage1(x)
        return self.fc(self.stage2(h)), self.aux(h)


def test_a_head_on_a_middle_layer_feeds_the_blocks_when_named() -> None:
    """Named (``output=["fc", "aux"]`` with ``blocks=``), the auxiliary loss reaches ``stage1`` through its own
    feedback; found by default, ``aux`` is a hidden layer and its loss term trains ``aux`` alone until it is made an
    output (:meth:`FeedbackEngine.add_outputs`, which the Lightning adapters call after the first step)."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)

    def stage1_grad(aux_weight: float, **options: Any) -> torch.Tensor:
        torch.manual_seed(0)
        net = DeepSupervision()
        engine = FeedbackEngine(seed=0, **options)
        engine.attach(net)
        out, aux = net(x)
        (F.cross_entropy(out, y) + aux_weight * F.cross_entropy(aux, y)).backward()
        engine.end_backward()
        engine.detach()
        return net.stage1[0].weight.grad

    named = dict(blocks=["stage1", "stage2"], output=["fc", "aux"])
    assert not torch.allclose(stage1_grad(0.3, **named), stage1_grad(0.0, **named))
    torch.testing.assert_close(stage1_grad(0.3), stage1_grad(0.0), rtol=0, atol=0)


def test_heads_found_by_the_loss_become_outputs_and_resume_from_the_state() -> None:
    """``loss_readers`` lists the heads (read by the loss, by nothing else); ``add_outputs`` makes them outputs with
    matrices of their own; the state keeps them (and the second output's matrices, keyed ``width@output``), so an
    engine loaded from it attaches with the same outputs and gives the same gradients."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    torch.manual_seed(0)
    net = DeepSupervision()

    def step(engine: FeedbackEngine) -> dict[str, torch.Tensor]:
        net.zero_grad()
        out, aux = net(x)
        loss = F.cross_entropy(out, y) + 0.3 * F.cross_entropy(aux, y)
        engine.loss_readers(loss)
        loss.backward()
        engine.end_backward()
        return {n: p.grad.clone() for n, p in net.named_parameters()}

    engine = FeedbackEngine(seed=0)
    engine.attach(net)
    step(engine)
    assert engine.loss_heads == ["aux"]
    target = engine.add_outputs(engine.loss_heads)
    assert [b.name for b in target.blocks] == ["stage1.0", "stage2.0"]
    assert [n for n, _ in target.outputs] == ["fc", "aux"]
    grads = step(engine)
    state = engine.state_dict()
    assert state["heads"] == ["aux"] and "3@aux" in state["matrices"]
    engine.detach()
    resumed = FeedbackEngine(seed=0)
    resumed.load_state_dict(state)
    assert [n for n, _ in resumed.attach(net).outputs] == ["fc", "aux"]
    for name, grad in step(resumed).items():
        torch.testing.assert_close(grad, grads[name], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\['nope'\] are neither blocks"):
        resumed.add_outputs(["nope"])


#: a short, quiet Lightning run on the CPU
TRAINER_FLAGS: dict[str, Any] = dict(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                     enable_model_summary=False, accelerator="cpu", devices=1)  # fmt: skip


def _batches_of_six_features() -> Any:
    """Three batches of 8: 6 features, 3 classes (seeded)."""
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(24, 6, generator=g), torch.randint(0, 3, (24,), generator=g)), 8)


class HiddenTerm(nn.Module):
    """A loss term on a hidden layer that later layers read too (a VAE's KL term on its mean): not a head."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.mean, self.b, self.fc = nn.Linear(6, 16), nn.Linear(16, 8), nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.mean(torch.tanh(self.a(x)))
        return self.fc(torch.tanh(self.b(mean))), mean


def test_a_head_on_a_middle_layer_becomes_an_output_after_the_first_step_and_a_hidden_term_is_warned() -> None:
    """Under the strategy, a loss term on a middle layer's head (found as a hidden layer: nothing else reads it)
    trains the head alone at the first step, then the head is an output and its error reaches the blocks before
    it; saved in the checkpoint. A term on a hidden layer that later layers read is warned about once, naming the
    remedy; named as outputs, nothing is said."""
    import pytorch_lightning as pl

    from lightning_dfa import DFAStrategy

    class Module(pl.LightningModule):
        def __init__(self, net: nn.Module, weight: float) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net, self.weight, self.grads = net, weight, []

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            out, extra = self.net(batch[0])
            term = F.cross_entropy(extra, batch[1]) if extra.shape[-1] == 3 else extra.pow(2).mean()
            return F.cross_entropy(out, batch[1]) + self.weight * term

        def on_before_optimizer_step(self, optimizer: Any) -> None:
            first = next(self.net.parameters())
            self.grads.append(first.grad.clone())

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data, flags = _batches_of_six_features(), dict(TRAINER_FLAGS)

    def fit(net_class: type, weight: float, **options: Any) -> tuple[Module, pl.Trainer, list]:
        torch.manual_seed(0)
        module = Module(net_class(), weight)
        trainer = pl.Trainer(strategy=DFAStrategy(verbose=False, **options), **flags)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            trainer.fit(module, data)
        return module, trainer, [str(w.message) for w in seen if "reads the output of" in str(w.message)]

    with_aux, trainer, said = fit(DeepSupervision, 0.3)
    without_aux, _, _ = fit(DeepSupervision, 0.0)
    assert not said
    engine = trainer.strategy.dfa_engine
    assert [n for n, _ in engine.target.outputs] == ["net.fc", "net.aux"]
    assert "net.aux" not in [b.name for b in engine.target.blocks]
    assert engine.state_dict()["heads"] == ["net.aux"]
    torch.testing.assert_close(with_aux.grads[0], without_aux.grads[0], rtol=0, atol=0)  # the first step: aux alone
    assert not torch.allclose(with_aux.grads[1], without_aux.grads[1])  # then its error reaches stage1

    _, _, said = fit(HiddenTerm, 0.3)
    assert len(said) == 1 and "['net.mean'] directly" in said[0] and "output=['net.fc', 'net.mean']" in said[0]
    _, _, said = fit(HiddenTerm, 0.3, blocks=["net.a", "net.b"], output=["net.fc", "net.mean"])
    assert not said


class _Coupling(nn.Module):
    """An affine coupling layer (RealNVP): half of the features scaled and shifted by a function of the other half;
    it returns the new features and the log-determinant of its Jacobian, one per item."""

    def __init__(self, flip: bool) -> None:
        super().__init__()
        self.flip, self.net = flip, nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 6))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = x.chunk(2, -1)
        if self.flip:
            a, b = b, a
        s, t = self.net(a).chunk(2, -1)
        s = torch.tanh(s)
        b = b * s.exp() + t
        return torch.cat([b, a] if self.flip else [a, b], -1), s.sum(-1)


class _Flow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Coupling(i % 2 == 1) for i in range(3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, step = layer(x)
            logdet = logdet + step
        return x, logdet


@pytest.mark.parametrize("read", [True, False])
def test_a_loss_on_a_blocks_second_output_is_warned(read: bool) -> None:
    """A normalizing flow's loss reads each coupling layer's log-determinant, a second output of another shape that
    the block hands on uncut: that term trains each block inside itself only, and the fixed random feedback of the
    output's error does not weigh against it (a flow trained so diverged: 5609 nats against 2.65 by backprop).
    Warned once, naming the blocks; the same second outputs, unread by the loss, are not."""
    import pytorch_lightning as pl

    from lightning_dfa import DFAStrategy

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.flow = _Flow()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            z, logdet = self.flow(batch[0])
            return 0.5 * z.pow(2).sum(-1).mean() - (logdet.mean() if read else 0.0)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    torch.manual_seed(0)
    trainer = pl.Trainer(strategy=DFAStrategy(verbose=False), **TRAINER_FLAGS)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer.fit(Module(), _batches_of_six_features())
    said = [str(w.message) for w in seen if "second output" in str(w.message)]
    engine = trainer.strategy.dfa_engine
    assert [b.name for b in engine.target.blocks] == ["flow.layers.0", "flow.layers.1"]
    if read:
        assert len(said) == 1 and "['flow.layers.0', 'flow.layers.1'] directly" in said[0], said
    else:
        assert not said


def test_a_derivative_taken_with_create_graph_in_a_training_forward_is_warned_and_inert_gives_the_true_one() -> None:
    """A gradient penalty (WGAN-GP) differentiates the critic's output with respect to its input with
    ``create_graph=True`` inside the training step: through the delivery that derivative is the feedback's, so the
    penalty is not what it means. Warned once; computed from a forward inside ``engine.inert()``, it is the true
    derivative, no warning is given, and the critic's term still trains by feedback."""
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
    x = torch.randn(8, 4, requires_grad=True)
    true = torch.autograd.grad(critic(x).sum(), x)[0]
    engine = FeedbackEngine()
    engine.attach(critic)

    def penalised(inert: bool) -> tuple[torch.Tensor, list[str]]:
        critic.zero_grad(set_to_none=True)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            score = critic(x).mean()
            with engine.inert() if inert else contextlib.nullcontext():
                grad = torch.autograd.grad(critic(x).sum(), x, create_graph=True)[0]
            (score + ((grad.norm(dim=1) - 1) ** 2).mean()).backward()
            report = engine.end_backward()
        assert report.deliveries >= 1
        return grad, [str(w.message) for w in seen if "create_graph=True" in str(w.message)]

    grad, said = penalised(inert=True)  # (first: the warning is given once)
    assert not said
    torch.testing.assert_close(grad, true)
    assert critic[0].weight.grad is not None and critic[0].weight.grad.abs().sum() > 0
    grad, said = penalised(inert=False)
    assert len(said) == 1 and "'4'" in said[0] and "inert()" in said[0]
    assert not torch.allclose(grad, true)
    engine.detach()


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn(self.conv(x)))


class _ResidualEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.layers = nn.Conv2d(3, 4, 3, padding=1), nn.Sequential(_Residual(4), _Residual(4))
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.layers(self.conv(x))), 1)


class _ResidualDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear, self.layers = nn.Linear(2, 4 * 4 * 4), nn.Sequential(_Residual(4), _Residual(4))
        self.conv = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv(self.layers(self.linear(z).view(-1, 4, 4, 4)))


class ResidualVAE(nn.Module):
    """Lightning-Bolts' VAE layout, smaller: residual encoder and decoder, with the mean and variance layers
    outside them (no blocks), registered last."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder, self.decoder = _ResidualEncoder(), _ResidualDecoder()
        self.fc_mu, self.fc_var = nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        mu, log_var = self.fc_mu(h), self.fc_var(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * log_var)
        return self.decoder(z), mu, log_var


@pytest.mark.parametrize(
    "options",
    [{}, {"output": "decoder.conv"}, {"output": ["decoder.conv", "fc_mu", "fc_var"]}],
    ids=["found", "named", "named_with_mean_and_variance"],
)
def test_a_kl_term_on_mean_and_variance_layers_outside_the_blocks_is_found(options: dict) -> None:
    """A VAE's KL term on mean and variance layers that are no blocks (behind a residual encoder): whether they are
    tied as outputs found from the forward, which then deliver nothing of their own (the decoder is computed from
    them), or are plain layers (``output=`` names the decoder's; they read the point through a pooling module and
    a flatten), the term trains them alone; ``loss_readers`` names them (before, only blocks were checked, and
    nothing was said). Named as outputs, they feed it back."""
    torch.manual_seed(0)
    net, engine = ResidualVAE(), FeedbackEngine(**options)
    engine.attach(net)
    x = torch.randn(4, 3, 4, 4)
    recon, mu, log_var = net(x)
    loss = F.mse_loss(recon, x) - 0.5 * (1 + log_var - mu.pow(2) - log_var.exp()).sum(1).mean()
    readers = engine.loss_readers(loss)
    loss.backward()
    report = engine.end_backward(loss)
    if "fc_mu" in options.get("output", ()):
        assert readers == [] and report.deliveries == 3
    else:
        assert readers == ["fc_mu", "fc_var"] and engine.loss_heads == [] and report.deliveries == 1


def test_the_kl_term_warning_names_the_outputs_the_loss_reads() -> None:
    """Under the strategy, the warning for a VAE's KL term on mean and variance layers outside the blocks names them
    and the ``output=`` that feeds it back, from the error source the loss reads (the decoder's last layer), not
    from the discovered output (``fc_var``, the last layer registered)."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_dfa import DFAStrategy

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = ResidualVAE()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            recon, mu, log_var = self.net(batch[0])
            kl = -0.5 * (1 + log_var - mu.pow(2) - log_var.exp()).sum(1).mean()
            return F.mse_loss(recon, batch[0]) + kl

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(16, 3, 4, 4)), batch_size=8)
    trainer = pl.Trainer(strategy=DFAStrategy(verbose=False), **dict(TRAINER_FLAGS, max_steps=2))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer.fit(Module(), data)
    said = [str(w.message) for w in seen if "reads the output of" in str(w.message)]
    assert len(said) == 1
    assert "['net.fc_mu', 'net.fc_var'] directly" in said[0]
    assert "output=['net.decoder.conv', 'net.fc_mu', 'net.fc_var']" in said[0]


def test_a_term_on_a_named_output_that_another_output_reads_is_said_without_advising_to_name_it() -> None:
    """A center loss on the features a classifier reads, with both named as outputs: the features' layer is no
    error source of its own (the classifier is computed from it), so its term feeds nothing back; the warning says
    so once, without advising ``output=`` naming what is named already (before, it advised exactly the options in
    force)."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_dfa import DFAStrategy

    class CenterLoss(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.features, self.classifier = (
                nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 4), nn.Linear(4, 3)
            )  # fmt: skip
            self.centers = nn.Parameter(torch.randn(3, 4))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            f = self.features(torch.relu(self.fc2(torch.relu(self.fc1(x)))))
            center = (f - self.centers[y]).pow(2).sum(1).mean()
            return F.cross_entropy(self.classifier(torch.relu(f)), y) + 0.5 * center

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(16, 6), torch.randint(0, 3, (16,))), batch_size=8)
    strategy = DFAStrategy(verbose=False, blocks=["fc1", "fc2"], output=["classifier", "features"])
    trainer = pl.Trainer(strategy=strategy, **dict(TRAINER_FLAGS, max_steps=2))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer.fit(CenterLoss(), data)
    said = [str(w.message) for w in seen if "reads the output of" in str(w.message)]
    assert len(said) == 1 and "['features'] directly" in said[0] and "is no error source" in said[0], said
    assert "output=" not in said[0]


class WideAndDeep(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.deep = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
        self.wide = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.deep(x) + self.wide(x)  # the wide layer reads the batch, after the deep layers' points


def test_a_layer_reading_the_batch_after_the_points_is_no_reader_of_a_cut() -> None:
    """A layer outside the blocks called after the points on the batch itself (a wide part, a first-order term on
    the inputs), read directly by the loss: it reads no point, so nothing is said and it is not made an output."""
    torch.manual_seed(0)
    net, engine = WideAndDeep(), FeedbackEngine(output="deep.4")
    engine.attach(net)
    loss = F.binary_cross_entropy_with_logits(net(torch.randn(8, 6)).squeeze(1), torch.rand(8).round())
    assert engine.loss_readers(loss) == [] and engine.loss_heads == []


class PolicyValue(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.policy, self.value = nn.Linear(16, 3), nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        return self.policy(h), self.value(h)


def test_a_head_outside_the_blocks_read_by_the_loss_becomes_an_output() -> None:
    """With ``output=`` naming one head, a second head outside the blocks (a value head beside a policy) that the
    loss reads is found at the first step (before, nothing was said and its term never reached the trunk);
    ``add_outputs`` makes it an output, so its error reaches the trunk from the next step, and it is saved."""
    torch.manual_seed(0)
    net, engine = PolicyValue(), FeedbackEngine(output="policy")
    engine.attach(net)
    deliveries = []
    for _ in range(2):
        logits, value = net(torch.randn(8, 6))
        loss = F.cross_entropy(logits, torch.randint(0, 3, (8,))) + F.mse_loss(value.squeeze(1), torch.randn(8))
        engine.loss_readers(loss)
        heads = list(engine.loss_heads)
        loss.backward()
        deliveries.append(engine.end_backward(loss).deliveries)
        if heads:
            assert heads == ["value"]
            engine.add_outputs(heads)
    assert deliveries == [1, 2]
    assert [n for n, _ in engine.target.outputs] == ["policy", "value"]
    assert engine.state_dict()["heads"] == ["value"]
    with pytest.raises(ValueError, match="neither blocks"):
        engine.add_outputs(["trunk.0.weight"])


def test_heads_of_equal_width_have_their_own_feedback() -> None:
    torch.manual_seed(0)
    net = MultiTask()
    net.regress = nn.Linear(16, 3)
    engine = FeedbackEngine(output=["classify", "regress"])
    engine.attach(net)
    delivered: list[torch.Tensor] = []
    engine.feedback_observers.append(lambda e, points, fbs: delivered.append(fbs[0]))
    logits, values = net(torch.randn(4, 6))
    error = torch.randn(4, 3)
    (logits * error).sum().backward(retain_graph=True)
    (values * error).sum().backward()  # the very same error at the other head
    a, b = delivered
    assert a.shape == b.shape and not torch.allclose(a, b)


def test_the_output_called_twice_delivers_the_error_of_the_call_the_loss_uses() -> None:
    class TwoCalls(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
            self.head = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.body(x)
            return self.head(h), self.head(h.flip(0))

    torch.manual_seed(0)
    net, x, y = TwoCalls(), torch.randn(8, 6), torch.randint(0, 3, (8,))
    engine = FeedbackEngine()
    assert engine.attach(net).output_name == "head"
    first, second = net(x)
    F.cross_entropy(second, y).backward()
    report = engine.end_backward()
    assert report.outputs_tied == 2 and report.deliveries == 1
    assert net.body[0].weight.grad.abs().sum() > 0


def test_an_output_computed_from_another_output_is_the_only_error_source() -> None:
    class Stacked(nn.Module):  # head2(head1(h)): the error reaches head1 through head2, it is not a second source
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
            self.head1, self.head2 = nn.Linear(16, 8), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head2(torch.tanh(self.head1(self.body(x))))

    torch.manual_seed(0)
    net, x, y = Stacked(), torch.randn(8, 6), torch.randint(0, 3, (8,))
    only = _grads(net, lambda n: F.cross_entropy(n(x), y), output="head2")
    both = _grads(net, lambda n: F.cross_entropy(n(x), y), output=["head2", "head1"])
    for name in only:
        torch.testing.assert_close(both[name], only[name], msg=name)


def test_the_engine_keeps_no_point_alive_once_the_network_is_done_with_it() -> None:
    """A block whose output only a ReLU reads (a GCN's convolutions, here Linear layers): backprop frees that
    output once the ReLU has run (ReLU keeps its own output), and so does DFA, which holds each point's place in
    the graph, not its values (before, the engine held every point until the backward: the GCN's peak memory was
    1.125x backprop's). The gradients are those of the engine holding them."""
    import weakref

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.head = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.b(torch.relu(self.a(x)))))

    torch.manual_seed(0)
    net = Net()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    engine = FeedbackEngine(blocks=["a", "b"], output="head")
    engine.attach(net)
    alive: list[weakref.ref] = []
    engine.point_observers.append(lambda key, tensor: alive.append(weakref.ref(tensor)))
    grads = []
    for step in range(3):
        alive.clear()
        net.zero_grad()
        loss = F.cross_entropy(net(x), y)
        if step > 0:  # (the first forward keeps them while it finds which norms read the points)
            assert len(alive) == 2 and all(ref() is None for ref in alive)
        loss.backward()
        assert engine.end_backward().deliveries == 1
        grads.append([p.grad.clone() for p in net.parameters()])
    engine.detach()
    for g1, g2 in zip(grads[0], grads[2]):
        torch.testing.assert_close(g1, g2, rtol=0, atol=0)  # same batch, same weights: the same feedback
    assert all(g.abs().sum() > 0 for g in grads[2])


def _node_ids_collide(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every autograd node object gets one and the same ``id`` in :mod:`lightning_dfa.delivery`: the worst case of
    what CPython does to the node objects a graph walk lets go of (their ``id`` comes back as other nodes')."""
    import builtins

    from lightning_dfa import delivery

    def node_id(obj: object) -> int:
        return 0 if isinstance(obj, torch.autograd.graph.Node) else builtins.id(obj)

    monkeypatch.setattr(delivery, "id", node_id, raising=False)


def test_graph_walks_do_not_rely_on_the_ids_of_nodes_let_go(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_dfa.delivery import _grad_beyond_soft_cuts, _parameters_reached, _SoftCut
    from lightning_dfa.layout import Layouts

    _node_ids_collide(monkeypatch)
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    cut = _SoftCut.apply(Layouts(), torch.randn(2, 4, requires_grad=True), True)
    out = cut + lin(cut).view(2, 4)  # a residual block after a soft cut, as in a layout-probe forward
    assert _grad_beyond_soft_cuts(out)
    assert _parameters_reached(out) == {id(lin.weight), id(lin.bias)}
    assert not _grad_beyond_soft_cuts(cut * 2)


def test_a_probe_forward_finds_every_norm_point_of_a_deep_pre_norm_transformer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first forward of a batch of sequences probes the layouts; its points after a block's first norm were
    lost where node ids came back (torch 2.11), and with them the norm-aware feedback of every later block."""
    import transformers as hf

    _node_ids_collide(monkeypatch)
    torch.manual_seed(0)
    cfg = hf.GPT2Config(vocab_size=97, n_embd=32, n_layer=4, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0)
    model = hf.GPT2LMHeadModel(cfg)
    engine = FeedbackEngine()
    engine.attach(model)
    ids = torch.randint(0, 97, (4, 12))
    F.cross_entropy(model(input_ids=ids).logits.flatten(0, 1), ids.flatten()).backward()
    engine.end_backward()
    keys = [p.key for p in engine.last_points]
    blocks = [f"transformer.h.{i}" for i in range(3)]  # the last block's point moves to the head's input
    norms = [f"transformer.h.{i}.ln_1" for i in range(1, 4)]
    assert sorted(keys) == sorted([*blocks, *norms, "lm_head:in"]), keys
    assert sorted(p.key for p in engine.last_points if p.norm is not None) == blocks
    engine.detach()


def test_a_fit_with_a_middle_head_resumed_from_a_checkpoint_equals_the_uninterrupted_fit(tmp_path: Any) -> None:
    """Two outputs with dense matrices (the head found at the first step) through ``ckpt_path``: the checkpoint
    keeps the head an output and its matrices, so the resumed fit (under another global seed) is bit-identical."""
    import pytorch_lightning as pl

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = DeepSupervision()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            out, aux = self.net(batch[0])
            return F.cross_entropy(out, batch[1]) + 0.3 * F.cross_entropy(aux, batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=0.01)

    data = _batches_of_six_features()
    full, _ = _dfa_fit(Module, data, tmp_path, epochs=3)
    _dfa_fit(Module, data, tmp_path, epochs=1)
    assert torch.load(tmp_path / "e1.ckpt", weights_only=False)["dfa"]["heads"] == ["net.aux"]
    resumed, _ = _dfa_fit(Module, data, tmp_path, epochs=3, seed=1234, ckpt=str(tmp_path / "e1.ckpt"))
    for a, b in zip(full.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _dfa_fit(
    make: Callable[[], Any], data: Any, tmp_path: Any, epochs: int, seed: int = 0, ckpt: str | None = None
) -> tuple[Any, Any]:
    """``(module, trainer)``: ``make()`` fitted with ``strategy="dfa"`` for ``epochs`` under the global seed
    ``seed``, resumed from ``ckpt`` if given; a fresh fit saves ``e<epochs>.ckpt`` in ``tmp_path``."""
    import pytorch_lightning as pl

    torch.manual_seed(seed)
    module = make()
    trainer = pl.Trainer(strategy="dfa", max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                         default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, data, ckpt_path=ckpt)
    if ckpt is None:
        trainer.save_checkpoint(tmp_path / f"e{epochs}.ckpt")
    return module, trainer


class RecurrentSeq2Seq(nn.Module):
    """An encoder RNN whose final state starts a decoder RNN (a classic sequence-to-sequence model). ``bridge``:
    a bidirectional encoder whose two directions are summed into the decoder's state; ``flat``: the head reads the
    decoder's outputs flattened to rows; ``stepped``: the decoder is a recurrent cell (``nn.LSTMCell``) stepped in
    a loop from the encoder's top-layer state."""

    def __init__(
        self,
        cell: str = "LSTM",
        layers: int = 1,
        batch_first: bool = True,
        bridge: bool = False,
        flat: bool = False,
        stepped: bool = False,
    ) -> None:
        super().__init__()
        vocab, width, rnn = 12, 16, getattr(nn, cell)
        self.batch_first, self.bridge, self.flat, self.stepped = batch_first, bridge, flat, stepped
        self.src, self.tgt = nn.Embedding(vocab, width), nn.Embedding(vocab, width)
        self.encoder = rnn(width, width, layers, batch_first=batch_first, bidirectional=bridge)
        self.decoder = (
            getattr(nn, f"{cell}Cell")(width, width) if stepped else rnn(width, width, layers, batch_first=batch_first)
        )
        self.out = nn.Linear(width, vocab)

    def encode(self, src: torch.Tensor) -> Any:
        """The encoder's final state, as the decoder starts from it."""
        src = src if self.batch_first else src.t()
        _, state = self.encoder(self.src(src))
        if self.bridge or self.stepped:  # [layers * 2, batch, d] -> [layers, batch, d]; the top layer, [batch, d]
            both = state if isinstance(state, tuple) else (state,)
            both = tuple(s[-1] if self.stepped else s.view(-1, 2, *s.shape[1:]).sum(1) for s in both)
            state = both if isinstance(state, tuple) else both[0]
        return state

    def decode(self, tgt: torch.Tensor, state: Any) -> torch.Tensor:
        tgt = tgt if self.batch_first else tgt.t()
        if self.stepped:  # batch first
            steps = []
            for x in self.tgt(tgt).unbind(1):
                state = self.decoder(x, state)
                steps.append(state[0] if isinstance(state, tuple) else state)
            hidden = torch.stack(steps, 1)
        else:
            hidden = self.decoder(self.tgt(tgt), state)[0]
        return self.out(hidden.reshape(-1, hidden.shape[-1])) if self.flat else self.out(hidden)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, detach: bool = False) -> torch.Tensor:
        state = self.encode(src)
        if detach:
            state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
        return self.decode(tgt, state)


def _seq2seq_loss(net: RecurrentSeq2Seq, logits: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    if not net.flat and not net.batch_first:
        logits = logits.transpose(0, 1)
    target = tgt if net.batch_first or not net.flat else tgt.t()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.flatten())


class BilinearSkip(nn.Module):
    """A skip connection into a layer's second input (``nn.Bilinear(h2, h1)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.merge, self.out = (
            nn.Linear(6, 16),
            nn.Linear(16, 16),
            nn.Bilinear(16, 16, 16),
            nn.Linear(16, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1 = torch.tanh(self.a(x))
        return self.out(torch.tanh(self.merge(torch.tanh(self.b(h1)), h1)))


class GlobalTokens(nn.Module):
    """Layers that pass a second state beside the hidden one, read by the next layer as a keyword: a stream of the
    hidden width (PegasusX's global tokens), or (``side=4``) a narrower summary of the layer's output over the batch
    (no batch dimension: not an activation, so no point of its own)."""

    class Layer(nn.Module):
        def __init__(self, width: int, side: int) -> None:
            super().__init__()
            self.local, self.glob, self.read = nn.Linear(width, width), nn.Linear(width, side), nn.Linear(side, width)

        def forward(self, h: torch.Tensor, g: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
            g = torch.tanh(self.glob(h) if g is None else self.glob(h) + g)
            out = torch.tanh(self.local(h) + self.read(g))
            return out, g if g.shape == out.shape else out[..., : g.shape[-1]].mean(0)

    def __init__(self, side: int = 16) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(6, 16), nn.Linear(16, 3)
        self.layers = nn.ModuleList([self.Layer(16, side), self.Layer(16, side)])

    def forward(self, x: torch.Tensor, detach: bool = False) -> torch.Tensor:
        h, g = torch.tanh(self.inp(x)), None
        for layer in self.layers:
            h, g = layer(h, g=g)
            g = g.detach() if detach else g
        return self.out(h)


def test_gradient_that_crosses_from_block_to_block_through_an_uncut_input_is_found() -> None:
    """A layer's summary over the batch read by the next layer beside its hidden state carries that layer's backward
    into the one before: found. What DFA cuts crosses nothing: a second stream of hidden states (a point of its own), a
    skip into a second input of a layer-input net (the skip is a point already, and the reader gets its cut), a
    recurrent encoder's state handed to its decoder (a point of its own), a plain chain, heads on middle layers."""
    torch.manual_seed(0)

    def crossed(net: nn.Module, loss: Callable[[nn.Module], torch.Tensor], **options: Any) -> list[tuple[str, str]]:
        return _checked_step(net, loss, **options).blocks_crossed

    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    assert crossed(GlobalTokens(side=4), lambda n: F.cross_entropy(n(x), y)) == [("layers.1", "layers.0")]
    assert crossed(GlobalTokens(), lambda n: F.cross_entropy(n(x), y)) == []
    skip = BilinearSkip()
    assert crossed(skip, lambda n: F.cross_entropy(n(x), y)) == []
    assert crossed(skip, lambda n: F.cross_entropy(n(x), y), blocks=["a", "b", "merge"], output="out") == []
    src, tgt = torch.randint(0, 12, (4, 7)), torch.randint(0, 12, (4, 5))
    seq2seq = RecurrentSeq2Seq()
    assert crossed(seq2seq, lambda n: F.cross_entropy(n(src, tgt).flatten(0, 1), tgt.flatten())) == []
    chain = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    assert crossed(chain, lambda n: F.cross_entropy(n(x), y)) == []
    assert crossed(DeepSupervision(), lambda n: F.cross_entropy(n(x)[0], y) + F.cross_entropy(n(x)[1], y)) == []


def test_a_second_stream_of_hidden_states_read_by_the_next_layer_is_a_point() -> None:
    """A layer's second output of the hidden shape, read by the next layer beside its hidden state (PegasusX's global
    tokens), is the point ``layers.0:out1``: the first layer learns from the feedback at both of its outputs, the
    second as with that stream detached by hand."""
    torch.manual_seed(0)
    net = GlobalTokens()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    engine = _checked_step(net, lambda n: F.cross_entropy(n(x), y), seed=3)
    assert engine.blocks_crossed == [] and "layers.0:out1" in [p.key for p in engine.last_points]
    assert "layers.0:out1" in engine.summary()
    got = {n: p.grad.clone() for n, p in net.named_parameters()}
    by_hand = _grads(net, lambda n: F.cross_entropy(n(x, detach=True), y), seed=3)
    for name in ("layers.1.local.weight", "layers.1.glob.weight", "layers.1.read.weight", "out.weight"):
        torch.testing.assert_close(got[name], by_hand[name], msg=name)
    logits = net(x, detach=True)
    error = torch.autograd.grad(F.cross_entropy(logits, y), logits)[0]
    feedback = error @ engine.bank.matrix(3, 16, torch.device("cpu"), torch.float32).t() / 4.0
    h, g = net.layers[0](torch.tanh(net.inp(x)).detach())
    layer = list(net.layers[0].parameters())
    want = torch.autograd.grad([h, g], layer, [feedback, feedback])
    for (name, _), grad in zip(net.layers[0].named_parameters(), want):
        torch.testing.assert_close(got[f"layers.0.{name}"], grad, msg=name)


def test_a_skip_into_a_second_input_gets_the_cut_of_its_point() -> None:
    """``merge(b(h1), h1)`` in a layer-input net: ``h1`` is ``b``'s input point, so ``merge`` reads its cut. The
    first layer then learns from its feedback alone: as with the skip detached by hand."""

    class Detached(BilinearSkip):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h1 = torch.tanh(self.a(x))
            return self.out(torch.tanh(self.merge(torch.tanh(self.b(h1)), h1.detach())))

    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    torch.manual_seed(0)
    net = BilinearSkip()
    by_hand = Detached()
    by_hand.load_state_dict(net.state_dict())
    got = _grads(net, lambda n: F.cross_entropy(n(x), y))
    want = _grads(by_hand, lambda n: F.cross_entropy(n(x), y))
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, msg=name)
    with torch.no_grad():
        plain = BilinearSkip()
        plain.load_state_dict(net.state_dict())
    plain.zero_grad()
    F.cross_entropy(plain(x), y).backward()
    assert not torch.allclose(got["a.weight"], plain.a.weight.grad)  # not backprop


@pytest.mark.parametrize(
    "cell, layers, batch_first, bridge, flat",
    [
        ("LSTM", 1, True, False, False),
        ("GRU", 2, False, False, False),  # a sequence-first error, two layers of state
        ("LSTM", 2, True, True, False),  # a bidirectional encoder's directions summed: the decoder's state
        ("GRU", 1, True, False, True),  # the head reads the outputs flattened to rows
        ("LSTM", 1, False, False, True),
        ("LSTM", 2, True, False, "stepped"),  # a decoder cell stepped from the encoder's top-layer state
        ("GRU", 1, True, False, "stepped"),
    ],
)
def test_a_recurrent_state_handed_to_another_block_is_a_feedback_point(
    cell: str, layers: int, batch_first: bool, bridge: bool, flat: bool | str
) -> None:
    """The encoder's final state that starts the decoder is the point ``encoder:state`` (and ``#1``, an LSTM's cell
    state): no backward crosses into the encoder, which learns from the feedback ``B mean_t(e)`` of each item's
    error averaged over its positions, at every layer of the state; the decoder learns as with the state detached."""
    torch.manual_seed(0)
    batch, steps = 4, 5
    stepped, flat = flat == "stepped", flat is True
    net = RecurrentSeq2Seq(cell, layers, batch_first, bridge, flat, stepped)
    src, tgt = torch.randint(0, 12, (batch, 7)), torch.randint(0, 12, (batch, steps))
    engine = _checked_step(net, lambda n: _seq2seq_loss(n, n(src, tgt), tgt), seed=3)
    assert engine.blocks_crossed == []
    states = [p for p in engine.last_points if p.state is not None]
    assert [p.key for p in states] == ["encoder:state", "encoder:state#1"][: 2 if cell == "LSTM" else 1]
    got = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    # the decoder and head learn as with the state detached by hand
    by_hand = _grads(net, lambda n: _seq2seq_loss(n, n(src, tgt, detach=True), tgt), seed=3)
    for name, grad in by_hand.items():
        if name.startswith(("decoder.", "out.")):
            torch.testing.assert_close(got[name], grad, msg=name)
    # the encoder: the error at the output, averaged per item over its positions, projected by the bank's matrix
    state = net.encode(src)
    logits = net(src, tgt, detach=True)
    error = torch.autograd.grad(_seq2seq_loss(net, logits, tgt), logits)[0]
    if flat:
        error = error.view(batch, steps, -1) if batch_first else error.view(steps, batch, -1)
    rows = error.mean(dim=1 if batch_first else 0)  # [batch, vocabulary]
    width = 16
    feedback = rows @ engine.bank.matrix(12, width, torch.device("cpu"), torch.float32).t() / width**0.5
    parts = state if isinstance(state, tuple) else (state,)
    want = torch.autograd.grad(parts, list(net.encoder.parameters()), [feedback.expand_as(s) for s in parts])
    for (name, _), grad in zip(net.encoder.named_parameters(), want):
        torch.testing.assert_close(got[f"encoder.{name}"], grad, msg=name)


class AttentionSeq2Seq(nn.Module):
    """An LSTM encoder-decoder whose decoder attends to the encoder's outputs (``nn.MultiheadAttention`` with the
    decoder's outputs as queries and the encoder's as keys and values)."""

    def __init__(self, batch_first: bool = True, vocab: int = 12, width: int = 16) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.src, self.tgt = nn.Embedding(vocab, width), nn.Embedding(vocab, width)
        self.encoder = nn.LSTM(width, width, batch_first=batch_first)
        self.decoder = nn.LSTM(width, width, batch_first=batch_first)
        self.attn = nn.MultiheadAttention(width, 2, batch_first=batch_first)
        self.out = nn.Linear(2 * width, vocab)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, detach: bool = False) -> torch.Tensor:
        src, tgt = (src, tgt) if self.batch_first else (src.t(), tgt.t())
        memory, state = self.encoder(self.src(src))
        if detach:
            memory, state = memory.detach(), tuple(s.detach() for s in state)
        hidden, _ = self.decoder(self.tgt(tgt), state)
        context, _ = self.attn(hidden, memory, memory)
        logits = self.out(torch.cat([hidden, context], -1))
        return logits if self.batch_first else logits.transpose(0, 1)


@pytest.mark.parametrize("batch_first", [True, False])
def test_an_attention_over_a_recurrent_encoders_outputs_reads_them_as_a_point(batch_first: bool) -> None:
    """The encoder's output sequence, read by an attention as keys and values, is the point ``encoder:out`` (and
    its final state ``encoder:state``): no backward crosses into the encoder, which learns from each item's error
    averaged over its positions at every output position and at its state; the rest as with both detached."""
    torch.manual_seed(0)
    net = AttentionSeq2Seq(batch_first)
    src, tgt = torch.randint(0, 12, (4, 7)), torch.randint(0, 12, (4, 5))

    def loss(n: nn.Module, detach: bool = False) -> torch.Tensor:
        return F.cross_entropy(n(src, tgt, detach).flatten(0, 1), tgt.flatten())

    engine = _checked_step(net, loss, seed=3)
    assert engine.blocks_crossed == []
    keys = [p.key for p in engine.last_points]
    assert {"encoder:out", "encoder:state", "encoder:state#1"} <= set(keys)
    assert "encoder:out#1" not in keys  # the keys and values are one tensor: one point
    assert "encoder:out" in engine.summary()
    got = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in net.named_parameters()}
    by_hand = _grads(net, lambda n: loss(n, detach=True), seed=3)
    for name, grad in by_hand.items():
        if not name.startswith("encoder."):
            torch.testing.assert_close(got[name], grad, msg=name)
    logits = net(src, tgt, detach=True)
    rows = torch.autograd.grad(F.cross_entropy(logits.flatten(0, 1), tgt.flatten()), logits)[0].mean(dim=1)
    feedback = rows @ engine.bank.matrix(12, 16, torch.device("cpu"), torch.float32).t() / 4.0  # [batch, 16]
    memory, (h, c) = net.encoder(net.src(src if batch_first else src.t()))
    at_memory = feedback.unsqueeze(1) if batch_first else feedback.unsqueeze(0)
    want = torch.autograd.grad(
        [memory, h, c], list(net.encoder.parameters()), [at_memory.expand_as(memory), *[feedback.expand_as(h)] * 2]
    )
    for (name, _), grad in zip(net.encoder.named_parameters(), want):
        torch.testing.assert_close(got[f"encoder.{name}"], grad, msg=name)


def test_a_recurrent_state_point_takes_an_error_of_another_layout_per_item() -> None:
    """An encoder LSTM's state that starts a decoder whose last output a convolution turns into an image: the error
    ``[batch, channels, height, width]`` has no positions to average, so each item's whole error is projected."""

    class ToImage(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(3, 16)
            self.encoder, self.decoder = nn.LSTM(16, 16, batch_first=True), nn.LSTM(16, 16, batch_first=True)
            self.out = nn.Conv2d(4, 3, 1)

        def forward(self, x: torch.Tensor, y: torch.Tensor, detach: bool = False) -> torch.Tensor:
            _, state = self.encoder(self.inp(x))
            state = tuple(s.detach() for s in state) if detach else state
            return self.out(self.decoder(self.inp(y), state)[0][:, -1].view(-1, 4, 2, 2))

    torch.manual_seed(0)
    net, x, y, target = ToImage(), torch.randn(5, 7, 3), torch.randn(5, 4, 3), torch.randn(5, 3, 2, 2)
    got = _grads(net, lambda n: F.mse_loss(n(x, y), target), seed=3)
    image = net(x, y, detach=True)
    error = torch.autograd.grad(F.mse_loss(image, target), image)[0].flatten(1)  # [batch, 12]
    bank = FeedbackEngine(seed=3).bank
    feedback = error @ bank.matrix(12, 16, torch.device("cpu"), torch.float32).t() / 4.0
    _, (h, c) = net.encoder(net.inp(x))
    want = torch.autograd.grad([h, c], list(net.encoder.parameters()), [feedback.expand_as(h)] * 2)
    for (name, _), grad in zip(net.encoder.named_parameters(), want):
        torch.testing.assert_close(got[f"encoder.{name}"], grad, msg=name)


@pytest.mark.parametrize("cell, layers, batch_first", [("LSTM", 2, True), ("GRU", 2, False)])
def test_a_decoder_under_activation_checkpointing_reads_the_state_point_alike(
    cell: str, layers: int, batch_first: bool
) -> None:
    """The state point is recorded in the decoder's call; under non-reentrant activation checkpointing the
    recomputed call saves what the forward saved, so the gradients equal those without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(RecurrentSeq2Seq):
        def decode(self, tgt: torch.Tensor, state: Any) -> torch.Tensor:
            tgt = tgt if self.batch_first else tgt.t()
            return self.out(checkpoint(self.decoder, self.tgt(tgt), state, use_reentrant=False)[0])

    torch.manual_seed(0)
    plain, checkpointed = RecurrentSeq2Seq(cell, layers, batch_first), Checkpointed(cell, layers, batch_first)
    checkpointed.load_state_dict(plain.state_dict())
    src, tgt = torch.randint(0, 12, (4, 7)), torch.randint(0, 12, (4, 5))
    want = _grads(plain, lambda n: _seq2seq_loss(n, n(src, tgt), tgt))
    got = _grads(checkpointed, lambda n: _seq2seq_loss(n, n(src, tgt), tgt))
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, msg=name)
    assert want["encoder.weight_hh_l0"].abs().sum() > 0


def test_a_seq2seq_fit_with_the_state_as_point_warns_nothing_and_resumes_bit_identically(tmp_path: Any) -> None:
    """Under the strategy a recurrent encoder-decoder crosses nothing (no warning), the summary lists the state
    point, and a fit resumed through ``ckpt_path`` (under another global seed) equals the uninterrupted one."""
    import pytorch_lightning as pl

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = RecurrentSeq2Seq()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            src, tgt = batch
            return F.cross_entropy(self.net(src, tgt).flatten(0, 1), tgt.flatten())

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=0.01)

    g = torch.Generator().manual_seed(0)
    pairs = torch.utils.data.TensorDataset(
        torch.randint(0, 12, (16, 7), generator=g), torch.randint(0, 12, (16, 5), generator=g)
    )
    data = torch.utils.data.DataLoader(pairs, batch_size=4)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        full, trainer = _dfa_fit(Module, data, tmp_path, epochs=3)
    assert not [w for w in seen if "crosses from block to block" in str(w.message)]
    assert "net.encoder:state" in trainer.strategy.dfa_engine.summary()
    _dfa_fit(Module, data, tmp_path, epochs=1)
    resumed, _ = _dfa_fit(Module, data, tmp_path, epochs=3, seed=1234, ckpt=str(tmp_path / "e1.ckpt"))
    for a, b in zip(full.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_strategy_warns_once_when_gradient_crosses_between_blocks() -> None:
    import pytorch_lightning as pl

    from lightning_dfa import DFAStrategy

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = GlobalTokens(side=4)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data, flags = _batches_of_six_features(), dict(TRAINER_FLAGS)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pl.Trainer(strategy=DFAStrategy(verbose=False), **flags).fit(Module(), data)
    said = [str(w.message) for w in seen if "crosses from block to block" in str(w.message)]
    assert len(said) == 1 and "'net.layers.1' into 'net.layers.0'" in said[0] and "blocks=" in said[0]


def test_self_attention_reading_one_tensor_three_times_is_cut_at_all_three() -> None:
    """``attn(h, h, h)`` in a net whose layers' inputs are the points: the keys and values are the same input as the
    query, so the backward of the attention does not reach the layer before it through them."""

    class Net(nn.Module):
        def __init__(self, detach_kv: bool) -> None:
            super().__init__()
            self.detach_kv = detach_kv
            self.inp, self.attn = nn.Linear(8, 16), nn.MultiheadAttention(16, 2, batch_first=True)
            self.ff, self.out = nn.Linear(16, 16), nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.inp(x))
            kv = h.detach() if self.detach_kv else h
            a, _ = self.attn(h, kv, kv)
            return self.out(torch.tanh(self.ff(a + h)).mean(1))

    x, y = torch.randn(4, 5, 8), torch.randint(0, 3, (4,))
    grads = []
    for detach_kv in (False, True):
        torch.manual_seed(0)
        net = Net(detach_kv)
        engine = _checked_step(net, lambda n: F.cross_entropy(n(x), y), seed=0)
        assert engine.target.source == "layer_inputs" and engine.blocks_crossed == []
        grads.append(net.inp.weight.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.parametrize("batch_first", [True, False])
def test_an_encoders_input_of_other_length_is_fed_the_items_mean_error_either_layout(batch_first: bool) -> None:
    """The source table's output, the encoder's input point (kept with ``cut_token_embedding=False``), has the
    source's length, not the decoder's: it is fed each item's error averaged over the decoder's positions, at each of
    its positions, batch first or sequence first ([positions, batch, d] against a [positions, batch, vocabulary]
    error)."""
    torch.manual_seed(0)
    net = AttentionSeq2Seq(batch_first)
    src, tgt = torch.randint(0, 12, (4, 7)), torch.randint(0, 12, (4, 5))

    def loss(n: nn.Module, detach: bool = False) -> torch.Tensor:
        return F.cross_entropy(n(src, tgt, detach).flatten(0, 1), tgt.flatten())

    engine = _checked_step(net, loss, seed=3, cut_token_embedding=False)
    assert "encoder:in" in [p.key for p in engine.last_points]
    got = net.src.weight.grad.clone()
    logits = net(src, tgt, detach=True)
    rows = torch.autograd.grad(F.cross_entropy(logits.flatten(0, 1), tgt.flatten()), logits)[0].mean(dim=1)
    feedback = rows @ engine.bank.matrix(12, 16, torch.device("cpu"), torch.float32).t() / 4.0  # [batch, 16]
    table = net.src(src if batch_first else src.t())
    at_input = (feedback.unsqueeze(1) if batch_first else feedback.unsqueeze(0)).expand_as(table)
    torch.testing.assert_close(got, torch.autograd.grad(table, net.src.weight, at_input)[0])


class _ConvFrontSeq2Seq(nn.Module):
    """A 1-d convolution's front-end (``[batch, channels, positions]``) and an encoder layer over its 6 positions,
    summarised for a decoder of 5 target positions."""

    def __init__(self) -> None:
        super().__init__()
        self.front = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.ReLU())
        self.enc = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.tgt = nn.Embedding(12, 16)
        self.head = nn.Linear(16, 12)

    def forward(self, x: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        memory = self.enc(self.front(x).transpose(1, 2))  # [batch, 6, 16]
        return self.head(self.tgt(tgt) + memory.mean(dim=1, keepdim=True))  # [batch, 5, 12]


def test_a_convolutional_front_end_of_other_positions_gets_the_mean_error_per_entry() -> None:
    """An encoder's convolutional front-end (a flattened point, ``[batch, channels, positions]``) before a decoder
    over other positions: fed each item's error averaged over the decoder's positions, projected to a vector per
    entry of the point (per channel and position, as a convolution's point is fed from a per-item error), not through
    a fixed map from the decoder's positions to its own."""
    torch.manual_seed(0)
    net, x, tgt = _ConvFrontSeq2Seq(), torch.randn(3, 4, 6), torch.randint(0, 12, (3, 5))

    def loss(n: nn.Module) -> torch.Tensor:
        return F.cross_entropy(n(x, tgt).flatten(0, 1), tgt.flatten())

    engine = _checked_step(net, loss, seed=2, blocks=["front", "enc"], output="head")
    assert [p.key for p in engine.last_points] == ["front", "enc"]
    got = net.front[0].weight.grad.clone()
    logits = net(x, tgt)
    rows = torch.autograd.grad(F.cross_entropy(logits.flatten(0, 1), tgt.flatten()), logits)[0].mean(dim=1)
    feedback = (rows @ engine.bank.matrix(12, 48, torch.device("cpu"), torch.float32).t() / 48**0.5).view(3, 8, 6)
    assert not torch.allclose(feedback[:, 0], feedback[:, 1])  # each channel its own feedback
    front = net.front(x)
    torch.testing.assert_close(got, torch.autograd.grad(front, net.front[0].weight, feedback)[0])


class _VAE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc21, self.fc22 = nn.Linear(16, 16), nn.Linear(16, 4), nn.Linear(16, 4)
        self.fc3, self.fc4 = nn.Linear(4, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = F.relu(self.fc1(x))
        mu, logvar = self.fc21(h), self.fc22(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z)))), mu, logvar


@pytest.mark.parametrize("blocks", [None, ["fc1", "fc3"]])
def test_a_vaes_mean_and_variance_layers_named_as_outputs_feed_their_kl_term_back(blocks: list[str] | None) -> None:
    """The hidden-term warning's advice: ``output=`` naming the decoder's last layer and the mean and variance
    layers (with or without ``blocks=``). Each named output is an error source although the decoder's input is
    computed from it, so the KL term reaches the encoder ``fc1`` (before: the named layers were dropped as error
    sources, silently, or refused as blocks)."""

    def gradients(beta: float) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        net, x = _VAE(), (torch.rand(8, 16) > 0.5).float()
        engine = FeedbackEngine(output=["fc4", "fc21", "fc22"], blocks=blocks)
        engine.attach(net)
        torch.manual_seed(1)
        recon, mu, logvar = net(x)
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        loss = F.binary_cross_entropy(recon, x, reduction="sum") + beta * kl
        loss.backward()
        assert engine.end_backward(loss).deliveries == 3
        engine.detach()
        return {n: p.grad for n, p in net.named_parameters()}

    without, with_kl = gradients(0.0), gradients(1.0)
    assert not torch.allclose(without["fc1.weight"], with_kl["fc1.weight"])
    torch.testing.assert_close(without["fc4.weight"], with_kl["fc4.weight"])
