"""Models in the shapes of widely used families, built by hand or from tiny Hugging Face configs (no torchvision or
timm, no downloads), train with true DFA.

"True DFA" is checked as a user would want it: every block's parameters get a signal that differs from backprop's
(cosine < 0.99), every parameter backprop trains gets a finite gradient, the output modules get their true
gradient, and most parameters learn from feedback (the share trained by their true gradient stays under one half).
"""

from __future__ import annotations

import collections
import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_dfa import FeedbackEngine


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def check_true_dfa(
    net: nn.Module,
    loss: Callable[[nn.Module], torch.Tensor],
    steps: int = 2,
    tied_output: bool = False,
    **options: object,
) -> FeedbackEngine:
    """Run ``steps`` DFA backwards and one backprop backward on the same batch; check the four properties.
    ``tied_output``: the output shares its weights with the token embedding, whose own gradient (backprop's, or
    DFA's where the table is not cut) adds to the head's, so the output's gradient is not compared."""
    engine = FeedbackEngine(seed=0, **options)
    target = engine.attach(net)
    for _ in range(steps):
        net.zero_grad()
        loss(net).backward()
        assert engine.end_backward().deliveries >= 1
    dfa = {n: p.grad for n, p in net.named_parameters()}
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}  # the token embeddings (the default)
    engine.detach()
    net.zero_grad()
    loss(net).backward()
    bp = {n: p.grad for n, p in net.named_parameters()}
    names = {id(p): n for n, p in net.named_parameters()}
    for name, grad in dfa.items():  # every parameter backprop trains (not those the forward leaves unused)
        if bp[name] is not None and name not in frozen:
            assert grad is not None and bool(torch.isfinite(grad).all()), name
    for block in target.blocks:
        params = [names[id(p)] for p in block.parameters() if p.requires_grad and bp[names[id(p)]] is not None]
        params = [n for n in params if n not in frozen]
        if params:
            cos = _cos(torch.cat([dfa[n].flatten() for n in params]), torch.cat([bp[n].flatten() for n in params]))
            assert cos < 0.99, (block.name, cos)
    for out_name, module in [] if tied_output else engine.output_modules():
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


def _conv_block(cin: int, cout: int, name: str) -> nn.Sequential:  # mateuszbuda/brain-segmentation-pytorch's
    return nn.Sequential(collections.OrderedDict([
        (name + "conv1", nn.Conv2d(cin, cout, 3, padding=1, bias=False)), (name + "norm1", nn.BatchNorm2d(cout)),
        (name + "relu1", nn.ReLU()), (name + "conv2", nn.Conv2d(cout, cout, 3, padding=1, bias=False)),
        (name + "norm2", nn.BatchNorm2d(cout)), (name + "relu2", nn.ReLU()),
    ]))  # fmt: skip


class UNetOfSequentials(nn.Module):
    """The brain-segmentation U-Net's layout: encoder, bottleneck and decoder ``Sequential``s as attributes, an
    up-convolution (``ConvTranspose2d``) before each decoder, skips joined in forward, a 1x1 output convolution."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.encoder1, self.pool1 = _conv_block(3, 4, "enc1"), nn.MaxPool2d(2)
        self.encoder2, self.pool2 = _conv_block(4, 8, "enc2"), nn.MaxPool2d(2)
        self.bottleneck = _conv_block(8, 16, "bottleneck")
        self.upconv2, self.decoder2 = nn.ConvTranspose2d(16, 8, 2, stride=2), _conv_block(16, 8, "dec2")
        self.upconv1, self.decoder1 = nn.ConvTranspose2d(8, 4, 2, stride=2), _conv_block(8, 4, "dec1")
        self.conv = nn.Conv2d(4, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enc1 = self.encoder1(x)
        enc2 = self.encoder2(self.pool1(enc1))
        bottleneck = self.bottleneck(self.pool2(enc2))
        dec2 = self.decoder2(torch.cat((self.upconv2(bottleneck), enc2), dim=1))
        return self.conv(self.decoder1(torch.cat((self.upconv1(dec2), enc1), dim=1)))


_UNET_PARTS = [("encoder1", "enc1"), ("encoder2", "enc2"), ("bottleneck", "bottleneck"), ("decoder2", "dec2"),
               ("decoder1", "dec1")]  # fmt: skip
CNNS = {
    "mobilenet": (MobileNetLike, ["features.0", "features.1", "features.2", "features.3", "classifier.2"],
                  "classifier.3"),
    "resnet10t": (ResNet10tLike, ["layer1.0", "layer2.0", "layer3.0", "layer4.0"], "fc"),
    "densenet": (DenseNetLike, ["features.pool0", "features.denseblock1", "features.transition1", "features.norm5"],
                 "classifier"),
    "squeezenet": (SqueezeNetLike, ["features.2", "features.3", "features.5", "features.6"], "classifier.1"),
    "unet": (UNetLike, ["inc", "down1", "down2", "up1", "up2"], "outc.conv"),
    # (before: the decoder, after the up-convolution, learned by its true gradient from the output)
    "unet_sequentials": (UNetOfSequentials, [f"{s}.{p}relu{i}" for s, p in _UNET_PARTS for i in (1, 2)], "conv"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CNNS))
def test_cnns_whose_head_is_reached_through_functional_code(name: str) -> None:
    build, blocks, output = CNNS[name]
    torch.manual_seed(0)
    net, x = build(), torch.randn(4, 3, 16, 16)
    if name.startswith("unet"):  # per-pixel classes
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


def test_a_vocabulary_head_holding_most_parameters_is_no_reason_to_warn() -> None:
    """The output module is always trained by its true gradient: a language model whose head (tied to the token
    embedding) holds most parameters is no mis-placed feedback."""
    import transformers as hf

    cfg = hf.GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=8, vocab_size=4000)
    model = hf.GPT2LMHeadModel(cfg)
    engine = FeedbackEngine()
    engine.attach(model)
    ids = torch.randint(0, 4000, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    engine.end_backward()
    summary = engine.summary()
    assert "Share of trainable params trained by their true gradient: 9" in summary  # the head: 64000 of ~68000
    assert "WARNING" not in summary


def test_the_warning_is_raised_in_fit_and_the_bp_arm_never_refuses() -> None:
    import pytorch_lightning as pl
    from conftest import Classifier, loader, trainer

    from lightning_dfa import DFAStrategy

    net = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 64), nn.ReLU(),
                        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))  # fmt: skip
    with pytest.warns(UserWarning, match=r"by backprop \(their true gradient\), not by feedback: they lie after"):
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


# ---------------------------------------------------------------------------------------------- nn.Transformer, GAN
def test_every_stack_of_an_encoder_decoder_gets_points() -> None:
    """Lightning's demo Transformer (``nn.Transformer``): the encoder's layers are blocks too, not only the
    decoder's (the larger list)."""
    from pytorch_lightning.demos.transformer import Transformer

    torch.manual_seed(0)
    net = Transformer(vocab_size=40, ninp=16, nhead=2, nhid=32, nlayers=2, dropout=0.0)
    x, y = torch.randint(0, 40, (3, 5)), torch.randint(0, 40, (3, 5))
    engine = check_true_dfa(net, lambda n: F.nll_loss(n(x, y), y.view(-1)))
    assert [b.name for b in engine.target.blocks] == [
        "transformer.encoder.layers.0", "transformer.encoder.layers.1",
        "transformer.decoder.layers.0", "transformer.decoder.layers.1",
    ]  # fmt: skip
    assert [n for n, _ in engine.output_modules()] == ["decoder"]


_S2S = dict(d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32, dropout=0.0, pad_token_id=0,
            decoder_start_token_id=0)  # fmt: skip


@pytest.mark.parametrize("family", ["marian", "blenderbot_small", "fsmt"])
def test_hugging_face_encoder_decoders_that_name_no_blocks_get_points_in_both_stacks(family: str) -> None:
    """Marian, Blenderbot and FSMT list no ``_no_split_modules``: the encoder's layers are blocks too, not only the
    decoder's (before, the encoder learned by backprop through the decoder's cross-attention)."""
    import transformers as hf

    torch.manual_seed(0)
    net = {
        "marian": lambda: hf.MarianMTModel(hf.MarianConfig(vocab_size=40, decoder_vocab_size=40, **_S2S)),
        "blenderbot_small": lambda: hf.BlenderbotSmallForConditionalGeneration(
            hf.BlenderbotSmallConfig(vocab_size=40, **_S2S)
        ),
        "fsmt": lambda: hf.FSMTForConditionalGeneration(
            hf.FSMTConfig(src_vocab_size=40, tgt_vocab_size=40, langs=["en", "de"], **_S2S)
        ),
    }[family]()
    assert not getattr(net, "_no_split_modules", None)
    ids = torch.randint(3, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    engine = check_true_dfa(net, lambda n: n(input_ids=ids, labels=ids).loss, tied_output=True)
    names = [b.name for b in engine.target.blocks]
    stacks = [n.rsplit(".", 2)[0] for n in names[::2]]
    assert len(names) == 4 and stacks[0].endswith("encoder") and stacks[1].endswith("decoder"), names


def test_an_attention_module_named_as_the_block_stands_for_its_layer() -> None:
    """Longformer's ``_no_split_modules`` lists only ``LongformerSelfAttention``: its layers are the blocks (before,
    the points sat at the attention modules, and the layers' MLPs, over half the parameters, learned by backprop
    through every later layer)."""
    import transformers as hf

    torch.manual_seed(0)
    cfg = hf.LongformerConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, attention_window=4, max_position_embeddings=40)  # fmt: skip
    net = hf.LongformerForMaskedLM(cfg)
    assert set(net._no_split_modules) == {"LongformerSelfAttention"}
    ids = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(0))
    engine = check_true_dfa(net, lambda n: n(input_ids=ids, labels=ids).loss, tied_output=True)
    assert [b.name for b in engine.target.blocks] == ["longformer.encoder.layer.0", "longformer.encoder.layer.1"]


