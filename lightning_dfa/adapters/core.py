"""Flavour-agnostic logic of the DFA strategy and callback (no Lightning import here)."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from ..blocks import Target
from ..checks import (
    DivergenceWatch,
    UnfedBlocks,
    check_state,
    lazy_modules,
    only_layers_after_frozen_blocks,
    refuse_reentrant_checkpointing,
    uninitialized,
)
from ..config import DFAConfig
from ..engine import FeedbackEngine
from ..points import call_with_example, to_device
from ..projectors.bank import uses_sketch
from ..summary import mostly_backprop


def materialize_lazy_modules(module: nn.Module) -> None:
    """Give lazy modules (``nn.LazyLinear``...) their shapes before DFA attaches: one forward of the
    LightningModule's ``example_input_array``, without gradients and in evaluation mode (no running statistics
    change), as Lightning's model summary runs it. Nothing where no module is lazy or no example is set (the engine
    then says what to do)."""
    example = getattr(module, "example_input_array", None)
    if example is None or not lazy_modules(module):
        return
    device = next((t.device for t in [*module.parameters(), *module.buffers()] if not uninitialized(t)), None)
    if device is not None:
        example = to_device(example, device)
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            call_with_example(module, example)
    finally:
        for m, training in modes.items():
            m.training = training


#: where the DFA strategy and the DFA callback both store the feedback state in a Lightning checkpoint
CHECKPOINT_KEY = "dfa"
#: the DFA callback's ``state_key``; checkpoints of earlier versions of the callback kept the feedback state under
#: ``checkpoint["callbacks"]["DFA"]``, which both forms still read
CALLBACK_KEY = "DFA"


def feedback_state(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The feedback state of a Lightning checkpoint, whichever DFA form wrote it (``None`` if it holds none).

    Both forms write ``checkpoint["dfa"]``; a state under ``checkpoint["callbacks"]["DFA"]`` (earlier versions of
    the callback) is read too, and two different states are refused.

    Example:
        >>> feedback_state({"dfa": {"seed": 1}}), feedback_state({"callbacks": {"DFA": {"seed": 2}}})
        ({'seed': 1}, {'seed': 2})
        >>> feedback_state({"state_dict": {}}) is None
        True
    """
    top = checkpoint.get(CHECKPOINT_KEY) or None
    callbacks = checkpoint.get("callbacks")
    legacy = (callbacks.get(CALLBACK_KEY) if isinstance(callbacks, dict) else None) or None
    if top is not None and legacy is not None and not _same_state(top, legacy):
        raise RuntimeError(
            "DFA: the checkpoint holds two different feedback states, under checkpoint['dfa'] and "
            "checkpoint['callbacks']['DFA']; it was edited or merged from two runs. Delete the one that does not "
            "belong to this run, or resume from another checkpoint."
        )
    return top if top is not None else legacy


def _same_state(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a.cpu(), b.cpu())
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    return bool(a == b)


def check_ddp_mode(engine: FeedbackEngine, strategy: Any, callback: bool) -> None:
    """Refuse ``mode="shallow"`` under DDP without ``find_unused_parameters`` (or ``static_graph``) before the first
    step: the blocks get no gradient, and DDP's own error at the second step would point to a plain DDP strategy
    name, which drops DFA.

    Example:
        >>> class DDP:
        ...     _ddp_kwargs = {"find_unused_parameters": True}
        >>> check_ddp_mode(FeedbackEngine(mode="shallow"), DDP(), callback=False)
        >>> DDP._ddp_kwargs = {}
        >>> check_ddp_mode(FeedbackEngine(mode="shallow"), DDP(), callback=False)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        RuntimeError: DFA: mode='shallow' ... Use Trainer(strategy='dfa_ddp_find_unused_parameters_true') or ...
    """
    kwargs = getattr(strategy, "_ddp_kwargs", None)
    if engine.mode != "shallow" or not isinstance(kwargs, dict):
        return
    if kwargs.get("find_unused_parameters") or kwargs.get("static_graph"):
        return
    fix = (
        "Trainer(strategy='ddp_find_unused_parameters_true', callbacks=[DFA(mode='shallow')])"
        if callback
        else "Trainer(strategy='dfa_ddp_find_unused_parameters_true') or DFADDPStrategy(mode='shallow', "
        "find_unused_parameters=True)"
    )
    raise RuntimeError(
        "DFA: mode='shallow' gives the blocks and everything before them no gradient, and DDP refuses parameters "
        f"without gradients unless it looks for them (find_unused_parameters=True). Use {fix}."
    )


