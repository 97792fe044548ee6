"""DFA learns on tiny Hugging Face Transformers: the share of the shallow -> backprop gap it closes at equal steps.

Every model is trained three times from the same seeded initialisation, on the same batches in the same order, with
the same optimizer (AdamW) and number of steps, by a plain PyTorch loop with a :class:`FeedbackEngine` attached:

* ``bp``: plain backprop (the control);
* ``dfa``: the DFA recipe under test (:data:`DFA_OPTIONS`);
* ``shallow``: the blocks and everything before them get no gradient (only what follows the last block learns).

The measure is ``closed = (loss_shallow - loss_dfa) / (loss_shallow - loss_bp)`` on held-out data: 0 means the
feedback taught the blocks nothing, 1 means DFA matched backprop.

Tasks (synthetic, drawn from seeded generators, no downloads):

* causal LM (GPT-2, Llama; sequences of 32 symbols, batch 32): next-symbol prediction on an order-2 Markov chain
  over 32 symbols with a fixed random sparse transition table: each symbol has 8 possible successors and the
  symbol before it allows 3 of those. Over a sequence, the best predictor's mean loss is 1.15 nats, the best from
  one symbol of context 1.94 and the best from none 3.38 (:func:`context_losses`): going below 1.94 needs
  attention to two symbols;
* the same with Gemma (Hugging Face's defaults: the head tied to the token embedding);
* masked LM (BERT untied, RoBERTa tied; sequences of 8 symbols, batch 128): the same chain, 15% of the symbols
  (at least one per sequence) replaced by a mask symbol, loss on the masked ones, which are predictable from their
  neighbours;
* image classification (ViT; 16x16 images, 4x4 patches, batch 64): two 2x2 marks, each bright or dark, in two
  random patches, under Gaussian noise; the label says whether both marks have the same sign. This is an XOR
  across patches: no linear readout of the patches (nor of their sum) computes it, so the blocks must gather the
  two patches and combine them nonlinearly (the shallow arm stays at chance, log 2 nats).

Sizes: 2 blocks of width 64, 4 heads, MLP width 128; AdamW (lr 3e-3 for the language models, 1e-3 for the ViT),
400 steps. The measured shares are noted above :data:`REQUIRED`. ``python tests/test_transformer_quality.py
gpt2,llama,bert,gemma,roberta,vit 0,1`` prints every arm (also the paper's plain DFA, ``recipe="paper"``) with its
wall and CPU time.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import transformers as hf
from torch import nn

from lightning_dfa import FeedbackEngine

warnings.filterwarnings("ignore", module="transformers")

# The DFA recipe under test, passed to the dfa arm's FeedbackEngine; ``{}`` tests the library's default.
DFA_OPTIONS: dict = {}

VOCAB, SUCCESSORS, FANOUT = 32, 8, 3
STEPS, TEST = 400, 1024
D, LAYERS, HEADS, FFN = 64, 2, 4, 128


# ---------------------------------------------------------------------------------------------- data
def markov_table(seed: int = 0) -> torch.Tensor:
    """``[VOCAB, VOCAB, VOCAB]`` next-symbol probabilities ``P(c | a, b)`` of an order-2 chain.

    Each previous symbol ``b`` has ``SUCCESSORS`` possible successors, and the symbol before it, ``a``, allows
    ``FANOUT`` of them: one symbol of context narrows the next symbol down to ``SUCCESSORS``, two symbols to
    ``FANOUT`` (random weights in ``[0.5, 1.5)``, normalised).
    """
    g = torch.Generator().manual_seed(1000 + seed)
    successors = torch.rand(VOCAB, VOCAB, generator=g).argsort(-1)[:, :SUCCESSORS]  # [b, SUCCESSORS]
    pick = torch.rand(VOCAB, VOCAB, SUCCESSORS, generator=g).argsort(-1)[..., :FANOUT]  # [a, b, FANOUT]
    nxt = successors.expand(VOCAB, VOCAB, SUCCESSORS).gather(-1, pick)
    weights = torch.rand(VOCAB, VOCAB, FANOUT, generator=g) + 0.5
    return torch.zeros(VOCAB, VOCAB, VOCAB).scatter_(-1, nxt, weights / weights.sum(-1, keepdim=True))


def markov_sequences(table: torch.Tensor, n: int, seq: int, g: torch.Generator) -> torch.Tensor:
    """``n`` sequences of ``seq`` symbols drawn from the chain (two uniform start symbols)."""
    ids = torch.empty(n, seq, dtype=torch.long)
    ids[:, :2] = torch.randint(0, VOCAB, (n, 2), generator=g)
    for t in range(2, seq):
        ids[:, t] = torch.multinomial(table[ids[:, t - 2], ids[:, t - 1]], 1, generator=g).squeeze(1)
    return ids


def context_losses(seq: int, table: torch.Tensor | None = None) -> dict[str, float]:
    """Exact expected next-symbol losses (nats, mean over the ``seq - 1`` predictions of a sequence) of the best
    predictors that see no symbol (``unigram``), the last symbol (``one``) or the last two (``two``: optimal)."""
    table = markov_table() if table is None else table
    pair = torch.full((VOCAB, VOCAB), 1.0 / VOCAB**2, dtype=torch.float64)  # P(x[t-1], x[t])
    t64 = table.double()

    def entropy(p: torch.Tensor) -> torch.Tensor:
        return -(p * p.clamp_min(1e-300).log()).sum(-1)

    totals = {"unigram": math.log(VOCAB), "one": math.log(VOCAB), "two": math.log(VOCAB)}  # x[1] is uniform
    for _ in range(2, seq):
        joint = pair.unsqueeze(-1) * t64  # P(x[t-1], x[t], x[t+1])
        last = joint.sum(0)  # P(x[t], x[t+1])
        marg = last.sum(0)
        totals["unigram"] += float(entropy(marg))
        totals["one"] += float((last.sum(-1) * entropy(last / last.sum(-1, keepdim=True).clamp_min(1e-300))).sum())
        totals["two"] += float((pair * entropy(t64)).sum())
        pair = last
    return {k: v / (seq - 1) for k, v in totals.items()}


def masked(ids: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Replace 15% of the symbols (at least one per sequence) by the mask symbol ``VOCAB``; labels only there."""
    mask = torch.rand(ids.shape, generator=g) < 0.15
    mask[torch.arange(len(ids)), torch.randint(0, ids.shape[1], (len(ids),), generator=g)] = True
    return {"input_ids": ids.masked_fill(mask, VOCAB), "labels": ids.masked_fill(~mask, -100)}