@pytest.mark.parametrize("layer_type", ["basic", "bottleneck"])
def test_hugging_face_resnet_blocks_are_its_residual_layers(layer_type: str) -> None:
    """Hugging Face's ResNet lists its convolution layers and shortcuts in ``_no_split_modules``; the registry names
    its residual layers instead, as torchvision's ResNet is split (a point inside a residual layer would feed its
    branch and its skip path apart). On the image task of ``benchmarks/tiny_transformers.py`` this took the share of
    the gap closed from 23 % / 20 % to 64 % / 62 % (seeds 0 / 1)."""
    import transformers as hf

    from lightning_dfa.registry import BLOCK_CLASSES

    torch.manual_seed(0)
    cfg = hf.ResNetConfig(num_channels=1, num_labels=2, embedding_size=8, hidden_sizes=[8, 16], depths=[2, 1],
                          layer_type=layer_type)  # fmt: skip
    net = hf.ResNetForImageClassification(cfg)
    x, y = torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 1, 0])
    engine = check_true_dfa(net, lambda n: n(pixel_values=x, labels=y).loss)
    names = [b.name for b in engine.target.blocks]
    assert names == ["resnet.encoder.stages.0.layers.0", "resnet.encoder.stages.0.layers.1",
                     "resnet.encoder.stages.1.layers.0"], names  # fmt: skip
    assert {type(b.exit).__name__ for b in engine.target.blocks} <= set(BLOCK_CLASSES["resnet"])


def test_hugging_face_bit_blocks_are_its_residual_layers() -> None:
    """BiT's ``_no_split_modules`` names only its embeddings: with them as the only block, 98 % of the parameters
    learned by backprop (and the summary warned). The registry names its residual layers."""
    import transformers as hf

    torch.manual_seed(0)
    cfg = hf.BitConfig(num_channels=1, num_labels=2, embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1],
                       layer_type="preactivation", num_groups=8)  # fmt: skip
    net = hf.BitForImageClassification(cfg)
    assert set(net._no_split_modules) == {"BitEmbeddings"}
    x, y = torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 1, 0])
    engine = check_true_dfa(net, lambda n: n(pixel_values=x, labels=y).loss)
    assert [b.name for b in engine.target.blocks] == ["bit.encoder.stages.0.layers.0", "bit.encoder.stages.1.layers.0"]


def test_a_stack_of_layers_no_listed_block_touches_is_fed_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without its registry entry, BiT's ``_no_split_modules`` (its embeddings only) leaves its stack of stages to
    backprop; the stack's layers become blocks too, as for a model that lists nothing."""
    import transformers as hf

    from lightning_dfa.registry import BLOCK_CLASSES

    monkeypatch.delitem(BLOCK_CLASSES, "bit")
    torch.manual_seed(0)
    cfg = hf.BitConfig(num_channels=1, num_labels=2, embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1],
                       layer_type="preactivation", num_groups=8)  # fmt: skip
    net = hf.BitForImageClassification(cfg)
    x, y = torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 1, 0])
    engine = check_true_dfa(net, lambda n: n(pixel_values=x, labels=y).loss)
    assert [b.name for b in engine.target.blocks] == ["bit.embedder", "bit.encoder.stages.0", "bit.encoder.stages.1"]


def test_a_list_of_lists_of_layers_gives_the_layers_as_blocks() -> None:
    """Funnel keeps its encoder's layers in a list of lists, never called itself: its layers are the blocks (before,
    the lists were, their hooks never fired, and no feedback reached the blocks)."""
    import transformers as hf

    torch.manual_seed(0)
    cfg = hf.FunnelConfig(vocab_size=40, block_sizes=[1, 1], num_decoder_layers=1, d_model=16, n_head=2, d_head=8,
                          d_inner=32, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)  # fmt: skip
    net = hf.FunnelForMaskedLM(cfg)
    ids = torch.randint(3, 40, (2, 8), generator=torch.Generator().manual_seed(0))
    engine = check_true_dfa(net, lambda n: n(input_ids=ids, labels=ids).loss, tied_output=True)
    assert [b.name for b in engine.target.blocks] == [
        "funnel.encoder.blocks.0.0", "funnel.encoder.blocks.1.0", "funnel.decoder.layers.0"
    ]  # fmt: skip


def test_blocks_returning_a_nested_tuple_get_their_feedback() -> None:
    """PVTv2's stages return ``((hidden,), height, width)``: the hidden states are the point (before, no stage had
    one, and the last stage learned by backprop from the head)."""
    import transformers as hf

    torch.manual_seed(0)
    cfg = hf.PvtV2Config(image_size=32, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1],
                         num_attention_heads=[1, 1, 2, 2], num_labels=3)  # fmt: skip
    net = hf.PvtV2ForImageClassification(cfg)
    x, y = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0])
    engine = check_true_dfa(net, lambda n: n(pixel_values=x, labels=y).loss)
    assert engine.report.points_recorded == 0  # (reset by end_backward)
    net.zero_grad()
    engine.attach(net)
    net(pixel_values=x, labels=y).loss.backward()
    assert engine.end_backward().points_recorded >= len(engine.target.blocks) == 4
    roles = engine.parameter_roles()
    assert roles["true gradient"] == sum(p.numel() for p in net.classifier.parameters())
    engine.detach()


class Generator(nn.Module):  # Lightning's basic GAN example, smaller
    def __init__(self, latent: int = 8, out: int = 12) -> None:
        super().__init__()

        def block(n_in: int, n_out: int, normalize: bool = True) -> list[nn.Module]:
            return [nn.Linear(n_in, n_out)] + ([nn.BatchNorm1d(n_out)] if normalize else []) + [nn.LeakyReLU(0.2)]

        self.model = nn.Sequential(*block(latent, 16, normalize=False), *block(16, 32), nn.Linear(32, out), nn.Tanh())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model(z)


class Discriminator(nn.Module):
    def __init__(self, n_in: int = 12) -> None:
        super().__init__()
        self.model = nn.Sequential(
            nn.Linear(n_in, 16), nn.LeakyReLU(0.2), nn.Linear(16, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def test_gan_generator_reads_its_error_at_its_own_output() -> None:
    """Manual optimization with ``toggle_optimizer`` (the discriminator is frozen in the generator's step): the
    generator's error is read at the generated sample (through the frozen discriminator, part of its loss), the
    discriminator's at its logit."""
    import pytorch_lightning as pl
    from conftest import trainer
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_dfa import DFAStrategy

    class GAN(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.generator, self.discriminator = Generator(), Discriminator()

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
            real = batch[0]
            opt_g, opt_d = self.optimizers()
            z = torch.randn(real.shape[0], 8)
            ones, zeros = torch.ones(real.shape[0], 1), torch.zeros(real.shape[0], 1)
            self.toggle_optimizer(opt_g)
            g_loss = F.binary_cross_entropy_with_logits(self.discriminator(self.generator(z)), ones)
            self.manual_backward(g_loss)
            opt_g.step()
            opt_g.zero_grad()
            self.untoggle_optimizer(opt_g)
            self.toggle_optimizer(opt_d)
            d_loss = F.binary_cross_entropy_with_logits(self.discriminator(real), ones)
            d_loss = d_loss + F.binary_cross_entropy_with_logits(self.discriminator(self.generator(z).detach()), zeros)
            self.manual_backward(d_loss)
            opt_d.step()
            opt_d.zero_grad()
            self.untoggle_optimizer(opt_d)

        def configure_optimizers(self) -> list[torch.optim.Optimizer]:
            return [torch.optim.Adam(self.generator.parameters()), torch.optim.Adam(self.discriminator.parameters())]

    torch.manual_seed(0)
    model, widths = GAN(), []
    strategy = DFAStrategy(verbose=False)

    class Record(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            strategy.dfa_engine.feedback_observers.append(
                lambda e, points, fbs: widths.append((e.shape[-1], len(points)))
            )

    data = DataLoader(TensorDataset(torch.randn(16, 12)), batch_size=8)
    trainer(strategy=strategy, callbacks=[Record()], max_steps=2).fit(model, data)
    target = strategy.dfa_engine.target
    assert [b.name for b in target.blocks] == [
        "generator.model.1", "generator.model.4", "discriminator.model.1", "discriminator.model.3"
    ]  # fmt: skip
    # generator step: the error of the 12-wide sample reaches the generator's two points; discriminator step: the
    # logit's error reaches its two points, once for the real and once for the generated batch
    assert widths[:3] == [(12, 2), (1, 2), (1, 2)]
    names = {n for n, _ in strategy.dfa_engine.output_modules()}
    assert names == {"generator.model.5", "discriminator.model.4"}


# ---------------------------------------------------------------------------------------------- Hugging Face
VOCAB = 48
HF_TINY = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2, vocab_size=VOCAB)


def _quiet() -> None:
    import warnings

    warnings.filterwarnings("ignore", module="transformers")


def _hf_grads(model: nn.Module, loss: Callable[[nn.Module], torch.Tensor], name: str) -> torch.Tensor:
    engine = FeedbackEngine(seed=0)
    engine.attach(model)
    model.zero_grad()
    loss(model).backward()
    engine.end_backward()
    engine.detach()
    return model.get_parameter(name).grad.clone()


def test_bert_pretraining_both_losses_reach_the_encoder() -> None:
    import transformers as hf

    _quiet()
    torch.manual_seed(0)
    cfg = hf.BertConfig(**HF_TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, tie_word_embeddings=False)
    model = hf.BertForPreTraining(cfg)
    ids, nsp = torch.randint(1, VOCAB, (2, 8)), torch.tensor([0, 1])
    engine = check_true_dfa(model, lambda m: m(input_ids=ids, labels=ids, next_sentence_label=nsp).loss)
    assert {n for n, _ in engine.output_modules()} == {"cls.predictions.decoder", "cls.seq_relationship"}
    block = "bert.encoder.layer.0.output.dense.weight"
    both = _hf_grads(model, lambda m: m(input_ids=ids, labels=ids, next_sentence_label=nsp).loss, block)

    def mlm_only(m: nn.Module) -> torch.Tensor:
        return F.cross_entropy(m(input_ids=ids).prediction_logits.flatten(0, 1), ids.flatten())

    assert not torch.allclose(both, _hf_grads(model, mlm_only, block))  # the next-sentence loss reaches the blocks


def test_gpt2_double_heads_both_heads_reach_the_blocks() -> None:
    import transformers as hf

    _quiet()
    torch.manual_seed(0)
    drop = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0, tie_word_embeddings=False)
    cfg = hf.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=16, vocab_size=VOCAB, **drop)
    model = hf.GPT2DoubleHeadsModel(cfg)
    ids = torch.randint(1, VOCAB, (2, 3, 8))  # [batch, choices, positions]; the blocks see [batch * choices, ...]
    mc = dict(mc_token_ids=torch.full((2, 3), 7), mc_labels=torch.tensor([0, 2]))

    def both(m: nn.Module) -> torch.Tensor:
        out = m(input_ids=ids, labels=ids, **mc)
        return out.loss + out.mc_loss

    engine = check_true_dfa(model, both)
    assert {n for n, _ in engine.output_modules()} == {"lm_head", "multiple_choice_head.summary"}
    block = "transformer.h.0.mlp.c_fc.weight"
    lm_only = _hf_grads(model, lambda m: m(input_ids=ids, labels=ids, **mc).loss, block)
    assert not torch.allclose(_hf_grads(model, both, block), lm_only)


def test_clip_each_tower_gets_its_own_projection_error() -> None:
    import transformers as hf

    _quiet()
    torch.manual_seed(0)
    text = hf.CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, max_position_embeddings=16, projection_dim=16)  # fmt: skip
    vision = hf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=16, patch_size=8, projection_dim=16)  # fmt: skip
    model = hf.CLIPModel(hf.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16))
    ids, pixels = torch.randint(1, VOCAB, (3, 8)), torch.randn(3, 3, 16, 16)
    engine = check_true_dfa(model, lambda m: m(input_ids=ids, pixel_values=pixels, return_loss=True).loss)
    assert {n for n, _ in engine.output_modules()} == {"text_projection", "visual_projection"}


