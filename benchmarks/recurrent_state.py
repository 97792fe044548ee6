"""A recurrent encoder-decoder trained by backprop, the default flag and the shallow baseline: the encoder's final
state, which starts the decoder, is the encoder's feedback point (and its outputs, where the decoder attends to them).

::

    python -m benchmarks.recurrent_state         # about half a minute on one CPU thread -> results/recurrent_state.json

Task: reverse a sequence of 6 tokens (8 symbols); the decoder reads the reversed sequence shifted by one (teacher
forcing) and starts from the encoder's final state (without attention the only path from the source to the output).
Embedding
and state width 64, one layer; an LSTM (state ``(h, c)``), a GRU (state ``h``), and an LSTM whose decoder also
attends to the encoder's outputs (then those outputs are a feedback point too). Adam, lr 3e-3, batch 32, 600
steps over 4096 training sequences; test loss and per-token accuracy on 1024 held-out sequences. Two seeds. The
shallow baseline trains the output layer alone.
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

RESULTS = Path(__file__).parent / "results" / "recurrent_state.json"
MODES = ("bp", "dfa", "shallow")
VOCAB, LENGTH, BOS = 10, 6, 1


class Seq2Seq(nn.Module):
    """An encoder RNN whose final state starts a decoder RNN; ``attention``: the decoder's outputs also attend to
    the encoder's (``nn.MultiheadAttention``, 4 heads), and the head reads both."""

    def __init__(self, cell: str, attention: bool = False, width: int = 64) -> None:
        super().__init__()
        rnn = getattr(nn, cell)
        self.src, self.tgt = nn.Embedding(VOCAB, width), nn.Embedding(VOCAB, width)
        self.encoder, self.decoder = rnn(width, width, batch_first=True), rnn(width, width, batch_first=True)
        self.attn = nn.MultiheadAttention(width, 4, batch_first=True) if attention else None
        self.out = nn.Linear(2 * width if attention else width, VOCAB)

    def forward(self, src: torch.Tensor, shifted: torch.Tensor) -> torch.Tensor:
        memory, state = self.encoder(self.src(src))
        hidden = self.decoder(self.tgt(shifted), state)[0]
        if self.attn is not None:
            hidden = torch.cat([hidden, self.attn(hidden, memory, memory)[0]], dim=-1)
        return self.out(hidden)


def reversal(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source sequences, the decoder's input (the target shifted right after a start token) and the target."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(2, VOCAB, (n, LENGTH), generator=g)
    target = src.flip(1)
    shifted = torch.cat([torch.full((n, 1), BOS), target[:, :-1]], dim=1)
    return src, shifted, target


def train(cell: str, mode: str, seed: int, attention: bool = False, steps: int = 600) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = Seq2Seq(cell, attention)
    engine = FeedbackEngine(seed=seed, mode=mode)
    engine.attach(model)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    src, shifted, target = reversal(4096, 0)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(0, len(src), (32,), generator=g)
        opt.zero_grad()
        loss = F.cross_entropy(model(src[i], shifted[i]).flatten(0, 1), target[i].flatten())
        loss.backward()
        engine.end_backward()
        opt.step()
    points = [p.key for p in engine.last_points]
    engine.detach()
    src, shifted, target = reversal(1024, 1)
    with torch.no_grad():
        logits = model(src, shifted)
    return {
        "test_loss": round(F.cross_entropy(logits.flatten(0, 1), target.flatten()).item(), 3),
        "accuracy": round((logits.argmax(-1) == target).float().mean().item(), 3),
        "points": points,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.recurrent_state", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=RESULTS, help=f"results JSON (default: {RESULTS})")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    start = time.time()
    rows: list[dict[str, Any]] = []
    for cell, attention in (("LSTM", False), ("GRU", False), ("LSTM", True)):
        for seed in (0, 1):
            for mode in MODES:
                result = train(cell, mode, seed, attention)
                rows.append({"cell": cell, "attention": attention, "seed": seed, "mode": mode, "steps": 600, **result})
                print(rows[-1], flush=True)
    return write_cpu_rows(args.out, rows, start)


if __name__ == "__main__":
    main()
