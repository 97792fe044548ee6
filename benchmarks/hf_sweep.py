"""A census of the installed Hugging Face Transformers under the default flag, ``FeedbackEngine(mode="dfa")``.

Every architecture of eleven auto mappings of ``transformers`` (:data:`HEADS`: causal LM, masked LM,
sequence-to-sequence LM, sequence classification, image classification, token classification, question answering,
multiple choice, semantic segmentation, audio classification, CTC speech recognition) is built from a tiny config,
given one seeded synthetic batch (tokens, images, raw audio or a spectrogram, with the head's labels: classes, spans,
choices, a class per pixel, a transcript), and put through three arms from the same initialisation:

* **plain backprop** (no engine): the control. If this step fails, the fault is in the census's inputs or config
  (``input problem``), not in the library;
* **the engine in backprop mode** (``mode="bp"``): the reference gradients and step times;
* **the default flag** (``mode="dfa"``): two steps, each closed by ``engine.end_backward(loss)`` as the Lightning
  adapters close theirs.

Config: the model's own config class at its defaults, then shrunk generically (:data:`SHRINK`: width 32, 2 heads,
2 layers, FFN 64, vocabulary 97, 32x32 images, no dropout; per-layer lists keep one layer of each kind; for the audio
heads also :data:`AUDIO`: a feature extractor of 2 conv layers of 32 channels, 16 mel bins, no SpecAugment), with
the few per-family corrections of :data:`OVERRIDES`. Fallbacks, in order, when a variant cannot be built or cannot take
a plain backprop step: the same with 2 key/value heads, a shrink of the core sizes only, then the library's
defaults (at most 5 M parameters). A model over 30 M parameters is not built.

Classes, from the default flag's two steps against the engine's backprop step (no optimizer step between them, so
all three start from the same weights): ``non-finite`` and ``silent backprop`` at either step, the others at the
second, the steady state (the first loss shows the engine how it reads the outputs: ``spread_read_token``):

* ``ok``: none of the below;
* ``non-finite``: a trainable parameter's gradient holds a NaN or an infinity;
* ``silent backprop``: no feedback was delivered, or more than a fifth of the block parameters that train by
  feedback (by their role) got exactly their backprop gradient;
* ``no grad``: a parameter that backprop trains got no gradient, and the engine does not report it as not trained
  (``role_of(p) == "none"``: the token embedding under ``cut_token_embedding``, which is kept at its initial values);
* ``refused``: the default flag's engine declined the model with one of its own errors (raised by ``lightning_dfa``,
  starting ``DFA:``), which says what it cannot train and why;
* ``crash``: the engine raised otherwise (in either mode), or the worker process died;
* ``timeout``: the model took longer than ``--timeout`` seconds;
* ``input problem``: plain backprop fails on every variant;
* ``skipped``: no variant could be built (too big, a config the library refuses, a package not installed, a class
  not exported).

Each model runs in a worker process (one at a time, torch on one thread); a model that hangs or kills its worker is
recorded and the worker restarted, so one model cannot stop the census::

    python -m benchmarks.hf_sweep                              # everything, JSON + docs/architectures.md
    python -m benchmarks.hf_sweep --heads causal,img           # some heads (--out: the JSON holds only these)
    python -m benchmarks.hf_sweep --only causal:gpt2,img:vit   # some models (id = head:model_type)
    python -m benchmarks.hf_sweep --render                     # only rewrite the docs section from the JSON
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import re
import select
import subprocess
import sys
import textwrap
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.markers import replace_section

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "hf_sweep.json"
DOC = ROOT / "docs" / "architectures.md"
MARK = "@@RECORD@@"  # prefix of the worker's result lines (anything else on its stdout is the models' chatter)
VOCAB = 97
BATCH, SEQ = 2, 16
SIZE_LIMIT = 30e6  # parameters, for a shrunk config
DEFAULTS_LIMIT = 5e6  # parameters, for the library's defaults

#: head id -> the ``transformers.models.auto.modeling_auto`` mapping it sweeps
HEADS = {
    "causal": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "mlm": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "s2s": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "seqcls": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "img": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "tokcls": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "qa": "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
    "mc": "MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES",
    "semseg": "MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES",
    "audio": "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES",
    "ctc": "MODEL_FOR_CTC_MAPPING_NAMES",
}
HEAD_NAMES = {
    "causal": "causal LM",
    "mlm": "masked LM",
    "s2s": "seq2seq LM",
    "seqcls": "sequence classification",
    "img": "image classification",
    "tokcls": "token classification",
    "qa": "question answering",
    "mc": "multiple choice",
    "semseg": "semantic segmentation",
    "audio": "audio classification",
    "ctc": "speech recognition (CTC)",
}
#: heads whose config gets ``num_labels`` (3 classes)
LABELLED = ("seqcls", "img", "tokcls", "semseg", "audio")
CHOICES = 2  # answers per question of a multiple-choice batch
FRAMES = 32  # frames a raw-audio batch gives the transformer after the feature extractor
FEATURE_FRAMES = 128  # frames of a spectrogram batch (before the encoder's own subsampling)
CTC_LABELS = 4  # tokens per transcript of a CTC batch, well below the frames
FAILURES = ("refused", "crash", "timeout", "silent backprop", "no grad", "non-finite")
NUMBER_WORDS = dict(enumerate("zero one two three four five six seven eight nine ten eleven twelve".split()))

# ----------------------------------------------------------------------------------------------------- configs
#: the generic shrink: config key -> tiny value (applied where the config has the key)
SHRINK: dict[str, Any] = {
    # widths
    "hidden_size": 32, "d_model": 32, "n_embd": 32, "dim": 32, "embed_dim": 16, "embedding_size": 32,
    "word_embed_proj_dim": 32, "projection_dim": 32,
    # heads
    "num_attention_heads": 2, "n_head": 2, "n_heads": 2, "num_heads": 2, "encoder_attention_heads": 2,
    "decoder_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "d_kv": 16, "d_head": 16,
    "attention_head_dim": 16, "kv_channels": 16,
    # layers
    "num_hidden_layers": 2, "n_layer": 2, "n_layers": 2, "num_layers": 2, "encoder_layers": 2, "decoder_layers": 2,
    "num_decoder_layers": 2,
    # feed-forward
    "intermediate_size": 64, "d_ff": 64, "d_inner": 64, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
    "ffn_dim": 64, "hidden_dim": 64, "n_inner": 64, "dff": 64, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    # mixtures of experts (cheap routing)
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    # multi-head latent attention
    "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    # vocabulary, special tokens, positions
    "vocab_size": VOCAB, "max_position_embeddings": 64, "n_positions": 64, "max_seq_len": 64, "context_length": 64,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 0, "sep_token_id": 2,
    "cls_token_id": 1, "mask_token_id": 2, "unk_token_id": 2,
    # vision
    "image_size": 32, "patch_size": 4, "num_channels": 3, "width_coefficient": 0.25, "depth_coefficient": 0.25,
    "layerdrop": 0.0, "encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0,
    "num_labels": 3,
    # family-specific names of the same sizes
    "rotary_dim": 8, "n_group": 1, "topk_group": 1, "emb_dim": 32, "entity_vocab_size": 16, "entity_emb_size": 16,
    "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_n_groups": 1, "mamba_d_state": 8, "d_latents": 32,
    "num_latents": 8, "src_vocab_size": VOCAB, "tgt_vocab_size": VOCAB, "unpadded_vocab_size": VOCAB,
    "swa_head_dim": 16, "prediction_head_size": 32, "mlp_dim": 64,
}  # fmt: skip
#: keys set even where the default is ``None`` (the config derives them otherwise, often at full size)
SET_IF_NONE = {"vocab_size", "pad_token_id", "decoder_start_token_id", "head_dim", "num_experts_per_tok",
               "num_key_value_heads"}  # fmt: skip
#: the keys of the core-only shrink (the second fallback)
CORE = {"hidden_size", "d_model", "n_embd", "dim", "num_attention_heads", "n_head", "n_heads", "num_key_value_heads",
        "head_dim", "num_hidden_layers", "n_layer", "n_layers", "num_layers", "encoder_layers", "decoder_layers",
        "intermediate_size", "vocab_size", "max_position_embeddings", "pad_token_id", "bos_token_id", "eos_token_id",
        "decoder_start_token_id", "image_size", "num_channels", "num_labels", "encoder_attention_heads",
        "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "d_ff", "d_kv"}  # fmt: skip
AUDIO_HEADS = ("audio", "ctc")
#: the audio heads' further shrink: config key -> tiny value, set whatever its type where the config has the key
AUDIO: dict[str, Any] = {
    # the raw-audio feature extractor: two conv layers (kernels 10, 3; strides 5, 2) of 32 channels, not 7 of 512
    "conv_dim": [32, 32], "conv_kernel": [10, 3], "conv_stride": [5, 2], "num_feat_extract_layers": 2,
    # the convolutional position embedding: its kernel (128 taps) and its groups, which must divide the width (32)
    "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 2,
    # spectrogram inputs: 16 mel bins (W2V-BERT stacks two frames of 80 into 160 features: 16 here)
    "num_mel_bins": 16, "feature_projection_input_dim": 16,
    # positions of the audio encoders (Whisper takes exactly twice these frames; 1500 by default)
    "max_source_positions": 64, "max_target_positions": 64,
    # heads and projections sized apart from the width (classifier, quantizer, adapter, subsampling)
    "classifier_proj_size": 16, "codevector_dim": 16, "proj_codevector_dim": 16, "output_hidden_size": 32,
    "subsampling_conv_channels": 16,
    # Granite Speech attends within blocks of context_size frames (128), at most its positions (64)
    "context_size": 16,
    # SpecAugment masks frames by numpy's generator, which torch's seed does not fix: the arms would differ
    # (Data2Vec-Audio has no switch: no frames masked)
    "apply_spec_augment": False, "mask_time_prob": 0.0,
}  # fmt: skip
#: audio keys that only shrink (Data2Vec-Audio's num_conv_pos_embeddings counts 5 layers, not 128 taps)
AUDIO_AT_MOST = {"num_conv_pos_embeddings", "max_source_positions", "max_target_positions", "context_size"}
#: audio families taking raw audio as [batch, 1, samples], not [batch, samples]
CHANNEL_AUDIO = {"omniasr_ctc"}
#: spectrogram features per mel bin where a family stacks more than one (Granite Speech 5: 2 frames, with deltas)
FEATURES_PER_BIN = {"granite_speech5_ctc": 4}
LAYER_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
DROPOUT_KEYS = ("drop_path_rate", "hidden_dropout_prob", "attention_probs_dropout_prob", "dropout_rate")

#: per-family corrections to the generic shrink (model_type -> config kwargs), each for a constraint it breaks
OVERRIDES: dict[str, dict[str, Any]] = {
    # the SSM's heads must tile expand * hidden_size (2 * 32 = 4 heads of 16), in groups that divide the heads
    "mamba2": {"num_heads": 4, "head_dim": 16, "n_groups": 1},
    # hidden_dim is the head's width, which the network derives from width_coefficient (1280 * 0.25 = 320)
    "efficientnet": {"hidden_dim": 320},
    # at 32 pixels the last stages' maps (2x2) are smaller than a 4x4 patch: 64 pixels and 2x2 patches
    "mobilevitv2": {"image_size": 64, "patch_size": 2},
    # the generic cut keeps only linear-attention layers, whose cache refuses a training forward: one of each kind
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    # the latent-attention rule sets head_dim to the rotary width (8); this family's rotary embedding needs 16
    "mistral4": {"head_dim": 16},
    # the 2-D position embedding concatenates 4 coordinates and 2 shapes: 4 * 4 + 2 * 8 must equal the width (32)
    "layoutlmv3": {"coordinate_size": 4, "shape_size": 8},
    # the layout embedding concatenates 6 parts of hidden_size // 6: the width must divide by 6 (and by 4 * 2 heads)
    "lilt": {"hidden_size": 48},
    # Swin stages: the image, the patches and the windows (7 by default) must divide evenly at every stage
    "swin": {"image_size": 16, "patch_size": 2, "window_size": 2, "embed_dim": 16, "depths": [1, 1],
             "num_heads": [2, 2]},
    "donut-swin": {"image_size": 16, "patch_size": 2, "window_size": 2, "embed_dim": 16, "depths": [1, 1],
                   "num_heads": [2, 2]},
    # image_size is a list here (the generic shrink sets numbers only); the position embedding is sized from it
    "hiera": {"image_size": [32, 32]},
    # the masked-LM decoder queries max_position_embeddings positions: it must be the batch's sequence length
    "perceiver": {"max_position_embeddings": SEQ},
    # the patch strides (10) are sized for 1024 frames of 128 mel bins: 4-bin strides over 64 frames of 16 bins
    "audio-spectrogram-transformer": {"max_length": 64, "frequency_stride": 4, "time_stride": 4},
    # the encoder projects keys and values for every head, yet repeats them by heads // num_key_value_heads
    "granite_speech5_ctc": {"encoder_config": {"num_key_value_heads": 2}},
    # the segmentation neck takes the maps of 4 layers (out_indices, 1-based): 4 layers, each one
    "beit": {"num_hidden_layers": 4, "out_indices": [1, 2, 3, 4]},
    "data2vec-vision": {"num_hidden_layers": 4, "out_indices": [1, 2, 3, 4]},
    # DPT's neck reassembles the maps of 4 layers (backbone_out_indices, 0-based) at 4 widths: 4 layers, narrow
    "dpt": {"num_hidden_layers": 4, "backbone_out_indices": [0, 1, 2, 3], "neck_hidden_sizes": [16, 16, 32, 32],
            "fusion_hidden_size": 16},
    # the same neck on a backbone that must return token sequences (its composite's default), not maps
    "tipsv2_dpt": {"backbone_config": {"num_hidden_layers": 4, "out_indices": [1, 2, 3, 4],
                                       "reshape_hidden_states": False},
                   "neck_hidden_sizes": [16, 16, 32, 32], "fusion_hidden_size": 16},
    # the default head config leaves its layers unset (None): two upsampling layers and one conv, 16 channels
    # and its per-layer key/value heads (16 and 8 at full size) must divide the 2 heads
    "sapiens2": {"head_config": {"upsample_out_channels": [16, 16], "conv_out_channels": [16]},
                 "num_key_value_heads_per_layer": [2, 1], "num_key_value_attention_heads": 1},
    # the axial position embedding: its 2 factors' widths sum to the width, its shape multiplies to the sequence
    "reformer": {"axial_pos_embds_dim": [16, 16], "axial_pos_shape": [4, SEQ // 4]},
    # the language, cross-modal and vision stacks count their layers apart (9, 5, 5), and the regions are 2048-wide
    "lxmert": {"l_layers": 1, "x_layers": 1, "r_layers": 1, "visual_feat_dim": 16, "num_qa_labels": 3},
}  # fmt: skip


def all_tasks(heads: list[str] | None = None) -> list[dict[str, str]]:
    """One task per (head, model type) of the auto mappings: ``{"id", "head", "model_type", "cls"}``."""
    from transformers.models.auto import modeling_auto

    tasks = []
    for head, mapping in HEADS.items():
        if heads is not None and head not in heads:
            continue
        for model_type, cls in getattr(modeling_auto, mapping).items():
            if isinstance(cls, (tuple, list)):
                cls = cls[0]
            tasks.append({"id": f"{head}:{model_type}", "head": head, "model_type": model_type, "cls": cls})
    return tasks


def task_of(task_id: str) -> dict[str, str]:
    """The task of an id ``head:model_type``."""
    head = task_id.split(":", 1)[0]
    for task in all_tasks([head]):
        if task["id"] == task_id:
            return task
    raise KeyError(f"no model {task_id!r} in the installed transformers' mappings")


def _is_dropout(key: str) -> bool:
    return "dropout" in key or key.endswith(("_drop", "drop_rate", "drop_prob")) or key in DROPOUT_KEYS


def shrunk_kwargs(default: Any, full: bool = True, audio: bool = False) -> dict[str, Any]:
    """Config kwargs shrinking ``default`` (the keys of its ``to_dict()``, sub-configs shrunk too); ``full=False``:
    the :data:`CORE` sizes only; ``audio``: the :data:`AUDIO` keys too (for the audio heads)."""
    from transformers import PretrainedConfig

    d = default.to_dict()
    kw: dict[str, Any] = {}
    for k, v in d.items():
        cur = getattr(default, k, v)
        if isinstance(cur, PretrainedConfig):  # composite: shrink the sub-config too
            kw[k] = {**shrunk_kwargs(cur, full, audio), "model_type": cur.model_type}
            if v.get("out_features") and not any(n in kw[k] for n in LAYER_KEYS):  # a backbone of stages keeps
                kw[k]["out_features"] = v["out_features"]  # its stages: the ones its head takes, not the last
            continue
        if _is_dropout(k):
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                kw[k] = type(v)(0)  # of the default's type: strict configs refuse a float for an int field
            continue
        if k in SHRINK and (full or k in CORE):
            new = SHRINK[k]
            if isinstance(v, bool):
                continue
            if isinstance(v, (int, float)) or (v is None and k in SET_IF_NONE):
                if k in ("width_coefficient", "depth_coefficient"):
                    new = min(v, new) if v else new
                kw[k] = new
            elif isinstance(v, list) and v and all(isinstance(x, int) for x in v):
                if k in ("num_attention_heads", "num_heads"):
                    kw[k] = [2] * len(v)
                elif k == "eos_token_id":
                    kw[k] = [2]
            continue
        if full and isinstance(v, list) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            if k in ("depths", "num_blocks", "block_repeats", "depth"):  # stages: one layer each
                kw[k] = [1] * len(v)
            elif k in ("hidden_sizes", "embed_dims", "dims", "widths", "channels"):
                kw[k] = [min(16 * 2**i, 64) for i in range(len(v))]
            elif k in ("num_attention_heads", "num_heads", "heads"):
                kw[k] = [2] * len(v)
    if full:
        kw.update(_layer_lists(d, kw))
    if full and audio:
        for k, new in AUDIO.items():
            if k in d and not (k in AUDIO_AT_MOST and isinstance(d[k], int) and d[k] <= new):
                kw[k] = new
    if "qk_rope_head_dim" in kw:  # latent attention: the rope part is the rotary head dim
        if "head_dim" in d:
            kw["head_dim"] = kw["qk_rope_head_dim"]
        if "qk_head_dim" in d:
            kw["qk_head_dim"] = kw["qk_rope_head_dim"] + kw.get("qk_nope_head_dim", 8)
    return kw


def _layer_lists(d: dict[str, Any], kw: dict[str, Any]) -> dict[str, Any]:
    """Per-layer lists cut to one layer of each kind (a hybrid keeps both kinds), at least two layers."""
    n0 = next((d[k] for k in LAYER_KEYS if isinstance(d.get(k), int)), None)
    if not n0 or n0 <= 2:
        return {}
    per = {
        k: v
        for k, v in d.items()
        if isinstance(v, list)
        and len(v) == n0
        and k not in kw
        and (any(w in k for w in ("layer", "pattern", "block", "types")) or all(isinstance(x, str) for x in v))
    }
    if not per:
        return {}
    kinds = next((v for v in per.values() if all(isinstance(x, str) for x in v)), None)
    idx: list[int] = []
    for i, x in enumerate(kinds or []):
        if x not in [kinds[j] for j in idx]:
            idx.append(i)
    for i in range(n0):
        if len(idx) >= 2:
            break
        if i not in idx:
            idx.append(i)
    idx.sort()
    out: dict[str, Any] = {k: [v[i] for i in idx] for k, v in per.items()}
    out.update({k: len(idx) for k in LAYER_KEYS if isinstance(d.get(k), int)})
    return out


def variants(task: dict[str, str]):
    """Yield ``(variant, config, error)``: the shrink, with 2 key/value heads, the core-only shrink, the defaults."""
    import transformers

    cfg_cls = transformers.CONFIG_MAPPING[task["model_type"]]
    own = getattr(getattr(transformers, task["cls"], None), "config_class", None)
    if own is not None and own is not transformers.PretrainedConfig and own is not cfg_cls:
        cfg_cls = own  # a text-only class of a multimodal family: its own text config
    labels = {"num_labels": 3} if task["head"] in LABELLED else {}
    try:
        default = cfg_cls()
    except Exception as err:  # noqa: BLE001
        yield "defaults", None, f"{type(err).__name__}: {err}"
        return
    for name in ("shrink", "shrink-kv2", "core-shrink"):
        try:
            kw = shrunk_kwargs(default, full=name != "core-shrink", audio=task["head"] in AUDIO_HEADS)
            if name == "shrink-kv2":
                if "num_key_value_heads" not in kw:
                    continue
                kw["num_key_value_heads"] = 2
            if name != "core-shrink":
                for k, v in OVERRIDES.get(task["model_type"], {}).items():  # into a shrunk sub-config, or set
                    kw[k] = {**kw[k], **v} if isinstance(v, dict) and isinstance(kw.get(k), dict) else v
            if (getattr(default, "is_encoder_decoder", False) or task["head"] == "s2s") and (
                "decoder_start_token_id" not in kw
            ):
                kw["decoder_start_token_id"] = 0
            yield name, cfg_cls(**{**kw, **labels}), None
        except Exception as err:  # noqa: BLE001
            yield name, None, f"{type(err).__name__}: {err}"
    try:
        yield "defaults", cfg_cls(**labels), None
    except Exception as err:  # noqa: BLE001
        yield "defaults", None, f"{type(err).__name__}: {err}"


def count_on_meta(cls: Any, cfg: Any) -> int | None:
    """Parameters of ``cls(cfg)``, built on the meta device (no memory); ``None`` if it cannot be built there."""
    import torch

    try:
        with torch.device("meta"):
            model = cls(cfg)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # noqa: BLE001
        return None


# ----------------------------------------------------------------------------------------------------- inputs
def make_batch(head: str, cfg: Any, model: Any) -> dict[str, Any]:
    """A seeded synthetic batch of 2 for the model's head (labels included)."""
    import torch

    g = torch.Generator().manual_seed(0)
    sig = inspect.signature(model.forward).parameters
    if head == "img" and "pixel_values" not in sig and "input_ids" in sig:  # ImageGPT: pixel clusters as tokens
        head = "seqcls"
    if head in ("img", "semseg"):
        ch = getattr(cfg, "num_channels", 3) or 3
        size = getattr(cfg, "image_size", 32)
        size = size[0] if isinstance(size, (list, tuple)) else size
        size = size if isinstance(size, int) and size <= 64 else 32
        pixels = torch.randn(BATCH, ch, size, size, generator=g)
        if head == "img":
            labels = torch.tensor([0, 2])
        else:  # a class per pixel
            labels = torch.randint(0, 3, (BATCH, size, size), generator=g)
        batch = {"pixel_values": pixels, "labels": labels}
    elif head in AUDIO_HEADS:
        batch = _audio_inputs(cfg, sig, g)
        if head == "audio":
            batch["labels"] = torch.tensor([0, 2])
        else:  # a transcript per clip: tokens past the blank and the special ones, far fewer than the frames
            hi = min(VOCAB, getattr(cfg, "vocab_size", None) or VOCAB)
            batch["labels"] = torch.randint(3, hi, (BATCH, CTC_LABELS), generator=g)
    else:
        vocab = getattr(cfg, "vocab_size", None) or getattr(getattr(cfg, "text_config", None), "vocab_size", VOCAB)
        hi = min(VOCAB, vocab or VOCAB)
        ids = torch.randint(3, hi, (BATCH, SEQ), generator=g)
        if head == "seqcls":
            eos = getattr(cfg, "eos_token_id", None)
            eos = eos[0] if isinstance(eos, list) and eos else eos
            if isinstance(eos, int) and 0 <= eos < hi:  # encoder-decoder classifiers pool the last <eos>
                ids[:, -1] = eos
            targets = {"labels": torch.tensor([0, 2])}
        elif head == "tokcls":
            targets = {"labels": torch.randint(0, 3, (BATCH, SEQ), generator=g)}
        elif head == "mc":  # each question with its choices ([batch, choices, seq]) and the right choice's index
            ids = torch.randint(3, hi, (BATCH, CHOICES, SEQ), generator=g)
            targets = {"labels": torch.tensor([0, 1])}
        elif head == "qa" and "start_positions" in sig:  # an answer span per question
            span = torch.randint(0, SEQ, (2, BATCH), generator=g).sort(dim=0).values
            targets = {"start_positions": span[0], "end_positions": span[1]}
        elif head == "qa":  # visual question answering (LXMERT): a class among the answers
            targets = {"labels": torch.tensor([0, 2])}
        else:  # causal, masked, seq2seq (the model shifts the labels into its decoder inputs)
            targets = {"labels": ids.clone()}
        batch = {"input_ids": ids, **targets}
        if head in ("qa", "mc") and "global_attention_mask" in sig:  # Longformer: global attention on the first
            batch["global_attention_mask"] = torch.zeros_like(ids)  # token (else it counts 3 separators in each)
            batch["global_attention_mask"][..., 0] = 1
        if "visual_feats" in sig:  # LXMERT: a few region features and their boxes
            dim = getattr(cfg, "visual_feat_dim", 16)
            batch["visual_feats"] = torch.randn(BATCH, 4, dim, generator=g)
            batch["visual_pos"] = torch.rand(BATCH, 4, getattr(cfg, "visual_pos_dim", 4), generator=g)
    if "use_cache" in sig:  # hybrid linear-attention caches refuse a training forward
        batch["use_cache"] = False
    if "bbox" in sig and "input_ids" in batch:  # layout models: one box per token (BROS: 4 corners, 8 numbers)
        k = getattr(cfg, "dim_bbox", 4)
        batch["bbox"] = torch.tensor([10, 10, 20, 20, 20, 20, 10, 20][:k]).expand(BATCH, SEQ, k).clone()
    return batch


