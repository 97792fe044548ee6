"""The default flag's recipe ("auto"), chosen from the model's structure, and the paper's plain DFA one option away."""

from __future__ import annotations

import math
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import transformers as hf
from conftest import mlp, trainer
from torch import nn

import lightning_dfa
from lightning_dfa import DFAConfig, FeedbackEngine
from lightning_dfa.norms import NormSpec, norm_vjp, probe_normalisation

VOCAB = 96


def _gpt2() -> nn.Module:
    cfg = hf.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=16,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return hf.GPT2LMHeadModel(cfg)


def _llama() -> nn.Module:
    cfg = hf.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    return hf.LlamaForCausalLM(cfg)


def _lm_step(model: nn.Module, engine: FeedbackEngine, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 9), generator=g)
    model.zero_grad()
    logits = model(input_ids=ids[:, :-1]).logits
    nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).backward()
    engine.end_backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_config_defaults_leave_the_choices_to_the_recipe() -> None:
    cfg = DFAConfig()
    recipe = ("norm_jacobian", "cut_head_input", "norm_points", "cut_token_embedding", "sketch")
    assert (cfg.recipe, *(getattr(cfg, n) for n in recipe)) == ("auto",) + (None,) * 5
    paper = DFAConfig(recipe="paper")
    assert [paper.chosen(n) for n in recipe] == [False] * 5
    assert DFAConfig(recipe="paper", sketch=True).chosen("sketch") is True  # every option stays overridable
    with pytest.raises(ValueError, match="recipe must be one of"):
        DFAConfig(recipe="best")
    with pytest.raises(ValueError, match="norm_jacobian must be True, False or None"):
        DFAConfig(norm_jacobian="yes")
    strategy = lightning_dfa.DFAStrategy(recipe="paper", norm_jacobian=True)
    assert strategy.dfa.config.recipe == "paper" and strategy.dfa.config.norm_jacobian is True


@pytest.mark.parametrize(("build", "kind"), [(_gpt2, "layer"), (_llama, "rms")])
def test_default_on_a_pre_norm_transformer(build, kind: str) -> None:
    torch.manual_seed(0)
    model = build()
    engine = FeedbackEngine()
    engine.attach(model)
    assert engine.norm_feedback == "consumer" and engine.cut_head_input and engine.sketch and engine.norm_points
    assert engine.cut_token_embedding
    _lm_step(model, engine)
    keys = [p.key for p in engine.last_points]
    # the embeddings get no feedback (cut_token_embedding), so the first block's input is no point; the first
    # block's output feeds the next block's first norm, whose output is a point too (norm_points); the last
    # block's output is not cut: the head's input is the last point
    assert keys[-1].endswith(":in") and keys[-1].startswith("lm_head")
    assert not [k for k in keys[:-1] if k.endswith(":in")], keys
    blocks = [n for n, m in model.named_modules() if n.endswith(".0") or n.endswith(".1")]
    first_norms = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in ("ln_1", "input_layernorm")]
    assert [k for k in keys if k in first_norms] == first_norms[1:]
    normed = [p for p in engine.last_points if p.norm is not None]
    assert {p.key for p in normed} == {blocks[0]}, keys
    assert {p.norm.kind for p in normed} == {kind}
    notes = "\n".join(engine.recipe_notes())
    assert "norm-aware feedback: 1 points feed a norm" in notes and "cut_head_input: on" in notes
    assert "norm_points: on" in notes and "(1 found)" in notes and "cut_token_embedding: on" in notes
    engine.detach()


class NormedEmbedding(nn.Embedding):
    """A token table with a norm inside it (as some Hugging Face models have)."""

    def __init__(self, n: int, d: int) -> None:
        super().__init__(n, d)
        self.embed_norm = nn.LayerNorm(d)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_norm(super().forward(ids))


def test_what_a_kept_token_table_holds_is_kept_too() -> None:
    torch.manual_seed(0)
    model = _llama()
    model.model.embed_tokens = NormedEmbedding(VOCAB, 32)
    norm = model.model.embed_tokens.embed_norm.weight
    engine = FeedbackEngine()
    engine.attach(model)
    grads = _lm_step(model, engine)
    # the table's output is cut, so nothing inside it gets feedback: frozen, and counted so, not left unfed
    assert not any(n.startswith("model.embed_tokens.") for n in grads) and not norm.requires_grad
    assert engine.role_of(norm) == "none"
    engine.detach()
    assert norm.requires_grad and engine.role_of(norm) == "none"
    # the table's weight tied to the head (the table then holds more than tied weights): the head still learns
    torch.manual_seed(0)
    tied = _llama()
    tied.model.embed_tokens = NormedEmbedding(VOCAB, 32)
    tied.lm_head.weight = tied.model.embed_tokens.weight
    engine = FeedbackEngine()
    engine.attach(tied)
    _lm_step(tied, engine)
    assert tied.lm_head.weight.grad is not None and tied.lm_head.weight.requires_grad
    assert not tied.model.embed_tokens.embed_norm.weight.requires_grad
    assert engine.role_of(tied.lm_head.weight) == "true gradient"
    engine.detach()


def test_an_untied_token_embedding_keeps_its_initial_values() -> None:
    torch.manual_seed(0)
    model = _llama()  # embed_tokens is not tied to lm_head
    table = model.model.embed_tokens.weight
    engine = FeedbackEngine()
    engine.attach(model)
    grads = _lm_step(model, engine)
    assert "model.embed_tokens.weight" not in grads and not table.requires_grad
    assert engine.role_of(table) == "none" and engine.parameter_roles()["none"] == table.numel()
    assert "model.embed_tokens (kept at its initial values)" in "\n".join(engine.recipe_notes())
    engine.detach()
    assert table.requires_grad  # given back when detached
    assert engine.role_of(table) == "none" and engine.parameter_roles()["none"] == table.numel()  # (what it did)
    for options in ({"recipe": "paper"}, {"cut_token_embedding": False}):  # feedback reaches it again
        engine = FeedbackEngine(**options)
        engine.attach(model)
        grads = _lm_step(model, engine)
        engine.detach()
        assert grads["model.embed_tokens.weight"].abs().sum() > 0, options


def _classifier(kind: str) -> nn.Module:
    cfg = hf.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=16, num_labels=2)  # fmt: skip
    if kind == "token":
        return hf.BertForTokenClassification(cfg)
    if kind == "sequence":
        return hf.BertForSequenceClassification(cfg)
    return hf.OPTForSequenceClassification(hf.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16, word_embed_proj_dim=32, num_labels=2, pad_token_id=0))  # fmt: skip


@pytest.mark.parametrize("kind", ["token", "sequence", "decoder"])
def test_a_classifiers_token_tables_keep_their_initial_values(kind: str) -> None:
    """A Hugging Face classifier has no vocabulary head; its input token table and the tables beside it (positions,
    token types) get no feedback: trained by ``B e`` they drift towards a code of the labels."""
    torch.manual_seed(0)
    model = _classifier(kind)
    tables = {n: m for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    assert len(tables) >= 2
    ids = torch.randint(1, VOCAB, (4, 16))
    labels = torch.randint(0, 2, (4, 16) if kind == "token" else (4,))
    engine = FeedbackEngine()
    engine.attach(model)
    model(input_ids=ids, labels=labels).loss.backward()
    engine.end_backward()
    notes = "\n".join(engine.recipe_notes())
    for name, table in tables.items():
        assert table.weight.grad is None and not table.weight.requires_grad, name
        assert f"{name} (kept at its initial values)" in notes, notes
    blocks = [p for n, p in model.named_parameters() if ".layer" in n and p.requires_grad]
    assert blocks and all(p.grad is not None for p in blocks)  # the blocks still learn
    engine.detach()
    assert all(t.weight.requires_grad for t in tables.values())  # given back when detached
    model.zero_grad(set_to_none=True)
    for options in ({"recipe": "paper"}, {"cut_token_embedding": False}):  # feedback reaches them again
        engine = FeedbackEngine(**options)
        engine.attach(model)
        model(input_ids=ids, labels=labels).loss.backward()
        engine.end_backward()
        engine.detach()
        word = model.get_input_embeddings().weight
        assert word.grad is not None and word.grad.abs().sum() > 0, options
        model.zero_grad(set_to_none=True)


class CharLM(nn.Module):
    """A hand-written language model: token and position tables (no Hugging Face), two Linear+Tanh layers."""

    def __init__(self, vocab: int, d: int) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, d), nn.Embedding(16, d)
        self.layers = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d), nn.Tanh())
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.tokens(ids) + self.positions(torch.arange(ids.shape[1]))))


class Tabular(nn.Module):
    """A classifier of 4 classes over two categorical features, one of which has 4 values too."""

    def __init__(self) -> None:
        super().__init__()
        self.weekday, self.store = nn.Embedding(4, 8), nn.Embedding(50, 8)
        self.layers = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh())
        self.head = nn.Linear(32, 4)

    def forward(self, cat: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(torch.cat([self.weekday(cat[:, 0]), self.store(cat[:, 1])], 1)))


