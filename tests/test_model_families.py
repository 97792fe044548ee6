"""Models in the shapes of widely used families, built by hand (no torchvision or timm), train with true DFA.

"True DFA" is checked as a user would want it: every block's parameters get a signal that differs from backprop's
(cosine < 0.99), every trainable parameter gets a finite gradient, the output modules get their true gradient,
and most parameters learn from feedback (the share trained by their true gradient stays under one half).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_dfa import FeedbackEngine


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def check_true_dfa(
    net: nn.Module, loss: Callable[[nn.Module], torch.Tensor], steps: int = 2, **options: object
) -> FeedbackEngine:
    """Run ``steps`` DFA backwards and one backprop backward on the same batch; check the four properties."""
    engine = FeedbackEngine(seed=0, **options)
    target = engine.attach(net)
    for _ in range(steps):
        net.zero_grad()
        loss(net).backward()
        assert engine.end_backward().deliveries >= 1
    dfa = {n: p.grad for n, p in net.named_parameters()}
    engine.detach()
    net.zero_grad()
    loss(net).backward()
    bp = {n: p.grad for n, p in net.named_parameters()}
    names = {id(p): n for n, p in net.named_parameters()}
    for name, grad in dfa.items():
        assert grad is not None and bool(torch.isfinite(grad).all()), name
    for block in target.blocks:
        params = [names[id(p)] for p in block.parameters() if p.requires_grad]
        if params:
            cos = _cos(torch.cat([dfa[n].flatten() for n in params]), torch.cat([bp[n].flatten() for n in params]))
            assert cos < 0.99, (block.name, cos)
    for out_name, module in engine.output_modules():
        for p in module.parameters():
            torch.testing.assert_close(dfa[names[id(p)]], bp[names[id(p)]], msg=out_name)
    roles = engine.parameter_roles()
    assert roles["true gradient"] < 0.5 * (roles["true gradient"] + roles["feedback"]), roles
    return engine


# ---------------------------------------------------------------------------------------------- Transformers
class Attention(nn.Module):
    def __init__(self, d: int, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class GPTBlock(nn.Module):  # nanoGPT's layout, with the MLP as an nn.Sequential
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(d), Attention(d), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int = 32, d: int = 16, layers: int = 3, context: int = 8) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList([GPTBlock(d) for _ in range(layers)])
        self.ln_f, self.lm_head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class ResidualBranches(nn.Module):  # a ModuleList of Sequential(LayerNorm, Linear, GELU) residual branches
    def __init__(self, d: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(6, d)
        branch = [nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU()) for _ in range(depth)]
        self.branches = nn.ModuleList(branch)
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for branch in self.branches:
            x = x + branch(x)
        return self.head(x)


def _token_loss(ids: torch.Tensor) -> Callable[[nn.Module], torch.Tensor]:
    return lambda net: F.cross_entropy(net(ids).flatten(0, 1), ids.roll(-1, 1).flatten())


def test_repeated_blocks_win_over_a_sequential_inside_them() -> None:
    torch.manual_seed(0)
    gpt = GPT()
    engine = check_true_dfa(gpt, _token_loss(torch.randint(0, 32, (4, 8))))
    assert [b.name for b in engine.target.blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    assert [n for n, _ in engine.output_modules()] == ["lm_head"]
    branches = ResidualBranches()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    engine = check_true_dfa(branches, lambda net: F.cross_entropy(net(x), y))
    assert [b.name for b in engine.target.blocks] == ["branches.0", "branches.1", "branches.2"]
    assert engine.target.output_name == "head"


# ---------------------------------------------------------------------------------------------- CNNs
class ConvBNAct(nn.Sequential):  # torchvision's Conv2dNormActivation
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> None:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)]
        layers += [nn.BatchNorm2d(cout)] + ([nn.Hardswish()] if act else [])
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, c: int, expand: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            ConvBNAct(c, expand, 1), ConvBNAct(expand, expand, 3, groups=expand), ConvBNAct(expand, c, 1, act=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class MobileNetLike(nn.Module):  # MobileNetV3: features, pooling in forward, classifier = Sequential(..., Linear)
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            ConvBNAct(3, 8, stride=2), InvertedResidual(8, 16), InvertedResidual(8, 24), ConvBNAct(8, 32, 1)
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(32, 64), nn.Hardswish(), nn.Dropout(0.0), nn.Linear(64, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.downsample = None if stride == 1 and cin == cout else shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + identity)


class ResNet10tLike(nn.Module):  # timm's resnet10t: a deep stem Sequential, stages of ONE block each, fc
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, 4, 3, 2, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 8, 3, 1, 1, bias=False)
        )
        self.bn1, self.act1, self.maxpool = nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        self.layer1, self.layer2 = nn.Sequential(BasicBlock(8, 8)), nn.Sequential(BasicBlock(8, 16, 2))
        self.layer3, self.layer4 = nn.Sequential(BasicBlock(16, 32, 2)), nn.Sequential(BasicBlock(32, 32, 2))
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, growth, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv1(F.relu(self.norm1(x)))], 1)


class DenseBlock(nn.ModuleDict):
    def __init__(self, cin: int, layers: int, growth: int) -> None:
        super().__init__({f"denselayer{i + 1}": DenseLayer(cin + i * growth, growth) for i in range(layers)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.values():
            x = layer(x)
        return x


class DenseNetLike(nn.Module):  # torchvision's DenseNet: features end in a norm, relu and pooling in forward
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(3, 8, 3, 1, 1, bias=False))
        self.features.add_module("norm0", nn.BatchNorm2d(8))
        self.features.add_module("relu0", nn.ReLU())
        self.features.add_module("pool0", nn.MaxPool2d(2))
        self.features.add_module("denseblock1", DenseBlock(8, 2, 4))
        transition = nn.Sequential(nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1, bias=False), nn.AvgPool2d(2))
        self.features.add_module("transition1", transition)
        self.features.add_module("denseblock2", DenseBlock(8, 2, 4))
        self.features.add_module("norm5", nn.BatchNorm2d(16))
        self.classifier = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.adaptive_avg_pool2d(F.relu(self.features(x)), 1)
        return self.classifier(torch.flatten(out, 1))


class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1x1, self.expand3x3 = nn.Conv2d(squeeze, expand, 1), nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1x1(x)), F.relu(self.expand3x3(x))], 1)


class SqueezeNetLike(nn.Module):  # the head is a 1x1 convolution in a Sequential, flattened in forward
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2), nn.ReLU(), nn.MaxPool2d(2, 2, ceil_mode=True), Fire(16, 4, 8), Fire(16, 4, 8),
            nn.MaxPool2d(2, 2, ceil_mode=True), Fire(16, 8, 16),
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.Dropout(0.0), nn.Conv2d(32, classes, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


class DoubleConv(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class Down(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(cin, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x)


class Up(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin // 2, 2, stride=2)
        self.conv = DoubleConv(cin, cout)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([x2, self.up(x1)], dim=1))


class OutConv(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class UNetLike(nn.Module):  # milesial/Pytorch-UNet's layout: the parts are attributes, skips joined in forward
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.inc, self.down1, self.down2 = DoubleConv(3, 4), Down(4, 8), Down(8, 16)
        self.up1, self.up2 = Up(16, 8), Up(8, 4)
        self.outc = OutConv(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        return self.outc(self.up2(self.up1(x3, x2), x1))


CNNS = {
    "mobilenet": (MobileNetLike, ["features.0", "features.1", "features.2", "features.3", "classifier.2"],
                  "classifier.3"),
    "resnet10t": (ResNet10tLike, ["layer1.0", "layer2.0", "layer3.0", "layer4.0"], "fc"),
    "densenet": (DenseNetLike, ["features.pool0", "features.denseblock1", "features.transition1", "features.norm5"],
                 "classifier"),
    "squeezenet": (SqueezeNetLike, ["features.2", "features.3", "features.5", "features.6"], "classifier.1"),
    "unet": (UNetLike, ["inc", "down1", "down2", "up1", "up2"], "outc.conv"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CNNS))
def test_cnns_whose_head_is_reached_through_functional_code(name: str) -> None:
    build, blocks, output = CNNS[name]
    torch.manual_seed(0)
    net, x = build(), torch.randn(4, 3, 16, 16)
    if name == "unet":  # per-pixel classes
        y = torch.randint(0, 3, (4, 16, 16))
    else:
        y = torch.randint(0, 10, (4,))
    engine = check_true_dfa(net, lambda n: F.cross_entropy(n(x), y))
    assert [b.name for b in engine.target.blocks] == blocks
    assert [n for n, _ in engine.output_modules()] == [output]


# ---------------------------------------------------------------------------------------------- outputs
class HeadRegisteredFirst(nn.Module):
    """The head is registered before the features, so the module order alone points at a hidden layer."""

    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Linear(16, 5)
        self.features = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.relu(self.features(x)))


def test_the_output_is_the_module_the_loss_is_computed_from() -> None:
    torch.manual_seed(0)
    net, x, y = HeadRegisteredFirst(), torch.randn(8, 6), torch.randint(0, 5, (8,))
    engine = FeedbackEngine()
    assert engine.attach(net).output_name == "features.4"  # what the module order suggests
    engine.detach()
    engine = check_true_dfa(net, lambda n: F.cross_entropy(n(x), y))
    assert [n for n, _ in engine.output_modules()] == ["classifier"]  # what the loss reads
    assert engine.roles_measured and "classifier (Linear)" in engine.summary()


def test_a_bare_sequential_ending_in_an_activation_reads_the_error_at_its_last_layer() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 6), nn.Sigmoid())
    x = torch.rand(8, 6)
    engine = check_true_dfa(net, lambda n: F.binary_cross_entropy(n(x), x))
    assert [b.name for b in engine.target.blocks] == ["1", "3"] and engine.target.output_name == "4"


def test_mostly_backprop_is_reported_loudly() -> None:
    net = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 64), nn.ReLU(),
                        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))  # fmt: skip
    engine = FeedbackEngine(blocks=["1", "3"], output="8")
    engine.attach(net)
    F.cross_entropy(net(torch.randn(8, 6)), torch.randint(0, 3, (8,))).backward()
    engine.end_backward()
    summary = engine.summary()
    assert "Share of trainable params trained by their true gradient: 9" in summary  # 4419 of 4487
    assert "WARNING" in summary and "measured in the first backward" in summary


def test_the_warning_is_raised_in_fit_and_the_bp_arm_never_refuses() -> None:
    import pytorch_lightning as pl
    from conftest import Classifier, loader, trainer

    from lightning_dfa import DFAStrategy

    net = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 64), nn.ReLU(),
                        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))  # fmt: skip
    with pytest.warns(UserWarning, match="trained by their true gradient"):
        trainer(strategy=DFAStrategy(blocks=["net.1", "net.3"], output="net.8"), max_steps=1).fit(
            Classifier(net), loader()
        )

    class Functional(pl.LightningModule):  # no module at all: nothing for DFA to find
        def __init__(self) -> None:
            super().__init__()
            self.w1, self.w2 = nn.Parameter(torch.randn(6, 8)), nn.Parameter(torch.randn(8, 3))

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], i: int) -> torch.Tensor:
            return F.cross_entropy(torch.tanh(batch[0] @ self.w1) @ self.w2, batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = Functional()
    before = model.w1.detach().clone()
    strategy = DFAStrategy(mode="bp")
    trainer(strategy=strategy, max_steps=2).fit(model, loader())
    assert not torch.equal(before, model.w1) and strategy.dfa_engine.target.blocks == []
    with pytest.raises(ValueError, match="found no blocks"):
        trainer(strategy=DFAStrategy(), max_steps=2).fit(Functional(), loader())
