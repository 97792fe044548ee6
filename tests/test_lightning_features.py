"""Lightning features under DFA on one device: precision, loop features, both flavours, model features, and the
strategies DFA refuses. Every comparison is against an independent reference (the plain engine, a hand-computed
update, or the same run without the feature), never against the code under test alone."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import lightning_dfa
from lightning_dfa import DFA, DFAStrategy, FeedbackEngine

ROOT = Path(__file__).resolve().parents[1]
QUIET = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "accelerator": "cpu",
    "devices": 1,
}


def batches(n: int, size: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n * size, 6, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()  # learnable 3-class labels
    return x, y


def loader(n: int, size: int = 8, seed: int = 1) -> DataLoader:
    return DataLoader(TensorDataset(*batches(n, size, seed)), batch_size=size, shuffle=False)


def mlp(dropout: float = 0.0) -> nn.Sequential:
    torch.manual_seed(0)

    def extra() -> list[nn.Module]:
        return [nn.Dropout(dropout)] if dropout else []

    return nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), *extra(), nn.Linear(16, 16), nn.Tanh(), *extra(), nn.Linear(16, 3)
    )


class Net(pl.LightningModule):
    """A Linear+Tanh MLP. Records the loss of every step and the gradients seen before each optimizer step."""

    def __init__(self, automatic: bool = True, lr: float = 0.5, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = mlp(dropout)
        self.automatic_optimization = automatic
        self.lr = lr
        self.losses: list[float] = []
        self.grads: list[dict[str, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x).float(), y)
        self.losses.append(loss.item())
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            self.on_before_optimizer_step(opt)
            opt.step()
        return loss

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self.grads.append({n: p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None})

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def fit(model: pl.LightningModule, data: DataLoader, strategy: Any = None, **kwargs: Any) -> pl.Trainer:
    trainer = pl.Trainer(strategy=strategy or DFAStrategy(verbose=False), **{**QUIET, **kwargs})
    trainer.fit(model, data)
    return trainer


def assert_weights_equal(a: nn.Module, b: nn.Module, atol: float = 1e-6) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def engine_reference(steps: int, data: DataLoader, lr: float = 0.5) -> Net:
    """The same training with the plain engine and a hand-written loop (no Lightning)."""
    model = Net(lr=lr)
    engine = FeedbackEngine(seed=0)
    engine.attach(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _, (x, y) in zip(range(steps), data):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        engine.end_backward()
        opt.step()
    engine.detach()
    return model


# ------------------------------------------------------------------------------------------------ precision
@pytest.mark.parametrize("precision", ["32-true", "64-true", "bf16-mixed", "bf16-true"])
def test_precision_trains(precision: str) -> None:
    model = Net(lr=0.5)
    fit(model, loader(6, size=16), precision=precision, max_epochs=3)
    expected = {"64-true": torch.float64, "bf16-true": torch.bfloat16}.get(precision, torch.float32)
    assert model.net[0].weight.dtype == expected
    first, last = sum(model.losses[:4]) / 4, sum(model.losses[-4:]) / 4
    assert all(math.isfinite(v) for v in model.losses)
    assert last < 0.8 * first, (precision, first, last)
    assert all(g["net.0.weight"].abs().sum() > 0 for g in model.grads)  # the first block got feedback


def test_bf16_mixed_gradients_match_fp32() -> None:
    grads = {}
    for precision in ("32-true", "bf16-mixed"):
        model = Net()
        fit(model, loader(1), precision=precision, max_steps=1)
        grads[precision] = model.grads[0]
    assert grads["32-true"].keys() == grads["bf16-mixed"].keys()
    for name, g32 in grads["32-true"].items():
        g16 = grads["bf16-mixed"][name]
        assert g16.dtype == torch.float32  # accumulated into the fp32 parameters' .grad
        rel = (g16 - g32).norm() / g32.norm()
        assert rel < 0.03, (name, rel.item())  # bf16 has 8 bits of mantissa: relative error ~ 2^-8 per op
        assert not torch.equal(g16, g32)  # the forward really ran in bf16


class ScaledGrads(pl.Callback):
    """The gradients right after the backward, before the AMP scaler unscales them, and the scale then."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}
        self.scale: float = 1.0

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.grads = {n: p.grad.detach().float().cpu() for n, p in pl_module.named_parameters()}
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.scale = scaler.get_scale() if scaler is not None else 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize(("precision", "tolerance"), [("16-mixed", 0.01), ("bf16-mixed", 0.03)])
def test_mixed_precision_on_gpu_matches_fp32_and_the_loss_scale_flows(precision: str, tolerance: float) -> None:
    reference = Net()
    fit(reference, loader(1), max_steps=1, accelerator="gpu")
    model, scaled = Net(), ScaledGrads()
    fit(model, loader(1), precision=precision, max_steps=1, accelerator="gpu", callbacks=[scaled])
    if precision == "16-mixed":
        assert scaled.scale > 1.0
    for name, g32 in reference.grads[0].items():
        g32 = g32.float().cpu()
        unscaled = model.grads[0][name].float().cpu()  # after the scaler's unscale_
        assert (unscaled - g32).norm() / g32.norm() < tolerance, name
        # before unscaling, every gradient (feedback-trained ones included) carries the loss scale
        assert (scaled.grads[name] / scaled.scale - g32).norm() / g32.norm() < tolerance, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="16-mixed needs a GPU")
def test_16_mixed_overflow_step_is_skipped_by_the_scaler() -> None:
    from pytorch_lightning.plugins.precision import MixedPrecision

    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**120)  # the scaled error overflows fp16
    plugin = MixedPrecision("16-mixed", "cuda", scaler=scaler)
    fit(model, loader(1), plugins=[plugin], max_steps=1, accelerator="gpu")
    assert scaler.get_scale() < 2.0**120
    after = model.cpu().state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------------------------------------ loop features
def test_accumulation_of_two_micro_batches_equals_one_large_batch() -> None:
    large, small = Net(), Net()
    fit(large, loader(1, size=16), max_steps=1)
    fit(small, loader(2, size=8), max_steps=1, accumulate_grad_batches=2)
    assert len(small.losses) == 2
    assert not torch.equal(large.net[0].weight, Net().net[0].weight)  # it trained
    assert_weights_equal(large, small)