def _audio_inputs(cfg: Any, sig: Any, g: Any) -> dict[str, Any]:
    """Raw audio (``input_values``) sized for :data:`FRAMES` frames out of the config's conv feature extractor,
    or a spectrogram (``input_features``) shaped as the model's family takes it."""
    import torch

    sub = next((c for c in (getattr(cfg, k, None) for k in ("encoder_config", "audio_config")) if c is not None), cfg)
    if "input_features" not in sig:
        if getattr(sub, "max_length", None) and getattr(sub, "num_mel_bins", None):  # AST: a spectrogram [time, mel]
            return {"input_values": torch.randn(BATCH, sub.max_length, sub.num_mel_bins, generator=g)}
        n = FRAMES
        for k, s in zip(reversed(sub.conv_kernel), reversed(sub.conv_stride)):  # the samples giving FRAMES frames
            n = (n - 1) * s + k
        shape = (BATCH, 1, n) if cfg.model_type in CHANNEL_AUDIO else (BATCH, n)
        batch = {"input_values": torch.randn(*shape, generator=g)}
        if "padding_mask" in sig:  # OmniASR: the CTC loss counts the frames from the mask
            batch["padding_mask"] = torch.ones(BATCH, n, dtype=torch.long)
        return batch
    dim = getattr(sub, "feature_projection_input_dim", None) or getattr(sub, "num_mel_bins", None) or 16
    dim *= FEATURES_PER_BIN.get(cfg.model_type, 1)
    if getattr(cfg, "is_encoder_decoder", False) and getattr(cfg, "max_source_positions", None):
        # Whisper: [mel, time], exactly twice the encoder's positions (its two convs halve the time once)
        return {"input_features": torch.randn(BATCH, dim, 2 * cfg.max_source_positions, generator=g)}
    batch = {"input_features": torch.randn(BATCH, FEATURE_FRAMES, dim, generator=g)}
    if "attention_mask" in sig:  # Parakeet, LASR: the CTC loss counts the frames from the mask
        batch["attention_mask"] = torch.ones(BATCH, FEATURE_FRAMES, dtype=torch.long)
    return batch