def test_bart_roles_follow_the_data_flow() -> None:
    import transformers as hf

    _quiet()
    torch.manual_seed(0)
    cfg = hf.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32,
                        dropout=0.0, tie_word_embeddings=False)  # fmt: skip
    model = hf.BartForConditionalGeneration(cfg)
    ids = torch.randint(3, VOCAB, (2, 8))
    engine = FeedbackEngine(cut_head_input=False)  # (a cut head input puts everything after the blocks in feedback)
    engine.attach(model)
    norm = model.model.decoder.layernorm_embedding.weight
    assert engine.role_of(norm) == "true gradient"  # estimated from the module order: after the encoder's blocks
    engine.detach()
    engine = check_true_dfa(model, lambda m: m(input_ids=ids, labels=ids).loss)
    assert engine.roles_measured and engine.role_of(norm) == "feedback"  # it lies before the decoder's blocks
    assert engine.role_of(model.lm_head.weight) == "true gradient"


class SharedBetween(nn.Module):
    """Three blocks with one layer, registered after them, applied between them; a learned temperature applied
    after the output module; an auxiliary head registered after the output."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3)])
        self.shared = nn.Linear(8, 8)
        self.out, self.aux = nn.Linear(8, 3), nn.Linear(8, 3)
        self.log_temperature = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for i, block in enumerate(self.blocks):
            x = block(x) if i == 0 else block(self.shared(x))
        return self.out(x) * self.log_temperature.exp(), self.aux(x)


@pytest.mark.parametrize("mode", ["dfa", "shallow"])
def test_the_roles_measured_at_the_first_backward_follow_the_loss(mode: str) -> None:
    """After the first backward the roles say what each parameter got: a temperature applied after the output
    module learns by its true gradient; in shallow mode so do the heads and nothing before the last cut (the layer
    shared between the blocks gets no gradient); in DFA mode that layer gets feedback."""
    torch.manual_seed(0)
    net = SharedBetween()
    engine = FeedbackEngine(mode=mode, output=["out", "aux"])
    engine.attach(net)
    x, y = torch.randn(6, 8), torch.randint(0, 3, (6,))
    out, aux = net(x)
    loss = F.cross_entropy(out, y) + F.cross_entropy(aux, y)
    loss.backward()
    engine.end_backward(loss)
    got = {n: ("true gradient" if p.grad is not None and p.grad.abs().sum() > 0 else "none") for n, p in
           net.named_parameters()}  # fmt: skip
    assert got["log_temperature"] == engine.role_of(net.log_temperature) == "true gradient"
    for name in ("aux.weight", "out.weight"):
        assert got[name] == engine.role_of(net.get_parameter(name)) == "true gradient"
    shared = engine.role_of(net.shared.weight)
    assert shared == ("none" if mode == "shallow" else "feedback")
    assert (got["shared.weight"] == "none") == (mode == "shallow")
    engine.detach()


def test_the_summary_says_when_the_roles_wait_for_the_loss() -> None:
    """The engine used on its own, ``end_backward()`` without the loss: a temperature applied after the output
    module counts as feedback until a loss is passed, and the summary says so; passed, it counts as what it gets."""
    torch.manual_seed(0)
    net = SharedBetween()
    engine = FeedbackEngine(output=["out", "aux"])
    engine.attach(net)
    x, y = torch.randn(6, 8), torch.randint(0, 3, (6,))
    for passed in (False, True):
        out, aux = net(x)
        loss = F.cross_entropy(out, y) + F.cross_entropy(aux, y)
        loss.backward()
        engine.end_backward(loss if passed else None)
        waits = "counted once the loss is passed: end_backward(loss)" in engine.summary()
        assert engine.roles_measured and engine.roles_from_loss == passed and waits != passed
        assert engine.role_of(net.log_temperature) == ("true gradient" if passed else "feedback")
    engine.detach()


@pytest.mark.parametrize("order", [("student", "teacher"), ("teacher", "student")])
def test_a_frozen_teacher_beside_the_student_is_neither_blocks_nor_the_output(order: tuple[str, str]) -> None:
    """Distillation: a frozen teacher network (larger than the student, registered before or after it) is left
    out; the student's chain is the model, its last layer the output, its hidden groups the blocks."""
    torch.manual_seed(0)
    net = nn.Module()
    nets = {
        "student": nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)),
        "teacher": nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 4)),
    }
    nets["teacher"].requires_grad_(False)
    for name in order:
        setattr(net, name, nets[name])
    engine = FeedbackEngine()
    target = engine.attach(net)
    assert [b.name for b in target.blocks] == ["student.1", "student.3"] and target.output_name == "student.4"
    x, y = torch.randn(8, 20), torch.randint(0, 4, (8,))
    with torch.no_grad():
        soft = F.softmax(net.teacher(x), -1)
    out = net.student(x)
    (F.cross_entropy(out, y) + F.kl_div(F.log_softmax(out, -1), soft, reduction="batchmean")).backward()
    assert engine.end_backward().deliveries == 1
    assert all(p.grad is None for p in net.teacher.parameters())
    engine.detach()


@pytest.mark.parametrize("mode", ["dfa", "shallow"])
def test_a_frozen_teacher_in_eval_mode_is_left_out_of_another_layout_of_student(mode: str) -> None:
    """A frozen teacher in evaluation mode (an ``nn.Sequential``) registered before a student written with layers as
    attributes: discovery would take the teacher's groups for the blocks (and the whole student would learn by
    backprop, unnoticed). The student is the model; the teacher gets nothing and is not called with gradients."""

    class Student(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))

    torch.manual_seed(0)
    net = nn.Module()
    net.teacher = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    net.teacher.requires_grad_(False).eval()
    net.student = Student()
    reference = copy.deepcopy(net)
    engine = FeedbackEngine(mode=mode)
    target = engine.attach(net)
    assert [b.name for b in target.blocks] == ["student.fc1", "student.fc2"] and target.output_name == "student.fc3"
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))

    def loss_of(model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            soft = F.softmax(model.teacher(x) / 4, -1)
        out = model.student(x)
        return F.cross_entropy(out, y) + F.kl_div(F.log_softmax(out / 4, -1), soft, reduction="batchmean")

    loss = loss_of(net)
    loss.backward()
    engine.end_backward(loss)
    loss_of(reference).backward()
    assert torch.equal(net.student.fc3.weight.grad, reference.student.fc3.weight.grad)  # the output: true gradient
    first = net.student.fc1.weight.grad
    if mode == "shallow":
        assert first is None
    else:  # feedback, not backprop
        assert first is not None and not torch.allclose(first, reference.student.fc1.weight.grad)
    engine.detach()
    net.teacher.train()  # a frozen network in training mode may be a backbone that is unfrozen later: kept
    assert [b.name for b in FeedbackEngine().attach(net).blocks][:2] == ["teacher.1", "teacher.3"]


def test_a_frozen_backbone_that_feeds_the_head_stays_blocks() -> None:
    """Frozen at set-up (``BackboneFinetuning`` freezes in its ``setup``) and unfrozen later: the backbone's groups are
    blocks, so that it learns by feedback once unfrozen, as the teacher above does not."""
    torch.manual_seed(0)
    net = nn.Module()
    net.backbone = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
    net.classifier = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    net.backbone.requires_grad_(False)
    target = FeedbackEngine().attach(net)
    assert [b.name for b in target.blocks] == ["backbone.1", "backbone.3", "classifier.1"]
    assert target.output_name == "classifier.2"


@pytest.mark.parametrize("head_kind", ["sequential", "linear"])
@pytest.mark.parametrize("order", [("backbone", "head"), ("head", "backbone")])
def test_a_head_registered_before_its_backbone_is_still_the_head(order: tuple[str, str], head_kind: str) -> None:
    """``self.head`` assigned before ``self.backbone`` (the forward calls the backbone first): the head is found by
    the widths it reads, so its last layer is the output whatever the order of registration."""
    torch.manual_seed(0)
    parts = {
        "backbone": nn.Sequential(
            nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 40), nn.ReLU()
        ),
        "head": nn.Sequential(nn.Linear(40, 16), nn.ReLU(), nn.Linear(16, 4))
        if head_kind == "sequential"
        else nn.Linear(40, 4),
    }

    class Net(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.backbone(x))

    net = Net()
    for name in order:
        setattr(net, name, parts[name])
    engine = FeedbackEngine()
    target = engine.attach(net)
    head_blocks = ["head.1"] if head_kind == "sequential" else []
    assert sorted(b.name for b in target.blocks) == sorted(["backbone.1", "backbone.3", "backbone.5", *head_blocks])
    assert target.output_name == ("head.2" if head_kind == "sequential" else "head")
    F.cross_entropy(net(torch.randn(8, 20)), torch.randint(0, 4, (8,))).backward()
    assert engine.end_backward().deliveries == 1
    assert [p.key for p in engine.last_points] == ["backbone.1", "backbone.3", "backbone.5", *head_blocks]


