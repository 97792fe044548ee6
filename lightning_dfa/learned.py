"""Feedback matrices that learn from local information: direct Kolen-Pollack (the ``feedback_learning`` option).

Plain DFA gives a feedback point of width ``d`` the signal ``scale / sqrt(d) * (e @ B.T)`` with ``B`` (``[d, k]``)
fixed. With ``feedback_learning="kolen_pollack"`` every point ``p`` gets its own matrix ``B_p``, drawn as the fixed
one, that follows the update a direct linear readout from the point to the output would get (Webster et al., 2020,
"Learning the connections in direct feedback alignment", after Kolen & Pollack, 1994), with decay:

    G_p = sum over tokens of  n_p(h)^T e          ([d, k]: the point's activation times the error it receives)
    B_p <- (1 - decay) * B_p  -  decay * ||B_p(0)|| * G_p / ||G_p||

where ``h`` is the point's activation in the forward, ``n_p(h)`` the same with every token (row) scaled to unit
root-mean-square, and ``e`` the error the point already receives (``dL/d output``); a feature map fed one vector
per channel (``pooled_channels``) reads ``h`` as each channel's mean over the positions. The step is normalised, so
``B_p`` is an exponential moving average (time constant ``1 / decay`` steps) of the direction of ``-G_p``, starting
from the fixed random matrix; the feedback then uses ``B_p`` rescaled to the norm of ``B_p(0)``, so its size is the
fixed feedback's. Nothing else is read: no forward weight (no weight transport), no extra forward pass. The cost is
one ``[d, tokens] x [tokens, k]`` product per point and step, and every point projects with its own matrix instead
of sharing one projection. Under data parallelism the ``G_p`` of all processes are averaged (one all-reduce of all
points' ``G_p`` per backward) before the update, so every process keeps the same ``B_p``.

The update is applied when the backward closes (:meth:`FeedbackEngine.end_backward`, which the strategy and the
callback call after every backward): each backward updates ``B_p`` once, with the ``G_p`` of its own error. Points
whose error is broadcast over positions or averaged (``"broadcast"`` and ``"mean"`` alignments) keep the fixed
matrix.

Measured: on the character-level language model it learns more slowly than the fixed matrix
(``docs/results_language_model.md``, "Leads that did not help"); it is off by default.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

#: the values of the ``feedback_learning`` option
RULES = ("kolen_pollack",)


class LearnedFeedback:
    """The per-point feedback matrices of ``feedback_learning="kolen_pollack"`` and their update.

    Example:
        >>> lf = LearnedFeedback(decay=0.5)
        >>> b0 = torch.ones(4, 3)
        >>> e, h = torch.randn(10, 3), torch.randn(10, 4)
        >>> lf.feedback("p", e, h, lambda: b0).shape
        torch.Size([10, 4])
        >>> lf.step()  # the update of B_p from h and e
        >>> bool(torch.equal(lf.matrices["p"], b0))
        False
    """

    def __init__(self, rule: str = "kolen_pollack", decay: float = 0.01) -> None:
        if rule not in RULES:
            raise ValueError(f"DFA: feedback_learning must be None or one of {RULES}, got {rule!r}.")
        self.rule = rule
        self.decay = float(decay)
        self.matrices: dict[str, torch.Tensor] = {}  # point key -> B_p [d, k], float32
        self.norms: dict[str, float] = {}  # point key -> ||B_p(0)||
        self._pending: dict[str, torch.Tensor] = {}  # point key -> G_p of this backward

    def feedback(
        self, key: str, error: torch.Tensor, h: torch.Tensor, initial: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        """``error @ B_p.T`` (``[rows, d]``) with ``B_p`` rescaled to ``||B_p(0)||``; records ``G_p`` for :meth:`step`.

        ``error`` is ``[rows, k]``, ``h`` the point's activation ``[rows, d]``, ``initial`` returns the fixed
        ``[d, k]`` matrix ``B_p`` starts from (called once per point)."""
        b = self.matrices.get(key)
        if b is None:
            b = initial().detach().to(device=error.device, dtype=torch.float32).clone()
            self.matrices[key] = b
            self.norms[key] = float(b.norm())
        if b.device != error.device:
            b = self.matrices[key] = b.to(error.device)
        rms = h.detach().float().pow(2).mean(-1, keepdim=True).add_(1e-12).rsqrt_()
        g = (h.detach().float() * rms).t() @ error.float()
        self._pending[key] = self._pending[key] + g if key in self._pending else g
        factor = self.norms[key] / b.norm().clamp_min(1e-30)  # a tensor: no device synchronisation
        return (error @ b.to(error.dtype).t()) * factor.to(error.dtype)

    def step(self) -> None:
        """Apply the update of every point that received feedback since the last call (averaged over processes)."""
        if not self._pending:
            return
        keys = sorted(self._pending)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flat = torch.cat([self._pending[k].reshape(-1) for k in keys])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            sizes = [self._pending[k].numel() for k in keys]
            for k, part in zip(keys, flat.split(sizes)):
                self._pending[k] = part.view_as(self._pending[k])
        for k in keys:
            g = self._pending[k]
            step = g * (-self.decay * self.norms[k] / g.norm().clamp_min(1e-30))  # tensors: no synchronisation
            self.matrices[k].mul_(1 - self.decay).add_(step)
        self._pending = {}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The learned matrices and their initial norms (saved in checkpoints with the rest of the feedback)."""
        return {
            "rule": self.rule,
            "decay": self.decay,
            "matrices": {k: m.detach().cpu().clone() for k, m in self.matrices.items()},
            "norms": dict(self.norms),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s matrices."""
        if not isinstance(state, dict) or not isinstance(state.get("matrices"), dict):
            raise ValueError(
                "DFA: the checkpoint's learned feedback (feedback_learning) is damaged: it has no matrices. Resume "
                "from another checkpoint, or start a new fit."
            )
        self.matrices = {k: m.detach().to(torch.float32).clone() for k, m in state["matrices"].items()}
        self.norms = {k: float(v) for k, v in state.get("norms", {}).items()}
        missing = sorted(set(self.matrices) - set(self.norms))
        if missing:
            self.norms.update({k: float(self.matrices[k].norm()) for k in missing})
        self._pending = {}
