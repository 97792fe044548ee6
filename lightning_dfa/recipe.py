"""The default recipe ("auto"): which of DFA's options a model gets from its structure, and why (one line per
choice for the fit-start summary). ``recipe="paper"`` is the plain DFA of Launay et al. (2020)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .blocks import Target
from .config import RECIPE_OPTIONS
from .norms import _may_normalise
from .projectors.bank import uses_sketch
from .roles import params_after_blocks, predicts_vocabulary


def chooses_cut(engine: Any, root: nn.Module, target: Target) -> bool:
    """``cut_head_input`` in force for ``target``: as set, or (recipe "auto") where the output module widens or
    predicts over a token vocabulary (a language model's head, whatever the vocabulary's size) and only norms lie
    between the last block and it (GPT-2's ``ln_f``; not BERT's dense head transform, where the cut was measured to
    cost learning). Under a small vocabulary the cut was measured to help encoder-decoders (BART, T5) and a
    state-space model (Mamba), and to leave decoder-only Transformers about as they were."""
    cut = engine.config.chosen("cut_head_input")
    if cut is not None:
        return bool(cut)
    return (
        engine.mode == "dfa"
        and engine.config.error_at == "output"
        and not target.head_input_point
        and (widens(target.output) or predicts_vocabulary(root, target))
        and only_norms_before(root, target)
    )


def recipe_notes(engine: Any) -> list[str]:
    """One line per choice of the recipe in force (what was chosen and why), for the fit-start summary.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> from lightning_dfa import FeedbackEngine
        >>> engine = FeedbackEngine(recipe="paper")
        >>> _ = engine.attach(net)
        >>> recipe_notes(engine)[0]
        "recipe 'paper': plain DFA (Launay et al. 2020); options set: none"
    """
    cfg = engine.config
    set_ = [n for n in RECIPE_OPTIONS if getattr(cfg, n) is not None]
    if cfg.recipe == "paper":
        lines = [f"recipe 'paper': plain DFA (Launay et al. 2020); options set: {', '.join(set_) or 'none'}"]
    else:
        lines = [
            f"recipe 'auto': chosen from the model's structure (recipe='paper' for plain DFA); set: "
            f"{', '.join(set_) or 'none'}"
        ]
    if engine.mode != "dfa":
        return lines + [f"mode {engine.mode!r}: no feedback is delivered"]
    norm = engine.norm_feedback
    if norm == "layernorm" and cfg.chosen("norm_jacobian") is None:
        lines.append(
            f"norm-aware feedback: a parameter-free LayerNorm Jacobian at every point ({engine.unnormalised}'s blocks "
            "keep no normalisation here; fed raw, the feedback lets its activations grow until they overflow)"
        )
    elif norm == "layernorm":
        lines.append("norm-aware feedback: a parameter-free LayerNorm Jacobian at every point (norm_jacobian=True)")
    elif norm == "off":
        lines.append("norm-aware feedback: off")
    elif engine._consumers:
        kinds = {"layer": "LayerNorm", "rms": "RMSNorm"}
        found = sorted({kinds[s.kind] for s in engine._consumers.values()})
        residual = len(engine._residual_consumers)
        through = f", {residual} of them through a residual add (post-norm)" if residual else ""
        lines.append(
            f"norm-aware feedback: {len(engine._consumers)} points feed a norm ({', '.join(found)}){through}: their "
            "feedback passes through that norm's parameter-free Jacobian; the others get B e as it is"
        )
    else:
        lines.append(
            "norm-aware feedback: at points whose consumer is a LayerNorm/RMSNorm"
            + (" (none here)" if engine._consumers_complete else " (found in the first training forward)")
        )
    if engine.norm_points:
        found = f" ({len(engine._point_norms) or 'none'} found)" if engine._consumers_complete else ""
        lines.append(f"norm_points: on: norms inside blocks that read a point are points too{found}")
    if engine.cut_token_embedding:
        parts = [f"{n} ({'tied: learns from the output only' if tied else 'kept at its initial values'})"
                 for n, _, tied in engine._token_embeddings]  # fmt: skip
        if parts:
            what = "the token embedding gets no feedback: " + ", ".join(parts)
        elif engine._faint:
            what = (
                f"not applied: {'; '.join(engine._faint)}: cut, it would learn from the output only and the blocks "
                "could hardly tell the tokens apart (measured to cost learning)"
            )
        elif engine._tied_kept:
            what = (
                f"not applied: the token embedding ({', '.join(engine._tied_kept)}) is tied to the output, which a "
                "head transform separates from the blocks (the cut was measured to cost learning there)"
            )
        else:
            what = "nothing to cut (no embedding over the output's vocabulary, nor a classifier's token table, found)"
        lines.append(f"cut_token_embedding: on: {what}")
        if engine._first_block_tables:
            lines.append(
                f"tables_from_first_block: on: {', '.join(engine._first_block_tables)} (beside a token table tied "
                "to the output, which grows as the output learns) learn from what the first block's backward sends "
                "to its input (that input is not cut)"
            )
    if engine._encoder_names:
        if engine.encoder_from_decoder:
            lines.append(
                "encoder_from_decoder: on: the encoder's points receive what the decoder's blocks send back to the "
                "encoder's output (through their cross-attention) as their error"
            )
        else:
            lines.append("encoder_from_decoder: off: the encoder's points get the output error's mean over positions")
    if engine.pooled_channels and engine._flatten:
        pooled = [name for name, found in engine._pooled_maps.items() if found]
        if pooled:
            what = (
                f"{', '.join(pooled)} reads the last feature map through a global average, so the convolutional "
                "points get B e per channel, the same at every position (as the pooling's gradient is)"
            )
        elif engine._pooled_maps:
            what = "no output reads a feature map through a global average: a vector per position, as by the paper"
        else:
            what = "a feature map read through a global average gets B e per channel (checked in the first forward)"
        lines.append(f"pooled_channels: on: {what}")
    if engine.positionwise_maps and engine._flatten:
        if engine._map_errors:
            what = (
                f"the error of {', '.join(sorted(engine._map_errors))} is a map (per-position outputs), so it feeds "
                "the feature maps position by position, resampled to their resolution"
            )
        elif engine._pooled_maps:
            what = "no output's error is a map: each is projected as a whole, as by the paper"
        else:
            what = "an error that is itself a map (a segmentation's logits) feeds the feature maps position by position"
        lines.append(f"positionwise_maps: on: {what}")
    if engine.spread_read_token and engine._read_outputs:
        lines.append(
            f"spread_read_token: on: the loss reads {', '.join(sorted(engine._read_outputs))} at one position per "
            "item (the token a classifier reads), so every point but the last gets that position's feedback at all "
            "its positions"
        )
    if engine._cut:
        if cfg.cut_head_input:
            why = "as set"
        elif engine.target is not None and widens(engine.target.output):
            why = "the output module widens (more outputs than inputs)"
        else:
            why = "the output predicts over the token vocabulary: a language model's head"
        lines.append(f"cut_head_input: on ({why}): its input gradient is never computed; its input is the last point")
    elif engine.target is not None and not engine.target.head_input_point and cfg.error_at == "output":
        if cfg.cut_head_input is not None:
            why = "as set"
        elif not widens(engine.target.output) and not predicts_vocabulary(engine.root, engine.target):
            why = "the output module neither widens nor predicts over a token vocabulary"
        else:  # BERT's head transform: measured to cost learning with the cut
            why = "layers other than norms lie between the last block and the output module"
        lines.append(f"cut_head_input: off ({why})")
    widths = list(engine.bank.widths.values())
    wide = any(uses_sketch(k, d) for k, d in widths)
    if cfg.projector is not None:
        lines.append(f"projector: {cfg.projector!r} (as set)")
    elif engine.sketch:
        lines.append(
            "sketch: structured projection for errors wider than 4x the point"
            + ("" if not widths else (" (in use)" if wide else " (not needed: the error is narrow)"))
        )
    else:
        lines.append("sketch: off" + (" (topk is set)" if cfg.topk is not None and cfg.sketch is None else ""))
    return lines


def widens(output: nn.Module) -> bool:
    """Whether an output module maps to more features than it reads (a Linear head over a vocabulary)."""
    weight = getattr(output, "weight", None)
    if isinstance(output, nn.Linear):
        return output.out_features > output.in_features
    return isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] > weight.shape[1]


def only_norms_before(root: nn.Module, target: Target) -> bool:
    """Whether every trainable module registered after the last block, other than the outputs, is a norm."""
    after = params_after_blocks(root, target)
    outputs = {id(p) for _, m in target.outputs for p in m.parameters()}
    for module in root.modules():
        own = [p for p in module.parameters(recurse=False) if id(p) in after and id(p) not in outputs]
        if own and not _may_normalise(module):
            return False
    return True


def last_top_level_block(root: nn.Module, target: Target) -> str | None:
    """Name of the top-level block registered last in ``root`` (the one whose output feeds the tail), found by
    identity (a wrapped model's modules have other names)."""
    position = {id(m): i for i, m in enumerate(root.modules())}
    tops = [b for b in target.blocks if b.top_level]
    return max(tops, key=lambda b: position.get(id(b.exit), -1)).name if tops else None
