"""Options of DFA and their validation: :class:`DFAConfig`, shared by the engine, the strategies and the callback."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from .blocks import BlockSpec
from .learned import RULES as LEARNING_RULES
from .projectors import Projector
from .projectors.bank import DISTRIBUTIONS
from .projectors.base import class_name

MODES = ("dfa", "shallow", "bp")
RECIPES = ("auto", "paper")
#: the options that the recipe decides when they are left at ``None``
RECIPE_OPTIONS = (
    "norm_jacobian",
    "cut_head_input",
    "norm_points",
    "cut_token_embedding",
    "tables_from_first_block",
    "encoder_from_decoder",
    "pooled_channels",
    "positionwise_maps",
    "spread_read_token",
    "sketch",
)

#: options saved with the feedback whose new value on resume gives way to the checkpoint's (with a warning): they
#: set the feedback's values, which the checkpoint holds
RESUME_KEEPS = ("seed", "distribution", "scale", "distinct", "norm_jacobian", "sketch", "topk")
#: options saved with the feedback whose new value on resume is refused: they decide how training runs or which
#: tensors receive feedback and where the error is read
RESUME_REFUSES = (
    "mode",
    "placement",
    "error_at",
    "recipe",
    "cut_head_input",
    "norm_points",
    "cut_token_embedding",
    "tables_from_first_block",
    "encoder_from_decoder",
    "pooled_channels",
    "positionwise_maps",
    "spread_read_token",
)
_SAVED_OPTIONS = RESUME_REFUSES + RESUME_KEEPS
#: options where ``None`` means "chosen from the model": on resume, ``None`` takes the saved choice
_AUTO_OPTIONS = RECIPE_OPTIONS
_DECIDES = {
    "mode": "how the blocks are trained (feedback, nothing, or backprop)",
    "placement": "which modules are feedback points",
    "error_at": "where the error is read (so the feedback matrices' width)",
    "recipe": "the choices left to the recipe (which tensors are feedback points, how feedback is shaped)",
    "cut_head_input": "whether the output module's input is a feedback point",
    "norm_points": "whether the outputs of norms that read a point are feedback points",
    "cut_token_embedding": "whether the token embedding receives feedback",
    "tables_from_first_block": "whether the tables beside a tied token table learn from the first block's backward",
    "encoder_from_decoder": "where an encoder-decoder's encoder reads its error",
    "pooled_channels": "whether a pooled feature map's feedback is one vector per channel (the matrices' width)",
    "positionwise_maps": "whether a feature map's feedback from an error map is projected position by position",
    "spread_read_token": "whether the error of an item read at one position feeds the earlier points at every position",
}


def normalize_mode(mode: str) -> str:
    """Lower-case ``mode`` and refuse anything but ``"dfa"``, ``"shallow"`` and ``"bp"`` (no silent fallback)."""
    if not isinstance(mode, str) or mode.strip().lower() not in MODES:
        raise ValueError(f"DFA: unknown mode {mode!r}; choose one of {MODES}.")
    return mode.strip().lower()


@dataclass
class DFAConfig:
    """Options shared by :class:`FeedbackEngine`, ``DFAStrategy`` and the ``DFA`` callback.

    Every option is checked here, where it is constructed: a value of the wrong type or out of range (``scale=0``,
    ``distinct="false"``, ``blocks=5``) is a ``ValueError`` naming the option and the values it accepts.

    Attributes:
        mode: ``"dfa"`` (default), ``"shallow"`` (blocks and everything before them get no gradient) or
            ``"bp"`` (plain backprop: the control arm).
        blocks: names, glob patterns or module classes of the blocks; ``None`` discovers them.
        output: qualified name of the output module, or a list of them (several heads or losses: each output's
            error is projected by its own fixed matrices and every point receives the sum); ``None`` discovers it.
        seed: seed of the private generator of the feedback matrices.
        distribution: ``"uniform"`` on ``[-1, 1)`` (default, as the DFA authors), ``"gaussian"`` or ``"rademacher"``.
        scale: multiplier of the feedback; a point of width ``d`` receives ``scale / sqrt(d) * (e @ B[:, :d])``.
        distinct: give every point its own signal at no extra projection cost (fixed random sign flips of the
            shared projection) instead of the same signal for points of equal width.
        placement: ``"macro"`` (one point per block) or ``"micro"`` (also inside Transformer blocks).
        error_at: ``"output"`` (default: the error is read at the output module's output, e.g. the logits: pure
            DFA) or ``"head_input"`` (read at the output module's input, i.e. backpropagated through the head
            only, the DFA paper's language-model setting: the projected error is then ``d``-dimensional).
        recipe: ``"auto"`` (default: the best DFA measured, chosen from the model's structure) or ``"paper"``
            (the plain DFA of Launay et al. 2020: every option below off unless set). ``"auto"`` decides each of
            ``norm_jacobian``, ``cut_head_input``, ``norm_points``, ``cut_token_embedding``,
            ``tables_from_first_block``, ``encoder_from_decoder``, ``pooled_channels``, ``positionwise_maps``,
            ``spread_read_token`` and ``sketch`` that is left at
            ``None``; the fit-start summary and :meth:`FeedbackEngine.recipe_notes` say what was chosen and why.
        norm_jacobian: norm-aware feedback. ``None`` (default, recipe ``"auto"``): at each point whose consumer is a
            LayerNorm or RMSNorm (a pre-LN Transformer's block outputs), the feedback passes through the Jacobian of
            that normalisation, parameter-free, at the point's own activation ``h`` (LayerNorm:
            ``(v - mean(v) - n * mean(n * v)) / std(h)`` with ``n`` the normalised ``h``; RMSNorm: no mean
            subtraction). A local operation (no weight transport) that removes what the following norm ignores;
            it is what makes DFA learn on pre-LN Transformers (``docs/results_language_model.md``). ``True``: a
            parameter-free LayerNorm Jacobian at every point (over the last dimension; over all but the batch
            dimension for flattened points). ``False``: off.
        cut_head_input: make the output module's input the last feedback point (the output module gets it
            detached), so the output module's input gradient (for a language model, the vocabulary-sized GEMM
            ``e @ W_head``) is never computed: the shared projection replaces that work instead of adding to it.
            The last block's output is then not cut: whatever lies between the last block and the output module
            (GPT-2's final ``ln_f``) joins the last block's feedback region. Only with ``error_at="output"``.
            ``None`` (recipe ``"auto"``): on in ``mode="dfa"`` when the output module widens (a Linear with more
            outputs than inputs, such as a language model's head) and only norms lie between the last block and it.
            See ``docs/performance.md``.
        norm_points: the output of a norm that reads a feedback point inside a block (a pre-LN block's first norm:
            GPT-2's ``ln_1``, Llama's ``input_layernorm``) is a feedback point too, so what reads it (the
            attention's QKV projection) never computes its input gradient, and the norm's own parameters learn from
            that point's feedback. ``None`` (recipe ``"auto"``): on in ``mode="dfa"``.
        cut_token_embedding: the token embedding (a lookup table over the vocabulary that the output predicts:
            GPT-2's ``wte``, Llama's ``embed_tokens``, BERT's word embeddings; and a Hugging Face classifier's token
            table, its input embeddings where it has no vocabulary head) and the lookup tables registered beside it
            (learned positions, token types) receive no feedback. Untied from the head, they keep their
            initial values, a fixed random code of each token and position (their parameters are
            ``requires_grad=False`` while attached, so DDP leaves them out); a table tied to the head learns from the
            output's true gradient only, like every other weight of the output module. Trained by ``B e``, a lookup
            table drifts towards a code of what follows each token and loses the token's identity: on the demo
            language model the cut takes DFA from 3.31 to 2.67 bits/char at 1000 steps
            (``docs/results_language_model.md``). A classifier's table drifts towards a code of the labels instead:
            BERT's token classifier, which labels each token from its neighbours, closes 85 % / 83 % of the shallow
            -> backprop gap with the cut and 38 % / 34 % without (``docs/architectures.md``). ``None`` (recipe
            ``"auto"``): on in ``mode="dfa"``.
        tables_from_first_block: with ``cut_token_embedding`` and the token table tied to the head (GPT-2's, OPT's
            default), the lookup tables beside it (learned positions, token types) learn from what the first
            block's backward sends to its input from the block's own feedback: the input of the block that reads
            them (GPT-2's ``wte(ids) + wpe(positions)``, or a norm over that sum) is not cut, while the skip paths
            around that block are. Kept at their initial values, the tables are outgrown by the tied token table,
            which grows as the head learns, and the blocks lose the positions (tiny GPT-2 with its tied head: 92 %
            of the shallow -> backprop gap closed with the option, 75 % without). Untied, the token table keeps its
            initial scale and the tables beside it stay fixed. On GPT-2 it adds no matrix product: the first
            block's ``ln_1`` reads no point either way, so its attention computes its input gradient anyway.
            ``None`` (recipe ``"auto"``): on in ``mode="dfa"``.
        encoder_from_decoder: in an encoder-decoder (both hold blocks: T5, BART, ``nn.Transformer``), the encoder's
            error is what the decoder's blocks send back to the encoder's output through their own layers that read
            it (their cross-attention's key and value projections, from their own feedback): every encoder point of
            the output's shape receives it as it is, with no backprop through the encoder's blocks. ``False``: the
            encoder's points get the output error's mean over the output's positions (an encoder's positions are
            not the decoder's), which pushes every position the same way and was measured to learn less than
            leaving the encoder untrained (tiny BART, sequence reversal: 0.51 nats with it, 1.62 with the mean).
            ``None`` (recipe ``"auto"``): on in ``mode="dfa"``.
        pooled_channels: where the output reads the last convolutional feature map through a global average (or
            sum) over its positions (ResNet's, ConvNeXt's or a CNN's ``AdaptiveAvgPool2d(1)``, ``x.mean((-2, -1))``,
            ``F.avg_pool2d`` over the whole map), every convolutional point fed by a per-item error gets ``B e`` per
            channel, the same at each position, as the pooling's own gradient is: ``[batch, channels, height,
            width]`` points take a ``channels``-wide projection, broadcast over the positions. A position-specific
            random pattern, which the paper's rule gives, is one that position-shared convolution weights follow
            poorly under a pooled readout (tiny Hugging Face models on an image XOR, share of the shallow ->
            backprop gap closed, seeds 0 / 1: ConvNeXt 16 % / 7 % with it, -1 % / 1 % with the paper's rule; RegNet
            98 % / 100 % against 95 % / 86 %; ResNet on a par, 68 % against 66 % over six seeds). A CNN read through
            ``Flatten`` keeps a vector per position. ``None`` (recipe ``"auto"``): on in ``mode="dfa"``.
        positionwise_maps: where the error is itself a map (``[batch, classes, height, width]``: a segmentation
            network's per-pixel logits; ``[batch, height, width]``, a depth map, as one channel), every convolutional
            point ``[batch, channels, height', width']`` gets it projected position by position (``B e`` at each
            position, one ``channels x classes`` matrix), resampled to the point's positions by area averaging where
            they differ (the coarse maps of a U-Net's encoder), instead of one matrix from the whole error map to the
            whole feature map, whose size grows with the square of the image's (335 MB at 32x32 pixels for 16 channels
            and 5 classes, 86 GB at 128x128) and whose feedback made the networks of ``benchmarks/segmentation.py``
            diverge or learn less than the shallow baseline, where the default closes 50-89 % of the shallow -> backprop
            gap. ``None`` (recipe ``"auto"``): on in ``mode="dfa"``.
        spread_read_token: where the loss reads the output at one position per item, by picking it (``x[:, -1]``;
            ``logits[torch.arange(batch), last]``, as a Hugging Face decoder's sequence classifier reads its last
            token that is not padding; a gather along the positions), every point but the last gets that position's
            feedback at all of its positions; the last point (the last block's output, whose true gradient lies at
            the read position too) keeps it there. The pick is found in the first loss passed to
            ``end_backward(loss)`` (the Lightning adapters pass it) and kept in checkpoints; inside a graph
            ``torch.compile`` made, whose backward shows no pick, from where the first error is nonzero (one
            position of each item; a compiled masked LM with exactly one masked token per item looks the same and
            gets the spread too). By the paper's rule the blocks get feedback at the read position only (tiny
            Hugging Face classifiers on the order of two marks, mean held-out loss over six seeds: Llama 0.001 nats
            with it, 0.179 without; GPT-2 0.065 against 0.160). An error at chosen positions through ignored labels
            (a token classifier's, a masked LM's) is not spread. ``None`` (recipe ``"auto"``): on in ``mode="dfa"``.
        topk: ``None`` (default: dense projection ``e @ B``) or ``k`` (the shortcut of
            ``projector=projectors.TopK(k)``): project only the ``k`` largest-magnitude
            entries of each row (token) of the error, a gather of ``k`` rows of ``B`` per token instead of a GEMM
            over the whole output width. For softmax + cross-entropy ``e = softmax - onehot`` is dominated by the
            target entry and a few likely tokens, and a random projection of the dropped diffuse remainder is
            small. Used only where the error is wider than ``k``; costs ``k / width`` of the dense projection.
        sketch: a structured random feedback matrix for wide errors (the shortcut of
            ``projector=projectors.Sketch()``), exact (not an
            approximation of some dense ``B``: it *is* the feedback): output index ``v = i * g + j`` gets the row
            ``sum_c A[c, i] G_c[j] / 2`` (``c < 4``), so the projection is ONE pass over the error (four signed
            sums over the outputs of each residue class ``j``) and a small GEMM (``[4 g, d]``,
            ``g = max(sqrt(k), d / 4)``): for a 50257-word vocabulary about 1/30 of the dense GEMM's multiply-adds.
            Its entries are an integer hash of (seed, position) computed on the fly, so it holds no memory between
            steps (see :meth:`FeedbackBank.sketch`). Used where the error is wider than ``4 d`` (elsewhere the
            dense projection is as cheap). Cannot be combined with ``topk``. ``None`` (recipe ``"auto"``): on unless
            ``topk`` is set.
        projector: what computes the raw feedback ``B e`` from the error: a
            :class:`~lightning_dfa.projectors.Projector` (``Dense``, ``Sketch``, ``TopK``, the simulated
            ``Optical`` co-processor, the ``Ternarized``/``Quantized``/``Noisy`` wrappers of any of them, or your
            own subclass), copied by each engine and saved with the feedback. ``None`` (default): the one that
            ``sketch`` and ``topk`` stand for (``Sketch()``, ``TopK(k)``, else ``Dense()``). Cannot be combined
            with ``sketch=True`` or ``topk``. See ``docs/projectors.md``.
        feedback_transform: ``None`` or a callable ``(point_key, feedback) -> feedback`` (same shape) applied to
            every point's feedback before ``norm_jacobian``: a fixed, parameter-free operator that the model knows
            lies between the point and the output, e.g. a graph's normalised adjacency for graph convolutions
            (``A^T B e``: the error of the labelled nodes reaches their neighbours, as backprop's aggregation would
            carry it, without transporting any learned weight). Usually returned by the LightningModule's
            ``configure_dfa()``, since it needs the batch's graph; see ``examples/graphs.py``.
        feedback_learning: ``None`` (default: fixed feedback matrices) or ``"kolen_pollack"``: every point gets its
            own feedback matrix, drawn as the fixed one, that learns from the point's activation and the error it
            receives (direct Kolen-Pollack with decay; no weight transport): see :mod:`lightning_dfa.learned`.
        feedback_decay: the decay of ``feedback_learning`` (``0 < decay < 1``): the learned matrices average the
            update's direction over about ``1 / decay`` steps.
    """

    mode: str = "dfa"
    blocks: BlockSpec = None
    output: str | Sequence[str] | None = None
    seed: int = 0
    distribution: str = "uniform"
    scale: float = 1.0
    distinct: bool = False
    placement: str = "macro"
    error_at: str = "output"
    recipe: str = "auto"
    norm_jacobian: bool | None = None
    cut_head_input: bool | None = None
    norm_points: bool | None = None
    cut_token_embedding: bool | None = None
    tables_from_first_block: bool | None = None
    encoder_from_decoder: bool | None = None
    pooled_channels: bool | None = None
    positionwise_maps: bool | None = None
    spread_read_token: bool | None = None
    topk: int | None = None
    sketch: bool | None = None
    projector: Projector | None = None
    feedback_transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None
    feedback_learning: str | None = None
    feedback_decay: float = 0.01

    def merged_with(self, options: dict[str, Any], origin: str = "options") -> DFAConfig:
        """A copy where ``options`` fill the fields still at their default (explicit settings win).

        Example:
            >>> config = DFAConfig(seed=1).merged_with({"seed": 5, "distinct": True})
            >>> config.seed, config.distinct
            (1, True)
        """
        if not isinstance(options, dict):
            raise TypeError(f"DFA: {origin} must return a dict of options such as {{'blocks': [...]}}.")
        names = {f.name: f.default for f in fields(self)}
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise TypeError(f"DFA: {origin} returned unknown options {unknown}; valid options: {sorted(names)}.")
        values = {k: getattr(self, k) for k in names}
        for key, value in options.items():
            if values[key] == names[key]:
                values[key] = value
        try:
            return DFAConfig(**values)
        except ValueError as err:
            raise ValueError(f"{str(err).rstrip('.')} (from {origin}).") from None

    def chosen(self, name: str) -> bool | None:
        """The value of an option of :data:`RECIPE_OPTIONS`: the one set, else the recipe's
        (``False`` for ``"paper"``; ``None`` for ``"auto"``, which decides from the model).

        Example:
            >>> [DFAConfig(recipe="paper").chosen("sketch"), DFAConfig().chosen("sketch")]
            [False, None]
            >>> DFAConfig(recipe="paper", sketch=True).chosen("sketch")
            True
        """
        value = getattr(self, name)
        if value is not None:
            return value
        return False if self.recipe == "paper" else None

    @property
    def output_names(self) -> tuple[str, ...]:
        """The outputs named in ``output=`` (``()`` where discovery finds them).

        Example:
            >>> DFAConfig(output="head").output_names, DFAConfig().output_names
            (('head',), ())
        """
        return (self.output,) if isinstance(self.output, str) else tuple(self.output or ())

    def __post_init__(self) -> None:
        self.mode = normalize_mode(self.mode)
        self.blocks = _checked_blocks(self.blocks)
        names = [self.output] if isinstance(self.output, str) else self.output
        if self.output is not None and (
            not isinstance(names, (list, tuple))
            or not names
            or not all(isinstance(n, str) and n.strip() for n in names)
        ):
            raise ValueError(
                f"DFA: output must be None (discovered), the qualified name of a module (a non-empty str such as "
                f"'head') or a list of them (several heads), got {_shown(self.output)}."
            )
        if isinstance(self.output, tuple):
            self.output = list(self.output)
        self.seed = _checked_int("seed", self.seed, "an integer such as 0")
        if not isinstance(self.distribution, str) or self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"DFA: unknown distribution {self.distribution!r}; choose one of {DISTRIBUTIONS}.")
        self.scale = _checked_scale(self.scale)
        _check_flag("distinct", self.distinct, optional=False)
        if not isinstance(self.placement, str) or self.placement not in ("macro", "micro"):
            raise ValueError(f"DFA: placement must be 'macro' or 'micro', got {self.placement!r}.")
        if not isinstance(self.error_at, str) or self.error_at not in ("output", "head_input"):
            raise ValueError(f"DFA: error_at must be 'output' or 'head_input', got {self.error_at!r}.")
        if not isinstance(self.recipe, str) or self.recipe not in RECIPES:
            raise ValueError(f"DFA: recipe must be one of {RECIPES}, got {_shown(self.recipe)}.")
        for name in RECIPE_OPTIONS:
            _check_flag(name, getattr(self, name), optional=True)
        if self.cut_head_input and self.error_at != "output":
            raise ValueError("DFA: cut_head_input needs error_at='output' (error_at='head_input' reads it there).")
        if self.topk is not None:
            self.topk = _checked_int("topk", self.topk, "None or a positive integer such as 64")
            if self.topk < 1:
                raise ValueError(f"DFA: topk must be None or a positive integer such as 64, got {self.topk!r}.")
        if self.sketch and self.topk is not None:
            raise ValueError("DFA: choose one cheaper projection: sketch=True or topk=k, not both.")
        if self.projector is not None:
            if not isinstance(self.projector, Projector):
                raise TypeError(
                    "DFA: projector must be None or a lightning_dfa.projectors.Projector (such as "
                    f"lightning_dfa.projectors.Dense()), got {_shown(self.projector)}."
                )
            if self.sketch or self.topk is not None:
                raise ValueError(
                    f"DFA: projector={self.projector!r} decides the projection: leave sketch and topk unset "
                    "(use projectors.Sketch() or projectors.TopK(k) instead)."
                )
        if self.feedback_learning is not None and self.feedback_learning not in LEARNING_RULES:
            raise ValueError(
                f"DFA: feedback_learning must be None or one of {LEARNING_RULES}, got {_shown(self.feedback_learning)}."
            )
        decay = self.feedback_decay
        if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not 0 < float(decay) < 1:
            raise ValueError(f"DFA: feedback_decay must be a number between 0 and 1 such as 0.01, got {_shown(decay)}.")
        self.feedback_decay = float(decay)
        if self.feedback_transform is not None and not callable(self.feedback_transform):
            raise TypeError(f"DFA: feedback_transform must be callable, got {type(self.feedback_transform).__name__}.")


def _shown(value: Any) -> str:
    """``repr`` of a bad option value with its type, for error messages."""
    return f"{value!r} ({type(value).__name__})"


def _check_flag(name: str, value: Any, optional: bool) -> None:
    """Refuse anything but ``True``/``False`` (and ``None`` for ``optional`` flags): the string ``"false"`` is true."""
    if isinstance(value, bool) or (optional and value is None):
        return
    allowed = "True, False or None (None: the recipe's choice)" if optional else "True or False"
    hint = " (a string is not a bool: 'false' would switch it on)" if isinstance(value, str) else ""
    raise ValueError(f"DFA: {name} must be {allowed}, got {_shown(value)}{hint}.")


def _checked_int(name: str, value: Any, allowed: str) -> int:
    """``value`` as an ``int`` if it is a whole number (numpy integers, ``4.0``), never a bool or a str."""
    whole_float = isinstance(value, float) and value.is_integer()
    if isinstance(value, bool) or not (isinstance(value, numbers.Integral) or whole_float):
        raise ValueError(f"DFA: {name} must be {allowed}, got {_shown(value)}.")
    return int(value)


def _checked_scale(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"DFA: scale must be a finite, non-zero number such as 1.0, got {_shown(value)}.")
    scale = float(value)
    if not math.isfinite(scale):
        raise ValueError(f"DFA: scale must be a finite, non-zero number such as 1.0, got {scale!r}.")
    if scale == 0:
        raise ValueError(
            "DFA: scale=0 gives the blocks no feedback, so they would never learn; use a non-zero scale such as 1.0, "
            "or mode='shallow' to train only the layers after the blocks."
        )
    return scale


_BLOCKS_ALLOWED = (
    "None (discovered), a module name or glob pattern (str, e.g. 'encoder.layers.*'), a module class (e.g. "
    "nn.TransformerEncoderLayer), or a list/tuple of them"
)


def _checked_blocks(blocks: Any) -> Any:
    """``blocks`` if it is of a documented type (a list is returned as a list), else a clear error."""
    if blocks is None:
        return None
    items = list(blocks) if isinstance(blocks, (list, tuple)) else [blocks]
    if not items:
        raise ValueError(f"DFA: blocks=[] names no block; pass {_BLOCKS_ALLOWED}.")
    for item in items:
        ok = (isinstance(item, str) and item.strip()) or (isinstance(item, type) and issubclass(item, nn.Module))
        if not ok:
            where = "" if item is blocks else f" in blocks={blocks!r}"
            raise ValueError(f"DFA: blocks must be {_BLOCKS_ALLOWED}; got {_shown(item)}{where}.")
    return list(blocks) if isinstance(blocks, (list, tuple)) else blocks


def reconcile(config: DFAConfig, saved: dict[str, Any]) -> None:
    """Compare a checkpoint's saved options with ``config`` (changed in place): refuse a different
    :data:`RESUME_REFUSES` option, take a different :data:`RESUME_KEEPS` option from the checkpoint and say so.
    ``saved["projector"]`` is the class name of the checkpoint's ``projector=`` object (``None``: the options')."""
    given = class_name(config.projector) if config.projector is not None else None
    if saved.get("projector") != given:
        default = "None (the one the options stand for)"
        raise RuntimeError(
            f"DFA: the checkpoint's feedback was computed by projector {saved.get('projector') or default}, "
            f"but this run gives {given or default}. The projector decides the feedback, so "
            "the saved one cannot continue under another; resume with the same projector= (its state is in the "
            "checkpoint), or start a new fit from the weights alone (Model.load_from_checkpoint(path), then fit "
            "without ckpt_path)."
        )
    for name in RESUME_REFUSES:
        if name not in saved:
            if name in _AUTO_OPTIONS and getattr(config, name) is None and "mode" in saved:
                setattr(config, name, False)  # written before the option existed, when it was off
            continue
        if name in _AUTO_OPTIONS and getattr(config, name) is None:  # "choose for me": the saved choice
            setattr(config, name, saved[name])
        elif saved[name] != getattr(config, name):
            raise RuntimeError(
                f"DFA: the checkpoint's feedback was written with {name}={saved[name]!r}, but this run gives "
                f"{name}={getattr(config, name)!r}. {name} decides {_DECIDES[name]}, so the saved feedback "
                f"cannot continue under another value. Resume with {name}={saved[name]!r}, or start a new fit "
                "from the weights alone (Model.load_from_checkpoint(path), then fit without ckpt_path)."
            )
    kept = []
    for name in RESUME_KEEPS:
        if name not in saved:
            continue
        given = getattr(config, name)
        if name in _AUTO_OPTIONS and given is None:  # "choose for me": the saved choice continues
            setattr(config, name, saved[name])
        elif saved[name] != given:
            kept.append(f"{name}={saved[name]!r} (this run gives {given!r})")
            setattr(config, name, saved[name])
    if kept:
        warnings.warn(
            "DFA: resuming with the checkpoint's feedback options " + ", ".join(kept) + ": the saved feedback "
            "continues unchanged. To train with other values, start a new fit from the weights alone "
            "(Model.load_from_checkpoint(path), then fit without ckpt_path).",
            UserWarning,
            stacklevel=4,
        )
