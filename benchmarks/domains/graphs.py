"""Quality runs of the graph example (:mod:`examples.graphs`): GCN, GAT and ChebConv on a Cora-shaped CSBM."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

from benchmarks.quality import ARMS, fit_arm
from examples.data.graphs import GraphDataModule, linear_references
from examples.graphs import CONVS, GraphNet

TITLE = "Graph convolutions (GCN, GAT, ChebConv) on a Cora-shaped CSBM"
STEPS = 200
SEEDS = (0, 1)
PARTS = CONVS
BEST_VALIDATION = True

NOTE = (
    "Offline contextual stochastic block model shaped like Cora (`examples/data/graphs.py`, graph seed 0: 2708 "
    "nodes, 5281 edges, 7 classes, 1433 binary features, 69% same-class edges; public-style split 140 train / 500 "
    "validation / 1000 test). Each conv is two layers with the original papers' settings (GCN/ChebConv K=2: hidden "
    "16, dropout 0.5, Adam lr 0.01; GAT: 8 heads x 8, dropout 0.6, lr 0.005; weight decay 5e-4), full batch, 200 "
    "steps; validation every 5 steps and the weights of the best validation accuracy are tested (early stopping "
    "without stopping). DFA's feedback passes through the graph's normalised adjacency before it enters the hidden "
    "block (`GraphNet(propagate_feedback=True)`, the default: `A^T B e`, no learned weight involved); the row "
    "'dfa, feedback not propagated' is the same DFA without it. Metric: test accuracy (%), higher is better: mean "
    "over model seeds 0 and 1 (the `seeds` column lists each). The reference rows are logistic regressions on the "
    "features alone and on two-hop propagated features. The curve is the validation accuracy of seed 0."
)

FINDINGS = """\
**What the numbers show.** With its feedback propagated through the graph, DFA matches backprop on GCN, is 1.7
points behind on GAT and ahead on ChebConv (backprop's ChebConv is the weakest of the three at these papers'
settings), and is 43 to 61 points above the shallow baseline. Two seeds per arm (column `seeds`).

What makes the difference is **propagating the feedback through the graph.** In a graph net the error exists only
at the 140 labelled nodes. Backprop carries it to their neighbours through the output conv's aggregation
(`A^T e W^T`); plain DFA gives a hidden node feedback only if the node itself is labelled, so most hidden units
never learn. `GraphNet(propagate_feedback=True)` hands the engine a `feedback_transform` that applies the graph's
symmetric-normalised adjacency (GCN's, with self-loops) to each feedback signal. The adjacency is the input graph,
not a learned weight, so this is no weight transport (for GAT it stands in for the learned attention coefficients).
The rows "dfa, feedback not propagated" show the same runs without it: 2.4 to 11.5 points lower.

The shallow arm trains only the output conv on top of the fixed random hidden conv: with the papers' hidden width
(16 features; GAT 8 heads x 8) these few random features carry little of the 1433-word input. That is the shallow
baseline of this architecture as published, not a weakened one.

**What we tried that did not work** (DFA without the propagation, seeds 0 / 1, validation / test accuracy %, runs
of `benchmarks.quality.fit_arm` with the option named, not stored): ChebConv with dropout 0.2: 63.4 / 61.7,
62.8 / 61.5; lr 0.02: 65.8 / 66.8, 66.2 / 64.6; hidden 64: 69.6 / 70.0, 66.8 / 69.1; GAT with dropout 0.3:
73.4 / 72.4, 73.2 / 72.8; lr 0.01: 74.8 / 75.5, 70.4 / 70.4; hidden 16 per head: 74.2 / 74.4, 71.2 / 71.7. None
closed the gap; the propagation did. Testing the weights after the last step instead of the best validation
weights costs every arm 0.5 to 3.5 points. Each net has a single feedback point, so `distinct` changes nothing.
"""


def _table(prefix: str, conv: str) -> str:
    return f"{prefix}, {conv.upper() if conv != 'cheb' else 'ChebConv'}"


def quality_runs(
    quick: bool, seed: int = 0, arms: Sequence[str] = ARMS, part: str | None = None
) -> list[dict[str, Any]]:
    """GCN, GAT and ChebConv in every arm (mean of 2 seeds), plus the same DFA without the graph propagation.

    ``quick``: a tiny CSBM, 3 steps, one seed (a smoke test). ``part``: only one conv (``"gcn"``...).
    """
    dataset = "tiny_csbm" if quick else "csbm"
    seeds = (seed,) if quick else tuple(seed + s for s in SEEDS)
    rows: list[dict[str, Any]] = []
    prefix = "tiny CSBM (quick)" if quick else "CSBM (Cora-shaped)"
    for conv in CONVS if part is None else (part,):
        runs: list[tuple[str, str, dict[str, Any]]] = [(arm, arm, {}) for arm in arms]
        if not quick and "dfa" in arms:  # the same DFA without the graph propagation of its feedback
            runs.append(("dfa, feedback not propagated", "dfa", {"propagate_feedback": False}))
        for label, arm, extra in runs:
            values, steps, wall, curve = [], 0, 0.0, None
            for s in seeds:

                def make_model(dm: GraphDataModule, conv: str = conv, extra: dict = extra) -> GraphNet:
                    return GraphNet(conv=conv, num_features=dm.num_features, num_classes=dm.num_classes,
                                    keep_best=True, **extra)  # fmt: skip

                result = fit_arm(
                    make_model,
                    lambda: GraphDataModule(dataset=dataset, seed=0),
                    arm,
                    seed=s,
                    max_steps=3 if quick else STEPS,
                    max_epochs=-1,
                    curve_metric="val_acc",
                    test_metrics=("test_acc",),
                    trainer_options={"log_every_n_steps": 1, "check_val_every_n_epoch": 1 if quick else 5},
                )
                values.append(result["metrics"]["test_acc"])
                steps = result["steps"]
                wall += result["wall_s"]
                curve = curve if curve is not None else result["curve"]
            rows.append(
                {
                    "table": _table(prefix, conv),
                    "arm": label,
                    "metric": "test accuracy (%)",
                    "value": statistics.mean(values),
                    "higher_is_better": True,
                    "steps": steps,
                    "wall_s": wall / len(seeds),
                    "curve": curve,
                    "curve_metric": "validation accuracy (%)",
                    "extra": {
                        "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
                        "seeds": " / ".join(f"{v:.1f}" for v in values),
                    },
                    "config": "paper defaults, full batch",
                }
            )
        if not quick and "bp" in arms:
            rows += _reference_rows(GraphDataModule(dataset=dataset, seed=0), _table(prefix, conv))
    return rows


def _reference_rows(dm: GraphDataModule, table: str) -> list[dict[str, Any]]:
    start = time.perf_counter()
    refs = linear_references(dm.load(), (0, 2))
    wall = (time.perf_counter() - start) / 2
    names = {0: "ref: logistic regression on X", 2: "ref: logistic regression on S^2 X"}
    return [
        {"table": table, "arm": names[k], "metric": "test accuracy (%)", "value": v, "higher_is_better": True,
         "steps": 0, "wall_s": wall, "config": "sklearn, C=1"}
        for k, v in refs.items()
    ]  # fmt: skip