def test_an_autoencoder_reads_its_error_at_the_decoder() -> None:
    """The decoder (ending in a Sigmoid, registered last) reads the encoder's output: the encoder, whose input width
    is the decoder's output width but whose output feeds the decoder, is not taken for a head of the decoder."""
    torch.manual_seed(0)
    net = nn.Module()
    net.encoder = nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 4))
    net.decoder = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 30), nn.Sigmoid())
    engine = FeedbackEngine()
    target = engine.attach(net)
    assert target.output_name == "decoder.2"
    x = torch.rand(8, 30)
    F.mse_loss(net.decoder(net.encoder(x)), x).backward()
    assert engine.end_backward().deliveries == 1
    assert [p.key for p in engine.last_points] == ["encoder.1", "encoder.2", "decoder.2:in"]


def test_a_gan_whose_discriminator_is_registered_first_trains_both_steps() -> None:
    """Two Sequentials, the discriminator assigned before the generator: the discriminator reads the generator's
    output width, so it is the generator's head (before: the generator's last layer was taken as the output and the
    generator step's loss did not require grad)."""
    torch.manual_seed(0)
    gan = nn.Module()
    gan.discriminator = nn.Sequential(nn.Linear(20, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1), nn.Sigmoid())
    gan.generator = nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 20), nn.Tanh()
    )
    engine = FeedbackEngine()
    assert engine.attach(gan).output_name == "discriminator.2"
    x, z = torch.rand(16, 20) * 2 - 1, torch.randn(16, 8)
    gan.discriminator.requires_grad_(False)  # the generator's step (as toggle_optimizer does)
    fake = gan.generator(z)
    F.binary_cross_entropy(gan.discriminator(fake), torch.ones(16, 1)).backward()
    assert engine.end_backward().deliveries == 1
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gan.generator.parameters())
    gan.discriminator.requires_grad_(True)  # the discriminator's step
    real, made = gan.discriminator(x), gan.discriminator(fake.detach())
    (F.binary_cross_entropy(real, torch.ones(16, 1)) + F.binary_cross_entropy(made, torch.zeros(16, 1))).backward()
    engine.end_backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gan.discriminator.parameters())


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("order", [("features", "fc"), ("fc", "features")])
def test_a_linear_head_registered_before_conv_features_it_reads_flattened_is_the_output(
    order: tuple[str, str], batch_norm: bool
) -> None:
    """``fc`` reads the convolutional features flattened (a multiple of their channels; a BatchNorm's scale after
    the last convolution is no layer): the head whatever the order of registration, so the last convolution is a
    block, not a layer trained by its true gradient."""
    torch.manual_seed(0)

    def stage(cin: int, cout: int) -> list[nn.Module]:
        norm = [nn.BatchNorm2d(cout)] if batch_norm else []
        return [nn.Conv2d(cin, cout, 3, padding=1), *norm, nn.ReLU(), nn.MaxPool2d(2)]

    parts = {"fc": nn.Linear(16 * 4 * 4, 10), "features": nn.Sequential(*stage(1, 8), *stage(8, 16), nn.Flatten())}

    class Net(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.features(x))

    net = Net()
    for name in order:
        setattr(net, name, parts[name])
    engine = FeedbackEngine()
    target = engine.attach(net)
    blocks = ["features.3", "features.7"] if batch_norm else ["features.2", "features.5"]
    assert [b.name for b in target.blocks] == blocks and target.output_name == "fc"
    F.cross_entropy(net(torch.randn(4, 1, 16, 16)), torch.randint(0, 10, (4,))).backward()
    assert engine.end_backward().deliveries == 1
    assert engine.parameter_roles()["feedback"] == sum(p.numel() for p in parts["features"].parameters())


class NanoLayerNorm(nn.Module):  # nanoGPT's LayerNorm: an optional bias, applied with F.layer_norm
    def __init__(self, d: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class NanoBlock(GPTBlock):
    def __init__(self, d: int, bias: bool) -> None:
        super().__init__(d)
        self.ln_1, self.ln_2 = NanoLayerNorm(d, bias), NanoLayerNorm(d, bias)


class NanoGPT(nn.Module):  # nanoGPT's layout: a ModuleDict "transformer", the token table tied to the head
    def __init__(self, bias: bool, vocab: int = 48, d: int = 16, layers: int = 3, context: int = 8) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, d), wpe=nn.Embedding(context, d),
            h=nn.ModuleList([NanoBlock(d, bias) for _ in range(layers)]), ln_f=NanoLayerNorm(d, bias),
        ))  # fmt: skip
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.transformer.wte(ids) + self.transformer.wpe(torch.arange(ids.shape[1]))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


@pytest.mark.parametrize("bias", [True, False])
def test_nanogpt_gets_the_default_recipe_with_its_own_layer_norm(bias: bool) -> None:
    """nanoGPT's own LayerNorm class (``F.layer_norm``, with or without a bias) is found as a norm: the points that
    feed one get norm-aware feedback, each block's first norm is a point, the tied token table is cut and the head's
    input is the last point (the vocabulary head widens)."""
    torch.manual_seed(0)
    gpt = NanoGPT(bias)
    engine = FeedbackEngine()
    assert [b.name for b in engine.attach(gpt).blocks] == ["transformer.h.0", "transformer.h.1", "transformer.h.2"]
    ids = torch.randint(0, 48, (4, 8))
    _token_loss(ids)(gpt).backward()
    assert engine.end_backward().deliveries == 1
    keys = [p.key for p in engine.last_points]
    assert keys == ["transformer.h.0", "transformer.h.1.ln_1", "transformer.h.1", "transformer.h.2.ln_1", "lm_head:in"]
    norm_aware = [p.key for p in engine.last_points if p.norm is not None]
    assert norm_aware == ["transformer.h.0", "transformer.h.1"]  # the block outputs the next block's norms read
    notes = "; ".join(engine.recipe_notes())
    assert "transformer.wte (tied: learns from the output only)" in notes
    assert "cut_head_input: on" in notes


@pytest.mark.parametrize("layers", [2, 1])
def test_lightnings_demo_transformer_gets_feedback_in_both_stacks(layers: int) -> None:
    """``pytorch_lightning.demos.Transformer`` (an ``nn.Transformer`` encoder-decoder language model): every encoder
    and decoder layer is a block and learns by feedback; the output layer by its true gradient. Also with one layer
    a stack (before: the decoder layer's attention modules were the blocks and its last norm the output)."""
    from pytorch_lightning.demos.transformer import Transformer

    torch.manual_seed(0)
    net = Transformer(vocab_size=24, ninp=16, nhead=2, nhid=32, nlayers=layers, dropout=0.0)
    ids = torch.randint(0, 24, (4, 9))
    engine = check_true_dfa(net, lambda n: F.nll_loss(n(ids[:, :-1], ids[:, 1:]), ids[:, 1:].flatten()))
    blocks = [b.name for b in engine.target.blocks]
    assert blocks == [f"transformer.{s}.layers.{i}" for s in ("encoder", "decoder") for i in range(layers)]
    assert [n for n, _ in engine.output_modules()] == ["decoder"]


def test_lightnings_demo_lstm_gets_feedback_at_its_recurrent_layers() -> None:
    """``pytorch_lightning.demos.SimpleLSTM`` (embedding, a stacked LSTM carried state, a linear decoder): the LSTM
    learns by feedback at its output; the decoder by its true gradient."""
    from pytorch_lightning.demos.lstm import SimpleLSTM

    torch.manual_seed(0)
    net = SimpleLSTM(vocab_size=24, ninp=16, nhid=16, nlayers=2, dropout=0.0)
    ids, state = torch.randint(0, 24, (4, 9)), net.init_hidden(4)
    engine = check_true_dfa(net, lambda n: F.nll_loss(n(ids[:, :-1], state)[0], ids[:, 1:].flatten()))
    assert "rnn" in [b.name for b in engine.target.blocks]
    assert [n for n, _ in engine.output_modules()] == ["decoder"]


