"""DFA learns on tiny Hugging Face Transformers: the share of the shallow -> backprop gap it closes at equal steps.

The models, tasks and training loop are :mod:`benchmarks.tiny_transformers` (its docstring describes them); here,
the share each model must reach. ``python -m benchmarks.tiny_transformers --models gpt2,llama,bert,gemma,roberta,vit
--seeds 0,1`` prints every arm (also the paper's plain DFA, ``recipe="paper"``) with its wall and CPU time.
"""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.tiny_transformers import (
    TASKS,
    VOCAB,
    arms,
    closed_share,
    context_losses,
    markov_sequences,
    markov_table,
    train,
)


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
# RoBERTa (masked LM) 102% / 103% (the same: behind its head transform the tied table is not cut, and its post-LN
# blocks feed no norm, so the default is the paper's rule). With the tied table cut RoBERTa reached 2.74 / 2.76 nats
# instead of 2.19 / 2.18.
REQUIRED = {"gpt2": 0.75, "llama": 0.80, "bert": 0.75, "gemma": 0.80, "roberta": 0.75, "vit": 0.60}


@pytest.mark.parametrize("name", list(TASKS))
def test_dfa_closes_the_gap_between_shallow_and_backprop(name: str) -> None:
    loss = arms(name)
    assert loss["shallow"] - loss["bp"] > 0.4, loss  # the task needs the blocks: a gap worth measuring
    share = closed_share(loss["bp"], loss["dfa"], loss["shallow"])
    assert share >= REQUIRED[name], (round(share, 3), loss)
    if TASKS[name].data == "lm":  # DFA trained the blocks to use two symbols of context
        assert loss["dfa"] < context_losses(TASKS[name].seq)["one"], loss


def test_the_architectures_page_is_rendered_from_the_stored_results(tmp_path) -> None:
    """``python -m benchmarks.tiny_transformers --render``: one row per model of the stored JSON, between the
    page's markers, the text around them kept."""
    import json

    from benchmarks.tiny_transformers import DOC, RESULTS, write_doc

    page = tmp_path / "architectures.md"
    page.write_text("intro\n<!-- table: start -->\nold\n<!-- table: end -->\noutro\n")
    write_doc(page, RESULTS)
    text = page.read_text()
    models = {r["model"] for r in json.loads(RESULTS.read_text())["records"]}
    rows = [line for line in text.splitlines() if line.startswith("| ") and "`" in line]
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text
    assert len(rows) == len(models) and all(f"| {m} (" in text for m in models)
    assert DOC.read_text().count("<!-- table: start -->") == 1


def test_an_encoder_decoder_learns_its_encoder_from_what_the_decoder_reads() -> None:
    """BART on the reversal task (the decoder must read the encoder to write its input backwards): the encoder's
    points take what the decoder's blocks send back to the encoder's output as their error (``encoder_from_decoder``).
    Measured at seeds 0 / 1: 86 % / 80 % of the gap; with the output error's mean over positions instead (the rule
    before), 52 % / 49 %."""
    loss = arms("bart")
    assert loss["shallow"] - loss["bp"] > 2.0, loss
    share = closed_share(loss["bp"], loss["dfa"], loss["shallow"])
    assert share >= 0.7, (round(share, 3), loss)


def test_dfa_closes_the_gap_on_a_transformer_written_by_hand() -> None:
    """``lucid_gpt``: a GPT written as lucidrains writes Transformers (lists of ``[attention, feed-forward]``, the
    residual adds in the parent's loop). Measured at seeds 0 / 1: 92% / 92% (the paper's plain DFA 47% / 41%); with
    every sublayer a block and the stream around them uncut, the default did worse than the shallow baseline."""
    loss = arms("lucid_gpt")
    assert closed_share(loss["bp"], loss["dfa"], loss["shallow"]) >= 0.75, loss


def test_dfa_learns_on_pytorch_s_post_norm_transformer_encoder() -> None:
    """``nn.TransformerEncoder`` with PyTorch's default ``norm_first=False`` on the order task of
    :mod:`benchmarks.post_norm` (chance 0.693). The blocks' input point reaches ``norm1`` only through the residual
    add; fed raw, DFA stayed at chance at seed 0 (0.693, shallow 0.686)."""
    from benchmarks.post_norm import train as train_post_norm

    torch.set_num_threads(1)
    dfa, shallow = train_post_norm("dfa", False, False, seed=0), train_post_norm("shallow", False, False, seed=0)
    assert dfa < 0.4 < 0.6 < shallow, (dfa, shallow)


@pytest.mark.parametrize("name", ["gpt2_cls", "llama_cls"])
def test_dfa_closes_the_gap_on_a_sequence_classifier_reading_its_last_token(name: str) -> None:
    """GPT-2's and Llama's sequence classifiers (they score every position and read the last token's) on the order
    of two marks: each item's error sits at one position, whose feedback the points before the last block get at
    every position (``spread_read_token``), and the token tables get none (``cut_token_embedding``). Measured at
    seeds 0 / 1: GPT-2 99 % / 99 % of the gap, Llama 100 % / 96 % (the paper's plain DFA 31 % / 26 % and 45 % /
    13 %)."""
    loss = arms(name)
    assert loss["shallow"] - loss["bp"] > 0.4, loss
    assert closed_share(loss["bp"], loss["dfa"], loss["shallow"]) >= 0.8, loss


def test_dfa_closes_the_gap_on_a_token_classifier_whose_token_table_is_kept() -> None:
    """BERT's token classifier labels each symbol by comparing its two neighbours. Its token, position and
    token-type tables get no feedback (``cut_token_embedding``): trained by ``B e`` they drift towards a code of the
    labels, which no symbol tells, and the blocks lose the symbols. Measured at seeds 0 / 1: 85 % / 83 % of the gap
    with the cut, 38 % / 34 % without."""
    loss = arms("bert_tok")
    assert loss["shallow"] - loss["bp"] > 0.4, loss
    assert closed_share(loss["bp"], loss["dfa"], loss["shallow"]) >= 0.7, loss
    fed = train("bert_tok", "dfa", {"cut_token_embedding": False})
    assert closed_share(loss["bp"], fed, loss["shallow"]) < 0.5, (fed, loss)
