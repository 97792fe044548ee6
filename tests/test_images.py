"""The image example: IDX reading, offline data with a digits fallback, discovery on the MLP/CNN, the three arms
and the CLI (sklearn digits only: tiny, offline)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Said, trainer

from examples.data import debian
from examples.data import images as data_images
from examples.data.images import FASHION_FILES, ImageDataModule, load_fashion_mnist, read_idx
from examples.images import ImageClassifier, main
from lightning_dfa import FeedbackEngine


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fake_fashion(folder: Path, n_train: int = 30, n_test: int = 10) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "train_x": rng.integers(0, 256, (n_train, 28, 28)),
        "train_y": rng.integers(0, 10, n_train),
        "test_x": rng.integers(0, 256, (n_test, 28, 28)),
        "test_y": rng.integers(0, 10, n_test),
    }
    for key, name in FASHION_FILES.items():
        _write_idx(folder / name, arrays[key])


def test_read_idx_roundtrip(tmp_path: Path) -> None:
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", a)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), a)


def test_fashion_from_folder(tmp_path: Path) -> None:
    _fake_fashion(tmp_path)
    xtr, ytr, xte, yte = load_fashion_mnist(str(tmp_path))
    assert xtr.shape == (30, 1, 28, 28) and xte.shape == (10, 1, 28, 28)
    assert xtr.dtype == torch.uint8 and ytr.dtype == torch.long and len(yte) == 10
    dm = ImageDataModule(data_dir=str(tmp_path), val_size=5, batch_size=4)
    dm.setup()
    assert dm.dataset == "fashion_mnist" and dm.image_size == 28
    assert len(dm.train_set) == 25 and len(dm.val_set) == 5 and len(dm.test_set) == 10
    assert abs(float(dm.train_set.tensors[0].mean())) < 1e-4  # normalised by the training statistics


def test_missing_fashion_falls_back_to_digits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data_images, "DEBIAN_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setenv("LIGHTNING_DFA_DATA", str(tmp_path / "cache"))
    monkeypatch.delenv("LIGHTNING_DFA_FASHION_MNIST", raising=False)
    tried = []

    def unavailable() -> Path:
        tried.append(True)
        raise data_images.FashionMNISTUnavailable("no registry access")

    monkeypatch.setattr(data_images, "fetch_fashion_mnist", unavailable)
    with pytest.warns(UserWarning, match="apt-get install dataset-fashion-mnist"):
        dm = ImageDataModule()
    assert tried and dm.dataset == "digits" and dm.image_size == 8
    assert "FALLBACK" in dm.describe() and "no registry access" in dm.describe()
    with pytest.raises(data_images.FashionMNISTUnavailable, match="no registry access"):
        ImageDataModule(fallback=False)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist()


def test_fetched_copy_in_the_cache_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data_images, "DEBIAN_DIR", "/usr/share/datasets/fashion-mnist-not-here")
    monkeypatch.setenv("LIGHTNING_DFA_DATA", str(tmp_path))
    monkeypatch.delenv("LIGHTNING_DFA_FASHION_MNIST", raising=False)
    unpacked = tmp_path / "fashion-mnist" / "usr" / "share" / "datasets" / "fashion-mnist-not-here"
    unpacked.mkdir(parents=True)
    _fake_fashion(unpacked)
    monkeypatch.setattr(debian.subprocess, "run", lambda *a, **k: pytest.fail("nothing should be fetched"))
    assert data_images.fetch_fashion_mnist() == unpacked
    dm = ImageDataModule(val_size=5)
    assert dm.dataset == "fashion_mnist" and dm.describe() == "Fashion-MNIST"


def test_digits_split() -> None:
    dm = ImageDataModule(dataset="digits", val_size=100)
    dm.setup()
    assert dm.train_set.tensors[0].shape[1:] == (1, 8, 8)
    assert len(dm.train_set) + len(dm.val_set) == 1437 and len(dm.test_set) == 360


@pytest.mark.parametrize(("arch", "blocks", "output"), [("mlp", ["2", "4"], "5"), ("cnn", ["2", "5", "8"], "9")])
def test_discovery_finds_every_hidden_group(arch: str, blocks: list[str], output: str) -> None:
    model = ImageClassifier(arch=arch, hidden=(16, 16), channels=(4, 8), fc=16, image_size=8)
    engine = FeedbackEngine()
    target = engine.attach(model.net)
    assert [b.name for b in target.blocks] == blocks and target.output_name == output
    engine.detach()


_RUNS: dict[tuple[str, str], tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]] = {}


def _train(arch: str, arm: str, steps: int = 60) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
    """Weights before and after ``steps`` Adam steps on digits in one arm, and the test error (cached per arm)."""
    from lightning_dfa import DFAStrategy

    if (arch, arm) not in _RUNS:
        torch.manual_seed(0)
        dm = ImageDataModule(dataset="digits", batch_size=32)
        model = ImageClassifier(
            arch=arch, hidden=(128, 128), channels=(4, 8), fc=32, image_size=8, lr=1e-2, schedule="constant"
        )
        before = {k: v.clone() for k, v in model.state_dict().items()}
        t = trainer(max_steps=steps, max_epochs=-1, strategy=DFAStrategy(mode=arm, verbose=False), limit_val_batches=0)
        t.fit(model, datamodule=dm)
        err = t.test(model, datamodule=dm, verbose=False)[0]["test_err"]
        _RUNS[(arch, arm)] = (before, model.state_dict(), err)
    return _RUNS[(arch, arm)]


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_arms_train_the_right_layers(arch: str) -> None:
    first = "net.1.weight" if arch == "mlp" else "net.0.weight"
    last = "net.5.weight" if arch == "mlp" else "net.9.weight"
    for arm in ("bp", "dfa", "shallow"):
        before, after, _ = _train(arch, arm)
        assert not torch.equal(after[last], before[last]), arm  # the output layer always learns
        assert torch.equal(after[first], before[first]) == (arm == "shallow"), arm
    assert not torch.allclose(_train(arch, "bp")[1][first], _train(arch, "dfa")[1][first])  # DFA is not backprop


@pytest.mark.parametrize(("arch", "dfa_max"), [("mlp", 15.0), ("cnn", 40.0)])
def test_dfa_beats_shallow_on_digits(arch: str, dfa_max: float) -> None:
    errors = {arm: _train(arch, arm)[2] for arm in ("bp", "dfa", "shallow")}
    assert errors["dfa"] < errors["shallow"] and errors["dfa"] < dfa_max, errors  # chance: 90% error
    assert errors["bp"] < dfa_max, errors


def test_cli_fit_prints_test_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], said: Said) -> None:
    main(
        [
            "fit", "--data.dataset=digits", "--model.arch=cnn", "--model.channels=[4,8]", "--model.fc=16",
            "--trainer.strategy=dfa", "--trainer.max_steps=3", "--trainer.logger=false",
            "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
            "--trainer.limit_val_batches=0", f"--trainer.default_root_dir={tmp_path}",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    assert last.startswith("test error:") and "360 test images of scikit-learn's 8x8 digits" in last
    assert "feedback" in said.text().lower()  # the DFA summary: the run really used the DFA strategy
