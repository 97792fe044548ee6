"""Feedback projectors: the interface, the built-ins, DDP, resume, the CLI and the alignment monitor with them."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from conftest import Classifier, GradRecorder, loader, mlp, trainer
from torch import nn

import lightning_dfa
from lightning_dfa import AlignmentMonitor, DFAStrategy, FeedbackEngine, Projector
from lightning_dfa.projectors import Dense, Noisy, Optical, Quantized, Sketch, Ternarized, TopK
from lightning_dfa.projectors.bank import uses_sketch

ROOT = Path(__file__).resolve().parents[1]


class FixedMap(Projector):
    """A user-defined projector: only ``project``, a fixed matrix of its own (no seed, no state)."""

    def __init__(self, k: int, rows: int = 32) -> None:
        g = torch.Generator().manual_seed(123)
        self.matrix = torch.randn(rows, k, generator=g)

    def project(self, error: torch.Tensor, width: int) -> torch.Tensor:
        return error @ self.matrix[:width].t().to(error)


def test_a_user_projector_is_what_delivers_the_feedback() -> None:
    """The signal at each hidden point is exactly ``scale / sqrt(d) * e @ M[:d].T`` for the user's matrix ``M``."""
    net = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 7), nn.Tanh(), nn.Linear(7, 4))
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Any:
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            out.register_hook(lambda g: seen.__setitem__(name, g.detach().clone()))

        return hook

    net[1].register_forward_hook(keep("1"))  # before attach: sees the block's graph-attached output
    net[3].register_forward_hook(keep("3"))
    projector = FixedMap(k=4)
    engine = FeedbackEngine(projector=projector, scale=2.0)
    engine.attach(net)
    net[4].register_forward_hook(keep("error"))  # after attach: the tied output, whose gradient is e
    x, y = torch.randn(9, 5), torch.randint(0, 4, (9,))
    nn.functional.cross_entropy(net(x), y).backward()
    engine.end_backward()
    e = seen["error"]
    assert e.abs().sum() > 0
    for key, d in (("1", 12), ("3", 7)):
        expected = 2.0 / math.sqrt(d) * (e @ projector.matrix[:d].t())
        torch.testing.assert_close(seen[key], expected, rtol=1e-6, atol=1e-7)
    # the two points are fed from ONE projection (the 7 features of "3" are the first 7 of "1"'s 12)
    torch.testing.assert_close(seen["3"] * math.sqrt(7), seen["1"][:, :7] * math.sqrt(12), rtol=1e-6, atol=1e-7)
    assert isinstance(engine.projector, FixedMap) and engine.projector is not projector  # each engine a copy


def test_a_projector_returning_the_wrong_shape_is_refused() -> None:
    class Wrong(Projector):
        def project(self, error: torch.Tensor, width: int) -> torch.Tensor:
            return error

    net = mlp()
    engine = FeedbackEngine(projector=Wrong())
    engine.attach(net)
    with pytest.raises(RuntimeError, match=r"Wrong.project\(error, width=16\) returned \[8, 3\]"):
        nn.functional.cross_entropy(net(torch.randn(8, 6)), torch.randint(0, 3, (8,))).backward()
    with pytest.raises(NotImplementedError, match="must return the"):
        Projector().project(torch.ones(2, 3), 4)
    with pytest.raises(TypeError, match="projector must be None or a lightning_dfa.projectors.Projector"):
        FeedbackEngine(projector="optical")
    with pytest.raises(ValueError, match="leave sketch and topk unset"):
        FeedbackEngine(projector=Dense(), topk=4)