def _loss_scale(trainer: Any) -> float:
    """The loss scale of ``trainer``'s mixed-precision plugin (``16-mixed``'s gradient scaler), else 1."""
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    if scaler is None or not hasattr(scaler, "get_scale") or not getattr(scaler, "is_enabled", lambda: True)():
        return 1.0
    scale = float(scaler.get_scale())
    return scale if scale > 0 else 1.0


class DFAFit:
    """One engine on one LightningModule for one ``fit``: attach, check each backward, save/restore, detach."""

    def __init__(self, config: DFAConfig, verbose: bool = True, info: Callable[[str], Any] = print) -> None:
        if not isinstance(verbose, bool):
            raise ValueError(f"DFA: verbose must be True or False, got {verbose!r} ({type(verbose).__name__}).")
        self.config = config
        self.verbose = verbose
        self.info = info  # status lines (the Lightning package's rank_zero_info: rank 0 only, through logging)
        self.engine: FeedbackEngine | None = None
        self.pending_state: dict[str, Any] | None = None
        self._resumed_without_state = False
        self._summary_shown = False
        self._checked = False
        self._backprop_checked = False
        self._frozen_said = False
        self._heads: list[str] = []  # found at this step's loss, made outputs after its backward
        self._divergence = DivergenceWatch()
        self._unfed = UnfedBlocks()
        self._heads_added = False  # in the step under way (its unfed blocks are checked at the next one)
        self._loss: torch.Tensor | None = None  # the loss of the backward under way
        self._evaluation: contextlib.ExitStack | None = None  # the callback form's evaluation loop under way
        self._attached_with: tuple[nn.Module, Any, Target | None] | None = None

    def attach(
        self, module: nn.Module, trainer: Any = None, target: Target | None = None, summary: bool = True
    ) -> FeedbackEngine:
        if self.engine is not None and self.engine.attached:
            self.engine.detach()
        self._attached_with = (module, trainer, target)
        fitting = str(getattr(getattr(getattr(trainer, "state", None), "fn", None), "value", "fit")) == "fit"
        engine = FeedbackEngine(DFAConfig(**vars(self.config)))
        state, self.pending_state = self.pending_state, None
        if state is not None and fitting:  # validate/test/predict use no feedback: a checkpoint's is not needed
            engine.load_state_dict(state)  # compared with the options in attach(), after configure_dfa()
        if self._resumed_without_state and fitting:
            warnings.warn(
                "DFA: the checkpoint being resumed holds no feedback state (it was written without DFA), so the "
                f"feedback is drawn anew from seed={engine.config.seed}. This is expected when DFA takes over a run "
                "trained otherwise; a DFA checkpoint always holds checkpoint['dfa'].",
                UserWarning,
                stacklevel=2,
            )
        self._resumed_without_state = False
        self.engine = engine
        materialize_lazy_modules(module)
        engine.attach(module, target)
        _note_optimizers(engine, trainer)
        self._summary_shown = False
        self._checked = False
        self._backprop_checked = False
        self._divergence = DivergenceWatch()
        self._unfed, self._heads_added = UnfedBlocks(), False
        if self.verbose and fitting and summary:
            self._summary_shown = self._show_summary(module, trainer)
        return self.engine

    def ensure_attached(self, module: nn.Module, trainer: Any = None, target: Target | None = None) -> FeedbackEngine:
        """The engine attached to ``module``: attached now unless it already is (the DDP flavours attach before
        DDP wraps the model, earlier than the other strategies)."""
        engine = self.engine
        if engine is not None and engine.attached and engine.root is module:
            return engine
        return self.attach(module, trainer, target)

    def _reattach(self) -> None:
        """Attached before the checkpoint was read (the DDP flavours attach before DDP wraps the model; FSDP reads
        it after set-up): attach again, so that the checkpoint's options decide the hooks (which tables are cut,
        which norms are points), as when it is read first."""
        if self.engine is not None and self.engine.attached and self._attached_with is not None:
            module, trainer, target = self._attached_with
            self.attach(module, trainer, target, summary=False)

    def _show_summary(self, module: nn.Module, trainer: Any) -> bool:
        """Print the table at fit start; True if it had the points' shapes (from ``example_input_array``)."""
        assert self.engine is not None
        shapes = None
        example = getattr(module, "example_input_array", None)
        if example is not None:
            try:
                transfer = getattr(module, "_apply_batch_transfer_handler", None)
                shapes = self.engine.probe_shapes(module, transfer(example) if callable(transfer) else example)
            except Exception as err:  # the summary must never stop training
                self.info(f"DFA: could not probe feedback shapes with example_input_array ({err}).")
        self.info("\n" + self.engine.summary(shapes or {}) + "\n")
        return bool(shapes)

    def detach(self) -> None:
        self.end_evaluation()
        if self.engine is not None:
            self.engine.detach()

    def new_step(self, trainer: Any = None) -> None:
        """A training step starts (see :meth:`FeedbackEngine.new_step`); the previous one's unfed blocks are said."""
        if self.engine is not None:
            if self._heads_added:  # heads made outputs in that step: their blocks are fed from this one on
                self._heads_added, self._unfed = False, UnfedBlocks()
            elif self.engine.mode == "dfa" and self.engine.target is not None and not self._unfed.done:
                said = self._unfed.observe([n for n, _ in self.engine.output_modules()])
                if said and getattr(trainer, "is_global_zero", True):
                    warnings.warn(said, stacklevel=2)
            self.engine.new_step()

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Validation, test and predict steps: the model runs as the plain model, also where the step takes gradients
        (``torch.enable_grad()`` for a saliency map), so that those are the true derivatives."""
        if self.engine is None:
            yield
            return
        with self.engine.inert():
            yield

    def start_evaluation(self) -> None:
        """An evaluation loop starts (the callback form's hooks): :meth:`evaluating` until :meth:`end_evaluation`."""
        if self._evaluation is None:
            self._evaluation = contextlib.ExitStack()
            self._evaluation.enter_context(self.evaluating())

    def end_evaluation(self) -> None:
        evaluation, self._evaluation = self._evaluation, None
        if evaluation is not None:
            evaluation.close()

    def before_backward(self, loss: Any, trainer: Any = None, scaled: bool = False) -> None:
        """Checks on a backward's ``loss`` (``scaled``: multiplied by a mixed-precision loss scale already, as the
        callbacks' ``on_before_backward`` sees it)."""
        self._loss = loss if isinstance(loss, torch.Tensor) else None  # for end_backward, until after_backward
        if self.engine is not None and self.engine.attached and isinstance(loss, torch.Tensor):
            if self.engine.optimized_ids is None:  # (a callback or a DDP flavour attached before the optimizers)
                _note_optimizers(self.engine, trainer)
            if not self._checked and self.engine.root is not None:
                # checkpointing switched on after set-up (on_fit_start, on_train_start) is caught here
                refuse_reentrant_checkpointing(self.engine.root)
                self._checked = True
            self.engine.check_loss(loss)
            readers = self.engine.loss_readers(loss)
            self._heads = list(self.engine.loss_heads)  # made outputs after this backward
            crossed = self.engine.blocks_crossed
            loud = getattr(trainer, "is_global_zero", True)  # warnings from one process
            if crossed and loud:
                pairs = ", ".join(f"{reader!r} into {block!r}" for reader, block in crossed)
                warnings.warn(
                    f"DFA: the backward crosses from block to block ({pairs}) through an input DFA does not cut "
                    "(it cuts each block's first input and its output point, a recurrent block's outputs and a point "
                    "read beside the first input): a second state passed beside the hidden one, a tensor computed "
                    "from a block's internals. Those blocks learn by backprop through the reading block as well as "
                    "by feedback. A point at such a block's output (blocks= naming it, so that its output is cut) "
                    "keeps them apart.",
                    stacklevel=2,
                )
            if self.engine.mode == "dfa":
                # (the scaler's scale is a host sync: asked for only at the steps the loss is read)
                said = self._divergence.observe(loss, (lambda: _loss_scale(trainer)) if scaled else None)
                if said and loud:
                    warnings.warn(said, stacklevel=2)
            hidden = [name for name in readers if name not in self._heads]
            dropped = [name for name in hidden if name in self.engine.loss_cut_readers]
            hidden = [name for name in hidden if name not in dropped]
            outputs = self.engine.loss_outputs or [n for n, _ in self.engine.output_modules()]
            if dropped and loud:
                warnings.warn(
                    f"DFA: the loss reads the output of {dropped} directly, not only through the output module "
                    f"{outputs}, and later layers read it too. That output is a feedback point, whose cut keeps "
                    "this term from the layers before it (it trains at most layers between that point and the "
                    "loss): DFA feeds back the error of output modules only, not a loss on hidden features (a "
                    "feature regulariser, a center loss). Compute such a term from an output module's output, or "
                    "train this model with backprop if the term matters.",
                    stacklevel=2,
                )
            # named outputs that a later output reads: naming them again would not help
            deferred = [name for name in hidden if name in self.engine.config.output_names]
            hidden = [name for name in hidden if name not in deferred]
            if deferred and loud:
                warnings.warn(
                    f"DFA: the loss reads the output of {deferred} directly, and the output module {outputs} is "
                    "computed from it: an output that a later output reads is no error source of its own (its "
                    "error is that output's), so this term trains it by its true gradient but feeds nothing back "
                    "to the layers before it. DFA feeds back the error of output modules only, not a loss on hidden "
                    "features (a center loss); train this model with backprop if the term matters.",
                    stacklevel=2,
                )
            if hidden and loud:
                warnings.warn(
                    f"DFA: the loss reads the output of {hidden} directly, not only through the output module "
                    f"{outputs}, and later layers read it too: that term trains them by their true gradient but "
                    f"feeds nothing back to the layers before them (a loss term on hidden layers, such as a VAE's KL "
                    f"term, is not fed back by DFA). If they are heads, name them as outputs, "
                    f"output={outputs + hidden}, with blocks= naming the blocks without them.",
                    stacklevel=2,
                )

            side = self.engine.loss_side_readers
            if side and loud:
                warnings.warn(
                    f"DFA: the loss reads a second output of {side} directly, beside their output point (a "
                    "normalizing flow's log-determinant): that term trains each of them by its true gradient inside "
                    "the block only, and the output's error reaches them through fixed random feedback, which does "
                    "not weigh against it as its true gradient would. An objective that trades the two (a flow's "
                    "likelihood) can rise instead of fall; train such a model with backprop.",
                    stacklevel=2,
                )

    def after_backward(self, trainer: Any) -> None:
        if self.engine is None or self.engine.target is None:
            return
        loss, self._loss = self._loss, None
        report = self.engine.end_backward(loss)
        if self.engine.mode == "dfa" and not self._unfed.done:  # (the first steps only)
            self._unfed.add(report, {b.name for b in self.engine.target.blocks})
        heads, self._heads = self._heads, []
        if heads:
            self._heads_added = True
            # heads on middle layers (an auxiliary classifier): their loss term trained them alone in this step;
            # from the next forward their error is fed back too, as the output's
            self.engine.add_outputs(heads)
            if self.verbose:
                self.info(
                    f"DFA: the loss reads {heads} directly and nothing else reads them: they are heads (an auxiliary "
                    "classifier), made outputs from the next step on, so their error is fed back to the blocks "
                    f"before them (blocks={[b.name for b in self.engine.target.blocks]}, "
                    f"output={[n for n, _ in self.engine.target.outputs]} do it from the first step)."
                )
        if (
            self.verbose
            and not self._frozen_said
            and self.engine.mode == "dfa"
            and report.deliveries == 0
            and only_layers_after_frozen_blocks(self.engine, report)
        ):
            self._frozen_said = True
            self.info(
                "DFA: every block is frozen in this step, so only the layers after them train, by their own "
                "gradient (as with backprop); feedback starts at the first step with a trainable block."
            )
        if not self._backprop_checked and self.engine.roles_measured:
            self._backprop_checked = True
            warning = mostly_backprop(self.engine)
            if warning and getattr(trainer, "is_global_zero", True):
                warnings.warn(warning, stacklevel=2)
        if self.verbose and not self._summary_shown and report.points_fed:
            self._summary_shown = True
            points = ", ".join(f"{m.key} {list(m.shape)}" for m in report.points_fed)
            self.info(f"DFA feedback points at the first step: {points}")
            sources = ", ".join(f"{n} ({type(m).__name__})" for n, m in self.engine.output_modules())
            self.info(f"DFA error read at the first step (the loss decides): {sources}")
            self.info("DFA recipe at the first step: " + "; ".join(self.engine.recipe_notes()[1:]))
            hint = speed_hint(self.engine)
            if hint:
                self.info(hint)

    def state_dict(self) -> dict[str, Any]:
        if self.engine is not None:
            return self.engine.state_dict()
        return dict(self.pending_state or {})

    def load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Take the feedback state of a Lightning checkpoint being resumed (see :func:`feedback_state`)."""
        state = feedback_state(checkpoint)
        self._resumed_without_state = state is None
        if state is None:
            self._reattach()  # (its warning)
        self.load_state_dict(state)

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if not state:
            return
        check_state(state)  # a damaged state is refused when the checkpoint is read, before set-up
        self.pending_state = state
        self._reattach()


def speed_hint(engine: FeedbackEngine) -> str | None:
    """A one-line tip when the error is much wider than the points (a vocabulary) and the options that make the
    DFA step cheaper than a backprop step there are off; ``None`` otherwise."""
    widths = list(engine.bank.widths.values())
    if not widths or engine.mode != "dfa" or engine.config.projector is not None:
        return None
    k, d = max(w[0] for w in widths), max(w[1] for w in widths)
    cfg = engine.config
    if not uses_sketch(k, d) or (engine.cut_head_input and (engine.sketch or cfg.topk)):
        return None
    options = (("cut_head_input", engine.cut_head_input), ("sketch", engine.sketch))
    missing = [f"{name}=True" for name, on in options if not on]
    return (
        f"DFA tip: the error is {k} wide and the feedback points at most {d}: the dense projection adds a "
        f"{k}x{d} product per step, so this DFA step can be slower than backprop's. {' and '.join(missing)} "
        "replace the head's input gradient by a cheap structured projection (docs/performance.md)."
    )


def _note_optimizers(engine: FeedbackEngine, trainer: Any) -> None:
    """Tell the engine which parameters the trainer's optimizers update, once they exist: the others (a target
    network updated by a moving average, with ``requires_grad`` left on) are not trained, and the summary and the
    backprop-share warning count them so."""
    optimizers = getattr(getattr(trainer, "strategy", None), "optimizers", None) or []
    held = {id(p) for opt in optimizers for group in getattr(opt, "param_groups", []) for p in group["params"]}
    if held:
        engine.optimized_ids = held


def make_config(arguments: dict[str, Any]) -> DFAConfig:
    """A :class:`DFAConfig` from an adapter's ``__init__`` arguments (``locals()``), ignoring the others."""
    names = {f.name for f in dataclasses.fields(DFAConfig)}
    return DFAConfig(**{k: v for k, v in arguments.items() if k in names})


