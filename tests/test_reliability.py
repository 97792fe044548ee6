"""Nothing silent: clean teardown on every exit path, strict options, checkpointed feedback that survives any
resume, clear errors, and the faults a long run meets (a ``kill -9``, a crashing rank, 2000 steps).

``docs/reliability.md`` lists every case with the test that shows it.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import os
import signal
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import Classifier, hooks_of, loader, mlp, trainer
from torch import nn

import lightning_dfa
from lightning_dfa import DFA, DFAConfig, DFAStrategy, FeedbackEngine
from lightning_dfa.discovery import Block, Target
from lightning_dfa.engine import check_state

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "scripts"
FORMS = ["strategy", "callback"]
FLAVOURS = ["pytorch_lightning", "lightning"]


# ---------------------------------------------------------------------------------------------- helpers
def flavour(name: str) -> tuple[Any, Any]:
    """``(Lightning package, lightning_dfa adapter module)`` of a Lightning flavour."""
    if name == "lightning":
        package = pytest.importorskip("lightning.pytorch")
        from lightning_dfa.adapters import lightning as adapter

        return package, adapter
    from lightning_dfa.adapters import pytorch_lightning as adapter

    return pl, adapter


def dfa_args(form: str, adapter: Any = None, **options: Any) -> dict[str, Any]:
    """Trainer arguments that train with DFA in ``form`` ("strategy" or "callback")."""
    adapter = adapter or lightning_dfa
    if form == "callback":
        return {"strategy": "auto", "callbacks": [adapter.DFA(verbose=False, **options)]}
    return {"strategy": adapter.DFAStrategy(verbose=False, **options), "callbacks": []}


def failing_module(package: Any, error: type[BaseException]) -> Any:
    """A LightningModule of ``package`` whose ``training_step`` raises ``error`` at step 3 (after 3 DFA steps)."""

    class Failing(package.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = mlp()
            self.fail_at: int | None = 3

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if self.global_step == self.fail_at:
                raise error("step 3 fails")
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Failing()


def assert_equal_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@contextlib.contextmanager
def no_dfa_warning() -> Iterator[None]:
    """Fails if lightning-dfa warned inside the block (Lightning's own warnings are ignored)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    assert not [str(w.message) for w in caught if str(w.message).startswith("DFA")]


@pytest.fixture
def sigint_restored() -> Any:
    """Lightning ignores SIGINT after a KeyboardInterrupt; give the test process its handler back."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


# ---------------------------------------------------------------------------------------------- teardown
@pytest.mark.parametrize("package_name", FLAVOURS)
@pytest.mark.parametrize("form", FORMS)
def test_exception_mid_fit_leaves_no_hook_and_plain_backprop_follows(form: str, package_name: str) -> None:
    package, adapter = flavour(package_name)
    model = failing_module(package, RuntimeError)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="step 3 fails"):
        trainer(package, max_steps=6, **dfa_args(form, adapter)).fit(model, loader())
    assert hooks_of(model) == 0
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())  # 3 DFA steps ran
    # the same model trained next with plain Lightning is plain backprop, bit for bit
    twin = failing_module(package, RuntimeError)
    twin.load_state_dict(model.state_dict())
    x, y = next(iter(loader(n=8)))
    for m in (model, twin):
        m.fail_at = None
        m.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()  # a manual backward
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)
    for m in (model, twin):
        torch.manual_seed(0)
        trainer(package, max_steps=4, strategy="auto").fit(m, loader())
    assert_equal_weights(model, twin)
    assert hooks_of(model) == 0


@pytest.mark.parametrize("package_name", FLAVOURS)
@pytest.mark.parametrize("form", FORMS)
def test_keyboard_interrupt_mid_fit_leaves_no_hook(form: str, package_name: str, sigint_restored: None) -> None:
    package, adapter = flavour(package_name)
    model = failing_module(package, KeyboardInterrupt)
    with pytest.raises(SystemExit):  # Lightning turns Ctrl+C into a graceful shutdown and exit code 1
        trainer(package, max_steps=6, **dfa_args(form, adapter)).fit(model, loader())
    assert hooks_of(model) == 0


class FailsAtFitStart(pl.Callback):
    """Fails after DFA attached (the strategy in ``setup``, the DFA callback earlier in ``on_fit_start``)."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert hooks_of(pl_module) > 0  # DFA is attached at this point
        raise RuntimeError("set-up fails")


@pytest.mark.parametrize("form", FORMS)
def test_failed_set_up_leaves_no_hook(form: str) -> None:
    model = Classifier(mlp())
    args = dfa_args(form)
    with pytest.raises(RuntimeError, match="set-up fails"):
        trainer(strategy=args["strategy"], callbacks=[*args["callbacks"], FailsAtFitStart()]).fit(model, loader())
    assert hooks_of(model) == 0


def test_engine_context_manager_removes_hooks_on_every_exit() -> None:
    net = mlp()
    engine = FeedbackEngine(seed=0)
    for error in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(error), engine.attached_to(net) as target:
            assert hooks_of(net) > 0 and engine.attached and target.output_name == "6"
            nn.functional.cross_entropy(net(torch.randn(4, 6)), torch.randint(0, 3, (4,))).backward()
            raise error("mid-step")
        assert hooks_of(net) == 0 and not engine.attached
    # after a normal exit the model is plain backprop again
    with engine.attached_to(net):
        pass
    plain = copy.deepcopy(net)
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    for m in (net, plain):
        m.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(net.parameters(), plain.parameters()))