def test_the_options_stand_for_built_in_projectors_and_match_them_exactly() -> None:
    """``sketch``/``topk`` are shortcuts: the same gradients as the projector objects (and the default recipe's
    Sketch falls back to the dense matrix for a narrow error)."""
    error = torch.randn(6, 200)
    points = [lightning_dfa.engine.PointMeta("p", torch.Size([6, 16]), torch.float32, False)]
    for options, projector in (
        ({"recipe": "paper"}, Dense()),
        ({"recipe": "paper", "sketch": True}, Sketch()),
        ({"recipe": "paper", "topk": 8}, TopK(8)),
        ({"recipe": "paper", "distribution": "gaussian"}, Dense()),
        ({"recipe": "paper"}, Dense("uniform")),
    ):
        by_option = FeedbackEngine(seed=3, **options).feedback_for(error, points)[0]
        explicit = {k: v for k, v in options.items() if k not in ("sketch", "topk")}
        by_object = FeedbackEngine(seed=3, projector=projector, **explicit).feedback_for(error, points)[0]
        assert torch.equal(by_option, by_object), options
    assert uses_sketch(200, 16) and type(FeedbackEngine().projector) is Sketch
    assert type(FeedbackEngine(recipe="paper").projector) is Dense and FeedbackEngine(topk=3).projector.k == 3