@pytest.mark.parametrize(("algorithm", "value"), [("norm", 0.05), ("value", 0.002)])
def test_gradient_clipping_changes_the_update_as_in_backprop(algorithm: str, value: float) -> None:
    plain = Net()
    fit(plain, loader(1), max_steps=1)
    clipped = Net()
    fit(clipped, loader(1), max_steps=1, gradient_clip_val=value, gradient_clip_algorithm=algorithm)
    # expected: the unclipped DFA gradient, clipped by torch's own function, then one SGD step
    expected = Net()
    params = list(expected.parameters())
    for p, (name, _) in zip(params, expected.named_parameters()):
        p.grad = plain.grads[0][name].clone()
    if algorithm == "norm":
        total = torch.nn.utils.clip_grad_norm_(params, value)
        assert total > value  # clipping is active
    else:
        torch.nn.utils.clip_grad_value_(params, value)
    with torch.no_grad():
        for p in params:
            p -= 0.5 * p.grad
    assert_weights_equal(clipped, expected)
    assert not torch.allclose(clipped.net[0].weight, plain.net[0].weight)


def test_manual_optimization_equals_automatic_and_the_plain_engine() -> None:
    auto, manual = Net(), Net(automatic=False)
    fit(auto, loader(3), max_steps=3)
    fit(manual, loader(3), max_steps=3)
    assert_weights_equal(auto, manual)
    assert_weights_equal(auto, engine_reference(3, loader(3)))


class TwoOptimizers(Net):
    """Manual optimization with one optimizer for the blocks (SGD) and one for the head (Adam)."""

    def __init__(self) -> None:
        super().__init__(automatic=False)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        body, head = self.optimizers()
        body.zero_grad()
        head.zero_grad()
        loss = nn.functional.cross_entropy(self(x), y)
        self.manual_backward(loss)
        body.step()
        head.step()
        return loss

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        head = list(self.net[-1].parameters())
        body = [p for p in self.parameters() if all(p is not q for q in head)]
        return [torch.optim.SGD(body, lr=0.5), torch.optim.Adam(head, lr=0.05)]


def test_several_optimizers_match_the_plain_engine() -> None:
    model = TwoOptimizers()
    trainer = fit(model, loader(3), max_epochs=1)
    assert trainer.global_step == 6  # Lightning counts the steps of both optimizers
    reference = TwoOptimizers()
    engine = FeedbackEngine(seed=0)
    engine.attach(reference)
    body, head = reference.configure_optimizers()
    for x, y in loader(3):
        body.zero_grad()
        head.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        engine.end_backward()
        body.step()
        head.step()
    assert_weights_equal(model, reference)


class TwoForwards(Net):
    """One backward through the sum of two forwards' losses; counts the feedback deliveries."""

    def __init__(self) -> None:
        super().__init__()
        self.deliveries = 0

    def on_fit_start(self) -> None:
        self.trainer.strategy.dfa_engine.feedback_observers.append(self._count)

    def _count(self, *args: Any) -> None:
        self.deliveries += 1

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x[:4]), y[:4]) + 2 * nn.functional.cross_entropy(self(x[4:]), y[4:])


class WithCritic(Net):
    """Manual optimization: the model's loss, then a critic trained on the detached logits by a second
    ``manual_backward`` (it predicts the per-item loss), each with its own optimizer."""

    def __init__(self) -> None:
        super().__init__(automatic=False)
        self.critic = nn.Linear(3, 1)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        model, critic = self.optimizers()
        logits = self(x)
        model.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(logits, y))
        self.on_before_optimizer_step(model)
        model.step()
        target = nn.functional.cross_entropy(logits.detach(), y, reduction="none")
        critic.zero_grad()
        self.manual_backward(nn.functional.mse_loss(self.critic(logits.detach()).squeeze(-1), target))
        critic.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.SGD(self.net.parameters(), lr=self.lr), torch.optim.SGD(self.critic.parameters(), lr=0.1)]


def test_a_critics_own_backward_after_the_models_is_not_refused() -> None:
    """A second ``manual_backward`` whose loss reaches no block, output or point (a critic on detached logits) is a
    backward of its own: DFA lets it through, the critic learns by its true gradient, and the model's steps equal the
    plain engine's."""
    model = WithCritic()
    critic = nn.Linear(3, 1)
    critic.load_state_dict(model.critic.state_dict())
    # the critic, registered after the head and as wide as its output, runs on from the model's layers: discovery
    # takes it for the output, and net.4 for a block; output= names the head, and the blocks before it remain
    fit(model, loader(3), strategy=DFAStrategy(output="net.4", verbose=False), max_steps=6)  # two steps per batch
    assert_weights_equal(model.net, engine_reference(3, loader(3)).net)
    assert not torch.equal(model.critic.weight, critic.weight)
    # a bypassed block is still refused: a loss that reaches the blocks' parameters but called no block
    engine = FeedbackEngine()
    net = mlp()
    engine.attach(net)
    loss = nn.functional.linear(torch.randn(2, 6), net[0].weight).sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="no block was called"):
        engine.end_backward(loss)