class PreNorm(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm, self.fn = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class ListOfLists(nn.Module):
    """A Transformer written as vit-pytorch writes it: a list of ``[attention, feed-forward]`` lists, the residual
    adds in the parent's loop."""

    def __init__(self, d: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(8, d)
        self.layers = nn.ModuleList([nn.ModuleList([PreNorm(d), PreNorm(d)]) for _ in range(depth)])
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return self.head(x)


def test_a_list_of_layer_lists_makes_every_layer_a_block_and_naming_the_lists_says_why_not() -> None:
    """Every layer is a block (not only the first layer's sublayers, which left the others to backprop), each
    learning by feedback; ``blocks=['layers.*']`` names containers that are never called, and the error says to
    name their elements."""
    torch.manual_seed(0)
    net, x, y = ListOfLists(), torch.randn(16, 8), torch.randint(0, 3, (16,))
    F.cross_entropy(net(x), y).backward()
    bp = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    engine = FeedbackEngine()
    target = engine.attach(net)
    assert [b.name for b in target.blocks] == [f"layers.{i}" for i in range(3)]
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    assert engine.end_backward(loss).deliveries == 1
    engine.detach()
    for name, p in net.named_parameters():
        if name.startswith("layers.") and name.endswith("weight") and ".norm." not in name:
            assert not torch.allclose(p.grad, bp[name]), name
    torch.testing.assert_close(net.head.weight.grad, bp["head.weight"])
    engine = FeedbackEngine(blocks=["layers.*"], output="head")
    engine.attach(net)
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    with pytest.raises(RuntimeError, match=r"containers \(ModuleList\).*'layers\.\*\.\*'"):
        engine.end_backward(loss)
    engine.detach()


class TaskHeads(nn.Module):
    """A multi-task net whose step picks its head by the batch's task (``nn.ModuleDict`` of heads)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(10, 16), nn.Linear(16, 16)
        self.heads = nn.ModuleDict({"cls": nn.Linear(16, 4), "reg": nn.Linear(16, 2)})

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        return self.heads[task](torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def test_heads_in_a_module_dict_picked_per_batch_are_all_outputs() -> None:
    """Every head of the dict is an output (an error source), not the last one alone with the others taken for
    blocks: a step of either task delivers its head's error to the blocks."""
    torch.manual_seed(0)
    net = TaskHeads()
    engine = FeedbackEngine()
    target = engine.attach(net)
    assert [b.name for b in target.blocks] == ["fc1", "fc2"]
    assert {n for n, _ in target.outputs} == {"heads.cls", "heads.reg"}
    x = torch.randn(8, 10)
    for task, loss_of in (("cls", lambda o: F.cross_entropy(o, torch.randint(0, 4, (8,)))),
                          ("reg", lambda o: F.mse_loss(o, torch.randn(8, 2)))):  # fmt: skip
        net.zero_grad()
        loss = loss_of(net(x, task))
        loss.backward()
        assert engine.end_backward(loss).deliveries == 1, task
        assert net.fc1.weight.grad.abs().sum() > 0
    engine.detach()


class ConvThenLSTM(nn.Module):
    """A speech-style tagger: a convolutional front-end (an ``nn.Sequential`` ending in an activation), an LSTM and a
    Linear, registered as attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv1d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv1d(16, 16, 3, padding=1), nn.ReLU())
        self.lstm = nn.LSTM(16, 32, batch_first=True)
        self.out = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.lstm(self.conv(x.transpose(1, 2)).transpose(1, 2))[0])


def test_a_recurrent_layer_after_a_convolutional_front_end_is_a_block() -> None:
    """The LSTM between the front-end and the output is a block (before: taken for the output, so that it learned by
    backprop, most of the model): every layer before ``out`` learns by feedback."""
    torch.manual_seed(0)
    net, x, y = ConvThenLSTM(), torch.randn(4, 20, 8), torch.randint(0, 5, (4, 20))
    F.cross_entropy(net(x).reshape(-1, 5), y.reshape(-1)).backward()
    bp = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    engine = FeedbackEngine()
    target = engine.attach(net)
    assert [b.name for b in target.blocks] == ["conv.1", "conv.3", "lstm"] and target.output_name == "out"
    loss = F.cross_entropy(net(x).reshape(-1, 5), y.reshape(-1))
    loss.backward()
    assert engine.end_backward(loss).deliveries == 1
    engine.detach()
    same = {n for n, p in net.named_parameters() if torch.allclose(p.grad, bp[n])}
    assert same == {"out.weight", "out.bias"}


def test_squeezebert_whose_encoder_calls_layer_forward_trains_by_feedback() -> None:
    """SqueezeBERT's encoder calls ``layer.forward(...)``, which runs no hooks: each layer's block spans from its
    attention to its output module (registry ``BLOCK_SPANS``), and its channels-first ``[batch, channels,
    positions]`` points are fed position by position."""
    import transformers as hf

    _quiet()
    torch.manual_seed(0)
    cfg = hf.SqueezeBertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, embedding_size=32, max_position_embeddings=16)  # fmt: skip
    net = hf.SqueezeBertForMaskedLM(cfg)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    engine = check_true_dfa(net, lambda n: n(input_ids=ids, labels=ids).loss, tied_output=True)
    assert [b.name for b in engine.target.blocks] == ["transformer.encoder.layers.0", "transformer.encoder.layers.1"]
    assert {p.key: list(p.shape) for p in engine.last_points}["transformer.encoder.layers.0"] == [2, 32, 8]


class ConvTagger(nn.Module):
    """A temporal convolution tagging each position: Conv1d+ReLU groups on ``[batch, channels, positions]``, then a
    Linear per position."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.convs(x).transpose(1, 2))


def test_a_channels_first_sequence_is_fed_position_by_position() -> None:
    """A convolutional block's ``[batch, channels, positions]`` point under a ``[batch, positions, outputs]`` error
    gets ``B e`` of each position at that position (not one projection of each item's whole flattened error)."""
    torch.manual_seed(0)
    net, x, y = ConvTagger(), torch.randn(3, 4, 6), torch.randint(0, 5, (3, 6))
    engine = FeedbackEngine(seed=0)
    engine.attach(net)

    def loss_of(n: nn.Module) -> torch.Tensor:
        return F.cross_entropy(n(x).reshape(-1, 5), y.reshape(-1))

    loss_of(net).backward()
    assert engine.end_backward().deliveries == 1
    got = net.convs[0].weight.grad.clone()
    engine.detach()
    logits = net(x)
    error = torch.autograd.grad(F.cross_entropy(logits.reshape(-1, 5), y.reshape(-1)), logits)[0]  # [3, 6, 5]
    feedback = (error @ engine.bank.matrix(5, 8, torch.device("cpu"), torch.float32).t() / 8**0.5).transpose(1, 2)
    h = net.convs[1](net.convs[0](x))
    torch.testing.assert_close(got, torch.autograd.grad(h, net.convs[0].weight, feedback)[0])


class OgbMLP(nn.Module):
    """OGB's and PyG's layout: ``lins`` ends in the classifier, the norms of the hidden layers registered after it."""

    def __init__(self) -> None:
        super().__init__()
        self.lins = nn.ModuleList([nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 4)])
        self.bns = nn.ModuleList([nn.BatchNorm1d(32) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for lin, bn in zip(self.lins[:-1], self.bns):
            x = F.relu(bn(lin(x)))
        return self.lins[-1](x).log_softmax(-1)


def test_a_layer_list_ending_in_the_classifier_before_its_norms_has_that_classifier_as_output() -> None:
    """The classifier at the end of ``lins`` is the output, not the last norm registered after the list (before:
    the loss did not require grad, "downstream of block 'lins.2'")."""
    torch.manual_seed(0)
    net, x, y = OgbMLP(), torch.randn(16, 8), torch.randint(0, 4, (16,))
    engine = check_true_dfa(net, lambda n: F.nll_loss(n(x), y))
    assert [b.name for b in engine.target.blocks] == ["lins.0", "lins.1"] and engine.target.output_name == "lins.2"


class _PreNorm(nn.Module):
    def __init__(self, d: int, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.norm, self.fn = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fn(self.norm(x)) if self.residual else self.fn(self.norm(x))


class _LayerLists(nn.Module):
    """lucidrains' layout: ``layers = ModuleList([ModuleList([mix, ff])])``, the residual adds written in the
    parent's loop (``adds="parent"``) or held by the sublayers (``adds="sublayers"``)."""

    def __init__(self, adds: str, d: int = 16) -> None:
        super().__init__()
        self.adds = adds
        self.embed = nn.Linear(6, d)
        inside = adds == "sublayers"
        self.layers = nn.ModuleList([nn.ModuleList([_PreNorm(d, inside), _PreNorm(d, inside)]) for _ in range(3)])
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for mix, ff in self.layers:
            if self.adds == "parent":
                x = mix(x) + x
                x = ff(x) + x
            else:
                x = ff(mix(x))
        return self.head(self.norm(x.mean(1)))


@pytest.mark.parametrize("mode", ["dfa", "shallow"])
def test_a_list_of_layer_lists_is_one_block_per_layer_wherever_the_adds_are(mode: str) -> None:
    """Each inner list is one block, fed at its input (the next layer's input, which holds the parent's adds) and
    at the head's input for the last: its sublayers learn together from it, as a block holding its adds. With the
    adds in the parent, the stream around each layer is cut: every gradient equals that of the same network with
    the adds in its sublayers, and in the shallow baseline only the head learns (its input is the last point)."""
    x, y = torch.randn(8, 5, 6), torch.randint(0, 3, (8,))
    grads = []
    for adds in ("parent", "sublayers"):
        torch.manual_seed(0)
        net = _LayerLists(adds)
        engine = FeedbackEngine(mode=mode, seed=0)
        target = engine.attach(net)
        assert [b.name for b in target.blocks] == ["layers.0", "layers.1", "layers.2"]
        assert target.output_name == "head" and target.source == "layer_lists"
        for _ in range(2):
            net.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            engine.end_backward(loss)
        grads.append({n: p.grad for n, p in net.named_parameters()})
        engine.detach()
    for name, grad in grads[1].items():
        other = grads[0][name]
        assert (grad is None) == (other is None), name
        if grad is not None:
            torch.testing.assert_close(other, grad, rtol=1e-5, atol=1e-7, msg=name)
    learned = {n.split(".")[0] for n, g in grads[0].items() if g is not None}
    assert learned == ({"head"} if mode == "shallow" else {"embed", "layers", "norm", "head"})


class _TwoTowers(nn.Module):
    """CLIP's layout: an image tower (an ``nn.Sequential`` ending in its projection) registered before a text
    Transformer (a list of layers, a final norm)."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.visual = nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, d))
        self.tok = nn.Embedding(20, d)
        layer = nn.TransformerEncoderLayer(d, 2, 32, 0.0, batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.ln_final = nn.LayerNorm(d)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.visual(image), self.ln_final(self.transformer(self.tok(text))).mean(1)


def test_two_towers_each_get_feedback_from_their_own_output_only() -> None:
    """Both towers are blocks, each tower's last layer an output (before: the image tower learned by backprop,
    unnoticed); each tower's points get its own output's error: with a loss on each tower, the image tower's
    gradients are those of its loss alone."""
    torch.manual_seed(0)
    net = _TwoTowers()
    image, text = torch.randn(8, 12), torch.randint(0, 20, (8, 5))
    engine = FeedbackEngine(seed=0)
    target = engine.attach(net)
    assert [b.name for b in target.blocks] == ["visual.1", "visual.3", "transformer.layers.0", "transformer.layers.1"]
    assert [n for n, _ in target.outputs] == ["ln_final", "visual.4"]
    grads = []
    for with_text in (True, False):
        net.zero_grad(set_to_none=True)
        v, t = net(image, text)
        loss = v.square().mean() + (t.square().mean() if with_text else 0)
        loss.backward()
        engine.end_backward(loss)
        grads.append({n: p.grad for n, p in net.named_parameters()})
    for name in ("visual.0.weight", "visual.2.weight", "visual.4.weight"):
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)
    assert grads[0]["transformer.layers.0.linear1.weight"] is not None
    assert grads[1]["transformer.layers.0.linear1.weight"] is None
    engine.detach()


def test_a_chain_found_as_a_tower_that_feeds_the_blocks_takes_their_output_error() -> None:
    """A Sequential stem ending in its own last layer, registered before the blocks with a position table between
    them, is found as a tower; its output feeds the first block, so it is no error source, and its blocks take the
    head's error instead (before: they got no gradient at all)."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.b(torch.tanh(self.a(x)))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
            self.pos = nn.Embedding(4, 16)
            self.layers = nn.ModuleList([Block() for _ in range(3)])
            self.head = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.stem(x) + self.pos.weight[0]
            for layer in self.layers:
                h = layer(h)
            return self.head(h)

    torch.manual_seed(0)
    net, x, y = Net(), torch.randn(8, 6), torch.randint(0, 3, (8,))
    engine = FeedbackEngine()
    target = engine.attach(net)
    assert target.towers == {"stem.4": ("stem.1", "stem.3")}
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    assert engine.end_backward(loss).deliveries == 1
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.stem.parameters())
    engine.detach()


class _ConvEncoder(nn.Module):  # the layout of the UvA deep-learning course's convolutional autoencoder, smaller
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, stride=2),
            nn.GELU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.GELU(),
            nn.Flatten(),
            nn.Linear(8 * 4 * 4, 16),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _ConvDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Sequential(nn.Linear(16, 8 * 4 * 4), nn.GELU())
        self.net = nn.Sequential(
            nn.ConvTranspose2d(8, 8, 3, output_padding=1, padding=1, stride=2),
            nn.GELU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.GELU(),
            nn.ConvTranspose2d(8, 3, 3, padding=1),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.linear(z).reshape(z.shape[0], 8, 4, 4))


def test_a_transposed_convolution_decoder_reads_its_error_at_its_last_layer() -> None:
    """A decoder of transposed convolutions ending in a Tanh, behind its own Linear: a transposed convolution's
    weight is ``[in, out, ...]``, so its widths are read from its channels (read from the weight, the decoder's
    Linear passed for the head of its convolutions, the Tanh's group became a block, and the first step found no
    gradient left to the loss)."""
    torch.manual_seed(0)
    net = nn.Module()
    net.encoder, net.decoder = _ConvEncoder(), _ConvDecoder()
    engine = FeedbackEngine()
    target = engine.attach(net)
    assert "decoder.net.5" not in [b.name for b in target.blocks]
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    loss = F.mse_loss(net.decoder(net.encoder(x)), x)
    engine.check_loss(loss)
    loss.backward()
    report = engine.end_backward(loss)
    assert report.deliveries == 1
    assert [name for name, _ in engine.output_modules()] == ["decoder.net.4"]
    fed = [p.key for p in report.points_fed]
    assert "encoder.net.1" in fed and "decoder.net.3" in fed
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


class _EncoderBlock(nn.Module):  # the UvA deep-learning course's Transformer encoder block, smaller
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.linear_net = nn.Sequential(nn.Linear(dim, 2 * dim), nn.Dropout(0.0), nn.ReLU(), nn.Linear(2 * dim, dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.self_attn(x, x, x, need_weights=False)[0])
        return self.norm2(x + self.linear_net(x))


class _ReversePredictor(nn.Module):
    def __init__(self, layers: int, dim: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.input_net = nn.Sequential(nn.Dropout(0.0), nn.Linear(classes, dim))
        self.transformer = nn.Module()
        self.transformer.layers = nn.ModuleList([_EncoderBlock(dim) for _ in range(layers)])
        self.output_net = nn.Sequential(
            nn.Linear(dim, dim), nn.LayerNorm(dim), nn.ReLU(), nn.Dropout(0.0), nn.Linear(dim, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_net(F.one_hot(x, 10).float())
        for layer in self.transformer.layers:
            x = layer(x)
        return self.output_net(x)


@pytest.mark.parametrize("layers", [1, 2])
def test_a_transformer_of_one_layer_has_that_layer_as_its_block(layers: int) -> None:
    """A Transformer with a single layer in its ``ModuleList`` (the course's setting) is discovered as one with two:
    its layers are the blocks and the output head's last layer is the output (before, with one layer, the largest
    Sequential, the layer's own MLP, was taken for the model: its parts became blocks and the layer's first norm
    the output)."""
    torch.manual_seed(0)
    net, engine = _ReversePredictor(layers), FeedbackEngine()
    target = engine.attach(net)
    assert [b.name for b in target.blocks] == [f"transformer.layers.{i}" for i in range(layers)]
    assert target.output_name == "output_net.4"
    x = torch.randint(0, 10, (4, 6))
    F.cross_entropy(net(x).flatten(0, 1), x.flip(1).flatten()).backward()
    assert engine.end_backward().deliveries == 1
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.transformer.parameters())


def _mlp(inputs: int, outputs: int) -> nn.Sequential:  # Lightning's PPO example's create_mlp
    return nn.Sequential(nn.Linear(inputs, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, outputs))


class _Actor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.actor_net = _mlp(4, 2)

    def forward(self, states: torch.Tensor) -> torch.distributions.Categorical:
        return torch.distributions.Categorical(logits=self.actor_net(states))


@pytest.mark.parametrize("critic_first", [True, False], ids=["critic_first", "actor_first"])
def test_an_actor_and_a_critic_beside_it_each_read_their_own_error(critic_first: bool) -> None:
    """Lightning's PPO example: an actor and a critic, two MLPs on the same states, each ending in its own layer. Each
    is a tower: its groups are blocks that only its own last layer's error reaches (before, one network's last layer
    was taken for a block of the other's chain: its loss term was cut off and it learned nothing, silently)."""
    torch.manual_seed(0)
    net = nn.Module()
    if critic_first:
        net.critic, net.actor = _mlp(4, 1), _Actor()
    else:
        net.actor, net.critic = _Actor(), _mlp(4, 1)
    engine = FeedbackEngine()
    target = engine.attach(net)
    assert sorted(b.name for b in target.blocks) == ["actor.actor_net.1", "actor.actor_net.3", "critic.1", "critic.3"]
    assert sorted(n for n, _ in target.outputs) == ["actor.actor_net.4", "critic.4"]
    states, actions, advantages, returns = (
        torch.randn(16, 4),
        torch.randint(0, 2, (16,)),
        torch.randn(16),
        torch.randn(16),
    )
    actor_loss = -(net.actor(states).log_prob(actions) * advantages).mean()
    critic_loss = F.mse_loss(net.critic(states).squeeze(-1), returns)
    critic_loss.backward()  # its own optimizer's step: only the critic's blocks are fed
    report = engine.end_backward(critic_loss)
    assert sorted(p.key for p in report.points_fed) == ["critic.1", "critic.3"]
    actor_loss.backward()
    report = engine.end_backward(actor_loss)
    assert sorted(p.key for p in report.points_fed) == ["actor.actor_net.1", "actor.actor_net.3"]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


@pytest.mark.parametrize("layers", [(1, 1), (1, 2)], ids=["one_and_one", "one_and_two"])
def test_an_encoder_decoder_transformer_with_a_one_layer_stack_has_every_layer_as_a_block(
    layers: tuple[int, int],
) -> None:
    """``nn.Transformer`` with a stack of one layer: every layer of both stacks is a block (before: with one layer
    each, the decoder's attention modules were the blocks and its last norm the output; with an encoder of one
    layer, the encoder's layer was no block)."""
    torch.manual_seed(0)
    net = nn.Module()
    net.embed = nn.Embedding(10, 16)
    net.transformer = nn.Transformer(16, 2, *layers, dim_feedforward=32, dropout=0.0, batch_first=True)
    net.head = nn.Linear(16, 10)
    engine = FeedbackEngine()
    target = engine.attach(net)
    encoder = [f"transformer.encoder.layers.{i}" for i in range(layers[0])]
    decoder = [f"transformer.decoder.layers.{i}" for i in range(layers[1])]
    assert [b.name for b in target.blocks] == encoder + decoder and target.output_name == "head"
    src, tgt = torch.randint(0, 10, (4, 5)), torch.randint(0, 10, (4, 6))
    out = net.head(net.transformer(net.embed(src), net.embed(tgt)))
    F.cross_entropy(out.flatten(0, 1), tgt.flatten()).backward()
    report = engine.end_backward()
    fed = {p.key.split(":")[0] for p in report.points_fed}
    # the head over the token vocabulary has its input cut (the recipe's choice): the decoder's last layer is fed
    # through that point and the decoder's final norm
    assert engine.cut_head_input and fed >= set(encoder + decoder[:-1]) | {"head"}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.transformer.decoder.layers[-1].parameters())


def test_a_two_tower_retrieval_model_of_two_mlps_feeds_both_towers() -> None:
    """A user tower and an item tower (two MLPs of one shape, scored by a contrastive loss on their dot products):
    each is a tower with its own output (before: the user tower's last layer was taken for a block, its output cut,
    and the user tower got no gradient at all, silently)."""
    torch.manual_seed(0)
    net = nn.Module()
    net.user, net.item = _mlp(8, 16), _mlp(8, 16)
    engine = FeedbackEngine()
    target = engine.attach(net)
    assert sorted(n for n, _ in target.outputs) == ["item.4", "user.4"]
    users, items = F.normalize(net.user(torch.randn(6, 8)), dim=-1), F.normalize(net.item(torch.randn(6, 8)), dim=-1)
    loss = F.cross_entropy(users @ items.T / 0.1, torch.arange(6))
    loss.backward()
    engine.end_backward(loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def _equal_width_tower() -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))


def _adapter_steps(net: nn.Module, engine: FeedbackEngine, loss_of: Any, batches: list[Any]) -> dict[str, Any]:
    """Steps as the Lightning adapters take them (the first loss checked, the heads found made outputs after its
    backward); the gradients of the last step."""
    for i, batch in enumerate(batches):
        net.zero_grad(set_to_none=True)
        loss = loss_of(net, batch)
        heads = engine.loss_readers(loss) and engine.loss_heads if i == 0 else []
        loss.backward()
        engine.end_backward(loss)
        if heads:
            engine.add_outputs(heads)
    return {n: p.grad for n, p in net.named_parameters()}


def test_a_first_tower_as_wide_as_its_input_is_made_an_output_from_the_data_flow() -> None:
    """Two towers of one shape whose input and output widths are equal (16 -> 16) cannot be told by their shapes
    from one chain run after the other: the first tower's last layer is taken for a block. The first loss shows the
    data flow (it reads that block's output point directly, and nothing else does): from the second step that
    layer is an output, and the gradients are those of the towers named by hand (before: the first tower was fed
    the second tower's error and its own score term was dropped by the cut, silently)."""
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)) for _ in range(2)]

    def loss_of(net: nn.Module, batch: Any) -> torch.Tensor:
        return F.cross_entropy(net.user(batch[0]) @ net.item(batch[1]).T, torch.arange(6))

    grads = []
    for options in ({}, {"blocks": ["user.1", "user.3", "item.1", "item.3"], "output": ["item.4", "user.4"]}):
        torch.manual_seed(0)
        net = nn.Module()
        net.user, net.item = _equal_width_tower(), _equal_width_tower()
        engine = FeedbackEngine(seed=0, **options)
        engine.attach(net)
        grads.append(_adapter_steps(net, engine, loss_of, batches))
        if not options:
            assert sorted(n for n, _ in engine.target.outputs) == ["item.4", "user.4"]
    for name, grad in grads[1].items():
        torch.testing.assert_close(grads[0][name], grad, msg=name)


