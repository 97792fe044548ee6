"""The autograd side of DFA: the Function that ties a forward's feedback points to an output and hands each point
its projected error in the backward, the soft cut of a layout-probe forward, and the records they share with the
engine. Nothing here knows of Lightning.

Several outputs (heads, losses; ``output=[...]``, or one output module called several times): every output call
ties all the points of its forward recorded before it, each through its own delivery with its own fixed
matrices, so each point receives ``sum_j B_j e_j``; autograd runs only the deliveries the loss depends on, and
an output whose error reached it through a later output (``head2(head1(h))``) passes it on without delivering.

A point is tied by its *edge* (:class:`_PointEdge`, a 0-element tensor computed from it), not by its values: the
deliveries leave its feedback in its slot and the edge's backward hands the sum to the point, so the engine keeps
no activation alive that the network itself would have freed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from .layout import Layouts, PackedRows, PointMeta


class _Hook:
    """A hook bound to an engine. Copies (``deepcopy``, pickling) become inert pass-through hooks, so a copied
    model (EMA, SWA) is a plain model that never feeds the original engine."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    @torch.compiler.disable
    def __call__(self, *args: Any) -> Any:
        # under ``torch.compile`` the hook runs eagerly between the compiled graphs: traced, its bookkeeping (weak
        # references, ids, versions) would break the graph inside it and recompile at each step's new tensors
        return self.fn(*args)

    def __deepcopy__(self, memo: dict) -> _PassThrough:
        return _PassThrough()

    def __reduce__(self) -> tuple:
        return (_PassThrough, ())


class _PassThrough:
    def __call__(self, *args: Any) -> None:
        return None


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
    __slots__ += ("reached", "forward", "slots", "named", "one_position", "candidate")

    def __init__(self, engine: Any, points: list[PointMeta], source: str, slots: list[_Slot]) -> None:
        self.engine = engine
        self.points = points
        #: where each point's feedback goes (the point's edge hands it on)
        self.slots = slots
        self.source = source
        #: a block's input was computed from this output: it lies before a block, so it is no error source
        self.feeds_point = False
        #: named in ``output=``: an error source even where a block's input is computed from it (a VAE's mean and
        #: variance layers, whose KL term the encoder should learn from)
        self.named = False
        #: the output module has no trainable parameter (a fixed readout, or a network frozen for this step)
        self.frozen = False
        #: a layer that may be an output, tied because it was called after points (not the discovered output)
        self.candidate = False
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
        #: seen in the first backward (:func:`_nonzero_at_one_position`), for a loss read through a compiled graph
        self.one_position: bool | None = None


def _noting_create_graph(backward: Callable[..., tuple]) -> Callable[..., tuple]:
    """Tell the engine when a backward that builds a graph (``create_graph=True``: a gradient penalty) runs the
    delivery (``once_differentiable`` below runs it without gradients, hiding that)."""

    def wrapper(ctx: Any, *grads: torch.Tensor) -> tuple:
        if torch.is_grad_enabled() and not ctx.delivery.engine.layouts.probing:
            ctx.delivery.engine._differentiated(ctx.delivery.source.split("#")[0])
        return backward(ctx, *grads)

    return wrapper