def marks(n: int, g: torch.Generator, noise: float = 0.5) -> dict[str, torch.Tensor]:
    """16x16 images with two 2x2 marks, each bright (+2) or dark (-2), centred in two distinct 4x4 cells, plus
    Gaussian noise. Label 1 if both marks have the same sign, else 0."""
    cells = torch.rand(n, 16, generator=g).argsort(-1)[:, :2]
    sign = torch.randint(0, 2, (n, 2), generator=g)
    images = noise * torch.randn(n, 1, 16, 16, generator=g)
    idx = torch.arange(n)
    for m in range(2):
        top, left, value = 4 * (cells[:, m] // 4) + 1, 4 * (cells[:, m] % 4) + 1, 4.0 * sign[:, m] - 2.0
        for dy in range(2):
            for dx in range(2):
                images[idx, 0, top + dy, left + dx] += value
    return {"pixel_values": images, "labels": (sign[:, 0] == sign[:, 1]).long()}


# ---------------------------------------------------------------------------------------------- models
def gpt2(seq: int) -> nn.Module:
    cfg = hf.GPT2Config(
        n_layer=LAYERS, n_embd=D, n_head=HEADS, n_inner=FFN, n_positions=seq, vocab_size=VOCAB, bos_token_id=0,
        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
    )  # fmt: skip
    return hf.GPT2LMHeadModel(cfg)


def llama(seq: int) -> nn.Module:
    cfg = hf.LlamaConfig(
        num_hidden_layers=LAYERS, hidden_size=D, intermediate_size=FFN, num_attention_heads=HEADS,
        num_key_value_heads=HEADS, vocab_size=VOCAB, max_position_embeddings=seq, tie_word_embeddings=False,
    )  # fmt: skip
    return hf.LlamaForCausalLM(cfg)


def bert(seq: int) -> nn.Module:
    # symbol VOCAB is the mask; VOCAB + 1, never used, is the padding id (no real symbol gets a frozen embedding)
    cfg = hf.BertConfig(
        num_hidden_layers=LAYERS, hidden_size=D, intermediate_size=FFN, num_attention_heads=HEADS,
        vocab_size=VOCAB + 2, pad_token_id=VOCAB + 1, max_position_embeddings=seq, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, tie_word_embeddings=False,
    )  # fmt: skip
    return hf.BertForMaskedLM(cfg)


def gemma(seq: int) -> nn.Module:  # the Hugging Face defaults: the head tied to the token embedding
    cfg = hf.GemmaConfig(
        num_hidden_layers=LAYERS, hidden_size=D, intermediate_size=FFN, num_attention_heads=HEADS,
        num_key_value_heads=HEADS, head_dim=D // HEADS, vocab_size=VOCAB, max_position_embeddings=seq,
    )  # fmt: skip
    return hf.GemmaForCausalLM(cfg)


def roberta(seq: int) -> nn.Module:  # tied, as by default; positions start after the padding id
    cfg = hf.RobertaConfig(
        num_hidden_layers=LAYERS, hidden_size=D, intermediate_size=FFN, num_attention_heads=HEADS,
        vocab_size=VOCAB + 2, pad_token_id=VOCAB + 1, max_position_embeddings=VOCAB + seq + 4, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return hf.RobertaForMaskedLM(cfg)


def vit(seq: int = 0) -> nn.Module:
    cfg = hf.ViTConfig(
        image_size=16, patch_size=4, num_channels=1, num_hidden_layers=LAYERS, hidden_size=D, intermediate_size=FFN,
        num_attention_heads=HEADS, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return hf.ViTForImageClassification(cfg)


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    ids = batch["input_ids"]
    logits = model(input_ids=ids).logits
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def mlm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"]).logits
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))


def cls_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(pixel_values=batch["pixel_values"]).logits, batch["labels"])


