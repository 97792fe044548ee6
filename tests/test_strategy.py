"""``Trainer(strategy="dfa")`` end to end: the acceptance lines of the core issue."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from conftest import Classifier, GradRecorder, Said, hooks_of, loader, mlp, trainer
from torch import nn

from lightning_dfa import DFA, DFAStrategy, FeedbackEngine


class ActivationRecorder(pl.Callback):
    """Records, at each backward, the bias gradients and the activations that produced them."""

    def __init__(self, names: list[str], head: str) -> None:
        self.names, self.head = names, head
        self.acts: dict[str, torch.Tensor] = {}
        self.rows: list[dict[str, torch.Tensor]] = []
        self._hooked = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name in [*self.names, self.head]:
            module = pl_module.get_submodule(name)
            module.register_forward_pre_hook(lambda m, a, n=name: self.acts.__setitem__(n + ":in", a[0].detach()))
            module.register_forward_hook(lambda m, a, o, n=name: self.acts.__setitem__(n, o.detach()))

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        row = {k: v.clone() for k, v in self.acts.items()}
        for n, p in pl_module.named_parameters():
            row["grad:" + n] = p.grad.detach().clone()
        self.rows.append(row)


def _recover_signal(strategy: Any) -> tuple[dict[str, float], list[dict[str, torch.Tensor]], pl.LightningModule]:
    """Train an MLP (Linear+Tanh x3, Linear head) with batch size 1 and fit, per hidden block, the linear map
    from the error e to the signal delta at the post-activation output, recovered from the bias gradients:
    db = delta * (1 - h^2). Returns the relative residual of the least-squares fit per block."""
    torch.manual_seed(0)
    model = Classifier(mlp(width=12, depth=3), lr=0.5)
    names = ["net.0", "net.2", "net.4"]
    rec = ActivationRecorder(names, "net.6")
    trainer(strategy=strategy, callbacks=[rec], max_steps=60).fit(model, loader(n=60, batch_size=1))
    residuals = {}
    for i, name in enumerate(names):
        errs, deltas = [], []
        for row in rec.rows:
            e = row["grad:net.6.bias"]  # head bias gradient = e (batch of one)
            h = torch.tanh(row[name])  # the Linear's output a -> post-activation h
            deltas.append(row[f"grad:net.{2 * i}.bias"] / (1 - h[0] ** 2))
            errs.append(e)
        E, D = torch.stack(errs).double(), torch.stack(deltas).double()
        M = torch.linalg.lstsq(E, D).solution
        residuals[name] = ((E @ M - D).norm() / D.norm()).item()
    return residuals, rec.rows, model


def test_mlp_signal_is_fixed_projection_of_error_and_head_is_exact() -> None:
    residuals, rows, model = _recover_signal("dfa")
    assert max(residuals.values()) < 1e-4, residuals
    for row in rows[:5]:  # the head's weight gradient is exactly e^T h
        e = row["grad:net.6.bias"]
        h = row["net.6:in"]
        torch.testing.assert_close(row["grad:net.6.weight"], e[:, None] * h[0][None, :])


def test_same_check_fails_for_backprop() -> None:
    residuals, _, _ = _recover_signal("auto")
    assert min(residuals.values()) > 1e-2, residuals


def test_mode_bp_matches_plain_trainer_and_shallow_changes_only_the_head() -> None:
    def fit(strategy: Any) -> Classifier:
        torch.manual_seed(0)
        model = Classifier(mlp(), lr=0.2)
        trainer(strategy=strategy, max_epochs=2).fit(model, loader())
        return model

    torch.manual_seed(0)
    init = Classifier(mlp())
    plain, bp = fit("auto"), fit(DFAStrategy(mode="bp"))
    for a, b in zip(plain.parameters(), bp.parameters()):
        assert torch.equal(a, b)
    shallow, dfa = fit(DFAStrategy(mode="shallow")), fit("dfa")
    params = list(zip(init.parameters(), shallow.parameters(), dfa.parameters(), plain.parameters()))
    for i, (p0, ps, pd, pb) in enumerate(params):
        if i < 6:  # blocks: untouched by shallow, trained by DFA differently from BP
            assert torch.equal(p0, ps)
            assert not torch.equal(p0, pd) and not torch.allclose(pd, pb)
        else:  # the head trains in every arm
            assert not torch.equal(p0, ps)


def test_validation_and_deepcopy_mid_training_and_no_hooks_after_fit() -> None:
    class CopyMidway(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            if trainer.global_step == 3:
                self.twin = copy.deepcopy(pl_module)

    torch.manual_seed(0)
    model = Classifier(mlp())
    cb = CopyMidway()
    t = trainer(strategy="dfa", callbacks=[cb], max_epochs=2, limit_val_batches=2)
    t.fit(model, loader(), loader(n=32))
    assert "val_loss" in t.callback_metrics
    assert hooks_of(model) == 0
    # the copy is a plain model: its backward is ordinary backprop
    twin = cb.twin
    x, y = next(iter(loader(n=8)))
    plain = Classifier(mlp())
    plain.load_state_dict(twin.state_dict())
    for m in (twin, plain):
        nn.functional.cross_entropy(m(x), y).backward()
    for a, b in zip(twin.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    # validation outputs of a DFA-attached model equal the plain model's
    x, _ = next(iter(loader(n=8)))
    assert torch.equal(model(x), Classifier(model.net).eval()(x))


def test_callback_form_equals_strategy() -> None:
    def fit(**kw: Any) -> Classifier:
        torch.manual_seed(0)
        model = Classifier(mlp(), lr=0.2)
        trainer(max_epochs=1, **kw).fit(model, loader())
        return model

    a, b = fit(strategy="dfa"), fit(callbacks=[DFA()])
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_resume_with_other_global_seed_equals_uninterrupted(tmp_path: Any) -> None:
    def run(epochs: int, ckpt: str | None = None, seed: int = 0, strategy: Any = "dfa") -> pl.LightningModule:
        torch.manual_seed(seed)
        model = Classifier(mlp(), lr=0.1, optimizer="adam")
        t = trainer(strategy=strategy, max_epochs=epochs, enable_checkpointing=True, default_root_dir=tmp_path)
        t.fit(model, loader(), ckpt_path=ckpt)
        if ckpt is None:
            t.save_checkpoint(tmp_path / f"e{epochs}.ckpt")
        return model

    full = run(3)
    run(1)
    resumed = run(3, ckpt=str(tmp_path / "e1.ckpt"), seed=1234)
    for a, b in zip(full.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the checkpoint carries the feedback: a run resumed with another feedback seed still matches
    resumed_other_seed = run(3, ckpt=str(tmp_path / "e1.ckpt"), seed=7, strategy=DFAStrategy(seed=99))
    for a, b in zip(full.parameters(), resumed_other_seed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert "dfa" in torch.load(tmp_path / "e1.ckpt", weights_only=False)


def test_checkpoint_with_other_feedback_shapes_is_refused(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = Classifier(mlp())
    t = trainer(strategy="dfa", max_epochs=1)
    t.fit(model, loader())
    t.save_checkpoint(tmp_path / "a.ckpt")
    with pytest.raises(RuntimeError, match="checkpoint"):
        trainer(strategy=DFAStrategy(error_at="head_input"), max_epochs=2).fit(
            Classifier(mlp()), loader(), ckpt_path=str(tmp_path / "a.ckpt")
        )


def test_no_blocks_is_a_clear_error() -> None:
    class Functional(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(6, 8))
            self.w2 = nn.Parameter(torch.randn(8, 3))

        def training_step(self, batch: Any, i: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(torch.tanh(x @ self.w1) @ self.w2, y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(ValueError, match=r"found no blocks.*bare parameters.*\['w1', 'w2'\].*strategy='auto'"):
        trainer(strategy="dfa").fit(Functional(), loader())

    class Listed(Functional):  # the weights in an nn.ParameterList, as research code often keeps them
        def __init__(self) -> None:
            super().__init__()
            del self.w1, self.w2
            self.ws = nn.ParameterList([nn.Parameter(torch.randn(6, 8)), nn.Parameter(torch.randn(8, 3))])

        def training_step(self, batch: Any, i: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(torch.tanh(x @ self.ws[0]) @ self.ws[1], y)

    with pytest.raises(ValueError, match=r"bare parameters \(\['ws.0', 'ws.1'\]\).*strategy='auto'"):
        trainer(strategy="dfa").fit(Listed(), loader())


def test_loss_that_does_not_depend_on_the_output_is_a_clear_error() -> None:
    class HiddenLoss(Classifier):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, _ = batch
            return self.net[:6](x).pow(2).mean()  # the head (the output) is never used

    with pytest.raises(RuntimeError, match="does not depend on the output module"):
        trainer(strategy="dfa").fit(HiddenLoss(mlp()), loader())


def test_configure_dfa_and_explicit_blocks() -> None:
    class Configured(Classifier):
        def configure_dfa(self) -> dict[str, Any]:
            return {"blocks": ["net.1", "net.3"], "output": "net.6", "seed": 4}

    def first_grads(model: Classifier, strategy: Any) -> dict[str, torch.Tensor | None]:
        rec = GradRecorder()
        t = trainer(strategy=strategy, callbacks=[rec], max_steps=1)
        t.fit(model, loader())
        return rec.grads[0]

    torch.manual_seed(0)
    strategy = DFAStrategy()
    dfa = first_grads(Configured(mlp()), strategy)
    engine = strategy.dfa_engine
    assert [b.name for b in engine.target.blocks] == ["net.1", "net.3"] and engine.config.seed == 4
    assert engine.target.source == "configure_dfa"
    torch.manual_seed(0)
    bp = first_grads(Classifier(mlp()), "auto")
    # net.4 (Linear) lies between the last block and the head: it gets its true gradient, as the head does
    for name in ("net.4.weight", "net.6.weight"):
        torch.testing.assert_close(dfa[name], bp[name])
    assert not torch.allclose(dfa["net.2.weight"], bp["net.2.weight"])
    # explicit options win over configure_dfa()
    explicit = DFAStrategy(blocks=["net.1"], seed=2)
    first_grads(Configured(mlp()), explicit)
    assert [b.name for b in explicit.dfa_engine.target.blocks] == ["net.1"] and explicit.dfa_engine.config.seed == 2
    with pytest.raises(ValueError, match="output module 'net.6' is also a block"):
        trainer(strategy=DFAStrategy(blocks="net.*", output="net.6")).fit(Classifier(mlp()), loader())
    with pytest.raises(TypeError, match="unknown options"):

        class Typo(Classifier):
            def configure_dfa(self) -> dict[str, Any]:
                return {"block": ["net.1"]}

        trainer(strategy="dfa").fit(Typo(mlp()), loader())


def test_single_device_strategy_refuses_several_devices() -> None:
    with pytest.raises(ValueError, match="dfa_ddp"):
        pl.Trainer(strategy="dfa", accelerator="cpu", devices=2)


def test_summary_table_is_shown(said: Said) -> None:
    trainer(strategy="dfa", max_steps=2).fit(Classifier(mlp()), loader())
    out = said.text()
    for text in ("Feedback point", "net.1", "net.5", "[16, 16]", "Output (error read here", "net.6", "seed 0"):
        assert text in out
    assert "Trainable params by feedback: 656 | by true gradient: 51 | not trained: 0" in out
    assert "guessed from the module order" not in out  # nothing outside the blocks could be an output


def test_strategy_takes_its_device_from_the_trainer() -> None:
    strategy = DFAStrategy()
    strategy.parallel_devices = [torch.device("cuda", 1)]  # what the Trainer sets for accelerator="gpu", devices=[1]
    assert strategy.root_device == torch.device("cuda", 1)
    t = pl.Trainer(strategy="dfa", accelerator="cpu", devices=1, logger=False)
    assert t.strategy.root_device == torch.device("cpu") and isinstance(t.strategy, DFAStrategy)
    assert DFAStrategy(device="cuda:0").root_device == torch.device("cuda", 0)


def test_layers_without_bias() -> None:
    net = nn.Sequential(nn.Linear(6, 8, bias=False), nn.ReLU(), nn.Linear(8, 8, bias=False), nn.ReLU(), nn.Linear(8, 3))
    rec = GradRecorder()
    trainer(strategy="dfa", callbacks=[rec], max_steps=2).fit(Classifier(net), loader())
    assert all(g is not None and g.abs().sum() > 0 for g in rec.grads[0].values())


def test_frozen_output_module_still_delivers_feedback() -> None:
    def first_grads(freeze_head: bool) -> dict[str, torch.Tensor | None]:
        torch.manual_seed(0)
        model = Classifier(mlp())
        model.net[6].requires_grad_(not freeze_head)  # a fixed random readout
        rec = GradRecorder()
        trainer(strategy="dfa", callbacks=[rec], max_steps=1).fit(model, loader())
        return rec.grads[0]

    frozen, trained = first_grads(True), first_grads(False)
    assert frozen["net.6.weight"] is None
    for name in ("net.0.weight", "net.2.weight", "net.4.bias"):  # the same error reaches the blocks
        torch.testing.assert_close(frozen[name], trained[name])


def test_blocks_by_class_and_glob_give_the_discovered_blocks() -> None:
    names = {}
    for spec in (nn.Tanh, "net.*[135]", ["net.1", "net.3", "net.5"], None):
        strategy = DFAStrategy(blocks=spec, verbose=False)
        trainer(strategy=strategy, max_steps=1).fit(Classifier(mlp()), loader())
        target = strategy.dfa_engine.target
        names[str(spec)] = (tuple(b.name for b in target.blocks), target.output_name)
    assert set(names.values()) == {(("net.1", "net.3", "net.5"), "net.6")}, names


def test_lightning_package_classes_are_exported() -> None:
    L = pytest.importorskip("lightning.pytorch")
    from lightning_dfa.lightning import AlignmentMonitor, DFAStrategy

    class LModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    strategy = DFAStrategy(seed=3, verbose=False)
    monitor = AlignmentMonitor(every_n_steps=1, plot=False)
    L.Trainer(
        strategy=strategy,
        callbacks=[monitor],
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    ).fit(LModule(), loader())
    assert strategy.dfa_engine.config.seed == 3 and monitor.latest is not None


def test_summary_at_fit_start_has_shapes_from_example_input(said: Said) -> None:
    said_before_training: list[str] = []

    class WithExample(Classifier):
        def on_train_start(self) -> None:
            said_before_training.append(said.text())

    model = WithExample(mlp())
    model.example_input_array = torch.randn(5, 6)
    trainer(strategy="dfa", max_steps=1).fit(model, loader())
    before = said_before_training[0]
    assert "Feedback point" in before and "[5, 16]" in before  # shown at fit start, before the first step
    assert "at the first step" not in said.text()


class _Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x))


class _Bypassing(nn.Module):
    """Calls each layer's ``forward`` directly (as SqueezeBERT's encoder does, which the registry spans)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Layer(), _Layer()])
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer.forward(x)
        return self.head(x)