class _DeliverFeedback(torch.autograd.Function):
    """Identity on the output; its backward hands each feedback point its projected error.

    The output is returned as ``output.detach()``: the same memory (no copy of a ``[tokens, vocabulary]`` logits
    tensor), but not a view, so user code may modify it in place (``logits /= T``, ``F.relu(out, inplace=True)``)
    exactly where plain PyTorch allows it; a view returned by a custom Function cannot be modified in place."""

    @staticmethod
    def forward(
        ctx: Any,
        delivery: _Delivery,
        activations: list[torch.Tensor | None],
        output: torch.Tensor,
        *edges: torch.Tensor,
    ) -> torch.Tensor:
        ctx.delivery = delivery
        # norm-aware feedback needs the activations of the points it shapes (their consumer norm keeps them too);
        # learned feedback reads every point's
        ctx.norm_index = [i for i, a in enumerate(activations) if a is not None]
        ctx.save_for_backward(*[activations[i] for i in ctx.norm_index])
        return output.detach()

    @staticmethod
    @_noting_create_graph
    @once_differentiable
    def backward(ctx: Any, error: torch.Tensor) -> tuple:
        delivery: _Delivery = ctx.delivery
        needs = ctx.needs_input_grad[3:]
        if delivery.engine.layouts.probing:
            # a layout probe's vector-Jacobian product from a later output crosses this tie (an output whose output
            # the later one reads, such as a decoder's final norm before the heads): the probe measures the
            # network's data flow, so the tie is the identity on the output and delivers, records and closes nothing
            return (None, None, error, *[None for _ in needs])
        if delivery.forward is not None and not delivery.forward.closed:
            delivery.forward.closed = True  # a later call of an output starts from new points
            delivery.engine._release(delivery.forward)
        # A frozen output computed from a trainable one (the frozen discriminator of a generator's step) is part
        # of the loss: the trainable output upstream reads the error.
        defer = delivery.frozen and any(not up.frozen for up in delivery.upstream)
        if not defer:
            for up in delivery.upstream:
                up.downstream_ran = True
        if delivery.downstream_ran or (delivery.feeds_point and not delivery.named) or defer:
            # not an error source: this output's error came through a later output, or it lies before a block
            delivery.probe = None
            return (None, None, error, *[None for _ in needs])
        delivery.engine._delivered(delivery)
        if delivery.one_position is None and not delivery.engine.roles_from_loss:
            # the first backward (once: the check reads the whole error and waits for the device): a compiled graph
            # may hide how the loss reads it
            delivery.one_position = _nonzero_at_one_position(error)
        activations: list[torch.Tensor | None] = [None] * len(delivery.points)
        for i, tensor in zip(ctx.norm_index, ctx.saved_tensors):
            activations[i] = tensor
        feedback = delivery.engine._project(error, delivery.points, activations, delivery)
        for slot, fb, need in zip(delivery.slots, feedback, needs):
            if fb is not None and need:
                slot.add(fb)
        return (None, None, error, *[error.new_empty(0) if n else None for n in needs])


class _SoftCut(torch.autograd.Function):
    """The cut of a feedback point during a layout-probe forward, or the first training forward (for
    ``loss_readers``): the rest of the network gets a value that stays connected to the point, so a probe can follow
    the data flow from an output back to the points, and the first loss shows which points it reads directly; in
    the training backward nothing crosses it (as with the ordinary cut, ``detach``)."""

    @staticmethod
    def forward(ctx: Any, layouts: Layouts, tensor: torch.Tensor, copy: bool) -> torch.Tensor:
        ctx.layouts = layouts
        # a probe's copy has its own memory (downstream code may modify it in place); otherwise the value shares
        # the point's memory, as the ordinary cut does
        return tensor.clone() if copy else tensor.detach()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return None, (grad if ctx.layouts.probing else None), None


class _ForwardState:
    __slots__ = ("closed",)

    def __init__(self) -> None:
        self.closed = False


