"""The default flag on many Hugging Face architectures, each built from a tiny config with its library defaults (tied
heads, learned or sinusoidal positions, pre- or post-norm blocks, mixtures of experts, encoder-decoders, vision).

For each: the engine finds blocks and an output, one backward delivers feedback, every trainable parameter gets a
finite gradient, most parameters inside the blocks get a gradient other than backprop's (no silent backprop), and
the token-embedding rule is what the summary says. What they learn is measured by
:mod:`benchmarks.tiny_transformers` (``docs/architectures.md``)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import transformers as hf
from torch import nn

from lightning_dfa import FeedbackEngine

warnings.filterwarnings("ignore", module="transformers")
V = 97
L = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
         max_position_embeddings=64)  # fmt: skip


def c(config: type, **kw: Any) -> Any:
    return config(**{**L, **kw})


MODELS: dict[str, Callable[[], nn.Module]] = {
    "qwen3": lambda: hf.Qwen3ForCausalLM(c(hf.Qwen3Config, num_key_value_heads=1, head_dim=16)),
    "gemma2": lambda: hf.Gemma2ForCausalLM(c(hf.Gemma2Config, num_key_value_heads=1, head_dim=16)),
    "gemma3": lambda: hf.Gemma3ForCausalLM(c(hf.Gemma3TextConfig, num_key_value_heads=1, head_dim=16)),
    "mixtral": lambda: hf.MixtralForCausalLM(
        c(hf.MixtralConfig, num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1)
    ),
    "phi3": lambda: hf.Phi3ForCausalLM(c(hf.Phi3Config, num_key_value_heads=1, pad_token_id=0)),
    "stablelm": lambda: hf.StableLmForCausalLM(c(hf.StableLmConfig, num_key_value_heads=1)),
    "olmo2": lambda: hf.Olmo2ForCausalLM(c(hf.Olmo2Config, num_key_value_heads=1, pad_token_id=0)),
    "cohere": lambda: hf.CohereForCausalLM(c(hf.CohereConfig, num_key_value_heads=1, pad_token_id=0)),
    "gpt_neox": lambda: hf.GPTNeoXForCausalLM(c(hf.GPTNeoXConfig)),
    "gptj": lambda: hf.GPTJForCausalLM(hf.GPTJConfig(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                                     rotary_dim=8)),
    "gpt_neo": lambda: hf.GPTNeoForCausalLM(hf.GPTNeoConfig(vocab_size=V, hidden_size=32, num_layers=2, num_heads=2,
                                                            attention_types=[[["global", "local"], 1]],
                                                            max_position_embeddings=64)),
    "gpt_bigcode": lambda: hf.GPTBigCodeForCausalLM(hf.GPTBigCodeConfig(vocab_size=V, n_embd=32, n_layer=2, n_head=2,
                                                                        n_positions=64)),
    "bloom": lambda: hf.BloomForCausalLM(hf.BloomConfig(vocab_size=V, hidden_size=32, n_layer=2, n_head=2)),
    "falcon": lambda: hf.FalconForCausalLM(hf.FalconConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                           num_attention_heads=2)),
    "mpt": lambda: hf.MptForCausalLM(hf.MptConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, max_seq_len=64)),
    "biogpt": lambda: hf.BioGptForCausalLM(c(hf.BioGptConfig)),
    "roberta": lambda: hf.RobertaForMaskedLM(c(hf.RobertaConfig, pad_token_id=1)),
    "electra": lambda: hf.ElectraForMaskedLM(c(hf.ElectraConfig, embedding_size=16)),
    "deberta_v2": lambda: hf.DebertaV2ForMaskedLM(c(hf.DebertaV2Config)),
    "modernbert": lambda: hf.ModernBertForMaskedLM(hf.ModernBertConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)),
    "llama_cls": lambda: hf.LlamaForSequenceClassification(
        c(hf.LlamaConfig, num_key_value_heads=1, num_labels=3, pad_token_id=0)
    ),
    "mpnet": lambda: hf.MPNetForMaskedLM(c(hf.MPNetConfig)),
    # the sequence pooled to half its length between its two blocks
    "funnel": lambda: hf.FunnelForMaskedLM(hf.FunnelConfig(vocab_size=V, d_model=32, n_head=2, d_head=16, d_inner=64,
                                                           block_sizes=[1, 1])),
    "mistral": lambda: hf.MistralForCausalLM(c(hf.MistralConfig, num_key_value_heads=1)),
    "bart": lambda: hf.BartForConditionalGeneration(hf.BartConfig(
        vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)),
    "pegasus": lambda: hf.PegasusForConditionalGeneration(hf.PegasusConfig(
        vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)),
    "whisper": lambda: hf.WhisperForConditionalGeneration(hf.WhisperConfig(
        vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16,
        max_target_positions=32, decoder_start_token_id=1, pad_token_id=0)),
    "swin": lambda: hf.SwinForImageClassification(hf.SwinConfig(
        image_size=16, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=2, num_labels=3)),
    "convnext": lambda: hf.ConvNextForImageClassification(hf.ConvNextConfig(
        image_size=16, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3, layer_scale_init_value=1.0)),
    # state-space and recurrent language models, no attention (Mamba, RWKV) or some (Jamba, RecurrentGemma)
    "mamba": lambda: hf.MambaForCausalLM(hf.MambaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                        state_size=8)),
    "rwkv": lambda: hf.RwkvForCausalLM(hf.RwkvConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                     attention_hidden_size=32, intermediate_size=64,
                                                     context_length=64)),
    "jamba": lambda: hf.JambaForCausalLM(c(hf.JambaConfig, num_key_value_heads=1, num_experts=2, num_experts_per_tok=1,
                                           attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                                           expert_layer_offset=1, mamba_d_state=8)),
    "recurrent_gemma": lambda: hf.RecurrentGemmaForCausalLM(hf.RecurrentGemmaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, lru_width=32, attention_window_size=8, head_dim=16,
        block_types=["recurrent", "attention"])),
    "ctrl": lambda: hf.CTRLLMHeadModel(hf.CTRLConfig(vocab_size=V, n_embd=32, n_layer=2, n_head=2, dff=64,
                                                     n_positions=64)),
    "granite": lambda: hf.GraniteForCausalLM(c(hf.GraniteConfig, num_key_value_heads=1)),
    "qwen2_moe": lambda: hf.Qwen2MoeForCausalLM(c(hf.Qwen2MoeConfig, num_key_value_heads=1, num_experts=2,
                                                  num_experts_per_tok=1, moe_intermediate_size=32,
                                                  shared_expert_intermediate_size=32)),
    "mt5": lambda: hf.MT5ForConditionalGeneration(hf.MT5Config(vocab_size=V, d_model=32, d_ff=64, num_layers=2,
                                                               num_heads=2, d_kv=16, decoder_start_token_id=0)),
    "vit": lambda: hf.ViTForImageClassification(hf.ViTConfig(hidden_size=32, num_hidden_layers=2,
                                                             num_attention_heads=2, intermediate_size=64,
                                                             image_size=16, patch_size=4, num_labels=3)),
    "levit": lambda: hf.LevitForImageClassification(hf.LevitConfig(
        image_size=16, hidden_sizes=[32, 48, 64], num_attention_heads=[2, 2, 2], depths=[1, 1, 1], key_dim=[8, 8, 8],
        num_labels=3)),
    "segformer": lambda: hf.SegformerForImageClassification(hf.SegformerConfig(
        hidden_sizes=[16, 32, 32, 32], depths=[1, 1, 1, 1], num_attention_heads=[1, 2, 2, 2], decoder_hidden_size=32,
        patch_sizes=[3, 3, 3, 3], strides=[2, 2, 2, 2], num_labels=3)),
    "convnextv2": lambda: hf.ConvNextV2ForImageClassification(hf.ConvNextV2Config(
        image_size=16, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)),
    "pvt_v2": lambda: hf.PvtV2ForImageClassification(hf.PvtV2Config(
        image_size=16, depths=[1, 1], hidden_sizes=[16, 32], num_attention_heads=[1, 2], sr_ratios=[2, 1],
        patch_sizes=[3, 3], strides=[2, 2], mlp_ratios=[2, 2], num_encoder_blocks=2, num_labels=3)),
    "mobilenet_v2": lambda: hf.MobileNetV2ForImageClassification(hf.MobileNetV2Config(
        image_size=16, depth_multiplier=0.35, num_labels=3)),
    "regnet": lambda: hf.RegNetForImageClassification(hf.RegNetConfig(
        hidden_sizes=[16, 32], depths=[1, 1], embedding_size=16, groups_width=8, num_labels=3)),
    "vitmae": lambda: hf.ViTMAEForPreTraining(hf.ViTMAEConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16, patch_size=4,
        decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
        decoder_intermediate_size=64, mask_ratio=0.5)),
    "videomae": lambda: hf.VideoMAEForPreTraining(hf.VideoMAEConfig(
        image_size=16, patch_size=4, num_frames=4, tubelet_size=2, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, decoder_hidden_size=32, decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2, decoder_intermediate_size=64)),
}  # fmt: skip
IMAGES = ("swin", "convnext", "vit", "levit", "segformer", "convnextv2", "pvt_v2", "mobilenet_v2", "regnet")


def _inputs(name: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (2, 9), generator=g)
    if name in IMAGES:
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g), "labels": torch.tensor([0, 2])}
    if name == "vitmae":  # a masked autoencoder: the loss is the reconstruction of the masked patches
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    if name == "videomae":  # two clips of 4 frames, 32 tubes; the first half of the tubes masked
        masked = torch.arange(32).expand(2, 32) < 16
        return {"pixel_values": torch.randn(2, 4, 3, 16, 16, generator=g), "bool_masked_pos": masked}
    if name == "whisper":
        return {"input_features": torch.randn(2, 8, 32, generator=g), "labels": ids}
    if name.endswith("_cls"):
        return {"input_ids": ids, "labels": torch.tensor([0, 2])}
    return {"input_ids": ids, "labels": ids}


def _gradients(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(MODELS))
def test_the_default_flag_feeds_every_architecture(name: str) -> None:
    torch.manual_seed(0)
    model = MODELS[name]()
    batch = _inputs(name)
    bp = _gradients(model, batch)
    engine = FeedbackEngine()
    target = engine.attach(model)
    dfa = _gradients(model, batch)
    report = engine.end_backward()
    notes = "\n".join(engine.recipe_notes())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    engine.detach()
    assert report.deliveries == 1 and report.points_recorded >= 2 and target.blocks
    assert trainable <= set(dfa), sorted(trainable - set(dfa))  # every trainable parameter learns...
    assert all(g.isfinite().all() for g in dfa.values())
    blocks = {n for n in trainable if any(n.startswith(b.name + ".") for b in target.blocks)}
    differ = {n for n in blocks if not torch.allclose(dfa[n], bp[n], rtol=1e-3, atol=1e-8)}
    assert len(differ) > len(blocks) / 2, sorted(blocks - differ)  # ...and the blocks by feedback, not by backprop
    for table, _, tied in engine._token_embeddings:  # named in the summary; untied, kept at its initial values
        assert table in notes
        if not tied:
            assert not [n for n in dfa if n.startswith(table + ".")], table


def test_a_masked_autoencoder_feeds_its_encoder_each_items_mean_error() -> None:
    """ViTMAE lists its whole decoder as a block beside the layers inside it: those layers are the blocks and the
    decoder's last layer the output. Its encoder keeps a random subset of the patches, so every encoder point, the
    patch embedding's (a block with a convolution) too, is fed each item's error averaged over the decoder's
    positions, the same at each of its positions: a fixed map from the decoder's positions to the encoder's would tie
    unrelated patches (it learned less than the shallow baseline)."""
    torch.manual_seed(0)
    model = MODELS["vitmae"]()
    seen: dict[str, torch.Tensor] = {}

    def watch(module: nn.Module, args: Any, out: tuple[torch.Tensor, ...]) -> None:
        out[0].register_hook(lambda g: seen.setdefault("feedback", g))  # (the patches, their mask, their order)

    model.vit.embeddings.register_forward_hook(watch)
    engine = FeedbackEngine(norm_jacobian=False)  # (norm-aware feedback would shape it position by position)
    target = engine.attach(model)
    model(**_inputs("vitmae")).loss.backward()
    engine.end_backward()
    assert [b.name for b in target.blocks] == ["vit.embeddings", "vit.layers.0", "vit.layers.1",
                                               "decoder.decoder_layers.0"]  # fmt: skip
    assert target.output_name == "decoder.decoder_pred"
    fb = seen["feedback"]  # [items, kept patches + 1, width]
    assert fb.shape[1] == 9 and fb.abs().sum() > 0
    torch.testing.assert_close(fb, fb[:, :1].expand_as(fb))


class _SegmenterListingItsHead(hf.MobileNetV2ForSemanticSegmentation):
    """MobileNetV2's segmenter with its head listed in ``_no_split_modules``, as Transformers lists it since 5.25."""

    _no_split_modules = ["MobileNetV2InvertedResidual", "MobileNetV2DeepLabV3Plus"]


@pytest.mark.parametrize("cls", [hf.MobileNetV2ForSemanticSegmentation, _SegmenterListingItsHead])
def test_a_head_listed_beside_the_backbones_layers_is_no_block(cls: type) -> None:
    """A task model may list its head in ``_no_split_modules`` beside the backbone's layers (for a device map): the
    head is the output, not a block, and the blocks are the backbone's layers either way."""
    torch.manual_seed(0)
    model = cls(hf.MobileNetV2Config(image_size=32, depth_multiplier=0.35, num_labels=3))
    engine = FeedbackEngine()
    target = engine.attach(model)
    names = [b.name for b in target.blocks]
    assert names and all(n.startswith("mobilenet_v2.") for n in names), names
    assert target.output_name.startswith("segmentation_head"), target.output_name
    labels = torch.randint(0, 3, (2, 32, 32))
    model(pixel_values=torch.randn(2, 3, 32, 32), labels=labels).loss.backward()
    report = engine.end_backward()
    engine.detach()
    assert report.deliveries == 1 and report.points_recorded > len(names)  # (and the first layer's input)
