"""The feedback engine: DFA gradients from ONE ordinary ``loss.backward()``. Knows nothing of Lightning.

How it works (design "b" of ``lightning-notes.md``):

* a forward hook on each block's exit module records the block's output ``h_k`` as a *feedback point* and hands
  the rest of the network ``h_k.detach()``: no gradient can cross from block ``k+1`` into block ``k``, and the
  input gradients between blocks are never computed;
* a top-level block whose main input carries gradient (embeddings before the first block) cuts it the same
  way: that input becomes the point ``"<block>:in"``;
* a forward hook on the output module ties the points of this forward back into the graph through one custom
  autograd Function (:class:`_DeliverFeedback`) that is the identity on the output. Its backward receives the
  true error ``e = dL/d(output)`` (any loss, any reduction, AMP loss scale included), passes it on unchanged to
  the output module, and returns ``B_k e`` for every point, computed from ONE shared projection per error
  width. Autograd then backprops each ``B_k e`` locally inside its block.

Everything after the last block (final norm, pooler, head) receives its true gradient. Under ``no_grad`` /
``inference_mode`` the hooks do nothing, so validation and prediction are bit-identical to the plain model.

* Outputs found from the forward: unless ``output=`` names them, every layer outside the blocks is tied as well
  when it runs after points; the backward keeps as error sources only those the loss reads directly (not through
  another tied layer, and not feeding a later block), so the error is read at the layer the loss is computed from
  however ``forward`` reaches it. Blocks whose parameters are all frozen get no point, and a frozen output defers
  to a trainable one upstream (a frozen discriminator is part of the generator's loss).
* The delivered output is a detached alias of the output (same memory, not a view): user code may modify it in
  place wherever plain PyTorch allows it.
* Layouts: see :mod:`lightning_dfa.layout`; several outputs: see :mod:`lightning_dfa.delivery`.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .blocks import Target
from .checks import (
    check_loss,
    check_state,
    checked_transform,
    explain_silence,
    only_layers_after_frozen_blocks,
    refuse_lazy_modules,
)
from .config import _SAVED_OPTIONS, DFAConfig, reconcile
from .delivery import (
    BackwardReport,
    Capture,
    CapturedPoint,
    _blocks_crossed,
    _deliveries_in,
    _Delivery,
    _Group,
    _nodes_before_outputs,
    _nodes_behind_outputs,
    _nodes_read_directly,
    _outputs_read_at_one_position,
    _outputs_read_before_points,
    _parameters_reached,
    _reaches_feedback,
    _SoftCut,
)
from .discovery import _find_hf_model
from .hooks import ForwardHooks, _loose_layers
from .layout import Layouts, PointMeta, error_rows, is_map, laid_on, laid_out, like_the_tokens
from .learned import LearnedFeedback
from .norms import NormSpec, norm_vjp
from .projectors import Dense, Projector, Sketch, TopK
from .projectors.bank import FeedbackBank
from .projectors.base import class_name, mix, project_rows
from .projectors.random import default_distribution
from .recipe import recipe_notes
from .registry import UNNORMALISED
from .roles import parameter_roles, role_of
from .sharding import _WRAPPED

__all__ = ["BackwardReport", "Capture", "CapturedPoint", "FeedbackEngine", "PointMeta", "check_state"]


#: the alignments whose points get learned feedback matrices (``feedback_learning``); the others keep the fixed one
_LEARNABLE = ("token", "flatten", "channels")


# ---------------------------------------------------------------------------------------------- engine


def _unnormalised_model_type(root: nn.Module) -> str | None:
    """``config.model_type`` of the Hugging Face model in ``root`` if its config says its blocks keep no
    normalisation (:data:`lightning_dfa.registry.UNNORMALISED`), else ``None``."""
    hf = _find_hf_model(root)
    config = getattr(hf[1], "config", None) if hf is not None else None
    rule = UNNORMALISED.get(getattr(config, "model_type", None) or "")
    return config.model_type if rule is not None and getattr(config, rule[0], None) == rule[1] else None


class FeedbackEngine(ForwardHooks):
    """Installs DFA on a model with hooks; ``loss.backward()`` then produces DFA gradients.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
        >>> engine = FeedbackEngine(seed=0)
        >>> target = engine.attach(net)
        >>> [b.name for b in target.blocks], target.output_name
        (['1', '3'], '4')
        >>> nn.functional.cross_entropy(net(torch.randn(8, 4)), torch.randint(0, 3, (8,))).backward()
        >>> engine.report.deliveries
        1
        >>> engine.detach()
    """

    def __init__(self, config: DFAConfig | None = None, **options: Any) -> None:
        self.config = config if config is not None else DFAConfig(**options)
        if config is not None and options:
            raise TypeError("DFA: pass either a DFAConfig or keyword options, not both.")
        self.bank = FeedbackBank(self.config.seed, self.config.distribution)
        self.target: Target | None = None
        self.root: nn.Module | None = None
        self._handles: list[Any] = []
        self._saved_options: dict[str, Any] | None = None  # options of a state loaded before attach()
        self._group: _Group | None = None
        self._flatten: set[str] = set()
        self.layouts = Layouts()  # how points line up with each output's error, learned from the data flow
        # output candidates found from the forward, the outputs seen delivering, and the parameters measured to
        # be trained by their true gradient (after the cuts, before a delivering output)
        self._candidates: list[tuple[str, nn.Module]] = []
        # the graph nodes of the blocks' outputs in the latest training forward (dropped at each end_backward), until
        # the first loss is checked for terms that read one directly (loss_readers)
        self._block_outputs: collections.deque[tuple[str, Any]] | None = None
        # and those of the layers outside blocks and outputs that read a point's cut (a VAE's mean and variance)
        self._cut_readers: collections.deque[tuple[str, Any]] | None = None
        self._cut_memory: set[int] | None = None  # the storage of what they may read (points' cuts)
        self._reader_handles: list[Any] = []
        self._readers_checked = False
        self._sources: dict[str, nn.Module] = {}
        self._true_ids: set[int] | None = None
        self.report = BackwardReport()
        self.last_points: list[PointMeta] = []
        self._capture: Capture | None = None
        self._inert = 0  # inside inert(): the hooks do nothing (evaluation loops)
        self._unnormalised: str | None = None  # see the property
        self._loss_measured = False  # the roles completed from a loss (end_backward)
        self._differentiated_said = False  # a create_graph backward through a delivery was warned about
        #: instruments: called as ``fn(error, points, feedback)`` after each delivery (the error, the points'
        #: :class:`PointMeta` and the feedback each received), e.g. to log or check the signal
        self.feedback_observers: list[Callable[[torch.Tensor, list[PointMeta], list[torch.Tensor]], None]] = []
        #: instruments (the alignment monitor): called as ``fn(key, tensor)`` at each recorded point, with the
        #: point's graph-attached tensor
        self.point_observers: list[Callable[[str, torch.Tensor], None]] = []
        # norm-aware feedback: point name -> the normalisation that consumes it (found in the forward)
        self._consumers: dict[str, NormSpec] = {}
        self._norm_kinds: dict[int, NormSpec | None] = {}  # id(norm module) -> what probing it found
        self._consumers_complete = False
        self._inside_blocks: set[int] = set()  # id() of every module inside a top-level block
        self._point_norms: set[int] = set()  # norm_points: id() of the norms inside blocks that read a point
        self._norm_blocks: dict[int, str] = {}  # id() of a norm inside a top-level block -> that block's name
        self._residual_consumers: set[str] = set()  # points whose consumer reads them through a residual add
        #: while the consumers are searched for: the graph nodes of the norms' outputs in the forwards since the last
        #: backward started (a point that is a norm's output needs no consumer's Jacobian)
        self._norm_outputs: set[Any] = set()
        self._token_embeddings: list[tuple[str, nn.Module, bool]] = []  # cut_token_embedding: (name, module, tied)
        self._first_block_tables: list[str] = []  # tables_from_first_block: the tables beside them left trainable
        self._released: set[int] = set()  # id() of those tables' parameters
        self._encoder_names: set[str] = set()  # modules inside an encoder-decoder's encoder (fed the mean error)
        #: graph node of a block output that another block may read beside its main input, in this step's forward
        #: (a recurrent block's output sequence and final state, a second stream of hidden states) -> what it is
        self._side_outputs: dict[Any, list[Any]] = {}
        #: points that are side outputs read by another block beside its main input -> where the error's items lie
        #: ("first" or "second" dimension, where both could be; :attr:`PointMeta.state`)
        self._state_keys: dict[str, str] = {}
        self._pooled: set[str] = set()  # points the output reads through a pooling over groups of rows
        #: output name -> whether it reads the last feature map through a global average over its positions
        #: (checked once per output): if one does, the convolutional points are fed per channel (``pooled_channels``)
        self._pooled_maps: dict[str, bool] = {}
        #: outputs whose error is itself a map, fed to the feature maps position by position (``positionwise_maps``)
        self._map_errors: set[str] = set()
        #: outputs the loss reads at one position per item (a decoder's sequence classifier), found from the first
        #: loss or taken from a checkpoint: their feedback is spread over the earlier points' positions
        #: (``spread_read_token``)
        self._read_outputs: set[str] = set()
        self._saved_read_outputs: set[str] = set()  # those, from a checkpoint
        #: cut_token_embedding="auto": why the token table is not cut (faint beside fixed positions), once decided
        self._faint: list[str] | None = None
        self._saved_faint: list[str] | None = None  # that decision, from a checkpoint
        self._saved_blocks: list[str] | None = None  # the blocks a loaded checkpoint was trained with
        #: the blocks the latest loss read directly and nothing else read (heads on middle layers; loss_readers)
        self.loss_heads: list[str] = []
        #: the outputs the latest checked loss reads as error sources, where the forward showed them (loss_readers)
        self.loss_outputs: list[str] = []
        #: among the blocks the latest checked loss reads directly, those whose output is a feedback point: the cut
        #: there drops that term (a loss on hidden features; loss_readers)
        self.loss_cut_readers: list[str] = []
        #: the blocks whose other outputs (not their output point) the first loss reads directly: see loss_readers
        self.loss_side_readers: list[str] = []
        #: ``(reader, block)``: the backward of ``reader`` reaches ``block`` through an uncut input (loss_readers)
        self.blocks_crossed: list[tuple[str, str]] = []
        self._heads: list[str] = []  # blocks made outputs (add_outputs), while attached to this model
        self._saved_heads: list[str] | None = None  # those of a loaded checkpoint
        self._tied_kept: list[str] = []  # cut_token_embedding: tables tied to the output behind a head transform
        self._frozen: list[nn.Parameter] = []  # cut_token_embedding: set to requires_grad=False while attached
        self._compiled = False  # the model attached holds compiled modules (their graphs are dropped on detach)
        self._kept: set[int] = set()  # their ids, kept after detach (they were not trained)
        #: ``id`` of the parameters an optimizer updates, where the trainer says (``None``: every parameter that
        #: requires grad); the others, as a BYOL target network updated by a moving average, are not trained
        self.optimized_ids: set[int] | None = None
        self._cut = bool(self.config.chosen("cut_head_input"))
        # the projectors in force, per output ("" the primary one), built from the options at first use
        self._projectors: dict[str, Projector] = {}
        self._projectors_for: tuple | None = None  # what they were built from (rebuilt when it changes)
        self._projector_states: dict[str, dict[str, Any]] = {}  # a loaded checkpoint's, until each is built
        rule = self.config.feedback_learning
        self.learned = None if rule is None else LearnedFeedback(rule, self.config.feedback_decay)

    # ------------------------------------------------------------------ lifecycle
    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    def attached(self) -> bool:
        """Whether the engine's hooks are installed on a model (see :meth:`attach` and :meth:`attached_to`)."""
        return bool(self._handles)

    @contextlib.contextmanager
    def attached_to(self, root: nn.Module, target: Target | None = None) -> Iterator[Target]:
        """:meth:`attach` for the duration of a ``with`` block: the hooks are removed on every exit, including an
        exception or a ``KeyboardInterrupt``, so the model is plain again afterwards.

        Example:
            >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
            >>> engine = FeedbackEngine(seed=0)
            >>> with engine.attached_to(net) as target:
            ...     net(torch.randn(3, 4)).sum().backward()
            >>> target.output_name, engine.report.deliveries, engine.attached
            ('2', 1, False)
        """
        found = self.attach(root, target)
        try:
            yield found
        finally:
            self.detach()

    @property
    def head_input_is_point(self) -> bool:
        """The output module's input is a feedback point: ``cut_head_input``, or a target found by layer inputs."""
        return self._cut or bool(self.target is not None and self.target.head_input_point)

    @property
    def cut_head_input(self) -> bool:
        """``cut_head_input`` in force: as set, or as the recipe chose it for the attached model."""
        return self._cut

    @property
    def sketch(self) -> bool:
        """``sketch`` in force: as set, or the recipe's choice (``"auto"``: on unless ``topk`` or ``projector`` is
        set); with ``projector=``, whether it is a :class:`~lightning_dfa.projectors.Sketch`."""
        if self.config.projector is not None:
            return isinstance(self.config.projector, Sketch)
        chosen = self.config.chosen("sketch")
        return self.config.topk is None if chosen is None else chosen

    @property
    def projector(self) -> Projector:
        """The projector of the primary output's error: a copy of the ``projector`` option, or the one the
        ``sketch`` and ``topk`` options stand for (:class:`~lightning_dfa.projectors.Sketch`,
        :class:`~lightning_dfa.projectors.TopK`, else :class:`~lightning_dfa.projectors.Dense`).

        Example:
            >>> FeedbackEngine().projector, FeedbackEngine(recipe="paper").projector
            (Sketch(min_ratio=4, distribution=None), Dense(distribution=None))
        """
        return self._projector_for("")

    def _projector_for(
        self, source: str, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> Projector:
        """The projector of output ``source``, built and set up at first use (with the error's device and dtype).
        Projectors built from the options share the engine's :class:`FeedbackBank` (saved as it always was); a
        ``projector=`` object is copied, so one object can configure several runs."""
        cfg = self.config
        basis = (id(cfg.projector),) if cfg.projector is not None else (self.sketch, cfg.topk, id(self.bank))
        if basis != self._projectors_for:
            self._projectors, self._projectors_for = {}, basis
        projector = self._projectors.get(source)
        if projector is not None:
            return projector
        if source:
            projector = self._projector_for("", device, dtype).for_output(source)
        elif cfg.projector is not None:
            projector = copy.deepcopy(cfg.projector)
            default_distribution(projector, cfg.distribution)
        else:
            projector = TopK(cfg.topk) if cfg.topk is not None else (Sketch() if self.sketch else Dense())
            projector._share(self.bank)
        seed = cfg.seed if not source else mix(cfg.seed, "output", source) & 0x7FFFFFFF
        projector.setup(seed, device, dtype)
        state = self._projector_states.pop(source, None)
        if state is not None:
            projector.load_state_dict(state)
        self._projectors[source] = projector
        return projector

    def _in_force(self, option: str) -> bool:
        """A recipe option (``norm_points``, ``pooled_channels``...) in force: as set, or the recipe's choice
        (``"auto"``: on in ``mode="dfa"``)."""
        chosen = self.config.chosen(option)
        return self.mode == "dfa" if chosen is None else chosen

    @property
    def norm_points(self) -> bool:
        """``norm_points`` in force (:meth:`_in_force`)."""
        return self._in_force("norm_points")

    @property
    def cut_token_embedding(self) -> bool:
        """``cut_token_embedding`` in force (:meth:`_in_force`)."""
        return self._in_force("cut_token_embedding")

    @property
    def tables_from_first_block(self) -> bool:
        """``tables_from_first_block`` in force (:meth:`_in_force`)."""
        return self._in_force("tables_from_first_block")

    @property
    def encoder_from_decoder(self) -> bool:
        """``encoder_from_decoder`` in force (:meth:`_in_force`)."""
        return self._in_force("encoder_from_decoder")

    @property
    def pooled_channels(self) -> bool:
        """``pooled_channels`` in force (:meth:`_in_force`)."""
        return self._in_force("pooled_channels")

    @property
    def positionwise_maps(self) -> bool:
        """``positionwise_maps`` in force (:meth:`_in_force`)."""
        return self._in_force("positionwise_maps")

    @property
    def spread_read_token(self) -> bool:
        """``spread_read_token`` in force (:meth:`_in_force`)."""
        return self._in_force("spread_read_token")

    @property
    def norm_feedback(self) -> str:
        """Norm-aware feedback in force: ``"consumer"`` (the Jacobian of the norm that consumes each point, where one
        does: ``norm_jacobian=None`` with the ``"auto"`` recipe), ``"layernorm"`` (``norm_jacobian=True``: at every
        point) or ``"off"``."""
        chosen = self.config.chosen("norm_jacobian")
        if chosen is None:
            return "layernorm" if self.unnormalised else "consumer"
        return "layernorm" if chosen else "off"

    @property
    def unnormalised(self) -> str | None:
        """The ``config.model_type`` of the attached Hugging Face model where its blocks keep no normalisation
        (:data:`lightning_dfa.registry.UNNORMALISED`): the ``"auto"`` recipe then gives every point the LayerNorm
        Jacobian. ``None`` otherwise."""
        return self._unnormalised

    def recipe_notes(self) -> list[str]:
        """One line per choice of the recipe in force, and why (see :func:`lightning_dfa.recipe.recipe_notes`)."""
        return recipe_notes(self)

    def attach(self, root: nn.Module, target: Target | None = None) -> Target:
        """Discover blocks and output of ``root`` (unless ``target`` is given) and install the hooks."""
        if self.attached:
            self.detach()
        refuse_lazy_modules(root)
        hook = getattr(root, "configure_dfa", None)
        if callable(hook):
            self.config = self.config.merged_with(hook() or {}, origin=f"{type(root).__name__}.configure_dfa()")
        if self._saved_options is not None:  # a loaded checkpoint: compare after configure_dfa() has spoken
            saved, self._saved_options = self._saved_options, None
            reconcile(self.config, saved)
        if (self.bank.seed, self.bank.distribution) != (self.config.seed, self.config.distribution):
            self.bank = FeedbackBank(self.config.seed, self.config.distribution)
        self._unnormalised = _unnormalised_model_type(root)
        if root is not self.root:  # heads found on another model; a loaded checkpoint's apply to this one
            self._heads = self._saved_heads or []
        self._saved_heads = None
        try:
            found = self._install(root, target, configured=callable(hook))
        except BaseException:
            self.detach()  # a failure half-way leaves no hook behind
            raise
        self._compare_blocks()
        self._compiled = _compiled(root)
        if self._compiled:
            _forget_compiled_graphs()
        return found

    def _compare_blocks(self) -> None:
        """Warn once when the blocks found now are not those a loaded checkpoint was trained with (a model changed
        since, or a version of the library that finds other blocks): the feedback then goes to other points than in
        the run being resumed."""
        saved_names, self._saved_blocks = self._saved_blocks, None
        if saved_names is None:
            return
        saved = [_unwrapped(n) for n in saved_names]
        now = [_unwrapped(b.name) for b in self.target.blocks] if self.target is not None else []
        if saved == now:
            return

        def listed(names: list[str]) -> str:
            return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "") or "none"

        warnings.warn(
            f"DFA: the checkpoint was trained with other blocks than those found now (only in the checkpoint: "
            f"{listed([n for n in saved if n not in now])}; only now: {listed([n for n in now if n not in saved])}). "
            "Training goes on with the blocks found now (the checkpoint's are listed in its state, under "
            "'blocks'); pass blocks= to choose them.",
            UserWarning,
            stacklevel=3,
        )

    def _delivered(self, delivery: _Delivery) -> None:
        self._consumers_complete = True
        base = delivery.source.split("#")[0]
        if base in self._modules:
            self._sources.setdefault(base, self._modules[base])
        if delivery.reached is not None:
            self._true_ids = (self._true_ids or set()) | delivery.reached

    def detach(self) -> None:
        """Remove every hook; the model is plain again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._group = None
        self._side_outputs.clear()
        for p in self._frozen:
            p.requires_grad_(True)
        self._frozen = []
        if self._compiled:
            self._compiled = False
            _forget_compiled_graphs()  # graphs compiled with the hooks would go on running them

    # ------------------------------------------------------------------ backward

    def _source_key(self, delivery: _Delivery | None) -> str:
        """The feedback matrices' key of an output: ``""`` for the (first call of the) primary output."""
        if delivery is None or self.target is None or delivery.source == self.target.output_name:
            return ""
        return delivery.source

    def _project(
        self,
        error: torch.Tensor,
        points: list[PointMeta],
        activations: list[torch.Tensor] | None = None,
        delivery: _Delivery | None = None,
    ) -> list[torch.Tensor | None]:
        self.report.deliveries += 1
        source = self._source_key(delivery)
        laid = self.layouts.lay_out(error.shape, points, delivery)
        keep = [i for i, p in enumerate(laid) if p is not None]
        kept = [laid[i] for i in keep]
        acts = None if activations is None else [activations[i] for i in keep]
        self.last_points = kept
        fbs = self.feedback_for(error, kept, acts, source=source) if kept else []
        self._handed(error, kept, fbs)
        out: list[torch.Tensor | None] = [None] * len(points)
        for i, fb in zip(keep, fbs):
            out[i] = fb
        return out

    def _handed(self, error: torch.Tensor, points: list[PointMeta], feedback: list[torch.Tensor]) -> None:
        """``points`` received ``feedback`` from ``error``: noted in this backward's report (each point once) and
        shown to the :attr:`feedback_observers`."""
        fed = {m.key for m in self.report.points_fed}
        self.report.points_fed.extend(m for m in points if m.key not in fed)
        for observer in self.feedback_observers:
            observer(error, points, feedback)

    def feedback_for(
        self,
        error: torch.Tensor,
        points: Sequence[PointMeta | CapturedPoint],
        activations: Sequence[torch.Tensor | None] | None = None,
        source: str = "",
    ) -> list[torch.Tensor]:
        """The DFA rule: ``scale / sqrt(d) * B e`` for each point of width ``d``, where ``B e`` is the projector's
        (ONE call per alignment and error width, to the widest point's width; narrower points take its first
        ``d`` columns), then laid out on the point, ``feedback_transform``, and norm-aware feedback.

        ``points`` are the metadata the engine records (or :class:`CapturedPoint` from :meth:`capture`). Where
        norm-aware feedback shapes a point, its activation is needed: ``activations`` or the captured tensor.
        ``source`` names the output the error was read at (``""``: the primary output); every output has its own
        projector (its own feedback matrices).
        """
        if activations is None:
            activations = [p.tensor if isinstance(p, CapturedPoint) else None for p in points]
        points = [self._point_meta(p.key, p.tensor, p.flatten) if isinstance(p, CapturedPoint) else p for p in points]
        if any(p.norm is not None and h is None for p, h in zip(points, activations)):
            raise ValueError("DFA: norm-aware feedback needs the points' activations (pass activations=).")
        output = source or (self.target.output_name if self.target else "?")
        pooled = any(self._pooled_maps.values())  # (an output after the pooling: the head, or a norm before it)
        positionwise = self.positionwise_maps
        if pooled or positionwise:  # pooled_channels, positionwise_maps: feature maps fed by their structure
            points = [
                dataclasses.replace(p, pooled=pooled, positionwise=positionwise) if p.flatten and is_map(p.shape) else p
                for p in points
            ]
        aligned = like_the_tokens(points, [self.layouts.align(error.shape, p, output) for p in points])
        if positionwise and any(kind in ("positions", "pixels") for kind, _, _ in aligned):
            self._map_errors.add(output.split("#")[0])
        widest: dict[tuple[str, int], int] = {}
        items = {(kind, k): laid_out(p)[0] for p, (kind, k, _) in zip(points, aligned) if p.state is not None}
        for p, (kind, k, d) in zip(points, aligned):
            self.bank.check_point(p.key if not source else f"{p.key}@{source}", k, d)
            if self.learned is None or kind not in _LEARNABLE:
                widest[(kind, k)] = max(widest.get((kind, k), 0), d)
        projector = self._projector_for(source, error.device, error.dtype)
        scale, distinct = self.config.scale, self.config.distinct
        projections = {}
        for (kind, k), width in sorted(widest.items(), key=lambda item: -item[1]):  # widest first (see Sketch)
            projected = project_rows(projector, error_rows(error, kind, k, items.get((kind, k), 0)), width)
            # scaled once here when every point of this error width takes the whole projection
            shared = not distinct and all(d == width for (kd, kk, d) in aligned if (kd, kk) == (kind, k))
            projections[(kind, k)] = (projected * (scale / math.sqrt(width)) if shared else projected, shared)
        # spread_read_token: an output the loss reads at one position per item (a classifier's read token) feeds
        # every point but the last that position's feedback at all positions
        spread: dict[tuple[str, int], tuple[torch.Tensor, bool]] = {}
        if self.spread_read_token and output.split("#")[0] in self._read_outputs and error.dim() == 3:
            spread = {key: (projected.sum(1, keepdim=True).expand_as(projected).contiguous(), shared)
                      for key, (projected, shared) in projections.items()
                      if key[0] == "token" and projected.dim() == 3}  # fmt: skip
        last = max((i for i, (kind, _, _) in enumerate(aligned) if kind == "token"), default=-1) if spread else -1
        out = []
        for i, (p, (kind, k, d), h) in enumerate(zip(points, aligned, activations)):
            if self.learned is not None and kind in _LEARNABLE:
                out.append(self._learned_feedback(error, p, kind, k, d, h, source))
                continue
            projected, scaled = spread[(kind, k)] if (kind, k) in spread and i != last else projections[(kind, k)]
            fb = projected if projected.shape[-1] == d else projected[..., :d]
            if distinct:
                fb = fb * (self.bank.signs(p.key, d, fb.device, fb.dtype) * (scale / math.sqrt(d)))
            elif not scaled:
                fb = fb * (scale / math.sqrt(d))
            out.append(laid_on(fb, p, kind, error.shape))
        transform = self.config.feedback_transform
        if transform is not None:
            out = [checked_transform(transform, p.key, fb) for p, fb in zip(points, out)]
        return [
            fb if p.norm is None else norm_vjp(h.detach(), fb, p.norm) for h, fb, p in zip(activations, out, points)
        ]

    def _learned_feedback(
        self, error: torch.Tensor, p: PointMeta, kind: str, k: int, d: int, h: torch.Tensor | None, source: str
    ) -> torch.Tensor:
        """The ``feedback_learning`` option's feedback of one point (see :mod:`lightning_dfa.learned`)."""
        assert self.learned is not None and h is not None
        h = h.transpose(0, 1) if p.layout == "swapped" else h
        if kind == "token":
            rows, hs = error.reshape(-1, k), h.reshape(-1, d)
        elif kind == "channels":  # one vector per channel: the matrix learns from each channel's mean activation
            rows, hs = error, h.flatten(2).mean(-1)
        else:
            rows, hs = error.flatten(1), h.flatten(1)

        def initial() -> torch.Tensor:  # the dense fixed matrix, whatever projector the other points use
            return self.bank.matrix(k, d, torch.device("cpu"), torch.float32, source=source)

        key = p.key if not source else f"{p.key}@{source}"
        fb = self.learned.feedback(key, rows, hs, initial).mul_(self.config.scale / math.sqrt(d))
        return laid_on(fb, p, kind, error.shape)

    def end_backward(self, loss: torch.Tensor | None = None) -> BackwardReport:
        """Close a backward: check that feedback fired (``mode="dfa"``) and reset the counters.

        A backward in which every block is frozen and nothing before them trains (the first epochs of Lightning's
        ``BackboneFinetuning``, a linear probe) trains the layers after the blocks by their own gradient, as
        backprop does; it needs no feedback and is not refused. Nor is a backward of its own after the model's (a
        critic trained on detached outputs by a second ``manual_backward``): with ``loss`` given, a backward that
        called no block since the last one and whose loss reaches no block, output or feedback point.

        Args:
            loss: the tensor this backward started from (the Lightning adapters pass it), or ``None``.

        Raises:
            RuntimeError: in ``mode="dfa"``, if no feedback reached the blocks in this backward, with the reason.

        Example:
            >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
            >>> critic, engine = nn.Linear(2, 1), FeedbackEngine()
            >>> _ = engine.attach(net)
            >>> logits = net(torch.randn(3, 4))
            >>> logits.sum().backward()
            >>> engine.end_backward().deliveries
            1
            >>> critic_loss = critic(logits.detach()).sum()  # the critic's own backward: nothing to deliver
            >>> critic_loss.backward()
            >>> engine.end_backward(critic_loss).deliveries
            0
        """
        report, self.report = self.report, BackwardReport()
        self._group = None
        self._side_outputs.clear()
        if self._block_outputs is not None and report.points_recorded:
            # the first training backward ran without loss_readers (the engine used on its own): its notes and
            # the first forward's connected cuts are for that loss only
            self._stop_reading()
        if self._block_outputs:
            self._block_outputs.clear()
        if self._side_reads:
            self._side_reads.clear()
        if self._cut_readers:
            self._cut_readers.clear()
        if self._cut_memory:
            self._cut_memory.clear()
        if self.learned is not None:
            self.learned.step()
        if self.mode == "dfa" and self.attached and report.deliveries == 0 and self.target and self.target.blocks:
            if not only_layers_after_frozen_blocks(self, report) and not self._unrelated(loss, report):
                raise RuntimeError(explain_silence(self, report))
        if isinstance(loss, torch.Tensor) and not self._loss_measured and (report.deliveries or self.mode == "shallow"):
            self._measure_loss_terms(loss)
        return report

    def _differentiated(self, source: str) -> None:
        """A backward with ``create_graph=True`` reached output ``source``'s delivery in a training forward: warned
        once (its derivatives there are the feedback's)."""
        if self._differentiated_said:
            return
        self._differentiated_said = True
        warnings.warn(
            f"DFA: a derivative through the output module {source!r} is taken with create_graph=True in a training "
            "forward (a gradient penalty, a physics-informed residual, an input-gradient regulariser). DFA replaces "
            "the backward there, so that derivative is the feedback's, not the network's, and a term built on it "
            "is not what it means. Run the forward of such a term inside engine.inert() (under the strategy, "
            "trainer.strategy.dfa_engine.inert()): it gives the true derivatives, and the term then trains by "
            "backprop. Or train this model with backprop.",
            stacklevel=2,
        )

    @property
    def roles_from_loss(self) -> bool:
        """Whether :meth:`parameter_roles` was completed from a loss (``end_backward(loss)``, as the Lightning
        adapters call it): the parameters that loss applies after an output module (a bias added to the logits)
        are then counted as trained by their true gradient; before, they count as feedback."""
        return self._loss_measured

    def _measure_loss_terms(self, loss: torch.Tensor) -> None:
        """Complete the measured roles (:meth:`parameter_roles`) from the first loss: the parameters it reaches
        without crossing an output's delivery (a learned temperature applied after the output module, a bias added
        after it) learn by their true gradient; in ``mode="shallow"``, every parameter it reaches does (the layers
        after the blocks, heads on middle layers, a block's weights shared with a layer called after the last cut).
        In ``mode="dfa"``, also the outputs it reads at one position per item (``spread_read_token``)."""
        self._loss_measured = True
        if self.target is None:
            return
        if self.mode == "shallow":
            self._true_ids = _parameters_reached(loss)
            return
        nodes = _nodes_before_outputs(loss)  # (one walk of the loss's graph for both)
        if self.mode == "dfa" and self.spread_read_token:
            self._read_outputs |= _outputs_read_at_one_position(nodes)
        variables = (getattr(node, "variable", None) for node in nodes)
        reached = {id(v) for v in variables if isinstance(v, torch.Tensor)} - self.target.block_param_ids()
        self._true_ids = (self._true_ids or set()) | reached

    def _unrelated(self, loss: torch.Tensor | None, report: BackwardReport) -> bool:
        """A backward that did not start from the model's graph (see :meth:`end_backward`)."""
        if not isinstance(loss, torch.Tensor) or report.blocks_called or report.points_recorded or self.target is None:
            return False
        params = self.target.block_param_ids() | {id(p) for _, m in self.target.outputs for p in m.parameters()}
        return not _reaches_feedback(loss, params)

    def loss_readers(self, loss: torch.Tensor) -> list[str]:
        """The blocks whose output ``loss`` reads directly, not only through an output module (a head on a middle
        layer, a VAE's KL term on its mean and variance layers), and the layers outside blocks and outputs that read
        a point's cut (itself, a view of it, or what a parameter-free layer such as a pooling made of it) and whose
        output ``loss`` reads so (mean and variance layers after a backbone, a value head):
        such a term trains those layers by their true gradient but feeds nothing back to the layers before them.
        :attr:`loss_side_readers` lists the blocks whose other outputs, handed on uncut, the loss reads directly (a
        normalizing flow's log-determinant): such a term trains each of them inside the block only.
        Checked once per model, at the first loss of a training forward (``[]`` at later calls).

        Those that nothing but the loss reads (no output and no feedback point was computed from them: an auxiliary
        classifier) are heads, listed in :attr:`loss_heads`; :meth:`add_outputs` makes them outputs, as the
        Lightning adapters do after the first step. The adapters warn with the names of the others.

        The same check lists in :attr:`blocks_crossed` each ``(reader, block)`` where the backward of ``reader``
        continues into ``block`` through an input DFA does not cut (a slice of a block's output read by the next
        block beside its main input): ``block`` then learns by backprop through ``reader`` too. The adapters warn
        with the names.

        Example:
            >>> class Aux(nn.Module):  # an auxiliary classifier on the middle layer
            ...     def __init__(self):
            ...         super().__init__()
            ...         self.a, self.b, self.aux, self.out = (nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2),
            ...                                                nn.Linear(8, 2))
            ...     def forward(self, x):
            ...         h = torch.tanh(self.a(x))
            ...         return self.out(torch.tanh(self.b(h))), self.aux(h)
            >>> net, engine = Aux(), FeedbackEngine()
            >>> _ = engine.attach(net)
            >>> out, aux = net(torch.randn(3, 4))
            >>> engine.loss_readers(out.sum() + aux.sum()), engine.loss_heads
            (['aux'], ['aux'])
        """
        self.loss_heads, self.blocks_crossed, self.loss_outputs, self.loss_cut_readers = [], [], [], []
        self.loss_side_readers = []
        outputs, loose, side = self._block_outputs, list(self._cut_readers or ()), list(self._side_reads or ())
        if outputs is None or self.mode != "dfa" or not isinstance(loss, torch.Tensor) or loss.grad_fn is None:
            return []
        self._stop_reading()
        reached = _nodes_before_outputs(loss)
        self.loss_side_readers = list(dict.fromkeys(name for name, node in side if node in reached))
        # the blocks whose output point is cut (their cut's node stands for it) apart from those whose output is not
        cuts = [(name, node) for name, node in outputs if isinstance(node, _SoftCut._backward_cls)]
        uncut = [(name, node) for name, node in outputs if not isinstance(node, _SoftCut._backward_cls)]
        read = [(name, node) for name, node in [*uncut, *loose] if node in reached]
        if cuts:  # blocks whose output point's cut the loss reads through parameter-free operations
            direct = _nodes_read_directly(loss)
            self.loss_cut_readers = list(dict.fromkeys(name for name, node in cuts if node in direct))
            read += [(name, node) for name, node in cuts if name in self.loss_cut_readers]
        silent = sorted(_outputs_read_before_points(loss, reached), key=lambda x: x[0])
        read += silent
        quiet = {node for _, node in silent}
        sources = (d.source.split("#")[0] for d, node in _deliveries_in(reached).items() if node not in quiet)
        self.loss_outputs = sorted(set(sources))
        readers = list(dict.fromkeys(name for name, _ in read))
        params = {b.name: [p for p in b.parameters() if p.requires_grad] for b in self.target.blocks}
        self.blocks_crossed = _blocks_crossed(loss, uncut, params)
        if readers:
            fed = _nodes_behind_outputs(loss)
            self.loss_heads = list(dict.fromkeys(n for n, node in read if node not in fed))
        return readers

    def _stop_reading(self) -> None:
        """The first loss is checked (or its backward ran unchecked): no more notes for :meth:`loss_readers`."""
        self._block_outputs, self._cut_readers, self._cut_memory, self._readers_checked = None, None, None, True
        self._side_reads = None
        self._watched = set()
        for handle in self._reader_handles:
            handle.remove()
        self._reader_handles = []

    def add_outputs(self, names: Sequence[str]) -> Target:
        """Make the blocks ``names`` output modules too: heads on middle layers that the loss reads directly (an
        auxiliary classifier, deep supervision; :attr:`loss_heads`), or layers outside the blocks that hold trainable
        parameters (a value head beside a policy). Attached again with those blocks left out of
        the blocks and added to the outputs, each an error source with its own feedback matrices, from the next
        forward on; kept when attached again to this model, and saved in :meth:`state_dict`. Call between steps.

        Example:
            >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
            >>> engine = FeedbackEngine()
            >>> [b.name for b in engine.attach(net).blocks]
            ['1', '3']
            >>> target = engine.add_outputs(["3"])
            >>> [b.name for b in target.blocks], [name for name, _ in target.outputs]
            (['1'], ['4', '3'])
        """
        if self.target is None or self.root is None:
            raise RuntimeError("DFA: attach() the engine first.")
        blocks = {b.name: b for b in self.target.blocks}
        loose = {name for name, _ in _loose_layers(self.root, self.target)}
        unknown = [n for n in names if n not in blocks and n not in loose]
        if unknown:
            raise ValueError(
                f"DFA: add_outputs({list(names)}): {unknown} are neither blocks ({list(blocks)}) nor layers with "
                "trainable parameters outside the blocks and outputs."
            )
        self._heads = list(dict.fromkeys([*self._heads, *names]))
        checked = self._readers_checked
        target = self.attach(self.root, self.target.with_blocks_as_outputs(self._heads, self.root))
        self._readers_checked = checked
        return target

    def check_loss(self, loss: torch.Tensor) -> None:
        """Refuse a loss that cannot carry the error back to the output module (see :func:`checks.check_loss`)."""
        check_loss(self, loss)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The feedback (matrices, signs, widths) and every option that shapes it (see :data:`RESUME_KEEPS` and
        :data:`RESUME_REFUSES`): what a checkpoint stores under ``checkpoint["dfa"]``."""
        state = self.bank.state_dict()
        for name in _SAVED_OPTIONS:
            if name not in state:
                state[name] = getattr(self.config, name)
        if self.config.projector is not None:  # one built from the options keeps its matrices in the bank
            outputs = {**self._projector_states, **{k: p.state_dict() for k, p in self._projectors.items()}}
            state["projector"] = {"class": class_name(self.config.projector), "outputs": outputs}
        if self.learned is not None:
            state["learned_feedback"] = self.learned.state_dict()
        faint = self._faint if self._faint is not None else self._saved_faint
        if faint is not None:
            state["faint_token_tables"] = list(faint)
        blocks = [b.name for b in self.target.blocks] if self.target is not None else self._saved_blocks
        if blocks is not None:
            state["blocks"] = list(blocks)
        heads = self._heads or self._saved_heads
        if heads:
            state["heads"] = list(heads)
        if self._read_outputs:
            state["read_outputs"] = sorted(self._read_outputs)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue with the feedback saved by :meth:`state_dict`.

        The state is checked first (keys, types, finite values, version): a damaged one is refused. Every saved
        option is then compared with this engine's (after the model's ``configure_dfa()`` when loaded before
        :meth:`attach`): a different :data:`RESUME_KEEPS` option is replaced by the saved value, with one warning
        naming each; a different :data:`RESUME_REFUSES` option is an error naming it.

        Example:
            >>> import warnings
            >>> saved = FeedbackEngine(seed=5).state_dict()
            >>> resumed = FeedbackEngine(seed=7)
            >>> resumed.load_state_dict(saved)
            >>> with warnings.catch_warnings(record=True) as caught:
            ...     warnings.simplefilter("always")
            ...     _ = resumed.attach(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)))
            >>> resumed.config.seed, "seed=5 (this run gives 7)" in str(caught[0].message)
            (5, True)
        """
        check_state(state)
        options = {name: state[name] for name in _SAVED_OPTIONS if name in state}
        options["projector"] = state["projector"]["class"] if "projector" in state else None
        if self.attached:
            reconcile(self.config, options)
        else:
            self._saved_options = options
        self.bank.load_state_dict(state)
        self._saved_faint = list(state["faint_token_tables"]) if "faint_token_tables" in state else None
        self._saved_blocks = list(state["blocks"]) if "blocks" in state else None
        self._saved_heads = list(state["heads"]) if "heads" in state else None
        self._saved_read_outputs = set(state.get("read_outputs", ()))
        self._read_outputs |= self._saved_read_outputs
        if self.attached:
            self._compare_blocks()
        self._projectors, self._projectors_for = {}, None
        self._projector_states = dict(state["projector"]["outputs"]) if "projector" in state else {}
        if self.learned is not None and "learned_feedback" in state:
            self.learned.load_state_dict(state["learned_feedback"])

    # ------------------------------------------------------------------ reporting

    def parameter_roles(self, root: nn.Module | None = None) -> dict[str, int]:
        """Number of trainable parameters trained by feedback, by their true gradient, or not at all."""
        return parameter_roles(self, root)

    def role_of(self, parameter: nn.Parameter) -> str:
        """``"feedback"``, ``"true gradient"`` or ``"none"``: how ``parameter`` is trained (see :func:`role_of`)."""
        return role_of(self, parameter)

    def probe_shapes(self, root: nn.Module, example: Any) -> dict[str, list[int]]:
        """Shapes of the feedback points for one forward of ``example`` (in eval mode, RNG state restored)."""
        from .summary import probe_shapes

        return probe_shapes(self, root, example)

    def summary(self, shapes: dict[str, list[int]] | None = None) -> str:
        """A short table: feedback points, shapes (``shapes`` or once seen), output, feedback kind, parameter roles."""
        from .summary import format_summary

        return format_summary(self, shapes)