class Saliency(Net):
    """Validation and predict steps that take the loss's gradient with respect to the input under
    ``torch.enable_grad()`` (a saliency map), each beside the same gradient of a plain copy of the model."""

    def __init__(self) -> None:
        super().__init__()
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _saliency(self, net: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        with torch.enable_grad():
            x = x.clone().requires_grad_(True)
            return torch.autograd.grad(nn.functional.cross_entropy(net(x), y), x)[0]

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.pairs.append((self._saliency(self, batch), self._saliency(copy.deepcopy(self.net), batch)))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.validation_step(batch, batch_idx)
        return self.pairs[-1][0]


@pytest.mark.parametrize("form", ["strategy", "callback"])
def test_gradients_taken_in_validation_and_predict_are_the_true_derivatives(form: str) -> None:
    """In the sanity check, in validation between training steps and in predict, a gradient taken under
    ``torch.enable_grad()`` is the plain model's: DFA's hooks do nothing outside the training steps. Training is
    the same as without those validation steps."""
    model = Saliency()
    kw: dict[str, Any] = {"callbacks": [DFA(verbose=False)], "strategy": "auto"} if form == "callback" else {}
    trainer = pl.Trainer(**{**QUIET, "inference_mode": False, "max_steps": 4, "val_check_interval": 2,
                            "limit_val_batches": 1, "num_sanity_val_steps": 1, "strategy": DFAStrategy(verbose=False),
                            **kw})  # fmt: skip
    trainer.fit(model, loader(4), loader(1))
    trainer.predict(model, loader(1))
    assert len(model.pairs) == 4  # sanity check, two validations, predict
    for dfa, plain in model.pairs:
        torch.testing.assert_close(dfa, plain, rtol=0, atol=0)
    assert_weights_equal(model.net, engine_reference(4, loader(4)).net)


def test_several_forwards_before_one_backward_each_get_their_feedback() -> None:
    model = TwoForwards()
    fit(model, loader(1), max_steps=1)
    assert model.deliveries == 2
    # reference: each forward's DFA gradient on its own (plain engine), summed
    reference = Net()
    engine = FeedbackEngine(seed=0)
    engine.attach(reference)
    x, y = batches(1)
    total: dict[str, torch.Tensor] = {}
    for part, weight in ((slice(0, 4), 1.0), (slice(4, 8), 2.0)):
        reference.zero_grad()
        (weight * nn.functional.cross_entropy(reference(x[part]), y[part])).backward()
        engine.end_backward()
        for n, p in reference.named_parameters():
            total[n] = total.get(n, 0) + p.grad
    for n, g in total.items():
        torch.testing.assert_close(model.grads[0][n], g, atol=1e-6, rtol=1e-5)


class Validated(Net):
    def __init__(self) -> None:
        super().__init__()
        self.val_outputs: list[torch.Tensor] = []

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.val_outputs.append(self(batch[0]).detach().clone())


def test_max_steps_val_check_interval_and_validation_is_plain() -> None:
    model = Validated()
    trainer = pl.Trainer(
        strategy=DFAStrategy(verbose=False),
        max_steps=4,
        val_check_interval=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        **QUIET,
    )
    trainer.fit(model, loader(6), loader(1, seed=7))
    assert trainer.global_step == 4
    assert len(model.val_outputs) == 2  # after steps 2 and 4
    with torch.no_grad():  # hooks detached after fit: the plain model on the final weights
        assert torch.equal(model.val_outputs[-1], model(batches(1, seed=7)[0]))
    epochs = Net()
    trainer = fit(epochs, loader(3), max_epochs=2)
    assert trainer.global_step == 6 and trainer.current_epoch == 2


def test_callback_form_equals_strategy_form_on_one_device() -> None:
    a, b = Net(), Net()
    fit(a, loader(3), max_steps=3)
    fit(b, loader(3), strategy="auto", callbacks=[DFA(verbose=False)], max_steps=3)
    assert_weights_equal(a, b)
    bp = Net()
    fit(bp, loader(3), strategy="auto", max_steps=3)
    assert not torch.allclose(bp.net[0].weight, a.net[0].weight)  # DFA is not backprop


# ------------------------------------------------------------------------------------------------ flavours
def test_both_flavours_accept_dfa_and_train_identically() -> None:
    L = pytest.importorskip("lightning.pytorch")
    from lightning_dfa.adapters import lightning as adapter

    class LNet(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.5)

    lmodel = LNet()
    trainer = L.Trainer(strategy="dfa", max_steps=3, **QUIET)
    assert isinstance(trainer.strategy, adapter.DFAStrategy)
    trainer.fit(lmodel, loader(3))
    plmodel = Net()
    trainer = pl.Trainer(strategy="dfa", max_steps=3, **QUIET)
    assert isinstance(trainer.strategy, lightning_dfa.DFAStrategy)
    trainer.fit(plmodel, loader(3))
    assert_weights_equal(lmodel.net, plmodel.net)
    # the callback form in the lightning flavour
    cmodel = LNet()
    L.Trainer(max_steps=3, callbacks=[adapter.DFA(verbose=False)], **QUIET).fit(cmodel, loader(3))
    assert_weights_equal(cmodel.net, plmodel.net)
    assert isinstance(L.Trainer(strategy="dfa_ddp", devices=2, accelerator="cpu").strategy, adapter.DFADDPStrategy)
    with pytest.raises(ValueError, match="lightning.pytorch.strategies.Strategy"):  # the other flavour's class
        L.Trainer(strategy=lightning_dfa.DFAStrategy(), **QUIET)


BLOCK_LIGHTNING = """
import importlib.machinery, sys
class Blocker:  # the package `lightning` is not installed (find_spec returns None, import fails)
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "lightning" or name.startswith("lightning."):
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)
sys.meta_path = [Blocker if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
"""


def test_nothing_breaks_without_the_lightning_package(tmp_path: Path) -> None:
    script = BLOCK_LIGHTNING + textwrap.dedent(
        """
        import importlib.util
        assert importlib.util.find_spec("lightning") is None
        try:
            import lightning
        except ModuleNotFoundError:
            pass
        else:
            raise SystemExit("lightning was not blocked")
        import torch, pytorch_lightning as pl
        import lightning_dfa
        assert "lightning" not in sys.modules and "lightning_dfa.adapters.lightning" not in sys.modules
        net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        class M(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.net = net
            def training_step(self, batch, i):
                return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])
            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)
        data = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,))), batch_size=4)
        trainer = pl.Trainer(strategy="dfa", max_steps=2, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
        assert isinstance(trainer.strategy, lightning_dfa.DFAStrategy)
        trainer.fit(M(), data)
        assert trainer.global_step == 2
        print("OK")
        """
    )
    path = tmp_path / "no_lightning.py"
    path.write_text(script)
    done = subprocess.run(
        [sys.executable, str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("OK")


# ------------------------------------------------------------------------------------------------ model features
def tiny_gpt2(tie: bool = True, checkpointing: dict | None = None, **kwargs: Any) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=32,
        n_positions=16,
        n_embd=16,
        n_layer=2,
        n_head=2,
        tie_word_embeddings=tie,
        attn_pdrop=0.0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        **kwargs,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.GPT2LMHeadModel(config)
        if checkpointing is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing or None)
    return model.train()


TOKENS = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))