# ----------------------------------------------------------------------------------------------------- steps
def fresh(cls: Any, cfg: Any) -> Any:
    """``cls(cfg)`` from seed 0, in training mode."""
    import torch

    torch.manual_seed(0)
    model = cls(cfg)
    model.train()
    if hasattr(model, "set_default_language"):  # X-MOD routes through a language adapter
        with contextlib.suppress(Exception):
            model.set_default_language("en_XX")
    return model


def step(model: Any, batch: dict[str, Any], engine: Any = None) -> tuple[dict[str, Any], float, Any]:
    """One forward and backward (closed by ``engine.end_backward(loss)``): ``(gradients, seconds, report)``."""
    import torch

    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    out = model(**batch)
    loss = getattr(out, "loss", None)
    if loss is None and getattr(out, "logits", None) is not None:  # a head that computes no loss
        logits = out.logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))
    if loss is None:
        raise RuntimeError("model returned no loss")
    loss.backward()
    report = engine.end_backward(loss) if engine is not None else None
    seconds = time.perf_counter() - t0
    grads = {n: (p.grad.detach().clone() if p.grad is not None else None) for n, p in model.named_parameters()}
    return grads, seconds, report


def _one_line(text: str, n: int = 240) -> str:
    text = " ".join(str(text).split())
    if len(text) > n:
        text = text.removesuffix("...")
    return text if len(text) <= n else text[: n - 3] + "..."


