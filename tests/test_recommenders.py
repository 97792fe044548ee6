"""Smoke tests of the recommender examples: every model in every arm on tiny synthetic data (CPU, no downloads)."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from examples.data import debian, movielens
from examples.data.clicks import ClickDataModule, auc, generate
from examples.recommenders import CLICK_MODELS, DCN, AutoInt, DeepFM, RatingMLP
from lightning_dfa import DFAStrategy, FeedbackEngine

TINY = dict(n=800, n_dense=3, n_cat=4, buckets=20, raw_ids=40, n_pairs=3, batch_size=64, seed=0)


def _trainer(arm: str, steps: int = 2) -> pl.Trainer:
    return pl.Trainer(
        strategy=DFAStrategy(mode=arm, verbose=False),
        max_steps=steps,
        max_epochs=1,
        limit_val_batches=1,
        val_check_interval=steps,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


@pytest.fixture(scope="module")
def clicks() -> ClickDataModule:
    dm = ClickDataModule(**TINY)
    dm.setup()
    return dm


def test_auc_matches_rank_definition() -> None:
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.3
    s = rng.random(300) + y * 0.5
    s[:20] = 0.25  # ties
    pos, neg = s[y], s[~y]
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert auc(s, y) == pytest.approx(pairwise, abs=1e-12)


def test_click_log_is_deterministic_and_oracle_beats_chance() -> None:
    a, b = (
        generate(**{k: v for k, v in TINY.items() if k != "batch_size"}),
        generate(**{k: v for k, v in TINY.items() if k != "batch_size"}),
    )
    assert np.array_equal(a.cat, b.cat) and np.array_equal(a.clicks, b.clicks)
    assert all(a.cat[:, f].max() < c for f, c in enumerate(a.cardinalities))
    assert 0.15 < a.click_rate < 0.35
    assert a.oracle_auc > 0.65


@pytest.mark.parametrize("name", list(CLICK_MODELS))
def test_click_models_train_in_every_arm(clicks: ClickDataModule, name: str) -> None:
    cls = CLICK_MODELS[name]
    hidden_weight = "layers.0.qkv.weight" if name == "AutoInt" else "mlp.0.0.weight"
    weights = {}
    for arm in ("bp", "dfa", "shallow"):
        pl.seed_everything(0, verbose=False)
        model = cls(cardinalities=clicks.cardinalities, n_dense=3, embed_dim=4, hidden=[16, 8], lr=1e-2)
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        trainer = _trainer(arm)
        trainer.fit(model, datamodule=clicks)
        assert trainer.global_step == 2
        assert 0.0 <= model.last_metrics["val_auc"] <= 1.0
        after = model.state_dict()
        weights[arm] = after
        first_hidden = hidden_weight
        if arm == "shallow":  # feedback-trained layers stay put; the head learns
            assert torch.equal(before[first_hidden], after[first_hidden])
        else:
            assert not torch.equal(before[first_hidden], after[first_hidden])
        if arm == "dfa":
            engine = trainer.strategy.dfa_engine
            keys = [p.key for p in engine.last_points]
            expected = {"DeepFM": ["mlp.0:in", "mlp.0", "mlp.1"], "DCN": ["embed", "cross.0", "cross.1", "cross.2",
                        "mlp.0", "mlp.1"], "AutoInt": ["embed", "layers.0", "layers.1", "layers.2"]}[name]  # fmt: skip
            assert keys == expected
    # DFA is not backprop in disguise
    assert not torch.allclose(weights["bp"][hidden_weight], weights["dfa"][hidden_weight])


def test_click_model_builds_from_datamodule(clicks: ClickDataModule) -> None:
    """Without cardinalities (as under LightningCLI) the model takes them from the Trainer's data module."""
    model = DCN(n_dense=3, embed_dim=4, hidden=[8], cross_layers=1)
    _trainer("dfa", steps=1).fit(model, datamodule=clicks)
    assert model.hparams.cardinalities == clicks.cardinalities
    assert isinstance(AutoInt(cardinalities=[3, 4], n_dense=1).head, torch.nn.Linear)
    assert isinstance(DeepFM(cardinalities=[3, 4], n_dense=1).mlp, torch.nn.Sequential)