def gpt2_grads(model: nn.Module, placement: str = "macro", steps: int = 2, **options: Any) -> dict[str, torch.Tensor]:
    """Gradients accumulated over ``steps`` backward passes with the plain engine (no ``end_backward`` between
    them, so a point recorded by a checkpoint's recomputation would leak into the next step)."""
    engine = FeedbackEngine(seed=0, placement=placement, **options)
    engine.attach(model)
    for _ in range(steps):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(input_ids=TOKENS, labels=TOKENS).loss.backward()
    assert engine.report.deliveries == steps
    assert not engine._pending
    engine.detach()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("placement", ["macro", "micro"])
def test_hf_gradient_checkpointing_default_gives_the_same_dfa_gradients(placement: str) -> None:
    # transformers >= 5 enables non-reentrant checkpointing by default (use_reentrant=False)
    expected = gpt2_grads(tiny_gpt2(), placement)
    got = gpt2_grads(tiny_gpt2(checkpointing={}), placement)
    assert expected.keys() == got.keys()
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_hf_reentrant_checkpointing_is_refused() -> None:
    model = tiny_gpt2(checkpointing={"use_reentrant": True})
    with pytest.raises(RuntimeError, match="reentrant gradient checkpointing.*use_reentrant': False"):
        FeedbackEngine().attach(model)


def test_torchscript_blocks_or_output_are_refused_by_name_and_frozen_scripted_parts_are_not() -> None:
    torch.manual_seed(0)

    def chain() -> nn.Sequential:
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())

    class Net(nn.Module):
        def __init__(self, body: nn.Module, head: nn.Module) -> None:
            super().__init__()
            self.body, self.head = body, head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x))

    scripted = Net(torch.jit.script(chain()), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"DFA: body is TorchScript .*Train the eager nn.Module"):
        FeedbackEngine().attach(scripted)  # discovery found nothing: the message says why
    with pytest.raises(ValueError, match=r"body.0, body.2 are TorchScript"):
        FeedbackEngine(blocks=["body.0", "body.2"], output="head").attach(scripted)
    with pytest.raises(ValueError, match=r"Sequential \(the model\) is TorchScript"):
        FeedbackEngine().attach(torch.jit.script(nn.Sequential(chain(), nn.Linear(8, 3))))
    with pytest.raises(ValueError, match=r"head is TorchScript"):
        FeedbackEngine(blocks=["body.0", "body.2"], output="head").attach(
            Net(chain(), torch.jit.script(nn.Linear(8, 3)))
        )
    # plain backprop (the control arm) needs no hooks
    FeedbackEngine(mode="bp").attach(scripted)
    # a frozen scripted feature extractor (torch.jit.load's) before eager layers is no obstacle
    features = torch.jit.script(nn.Linear(4, 4)).eval()
    for p in features.parameters():
        p.requires_grad_(False)
    net = Net(features, nn.Sequential(chain(), nn.Linear(8, 3)))
    engine = FeedbackEngine()
    engine.attach(net)
    nn.functional.cross_entropy(net(torch.randn(5, 4)), torch.tensor([0, 1, 2, 0, 1])).backward()
    assert engine.end_backward().deliveries == 1


class HFModule(pl.LightningModule):
    def __init__(self, checkpointing: dict | None) -> None:
        super().__init__()
        self.model = tiny_gpt2(checkpointing=checkpointing)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_hf_gradient_checkpointing_under_the_strategy() -> None:
    data = DataLoader(TensorDataset(TOKENS.repeat(2, 1)), batch_size=2)
    plain, checkpointed = HFModule(None), HFModule({})
    for model in (plain, checkpointed):
        fit(model, data, strategy=DFAStrategy(placement="micro", verbose=False), max_steps=2)
    assert_weights_equal(plain, checkpointed, atol=1e-6)
    with pytest.raises(RuntimeError, match="reentrant"):
        fit(HFModule({"use_reentrant": True}), data, max_steps=1)


class LateCheckpointing(HFModule):
    def on_train_start(self) -> None:  # after the strategy's set-up attached DFA
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})


