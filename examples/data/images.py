"""Image data for the image-classifier example.

* ``"fashion_mnist"`` (default): Fashion-MNIST (60k train, 10k test, 28x28 grey, 10 classes) read from the IDX
  files of the Debian package ``dataset-fashion-mnist``. An installed copy (``/usr/share/datasets/fashion-mnist/``)
  or a folder given with ``data_dir`` / ``$LIGHTNING_DFA_FASHION_MNIST`` is used as is; otherwise the package is
  fetched once with ``apt-get download`` (31 MB, no root needed, nothing installed) and unpacked with ``dpkg -x``
  into the cache directory (``$LIGHTNING_DFA_DATA`` or ``~/.cache/lightning_dfa``). If that is impossible the data
  module falls back to ``"digits"``, says why, and records it in ``fallback_reason`` (the example's last line
  repeats it).
* ``"torchvision"``: Fashion-MNIST through ``torchvision.datasets.FashionMNIST`` (downloads: online users only).
* ``"digits"``: scikit-learn's bundled 8x8 digits (1797 images): tiny, offline, for tests and smoke runs.
"""

from __future__ import annotations

import gzip
import os
import struct
import warnings
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from examples.data.debian import PackageUnavailable, unpack_package

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
DEB_PACKAGE = "dataset-fashion-mnist"
FASHION_FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
INSTALL_HINT = (
    "Fashion-MNIST was not found in {where} and could not be fetched ({why}). Install it offline from the Debian "
    "archive with\n    apt-get install dataset-fashion-mnist\n(31 MB, no dependencies), or point "
    "LIGHTNING_DFA_FASHION_MNIST (or --data.data_dir) at a folder holding {files}."
)


class FashionMNISTUnavailable(RuntimeError):
    """Fashion-MNIST is neither installed nor fetchable here; the message says how to get it."""


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a (gzipped) IDX file (the MNIST format) into a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def cache_dir() -> Path:
    """Where the fetched package is unpacked: ``$LIGHTNING_DFA_DATA/fashion-mnist`` (default under
    ``~/.cache/lightning_dfa``)."""
    base = os.environ.get("LIGHTNING_DFA_DATA")
    return (Path(base) if base else Path.home() / ".cache" / "lightning_dfa") / "fashion-mnist"


def fashion_mnist_dir(data_dir: str | None = None) -> Path | None:
    """The folder holding the four Fashion-MNIST IDX files, or ``None`` if none of the candidates has them."""
    fetched = cache_dir() / DEBIAN_DIR.lstrip("/")
    candidates = [data_dir, os.environ.get("LIGHTNING_DFA_FASHION_MNIST"), DEBIAN_DIR, str(fetched)]
    for c in candidates:
        if c and all((Path(c) / f).is_file() for f in FASHION_FILES.values()):
            return Path(c)
    return None


def fetch_fashion_mnist() -> Path:
    """Fetch ``dataset-fashion-mnist`` with ``apt-get download`` and unpack it into :func:`cache_dir` (once).

    Returns the folder of the IDX files; raises :class:`FashionMNISTUnavailable` if apt-get/dpkg are missing or
    the download fails.
    """
    found = fashion_mnist_dir()
    if found is not None:
        return found
    target = cache_dir()
    try:
        unpack_package(DEB_PACKAGE, target)
    except PackageUnavailable as err:
        raise FashionMNISTUnavailable(str(err)) from err
    found = fashion_mnist_dir()
    if found is None:
        raise FashionMNISTUnavailable(f"{DEB_PACKAGE} unpacked into {target} but holds no IDX files")
    return found


