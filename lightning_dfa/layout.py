"""Lining feedback points up with an output's error: position by position, per item, or flattened, and which way
round a sequence-shaped point's first two dimensions go (found from the data flow, not from coincident sizes).

A point's positions are lined up with the error's by the data flow, not by coincident sizes. The first
forward after ``attach`` that records a sequence-shaped point (``[T, B, d]`` or ``[B, T, d]``) cuts its points
with :class:`_SoftCut` (still connected, blocked in the training backward), and the delivery probes, with one
vector-Jacobian product, which of each point's first two dimensions the output's batch items depend on. That
first step costs about one backprop step more; its gradients are those of any other DFA step.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .norms import NormSpec


@dataclass(frozen=True)
class PackedRows:
    """Which sequence and which step each row of a ``PackedSequence``'s data is (a recurrent block fed or returning
    packed sequences), or which group each row is pooled into (a graph's nodes): ``items`` and ``steps`` (one entry
    per row, on the data's device), ``count`` sequences of at most ``length`` steps, the recurrent layer's
    ``batch_first`` (which way round a padded error most likely is), and each row's weight in a mean pooling.

    Example:
        >>> from torch.nn.utils.rnn import pack_sequence
        >>> rows = PackedRows.of(pack_sequence([torch.ones(2, 1), torch.ones(3, 1)], enforce_sorted=False), True)
        >>> rows.items.tolist(), rows.steps.tolist(), rows.count, rows.length
        ([1, 0, 1, 0, 1], [0, 0, 1, 1, 2], 2, 3)
    """

    items: torch.Tensor
    steps: torch.Tensor
    count: int
    length: int
    batch_first: bool
    #: each row's weight (a mean over groups of rows: one over its group's size), or each row's and channel's
    #: (``[rows, channels]``, a maximum: its share of its group's largest value), or ``None``
    weights: torch.Tensor | None = None

    @staticmethod
    def of(packed: Any, batch_first: bool) -> PackedRows:
        sizes = packed.batch_sizes  # sequences still running at each step (on the CPU), longest first
        count, length = int(sizes[0]), len(sizes)
        position = torch.arange(count).expand(length, count)
        running = position < sizes.unsqueeze(1)
        items = position[running]  # the data's rows run step by step, each step over the sorted sequences
        if packed.sorted_indices is not None:
            items = packed.sorted_indices.cpu()[items]
        steps = torch.arange(length).unsqueeze(1).expand(length, count)[running]
        device = packed.data.device
        return PackedRows(items.to(device), steps.to(device), count, length, batch_first)


@dataclass
class PointMeta:
    """What the engine keeps of a feedback point between forward and backward: its key, shape, dtype, whether its
    feedback is flattened (convolutional blocks), the norm whose Jacobian shapes its feedback, and its layout."""

    key: str
    shape: torch.Size
    dtype: torch.dtype
    flatten: bool
    norm: NormSpec | None = None
    #: how the point's first two dimensions relate to the error's positions: ``"same"`` (lined up in order) or
    #: ``"swapped"`` (a sequence-first ``[positions, batch, ...]`` point for a batch-first error, or the reverse)
    layout: str = "same"
    #: the point lies in an encoder-decoder's encoder: its positions are not the error's (the decoder's), even where
    #: the lengths agree, so it is fed the error's mean over positions (:func:`lightning_dfa.roles.encoder_modules`)
    encoder: bool = False
    #: the point is a block's side output read by another block beside its main input (an encoder LSTM's ``(h, c)``
    #: that starts its decoder, its outputs as an attention's keys, a second stream of hidden states), recorded batch
    #: first: ONE row per item, fed the error's mean over that item's positions (:func:`state_fit`). ``"first"`` or
    #: ``"second"``: the error dimension of the items where both could be (the recurrent layer's ``batch_first``)
    state: str | None = None
    #: the point is a ``PackedSequence``'s data, or rows pooled over groups (a graph's nodes): which sequence and
    #: step (or group) each of its rows is
    rows: PackedRows | None = None
    #: a convolutional point ``[batch, channels, *positions]`` of an output that reads the last feature map through
    #: a global average over its positions (``pooled_channels``): a per-item error feeds it one vector per channel,
    #: the same at every position
    pooled: bool = False
    #: a convolutional point fed by an error that is itself a map (``positionwise_maps``): position by position
    positionwise: bool = False


def per_item(shape: torch.Size) -> bool:
    """``[batch, k]``, or ``[batch, k, 1, ...]``: one vector per item (a class map pooled with ``keepdim``)."""
    return len(shape) == 2 or (len(shape) > 2 and math.prod(shape[2:]) == 1)


def both_maps(error: torch.Size, shape: torch.Size) -> bool:
    """An error ``[batch, k, *positions]`` and a point ``[batch, channels, *positions']``, both 2-D or 3-D maps (the
    positions may differ: the error is resampled), or 1-D maps of the same length (and not a ``[batch, positions,
    k]`` error that ``"token_channels"`` reads)."""
    if len(error) != len(shape) or error[0] != shape[0] or not (is_map(error) and is_map(shape)):
        return False
    return len(shape) in (4, 5) or (len(shape) == 3 and error[2] == shape[2] and error[1] != shape[2])


def a_channel_map(error: torch.Size, shape: torch.Size) -> bool:
    """An error ``[batch, *positions]`` (one value per pixel: a depth map, a binary mask's logits) and a 2-D or 3-D
    feature map ``[batch, channels, *positions']`` whose positions have the same proportions."""
    if len(error) != len(shape) - 1 or len(shape) not in (4, 5) or error[0] != shape[0] or not is_map(shape):
        return False
    return math.prod(error[1:]) > 1 and all(e * shape[2] == error[1] * s for e, s in zip(error[1:], shape[2:]))


def is_map(shape: torch.Size) -> bool:
    """``[batch, channels, *positions]`` with more than one position: a convolutional feature map."""
    return len(shape) >= 3 and math.prod(shape[2:]) > 1


class Layouts:
    """How each feedback point's first two dimensions line up with each output's error, learned from the data
    flow (one vector-Jacobian product per point and output, at the first delivery that needs it).

    ``relations`` maps ``(point, output)`` to ``"same"``, ``"swapped"`` or ``"none"``; ``pending`` says whether
    the next forward with sequence-shaped points keeps them connected for a probe; ``probing`` is true while a
    probe runs (the soft cuts then let it through)."""

    def __init__(self) -> None:
        self.relations: dict[tuple[str, str], str] = {}
        self.pending = True
        self.probing = False

    def align(self, error: torch.Size, point: PointMeta, output: str) -> tuple[str, int, int]:
        """``(kind, k, d)``: how the point lines up with the error (see :func:`fit`), the error's and the point's
        widths. Raises with the point and output named when they cannot line up."""
        shape = laid_out(point)
        if point.state is not None:
            return state_fit(error, shape, point, output)
        if point.rows is not None:
            return packed_fit(error, point, output)
        if point.pooled and per_item(error) and error[0] == shape[0] and len(shape) >= 3:
            return "channels", error[1], shape[1]
        if point.positionwise and both_maps(error, shape):
            return "positions", error[1], shape[1]
        if point.positionwise and a_channel_map(error, shape):
            return "pixels", 1, shape[1]
        kind = fit(error, shape, point.flatten)
        if kind is None and len(error) == 2 and len(shape) == 2 and error[0] < shape[0] and not point.flatten:
            raise RuntimeError(
                f"DFA: the error at the output module {output!r} has one row per item ({list(error)}), and feedback "
                f"point {point.key!r} one row per element of the items ({list(shape)}): a pooling over a ragged "
                "batch lies between them whose groups the engine does not follow (it follows sums, means and maxima "
                "over an index, as torch_geometric's global_add_pool, global_mean_pool and global_max_pool; not a "
                "product with an assignment matrix or a reduction written by hand), so the feedback cannot tell which"
                " rows belong to which item. Pool with global_mean_pool(x, batch), or apply the output module to the "
                "rows before the pooling, so that its error has their rows: a Linear head commutes with mean pooling "
                "(global_mean_pool(head(x), batch) computes what head(global_mean_pool(x, batch)) does)."
            )
        if kind is None:
            swapped = "" if point.layout == "swapped" else " (its first two dimensions swapped do not fit either)"
            raise RuntimeError(
                f"DFA: cannot line up the error of shape {list(error)} (gradient at the output module "
                f"{output!r}) with feedback point {point.key!r} of shape "
                f"{list(point.shape)}{swapped}: their first (batch) dimensions differ. Choose an output= whose "
                "output has the blocks' batch/positions dimensions, or other blocks=."
            )
        if kind == "token" and point.encoder and len(error) == 3 and len(shape) == 3:
            kind = "mean"  # an encoder's position i is not the decoder's position i, whatever the lengths
        if kind in ("token", "broadcast", "mean", "mean_first"):
            return kind, error[-1], shape[-1]
        if kind == "token_channels":
            return kind, error[-1], shape[1]
        if kind == "mean_flatten":
            return kind, error[-1], math.prod(shape[1:])
        return kind, math.prod(error[1:]), math.prod(shape[1:])

    def lay_out(self, error: torch.Size, points: list[PointMeta], delivery: Any | None) -> list[PointMeta | None]:
        """Each point with its layout relative to this error (``None``: no feedback from this output this step).

        A sequence-shaped point whose first two dimensions could line up with the error either way (``[T, B, d]``
        against ``[B, T, V]`` with ``T == B``, or against rows ``[B * T, V]``) is lined up as the data flow says:
        the first forward after ``attach`` keeps such points connected (:class:`_SoftCut`), and the first delivery
        probes which of the point's positions the output's positions depend on (:meth:`probe`). Until a
        probe has seen a point, it gets no feedback from such an output rather than a possibly transposed one."""
        source = delivery.source.split("#")[0] if delivery is not None else ""  # every call of a module alike
        out: list[PointMeta | None] = list(points)
        check = [i for i, p in enumerate(points) if p.layout == "same" and p.state is None and swappable(error, p)]
        todo = [i for i in check if (points[i].key.split("#")[0], source) not in self.relations]
        if todo and delivery is not None and delivery.probe is not None:
            self.probe(error, delivery, todo)
        if delivery is not None and delivery.probe is not None:
            self.pending = False
            delivery.probe = None  # the tensors are no longer needed
        for i in check:
            p = points[i]
            relation = self.relations.get((p.key.split("#")[0], source))
            if relation is None:
                out[i] = None
                self.pending = True  # the next forward probes it
            elif relation == "swapped" or (relation == "none" and fit(error, p.shape, p.flatten) is None):
                out[i] = dataclasses.replace(p, layout="swapped")
            elif fit(error, p.shape, p.flatten) is None:
                raise RuntimeError(
                    f"DFA: feedback point {p.key!r} of shape {list(p.shape)}: the data flow lines its first two "
                    f"dimensions up with those of the error {list(error)} of output {source!r}, but their sizes "
                    "differ. Choose other blocks= or output=."
                )
        return out

    def probe(self, error: torch.Size, delivery: Any, todo: list[int]) -> None:
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
            kind = fit(error, p.shape, p.flatten) or fit(error, swapped(p.shape), p.flatten)
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
                self.probing = True
                try:
                    grads = torch.autograd.grad([y], wrt, [v], retain_graph=True, allow_unused=True)
                finally:
                    self.probing = False
            for i, grad in zip(idx, grads):
                p = delivery.points[i]
                fits = fit(error, p.shape, p.flatten) or fit(error, swapped(p.shape), p.flatten)
                relation = layout_from_dependence(grad, p.shape, "token" if fits == "token" else "broadcast")
                if relation is None:
                    raise RuntimeError(
                        f"DFA: cannot tell how feedback point {p.key!r} of shape {list(p.shape)} lines up with the "
                        f"error of shape {list(error)} of output {delivery.source!r}: the output's positions depend "
                        "on the point's positions along both of its first two dimensions. Choose blocks= whose "
                        "outputs keep the batch items apart, or another output=."
                    )
                self.relations[(p.key.split("#")[0], delivery.source.split("#")[0])] = relation


#: the alignments of a :attr:`PointMeta.state` point other than ``"token"`` and ``"broadcast"``: one row per item,
#: the mean of its error rows (``"items"``: its whole error, flattened)
STATE_KINDS = ("mean", "mean_first", "mean_rows", "mean_rows_first", "items")


def state_fit(error: torch.Size, shape: torch.Size, point: PointMeta, output: str) -> tuple[str, int, int]:
    """How a point of :attr:`PointMeta.state` (a recurrent state ``[batch, layers, d]``, another block's second
    output ``[batch, ..., d]``) lines up with the error: per item (``"token"`` or ``"broadcast"``) for one error
    row per item, else the mean over the item's positions, the error's items along its first dimension (``"mean"``)
    or its second (``"mean_first"``, a sequence-first error); any other error with one entry per item along its
    first dimension (an image's) is flattened per item (``"items"``)."""
    items = shape[0]
    if len(error) == 2 and error[0] == items:
        return ("token" if len(shape) == 2 else "broadcast"), error[-1], shape[-1]
    if len(error) == 2 and error[0] % items == 0:  # the items' positions flattened to rows, in the layer's order
        return ("mean_rows" if point.state == "first" else "mean_rows_first"), error[-1], shape[-1]
    if len(error) == 3:
        along = [i for i in (0, 1) if error[i] == items]
        if len(along) == 2:
            along = [0 if point.state == "first" else 1]
        if along:
            return ("mean" if along[0] == 0 else "mean_first"), error[-1], shape[-1]
    if len(error) >= 2 and error[0] == items:  # another layout (an image [batch, channels, height, width]): per item
        return "items", math.prod(error[1:]), shape[-1]
    raise RuntimeError(
        f"DFA: cannot line up the error of shape {list(error)} (gradient at the output module {output!r}) with the "
        f"recurrent state {point.key!r} ({items} items): no dimension of the error has one entry per item. Choose "
        "an output= whose output has the batch dimension, or blocks= that do not hand the state from block to block."
    )


def packed_fit(error: torch.Size, point: PointMeta, output: str) -> tuple[str, int, int]:
    """How a ``PackedSequence``'s data (:attr:`PointMeta.rows`) lines up with the error: row by row where the output
    reads the packed data (``"token"``), per sequence where the error has one row per sequence (``"rows"``), or
    step by step from a padded error (``pad_packed_sequence``'s ``[sequences, steps, k]``: ``"rows_bt"``, or
    ``[steps, sequences, k]``: ``"rows_tb"``)."""
    rows, shape = point.rows, point.shape
    assert rows is not None
    if error[:-1] == shape[:-1]:
        return "token", error[-1], shape[-1]
    if len(error) == 2 and error[0] == rows.count:
        return "rows", error[-1], shape[-1]
    if len(error) == 3:
        along = [i for i in (0, 1) if error[i] == rows.count and error[1 - i] >= rows.length]
        if len(along) == 2:
            along = [0 if rows.batch_first else 1]
        if along:
            return ("rows_bt" if along[0] == 0 else "rows_tb"), error[-1], shape[-1]
    raise RuntimeError(
        f"DFA: feedback point {point.key!r} is a PackedSequence's data ({shape[0]} rows: {rows.count} sequences of "
        f"at most {rows.length} steps), and the error at the output module {output!r} has shape {list(error)}: it has "
        "neither one row per packed row, nor one per sequence, nor one per sequence and step. Choose an output= "
        "whose output has the sequences' batch dimension."
    )


def swapped(shape: torch.Size) -> torch.Size:
    return torch.Size((shape[1], shape[0], *shape[2:]))


def laid_out(point: PointMeta) -> torch.Size:
    """The point's shape in the error's order of positions."""
    return swapped(point.shape) if point.layout == "swapped" else point.shape


def fit(error: torch.Size, shape: torch.Size, flatten: bool) -> str | None:
    """How a point of ``shape`` lines up with an error of shape ``error`` (``None``: it does not)."""
    if flatten and len(shape) == len(error) == 3 and error[0] == shape[0] and error[1] == shape[2] > 1:
        # a convolutional block's channels-first sequence [batch, channels, positions] and a position-wise error
        # [batch, positions, outputs] (a temporal convolution's tagger, SqueezeBERT): position by position
        return "token_channels"
    if not flatten and len(error) >= 1 and error[:-1] == shape[:-1]:
        return "token"
    if not flatten and min(len(error), len(shape)) >= 2 and merged(error[:-1], shape[:-1]):
        # the same tokens, one side flattened to rows (``x.view(-1, d)`` before a Linear, as OPT's MLP, a head
        # applied to ``[batch * positions, d]``, or ``[batch, choices, positions]`` folded into ``[batch * choices,
        # positions]``): row-major order lines them up
        return "token"
    if not flatten and len(error) >= 2 and prefix(error, shape) is not None:
        # one error row per item (or per ``[batch, choices]`` pair folded into the point's first dimension):
        # broadcast over the point's positions
        return "broadcast"
    seq_first = len(shape) == len(error) == 3 and error[1] == shape[1] and error[0] not in (shape[0], shape[1])
    if not flatten and seq_first:
        # a sequence-first point and a sequence-first error of other lengths (the encoder of an nn.LSTM or
        # nn.Transformer seq2seq run [positions, batch, d]; a batch-first error, its items first, is the swapped
        # layout's): the items along the second dimension, so the error's mean over its positions, broadcast over the
        # point's
        return "mean_first"
    if len(error) == 0 or len(shape) == 0 or error[0] != shape[0]:
        return None
    if not flatten and len(shape) == 3 and len(error) == 3:
        return "mean"  # per-item errors over other positions (a decoder's, for an encoder's points): their mean
    if len(shape) == 3 and len(error) == 3 and error[1] != shape[1]:
        # a flattened point (a convolution's [batch, channels, positions]) and errors over other positions: their
        # mean, a vector per entry of the point (a fixed map from the error's positions to the point's would tie
        # positions that need not correspond: a decoder's to an encoder's front-end)
        return "mean_flatten"
    return "flatten"


def prefix(error: torch.Size, shape: torch.Size) -> int | None:
    """``j`` such that the error's leading positions are the point's first ``j`` dimensions, with positions
    (at least one dimension) left over, or ``None``."""
    n = math.prod(error[:-1])
    for j in range(1, len(shape) - 1):
        if math.prod(shape[:j]) == n:
            return j
    return None


def merged(a: Sequence[int], b: Sequence[int]) -> bool:
    """One list of sizes is the other with runs of consecutive dimensions merged (``[2, 3, 8]`` and ``[6, 8]``)."""
    prefix_a = set(itertools.accumulate(a, operator.mul))
    prefix_b = set(itertools.accumulate(b, operator.mul))
    return math.prod(a) == math.prod(b) and (prefix_a <= prefix_b or prefix_b <= prefix_a)


def sequence_shaped(shape: torch.Size, flatten: bool) -> bool:
    """A point whose first two dimensions could be (batch, positions) either way round."""
    return not flatten and len(shape) >= 3 and shape[0] >= 2 and shape[1] >= 2


def swappable(error: torch.Size, point: PointMeta) -> bool:
    """The point's first two dimensions, swapped, would also line up with the error (position-wise or per item)."""
    if not sequence_shaped(point.shape, point.flatten):
        return False
    return fit(error, swapped(point.shape), point.flatten) in ("token", "broadcast", "mean")


def layout_from_dependence(grad: torch.Tensor | None, shape: torch.Size, kind: str) -> str | None:
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


def error_rows(error: torch.Tensor, kind: str, k: int, items: int = 0) -> torch.Tensor:
    """The error as the rows a point of alignment ``kind`` is fed from (``[..., k]``); ``items``: the batch size of
    a recurrent state point's alignments (``"mean_rows"``: rows flattened item by item, ``"mean_rows_first"``:
    position by position)."""
    if kind == "mean_rows":
        return error.reshape(items, -1, k).mean(dim=1)
    if kind == "mean_rows_first":
        return error.reshape(-1, items, k).mean(dim=0)
    if kind == "channels":  # (a [batch, classes, 1, 1] error too: a SqueezeNet's pooled class map)
        return error.reshape(error.shape[0], k)
    if kind == "positions":  # [batch, k, *positions] -> a row per position
        return error.movedim(1, -1)
    if kind == "pixels":  # [batch, *positions]: one value per position
        return error.unsqueeze(-1)
    if kind in ("token", "token_channels", "rows_bt", "rows_tb"):
        return error
    if kind == "broadcast":
        return error.reshape(-1, k)
    if kind in ("mean", "mean_flatten"):
        return error.mean(dim=1)
    if kind == "mean_first":
        return error.mean(dim=0)
    return error.reshape(error.shape[0], -1)


def like_the_tokens(points: Sequence[PointMeta], aligned: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """Alignments, with a flattened point fed the mean error as a token sequence (``"mean"``, one vector broadcast
    over its positions) where a point of its shape that is not flattened is: a patch embedding's output before the
    encoder layers of a masked autoencoder (ViTMAE), which keeps a random subset of the patches, so that a vector
    per position would tie each position's feedback to whichever patch lands there."""
    tokens = {tuple(p.shape) for p, (kind, _, _) in zip(points, aligned) if kind == "mean" and not p.flatten}
    return [
        (("mean", k, p.shape[-1]) if kind == "mean_flatten" and tuple(p.shape) in tokens else (kind, k, d))
        for p, (kind, k, d) in zip(points, aligned)
    ]


def laid_on(fb: torch.Tensor, point: PointMeta, kind: str, error: torch.Size) -> torch.Tensor:
    """A point's feedback (``[..., d]``, in the error's order of positions) in the point's own shape and dtype."""
    shape = laid_out(point)
    d = fb.shape[-1]
    if kind == "broadcast":
        j = prefix(error, shape)
        assert j is not None
        fb = fb.reshape(*shape[:j], *([1] * (len(shape) - 1 - j)), d).expand(shape)
    elif kind == "channels":  # one vector per item and channel, the same at every position
        fb = fb.reshape(*shape[:2], *([1] * (len(shape) - 2))).expand(shape)
    elif kind in ("positions", "pixels"):  # [batch, *the error's positions, d] -> [batch, d, *the point's positions]
        fb = fb.movedim(-1, 1)
        if fb.shape[2:] != shape[2:]:
            fb = torch.nn.functional.interpolate(fb, size=tuple(shape[2:]), mode="area")
    elif kind == "token_channels":
        fb = fb.transpose(1, 2)  # [batch, positions, channels] -> the point's [batch, channels, positions]
    elif kind in ("rows", "rows_bt", "rows_tb"):  # a PackedSequence's rows: each its sequence's (and step's) feedback
        rows = point.rows
        assert rows is not None
        if kind == "rows":
            fb = fb.index_select(0, rows.items)
            weights = rows.weights
            if weights is not None:  # a mean's per row, a maximum's per row and channel
                fb = fb * (weights.unsqueeze(1) if weights.dim() == 1 else weights).to(fb.dtype)
        else:
            fb = fb[rows.items, rows.steps] if kind == "rows_bt" else fb[rows.steps, rows.items]
    elif kind in STATE_KINDS:
        # (a state point is recorded batch first; a sequence-first encoder point has its items second)
        across = kind == "mean_first" and point.state is None
        fb = fb if len(shape) == 2 else (fb.unsqueeze(0) if across else fb.unsqueeze(1)).expand(shape)
    elif fb.shape != shape:  # "flatten", "mean_flatten", or "token" with the positions flattened on one side
        fb = fb.reshape(shape)
    if point.layout == "swapped":
        fb = fb.transpose(0, 1)
    return fb if fb.dtype == point.dtype else fb.to(point.dtype)
