"""Time, peak memory and FLOPs of a training step, per arm: :func:`run_case`.

* Every arm (``bp`` = plain backprop, and DFA variants) trains the SAME model instance with the same AdamW
  optimizer; a DFA arm attaches its own :class:`FeedbackEngine` (which keeps its feedback matrix between steps)
  before its step and detaches it after (outside the timed region). A *step* is forward + loss + backward +
  ``optimizer.step()`` + ``zero_grad(set_to_none=True)`` + ``engine.end_backward(loss)`` (as the Lightning
  adapters close a backward: the first one completes the engine's roles from the loss, later ones only count).
* After ``warmup`` rounds, ``repeats`` rounds run every arm once, in an order rotated each round, so machine
  contention hits all arms alike. Per round, each DFA arm's time is divided by that round's ``bp`` time: the
  reported ratio is the median of these per-round ratios, with its 25-75 % range.
* CPU: wall time (``time.perf_counter``) and process CPU time (``time.process_time``, all threads of this
  process: with one thread the step's own compute, insensitive to other processes waiting for the core).
  CUDA: CUDA events around the step, and the host seconds to issue it (``issue_s``, up to the last kernel queued:
  near the wall time, the host bounds the step, and the engine's Python costs as much as its kernels).
* Peak memory, CPU: one extra step per arm under ``torch.profiler`` with ``profile_memory=True``; every
  allocation and free of the CPU allocator is a raw ``[memory]`` event with its signed size; the running sum
  of the events in time order gives the step's peak above the bytes live at its start; we add the bytes of
  the tensors that persist between steps (parameters, optimizer state, feedback matrices and their cached
  casts). Gradients are freed by ``zero_grad(set_to_none=True)`` so they count inside the step. CUDA:
  ``torch.cuda.max_memory_allocated``.
* FLOPs: analytic multiply-adds (:mod:`benchmarks.flops`) for backprop and for each DFA arm, so the ratio a
  perfect implementation would reach (the *limit*), and a count of the matrix-multiply FLOPs actually
  dispatched (``torch.utils.flop_counter.FlopCounterMode``, one step) as a check of what the code really runs.
"""

from __future__ import annotations

import contextlib
import gc
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from benchmarks.speed.cases import Case
from lightning_dfa.engine import FeedbackEngine

__all__ = ["PRECISIONS", "Arm", "Bench", "run_case"]

#: the ``precision`` values :func:`run_case` accepts, as Lightning's ``Trainer(precision=...)`` spells them
PRECISIONS = ("32", "bf16-mixed")