def _compiled(root: nn.Module) -> bool:
    """``root`` or a module in it was compiled by ``torch.compile`` (a wrapper, ``module.compile()``, or Lightning's
    record of a compiled LightningModule)."""
    return getattr(root, "_compiler_ctx", None) is not None or any(
        type(m).__name__ == "OptimizedModule" or getattr(m, "_compiled_call_impl", None) is not None
        for m in root.modules()
    )


def _forget_compiled_graphs() -> None:
    """Drop the graphs ``torch.compile`` made so far. They do not guard on module hooks (torch's
    ``skip_nnmodule_hook_guards``): a graph compiled for a module of the same code before the engine's hooks were
    installed (another run of the model in this process, a backprop arm) would run without them, and one compiled
    with them would go on running them after :meth:`FeedbackEngine.detach`. The next call compiles afresh."""
    dynamo = getattr(torch, "_dynamo", None)
    if dynamo is not None:
        dynamo.reset()


#: name parts a wrapper adds around the module it wraps (torch.compile, FSDP1, activation checkpointing)
_WRAPPER_PARTS = {*_WRAPPED, "_orig_mod"}


def _unwrapped(name: str) -> str:
    """A module name without its wrappers' parts (``"net._orig_mod.1"`` -> ``"net.1"``): a checkpoint written from a
    compiled or sharded model names the same blocks as the plain model."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)
