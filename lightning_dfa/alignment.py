"""Alignment telemetry: how well the DFA signal agrees with the true backprop gradient, measured during ``fit``.

:class:`AlignmentMonitor` is a Lightning callback. Every ``every_n_steps`` optimizer steps it measures, on the
batch being trained and with the SAME dropout masks (no deep-copied "BP twin"):

* at each feedback point, the cosine similarity between the signal the training backward really delivered there
  (``B_k e`` in ``mode="dfa"``, the true gradient in ``mode="bp"``, nothing in ``mode="shallow"``) and the backprop
  gradient ``dL/dh_k``, per sample (per token for sequence points), reported as mean and spread;
* for each block, the cosine similarity between the weight update the training backward produced for the block's
  parameters and the backprop weight update.

How: in ``on_train_batch_start`` it saves every RNG state (CPU, CUDA, MPS, Python, NumPy), the module's buffers
(BatchNorm statistics) and the states of its torchmetrics, runs one *probe* forward of ``training_step`` under
:meth:`~lightning_dfa.FeedbackEngine.capture` (plain backprop, ``self.log`` muted) and one
``torch.autograd.grad`` for the true gradients, then restores all of it, so the real step draws the same masks
and trains exactly as it would without the monitor. The signal the real step delivers at each point is read by
a read-only tensor hook on the point's graph-attached tensor (the engine's point observers hand it over), and its
weight update by read-only hooks on the block parameters (``.grad`` is never touched). What is compared is what
training really delivered, whatever the options (``norm_jacobian``, ``error_at``...). Cost: one extra forward and
backward per measurement. In ``mode="bp"`` both sides are the true gradient, so every alignment is 1.0: the
instrument checks itself (any difference in masks or RNG would show there).

Limitations: the probe calls ``training_step``; side effects other than ``self.log``/``self.log_dict``, buffers
and torchmetrics states (counters of your own, direct ``logger.experiment`` calls) happen twice on measured steps;
pass ``loss_fn=`` for a side-effect-free loss. RNG drawn by a LightningModule's own ``on_train_batch_start``
(called after callbacks') would make the probe's masks differ. Manual optimization needs ``loss_fn=``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.callbacks import Callback as _PLCallback
from torch import nn

from .engine import CapturedPoint, FeedbackEngine
from .plots import plot_alignment
from .rewind import _loss_of, _muted_logging, _restore_rng, _rng_state, _snapshot_module, _takes_batch_idx

LossFn = Callable[[Any, Any, int], torch.Tensor]


# ---------------------------------------------------------------------------------------------- records
@dataclass
class PointAlignment:
    """Cosine similarity at one feedback point: mean and spread over samples (tokens) and how many counted."""

    mean: float
    std: float
    count: int


@dataclass
class AlignmentRecord:
    """One measurement: the optimizer step, the per-point signal alignment and the per-block update alignment."""

    step: int
    points: dict[str, PointAlignment] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        """Mean over feedback points of the mean signal alignment (``nan`` when nothing was measured)."""
        values = [p.mean for p in self.points.values() if not math.isnan(p.mean)]
        return sum(values) / len(values) if values else float("nan")

    def metrics(self, prefix: str = "dfa/align") -> dict[str, float]:
        """Flat metric names: ``<prefix>``, ``<prefix>/<point>``, ``<prefix>/<point>/std``, ``<prefix>_w/<block>``."""
        out = {prefix: self.mean}
        for key, p in self.points.items():
            out[f"{prefix}/{key}"] = p.mean
            out[f"{prefix}/{key}/std"] = p.std
        for key, w in self.weights.items():
            out[f"{prefix}_w/{key}"] = w
        return {k: v for k, v in out.items() if not math.isnan(v)}


def rowwise_cosine(signal: torch.Tensor, true_grad: torch.Tensor, flatten: bool = False) -> PointAlignment:
    """Cosine similarity of ``signal`` and ``true_grad`` per sample (per token), as mean, std and count.

    Rows are the last dimension (tokens of ``[batch, seq, d]``, samples of ``[batch, d]``), or whole samples
    when ``flatten`` (conv feature maps). Rows whose true gradient is zero (ignored tokens) are left out;
    a zero signal counts as 0.

    Example:
        >>> g = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
        >>> rowwise_cosine(torch.tensor([[2.0, 0.0], [1.0, 0.0], [5.0, 5.0]]), g)
        PointAlignment(mean=0.5, std=0.5, count=2)
    """
    a = signal.detach().to(torch.float64)
    b = true_grad.detach().to(torch.float64)
    if a.shape != b.shape:
        a = a.expand_as(b)
    if b.dim() == 0:
        a, b = a.reshape(1, 1), b.reshape(1, 1)
    elif flatten or b.dim() == 1:
        a, b = a.reshape(b.shape[0] if b.dim() > 1 else 1, -1), b.reshape(b.shape[0] if b.dim() > 1 else 1, -1)
    else:
        a, b = a.reshape(-1, b.shape[-1]), b.reshape(-1, b.shape[-1])
    nb = b.norm(dim=-1)
    keep = nb > 0
    if not bool(keep.any()):
        return PointAlignment(float("nan"), float("nan"), 0)
    a, b, nb = a[keep], b[keep], nb[keep]
    na = a.norm(dim=-1)
    cos = (a * b).sum(-1) / (na * nb).clamp_min(torch.finfo(torch.float64).tiny)
    cos = cos.clamp(-1.0, 1.0)
    return PointAlignment(float(cos.mean()), float(cos.std(unbiased=False)), int(cos.numel()))


def vector_cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Cosine similarity of two lists of tensors seen as one flat vector each (``nan`` if ``b`` is zero)."""
    dot = sum(float((x.detach().double() * y.detach().double()).sum()) for x, y in zip(a, b))
    na = math.sqrt(sum(float(x.detach().double().pow(2).sum()) for x in a))
    nb = math.sqrt(sum(float(y.detach().double().pow(2).sum()) for y in b))
    if nb == 0:
        return float("nan")
    return max(-1.0, min(1.0, dot / max(na * nb, 1e-300)))


