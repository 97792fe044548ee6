"""Recommender systems trained with backprop, DFA or the shallow baseline by flag only.

Click-through models (BCE on the synthetic Criteo-shaped log of :mod:`examples.data.clicks`):

* :class:`DeepFM`: first-order terms + factorisation machine + an MLP on the concatenated field embeddings;
* :class:`DCN`: a cross network and an MLP side by side on the embeddings (Deep & Cross Network);
* :class:`AutoInt`: multi-head self-attention layers over the field embeddings.

A rating model (:class:`RatingMLP`, MSE on MovieLens latest-small from :mod:`examples.data.movielens`), whose MLP
also reads an item-item neighbourhood (KNN-baseline) feature of each pair computed from the training ratings.

The models know nothing of DFA. Where feedback goes (as in the DFA paper): after each Linear-BN-ReLU-Dropout
group (each :class:`LinearBlock`), found automatically in the MLP ``nn.Sequential``; DCN and AutoInt also get a
feedback point on the field embeddings and after each cross/attention layer, which they declare with the
``configure_dfa()`` method. There is a single logit, so the error has rank 1: every feedback point receives a
fixed random direction times the same scalar error per example.

Usage::

    python -m examples.recommenders fit --model=DeepFM --data=ClickDataModule --trainer.strategy=dfa
    python -m examples.recommenders fit --model=DCN --data=ClickDataModule \\
        --trainer.strategy=lightning_dfa.DFAStrategy --trainer.strategy.mode=shallow
    python -m examples.recommenders fit --model=RatingMLP --data=MovieLensDataModule --trainer.strategy=dfa

(``--trainer.strategy=auto`` is plain backprop.) The data modules' ``cardinalities`` / ``n_users`` / ``n_items``
are linked to the models automatically. After ``fit`` the weights of the best validation epoch are tested and the
last line printed is the test metric (AUC and logloss, or RMSE) with the data set. Measured results:
``docs/results_recommenders.md``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from examples.callbacks import KeepBest
from examples.data.clicks import ClickDataModule, auc
from examples.data.movielens import MovieLensDataModule


# ---------------------------------------------------------------------------------------------- building blocks
class LinearBlock(nn.Sequential):
    """Linear -> BatchNorm -> ReLU -> Dropout: one feedback group."""

    def __init__(self, n_in: int, n_out: int, dropout: float = 0.0) -> None:
        super().__init__(nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out), nn.ReLU(), nn.Dropout(dropout))


def mlp(n_in: int, hidden: tuple[int, ...] | list[int], dropout: float, n_out: int | None = None) -> nn.Sequential:
    """A Sequential of :class:`LinearBlock` groups, plus a final Linear if ``n_out`` is given."""
    layers: list[nn.Module] = []
    d = n_in
    for h in hidden:
        layers.append(LinearBlock(d, h, dropout))
        d = h
    if n_out is not None:
        layers.append(nn.Linear(d, n_out))
    return nn.Sequential(*layers)


class FieldEmbedding(nn.Module):
    """Embeds every field of an impression into ``dim`` dimensions and concatenates them: ``[B, F * dim]``.

    Categorical fields look up one shared table (with per-field offsets); a dense field ``j`` with value ``x_j``
    maps to ``x_j * v_j`` (as in DeepFM/AutoInt). ``F = n_dense + len(cardinalities)``.
    """

    def __init__(self, cardinalities: list[int], n_dense: int, dim: int) -> None:
        super().__init__()
        self.n_fields = n_dense + len(cardinalities)
        self.dim = dim
        self.register_buffer("offsets", torch.tensor([0, *np.cumsum(cardinalities)[:-1].tolist()]), persistent=False)
        self.table = nn.Embedding(int(sum(cardinalities)), dim)
        self.dense = nn.Parameter(torch.empty(n_dense, dim))
        nn.init.normal_(self.table.weight, std=0.01)
        nn.init.normal_(self.dense, std=0.01)

    def forward(self, dense: torch.Tensor, cat: torch.Tensor) -> torch.Tensor:
        cat_emb = self.table(cat + self.offsets)  # [B, n_cat, dim]
        dense_emb = dense.unsqueeze(-1) * self.dense  # [B, n_dense, dim]
        return torch.cat([dense_emb, cat_emb], dim=1).flatten(1)


class FirstOrder(nn.Module):
    """The logistic-regression part: a weight per category and per dense feature, summed to one logit."""

    def __init__(self, cardinalities: list[int], n_dense: int) -> None:
        super().__init__()
        self.register_buffer("offsets", torch.tensor([0, *np.cumsum(cardinalities)[:-1].tolist()]), persistent=False)
        self.weight = nn.Embedding(int(sum(cardinalities)), 1)
        nn.init.zeros_(self.weight.weight)
        self.dense = nn.Linear(n_dense, 1)

    def forward(self, dense: torch.Tensor, cat: torch.Tensor) -> torch.Tensor:
        return self.weight(cat + self.offsets).sum(dim=(1, 2)) + self.dense(dense).squeeze(-1)


class CrossLayer(nn.Module):
    """One layer of the DCN cross network: ``x_{l+1} = x_0 (x_l . w) + b + x_l``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w = nn.Linear(dim, 1, bias=False)
        self.b = nn.Parameter(torch.zeros(dim))
        nn.init.normal_(self.w.weight, std=1.0 / math.sqrt(dim))

    def forward(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return x0 * self.w(x) + self.b + x


class InteractingLayer(nn.Module):
    """AutoInt's interacting layer: multi-head self-attention over the fields, a residual projection and ReLU.

    Takes and returns fields concatenated (``[B, F * d]``), so each field of the output is its own slice.
    """

    def __init__(self, n_fields: int, d_in: int, d_out: int, heads: int = 2) -> None:
        super().__init__()
        if d_out % heads:
            raise ValueError(f"d_out={d_out} must be divisible by heads={heads}.")
        self.n_fields, self.d_in, self.d_out, self.heads = n_fields, d_in, d_out, heads
        self.qkv = nn.Linear(d_in, 3 * d_out, bias=False)
        self.res = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        fields = x.view(b, self.n_fields, self.d_in)
        q, k, v = self.qkv(fields).view(b, self.n_fields, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        att = nn.functional.scaled_dot_product_attention(q, k, v)  # [B, heads, F, d/heads]
        att = att.transpose(1, 2).reshape(b, self.n_fields, self.d_out)
        return torch.relu(att + self.res(fields)).flatten(1)


# ---------------------------------------------------------------------------------------------- click models
class _EvalStages(pl.LightningModule):
    """Validation and test share one path: ``_eval_step(batch, stage)`` per batch, ``_eval_end(stage)`` per epoch."""

    def _eval_step(self, batch: Any, stage: str) -> None:
        raise NotImplementedError

    def _eval_end(self, stage: str) -> None:
        raise NotImplementedError

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")


class ClickModel(_EvalStages):
    """Shared training loop of the click models: BCE with logits, Adam; logs ``val_auc``/``val_logloss``.

    Args:
        cardinalities: buckets per categorical field (linked from the data module).
        n_dense: number of dense fields.
        embed_dim: embedding size per field.
        hidden: widths of the MLP's Linear-BN-ReLU-Dropout groups.
        dropout: dropout in those groups.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
    """

    def __init__(
        self,
        cardinalities: list[int] | None = None,
        n_dense: int = 13,
        embed_dim: int = 8,
        hidden: list[int] | None = None,
        dropout: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.hidden = list(hidden) if hidden is not None else [256, 128]
        self._eval: dict[str, list[torch.Tensor]] = {}
        self.last_metrics: dict[str, float] = {}
        self.built = False
        if cardinalities is not None:
            self._build_with(list(cardinalities))

    def _build_with(self, cardinalities: list[int]) -> None:
        self.cardinalities = [int(c) for c in cardinalities]
        self.hparams["cardinalities"] = self.cardinalities
        self.n_fields = self.hparams.n_dense + len(self.cardinalities)
        self.build()
        self.built = True

    def build(self) -> None:
        """Create the layers (``self.cardinalities`` and ``self.n_fields`` are known here)."""
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        """Without ``cardinalities``, take them from the Trainer's data module (so the CLI needs no linking)."""
        if not self.built:
            self._build_with(self.trainer.datamodule.cardinalities)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        dense, cat, y = batch
        loss = nn.functional.binary_cross_entropy_with_logits(self(dense, cat), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def _eval_step(self, batch: Any, stage: str) -> None:
        dense, cat, y = batch
        self._eval.setdefault(stage, []).append(torch.stack([torch.sigmoid(self(dense, cat)), y], 1))

    def _eval_end(self, stage: str) -> None:
        rows = self._eval.pop(stage, [])
        if not rows:
            return
        pred, y = torch.cat(rows).double().cpu().numpy().T
        p = np.clip(pred, 1e-7, 1 - 1e-7)
        metrics = {
            f"{stage}_auc": auc(pred, y),
            f"{stage}_logloss": float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()),
        }
        self.last_metrics.update(metrics)
        self.log_dict(metrics, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def configure_callbacks(self) -> list[pl.Callback]:
        """Restore the weights of the best validation AUC at the end of ``fit``."""
        return [KeepBest("val_auc", higher_is_better=True)]


class DeepFM(ClickModel):
    """DeepFM: ``logit = first-order + FM(embeddings) + MLP(embeddings)``.

    Feedback (found automatically): after each Linear-BN-ReLU-Dropout group of ``mlp``; the embeddings get the
    DFA signal at the MLP's input plus the true gradient of the (parameter-free) FM term, which sits, like the
    first-order term, after the blocks.
    """

    def build(self) -> None:
        k = self.hparams.embed_dim
        self.embed = FieldEmbedding(self.cardinalities, self.hparams.n_dense, k)
        self.linear = FirstOrder(self.cardinalities, self.hparams.n_dense)
        self.mlp = mlp(self.n_fields * k, self.hidden, self.hparams.dropout, n_out=1)

    def forward(self, dense: torch.Tensor, cat: torch.Tensor) -> torch.Tensor:
        emb = self.embed(dense, cat)
        fields = emb.view(emb.shape[0], self.n_fields, -1)
        fm = 0.5 * (fields.sum(1).pow(2) - fields.pow(2).sum(1)).sum(1)
        return self.linear(dense, cat) + fm + self.mlp(emb).squeeze(-1)


class DCN(ClickModel):
    """Deep & Cross Network: a cross network and an MLP on the embeddings, joined by a linear head.

    Feedback (declared in ``configure_dfa``): on the embeddings, after each cross layer and after each
    Linear-BN-ReLU-Dropout group; the head gets its true gradient.

    Args:
        cross_layers: number of cross layers.
    """

    def __init__(self, cross_layers: int = 3, **kwargs: Any) -> None:
        self.cross_layers = cross_layers
        super().__init__(**kwargs)

    def build(self) -> None:
        k = self.hparams.embed_dim
        d = self.n_fields * k
        self.embed = FieldEmbedding(self.cardinalities, self.hparams.n_dense, k)
        self.cross = nn.ModuleList([CrossLayer(d) for _ in range(self.cross_layers)])
        self.mlp = mlp(d, self.hidden, self.hparams.dropout)
        self.head = nn.Linear(d + self.hidden[-1], 1)

    def configure_dfa(self) -> dict[str, Any]:
        """Where DFA feedback goes: the embeddings, each cross layer, each MLP group; the head is the output."""
        return {"blocks": ["embed", "cross.*", "mlp.*"], "output": "head"}

    def forward(self, dense: torch.Tensor, cat: torch.Tensor) -> torch.Tensor:
        x0 = self.embed(dense, cat)
        x = x0
        for layer in self.cross:
            x = layer(x, x0)
        return self.head(torch.cat([x, self.mlp(x0)], dim=1)).squeeze(-1)


class AutoInt(ClickModel):
    """AutoInt: self-attention layers over the field embeddings, then a linear head on all fields.

    Feedback (declared in ``configure_dfa``): on the embeddings and after each interacting layer.

    Args:
        attention_layers: number of interacting layers.
        attention_dim: output size per field of each layer.
        heads: attention heads.
    """

    def __init__(self, attention_layers: int = 3, attention_dim: int = 16, heads: int = 2, **kwargs: Any) -> None:
        self.attention = (attention_layers, attention_dim, heads)
        super().__init__(**kwargs)

    def build(self) -> None:
        k = self.hparams.embed_dim
        n_layers, dim, heads = self.attention
        self.embed = FieldEmbedding(self.cardinalities, self.hparams.n_dense, k)
        dims = [k] + [dim] * n_layers
        self.layers = nn.ModuleList(
            [InteractingLayer(self.n_fields, dims[i], dims[i + 1], heads) for i in range(n_layers)]
        )
        self.linear = FirstOrder(self.cardinalities, self.hparams.n_dense)
        self.head = nn.Linear(self.n_fields * dim, 1)

    def configure_dfa(self) -> dict[str, Any]:
        """Where DFA feedback goes: the embeddings and each interacting layer; the head is the output."""
        return {"blocks": ["embed", "layers.*"], "output": "head"}

    def forward(self, dense: torch.Tensor, cat: torch.Tensor) -> torch.Tensor:
        x = self.embed(dense, cat)
        for layer in self.layers:
            x = layer(x)
        return self.head(x).squeeze(-1) + self.linear(dense, cat)


# ---------------------------------------------------------------------------------------------- rating model
class RatingMLP(_EvalStages):
    """Rating prediction: ``r = mean + b_u + b_i + MLP([p_u, q_i, p_u * q_i, knn_ui])`` trained with MSE.

    ``knn_ui`` (optional, ``neighbours=k``) is the item-item neighbourhood signal of the pair: the KNN-baseline
    residual of the user's most similar rated items and its support, precomputed from the training ratings.

    Feedback (found automatically): after each Linear-BN-ReLU-Dropout group of ``mlp``; the user and item
    embeddings learn from the feedback point at the MLP's input. The biases sit after the blocks (true gradient),
    so the shallow arm is a user+item bias model on top of a fixed random MLP.

    Args:
        n_users, n_items: table sizes (linked from the data module).
        global_mean: mean training rating (linked from the data module).
        embed_dim: user/item embedding size.
        hidden: widths of the MLP groups.
        dropout: dropout in the MLP groups.
        lr: Adam learning rate.
        weight_decay: Adam weight decay (L2 on every parameter).
        reg: L2 penalty on the embeddings and biases of the rows in the batch, per rating (as in matrix
            factorisation); it reaches them directly, not through the MLP.
        baseline: start from the data module's regularised bias model (``baseline_biases()``) and keep it
            fixed: the MLP learns the user-item interaction on top of it.
        gmf: add a generalised matrix-factorisation term ``w . (p_u * q_i)`` (NeuMF's GMF branch) beside the MLP.
            Like DeepFM's FM term it reads the embeddings directly, not through the blocks, so under DFA it
            takes its true gradient (one layer from the output, as DFA's output layer) while the MLP and the
            embeddings' MLP input learn from the feedback.
        neighbours: if ``k > 0``, two more MLP inputs per pair: the item-item KNN-baseline residual of ``u``'s
            ``k`` most similar rated items and ``log(1 + support)``
            (:func:`examples.data.movielens.neighbour_features`: training ratings only, ``r_ui`` left out of a
            training pair's own features). They come from the data module (``neighbour_table()``) or
            :meth:`load_neighbours`, as a table of pairs; a pair outside it gets ``[0, 0]``. They enter the MLP
            like the embeddings, before the first feedback point: under DFA the MLP learns from the feedback how
            much of the neighbourhood signal to trust.
        shrink: similarity shrinkage of those features.
    """

    def __init__(
        self,
        n_users: int | None = None,
        n_items: int | None = None,
        global_mean: float = 3.5,
        embed_dim: int = 32,
        hidden: list[int] | None = None,
        dropout: float = 0.2,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        reg: float = 0.0,
        baseline: bool = False,
        gmf: bool = False,
        neighbours: int = 0,
        shrink: float = 100.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._sq: dict[str, list[torch.Tensor]] = {}
        self.last_metrics: dict[str, float] = {}
        self.built = False
        self.baseline_loaded = False
        self.neighbour_keys: torch.Tensor | None
        self.neighbour_values: torch.Tensor | None
        self.register_buffer("neighbour_keys", None, persistent=False)  # set by load_neighbours()
        self.register_buffer("neighbour_values", None, persistent=False)
        if n_users is not None and n_items is not None:
            self._build(n_users, n_items, global_mean)

    def setup(self, stage: str) -> None:
        """Without ``n_users``/``n_items``, take them and the mean rating from the Trainer's data module."""
        if not self.built:
            dm = self.trainer.datamodule
            self._build(dm.n_users, dm.n_items, dm.global_mean)
        if self.hparams.baseline and not self.baseline_loaded:
            self.load_baseline(*self.trainer.datamodule.baseline_biases())
        if self.hparams.get("neighbours") and self.neighbour_keys is None:
            table = getattr(self.trainer.datamodule, "neighbour_table", None)
            if table is None:
                raise RuntimeError(
                    f"RatingMLP(neighbours={self.hparams.neighbours}) needs its neighbourhood features: train with "
                    "MovieLensDataModule (its neighbour_table()), or call model.load_neighbours(keys, features) "
                    "with examples.data.movielens.neighbour_features of your ratings before fit."
                )
            self.load_neighbours(*table(self.hparams.neighbours, self.hparams.shrink))

    def load_neighbours(self, keys: np.ndarray, features: np.ndarray) -> None:
        """Set the neighbourhood features: ``keys = user * n_items + item`` (sorted), ``features [N, 2]``."""
        device = self.mean.device if self.built else None
        self.neighbour_keys = torch.as_tensor(keys, dtype=torch.long, device=device)
        self.neighbour_values = torch.as_tensor(features, dtype=torch.float32, device=device)

    def neighbour_inputs(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``[B, 2]``: the KNN residual and ``log(1 + support)`` of each pair (zeros for pairs not in the table)."""
        if self.neighbour_keys is None or len(self.neighbour_keys) == 0:
            raise RuntimeError("RatingMLP(neighbours=k) needs load_neighbours() or a data module's neighbour_table().")
        keys, values = self.neighbour_keys, self.neighbour_values
        assert values is not None
        query = users.long() * self.hparams.n_items + items.long()
        pos = torch.searchsorted(keys, query).clamp(max=len(keys) - 1)
        found = (keys[pos] == query).unsqueeze(1)
        f = torch.where(found, values[pos], torch.zeros((), device=users.device))
        return torch.stack([f[:, 0], torch.log1p(f[:, 1])], dim=1)

    def load_baseline(self, mean: float, user_bias: np.ndarray, item_bias: np.ndarray) -> None:
        """Fix ``mean``, ``b_u``, ``b_i`` to a fitted bias model (the MLP then learns the rest)."""
        with torch.no_grad():
            self.mean.fill_(float(mean))
            self.user_bias.weight.copy_(torch.as_tensor(user_bias, dtype=torch.float32)[:, None])
            self.item_bias.weight.copy_(torch.as_tensor(item_bias, dtype=torch.float32)[:, None])
        self.user_bias.weight.requires_grad_(False)
        self.item_bias.weight.requires_grad_(False)
        self.baseline_loaded = True

    def _build(self, n_users: int, n_items: int, global_mean: float) -> None:
        h = self.hparams
        h["n_users"], h["n_items"], h["global_mean"] = int(n_users), int(n_items), float(global_mean)
        k = h.embed_dim
        self.user = nn.Embedding(n_users, k)
        self.item = nn.Embedding(n_items, k)
        nn.init.normal_(self.user.weight, std=0.1)
        nn.init.normal_(self.item.weight, std=0.1)
        n_extra = 2 if h.get("neighbours") else 0
        self.mlp = mlp(3 * k + n_extra, list(h.hidden) if h.hidden is not None else [64, 32], h.dropout, n_out=1)
        self.user_bias = nn.Embedding(n_users, 1)
        self.item_bias = nn.Embedding(n_items, 1)
        nn.init.zeros_(self.user_bias.weight)
        nn.init.zeros_(self.item_bias.weight)
        self.register_buffer("mean", torch.tensor(float(global_mean)))
        self.gmf = nn.Linear(k, 1, bias=False) if h.get("gmf") else None
        if self.gmf is not None:
            nn.init.ones_(self.gmf.weight)  # starts as the plain dot product p_u . q_i
        self.built = True

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        p, q = self.user(users), self.item(items)
        inputs = [p, q, p * q]
        if self.hparams.get("neighbours"):
            inputs.append(self.neighbour_inputs(users, items))
        deep = self.mlp(torch.cat(inputs, dim=1)).squeeze(-1)
        if self.gmf is not None:
            deep = deep + self.gmf(p * q).squeeze(-1)
        return self.mean + self.user_bias(users).squeeze(-1) + self.item_bias(items).squeeze(-1) + deep

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        users, items, r = batch
        loss = nn.functional.mse_loss(self(users, items), r)
        self.log("train_loss", loss, prog_bar=True)
        if self.hparams.reg:
            # classic matrix-factorisation L2: on the rows this batch uses, per rating
            rows = [self.user(users), self.item(items), self.user_bias(users), self.item_bias(items)]
            loss = loss + self.hparams.reg * sum(t.pow(2).sum(1).mean() for t in rows)
        return loss

    def _eval_step(self, batch: Any, stage: str) -> None:
        users, items, r = batch
        self._sq.setdefault(stage, []).append((self(users, items).clamp(0.5, 5.0) - r).pow(2))

    def _eval_end(self, stage: str) -> None:
        rows = self._sq.pop(stage, [])
        if rows:
            rmse = float(torch.cat(rows).mean().sqrt())
            self.last_metrics[f"{stage}_rmse"] = rmse
            self.log(f"{stage}_rmse", rmse, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def configure_callbacks(self) -> list[pl.Callback]:
        """Restore the weights of the best validation RMSE at the end of ``fit``."""
        return [KeepBest("val_rmse", higher_is_better=False)]


CLICK_MODELS = {"DeepFM": DeepFM, "DCN": DCN, "AutoInt": AutoInt}


def main(args: Any = None) -> Any:
    """LightningCLI entry point (``python -m examples.recommenders fit --model=DeepFM --data=ClickDataModule``);
    after ``fit`` it tests the weights of the best validation epoch and prints the test metrics last."""
    from pytorch_lightning.cli import LightningCLI

    import lightning_dfa  # noqa: F401  (registers strategy="dfa")

    class RecommendersCLI(LightningCLI):
        def add_arguments_to_parser(self, parser: Any) -> None:
            parser.set_defaults({"trainer.max_epochs": 2})  # the click models' budget (MovieLens: pass 8)

        def after_fit(self) -> None:
            if self.trainer.fast_dev_run:
                return
            results = self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
            metrics = {k[5:]: v for k, v in (results[0] if results else {}).items() if k.startswith("test_")}
            if metrics:
                text = ", ".join(f"test {k.upper() if k in ('auc', 'rmse') else k} {v:.4f}" for k, v in metrics.items())
                where = self.datamodule.describe() if hasattr(self.datamodule, "describe") else "the test split"
                print(f"{text} on {where} (weights of the best validation epoch)")

    return RecommendersCLI(
        pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, args=args
    )


__all__ = [
    "AutoInt",
    "ClickDataModule",
    "ClickModel",
    "DCN",
    "DeepFM",
    "MovieLensDataModule",
    "RatingMLP",
]

if __name__ == "__main__":
    main()
