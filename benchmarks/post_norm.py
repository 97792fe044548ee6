"""A hand-written ``nn.TransformerEncoder`` classifier under DFA: post-norm (PyTorch's default) and pre-norm, with
and without a LayerNorm on its input (as BERT's embeddings have), against backprop and the shallow baseline.

::

    python -m benchmarks.post_norm            # about 5 minutes on one CPU thread -> results/post_norm.json

Task: sequences of 12 tokens (vocabulary 16); the label says whether token 1 comes before token 2 (both appear
once, at random places), so the blocks must relate two positions. Model: token embedding and a learned position
table (scaled 0.1), 2 encoder layers (width 32, 4 heads, feed-forward 64, no dropout), mean over positions, a
linear head. AdamW, lr 3e-3, batch 32, 300 steps; the loss is the mean training loss of the last 20 steps (chance
0.693). Seeds 0, 1, 2.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.speed.machine import write_cpu_rows
from lightning_dfa import FeedbackEngine

RESULTS = Path(__file__).parent / "results" / "post_norm.json"


def order_batches(count: int = 64, batch: int = 32, length: int = 12, vocab: int = 16) -> list[tuple]:
    g = torch.Generator().manual_seed(123)
    out = []
    for _ in range(count):
        x = torch.randint(3, vocab, (batch, length), generator=g)
        y = torch.randint(0, 2, (batch,), generator=g)
        for i in range(batch):
            a, b = torch.randperm(length, generator=g)[:2].sort().values.tolist()
            x[i, a], x[i, b] = (1, 2) if y[i] == 1 else (2, 1)
        out.append((x, y))
    return out


class Classifier(nn.Module):
    def __init__(self, norm_first: bool, input_norm: bool) -> None:
        super().__init__()
        self.embed, self.pos = nn.Embedding(16, 32), nn.Parameter(torch.randn(1, 12, 32) * 0.1)
        self.norm = nn.LayerNorm(32) if input_norm else nn.Identity()
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.norm(self.embed(x) + self.pos[:, : x.shape[1]])).mean(1))


def train(mode: str, norm_first: bool, input_norm: bool, seed: int, steps: int = 300) -> float:
    torch.manual_seed(seed)
    model = Classifier(norm_first, input_norm)
    engine = FeedbackEngine(seed=seed, mode=mode)
    engine.attach(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches, losses = order_batches(), []
    for step in range(steps):
        x, y = batches[step % len(batches)]
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        engine.end_backward()
        opt.step()
        losses.append(loss.item())
    engine.detach()
    return round(sum(losses[-20:]) / 20, 3)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.post_norm", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=RESULTS, help=f"results JSON (default: {RESULTS})")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    start, rows = time.time(), []
    for norm_first in (False, True):
        for input_norm in (False, True):
            for seed in (int(s) for s in args.seeds.split(",")):
                row = {"norm_first": norm_first, "input_norm": input_norm, "seed": seed}
                row.update({mode: train(mode, norm_first, input_norm, seed) for mode in ("bp", "dfa", "shallow")})
                rows.append(row)
                print(row, flush=True)
    return write_cpu_rows(args.out, rows, start)


if __name__ == "__main__":
    main()