class Arm:
    """One arm: its engine (``None`` for backprop) and its measurements."""

    def __init__(self, name: str, options: dict[str, Any] | None) -> None:
        self.name = name
        self.options = options
        self.engine = None if options is None else FeedbackEngine(seed=0, **options)
        self.wall: list[float] = []
        self.cpu: list[float] = []
        #: CUDA: host seconds to issue the step (until the last kernel is queued); near ``wall``, the host bounds it
        self.issue: list[float] = []

    @contextlib.contextmanager
    def attached(self, model: nn.Module) -> Iterator[None]:
        if self.engine is None:
            yield
            return
        self.engine.attach(model)
        try:
            yield
        finally:
            self.engine.detach()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Bench:
    """One model, its optimizer and batch on ``dev``, stepped under ``precision`` (``"32"`` or ``"bf16-mixed"``)."""

    case: Case
    model: nn.Module
    opt: torch.optim.Optimizer
    batch: tuple[Any, ...]
    dev: torch.device
    precision: str = "32"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is not supported; use one of {PRECISIONS}")

    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` to bfloat16 under ``bf16-mixed`` (as Lightning's plugin), else nothing."""
        if self.precision != "bf16-mixed":
            return contextlib.nullcontext()
        return torch.autocast(self.dev.type, dtype=torch.bfloat16)

    def step(self, arm: Arm) -> None:
        with self.autocast():
            loss = self.case.loss(self.model, self.batch)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if arm.engine is not None:
            arm.engine.end_backward(loss)

    def timed_step(self, arm: Arm) -> tuple[float, float]:
        """Wall (CUDA: event) seconds and process CPU seconds of one step of ``arm``."""
        with arm.attached(self.model):
            _sync(self.dev)
            if self.dev.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                c0, h0 = time.process_time(), time.perf_counter()
                start.record()
                self.step(arm)
                end.record()
                arm.issue.append(time.perf_counter() - h0)
                torch.cuda.synchronize(self.dev)
                return start.elapsed_time(end) / 1e3, time.process_time() - c0
            w0, c0 = time.perf_counter(), time.process_time()
            self.step(arm)
            return time.perf_counter() - w0, time.process_time() - c0

    def persistent_bytes(self, arm: Arm) -> int:
        """Bytes kept between steps: parameters, optimizer state, and the arm's feedback matrices."""
        seen: dict[int, int] = {}
        tensors = list(self.model.parameters()) + [
            v for state in self.opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)
        ]
        for t in tensors:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        total = sum(seen.values())
        if arm.engine is not None:
            total += arm.engine.bank.nbytes + arm.engine.bank.cached_nbytes
        return total

    def peak_bytes(self, arm: Arm) -> int:
        """Peak memory of one step of ``arm``, persistent bytes included."""
        if self.dev.type == "cuda":
            return self._peak_cuda_step(arm)
        return self.persistent_bytes(arm) + self._peak_cpu_step(arm)

    def _peak_cpu_step(self, arm: Arm) -> int:
        """Peak bytes above the step's start: running sum of the profiler's allocation events."""
        from torch.profiler import ProfilerActivity, profile

        gc.collect()
        with arm.attached(self.model):
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
                self.step(arm)
        # the raw allocator events (one per allocation and per free, with signed bytes), not the per-op aggregates
        kineto = prof.profiler.kineto_results.events()
        events = sorted((e.start_ns(), e.nbytes()) for e in kineto if e.name() == "[memory]")
        live = peak = 0
        for _, delta in events:
            live += delta
            peak = max(peak, live)
        return peak

    def _peak_cuda_step(self, arm: Arm) -> int:
        with arm.attached(self.model):
            torch.cuda.synchronize(self.dev)
            torch.cuda.reset_peak_memory_stats(self.dev)
            self.step(arm)
            torch.cuda.synchronize(self.dev)
            return int(torch.cuda.max_memory_allocated(self.dev))

    def counted_flops(self, arm: Arm) -> int:
        """FLOPs the step's forward and backward dispatch, as ``torch.utils.flop_counter`` counts them."""
        from torch.utils.flop_counter import FlopCounterMode

        with arm.attached(self.model), FlopCounterMode(display=False) as counter:
            with self.autocast():
                loss = self.case.loss(self.model, self.batch)
            loss.backward()
            if arm.engine is not None:
                arm.engine.end_backward(loss)
        self.model.zero_grad(set_to_none=True)
        return int(counter.get_total_flops())

    def median_time(self, fn: Callable[[], Any], repeats: int) -> float:
        times = []
        for _ in range(repeats):
            _sync(self.dev)
            t0 = time.perf_counter()
            fn()
            _sync(self.dev)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def projection_alone(self, arms: list[Arm], repeats: int) -> dict[str, float]:
        """Median time of ``engine.feedback_for`` on a softmax-minus-one-hot error, and of the head's input GEMM."""
        case, dev = self.case, self.dev
        g = torch.Generator().manual_seed(1)
        target = torch.randint(0, case.error_shape[-1], case.error_shape[:-1], generator=g).to(dev)
        error = torch.softmax(torch.randn(case.error_shape, generator=g).to(dev) * 2, -1)
        error.scatter_add_(-1, target.unsqueeze(-1), torch.full_like(error[..., :1], -1.0))  # softmax - one_hot
        error /= math.prod(case.error_shape[:-1])
        out: dict[str, float] = {}
        if case.head_weight is not None:
            w = case.head_weight(self.model).detach()
            out["head input gradient (e @ W_head)"] = self.median_time(lambda: error @ w, repeats)
        for arm in arms:
            if arm.engine is None or not arm.engine.last_points:
                continue
            points = arm.engine.last_points
            # activations for the points whose feedback is norm-aware (their Jacobian is part of the cost)
            acts = [None if p.norm is None else torch.randn(p.shape, generator=g).to(dev, p.dtype) for p in points]
            with torch.no_grad():
                out[arm.name] = self.median_time(
                    lambda a=arm, p=points, h=acts: a.engine.feedback_for(error, p, h), repeats
                )
        return out


def _quantiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


def run_case(
    case: Case, dev: torch.device, warmup: int, repeats: int, proj_repeats: int, precision: str = "32"
) -> dict[str, Any]:
    """Time, memory and FLOPs of every arm of ``case`` on ``dev``: one entry of the JSON's ``cases``.

    Example::

        from benchmarks.speed.cases import ladder
        row = run_case(ladder(quick=True)[0], torch.device("cpu"), warmup=1, repeats=2, proj_repeats=2)
    """
    torch.manual_seed(0)
    model = case.build().to(dev)
    model.train()
    bench = Bench(case, model, torch.optim.AdamW(model.parameters(), lr=1e-5), case.batch(dev), dev, precision)
    arms = [Arm("bp", None)] + [Arm(n, o) for n, o in case.arms.items()]
    t0 = time.time()
    for _ in range(warmup):
        for arm in arms:
            bench.timed_step(arm)
    for r in range(repeats):
        order = arms[r % len(arms) :] + arms[: r % len(arms)]
        for arm in order:
            wall, cpu = bench.timed_step(arm)
            arm.wall.append(wall)
            arm.cpu.append(cpu)
    timing_s = time.time() - t0
    base = bench.persistent_bytes(arms[0])
    rows = []
    bp_macs = case.macs(None)["total"]
    bp_counted = bench.counted_flops(arms[0])
    bp_peak = None
    for arm in arms:
        peak = bench.peak_bytes(arm)
        bp_peak = peak if bp_peak is None else bp_peak
        macs = case.macs(arm.options)
        counted = bp_counted if arm.engine is None else bench.counted_flops(arm)
        row: dict[str, Any] = {
            "arm": arm.name,
            "options": dict(arm.options or {}),
            "wall_s": _quantiles(arm.wall),
            "cpu_s": _quantiles(arm.cpu),
            **({"issue_s": _quantiles(arm.issue[-len(arm.wall) :])} if arm.issue else {}),
            "peak_bytes": peak,
            "peak_ratio": peak / bp_peak,
            "macs": macs,
            "limit": macs["total"] / bp_macs,
            "counted_flops": counted,
            "counted_ratio": counted / bp_counted,
        }
        if arm.engine is not None:
            bp = arms[0]
            row["wall_ratio"] = _quantiles([a / b for a, b in zip(arm.wall, bp.wall)])
            row["cpu_ratio"] = _quantiles([a / b for a, b in zip(arm.cpu, bp.cpu)])
            row["feedback_bytes"] = arm.engine.bank.nbytes + arm.engine.bank.cached_nbytes
            row["points"] = len(arm.engine.last_points)
        rows.append(row)
    projection = bench.projection_alone(arms, proj_repeats)
    return {
        "model": case.name,
        "description": case.description,
        "parameters": sum(p.numel() for p in model.parameters()),
        "persistent_bytes_bp": base,
        "warmup": warmup,
        "repeats": repeats,
        "timing_s": timing_s,
        "rows": rows,
        "projection_s": projection,
        "meta": case.meta,
    }