def _in_library(frame: traceback.FrameSummary) -> bool:
    return "lightning_dfa" in frame.filename.replace(os.sep, "/")


def _error() -> str:
    """The current exception in one line, with the innermost lightning_dfa frame if the library raised it."""
    etype, err, tb = sys.exc_info()
    frames = [f for f in traceback.extract_tb(tb) if _in_library(f)]
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno} {frames[-1].name})" if frames else ""
    return _one_line(f"{etype.__name__}: {err}{where}")


def _refusal() -> bool:
    """The current exception is one of the library's own refusals: raised inside ``lightning_dfa`` with a message
    that starts with ``DFA:`` and says what it cannot train and why."""
    _, err, tb = sys.exc_info()
    frames = traceback.extract_tb(tb)
    return bool(frames) and _in_library(frames[-1]) and str(err).startswith("DFA:")


def run_arm(cls: Any, cfg: Any, batch: dict[str, Any], mode: str) -> dict[str, Any]:
    """Two steps of a fresh model with ``FeedbackEngine(mode=mode)`` attached."""
    from lightning_dfa import FeedbackEngine

    model = fresh(cls, cfg)
    engine = FeedbackEngine(mode=mode)
    target = engine.attach(model)
    first = step(model, batch, engine)
    second = step(model, batch, engine)
    return {"model": model, "engine": engine, "target": target, "first": first, "second": second}


