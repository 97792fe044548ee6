"""The learning check of the cheaper projections: does ``topk`` or ``sketch`` cost validation loss?

:func:`lm_runs` trains the language-model example (a character-level GPT on Jane Austen) and
:func:`word_lm_runs` a word-level GPT-2 (vocabulary 8192) on the same text, every arm from the same seed and
batches, and reports the validation loss. ``python -m benchmarks.speed --lm`` (``--lm-words``) stores the result
in ``benchmarks/results/lm_projection.json`` (``lm_projection_words.json``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_dfa.engine import FeedbackEngine

__all__ = ["GPT2_LN1", "LM_ARMS", "WORD_ARMS", "lm_runs", "merging_saver", "word_lm_runs"]

# GPT-2 recipe: every block's first norm (ln_1) is also a feedback point, so the block's first GEMM (c_attn)
# never computes its input gradient; the head's input is cut (cut_head_input) so lm_head's input gradient is
# never computed either.
GPT2_LN1 = ["transformer.h.*", "transformer.h.*.ln_1"]

LM_ARMS: dict[str, dict[str, Any] | None] = {
    "bp": None,
    "dfa cut": {"cut_head_input": True},
    "dfa cut top8": {"cut_head_input": True, "topk": 8},
    "dfa cut+ln1": {"cut_head_input": True, "blocks": ["model.transformer.h.*", "model.transformer.h.*.ln_1"]},
    "dfa cut+ln1 top8": {
        "cut_head_input": True,
        "blocks": ["model.transformer.h.*", "model.transformer.h.*.ln_1"],
        "topk": 8,
    },
    "dfa cut top16": {"cut_head_input": True, "topk": 16},
    "dfa cut top32": {"cut_head_input": True, "topk": 32},
    "dfa cut top96": {"cut_head_input": True, "topk": 96},
    "dfa nj cut": {"cut_head_input": True, "norm_jacobian": True},
    "dfa nj cut top8": {"cut_head_input": True, "norm_jacobian": True, "topk": 8},
}


def _train_steps(
    steps: int, next_loss: Callable[[], torch.Tensor], opt: torch.optim.Optimizer, engine: FeedbackEngine | None
) -> torch.Tensor:
    """``steps`` optimizer steps on ``next_loss()`` (the engine, if any, already attached); the last loss."""
    for _ in range(steps):
        loss = next_loss()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if engine is not None:
            engine.end_backward(loss)
    return loss


def lm_runs(
    steps: int,
    arms: list[str],
    seed: int = 0,
    source: str = "auto",
    quick: bool = False,
    log: Callable = print,
    save: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train the language-model example (``examples.language_model.CharGPT`` on Jane Austen, character level)
    for ``steps`` optimizer steps per arm, same seed and batches, and report the validation loss (nats/char).

    A plain loop (no Trainer) around the example's LightningModule and DataModule: the engine is attached as
    ``Trainer(strategy=DFAStrategy(**options))`` would attach it.
    """
    from examples.language_model import AustenDataModule, CharGPT

    hp = {"n_layer": 3, "n_embd": 96, "n_head": 3, "block_size": 64, "lr": 2e-3}
    dm_hp = {"block_size": hp["block_size"], "batch_size": 16, "source": "synthetic" if quick else source}
    dm = AustenDataModule(**dm_hp)
    dm.setup()
    results: dict[str, Any] = {"steps": steps, "model": hp, "data": dm_hp, "arms": {}}
    for name in arms:
        options = LM_ARMS[name]
        torch.manual_seed(seed)
        model = CharGPT(**hp)
        engine = None
        if options is not None:
            engine = FeedbackEngine(seed=seed, **options)
            engine.attach(model)
        opt = model.configure_optimizers()
        torch.manual_seed(seed + 1)
        it = iter(dm.train_dataloader())
        t0 = time.time()
        loss = _train_steps(steps, lambda m=model, it=it: m._loss(next(it)), opt, engine)
        train_s = time.time() - t0
        val = model.evaluate(dm.val_dataloader())
        results["arms"][name if seed == 0 else f"{name} seed{seed}"] = {
            "options": options,
            "val_loss": val,
            "last_train_loss": float(loss.detach()),
            "wall_s": train_s,
        }
        log(f"  {name:18s} val loss {val:.4f} nats/char  ({train_s:.0f} s)", flush=True)
        if save is not None:
            save(results)
    return results