def test_rating_model_every_arm_on_synthetic_ratings() -> None:
    ratings = movielens.synthetic_ratings(n=1500)
    dm = movielens.MovieLensDataModule(batch_size=64, ratings=ratings)
    base = movielens.bias_baseline(ratings)
    assert base["bias_rmse"] < base["mean_rmse"]
    for arm in ("bp", "dfa", "shallow"):
        pl.seed_everything(0, verbose=False)
        model = RatingMLP(embed_dim=4, hidden=[8, 4], lr=1e-2)
        before = model.state_dict() if model.built else None
        trainer = _trainer(arm, steps=3)
        trainer.fit(model, datamodule=dm)
        assert before is None and model.built and model.hparams.n_users == ratings.n_users
        assert np.isfinite(model.last_metrics["val_rmse"])
        if arm == "dfa":
            assert [p.key for p in trainer.strategy.dfa_engine.last_points] == ["mlp.0:in", "mlp.0", "mlp.1"]
    # the fixed-baseline variant starts from the regularised biases and keeps them
    model = RatingMLP(embed_dim=4, hidden=[8, 4], lr=1e-2, baseline=True)
    _trainer("dfa", steps=2).fit(model, datamodule=dm)
    mu, bu, bi = movielens.fit_biases(ratings)
    assert float(model.mean) == pytest.approx(mu)
    assert torch.allclose(model.item_bias.weight[:, 0], torch.as_tensor(bi, dtype=torch.float32))
    assert not model.user_bias.weight.requires_grad


