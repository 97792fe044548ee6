"""Tiny Hugging Face Transformers trained by backprop, DFA and the shallow baseline: the share of the shallow ->
backprop gap DFA closes at equal steps.

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
* reversal (BART, T5; sequences of 16 symbols of the chain, batch 32, lr 1e-3): an encoder-decoder writes its input
  backwards, so the decoder must read the encoder through cross-attention;
* image classification (ViT; 16x16 images, 4x4 patches, batch 64): two 2x2 marks, each bright or dark, in two
  random patches, under Gaussian noise; the label says whether both marks have the same sign. This is an XOR
  across patches: no linear readout of the patches (nor of their sum) computes it, so the blocks must gather the
  two patches and combine them nonlinearly (the shallow arm stays at chance, log 2 nats);
* order of two marks (sequence classifiers: BERT, DistilBERT, GPT-2, Llama, Qwen2, OPT; sequences of 16 symbols,
  batch 64, lr 1e-3): two marks at random positions among uniform symbols, the label whether the first comes before the
  second (:func:`order`); the classifier reads one token (the first or the last), so the blocks must bring both
  marks' positions to it (shallow stays at chance where the first token is read);
* compare neighbours (token classifiers: BERT, DistilBERT, DeBERTa-v2, RoBERTa at lr 3e-4; sequences of 16 symbols,
  batch 64, lr 1e-3):
  each symbol but the ends labelled by whether the symbol before it is larger than the one after it
  (:func:`neighbours`), which needs both neighbours' identities at each position;
* masked patches (ViTMAE; 16x16 images, each a level and a horizontal gradient of its own, batch 64): the masked
  autoencoder's loss, the mean squared error on the half of the patches it masks, which the kept half predicts.

Sizes: 2 blocks of width 64, 4 heads, MLP width 128; AdamW (lr 3e-3 for the language models, 1e-3 for the ViT),
400 steps.

The test suite (``tests/test_transformer_quality.py``) requires a share on GPT-2, Llama, BERT, Gemma, RoBERTa and
ViT, and on the GPT-2, Llama and BERT classifiers. :data:`MORE` holds further architectures, each built from a
small config with its library defaults (tied heads included), run by the command line::

    python -m benchmarks.tiny_transformers --models all --seeds 0,1   # every arm, JSON in benchmarks/results
    python -m benchmarks.tiny_transformers --render                  # the table of docs/architectures.md
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers as hf
from torch import nn

from benchmarks.markers import replace_section
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


def order(n: int, seq: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Sequences of ``seq`` symbols: a start symbol (3, as a tokenizer's ``[CLS]`` or ``<s>``), then uniform symbols
    from 4 to 31 with two marks, 1 and 2, at two random positions; the label says whether 1 comes before 2. No symbol
    alone tells it and neither does their count: a classifier must compare the two marks' positions."""
    ids = torch.randint(4, VOCAB, (n, seq), generator=g)
    at = 1 + torch.rand(n, seq - 1, generator=g).argsort(-1)[:, :2]
    rows = torch.arange(n)
    ids[rows, at[:, 0]], ids[rows, at[:, 1]], ids[:, 0] = 1, 2, 3
    return {"input_ids": ids, "labels": (at[:, 0] < at[:, 1]).long()}


def neighbours(n: int, seq: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Sequences of ``seq`` uniform symbols from 4 to 31; each symbol but the first and the last is labelled by
    whether the symbol before it is larger than the symbol after it (the ends are not labelled: ``-100``). No symbol
    tells its own label: a token classifier must read both neighbours."""
    ids = torch.randint(4, VOCAB, (n, seq), generator=g)
    labels = torch.full((n, seq), -100)
    labels[:, 1:-1] = (ids[:, :-2] > ids[:, 2:]).long()
    return {"input_ids": ids, "labels": labels}


def gradients(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """16x16 images, each a level plus a horizontal gradient of its own (``a + b x``, ``a`` and ``b`` Gaussian), under
    Gaussian noise of 0.1, and the fixed random order in which a masked autoencoder keeps half of its 16 patches
    (its ``noise``): the masked patches are predictable from the kept ones, through the encoder and decoder."""
    level, slope = torch.randn(n, 1, 1, 1, generator=g), torch.randn(n, 1, 1, 1, generator=g)
    x = (torch.arange(16) - 7.5) / 8
    images = level + slope * x.view(1, 1, 1, 16) + 0.1 * torch.randn(n, 1, 16, 16, generator=g)
    return {"pixel_values": images, "noise": torch.rand(n, 16, generator=g)}


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


class LucidGPT(nn.Module):
    """A GPT written as lucidrains writes Transformers (x-transformers, vit-pytorch), not from a library:
    ``layers`` is a list of ``[attention, feed-forward]`` lists, each sublayer behind its own pre-norm, and the
    residual adds are the parent's (``x = attn(x) + x; x = ff(x) + x``)."""

    class PreNorm(nn.Module):
        def __init__(self, fn: nn.Module) -> None:
            super().__init__()
            self.norm, self.fn = nn.LayerNorm(D), fn

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fn(self.norm(x))

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.to_qkv, self.to_out = nn.Linear(D, 3 * D, bias=False), nn.Linear(D, D)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, _ = x.shape
            q, k, v = self.to_qkv(x).view(b, t, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
            out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.to_out(out.transpose(1, 2).reshape(b, t, D))

    def __init__(self, seq: int) -> None:
        super().__init__()
        self.token_emb, self.pos_emb = nn.Embedding(VOCAB, D), nn.Embedding(seq, D)
        feed_forward = lambda: nn.Sequential(nn.Linear(D, FFN), nn.GELU(), nn.Linear(FFN, D))  # noqa: E731
        self.layers = nn.ModuleList(
            nn.ModuleList([self.PreNorm(self.Attention()), self.PreNorm(feed_forward())]) for _ in range(LAYERS)
        )
        self.norm, self.to_logits = nn.LayerNorm(D), nn.Linear(D, VOCAB)

    def forward(self, input_ids: torch.Tensor) -> hf.modeling_outputs.CausalLMOutput:
        x = self.token_emb(input_ids) + self.pos_emb(torch.arange(input_ids.shape[1], device=input_ids.device))
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return hf.modeling_outputs.CausalLMOutput(logits=self.to_logits(self.norm(x)))


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    ids = batch["input_ids"]
    logits = model(input_ids=ids).logits
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def mlm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"]).logits
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))


