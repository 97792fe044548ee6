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

* Several outputs (heads, losses; ``output=[...]``, or one output module called several times): every output call
  ties all the points of its forward recorded before it, each through its own delivery with its own fixed
  matrices, so each point receives ``sum_j B_j e_j``; autograd runs only the deliveries the loss depends on, and
  an output whose error reached it through a later output (``head2(head1(h))``) passes it on without delivering.
* Outputs found from the forward: unless ``output=`` names them, every layer outside the blocks is tied as well
  when it runs after points; the backward keeps as error sources only those the loss reads directly (not through
  another tied layer, and not feeding a later block), so the error is read at the layer the loss is computed from
  however ``forward`` reaches it. Blocks whose parameters are all frozen get no point, and a frozen output defers
  to a trainable one upstream (a frozen discriminator is part of the generator's loss).
* The delivered output is a detached alias of the output (same memory, not a view): user code may modify it in
  place wherever plain PyTorch allows it.
* Layouts: a point's positions are lined up with the error's by the data flow, not by coincident sizes. The first
  forward after ``attach`` that records a sequence-shaped point (``[T, B, d]`` or ``[B, T, d]``) cuts its points
  with :class:`_SoftCut` (still connected, blocked in the training backward), and the delivery probes, with one
  vector-Jacobian product, which of each point's first two dimensions the output's batch items depend on. That
  first step costs about one backprop step more; its gradients are those of any other DFA step.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import math
import operator
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .config import (
    _AUTO_OPTIONS,
    _DECIDES,
    _SAVED_OPTIONS,
    RECIPE_OPTIONS,
    RESUME_KEEPS,
    RESUME_REFUSES,
    DFAConfig,
)
from .discovery import Block, Target, _has_params, discover
from .norms import NormSpec, _may_normalise, norm_vjp, probe_normalisation
from .points import carries_grad as _carries_grad
from .points import split_input as _split_input
from .points import split_main as _split_main
from .projectors import Dense, Projector, Sketch, TopK
from .projectors.base import mix as _mix
from .projectors.random import FeedbackBank, check_bank_state, uses_sketch


# ---------------------------------------------------------------------------------------------- hooks
class _Hook:
    """A hook bound to an engine. Copies (``deepcopy``, pickling) become inert pass-through hooks, so a copied
    model (EMA, SWA) is a plain model that never feeds the original engine."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def __deepcopy__(self, memo: dict) -> _PassThrough:
        return _PassThrough()

    def __reduce__(self) -> tuple:
        return (_PassThrough, ())


class _PassThrough:
    def __call__(self, *args: Any) -> None:
        return None


@dataclass
class _PointMeta:
    key: str
    shape: torch.Size
    dtype: torch.dtype
    flatten: bool
    norm: NormSpec | None = None
    #: how the point's first two dimensions relate to the error's positions: ``"same"`` (lined up in order) or
    #: ``"swapped"`` (a sequence-first ``[positions, batch, ...]`` point for a batch-first error, or the reverse)
    layout: str = "same"


@dataclass
class CapturedPoint:
    """A feedback point recorded under :meth:`FeedbackEngine.capture`: its key and graph-attached tensor."""

    key: str
    tensor: torch.Tensor
    flatten: bool = False


@dataclass
class Capture:
    """What forwards under :meth:`FeedbackEngine.capture` recorded, in call order."""

    points: list[CapturedPoint] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)


class _Delivery:
    """One output call's tie: the engine, the source (output) it reads, its points' metadata, and what the
    backward needs to know about the other outputs (no tensors are kept, except during a layout probe)."""

    __slots__ = ("engine", "points", "source", "upstream", "downstream_ran", "probe", "feeds_point", "frozen")
    __slots__ += ("reached", "forward")

    def __init__(self, engine: FeedbackEngine, points: list[_PointMeta], source: str) -> None:
        self.engine = engine
        self.points = points
        self.source = source
        #: a block's input was computed from this output: it lies before a block, so it is no error source
        self.feeds_point = False
        #: the output module has no trainable parameter (a fixed readout, or a network frozen for this step)
        self.frozen = False
        #: ``id`` of the parameters this output's value was computed from after the cuts (measured once)
        self.reached: set[int] | None = None
        #: the state of the forward that recorded the points (closed once a backward ran through it)
        self.forward: _ForwardState | None = None
        #: deliveries of earlier outputs this output was computed from (``head2(head1(x))``)
        self.upstream: list[_Delivery] = []
        #: set in the backward when a delivery computed from this one's output ran: the error then reached this
        #: output through another output, which already delivered it
        self.downstream_ran = False
        #: during a layout probe: ``(output tensor before the tie, point tensors)``
        self.probe: tuple[torch.Tensor, list[torch.Tensor]] | None = None


class _DeliverFeedback(torch.autograd.Function):
    """Identity on the output; its backward hands each feedback point its projected error.

    The output is returned as ``output.detach()``: the same memory (no copy of a ``[tokens, vocabulary]`` logits
    tensor), but not a view, so user code may modify it in place (``logits /= T``, ``F.relu(out, inplace=True)``)
    exactly where plain PyTorch allows it; a view returned by a custom Function cannot be modified in place."""

    @staticmethod
    def forward(ctx: Any, delivery: _Delivery, output: torch.Tensor, *points: torch.Tensor) -> torch.Tensor:
        ctx.delivery = delivery
        # norm-aware feedback needs the activations of the points it shapes (their consumer norm keeps them too)
        ctx.norm_index = [i for i, meta in enumerate(delivery.points) if meta.norm is not None]
        ctx.save_for_backward(*[points[i] for i in ctx.norm_index])
        return output.detach()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, error: torch.Tensor) -> tuple:
        delivery: _Delivery = ctx.delivery
        needs = ctx.needs_input_grad[2:]
        if delivery.forward is not None and not delivery.forward.closed:
            delivery.forward.closed = True  # a later call of an output starts from new points
            delivery.engine._release(delivery.forward)
        # A frozen output computed from a trainable one (the frozen discriminator of a generator's step) is part
        # of the loss: the trainable output upstream reads the error.
        defer = delivery.frozen and any(not up.frozen for up in delivery.upstream)
        if not defer:
            for up in delivery.upstream:
                up.downstream_ran = True
        if delivery.downstream_ran or delivery.feeds_point or defer:
            # not an error source: this output's error came through a later output, or it lies before a block
            delivery.probe = None
            return (None, error, *[None for _ in needs])
        delivery.engine._delivered(delivery)
        activations: list[torch.Tensor | None] = [None] * len(delivery.points)
        for i, tensor in zip(ctx.norm_index, ctx.saved_tensors):
            activations[i] = tensor
        feedback = delivery.engine._project(error, delivery.points, activations, delivery)
        return (None, error, *[f if n else None for f, n in zip(feedback, needs)])


class _SoftCut(torch.autograd.Function):
    """The cut of a feedback point during a layout-probe forward: the rest of the network gets a copy that stays
    connected to the point, so a probe can follow the data flow from an output back to the points; in the training
    backward nothing crosses it (as with the ordinary cut, ``detach``)."""

    @staticmethod
    def forward(ctx: Any, engine: FeedbackEngine, tensor: torch.Tensor) -> torch.Tensor:
        ctx.engine = engine
        return tensor.clone()  # its own memory: downstream code may modify it in place

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return None, (grad if ctx.engine._probing else None)


class _ForwardState:
    __slots__ = ("closed",)

    def __init__(self) -> None:
        self.closed = False


@dataclass
class _Group:
    """The points of one forward, tied to every output called after them in that forward."""

    points: list[tuple[str, torch.Tensor, bool]] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, int] = field(default_factory=dict)
    untied: int = 0  # points recorded since the last tie
    soft: bool = False  # a layout-probe forward: points are cut by _SoftCut
    cuts: dict[int, torch.Tensor] = field(default_factory=dict)  # id(soft cut's copy) -> the point
    copies: list[torch.Tensor] = field(default_factory=list)  # the copies themselves: their ids stay theirs
    ties: list[_Delivery] = field(default_factory=list)
    state: _ForwardState = field(default_factory=_ForwardState)
    after_ties: bool = False  # the forward before this one tied outputs (that may feed this one's points)


# ---------------------------------------------------------------------------------------------- engine
@dataclass
class BackwardReport:
    """Counters of one backward: what the forward(s) recorded and what the backward delivered."""

    points_recorded: int = 0
    outputs_tied: int = 0
    deliveries: int = 0
    #: types of the values the output module returned after the blocks that held no floating-point tensor to tie
    untied_outputs: list[str] = field(default_factory=list)


class FeedbackEngine:
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
        # layout probes: whether the next forward with sequence-shaped points probes their layout, whether a
        # probe is running (soft cuts then let it through), and the result per (point, output) pair
        self._probe_pending = True
        self._probing = False
        self._layouts: dict[tuple[str, str], str] = {}
        # output candidates found from the forward, the outputs seen delivering, and the parameters measured to
        # be trained by their true gradient (after the cuts, before a delivering output)
        self._candidates: list[tuple[str, nn.Module]] = []
        self._sources: dict[str, nn.Module] = {}
        self._true_ids: set[int] | None = None
        self.report = BackwardReport()
        self.enabled = True
        self.last_points: list[_PointMeta] = []
        self._capture: Capture | None = None
        self._observers: list[Callable[[torch.Tensor, list[_PointMeta], list[torch.Tensor]], None]] = []
        # instruments (alignment monitor): called with (key, graph-attached tensor) at each recorded point
        self._point_observers: list[Callable[[str, torch.Tensor], None]] = []
        # norm-aware feedback: point name -> the normalisation that consumes it (found in the forward)
        self._consumers: dict[str, NormSpec] = {}
        self._norm_kinds: dict[int, NormSpec | None] = {}  # id(norm module) -> what probing it found
        self._consumers_complete = False
        self._inside_blocks: set[int] = set()  # id() of every module inside a top-level block
        self._point_norms: set[int] = set()  # norm_points: id() of the norms inside blocks that read a point
        self._cut = bool(self.config.chosen("cut_head_input"))
        # the projectors in force, per output ("" the primary one), built from the options at first use
        self._projectors: dict[str, Projector] = {}
        self._projectors_for: tuple | None = None  # what they were built from (rebuilt when it changes)
        self._projector_states: dict[str, dict[str, Any]] = {}  # a loaded checkpoint's, until each is built

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
            _default_distribution(projector, cfg.distribution)
        else:
            projector = TopK(cfg.topk) if cfg.topk is not None else (Sketch() if self.sketch else Dense())
            projector._share(self.bank)
        seed = cfg.seed if not source else _mix(cfg.seed, "output", source) & 0x7FFFFFFF
        projector.setup(seed, device, dtype)
        state = self._projector_states.pop(source, None)
        if state is not None:
            projector.load_state_dict(state)
        self._projectors[source] = projector
        return projector

    @property
    def norm_points(self) -> bool:
        """``norm_points`` in force: as set, or the recipe's choice (``"auto"``: on in ``mode="dfa"``)."""
        chosen = self.config.chosen("norm_points")
        return self.mode == "dfa" if chosen is None else chosen

    @property
    def norm_feedback(self) -> str:
        """Norm-aware feedback in force: ``"consumer"`` (the Jacobian of the norm that consumes each point, where one
        does: ``norm_jacobian=None`` with the ``"auto"`` recipe), ``"layernorm"`` (``norm_jacobian=True``: at every
        point) or ``"off"``."""
        chosen = self.config.chosen("norm_jacobian")
        return "consumer" if chosen is None else ("layernorm" if chosen else "off")

    def recipe_notes(self) -> list[str]:
        """One line per choice of the recipe in force (what was chosen and why), for the fit-start summary.

        Example:
            >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
            >>> engine = FeedbackEngine(recipe="paper")
            >>> _ = engine.attach(net)
            >>> engine.recipe_notes()[0]
            "recipe 'paper': plain DFA (Launay et al. 2020); options set: none"
        """
        cfg = self.config
        set_ = [n for n in RECIPE_OPTIONS if getattr(cfg, n) is not None]
        if cfg.recipe == "paper":
            lines = [f"recipe 'paper': plain DFA (Launay et al. 2020); options set: {', '.join(set_) or 'none'}"]
        else:
            lines = [
                f"recipe 'auto': chosen from the model's structure (recipe='paper' for plain DFA); set: "
                f"{', '.join(set_) or 'none'}"
            ]
        if self.mode != "dfa":
            return lines + [f"mode {self.mode!r}: no feedback is delivered"]
        norm = self.norm_feedback
        if norm == "layernorm":
            lines.append("norm-aware feedback: a parameter-free LayerNorm Jacobian at every point (norm_jacobian=True)")
        elif norm == "off":
            lines.append("norm-aware feedback: off")
        elif self._consumers:
            kinds = {"layer": "LayerNorm", "rms": "RMSNorm"}
            found = sorted({kinds[s.kind] for s in self._consumers.values()})
            lines.append(
                f"norm-aware feedback: {len(self._consumers)} points feed a norm ({', '.join(found)}): their feedback "
                "passes through that norm's parameter-free Jacobian; the others get B e as it is"
            )
        else:
            lines.append(
                "norm-aware feedback: at points whose consumer is a LayerNorm/RMSNorm"
                + (" (none here)" if self._consumers_complete else " (found in the first training forward)")
            )
        if self.norm_points:
            found = f" ({len(self._point_norms)} found)" if self._consumers_complete else ""
            lines.append(f"norm_points: on: norms inside blocks that read a point are points too{found}")
        if self._cut:
            why = "as set" if cfg.cut_head_input else "the output module widens (more outputs than inputs)"
            lines.append(
                f"cut_head_input: on ({why}): its input gradient is never computed; its input is the last point"
            )
        elif self.target is not None and not self.target.head_input_point and cfg.error_at == "output":
            lines.append(
                "cut_head_input: off"
                + (" (as set)" if cfg.cut_head_input is not None else " (the output module does not widen)")
            )
        widths = list(self.bank.widths.values())
        wide = any(uses_sketch(k, d) for k, d in widths)
        if cfg.projector is not None:
            lines.append(f"projector: {cfg.projector!r} (as set)")
        elif self.sketch:
            lines.append(
                "sketch: structured projection for errors wider than 4x the point"
                + ("" if not widths else (" (in use)" if wide else " (not needed: the error is narrow)"))
            )
        else:
            lines.append("sketch: off" + (" (topk is set)" if cfg.topk is not None and cfg.sketch is None else ""))
        return lines

    def attach(self, root: nn.Module, target: Target | None = None) -> Target:
        """Discover blocks and output of ``root`` (unless ``target`` is given) and install the hooks."""
        if self.attached:
            self.detach()
        hook = getattr(root, "configure_dfa", None)
        if callable(hook):
            self.config = self.config.merged_with(hook() or {}, origin=f"{type(root).__name__}.configure_dfa()")
        if self._saved_options is not None:  # a loaded checkpoint: compare after configure_dfa() has spoken
            saved, self._saved_options = self._saved_options, None
            self._reconcile(saved)
        if (self.bank.seed, self.bank.distribution) != (self.config.seed, self.config.distribution):
            self.bank = FeedbackBank(self.config.seed, self.config.distribution)
        try:
            return self._install(root, target, configured=callable(hook))
        except BaseException:
            self.detach()  # a failure half-way leaves no hook behind
            raise

    def _install(self, root: nn.Module, target: Target | None, configured: bool) -> Target:
        if target is None:
            try:
                target = discover(root, self.config.blocks, self.config.output, self.config.placement)
            except ValueError:
                if self.mode != "bp":
                    raise
                # the control arm is plain backprop: it needs no blocks, so it never refuses a model
                target = Target([], type(root).__name__, root, "none (mode='bp' is plain backprop)")
            if configured and target.source == "explicit":
                target.source = "configure_dfa"
        _refuse_reentrant_checkpointing(root)
        # attached again to the same model with the same blocks and outputs (a fit after a fit, a benchmark that
        # attaches around each step): what the forwards taught the engine (layouts, norms, the true-gradient
        # region) still holds; another model starts afresh
        same = (
            root is self.root
            and self.target is not None
            and [b.name for b in target.blocks] == [b.name for b in self.target.blocks]
            and [n for n, _ in target.outputs] == [n for n, _ in self.target.outputs]
        )
        if not same:
            self._layouts, self._consumers, self._norm_kinds, self._point_norms = {}, {}, {}, set()
            self._consumers_complete = False
            self._sources, self._true_ids = {}, None
        self.root, self.target = root, target
        self._flatten = {b.name for b in target.blocks if _has_conv(b)}
        cut = self.config.chosen("cut_head_input")
        if cut is None:  # recipe "auto": cut where the output module widens (a language model's head) and only
            # norms lie between the last block and it (GPT-2's ln_f; not BERT's dense head transform, where the
            # cut was measured to cost learning)
            cut = (
                self.mode == "dfa"
                and self.config.error_at == "output"
                and not target.head_input_point
                and _widens(target.output)
                and _only_norms_before(root, target)
            )
        self._cut = bool(cut)
        uncut = _last_top_level_block(root, target) if self._cut else None
        for block in target.blocks:
            if block.top_level:
                self._handles.append(
                    block.entry.register_forward_pre_hook(
                        _Hook(lambda m, a, k, b=block: self._on_block_input(b, a, k)), with_kwargs=True
                    )
                )
            if block.output_point and block.name != uncut:  # cut_head_input: the point moves to the head's input
                self._handles.append(
                    block.exit.register_forward_hook(_Hook(lambda m, a, o, b=block: self._on_block_output(b, o)))
                )
        self._modules = {name: module for name, module in target.outputs}
        self._candidates = self._output_candidates(root, target)
        for name, module in target.outputs:
            if self.head_input_is_point:
                self._handles.append(
                    module.register_forward_pre_hook(
                        _Hook(lambda m, a, k, n=name: self._on_head_input(n, a, k)), with_kwargs=True
                    )
                )
            if self.config.error_at == "output":
                hook = module.register_forward_hook(_Hook(lambda m, a, o, n=name: self._on_output(n, o)))
            else:
                hook = module.register_forward_pre_hook(
                    _Hook(lambda m, a, k, n=name: self._on_output_input(n, a, k)), with_kwargs=True
                )
            self._handles.append(hook)
        for name, module in self._candidates:
            self._modules[name] = module
            self._handles.append(
                module.register_forward_hook(_Hook(lambda m, a, o, n=name: self._on_output(n, o, auto=True)))
            )
        if self.mode == "dfa" and (self.norm_feedback == "consumer" or self.norm_points):
            self._inside_blocks = {id(m) for b in target.blocks if b.top_level for m in b.entry.modules()}
            for name, module in root.named_modules():
                if not _may_normalise(module):
                    continue
                self._handles.append(
                    module.register_forward_pre_hook(
                        _Hook(lambda m, a, k: self._on_norm_input(m, a, k)), with_kwargs=True
                    )
                )
                if self.norm_points and id(module) in self._inside_blocks:
                    self._handles.append(
                        module.register_forward_hook(_Hook(lambda m, a, o, n=name: self._on_norm_output(n, m, o)))
                    )
        self._probe_pending = not same
        return target

    def _output_candidates(self, root: nn.Module, target: Target) -> list[tuple[str, nn.Module]]:
        """The layers outside the blocks that may be outputs: the output is the module the loss is computed from,
        which only the forward shows (a head reached through functional code, several heads). Each is tied when
        called after points; in the backward only those whose error did not come through another output deliver.
        Not with explicit ``output=``, ``error_at="head_input"`` or ``cut_head_input`` (those name the output)."""
        cfg = self.config
        if cfg.output is not None or cfg.error_at != "output" or cfg.cut_head_input or self.mode != "dfa":
            return []
        taken = {id(p) for b in target.blocks for p in b.parameters()}
        taken |= {id(p) for _, m in target.outputs for p in m.parameters()}
        outputs = {id(m) for _, m in target.outputs}
        found = []
        for name, module in root.named_modules():
            if not name or id(module) in outputs or not any(True for _ in module.parameters(recurse=False)):
                continue
            if any(_has_params(c) for c in module.children()) or any(id(p) in taken for p in module.parameters()):
                continue
            found.append((name, module))
        return found

    @property
    def roles_measured(self) -> bool:
        """Whether :meth:`parameter_roles` comes from the forward's data flow (after a first delivery) rather than
        from the order in which the modules are registered."""
        return self._true_ids is not None

    def output_modules(self) -> list[tuple[str, nn.Module]]:
        """The output modules: those whose error reached the blocks in the backwards so far (the loss decides, see
        :meth:`_output_candidates`), or the discovered ones before any backward.

        Example:
            >>> class TwoHeads(nn.Module):
            ...     def __init__(self):
            ...         super().__init__()
            ...         self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
            ...         self.a, self.b = nn.Linear(8, 3), nn.Linear(8, 1)
            ...     def forward(self, x):
            ...         h = self.body(x)
            ...         return self.a(h), self.b(h)
            >>> net, engine = TwoHeads(), FeedbackEngine()
            >>> _ = engine.attach(net)
            >>> [n for n, _ in engine.output_modules()]
            ['a']
            >>> a, b = net(torch.randn(5, 4))
            >>> (a.sum() + b.sum()).backward()
            >>> sorted(n for n, _ in engine.output_modules())
            ['a', 'b']
        """
        if self._sources:
            return list(self._sources.items())
        return list(self.target.outputs) if self.target is not None else []

    def _release(self, state: _ForwardState) -> None:
        """A backward started through this forward's outputs: no output is tied to its points any more, so the
        engine lets go of their tensors (autograd frees each one once its block's backward has run)."""
        g = self._group
        if g is not None and g.state is state:
            g.points, g.cuts, g.copies, g.ties, g.untied = [], {}, [], [], 0

    def _delivered(self, delivery: _Delivery) -> None:
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

    @property
    def _pending(self) -> list[tuple[str, torch.Tensor, bool]]:
        """The points recorded since the last output call (not tied to any output yet)."""
        g = self._group
        return [] if g is None or not g.untied else g.points[-g.untied :]

    def _active(self) -> bool:
        return (
            self.enabled
            and torch.is_grad_enabled()
            and (self.mode != "bp" or self._capture is not None)
            and not _in_backward()
        )

    @contextlib.contextmanager
    def capture(self) -> Iterator[Capture]:
        """Run forwards as plain backprop (no cut, no delivery) while recording the feedback points and outputs.

        For instruments such as the alignment monitor: inside the context a forward keeps the full backprop
        graph, and the returned :class:`Capture` holds each point's tensor (still attached to the graph) and
        each output tensor, so ``torch.autograd.grad`` can give the true gradients there, and
        :meth:`feedback_for` the DFA signal for the same error.

        Example:
            >>> net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
            >>> engine = FeedbackEngine()
            >>> _ = engine.attach(net)
            >>> with engine.capture() as cap:
            ...     y = net(torch.randn(4, 3))
            >>> [p.key for p in cap.points], len(cap.outputs)
            (['1'], 1)
        """
        cap = Capture()
        previous, self._capture = self._capture, cap
        try:
            yield cap
        finally:
            self._capture = previous
            self._group = None

    # ------------------------------------------------------------------ forward hooks
    def _group_for(self, name: str) -> _Group:
        """The current forward's group; a block recorded again after an output was tied starts a new forward."""
        g = self._group
        if g is None or g.state.closed or (g.outputs and name in g.calls):
            g = self._group = _Group(after_ties=g is not None and bool(g.ties))
        return g

    def _record(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        g = self._group_for(name)
        count = g.calls.get(name, 0)
        g.calls[name] = count + 1
        key = name if count == 0 else f"{name}#{count}"
        flatten = name.split(":")[0] in self._flatten
        for observer in self._point_observers:
            observer(key, tensor)
        if self._capture is not None:
            self._capture.points.append(CapturedPoint(key, tensor, flatten))
            return tensor
        if self.mode == "dfa":
            if g.ties or g.after_ties:  # an output was tied before this point: was the point computed from it?
                for delivery in _deliveries_upstream_of(tensor):
                    delivery.feeds_point = True
            g.points.append((key, tensor, flatten))
            g.untied += 1
            self.report.points_recorded += 1
            if not g.soft and self._probe_pending and _sequence_shaped(tensor.shape, flatten):
                g.soft = True  # from here on, this forward's points stay connected for a layout probe
            if g.soft:
                cut = _SoftCut.apply(self, tensor)
                g.cuts[id(cut)] = tensor
                g.copies.append(cut)  # kept alive, so that no other tensor takes its id in this forward
                return cut
        return tensor.detach()

    def _carries(self, tensor: torch.Tensor | None) -> bool:
        """The tensor carries gradient from something other than a soft cut (in a layout-probe forward, a value
        computed only from cut points carries none, as after an ordinary cut)."""
        if not _carries_grad(tensor):
            return False
        g = self._group
        return g is None or not g.soft or _grad_beyond_soft_cuts(tensor)

    def _on_block_input(self, block: Block, args: tuple, kwargs: dict) -> Any:
        if not self._active() or _frozen(block):
            return None
        tensor, rebuild = _split_input(args, kwargs)
        if not self._carries(tensor):
            return None
        return rebuild(self._record(block.name + ":in", tensor))

    def _on_block_output(self, block: Block, output: Any) -> Any:
        if not self._active() or _frozen(block):
            return None
        tensor, rebuild = _split_main(output)
        if not self._carries(tensor):
            return None
        return rebuild(self._record(block.name, tensor))

    def _on_head_input(self, name: str, args: tuple, kwargs: dict) -> Any:
        """``cut_head_input``: the output module's input becomes the point ``"<output>:in"`` (detached downstream)."""
        if not self._active():
            return None
        tensor, rebuild = _split_input(args, kwargs)
        if not self._carries(tensor):
            return None
        return rebuild(self._record(name + ":in", tensor))

    def _on_output(self, name: str, output: Any, auto: bool = False) -> Any:
        if auto and (self._capture is not None or not self._active()):
            return None  # a candidate is not the discovered output: it does not end a capture or a forward
        if self._capture is not None and self._active():
            tensor, _ = _split_main(output)
            if tensor is not None:
                self._capture.outputs.append(tensor)
            self._group = None
            return None
        if not self._active() or self.mode != "dfa":
            self._group = None
            return None
        tensor, rebuild = _split_main(output)
        g = self._group
        # A frozen output module (a fixed readout) still gets tied: the points carry the gradient, and the
        # error reaches the delivery even though the output itself needs none.
        if g is None or g.state.closed or not g.points:
            return None
        if tensor is None or not tensor.is_floating_point():
            if not auto:
                self.report.untied_outputs.append(type(output).__name__ if tensor is None else f"{tensor.dtype} tensor")
            return None
        if auto and not tensor.requires_grad:
            return None  # a candidate whose output carries no gradient cannot be where the loss reads the error
        calls = g.outputs.get(name, 0)
        g.outputs[name] = calls + 1
        source = name if calls == 0 else f"{name}#{calls}"
        tensors = [t for _, t, _ in g.points]
        metas = [_PointMeta(k, t.shape, t.dtype, f, self._norm_of(k, f)) for k, t, f in g.points]
        delivery = _Delivery(self, metas, source)
        module = self._modules.get(name)
        delivery.frozen = module is not None and not any(p.requires_grad for p in module.parameters())
        if len(g.outputs) > 1 or calls:  # another output was tied in this forward: was it computed from it?
            delivery.upstream = _deliveries_upstream_of(tensor)
        if g.soft:
            delivery.probe = (tensor, tensors)
        if self._true_ids is None:  # until a backward delivered: which parameters lie between cuts and output
            delivery.reached = _parameters_reached(tensor)
        delivery.forward = g.state
        g.untied = 0
        g.ties.append(delivery)
        self._consumers_complete = True
        self.report.outputs_tied += 1
        return rebuild(_DeliverFeedback.apply(delivery, tensor, *tensors))

    def _on_norm_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Norm-aware feedback: a normalisation reading a point recorded in this forward makes it that point's
        consumer (the point's feedback will pass through its Jacobian). Checked until the first delivery."""
        if self._consumers_complete and self._capture is None:
            return None
        if not torch.is_grad_enabled() or _in_backward():
            return None
        tensor, _ = _split_input(args, kwargs)
        if tensor is None or not tensor.is_floating_point():
            return None
        g = self._group
        if g is not None and id(tensor) in g.cuts:  # a layout-probe forward: the point itself, not its copy
            tensor = g.cuts[id(tensor)]
        recorded = (
            [(p.key, p.tensor, p.flatten) for p in self._capture.points] if self._capture is not None else self._pending
        )
        for key, point, _ in reversed(recorded):
            if point.data_ptr() != tensor.data_ptr() or point.shape != tensor.shape:
                continue
            # (a flattened point, such as a patch embedding's output, keeps its own shape: the norm's Jacobian
            # applies to it position by position, as the norm does)
            if id(module) not in self._norm_kinds:
                self._norm_kinds[id(module)] = probe_normalisation(module, tensor)
            spec = self._norm_kinds[id(module)]
            if spec is not None:
                self._consumers.setdefault(key.split("#")[0], spec)
                if id(module) in self._inside_blocks:
                    self._point_norms.add(id(module))
            break
        return None

    def _on_norm_output(self, name: str, module: nn.Module, output: Any) -> Any:
        """``norm_points``: the output of a norm inside a block that reads a point is a point too."""
        if id(module) not in self._point_norms:
            return None
        tensor, rebuild = _split_main(output)
        if self.enabled and self.mode == "dfa" and torch.is_grad_enabled() and _in_backward() and _carries_grad(tensor):
            # an activation checkpoint's recomputation inside the block: cut as in the forward (a layout-probe
            # forward's soft cut, else a detach), so that the recomputed graph saves what the forward saved (the
            # point's feedback was delivered already)
            g = self._group
            return rebuild(_SoftCut.apply(self, tensor) if g is not None and g.soft else tensor.detach())
        if not self._active() or not self._carries(tensor):
            return None
        return rebuild(self._record(name, tensor))

    def _norm_of(self, key: str, flatten: bool) -> NormSpec | None:
        """The Jacobian that shapes point ``key``'s feedback, or ``None``."""
        mode = self.norm_feedback
        if mode == "layernorm":
            return NormSpec("layer", 1e-5, -1 if flatten else 1)
        if mode == "off":
            return None
        return self._consumers.get(key.split("#")[0])

    def _on_output_input(self, name: str, args: tuple, kwargs: dict) -> Any:
        tensor, rebuild = _split_input(args, kwargs)
        if tensor is None:
            return None
        g = self._group
        if g is not None and id(tensor) in g.cuts:  # a layout-probe forward: the point itself, not its copy
            tensor = g.cuts[id(tensor)]
        if self._active() and self.mode == "dfa" and g is not None and (not tensor.requires_grad or g.soft):
            # The head reads the last block's output directly: that block gets the true error at the head's
            # input (it is where the error is read), the other points get its projection.
            for i in range(len(g.points) - 1, -1, -1):
                original = g.points[i][1]
                if original.data_ptr() == tensor.data_ptr() and original.shape == tensor.shape:
                    del g.points[i]
                    g.untied = min(g.untied, len(g.points))
                    tensor = original
                    break
        tied = self._on_output(name, tensor)
        return None if tied is None else rebuild(tied)

    # ------------------------------------------------------------------ backward
    def _align(self, error: torch.Size, point: _PointMeta, source: str = "") -> tuple[str, int, int]:
        shape = _laid_out(point)
        kind = _fit(error, shape, point.flatten)
        if kind is None:
            swapped = "" if point.layout == "swapped" else " (its first two dimensions swapped do not fit either)"
            output = source or (self.target.output_name if self.target else "?")
            raise RuntimeError(
                f"DFA: cannot line up the error of shape {list(error)} (gradient at the output module "
                f"{output!r}) with feedback point {point.key!r} of shape "
                f"{list(point.shape)}{swapped}: their first (batch) dimensions differ. Choose an output= whose "
                "output has the blocks' batch/positions dimensions, or other blocks=."
            )
        if kind in ("token", "broadcast", "mean"):
            return kind, error[-1], shape[-1]
        return kind, math.prod(error[1:]), math.prod(shape[1:])

    def _source_key(self, delivery: _Delivery | None) -> str:
        """The feedback matrices' key of an output: ``""`` for the (first call of the) primary output."""
        if delivery is None or self.target is None or delivery.source == self.target.output_name:
            return ""
        return delivery.source

    def _project(
        self,
        error: torch.Tensor,
        points: list[_PointMeta],
        activations: list[torch.Tensor] | None = None,
        delivery: _Delivery | None = None,
    ) -> list[torch.Tensor | None]:
        self.report.deliveries += 1
        source = self._source_key(delivery)
        laid = self._lay_out(error.shape, points, delivery)
        keep = [i for i, p in enumerate(laid) if p is not None]
        kept = [laid[i] for i in keep]
        acts = None if activations is None else [activations[i] for i in keep]
        self.last_points = kept
        fbs = self.feedback_for(error, kept, acts, source=source) if kept else []
        for observer in self._observers:
            observer(error, kept, fbs)
        out: list[torch.Tensor | None] = [None] * len(points)
        for i, fb in zip(keep, fbs):
            out[i] = fb
        return out

    def _lay_out(
        self, error: torch.Size, points: list[_PointMeta], delivery: _Delivery | None
    ) -> list[_PointMeta | None]:
        """Each point with its layout relative to this error (``None``: no feedback from this output this step).

        A sequence-shaped point whose first two dimensions could line up with the error either way (``[T, B, d]``
        against ``[B, T, V]`` with ``T == B``, or against rows ``[B * T, V]``) is lined up as the data flow says:
        the first forward after ``attach`` keeps such points connected (:class:`_SoftCut`), and the first delivery
        probes which of the point's positions the output's positions depend on (:meth:`_probe_layouts`). Until a
        probe has seen a point, it gets no feedback from such an output rather than a possibly transposed one."""
        source = delivery.source.split("#")[0] if delivery is not None else ""  # every call of a module alike
        out: list[_PointMeta | None] = list(points)
        check = [i for i, p in enumerate(points) if p.layout == "same" and _swappable(error, p)]
        todo = [i for i in check if (points[i].key.split("#")[0], source) not in self._layouts]
        if todo and delivery is not None and delivery.probe is not None:
            self._probe_layouts(error, delivery, todo)
        if delivery is not None and delivery.probe is not None:
            self._probe_pending = False
            delivery.probe = None  # the tensors are no longer needed
        for i in check:
            p = points[i]
            relation = self._layouts.get((p.key.split("#")[0], source))
            if relation is None:
                out[i] = None
                self._probe_pending = True  # the next forward probes it
            elif relation == "swapped" or (relation == "none" and _fit(error, p.shape, p.flatten) is None):
                out[i] = dataclasses.replace(p, layout="swapped")
            elif _fit(error, p.shape, p.flatten) is None:
                raise RuntimeError(
                    f"DFA: feedback point {p.key!r} of shape {list(p.shape)}: the data flow lines its first two "
                    f"dimensions up with those of the error {list(error)} of output {source!r}, but their sizes "
                    "differ. Choose other blocks= or output=."
                )
        return out

    def _probe_layouts(self, error: torch.Size, delivery: _Delivery, todo: list[int]) -> None:
        """Which of each point's first two dimensions the output's positions depend on: ONE vector-Jacobian
        product from the output (before the tie) back to the points, through the soft cuts, for a probe at one
        output position. For ``[T, B, d]`` points and a ``[B, T, V]`` output, output ``(b=0, t=1)`` depends on
        point positions ``(t, 0)`` (batch item 0), never on ``(0, 1)``; a position-wise head, attention,
        causal or not, all keep the batch items apart. Batch-mixing layers (BatchNorm in training) leave the own
        item's dependence far larger; a point whose dependence does not tell is refused."""
        assert delivery.probe is not None
        y, tensors = delivery.probe
        by_kind: dict[str, list[int]] = {}
        for i in todo:
            p = delivery.points[i]
            kind = _fit(error, p.shape, p.flatten) or _fit(error, _swapped(p.shape), p.flatten)
            by_kind.setdefault("mean" if kind == "mean" else "token", []).append(i)
        g = torch.Generator().manual_seed(0)
        for kind, idx in by_kind.items():
            wrt = [tensors[i] for i in idx]
            grads: Sequence[torch.Tensor | None] = [None] * len(idx)
            if y.requires_grad and all(t.requires_grad for t in wrt):
                v = torch.zeros(y.shape, dtype=y.dtype, device=y.device)
                r = torch.randn(error[-1], generator=g).to(v)
                if kind == "token":  # the output's second position, (0, 1) or row 1 (for a broadcast: item 1)
                    v.view(-1, error[-1])[1] = r
                else:
                    v[1] = r  # the output's second item, all its positions
                self._probing = True
                try:
                    grads = torch.autograd.grad([y], wrt, [v], retain_graph=True, allow_unused=True)
                finally:
                    self._probing = False
            for i, grad in zip(idx, grads):
                p = delivery.points[i]
                fits = _fit(error, p.shape, p.flatten) or _fit(error, _swapped(p.shape), p.flatten)
                relation = _layout_from_dependence(grad, p.shape, "token" if fits == "token" else "broadcast")
                if relation is None:
                    raise RuntimeError(
                        f"DFA: cannot tell how feedback point {p.key!r} of shape {list(p.shape)} lines up with the "
                        f"error of shape {list(error)} of output {delivery.source!r}: the output's positions depend "
                        "on the point's positions along both of its first two dimensions. Choose blocks= whose "
                        "outputs keep the batch items apart, or another output=."
                    )
                self._layouts[(p.key.split("#")[0], delivery.source.split("#")[0])] = relation

    def feedback_for(
        self,
        error: torch.Tensor,
        points: Sequence[_PointMeta | CapturedPoint],
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
        points = [
            _PointMeta(p.key, p.tensor.shape, p.tensor.dtype, p.flatten, self._norm_of(p.key, p.flatten))
            if isinstance(p, CapturedPoint)
            else p
            for p in points
        ]
        if any(p.norm is not None and h is None for p, h in zip(points, activations)):
            raise ValueError("DFA: norm-aware feedback needs the points' activations (pass activations=).")
        aligned = [self._align(error.shape, p, source) for p in points]
        widest: dict[tuple[str, int], int] = {}
        for p, (kind, k, d) in zip(points, aligned):
            self.bank.check_point(p.key if not source else f"{p.key}@{source}", k, d)
            widest[(kind, k)] = max(widest.get((kind, k), 0), d)
        projector = self._projector_for(source, error.device, error.dtype)
        scale, distinct = self.config.scale, self.config.distinct
        projections = {}
        for (kind, k), width in widest.items():
            projected = _projected(projector, _error_rows(error, kind, k), width)
            # scaled once here when every point of this error width takes the whole projection
            shared = not distinct and all(d == width for (kd, kk, d) in aligned if (kd, kk) == (kind, k))
            projections[(kind, k)] = (projected * (scale / math.sqrt(width)) if shared else projected, shared)
        out = []
        for p, (kind, k, d) in zip(points, aligned):
            projected, scaled = projections[(kind, k)]
            fb = projected if projected.shape[-1] == d else projected[..., :d]
            if distinct:
                fb = fb * (self.bank.signs(p.key, d, fb.device, fb.dtype) * (scale / math.sqrt(d)))
            elif not scaled:
                fb = fb * (scale / math.sqrt(d))
            out.append(_laid_on(fb, p, kind, error.shape))
        transform = self.config.feedback_transform
        if transform is not None:
            out = [_checked_transform(transform, p.key, fb) for p, fb in zip(points, out)]
        return [
            fb if p.norm is None else norm_vjp(h.detach(), fb, p.norm) for h, fb, p in zip(activations, out, points)
        ]

    def end_backward(self) -> BackwardReport:
        """Close a backward: check that feedback fired (``mode="dfa"``) and reset the counters.

        Raises:
            RuntimeError: in ``mode="dfa"``, if no feedback reached the blocks in this backward, with the reason.
        """
        report, self.report = self.report, BackwardReport()
        self._group = None
        if self.mode == "dfa" and self.attached and report.deliveries == 0:
            raise RuntimeError(self._explain_silence(report))
        return report

    def check_loss(self, loss: torch.Tensor) -> None:
        """Refuse a loss that cannot carry the error back to the output module."""
        if self.mode != "bp" and isinstance(loss, torch.Tensor) and not loss.requires_grad:
            out = self._output_names()
            if self._pending:
                # points recorded (and detached) after the last call of the output module: the loss was computed
                # from a block's output, which DFA cuts from what follows
                last = self._pending[-1][0].split("#")[0].split(":")[0]
                raise RuntimeError(
                    f"DFA: the loss does not require grad: it was computed downstream of block {last!r}, whose output "
                    f"DFA detaches, so it does not depend on the output module {out}. Compute the loss from that "
                    "module's output (logits, predictions), or pass output= naming the module it is computed from; "
                    "if blocks= names that module (or a module containing it), remove it from blocks=: the output "
                    "must lie after the last block."
                )
            raise RuntimeError(
                f"DFA: the loss does not require grad, so it does not depend on the output module {out} "
                f"(mode={self.mode!r} detaches everything else). Compute the loss from that module's output "
                "(logits, predictions), or pass output= naming the module it is computed from."
            )

    def _output_names(self) -> str:
        names = [n for n, _ in self.target.outputs] if self.target else ["?"]
        return repr(names[0]) if len(names) == 1 else f"(any of {names})"

    def _explain_silence(self, report: BackwardReport) -> str:
        out = self._output_names()
        names = [b.name for b in self.target.blocks] if self.target else []
        if report.points_recorded == 0:
            why = f"no block ran with gradients enabled in this step's forward (blocks: {names[:6]}...)."
        elif report.outputs_tied == 0 and report.untied_outputs:
            kinds = sorted(set(report.untied_outputs))
            why = (
                f"the output module {out} was called after the blocks, but returned {', '.join(kinds)}, where DFA "
                "needs a floating-point tensor to read the error at (the output itself, the first item of a tuple or "
                "list, or the first field of a ModelOutput). Make it return the tensor the loss is computed from "
                "(logits, predictions) first, or pass output= naming the submodule that produces that tensor."
            )
        elif report.outputs_tied == 0:
            why = f"the output module {out} was not called after the blocks in this step's forward."
        elif self._candidates:
            why = f"the loss does not depend on the output module {out} nor on another layer after the blocks."
        else:
            why = f"the loss does not depend on the output module {out}."
        return (
            f"DFA: no feedback reached the blocks in this backward: {why} Training would silently update only "
            "the layers after the last block. Pass output= naming the module whose output the loss is computed "
            "from (and blocks= if needed), or use mode='shallow' if that is what you want."
        )

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
            state["projector"] = {"class": _class_name(self.config.projector), "outputs": outputs}
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
            self._reconcile(options)
        else:
            self._saved_options = options
        self.bank.load_state_dict(state)
        self._projectors, self._projectors_for = {}, None
        self._projector_states = dict(state["projector"]["outputs"]) if "projector" in state else {}

    def _reconcile(self, saved: dict[str, Any]) -> None:
        """Compare saved options with the configuration: refuse a different :data:`RESUME_REFUSES` option, take a
        different :data:`RESUME_KEEPS` option from the checkpoint and say so."""
        given = _class_name(self.config.projector) if self.config.projector is not None else None
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
                continue
            if name in _AUTO_OPTIONS and getattr(self.config, name) is None:  # "choose for me": the saved choice
                setattr(self.config, name, saved[name])
            elif saved[name] != getattr(self.config, name):
                raise RuntimeError(
                    f"DFA: the checkpoint's feedback was written with {name}={saved[name]!r}, but this run gives "
                    f"{name}={getattr(self.config, name)!r}. {name} decides {_DECIDES[name]}, so the saved feedback "
                    f"cannot continue under another value. Resume with {name}={saved[name]!r}, or start a new fit "
                    "from the weights alone (Model.load_from_checkpoint(path), then fit without ckpt_path)."
                )
        kept = []
        for name in RESUME_KEEPS:
            if name not in saved:
                continue
            given = getattr(self.config, name)
            if name in _AUTO_OPTIONS and given is None:  # "choose for me": the saved choice continues
                setattr(self.config, name, saved[name])
            elif saved[name] != given:
                kept.append(f"{name}={saved[name]!r} (this run gives {given!r})")
                setattr(self.config, name, saved[name])
        if kept:
            warnings.warn(
                "DFA: resuming with the checkpoint's feedback options " + ", ".join(kept) + ": the saved feedback "
                "continues unchanged. To train with other values, start a new fit from the weights alone "
                "(Model.load_from_checkpoint(path), then fit without ckpt_path).",
                UserWarning,
                stacklevel=3,
            )

    # ------------------------------------------------------------------ reporting
    def parameter_roles(self, root: nn.Module | None = None) -> dict[str, int]:
        """Number of trainable parameters trained by feedback, by their true gradient, or not at all."""
        root = root or self.root
        if root is None or self.target is None:
            raise RuntimeError("DFA: attach() the engine first.")
        measured = self._true_ids is not None  # measured from the forward at the first delivery
        after = self._true_ids if self._true_ids is not None else _params_after_blocks(root, self.target)
        cut = self._cut and not measured  # the cut is in the measurement
        out_ids = {id(p) for _, m in self.output_modules() for p in m.parameters()}
        roles = {"feedback": 0, "true gradient": 0, "none": 0}
        seen: set[int] = set()
        for p in root.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if not p.requires_grad:
                roles["none"] += p.numel()
            elif self.mode == "bp" or id(p) in out_ids or (id(p) in after and not cut):
                roles["true gradient"] += p.numel()
            elif self.mode == "shallow":
                roles["none"] += p.numel()
            else:
                roles["feedback"] += p.numel()
        return roles

    def role_of(self, parameter: nn.Parameter) -> str:
        """``"feedback"``, ``"true gradient"`` or ``"none"``: how a parameter of the model is trained (as counted by
        :meth:`parameter_roles`).

        Example:
            >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
            >>> engine = FeedbackEngine()
            >>> _ = engine.attach(net)
            >>> engine.role_of(net[0].weight), engine.role_of(net[2].weight)
            ('feedback', 'true gradient')
        """
        if self.root is None or self.target is None:
            raise RuntimeError("DFA: attach() the engine first.")
        if not parameter.requires_grad:
            return "none"
        if self.mode == "bp" or any(parameter is p for _, m in self.output_modules() for p in m.parameters()):
            return "true gradient"
        measured = self._true_ids is not None
        after = self._true_ids if self._true_ids is not None else _params_after_blocks(self.root, self.target)
        if id(parameter) in after and (measured or not self._cut):
            return "true gradient"
        return "none" if self.mode == "shallow" else "feedback"

    def summary(self, shapes: dict[str, list[int]] | None = None) -> str:
        """A short table: feedback points, shapes (``shapes`` or once seen), output, feedback kind, parameter roles."""
        from .summary import format_summary

        return format_summary(self, shapes)

    def probe_shapes(self, root: nn.Module, example: Any) -> dict[str, list[int]]:
        """Shapes of the feedback points for one forward of ``example`` (in eval mode, RNG state restored).

        Used at fit start for the summary table, like Lightning's model summary uses ``example_input_array``.
        """
        was_training = root.training
        cpu_state = torch.get_rng_state()
        cuda_states = (
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        )
        root.eval()
        try:
            with torch.enable_grad(), self.capture() as cap:
                if isinstance(example, (tuple, list)):
                    root(*example)
                elif isinstance(example, dict):
                    root(**example)
                else:
                    root(example)
        finally:
            root.train(was_training)
            torch.set_rng_state(cpu_state)
            if cuda_states is not None:
                torch.cuda.set_rng_state_all(cuda_states)
        return {p.key: list(p.tensor.shape) for p in cap.points}


def _swapped(shape: torch.Size) -> torch.Size:
    return torch.Size((shape[1], shape[0], *shape[2:]))


def _laid_out(point: _PointMeta) -> torch.Size:
    """The point's shape in the error's order of positions."""
    return _swapped(point.shape) if point.layout == "swapped" else point.shape


def _error_rows(error: torch.Tensor, kind: str, k: int) -> torch.Tensor:
    """The error as the rows a point of alignment ``kind`` is fed from (``[..., k]``)."""
    if kind == "token":
        return error
    if kind == "broadcast":
        return error.reshape(-1, k)
    if kind == "mean":
        return error.mean(dim=1)
    return error.reshape(error.shape[0], -1)


def _projected(projector: Projector, rows: torch.Tensor, width: int) -> torch.Tensor:
    """``projector.project`` of ``rows`` (``[..., k]``) as ``[n, k]`` rows, back in ``rows``' leading shape."""
    flat = rows.reshape(-1, rows.shape[-1])
    out = projector.project(flat, width)
    if not isinstance(out, torch.Tensor) or out.shape != (flat.shape[0], width):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise RuntimeError(
            f"DFA: projector {type(projector).__name__}.project(error, width={width}) returned {got} for error rows "
            f"of shape {list(flat.shape)}; it must return the [n, width] = {[flat.shape[0], width]} raw feedback."
        )
    return out.reshape(*rows.shape[:-1], width)


def _laid_on(fb: torch.Tensor, point: _PointMeta, kind: str, error: torch.Size) -> torch.Tensor:
    """A point's feedback (``[..., d]``, in the error's order of positions) in the point's own shape and dtype."""
    shape = _laid_out(point)
    d = fb.shape[-1]
    if kind == "broadcast":
        j = _prefix(error, shape)
        assert j is not None
        fb = fb.reshape(*shape[:j], *([1] * (len(shape) - 1 - j)), d).expand(shape)
    elif kind == "mean":
        fb = fb.unsqueeze(1).expand(shape)
    elif fb.shape != shape:  # "flatten", or "token" with the positions flattened on one side
        fb = fb.reshape(shape)
    if point.layout == "swapped":
        fb = fb.transpose(0, 1)
    return fb if fb.dtype == point.dtype else fb.to(point.dtype)


def _class_name(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _default_distribution(projector: Projector, distribution: str) -> None:
    """Give the random-matrix projectors (also inside wrappers) whose ``distribution`` is ``None`` the engine's."""
    while isinstance(projector, Projector):
        if isinstance(projector, Dense) and projector.distribution is None:
            projector.distribution = distribution
        projector = getattr(projector, "inner", None)


def _fit(error: torch.Size, shape: torch.Size, flatten: bool) -> str | None:
    """How a point of ``shape`` lines up with an error of shape ``error`` (``None``: it does not)."""
    if not flatten and len(error) >= 1 and error[:-1] == shape[:-1]:
        return "token"
    if not flatten and min(len(error), len(shape)) >= 2 and _merged(error[:-1], shape[:-1]):
        # the same tokens, one side flattened to rows (``x.view(-1, d)`` before a Linear, as OPT's MLP, a head
        # applied to ``[batch * positions, d]``, or ``[batch, choices, positions]`` folded into ``[batch * choices,
        # positions]``): row-major order lines them up
        return "token"
    if not flatten and len(error) >= 2 and _prefix(error, shape) is not None:
        # one error row per item (or per ``[batch, choices]`` pair folded into the point's first dimension):
        # broadcast over the point's positions
        return "broadcast"
    if len(error) == 0 or len(shape) == 0 or error[0] != shape[0]:
        return None
    if not flatten and len(shape) == 3 and len(error) == 3:
        return "mean"  # per-item errors over other positions (a decoder's, for an encoder's points): their mean
    return "flatten"


def _prefix(error: torch.Size, shape: torch.Size) -> int | None:
    """``j`` such that the error's leading positions are the point's first ``j`` dimensions, with positions
    (at least one dimension) left over, or ``None``."""
    n = math.prod(error[:-1])
    for j in range(1, len(shape) - 1):
        if math.prod(shape[:j]) == n:
            return j
    return None


def _merged(a: Sequence[int], b: Sequence[int]) -> bool:
    """One list of sizes is the other with runs of consecutive dimensions merged (``[2, 3, 8]`` and ``[6, 8]``)."""
    prefix_a = set(itertools.accumulate(a, operator.mul))
    prefix_b = set(itertools.accumulate(b, operator.mul))
    return math.prod(a) == math.prod(b) and (prefix_a <= prefix_b or prefix_b <= prefix_a)


def _sequence_shaped(shape: torch.Size, flatten: bool) -> bool:
    """A point whose first two dimensions could be (batch, positions) either way round."""
    return not flatten and len(shape) >= 3 and shape[0] >= 2 and shape[1] >= 2


def _swappable(error: torch.Size, point: _PointMeta) -> bool:
    """The point's first two dimensions, swapped, would also line up with the error (position-wise or per item)."""
    if not _sequence_shaped(point.shape, point.flatten):
        return False
    return _fit(error, _swapped(point.shape), point.flatten) in ("token", "broadcast", "mean")


def _layout_from_dependence(grad: torch.Tensor | None, shape: torch.Size, kind: str) -> str | None:
    """``"same"``, ``"swapped"``, ``"none"`` (no dependence) or ``None`` (undecided) from a probe's gradient at a
    point: for a probe at output position ``(0, 1)`` (``kind="token"``), the same layout puts the dependence on
    point positions of item 0 (row 0) or item 1 (column 1), the swapped one on row 1 or column 0; for a probe at
    output item 1 (``kind="broadcast"``), on row 1 or on column 1."""
    if grad is None:
        return "none"
    mass = grad.detach().float().reshape(shape[0], shape[1], -1).abs().sum(-1)
    i = torch.arange(shape[0], device=mass.device).unsqueeze(1)
    j = torch.arange(shape[1], device=mass.device).unsqueeze(0)
    if kind == "token":
        same, swapped = (i == 0) | (j == 1), (i == 1) | (j == 0)
    else:
        same, swapped = (i == 1).expand(mass.shape), (j == 1).expand(mass.shape)
    a = float(mass[same & ~swapped].sum())
    b = float(mass[swapped & ~same].sum())
    if a == 0 and b == 0:
        return "none"
    if a > 10 * b:
        return "same"
    if b > 10 * a:
        return "swapped"
    return None


def _grad_beyond_soft_cuts(tensor: torch.Tensor) -> bool:
    """In a layout-probe forward: the tensor requires grad through something other than a soft cut (a parameter,
    an input that requires grad), as it would after an ordinary cut (``detach``)."""
    stack = [tensor.grad_fn]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen or isinstance(node, _SoftCut._backward_cls):
            continue
        seen.add(id(node))
        if not node.next_functions and type(node).__name__ == "AccumulateGrad":
            return True
        stack.extend(n for n, _ in node.next_functions)
    return tensor.grad_fn is None  # a leaf that requires grad


def _frozen(block: Block) -> bool:
    """A block whose parameters are all frozen: no feedback point (it cannot learn; for a step in which a network
    is frozen, such as the discriminator in a generator's step, it is part of the loss)."""
    params = block.parameters()
    return bool(params) and not any(p.requires_grad for p in params)


def _parameters_reached(tensor: torch.Tensor, limit: int = 100_000) -> set[int]:
    """``id`` of the parameters ``tensor`` was computed from without crossing a cut or a delivery's points: those
    that an output delivering there trains by their true gradient."""
    found: set[int] = set()
    stack = [tensor.grad_fn]
    seen: set[int] = set()
    while stack and len(seen) < limit:
        node = stack.pop()
        if node is None or id(node) in seen or isinstance(node, _SoftCut._backward_cls):
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.Tensor):
            found.add(id(variable))
        nexts = node.next_functions
        if isinstance(node, _DeliverFeedback._backward_cls):
            nexts = nexts[:1]  # the output it ties, not its points
        stack.extend(n for n, _ in nexts)
    return found


def _deliveries_upstream_of(tensor: torch.Tensor, limit: int = 4096) -> list[_Delivery]:
    """The deliveries of earlier output calls whose (tied) outputs ``tensor`` was computed from, found by a walk
    of its graph back to the cuts (the tail after the blocks: a few nodes)."""
    found: list[_Delivery] = []
    stack = [tensor.grad_fn]
    seen: set[int] = set()
    while stack and len(seen) < limit:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, _DeliverFeedback._backward_cls):
            found.append(node.delivery)
            continue
        if isinstance(node, _SoftCut._backward_cls):
            continue
        stack.extend(n for n, _ in node.next_functions)
    return found


def check_state(state: Any) -> None:
    """Refuse a feedback state that :meth:`FeedbackEngine.state_dict` cannot have written: missing keys, wrong
    types, non-finite or misshapen tensors, an unknown version, or option values no :class:`DFAConfig` accepts.

    Example:
        >>> state = FeedbackEngine().state_dict()
        >>> check_state(state)
        >>> check_state({**state, "scale": float("nan")})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: DFA: the checkpoint's feedback state is damaged: ...scale must be a finite, non-zero number...
    """
    check_bank_state(state)
    saved = state.get("projector")
    if saved is not None and not (
        isinstance(saved, dict) and isinstance(saved.get("class"), str) and isinstance(saved.get("outputs"), dict)
    ):
        raise ValueError(
            "DFA: the checkpoint's feedback state is damaged: its projector entry is not {'class': name, 'outputs': "
            "{output: state}}. Resume from another checkpoint, or start a new fit from the weights alone "
            "(Model.load_from_checkpoint(path), then fit without ckpt_path)."
        )
    options = {name: state[name] for name in _SAVED_OPTIONS if name in state}
    try:
        DFAConfig(**options)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"DFA: the checkpoint's feedback state is damaged: its saved options are invalid ({err}). Resume from "
            "another checkpoint, or start a new fit from the weights alone (Model.load_from_checkpoint(path), then "
            "fit without ckpt_path)."
        ) from None


def _params_after_blocks(root: nn.Module, target: Target) -> set[int]:
    if not target.blocks:
        return set()
    names = [n for n, _ in root.named_modules()]
    order = {n: i for i, n in enumerate(names)}
    last = max(order.get(b.name, -1) for b in target.blocks)
    # everything registered after the last block's subtree, and not inside any block
    block_ids = target.block_param_ids()
    after: set[int] = set()
    for name, module in root.named_modules():
        if order[name] <= last or any(name == b.name or name.startswith(b.name + ".") for b in target.blocks):
            continue
        for p in module.parameters(recurse=False):
            if id(p) not in block_ids:
                after.add(id(p))
    return after


def _widens(output: nn.Module) -> bool:
    """Whether an output module maps to more features than it reads (a Linear head over a vocabulary)."""
    weight = getattr(output, "weight", None)
    if isinstance(output, nn.Linear):
        return output.out_features > output.in_features
    return isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] > weight.shape[1]


def _only_norms_before(root: nn.Module, target: Target) -> bool:
    """Whether every trainable module registered after the last block, other than the outputs, is a norm."""
    after = _params_after_blocks(root, target)
    outputs = {id(p) for _, m in target.outputs for p in m.parameters()}
    for module in root.modules():
        own = [p for p in module.parameters(recurse=False) if id(p) in after and id(p) not in outputs]
        if own and not _may_normalise(module):
            return False
    return True


def _checked_transform(
    transform: Callable[[str, torch.Tensor], torch.Tensor], key: str, feedback: torch.Tensor
) -> torch.Tensor:
    """``transform(key, feedback)``, refused unless it keeps the feedback's shape."""
    out = transform(key, feedback)
    if not isinstance(out, torch.Tensor) or out.shape != feedback.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise RuntimeError(
            f"DFA: feedback_transform returned {got} for point {key!r}, whose feedback has shape "
            f"{tuple(feedback.shape)}; it must return a tensor of the same shape."
        )
    return out


def _last_top_level_block(root: nn.Module, target: Target) -> str | None:
    """Name of the top-level block registered last in ``root`` (the one whose output feeds the tail)."""
    order = {n: i for i, (n, _) in enumerate(root.named_modules())}
    tops = [b.name for b in target.blocks if b.top_level]
    return max(tops, key=lambda n: order.get(n, -1)) if tops else None


def _in_backward() -> bool:
    """True while autograd runs a backward: a forward there is a checkpoint's recomputation (non-reentrant
    activation checkpointing), whose hooks must not record points (its feedback was delivered already)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def _has_conv(block: Block) -> bool:
    mods: Sequence[nn.Module] = block.members or (block.entry,)
    return any(isinstance(m, nn.modules.conv._ConvNd) for mod in mods for m in mod.modules())


def _refuse_reentrant_checkpointing(root: nn.Module) -> None:
    for name, module in root.named_modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            func = getattr(module, "_gradient_checkpointing_func", None)
            keywords = getattr(func, "keywords", {}) or {}
            if keywords.get("use_reentrant", True):
                raise RuntimeError(
                    f"DFA: {name or type(root).__name__} uses reentrant gradient checkpointing, whose forward runs "
                    "without gradients and so hides the blocks from DFA. Enable it as "
                    "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})."
                )