def test_attach_failing_half_way_leaves_no_hook() -> None:
    net = mlp()
    good = Block("1", net[0], net[1], members=(net[0], net[1]))
    broken = Block("3", object(), net[3])  # type: ignore[arg-type]  (its entry cannot take a hook)
    with pytest.raises(AttributeError):
        FeedbackEngine().attach(net, Target([good, broken], "6", net[6], "explicit"))
    assert hooks_of(net) == 0


# ---------------------------------------------------------------------------------------------- options
BAD_OPTIONS = [
    pytest.param({"scale": float("nan")}, "scale must be a finite, non-zero number", id="scale-nan"),
    pytest.param({"scale": float("inf")}, "scale must be a finite, non-zero number", id="scale-inf"),
    pytest.param({"scale": 0}, "scale=0 gives the blocks no feedback", id="scale-0"),
    pytest.param({"scale": "1.0"}, "scale must be a finite, non-zero number", id="scale-str"),
    pytest.param({"distinct": "false"}, "distinct must be True or False, got 'false'", id="distinct-str"),
    pytest.param({"norm_jacobian": "false"}, "norm_jacobian must be True, False or None", id="norm_jacobian-str"),
    pytest.param({"cut_head_input": 1}, "cut_head_input must be True, False or None", id="cut_head_input-int"),
    pytest.param({"sketch": "no"}, "sketch must be True, False or None", id="sketch-str"),
    pytest.param({"distinct": None}, "distinct must be True or False", id="distinct-None"),
    pytest.param({"seed": "abc"}, "seed must be an integer", id="seed-str"),
    pytest.param({"seed": True}, "seed must be an integer", id="seed-bool"),
    pytest.param({"seed": 1.5}, "seed must be an integer", id="seed-float"),
    pytest.param({"topk": "abc"}, "topk must be None or a positive integer", id="topk-str"),
    pytest.param({"blocks": 5}, r"blocks must be None \(discovered\), a module name .* got 5 \(int\)", id="blocks-int"),
    pytest.param({"blocks": 3.14}, r"blocks must be .* got 3.14 \(float\)", id="blocks-float"),
    pytest.param({"blocks": b"net.1"}, r"blocks must be .* got b'net.1' \(bytes\)", id="blocks-bytes"),
    pytest.param({"blocks": ["net.1", 2]}, r"got 2 \(int\) in blocks=\['net.1', 2\]", id="blocks-list-int"),
    pytest.param({"blocks": [int]}, r"a module class .* got <class 'int'>", id="blocks-not-a-module-class"),
    pytest.param({"blocks": []}, r"blocks=\[\] names no block", id="blocks-empty"),
    pytest.param(
        {"output": 3},
        r"output must be None \(discovered\), the qualified name of a module .* got 3 \(int\)",
        id="output-int",
    ),
    pytest.param({"output": ["head", 3]}, "output must be None", id="output-list"),
    pytest.param({"distribution": "normal"}, "unknown distribution", id="distribution-unknown"),
    pytest.param({"mode": "DFA2"}, "unknown mode", id="mode-unknown"),
    pytest.param({"placement": None}, "placement must be 'macro' or 'micro'", id="placement-None"),
    pytest.param({"error_at": "input"}, "error_at must be 'output' or 'head_input'", id="error_at-unknown"),
]