def test_blocks_bypassed_by_a_direct_forward_call_are_named_with_what_to_pass() -> None:
    """Code that calls ``layer.forward(...)`` skips PyTorch's module hooks: the error says so and names modules
    inside the blocks to pass as ``blocks=``; with them, the model trains."""
    import re

    torch.manual_seed(0)
    net, x = _Bypassing(), torch.randn(4, 8)
    engine = FeedbackEngine()
    engine.attach(net)
    net(x).sum().backward()
    with pytest.raises(RuntimeError, match=r"no block was called.*block\.forward\(\.\.\.\) directly") as err:
        engine.end_backward()
    engine.detach()
    suggested = re.search(r"blocks=\['([^']+)'\]", str(err.value)).group(1)
    assert suggested == "layers.*.fc"
    engine = FeedbackEngine(blocks=[suggested], output="head")
    engine.attach(net)
    net.zero_grad(set_to_none=True)
    net(x).sum().backward()
    assert engine.end_backward().deliveries == 1
    assert net.layers[0].fc.weight.grad is not None
    engine.detach()


def test_a_single_layer_model_trains_as_with_backprop_and_says_why() -> None:
    """Lightning's ``BoringModel`` (one Linear layer) has no hidden layer to send feedback to: the flag trains it
    with its true gradient, exactly as backprop does, and a warning says so (before: "found no blocks")."""
    from pytorch_lightning.demos.boring_classes import BoringModel

    def fit(strategy: Any) -> torch.Tensor:
        torch.manual_seed(0)
        model = BoringModel()
        trainer(strategy=strategy, max_steps=5).fit(model)
        return model.layer.weight.detach().clone()

    with pytest.warns(UserWarning, match=r"single trainable layer \(layer\).*exactly as with backprop"):
        dfa = fit("dfa")
    torch.testing.assert_close(dfa, fit("auto"), rtol=0, atol=0)
    torch.manual_seed(0)
    assert not torch.equal(dfa, BoringModel().layer.weight.detach())  # it trained