class DFAStrategyMixin:
    """Adds DFA to a Lightning strategy: attach after ``setup``, check every ``backward``, checkpoint, detach.

    Mixed into ``SingleDeviceStrategy`` (``DFAStrategy``) and ``DDPStrategy`` (``DFADDPStrategy``).
    """

    dfa: DFAFit

    def _dfa_init(self, config: DFAConfig, verbose: bool) -> None:
        self.dfa = DFAFit(config, verbose, info=getattr(self, "_dfa_info", print))

    @property
    def dfa_engine(self) -> FeedbackEngine | None:
        """The engine of the current ``fit`` (``None`` before ``setup``)."""
        return self.dfa.engine

    @override
    def setup(self, trainer: Any) -> None:
        super().setup(trainer)  # type: ignore[misc]
        engine = self.dfa.ensure_attached(self.lightning_module, trainer, self._dfa_target())  # type: ignore[attr-defined]
        check_ddp_mode(engine, self, callback=False)

    def _dfa_target(self) -> Target | None:
        return None  # discovered by the engine at attach

    @override
    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.dfa.before_backward(closure_loss, getattr(self.lightning_module, "_trainer", None))  # type: ignore[attr-defined]
        out = super().backward(closure_loss, optimizer, *args, **kwargs)  # type: ignore[misc]
        self.dfa.after_backward(getattr(self.lightning_module, "_trainer", None))  # type: ignore[attr-defined]
        return out

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        self.dfa.new_step(getattr(self.lightning_module, "_trainer", None))  # type: ignore[attr-defined]
        return super().training_step(*args, **kwargs)  # type: ignore[misc]

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.dfa.evaluating():
            return super().validation_step(*args, **kwargs)  # type: ignore[misc]

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.dfa.evaluating():
            return super().test_step(*args, **kwargs)  # type: ignore[misc]

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.dfa.evaluating():
            return super().predict_step(*args, **kwargs)  # type: ignore[misc]

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        checkpoint[CHECKPOINT_KEY] = self.dfa.state_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)  # type: ignore[misc]

    @override
    def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, *args, **kwargs)  # type: ignore[misc]
        self.dfa.load_checkpoint(checkpoint)
        return checkpoint

    @override
    def on_exception(self, exception: BaseException) -> None:
        self.dfa.detach()
        super().on_exception(exception)  # type: ignore[misc]

    @override
    def teardown(self) -> None:
        self.dfa.detach()
        super().teardown()  # type: ignore[misc]


