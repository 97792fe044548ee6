"""Non-idealities that compose with any projector: a ternarised error, a quantised read-out, additive noise."""

from __future__ import annotations

import math
from typing import Any

import torch

from .bank import keyed_normal
from .base import Projector, Wrapper, mix


def ternarize(error: torch.Tensor, threshold: float) -> torch.Tensor:
    """Each row's entries with ``|e| > threshold * max |e|`` as ``sign(e)``, the others 0 (float, ``[n, k]``).

    Example:
        >>> ternarize(torch.tensor([[0.5, -0.04, -1.0, 0.2]]), 0.1).tolist()
        [[1.0, 0.0, -1.0, 1.0]]
    """
    top = error.abs().amax(-1, keepdim=True)
    return torch.where(error.abs() > threshold * top, error.sign(), torch.zeros_like(error))


def _norm_matched(error: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Per row, the factor ``||e|| / ||codes||`` (0 for a row of zeros) that gives the codes the error's norm."""
    size = codes.square().sum(-1, keepdim=True).sqrt()
    return torch.where(size > 0, error.norm(dim=-1, keepdim=True) / size.clamp_min(1), torch.zeros_like(size))


def _checked_level(name: str, value: Any, low: float, high: float | None = None) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= low
    if not ok or (high is not None and value >= high):
        bound = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"DFA: {name} must be a finite number {bound}, got {value!r}.")
    return float(value)


class Ternarized(Wrapper):
    """Project a ternarised error: each row's entries above ``threshold`` times its largest magnitude become
    ``+-1``, the others 0, rescaled to the row's norm (one digital number per row), then ``inner`` projects it.
    The encoding of the photonic DFA co-processor (Launay et al. 2020, arXiv 2012.06373), on any projector.

    Example:
        >>> from lightning_dfa.projectors import Dense
        >>> p = Ternarized(Dense(), threshold=0.25)
        >>> p.setup(seed=0)
        >>> p.project(torch.randn(4, 10), 16).shape
        torch.Size([4, 16])
    """

    def __init__(self, inner: Projector, threshold: float = 0.5) -> None:
        super().__init__(inner)
        self.threshold = _checked_level("Ternarized threshold", threshold, 0.0, 1.0)

    def project(self, error: torch.Tensor, width: int) -> torch.Tensor:
        codes = ternarize(error, self.threshold)
        return self.inner.project(codes * _norm_matched(error, codes), width)


class Quantized(Wrapper):
    """Quantise ``inner``'s projection to ``bits`` (signed, symmetric): each row on ``2**(bits-1) - 1`` levels per
    sign of its own largest magnitude (an analogue-to-digital converter with per-row gain).

    Example:
        >>> from lightning_dfa.projectors import Dense
        >>> p = Quantized(Dense(), bits=2)  # -1, 0, +1 times the row's largest magnitude
        >>> p.setup(seed=0)
        >>> len(p.project(torch.randn(1, 10), 64).unique())
        3
    """

    def __init__(self, inner: Projector, bits: int = 8) -> None:
        super().__init__(inner)
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 24:
            raise ValueError(f"DFA: Quantized bits must be an integer from 2 to 24, got {bits!r}.")
        self.bits = bits

    def project(self, error: torch.Tensor, width: int) -> torch.Tensor:
        out = self.inner.project(error, width)
        levels = 2 ** (self.bits - 1) - 1
        top = out.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(out.dtype).tiny)
        return torch.round(out / top * levels) * (top / levels)  # a row of zeros stays 0


class Noisy(Wrapper):
    """Add Gaussian noise to ``inner``'s projection at a signal-to-noise ratio of ``snr_db`` decibels, per row
    (noise power = the row's mean square / ``10**(snr_db / 10)``).

    The noise is a hash of (seed, the number of projections so far, row position, column): the same on every
    process for the same batch, and different at every step. The count is saved in checkpoints, so a resumed run
    draws what the uninterrupted one would have.

    Example:
        >>> from lightning_dfa.projectors import Dense
        >>> p = Noisy(Dense("gaussian"), snr_db=0.0)
        >>> p.setup(seed=0)
        >>> e = torch.randn(256, 10)
        >>> clean = p.inner.project(e, 64)
        >>> noise = p.project(e, 64) - clean
        >>> round(float(noise.square().mean() / clean.square().mean()), 1)
        1.0
    """

    def __init__(self, inner: Projector, snr_db: float = 20.0) -> None:
        super().__init__(inner)
        self.snr_db = _checked_level("Noisy snr_db", snr_db, -math.inf)
        self.calls = 0

    def project(self, error: torch.Tensor, width: int) -> torch.Tensor:
        out = self.inner.project(error, width)
        key = mix(getattr(self, "_seed", 0), "noisy", self.calls)
        self.calls += 1
        rows = torch.arange(out.shape[0], dtype=torch.int64, device=out.device)
        sigma = out.float().square().mean(-1, keepdim=True).sqrt() * 10 ** (-self.snr_db / 20)
        return out + (sigma * keyed_normal(rows, width, key)).to(out.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.calls = int(state.get("calls", 0))
