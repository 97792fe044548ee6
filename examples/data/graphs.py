"""Graph data for the graph-convolution example: an offline contextual stochastic block model shaped like Cora,
and PyG's ``Planetoid`` (Cora/CiteSeer/PubMed) for users who are online.

The CSBM: 2708 nodes in 7 classes with Cora's class sizes, 1433 binary
bag-of-words features (about 18 words per node, each drawn from the node's class topic with probability ``mix``,
otherwise from the whole vocabulary), a degree-corrected block model with mean degree about 4 and a fraction
``homophily`` (about 0.7) of same-class edges, no isolated node. Split as Planetoid's public split: 20 labelled
nodes per class, 500 validation, 1000 test. With the defaults, a logistic regression on the features alone reaches
about 45% test accuracy and one on two-hop propagated features (``S^2 X``, ``S = D^-1/2 (A+I) D^-1/2``) about 81%
(:func:`linear_references` computes both).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

CORA_CLASS_SIZES = (351, 217, 418, 818, 426, 298, 180)
PLANETOID_NAMES = ("Cora", "CiteSeer", "PubMed")


class GraphData:
    """A minimal stand-in for ``torch_geometric.data.Data`` with the fields the example uses.

    Attributes: ``x`` [N, F] float features, ``edge_index`` [2, E] (both directions), ``y`` [N] labels, and
    boolean ``train_mask``/``val_mask``/``test_mask``. It moves with ``.to(device)`` like PyG's ``Data``.
    """

    def __init__(self, **fields: torch.Tensor) -> None:
        self.__dict__.update(fields)

    @property
    def num_nodes(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_features(self) -> int:
        return int(self.x.shape[1])

    def to(self, device: Any, **kwargs: Any) -> GraphData:
        """A copy with every tensor on ``device``."""
        return GraphData(**{k: v.to(device, **kwargs) for k, v in self.__dict__.items()})

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}={list(v.shape)}" for k, v in self.__dict__.items())
        return f"GraphData({parts})"


def csbm(
    num_nodes: int = 2708,
    class_sizes: Sequence[int] | None = CORA_CLASS_SIZES,
    num_classes: int = 7,
    num_features: int = 1433,
    mean_degree: float = 3.9,
    homophily: float = 0.7,
    words_per_node: float = 18.0,
    topic_words: int = 200,
    mix: float = 0.35,
    degree_spread: float = 1.0,
    train_per_class: int = 20,
    num_val: int = 500,
    num_test: int = 1000,
    seed: int = 0,
) -> GraphData:
    """Sample a contextual stochastic block model shaped like Cora (deterministic for a ``seed``).

    Args:
        num_nodes: number of nodes; ``class_sizes`` (if given and summing to ``num_nodes``) fixes the classes.
        num_classes: classes, used when ``class_sizes`` does not fit ``num_nodes`` (then sizes are near equal).
        num_features: vocabulary size of the binary bag-of-words features.
        mean_degree: target mean degree (undirected edges = ``num_nodes * mean_degree / 2``).
        homophily: probability that an edge joins two nodes of the same class.
        words_per_node: mean number of distinct words per node (Poisson, at least one).
        topic_words: size of each class's topic (a random subset of the vocabulary).
        mix: probability that a word comes from the node's class topic rather than the whole vocabulary.
        degree_spread: sigma of the log-normal degree propensities (0: no degree correction).
        train_per_class, num_val, num_test: split sizes (Planetoid's public split by default).
        seed: seed of the generator.
    """
    rng = np.random.default_rng(seed)
    if class_sizes is not None and sum(class_sizes) == num_nodes:
        sizes = np.asarray(class_sizes)
    else:
        sizes = np.full(num_classes, num_nodes // num_classes)
        sizes[: num_nodes - sizes.sum()] += 1
    num_classes = len(sizes)
    y = rng.permutation(np.repeat(np.arange(num_classes), sizes))
    members = [np.flatnonzero(y == c) for c in range(num_classes)]

    # features: a bag of words per node, each word from the class topic with probability `mix`
    topics = [rng.choice(num_features, size=min(topic_words, num_features), replace=False) for _ in range(num_classes)]
    counts = np.maximum(rng.poisson(words_per_node, size=num_nodes), 1)
    x = np.zeros((num_nodes, num_features), dtype=np.float32)
    for i in range(num_nodes):
        n = counts[i]
        from_topic = rng.random(n) < mix
        words = np.where(from_topic, rng.choice(topics[y[i]], size=n), rng.integers(0, num_features, size=n))
        x[i, words] = 1.0

    # edges: degree-corrected block model; every node gets one edge first (no isolated node), then the rest
    theta = rng.lognormal(0.0, degree_spread, size=num_nodes) if degree_spread > 0 else np.ones(num_nodes)
    class_p = [theta[m] / theta[m].sum() for m in members]
    other_p = []
    for c in range(num_classes):
        mask = y != c
        other_p.append((np.flatnonzero(mask), theta[mask] / theta[mask].sum()))
    target_edges = int(round(num_nodes * mean_degree / 2))

    def partner(u: int) -> int:
        c = y[u]
        if rng.random() < homophily:
            return int(rng.choice(members[c], p=class_p[c]))
        idx, p = other_p[c]
        return int(rng.choice(idx, p=p))

    edges: set[tuple[int, int]] = set()
    for u in range(num_nodes):
        v = partner(u)
        while v == u:
            v = partner(u)
        edges.add((min(u, v), max(u, v)))
    p_all = theta / theta.sum()
    while len(edges) < target_edges:
        u = int(rng.choice(num_nodes, p=p_all))
        v = partner(u)
        if v != u:
            edges.add((min(u, v), max(u, v)))
    und = np.asarray(sorted(edges), dtype=np.int64).T
    edge_index = np.concatenate([und, und[::-1]], axis=1)

    # Planetoid-style split: first `train_per_class` of each class (in a random order), then val, then test
    order = rng.permutation(num_nodes)
    train = np.concatenate([order[y[order] == c][:train_per_class] for c in range(num_classes)])
    rest = order[~np.isin(order, train)]
    val, test = rest[:num_val], rest[num_val : num_val + num_test]

    def mask(idx: np.ndarray) -> torch.Tensor:
        m = torch.zeros(num_nodes, dtype=torch.bool)
        m[torch.as_tensor(idx)] = True
        return m

    return GraphData(
        x=torch.from_numpy(x),
        edge_index=torch.from_numpy(np.ascontiguousarray(edge_index)),
        y=torch.from_numpy(y.astype(np.int64)),
        train_mask=mask(train),
        val_mask=mask(val),
        test_mask=mask(test),
    )


def tiny_csbm(seed: int = 0) -> GraphData:
    """A small CSBM for tests (210 nodes, 3 classes, 64 features): same generator, CPU-cheap."""
    return csbm(
        num_nodes=210,
        class_sizes=None,
        num_classes=3,
        num_features=64,
        mean_degree=4.0,
        words_per_node=8.0,
        topic_words=12,
        mix=0.35,
        train_per_class=20,
        num_val=50,
        num_test=90,
        seed=seed,
    )


def graph_stats(data: GraphData) -> dict[str, float]:
    """Nodes, undirected edges, mean degree, same-class edge fraction, mean words per node, isolated nodes."""
    src, dst = data.edge_index
    deg = torch.bincount(src, minlength=data.num_nodes)
    return {
        "nodes": data.num_nodes,
        "edges": int(data.edge_index.shape[1] // 2),
        "mean_degree": float(deg.float().mean()),
        "homophily": float((data.y[src] == data.y[dst]).float().mean()),
        "words_per_node": float(data.x.sum(1).mean()),
        "isolated": int((deg == 0).sum()),
    }


def propagate(data: GraphData, hops: int = 2) -> torch.Tensor:
    """``S^hops X`` with the GCN normalisation ``S = D^-1/2 (A + I) D^-1/2`` (dense-free, via scatter)."""
    n = data.num_nodes
    loops = torch.arange(n)
    src = torch.cat([data.edge_index[0], loops])
    dst = torch.cat([data.edge_index[1], loops])
    deg = torch.bincount(dst, minlength=n).float()
    w = deg[src].rsqrt() * deg[dst].rsqrt()
    h = data.x
    for _ in range(hops):
        out = torch.zeros_like(h)
        out.index_add_(0, dst, h[src] * w[:, None])
        h = out
    return h


def linear_references(data: GraphData, hops: Sequence[int] = (0, 2)) -> dict[int, float]:
    """Test accuracy (%) of a logistic regression on ``S^k X`` trained on the training nodes, for each ``k``."""
    from sklearn.linear_model import LogisticRegression

    out = {}
    for k in hops:
        feats = propagate(data, k).numpy() if k else data.x.numpy()
        clf = LogisticRegression(max_iter=2000, C=1.0)
        clf.fit(feats[data.train_mask.numpy()], data.y[data.train_mask].numpy())
        pred = clf.predict(feats[data.test_mask.numpy()])
        out[k] = 100.0 * float((pred == data.y[data.test_mask].numpy()).mean())
    return out


def planetoid(name: str = "Cora", root: str | None = None) -> GraphData:
    """Cora/CiteSeer/PubMed through PyG's ``Planetoid`` (downloads on first use: online users only)."""
    from torch_geometric.datasets import Planetoid

    if name not in PLANETOID_NAMES:
        raise ValueError(f"unknown Planetoid dataset {name!r}; choose one of {PLANETOID_NAMES}")
    root = root or os.path.join(os.environ.get("LIGHTNING_DFA_DATA", ".data"), "planetoid")
    d = Planetoid(root, name)[0]
    return GraphData(
        x=d.x, edge_index=d.edge_index, y=d.y, train_mask=d.train_mask, val_mask=d.val_mask, test_mask=d.test_mask
    )


@functools.lru_cache(maxsize=4)
def _cached(make: Any, seed: int) -> GraphData:
    """One sample per (generator, seed) per process: the CSBM takes seconds to draw."""
    return make(seed=seed)


class _Single(Dataset):
    """A dataset of one item: the whole graph (full-batch training)."""

    def __init__(self, data: GraphData) -> None:
        self.data = data

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> GraphData:
        return self.data


def _first(items: list[GraphData]) -> GraphData:
    return items[0]


class GraphDataModule(pl.LightningDataModule):
    """Full-batch node classification: every loader yields the one graph; the masks pick the nodes.

    Args:
        dataset: ``"csbm"`` (offline, default), ``"tiny_csbm"`` (tests) or a Planetoid name (``"Cora"``,
            ``"CiteSeer"``, ``"PubMed"``: downloads, online only).
        seed: seed of the CSBM sample.
        root: download folder for Planetoid.
    """

    def __init__(self, dataset: str = "csbm", seed: int = 0, root: str | None = None) -> None:
        super().__init__()
        self.dataset = dataset
        self.seed = seed
        self.root = root
        self.data: GraphData | None = None
        if dataset not in ("csbm", "tiny_csbm") and dataset not in PLANETOID_NAMES:
            raise ValueError(f"unknown dataset {dataset!r}; choose csbm, tiny_csbm or one of {PLANETOID_NAMES}")

    def load(self) -> GraphData:
        """Build or load the graph once."""
        if self.data is None:
            if self.dataset == "csbm":
                self.data = _cached(csbm, self.seed)
            elif self.dataset == "tiny_csbm":
                self.data = _cached(tiny_csbm, self.seed)
            else:
                self.data = planetoid(self.dataset, self.root)
        return self.data

    @property
    def num_features(self) -> int:
        """Input feature width (builds the graph if needed)."""
        return self.load().num_features

    @property
    def num_classes(self) -> int:
        """Number of classes (builds the graph if needed)."""
        return int(self.load().y.max()) + 1

    def setup(self, stage: str | None = None) -> None:
        self.load()

    def describe(self) -> str:
        """The data set in words (for the example's last line)."""
        names = {"csbm": "the Cora-shaped CSBM (synthetic, offline)", "tiny_csbm": "the tiny CSBM (synthetic)"}
        data = self.load()
        n_test = int(data.test_mask.sum())
        return f"{names.get(self.dataset, f'Planetoid {self.dataset}')}, {n_test} test nodes"

    def _loader(self) -> DataLoader:
        return DataLoader(_Single(self.load()), batch_size=1, collate_fn=_first)

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()
