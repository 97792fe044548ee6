"""Saving and restoring what an extra forward of ``training_step`` changes (every RNG state, buffers such as
BatchNorm statistics, torchmetrics states, ``self.log``), so that a measurement leaves the real step untouched."""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import random
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if importlib.util.find_spec("numpy") is not None:
        import numpy as np

        state["numpy"] = np.random.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if hasattr(torch, "mps") and torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state:
        torch.mps.set_rng_state(state["mps"])


def _snapshot_module(module: nn.Module) -> Callable[[], None]:
    """Save buffers (BatchNorm statistics...) and torchmetrics states; return the function that restores them."""
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    metrics = []
    for m in module.modules():
        if hasattr(m, "_copy_state_dict") and hasattr(m, "_update_count"):  # torchmetrics.Metric (duck-typed)
            extra = {k: getattr(m, k) for k in ("_update_count", "_computed", "_forward_cache") if hasattr(m, k)}
            metrics.append((m, m._copy_state_dict(), extra))

    def restore() -> None:
        with torch.no_grad():
            for buf, saved in buffers:
                buf.copy_(saved)
        for m, states, extra in metrics:
            for k, v in {**states, **extra}.items():
                setattr(m, k, v)

    return restore


@contextlib.contextmanager
def _muted_logging(module: Any) -> Iterator[None]:
    """``self.log`` / ``self.log_dict`` do nothing inside (instance attributes shadow the methods)."""
    saved = {k: module.__dict__[k] for k in ("log", "log_dict") if k in module.__dict__}

    def mute(*args: Any, **kwargs: Any) -> None:
        return None

    object.__setattr__(module, "log", mute)
    object.__setattr__(module, "log_dict", mute)
    try:
        yield
    finally:
        for k in ("log", "log_dict"):
            if k in saved:
                object.__setattr__(module, k, saved[k])
            else:
                object.__delattr__(module, k)


def _takes_batch_idx(fn: Callable[..., Any]) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return True
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return True
    return len([p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]) >= 2


def _loss_of(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and isinstance(output.get("loss"), torch.Tensor):
        return output["loss"]
    return None