class _VAE(pl.LightningModule):
    """An encoder and a decoder with the mean and variance layers between them, read by the KL term."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.ModuleList([nn.Linear(6, 16), nn.Linear(16, 16)])
        self.fc_mu, self.fc_var = nn.Linear(16, 4), nn.Linear(16, 4)
        self.dec = nn.ModuleList([nn.Linear(4, 16), nn.Linear(16, 16)])
        self.out = nn.Linear(16, 6)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = h = batch[0]
        for layer in self.enc:
            h = torch.tanh(layer(h))
        mu, log_var = self.fc_mu(h), self.fc_var(h)
        z = mu + torch.randn_like(mu) * torch.exp(log_var / 2)
        for layer in self.dec:
            z = torch.tanh(layer(z))
        kl = -0.5 * (1 + log_var - mu**2 - log_var.exp()).sum(1).mean()
        return nn.functional.mse_loss(self.out(z), x) + 0.1 * kl

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class _LateMeanAndVariance(_VAE):
    """The mean and variance layers registered after the decoder's last layer (as Lightning-Bolts' VAE does)."""

    def __init__(self) -> None:
        super().__init__()
        for name in ("fc_mu", "fc_var"):
            self._modules[name] = self._modules.pop(name)


def test_the_first_step_names_the_output_the_loss_reads_where_registration_order_misleads(said: Said) -> None:
    """Discovery guesses the last layer registered (the variance layer) for the output; the forward and the loss
    show the reconstruction's layer, whose error is fed back, and the first step says so."""
    model = _LateMeanAndVariance()
    assert list(model._modules)[-2:] == ["fc_mu", "fc_var"]
    trainer(strategy=DFAStrategy(blocks=["enc.*", "dec.*"]), max_steps=1).fit(model, loader())
    assert "Output (error read here, true gradient): fc_var (Linear) (guessed from the module order" in said.text()
    line = next(s for s in said.lines if s.startswith("DFA error read at the first step"))
    assert line.endswith(": out (Linear)")


def test_the_first_step_line_lists_the_points_of_every_output_s_delivery(said: Said) -> None:
    """The decoder's points take the reconstruction's error and the encoder's also the mean and variance layers':
    the line lists both (it listed the last delivery's points, the encoder's, as if the decoder had none)."""
    strategy = DFAStrategy(blocks=["enc.*", "dec.*"], output=["out", "fc_mu", "fc_var"])
    trainer(strategy=strategy, max_steps=1).fit(_VAE(), loader())
    line = next(s for s in said.lines if s.startswith("DFA feedback points at the first step"))
    assert "enc.1" in line and "dec.1" in line