def test_a_table_is_a_vocabulary_when_the_output_predicts_and_reads_its_shape() -> None:
    """A hand-written language model's token table (as many rows as the output predicts, as wide as it reads) is
    cut, with the position table beside it; a classifier's categorical feature that merely has as many values as
    there are classes is not, nor the feature beside it: both learn by feedback."""
    torch.manual_seed(0)
    lm, ids = CharLM(12, 16), torch.randint(0, 12, (2, 6))
    engine = FeedbackEngine()
    engine.attach(lm)
    nn.functional.cross_entropy(lm(ids).flatten(0, 1), ids.flatten()).backward()
    engine.end_backward()
    assert [n for n, _, _ in engine._token_embeddings] == ["tokens", "positions"]
    assert lm.tokens.weight.grad is None and lm.positions.weight.grad is None
    engine.detach()
    model, cat = Tabular(), torch.stack([torch.randint(0, 4, (8,)), torch.randint(0, 50, (8,))], 1)
    engine = FeedbackEngine()
    engine.attach(model)
    nn.functional.cross_entropy(model(cat), cat[:, 0]).backward()
    engine.end_backward()
    notes = "\n".join(engine.recipe_notes())
    assert engine._token_embeddings == []
    assert "nothing to cut (no embedding over the output's vocabulary, nor a classifier's token table, found)" in notes
    assert model.weekday.weight.grad.abs().sum() > 0 and model.store.weight.grad.abs().sum() > 0
    engine.detach()


def test_a_tied_token_embedding_learns_from_the_head_alone() -> None:
    torch.manual_seed(0)
    model = _gpt2()  # wte is tied to lm_head; wpe (learned positions) lies beside it
    assert model.lm_head.weight is model.transformer.wte.weight
    engine = FeedbackEngine()
    engine.attach(model)
    grads = _lm_step(model, engine)
    notes = "\n".join(engine.recipe_notes())
    engine.detach()
    # the position table beside it learns from the first block's backward (tables_from_first_block)
    assert grads["transformer.wpe.weight"].abs().sum() > 0
    assert "transformer.wte (tied: learns from the output only)" in notes
    assert "tables_from_first_block: on: transformer.wpe" in notes
    # the reference: the head's true gradient alone (backprop with everything before the head detached)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 9), generator=g)
    model.zero_grad()
    hidden = model.transformer(input_ids=ids[:, :-1]).last_hidden_state.detach()
    nn.functional.cross_entropy(model.lm_head(hidden).reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).backward()
    head = model.lm_head.weight.grad.clone()
    torch.testing.assert_close(grads["transformer.wte.weight"], head)
    engine = FeedbackEngine(cut_token_embedding=False)
    engine.attach(model)
    plain = _lm_step(model, engine)
    engine.detach()
    assert not torch.allclose(plain["transformer.wte.weight"], head)  # the head's gradient + the feedback


class _HandWrittenLM(nn.Module):
    """A causal LM of no library: a token table, two residual MLP blocks behind LayerNorms, a final norm and a head
    over the same vocabulary (12 tokens, narrower than the width of 32)."""

    def __init__(self, vocab: int = 12, width: int = 32) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU()) for _ in range(2)
        )
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tok(ids)
        for block in self.blocks:
            h = h + block(h)
        return self.head(self.norm(h))


def test_a_language_models_head_input_is_cut_under_a_vocabulary_narrower_than_its_width() -> None:
    """The cut follows what the head predicts, not its width: a small vocabulary (as in a tiny test config) is cut as
    a real one is, and a classifier's narrow head is not."""
    small = {"vocab_size": 24, "decoder_start_token_id": 2}
    cases = [
        (hf.GPT2LMHeadModel(hf.GPT2Config(vocab_size=24, n_embd=32, n_layer=2, n_head=2, n_positions=16)), True),
        (hf.BartForConditionalGeneration(hf.BartConfig(**small, d_model=32, encoder_layers=1, decoder_layers=1,
                                                       encoder_attention_heads=2, decoder_attention_heads=2,
                                                       encoder_ffn_dim=64, decoder_ffn_dim=64)), True),
        (hf.T5ForConditionalGeneration(hf.T5Config(**small, d_model=32, d_kv=16, d_ff=64, num_layers=1,
                                                   num_heads=2)), True),
        (_HandWrittenLM(), True),
        (hf.GPT2ForSequenceClassification(hf.GPT2Config(vocab_size=24, n_embd=32, n_layer=2, n_head=2,
                                                        n_positions=16, num_labels=3, pad_token_id=0)), False),
        (nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)), False),
    ]  # fmt: skip
    for model, cut in cases:
        engine = FeedbackEngine()
        engine.attach(model)
        assert engine.cut_head_input is cut, type(model).__name__
        notes = engine.recipe_notes()
        if cut:
            assert any("cut_head_input: on" in n and ("vocabulary" in n or "widens" in n) for n in notes), notes
        engine.detach()
    lm = _HandWrittenLM()
    engine = FeedbackEngine()
    engine.attach(lm)
    assert "cut_head_input: on (the output predicts over the token vocabulary: a language model's head)" in "\n".join(
        engine.recipe_notes()
    )
    ids = torch.randint(0, 12, (4, 6), generator=torch.Generator().manual_seed(0))
    loss = nn.functional.cross_entropy(lm(ids[:, :-1]).reshape(-1, 12), ids[:, 1:].reshape(-1))
    loss.backward()
    engine.end_backward(loss)
    assert [p.key for p in engine.last_points][-1] == "head:in"  # the head's input is the last point
    assert lm.norm.weight.grad is not None and bool(lm.norm.weight.grad.abs().sum() > 0)  # the final norm: by feedback
    assert engine.role_of(lm.norm.weight) == "feedback"
    engine.detach()
    paper = FeedbackEngine(recipe="paper")  # the paper's rule: the last block's output stays the last point
    paper.attach(_HandWrittenLM())
    assert not paper.cut_head_input


@pytest.mark.parametrize(
    ("head", "why"),
    [
        (hf.BertForMaskedLM, "layers other than norms lie between the last block and the output module"),
        (hf.BertForSequenceClassification, "the output module neither widens nor predicts over a token vocabulary"),
    ],
)
def test_the_summary_says_why_the_head_input_is_not_cut(head: type, why: str) -> None:
    cfg = hf.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16)  # fmt: skip
    engine = FeedbackEngine()
    engine.attach(head(cfg))
    assert not engine.cut_head_input
    assert f"cut_head_input: off ({why})" in engine.recipe_notes()


@pytest.mark.parametrize("cls", ["RobertaForMaskedLM", "XLMRobertaForMaskedLM"])
def test_a_head_transform_registered_before_the_blocks_is_found_as_after_them(cls: str) -> None:
    """XLM-RoBERTa registers its masked-LM head before the encoder (RoBERTa after it): the same head transform, so
    the same recipe (the tied table is not cut, the head transform learns by its true gradient)."""
    torch.manual_seed(0)
    config = getattr(hf, cls.replace("ForMaskedLM", "Config"))
    model = getattr(hf, cls)(config(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=32, max_position_embeddings=16, pad_token_id=0))  # fmt: skip
    engine = FeedbackEngine()
    engine.attach(model)
    assert "cut_token_embedding: on: not applied" in "\n".join(engine.recipe_notes())
    assert engine.role_of(model.lm_head.dense.weight) == "true gradient"
    assert all(p.requires_grad for p in model.parameters())
    engine.detach()


def test_an_architecture_without_normalisation_gets_the_layernorm_jacobian_at_every_point() -> None:
    """MobileBERT's default NoNorm keeps no normalisation in its blocks: the recipe gives every point the LayerNorm
    Jacobian (fed raw, the feedback let its activations grow until the masked-LM loss was NaN after 129 steps), and
    says why; with its LayerNorm option the norm-consumer rule applies, as elsewhere. 150 steps stay finite."""
    from benchmarks.tiny_transformers import ALL, batches

    task = ALL["mobilebert"]
    torch.manual_seed(0)
    model = task.build(task.seq)
    engine = FeedbackEngine()
    engine.attach(model)
    assert engine.norm_feedback == "layernorm" and engine.unnormalised == "mobilebert"
    assert "LayerNorm Jacobian at every point (mobilebert's blocks keep no normalisation" in "\n".join(
        engine.recipe_notes()
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=task.lr)
    for batch in batches(task, 100, task.batch, 150):
        optimizer.zero_grad(set_to_none=True)
        loss = task.loss(model, batch)
        loss.backward()
        engine.end_backward()
        optimizer.step()
    assert math.isfinite(loss.item()) and loss.item() < 3.0, loss.item()  # (chance: 3.47 nats)
    engine.detach()
    layer_norm = hf.MobileBertForMaskedLM(hf.MobileBertConfig(**{**model.config.to_dict(),
                                                                 "normalization_type": "layer_norm"}))  # fmt: skip
    engine = FeedbackEngine()
    engine.attach(layer_norm)
    assert engine.norm_feedback == "consumer" and engine.unnormalised is None
    engine.detach()
    engine = FeedbackEngine(norm_jacobian=False)  # the option set overrides the recipe's choice
    engine.attach(model)
    assert engine.norm_feedback == "off"
    engine.detach()


