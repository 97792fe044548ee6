"""The graph example: the CSBM generator, where DFA's feedback goes in GCN/GAT/ChebConv, the three arms and the
CLI (a tiny CSBM only: offline, CPU-cheap)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Said, trainer

from examples.data.graphs import GraphDataModule, csbm, graph_stats, linear_references, propagate, tiny_csbm
from examples.graphs import CONVS, GraphNet, main
from lightning_dfa import DFAStrategy, FeedbackEngine


def test_csbm_shape_split_and_determinism() -> None:
    a, b = tiny_csbm(seed=3), tiny_csbm(seed=3)
    assert torch.equal(a.edge_index, b.edge_index) and torch.equal(a.x, b.x)
    assert not torch.equal(tiny_csbm(seed=4).x, a.x)
    stats = graph_stats(a)
    assert stats["nodes"] == 210 and stats["isolated"] == 0 and 3.5 < stats["mean_degree"] <= 4.0
    assert 0.6 < stats["homophily"] < 0.8
    assert set(a.x.unique().tolist()) <= {0.0, 1.0}
    # Planetoid-style split: 20 per class, disjoint masks of the requested sizes
    assert torch.bincount(a.y[a.train_mask]).tolist() == [20, 20, 20]
    assert int(a.val_mask.sum()) == 50 and int(a.test_mask.sum()) == 90
    assert not (a.train_mask & a.val_mask).any() and not (a.val_mask & a.test_mask).any()
    # undirected: every edge in both directions
    fwd = {tuple(e) for e in a.edge_index.t().tolist()}
    assert all((v, u) in fwd for u, v in fwd)


def test_csbm_defaults_are_cora_shaped() -> None:
    d = csbm(num_features=200, seed=0)  # Cora's nodes, classes and degrees; a narrower vocabulary for speed
    stats = graph_stats(d)
    assert stats["nodes"] == 2708 and d.y.max() == 6 and stats["isolated"] == 0
    assert abs(stats["mean_degree"] - 3.9) < 0.05 and 0.65 < stats["homophily"] < 0.75
    assert int(d.train_mask.sum()) == 140 and int(d.val_mask.sum()) == 500 and int(d.test_mask.sum()) == 1000


def test_propagation_helps_the_linear_reference() -> None:
    d = tiny_csbm(seed=0)
    refs = linear_references(d, (0, 2))
    assert refs[2] > refs[0] + 5, refs  # the graph carries label information beyond the features
    s1 = propagate(d, 1)
    assert s1.shape == d.x.shape and torch.allclose(propagate(d, 0), d.x)


@pytest.mark.parametrize("conv", CONVS)
def test_feedback_point_after_the_hidden_conv_and_activation(conv: str) -> None:
    d = tiny_csbm(seed=0)
    torch.manual_seed(0)
    model = GraphNet(conv=conv, num_features=d.num_features, num_classes=3, dropout=0.0)
    engine = FeedbackEngine(mode="dfa")
    target = engine.attach(model)
    assert [b.name for b in target.blocks] == ["blocks.0"] and target.output_name == "out"
    logits = model(d.x, d.edge_index)
    loss = torch.nn.functional.cross_entropy(logits[d.train_mask], d.y[d.train_mask])
    loss.backward()
    report = engine.end_backward()
    assert report.deliveries == 1
    width = 8 * 8 if conv == "gat" else 16
    assert engine.last_points[0].shape == (d.num_nodes, width)  # per node: [nodes, hidden]
    dfa_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert any(n.startswith("blocks.0.conv") for n in dfa_grads)
    engine.detach()
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(d.x, d.edge_index)[d.train_mask], d.y[d.train_mask]).backward()
    first = next(n for n in dfa_grads if n.startswith("blocks.0.conv") and n.endswith("weight"))
    bp_grad = dict(model.named_parameters())[first].grad
    assert not torch.allclose(dfa_grads[first], bp_grad)  # feedback, not the backprop gradient
    out_w = next(n for n in dfa_grads if n.startswith("out"))
    assert torch.allclose(dfa_grads[out_w], dict(model.named_parameters())[out_w].grad, atol=1e-6)  # true gradient


def _fit(conv: str, arm: str, steps: int) -> tuple[float, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    dm = GraphDataModule(dataset="tiny_csbm")
    model = GraphNet(conv=conv, num_features=dm.num_features, num_classes=dm.num_classes)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t = trainer(max_steps=steps, max_epochs=-1, strategy=DFAStrategy(mode=arm, verbose=False), limit_val_batches=0)
    t.fit(model, datamodule=dm)
    acc = t.test(model, datamodule=dm, verbose=False)[0]["test_acc"]
    return acc, before, model.state_dict()


def test_gcn_arms_dfa_learns_like_bp_and_beats_shallow() -> None:
    acc = {}
    for arm in ("bp", "dfa", "shallow"):
        acc[arm], before, after = _fit("gcn", arm, steps=40)
        w = "blocks.0.conv.lin.weight"
        assert torch.equal(before[w], after[w]) == (arm == "shallow"), arm
    assert acc["dfa"] > acc["shallow"] + 5 and acc["dfa"] > acc["bp"] - 10, acc


def test_cli_fit_prints_test_accuracy(tmp_path: Path, capsys: pytest.CaptureFixture[str], said: Said) -> None:
    main(
        [
            "fit", "--data.dataset=tiny_csbm", "--model.conv=gat", "--trainer.strategy=dfa",
            "--trainer.max_epochs=2", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "blocks.0" in said.text()  # the DFA summary (through Lightning's rank_zero_info) names the point
    last = out.strip().splitlines()[-1]
    assert last.startswith("test accuracy:") and "the tiny CSBM" in last and "test nodes" in last


def test_keep_best_restores_the_best_validation_weights() -> None:
    from examples.callbacks import KeepBest

    class Record(KeepBest):
        def __init__(self) -> None:
            super().__init__("val_acc", higher_is_better=True)
            self.seen: list[float] = []

        def on_validation_end(self, trainer, pl_module) -> None:  # noqa: ANN001
            if not trainer.sanity_checking:
                self.seen.append(float(trainer.callback_metrics["val_acc"]))
            super().on_validation_end(trainer, pl_module)

    torch.manual_seed(0)
    model = GraphNet(conv="gcn", num_features=tiny_csbm().num_features, num_classes=3, lr=0.05)
    record = Record()
    t = trainer(max_steps=12, max_epochs=-1, callbacks=[record], check_val_every_n_epoch=1, strategy=DFAStrategy())
    t.fit(model, datamodule=GraphDataModule(dataset="tiny_csbm"))
    assert len(record.seen) == 12 and record.best == max(record.seen)
    assert record.step < 12 and record.seen[-1] < record.best  # seeded: the last weights are not the best
    after = t.validate(model, datamodule=GraphDataModule(dataset="tiny_csbm"), verbose=False)[0]["val_acc"]
    assert after == pytest.approx(record.best)
    assert GraphNet(keep_best=True).configure_callbacks()[0].metric == "val_acc"
    assert GraphNet().configure_callbacks() == []


def test_dfa_feedback_is_propagated_through_the_graph() -> None:
    """With ``propagate_feedback`` the hidden block's feedback is ``A^T (B e)`` (GCN's normalised adjacency):
    it reaches the neighbours of the labelled nodes; without it only the labelled nodes get any."""
    from torch_geometric.nn.conv.gcn_conv import gcn_norm

    d = tiny_csbm()
    signals = {}
    for spread in (False, True):
        torch.manual_seed(0)
        model = GraphNet(conv="gcn", num_features=d.num_features, num_classes=3, dropout=0.0,
                         propagate_feedback=spread)  # fmt: skip
        engine = FeedbackEngine()
        engine.attach(model)
        seen: list[torch.Tensor] = []
        engine.feedback_observers.append(lambda e, p, out, seen=seen: seen.append(out[0].detach().clone()))
        logits = model(d.x, d.edge_index)
        torch.nn.functional.cross_entropy(logits[d.train_mask], d.y[d.train_mask]).backward()
        engine.end_backward()
        engine.detach()
        signals[spread] = seen[0]
    reached = {k: v.abs().sum(1) > 0 for k, v in signals.items()}
    assert torch.equal(reached[False], d.train_mask)
    assert reached[True].sum() > 2 * d.train_mask.sum()
    (src, dst), w = gcn_norm(d.edge_index, None, d.num_nodes, add_self_loops=True)
    adjacency = torch.zeros(d.num_nodes, d.num_nodes).index_put_((dst, src), w, accumulate=True)
    torch.testing.assert_close(signals[True], adjacency.t() @ signals[False])
    assert "feedback_transform" not in GraphNet(propagate_feedback=False).configure_dfa()


class _GIN(torch.nn.Module):
    """A graph classifier: GIN layers over the nodes, a mean over each graph's nodes, a Linear head (before the
    pooling with ``head_first``: the same function)."""

    def __init__(self, head_first: bool, pool: str = "mean") -> None:
        from torch import nn
        from torch_geometric.nn import GINConv

        super().__init__()
        self.convs = nn.ModuleList(
            GINConv(nn.Sequential(nn.Linear(8 if i == 0 else 16, 16), nn.ReLU(), nn.Linear(16, 16))) for i in range(2)
        )
        self.head, self.head_first, self.pool = nn.Linear(16, 2), head_first, pool

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        from torch_geometric.nn import global_add_pool, global_max_pool, global_mean_pool

        for conv in self.convs:
            x = torch.relu(conv(x, edge_index))
        if self.pool == "dense":  # a mean by a [graphs, nodes] assignment matrix, computed by hand
            assign = torch.nn.functional.one_hot(batch).t().float()
            return self.head((assign @ x) / assign.sum(1, keepdim=True))
        pool = {"mean": global_mean_pool, "add": global_add_pool, "max": global_max_pool}[self.pool]
        return pool(self.head(x), batch) if self.head_first else self.head(pool(x, batch))


def _graphs(n: int = 32, size: int = 8, sizes: list[int] | None = None) -> tuple[torch.Tensor, ...]:
    """``n`` random graphs of ``size`` nodes (or of ``sizes`` in turn); label: the sign of the mean product of two
    node features."""
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([(sizes or [size])[i % len(sizes or [size])] for i in range(n)])
    starts = torch.cumsum(counts, 0) - counts
    x = torch.randn(int(counts.sum()), 8, generator=g)
    edges = torch.cat([torch.randint(0, int(c), (2, 3 * int(c)), generator=g) + s for c, s in zip(counts, starts)], 1)
    batch = torch.repeat_interleave(torch.arange(n), counts)
    products = torch.zeros(n).index_add_(0, batch, x[:, 0] * x[:, 1]) / counts
    return x, edges, batch, (products > 0).long()


def _gin_gradients(
    x: torch.Tensor,
    edges: torch.Tensor,
    batch: torch.Tensor | None,
    y: torch.Tensor,
    pool: str,
    head_first: bool = False,
    steps: int = 1,
) -> list[dict[str, torch.Tensor]]:
    """A seeded GIN's gradients under the default flag, at each of ``steps`` backwards of the same batch (each
    delivers feedback)."""
    torch.manual_seed(0)
    net = _GIN(head_first=head_first, pool=pool)
    engine = FeedbackEngine(seed=0)
    engine.attach(net)
    grads = []
    for _ in range(steps):
        net.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x, edges, batch), y).backward()
        assert engine.end_backward().deliveries == 1
        grads.append({n: p.grad.clone() for n, p in net.named_parameters()})
    engine.detach()
    return grads


@pytest.mark.parametrize("pool", ["mean", "add", "max"])
def test_a_graph_level_head_after_pooling_feeds_each_node_its_graphs_error(pool: str) -> None:
    """Graph classification: the error has one row per graph, the node points one row per node, and the pooling
    between them (torch_geometric's global pooling, a scatter over the ``batch`` vector) says which graph each node
    is in, so each node is fed its graph's error (in a mean, divided by its graph's size). With mean pooling, every
    gradient equals that of the head applied before the pooling (the same function, whose error per node is its
    graph's divided by the graph's size), at every step, for graphs of several sizes; and DFA learns what shallow
    cannot (before: refused at the first backward)."""
    x, edges, batch, y = _graphs(sizes=[5, 8, 11, 8])
    grads = [_gin_gradients(x, edges, batch, y, pool, head_first, steps=3) for head_first in (False, True)]
    for after, first in zip(*grads) if pool == "mean" else ():  # (a head before a sum adds its bias once per node)
        for name, grad in after.items():
            torch.testing.assert_close(grad, first[name], rtol=1e-4, atol=1e-6, msg=name)
    x, edges, batch, y = _graphs()
    losses = {}
    for mode in ("dfa", "shallow"):
        torch.manual_seed(0)
        net = _GIN(head_first=False, pool=pool)
        engine = FeedbackEngine(mode=mode)
        engine.attach(net)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        for _ in range(100):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x, edges, batch), y)
            loss.backward()
            engine.end_backward()
            opt.step()
        losses[mode] = float(loss)
    assert losses["dfa"] < 0.5 * losses["shallow"], losses


def _max_pooled_gin_watched() -> tuple[_GIN, dict[str, torch.Tensor]]:
    """A max-pooled GIN whose last point (the last layer's output, a ReLU before the pooling) is watched: its value
    (``"nodes"``) and the feedback it receives (``"feedback"``)."""
    torch.manual_seed(0)
    net = _GIN(head_first=False, pool="max")
    seen: dict[str, torch.Tensor] = {}

    def watch(module: torch.nn.Module, args: Any, out: torch.Tensor) -> None:
        seen["nodes"] = out.detach()
        out.register_hook(lambda g: seen.setdefault("feedback", g))

    net.convs[1].register_forward_hook(watch)
    return net, seen


def test_a_max_pooled_graph_feeds_each_node_where_it_holds_its_graphs_maximum() -> None:
    """torch_geometric's ``global_max_pool`` before the head: the last node point is fed, in each channel, its
    graph's feedback where the node holds the graph's maximum of that channel (the maximum's own gradient, applied
    to the graph's ``B e``), and nothing elsewhere; before, refused at the first backward."""
    x, edges, batch, y = _graphs(sizes=[5, 8, 11, 8])
    net, seen = _max_pooled_gin_watched()
    engine = FeedbackEngine(seed=0)
    engine.attach(net)
    logits = net(x, edges, batch)
    logits.register_hook(lambda g: seen.setdefault("error", g))
    torch.nn.functional.cross_entropy(logits, y).backward()
    assert engine.end_backward().deliveries == 1
    nodes, feedback, error = torch.relu(seen["nodes"]), seen["feedback"], seen["error"]
    top = torch.zeros(len(y), 16).index_reduce_(0, batch, nodes, "amax", include_self=False)
    holds = nodes == top[batch]
    assert feedback[~holds].abs().max() == 0 and feedback[holds].abs().min() > 0
    # each graph's feedback, summed over its nodes, is one fixed linear map of that graph's error
    per_graph = torch.zeros(len(y), 16).index_add_(0, batch, feedback)
    fitted = torch.linalg.lstsq(error, per_graph).solution
    torch.testing.assert_close(error @ fitted, per_graph, rtol=1e-4, atol=1e-6)
    engine.detach()


@pytest.mark.parametrize("pool", ["mean", "add"])
def test_one_graph_pooled_without_a_batch_vector_is_fed_as_in_a_batch(pool: str) -> None:
    """torch_geometric's pooling of a single graph (``batch=None``: a plain mean or sum over the rows) gives every
    gradient that the same graph pooled with its ``batch`` vector gives (before: refused)."""
    x, edges, batch, y = _graphs(n=1, size=9)
    (indexed,), (whole,) = (_gin_gradients(x, edges, vector, y, pool) for vector in (batch, None))
    for name, grad in indexed.items():
        torch.testing.assert_close(whole[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_one_graph_max_pooled_without_a_batch_vector_feeds_the_row_of_each_maximum() -> None:
    """The maximum over a single graph's rows (``global_max_pool(x, None)``, ``torch.max`` over the rows): in each
    channel, the row that ``torch.max`` picked is fed, as its gradient would be, and no other."""
    x, edges, _, y = _graphs(n=1, size=9)
    net, seen = _max_pooled_gin_watched()
    engine = FeedbackEngine(seed=0)
    engine.attach(net)
    torch.nn.functional.cross_entropy(net(x, edges, None), y).backward()
    assert engine.end_backward().deliveries == 1
    picked = torch.relu(seen["nodes"]).max(0).indices
    fed = seen["feedback"] != 0
    assert (fed == torch.nn.functional.one_hot(picked, 9).t().bool()).all()  # one row per channel: torch.max's
    engine.detach()


def test_rows_pooled_without_a_group_index_are_refused_with_the_head_first_form() -> None:
    """A pooling whose groups the engine does not follow (a mean the model computes by hand from a dense
    ``[graphs, nodes]`` assignment) is refused at the first backward, saying to pool by a mean or to apply the head
    before the pooling."""
    x, edges, batch, y = _graphs()
    torch.manual_seed(0)
    net = _GIN(head_first=False, pool="dense")
    engine = FeedbackEngine()
    engine.attach(net)
    said = r"one row per item.*global_mean_pool\(x, batch\), or apply the output module to the rows before the pooling"
    with pytest.raises(RuntimeError, match=said):
        torch.nn.functional.cross_entropy(net(x, edges, batch), y).backward()
    engine.detach()


class _LayerLoopGNN(torch.nn.Module):
    """The UvA deep-learning course's GNNModel: a ModuleList of GCNConv, ReLU and Dropout, called in a loop that
    passes ``edge_index`` to the message-passing layers only."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        from torch_geometric.nn import GCNConv

        modules: list[torch.nn.Module] = []
        width = 12
        for _ in range(layers - 1):
            modules += [GCNConv(width, 16), torch.nn.ReLU(inplace=True), torch.nn.Dropout(0.1)]
            width = 16
        self.layers = torch.nn.ModuleList([*modules, GCNConv(width, 3)])

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        from torch_geometric.nn import MessagePassing

        for layer in self.layers:
            x = layer(x, edge_index) if isinstance(layer, MessagePassing) else layer(x)
        return x


@pytest.mark.parametrize("layers", [2, 3])
def test_a_module_list_of_layers_and_activations_is_a_chain(layers: int) -> None:
    """A ModuleList of convolutions with activations between them, looped over in order, is split as a Sequential
    would be: each convolution's group is a block and the last convolution the output (before: "found no
    blocks")."""
    torch.manual_seed(0)
    net, engine = _LayerLoopGNN(layers), FeedbackEngine()
    target = engine.attach(net)
    assert [b.name for b in target.blocks] == [f"layers.{3 * i + 2}" for i in range(layers - 1)]
    assert target.output_name == f"layers.{3 * (layers - 1)}"
    x, edges = torch.randn(10, 12), torch.randint(0, 10, (2, 30))
    torch.nn.functional.cross_entropy(net(x, edges), torch.randint(0, 3, (10,))).backward()
    assert engine.end_backward().deliveries == 1
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