def _distinct_points(points: list[CapturedPoint]) -> list[CapturedPoint]:
    """The captured points that carry gradient, without an input point that is an earlier point's very tensor.

    Under ``capture()`` nothing is cut, so a block whose input is the previous block's output records it again
    as ``"<block>:in"``; in training that input is the detached copy and receives nothing.
    """
    seen: set[int] = set()
    out = []
    for p in points:
        if p.tensor.requires_grad and id(p.tensor) not in seen:
            seen.add(id(p.tensor))
            out.append(p)
    return out


def find_engine(trainer: Any) -> FeedbackEngine | None:
    """The :class:`FeedbackEngine` of a Trainer: its DFA strategy's, or a ``DFA`` callback's (``None`` if none)."""
    engine = getattr(trainer.strategy, "dfa_engine", None)
    if engine is not None:
        return engine
    for cb in getattr(trainer, "callbacks", []):
        engine = getattr(cb, "dfa_engine", None)
        if engine is not None:
            return engine
    return None


# ---------------------------------------------------------------------------------------------- the callback logic
class AlignmentMonitorMixin:
    """Flavour-agnostic logic of :class:`AlignmentMonitor` (no Lightning import here)."""

    def __init__(
        self,
        every_n_steps: int = 50,
        loss_fn: LossFn | None = None,
        plot: bool = True,
        filename: str = "alignment.png",
        prog_bar: bool = True,
        prefix: str = "dfa/align",
    ) -> None:
        super().__init__()  # the flavour's Callback, next in the MRO
        if int(every_n_steps) < 1:
            raise ValueError(f"AlignmentMonitor: every_n_steps must be >= 1, got {every_n_steps!r}.")
        self.every_n_steps = int(every_n_steps)
        self.loss_fn = loss_fn
        self.plot_on_fit_end = plot
        self.filename = filename
        self.prog_bar = prog_bar
        self.prefix = prefix
        self.history: list[AlignmentRecord] = []
        self.mode: str | None = None
        self.plot_path: Path | None = None
        self._engine: FeedbackEngine | None = None
        self._last_step = -1
        self._reset_step()

    def _reset_step(self) -> None:
        self._probe_points: list[tuple[str, bool, torch.Tensor]] | None = None
        self._probe_weights: dict[str, list[torch.Tensor]] = {}
        self._block_params: dict[str, list[nn.Parameter]] = {}
        self._real_points: list[tuple[str, torch.Tensor]] = []
        self._real_weights: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []
        # the measured step's point tensors, kept until its backward: the engine keeps none, and a freed tensor's id
        # could be taken by the next point's
        self._real_seen: dict[int, torch.Tensor] = {}
        self._real_capture: Any = None
        self._step = -1

    # ------------------------------------------------------------------ public
    @property
    def latest(self) -> AlignmentRecord | None:
        """The last measurement (``None`` before the first)."""
        return self.history[-1] if self.history else None

    def plot(self, path: str | Path | None = None) -> Path | None:
        """Draw alignment over steps (signal per feedback point with its spread; update per block) to a PNG.

        ``path`` defaults to ``<log dir>/<filename>`` of the last ``fit``. Returns the path, ``None`` without data.
        """
        if not self.history:
            return None
        if path is None:
            path = self.plot_path
        if path is None:
            raise ValueError("AlignmentMonitor.plot: give a path (no fit has run with this monitor).")
        return plot_alignment(self.history, path, title=f"alignment with backprop (mode={self.mode})")

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        engine = find_engine(trainer)
        if engine is None or engine.target is None:
            raise RuntimeError(
                "AlignmentMonitor: no DFA engine on this Trainer. Use Trainer(strategy='dfa') (or 'dfa_ddp') or add "
                "the lightning_dfa.DFA callback."
            )
        if not getattr(pl_module, "automatic_optimization", True) and self.loss_fn is None:
            raise RuntimeError(
                "AlignmentMonitor: with manual optimization the probe cannot call training_step (it steps the "
                "optimizer); pass loss_fn=lambda module, batch, batch_idx: <loss> instead."
            )
        self._engine = engine
        self.mode = engine.mode
        self._last_step = -1
        log_dir = getattr(trainer, "log_dir", None) or getattr(trainer, "default_root_dir", None) or "."
        self.plot_path = Path(log_dir) / self.filename

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        step = int(trainer.global_step)
        if self._engine is None or step % self.every_n_steps != 0 or step == self._last_step:
            return
        self._finish_real()
        if not self._probe(trainer, pl_module, batch, batch_idx):
            return
        self._last_step = self._step = step
        self._instrument_real_step()

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        if self._probe_points is None:
            return
        record = self._compare()
        self._finish_real()
        self.history.append(record)
        metrics = record.metrics(self.prefix)
        for logger in getattr(trainer, "loggers", []):
            logger.log_metrics(metrics, step=record.step)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._finish_real()  # a step that skipped its backward
        if self.prog_bar and self.history and not math.isnan(self.history[-1].mean):
            pl_module.log(self.prefix, self.history[-1].mean, prog_bar=True, logger=False, on_step=True, on_epoch=False)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.plot_on_fit_end and self.history and getattr(trainer, "is_global_zero", True):
            if importlib.util.find_spec("matplotlib") is None:
                warnings.warn("AlignmentMonitor: matplotlib is not installed; no alignment plot.", stacklevel=2)
                return
            self.plot()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._finish_real()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._finish_real()

    # ------------------------------------------------------------------ probe
    def _compute_loss(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> torch.Tensor | None:
        if self.loss_fn is not None:
            return _loss_of(self.loss_fn(pl_module, batch, batch_idx))
        step = pl_module.training_step
        out = step(batch, batch_idx) if _takes_batch_idx(step) else step(batch)
        return _loss_of(out)

    def _probe(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> bool:
        """One plain-backprop forward and backward on this batch; everything it changed is put back."""
        engine = self._engine
        assert engine is not None and engine.target is not None
        rng = _rng_state()
        restore = _snapshot_module(pl_module)
        precision = getattr(trainer.strategy, "precision_plugin", None)
        context = precision.train_step_context() if hasattr(precision, "train_step_context") else None
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(torch.enable_grad())
                if context is not None:
                    stack.enter_context(context)
                stack.enter_context(_muted_logging(pl_module))
                cap = stack.enter_context(engine.capture())
                loss = self._compute_loss(trainer, pl_module, batch, batch_idx)
            points = _distinct_points(cap.points)
            if loss is None or not loss.requires_grad or not points:
                return False
            blocks: dict[str, list[nn.Parameter]] = {}
            seen: set[int] = set()
            for block in engine.target.blocks:
                params = [p for p in block.parameters() if p.requires_grad and id(p) not in seen]
                seen.update(id(p) for p in params)
                if params:
                    blocks[block.name] = params
            flat = [p for ps in blocks.values() for p in ps]
            grads = torch.autograd.grad(loss, [p.tensor for p in points] + flat, allow_unused=True)
        finally:
            restore()
            _restore_rng(rng)
        wrt = [p.tensor for p in points] + flat
        grads = [torch.zeros_like(t) if g is None else g.detach() for g, t in zip(grads, wrt)]
        self._probe_points = [(p.key, p.flatten, g) for p, g in zip(points, grads)]
        it = iter(grads[len(points) :])
        self._probe_weights = {name: [next(it) for _ in ps] for name, ps in blocks.items()}
        self._block_params = blocks
        return True

    # ------------------------------------------------------------------ what the real step delivers
    def _on_real_point(self, key: str, tensor: torch.Tensor) -> None:
        """Engine point observer during the measured step: hook the point's graph-attached tensor (read-only)."""
        if not tensor.requires_grad or id(tensor) in self._real_seen:
            return
        self._real_seen[id(tensor)] = tensor

        def hook(grad: torch.Tensor) -> None:
            self._real_points.append((key, grad.detach().clone()))

        self._handles.append(tensor.register_hook(hook))

    def _param_hook(self, index: int) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            self._real_weights[index] = grad.detach().clone()

        return hook

    def _instrument_real_step(self) -> None:
        engine = self._engine
        assert engine is not None
        engine.point_observers.append(self._on_real_point)
        if engine.mode == "bp":
            # in "bp" the hooks only record inside capture(), which IS plain backprop there (no cut, no delivery)
            self._real_capture = engine.capture()
            self._real_capture.__enter__()
        for i, p in enumerate(p for ps in self._block_params.values() for p in ps):
            self._handles.append(p.register_hook(self._param_hook(i)))

    def _finish_real(self) -> None:
        for handle in self._handles:
            handle.remove()
        if self._engine is not None and self._on_real_point in self._engine.point_observers:
            self._engine.point_observers.remove(self._on_real_point)
        if self._real_capture is not None:
            self._real_capture.__exit__(None, None, None)
        self._reset_step()

    def _compare(self) -> AlignmentRecord:
        record = AlignmentRecord(self._step)
        delivered: dict[str, list[torch.Tensor]] = {}
        for key, g in self._real_points:
            delivered.setdefault(key, []).append(g)
        used: dict[str, int] = {}
        for key, flatten, true_grad in self._probe_points or []:
            n = used.get(key, 0)
            used[key] = n + 1
            signals = delivered.get(key, [])
            signal = signals[n] if n < len(signals) else torch.zeros_like(true_grad)  # "shallow": no signal
            name = key if n == 0 else f"{key}#{n}"
            record.points[name] = rowwise_cosine(signal, true_grad, flatten)
        index = 0
        for name, bp_grads in self._probe_weights.items():
            real = []
            for g in bp_grads:
                real.append(self._real_weights.get(index, torch.zeros_like(g)))
                index += 1
            record.weights[name] = vector_cosine(real, bp_grads)
        return record


# ---------------------------------------------------------------------------------------------- plotting


# ---------------------------------------------------------------------------------------------- flavours
def _monitor_docstring(flavour: str) -> str:
    return f"""Measure, every ``every_n_steps`` optimizer steps, how well DFA's signal aligns with backprop.

    Needs a DFA engine on the Trainer (``strategy="dfa"``/``"dfa_ddp"`` or the ``DFA`` callback). Logs, through
    the Trainer's loggers and at the step measured: ``dfa/align/<point>`` (mean cosine over samples/tokens between
    the delivered signal and the backprop gradient at the point) and ``dfa/align/<point>/std``,
    ``dfa/align_w/<block>`` (cosine between the block's real weight update and the backprop one) and
    ``dfa/align`` (mean over points, also on the progress bar). ``mode="bp"`` gives 1.0 everywhere, ``"shallow"``
    0. At the end of ``fit`` it draws ``<log dir>/{{filename}}`` (see :meth:`plot`); :attr:`history` keeps every
    :class:`AlignmentRecord`. The training trajectory is unchanged (see the module docstring for how).

    Args:
        every_n_steps: measure when ``trainer.global_step`` is a multiple of this (step 0 included).
        loss_fn: ``(module, batch, batch_idx) -> loss`` for the probe; default: ``training_step`` with
            ``self.log`` muted (needed for manual optimization).
        plot: write the PNG at the end of ``fit``.
        filename: name of the PNG in the logger's directory.
        prog_bar: show the latest mean alignment on the progress bar.
        prefix: metric name prefix.

    Example::

        import {flavour} as pl
        from lightning_dfa import AlignmentMonitor

        monitor = AlignmentMonitor(every_n_steps=20)
        pl.Trainer(strategy="dfa", max_epochs=5, callbacks=[monitor]).fit(model)
        monitor.latest.points  # {{'2': PointAlignment(mean=0.71, std=0.08, count=64), ...}}
    """


class AlignmentMonitor(AlignmentMonitorMixin, _PLCallback):
    __doc__ = _monitor_docstring("pytorch_lightning")


if importlib.util.find_spec("lightning") is not None:  # the separate `lightning` package, if installed
    from lightning.pytorch.callbacks import Callback as _LCallback

    class LightningAlignmentMonitor(AlignmentMonitorMixin, _LCallback):
        __doc__ = _monitor_docstring("lightning.pytorch")