def measure(task: dict[str, str] | str, mode: str = "dfa") -> dict[str, Any]:
    """The census record of one model (``task`` or its id ``head:model_type``), in this process.

    ``mode`` is the engine mode of the arm under test: the census runs the default flag, ``"dfa"``; any other mode
    is checked against the same criteria (``"bp"`` trains every block by its backprop gradient: ``silent backprop``).
    """
    import torch
    import transformers

    if isinstance(task, str):
        task = task_of(task)
    rec: dict[str, Any] = {
        "id": task["id"],
        "head": task["head"],
        "model_type": task["model_type"],
        "class": task["cls"],
        "status": None,
        "reason": "",
    }
    cls = getattr(transformers, task["cls"], None)
    if cls is None:
        return {**rec, "status": "skipped", "reason": "class not exported by transformers"}

    # ---- the first variant whose model takes a plain backprop step
    errors: list[str] = []
    plain = model = batch = cfg = variant = None
    for variant, cfg, err in variants(task):
        if cfg is None:
            errors.append(f"{variant}: config refused: {err}")
            continue
        n = count_on_meta(cls, cfg)
        if n is not None and n > (DEFAULTS_LIMIT if variant == "defaults" else SIZE_LIMIT):
            errors.append(f"{variant}: too big ({n / 1e6:.1f} M parameters)")
            continue
        if n is None and variant == "defaults":
            errors.append(f"{variant}: not built (cannot be counted on the meta device)")
            continue
        try:
            model = fresh(cls, cfg)
        except Exception:  # noqa: BLE001
            errors.append(f"{variant}: build failed: {_error()}")
            continue
        try:
            batch = make_batch(task["head"], cfg, model)
            plain = step(model, batch)
            break
        except Exception:  # noqa: BLE001
            errors.append(f"{variant}: plain backprop failed: {_error()}")
    if plain is None:
        if any(": plain backprop failed:" in e for e in errors):
            first = next(e for e in errors if ": plain backprop failed:" in e)
            return {**rec, "status": "input problem", "reason": _one_line(first), "variant_errors": errors}
        reason = f"{_skip_kind(errors)}: {_detail(errors[0])}"
        if "too big" in errors[-1] and len(errors) > 1:
            reason += f"; at the library's defaults: {_detail(errors[-1])}"
        return {**rec, "status": "skipped", "reason": _one_line(reason), "variant_errors": errors}
    rec["variant"] = variant
    rec["n_params"] = sum(p.numel() for p in model.parameters())
    del model

    # ---- the reference: the engine in backprop mode
    try:
        bp = run_arm(cls, cfg, batch, "bp")
    except Exception:  # noqa: BLE001
        return {**rec, "status": "crash", "reason": "engine (mode='bp'): " + _error()}
    bpg = bp["first"][0]
    rec["bp_engine_equals_plain"] = all(
        (a is None) == (b is None) and (a is None or torch.equal(a, b))
        for a, b in ((plain[0][n], bpg[n]) for n in plain[0])
    )
    t_bp = bp["second"][1]
    bp["engine"].detach()
    del bp

    # ---- the arm under test
    try:
        arm = run_arm(cls, cfg, batch, mode)
    except Exception:  # noqa: BLE001
        status = "refused" if _refusal() else "crash"
        return {**rec, "status": status, "reason": f"engine (mode={mode!r}): " + _error()}
    model, engine, target = arm["model"], arm["engine"], arm["target"]
    dg, report = arm["first"][0], arm["first"][2]
    roles_count = engine.parameter_roles()
    trained = roles_count["feedback"] + roles_count["true gradient"]
    rec["share_true_gradient"] = round(100 * roles_count["true gradient"] / trained, 1) if trained else None
    rec["n_points"] = len(re.findall(r"^\d+ +\| ", engine.summary(), flags=re.M))
    rec["deliveries"] = report.deliveries
    rec["dfa_bp_step_ratio"] = round(arm["second"][1] / t_bp, 3) if t_bp > 0 else None
    # both steps start from the same weights (no optimizer step between them); the second is the steady state,
    # after the first loss showed the engine how it reads the outputs (spread_read_token)
    first = classify(model, engine, target, bpg, dg, report.deliveries)
    second = classify(model, engine, target, bpg, arm["second"][0], arm["second"][2].deliveries)
    rec.update(first if first["status"] in ("non-finite", "silent backprop") else second)
    if first["status"] != second["status"]:
        rec["first_step"] = f"{first['status']}: {first['reason']}" if first["reason"] else first["status"]
    engine.detach()
    return rec