def test_hf_reentrant_checkpointing_switched_on_after_setup_is_refused_before_the_first_step() -> None:
    model = LateCheckpointing(None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = DataLoader(TensorDataset(TOKENS.repeat(2, 1)), batch_size=2)
    with pytest.raises(RuntimeError, match="reentrant"):
        fit(model, data, max_steps=1)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_tied_embeddings_get_the_head_gradient_and_feedback_only_when_asked() -> None:
    tied = tiny_gpt2(tie=True)
    untied = tiny_gpt2(tie=False)
    untied.load_state_dict(tied.state_dict(), strict=False)
    with torch.no_grad():
        untied.lm_head.weight.copy_(tied.transformer.wte.weight)
    assert tied.lm_head.weight is tied.transformer.wte.weight
    # the default (cut_token_embedding): the shared matrix learns from the head's true gradient alone
    g_tied = gpt2_grads(tied, steps=1)
    g_untied = gpt2_grads(untied, steps=1)
    assert "transformer.wte.weight" not in g_untied  # untied, it keeps its initial values
    torch.testing.assert_close(g_tied["transformer.wte.weight"], g_untied["lm_head.weight"], atol=1e-6, rtol=1e-5)
    # cut_token_embedding=False: it receives both, the feedback of the point "h.0:in" and the head's true gradient
    tied.zero_grad()
    untied.zero_grad()
    g_tied = gpt2_grads(tied, steps=1, cut_token_embedding=False)
    g_untied = gpt2_grads(untied, steps=1, cut_token_embedding=False)
    both = g_untied["transformer.wte.weight"] + g_untied["lm_head.weight"]
    torch.testing.assert_close(g_tied["transformer.wte.weight"], both, atol=1e-6, rtol=1e-5)
    assert g_untied["transformer.wte.weight"].abs().sum() > 0 and g_untied["lm_head.weight"].abs().sum() > 0


class CompiledNet(Net):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.compile(self.net, backend="aot_eager")


def test_torch_compiled_modules_train_as_eager() -> None:
    pytest.importorskip("torch._dynamo")
    torch._dynamo.reset()
    eager, compiled = Net(), CompiledNet()
    fit(eager, loader(2), max_steps=2)
    trainer = fit(compiled, loader(2), max_steps=2)  # a compiled submodule
    assert trainer.global_step == 2
    assert_weights_equal(eager.net, compiled.net._orig_mod)
    whole = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(torch.compile(whole, backend="aot_eager"), loader(2), max_steps=2)  # the whole LightningModule
    assert_weights_equal(eager, whole)


def test_a_compiled_model_trains_as_eager_after_and_before_a_backprop_run_of_it() -> None:
    """``torch.compile``'s graphs do not guard on module hooks: a graph compiled by an earlier backprop run of the
    same model (a comparison's first arm) would run a later DFA fit without DFA's hooks, and one compiled under
    DFA would go on running them after it. Each arm equals its run in a fresh process."""
    pytest.importorskip("torch._dynamo")
    torch._dynamo.reset()
    eager_dfa, eager_bp = Net(), Net()
    fit(eager_dfa, loader(2), max_steps=2)
    fit(eager_bp, loader(2), strategy="auto", max_steps=2)
    for strategies in (("auto", None), (None, "auto")):
        models = []
        for strategy in strategies:
            model = CompiledNet()
            fit(model, loader(2), strategy=strategy, max_steps=2)
            models.append(model)
        for model, strategy in zip(models, strategies):
            assert_weights_equal((eager_bp if strategy == "auto" else eager_dfa).net, model.net._orig_mod)


@pytest.mark.parametrize("how", ["wrapper", "method", "whole"])
def test_a_model_compiled_with_fullgraph_is_refused_with_what_to_do(how: str) -> None:
    """The hooks run between compiled graphs, a graph break at each point: ``fullgraph=True`` would fail inside
    dynamo with a message about code the user did not write."""
    pytest.importorskip("torch._dynamo")
    torch._dynamo.reset()
    model = Net()
    if how == "whole":
        model = torch.compile(model, backend="aot_eager", fullgraph=True)
    elif how == "wrapper":
        model.net = torch.compile(model.net, backend="aot_eager", fullgraph=True)
    else:
        model.net.compile(backend="aot_eager", fullgraph=True)
    with pytest.raises(ValueError, match=r"(\(the model\)|net) was compiled with .*fullgraph=True.*Compile without"):
        fit(model, loader(2), max_steps=1)


def test_a_whole_compiled_classifier_runs_the_hooks_between_its_graphs_and_trains_as_eager() -> None:
    """``torch.compile`` of a whole Hugging Face decoder classifier: the engine's hooks run eagerly between the
    compiled graphs (traced, their bookkeeping would recompile at each step's new tensors until dynamo gives up), and
    the read token, picked inside a compiled graph whose backward shows no pick, is found from the first error."""
    pytest.importorskip("torch._dynamo")
    transformers = pytest.importorskip("transformers")
    traced: list[int] = []

    def backend(graph: Any, inputs: Any) -> Any:
        traced.append(sum("lightning_dfa" in (n.meta.get("stack_trace") or "") for n in graph.graph.nodes))
        return torch._dynamo.lookup_backend("aot_eager")(graph, inputs)

    tokens, labels = TOKENS.clamp(min=1), torch.tensor([0, 2])
    tokens[1, 5:] = 0  # padding: the classifier reads each item's last token that is not

    def train(compiled: bool) -> tuple[nn.Module, set[str]]:
        torch._dynamo.reset()
        config = tiny_gpt2(num_labels=3, pad_token_id=0).config
        torch.manual_seed(0)
        model = transformers.GPT2ForSequenceClassification(config).train()
        run = torch.compile(model, backend=backend) if compiled else model
        engine = FeedbackEngine(seed=0)
        engine.attach(run)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(10):
                loss = run(input_ids=tokens, labels=labels).loss
                loss.backward()
                engine.end_backward(loss)
                opt.step()
                opt.zero_grad()
        read = set(engine._read_outputs)
        engine.detach()
        return model, read

    eager, read = train(False)
    compiled, read_compiled = train(True)
    assert traced and not any(traced)  # no graph holds the engine's code
    assert read == {"score"} and read_compiled == {"_orig_mod.score"}
    assert_weights_equal(eager, compiled)


class ResidualTanh(nn.Module):
    """A residual block ``x + tanh(fc(x))`` of width 16."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(x))


class _BlockList(nn.Module):
    def __init__(self, compiled: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.blocks, self.head = (
            nn.Linear(6, 16),
            nn.ModuleList([ResidualTanh() for _ in range(3)]),
            nn.Linear(16, 3),
        )
        if compiled:  # the usual pattern: each block compiled in place
            for i in (0, 1):
                self.blocks[i] = torch.compile(self.blocks[i], backend="aot_eager")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def test_blocks_compiled_one_by_one_are_the_blocks_of_the_eager_list() -> None:
    pytest.importorskip("torch._dynamo")
    x, y = batches(1, 8, 1)
    grads = []
    for compiled in (False, True):
        net = _BlockList(compiled)
        engine = FeedbackEngine(seed=0)
        assert [b.name for b in engine.attach(net).blocks] == ["blocks.0", "blocks.1", "blocks.2"]
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        engine.end_backward(loss)
        grads.append({n.replace("_orig_mod.", ""): p.grad for n, p in net.named_parameters()})
        engine.detach()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


class LazyNet(Net):
    def __init__(self, example: bool) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LazyLinear(16), nn.Tanh(), nn.LazyLinear(16), nn.Tanh(), nn.LazyLinear(3))
        if example:
            self.example_input_array = torch.zeros(2, 6)


def test_lazy_modules_take_their_shapes_from_the_example_input_or_are_refused_with_what_to_do() -> None:
    model = LazyNet(example=True)
    trainer = fit(model, loader(2), max_steps=2)
    assert trainer.global_step == 2 and [b.name for b in trainer.strategy.dfa_engine.target.blocks] == [
        "net.1",
        "net.3",
    ]
    with pytest.raises(ValueError, match="lazy modules.*example_input_array"):
        fit(LazyNet(example=False), loader(2), max_steps=2)


class WithBackbone(Net):
    """``Net`` with the ``backbone`` attribute Lightning's ``BackboneFinetuning`` freezes and later unfreezes."""

    def __init__(self) -> None:
        super().__init__(lr=0.2)
        self.backbone = self.net[:-1]  # the same modules: every layer before the head

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def test_backbone_finetuning_trains_the_head_alone_then_the_backbone_by_feedback(said: Any) -> None:
    from pytorch_lightning.callbacks import BackboneFinetuning

    def run(strategy: Any, epochs: int) -> WithBackbone:
        model = WithBackbone()
        tune = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=1.0, verbose=False)
        fit(model, loader(4), strategy=strategy, max_epochs=epochs, callbacks=[tune])
        return model

    start = WithBackbone().state_dict()
    dfa, bp = run(DFAStrategy(), 1), run("auto", 1)
    # the first epoch trains the head alone, by its own gradient: the same update as backprop, nothing refused
    assert_weights_equal(dfa, bp)
    for name in ("net.0.weight", "net.2.weight"):
        torch.testing.assert_close(dfa.state_dict()[name], start[name], rtol=0, atol=0)
    assert not torch.equal(dfa.state_dict()["net.4.weight"], start["net.4.weight"])
    assert said.text().count("every block is frozen in this step") == 1

    dfa, bp = run(DFAStrategy(verbose=False), 3), run("auto", 3)
    assert not torch.equal(dfa.state_dict()["net.0.weight"], start["net.0.weight"])  # unfrozen: it learns
    # ... by feedback, not by its true gradient
    assert (dfa.state_dict()["net.0.weight"] - bp.state_dict()["net.0.weight"]).abs().max() > 1e-3
    assert dfa.grads[-1].keys() == bp.grads[-1].keys()