# Strategies that derive from supported strategies but do not run DFA's single backward as they are: DeepSpeed
# runs its own engine's backward over partitioned parameters, XLA traces lazily. Refused until supported and tested.
UNSUPPORTED_STRATEGIES = {
    "DeepSpeedStrategy": "DeepSpeed runs its own engine's backward over partitioned (ZeRO) parameters; use "
    "strategy='dfa_fsdp' (FSDP full shard, optionally with CPU offload) for sharded training",
    "XLAStrategy": "XLA traces the graph lazily",
    "SingleDeviceXLAStrategy": "XLA traces the graph lazily",
    "XLAFSDPStrategy": "XLA FSDP shards the parameters",
}


def check_strategy(strategy: Any, supported: tuple[type, ...]) -> None:
    """Refuse a strategy that DFA is not known to train correctly with (the callback form composes with others).

    Supported: single-device strategies, DDP (any start method, any number of nodes), FSDP and model parallelism
    (FSDP2), except the subclasses named in :data:`UNSUPPORTED_STRATEGIES`.

    Example:
        >>> class SingleDeviceStrategy: ...
        >>> class DeepSpeedStrategy(SingleDeviceStrategy): ...
        >>> check_strategy(SingleDeviceStrategy(), (SingleDeviceStrategy,))
        >>> check_strategy(DeepSpeedStrategy(), (SingleDeviceStrategy,))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        RuntimeError: DFA: the strategy DeepSpeedStrategy is not supported ...
    """
    name = type(strategy).__name__
    why = next(
        (UNSUPPORTED_STRATEGIES[c.__name__] for c in type(strategy).__mro__ if c.__name__ in UNSUPPORTED_STRATEGIES),
        None,
    )
    if why is None and isinstance(strategy, supported):
        return
    reason = f" ({why})" if why else ""
    raise RuntimeError(
        f"DFA: the strategy {name} is not supported{reason}: DFA is tested with single-device strategies, DDP, "
        "FSDP and model parallelism (FSDP2) only, and an untested strategy could train silently wrong. Use "
        "Trainer(strategy='dfa'), 'dfa_ddp', 'dfa_fsdp', 'dfa_model_parallel', or one of Lightning's strategies "
        "with callbacks=[DFA()]. See docs/compatibility.md."
    )