class _Slot:
    """Where the deliveries of one backward leave a point's feedback (summed) for the point's edge to pass on."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def add(self, feedback: torch.Tensor) -> None:
        self.value = feedback if self.value is None else self.value + feedback


class _PointEdge(torch.autograd.Function):
    """A 0-element tensor computed from a point: the point's place in the graph without its values. The deliveries
    take it as an input, put the point's feedback in its slot, and its backward hands that feedback to the point.
    So the engine keeps no activation alive between a block's call and the backward: as with backprop, a block's
    output is freed once the layers that read it are done with it (unless they keep it for their own backward)."""

    @staticmethod
    def forward(ctx: Any, slot: _Slot, tensor: torch.Tensor) -> torch.Tensor:
        ctx.slot = slot
        ctx.set_materialize_grads(False)
        return tensor.new_empty(0)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, signal: torch.Tensor | None) -> tuple:
        if signal is None:
            # no delivery (nor reattached value) of this backward filled the slot: it hands nothing on, and leaves
            # the slot alone. A layout probe's vector-Jacobian product crossing another output's tie runs this
            # node in the middle of the training backward: handing it the feedback delivered so far would add that
            # feedback to the probe's measured dependence (every item's, so the probe cannot tell the layout) and
            # take it from the training backward.
            return None, None
        feedback, ctx.slot.value = ctx.slot.value, None
        return None, feedback


class _Reattach(torch.autograd.Function):
    """The value of a point, connected again to the point's graph through its edge (the output module reading the
    last block's output directly: that block gets the true error at the output's input)."""

    @staticmethod
    def forward(ctx: Any, slot: _Slot, layouts: Layouts, edge: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        ctx.slot, ctx.layouts = slot, layouts
        return value.detach()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        if ctx.layouts.probing:
            # a layout probe: straight to the point (in a probe forward the value is the point itself), not into the
            # slot the training backward's feedback goes through
            return None, None, None, grad
        ctx.slot.add(grad)
        return None, None, grad.new_empty(0), None


class _EncoderRead(torch.autograd.Function):
    """The output of an encoder-decoder's encoder as the decoder's blocks read it beside their main input (their
    cross-attention): the identity in the forward. Its backward takes what the decoder's blocks send back to it
    (their own feedback, through their own layers that read it) as the error of the encoder, and hands it to each of
    the encoder's points of its shape, as DFA hands the output's error to every block; the gradient also goes on to
    what computed the value (an encoder's final norm)."""

    @staticmethod
    def forward(
        ctx: Any, engine: Any, points: list[PointMeta], slots: list[_Slot], tensor: torch.Tensor, *edges: torch.Tensor
    ) -> torch.Tensor:
        ctx.engine, ctx.points, ctx.slots = engine, points, slots
        return tensor.detach()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        if ctx.engine.layouts.probing:  # a layout probe follows the network's data flow: the identity
            return (None, None, None, grad, *[None for _ in ctx.slots])
        ctx.engine._handed(grad, ctx.points, [grad for _ in ctx.points])
        for slot in ctx.slots:
            slot.add(grad)
        passed = grad if ctx.needs_input_grad[3] else None
        return (None, None, None, passed, *[grad.new_empty(0) for _ in ctx.slots])


class _Point:
    """A feedback point of one forward: its key, layout flag, shape and dtype, and its edge into the graph. Its
    values are kept only where needed: the activation where norm-aware (or learned) feedback reads it, the tensor
    itself while the first forwards still search for the norms that read each point and in a layout probe."""

    __slots__ = ("key", "flatten", "shape", "dtype", "ptr", "slot", "edge", "activation", "tensor", "alias", "rows")

    def __init__(
        self, key: str, tensor: torch.Tensor, flatten: bool, keep: bool, hold: bool, rows: PackedRows | None = None
    ) -> None:
        self.key, self.flatten, self.rows = key, flatten, rows
        self.shape, self.dtype, self.ptr = tensor.shape, tensor.dtype, tensor.data_ptr()
        self.slot = _Slot()
        self.edge = _PointEdge.apply(self.slot, tensor)
        self.activation = tensor.detach() if keep else None
        self.tensor = tensor if hold else None
        self.alias: Callable[[], torch.Tensor | None] = lambda: None  # the value the network reads (a weak ref)

    def reads(self, tensor: torch.Tensor) -> bool:
        """``tensor`` holds this point's values (the cut value the network reads, or the point itself)."""
        if tensor.data_ptr() != self.ptr or tensor.shape != self.shape:
            return False
        return self.tensor is not None or self.alias() is not None  # (not another tensor at a freed address)


@dataclass
class _Group:
    """The points of one forward, tied to every output called after them in that forward."""

    points: list[_Point] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, int] = field(default_factory=dict)
    untied: int = 0  # points recorded since the last tie
    soft: bool = False  # a layout-probe forward, or the first training forward: points are cut by _SoftCut
    copies_cuts: bool = False  # a layout-probe forward: the soft cuts are copies
    cuts: dict[int, torch.Tensor] = field(default_factory=dict)  # id(soft cut's copy) -> the point
    copies: list[torch.Tensor] = field(default_factory=list)  # the copies themselves: their ids stay theirs
    #: id(recorded tensor) -> (the tensor, its version, its cut), weakly: a second layer reading the same tensor
    #: gets the same cut, not a second point (one hidden layer, one feedback)
    readers: dict[int, tuple[Any, int, Any]] = field(default_factory=dict)
    ties: list[_Delivery] = field(default_factory=list)
    state: _ForwardState = field(default_factory=_ForwardState)
    after_ties: bool = False  # the forward before this one tied outputs (that may feed this one's points)
    #: that forward, until this one records its first point
    before: _Group | None = None
    #: the graph nodes (and output indices) of the top-level blocks' inputs in this forward, and of the norm or
    #: dropout in front of each: a later tensor computed from one of them bypasses that block (a residual add
    #: written in the parent, ``x = x + block(x)``), and that path is cut (:func:`_bypasses`)
    stream: dict[Any, dict[int, frozenset[int]]] = field(default_factory=dict)
    #: while the norms that consume each point are searched for: top-level block name -> the point its current call
    #: reads, until the first norm inside it runs on a tensor of the point's shape
    reads: dict[str, _Point] = field(default_factory=dict)
    #: the encoder's output in this forward (weakly) and its value as the decoder's blocks read it
    encoder_output: Any = None
    encoder_read: torch.Tensor | None = None
    #: ``id`` of the points that read error arrives at: no output of this forward ties them
    read_fed: set[int] = field(default_factory=set)