def _callbacks(name: str, tmp_path: Path) -> tuple[list[Any], dict[str, Any]]:
    """Callbacks and Trainer flags of one common Lightning feature, for the test below."""
    from pytorch_lightning import callbacks as cb

    return {
        "swa": ([cb.StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1)], {"max_epochs": 3}),
        "early_stopping": (
            [cb.EarlyStopping("train_loss", patience=0, check_on_train_epoch_end=True)],
            {"max_epochs": 9},
        ),
        "accumulation_scheduler": ([cb.GradientAccumulationScheduler({0: 1, 1: 2})], {"max_epochs": 2}),
        "pruning": ([cb.ModelPruning("l1_unstructured", amount=0.2, verbose=0)], {"max_epochs": 2}),
        "lr_finder": ([cb.LearningRateFinder(num_training_steps=8)], {"max_epochs": 1, "default_root_dir": tmp_path}),
        "detect_anomaly": ([], {"max_epochs": 1, "detect_anomaly": True}),
        "fast_dev_run": ([], {"fast_dev_run": 2}),
        "overfit_batches": ([], {"max_epochs": 2, "overfit_batches": 2}),
        "profiler": ([], {"max_epochs": 1, "profiler": "simple", "default_root_dir": tmp_path}),
        "timer": ([cb.Timer(duration="00:00:10:00")], {"max_epochs": 1}),
    }[name]


class Logged(Net):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss, on_epoch=True)
        return loss


class CountFeedback(pl.Callback):
    """Counts the backwards in which the strategy's engine delivered feedback (an observer of the engine)."""

    def __init__(self) -> None:
        self.deliveries = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        engine = trainer.strategy.dfa_engine
        if self.count not in engine.feedback_observers:
            engine.feedback_observers.append(self.count)

    def count(self, error: torch.Tensor, points: Any, feedback: Any) -> None:
        self.deliveries += 1


FEATURES = ["swa", "early_stopping", "accumulation_scheduler", "pruning", "lr_finder", "detect_anomaly",
            "fast_dev_run", "overfit_batches", "profiler", "timer"]  # fmt: skip


@pytest.mark.parametrize("feature", FEATURES)
def test_common_callbacks_and_trainer_flags_train_by_feedback(feature: str, tmp_path: Path) -> None:
    """Each feature runs under ``strategy="dfa"``, feedback reaches the blocks at every optimizer step, and the
    hidden layer ends where backprop's does not (it learned by feedback)."""
    callbacks, flags = _callbacks(feature, tmp_path)
    counter = CountFeedback()
    dfa = Logged(lr=0.2)
    start = dfa.net[0].weight.detach().clone()
    fit(dfa, loader(4), callbacks=[*callbacks, counter], **flags)
    assert counter.deliveries >= 2 and len(dfa.grads) >= 1
    assert not torch.equal(dfa.net[0].weight, start)
    callbacks, flags = _callbacks(feature, tmp_path / "bp")
    bp = Logged(lr=0.2)
    fit(bp, loader(4), strategy="auto", callbacks=callbacks, **flags)
    # the hidden layer's first update differs from backprop's (feedback); the head's is its true gradient in both
    torch.testing.assert_close(dfa.grads[0]["net.4.weight"], bp.grads[0]["net.4.weight"])
    assert not torch.allclose(dfa.grads[0]["net.0.weight"], bp.grads[0]["net.0.weight"], atol=1e-6)


