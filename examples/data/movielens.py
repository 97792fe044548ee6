"""MovieLens latest-small (100,004 ratings, 671 users, 9,066 movies; GroupLens, 2016), read offline.

Source: the Debian package ``r-cran-dslabs`` ships it as the R object
``movielens``. On first use it is fetched with ``apt-get download`` (no installation, no R), unpacked with
``dpkg -x``, and read from R's lazy-load files with the PyPI package ``rdata``:

* ``data/Rdata.rdx`` is a gzipped serialised R list whose ``variables`` map each object name to
  ``(offset, length)`` in ``data/Rdata.rdb``;
* each ``.rdb`` chunk is a 4-byte big-endian length followed by a zlib stream holding an RDS serialisation.

Only the ratings (user, movie, rating, timestamp) are kept, in ``<cache>/movielens/ratings.npz`` with
``cache = $LIGHTNING_DFA_DATA`` or ``.data`` (git-ignored). GroupLens' terms forbid redistribution: the data is
never committed; each user fetches it.

Split: a random 10,000-rating test set (seeded), then 5,000 validation ratings, the rest for training.
References on that test split: global mean RMSE 1.060, user+item biases 0.890
(:func:`bias_baseline` recomputes both).
"""

from __future__ import annotations

import glob
import gzip
import os
import struct
import subprocess
import tempfile
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import TensorDataset

from examples.data.debian import PackageUnavailable, unpack_package
from examples.data.splits import SplitDataModule

PACKAGE = "r-cran-dslabs"
HELP = (
    "MovieLens is not available offline. It is read from the Debian package r-cran-dslabs: run `apt-get download "
    "r-cran-dslabs` (needs access to the Debian archive) and `pip install rdata`, or put the .deb in {cache} and "
    "retry. The data is cached in {cache} (set LIGHTNING_DFA_DATA to move it). Reason: {why}"
)


class MovieLensUnavailable(RuntimeError):
    """MovieLens could not be fetched or read; the message says how to get it."""


def cache_dir() -> str:
    """``$LIGHTNING_DFA_DATA/movielens`` (default ``.data/movielens``)."""
    return os.path.join(os.environ.get("LIGHTNING_DFA_DATA", ".data"), "movielens")


def _read_rdata_object(data_dir: str, name: str) -> object:
    """Read one object from an R package's lazy-load data (``Rdata.rdx`` + ``Rdata.rdb``)."""
    import rdata

    def parse(raw: bytes) -> object:
        return rdata.conversion.convert(rdata.parser.parse_data(raw, extension=".rds"))

    with open(os.path.join(data_dir, "Rdata.rdx"), "rb") as f:
        raw = f.read()
    index = parse(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else zlib.decompress(raw[4:]))
    offset, length = (int(v) for v in index["variables"][name])
    with open(os.path.join(data_dir, "Rdata.rdb"), "rb") as f:
        f.seek(offset)
        chunk = f.read(length)
    (size,) = struct.unpack(">I", chunk[:4])
    payload = zlib.decompress(chunk[4:])
    if len(payload) != size:
        raise MovieLensUnavailable(f"corrupt chunk for {name!r}: {len(payload)} bytes, expected {size}")
    return parse(payload)


