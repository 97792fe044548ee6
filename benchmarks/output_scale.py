"""How the output layer's initial scale affects DFA: PyTorch's word-level LSTM language model, tied and untied, and a
tanh MLP classifier, each with its output layer scaled at initialisation, trained by backprop, the default flag and
the shallow baseline.

::

    python -m benchmarks.output_scale            # about 3 minutes on one CPU thread -> results/output_scale.json

The LSTM LM is the ``RNNModel`` of PyTorch's ``word_language_model`` example (embedding 32, two LSTM layers of 32,
dropout 0.1, a vocabulary of 32), without the example's ``init_weights()`` unless said: tied, its decoder then takes
``nn.Embedding``'s N(0, 1) weights, about 10 times ``nn.Linear``'s initial scale. Data: sequences of 24 tokens from a
fixed random sparse bigram chain; Adam, lr 3e-3, batch 16; the loss is the mean training loss of the last 5 steps.
The MLP (20-64-64-8, tanh) learns the labels of a fixed random two-layer teacher; Adam, lr 1e-3, batch 64, 600
steps; its loss is the test loss on 1024 held-out samples. One seed.
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

RESULTS = Path(__file__).parent / "results" / "output_scale.json"
MODES = ("bp", "dfa", "shallow")


class RNNModel(nn.Module):
    """The word-level LSTM language model of PyTorch's examples (``tie_weights``, optional ``init_weights()``)."""

    def __init__(self, ntoken: int = 32, ninp: int = 32, nhid: int = 32, tie: bool = True, example_init: bool = False):
        super().__init__()
        self.ntoken = ntoken
        self.drop = nn.Dropout(0.1)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, 2, dropout=0.1, batch_first=True)
        self.decoder = nn.Linear(nhid, ntoken)
        if tie:
            self.decoder.weight = self.encoder.weight
        if example_init:  # the example's init_weights()
            nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
            nn.init.zeros_(self.decoder.bias)
            if not tie:
                nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        output, _ = self.rnn(self.drop(self.encoder(tokens)))
        return self.decoder(self.drop(output)).view(-1, self.ntoken)


def bigram_tokens(n: int = 1024, length: int = 24, vocab: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    table = torch.softmax(4 * torch.randn(vocab, vocab, generator=g), dim=1)
    x = torch.zeros(n, length, dtype=torch.long)
    x[:, 0] = torch.randint(0, vocab, (n,), generator=g)
    for t in range(1, length):
        x[:, t] = torch.multinomial(table[x[:, t - 1]], 1, generator=g).squeeze(1)
    return x


def train_lm(mode: str, tie: bool, scale: float = 1.0, example_init: bool = False, steps: int = 100) -> list[float]:
    """Training losses of the LSTM LM, its decoder's weight multiplied by ``scale`` at initialisation."""
    torch.manual_seed(0)
    model = RNNModel(tie=tie, example_init=example_init)
    with torch.no_grad():
        model.decoder.weight.mul_(scale)
    engine = FeedbackEngine(seed=0, mode=mode)
    engine.attach(model)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    data, g, losses = bigram_tokens(), torch.Generator().manual_seed(1), []
    for _ in range(steps):
        batch = data[torch.randint(0, len(data), (16,), generator=g)]
        opt.zero_grad()
        loss = F.cross_entropy(model(batch[:, :-1]), batch[:, 1:].reshape(-1))
        loss.backward()
        engine.end_backward()
        opt.step()
        losses.append(loss.item())
    engine.detach()
    return losses


def train_mlp(mode: str, scale: float, steps: int = 600) -> float:
    """Test loss of the tanh MLP, its output layer's weight multiplied by ``scale`` at initialisation."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 20, generator=g)
    y = (torch.tanh(x @ torch.randn(20, 64, generator=g)) @ torch.randn(64, 8, generator=g)).argmax(1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8))
    with torch.no_grad():
        net[4].weight.mul_(scale)
    engine = FeedbackEngine(seed=0, mode=mode)
    engine.attach(net)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for step in range(steps):
        i = torch.randint(0, 3072, (64,), generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        F.cross_entropy(net(x[i]), y[i]).backward()
        engine.end_backward()
        opt.step()
    with torch.no_grad():
        return F.cross_entropy(net(x[3072:]), y[3072:]).item()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.output_scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=RESULTS, help=f"results JSON (default: {RESULTS})")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    start = time.time()

    def last(losses: list[float]) -> float:
        return round(sum(losses[-5:]) / 5, 3)

    rows: list[dict[str, Any]] = []
    for tie, example_init, steps in ((True, False, 60), (True, True, 60)):
        for mode in MODES:
            losses = train_lm(mode, tie, example_init=example_init, steps=steps)
            rows.append({"model": "lstm_lm", "tied": tie, "example_init": example_init, "scale": 1.0, "mode": mode,
                         "steps": steps, "loss": last(losses), "first_loss": round(losses[0], 3)})  # fmt: skip
            print(rows[-1], flush=True)
    for scale in (1.0, 2.0, 3.0, 4.0, 6.0):
        for mode in MODES:
            losses = train_lm(mode, tie=False, scale=scale)
            rows.append({"model": "lstm_lm", "tied": False, "example_init": False, "scale": scale, "mode": mode,
                         "steps": 100, "loss": last(losses), "first_loss": round(losses[0], 3)})  # fmt: skip
            print(rows[-1], flush=True)
    for scale in (1.0, 4.0, 8.0):
        for mode in MODES:
            rows.append({"model": "tanh_mlp", "scale": scale, "mode": mode, "steps": 600,
                         "loss": round(train_mlp(mode, scale), 3)})  # fmt: skip
            print(rows[-1], flush=True)
    return write_cpu_rows(args.out, rows, start)


if __name__ == "__main__":
    main()