WORD_ARMS: dict[str, dict[str, Any] | None] = {
    "bp": None,
    "dfa cut": {"cut_head_input": True},
    "dfa cut top64": {"cut_head_input": True, "topk": 64},
    "dfa cut+ln1": {"cut_head_input": True, "blocks": GPT2_LN1},
    "dfa cut+ln1 top64": {"cut_head_input": True, "blocks": GPT2_LN1, "topk": 64},
    "dfa cut sketch": {"cut_head_input": True, "sketch": True},
    "dfa cut+ln1 sketch": {"cut_head_input": True, "blocks": GPT2_LN1, "sketch": True},
}


def word_lm_runs(
    steps: int,
    arms: list[str],
    seed: int = 0,
    vocab: int = 8192,
    source: str = "auto",
    log: Callable = print,
    save: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """A large-vocabulary check of ``topk``: a word-level GPT-2 on the same Austen split (the ``vocab - 1`` most
    frequent words and punctuation of the training text, the rest one unknown token), trained ``steps`` AdamW
    steps per arm with the same seed and batches; validation loss in nats per word."""
    import re
    from collections import Counter

    from transformers import GPT2Config, GPT2LMHeadModel

    from examples.data.austen import load_books, split_books
    from examples.language_model import ConsecutiveWindows, RandomWindows

    train_books, _ = split_books(load_books(source))
    cuts = [len(b) - int(len(b) * 0.02) for b in train_books]
    token = re.compile(r"[A-Za-z]+|[^\sA-Za-z]")
    train = token.findall("\n".join(b[:c] for b, c in zip(train_books, cuts)).lower())
    val = token.findall("\n".join(b[c:] for b, c in zip(train_books, cuts)).lower())
    words = [w for w, _ in Counter(train).most_common(vocab - 1)]
    index = {w: i + 1 for i, w in enumerate(words)}
    ids = {k: torch.tensor([index.get(w, 0) for w in v]) for k, v in (("train", train), ("val", val))}
    hp = {"vocab": vocab, "n_layer": 3, "n_embd": 96, "n_head": 3, "block_size": 32, "batch_size": 16, "lr": 2e-3}
    results: dict[str, Any] = {"steps": steps, "model": hp, "data": f"Austen words ({source})", "arms": {}}
    for name in arms:
        options = WORD_ARMS[name]
        torch.manual_seed(seed)
        cfg = GPT2Config(
            vocab_size=vocab,
            n_positions=hp["block_size"],
            n_embd=hp["n_embd"],
            n_layer=hp["n_layer"],
            n_head=hp["n_head"],
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = GPT2LMHeadModel(cfg)
        engine = None
        if options is not None:
            engine = FeedbackEngine(seed=seed, **options)
            engine.attach(model)
        opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], betas=(0.9, 0.99))
        g = torch.Generator().manual_seed(seed + 1)
        loader = torch.utils.data.DataLoader(
            RandomWindows(ids["train"], hp["block_size"]), batch_size=hp["batch_size"], shuffle=True, generator=g
        )
        it = iter(loader)
        t0 = time.time()

        def next_loss(m: nn.Module = model, it: Any = it) -> torch.Tensor:
            x, y = next(it)
            return nn.functional.cross_entropy(m(input_ids=x).logits.reshape(-1, vocab), y.reshape(-1))

        _train_steps(steps, next_loss, opt, engine)
        train_s = time.time() - t0
        total, count = 0.0, 0
        with torch.no_grad():
            for x, y in torch.utils.data.DataLoader(ConsecutiveWindows(ids["val"], hp["block_size"]), batch_size=64):
                logits = model(input_ids=x).logits
                total += float(nn.functional.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1), reduction="sum"))
                count += y.numel()
        key = name if seed == 0 else f"{name} seed{seed}"
        results["arms"][key] = {"options": options, "val_loss": total / count, "wall_s": train_s}
        log(f"  {key:18s} val loss {total / count:.4f} nats/word  ({train_s:.0f} s)", flush=True)
        if save is not None:
            save(results)
    return results


def merging_saver(path: Path, machine_info: Callable[[], dict[str, Any]]) -> Callable[[dict[str, Any]], None]:
    """A ``save`` for :func:`lm_runs`: merge a run's arms into ``path`` when its steps, model and data match the
    stored run's, else replace the file; ``machine_info()`` is stored with it."""

    def save(res: dict[str, Any]) -> None:
        stored = json.loads(path.read_text()) if path.exists() else None
        keys = ("steps", "model", "data")
        if stored is not None and all(stored.get(k) == res[k] for k in keys):
            stored["arms"].update(res["arms"])
            res = stored
        res["machine"] = machine_info()
        path.write_text(json.dumps(res, indent=1))

    return save