def test_a_tied_table_behind_a_head_transform_is_not_cut() -> None:
    """BERT's masked-LM head (dense, activation, LayerNorm, then the decoder tied to the word embeddings): cutting
    the tied table was measured to cost learning there, so the plain rule feeds it; untied, it is cut."""
    torch.manual_seed(0)
    cfg = hf.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)  # fmt: skip
    model = hf.BertForMaskedLM(cfg)
    embeddings = model.bert.embeddings
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))

    def grads(engine: FeedbackEngine) -> dict[str, torch.Tensor | None]:
        model.zero_grad(set_to_none=True)
        engine.attach(model)
        model(input_ids=ids, labels=ids).loss.backward()
        engine.end_backward()
        engine.detach()
        return {
            "words": embeddings.word_embeddings.weight.grad,
            "positions": embeddings.position_embeddings.weight.grad,
        }

    engine = FeedbackEngine()
    auto = grads(engine)
    assert "cut_token_embedding: on: not applied: the token embedding (bert.embeddings.word_embeddings) is tied" in (
        "\n".join(engine.recipe_notes())
    )
    plain = grads(FeedbackEngine(cut_token_embedding=False))
    assert auto["positions"] is not None and torch.equal(auto["positions"], plain["positions"])
    torch.testing.assert_close(auto["words"], plain["words"])
    untied = hf.BertForMaskedLM(hf.BertConfig(**{**cfg.to_dict(), "tie_word_embeddings": False}))
    engine = FeedbackEngine()
    engine.attach(untied)
    assert [n for n, _, _ in engine._token_embeddings][:2] == [
        "bert.embeddings.word_embeddings",
        "bert.embeddings.position_embeddings",
    ]


def test_the_decoder_points_of_an_encoder_decoder_find_their_norms() -> None:
    """T5: the encoder's final norm is a candidate output, tied on the way to the decoder; the decoder's blocks read
    their inputs through norms too, and their points must get norm-aware feedback as the encoder's do (where the
    encoder's points take the output's error: ``encoder_from_decoder=False``)."""
    torch.manual_seed(0)
    cfg = hf.T5Config(vocab_size=VOCAB, d_model=16, d_ff=32, d_kv=8, num_layers=2, num_heads=2,
                      decoder_start_token_id=0, dropout_rate=0.0)  # fmt: skip
    model = hf.T5ForConditionalGeneration(cfg)
    engine = FeedbackEngine(encoder_from_decoder=False)
    engine.attach(model)
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    engine.end_backward()
    normed = {p.key for p in engine.last_points if p.norm is not None}
    engine.detach()
    assert {"encoder.block.0", "decoder.block.0"} <= normed, normed
    assert all(p.norm.kind == "rms" for p in engine.last_points if p.norm is not None)


@pytest.mark.parametrize("target_length", [6, 4])
def test_an_encoders_points_get_the_mean_error_whatever_the_lengths(target_length: int) -> None:
    """With ``encoder_from_decoder=False``: an encoder's position i is not the decoder's position i, so its points
    are fed the error's mean over the decoder's positions, also where the source and the target happen to be
    equally long."""
    torch.manual_seed(0)
    model = hf.BartForConditionalGeneration(_tiny_bart_config())
    engine = FeedbackEngine(encoder_from_decoder=False)
    seen: dict[str, torch.Tensor] = {}
    engine.feedback_observers.append(lambda e, points, fbs: seen.update({p.key: f for p, f in zip(points, fbs)}))
    engine.attach(model)
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(3, VOCAB, (2, 6), generator=g), torch.randint(3, VOCAB, (2, target_length), generator=g)
    model(input_ids=ids, labels=labels).loss.backward()
    engine.end_backward()
    engine.detach()
    encoder = [k for k in seen if k.startswith("model.encoder.")]
    decoder = [k for k in seen if k.startswith("model.decoder.")]
    assert encoder and decoder, list(seen)
    for k in encoder:  # the same feedback at every position of an item
        torch.testing.assert_close(seen[k], seen[k][:, :1].expand_as(seen[k]))
    assert not torch.allclose(seen[decoder[0]][:, 0], seen[decoder[0]][:, 1])  # the decoder's: position by position


def _tiny_bart_config() -> hf.BartConfig:
    return hf.BartConfig(vocab_size=VOCAB, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                         decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                         max_position_embeddings=32, dropout=0.0)  # fmt: skip


@pytest.mark.parametrize("target_length", [6, 4])
def test_an_encoders_points_get_what_the_decoders_blocks_send_back_to_its_output(target_length: int) -> None:
    """By default every point of an encoder-decoder's encoder receives, as it is, the gradient that the decoder's
    blocks send back to the encoder's output through their cross-attention (from their own feedback): one signal,
    position by position, with no backprop through the encoder's blocks; the output's error reaches the encoder
    only that way."""
    torch.manual_seed(0)
    model = hf.BartForConditionalGeneration(_tiny_bart_config())
    engine = FeedbackEngine()
    engine.attach(model)
    received: dict[str, torch.Tensor] = {}

    def watch(key: str, tensor: torch.Tensor) -> None:
        if key.startswith("model.encoder.") and tensor.requires_grad:
            tensor.register_hook(lambda grad, key=key: received.update({key: grad}))

    engine.point_observers.append(watch)
    reads: dict[int, torch.Tensor] = {}
    sent: list[torch.Tensor] = []

    def read(module: nn.Module, args: tuple, kwargs: dict) -> None:
        memory = kwargs.get("encoder_hidden_states")
        if memory is None:
            memory = next(a for a in args[1:] if isinstance(a, torch.Tensor) and a.dim() == 3)
        if id(memory) not in reads:  # one value for every decoder layer: its hook sees the sum they send back
            reads[id(memory)] = memory
            memory.register_hook(sent.append)

    handles = [layer.register_forward_pre_hook(read, with_kwargs=True) for layer in model.model.decoder.layers]
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(3, VOCAB, (2, 6), generator=g), torch.randint(3, VOCAB, (2, target_length), generator=g)
    model(input_ids=ids, labels=labels).loss.backward()
    report = engine.end_backward()
    for h in handles:
        h.remove()
    notes = " ".join(engine.recipe_notes())
    engine.detach()
    assert len(reads) == 1 and len(sent) == 1
    # (the first layer's input is no point: the learned positions beside the tied token table learn through that
    # layer, tables_from_first_block)
    expected = ["model.encoder.layers.0", "model.encoder.layers.1"]
    assert sorted(received) == sorted(expected)
    assert {"model.encoder.layers.0", "model.encoder.layers.1"} <= {p.key.split("#")[0] for p in report.points_fed}
    for key in expected:
        torch.testing.assert_close(received[key], sent[0])
    assert sent[0].abs().sum() > 0
    assert not torch.allclose(sent[0][:, 0], sent[0][:, 1])  # position by position, not the mean
    assert "encoder_from_decoder: on" in notes


def test_an_encoders_error_from_the_decoder_is_the_same_with_activation_checkpointing() -> None:
    """The decoder's blocks recomputed in the backward (Hugging Face's gradient checkpointing, non-reentrant) read
    the encoder's output as the forward handed it: every gradient equals the one without checkpointing."""
    import copy

    torch.manual_seed(0)
    base = hf.BartForConditionalGeneration(_tiny_bart_config())
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(3, VOCAB, (2, 6), generator=g), torch.randint(3, VOCAB, (2, 4), generator=g)
    grads = []
    for checkpointing in (False, True):
        model = copy.deepcopy(base).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        engine = FeedbackEngine()
        engine.attach(model)
        for _ in range(2):  # the first training forward keeps its cuts in the graph; the second does not
            model.zero_grad()
            model(input_ids=ids, labels=labels).loss.backward()
            engine.end_backward()
        engine.detach()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert any(n.startswith("model.encoder.layers.") for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_encoder_only_models_have_no_encoder_points() -> None:
    """BERT's generic ``get_decoder()`` returns the model that holds its encoder: no encoder-decoder, so its points
    keep the error position by position."""
    from lightning_dfa.roles import encoder_modules

    cfg = hf.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16)  # fmt: skip
    model = hf.BertForMaskedLM(cfg)
    engine = FeedbackEngine()
    assert encoder_modules(model, engine.attach(model)) == set()