@dataclass
class BackwardReport:
    """Counters of one backward: what the forward(s) recorded and what the backward delivered."""

    points_recorded: int = 0
    #: hooks of block modules that fired in the forward(s), with or without gradient (0: the model bypasses them)
    blocks_called: int = 0
    #: points of frozen blocks whose tensor carried gradient (something trainable lies upstream of a frozen block)
    frozen_blocks_fed: int = 0
    outputs_tied: int = 0
    deliveries: int = 0
    #: types of the values the output module returned after the blocks that held no floating-point tensor to tie
    untied_outputs: list[str] = field(default_factory=list)
    #: output modules tied that returned a tuple holding other tensors than the first (read as the output)
    tuple_outputs: list[str] = field(default_factory=list)
    #: the points fed in this backward, each once, over all its deliveries (one per output called after points)
    points_fed: list[Any] = field(default_factory=list)
    #: the names of the points recorded in the forward(s), without a second call's ``#n``
    points_named: set[str] = field(default_factory=set)


def _walk(tensor: torch.Tensor, expand: Callable[[Any], tuple], limit: int | None = None) -> Iterator[Any]:
    """The nodes of ``tensor``'s autograd graph, each once, depth first: ``expand(node)`` gives the nodes to visit
    after it (``()`` stops there); at most ``limit`` nodes.

    The visited nodes are kept (a set of the node objects, not of their ``id``): the Python object of a graph node
    lives only while something holds it (torch 2.11; 2.13 keeps it as long as the graph), so the ``id`` of a node
    visited and let go can come back as another node's, which a set of ids would then skip: a layout-probe forward
    then lost every point after a block's first norm."""
    return _walk_nodes([tensor.grad_fn], expand, limit)


def _walk_nodes(nodes: list[Any], expand: Callable[[Any], tuple], limit: int | None = None) -> Iterator[Any]:
    """:func:`_walk` from the graph nodes ``nodes``."""
    stack = list(nodes)
    seen: set[Any] = set()
    while stack and (limit is None or len(seen) < limit):
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(n for n, _ in expand(node))


#: key of a graph node's ``metadata`` holding the indices of its inputs whose gradient DFA drops (a skip path)
_BYPASS = "lightning_dfa.bypass"
_bypasses_cut = False  # set once a skip path was cut: until then the walks need not read the nodes' metadata


#: graph nodes of a point's cut or delivery: the backward from a later block does not pass them
_POINT_NODES = (_DeliverFeedback._backward_cls, _PointEdge._backward_cls, _Reattach._backward_cls)


def _upstream_of_points(node: Any) -> tuple:
    """A node's inputs as the backward uses them (:func:`_next_functions`), none past a point's cut or delivery:
    what lies before a later block's input point is that block's, not the first block's."""
    return () if isinstance(node, _POINT_NODES) else _next_functions(node)