def _detail(error: str) -> str:
    """``"variant: what: detail"`` -> ``detail``; ``"variant: too big (N M parameters)"`` -> ``N M parameters``."""
    size = re.search(r"too big \(([^)]*)\)", error)
    return size.group(1) if size else error.split(": ", 2)[-1]


def _skip_kind(errors: list[str]) -> str:
    """Why no variant was built, in a few words, from the first variant's error."""
    for e in errors:
        found = re.search(r"requires the (\w+) library", e)
        if found or "ImportError" in e:
            return f"needs {found.group(1) if found else 'a package'}, not installed"
    first = errors[0] if errors else ""
    if first.startswith("defaults: config refused"):
        return "its config refuses its own defaults"
    if "config refused" in first:
        return "its config refuses the shrink"
    if "build failed" in first:
        return "it does not build from the shrink"
    if "too big" in first:
        return "too big even shrunk"
    return "no config"


def classify(model: Any, engine: Any, target: Any, bpg: dict[str, Any], dg: dict[str, Any], deliveries: int) -> dict:
    """``status`` and ``reason`` from one step's gradients under the engine (``dg``, with its ``deliveries``) and
    under backprop (``bpg``, from the same weights), with the parameter names behind them."""
    import torch

    roles = {n: engine.role_of(p) for n, p in model.named_parameters()}
    blocks = [b.name for b in target.blocks] if target is not None else []
    outputs = [n for n, _ in engine.output_modules()]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    gmax = max((float(g.abs().max()) for g in bpg.values() if g is not None and g.numel()), default=0.0)

    def real(g: Any) -> bool:  # a gradient zero up to rounding (a key bias's) is no gradient
        return g is not None and g.numel() > 0 and float(g.abs().max()) > 1e-6 * gmax

    def same(n: str) -> bool:
        return dg[n] is not None and bpg[n] is not None and torch.allclose(dg[n], bpg[n], rtol=1e-5)

    def inside(n: str, prefixes: list[str]) -> bool:
        return any(n.startswith(p + ".") for p in prefixes)

    nonfinite = [n for n in trainable if dg[n] is not None and not torch.isfinite(dg[n]).all()]
    lost = [n for n in trainable if real(bpg[n]) and (dg[n] is None or not bool((dg[n] != 0).any()))]
    unexplained = [n for n in lost if roles[n] != "none"]
    by_feedback = [
        n
        for n in trainable
        if inside(n, blocks) and not inside(n, outputs) and roles[n] != "true gradient" and real(bpg[n])
    ]
    as_backprop = [n for n in by_feedback if same(n)]
    out: dict[str, Any] = {"n_blocks": len(blocks), "block_params": len(by_feedback)}
    if nonfinite:
        out.update(status="non-finite", reason=f"{len(nonfinite)} gradients not finite: {', '.join(nonfinite[:3])}")
    elif not blocks or deliveries == 0:
        why = "no blocks found" if not blocks else "no feedback delivered in the first backward"
        out.update(status="silent backprop", reason=why)
    elif as_backprop and len(as_backprop) > 0.2 * len(by_feedback):
        out.update(
            status="silent backprop",
            reason=f"{len(as_backprop)} of {len(by_feedback)} block parameters got their backprop gradient: "
            + ", ".join(as_backprop[:3]),
        )
    elif unexplained:
        out.update(status="no grad", reason=f"no gradient (backprop gives one): {', '.join(unexplained[:3])}")
    else:
        out.update(status="ok", reason="")
    out["reason"] = _one_line(out["reason"])
    return out