def test_the_cut_reaches_the_modules_that_share_the_token_table() -> None:
    """BART embeds with the encoder's and the decoder's own modules around the model's ``shared`` weight (never
    called itself): both are cut; the learned positions beside each learn from the first layer of their stack
    (``tables_from_first_block``: the table is tied to the head), or keep their initial values without it."""
    torch.manual_seed(0)
    cfg = hf.BartConfig(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
                        dropout=0.0)  # fmt: skip
    model = hf.BartForConditionalGeneration(cfg)
    encoder, decoder = model.model.encoder, model.model.decoder
    assert encoder.embed_tokens is not model.model.shared and encoder.embed_tokens.weight is model.lm_head.weight
    ids = torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))

    def table_gradient(engine: FeedbackEngine) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        engine.attach(model)
        model(input_ids=ids, labels=ids).loss.backward()
        engine.end_backward()
        positions = encoder.embed_positions.weight.grad, decoder.embed_positions.weight.grad
        kept = engine.cut_token_embedding and not engine.tables_from_first_block
        assert all(g is None for g in positions) == kept and all(g is not None for g in positions) == (not kept)
        grad = model.lm_head.weight.grad.clone()
        engine.detach()
        return grad

    engine = FeedbackEngine()
    cut = table_gradient(engine)
    notes = "\n".join(engine.recipe_notes())
    learned = "tables_from_first_block: on: model.encoder.embed_positions, model.decoder.embed_positions"
    for name in ("model.encoder.embed_tokens (tied", "model.decoder.embed_tokens (tied", learned):
        assert name in notes
    fixed = FeedbackEngine(tables_from_first_block=False)
    kept = table_gradient(fixed)
    assert "model.encoder.embed_positions (kept at its initial values)" in "\n".join(fixed.recipe_notes())
    torch.testing.assert_close(kept, cut)  # the head's gradient is the same either way
    assert encoder.embed_positions.weight.requires_grad  # given back on detach
    # the head's true gradient alone: everything before the head detached
    model.zero_grad(set_to_none=True)
    out = model.model(input_ids=ids, decoder_input_ids=hf.models.bart.modeling_bart.shift_tokens_right(
        ids, cfg.pad_token_id, cfg.decoder_start_token_id))  # fmt: skip
    logits = model.lm_head(out.last_hidden_state.detach()) + model.final_logits_bias
    nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids.reshape(-1)).backward()
    torch.testing.assert_close(cut, model.lm_head.weight.grad)
    plain = table_gradient(FeedbackEngine(cut_token_embedding=False))
    assert not torch.allclose(plain, cut)


def test_a_decoders_position_table_read_after_the_encoders_points_learns_from_its_first_layer() -> None:
    """BART's decoder embeds after the encoder's points, so its position table and embedding norm are tied on the
    way as layers that may be outputs. Its first layer still reads the tables released beside the tied token table
    through those ties: its input is no feedback point, and the tables learn from that layer's backward of its own
    feedback, exactly as with the output named (where no other layer is tied). Before, the ties hid the tables and
    the decoder's input was fed ``B e`` of its own."""
    torch.manual_seed(0)
    model = hf.BartForConditionalGeneration(_tiny_bart_config())
    ids = torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    grads = []
    for engine in (FeedbackEngine(seed=0), FeedbackEngine(seed=0, output="lm_head")):
        engine.attach(model)
        for _ in range(2):  # the second forward: the roles and consumers are known
            model.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            report = engine.end_backward(loss)
        fed = {p.key for p in report.points_fed}
        assert "model.decoder.layers.0" in fed and "model.decoder.layers.0:in" not in fed
        embedding = {n: p for n, p in model.named_parameters() if "decoder.embed" in n or "embedding" in n}
        grads.append({n: p.grad.clone() for n, p in embedding.items()})
        engine.detach()
    assert grads[0].keys() == grads[1].keys() and "model.decoder.embed_positions.weight" in grads[0]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], msg=name)


def test_norm_aware_feedback_is_the_consumers_jacobian_of_the_plain_feedback() -> None:
    torch.manual_seed(0)
    model = _llama()
    ids = torch.randint(0, VOCAB, (2, 8))
    auto = FeedbackEngine(sketch=False, norm_points=False)
    paper = FeedbackEngine(recipe="paper", cut_head_input=True)
    auto.attach(model)
    _lm_step(model, auto)  # the first forward finds each point's consumer
    with auto.capture() as cap:
        logits = model(input_ids=ids).logits
    error = torch.autograd.grad(logits.logsumexp(-1).sum(), cap.outputs[0])[0]
    shaped = auto.feedback_for(error, cap.points)
    auto.detach()
    paper.attach(model)
    plain = paper.feedback_for(error, cap.points)
    paper.detach()
    first = model.model.layers[0].input_layernorm
    for point, s, p in zip(cap.points, shaped, plain):
        if point.key.startswith("lm_head"):
            torch.testing.assert_close(s, p)  # its consumer is the head, not a norm
            continue
        h = point.tensor.detach().clone().requires_grad_()
        ref = torch.autograd.grad(nn.functional.rms_norm(h, (h.shape[-1],), eps=first.variance_epsilon), h, p)[0]
        torch.testing.assert_close(s, ref, rtol=1e-4, atol=1e-6)


