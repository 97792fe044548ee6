"""Tiny Hugging Face models built from configs (no downloads) train with ``strategy="dfa"``."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import transformers as hf
from conftest import GradRecorder, hooks_of, trainer
from torch.utils.data import DataLoader, Dataset

from lightning_dfa import DFAStrategy, FeedbackEngine
from lightning_dfa.discovery import infer_micro_points
from lightning_dfa.registry import MICRO_POINTS, register_micro_points

warnings.filterwarnings("ignore", module="transformers")
VOCAB = 48
TINY = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2, vocab_size=VOCAB)
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def gpt2() -> hf.PreTrainedModel:
    cfg = hf.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        n_positions=32,
        vocab_size=VOCAB,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=False,
    )
    return hf.GPT2LMHeadModel(cfg)


def llama() -> hf.PreTrainedModel:
    return hf.LlamaForCausalLM(hf.LlamaConfig(num_key_value_heads=1, tie_word_embeddings=False, **TINY))


def bert_mlm() -> hf.PreTrainedModel:
    return hf.BertForMaskedLM(hf.BertConfig(tie_word_embeddings=False, **TINY, **NO_DROPOUT))


def bert_cls() -> hf.PreTrainedModel:
    return hf.BertForSequenceClassification(hf.BertConfig(num_labels=3, **TINY, **NO_DROPOUT))


# (builder, labels kind, output module, modules after the last block: true gradient)
MODELS: dict[str, tuple[Callable[[], hf.PreTrainedModel], str, str, list[str]]] = {
    "gpt2": (gpt2, "lm", "model.lm_head", ["model.transformer.ln_f"]),
    "llama": (llama, "lm", "model.lm_head", ["model.model.norm"]),
    "bert-mlm": (bert_mlm, "lm", "model.cls.predictions.decoder", ["model.cls.predictions.transform"]),
    "bert-cls": (bert_cls, "cls", "model.classifier", ["model.bert.pooler"]),
}


class Tokens(Dataset):
    def __init__(self, kind: str, n: int = 16, length: int = 12) -> None:
        g = torch.Generator().manual_seed(0)
        start = torch.randint(1, VOCAB, (n, 1), generator=g)
        self.ids = (start + torch.arange(length)) % VOCAB  # learnable: each token follows from the previous
        self.labels = self.ids if kind == "lm" else self.ids[:, 0] % 3

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class HFModule(pl.LightningModule):
    """A LightningModule around a Hugging Face model, as users write them (no DFA code)."""

    def __init__(self, model: hf.PreTrainedModel, lr: float = 1e-2) -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self.losses: list[float] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def _first_grads(name: str, strategy: Any) -> dict[str, torch.Tensor | None]:
    build, kind, _, _ = MODELS[name]
    torch.manual_seed(0)
    rec = GradRecorder()
    trainer(strategy=strategy, callbacks=[rec], max_steps=1).fit(HFModule(build()), DataLoader(Tokens(kind), 8))
    return rec.grads[0]


@pytest.mark.parametrize("name", list(MODELS))
def test_hf_model_trains_with_dfa(name: str) -> None:
    build, kind, output, after = MODELS[name]
    torch.manual_seed(0)
    module = HFModule(build())
    strategy = DFAStrategy()
    trainer(strategy=strategy, max_epochs=8).fit(module, DataLoader(Tokens(kind), 8))
    assert strategy.dfa_engine.target.output_name == output
    first, last = sum(module.losses[:2]) / 2, sum(module.losses[-2:]) / 2
    assert last < 0.85 * first, module.losses
    assert hooks_of(module) == 0

    dfa, bp = _first_grads(name, "dfa"), _first_grads(name, "auto")
    frozen = {n for n, _, tied in strategy.dfa_engine._token_embeddings if not tied}
    for pname, grad in dfa.items():  # every parameter that backprop trains gets a non-zero gradient, but the
        # untied embeddings, which the default leaves at their initial values (cut_token_embedding)
        if bp[pname] is not None and not (grad is None and pname.rsplit(".", 1)[0] in frozen):
            assert grad is not None and bool(torch.any(grad != 0)), pname
    # the default recipe cuts a widening head's input: what lies between the last block and the head (the final
    # norm) then joins the last block's feedback region
    assert strategy.dfa_engine.cut_head_input == (name in ("gpt2", "llama"))  # not after BERT's head transform
    if strategy.dfa_engine.cut_head_input:
        after = []
    true_grad = [p for p in dfa if any(p.startswith(m + ".") for m in [output, *after])]
    assert true_grad
    for pname in true_grad:  # the output head and what lies after the last block: backprop's gradient
        torch.testing.assert_close(dfa[pname], bp[pname], rtol=1e-4, atol=1e-6)
    blocks = [p for p in dfa if ".layer." in p or ".layers." in p or ".h." in p]
    differ = [p for p in blocks if not torch.allclose(dfa[p], bp[p], rtol=1e-3, atol=1e-6)]
    # every block parameter differs from backprop, except those whose true gradient is zero (attention key bias)
    assert set(blocks) - set(differ) <= {p for p in blocks if p.endswith("key.bias")}, set(blocks) - set(differ)


@pytest.mark.parametrize(
    ("build", "kwargs"),
    [
        (
            lambda: hf.GPT2ForSequenceClassification(
                hf.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, num_labels=3, pad_token_id=0)
            ),
            {},
        ),
        (lambda: hf.MistralForCausalLM(hf.MistralConfig(num_key_value_heads=1, **TINY)), {}),
        (
            lambda: hf.OPTForCausalLM(
                hf.OPTConfig(
                    num_hidden_layers=2,
                    hidden_size=32,
                    ffn_dim=64,
                    num_attention_heads=2,
                    word_embed_proj_dim=32,
                    vocab_size=VOCAB,
                )
            ),
            {},
        ),
        (
            lambda: hf.T5ForConditionalGeneration(
                hf.T5Config(
                    num_layers=2, d_model=32, d_ff=64, num_heads=2, d_kv=16, vocab_size=VOCAB, decoder_start_token_id=0
                )
            ),
            {"labels": torch.randint(1, VOCAB, (2, 5))},
        ),
        (lambda: hf.AlbertForMaskedLM(hf.AlbertConfig(embedding_size=16, **TINY)), {}),  # one layer, shared
    ],
    ids=["gpt2-cls", "mistral", "opt", "t5", "albert"],
)
def test_other_architectures_get_feedback_everywhere(build: Callable[[], Any], kwargs: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = build()
    engine = FeedbackEngine()
    engine.attach(model)
    ids = torch.randint(1, VOCAB, (2, 9))
    labels = kwargs.get("labels", ids if not isinstance(model, hf.GPT2ForSequenceClassification) else ids[:, 0] % 3)
    model(input_ids=ids, labels=labels).loss.backward()
    report = engine.end_backward()
    assert report.deliveries == 1 and report.points_recorded >= 2
    # every parameter learns, but the token embeddings that the default leaves at their initial values
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_micro_placement_adds_points_inside_blocks() -> None:
    torch.manual_seed(0)
    engine = FeedbackEngine(placement="micro")
    target = engine.attach(gpt2())
    names = [b.name for b in target.blocks]
    assert names[:3] == ["transformer.h.0", "transformer.h.0.attn", "transformer.h.0.mlp.act"]
    assert [b.top_level for b in target.blocks[:3]] == [True, False, False]
    # a registered architecture whose blocks lack the registered points: a clear error, not a silent macro run
    saved = MICRO_POINTS["gpt2"]
    try:
        register_micro_points("gpt2", ("no_such_module",))
        with pytest.raises(ValueError, match="no block has the points"):
            FeedbackEngine(placement="micro").attach(gpt2())
    finally:
        register_micro_points("gpt2", saved)


def test_inferred_micro_points_equal_the_registered_ones() -> None:
    for build, model_type, block in ((gpt2, "gpt2", "transformer.h.0"), (llama, "llama", "model.layers.0")):
        model = build()
        assert infer_micro_points(model.get_submodule(block)) == MICRO_POINTS[model_type]
    assert infer_micro_points(torch.nn.Sequential(torch.nn.Linear(2, 2))) == ()


def _opt() -> hf.PreTrainedModel:  # its MLP runs on [batch * positions, d]: the activation point is 2-D
    cfg = hf.OPTConfig(num_hidden_layers=2, hidden_size=32, ffn_dim=64, num_attention_heads=2, word_embed_proj_dim=32,
                       vocab_size=VOCAB, dropout=0.0)  # fmt: skip
    return hf.OPTForCausalLM(cfg)


def _t5() -> hf.PreTrainedModel:  # decoder blocks hold a cross-attention layer before the MLP
    cfg = hf.T5Config(num_layers=2, d_model=32, d_ff=64, num_heads=2, d_kv=16, vocab_size=VOCAB,
                      decoder_start_token_id=0, dropout_rate=0.0)  # fmt: skip
    return hf.T5ForConditionalGeneration(cfg)


def _distilbert() -> hf.PreTrainedModel:
    cfg = hf.DistilBertConfig(n_layers=2, dim=32, hidden_dim=64, n_heads=2, vocab_size=VOCAB, dropout=0.0)
    return hf.DistilBertForMaskedLM(cfg)


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (_opt, ["model.decoder.layers.0.self_attn", "model.decoder.layers.0.activation_fn"]),
        (
            _t5,
            [
                "encoder.block.0.layer.0.SelfAttention",
                "encoder.block.0.layer.1.DenseReluDense.act",
                "decoder.block.1.layer.0.SelfAttention",
                "decoder.block.1.layer.2.DenseReluDense.act",
            ],
        ),
        (_distilbert, ["distilbert.transformer.layer.1.attention", "distilbert.transformer.layer.1.ffn.activation"]),
    ],
    ids=["opt", "t5", "distilbert"],
)
def test_micro_points_are_inferred_for_unregistered_architectures(
    build: Callable[[], Any], expected: list[str]
) -> None:
    torch.manual_seed(0)
    model = build()
    assert model.config.model_type not in MICRO_POINTS
    engine = FeedbackEngine(placement="micro")
    names = [b.name for b in engine.attach(model).blocks]
    assert set(expected) <= set(names)
    ids = torch.randint(1, VOCAB, (2, 7))
    delivered: dict[str, torch.Tensor] = {}
    engine.feedback_observers.append(
        lambda error, points, fbs: delivered.update({p.key: fb for p, fb in zip(points, fbs)})
    )
    model(input_ids=ids, labels=ids).loss.backward()
    engine.end_backward()
    assert set(expected) <= set(delivered)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)  # (not the token embeddings)
    for name in expected:  # each inner point got feedback of its own output's shape, and not zero
        assert delivered[name].abs().sum() > 0


def test_flattened_positions_line_up_with_the_error_rows() -> None:
    """A point computed on ``[batch * positions, d]`` gets the feedback of ``[batch, positions, d]``, reshaped."""
    from lightning_dfa.engine import PointMeta

    engine = FeedbackEngine(seed=3)
    error = torch.randn(2, 5, 11)
    as_tokens = PointMeta("p", torch.Size([2, 5, 4]), torch.float32, False)
    as_rows = PointMeta("p", torch.Size([10, 4]), torch.float32, False)
    (tokens,) = engine.feedback_for(error, [as_tokens])
    (rows,) = engine.feedback_for(error, [as_rows])
    assert rows.shape == (10, 4)
    torch.testing.assert_close(rows, tokens.reshape(10, 4))
    # and an error read from a head applied to flattened rows, with points of [batch, positions, d]
    (back,) = engine.feedback_for(error.reshape(10, 11), [as_tokens])
    torch.testing.assert_close(back, tokens)
    # the other layout ([positions, batch, d]) is not silently taken for the same tokens
    with pytest.raises(RuntimeError, match="cannot line up"):
        engine.feedback_for(error, [PointMeta("q", torch.Size([5, 2, 4]), torch.float32, False)])