# ----------------------------------------------------------------------------------------------------- processes
def worker() -> None:
    """Read tasks (JSON lines) on stdin, write their records on stdout (each line prefixed by :data:`MARK`)."""
    import torch
    import transformers

    import lightning_dfa  # noqa: F401

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    out, sys.stdout = sys.stdout, sys.stderr  # the models' prints go to stderr, not to the records
    out.write(MARK + json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        task = json.loads(line)
        t0 = time.perf_counter()
        try:
            rec = measure(task)
        except Exception:  # noqa: BLE001
            rec = {"id": task["id"], "head": task["head"], "model_type": task["model_type"], "class": task["cls"]}
            rec.update(status="crash", reason="census harness: " + _error())
        rec["wall_s"] = round(time.perf_counter() - t0, 2)
        out.write(MARK + json.dumps(rec, default=str) + "\n")
        out.flush()


class Worker:
    """A worker process (``python -m benchmarks.hf_sweep --worker``) and its result channel."""

    def __init__(self, log: Any) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.hf_sweep", "--worker"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        self.buf = ""
        if self.read(300) is None:
            raise RuntimeError("the census worker did not start")

    def read(self, timeout: float) -> dict[str, Any] | None:
        """The next record; ``None`` after ``timeout`` seconds, ``{"died": True}`` if the worker exited."""
        end = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while True:
            if "\n" in self.buf:
                line, self.buf = self.buf.split("\n", 1)
                if line.startswith(MARK):
                    return json.loads(line[len(MARK) :])
                continue
            left = end - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 1 << 20).decode(errors="replace")
            if not chunk:
                return {"died": True}
            self.buf += chunk

    def run(self, task: dict[str, str], timeout: float) -> dict[str, Any] | None:
        self.proc.stdin.write(json.dumps(task) + "\n")
        self.proc.stdin.flush()
        return self.read(timeout)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def sweep(tasks: list[dict[str, str]], timeout: float, log: Any) -> list[dict[str, Any]]:
    """The records of ``tasks``, each measured by a worker process within ``timeout`` seconds."""
    records = []
    w = None
    for task in tasks:
        if w is None:
            w = Worker(log)
        log.write(f"\n===== {task['id']} {task['cls']}\n")
        log.flush()
        t0 = time.perf_counter()
        rec = w.run(task, timeout)
        if rec is None or rec.get("died"):
            w.kill()
            w = None
            timed_out = rec is None
            rec = {"id": task["id"], "head": task["head"], "model_type": task["model_type"], "class": task["cls"]}
            if timed_out:
                rec.update(status="timeout", reason=f"no record within {timeout:g} s")
            else:
                rec.update(status="crash", reason="the worker process died (a segfault or out of memory)")
            rec["wall_s"] = round(time.perf_counter() - t0, 2)
        records.append(rec)
        print(f"{rec['id']:44s} {rec['status']:16s} {rec.get('wall_s', '')!s:>6} {rec['reason'][:70]}", flush=True)
    if w is not None:
        w.close()
    return records


def versions() -> dict[str, str | None]:
    import torch
    import transformers

    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = ["git", "-C", str(ROOT)]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "lightning_dfa"], capture_output=True, text=True)
        if dirty.stdout.strip():
            commit += "+modified"
    return {"torch": torch.__version__, "transformers": transformers.__version__, "lightning_dfa": commit}


# ----------------------------------------------------------------------------------------------------- docs
def paper_cpu(machine: dict[str, Any]) -> str:
    """``"a 2-core AMD EPYC CPU"`` from the JSON's machine entry."""
    name = re.sub(r"\((R|TM)\)|\bCPU\b|\bProcessor\b|@.*$|\b\d+-Core\b", "", machine.get("cpu", "")).strip()
    name = " ".join(name.split()) or "x86"
    return f"a {machine.get('cores', '?')}-core {name} CPU"