class _AuxClassifier(nn.Module):
    """GoogLeNet's auxiliary classifier, smaller: a pooling, a 1x1 convolution and two Linear layers."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv, self.fc1, self.fc2 = nn.Conv2d(channels, 8, 1), nn.Linear(8 * 2 * 2, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(F.adaptive_avg_pool2d(x, 2)))
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


class _DeeplySupervised(nn.Module):
    """A CNN with auxiliary classifiers on two middle feature maps, registered between its stages."""

    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.block2 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.aux1 = _AuxClassifier(8)
        self.block3 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.aux2 = _AuxClassifier(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x1 = self.block1(x)
        x2 = self.block2(x1)
        out = self.fc(torch.flatten(F.adaptive_avg_pool2d(self.block3(x2), 1), 1))
        return out, self.aux1(x1), self.aux2(x2)


def test_auxiliary_classifiers_taken_for_blocks_are_made_outputs_from_the_data_flow() -> None:
    """Auxiliary classifiers registered between the stages are taken for blocks (modules with layers of their
    own); the first loss reads their output points directly and nothing else does, so they are made outputs and
    their terms are fed back (before: their loss terms were dropped by the cuts, and they got only the main
    output's error)."""
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(2)]

    def loss_of(net: nn.Module, batch: Any) -> torch.Tensor:
        out, aux1, aux2 = net(batch[0])
        aux = F.cross_entropy(aux1, batch[1]) + F.cross_entropy(aux2, batch[1])
        return F.cross_entropy(out, batch[1]) + 0.3 * aux

    torch.manual_seed(0)
    net, engine = _DeeplySupervised(), FeedbackEngine(seed=0)
    assert {"aux1", "aux2"} <= {b.name for b in engine.attach(net).blocks}
    grads = _adapter_steps(net, engine, loss_of, batches)
    assert sorted(n for n, _ in engine.target.outputs) == ["aux1", "aux2", "fc"]
    # the auxiliary classifiers learn their own terms by their true gradient
    net.zero_grad(set_to_none=True)
    with engine.inert():
        _, aux1, _ = net(batches[1][0])
        F.cross_entropy(aux1, batches[1][1]).mul(0.3).backward()
    torch.testing.assert_close(grads["aux1.fc2.weight"], net.aux1.fc2.weight.grad)