class _SlicingLayer(nn.TransformerEncoderLayer):
    """Returns its output through a slice that keeps it whole (as LUKE's layers return ``output[:, :word_size]``)."""

    def forward(self, src: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return super().forward(src, *args, **kwargs)[:, : src.size(1)]


class _ConvLayer(nn.TransformerEncoderLayer):
    """Mixes its input with a depthwise convolution over positions first (as ConvBERT's layers do): a block with a
    convolution, whose points the engine flattens."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conv = nn.Conv1d(32, 32, 3, padding=1, groups=32)

    def forward(self, src: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return super().forward(src + self.conv(src.transpose(1, 2)).transpose(1, 2), *args, **kwargs)


class _Encoder(nn.Module):
    """PyTorch's ``nn.TransformerEncoder`` classifier, post-norm (its default) or pre-norm, with or without a LayerNorm
    and dropout on its input (as BERT's embeddings have); ``layer`` may subclass ``nn.TransformerEncoderLayer``."""

    def __init__(self, norm_first: bool, input_norm: bool, layer: type[nn.Module] = nn.TransformerEncoderLayer) -> None:
        super().__init__()
        self.embed, self.pos = nn.Embedding(16, 32), nn.Parameter(torch.randn(1, 6, 32) * 0.1)
        self.norm = nn.Sequential(nn.LayerNorm(32), nn.Dropout(0.1)) if input_norm else nn.Identity()
        block = layer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(block, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.norm(self.embed(x) + self.pos)).mean(1))


@pytest.mark.parametrize(
    ("input_norm", "layer"),
    [
        (False, nn.TransformerEncoderLayer),
        (True, nn.TransformerEncoderLayer),
        (True, _SlicingLayer),
        (False, _ConvLayer),
    ],
    ids=["raw_input", "normed_input", "normed_input_sliced_outputs", "raw_input_conv_blocks"],
)
def test_a_post_norm_block_s_input_takes_the_jacobian_of_the_norm_it_reaches_through_the_residual_add(
    input_norm: bool, layer: type[nn.Module]
) -> None:
    torch.manual_seed(0)
    model, x, y = _Encoder(False, input_norm, layer), torch.randint(0, 16, (4, 6)), torch.randint(0, 3, (4,))
    auto = FeedbackEngine(seed=0)
    auto.attach(model)
    nn.functional.cross_entropy(model(x), y).backward()  # the first forward finds each point's consumer
    auto.end_backward()
    with auto.capture() as cap:
        out = model(x)
    error = torch.autograd.grad(nn.functional.cross_entropy(out, y), cap.outputs[0])[0]
    shaped = auto.feedback_for(error, cap.points)
    notes = "\n".join(auto.recipe_notes())
    auto.detach()
    plain = FeedbackEngine(seed=0, norm_jacobian=False)
    plain.attach(model)
    nn.functional.cross_entropy(model(x), y).backward()  # (the points' layout, found in the first forward)
    plain.end_backward()
    raw = plain.feedback_for(error, cap.points)
    plain.detach()
    keys = [p.key for p in cap.points]
    assert {"encoder.layers.0:in", "encoder.layers.0", "encoder.layers.1"} <= set(keys)
    for point, s, r in zip(cap.points, shaped, raw):
        if point.key == "encoder.layers.0:in" and not input_norm:
            # norm1(x + attention(x)) reads it: that norm's Jacobian at the point's own activation
            h = point.tensor.detach().clone().requires_grad_()
            ref = torch.autograd.grad(nn.functional.layer_norm(h, (32,)), h, r)[0]
            torch.testing.assert_close(s, ref)
            assert s.sum(-1).abs().max() < 1e-5 < r.sum(-1).abs().max()
        else:
            # a norm's output (a block's norm2, the input's LayerNorm through dropout; the capture also records
            # the second block's input, the first block's output): fed as it is
            torch.testing.assert_close(s, r)
    if input_norm:
        assert "norm-aware feedback: at points whose consumer is a LayerNorm/RMSNorm (none here)" in notes
    else:
        assert "1 points feed a norm (LayerNorm), 1 of them through a residual add (post-norm)" in notes


def test_a_pre_norm_block_s_input_keeps_the_norm_that_reads_it() -> None:
    torch.manual_seed(0)
    model, x, y = _Encoder(True, False), torch.randint(0, 16, (4, 6)), torch.randint(0, 3, (4,))
    engine = FeedbackEngine(seed=0)
    engine.attach(model)
    nn.functional.cross_entropy(model(x), y).backward()
    engine.end_backward()
    # each block's input is read by its norm1; the last block's output by the mean and the head, no norm
    assert set(engine._consumers) == {"encoder.layers.0:in", "encoder.layers.0"}
    assert not engine._residual_consumers
    engine.detach()


def test_models_without_norms_or_wide_outputs_keep_the_plain_rule() -> None:
    torch.manual_seed(0)
    net, x, y = mlp(width=16, n_in=6, n_out=3, depth=2), torch.randn(5, 6), torch.randint(0, 3, (5,))
    grads = []
    for options in ({}, {"recipe": "paper"}):
        engine = FeedbackEngine(seed=2, **options)
        engine.attach(net)
        net.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        engine.end_backward()
        assert not engine.cut_head_input and not any(p.norm for p in engine.last_points)
        grads.append([p.grad.clone() for p in net.parameters()])
        engine.detach()
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_paper_recipe_is_plain_dfa_on_a_transformer() -> None:
    torch.manual_seed(0)
    model = _gpt2()
    got = []
    off = {"norm_jacobian": False, "cut_head_input": False, "norm_points": False, "sketch": False}
    off["cut_token_embedding"] = False
    for options in ({"recipe": "paper"}, off):
        engine = FeedbackEngine(seed=1, **options)
        engine.attach(model)
        got.append(_lm_step(model, engine))
        assert not engine.cut_head_input and engine.norm_feedback == "off" and not engine.norm_points
        engine.detach()
    assert got[0].keys() == got[1].keys()
    for name in got[0]:
        assert torch.equal(got[0][name], got[1][name]), name
    auto = FeedbackEngine(seed=1)
    auto.attach(model)
    changed = _lm_step(model, auto)
    auto.detach()
    block = "transformer.h.0.mlp.c_fc.weight"
    assert not torch.allclose(changed[block], got[0][block])  # the recipe changes the blocks' signal


def test_explicit_options_override_the_recipe() -> None:
    torch.manual_seed(0)
    model = _gpt2()
    engine = FeedbackEngine(norm_jacobian=False, cut_head_input=False, norm_points=False)
    engine.attach(model)
    _lm_step(model, engine)
    assert not engine.cut_head_input and engine.norm_feedback == "off"
    assert not any(p.norm for p in engine.last_points)
    assert engine.last_points[-1].key == "transformer.h.1"
    engine.detach()


def test_probe_tells_layernorm_from_rmsnorm_and_ignores_other_modules() -> None:
    x = torch.randn(3, 16)
    assert probe_normalisation(nn.LayerNorm(16, eps=1e-6), x) == NormSpec("layer", 1e-6, 1)
    hf_rms = hf.models.llama.modeling_llama.LlamaRMSNorm(16, eps=1e-5)
    assert probe_normalisation(hf_rms, x) == NormSpec("rms", 1e-5, 1)
    assert probe_normalisation(nn.Linear(16, 16), x) is None
    assert probe_normalisation(nn.Tanh(), x) is None


class _MeanOverChannels(nn.Module):
    """Segment Anything's ``LayerNorm2d``: no ``nn.LayerNorm``, the statistics over dimension 1."""

    def __init__(self) -> None:
        super().__init__()
        self.eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        return (x - u) / ((x - u).pow(2).mean(1, keepdim=True) + self.eps).sqrt()


def test_a_channels_first_norm_is_told_by_its_axis() -> None:
    """ConvNeXt's LayerNorm subclass normalises dimension 1 of ``[batch, channels, height, width]`` in its
    ``channels_first`` form: its Jacobian applies over the channels, not over the width its class would suggest."""
    norm = hf.models.convnext.modeling_convnext.ConvNextLayerNorm
    first, last = norm(6, eps=1e-6, data_format="channels_first"), norm(6, eps=1e-6, data_format="channels_last")
    images = torch.randn(2, 6, 5, 5)
    assert probe_normalisation(first, images) == NormSpec("layer", 1e-6, 1, channels_first=True)
    assert probe_normalisation(last, images.permute(0, 2, 3, 1)) == NormSpec("layer", 1e-6, 1)
    assert probe_normalisation(nn.LayerNorm(6), images) is None  # a plain LayerNorm of other trailing dimensions
    assert probe_normalisation(_MeanOverChannels(), images) == NormSpec("layer", 1e-6, 1, channels_first=True)
    assert probe_normalisation(_MeanOverChannels(), torch.randn(2, 7, 6)).channels_first  # also on sequences
    assert probe_normalisation(nn.BatchNorm2d(6), images) is None
    h, v = torch.randn(2, 6, 5, 5, dtype=torch.double), torch.randn(2, 6, 5, 5, dtype=torch.double)
    x = h.clone().requires_grad_()
    ref = torch.autograd.grad(norm(6, eps=1e-6, data_format="channels_first").double()(x), x, v)[0]
    torch.testing.assert_close(norm_vjp(h, v, NormSpec("layer", 1e-6, 1, channels_first=True)), ref)


def test_feedback_into_a_convnext_stage_passes_the_channel_norm_of_the_next() -> None:
    torch.manual_seed(0)
    config = hf.ConvNextConfig(num_channels=1, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    model = hf.ConvNextForImageClassification(config)
    seen: dict[str, torch.Tensor] = {}
    stage = model.convnext.encoder.stages[0]  # its output is read by the next stage's channels-first LayerNorm

    def watch(module: nn.Module, args: Any, out: torch.Tensor) -> None:
        out.register_hook(lambda g: seen.setdefault("feedback", g))

    stage.register_forward_hook(watch)
    engine = FeedbackEngine()
    engine.attach(model)
    logits = model(pixel_values=torch.randn(4, 1, 32, 32)).logits
    nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).backward()
    engine.end_backward()
    point = next(p for p in engine.last_points if p.key == "convnext.encoder.stages.0")
    assert point.norm == NormSpec("layer", 1e-6, 1, channels_first=True)
    feedback = seen["feedback"]
    assert feedback.shape == (4, 8, 8, 8) and feedback.abs().sum() > 0
    # a LayerNorm's Jacobian removes the mean over the axis it normalises: here the channels, at every position
    torch.testing.assert_close(feedback.sum(1), torch.zeros(4, 8, 8), atol=1e-6, rtol=0)
    assert feedback.sum(-1).abs().max() > 1e-3
    engine.detach()


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_norm_vjp_matches_autograd_in_half_precision(kind: str) -> None:
    h, v = torch.randn(4, 5, 32, dtype=torch.bfloat16), torch.randn(4, 5, 32, dtype=torch.bfloat16)
    x = h.float().requires_grad_()
    fn = nn.functional.layer_norm if kind == "layer" else nn.functional.rms_norm
    ref = torch.autograd.grad(fn(x, (32,), eps=1e-5), x, v.float())[0]
    got = norm_vjp(h, v, NormSpec(kind, 1e-5))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=2e-2)
    # a float32 activation (a residual stream under autocast) with half-precision feedback: the feedback's dtype
    mixed = norm_vjp(h.float(), v, NormSpec(kind, 1e-5))
    assert mixed.dtype == torch.bfloat16
    torch.testing.assert_close(mixed.float(), ref, rtol=2e-2, atol=2e-2)


def test_reattaching_to_the_same_model_keeps_what_the_forwards_found() -> None:
    torch.manual_seed(0)
    model, other = _gpt2(), _llama()
    engine = FeedbackEngine()
    engine.attach(model)
    first = _lm_step(model, engine)
    found = dict(engine._consumers)
    engine.detach()
    engine.attach(model)  # a later fit of the same model: no layout probe, the same norms and points
    assert not engine.layouts.pending and engine._consumers == found
    again = _lm_step(model, engine)
    assert [p.key for p in engine.last_points][-1] == "lm_head:in"
    for name in first:
        torch.testing.assert_close(again[name], first[name])
    engine.detach()
    engine.attach(other)  # another model starts afresh
    assert engine.layouts.pending and not engine._consumers
    _lm_step(other, engine)
    assert {p.norm.kind for p in engine.last_points if p.norm is not None} == {"rms"}
    engine.detach()


def test_the_head_input_is_cut_only_where_norms_alone_lie_before_a_widening_head() -> None:
    cfg = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
           "intermediate_size": 64, "max_position_embeddings": 16}  # fmt: skip
    bert = hf.BertForMaskedLM(hf.BertConfig(**cfg))  # a dense + GELU + LayerNorm transform before the decoder
    for model, cut in ((bert, False), (_gpt2(), True), (_llama(), True)):
        engine = FeedbackEngine()
        engine.attach(model)
        assert engine.cut_head_input is cut, type(model).__name__
        engine.detach()
    engine = FeedbackEngine(cut_head_input=True)  # as set, whatever lies before the head
    engine.attach(bert)
    assert engine.cut_head_input
    engine.detach()


_TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
         "max_position_embeddings": 32}  # fmt: skip
ARCHITECTURES = {  # name -> (build, the norm kind its points feed, or None for a post-LN model)
    "mistral": (
        lambda: hf.MistralForCausalLM(hf.MistralConfig(vocab_size=VOCAB, num_key_value_heads=1, **_TINY)),
        "rms",
    ),
    "qwen2": (lambda: hf.Qwen2ForCausalLM(hf.Qwen2Config(vocab_size=VOCAB, num_key_value_heads=2, **_TINY)), "rms"),
    "gemma": (
        lambda: hf.GemmaForCausalLM(hf.GemmaConfig(vocab_size=VOCAB, num_key_value_heads=1, head_dim=16, **_TINY)),
        "rms",
    ),
    "gpt_neox": (lambda: hf.GPTNeoXForCausalLM(hf.GPTNeoXConfig(vocab_size=VOCAB, **_TINY)), "layer"),
    "phi": (lambda: hf.PhiForCausalLM(hf.PhiConfig(vocab_size=VOCAB, **_TINY)), "layer"),
    "falcon": (
        lambda: hf.FalconForCausalLM(
            hf.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
        ),
        "layer",
    ),
    "t5": (
        lambda: hf.T5ForConditionalGeneration(
            hf.T5Config(
                vocab_size=VOCAB,
                d_model=32,
                d_kv=16,
                d_ff=64,
                num_layers=2,
                num_heads=2,
                decoder_start_token_id=0,
                pad_token_id=0,
            )  # fmt: skip
        ),
        "rms",
    ),
    "roberta": (lambda: hf.RobertaForMaskedLM(hf.RobertaConfig(vocab_size=VOCAB, **_TINY)), None),
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_default_recipe_trains_other_architectures(name: str) -> None:
    build, kind = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = build()
    engine = FeedbackEngine()
    engine.attach(model)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        ids = torch.randint(1, VOCAB, (2, 10), generator=g)
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        engine.end_backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    kinds = {p.norm.kind for p in engine.last_points if p.norm is not None}
    assert kinds == ({kind} if kind else set()), kinds
    engine.detach()


def test_resume_keeps_the_token_embedding_rule_the_checkpoint_was_written_with() -> None:
    torch.manual_seed(0)
    model = _llama()
    table = model.model.embed_tokens.weight
    written = FeedbackEngine(cut_token_embedding=False)
    written.attach(model)
    _lm_step(model, written)
    state = written.state_dict()
    written.detach()
    older = {k: v for k, v in state.items() if k != "cut_token_embedding"}  # written before the option existed
    for saved in (state, older):
        resumed = FeedbackEngine()  # the default would cut the table
        resumed.load_state_dict(saved)
        resumed.attach(model)
        assert resumed.config.cut_token_embedding is False and table.requires_grad
        assert _lm_step(model, resumed)["model.embed_tokens.weight"].abs().sum() > 0
        resumed.detach()


def test_a_checkpoint_read_after_attaching_decides_the_hooks() -> None:
    """The DDP flavours attach before DDP wraps the model, before a resumed checkpoint is read: reading it attaches
    again, so that its options decide which tables are cut."""
    from lightning_dfa.adapters.core import DFAFit

    torch.manual_seed(0)
    model = _llama()
    table = model.model.embed_tokens.weight
    written = FeedbackEngine(cut_token_embedding=False)
    written.attach(model)
    state = written.state_dict()
    written.detach()
    fit = DFAFit(DFAConfig(), verbose=False)
    fit.attach(model)
    assert not table.requires_grad  # the default cut, before the checkpoint is read
    fit.load_checkpoint({"dfa": state})
    assert fit.engine is not None and fit.engine.attached and fit.engine.config.cut_token_embedding is False
    assert table.requires_grad
    fit.detach()


def _marian() -> nn.Module:
    """Marian: fixed sinusoidal positions (RMS about 0.7) beside a tied token table drawn at RMS 0.02."""
    cfg = hf.MarianConfig(vocab_size=VOCAB, decoder_vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1,
                          encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                          max_position_embeddings=32, dropout=0.0, pad_token_id=0,
                          decoder_start_token_id=0)  # fmt: skip
    return hf.MarianMTModel(cfg)


def _token_table_gradient(model: nn.Module, engine: FeedbackEngine) -> torch.Tensor:
    ids = torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    model.zero_grad(set_to_none=True)
    engine.attach(model)
    model(input_ids=ids, labels=ids).loss.backward()
    engine.end_backward()
    grad = model.get_input_embeddings().weight.grad.clone()
    engine.detach()
    return grad


def test_a_faint_token_table_beside_fixed_positions_is_not_cut_and_a_checkpoint_keeps_that() -> None:
    """Cut, a token table at RMS 0.02 beside fixed sinusoids learns from the output only and the blocks cannot tell
    the tokens apart (tiny Marian and Pegasus on reversal: no learning at all, against about a third of backprop's
    gain uncut). The default leaves it uncut and says why; the decision is made once, so a resumed run whose table
    has grown in training keeps it."""
    torch.manual_seed(0)
    model = _marian()
    engine = FeedbackEngine()
    auto = _token_table_gradient(model, engine)
    torch.testing.assert_close(auto, _token_table_gradient(model, FeedbackEngine(cut_token_embedding=False)))
    assert not torch.allclose(auto, _token_table_gradient(model, FeedbackEngine(cut_token_embedding=True)))
    note = next(line for line in engine.recipe_notes() if line.startswith("cut_token_embedding"))
    assert "not applied" in note and "model.encoder.embed_positions" in note and "faint" in note
    state = engine.state_dict()
    assert state["faint_token_tables"] == engine._faint and engine._faint
    with torch.no_grad():  # the table as training could leave it: no longer faint
        model.get_input_embeddings().weight.mul_(100.0)
    again = _token_table_gradient(model, engine)  # the same engine attached again keeps its decision ...
    assert engine._faint == state["faint_token_tables"]
    fresh = FeedbackEngine()
    cut_now = _token_table_gradient(model, fresh)
    assert not fresh._faint  # ... decided afresh, the cut would apply now ...
    resumed = FeedbackEngine()
    resumed.load_state_dict(state)
    kept = _token_table_gradient(model, resumed)  # ... but the run keeps its decision
    assert resumed._faint == state["faint_token_tables"]
    assert not torch.allclose(kept, cut_now)
    torch.testing.assert_close(kept, _token_table_gradient(model, FeedbackEngine(cut_token_embedding=False)))
    torch.testing.assert_close(again, kept)
    with pytest.raises(ValueError, match="faint_token_tables"):
        FeedbackEngine().load_state_dict({**state, "faint_token_tables": "yes"})


def test_scaled_or_learned_token_signals_keep_the_cut() -> None:
    """M2M100 scales its token table by sqrt(d) beside its sinusoids, BART learns its positions: both keep the cut
    (measured equal or better with it)."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                  decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
                  dropout=0.0)  # fmt: skip
    for model in (hf.M2M100ForConditionalGeneration(hf.M2M100Config(**common)),
                  hf.BartForConditionalGeneration(hf.BartConfig(**common))):  # fmt: skip
        engine = FeedbackEngine()
        _token_table_gradient(model, engine)
        assert engine._faint == [] and any("embed_tokens (tied" in line for line in engine.recipe_notes())


class _MeanReadout(nn.Module):
    """A CNN whose head averages the last feature map in its forward: ``fc(x.mean((-2, -1)))``."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.c2(self.c1(x)).mean((-2, -1)))


class _AvgPoolReadout(_MeanReadout):
    """As a CIFAR ResNet written by hand: ``F.avg_pool2d`` over the whole last map, ``view``, ``linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.avg_pool2d(self.c2(self.c1(x)), x.shape[-1])
        return self.fc(out.view(out.size(0), -1))


class _SumReadout(_MeanReadout):
    """The average written as a sum over the positions divided by their number."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c2(self.c1(x))
        return self.fc(h.sum((2, 3)) / (h.shape[2] * h.shape[3]))


def _conv_stack(*head: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), *head)


_POOLED_CNNS = {
    "adaptive_avg_pool": lambda: _conv_stack(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)),
    "mean_in_forward": _MeanReadout,
    "avg_pool_over_the_map": _AvgPoolReadout,
    "sum_over_the_positions": _SumReadout,
    # the output a 1x1 convolution of the pooled map: a [batch, classes, 1, 1] error
    "conv_classifier": lambda: _conv_stack(nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 3, 1), nn.Flatten()),
    "hf_resnet": lambda: hf.ResNetForImageClassification(hf.ResNetConfig(
        num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)),
}  # fmt: skip


