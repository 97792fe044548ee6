"""A synthetic click log shaped like Criteo (offline stand-in; Criteo itself is a download).

Each impression has ``n_dense`` count-like dense features (log-normal, fed as ``log1p``) and ``n_cat`` categorical
fields. Raw category ids are drawn from a Zipf-like law over a large id space per field and *hashed* into
``buckets`` slots, as Criteo pipelines do. The click probability is a logistic function of

* a first-order part: a weight per dense feature and a weight per raw category id,
* a pairwise part: ``<u_f[c_f], u_g[c_g]>`` for a fixed random set of field pairs (latent dimension ``rank``),
  plus one dense x categorical interaction,

with the intercept chosen for a click rate near Criteo's (about 25%). Because the true probabilities are known,
the best achievable AUC (:attr:`ClickLog.oracle_auc`) is the AUC of the true probability on the test split; a
model sees only hashed ids, so it cannot quite reach it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import TensorDataset

from examples.data.splits import SplitDataModule


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (ties get the average rank), without scikit-learn.

    Example:
        >>> round(auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])), 2)
        0.75
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks of ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    n_pos = labels.sum()
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


@dataclass
class ClickLog:
    """The generated log: dense [N, n_dense] float32, categorical [N, n_cat] int64 (hashed, per-field buckets),
    clicks [N] float32, the true click probabilities [N], and the train/val/test index ranges."""

    dense: np.ndarray
    cat: np.ndarray
    clicks: np.ndarray
    prob: np.ndarray
    cardinalities: list[int]
    n_train: int
    n_val: int

    def split(self, name: str) -> slice:
        """The rows of ``"train"``, ``"val"`` or ``"test"``."""
        a, b = self.n_train, self.n_train + self.n_val
        return {"train": slice(0, a), "val": slice(a, b), "test": slice(b, len(self.clicks))}[name]

    @property
    def oracle_auc(self) -> float:
        """AUC of the true click probability on the test split: the best any model can reach."""
        s = self.split("test")
        return auc(self.prob[s], self.clicks[s])

    @property
    def click_rate(self) -> float:
        return float(self.clicks.mean())


def generate(
    n: int = 200_000,
    n_dense: int = 13,
    n_cat: int = 26,
    buckets: int = 1000,
    raw_ids: int = 300,
    rank: int = 4,
    n_pairs: int = 20,
    pair_scale: float = 0.9,
    first_scale: float = 0.6,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> ClickLog:
    """Draw a click log (deterministic for a given ``seed``).

    Args:
        n: impressions in total (split train/val/test in that order).
        n_dense, n_cat: numbers of dense and categorical fields (Criteo: 13 and 26).
        buckets: hashed slots per categorical field (smaller fields use fewer, see ``cardinalities``).
        raw_ids: raw id space per field before hashing.
        rank: latent dimension of the pairwise interactions.
        n_pairs: number of interacting field pairs.
        pair_scale, first_scale: standard deviations of the pairwise and first-order logit parts.

    Example:
        >>> log = generate(n=2000, n_dense=3, n_cat=4, buckets=50, raw_ids=200, n_pairs=3, seed=1)
        >>> log.dense.shape, log.cat.shape, 0.05 < log.click_rate < 0.6, bool(log.cat.max() < 50)
        ((2000, 3), (2000, 4), True, True)
    """
    rng = np.random.default_rng(seed)
    # field sizes vary as in Criteo: some tiny, most large
    raw_sizes = np.maximum(4, (raw_ids * rng.uniform(0.002, 1.0, n_cat) ** 2).astype(int))
    cardinalities = [int(min(buckets, s)) for s in raw_sizes]
    # Zipf-like popularity per field (exponent ~1.1), ids shuffled
    cat_raw = np.empty((n, n_cat), dtype=np.int64)
    for f in range(n_cat):
        size = raw_sizes[f]
        p = 1.0 / np.arange(1, size + 1) ** rng.uniform(0.8, 1.3)
        p /= p.sum()
        cat_raw[:, f] = rng.permutation(size)[rng.choice(size, n, p=p)]
    dense_raw = rng.lognormal(mean=rng.uniform(0, 3, n_dense), sigma=rng.uniform(0.5, 1.5, n_dense), size=(n, n_dense))
    dense_raw[rng.random((n, n_dense)) < 0.1] = 0.0  # missing counts
    dense = np.log1p(dense_raw).astype(np.float32)
    dense_std = (dense - dense.mean(0)) / (dense.std(0) + 1e-6)

    # true logit: first order
    logit = dense_std @ (rng.normal(0, first_scale / np.sqrt(n_dense), n_dense))
    first = [rng.normal(0, first_scale / np.sqrt(n_cat / 4), raw_sizes[f]) for f in range(n_cat)]
    for f in range(n_cat):
        logit += first[f][cat_raw[:, f]]
    # pairwise latent interactions on a random set of field pairs
    latent = [rng.normal(0, 1.0, (raw_sizes[f], rank)) for f in range(n_cat)]
    all_pairs = [(f, g) for f in range(n_cat) for g in range(f + 1, n_cat)]
    chosen = rng.choice(len(all_pairs), size=min(n_pairs, len(all_pairs)), replace=False)
    pair_part = np.zeros(n)
    for i in chosen:
        f, g = all_pairs[i]
        pair_part += (latent[f][cat_raw[:, f]] * latent[g][cat_raw[:, g]]).sum(1)
    # one dense x categorical interaction
    pair_part += dense_std[:, 0] * latent[0][cat_raw[:, 0], 0] * np.sqrt(rank)
    pair_part *= pair_scale / (pair_part.std() + 1e-9)
    logit = logit - logit.mean()
    logit = logit * (first_scale * 1.5 / (logit.std() + 1e-9)) + pair_part
    # intercept for a click rate near 25%
    lo, hi = -10.0, 10.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if (1 / (1 + np.exp(-(logit + mid)))).mean() > 0.25:
            hi = mid
        else:
            lo = mid
    prob = 1.0 / (1.0 + np.exp(-(logit + lo)))
    clicks = (rng.random(n) < prob).astype(np.float32)
    # hashing raw ids into buckets (a fixed multiplicative hash per field)
    cat = np.empty_like(cat_raw)
    for f in range(n_cat):
        a = int(rng.integers(1, 2**31 - 1)) | 1
        cat[:, f] = ((cat_raw[:, f] * a + f * 7919) % 2147483647) % cardinalities[f]
    n_val = int(n * val_fraction)
    n_test = int(n * test_fraction)
    return ClickLog(dense, cat, clicks, prob.astype(np.float32), cardinalities, n - n_val - n_test, n_val)


class ClickDataModule(SplitDataModule):
    """The synthetic click log as a DataModule: batches of ``(dense, categorical, click)``.

    Args:
        n: impressions (80/10/10 train/val/test).
        n_dense, n_cat, buckets, raw_ids, n_pairs: shape of the log (see :func:`generate`).
        batch_size: training batch size (evaluation uses 4x).
        seed: seed of the generator (the log is a pure function of it).
    """

    DATA_NAME = "the synthetic Criteo-shaped click log"

    def __init__(
        self,
        n: int = 200_000,
        n_dense: int = 13,
        n_cat: int = 26,
        buckets: int = 1000,
        raw_ids: int = 300,
        n_pairs: int = 20,
        batch_size: int = 1024,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.log_data: ClickLog | None = None
        self.datasets: dict[str, TensorDataset] = {}

    @property
    def cardinalities(self) -> list[int]:
        """Buckets per categorical field (the models' embedding table sizes)."""
        self.setup()
        assert self.log_data is not None
        return self.log_data.cardinalities

    def setup(self, stage: str | None = None) -> None:
        if self.log_data is not None:
            return
        h = self.hparams
        self.log_data = generate(
            n=h.n,
            n_dense=h.n_dense,
            n_cat=h.n_cat,
            buckets=h.buckets,
            raw_ids=h.raw_ids,
            n_pairs=h.n_pairs,
            seed=h.seed,
        )
        log = self.log_data
        for name in ("train", "val", "test"):
            s = log.split(name)
            self.datasets[name] = TensorDataset(
                torch.from_numpy(log.dense[s]), torch.from_numpy(log.cat[s]), torch.from_numpy(log.clicks[s])
            )
