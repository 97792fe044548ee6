"""Graph convolutions (GCN, GAT, ChebConv from ``torch_geometric``) for node classification, trained by backprop,
DFA or the shallow baseline.

The training method is a Trainer flag only::

    python -m examples.graphs fit --model.conv=gcn                                 # backprop
    python -m examples.graphs fit --model.conv=gcn --trainer.strategy=dfa          # Direct Feedback Alignment
    python -m examples.graphs fit --model.conv=gat --trainer.strategy=dfa
    python -m examples.graphs fit --model.conv=cheb --trainer.strategy=lightning_dfa.DFAStrategy \\
        --trainer.strategy.mode=shallow
    python -m examples.graphs fit --data.dataset=Cora --trainer.strategy=dfa       # Planetoid (downloads)

Data (``examples/data/graphs.py``): offline, a contextual stochastic block model shaped like Cora (default);
online, Cora/CiteSeer/PubMed through PyG's ``Planetoid``. Full batch: one optimizer step per epoch. The last line
printed after ``fit`` is the test accuracy and the data set it was measured on. Measured results:
``docs/results_graphs.md``.

Feedback points: each hidden layer is a :class:`GraphBlock` (dropout, conv, activation), and DFA's feedback
arrives at its output, i.e. after the hidden conv layer and its activation, as in the DFA paper; the last conv
is the output module. The error ``e`` [nodes, classes] (non-zero on the training nodes only) is projected per
node onto the hidden features [nodes, width]. The module says where its blocks are through ``configure_dfa()``,
a plain method that training without DFA never calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from examples.callbacks import KeepBest
from examples.data.graphs import GraphDataModule

CONVS = ("gcn", "gat", "cheb")
#: per-conv defaults from the original papers (Kipf & Welling 2017; Velickovic et al. 2018)
CONV_DEFAULTS: dict[str, dict[str, Any]] = {
    "gcn": {"hidden": 16, "dropout": 0.5, "lr": 0.01},
    "cheb": {"hidden": 16, "dropout": 0.5, "lr": 0.01},
    "gat": {"hidden": 8, "dropout": 0.6, "lr": 0.005},
}


def make_conv(kind: str, n_in: int, n_out: int, *, heads: int = 1, concat: bool = True, dropout: float = 0.0,
              k: int = 2) -> nn.Module:  # fmt: skip
    """A ``torch_geometric`` conv layer: ``GCNConv``, ``GATConv`` (``heads``, attention ``dropout``) or ``ChebConv``."""
    from torch_geometric.nn import ChebConv, GATConv, GCNConv

    if kind == "gcn":
        return GCNConv(n_in, n_out, cached=False)
    if kind == "gat":
        return GATConv(n_in, n_out, heads=heads, concat=concat, dropout=dropout)
    if kind == "cheb":
        return ChebConv(n_in, n_out, K=k)
    raise ValueError(f"conv must be one of {CONVS}, got {kind!r}")


class GraphBlock(nn.Module):
    """One hidden layer: ``activation(conv(dropout(x), edge_index))``; DFA's feedback arrives at its output."""

    def __init__(self, conv: nn.Module, activation: nn.Module, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.conv = conv
        self.activation = activation

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        return self.activation(self.conv(self.dropout(x), edge_index))


class GraphNet(pl.LightningModule):
    """A node classifier of ``layers`` graph convolutions (the last one is the output); logs accuracies in %.

    Args:
        conv: ``"gcn"``, ``"gat"`` or ``"cheb"``.
        hidden: hidden width (per head for GAT); ``None``: the paper default (16, GAT 8).
        layers: number of conv layers (``layers - 1`` hidden blocks).
        heads: GAT attention heads in the hidden layers (the output layer has one).
        k: Chebyshev filter size of ``ChebConv``.
        dropout: dropout on each conv's input (and on GAT's attention); ``None``: paper default (0.5, GAT 0.6).
        lr: Adam learning rate; ``None``: paper default (0.01, GAT 0.005).
        weight_decay: Adam weight decay.
        num_features, num_classes: linked from the data module by the CLI.
        keep_best: restore, when ``fit`` ends, the weights of the best validation accuracy (early stopping on
            the validation set, as the GCN paper's protocol; validate every few epochs to make it useful).
        propagate_feedback: under DFA, pass each feedback signal through the graph's normalised adjacency
            (``A^T B e``, :meth:`propagate_feedback`) before it enters its block: the error, known only at the
            labelled nodes, reaches their neighbours as backprop's aggregation would carry it. The adjacency is
            the input graph, not a learned weight, so this is no weight transport. Read only by ``lightning_dfa``.
    """

    def __init__(
        self,
        conv: str = "gcn",
        hidden: int | None = None,
        layers: int = 2,
        heads: int = 8,
        k: int = 2,
        dropout: float | None = None,
        lr: float | None = None,
        weight_decay: float = 5e-4,
        num_features: int = 1433,
        num_classes: int = 7,
        keep_best: bool = False,
        propagate_feedback: bool = True,
    ) -> None:
        super().__init__()
        if conv not in CONVS:
            raise ValueError(f"conv must be one of {CONVS}, got {conv!r}")
        if layers < 2:
            raise ValueError("layers must be at least 2 (one hidden conv and the output conv)")
        defaults = CONV_DEFAULTS[conv]
        hidden = defaults["hidden"] if hidden is None else hidden
        dropout = defaults["dropout"] if dropout is None else dropout
        self.save_hyperparameters()
        self.lr = defaults["lr"] if lr is None else lr
        width = hidden * heads if conv == "gat" else hidden
        att = {"heads": heads, "dropout": dropout} if conv == "gat" else {}
        blocks = []
        d = num_features
        for _ in range(layers - 1):
            act: nn.Module = nn.ELU() if conv == "gat" else nn.ReLU()
            blocks.append(GraphBlock(make_conv(conv, d, hidden, k=k, **att), act, dropout))
            d = width
        self.blocks = nn.ModuleList(blocks)
        self.out_dropout = nn.Dropout(dropout)
        out_att = {"heads": 1, "concat": False, "dropout": dropout} if conv == "gat" else {}
        self.out = make_conv(conv, d, num_classes, k=k, **out_att)

    def configure_dfa(self) -> dict[str, Any]:
        """Where DFA's feedback goes (read only by ``lightning_dfa``): after each hidden block; output ``out``;
        with ``propagate_feedback``, through the graph (:meth:`propagate_feedback`)."""
        options: dict[str, Any] = {"blocks": ["blocks.*"], "output": "out"}
        if self.hparams.get("propagate_feedback", True):
            options["feedback_transform"] = self.propagate_feedback
        return options

    def propagate_feedback(self, point: str, feedback: torch.Tensor) -> torch.Tensor:
        """``A^T feedback`` over the nodes, ``A`` the symmetric-normalised adjacency with self-loops (GCN's) of the
        graph of the latest forward: what the output conv's aggregation does to backprop's gradient."""
        edge_index, n = self._graph
        if feedback.shape[0] != n:
            return feedback
        from torch_geometric.nn.conv.gcn_conv import gcn_norm

        (src, dst), weight = gcn_norm(edge_index, None, n, add_self_loops=True, dtype=feedback.dtype)
        shape = (-1,) + (1,) * (feedback.dim() - 1)
        return torch.zeros_like(feedback).index_add_(0, src, feedback[dst] * weight.view(shape))

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        self._graph = (edge_index, x.shape[0])
        for block in self.blocks:
            x = block(x, edge_index)
        return self.out(self.out_dropout(x), edge_index)

    def training_step(self, data: Any, batch_idx: int) -> torch.Tensor:
        logits = self(data.x, data.edge_index)
        loss = nn.functional.cross_entropy(logits[data.train_mask], data.y[data.train_mask])
        self.log("train_loss", loss, batch_size=1)
        return loss

    def _evaluate(self, data: Any, stages: Sequence[str]) -> None:
        logits = self(data.x, data.edge_index)
        pred = logits.argmax(-1)
        for stage in stages:
            mask = getattr(data, f"{stage}_mask")
            self.log(f"{stage}_acc", 100.0 * (pred[mask] == data.y[mask]).float().mean(), batch_size=1, prog_bar=True)
            self.log(f"{stage}_loss", nn.functional.cross_entropy(logits[mask], data.y[mask]), batch_size=1)

    def validation_step(self, data: Any, batch_idx: int) -> None:
        self._evaluate(data, ("val",))

    def test_step(self, data: Any, batch_idx: int) -> None:
        self._evaluate(data, ("test",))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.hparams.weight_decay)

    def configure_callbacks(self) -> list[pl.Callback]:
        return [KeepBest("val_acc", higher_is_better=True)] if self.hparams.keep_best else []


# ------------------------------------------------------------------------------------------- CLI
def main(args: Any = None) -> Any:
    """LightningCLI entry point; prints the test accuracy after ``fit``."""
    from pytorch_lightning.cli import LightningCLI

    import lightning_dfa  # noqa: F401  (registers strategy="dfa")

    class GraphsCLI(LightningCLI):
        def add_arguments_to_parser(self, parser: Any) -> None:
            for key in ("num_features", "num_classes"):
                parser.link_arguments(f"data.{key}", f"model.{key}", apply_on="instantiate")
            parser.set_defaults({"trainer.max_epochs": 200, "trainer.log_every_n_steps": 1})

        def after_fit(self) -> None:
            if not self.trainer.fast_dev_run:
                results = self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
                if results:
                    print(f"test accuracy: {results[0]['test_acc']:.2f}% on {self.datamodule.describe()}")

    return GraphsCLI(GraphNet, GraphDataModule, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
