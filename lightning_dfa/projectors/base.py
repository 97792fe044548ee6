"""The projector interface: what turns the output error into the raw feedback ``B e``.

A projector computes ONE thing, the fixed linear (or, for a simulated device, nearly linear) map of the error
rows onto the feedback width. Everything else of the DFA rule stays with the engine: the scale
``scale / sqrt(d)``, the slicing of the widest projection for narrower points, the per-point sign flips
(``distinct``), the layout of the signal on each point, ``feedback_transform`` and the norm-aware Jacobian.
"""

from __future__ import annotations

import copy
import inspect
import zlib
from typing import Any

import torch


def mix(*parts: int | str) -> int:
    """A stable 63-bit seed from integers and strings (Python's ``hash`` is salted per process).

    Example:
        >>> mix(0, "B", 10) == mix(0, "B", 10), mix(0, "B", 10) == mix(1, "B", 10)
        (True, False)
    """
    text = "/".join(str(p) for p in parts).encode()
    return (zlib.crc32(text) << 31 ^ zlib.crc32(text[::-1])) & ((1 << 63) - 1)


class Projector:
    """Base class of the feedback projectors: a subclass implements :meth:`project`, and nothing else is required.

    ``project(error, width)`` receives the rows of the output error, ``[n, k]`` (one row per token, node, ray or
    sample; ``k`` is the error's width) and returns ``[n, width]``, the raw ``B e`` of a fixed ``[width, k]``
    matrix ``B`` (or whatever fixed map the projector stands for). The engine then gives a feedback point of width
    ``d <= width`` the first ``d`` columns, times ``scale / sqrt(d)``: with ``B`` of unit-variance entries, each
    row's feedback then has the norm ``scale * ||e||`` on average, whatever the width.

    Optional:

    * :meth:`setup` ``(seed, device, dtype)``: called once, before the first projection, with the engine's seed
      (derived from it for a second output) and the device and dtype of the first error (``None`` when the engine
      does not know them yet). Draw the fixed matrices here, from the seed, never from the global RNG: every
      process of a DDP run then draws the same ones.
    * :meth:`state_dict` / :meth:`load_state_dict`: whatever the projector must keep across a resume (drawn
      matrices, a counter of noisy read-outs). It is saved with the feedback, in ``checkpoint["dfa"]``.
    * :meth:`for_output`: the projector of another output (several heads or losses); by default a fresh copy
      that :meth:`setup` gives a seed of its own.

    ``width`` may differ between calls (the widest point of each error width); a projector that draws a matrix
    should make a narrower one the first rows of a wider one.

    Example:
        >>> class Fixed(Projector):
        ...     def setup(self, seed, device=None, dtype=None):
        ...         g = torch.Generator().manual_seed(seed)
        ...         self.matrix = torch.randn(64, 3, generator=g)  # rows: up to 64 feedback features
        ...     def project(self, error, width):
        ...         return error @ self.matrix[:width].T.to(error)
        >>> p = Fixed()
        >>> p.setup(0)
        >>> p.project(torch.ones(5, 3), 8).shape
        torch.Size([5, 8])
    """

    def setup(self, seed: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        """Prepare for projections (draw fixed matrices from ``seed``). The base class does nothing."""

    def project(self, error: torch.Tensor, width: int) -> torch.Tensor:
        """``[n, k]`` error rows to the ``[n, width]`` raw feedback ``B e``."""
        raise NotImplementedError(
            f"{type(self).__name__}.project(error, width) is not implemented: a Projector subclass must return the "
            "[n, width] raw feedback of the [n, k] error rows."
        )

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of this projector (tensors, numbers, strings, dicts and lists of them)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s output. The base class accepts only an empty state."""
        if state:
            raise ValueError(
                f"DFA: {type(self).__name__} keeps no state, but the checkpoint holds {sorted(state)} for it; "
                "resume with the projector that wrote the checkpoint."
            )

    def for_output(self, name: str) -> Projector:
        """The projector of the output ``name`` (a second head): a fresh copy, set up with a seed of its own."""
        return copy.deepcopy(self)

    def __repr__(self) -> str:
        names = [n for n in inspect.signature(type(self).__init__).parameters if n != "self"]
        args = ", ".join(f"{n}={getattr(self, n)!r}" for n in names if hasattr(self, n))
        return f"{type(self).__name__}({args})"


class Wrapper(Projector):
    """A projector that changes the input or the output of another (``inner``): the base of :class:`Ternarized`,
    :class:`Quantized` and :class:`Noisy`. Set-up, state and the other outputs' copies go through ``inner``."""

    def __init__(self, inner: Projector) -> None:
        if not isinstance(inner, Projector):
            raise TypeError(
                f"DFA: {type(self).__name__} wraps a Projector (such as lightning_dfa.projectors.Dense()), got "
                f"{type(inner).__name__}."
            )
        self.inner = inner

    def setup(self, seed: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        self._seed = int(seed)
        self.inner.setup(seed, device, dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state.get("inner", {}))

    def for_output(self, name: str) -> Projector:
        other = copy.copy(self)
        other.inner = self.inner.for_output(name)
        return other


def project_rows(projector: Projector, rows: torch.Tensor, width: int) -> torch.Tensor:
    """``projector.project`` of ``rows`` (``[..., k]``) as ``[n, k]`` rows, back in ``rows``' leading shape; a
    projector that returns another shape is refused, naming it."""
    flat = rows.reshape(-1, rows.shape[-1])
    out = projector.project(flat, width)
    if not isinstance(out, torch.Tensor) or out.shape != (flat.shape[0], width):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise RuntimeError(
            f"DFA: projector {type(projector).__name__}.project(error, width={width}) returned {got} for error rows "
            f"of shape {list(flat.shape)}; it must return the [n, width] = {[flat.shape[0], width]} raw feedback."
        )
    return out.reshape(*rows.shape[:-1], width)


def class_name(obj: object) -> str:
    """``module.QualifiedName`` of ``obj``'s class (what a checkpoint records of a projector)."""
    return f"{type(obj).__module__}.{type(obj).__qualname__}"