def _upstream_of_points_past_candidates(node: Any) -> tuple:
    """As :func:`_upstream_of_points`, but on through a candidate output's tie (a layer outside the blocks called
    after points, such as an encoder-decoder's decoder position table after the encoder's points), which cuts
    nothing: only to the tied value, not to the points the tie holds."""
    if isinstance(node, _DeliverFeedback._backward_cls) and node.delivery.candidate:
        return node.next_functions[:1]
    return _upstream_of_points(node)


def _next_functions(node: Any) -> tuple:
    """A node's inputs as the backward uses them: none past a probe's soft cut, none through a cut skip path."""
    if isinstance(node, _SoftCut._backward_cls):
        return ()
    nexts = node.next_functions
    cut = _bypasses_cut and nexts and node.metadata.get(_BYPASS)
    return tuple(e for i, e in enumerate(nexts) if i not in cut) if cut else nexts


#: graph nodes that join a skip path to a branch (``x + block(x)``, a dense concatenation)
_JOINS = ("AddBackward", "SubBackward", "CatBackward", "StackBackward")


def _bypasses(
    tensor: torch.Tensor, stream: dict[Any, dict[int, frozenset[int]]], limit: int = 256
) -> tuple[list[tuple[Any, int]], bool]:
    """The skip paths around blocks that ``tensor`` (a later block's input, an output) was computed through.

    A top-level block reads its input cut, so a later tensor computed from that input (a node of ``stream``, which
    maps it to the ``id`` of the block's parameters) went around the block. It is a skip path where it is joined to
    the block's own branch: an addition or concatenation whose other operand is the block's output (cut, so it
    carries no gradient here, or computed from the block's parameters): the residual add of ``x = x + block(x)``
    written in the parent, a dense concatenation. (A tensor that reads a block's input while the block's output goes
    elsewhere, the last hidden state read beside a pooling head, is no skip path.) Returns each skip path's edge as
    ``(joining node, input index)``, and whether ``tensor`` also reaches something trainable otherwise (a
    parameter, an earlier output; ``True`` where the walk stops at ``limit`` nodes)."""
    found: list[tuple[Any, int]] = []
    trainable = False
    stack, seen = [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        if len(seen) >= limit:
            return found, True
        seen.add(node)
        if isinstance(node, _SoftCut._backward_cls):
            continue  # a probe's cut point: nothing crosses it in the backward
        if isinstance(node, _POINT_NODES):
            trainable = True
            continue
        if not node.next_functions:
            trainable = trainable or getattr(node, "variable", None) is not None
            continue
        cut = node.metadata.get(_BYPASS, ()) if _bypasses_cut else ()
        for i, (parent, index) in enumerate(node.next_functions):
            if parent is None or i in cut:
                continue
            params = stream.get(parent, {}).get(index)
            if params is None:
                stack.append(parent)
            elif _joins_branch(node, i, params, stream):
                found.append((node, i))
            else:
                trainable = True  # the block's input read on its own: it carries the gradient on
    return found, trainable


def _joins_branch(node: Any, index: int, params: frozenset[int], stream: dict[Any, Any], limit: int = 64) -> bool:
    """``node`` adds or concatenates its input ``index`` to a block's branch: another input carries no gradient (the
    block's cut output), was computed from the block's parameters ``params``, or reads no node of ``stream`` (the
    block's cut output through layers the parent applies, ``x + relu(norm(block(x)))``)."""
    if not type(node).__name__.startswith(_JOINS):
        return False
    for i, (other, _) in enumerate(node.next_functions):
        if i == index:
            continue
        if other is None:
            return True
        visited = list(_walk_nodes([other], _next_functions, limit))
        if any(id(getattr(n, "variable", None)) in params for n in visited):
            return True
        if len(visited) < limit and not any(n in stream for n in visited):
            return True
    return False


def _cut_bypass(node: Any, index: int) -> None:
    """Drop the gradient ``node`` passes to its input ``index`` (a skip path around a block)."""
    global _bypasses_cut
    cut = node.metadata.get(_BYPASS)
    if cut is None:
        cut = node.metadata[_BYPASS] = set()
        node.register_hook(lambda grads, _, cut=cut: tuple(None if i in cut else g for i, g in enumerate(grads)))
    cut.add(index)
    _bypasses_cut = True


def _grad_beyond_soft_cuts(tensor: torch.Tensor) -> bool:
    """In a layout-probe forward: the tensor requires grad through something other than a soft cut (a parameter,
    an input that requires grad), as it would after an ordinary cut (``detach``)."""
    for node in _walk(tensor, _next_functions):
        if not node.next_functions and type(node).__name__ == "AccumulateGrad":
            return True
    return tensor.grad_fn is None  # a leaf that requires grad


def _parameters_reached(tensor: torch.Tensor, limit: int = 100_000) -> set[int]:
    """``id`` of the parameters ``tensor`` was computed from without crossing a cut or a delivery's points: those
    that an output delivering there trains by their true gradient."""

    def expand(node: Any) -> tuple:
        if isinstance(node, _DeliverFeedback._backward_cls):
            return node.next_functions[:1]  # the output it ties, not its points
        return _next_functions(node)

    found: set[int] = set()
    for node in _walk(tensor, expand, limit):
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.Tensor):
            found.add(id(variable))
    return found