def test_frozen_parameters_stay_and_the_rest_trains_as_without_freezing() -> None:
    free, frozen = Net(), Net()
    frozen.net[0].requires_grad_(False)
    before = frozen.net[0].weight.clone()
    fit(free, loader(1), max_steps=1)
    fit(frozen, loader(1), max_steps=1)
    assert torch.equal(frozen.net[0].weight, before)
    for name, g in frozen.grads[0].items():
        torch.testing.assert_close(g, free.grads[0][name])  # DFA: block 0's gradient feeds nobody else
    assert "net.2.weight" in frozen.grads[0] and "net.0.weight" not in frozen.grads[0]
    # every block frozen: the head alone trains, by its own gradient, as with backprop
    allfrozen, reference = Net(), Net()
    for model in (allfrozen, reference):
        for layer in (model.net[0], model.net[2]):
            layer.requires_grad_(False)
    fit(allfrozen, loader(2), max_steps=2)
    fit(reference, loader(2), strategy="auto", max_steps=2)
    assert_weights_equal(allfrozen, reference)

    class Scaled(Net):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(6))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x * self.scale)

    # ... but a trainable parameter before them would learn through the frozen blocks: refused
    fed = Scaled()
    for layer in (fed.net[0], fed.net[2]):
        layer.requires_grad_(False)
    with pytest.raises(RuntimeError, match="every block is frozen.*trainable parameters before them"):
        fit(fed, loader(1), max_steps=1)


def test_dropout_feedback_goes_through_the_forward_mask() -> None:
    model = Net(dropout=0.5)
    engine = FeedbackEngine(seed=0)
    target = engine.attach(model)
    assert [b.name for b in target.blocks] == ["net.2", "net.5"]  # the dropout ends each block
    seen: dict[str, torch.Tensor] = {}
    engine.feedback_observers.append(lambda e, points, out: seen.update(feedback=out[0]))
    model.net[0].register_forward_hook(lambda m, a, o: seen.update(x=a[0], pre=o))
    model.net[2].register_forward_hook(lambda m, a, o: seen.update(mask=(o != 0).float(), tanh=a[0]))
    x, y = batches(1)
    torch.manual_seed(3)
    nn.functional.cross_entropy(model(x), y).backward()
    engine.end_backward()
    assert 0 < seen["mask"].mean() < 1
    # by hand: delta = (B e) * mask / (1 - p) * tanh'(a); grad W = delta^T x
    delta = seen["feedback"] * seen["mask"] * 2.0 * (1 - seen["tanh"] ** 2)
    torch.testing.assert_close(model.net[0].weight.grad, delta.t() @ seen["x"], atol=1e-6, rtol=1e-5)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # evaluation: no dropout, deterministic


# ------------------------------------------------------------------------------------------------ strategies
class _Stub:
    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy


def test_callback_refuses_unsupported_strategies_at_setup() -> None:
    from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy

    class DeepSpeedStrategy(DDPStrategy):  # stands in for Lightning's (a DDPStrategy subclass; needs deepspeed)
        pass

    callback = DFA(verbose=False)
    with pytest.raises(RuntimeError, match="DeepSpeedStrategy is not supported \\(DeepSpeed runs its own"):
        callback.setup(_Stub(DeepSpeedStrategy()), Net(), "fit")
    callback.setup(_Stub(FSDPStrategy()), Net(), "fit")  # sharded strategies compose (tests/test_fsdp.py)
    callback.setup(_Stub(SingleDeviceStrategy("cpu")), Net(), "fit")
    callback.setup(_Stub(DDPStrategy()), Net(), "fit")
    with pytest.raises(RuntimeError, match="both given"):
        callback.setup(_Stub(DFAStrategy()), Net(), "fit")


def test_callback_with_unsupported_strategy_fails_before_training() -> None:
    from pytorch_lightning.strategies import SingleDeviceStrategy

    class XLAStrategy(SingleDeviceStrategy):  # a name DFA refuses, runnable on CPU
        pass

    model = Net()
    before = model.net[0].weight.clone()
    with pytest.raises(RuntimeError, match="XLAStrategy is not supported"):
        fit(model, loader(1), strategy=XLAStrategy("cpu"), callbacks=[DFA(verbose=False)], max_steps=1)
    assert model.losses == [] and torch.equal(model.net[0].weight, before)


def test_dfa_strategy_refuses_several_devices_and_nodes() -> None:
    with pytest.raises(ValueError, match="dfa_ddp"):
        pl.Trainer(strategy="dfa", accelerator="cpu", devices=2)
    with pytest.raises(ValueError, match="num_nodes=2"):
        pl.Trainer(strategy="dfa", accelerator="cpu", devices=1, num_nodes=2)


def test_one_strategy_instance_serves_two_trainers() -> None:
    """As Lightning's own single-device strategy (given no accelerator flag, which the instance then carries): the
    second Trainer trains as a fresh one does."""
    strategy = DFAStrategy(verbose=False)
    first, second = Net(), Net()
    flags = {k: v for k, v in QUIET.items() if k not in ("accelerator", "devices")}
    for model in (first, second):
        pl.Trainer(strategy=strategy, max_steps=3, **flags).fit(model, loader(3))
    assert_weights_equal(first, second)
    assert_weights_equal(second, engine_reference(3, loader(3)))


def test_adapters_take_every_option_and_the_two_flavours_stay_identical() -> None:
    import dataclasses
    import inspect

    from lightning_dfa.adapters import pytorch_lightning as pl_adapter

    options = {f.name for f in dataclasses.fields(lightning_dfa.DFAConfig)}
    modules = [pl_adapter]
    try:
        from lightning_dfa.adapters import lightning as l_adapter

        modules.append(l_adapter)
    except ImportError:  # pragma: no cover - the lightning package is optional
        pass
    for module in modules:
        for cls in (
            module.DFAStrategy,
            module.DFADDPStrategy,
            module.DFAFSDPStrategy,
            module.DFAModelParallelStrategy,
            module.DFA,
        ):
            missing = options - set(inspect.signature(cls.__init__).parameters)
            assert not missing, f"{module.__name__}.{cls.__name__} lacks the options {sorted(missing)}"
    # the two adapter modules differ only in their imports and the flavour named in docstrings
    texts = [
        (ROOT / "lightning_dfa" / "adapters" / name).read_text().replace("lightning.pytorch", "pytorch_lightning")
        for name in ("pytorch_lightning.py", "lightning.py")
    ]
    lines = [[line for line in text.splitlines()[2:] if line.strip()] for text in texts]
    assert lines[0] == lines[1]


