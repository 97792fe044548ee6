"""The projectors built on random feedback matrices: :class:`Dense` (the default), :class:`Sketch` (a structured
matrix for wide errors) and :class:`TopK` (the largest entries of each error row); the matrices are in
:mod:`.bank`."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .bank import DISTRIBUTIONS, SKETCH_MIN_RATIO, FeedbackBank
from .base import Projector


# ---------------------------------------------------------------------------------------------- projectors
class Dense(Projector):
    """The dense random feedback matrix (the default): ``B e`` with ``B`` of i.i.d. entries of ``distribution``,
    drawn once from the seed in fixed chunks of rows (a wider point keeps a narrower one's feedback) and saved in
    checkpoints. ONE GEMM per error width.

    Args:
        distribution: ``"uniform"`` on ``[-1, 1)`` (the DFA authors'), ``"gaussian"`` or ``"rademacher"``;
            ``None`` (default): the engine's ``distribution`` option.

    Example:
        >>> p = Dense("gaussian")
        >>> p.setup(seed=0)
        >>> p.project(torch.randn(4, 10), 32).shape
        torch.Size([4, 32])
        >>> bool(torch.equal(p.project(torch.eye(10), 8), p.project(torch.eye(10), 32)[:, :8]))
        True
    """

    def __init__(self, distribution: str | None = None) -> None:
        if distribution is not None and distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"DFA: {type(self).__name__}(distribution={distribution!r}): choose one of {DISTRIBUTIONS} or None "
                "(the engine's distribution option)."
            )
        self.distribution = distribution
        #: the matrices; the engine's own bank when it built this projector from its options
        self._bank: FeedbackBank | None = None
        self._owns_bank = True
        #: the output whose error this copy projects (``""``: the primary one); every output has its own matrices
        self._source = ""

    @property
    def bank(self) -> FeedbackBank:
        """The stored matrices (after :meth:`setup`)."""
        if self._bank is None:
            raise RuntimeError(f"DFA: {type(self).__name__}.setup(seed) must run before the first projection.")
        return self._bank

    def _share(self, bank: FeedbackBank) -> None:
        """Use the engine's bank (its matrices are saved with the engine's feedback state)."""
        self._bank, self._owns_bank = bank, False

    def setup(self, seed: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        if self._bank is None:
            self._bank = FeedbackBank(seed, self.distribution or "uniform")

    def project(self, error: torch.Tensor, width: int) -> torch.Tensor:
        k = error.shape[-1]
        return error @ self.bank.matrix(k, width, error.device, error.dtype, source=self._source).t()

    def for_output(self, name: str) -> Projector:
        other = copy.copy(self)  # the same bank: the output's name keys its own matrices there
        other._source = name
        return other

    def state_dict(self) -> dict[str, Any]:
        return {"bank": self.bank.state_dict()} if self._owns_bank and self._bank is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "bank" in state:
            self.bank.load_state_dict(state["bank"])


class Sketch(Dense):
    """A structured random feedback matrix for wide errors (a vocabulary): exact, not an approximation of some
    dense ``B`` (it *is* the feedback). Output index ``v = i * g + j`` gets the row ``sum_c A[c, i] G_c[j] / 2``
    (``c < 4``), so the projection is one pass over the error and a small ``[4 g, d]`` GEMM
    (``g = max(sqrt(k), d / 4)``): for a 50257-word vocabulary about 1/30 of the dense GEMM. Its entries are an
    integer hash of (seed, position) computed on the device (:meth:`FeedbackBank.sketch`): checkpoints carry no
    matrix.
    Errors no wider than ``4 d`` use the dense matrix (there it is as cheap), also for the narrower points of other
    layouts with the same error width. What the ``sketch`` option and the ``"auto"`` recipe use.

    Args:
        min_ratio: errors no wider than ``min_ratio`` times the feedback width use the dense matrix (default 4);
            ``0``: the structured matrix for every error.
        distribution: of the matrix ``G``, as :class:`Dense`'s.

    Example:
        >>> p = Sketch()
        >>> p.setup(seed=0)
        >>> p.project(torch.randn(3, 1000), 16).shape, p.bank.nbytes
        (torch.Size([3, 16]), 0)
    """

    def __init__(self, min_ratio: float = SKETCH_MIN_RATIO, distribution: str | None = None) -> None:
        if isinstance(min_ratio, bool) or not isinstance(min_ratio, (int, float)) or not min_ratio >= 0:
            raise ValueError(f"DFA: Sketch(min_ratio={min_ratio!r}) must be a number >= 0 (default 4).")
        super().__init__(distribution)
        self.min_ratio = min_ratio

    def project(self, error: torch.Tensor, width: int) -> torch.Tensor:
        k = error.shape[-1]
        # dense wherever a point of this error width is wide enough for it (the engine projects the widest point
        # first): narrower points of other layouts read the same matrix (a pyramid's stages)
        if k <= self.min_ratio * max(width, self.bank.dense_rows(k, self._source)):
            return super().project(error, width)
        g, a, big = self.bank.sketch(k, width, error.device, error.dtype, source=self._source)
        return sketch_first_stage(error, a, g).flatten(1) @ big


def sketch_first_stage(error: torch.Tensor, a: torch.Tensor, g: int) -> torch.Tensor:
    """The first stage of :class:`Sketch`'s projection, ``Y[n, c, j] = sum_i A[c, i] E[n, i g + j]`` (``[n, c, g]``):
    with each row of the error viewed as ``E[i, j]`` (``v = i g + j``), ONE batched product over a view of the error
    (no copy); the last, partial group (``k`` not a multiple of ``g``) is added separately."""
    n, k = error.shape
    c = a.shape[0]
    full, rest = divmod(k, g)
    grid = error[:, : full * g].unflatten(1, (full, g))  # [n, full, g], a view
    y = torch.bmm(a[:, :full].unsqueeze(0).expand(n, c, full), grid)  # [n, c, g]
    if rest:
        y[:, :, :rest].add_(a[:, full].view(1, c, 1) * error[:, full * g :].unsqueeze(1))
    return y


class TopK(Dense):
    """Project only the ``k`` largest-magnitude entries of each error row: a gather of ``k`` rows of the dense
    ``B`` per row instead of a GEMM over the whole width, every dropped entry replaced by the dropped entries' mean
    ``c``: ``sum_kept (e_j - c) B_j + c * sum_all B_j``. Exact when the dropped entries are equal (a flat softmax
    tail). Errors no wider than ``k`` use the dense matrix. What the ``topk=k`` option uses.

    Example:
        >>> p = TopK(4)
        >>> p.setup(seed=0)
        >>> flat = torch.full((2, 100), 0.01)
        >>> flat[:, :3] = torch.tensor([1.0, -2.0, 0.5])
        >>> dense = Dense()
        >>> dense.setup(seed=0)
        >>> torch.allclose(p.project(flat, 8), dense.project(flat, 8), atol=1e-5)
        True
    """

    def __init__(self, k: int, distribution: str | None = None) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"DFA: TopK(k={k!r}): k must be a positive integer such as 64.")
        super().__init__(distribution)
        self.k = k

    def project(self, error: torch.Tensor, width: int) -> torch.Tensor:
        k, topk = error.shape[-1], self.k
        if topk >= k:
            return super().project(error, width)
        index, kept = _largest_entries(error, topk)
        # [k, width], contiguous
        table = self.bank.matrix(k, width, error.device, error.dtype, transposed=True, source=self._source)
        tail = ((error.sum(-1) - kept.sum(-1)) / (k - topk)).unsqueeze(-1)  # mean of the dropped entries
        out = nn.functional.embedding_bag(index, table, per_sample_weights=kept - tail, mode="sum")
        out.addcmul_(tail * k, self.bank.mean_column(k, width, error.device, error.dtype, source=self._source))
        return out


def _largest_entries(rows: torch.Tensor, n: int, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Column indices and values of the ``n`` largest-magnitude entries of each row of ``rows`` (any order).

    Exact (ties aside) and cheap for wide rows: the ``n`` largest entries all lie in the ``n`` blocks of ``block``
    columns whose largest magnitudes are largest, so a top-``n`` over the blocks' maxima (two contiguous passes)
    and a top-``n`` over those blocks' ``n * block`` entries replace a top-``n`` over the whole row (and its
    ``abs`` copy). Narrow rows use a plain ``topk``.
    """
    width = rows.shape[-1]
    if width < 4 * n * block:
        index = rows.abs().topk(n, dim=-1, sorted=False).indices
        return index, rows.gather(-1, index)
    full = width // block
    view = rows[:, : full * block].unflatten(-1, (full, block))
    score = torch.maximum(view.amax(-1), view.amin(-1).neg())  # [R, full]: largest magnitude per block
    if full * block < width:
        score = torch.cat([score, rows[:, full * block :].abs().amax(-1, keepdim=True)], dim=-1)
    blocks = score.topk(n, dim=-1, sorted=False).indices  # [R, n]
    cols = (blocks.unsqueeze(-1) * block + torch.arange(block, device=rows.device)).flatten(1)  # [R, n * block]
    inside = cols < width
    cols = torch.where(inside, cols, width - 1)
    values = torch.where(inside, rows.gather(-1, cols), 0)  # columns past the end count as zeros
    pick = values.abs().topk(n, dim=-1, sorted=False).indices
    return cols.gather(-1, pick), values.gather(-1, pick)


def default_distribution(projector: Projector, distribution: str) -> None:
    """Give the random-matrix projectors (also inside wrappers) whose ``distribution`` is ``None`` the engine's."""
    while isinstance(projector, Projector):
        if isinstance(projector, Dense) and projector.distribution is None:
            projector.distribution = distribution
        projector = getattr(projector, "inner", None)