def _up_to_outputs(node: Any) -> tuple:
    """A walk's next nodes, stopping at an output's delivery (and, as every walk, at a probe's soft cut)."""
    return () if isinstance(node, _DeliverFeedback._backward_cls) else _next_functions(node)


def _nodes_before_outputs(tensor: torch.Tensor, limit: int = 100_000) -> set[Any]:
    """The graph nodes ``tensor`` (a loss) reaches without crossing an output's delivery: what the loss reads
    directly, not through an output module's error."""
    return set(_walk(tensor, _up_to_outputs, limit))


#: graph nodes that pick part of a tensor (an index, a select, a gather) and nodes that hand it on whole (a cast)
_PICKS = ("IndexBackward0", "SelectBackward0", "GatherBackward0")
_WHOLE_COPIES = ("ToCopyBackward0", "CloneBackward0", "AliasBackward0")


def _picks_one_position(node: Any) -> bool:
    """The graph node picks one position per item from a ``[batch, positions, ...]`` tensor: ``x[:, -1]``,
    ``x[torch.arange(batch), last]`` (a Hugging Face decoder's sequence classifier), a gather of one index along the
    positions. Read from what the node keeps after the backward (sizes and dimension, not the indices)."""
    name = type(node).__name__
    if name not in _PICKS:
        return False
    try:
        out = tuple(node._input_metadata[0].shape)
        if name == "GatherBackward0":
            return node._saved_dim == 1 and len(out) >= 3 and out[1] == 1
        sizes = tuple(node._saved_self_sym_sizes)
        if len(sizes) < 3:
            return False
        if name == "SelectBackward0":
            dim = node._saved_dim
            return (dim - 2**64 if dim >= 2**63 else dim) % len(sizes) == 1  # (saved unsigned: -1 is 2**64 - 1)
        return out == (sizes[0], *sizes[2:])
    except (AttributeError, IndexError, RuntimeError):
        return False


def _outputs_read_at_one_position(nodes: set[Any]) -> set[str]:
    """The outputs that a loss reads only through one pick of one position per item (:func:`_picks_one_position`,
    after casts or copies), from ``nodes``, the loss's graph up to the outputs (:func:`_nodes_before_outputs`): a
    decoder's sequence classifier, which scores every position and reads the last one that is not padding. Their
    error sits at that position alone."""
    readers: dict[Any, list[Any]] = {}
    for node in nodes:
        for child, _ in _up_to_outputs(node):
            if child is not None:
                readers.setdefault(child, []).append(node)

    def copies(reader: Any) -> bool:
        return type(reader).__name__ in _WHOLE_COPIES

    def through_copies(reader: Any) -> tuple:  # a cast's or copy's readers, as (node, input) edges
        return tuple((r, 0) for r in readers.get(reader, [])) if copies(reader) else ()

    found = set()
    for delivery, node in _deliveries_in(nodes).items():
        ends = [r for r in _walk_nodes(readers.get(node, []), through_copies) if not copies(r)]
        if len(ends) != 1:  # (two picks: an error at two positions)
            continue
        # read inside a graph torch.compile made, whose backward shows no pick: the first error tells
        compiled = type(ends[0]).__name__ in _COMPILED_GRAPHS
        if _picks_one_position(ends[0]) or (compiled and delivery.one_position):
            found.add(delivery.source.split("#")[0])
    return found