def test_wrappers_and_the_optical_unit_are_deterministic_and_do_what_they_say() -> None:
    torch.manual_seed(0)
    e = torch.randn(64, 10)
    ideal = Optical(bits=None, threshold=0.0)
    ideal.setup(seed=4)
    re, _ = ideal.transmission(10, 32)
    signs = e.sign() * (e.norm(dim=-1, keepdim=True) / math.sqrt(10))
    # no camera limits: the holographic read-out is the linear projection of the (ternary) input
    torch.testing.assert_close(ideal.project(e, 32), signs @ re, rtol=1e-4, atol=1e-4)
    cosine = {}
    for bits in (8, 6, 4):
        opu = Optical(bits=bits, threshold=0.0)
        opu.setup(seed=4)
        out = opu.project(e, 32)
        again = Optical(bits=bits, threshold=0.0)
        again.setup(seed=4)
        assert torch.equal(out, again.project(e, 32))  # a pure function of the seed
        cosine[bits] = float(nn.functional.cosine_similarity(out, signs @ re, dim=-1).mean())
    assert cosine[8] > 0.99 and cosine[8] > cosine[6] > cosine[4] > 0.3, cosine
    # noise: per frame contents, not per batch position (rows keep their feedback when the batch is reordered)
    noisy = Optical(bits=6, snr_db=10)
    noisy.setup(seed=1)
    perm = torch.randperm(64)
    first = noisy.project(e, 32)
    noisy.calls = 0
    torch.testing.assert_close(noisy.project(e[perm], 32), first[perm])
    assert not torch.equal(noisy.project(e, 32), first)  # the next read-out draws other noise
    # wrappers
    dense = Dense("gaussian")
    dense.setup(seed=0)
    tern = Ternarized(Dense("gaussian"), threshold=0.5)
    tern.setup(seed=0)
    codes = torch.where(e.abs() > 0.5 * e.abs().amax(-1, keepdim=True), e.sign(), torch.zeros_like(e))
    scaled = codes * e.norm(dim=-1, keepdim=True) / codes.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(tern.project(e, 16), dense.project(scaled, 16))
    quant = Quantized(Dense("gaussian"), bits=4)
    quant.setup(seed=0)
    q = quant.project(e, 16)
    exact = dense.project(e, 16)
    half_step = exact.abs().amax(-1, keepdim=True) / 7 / 2  # 7 levels per sign
    assert all(len(row.unique()) <= 15 for row in q) and bool(((q - exact).abs() <= half_step * 1.0001).all())
    for snr in (20.0, 0.0):
        p = Noisy(Dense("gaussian"), snr_db=snr)
        p.setup(seed=0)
        clean = dense.project(e, 256)
        noise = p.project(e, 256) - clean
        ratio = float(noise.square().mean() / clean.square().mean())
        assert abs(10 * math.log10(ratio) + snr) < 0.5, (snr, ratio)
        assert p.state_dict()["calls"] == 1
    with pytest.raises(ValueError, match="Optical bits"):
        Optical(bits=0)
    with pytest.raises(TypeError, match="wraps a Projector"):
        Noisy(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("projector", [Dense(), Sketch(), Optical(bits=6)], ids=["dense", "sketch", "optical"])
def test_each_builtin_trains_the_mlp_under_the_trainer(projector: Projector) -> None:
    """40 classes from 8-wide hidden layers: wide enough that Sketch uses its structured matrix."""
    model = Classifier(mlp(width=8, n_out=40), lr=0.05, optimizer="adam")
    strategy = DFAStrategy(projector=projector, verbose=False)
    t = trainer(max_epochs=6, strategy=strategy)
    t.fit(model, loader(n=256, n_out=40, batch_size=32))
    engine = strategy.dfa_engine
    assert type(engine.projector) is type(projector) and uses_sketch(40, 8)
    if isinstance(projector, Sketch):
        assert engine.projector.bank._sketch_groups and not engine.projector.bank._matrices
    first, last = sum(model.losses[:8]) / 8, sum(model.losses[-8:]) / 8
    assert last < 0.8 * first, (first, last)


def test_alignment_monitor_measures_every_kind_of_projector() -> None:
    for projector in (Dense(), Optical(bits=4), Noisy(Ternarized(Sketch()), snr_db=0.0), FixedMap(k=3)):
        monitor = AlignmentMonitor(every_n_steps=2, plot=False)
        model = Classifier(mlp(), lr=0.1)
        t = trainer(max_steps=6, strategy=DFAStrategy(projector=projector, verbose=False), callbacks=[monitor])
        t.fit(model, loader())
        assert len(monitor.history) == 3, type(projector).__name__
        assert all(-1 <= r.mean <= 1 for r in monitor.history)


def _fit_resumable(tmp_path: Path, projector: Projector, epochs: int, ckpt: str | None = None, seed: int = 0) -> Any:
    pl.seed_everything(seed, verbose=False)
    torch.manual_seed(0)
    model = Classifier(mlp(), lr=0.05, optimizer="adam")
    strategy = DFAStrategy(projector=projector, verbose=False)
    t = trainer(max_epochs=epochs, strategy=strategy)
    t.fit(model, loader(), ckpt_path=ckpt)
    if ckpt is None and epochs == 1:
        t.save_checkpoint(tmp_path / "one.ckpt")
    return model


def test_a_stateful_projector_resumes_bit_identically(tmp_path: Path) -> None:
    projector = Noisy(Optical(bits=6, snr_db=20.0), snr_db=10.0)  # two counters of noisy read-outs, a matrix
    full = _fit_resumable(tmp_path, projector, 2)
    _fit_resumable(tmp_path, projector, 1)
    resumed = _fit_resumable(tmp_path, projector, 2, str(tmp_path / "one.ckpt"), seed=7)
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    ckpt = torch.load(tmp_path / "one.ckpt", weights_only=False)
    saved = ckpt["dfa"]["projector"]
    assert saved["class"] == "lightning_dfa.projectors.wrappers.Noisy"
    state = saved["outputs"][""]
    assert state["calls"] == 8 and state["inner"]["calls"] == 8 and state["inner"]["matrices"][3]["re"].shape == (16, 3)
    # the counters matter: resuming with them reset gives other noise, hence other weights
    state["calls"] = state["inner"]["calls"] = 0
    torch.save(ckpt, tmp_path / "reset.ckpt")
    other = _fit_resumable(tmp_path, projector, 2, str(tmp_path / "reset.ckpt"), seed=7)
    assert any(not torch.equal(a, b) for a, b in zip(full.parameters(), other.parameters()))
    with pytest.raises(RuntimeError, match="computed by projector lightning_dfa.projectors.wrappers.Noisy"):
        _fit_resumable(tmp_path, Optical(), 2, str(tmp_path / "one.ckpt"))


def test_ddp_with_the_optical_unit_matches_one_process(tmp_path: Path) -> None:
    """Two CPU processes (gloo), each on its half of every batch, end with the weights of one process on the
    whole batches: the optical feedback (matrix, camera noise) is the same wherever a row is computed."""
    sys.path.insert(0, str(ROOT / "tests" / "scripts"))
    import ddp_train

    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "NODE_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "scripts" / "ddp_projector.py"), str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "Starting with 2 processes" in run.stderr
    ranks = [torch.load(tmp_path / f"optical.rank{r}.pt") for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    assert all(a != b for a, b in zip(*(r["feedback"] for r in ranks)))  # different halves, different signals
    sys.path.insert(0, str(ROOT / "tests" / "scripts"))
    from ddp_projector import PROJECTOR

    model, _ = ddp_train.train(DFAStrategy(projector=PROJECTOR, verbose=False), rank=-1)
    initial = ddp_train.MLP().state_dict()
    for key, value in model.state_dict().items():
        assert not torch.equal(value, initial[key])
        for r in ranks:
            torch.testing.assert_close(r["weights"][key], value, atol=1e-5, rtol=0, msg=lambda m, k=key: f"{k}: {m}")
    alone, _ = ddp_train.train(DFAStrategy(projector=PROJECTOR, verbose=False), rank=0)
    assert max((alone.state_dict()[k] - ranks[0]["weights"][k]).abs().max().item() for k in initial) > 1e-3


def test_projector_from_lightning_cli_class_path(tmp_path: Path) -> None:
    pytest.importorskip("jsonargparse")
    sys.path.insert(0, str(ROOT / "tests" / "scripts"))
    import cli_train

    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  accelerator: cpu\n"
        "  strategy:\n"
        "    class_path: lightning_dfa.DFAStrategy\n"
        "    init_args:\n"
        "      projector:\n"
        "        class_path: lightning_dfa.projectors.Noisy\n"
        "        init_args:\n"
        "          snr_db: 10\n"
        "          inner:\n"
        "            class_path: lightning_dfa.projectors.Optical\n"
        "            init_args:\n"
        "              bits: 4\n"
    )
    projector = cli_train.main(["--config", str(config)], run=False).trainer.strategy.dfa.config.projector
    assert isinstance(projector, Noisy) and projector.snr_db == 10.0
    assert isinstance(projector.inner, Optical) and projector.inner.bits == 4
    flags = ["--trainer.accelerator=cpu", "--trainer.strategy=lightning_dfa.DFAStrategy"]
    flags += ["--trainer.strategy.projector=lightning_dfa.projectors.TopK", "--trainer.strategy.projector.k=5"]
    projector = cli_train.main(flags, run=False).trainer.strategy.dfa.config.projector
    assert isinstance(projector, TopK) and projector.k == 5


def test_grad_recorder_sees_the_same_gradients_for_an_explicit_dense_and_the_default() -> None:
    """``projector=Dense()`` under recipe ``"paper"`` is the paper's DFA, bit for bit, through the Trainer."""
    grads = []
    for options in ({"recipe": "paper"}, {"recipe": "paper", "projector": Dense()}):
        recorder = GradRecorder()
        torch.manual_seed(0)
        t = trainer(max_steps=3, strategy=DFAStrategy(verbose=False, **options), callbacks=[recorder])
        t.fit(Classifier(mlp()), loader())
        grads.append(recorder.grads)
    for a, b in zip(*grads):
        assert all(torch.equal(a[k], b[k]) for k in a if a[k] is not None)


def test_every_dfa_form_takes_a_projector() -> None:
    forms = [lightning_dfa.DFA, lightning_dfa.DFAStrategy, lightning_dfa.DFADDPStrategy]
    forms += [lightning_dfa.lightning.DFA, lightning_dfa.lightning.DFAStrategy]
    for form in forms:
        projector = Optical(bits=4)
        assert form(projector=projector, verbose=False).dfa.config.projector is projector
    model = Classifier(mlp(), lr=0.1)
    callback = lightning_dfa.DFA(projector=Quantized(Sketch(0), bits=3), verbose=False)
    trainer(max_steps=4, callbacks=[callback]).fit(model, loader())
    assert isinstance(callback.dfa_engine.projector, Quantized) and model.losses[-1] < model.losses[0]