class _AdaptiveSoftmaxLM(nn.Module):
    """A word language model whose output is ``nn.AdaptiveLogSoftmaxWithLoss`` (it returns the log-probabilities of
    the targets and the loss)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding, self.rnn = nn.Embedding(300, 16), nn.LSTM(16, 32, num_layers=2, batch_first=True)
        self.out = nn.AdaptiveLogSoftmaxWithLoss(32, 300, cutoffs=[20, 100], div_value=2.0)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> Any:
        h, _ = self.rnn(self.embedding(tokens))
        return self.out(h.reshape(-1, h.shape[-1]), targets.reshape(-1))


def test_an_adaptive_softmax_output_reads_the_error_at_its_shortlist_head() -> None:
    """An adaptive softmax is one output: discovery finds the blocks without it (the embedding and the LSTM) and reads
    the error at its shortlist head; its tail clusters, which see only the rows of their rare words, are no error
    sources and learn by their true gradient (before: they were taken for blocks, and the first step was refused,
    "cannot line up the error")."""
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 300, (4, 10), generator=g), torch.randint(0, 300, (4, 10), generator=g))] * 2
    torch.manual_seed(0)
    net, engine = _AdaptiveSoftmaxLM(), FeedbackEngine(seed=0)
    target = engine.attach(net)
    assert [b.name for b in target.blocks] == ["embedding", "rnn"] and target.output_name == "out.head"
    grads = _adapter_steps(net, engine, lambda n, b: n(*b).loss, batches)
    assert engine.loss_heads == [] and engine.loss_cut_readers == []
    assert [n for n, _ in engine.target.outputs] == ["out.head"]
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    # the LSTM learns by feedback: its gradient is not backprop's
    net.zero_grad(set_to_none=True)
    with engine.inert():
        net(*batches[1]).loss.backward()
    assert not torch.allclose(grads["rnn.weight_hh_l1"], net.rnn.weight_hh_l1.grad)
    torch.testing.assert_close(grads["out.tail.0.1.weight"], net.out.tail[0][1].weight.grad)


class _LoopedLayer(nn.Module):
    """A universal Transformer: one encoder layer applied ``loops`` times to its own output (shared weights)."""

    def __init__(self, loops: int) -> None:
        super().__init__()
        self.embedding, self.pos = nn.Embedding(20, 16), nn.Parameter(torch.randn(1, 8, 16) * 0.02)
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.norm, self.classifier, self.loops = nn.LayerNorm(16), nn.Linear(16, 3), loops

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embedding(tokens) + self.pos
        for _ in range(self.loops):
            h = self.layer(h)
        return self.classifier(self.norm(h).mean(1))


@pytest.mark.parametrize("loops", [1, 3])
def test_a_layer_looped_over_its_own_output_feeds_every_call(loops: int) -> None:
    """A layer applied again to its own output starts a new forward; the norms inside it are output candidates tied
    on the way, which feed the next call's points and so are no error sources. The points of the earlier calls take
    the later output's error (before: from the second call on, they got none, and the embeddings and positions
    before the first call got no gradient at all, silently)."""
    torch.manual_seed(0)
    net, engine = _LoopedLayer(loops), FeedbackEngine(seed=0)
    engine.attach(net)
    tokens, labels = torch.randint(0, 20, (4, 8)), torch.randint(0, 3, (4,))
    loss = F.cross_entropy(net(tokens), labels)
    loss.backward()
    report = engine.end_backward(loss)
    assert report.deliveries == 1
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    points = [p.key for p in engine.last_points]
    assert len(points) == 3 * loops + 1 and points.count("layer.self_attn:in") == loops


class _MixtureOfExperts(nn.Module):
    """A gate weighing the logits of expert MLPs that all read the input (the tutorials' mixture of experts)."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)) for _ in range(3))
        self.gate = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = F.softmax(self.gate(x), dim=-1)
        return (gates.unsqueeze(-1) * torch.stack([expert(x) for expert in self.experts], dim=1)).sum(1)


def test_experts_side_by_side_are_towers_each_fed_its_own_error() -> None:
    """A list of expert MLPs that all read the input cannot be a stack (each maps the input width to another): each
    expert is a tower, its hidden group a block, its last layer an output whose error reaches that expert only; the
    gate learns by its true gradient (before: the experts were taken for a stack of blocks and the gate, called
    before them, for the output, and the first step was refused)."""
    torch.manual_seed(0)
    net, engine = _MixtureOfExperts(), FeedbackEngine(seed=0)
    target = engine.attach(net)
    assert [b.name for b in target.blocks] == ["experts.0.1", "experts.1.1", "experts.2.1"]
    assert sorted(n for n, _ in target.outputs) == ["experts.0.2", "experts.1.2", "experts.2.2"]
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    assert engine.end_backward(loss).deliveries == 3
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)
    with engine.inert():
        F.cross_entropy(net(x), y).backward()
    for name, p in net.named_parameters():
        if name.startswith("gate") or name.split(".")[2] == "2":  # the gate and each expert's last layer: true
            torch.testing.assert_close(grads[name], p.grad, msg=name)
        else:  # each expert's hidden layer: its own output's error, projected
            assert grads[name].abs().sum() > 0 and not torch.allclose(grads[name], p.grad), name


