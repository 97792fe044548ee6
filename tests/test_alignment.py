"""Alignment telemetry: the monitor measures DFA against backprop without changing training."""

from __future__ import annotations

import csv
import math

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_dfa
from lightning_dfa import alignment
from lightning_dfa.alignment import AlignmentMonitor


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one CPU thread is many times faster than two on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class MLP(pl.LightningModule):
    """A small classifier; ``norm``/``dropout`` add BatchNorm and dropout to each hidden group."""

    def __init__(self, dropout: float = 0.0, norm: bool = False, lr: float = 1e-2, metric: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = 16
        for _ in range(2):
            layers += [nn.Linear(width, 32)] + ([nn.BatchNorm1d(32)] if norm else []) + [nn.Tanh()]
            layers += [nn.Dropout(dropout)] if dropout else []
            width = 32
        self.net = nn.Sequential(*layers, nn.Linear(32, 4))
        self.lr = lr
        if metric:
            import torchmetrics

            self.acc = torchmetrics.Accuracy(task="multiclass", num_classes=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.log("train_loss", loss)
        if hasattr(self, "acc"):
            self.acc(logits, y)
            self.log("train_acc", self.acc, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def loader(n: int = 384) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=g)
    y = (x @ torch.randn(16, 4, generator=g)).argmax(1)
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1))


def fit(module: pl.LightningModule, mode: str, callbacks: list, tmp_path, **kwargs) -> pl.Trainer:
    options = dict(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    options.update(kwargs)
    trainer = pl.Trainer(
        strategy=lightning_dfa.DFAStrategy(mode=mode, verbose=False),
        callbacks=callbacks,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **options,
    )
    trainer.fit(module, loader())
    return trainer


def test_dfa_alignment_is_reported_and_rises(tmp_path):
    pl.seed_everything(0)
    monitor = AlignmentMonitor(every_n_steps=5)
    logger = pl.loggers.CSVLogger(tmp_path)
    trainer = fit(MLP(), "dfa", [monitor], tmp_path, max_epochs=4, logger=logger)
    last = trainer.strategy.dfa_engine.target.blocks[-1].name
    steps = [r.step for r in monitor.history]
    assert steps == list(range(0, 48, 5))  # 4 epochs x 12 batches, every 5 steps, step 0 included
    curve = [r.points[last].mean for r in monitor.history]
    assert all(-1.0 <= r.points[k].mean <= 1.0 for r in monitor.history for k in r.points)
    assert all(-1.0 <= w <= 1.0 for r in monitor.history for w in r.weights.values())
    assert set(monitor.latest.weights) == {b.name for b in trainer.strategy.dfa_engine.target.blocks}
    print("alignment at the last hidden block:", [round(c, 3) for c in curve])
    assert curve[-1] > 0.3 and curve[0] < curve[-1] - 0.2, curve
    # through the Trainer's logger, at the measured steps; the latest mean on the progress bar; the plot
    with open(logger.log_dir + "/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get(f"dfa/align/{last}")]
    assert [int(r["step"]) for r in rows] == steps
    assert math.isclose(float(rows[-1][f"dfa/align/{last}"]), curve[-1], rel_tol=1e-6)
    assert trainer.progress_bar_metrics["dfa/align"] == pytest.approx(monitor.latest.mean)
    assert monitor.plot_path == tmp_path / "lightning_logs" / "version_0" / "alignment.png"
    assert monitor.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def bp_dropout_alignments(tmp_path) -> list[float]:
    pl.seed_everything(0)
    monitor = AlignmentMonitor(every_n_steps=1, plot=False)
    fit(MLP(dropout=0.5, norm=True), "bp", [monitor], tmp_path, limit_train_batches=4)
    assert len(monitor.history) == 4 and monitor.latest.points and monitor.latest.weights
    return [v for r in monitor.history for v in [p.mean for p in r.points.values()] + list(r.weights.values())]


def test_bp_mode_reports_one_with_dropout(tmp_path, monkeypatch):
    values = bp_dropout_alignments(tmp_path)
    assert all(abs(v - 1.0) < 1e-5 for v in values), values
    # the check has teeth: if the probe did not hand the real step the same RNG state, masks would differ
    monkeypatch.setattr(alignment, "_restore_rng", lambda state: None)
    assert min(bp_dropout_alignments(tmp_path)) < 0.99


def test_shallow_mode_reports_zero(tmp_path):
    pl.seed_everything(0)
    monitor = AlignmentMonitor(every_n_steps=1, plot=False)
    fit(MLP(), "shallow", [monitor], tmp_path, limit_train_batches=2)
    values = [p.mean for r in monitor.history for p in r.points.values()] + list(monitor.latest.weights.values())
    assert len(monitor.history) == 2 and values and all(v == 0.0 for v in values)


def test_monitor_leaves_training_unchanged(tmp_path):
    def run(callbacks: list) -> tuple[dict, torch.Tensor, float]:
        pl.seed_everything(0)
        module = MLP(dropout=0.3, norm=True, metric=True)
        trainer = fit(module, "dfa", callbacks, tmp_path, limit_train_batches=4, max_epochs=2)
        return module.state_dict(), torch.get_rng_state(), float(trainer.callback_metrics["train_acc"])

    plain_state, plain_rng, plain_acc = run([])
    monitor = AlignmentMonitor(every_n_steps=2, plot=False)
    state, rng, acc = run([monitor])
    assert len(monitor.history) == 4
    assert plain_state.keys() == state.keys()
    assert all(torch.equal(plain_state[k], state[k]) for k in state)  # weights and BatchNorm statistics
    assert torch.equal(plain_rng, rng) and plain_acc == acc


def test_needs_a_dfa_engine(tmp_path):
    trainer = pl.Trainer(
        max_steps=1,
        callbacks=[AlignmentMonitor()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(RuntimeError, match="no DFA engine"):
        trainer.fit(MLP(), loader())


def test_compare_script_writes_plots_and_table(tmp_path):
    from benchmarks.compare import main

    result = main(
        ["--out", str(tmp_path), "--epochs", "1", "--tsne", "last", "--tsne-points", "60", "--align-every", "8"]
    )
    names = {p.name for p in result["files"]}
    assert {"compare_curves.png", "compare_tsne.png", "compare.md", "alignment.png"} <= names
    for name in ("compare_curves.png", "compare_tsne.png", "dfa/alignment.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "compare.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in table[-3:]] == ["bp", "dfa", "shallow"]
    final = {r["mode"]: r["final"] for r in result["runs"]}
    assert final["bp"]["alignment (last block)"] == pytest.approx(1.0, abs=1e-5)
    assert final["shallow"]["alignment (last block)"] == 0.0


def test_lightning_flavour_bp_reports_one(tmp_path):
    lightning = pytest.importorskip("lightning.pytorch")
    from lightning_dfa.adapters.lightning import DFAStrategy as LightningDFAStrategy
    from lightning_dfa.alignment import LightningAlignmentMonitor

    class Net(lightning.LightningModule):
        training_step, configure_optimizers = MLP.training_step, MLP.configure_optimizers

        def __init__(self) -> None:
            super().__init__()
            self.net, self.lr = MLP(dropout=0.5).net, 1e-2

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    lightning.seed_everything(0)
    monitor = LightningAlignmentMonitor(every_n_steps=1, plot=False)
    trainer = lightning.Trainer(
        strategy=LightningDFAStrategy(mode="bp", verbose=False),
        callbacks=[monitor],
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(Net(), loader())
    assert len(monitor.history) == 2
    assert all(abs(p.mean - 1.0) < 1e-5 for r in monitor.history for p in r.points.values())