def _map_feedback(
    net: nn.Module, state: dict[str, Any] | None = None, **options: Any
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The feedback each 4-D point receives in one step (resumed from ``state``, if given), and the recipe notes."""
    engine = FeedbackEngine(seed=0, **options)
    if state is not None:
        engine.load_state_dict(state)
    engine.attach(net)
    seen: dict[str, torch.Tensor] = {}

    def watch(key: str, tensor: torch.Tensor) -> None:
        if tensor.requires_grad and tensor.dim() == 4 and tensor.shape[-1] > 1:
            tensor.register_hook(lambda grad, key=key: seen.update({key: grad}))

    engine.point_observers.append(watch)
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    out = net(x)
    out = getattr(out, "logits", out)
    nn.functional.cross_entropy(out, torch.tensor([0, 1, 2, 0])).backward()
    engine.end_backward()
    notes = engine.recipe_notes()
    engine.detach()
    assert seen, "no convolutional point was fed"
    return seen, notes


def _spread(feedback: torch.Tensor) -> float:
    """How much the feedback varies over the positions of each item and channel."""
    return float((feedback - feedback.mean((-2, -1), keepdim=True)).abs().max())


@pytest.mark.parametrize("name", list(_POOLED_CNNS))
def test_maps_read_through_a_global_average_get_one_feedback_per_channel(name: str) -> None:
    torch.manual_seed(0)
    net = _POOLED_CNNS[name]()
    seen, notes = _map_feedback(net)
    for key, feedback in seen.items():
        assert _spread(feedback) < 1e-6 * float(feedback.abs().max()), key  # the same at every position
        assert feedback.abs().amax((-2, -1)).min() > 0, key  # every item and channel is fed
        assert not torch.allclose(feedback[:, 0], feedback[:, 1]), key  # a vector over the channels
    said = [n for n in notes if n.startswith("pooled_channels: on:")]
    assert said and "reads the last feature map through a global average" in said[0]
    for options in ({"pooled_channels": False}, {"recipe": "paper"}):  # the paper's rule: a vector per position
        seen, notes = _map_feedback(net, **options)
        assert all(_spread(f) > 1e-3 * float(f.abs().max()) for f in seen.values()), options
        assert not any(n.startswith("pooled_channels") for n in notes)


def test_a_pooled_maps_channel_feedback_is_what_the_pooled_vector_gets() -> None:
    """The feedback of a channel of the map is the projection a point as wide as the channels receives (here, the
    head's input after the pooling): ``B e`` per channel, broadcast over the positions."""
    torch.manual_seed(0)
    net = _MeanReadout()
    engine = FeedbackEngine(seed=0)
    engine.attach(net)
    seen: dict[str, torch.Tensor] = {}
    engine.point_observers.append(lambda key, t: t.register_hook(lambda g, key=key: seen.update({key: g})))
    x = torch.randn(4, 1, 6, 6)
    nn.functional.cross_entropy(net(x), torch.tensor([0, 1, 2, 0])).backward()
    engine.end_backward()
    engine.detach()
    assert sorted(seen) == ["c2.0:in", "fc:in"]
    torch.testing.assert_close(seen["c2.0:in"], seen["fc:in"][:, :, None, None].expand(4, 8, 6, 6))


def test_maps_read_through_flatten_keep_a_vector_per_position() -> None:
    torch.manual_seed(0)
    seen, notes = _map_feedback(_conv_stack(nn.Flatten(), nn.Linear(8 * 256, 3)))
    assert all(_spread(f) > 1e-3 * float(f.abs().max()) for f in seen.values())
    said = [n for n in notes if n.startswith("pooled_channels: on:")]
    assert said and "no output reads a feature map through a global average" in said[0]
    assert any(n.startswith("positionwise_maps: on: no output's error is a map") for n in notes)


def test_a_checkpoint_written_before_feedback_per_channel_keeps_a_vector_per_position() -> None:
    torch.manual_seed(0)
    net = _POOLED_CNNS["adaptive_avg_pool"]()
    states = []
    for pooled in (None, False):
        written = FeedbackEngine(seed=0, pooled_channels=pooled)
        written.attach(net)
        nn.functional.cross_entropy(net(torch.randn(4, 1, 16, 16)), torch.tensor([0, 1, 2, 0])).backward()
        written.end_backward()
        states.append(written.state_dict())
        written.detach()
    seen, _ = _map_feedback(net, states[0])  # the default's choice continues
    assert all(_spread(f) < 1e-6 * float(f.abs().max()) for f in seen.values())
    older = {k: v for k, v in states[1].items() if k != "pooled_channels"}  # written before the option existed
    seen, notes = _map_feedback(net, older)
    assert all(_spread(f) > 1e-3 * float(f.abs().max()) for f in seen.values())
    assert not any(n.startswith("pooled_channels") for n in notes)


class _CheckpointedReadout(_MeanReadout):
    """The convolutions and the whole-map average pooling under activation checkpointing, counting their forwards."""

    calls = 0

    def features(self, x: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        return nn.functional.avg_pool2d(self.c2(self.c1(x)), x.shape[-1]).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.utils.checkpoint.checkpoint(self.features, x, use_reentrant=False))


def test_finding_the_pooled_readout_recomputes_nothing_under_activation_checkpointing() -> None:
    torch.manual_seed(0)
    _CheckpointedReadout.calls = 0
    net = _CheckpointedReadout()
    seen, _ = _map_feedback(net)
    assert all(_spread(f) < 1e-6 * float(f.abs().max()) for f in seen.values())
    assert _CheckpointedReadout.calls == 2  # the forward and the backward's recomputation, no more


class TiedGPT(nn.Module):
    """A GPT written by hand: token and position tables, the head tied to the token table, blocks whose residual
    adds lie in the parent's loop (``x = x + block(x)``), and optionally a norm over the embeddings' sum."""

    def __init__(self, vocab: int = 16, d: int = 16, positions: int = 8, embedding_norm: bool = False) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(positions, d)
        self.embed_norm = nn.LayerNorm(d) if embedding_norm else nn.Identity()
        self.blocks = nn.ModuleList(_MlpBlock(d) for _ in range(2))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_norm(self.tok(ids) + self.pos(torch.arange(ids.shape[1])))
        for block in self.blocks:
            x = x + block(x)
        return self.head(self.norm(x))


class _MlpBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(self.norm(x))))


def _tied_step(model: nn.Module, **options: Any) -> tuple[FeedbackEngine, dict[str, torch.Tensor], torch.Tensor]:
    """One DFA step of ``model`` (a :class:`TiedGPT`): the engine (detached), the feedback at the first block's
    output, and the first block's input."""
    engine = FeedbackEngine(seed=0, **options)
    engine.attach(model)
    seen: dict[str, torch.Tensor] = {}
    engine.point_observers.append(
        lambda key, t: t.register_hook(lambda g, key=key: seen.update({key: g})) if t.requires_grad else None
    )
    inputs: list[torch.Tensor] = []
    handle = model.blocks[0].register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()))
    ids = torch.randint(0, 16, (4, 8), generator=torch.Generator().manual_seed(0))
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    engine.end_backward()
    handle.remove()
    engine.detach()
    return engine, seen, inputs[0]


def test_the_tables_beside_a_tied_token_table_learn_from_the_first_blocks_backward() -> None:
    """Beside a token table tied to the head (which grows as the head learns), the position table learns from what
    the first block's backward sends to its input from the block's own feedback: that input is not cut, and the
    skip path around the block is, so no later block and no true gradient reach the table."""
    torch.manual_seed(0)
    model = TiedGPT()
    engine, seen, x = _tied_step(model)
    assert engine._first_block_tables == ["pos"] and [n for n, _, _ in engine._token_embeddings] == ["tok"]
    assert "tables_from_first_block: on: pos" in "\n".join(engine.recipe_notes())
    assert engine.role_of(model.pos.weight) == "feedback"
    leaf = x.clone().requires_grad_()
    (expected,) = torch.autograd.grad(model.blocks[0](leaf), leaf, seen["blocks.0"])
    torch.testing.assert_close(model.pos.weight.grad, expected.sum(0))
    for options in ({"tables_from_first_block": False}, {"recipe": "paper", "cut_token_embedding": True}):
        engine, _, _ = _tied_step(model, **options)
        assert model.pos.weight.grad is None and engine._first_block_tables == [], options  # kept at its values
        assert "tables_from_first_block: on" not in "\n".join(engine.recipe_notes())


def test_the_tables_learn_through_a_norm_over_the_embeddings_and_stay_fixed_beside_an_untied_table() -> None:
    """A norm over the embeddings' sum learns with the tables from the first block's backward. Untied from the head,
    the token table keeps its initial scale, and the tables beside it keep theirs (fixed, as the token table)."""
    torch.manual_seed(0)
    model = TiedGPT(embedding_norm=True)
    _, seen, x = _tied_step(model)
    leaf = x.clone().requires_grad_()
    (expected,) = torch.autograd.grad(model.blocks[0](leaf), leaf, seen["blocks.0"])
    assert "blocks.0:in" not in seen  # no point at the first block's input: its backward reaches the norm
    ids = torch.randint(0, 16, (4, 8), generator=torch.Generator().manual_seed(0))
    summed = (model.tok(ids) + model.pos(torch.arange(8))).detach()
    (norm_grad,) = torch.autograd.grad(model.embed_norm(summed), model.embed_norm.weight, expected)
    torch.testing.assert_close(model.embed_norm.weight.grad, norm_grad)
    assert model.pos.weight.grad.abs().sum() > 0 and model.tok.weight.grad is not None  # (the head's gradient)
    model = TiedGPT()
    model.head.weight = nn.Parameter(model.tok.weight.detach().clone())  # untied
    engine, _, _ = _tied_step(model)
    assert engine._first_block_tables == [] and model.pos.weight.grad is None
    assert {n for n, _, _ in engine._token_embeddings} == {"tok", "pos"}