class _CRF(nn.Module):
    """A linear-chain CRF's negative log-likelihood, computed by the module itself (a scalar)."""

    def __init__(self, tags: int) -> None:
        super().__init__()
        self.transitions = nn.Parameter(torch.zeros(tags, tags))

    def forward(self, emissions: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
        alpha = emissions[:, 0]
        for t in range(1, emissions.shape[1]):
            alpha = torch.logsumexp(alpha.unsqueeze(2) + self.transitions + emissions[:, t].unsqueeze(1), 1)
        gold = emissions.gather(2, tags.unsqueeze(-1)).squeeze(-1).sum(1)
        gold = gold + self.transitions[tags[:, :-1], tags[:, 1:]].sum(1)
        return (torch.logsumexp(alpha, -1) - gold).mean()


class _BiLSTMCRF(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.lstm = nn.Embedding(20, 8), nn.LSTM(8, 8, batch_first=True, bidirectional=True)
        self.proj, self.emit, self.crf = nn.Linear(16, 16), nn.Linear(16, 5), _CRF(5)

    def forward(self, tokens: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
        return self.crf(self.emit(torch.relu(self.proj(self.lstm(self.embed(tokens))[0]))), tags)


def test_a_module_that_computes_the_loss_itself_is_not_taken_for_the_output() -> None:
    """A BiLSTM-CRF tagger: the CRF module (a parameter of its own, the transitions) returns the loss, a scalar. It
    is part of the loss, not an output: the emissions' layer reads the error and the CRF learns by its true gradient
    (before: the CRF was tied as an output found from the forward, and the first step failed, its scalar error
    lined up with no point)."""
    torch.manual_seed(0)
    net, engine = _BiLSTMCRF(), FeedbackEngine()
    engine.attach(net)
    loss = net(torch.randint(0, 20, (4, 6)), torch.randint(0, 5, (4, 6)))
    loss.backward()
    assert engine.end_backward(loss).deliveries == 1
    assert [n for n, _ in engine.output_modules()] == ["emit"]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


class _PackedLSTM(nn.Module):
    """A recurrent classifier or tagger as the tutorials write it for batches of padded sequences: an embedding, an
    LSTM run on ``pack_padded_sequence`` (or on the padded batch), and a linear layer reading the final state
    ``h_n[-1]`` (``read="state"``) or each step of the output padded back (``read="steps"``)."""

    def __init__(self, read: str, batch_first: bool = True) -> None:
        super().__init__()
        self.read, self.batch_first = read, batch_first
        self.emb, self.rnn = nn.Embedding(20, 8), nn.LSTM(8, 12, batch_first=batch_first)
        self.fc = nn.Linear(12, 3)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        x = self.emb(tokens if self.batch_first else tokens.t())
        if lengths is not None:
            x = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=self.batch_first, enforce_sorted=False)
        out, (h, _) = self.rnn(x)
        if self.read == "state":
            return self.fc(h[-1])
        if lengths is not None:
            out = nn.utils.rnn.pad_packed_sequence(out, batch_first=self.batch_first)[0]
        return self.fc(out if self.batch_first else out.transpose(0, 1))


@pytest.mark.parametrize("blocks", [None, ["rnn"]])
@pytest.mark.parametrize("read,batch_first", [("state", True), ("steps", True), ("steps", False)])
def test_packed_sequences_get_the_feedback_of_the_same_batch_unpacked(
    read: str, batch_first: bool, blocks: list[str] | None
) -> None:
    """A recurrent block fed or returning a ``PackedSequence``: its data's rows are points, each fed the error of
    its sequence (one row per sequence) or of its sequence and step (the output padded back). With every sequence
    at full length, every gradient equals that of the same batch run unpacked (before: with the packed input no
    point, the embedding learned through the LSTM by backprop; with ``blocks=["rnn"]``, the first step was refused
    with advice about a graph pooling)."""
    tokens, lengths = torch.randint(0, 20, (5, 7)), torch.full((5,), 7)
    y = torch.randint(0, 3, (5,) if read == "state" else (5, 7))
    grads = []
    for packed in (False, True):
        torch.manual_seed(0)
        net = _PackedLSTM(read, batch_first)
        engine = FeedbackEngine(seed=0, blocks=blocks)
        engine.attach(net)
        for _ in range(2):
            net.zero_grad(set_to_none=True)
            logits = net(tokens, lengths if packed else None)
            loss = F.cross_entropy(logits.reshape(-1, 3), y.reshape(-1))
            loss.backward()
            engine.end_backward(loss)
        grads.append({n: p.grad for n, p in net.named_parameters()})
        engine.detach()
    assert grads[0]["emb.weight"] is not None
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_packed_sequences_of_ragged_lengths_feed_each_row_its_own_sequence_and_step() -> None:
    """Ragged lengths: the embedding's gradient at each token (a point at the LSTM's packed input) is the feedback of
    that token's sequence and step; padded steps, which the LSTM never reads, get none."""
    torch.manual_seed(0)
    net = _PackedLSTM("steps")
    tokens, lengths = torch.arange(15).reshape(3, 5), torch.tensor([5, 2, 4])
    engine = FeedbackEngine(seed=0, blocks=["rnn"])
    engine.attach(net)
    y = torch.randint(0, 3, (3, 5))
    for _ in range(2):
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(tokens, lengths).reshape(-1, 3), y.reshape(-1)).backward()
        engine.end_backward()
    rows = net.emb.weight.grad[:15].norm(dim=1).reshape(3, 5)  # token i*5+t is sequence i's step t
    running = torch.arange(5) < lengths.unsqueeze(1)
    assert bool((rows[running] > 0).all()) and bool((rows[~running] == 0).all())


def test_the_shallow_baseline_trains_nothing_through_a_recurrent_block_s_final_state() -> None:
    """``blocks=["rnn"]`` and a head reading the LSTM's final state ``h_n[-1]``, not its output sequence: in the
    shallow baseline only the head learns (before: the LSTM learned by backprop through its state, while the
    summary said it was not trained)."""
    torch.manual_seed(0)
    net = _PackedLSTM("state")
    engine = FeedbackEngine(mode="shallow", blocks=["rnn"])
    engine.attach(net)
    tokens, y = torch.randint(0, 20, (4, 6)), torch.randint(0, 3, (4,))
    for _ in range(2):
        net.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(tokens, None), y)
        loss.backward()
        engine.end_backward(loss)
    assert {n for n, p in net.named_parameters() if p.grad is not None} == {"fc.weight", "fc.bias"}


class _BottleneckAutoencoder(nn.Module):
    """An MLP autoencoder as the tutorials write it: an encoder and a decoder ``Sequential`` ending in activations,
    the code layer between them, and the reconstruction layer after the decoder."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())
        self.code = nn.Linear(16, 4)
        self.decoder = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 32), nn.ReLU())
        self.out = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.decoder(self.code(self.encoder(x))))


@pytest.mark.parametrize("mode", ["dfa", "shallow"])
def test_a_decoder_after_the_code_layer_learns_by_feedback(mode: str) -> None:
    """The decoder's groups after the code layer are blocks and the reconstruction layer is the output: the
    decoder learns by feedback, and in the shallow baseline only the output learns (before: the decoder, half the
    parameters, learned by its true gradient, with a warning)."""
    torch.manual_seed(0)
    net, x = _BottleneckAutoencoder(), torch.randn(8, 16)
    if mode == "dfa":
        engine = check_true_dfa(net, lambda n: F.mse_loss(n(x), x))
        assert [b.name for b in engine.target.blocks] == ["encoder.1", "encoder.3", "decoder.1", "decoder.3"]
        assert [n for n, _ in engine.output_modules()] == ["out"]
        return
    engine = FeedbackEngine(mode="shallow")
    engine.attach(net)
    for _ in range(2):
        net.zero_grad(set_to_none=True)
        loss = F.mse_loss(net(x), x)
        loss.backward()
        engine.end_backward(loss)
    assert {n for n, p in net.named_parameters() if p.grad is not None} == {"out.weight", "out.bias"}


class _OnlineAndTarget(nn.Module):
    """BYOL's networks: the online encoder, projector and predictor, three Sequentials each ending in a Linear, and
    copies of the encoder and projector as the target network (``frozen``: ``requires_grad=False``; else left on,
    outside the optimizer), run without gradients."""

    def __init__(self, frozen: bool) -> None:
        super().__init__()
        mlp = lambda i, o: nn.Sequential(nn.Linear(i, 24), nn.ReLU(), nn.Linear(24, o))  # noqa: E731
        self.online_encoder, self.online_projector, self.predictor = mlp(8, 16), mlp(16, 6), mlp(6, 6)
        self.target_encoder = copy.deepcopy(self.online_encoder)
        self.target_projector = copy.deepcopy(self.online_projector)
        for p in [*self.target_encoder.parameters(), *self.target_projector.parameters()]:
            p.requires_grad_(not frozen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.online_projector(self.online_encoder(x)))

    def target(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.target_projector(self.target_encoder(x))


@pytest.mark.parametrize("frozen", [True, False])
def test_sequentials_that_read_the_last_ones_output_continue_the_chain(frozen: bool) -> None:
    """An encoder, a projector and a predictor, each a Sequential reading the last one's output: every hidden
    group and the last layers of the encoder and projector are blocks, the predictor's last layer the output (before:
    the predictor's hidden layers learned by their true gradient). The target copies end the chain."""
    torch.manual_seed(0)
    net, x = _OnlineAndTarget(frozen), torch.randn(8, 8)

    def loss(n: nn.Module) -> torch.Tensor:
        return 2 - 2 * F.cosine_similarity(n(x + 0.1), n.target(x - 0.1), dim=-1).mean()

    engine = check_true_dfa(net, loss)
    names = [b.name for b in engine.target.blocks]
    assert names == ["online_encoder.1", "online_encoder.2", "online_projector.1", "online_projector.2", "predictor.1"]
    assert [n for n, _ in engine.output_modules()] == ["predictor.2"]