def test_movielens_unavailable_says_how_to_get_it(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(debian.shutil, "which", lambda name: None)
    with pytest.raises(movielens.MovieLensUnavailable, match="r-cran-dslabs"):
        movielens.fetch(str(tmp_path))
    assert not (tmp_path / "ratings.npz").exists()


def test_quality_rows_quick() -> None:
    from benchmarks.domains.recommenders import quality_runs

    rows = quality_runs(quick=True, arms=("dfa",))
    tables = {r["table"] for r in rows}
    assert len(tables) == 4
    assert all(np.isfinite(r["value"]) for r in rows)
    assert {r["arm"] for r in rows} >= {"dfa", "oracle (true probabilities)", "reference: user+item biases"}


def test_rating_gmf_term_gets_its_true_gradient_under_dfa() -> None:
    """The GMF branch reads the embeddings directly (not through the blocks): like DeepFM's FM term, its weight
    gets backprop's gradient under DFA, while the MLP's first layer does not."""
    users, items = torch.tensor([0, 1, 2, 3]), torch.tensor([1, 2, 0, 4])
    ratings = torch.tensor([4.0, 3.0, 5.0, 1.0])
    grads = {}
    for mode in ("bp", "dfa"):
        torch.manual_seed(0)
        model = RatingMLP(n_users=5, n_items=6, embed_dim=4, hidden=[8, 4], dropout=0.0, gmf=True)
        engine = FeedbackEngine(mode=mode)
        engine.attach(model)
        nn.functional.mse_loss(model(users, items), ratings).backward()
        engine.end_backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert torch.allclose(grads["dfa"]["gmf.weight"], grads["bp"]["gmf.weight"])
    assert not torch.allclose(grads["dfa"]["mlp.0.0.weight"], grads["bp"]["mlp.0.0.weight"])


def test_neighbour_features_use_training_ratings_only_and_leave_the_rating_out() -> None:
    raw = movielens.synthetic_ratings(n=1500, seed=1)
    _, first = np.unique(raw.user * raw.n_items + raw.item, return_index=True)  # one rating per pair, as MovieLens
    ratings = movielens.split(raw.user[first], raw.item[first], raw.rating[first], 120, 120, 1)
    feats = movielens.neighbour_features(ratings, k=10)
    assert feats.shape == (len(first), 2) and np.isfinite(feats).all() and (feats[:, 1] >= 0).all()
    assert (feats[ratings.train, 1] > 0).mean() > 0.5  # most pairs have neighbours
    # validation and test ratings are never read: changing them changes nothing
    changed = movielens.Ratings(**{**ratings.__dict__, "rating": ratings.rating.copy()})
    held_out = np.concatenate([ratings.val, ratings.test])
    changed.rating[held_out] = 5.5 - changed.rating[held_out]
    assert np.array_equal(movielens.neighbour_features(changed, k=10), feats)
    # a training rating is left out of its own features: they equal those of the same pair held out (same biases)
    biases = movielens.fit_biases(ratings)
    full = movielens.neighbour_features(ratings, k=10, biases=biases)
    moved_others = 0
    for n in ratings.train[:20]:
        held = movielens.Ratings(**{**ratings.__dict__, "train": ratings.train[ratings.train != n],
                                    "val": np.append(ratings.val, n)})  # fmt: skip
        held_feats = movielens.neighbour_features(held, k=10, biases=biases)
        assert np.allclose(held_feats[n], full[n], atol=1e-5)
        others = np.nonzero(ratings.user == ratings.user[n])[0]
        moved_others += not np.allclose(held_feats[others[others != n]], full[others[others != n]], atol=1e-5)
    assert moved_others > 0  # r_ui does enter the features of the user's other pairs: the check above has teeth


def test_rating_neighbours_are_looked_up_and_reach_the_mlp_under_dfa() -> None:
    ratings = movielens.synthetic_ratings(n=1500)
    dm = movielens.MovieLensDataModule(batch_size=64, ratings=ratings)
    keys, values = dm.neighbour_table(k=10)
    assert np.all(np.diff(keys) >= 0) and len(keys) == 1500  # sorted (synthetic pairs may repeat)
    pl.seed_everything(0, verbose=False)
    model = RatingMLP(embed_dim=4, hidden=[8, 4], lr=1e-2, neighbours=10)
    trainer = _trainer("dfa", steps=3)
    trainer.fit(model, datamodule=dm)
    assert [p.key for p in trainer.strategy.dfa_engine.last_points] == ["mlp.0:in", "mlp.0", "mlp.1"]
    n = int(ratings.test[0])
    users, items = torch.tensor([ratings.user[n], 0]), torch.tensor([ratings.item[n], ratings.n_items + 5])
    got = model.neighbour_inputs(users, items)
    row = np.searchsorted(keys, ratings.user[n] * ratings.n_items + ratings.item[n])
    assert torch.allclose(got[0], torch.tensor([values[row, 0], np.log1p(values[row, 1])]))
    assert torch.equal(got[1], torch.zeros(2))  # a pair outside the table: no neighbourhood signal
    # DFA delivers feedback to the MLP's first layer, whose neighbourhood-input columns get a gradient
    model.zero_grad()
    engine = FeedbackEngine(mode="dfa")
    engine.attach(model)
    u, i, r = (t[:32] for t in dm.datasets["train"].tensors)
    nn.functional.mse_loss(model(u, i), r).backward()
    engine.end_backward()
    engine.detach()
    grad = model.mlp[0][0].weight.grad
    assert grad is not None and grad[:, -2:].abs().sum() > 0


@pytest.mark.parametrize("model", ["DeepFM", "RatingMLP"])
def test_cli_fit_prints_the_test_metric_last(model: str, tmp_path, monkeypatch, capsys) -> None:
    from examples import recommenders

    monkeypatch.setattr(movielens, "load", lambda *a, **k: movielens.synthetic_ratings(seed=0))
    data = (
        ["--data=ClickDataModule", "--data.n=3000", "--data.n_dense=3", "--data.n_cat=5", "--data.buckets=40",
         "--data.raw_ids=60", "--data.n_pairs=4", "--data.batch_size=64", "--model.n_dense=3"]
        if model == "DeepFM"
        else ["--data=MovieLensDataModule", "--data.batch_size=64"]
    )  # fmt: skip
    recommenders.main(
        ["fit", f"--model={model}", *data, "--model.embed_dim=4", "--model.hidden=[8,4]", "--trainer.strategy=dfa",
         "--trainer.max_steps=3", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
         "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}"]
    )  # fmt: skip
    last = capsys.readouterr().out.strip().splitlines()[-1]
    metric = "test AUC " if model == "DeepFM" else "test RMSE "
    name = "synthetic Criteo-shaped click log" if model == "DeepFM" else "MovieLens latest-small"
    assert last.startswith(metric) and name in last and "best validation epoch" in last