#: the backward node of a graph ``torch.compile`` made (one node for all the operations it fused)
_COMPILED_GRAPHS = ("CompiledFunctionBackward",)


def _nonzero_at_one_position(error: torch.Tensor) -> bool:
    """The ``[batch, positions, ...]`` error is nonzero at exactly one position of each item (what a loss reading
    one position per item leaves; a loss at every position leaves none zero)."""
    if error.dim() != 3 or error.shape[1] < 2:
        return False
    return bool(((error != 0).any(-1).sum(1) == 1).all())


def _nodes_read_directly(tensor: torch.Tensor, limit: int = 100_000) -> set[Any]:
    """The graph nodes ``tensor`` (a loss) reaches through parameter-free operations only: without crossing an
    output's delivery or a layer with a weight (a Linear's product, a convolution; a scalar such as a learned
    temperature does not stop the walk)."""
    return set(_walk(tensor, lambda node: () if _reads_weight(node) else _up_to_outputs(node), limit))


def _reads_weight(node: Any) -> bool:
    """A graph node that computes with a trainable weight of two or more dimensions (directly, or through one
    transpose or view of it, as a Linear's ``addmm`` reads ``weight.t()``)."""
    for edge, _ in node.next_functions:
        if edge is None:
            continue
        variable = getattr(edge, "variable", None)
        if variable is None and len(edge.next_functions) == 1 and edge.next_functions[0][0] is not None:
            variable = getattr(edge.next_functions[0][0], "variable", None)
        if isinstance(variable, torch.Tensor) and variable.dim() >= 2:
            return True
    return False


def _deliveries_in(nodes: Iterable[Any]) -> dict[_Delivery, Any]:
    """The deliveries among graph ``nodes``, each with its node."""
    found = {}
    for node in nodes:
        delivery = getattr(node, "delivery", None) if isinstance(node, _DeliverFeedback._backward_cls) else None
        if delivery is not None:
            found[delivery] = node
    return found


def _outputs_read_before_points(
    tensor: torch.Tensor, reached: set[Any], limit: int = 1_000_000
) -> list[tuple[str, Any]]:
    """Among the graph nodes ``reached`` (those the loss ``tensor`` reaches before any output), the deliveries of
    outputs that a later output was computed from (a VAE's mean and variance layers, tied as outputs, read by the
    decoder) or that lie before a block: not error sources, so what the loss reads there trains them by their true
    gradient and feeds nothing back. ``(source, node)``, in no order."""
    ties = {d: node for d, node in _deliveries_in(reached).items() if not d.frozen}
    if not ties:
        return []
    # as in the backward: each delivery that runs (any in the graph, not one deferring to a trainable output
    # upstream) marks the outputs upstream of it, which then deliver nothing of their own
    later = set()
    for d in _deliveries_in(_walk(tensor, _next_functions, limit)):
        if not (d.frozen and any(not u.frozen for u in d.upstream)):
            later.update(d.upstream)
    return [(d.source, node) for d, node in ties.items() if d in later or (d.feeds_point and not d.named)]


def _nodes_behind_outputs(tensor: torch.Tensor, limit: int = 1_000_000) -> set[Any]:
    """The graph nodes ``tensor`` (a loss) reaches through an output's delivery: what the outputs, and the feedback
    points tied to them, were computed from."""
    deliveries = [n for n in _walk(tensor, _next_functions, limit) if isinstance(n, _DeliverFeedback._backward_cls)]
    return set(_walk_nodes([n for d in deliveries for n, _ in d.next_functions], _next_functions, limit))