def reverse_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """An encoder-decoder writes its input backwards (sequences of the chain): the decoder must read the encoder."""
    ids = batch["input_ids"]
    return model(input_ids=ids, labels=ids.flip(1)).loss


def order_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A sequence classifier (its library's pooling: the first token's, or the last one's) on :func:`order`."""
    return nn.functional.cross_entropy(model(input_ids=batch["input_ids"]).logits, batch["labels"])


def neighbours_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A token classifier on :func:`neighbours` (the unlabelled ends ignored)."""
    logits = model(input_ids=batch["input_ids"]).logits
    return nn.functional.cross_entropy(logits.reshape(-1, 2), batch["labels"].reshape(-1), ignore_index=-100)


def mae_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss  # the mean squared error on the masked patches


def cls_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(pixel_values=batch["pixel_values"]).logits, batch["labels"])


@dataclass
class Task:
    build: Callable[[int], nn.Module]
    loss: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    data: str  # a key of _LOSSES: "lm", "mlm", "reverse", "marks", "gradients", "order" or "neighbours"
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
    if task.data == "gradients":
        return [gradients(n, g) for _ in range(count)]
    if task.data == "order":
        return [order(n, task.seq, g) for _ in range(count)]
    if task.data == "neighbours":
        return [neighbours(n, task.seq, g) for _ in range(count)]
    table = markov_table()
    out = []
    for _ in range(count):
        ids = markov_sequences(table, n, task.seq, g)
        out.append(masked(ids, g) if task.data == "mlm" else {"input_ids": ids})
    return out


# ---------------------------------------------------------------------------------------------- training
def train(name: str, mode: str, options: dict[str, Any] | None = None, seed: int = 0, steps: int = STEPS) -> float:
    """Train ``TASKS[name]`` for ``steps`` AdamW steps in ``mode`` and return the held-out loss (nats)."""
    task = ALL[name]
    torch.manual_seed(seed)
    model = task.build(task.seq)
    engine = FeedbackEngine(mode=mode, **(options or {}))
    engine.attach(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=task.lr)
    model.train()
    for batch in batches(task, 2 * seed + 100, task.batch, steps):
        optimizer.zero_grad(set_to_none=True)
        loss = task.loss(model, batch)
        loss.backward()
        engine.end_backward(loss)  # as the Lightning adapters close a backward
        optimizer.step()
    engine.detach()
    model.eval()
    with torch.no_grad():
        test = batches(task, 2 * seed + 101, TEST, 1)[0]
        return task.loss(model, test).item()


def _share_text(share: float) -> str:
    """A share of the gap as the table gives it; a loss that diverged to NaN as such."""
    return "diverged (NaN)" if math.isnan(share) else f"{share:.0%}"


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


def _common(seq: int) -> dict[str, Any]:
    return dict(num_hidden_layers=LAYERS, hidden_size=D, intermediate_size=FFN, num_attention_heads=HEADS,
                vocab_size=VOCAB, max_position_embeddings=max(seq, 8))  # fmt: skip


def _reversal_config(seq: int) -> dict[str, Any]:
    """The BART-family settings of the reversal task (three special symbols after the chain's: pad, start, end)."""
    return dict(vocab_size=VOCAB + 3, d_model=D, encoder_layers=LAYERS, decoder_layers=LAYERS,
                encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN,
                max_position_embeddings=2 * seq, dropout=0.0, pad_token_id=VOCAB, bos_token_id=VOCAB + 1,
                eos_token_id=VOCAB + 2, decoder_start_token_id=VOCAB + 1, forced_eos_token_id=None)  # fmt: skip


_NO_DROP = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
_MLM_VOCAB = dict(vocab_size=VOCAB + 2, pad_token_id=VOCAB + 1)  # the mask symbol, and an unused padding id

_LOSSES = {"lm": lm_loss, "mlm": mlm_loss, "reverse": reverse_loss, "marks": cls_loss, "gradients": mae_loss,
           "order": order_loss, "neighbours": neighbours_loss}  # fmt: skip
_CLS = dict(num_labels=2, pad_token_id=0)  # symbol 0 never occurs: the last-token pooling reads the last symbol

#: Further architectures (library defaults, tied heads included; no dropout), beside :data:`TASKS`.
MORE: dict[str, Task] = {
    name: Task(build, _LOSSES[data], data, *shape)
    for name, build, data, shape in (
        ("gpt2_tied", lambda s: hf.GPT2LMHeadModel(hf.GPT2Config(n_layer=LAYERS, n_embd=D, n_head=HEADS, n_inner=FFN,
                                                                 n_positions=s, vocab_size=VOCAB, bos_token_id=0,
                                                                 eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                                                 attn_pdrop=0.0)), "lm", (32, 32, 3e-3)),
        ("gpt_neox", lambda s: hf.GPTNeoXForCausalLM(hf.GPTNeoXConfig(**_common(s), hidden_dropout=0.0,
                                                                       attention_dropout=0.0)), "lm", (32, 32, 3e-3)),
        ("qwen2", lambda s: hf.Qwen2ForCausalLM(hf.Qwen2Config(**_common(s), num_key_value_heads=HEADS)), "lm",
         (32, 32, 3e-3)),
        ("olmo2", lambda s: hf.Olmo2ForCausalLM(hf.Olmo2Config(**_common(s), num_key_value_heads=HEADS,
                                                               pad_token_id=0)), "lm", (32, 32, 3e-3)),
        ("phi", lambda s: hf.PhiForCausalLM(hf.PhiConfig(**_common(s), resid_pdrop=0.0, embd_pdrop=0.0)), "lm",
         (32, 32, 3e-3)),
        ("bloom", lambda s: hf.BloomForCausalLM(hf.BloomConfig(vocab_size=VOCAB, hidden_size=D, n_layer=LAYERS,
                                                               n_head=HEADS, hidden_dropout=0.0,
                                                               attention_dropout=0.0)), "lm", (32, 32, 3e-3)),
        ("opt", lambda s: hf.OPTForCausalLM(hf.OPTConfig(vocab_size=VOCAB, hidden_size=D, ffn_dim=FFN,
                                                         num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                                         word_embed_proj_dim=D, max_position_embeddings=s,
                                                         dropout=0.0, attention_dropout=0.0)), "lm", (32, 32, 3e-3)),
        ("falcon", lambda s: hf.FalconForCausalLM(hf.FalconConfig(vocab_size=VOCAB, hidden_size=D,
                                                                  num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                                                  hidden_dropout=0.0, attention_dropout=0.0)), "lm",
         (32, 32, 3e-3)),
        ("xglm", lambda s: hf.XGLMForCausalLM(hf.XGLMConfig(vocab_size=VOCAB, d_model=D, ffn_dim=FFN,
                                                            num_layers=LAYERS, attention_heads=HEADS,
                                                            max_position_embeddings=s, dropout=0.0,
                                                            attention_dropout=0.0, activation_dropout=0.0)), "lm",
         (32, 32, 3e-3)),
        ("mpt", lambda s: hf.MptForCausalLM(hf.MptConfig(vocab_size=VOCAB, d_model=D, n_layers=LAYERS, n_heads=HEADS,
                                                         max_seq_len=s, expansion_ratio=FFN // D)), "lm",
         (32, 32, 3e-3)),
        ("distilbert", lambda s: hf.DistilBertForMaskedLM(hf.DistilBertConfig(**_MLM_VOCAB, dim=D, hidden_dim=FFN,
                                                                              n_layers=LAYERS, n_heads=HEADS,
                                                                              max_position_embeddings=s, dropout=0.0,
                                                                              attention_dropout=0.0)), "mlm",
         (8, 128, 3e-3)),
        ("electra", lambda s: hf.ElectraForMaskedLM(hf.ElectraConfig(**{**_common(s), **_MLM_VOCAB}, embedding_size=D,
                                                                     **_NO_DROP)), "mlm", (8, 128, 3e-3)),
        ("deberta_v2", lambda s: hf.DebertaV2ForMaskedLM(hf.DebertaV2Config(**{**_common(s), **_MLM_VOCAB},
                                                                            **_NO_DROP)), "mlm", (8, 128, 3e-3)),
        # RoBERTa's, with its masked-LM head registered before the encoder
        ("xlm_roberta", lambda s: hf.XLMRobertaForMaskedLM(hf.XLMRobertaConfig(
            **{**_common(s), **_MLM_VOCAB, "max_position_embeddings": VOCAB + s + 4}, **_NO_DROP)), "mlm",
         (8, 128, 3e-3)),
        # its default NoNorm: an elementwise affine where a LayerNorm would be
        ("mobilebert", lambda s: hf.MobileBertForMaskedLM(hf.MobileBertConfig(
            **{**_common(s), **_MLM_VOCAB}, embedding_size=D // 2, intra_bottleneck_size=D // 2,
            true_hidden_size=D // 2, **_NO_DROP)), "mlm", (8, 128, 3e-3)),
        # post-norm layers behind a projection of narrower embeddings: the first layer's input is no norm's output
        ("convbert", lambda s: hf.ConvBertForMaskedLM(hf.ConvBertConfig(**{**_common(s), **_MLM_VOCAB},
                                                                        embedding_size=D // 2, **_NO_DROP)), "mlm",
         (8, 128, 3e-3)),
        ("roformer", lambda s: hf.RoFormerForMaskedLM(hf.RoFormerConfig(**{**_common(s), **_MLM_VOCAB},
                                                                        embedding_size=D // 2, **_NO_DROP)), "mlm",
         (8, 128, 3e-3)),
        ("bart", lambda s: hf.BartForConditionalGeneration(hf.BartConfig(**_reversal_config(s))), "reverse",
         (16, 32, 1e-3)),
        ("marian", lambda s: hf.MarianMTModel(hf.MarianConfig(**_reversal_config(s), decoder_vocab_size=VOCAB + 3)),
         "reverse", (16, 32, 1e-3)),
        ("pegasus", lambda s: hf.PegasusForConditionalGeneration(hf.PegasusConfig(**_reversal_config(s))), "reverse",
         (16, 32, 1e-3)),
        ("blenderbot_small", lambda s: hf.BlenderbotSmallForConditionalGeneration(hf.BlenderbotSmallConfig(
            **_reversal_config(s))), "reverse", (16, 32, 1e-3)),
        ("t5", lambda s: hf.T5ForConditionalGeneration(hf.T5Config(
            vocab_size=VOCAB, d_model=D, d_ff=FFN, d_kv=D // HEADS, num_layers=LAYERS, num_heads=HEADS,
            decoder_start_token_id=0, pad_token_id=0, dropout_rate=0.0)), "reverse", (16, 32, 1e-3)),
        ("deit", lambda s: hf.DeiTForImageClassification(hf.DeiTConfig(image_size=16, patch_size=4, num_channels=1,
                                                                       num_hidden_layers=LAYERS, hidden_size=D,
                                                                       intermediate_size=FFN,
                                                                       num_attention_heads=HEADS, num_labels=2,
                                                                       **_NO_DROP)), "marks", (0, 64, 1e-3)),
        ("beit", lambda s: hf.BeitForImageClassification(hf.BeitConfig(image_size=16, patch_size=4, num_channels=1,
                                                                       num_hidden_layers=LAYERS, hidden_size=D,
                                                                       intermediate_size=FFN,
                                                                       num_attention_heads=HEADS, num_labels=2,
                                                                       **_NO_DROP)), "marks", (0, 64, 1e-3)),
        ("dinov2", lambda s: hf.Dinov2ForImageClassification(hf.Dinov2Config(image_size=16, patch_size=4,
                                                                             num_channels=1, num_hidden_layers=LAYERS,
                                                                             hidden_size=D, mlp_ratio=FFN // D,
                                                                             num_attention_heads=HEADS, num_labels=2,
                                                                             **_NO_DROP)), "marks", (0, 64, 1e-3)),
        # a masked autoencoder: the decoder's layers are blocks, its last layer the output
        ("vitmae", lambda s: hf.ViTMAEForPreTraining(hf.ViTMAEConfig(
            image_size=16, patch_size=4, num_channels=1, num_hidden_layers=LAYERS, hidden_size=D,
            intermediate_size=FFN, num_attention_heads=HEADS, decoder_hidden_size=D, decoder_num_hidden_layers=LAYERS,
            decoder_num_attention_heads=HEADS, decoder_intermediate_size=FFN, mask_ratio=0.5, **_NO_DROP)),
         "gradients", (0, 64, 1e-3)),
        # written by hand, lucidrains' layout: lists of [attention, feed-forward], the residual adds in the parent
        ("lucid_gpt", LucidGPT, "lm", (32, 32, 3e-3)),
        # a convolutional network: 2 stages of 2 residual layers, widths 32 and 64
        ("resnet", lambda s: hf.ResNetForImageClassification(hf.ResNetConfig(num_channels=1, num_labels=2,
                                                                             embedding_size=32, hidden_sizes=[32, 64],
                                                                             depths=[2, 2], layer_type="basic")),
         "marks", (0, 64, 1e-3)),
        # the same widths: RegNet's grouped bottlenecks with squeeze-and-excitation, ConvNeXt's depthwise blocks
        ("regnet", lambda s: hf.RegNetForImageClassification(hf.RegNetConfig(num_channels=1, num_labels=2,
                                                                             embedding_size=32, hidden_sizes=[32, 64],
                                                                             depths=[2, 2], groups_width=16)),
         "marks", (0, 64, 1e-3)),
        ("convnext", lambda s: hf.ConvNextForImageClassification(hf.ConvNextConfig(num_channels=1, num_labels=2,
                                                                                   num_stages=2, hidden_sizes=[32, 64],
                                                                                   depths=[2, 2])),
         "marks", (0, 64, 1e-3)),
        # no attention: a selective state-space model and a linear-attention recurrence
        ("mamba", lambda s: hf.MambaForCausalLM(hf.MambaConfig(vocab_size=VOCAB, hidden_size=D,
                                                               num_hidden_layers=LAYERS, state_size=16)), "lm",
         (32, 32, 3e-3)),
        ("rwkv", lambda s: hf.RwkvForCausalLM(hf.RwkvConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS,
                                                            attention_hidden_size=D, intermediate_size=FFN,
                                                            context_length=s)), "lm", (32, 32, 3e-3)),
        # a gated linear recurrence, then local attention
        ("recurrent_gemma", lambda s: hf.RecurrentGemmaForCausalLM(hf.RecurrentGemmaConfig(
            vocab_size=VOCAB, hidden_size=D, intermediate_size=FFN, num_hidden_layers=2, num_attention_heads=HEADS,
            num_key_value_heads=1, lru_width=D, attention_window_size=s, head_dim=D // HEADS,
            block_types=["recurrent", "attention"])), "lm", (32, 32, 3e-3)),
        ("ctrl", lambda s: hf.CTRLLMHeadModel(hf.CTRLConfig(vocab_size=VOCAB, n_embd=D, n_layer=LAYERS, n_head=HEADS,
                                                            dff=FFN, n_positions=s, resid_pdrop=0.0, embd_pdrop=0.0)),
         "lm", (32, 32, 3e-3)),
        ("granite", lambda s: hf.GraniteForCausalLM(hf.GraniteConfig(**_common(s), num_key_value_heads=HEADS)), "lm",
         (32, 32, 3e-3)),
        ("starcoder2", lambda s: hf.Starcoder2ForCausalLM(hf.Starcoder2Config(
            **_common(s), num_key_value_heads=HEADS, residual_dropout=0.0, embedding_dropout=0.0)), "lm",
         (32, 32, 3e-3)),
        # a mixture of experts in every layer (4 experts, 2 per token)
        ("olmoe", lambda s: hf.OlmoeForCausalLM(hf.OlmoeConfig(**_common(s), num_key_value_heads=HEADS, num_experts=4,
                                                               num_experts_per_tok=2)), "lm", (32, 32, 3e-3)),
        # more causal LMs, each with its library's defaults (grouped-query attention, parallel blocks, local windows)
        ("mistral", lambda s: hf.MistralForCausalLM(hf.MistralConfig(**_common(s), num_key_value_heads=2)), "lm",
         (32, 32, 3e-3)),
        ("qwen3", lambda s: hf.Qwen3ForCausalLM(hf.Qwen3Config(**_common(s), num_key_value_heads=2,
                                                               head_dim=D // HEADS)), "lm", (32, 32, 3e-3)),
        ("phi3", lambda s: hf.Phi3ForCausalLM(hf.Phi3Config(**_common(s), num_key_value_heads=HEADS, pad_token_id=0,
                                                            bos_token_id=0, eos_token_id=0)), "lm", (32, 32, 3e-3)),
        ("stablelm", lambda s: hf.StableLmForCausalLM(hf.StableLmConfig(**_common(s), num_key_value_heads=HEADS)),
         "lm", (32, 32, 3e-3)),
        ("gptj", lambda s: hf.GPTJForCausalLM(hf.GPTJConfig(vocab_size=VOCAB, n_embd=D, n_layer=LAYERS, n_head=HEADS,
                                                            n_positions=s, rotary_dim=8, bos_token_id=0,
                                                            eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                                            attn_pdrop=0.0)), "lm", (32, 32, 3e-3)),
        ("gpt_neo", lambda s: hf.GPTNeoForCausalLM(hf.GPTNeoConfig(
            vocab_size=VOCAB, hidden_size=D, num_layers=LAYERS, num_heads=HEADS, attention_types=[[["global", "local"],
            1]], max_position_embeddings=s, window_size=8, bos_token_id=0, eos_token_id=0, resid_dropout=0.0,
            embed_dropout=0.0, attention_dropout=0.0)), "lm", (32, 32, 3e-3)),
        ("gpt_bigcode", lambda s: hf.GPTBigCodeForCausalLM(hf.GPTBigCodeConfig(
            vocab_size=VOCAB, n_embd=D, n_layer=LAYERS, n_head=HEADS, n_positions=s, bos_token_id=0, eos_token_id=0,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)), "lm", (32, 32, 3e-3)),
        ("gemma2", lambda s: hf.Gemma2ForCausalLM(hf.Gemma2Config(**_common(s), num_key_value_heads=HEADS,
                                                                  head_dim=D // HEADS)), "lm", (32, 32, 3e-3)),
        ("cohere", lambda s: hf.CohereForCausalLM(hf.CohereConfig(**_common(s), num_key_value_heads=HEADS,
                                                                  bos_token_id=0, eos_token_id=0)), "lm",
         (32, 32, 3e-3)),
        ("biogpt", lambda s: hf.BioGptForCausalLM(hf.BioGptConfig(**_common(s), **_NO_DROP)), "lm", (32, 32, 3e-3)),
        ("mpnet", lambda s: hf.MPNetForMaskedLM(hf.MPNetConfig(**{**_common(s), **_MLM_VOCAB,
                                                                  "max_position_embeddings": s + 4}, **_NO_DROP)),
         "mlm", (8, 128, 3e-3)),
        # its masked-LM head starts with logits far from uniform (the shallow arm ends above chance)
        ("funnel", lambda s: hf.FunnelForMaskedLM(hf.FunnelConfig(
            vocab_size=VOCAB + 2, d_model=D, n_head=HEADS, d_head=D // HEADS, d_inner=FFN, block_sizes=[1, 1],
            hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)), "mlm", (8, 128, 3e-3)),
        # hierarchical vision models: spatial-reduction attention, and inverted residuals (whose last map is 1x1 at
        # this size); ConvNeXt V2's layers have a global response norm where ConvNeXt's have a layer scale
        ("pvt_v2", lambda s: hf.PvtV2ForImageClassification(hf.PvtV2Config(
            num_channels=1, num_labels=2, image_size=16, depths=[1, 1], hidden_sizes=[32, 64],
            num_attention_heads=[1, 2], sr_ratios=[2, 1], patch_sizes=[3, 3], strides=[2, 2], mlp_ratios=[2, 2],
            num_encoder_blocks=2)), "marks", (0, 64, 1e-3)),
        ("convnextv2", lambda s: hf.ConvNextV2ForImageClassification(hf.ConvNextV2Config(
            num_channels=1, num_labels=2, num_stages=2, hidden_sizes=[32, 64], depths=[2, 2])), "marks",
         (0, 64, 1e-3)),
        ("mobilenet_v2", lambda s: hf.MobileNetV2ForImageClassification(hf.MobileNetV2Config(
            num_channels=1, num_labels=2, image_size=16, depth_multiplier=0.35)), "marks", (0, 64, 1e-3)),
        ("mt5", lambda s: hf.MT5ForConditionalGeneration(hf.MT5Config(
            vocab_size=VOCAB, d_model=D, d_ff=FFN, d_kv=D // HEADS, num_layers=LAYERS, num_heads=HEADS,
            decoder_start_token_id=0, pad_token_id=0, dropout_rate=0.0)), "reverse", (16, 32, 1e-3)),
        # sequence classifiers: BERT's and DistilBERT's read the first token, GPT-2's and Llama's the last one
        ("bert_cls", lambda s: hf.BertForSequenceClassification(hf.BertConfig(**_common(s), **_CLS, **_NO_DROP)),
         "order", (16, 64, 1e-3)),
        ("distilbert_cls", lambda s: hf.DistilBertForSequenceClassification(hf.DistilBertConfig(
            vocab_size=VOCAB, dim=D, hidden_dim=FFN, n_layers=LAYERS, n_heads=HEADS, max_position_embeddings=s, **_CLS,
            dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0)), "order", (16, 64, 1e-3)),
        ("gpt2_cls", lambda s: hf.GPT2ForSequenceClassification(hf.GPT2Config(
            vocab_size=VOCAB, n_embd=D, n_inner=FFN, n_layer=LAYERS, n_head=HEADS, n_positions=s, **_CLS,
            bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)), "order",
         (16, 64, 1e-3)),
        ("llama_cls", lambda s: hf.LlamaForSequenceClassification(hf.LlamaConfig(**_common(s), **_CLS,
                                                                                 num_key_value_heads=HEADS)),
         "order", (16, 64, 1e-3)),
        ("qwen2_cls", lambda s: hf.Qwen2ForSequenceClassification(hf.Qwen2Config(**_common(s), **_CLS,
                                                                                 num_key_value_heads=HEADS)),
         "order", (16, 64, 1e-3)),
        ("opt_cls", lambda s: hf.OPTForSequenceClassification(hf.OPTConfig(
            vocab_size=VOCAB, hidden_size=D, ffn_dim=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            max_position_embeddings=s, word_embed_proj_dim=D, bos_token_id=1, eos_token_id=1, **_CLS, dropout=0.0,
            attention_dropout=0.0)), "order", (16, 64, 1e-3)),
        # token classifiers (bidirectional encoders): each symbol labelled from its two neighbours
        ("bert_tok", lambda s: hf.BertForTokenClassification(hf.BertConfig(**_common(s), **_CLS, **_NO_DROP)),
         "neighbours", (16, 64, 1e-3)),
        ("distilbert_tok", lambda s: hf.DistilBertForTokenClassification(hf.DistilBertConfig(
            vocab_size=VOCAB, dim=D, hidden_dim=FFN, n_layers=LAYERS, n_heads=HEADS, max_position_embeddings=s, **_CLS,
            dropout=0.0, attention_dropout=0.0)), "neighbours", (16, 64, 1e-3)),
        # more families, each with its library's defaults: a mixture of experts, sliding windows, ModernBERT's
        # alternating local and global attention, DeBERTa's disentangled attention, and token classifiers of more
        # encoders
        ("mixtral", lambda s: hf.MixtralForCausalLM(hf.MixtralConfig(**_common(s), num_key_value_heads=2,
                                                                     num_local_experts=4, num_experts_per_tok=2)),
         "lm", (32, 32, 3e-3)),
        ("gemma3", lambda s: hf.Gemma3ForCausalLM(hf.Gemma3TextConfig(**_common(s), num_key_value_heads=2,
                                                                      head_dim=D // HEADS)), "lm", (32, 32, 3e-3)),
        ("qwen3_moe", lambda s: hf.Qwen3MoeForCausalLM(hf.Qwen3MoeConfig(**_common(s), num_key_value_heads=2,
                                                                         head_dim=D // HEADS, num_experts=4,
                                                                         num_experts_per_tok=2,
                                                                         moe_intermediate_size=FFN // 2)), "lm",
         (32, 32, 3e-3)),
        ("nemotron", lambda s: hf.NemotronForCausalLM(hf.NemotronConfig(**_common(s), num_key_value_heads=2,
                                                                        bos_token_id=0, eos_token_id=0)), "lm",
         (32, 32, 3e-3)),
        ("modernbert", lambda s: hf.ModernBertForMaskedLM(hf.ModernBertConfig(
            **{**_common(s), **_MLM_VOCAB}, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
            global_attn_every_n_layers=2, local_attention=8)), "mlm", (8, 128, 3e-3)),
        ("deberta", lambda s: hf.DebertaForMaskedLM(hf.DebertaConfig(**{**_common(s), **_MLM_VOCAB}, **_NO_DROP)),
         "mlm", (8, 128, 3e-3)),
        ("megatron_bert", lambda s: hf.MegatronBertForMaskedLM(hf.MegatronBertConfig(**{**_common(s), **_MLM_VOCAB},
                                                                                     **_NO_DROP)), "mlm",
         (8, 128, 1e-3)),  # (at 3e-3 backprop did not learn: 3.40 / 3.29 nats, shallow 3.36)
        ("roberta_tok", lambda s: hf.RobertaForTokenClassification(hf.RobertaConfig(
            **{**_common(s), "max_position_embeddings": s + 2}, num_labels=2, pad_token_id=1, **_NO_DROP)),
         "neighbours", (16, 64, 3e-4)),  # (at 1e-3 backprop did not learn on seed 0: 0.672 nats, chance 0.693)
        ("deberta_v2_tok", lambda s: hf.DebertaV2ForTokenClassification(hf.DebertaV2Config(**_common(s), **_CLS,
                                                                                           **_NO_DROP)),
         "neighbours", (16, 64, 1e-3)),
    )
}  # fmt: skip
ALL: dict[str, Task] = {**TASKS, **MORE}
RESULTS = Path(__file__).resolve().parent / "results" / "tiny_transformers.json"
DOC = Path(__file__).resolve().parents[1] / "docs" / "architectures.md"


#: the arms of :func:`measure`: name, engine mode and options
ARMS: dict[str, tuple[str, dict]] = {
    "bp": ("bp", {}),
    "dfa": ("dfa", DFA_OPTIONS),
    "shallow": ("shallow", {}),
    "paper": ("dfa", {"recipe": "paper"}),
}


def measure(
    names: list[str],
    seeds: list[int],
    arms: Iterable[str] = tuple(ARMS),
    recorded: dict[tuple[str, int], dict[str, Any]] | None = None,
    **kw: Any,
) -> list[dict[str, Any]]:
    """Train every arm (``bp``, ``dfa``, ``shallow`` and the paper's plain DFA) per model and seed; print and return
    one record per run, with the test losses, the shares of the gap and the wall and CPU times.

    Only the ``arms`` named are trained; the others are taken from ``recorded`` (earlier records by model and
    seed), so that a change of the default flag re-runs only ``"dfa"``."""
    arms = set(arms)
    records = []
    for name in names:
        task = ALL[name]
        model = task.build(task.seq)
        for seed in seeds:
            loss, wall, cpu = {}, {}, {}
            old = (recorded or {}).get((name, seed))
            for arm, (mode, opts) in ARMS.items():
                if arm not in arms:
                    if old is None:
                        raise SystemExit(f"{name} seed {seed}: no recorded {arm!r} arm to keep; train every arm")
                    loss[arm], wall[arm], cpu[arm] = (old[k][arm] for k in ("test_loss", "wall_s", "cpu_s"))
                    continue
                t0, c0 = time.perf_counter(), time.process_time()
                loss[arm] = train(name, mode, opts, seed=seed, **kw)
                wall[arm], cpu[arm] = time.perf_counter() - t0, time.process_time() - c0
            share = closed_share(loss["bp"], loss["dfa"], loss["shallow"])
            plain = closed_share(loss["bp"], loss["paper"], loss["shallow"])
            print(
                f"{name:10s} seed {seed}: " + " ".join(f"{k} {v:.3f}" for k, v in loss.items())
                + f" | closed {share:.0%} plain {plain:.0%}"
                + " | wall s " + " ".join(f"{k} {v:.1f}" for k, v in wall.items())
                + " | cpu s " + " ".join(f"{k} {v:.1f}" for k, v in cpu.items()),
                flush=True,
            )  # fmt: skip
            records.append({
                "model": name, "class": type(model).__name__, "task": task.data, "seed": seed,
                "tied_head": _tied_head(model),
                "test_loss": loss, "closed": share, "closed_paper": plain, "wall_s": wall, "cpu_s": cpu,
            })  # fmt: skip
    return records


def _tied_head(model: nn.Module) -> bool:
    """The model has an output embedding (a vocabulary head) and its config ties it to the input embedding (a
    classifier's or an image model's ``tie_word_embeddings`` ties nothing)."""
    heads = getattr(model, "get_output_embeddings", None)
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    return tied and heads is not None and heads() is not None


_TASK_TEXT = {"lm": "causal LM", "mlm": "masked LM", "reverse": "reversal", "marks": "image XOR",
              "gradients": "masked patches", "order": "order of two marks",
              "neighbours": "compare neighbours"}  # fmt: skip


def render(records: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    """The markdown table of ``docs/architectures.md`` from the stored records."""
    by_model: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_model.setdefault(r["model"], []).append(r)
    lines = [
        "| model (Hugging Face class) | task | head tied | seeds | backprop | default flag | shallow "
        "| gap closed by the default flag | by the paper's plain DFA |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rs in by_model.items():

        def mean(f: Callable[[dict[str, Any]], float], rs: list[dict[str, Any]] = rs) -> float:
            return sum(f(r) for r in rs) / len(rs)

        share = " / ".join(_share_text(r["closed"]) for r in rs)
        plain = " / ".join(_share_text(r["closed_paper"]) for r in rs)
        lines.append(
            f"| {name} (`{rs[0]['class']}`) | {_TASK_TEXT[rs[0]['task']]} | {'yes' if rs[0]['tied_head'] else 'no'} | "
            f"{', '.join(str(r['seed']) for r in rs)} | {mean(lambda r: r['test_loss']['bp']):.3f} | "
            f"{mean(lambda r: r['test_loss']['dfa']):.3f} | {mean(lambda r: r['test_loss']['shallow']):.3f} | "
            f"**{share}** | {plain} |"
        )
    return "\n".join(lines) + "\n"


def write_doc(path: Path = DOC, results: Path = RESULTS) -> None:
    """Replace the table between the markers of ``path`` with the one rendered from ``results``."""
    data = json.loads(results.read_text())
    replace_section(path, "table", render(data["records"], data["machine"]))


def merged(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``old``'s records with ``new``'s replacing those of the same model and seed, in :data:`ALL`'s order; the
    machine of each run is kept under ``"runs"`` (the first run's also stays under ``"machine"``).

    Example:
        >>> a = {"machine": {"date": "1"}, "records": [{"model": "llama", "seed": 0}, {"model": "gpt2", "seed": 0}]}
        >>> b = {"machine": {"date": "2"}, "records": [{"model": "llama", "seed": 0, "new": True}]}
        >>> m = merged(a, b)
        >>> [(r["model"], "new" in r) for r in m["records"]], [r["machine"]["date"] for r in m["runs"]]
        ([('gpt2', False), ('llama', True)], ['1', '2'])
    """
    fresh = {(r["model"], r["seed"]) for r in new["records"]}
    records = [r for r in old["records"] if (r["model"], r["seed"]) not in fresh] + new["records"]
    order = {name: i for i, name in enumerate(ALL)}
    records.sort(key=lambda r: (order.get(r["model"], len(order)), r["seed"]))
    runs = old.get("runs") or [{"machine": old["machine"], "models": sorted({r["model"] for r in old["records"]})}]
    runs = runs + [{"machine": new["machine"], "models": sorted({r["model"] for r in new["records"]})}]
    return {"machine": old["machine"], "runs": runs, "records": records}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.tiny_transformers",
        description="Backprop, the default DFA flag, the shallow baseline and the paper's plain DFA on tiny Hugging "
        "Face Transformers (held-out loss after equal steps; the share of the shallow -> backprop gap closed).",
        epilog="examples:\n  python -m benchmarks.tiny_transformers --models gpt2,llama --seeds 0\n"
        "  python -m benchmarks.tiny_transformers --models all --seeds 0,1\n"
        "  python -m benchmarks.tiny_transformers --models marian,pegasus --seeds 0,1 --merge\n"
        "  python -m benchmarks.tiny_transformers --models gpt2,t5 --seeds 0,1 --arms dfa --merge\n"
        "  python -m benchmarks.tiny_transformers --render",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--models", default="all", help=f"comma-separated, or 'all': {', '.join(ALL)}")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"optimizer steps per arm (default: {STEPS})")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON file of the records (default: %(default)s)")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the other models' records in --out (a run of these models replaces only their own)",
    )
    parser.add_argument(
        "--arms",
        default=",".join(ARMS),
        help="comma-separated arms to train (default: all); the others keep their records in --out (same model and "
        "seed): --arms dfa after a change of the default flag",
    )
    parser.add_argument("--render", action="store_true", help="only rewrite the table of docs/architectures.md")
    args = parser.parse_args(argv)
    if args.render:
        write_doc(results=args.out)
        print(f"updated the table of {DOC}")
        return
    torch.set_num_threads(args.threads)
    names = list(ALL) if args.models == "all" else args.models.split(",")
    unknown = [n for n in names if n not in ALL]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list(ALL)}")
    trained = args.arms.split(",")
    if any(a not in ARMS for a in trained):
        parser.error(f"unknown arms in {args.arms!r}; choose from {list(ARMS)}")
    from benchmarks.speed.machine import machine as describe

    machine = {**describe(torch.device("cpu")), "transformers": hf.__version__, "steps": args.steps}
    recorded = None
    if set(trained) != set(ARMS):  # the other arms keep their records
        machine["arms_trained"] = trained
        if args.out.exists():
            recorded = {(r["model"], r["seed"]): r for r in json.loads(args.out.read_text())["records"]}
    records = measure(names, [int(s) for s in args.seeds.split(",")], trained, recorded, steps=args.steps)
    data = {"machine": machine, "records": records}
    if args.merge and args.out.exists():
        data = merged(json.loads(args.out.read_text()), data)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
