"""Discovery of hand-written nets: rule 6 (layers as attributes, functional activations) and rule 4's feature
extractors (``encoder = Sequential(..., ReLU)`` followed by ``head = Linear``, VGG's ``features`` + ``classifier``).

The classic LightningModule (``self.l1 = nn.Linear(...)`` ... ``F.relu`` in ``forward``) has no Sequential, no
ModuleList and no Hugging Face model. Feedback then goes to the *input* of every layer after the first, which
is after the activation; the DFA update must equal the one of the same network written as an ``nn.Sequential``
(feedback after each activation group), which the other tests check against hand computations.
"""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from conftest import hooks_of, trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dfa import DFAStrategy, FeedbackEngine
from lightning_dfa.summary import format_summary


class AttributeMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(6, 16), nn.Linear(16, 12), nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l3(torch.tanh(self.l2(F.relu(self.l1(x)))))


class AttributeCNN(nn.Module):  # the PyTorch CIFAR tutorial's Net, smaller
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.pool, self.conv2 = nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3)
        self.fc1, self.fc2 = nn.Linear(6 * 2 * 2, 10), nn.Linear(10, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def _as_sequential(net: nn.Module) -> nn.Sequential:
    if isinstance(net, AttributeMLP):
        return nn.Sequential(net.l1, nn.ReLU(), net.l2, nn.Tanh(), net.l3)
    return nn.Sequential(net.conv1, nn.ReLU(), nn.MaxPool2d(2), net.conv2, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         net.fc1, nn.ReLU(), net.fc2)  # fmt: skip


def _dfa_grads(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    engine = FeedbackEngine(seed=5)
    engine.attach(net)
    net.zero_grad()
    F.cross_entropy(net(x), y).backward()
    report = engine.end_backward()
    engine.detach()
    assert report.deliveries == 1
    return {n: p.grad.clone() for n, p in net.named_parameters()}


class EncoderHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.Tanh())
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class FeaturesClassifier(nn.Module):  # VGG's layout
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))  # fmt: skip
        self.classifier = nn.Sequential(nn.Linear(6 * 2 * 2, 10), nn.ReLU(), nn.Linear(10, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def test_feature_extractor_sequentials_are_blocks_and_the_head_is_the_output() -> None:
    target = FeedbackEngine().attach(EncoderHead())
    assert ([b.name for b in target.blocks], target.output_name) == (["encoder.1", "encoder.3"], "head")
    target = FeedbackEngine().attach(FeaturesClassifier())
    assert [b.name for b in target.blocks] == ["features.2", "features.5", "classifier.1"]
    assert target.output_name == "classifier.2"
    # Lightning's README autoencoder, with a Sigmoid after the decoder's last layer (part of the loss path)
    autoencoder = nn.Module()
    autoencoder.encoder = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3), nn.ReLU())
    autoencoder.decoder = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 12), nn.Sigmoid())
    target = FeedbackEngine().attach(autoencoder)
    assert [b.name for b in target.blocks] == ["encoder.1", "encoder.3", "decoder.1"]
    assert target.output_name == "decoder.2"
    for net, x, y in (
        (EncoderHead(), torch.randn(8, 6), torch.randint(0, 3, (8,))),
        (FeaturesClassifier(), torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))),
    ):
        flat = nn.Sequential(*net.encoder, net.head) if isinstance(net, EncoderHead) else nn.Sequential(
            *net.features, nn.Flatten(), *net.classifier)  # fmt: skip
        nested = _dfa_grads(net, x, y)
        by_param = {id(p): n for n, p in net.named_parameters()}
        one = {by_param[id(p)]: g for p, g in zip(flat.parameters(), _dfa_grads(flat, x, y).values())}
        for name in nested:
            torch.testing.assert_close(nested[name], one[name], msg=name)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride), nn.BatchNorm2d(cout))
        self.downsample = None if stride == 1 and cin == cout else shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + identity)


class TinyResNet(nn.Module):  # torchvision's layout: stem, stages of residual blocks, pooling, fc
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False), nn.BatchNorm2d(4)
        self.layer1 = nn.Sequential(BasicBlock(4, 4), BasicBlock(4, 4))
        self.layer2 = nn.Sequential(BasicBlock(4, 8, 2), BasicBlock(8, 8))
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x)))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_resnet_stages_are_lists_of_blocks_and_fc_is_the_output() -> None:
    net = TinyResNet()
    probe = FeedbackEngine()
    target = probe.attach(net)
    probe.detach()
    assert target.source == "stages" and target.output_name == "fc"
    assert [b.name for b in target.blocks] == ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    found = _dfa_grads(net, x, y)
    engine = FeedbackEngine(seed=5, blocks=["layer1.0", "layer1.1", "layer2.0", "layer2.1"], output="fc")
    engine.attach(net)
    net.zero_grad()
    F.cross_entropy(net(x), y).backward()
    assert engine.end_backward().points_recorded == 5  # the four blocks and the stem's output (layer1.0:in)
    for name, p in net.named_parameters():
        torch.testing.assert_close(found[name], p.grad, msg=name)


def test_attribute_layers_get_feedback_at_each_layer_input() -> None:
    target = FeedbackEngine().attach(AttributeCNN())
    assert target.source == "layer_inputs" and target.output_name == "fc2"
    assert [b.name for b in target.blocks] == ["conv1", "conv2", "fc1"]