@pytest.mark.parametrize(("options", "message"), BAD_OPTIONS)
def test_bad_options_are_refused_where_constructed_naming_the_option(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DFAConfig(**options)
    for package_name in FLAVOURS:  # the same check in every adapter, at construction
        if package_name == "lightning" and not _has_lightning():
            continue
        _, adapter = flavour(package_name)
        for cls in (adapter.DFAStrategy, adapter.DFADDPStrategy, adapter.DFA):
            with pytest.raises(ValueError, match=message):
                cls(**options)


def _has_lightning() -> bool:
    import importlib.util

    return importlib.util.find_spec("lightning") is not None


def test_bad_option_from_configure_dfa_names_where_it_came_from() -> None:
    class Configured(Classifier):
        def configure_dfa(self) -> dict[str, Any]:
            return {"distinct": "yes"}

    model = Configured(mlp())
    with pytest.raises(ValueError, match=r"distinct must be True or False.* \(from Configured.configure_dfa\(\)\)"):
        trainer(strategy=DFAStrategy(verbose=False)).fit(model, loader())
    assert hooks_of(model) == 0 and model.losses == []


def test_documented_option_types_are_accepted() -> None:
    config = DFAConfig(
        blocks=("net.1", nn.Tanh), output="net.6", seed=np.int64(3), scale=np.float32(0.5), topk=4.0, distinct=True
    )
    assert config.blocks == ["net.1", nn.Tanh] and config.seed == 3 and type(config.seed) is int
    assert config.scale == 0.5 and config.topk == 4
    assert DFAConfig(scale=-1.0).scale == -1.0  # a negative scale flips the feedback: a valid choice
    for name in ("norm_jacobian", "cut_head_input", "sketch"):  # None: chosen from the model's structure
        assert getattr(DFAConfig(**{name: None}), name) is None
    with pytest.raises(ValueError, match="verbose must be True or False"):
        DFAStrategy(verbose="no")


def test_lightning_cli_values_are_accepted_and_checked() -> None:
    pytest.importorskip("jsonargparse")
    sys.path.insert(0, str(SCRIPTS))
    import cli_train

    flags = ["--trainer.strategy.distinct=true", "--trainer.strategy.scale=0.5", "--trainer.strategy.seed=4"]
    cli = cli_train.main(["--trainer.strategy=lightning_dfa.DFAStrategy", *flags], run=False)
    config = cli.trainer.strategy.dfa.config
    assert (config.distinct, config.scale, config.seed) == (True, 0.5, 4)
    with pytest.raises(ValueError, match="scale=0 gives the blocks no feedback"):
        cli_train.main(["--trainer.strategy=lightning_dfa.DFAStrategy", "--trainer.strategy.scale=0"], run=False)


# ---------------------------------------------------------------------------------------------- checkpoints
def fit_epochs(epochs: int, form: str, ckpt: Path | None = None, save: Path | None = None, **options: Any) -> Any:
    """Train the tests' classifier (Adam) with DFA in ``form``, resumed from ``ckpt`` if given; save at the end."""
    torch.manual_seed(0)
    model = Classifier(mlp(), lr=0.05, optimizer="adam")
    t = trainer(max_epochs=epochs, **dfa_args(form, **options))
    t.fit(model, loader(), ckpt_path=str(ckpt) if ckpt else None)
    if save is not None:
        t.save_checkpoint(save)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A one-epoch checkpoint of each form, and the weights each gives when resumed in its own form for one more."""
    out = tmp_path_factory.mktemp("ckpt")
    result: dict[str, Any] = {}
    for form in FORMS:
        fit_epochs(1, form, save=out / f"{form}.ckpt")
        result[form] = out / f"{form}.ckpt"
        result[form + "_resumed"] = fit_epochs(2, form, ckpt=out / f"{form}.ckpt").state_dict()
    return result


@pytest.mark.parametrize("form", FORMS)
def test_both_forms_write_the_feedback_once_in_the_same_place(saved: dict[str, Any], form: str) -> None:
    ckpt = torch.load(saved[form], weights_only=False)
    state = ckpt["dfa"]
    check_state(state)
    assert state["matrices"] and state["seed"] == 0 and state["mode"] == "dfa"
    assert "DFA" not in ckpt.get("callbacks", {})  # no second copy that could disagree
    other = torch.load(saved[{"strategy": "callback", "callback": "strategy"}[form]], weights_only=False)["dfa"]
    assert all(torch.equal(state["matrices"][k], other["matrices"][k]) for k in state["matrices"])


@pytest.mark.parametrize(("written", "resumed"), [("strategy", "callback"), ("callback", "strategy")])
def test_checkpoint_of_one_form_resumes_in_the_other(saved: dict[str, Any], written: str, resumed: str) -> None:
    with no_dfa_warning():  # same options: nothing to say
        model = fit_epochs(2, resumed, ckpt=saved[written])
    reference = saved[written + "_resumed"]
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("form", FORMS)
def test_resume_with_other_blocks_than_the_checkpoints_says_which(saved: dict[str, Any], form: str) -> None:
    """The checkpoint lists the blocks it was trained with; resumed where other blocks are found (a changed model,
    other ``blocks=``, or a library version that finds other blocks), a warning names the difference."""
    assert torch.load(saved[form], weights_only=False)["dfa"]["blocks"] == ["net.1", "net.3", "net.5"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_epochs(2, form, ckpt=saved[form], blocks=["net.1", "net.3"])
    said = [str(w.message) for w in caught if "other blocks than those found now" in str(w.message)]
    assert len(said) == 1 and "only in the checkpoint: net.5; only now: none" in said[0], said


KEPT = [
    ("seed", 99, 0),
    ("distribution", "gaussian", "uniform"),
    ("scale", 2.0, 1.0),
    ("distinct", True, False),
    ("topk", 2, None),
    ("sketch", False, None),  # None: the recipe's choice, kept from the checkpoint
    ("norm_jacobian", True, None),
]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(("option", "given", "saved_value"), KEPT, ids=[k[0] for k in KEPT])
def test_resume_with_another_feedback_option_keeps_the_checkpoint_and_says_so(
    saved: dict[str, Any], form: str, option: str, given: Any, saved_value: Any
) -> None:
    written = {"strategy": "callback", "callback": "strategy"}[form]  # across forms as well
    with pytest.warns(UserWarning, match=rf"{option}={saved_value!r} \(this run gives {given!r}\)") as record:
        model = fit_epochs(2, form, ckpt=saved[written], **{option: given})
    assert sum("checkpoint's feedback options" in str(w.message) for w in record) == 1  # said once
    reference = saved[written + "_resumed"]
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())


REFUSED = [
    ("mode", "shallow"),
    ("mode", "bp"),
    ("error_at", "head_input"),
    ("cut_head_input", True),
    ("placement", "micro"),
]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(("option", "given"), REFUSED, ids=[f"{o}={g}" for o, g in REFUSED])
def test_resume_with_another_structural_option_is_refused_naming_it(
    saved: dict[str, Any], form: str, option: str, given: Any
) -> None:
    torch.manual_seed(0)
    model = Classifier(mlp(), lr=0.05, optimizer="adam")
    t = trainer(max_epochs=2, **dfa_args(form, **{option: given}))
    with pytest.raises(RuntimeError, match=rf"written with {option}=.* this run gives {option}={given!r}"):
        t.fit(model, loader(), ckpt_path=str(saved[form]))
    assert hooks_of(model) == 0 and model.losses == []


def test_auto_options_take_the_saved_choice_silently() -> None:
    net = mlp()
    first = FeedbackEngine(sketch=True, norm_jacobian=False, cut_head_input=False)
    first.attach(net)
    state = first.state_dict()
    first.detach()
    resumed = FeedbackEngine(sketch=None, norm_jacobian=None, cut_head_input=None)
    resumed.load_state_dict(state)
    with no_dfa_warning():
        resumed.attach(net)
    assert (resumed.config.sketch, resumed.config.norm_jacobian, resumed.config.cut_head_input) == (True, False, False)
    resumed.detach()


def test_options_are_compared_after_configure_dfa() -> None:
    """A model's ``configure_dfa()`` choices count as this run's options: no false alarm, no missed change."""

    class Shallow(Classifier):
        def configure_dfa(self) -> dict[str, Any]:
            return {"mode": "shallow", "seed": 5}

    net = Shallow(mlp())
    first = FeedbackEngine()
    first.attach(net)
    state = first.state_dict()
    first.detach()
    assert (state["mode"], state["seed"]) == ("shallow", 5)
    again = FeedbackEngine()
    again.load_state_dict(state)
    with no_dfa_warning():
        again.attach(net)
    again.detach()
    plain = Classifier(mlp())  # no configure_dfa(): this run's mode is "dfa", against the saved "shallow"
    engine = FeedbackEngine()
    engine.load_state_dict(state)
    with pytest.raises(RuntimeError, match="written with mode='shallow', but this run gives mode='dfa'"):
        engine.attach(plain)
    assert hooks_of(plain) == 0


@pytest.mark.parametrize("form", FORMS)
def test_checkpoint_of_an_earlier_callback_version_is_read_by_both_forms(
    saved: dict[str, Any], form: str, tmp_path: Path
) -> None:
    ckpt = torch.load(saved["callback"], weights_only=False)
    ckpt["callbacks"]["DFA"] = ckpt.pop("dfa")  # where earlier versions of the callback kept it
    torch.save(ckpt, tmp_path / "legacy.ckpt")
    model = fit_epochs(2, form, ckpt=tmp_path / "legacy.ckpt", seed=7)  # seed 7: the saved feedback must win
    reference = saved["callback_resumed"]
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("form", FORMS)
def test_resuming_a_checkpoint_written_without_dfa_says_the_feedback_is_new(form: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    t = trainer(max_epochs=1, strategy="auto")
    t.fit(Classifier(mlp(), lr=0.05, optimizer="adam"), loader())
    t.save_checkpoint(tmp_path / "bp.ckpt")
    with pytest.warns(UserWarning, match=r"holds no feedback state .* drawn anew from seed=3"):
        model = fit_epochs(2, form, ckpt=tmp_path / "bp.ckpt", seed=3)
    assert len(model.losses) == len(loader()) and hooks_of(model) == 0


def test_two_different_feedback_states_in_one_checkpoint_are_refused(saved: dict[str, Any], tmp_path: Path) -> None:
    ckpt = torch.load(saved["strategy"], weights_only=False)
    other = copy.deepcopy(ckpt["dfa"])
    other["seed"] = 3
    ckpt["callbacks"]["DFA"] = other
    torch.save(ckpt, tmp_path / "two.ckpt")
    with pytest.raises(RuntimeError, match="two different feedback states"):
        fit_epochs(2, "strategy", ckpt=tmp_path / "two.ckpt")


def _corrupt(state: dict[str, Any], how: str) -> Any:
    state = copy.deepcopy(state)
    k = next(iter(state["matrices"]))
    if how == "nan":
        state["matrices"][k][0, 0] = float("nan")
    elif how == "inf":
        state["matrices"][k][1, 1] = float("inf")
    elif how == "missing_widths":
        del state["widths"]
    elif how == "version":
        state["version"] = 99
    elif how == "shape":
        state["matrices"][k] = state["matrices"][k][:, :1]
    elif how == "signs":
        state["signs"] = {"net.1": torch.full((16,), 0.5)}
    elif how == "scale":
        state["scale"] = float("nan")
    elif how == "not_a_dict":
        return [1, 2, 3]
    elif how == "blocks":
        state["blocks"] = "net.1"
    return state


CORRUPTIONS = {
    "nan": "NaN or infinite values",
    "inf": "NaN or infinite values",
    "missing_widths": r"lacks the keys \['widths'\]",
    "version": "unknown feedback state version 99",
    "shape": r"is \[16, 1\], not a \[rows, 3\] float tensor",
    "signs": "not a vector of \\+-1",
    "scale": "scale must be a finite, non-zero number",
    "not_a_dict": "it is a list, not a dict",
    "blocks": "its blocks entry is not a list of strings",
}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_damaged_feedback_state_is_refused_before_training(
    saved: dict[str, Any], form: str, how: str, tmp_path: Path
) -> None:
    ckpt = torch.load(saved[form], weights_only=False)
    ckpt["dfa"] = _corrupt(ckpt["dfa"], how)
    torch.save(ckpt, tmp_path / "bad.ckpt")
    torch.manual_seed(0)
    model = Classifier(mlp(), lr=0.05, optimizer="adam")
    with pytest.raises(ValueError, match=rf"feedback state is damaged: .*{CORRUPTIONS[how]}"):
        trainer(max_epochs=2, **dfa_args(form)).fit(model, loader(), ckpt_path=str(tmp_path / "bad.ckpt"))
    assert hooks_of(model) == 0 and model.losses == []
    with pytest.raises(ValueError, match="feedback state is damaged"):  # the engine on its own refuses it too
        FeedbackEngine().load_state_dict(_corrupt(torch.load(saved[form], weights_only=False)["dfa"], how))


# ---------------------------------------------------------------------------------------------- clear errors
def test_blocks_naming_the_output_is_refused_at_set_up() -> None:
    model = Classifier(mlp())
    with pytest.raises(ValueError, match=r"blocks=\['net.5', 'net.6'\] includes 'net.6', the module the loss"):
        trainer(strategy=DFAStrategy(blocks=["net.5", "net.6"], verbose=False)).fit(model, loader())
    assert hooks_of(model) == 0 and model.losses == []
    with pytest.raises(ValueError, match="the block 'net' contains the output module 'net.6'"):
        trainer(callbacks=[DFA(blocks="net", verbose=False)]).fit(model, loader())
    assert hooks_of(model) == 0 and model.losses == []


class LossFromABlock(Classifier):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.net[:6](batch[0]).pow(2).mean()  # computed from block net.5's output; the head is never used


@pytest.mark.parametrize("form", FORMS)
def test_loss_computed_from_a_block_names_the_block_before_any_update(form: str) -> None:
    model = LossFromABlock(mlp())
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="computed downstream of block 'net.5'.* output module 'net.6'"):
        trainer(**dfa_args(form)).fit(model, loader())
    assert hooks_of(model) == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class DictHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 3)

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.linear(h)}


class DictClassifier(Classifier):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)["logits"]


def test_output_module_returning_a_dict_is_named_as_called() -> None:
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), DictHead())
    model = DictClassifier(net)
    strategy = DFAStrategy(blocks=["net.1", "net.3"], output="net.4", verbose=False)
    with pytest.raises(RuntimeError, match="output module 'net.4' was called after the blocks, but returned dict"):
        trainer(strategy=strategy).fit(model, loader())
    assert hooks_of(model) == 0


@pytest.fixture
def one_process_group() -> Any:
    """DDP with one CPU process runs in this process: undo its process group and environment afterwards."""
    environ = dict(os.environ)
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(environ)


def test_shallow_under_ddp_names_the_dfa_form_and_that_form_trains(one_process_group: None) -> None:
    for registry in [pl.strategies.StrategyRegistry, *_lightning_registry()]:
        for name, method in (("dfa_ddp", "popen"), ("dfa_ddp_spawn", "spawn"), ("dfa_ddp_fork", "fork")):
            entry = registry[f"{name}_find_unused_parameters_true"]
            assert entry["strategy"].__name__ == "DFADDPStrategy"
            assert entry["init_params"] == {"start_method": method, "find_unused_parameters": True}
    model = Classifier(mlp())
    ddp = lightning_dfa.DFADDPStrategy(mode="shallow", verbose=False)
    with pytest.raises(RuntimeError, match=r"strategy='dfa_ddp_find_unused_parameters_true'"):
        trainer(strategy=ddp, max_steps=2).fit(model, loader())
    assert hooks_of(model) == 0 and model.losses == []
    with pytest.raises(RuntimeError, match=r"strategy='ddp_find_unused_parameters_true', callbacks=\[DFA"):
        trainer(strategy="ddp", callbacks=[DFA(mode="shallow", verbose=False)], max_steps=2).fit(model, loader())
    assert hooks_of(model) == 0 and model.losses == []

    class Shallow(Classifier):
        def configure_dfa(self) -> dict[str, Any]:
            return {"mode": "shallow"}

    torch.manual_seed(0)
    model = Shallow(mlp())
    start = copy.deepcopy(model.state_dict())
    ddp = "dfa_ddp_find_unused_parameters_true"
    trainer(strategy=ddp, max_steps=3, use_distributed_sampler=False).fit(model, loader())
    torch.manual_seed(0)
    alone = Shallow(mlp())
    trainer(strategy=DFAStrategy(verbose=False), max_steps=3).fit(alone, loader())
    for key, value in model.state_dict().items():
        assert torch.equal(value, alone.state_dict()[key]), key
        assert torch.equal(value, start[key]) == (not key.startswith("net.6"))  # only the head trained


def _lightning_registry() -> list[Any]:
    if not _has_lightning():
        return []
    from lightning.pytorch.strategies import StrategyRegistry

    return [StrategyRegistry]


# ---------------------------------------------------------------------------------------------- faults
def _run_script(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "NODE_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [sys.executable, str(SCRIPTS / "fault_train.py"), str(cwd), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """The ``kill -9`` run and the crashing-rank run, side by side."""
    runs = {"kill9": ["kill9", "callback"], "rank_crash": ["rank_crash"]}
    started = {}
    for name, args in runs.items():
        out = tmp_path_factory.mktemp(name)
        started[name] = (out, _run_script(args, out))
    done = {}
    for name, (out, proc) in started.items():
        try:
            stdout, stderr = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:  # a hang is the failure this guards against: report it, leave nothing
            proc.kill()
            stdout, stderr = proc.communicate()
            stderr += "\n(timed out after 300 s)"
        done[name] = (out, subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return done


def test_kill_9_mid_fit_then_resume_equals_the_uninterrupted_run(
    faults: dict[str, tuple[Path, subprocess.CompletedProcess]],
) -> None:
    sys.path.insert(0, str(SCRIPTS))
    import fault_train

    out, run = faults["kill9"]
    assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
    assert {p.name for p in out.glob("*.ckpt")} == {"epoch=0.ckpt", "epoch=1.ckpt", "last.ckpt"}
    full = fault_train.classifier()
    trainer(max_epochs=fault_train.EPOCHS, **dfa_args("callback")).fit(full, loader())
    # resumed in the strategy form from the callback form's checkpoint: one place for the feedback
    resumed = fault_train.classifier()
    t = trainer(max_epochs=fault_train.EPOCHS, **dfa_args("strategy"))
    t.fit(resumed, loader(), ckpt_path=str(out / "last.ckpt"))
    assert t.current_epoch == fault_train.EPOCHS and len(resumed.losses) == len(loader())  # only the lost epoch
    assert_equal_weights(full, resumed)


def test_a_crashing_rank_stops_every_process_without_a_hang_and_leaves_no_hook(
    faults: dict[str, tuple[Path, subprocess.CompletedProcess]],
) -> None:
    out, run = faults["rank_crash"]
    assert "timed out" not in run.stderr and run.returncode != 0, run.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[1]["error"] == "RuntimeError: rank 1 fails on purpose"
    assert ranks[0]["error"].startswith("RuntimeError") and "Connection closed by peer" in ranks[0]["error"]
    assert [r["hooks"] for r in ranks] == [0, 0]


# ---------------------------------------------------------------------------------------------- soak
def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class SoakModel(pl.LightningModule):
    """The tests' MLP; its validation compares every output with the plain network on the same weights."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()
        self.plain = [mlp()]  # in a list: not a submodule, never attached
        self.validation_equal: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        weights = dict(self.net.named_parameters())
        plain = torch.func.functional_call(self.plain[0], weights, (batch[0],))
        self.validation_equal.append(torch.equal(self(batch[0]), plain))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _group_size(engine: Any) -> int:
    """Tensors the engine keeps from the last forward (its points and layout-probe copies)."""
    group = engine._group
    return 0 if group is None else len(group.points) + len(group.copies)


class Gauges(pl.Callback):
    """Every 250 steps: resident memory, live tensors, hooks on the model, and what the engine holds between steps."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step % 250:
            return
        gc.collect()
        engine = trainer.strategy.dfa_engine
        self.rows.append(
            {
                "step": trainer.global_step,
                "rss": _rss_mib(),
                "tensors": sum(isinstance(o, torch.Tensor) for o in gc.get_objects()),
                "hooks": hooks_of(pl_module),
                "held": (len(engine._pending), _group_size(engine), len(engine.bank._cache)),
            }
        )


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads resident memory from /proc")
def test_soak_2000_steps_with_the_alignment_monitor() -> None:
    """2000 DFA steps with the alignment monitor measuring every 100: memory, live tensors, hooks and the engine's
    state stay constant, and validation (every 500 steps) is bit-identical to the plain network."""
    torch.manual_seed(0)
    model, gauges = SoakModel(), Gauges()
    monitor = lightning_dfa.AlignmentMonitor(every_n_steps=100, plot=False, prog_bar=False)
    t = trainer(
        strategy=DFAStrategy(verbose=False),
        max_steps=2000,
        max_epochs=-1,
        callbacks=[monitor, gauges],
        val_check_interval=500,
        check_val_every_n_epoch=None,
        limit_val_batches=2,
        num_sanity_val_steps=0,
    )
    t.fit(model, loader(n=128), loader(n=32))
    assert t.global_step == 2000 and len(monitor.history) == 20
    assert len(model.validation_equal) == 8 and all(model.validation_equal)
    rows = [r for r in gauges.rows if r["step"] >= 500]  # after the first validation and measurements
    assert len(rows) == 7
    assert len({r["hooks"] for r in gauges.rows}) == 1 and gauges.rows[0]["hooks"] > 0
    assert len({r["tensors"] for r in rows}) == 1, rows
    assert {r["held"] for r in rows} == {rows[0]["held"]} and rows[0]["held"][:2] == (0, 0)
    assert max(r["rss"] for r in rows) - rows[0]["rss"] < 8, rows  # MiB
    assert hooks_of(model) == 0 and math.isfinite(monitor.history[-1].mean)


# ---------------------------------------------------------------------------------------------- the page
@pytest.mark.parametrize("form", ["strategy", "callback"])
def test_a_diverging_training_loss_is_said_once_and_a_learning_one_is_not(form: str) -> None:
    """A ReLU network under plain SGD at lr 3 diverges under DFA (its loss passes 1e6 within 25 steps): one warning
    with the first and the latest loss; at lr 0.1 it learns and nothing is said."""
    torch.manual_seed(0)
    model = Classifier(mlp(width=32, act=nn.ReLU), lr=3.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_epochs=10, **dfa_args(form)).fit(model, loader(n=256))
    said = [str(w.message) for w in caught if "the training is diverging" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("DFA: the training loss went from 1.1")
    assert max(model.losses) > 1e6
    torch.manual_seed(0)
    model = Classifier(mlp(width=32, act=nn.ReLU), lr=0.1)
    with no_dfa_warning():
        trainer(max_epochs=10, **dfa_args(form)).fit(model, loader(n=256))
    assert model.losses[-1] < model.losses[0]


def test_divergence_is_read_from_the_loss_without_its_mixed_precision_scale() -> None:
    """The callbacks' ``on_before_backward`` sees ``16-mixed``'s scaled loss: a loss scale that doubles is no growth."""
    from lightning_dfa.adapters.core import _loss_scale
    from lightning_dfa.checks import DivergenceWatch

    class Scaler:
        def __init__(self) -> None:
            self.scale = 2.0**16

        def get_scale(self) -> float:
            return self.scale

        def is_enabled(self) -> bool:
            return True

    scaler = Scaler()
    fake = type("Trainer", (), {"precision_plugin": type("Plugin", (), {"scaler": scaler})()})()
    watch = DivergenceWatch(every=1)
    for _ in range(30):
        assert watch.observe(torch.tensor(2.0 * scaler.scale), lambda: _loss_scale(fake)) is None
        scaler.scale *= 2
    assert _loss_scale(object()) == 1.0
    assert "diverging" in (watch.observe(torch.tensor(float("nan"))) or "")


def test_reliability_page_cites_existing_tests_and_every_test_here() -> None:
    """``docs/reliability.md``: every cited test exists (file, function, parametrization ids), every row cites one,
    and every test of this file is on the page."""
    import re

    doc = (ROOT / "docs" / "reliability.md").read_text()
    rows = [line for line in doc.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) >= 50
    cited_here = set()
    for row in rows:
        if "| Shown by |" in row:
            continue
        cited = re.findall(r"`(test_\w+\.py)::(test_\w+)`", row)
        assert cited or "the tests of those rows" in row or re.search(r"`\[[\w.-]+\]`", row), f"cites no test: {row}"
        sources = {file: (ROOT / "tests" / file).read_text() for file, _ in cited}
        for file, name in cited:
            assert f"def {name}(" in sources[file], f"{file}::{name} does not exist"
            if file == "test_reliability.py":
                cited_here.add(name)
        own = (ROOT / "tests" / "test_reliability.py").read_text()
        for ids in re.findall(r"`\[([\w.-]+)\]`", row):  # parametrization ids: each part appears in the source
            assert all(part in "".join(sources.values()) + own for part in ids.split("-")), ids
    defined = set(re.findall(r"^def (test_\w+)\(", (ROOT / "tests" / "test_reliability.py").read_text(), re.M))
    assert defined - {"test_reliability_page_cites_existing_tests_and_every_test_here"} <= cited_here, (
        defined - cited_here
    )


class _ActorCritic(pl.LightningModule):
    """An actor and a critic on the same states, trained by one loss (Lightning's PPO example, smaller); the
    critic's own term from step ``value_from`` on."""

    def __init__(self, value_from: int = 0) -> None:
        super().__init__()
        self.critic = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
        self.actor = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
        self.value_from = value_from

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        states, actions, returns = batch
        policy = torch.distributions.Categorical(logits=self.actor(states))
        value = self.critic(states).squeeze(-1)
        advantages = (returns - value).detach()
        loss = -(policy.log_prob(actions) * advantages).mean()
        return loss + (returns - value).pow(2).mean() if self.global_step >= self.value_from else loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


@pytest.mark.parametrize("form", ["strategy", "callback"])
def test_blocks_that_no_error_reaches_are_said_once(form: str) -> None:
    """Blocks whose points the first steps recorded but no backward fed learn nothing: said once, after the tenth
    step (a generator's blocks run in a critic's steps before the generator's own). Here
    the critic's last layer is named as a block, so its loss term reads only a cut (as discovery did before it knew
    an actor and a critic side by side), and that term starts at the second step, after the first loss was checked
    for terms on a block's output; discovered, both networks are fed and nothing is said."""
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(32, 4, generator=g), torch.randint(0, 2, (32,), generator=g), torch.randn(32, generator=g)
    )
    blocks = ["critic.1", "critic.3", "critic.4", "actor.1", "actor.3"]
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=12, max_epochs=5, **dfa_args(form, blocks=blocks, output="actor.4")).fit(
            _ActorCritic(value_from=1), loader_of(data)
        )
    said = [str(w.message) for w in caught if "no output's error reached" in str(w.message)]
    assert len(said) == 1 and "['critic.1', 'critic.3', 'critic.4']" in said[0] and "['actor.4']" in said[0]
    torch.manual_seed(0)
    with no_dfa_warning():
        trainer(max_steps=12, max_epochs=5, **dfa_args(form)).fit(_ActorCritic(), loader_of(data))