class DFACallbackMixin:
    """Adds DFA through callback hooks, so it composes with the single-device and DDP strategies
    (``strategy="ddp"``); any other strategy is refused in ``setup``, before training starts."""

    dfa: DFAFit
    _dfa_supported_strategies: tuple[type, ...] = ()

    def _dfa_init(self, config: DFAConfig, verbose: bool) -> None:
        self.dfa = DFAFit(config, verbose, info=getattr(self, "_dfa_info", print))

    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if isinstance(trainer.strategy, DFAStrategyMixin):
            raise RuntimeError(
                "DFA: the DFA callback and a DFA strategy were both given; use one: Trainer(strategy='dfa') or "
                "Trainer(strategy=<any>, callbacks=[DFA()])."
            )
        check_strategy(trainer.strategy, self._dfa_supported_strategies)
        if stage == "fit" and hasattr(trainer.strategy, "configure_ddp"):  # Lightning's DDP strategies
            # attached before DDP wraps the model: the parameters DFA leaves untrained (cut_token_embedding) are
            # then requires_grad=False, and DDP does not wait for their gradients
            self.dfa.attach(pl_module, trainer)

    @property
    def dfa_engine(self) -> FeedbackEngine | None:
        return self.dfa.engine

    @override
    @property
    def state_key(self) -> str:
        return CALLBACK_KEY

    @override
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        engine = self.dfa.ensure_attached(pl_module, trainer)  # (under DDP: attached in setup already)
        check_ddp_mode(engine, trainer.strategy, callback=True)

    @override
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.dfa.new_step(trainer)

    @override
    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self.dfa.start_evaluation()

    @override
    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        self.dfa.end_evaluation()

    @override
    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        self.dfa.start_evaluation()

    @override
    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        self.dfa.end_evaluation()

    @override
    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        self.dfa.start_evaluation()

    @override
    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        self.dfa.end_evaluation()

    @override
    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        self.dfa.before_backward(loss, trainer, scaled=True)

    @override
    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        self.dfa.after_backward(trainer)

    @override
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        # Lightning calls no callback teardown after an exception or KeyboardInterrupt: remove the hooks here
        self.dfa.detach()

    @override
    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.dfa.detach()

    @override
    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = self.dfa.state_dict()  # the same place as the strategy form

    @override
    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        self.dfa.load_checkpoint(checkpoint)

    @override
    def state_dict(self) -> dict[str, Any]:
        # the feedback lives in checkpoint["dfa"] (on_save_checkpoint), once, where the strategy form reads it too
        return {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.dfa.load_state_dict(state_dict)  # a state_dict() of an earlier version (also read by on_load_checkpoint)


class DFASingleDeviceMixin:
    """Takes the device from the Trainer (``accelerator``/``devices``) and refuses more than one, or several nodes.
    Only a ``device=`` given to the strategy is reported to the next Trainer (an instance may serve several)."""

    _dfa_devices: list[torch.device] | None
    _root_device: torch.device

    @override
    @property
    def parallel_devices(self) -> list[torch.device] | None:
        return self._dfa_devices

    @parallel_devices.setter
    def parallel_devices(self, devices: list[torch.device] | None) -> None:
        if devices and len(devices) > 1:
            raise ValueError(
                f"DFA: strategy 'dfa' runs on one device but the Trainer asks for {len(devices)} ({devices}). "
                "Use Trainer(strategy='dfa_ddp', devices=...) for several devices."
            )
        if devices:
            self._root_device = devices[0]

    @property
    def num_nodes(self) -> int:
        return 1

    @num_nodes.setter
    def num_nodes(self, nodes: int) -> None:
        if nodes > 1:
            raise ValueError(
                f"DFA: strategy 'dfa' runs in one process but the Trainer asks for {nodes} nodes, which would train "
                f"{nodes} unsynchronised copies. Use Trainer(strategy='dfa_ddp', num_nodes={nodes}) for several nodes."
            )


class DFADDPMixin:
    """Registers the DFA names of Lightning's DDP start methods (and never re-registers ``"ddp"``); attaches
    before DDP wraps the model, so that the parameters DFA leaves untrained are not in DDP's reducer."""

    @override
    def configure_ddp(self) -> None:
        module = self.lightning_module  # type: ignore[attr-defined]
        self.dfa.attach(module, module.trainer, self._dfa_target())  # type: ignore[attr-defined]
        super().configure_ddp()  # type: ignore[misc]

    @override
    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        for name, start_method in (
            ("dfa_ddp", "popen"),
            ("dfa_ddp_spawn", "spawn"),
            ("dfa_ddp_fork", "fork"),
            ("dfa_ddp_notebook", "fork"),
        ):
            if name not in strategy_registry:
                strategy_registry.register(
                    name, cls, description=f"DFA over DDP with start method {start_method!r}", start_method=start_method
                )
            # mode="shallow" leaves the blocks without gradients: DDP must look for unused parameters
            unused = f"{name}_find_unused_parameters_true"
            if unused not in strategy_registry:
                strategy_registry.register(
                    unused,
                    cls,
                    description=f"DFA over DDP with start method {start_method!r}, find_unused_parameters=True",
                    start_method=start_method,
                    find_unused_parameters=True,
                )