def test_compatibility_table_names_existing_tests() -> None:
    """Every test that ``docs/compatibility.md`` cites exists (file, function and parametrization id)."""
    import re

    doc = (ROOT / "docs" / "compatibility.md").read_text()
    rows = [line for line in doc.splitlines() if line.startswith("| ") and "---" not in line]
    supported = [row for row in rows if "| supported" in row]
    assert len(supported) >= 30
    scripts = "".join(path.read_text() for path in (ROOT / "tests" / "scripts").glob("*.py"))
    for row in rows:
        if "Shown by" in row:
            continue
        cited = re.findall(r"`(test_\w+\.py)::(test_\w+)((?:\[[^\]]+\])?)`", row)
        assert cited, f"a row cites no test: {row}"
        for file, name, param in cited:
            source = (ROOT / "tests" / file).read_text()
            assert f"def {name}(" in source, f"{file}::{name} does not exist"
            if param:  # parametrization ids come from the test file or its helper scripts (DDP configurations)
                assert all(part in source + scripts for part in param.strip("[]").split("-")), f"{name}{param}"
        for extra in re.findall(r"`\[([\w.-]+)\]`", row):  # further ids of the same test: `[auto_unused]`
            assert all(part in source + scripts for part in extra.split("-")), extra


@pytest.mark.parametrize("region", ["each block", "two blocks"])
def test_torch_checkpointing_of_plain_blocks_gives_the_same_dfa_gradients(region: str) -> None:
    """``torch.utils.checkpoint`` (non-reentrant) around blocks of a plain model, the first block's input a point
    too: the recomputation cuts where the forward cut, so the gradients equal those without checkpointing (before,
    it recomputed uncut and torch refused: "Recomputed values ... have different metadata"). Reentrant
    checkpointing runs the forward without gradients: refused with what to use instead."""
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self, mode: str | None) -> None:
            super().__init__()
            self.mode = mode
            self.inp, self.out = nn.Linear(6, 16), nn.Linear(16, 3)
            self.blocks = nn.ModuleList([ResidualTanh() for _ in range(4)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.inp(x)
            if self.mode is None:
                for b in self.blocks:
                    h = b(h)
            elif region == "each block":
                for b in self.blocks:
                    h = checkpoint(b, h, use_reentrant=self.mode == "reentrant")
            else:
                pairs = [nn.Sequential(*self.blocks[i : i + 2]) for i in (0, 2)]
                for pair in pairs:
                    h = checkpoint(pair, h, use_reentrant=self.mode == "reentrant")
            return self.out(h)

    x, y = torch.randn(8, 6, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])

    def grads(mode: str | None) -> list[torch.Tensor]:
        torch.manual_seed(0)
        net = Net(mode)
        engine = FeedbackEngine(blocks="blocks.*", output="out")
        engine.attach(net)
        for _ in range(2):  # the first forward, which searches norms and holds points, and a later one
            net.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            engine.end_backward()
        engine.detach()
        return [p.grad.clone() for p in net.parameters()]

    for plain, checkpointed in zip(grads(None), grads("non-reentrant")):
        torch.testing.assert_close(checkpointed, plain)
    with pytest.raises(RuntimeError, match="use_reentrant=True"):
        grads("reentrant")


class ProbeTheBlocks(pl.Callback):
    """After each step, runs the blocks alone with gradients on (a probe of the features, never backpropagated)."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        pl_module.net[:4](torch.randn(8, 6))


@pytest.mark.parametrize("form", ["strategy", "callback"])
def test_a_forward_of_the_blocks_alone_between_steps_changes_nothing(form: str) -> None:
    """Its points are tied to no output: the next step starts afresh instead of feeding them too (into a graph whose
    weights the optimizer has changed since, which stopped the backward), and training equals the plain engine's."""
    model = Net()
    kw: dict[str, Any] = (
        {"callbacks": [ProbeTheBlocks(), DFA(verbose=False)], "strategy": "auto"} if form == "callback" else {}
    )
    fit(model, loader(3), **{"callbacks": [ProbeTheBlocks()], "max_steps": 3, **kw})
    assert_weights_equal(model, engine_reference(3, loader(3)))


class MovingAverageTarget(Net):
    """A BYOL-style target network: a copy of the online network, wider than it, updated by a moving average after
    each step, computed under ``torch.no_grad()``, its parameters left with ``requires_grad=True`` but in no
    optimizer."""

    def __init__(self) -> None:
        super().__init__(lr=0.1)
        self.target = nn.Sequential(nn.Linear(6, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        with torch.no_grad():
            teacher = self.target(x).softmax(-1)
        loss = F.cross_entropy(self(x), y) + F.kl_div(self(x).log_softmax(-1), teacher, reduction="batchmean")
        self.losses.append(float(loss))
        return loss

    def on_train_batch_end(self, *args: Any) -> None:
        for p in self.target.parameters():
            p.data.mul_(0.99)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.net.parameters(), lr=self.lr)


@pytest.mark.parametrize("form", ["strategy", "callback"])
def test_parameters_no_optimizer_holds_count_as_not_trained(form: str) -> None:
    """A target network that no optimizer holds is not trained: the summary counts it so, and no warning says that
    most parameters learn by backprop (before: its parameters, which require grad, counted as trained by their
    true gradient, and the warning said so)."""
    model = MovingAverageTarget()
    adapter = DFAStrategy(verbose=True) if form == "strategy" else DFA(verbose=True)
    kwargs: dict[str, Any] = {"strategy": adapter} if form == "strategy" else {"callbacks": [adapter]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pl.Trainer(**{**QUIET, "max_steps": 3, **kwargs}).fit(model, loader(4))
    assert not [w for w in caught if "trained by backprop" in str(w.message)]
    target = sum(p.numel() for p in model.target.parameters())
    engine = adapter.dfa.engine
    assert engine.parameter_roles()["none"] == target
    assert all(engine.role_of(p) == "none" for p in model.target.parameters())