@pytest.mark.parametrize("form", ["strategy", "callback"])
def test_a_loss_term_on_a_block_s_cut_output_is_found_at_the_first_step(form: str) -> None:
    """The loss reading a block's output point (its cut) directly: where nothing else reads it (the critic's last
    layer named as a block, its value term from the first step), that block is made an output after the first step
    and its error is fed back, so no block stays unfed; where later layers read it too (a regulariser on a middle
    layer's features), the term is said once, naming the block (before, both were silent: the cut dropped the
    term)."""
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(32, 4, generator=g), torch.randint(0, 2, (32,), generator=g), torch.randn(32, generator=g)
    )
    blocks = ["critic.1", "critic.3", "critic.4", "actor.1", "actor.3"]
    torch.manual_seed(0)
    args = dfa_args(form, blocks=blocks, output="actor.4")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=12, max_epochs=5, **args).fit(_ActorCritic(), loader_of(data))
    engine = (args["strategy"] if form == "strategy" else args["callbacks"][0]).dfa.engine
    assert sorted(n for n, _ in engine.target.outputs) == ["actor.4", "critic.4"]
    assert not [w for w in caught if str(w.message).startswith("DFA:")], [str(w.message) for w in caught]

    class FeatureRegularised(Classifier):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            features = self.net[:2](x)  # the first block's output (a point, cut)
            loss = nn.functional.cross_entropy(self.net[2:](features), y)
            return loss + 0.1 * features.pow(2).mean() if self.regularise else loss

    for regularise in (True, False):
        torch.manual_seed(0)
        model = FeatureRegularised()
        model.regularise = regularise
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer(max_steps=3, **dfa_args(form)).fit(model, loader())
        said = [str(w.message) for w in caught if "whose cut keeps this term" in str(w.message)]
        assert len(said) == int(regularise) and (not said or "['net.1']" in said[0]), said