def load_fashion_mnist(data_dir: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fashion-MNIST as uint8 tensors: train images [60000, 1, 28, 28], labels, test images, labels."""
    folder = fashion_mnist_dir(data_dir)
    if folder is None:
        raise FileNotFoundError(
            INSTALL_HINT.format(
                where=data_dir or DEBIAN_DIR, why="not fetched", files=", ".join(FASHION_FILES.values())
            )
        )
    arrays = {k: torch.from_numpy(read_idx(folder / f).copy()) for k, f in FASHION_FILES.items()}
    return (
        arrays["train_x"].unsqueeze(1),
        arrays["train_y"].long(),
        arrays["test_x"].unsqueeze(1),
        arrays["test_y"].long(),
    )


def load_torchvision_fashion_mnist(root: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fashion-MNIST through torchvision (downloads to ``root``): same layout as :func:`load_fashion_mnist`."""
    from torchvision.datasets import FashionMNIST  # optional dependency, online users only

    train = FashionMNIST(root, train=True, download=True)
    test = FashionMNIST(root, train=False, download=True)
    return train.data.unsqueeze(1), train.targets.long(), test.data.unsqueeze(1), test.targets.long()


def load_digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits scaled to 0..255 uint8, split 1437 train / 360 test (seeded, stratified by order)."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.from_numpy((d.images * (255.0 / 16.0)).round().astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return x[360:], y[360:], x[:360], y[:360]


class ImageDataModule(pl.LightningDataModule):
    """Grey images, normalised by the training mean/std, with a held-out validation part of the training set.

    Args:
        dataset: ``"fashion_mnist"`` (Debian package, fetched on first use; default), ``"torchvision"``
            (download) or ``"digits"``.
        data_dir: folder of the Fashion-MNIST IDX files (default: ``$LIGHTNING_DFA_FASHION_MNIST``, the Debian
            package's folder, or the fetched copy); download folder for ``"torchvision"``.
        batch_size: training batch size (evaluation uses 1000).
        val_size: training images held out for validation (5000 for Fashion-MNIST; capped at 20% for digits).
        train_size: use only the first ``train_size`` training images (``None``: all): for quick runs.
        seed: seed of the train/validation split.
        fetch: fetch the Debian package with ``apt-get download`` when Fashion-MNIST is not found.
        fallback: when Fashion-MNIST is unavailable, use ``"digits"`` (with a warning, and the reason in
            :attr:`fallback_reason`) instead of raising.

    Example:
        >>> dm = ImageDataModule(dataset="digits")
        >>> dm.describe()
        "scikit-learn's 8x8 digits"
    """

    def __init__(
        self,
        dataset: str = "fashion_mnist",
        data_dir: str | None = None,
        batch_size: int = 128,
        val_size: int = 5000,
        train_size: int | None = None,
        seed: int = 0,
        fetch: bool = True,
        fallback: bool = True,
    ) -> None:
        super().__init__()
        if dataset not in ("fashion_mnist", "torchvision", "digits"):
            raise ValueError(f"unknown dataset {dataset!r}; choose fashion_mnist, torchvision or digits")
        #: why the data module uses digits instead of the requested Fashion-MNIST (``None``: no fallback)
        self.fallback_reason: str | None = None
        if dataset == "fashion_mnist" and fashion_mnist_dir(data_dir) is None:
            why = "no IDX files in data_dir" if data_dir else "fetching is off (fetch=False)"
            if fetch and data_dir is None:
                try:
                    fetch_fashion_mnist()
                    why = ""
                except FashionMNISTUnavailable as err:
                    why = str(err)
            if why:
                message = INSTALL_HINT.format(
                    where=data_dir or DEBIAN_DIR, why=why, files=", ".join(FASHION_FILES.values())
                )
                if not fallback:
                    raise FashionMNISTUnavailable(message)
                warnings.warn(message + " Falling back to scikit-learn's 8x8 digits.", stacklevel=2)
                self.fallback_reason = f"Fashion-MNIST unavailable: {why}"
                dataset = "digits"
        self.dataset = dataset
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.val_size = val_size
        self.train_size = train_size
        self.seed = seed
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def describe(self) -> str:
        """The data set in words, with the fallback if one was taken (for the example's last line)."""
        name = "scikit-learn's 8x8 digits" if self.dataset == "digits" else "Fashion-MNIST"
        return name + (f" (FALLBACK: {self.fallback_reason})" if self.fallback_reason else "")

    @property
    def image_size(self) -> int:
        """Side of the (square) images: 28, or 8 for digits."""
        return 8 if self.dataset == "digits" else 28

    @property
    def in_channels(self) -> int:
        return 1

    @property
    def num_classes(self) -> int:
        return 10

    def _raw(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.dataset == "digits":
            return load_digits(self.seed)
        if self.dataset == "torchvision":
            return load_torchvision_fashion_mnist(self.data_dir or os.path.join(".data", "torchvision"))
        return load_fashion_mnist(self.data_dir)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        xtr, ytr, xte, yte = self._raw()
        perm = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(self.seed))
        n_val = min(self.val_size, len(ytr) // 5)
        val_idx, train_idx = perm[:n_val], perm[n_val:]
        if self.train_size is not None:
            train_idx = train_idx[: self.train_size]
        xtr_f = xtr.float() / 255.0
        mean, std = xtr_f[train_idx].mean(), xtr_f[train_idx].std()

        def norm(x: torch.Tensor) -> torch.Tensor:
            return (x.float() / 255.0 - mean) / std

        self.train_set = TensorDataset(norm(xtr[train_idx]), ytr[train_idx])
        self.val_set = TensorDataset(norm(xtr[val_idx]), ytr[val_idx])
        self.test_set = TensorDataset(norm(xte), yte)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=g, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=1000)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=1000)