def test_a_checkpoint_written_before_the_tables_learned_keeps_them_fixed() -> None:
    torch.manual_seed(0)
    model = TiedGPT()
    written = FeedbackEngine(seed=0, tables_from_first_block=False)
    written.attach(model)
    state = {k: v for k, v in written.state_dict().items() if k != "tables_from_first_block"}
    written.detach()
    engine = FeedbackEngine(seed=0)
    engine.load_state_dict(state)
    engine.attach(model)
    ids = torch.randint(0, 16, (4, 8), generator=torch.Generator().manual_seed(0))
    nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    engine.end_backward()
    engine.detach()
    assert engine.config.tables_from_first_block is False and model.pos.weight.grad is None


def test_a_tied_gpt2_learns_with_its_position_table_trained_by_the_first_block() -> None:
    """On the causal-LM task of ``benchmarks/tiny_transformers.py``, GPT-2 with Hugging Face's default tied head
    closes 92 % / 92 % of the shallow -> backprop gap (seeds 0 / 1); with its position table kept at its initial
    values (``tables_from_first_block=False``) 75 % / 75 %, outgrown by the token table that the head's gradient
    grows (row norms after 400 steps: 1.05 against the positions' 0.16)."""
    from benchmarks.tiny_transformers import arms, closed_share, train

    loss = arms("gpt2_tied")
    assert closed_share(loss["bp"], loss["dfa"], loss["shallow"]) > 0.85, loss
    kept = train("gpt2_tied", "dfa", {"tables_from_first_block": False})
    assert closed_share(loss["bp"], kept, loss["shallow"]) < 0.8, kept


def _llama_head_feedback(
    cls: type, labels: torch.Tensor, state: dict[str, Any] | None = None, steps: int = 2, **options: Any
) -> tuple[dict[str, torch.Tensor], Any]:
    """The feedback each point of a tiny Llama with head ``cls`` gets in the last of ``steps`` steps, each closed by
    ``end_backward(loss)`` (norm Jacobians off, so that a spread feedback is the same at every position), and the
    engine (started from ``state`` if given). Item 2 is padded after its fourth token."""
    torch.manual_seed(0)
    cfg = hf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16, pad_token_id=0,
                         num_labels=3)  # fmt: skip
    model = cls(cfg)
    engine = FeedbackEngine(**{"norm_jacobian": False, **options})
    if state is not None:
        engine.load_state_dict(state)
    engine.attach(model)
    seen: dict[str, torch.Tensor] = {}
    engine.feedback_observers.append(lambda e, points, fbs: seen.update({p.key: f for p, f in zip(points, fbs)}))
    ids = torch.randint(1, VOCAB, (3, 6), generator=torch.Generator().manual_seed(1))
    ids[2, 4:] = 0
    for _ in range(steps):
        model.zero_grad()
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        engine.end_backward(out.loss)
    return seen, engine


def test_a_classifier_reading_one_token_spreads_its_feedback_over_the_earlier_points_positions() -> None:
    """A decoder's sequence classifier scores every position and reads one (the last that is not padding): the
    first loss shows the read (an index of one position per item), and from then on each item's error feeds every
    point but the last at all positions. The last block keeps it at the read position (its true gradient lies there
    too). A checkpoint keeps what was found, so a resumed fit spreads from its first step."""
    labels = torch.tensor([0, 2, 1])
    spread, engine = _llama_head_feedback(hf.LlamaForSequenceClassification, labels)
    plain, _ = _llama_head_feedback(hf.LlamaForSequenceClassification, labels, spread_read_token=False)
    read = torch.tensor([5, 5, 3])
    items = torch.arange(3)
    assert list(spread) == list(plain) and "model.layers.1" == list(spread)[-1], list(spread)
    for key in spread:
        at_read = plain[key][items, read]
        assert at_read.abs().amax(-1).min() > 0, key
        others = plain[key].clone()
        others[items, read] = 0
        assert torch.equal(others, torch.zeros_like(others)), key  # the paper's rule: the read position alone
        if key == "model.layers.1":
            assert torch.equal(spread[key], plain[key])
        else:
            torch.testing.assert_close(spread[key], at_read.unsqueeze(1).expand_as(spread[key]))
    notes = " ".join(engine.recipe_notes())
    assert "spread_read_token: on: the loss reads score at one position per item" in notes, notes
    state = engine.state_dict()
    assert state["read_outputs"] == ["score"]
    first, _ = _llama_head_feedback(hf.LlamaForSequenceClassification, labels, steps=1)
    resumed, _ = _llama_head_feedback(hf.LlamaForSequenceClassification, labels, state=state, steps=1)
    assert torch.equal(first["model.layers.0"], plain["model.layers.0"])  # found at the first loss: spread after it
    assert torch.equal(resumed["model.layers.0"], spread["model.layers.0"])
    paper, _ = _llama_head_feedback(hf.LlamaForSequenceClassification, labels, recipe="paper")
    assert "model.layers.0:in" in paper and "model.layers.0:in" not in plain  # (the token table: trained, or cut)
    assert all(torch.equal(paper[k].ne(0), plain[k].ne(0)) for k in paper.keys() & plain.keys())


def test_an_error_at_chosen_positions_of_each_item_is_not_spread() -> None:
    """A token classifier's error (or a masked LM's) sits at the labelled positions, through the loss's ignored
    labels rather than a pick of one position: it stays position by position, even where an item has one label."""
    labels = torch.randint(0, 3, (3, 6), generator=torch.Generator().manual_seed(2))
    labels[0, :5] = -100  # item 0: one labelled position
    spread, engine = _llama_head_feedback(hf.LlamaForTokenClassification, labels)
    plain, _ = _llama_head_feedback(hf.LlamaForTokenClassification, labels, spread_read_token=False)
    assert all(torch.equal(spread[key], plain[key]) for key in spread)
    assert not any("spread_read_token" in line for line in engine.recipe_notes())
    assert "read_outputs" not in engine.state_dict()


@pytest.mark.parametrize(
    ("read", "found"),
    [
        (lambda logits, last: logits[:, -1], True),
        (lambda logits, last: logits[torch.arange(len(last)), last], True),
        (lambda logits, last: logits.gather(1, last.view(-1, 1, 1).expand(-1, 1, logits.shape[-1])).squeeze(1), True),
        (lambda logits, last: logits.float()[:, -1], True),
        (lambda logits, last: logits[:, -2:].mean(1), False),
        (lambda logits, last: logits.mean(1), False),
        (lambda logits, last: logits[:, -1] + logits[:, 0], False),
    ],
    ids=["select", "index", "gather", "cast_then_select", "slice", "mean", "two_positions"],
)
def test_the_pick_of_one_position_is_read_from_the_loss(read: Any, found: bool) -> None:
    """A LightningModule's own loss on one position of a GPT-2's logits (a select, an index, a gather, after a
    cast) makes the head an output read at one position; a slice, a mean or a sum of two positions does not."""
    torch.manual_seed(0)
    model = _gpt2()
    engine = FeedbackEngine()
    engine.attach(model)
    ids = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(0))
    loss = nn.functional.cross_entropy(read(model(input_ids=ids).logits, torch.tensor([6, 4, 5])), ids[:, 0])
    loss.backward()
    engine.end_backward(loss)
    assert engine._read_outputs == ({"lm_head"} if found else set())


def test_the_trainer_finds_a_classifiers_pick_and_spreads_its_feedback() -> None:
    """Through ``Trainer(strategy="dfa")``: the strategy passes the loss, the engine finds the pick at the first
    step, and the fit-start summary says so."""

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
            cfg = hf.LlamaConfig(vocab_size=VOCAB, **sizes, num_key_value_heads=2, pad_token_id=0, num_labels=2)
            self.model = hf.LlamaForSequenceClassification(cfg)

        def training_step(self, batch: Any, _: int) -> torch.Tensor:
            return self.model(input_ids=batch[0], labels=batch[1]).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randint(1, VOCAB, (8, 6), generator=g), torch.randint(0, 2, (8,), generator=g)
    )
    torch.manual_seed(0)
    module = Classifier()
    fit = trainer(strategy="dfa", max_steps=2)
    fit.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    engine = fit.strategy.dfa_engine
    assert engine._read_outputs == {"model.score"}
    assert any(line.startswith("spread_read_token: on: the loss reads model.score") for line in engine.recipe_notes())