class _CriticFirstGAN(pl.LightningModule):
    """A GAN under manual optimization that steps its critic on two batches of three and its generator on the third,
    without ``toggle_optimizer`` (the generator runs with gradient in the critic's steps too)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 6))
        self.critic = nn.Sequential(nn.Linear(6, 16), nn.LeakyReLU(0.2), nn.Linear(16, 16), nn.LeakyReLU(0.2),
                                    nn.Linear(16, 1))  # fmt: skip

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt_g, opt_c = self.optimizers()
        fake = self.generator(torch.randn(batch[0].shape[0], 4))
        if batch_idx % 3 < 2:
            loss = self.critic(fake.detach()).mean() - self.critic(batch[0]).mean()
            opt_c.zero_grad()
            self.manual_backward(loss)
            opt_c.step()
        else:
            loss = -self.critic(fake).mean()
            opt_g.zero_grad()
            self.manual_backward(loss)
            opt_g.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam(self.generator.parameters(), 1e-3), torch.optim.Adam(self.critic.parameters(), 1e-3)]


def test_a_generator_stepped_after_its_critic_is_not_said_to_be_unfed() -> None:
    """Steps that update only the critic, then one that updates the generator: every block's points are fed (the
    critic's error reaches the generator's points, computed before it, in the critic's steps too): nothing is
    said."""
    data = torch.utils.data.TensorDataset(torch.randn(48, 6, generator=torch.Generator().manual_seed(0)))
    torch.manual_seed(0)
    with no_dfa_warning():
        trainer(max_steps=12, max_epochs=5, **dfa_args("strategy")).fit(_CriticFirstGAN(), loader_of(data))


def loader_of(data: torch.utils.data.Dataset) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(data, batch_size=8)