def render(data: dict[str, Any]) -> str:
    """The census section of docs/architectures.md (between the markers)."""
    recs, ver, mach = data["records"], data["versions"], data["machine"]
    by_head: dict[str, Counter] = {h: Counter() for h in HEADS}
    skip_kinds: Counter = Counter()
    for r in recs:
        by_head[r["head"]][r["status"]] += 1
        if r["status"] == "skipped":
            skip_kinds[r["reason"].split(":", 1)[0]] += 1
    total = Counter(r["status"] for r in recs)
    heads = [h for h, c in by_head.items() if sum(c.values())]
    count = NUMBER_WORDS.get(len(heads), str(len(heads)))
    intro = (
        f"Every model type of {count} auto mappings of Transformers {ver['transformers']} "
        f"({', '.join(HEAD_NAMES[h] for h in heads)}; {len(recs)} models in all) was built from a tiny config "
        f"(width 32, 2 layers, 2 heads, a vocabulary of {VOCAB}, 32x32 images, a 2-layer audio feature extractor; "
        "a few families need a correction, listed in the benchmark), given one synthetic batch, and stepped by "
        "plain backprop and, twice from the same weights, by the "
        'default flag (`FeedbackEngine(mode="dfa")`, each backward closed by `end_backward(loss)`), with '
        f"PyTorch {ver['torch']} on {paper_cpu(mach)}. **ok** means that each of the default flag's two steps "
        "delivers feedback to the blocks with finite gradients and trains no block by its backprop gradient, and "
        "that in the second (the first loss shows the engine how it reads the outputs) every trainable parameter "
        "backprop trains gets a nonzero gradient (except those the library reports as not trained, such as a token "
        "embedding kept at its initial values). **refused**: the library declined the model with its "
        "own error, which says what it cannot train and why. **input problem**: plain backprop itself fails on the "
        "synthetic batch, so the model says nothing about the library. **skipped**: no config small enough "
        "could be built. Produced by [`benchmarks/hf_sweep.py`](../benchmarks/hf_sweep.py) "
        "(`python -m benchmarks.hf_sweep`; the JSON also holds each model's size, feedback points, share of "
        "parameters trained by their true gradient and step time against backprop)."
    )
    lines = ["## Every architecture in the installed Transformers", "", *textwrap.wrap(intro, 115), ""]
    lines += [
        "| head | models | ok | input problem | skipped | failures |",
        "|---|---|---|---|---|---|",
    ]

    def fails(c: Counter) -> str:
        parts = [f"{c[s]} {s}" for s in FAILURES if c[s]]
        return ", ".join(parts) if parts else "0"

    for head, c in by_head.items():
        if sum(c.values()):
            row = [HEAD_NAMES[head], sum(c.values()), c["ok"], c["input problem"], c["skipped"], fails(c)]
            lines.append("| " + " | ".join(str(x) for x in row) + " |")
    row = ["**all**", len(recs), total["ok"], total["input problem"], total["skipped"], fails(total)]
    lines.append("| " + " | ".join(f"**{x}**" if i else str(x) for i, x in enumerate(row)) + " |")
    if skip_kinds:
        kinds = "; ".join(f"{k}: {n}" for k, n in skip_kinds.most_common())
        lines += ["", *textwrap.wrap(f"Skipped ({sum(skip_kinds.values())}): {kinds}.", 115)]
    order = {s: i for i, s in enumerate((*FAILURES, "input problem", "skipped"))}
    rest = sorted((r for r in recs if r["status"] != "ok"), key=lambda r: (order.get(r["status"], 99), r["id"]))
    if rest:
        lines += ["", "Not ok:", ""]
        for r in rest:
            lines.append(f"- `{r['id']}` (`{r['class']}`): **{r['status']}**: {_md(r['reason'], 150)}")
    return "\n".join(lines) + "\n"


def _md(text: str, n: int) -> str:
    text = _one_line(text, n).replace("|", "\\|")
    return re.sub(r"([*_])", r"\\\1", text)


def write_doc(results: Path = RESULTS, path: Path = DOC) -> None:
    """Replace the census section of ``path`` (between its markers) with the one rendered from ``results``."""
    replace_section(path, "census", render(json.loads(results.read_text())))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.hf_sweep",
        description="Every architecture of the installed Transformers' auto mappings, tiny and seeded, through the "
        "default flag (FeedbackEngine(mode='dfa')): does every block get feedback and every parameter a gradient?",
        epilog="examples:\n  python -m benchmarks.hf_sweep\n  python -m benchmarks.hf_sweep --heads causal,img\n"
        "  python -m benchmarks.hf_sweep --only causal:gpt2,img:vit --out some_models.json\n"
        "  python -m benchmarks.hf_sweep --render",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--heads", default="all", help=f"comma-separated, or 'all': {', '.join(HEADS)}")
    parser.add_argument("--only", default=None, help="comma-separated model ids head:model_type (e.g. causal:gpt2)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per model (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON file of the records (default: %(default)s)")
    parser.add_argument("--render", action="store_true", help="only rewrite the census section of the docs")
    parser.add_argument("--log", type=Path, default=None, help="file for the models' own output (default: none)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker()
        return
    if args.render:
        write_doc(args.out)
        print(f"updated the census section of {DOC}")
        return
    heads = list(HEADS) if args.heads == "all" else args.heads.split(",")
    unknown = [h for h in heads if h not in HEADS]
    if unknown:
        parser.error(f"unknown heads {unknown}; choose from {list(HEADS)}")
    tasks = all_tasks(heads)
    if args.only:
        wanted = args.only.split(",")
        missing = sorted(set(wanted) - {t["id"] for t in tasks})
        if missing:
            parser.error(f"not in the mappings of --heads: {missing}")
        tasks = [t for t in tasks if t["id"] in wanted]
    import torch

    from benchmarks.speed.machine import machine as describe

    torch.set_num_threads(1)
    machine = describe(torch.device("cpu"))
    t0 = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.log or os.devnull, "w") as log:
        records = sweep(tasks, args.timeout, log)
    machine["wall_s"] = round(time.perf_counter() - t0, 1)
    data = {"machine": machine, "versions": versions(), "records": records}
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    counts = Counter(r["status"] for r in records)
    print(f"wrote {args.out} ({len(records)} models in {machine['wall_s']} s: {dict(counts.most_common())})")
    if not args.only and args.heads == "all" and args.out == RESULTS:
        write_doc(args.out)
        print(f"updated the census section of {DOC}")


if __name__ == "__main__":
    main()