def fetch(cache: str | None = None) -> str:
    """Make sure ``ratings.npz`` is in ``cache`` (download the .deb and convert on first use); return its path.

    Raises:
        MovieLensUnavailable: with set-up instructions, if the package cannot be downloaded or read.
    """
    cache = cache or cache_dir()
    target = os.path.join(cache, "ratings.npz")
    if os.path.exists(target):
        return target
    os.makedirs(cache, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            try:
                unpack_package(PACKAGE, os.path.join(tmp, "x"), timeout=300)
            except PackageUnavailable as err:
                raise MovieLensUnavailable(str(err)) from err
            found = glob.glob(os.path.join(tmp, "x", "usr", "lib", "R", "site-library", "dslabs", "data"))
            if not found:
                raise MovieLensUnavailable("the package has no dslabs/data directory")
            frame = _read_rdata_object(found[0], "movielens")
        except MovieLensUnavailable as err:
            raise MovieLensUnavailable(HELP.format(cache=cache, why=err)) from None
        except (OSError, subprocess.SubprocessError, ImportError, KeyError, zlib.error) as err:
            raise MovieLensUnavailable(HELP.format(cache=cache, why=f"{type(err).__name__}: {err}")) from None
    np.savez_compressed(
        target,
        user=frame["userId"].to_numpy(dtype=np.int64),
        movie=frame["movieId"].to_numpy(dtype=np.int64),
        rating=frame["rating"].to_numpy(dtype=np.float32),
        timestamp=frame["timestamp"].to_numpy(dtype=np.int64),
    )
    return target


@dataclass
class Ratings:
    """Ratings with users and items re-indexed from 0, and the split indices."""

    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    @property
    def n_users(self) -> int:
        return int(self.user.max()) + 1

    @property
    def n_items(self) -> int:
        return int(self.item.max()) + 1


def split(user: np.ndarray, movie: np.ndarray, rating: np.ndarray, n_test: int, n_val: int, seed: int) -> Ratings:
    """Re-index users/movies and draw a random test and validation set (seeded).

    Example:
        >>> r = split(np.array([5, 5, 7, 9]), np.array([1, 2, 2, 3]), np.ones(4, np.float32), 1, 1, 0)
        >>> r.n_users, r.n_items, len(r.train), len(r.val), len(r.test)
        (3, 3, 2, 1, 1)
    """
    _, u = np.unique(user, return_inverse=True)
    _, i = np.unique(movie, return_inverse=True)
    order = np.random.default_rng(seed).permutation(len(rating))
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    return Ratings(u.astype(np.int64), i.astype(np.int64), rating.astype(np.float32), train, val, test)


def fit_biases(r: Ratings, reg: float = 5.0, iters: int = 10) -> tuple[float, np.ndarray, np.ndarray]:
    """Regularised user and item biases on the training split (alternating least squares): ``mu, b_u, b_i``."""
    u, i, y = r.user[r.train], r.item[r.train], r.rating[r.train].astype(np.float64)
    mu = float(y.mean())
    bu, bi = np.zeros(r.n_users), np.zeros(r.n_items)
    for _ in range(iters):
        res = y - mu - bu[u]
        bi = np.bincount(i, res, r.n_items) / (np.bincount(i, minlength=r.n_items) + reg)
        res = y - mu - bi[i]
        bu = np.bincount(u, res, r.n_users) / (np.bincount(u, minlength=r.n_users) + reg)
    return mu, bu, bi


def bias_baseline(r: Ratings, reg: float = 5.0, iters: int = 10) -> dict[str, float]:
    """Test RMSE of the global mean and of a regularised user+item bias model (alternating least squares).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> y = rng.uniform(1, 5, 500).astype(np.float32)
        >>> r = split(rng.integers(0, 20, 500), rng.integers(0, 30, 500), y, 100, 50, 0)
        >>> out = bias_baseline(r)
        >>> sorted(out)
        ['bias_rmse', 'mean_rmse']
    """
    mu, bu, bi = fit_biases(r, reg, iters)
    t = r.test
    yt = r.rating[t].astype(np.float64)
    pred = np.clip(mu + bu[r.user[t]] + bi[r.item[t]], 0.5, 5.0)
    return {
        "mean_rmse": float(np.sqrt(((yt - mu) ** 2).mean())),
        "bias_rmse": float(np.sqrt(((yt - pred) ** 2).mean())),
    }


def neighbour_features(
    r: Ratings, k: int = 40, shrink: float = 100.0, biases: tuple[float, np.ndarray, np.ndarray] | None = None
) -> np.ndarray:
    """Item-item neighbourhood features of every rating's ``(user, item)`` pair, from training ratings only.

    For a pair ``(u, i)``: the ``k`` items ``j`` that ``u`` rated in the training split with the largest positive
    shrunk Pearson-baseline similarity to ``i`` (on the residuals ``r - mu - b_u - b_i`` of :func:`fit_biases`,
    over the users who rated both, times ``(n - 1) / (n - 1 + shrink)`` for ``n`` such users), and returns
    ``[sum_j s_ij (r_uj - b_uj) / sum_j s_ij, sum_j s_ij]``: the KNN-baseline residual prediction and its
    support (``[0, 0]`` without neighbours). Validation and test ratings are never read (only their pairs are
    queried). For a *training* rating ``r_ui`` is left out: out of ``u``'s neighbours and out of every
    similarity (leave-one-out), so that the feature sees what it would see for an unseen pair (assuming, as in
    MovieLens, one rating per pair).

    Args:
        r: the ratings and split.
        k: neighbours per pair.
        shrink: similarity shrinkage.
        biases: ``mu, b_u, b_i`` of the residuals (default: :func:`fit_biases` of ``r``).

    Returns:
        ``float32 [len(r.rating), 2]``, row ``n`` for the pair of rating ``n`` (any split).

    Example:
        >>> r = synthetic_ratings(n=400)
        >>> f = neighbour_features(r, k=10)
        >>> f.shape, bool((f[:, 1] >= 0).all())
        ((400, 2), True)
    """
    mu, bu, bi = biases if biases is not None else fit_biases(r)
    tu, ti = r.user[r.train], r.item[r.train]
    res = np.zeros((r.n_users, r.n_items), np.float32)  # training residuals, 0 where unrated
    seen = np.zeros((r.n_users, r.n_items), np.float32)
    res[tu, ti] = r.rating[r.train] - mu - bu[tu] - bi[ti]
    seen[tu, ti] = 1.0
    in_train = np.zeros(len(r.rating), bool)
    in_train[r.train] = True
    out = np.zeros((len(r.rating), 2), np.float32)
    order = np.argsort(r.user, kind="stable")
    bounds = np.searchsorted(r.user[order], np.arange(r.n_users + 1))
    for u in range(r.n_users):
        rows, rated = order[bounds[u] : bounds[u + 1]], np.nonzero(seen[u])[0]
        if len(rows) == 0 or len(rated) == 0:
            continue
        rho, q = res[u, rated], r.item[rows]
        aq, mq, ar, mr = res[:, q], seen[:, q], res[:, rated], seen[:, rated]
        num, n = aq.T @ ar, mq.T @ mr  # [queries, rated]: co-residual products, co-raters
        sq_q, sq_r = (aq * aq).T @ mr, mq.T @ (ar * ar)
        own = in_train[rows]  # leave r_ui out: u is a co-rater of (i, j) for every j it rated
        if own.any():
            rq = res[u, q[own]]
            num[own] -= rq[:, None] * rho[None, :]
            sq_q[own] -= (rq * rq)[:, None]
            sq_r[own] -= (rho * rho)[None, :]
            n[own] -= 1.0
        den = np.sqrt(np.clip(sq_q, 0.0, None) * np.clip(sq_r, 0.0, None))
        support = np.clip(n - 1.0, 0.0, None)
        s = np.where(den > 1e-9, num / np.maximum(den, 1e-9), 0.0) * support / (support + shrink)
        s[q[:, None] == rated[None, :]] = 0.0
        s = np.maximum(s, 0.0)
        if s.shape[1] > k:
            top = np.argpartition(-s, k - 1, axis=1)[:, :k]
            s, rho_top = np.take_along_axis(s, top, 1), rho[top]
        else:
            rho_top = np.broadcast_to(rho, s.shape)
        total = s.sum(1)
        out[rows, 0] = np.where(total > 0, (s * rho_top).sum(1) / np.maximum(total, 1e-9), 0.0)
        out[rows, 1] = total
    return out


def knn_baseline(r: Ratings, table: tuple[np.ndarray, np.ndarray] | None = None, k: int = 40) -> float:
    """Test RMSE of the item-item KNN-baseline alone: ``mu + b_u + b_i`` plus the neighbourhood residual of
    :func:`neighbour_features` (the rating MLP's ``knn_ui`` input), clipped to 0.5..5.

    ``table``: ``(sorted keys, features)`` as :meth:`MovieLensDataModule.neighbour_table` returns (else computed).

    Example:
        >>> r = synthetic_ratings(n=400)
        >>> 0.0 < knn_baseline(r, k=10) < 5.0
        True
    """
    mu, bu, bi = fit_biases(r)
    t = r.test
    if table is None:
        resid = neighbour_features(r, k)[t, 0]
    else:
        keys, feats = table
        query = r.user[t].astype(np.int64) * r.n_items + r.item[t]
        pos = np.searchsorted(keys, query).clip(max=len(keys) - 1)
        resid = np.where(keys[pos] == query, feats[pos, 0], 0.0)
    pred = np.clip(mu + bu[r.user[t]] + bi[r.item[t]] + resid, 0.5, 5.0)
    return float(np.sqrt(((r.rating[t].astype(np.float64) - pred) ** 2).mean()))


def load(n_test: int = 10_000, n_val: int = 5_000, seed: int = 0, cache: str | None = None) -> Ratings:
    """MovieLens latest-small, split (fetches it on first use; see :func:`fetch`)."""
    with np.load(fetch(cache)) as z:
        return split(z["user"], z["movie"], z["rating"], n_test, n_val, seed)


class MovieLensDataModule(SplitDataModule):
    """MovieLens ratings as batches of ``(user, item, rating)``.

    Args:
        batch_size: training batch size (evaluation uses 4x).
        n_test, n_val: sizes of the random test and validation sets.
        seed: split and shuffling seed.
        ratings: an already loaded :class:`Ratings` (tests pass synthetic ones; then nothing is fetched).
    """

    DATA_NAME = "MovieLens latest-small (Debian package r-cran-dslabs)"

    def __init__(
        self,
        batch_size: int = 256,
        n_test: int = 10_000,
        n_val: int = 5_000,
        seed: int = 0,
        ratings: Ratings | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["ratings"])
        self.ratings = ratings
        if ratings is not None:
            self.DATA_NAME = "the ratings given to the data module"
        self.datasets: dict[str, TensorDataset] = {}
        self._neighbours: dict[tuple[int, float], tuple[np.ndarray, np.ndarray]] = {}

    def _ensure(self) -> Ratings:
        if self.ratings is None:
            h = self.hparams
            self.ratings = load(h.n_test, h.n_val, h.seed)
        return self.ratings

    @property
    def n_users(self) -> int:
        return self._ensure().n_users

    @property
    def n_items(self) -> int:
        return self._ensure().n_items

    def baseline_biases(self) -> tuple[float, np.ndarray, np.ndarray]:
        """The regularised bias model of the training split (:func:`fit_biases`): ``mu, b_u, b_i``."""
        return fit_biases(self._ensure())

    def neighbour_table(self, k: int = 40, shrink: float = 100.0) -> tuple[np.ndarray, np.ndarray]:
        """:func:`neighbour_features` of every pair in the splits, keyed by ``user * n_items + item`` (sorted):
        ``(keys int64 [N], features float32 [N, 2])``. Computed once per ``(k, shrink)`` and kept."""
        cache = self._neighbours
        if (k, shrink) not in cache:
            r = self._ensure()
            keys = r.user.astype(np.int64) * r.n_items + r.item
            order = np.argsort(keys, kind="stable")
            cache[(k, shrink)] = (keys[order], neighbour_features(r, k, shrink)[order])
        return cache[(k, shrink)]

    @property
    def global_mean(self) -> float:
        r = self._ensure()
        return float(r.rating[r.train].mean())

    def setup(self, stage: str | None = None) -> None:
        r = self._ensure()
        for name in ("train", "val", "test"):
            idx = getattr(r, name)
            self.datasets[name] = TensorDataset(
                torch.from_numpy(r.user[idx]), torch.from_numpy(r.item[idx]), torch.from_numpy(r.rating[idx])
            )


def synthetic_ratings(n_users: int = 50, n_items: int = 80, n: int = 2000, rank: int = 3, seed: int = 0) -> Ratings:
    """Small MovieLens-shaped ratings (0.5..5 in half steps from biases + a low-rank part), for tests and quick
    runs without the download. Test and validation sets take 10% each.

    Example:
        >>> r = synthetic_ratings(n=100)
        >>> len(r.train) + len(r.val) + len(r.test), float(r.rating.min()) >= 0.5
        (100, True)
    """
    rng = np.random.default_rng(seed)
    u = rng.integers(0, n_users, n)
    i = rng.integers(0, n_items, n)
    p, q = rng.normal(0, 0.6, (n_users, rank)), rng.normal(0, 0.6, (n_items, rank))
    score = 3.5 + rng.normal(0, 0.4, n_users)[u] + rng.normal(0, 0.4, n_items)[i] + (p[u] * q[i]).sum(1)
    rating = np.clip(np.round((score + rng.normal(0, 0.5, n)) * 2) / 2, 0.5, 5.0).astype(np.float32)
    return split(u, i, rating, n // 10, n // 10, seed)