@dataclass
class Task:
    build: Callable[[int], nn.Module]
    loss: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    data: str  # "lm", "mlm" or "marks"
    seq: int  # symbols per sequence (unused for images)
    batch: int
    lr: float


TASKS: dict[str, Task] = {
    "gpt2": Task(gpt2, lm_loss, "lm", seq=32, batch=32, lr=3e-3),
    "llama": Task(llama, lm_loss, "lm", seq=32, batch=32, lr=3e-3),
    "bert": Task(bert, mlm_loss, "mlm", seq=8, batch=128, lr=3e-3),
    "gemma": Task(gemma, lm_loss, "lm", seq=32, batch=32, lr=3e-3),
    "roberta": Task(roberta, mlm_loss, "mlm", seq=8, batch=128, lr=3e-3),
    "vit": Task(vit, cls_loss, "marks", seq=0, batch=64, lr=1e-3),
}


def batches(task: Task, seed: int, n: int, count: int) -> list[dict[str, torch.Tensor]]:
    """``count`` batches of ``n`` examples drawn from a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    if task.data == "marks":
        return [marks(n, g) for _ in range(count)]
    table = markov_table()
    out = []
    for _ in range(count):
        ids = markov_sequences(table, n, task.seq, g)
        out.append(masked(ids, g) if task.data == "mlm" else {"input_ids": ids})
    return out


# ---------------------------------------------------------------------------------------------- training
def train(name: str, mode: str, options: dict[str, Any] | None = None, seed: int = 0, steps: int = STEPS) -> float:
    """Train ``TASKS[name]`` for ``steps`` AdamW steps in ``mode`` and return the held-out loss (nats)."""
    task = TASKS[name]
    torch.manual_seed(seed)
    model = task.build(task.seq)
    engine = FeedbackEngine(mode=mode, **(options or {}))
    engine.attach(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=task.lr)
    model.train()
    for batch in batches(task, 2 * seed + 100, task.batch, steps):
        optimizer.zero_grad(set_to_none=True)
        task.loss(model, batch).backward()
        engine.end_backward()
        optimizer.step()
    engine.detach()
    model.eval()
    with torch.no_grad():
        test = batches(task, 2 * seed + 101, TEST, 1)[0]
        return task.loss(model, test).item()


def closed_share(bp: float, dfa: float, shallow: float) -> float:
    """The share of the shallow -> backprop gap that DFA closes."""
    return (shallow - dfa) / (shallow - bp)


def arms(name: str, seed: int = 0, **kw: Any) -> dict[str, float]:
    """Held-out loss of the ``bp``, ``dfa`` (:data:`DFA_OPTIONS`) and ``shallow`` arms."""
    return {
        "bp": train(name, "bp", seed=seed, **kw),
        "dfa": train(name, "dfa", DFA_OPTIONS, seed=seed, **kw),
        "shallow": train(name, "shallow", seed=seed, **kw),
    }


def measure(names: list[str], seeds: list[int], **kw: Any) -> None:
    """Print per model and seed the test losses of every arm (also plain DFA), the shares and wall times."""
    for name in names:
        for seed in seeds:
            loss, wall, cpu = {}, {}, {}
            for arm, mode, opts in (
                ("bp", "bp", {}),
                ("dfa", "dfa", DFA_OPTIONS),
                ("shallow", "shallow", {}),
                ("paper", "dfa", {"recipe": "paper"}),
            ):
                t0, c0 = time.perf_counter(), time.process_time()
                loss[arm] = train(name, mode, opts, seed=seed, **kw)
                wall[arm], cpu[arm] = time.perf_counter() - t0, time.process_time() - c0
            share = closed_share(loss["bp"], loss["dfa"], loss["shallow"])
            plain = closed_share(loss["bp"], loss["paper"], loss["shallow"])
            print(
                f"{name:6s} seed {seed}: " + " ".join(f"{k} {v:.3f}" for k, v in loss.items())
                + f" | closed {share:.0%} plain {plain:.0%}"
                + " | wall s " + " ".join(f"{k} {v:.1f}" for k, v in wall.items())
                + " | cpu s " + " ".join(f"{k} {v:.1f}" for k, v in cpu.items()),
                flush=True,
            )  # fmt: skip


# ---------------------------------------------------------------------------------------------- tests
def test_the_chain_needs_two_symbols_of_context() -> None:
    losses = context_losses(32)
    per_step = context_losses(3)  # one prediction from the uniform start, one from a full two-symbol context
    assert 2 * per_step["two"] - math.log(VOCAB) == pytest.approx(1.07, abs=0.01)
    assert 2 * per_step["one"] - math.log(VOCAB) == pytest.approx(2.05, abs=0.01)
    assert losses["two"] + 0.7 < losses["one"] < losses["unigram"] - 1.3
    ids = markov_sequences(markov_table(), 64, 32, torch.Generator().manual_seed(0))
    a, b, c = ids[:, :-2].reshape(-1), ids[:, 1:-1].reshape(-1), ids[:, 2:].reshape(-1)
    assert bool((markov_table()[a, b, c] > 0).all())  # every drawn transition is allowed by the table


# Required share of the gap (seed 0). Measured with the default (DFA_OPTIONS = {}) at seeds 0 / 1 (the paper's plain
# DFA, recipe="paper", in brackets): GPT-2 96% / 94% (-22% / -9%), Llama 91% / 90% (-61% / -55%), BERT 106% / 100%
# (63% / 72%), ViT 102% / 90% (15% / 79%). Without cut_token_embedding (the embeddings trained by feedback) the
# default closed GPT-2 47% / 49%, Llama 87% / 89%, BERT 63% / 72%; the ViT has no token embedding.
# With a table whose 3 successors of a pair are drawn from all 32 symbols (no one-symbol structure), backprop
# reaches only 2.2 (GPT-2) and 1.7 (Llama) nats in 400 steps, and the earlier recipe (norm_jacobian=True and the
# cut head input) closed 15% / 12% on GPT-2, 75% / 78% on Llama.
# Two models with Hugging Face's default tied head: Gemma (causal, its own RMSNorm and GeGLU) 96% / 96% (24% / 31%);
# RoBERTa (masked LM) 72% / 144% (the same: behind its head transform the tied table is not cut, and its post-LN
# blocks feed no norm, so the default is the paper's rule; backprop is unstable at seed 1). With the tied table cut
# RoBERTa reached 2.71 / 2.94 nats instead of 2.47 / 2.37.
REQUIRED = {"gpt2": 0.75, "llama": 0.80, "bert": 0.75, "gemma": 0.80, "roberta": 0.60, "vit": 0.60}


@pytest.mark.parametrize("name", list(TASKS))
def test_dfa_closes_the_gap_between_shallow_and_backprop(name: str) -> None:
    loss = arms(name)
    assert loss["shallow"] - loss["bp"] > 0.4, loss  # the task needs the blocks: a gap worth measuring
    share = closed_share(loss["bp"], loss["dfa"], loss["shallow"])
    assert share >= REQUIRED[name], (round(share, 3), loss)
    if TASKS[name].data == "lm":  # DFA trained the blocks to use two symbols of context
        assert loss["dfa"] < context_losses(TASKS[name].seq)["one"], loss


if __name__ == "__main__":
    import sys

    torch.set_num_threads(1)
    measure(sys.argv[1].split(","), [int(s) for s in sys.argv[2].split(",")])