def _reaches_feedback(tensor: torch.Tensor, params: set[int], limit: int = 100_000) -> bool:
    """``tensor`` (a loss) was computed through the engine's graph: one of its nodes is a delivery, a point's edge,
    a probe's cut or a reattached point, or a parameter of ``params`` (the blocks' and outputs'). ``False``: a
    backward of its own, such as a critic trained on detached outputs, in which DFA has nothing to deliver."""
    ours = (*_POINT_NODES, _SoftCut._backward_cls)
    for node in _walk(tensor, lambda n: n.next_functions, limit):
        if isinstance(node, ours):
            return True
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.Tensor) and id(variable) in params:
            return True
    return False


def _blocks_crossed(
    tensor: torch.Tensor,
    block_outputs: Sequence[tuple[str, Any]],
    block_params: dict[str, list[torch.Tensor]],
    limit: int = 1_000_000,
) -> list[tuple[str, str]]:
    """``(reader, block)`` for each block whose output node, or most of whose parameters, the backward of ``tensor``
    (a loss) reaches after the output node or the output point of another block, ``reader``, on a path that crosses
    no other feedback point or output: gradient travels from one block into another through an input DFA does not
    cut (a slice of a block's output read by the next block beside its main input). Not a side tensor that one
    block computes for the others from a few parameters of its own (T5's relative position bias). ``block_outputs``
    are the output nodes of the blocks without an output point, ``block_params`` each block's trainable parameters.
    Each walk starts afresh at the loss, at each output's delivery and at each point's edge (owned by its block
    where it is a block's output point)."""
    owner_of: dict[Any, str] = {}
    for name, node in block_outputs:
        owner_of.setdefault(node, name)
    holders: dict[int, set[str]] = {}
    for name, params in block_params.items():
        for p in params:
            holders.setdefault(id(p), set()).add(name)
    blocks = sorted(block_params, key=len, reverse=True)
    point_block: dict[int, str | None] = {}  # id of a point's slot -> the block whose output point it is
    crossed: dict[tuple[str, str], None] = {}
    reached: dict[tuple[str, str], dict[int, int]] = {}  # (reader, block) -> the block's parameters reached
    stack: list[tuple[Any, str | None]] = [(tensor.grad_fn, None)]
    seen: set[tuple[Any, str | None]] = set()
    while stack and len(seen) < limit:
        node, owner = stack.pop()
        if node is None or (node, owner) in seen:
            continue
        seen.add((node, owner))
        if isinstance(node, _DeliverFeedback._backward_cls):
            owner = None  # the output's error starts here
            for meta, slot in zip(node.delivery.points, node.delivery.slots):
                key = meta.key.split("#")[0]
                inside = (b for b in blocks if key == b or key.startswith(b + "."))
                point_block[id(slot)] = None if ":" in key else next(inside, None)
        elif isinstance(node, _PointEdge._backward_cls):
            owner = point_block.get(id(node.slot))  # a point's feedback starts here
        name = owner_of.get(node)
        if name is not None:
            if owner is not None and owner != name:
                crossed[(owner, name)] = None
            owner = name
        variable = getattr(node, "variable", None)  # AccumulateGrad: a parameter's gradient lands here
        if owner is not None and isinstance(variable, torch.Tensor):
            for name in holders.get(id(variable), set()) - {owner}:
                reached.setdefault((owner, name), {})[id(variable)] = variable.numel()
        stack.extend((n, owner) for n, _ in _next_functions(node))
    for (owner, name), params in reached.items():
        if 2 * sum(params.values()) >= sum(p.numel() for p in block_params[name]):
            crossed[(owner, name)] = None
    return list(crossed)


def _deliveries_upstream_of(tensor: torch.Tensor, limit: int = 4096) -> list[_Delivery]:
    """The deliveries of earlier output calls whose (tied) outputs ``tensor`` was computed from, found by a walk
    of its graph back to the cuts (the tail after the blocks: a few nodes)."""
    nodes = _walk(tensor, _up_to_outputs, limit)
    return [n.delivery for n in nodes if isinstance(n, _DeliverFeedback._backward_cls)]


def _in_backward() -> bool:
    """True while autograd runs a backward: a forward there is a checkpoint's recomputation (non-reentrant
    activation checkpointing), whose hooks must not record points (its feedback was delivered already)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1