def test_attribute_nets_train_as_their_sequential_form() -> None:
    for net, x, y in (
        (AttributeMLP(), torch.randn(8, 6), torch.randint(0, 3, (8,))),
        (AttributeCNN(), torch.randn(4, 3, 14, 14), torch.randint(0, 5, (4,))),
    ):
        attribute = _dfa_grads(net, x, y)
        seq = _as_sequential(net)  # the same parameter tensors
        by_param = {id(p): n for n, p in net.named_parameters()}
        sequential = {by_param[id(p)]: g for p, g in zip(seq.parameters(), _dfa_grads(seq, x, y).values())}
        assert attribute.keys() == sequential.keys()
        for name in attribute:
            torch.testing.assert_close(attribute[name], sequential[name], msg=name)
        assert hooks_of(net) == 0
    # and DFA is not backprop here: the first layer's gradient differs from the true one
    net = AttributeMLP()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    dfa = _dfa_grads(net, x, y)["l1.weight"]
    net.zero_grad()
    F.cross_entropy(net(x), y).backward()
    assert not torch.allclose(dfa, net.l1.weight.grad)


class ClassicLitModel(pl.LightningModule):
    """The layers on the LightningModule itself, as in Lightning's own MNIST examples."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(6, 32), nn.Linear(32, 32), nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l3(F.relu(self.l2(F.relu(self.l1(x)))))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SequentialLitModel(ClassicLitModel):
    """The same network as an ``nn.Sequential`` (discovery rule 4: feedback after each ReLU)."""

    def __init__(self, layers: ClassicLitModel) -> None:
        pl.LightningModule.__init__(self)
        self.net = nn.Sequential(layers.l1, nn.ReLU(), layers.l2, nn.ReLU(), layers.l3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_classic_lightning_module_trains_under_the_strategy() -> None:
    x = torch.randn(256, 6)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    model = ClassicLitModel()
    twin = SequentialLitModel(copy.deepcopy(model))
    with torch.no_grad():
        before = F.cross_entropy(model(x), y).item()
    trainer(max_epochs=8, strategy=DFAStrategy()).fit(model, loader)
    trainer(max_epochs=8, strategy=DFAStrategy()).fit(twin, loader)
    with torch.no_grad():
        after = F.cross_entropy(model(x), y).item()
    assert after < 0.85 * before, (before, after)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b)
    engine = FeedbackEngine()
    engine.attach(ClassicLitModel())
    summary = format_summary(engine)
    assert "l2:in" in summary and "l3:in" in summary and "blocks from: layer_inputs" in summary


class ViTBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(d), nn.MultiheadAttention(d, 2, batch_first=True)
        self.norm2, self.mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):  # timm's layout: blocks = nn.Sequential(Block, ...), then norm and head
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, d, 4, 4)
        self.blocks = nn.Sequential(*[ViTBlock(d) for _ in range(2)])
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(x)).mean(1))


def test_micro_placement_outside_hugging_face_finds_the_inner_points() -> None:
    net, x, y = TinyViT(), torch.randn(3, 3, 8, 8), torch.randint(0, 5, (3,))
    engine = FeedbackEngine(placement="micro", seed=5, norm_points=False)  # the micro points only
    target = engine.attach(net)
    assert [b.name for b in target.blocks] == [
        "blocks.0", "blocks.0.attn", "blocks.0.mlp.1", "blocks.1", "blocks.1.attn", "blocks.1.mlp.1"
    ]  # fmt: skip
    assert target.output_name == "head"
    F.cross_entropy(net(x), y).backward()
    assert engine.end_backward().points_recorded == 7  # six points and the patch embedding's output
    micro = {n: p.grad.clone() for n, p in net.named_parameters()}
    engine.detach()
    macro = _dfa_grads(net, x, y)
    assert not torch.allclose(micro["blocks.0.mlp.0.weight"], macro["blocks.0.mlp.0.weight"])
    torch.testing.assert_close(micro["head.weight"], macro["head.weight"])  # the output's true gradient
    with pytest.raises(ValueError, match="found no blocks with an attention submodule"):
        FeedbackEngine(placement="micro").attach(TinyResNet())


class TwoReaders(nn.Module):
    """``h`` feeds two layers (a VAE's ``fc_mu`` and ``fc_logvar``): one hidden layer, so one feedback point."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.mu, self.logvar, self.out = nn.Linear(6, 16), nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.l1(x))
        return self.out(torch.tanh(self.mu(h) + self.logvar(h)))


def test_a_tensor_read_by_two_layers_gets_its_feedback_once() -> None:
    torch.manual_seed(0)
    net = TwoReaders()
    engine = FeedbackEngine(seed=0)
    engine.attach(net)
    seen: list[tuple[list[str], list[torch.Tensor]]] = []
    engine.feedback_observers.append(lambda e, points, fbs: seen.append(([p.key for p in points], fbs)))
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    F.cross_entropy(net(x), y).backward()
    engine.end_backward()
    engine.detach()
    keys, feedback = seen[-1]
    assert keys == ["mu:in", "out:in"]  # not a second point "logvar:in" on the same tensor
    twin = copy.deepcopy(net)
    h = torch.tanh(twin.l1(x))
    (expected,) = torch.autograd.grad(h, twin.l1.weight, feedback[0].reshape(h.shape))
    torch.testing.assert_close(net.l1.weight.grad, expected)  # the feedback once, not twice
    assert net.logvar.weight.grad is not None and net.mu.weight.grad is not None
