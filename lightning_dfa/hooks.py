"""The forward side of the feedback engine: installing its hooks on a model, recording the feedback points of each
forward, tying them to the outputs called after them, and finding which norm consumes each point.

:class:`ForwardHooks` is a base class of :class:`lightning_dfa.FeedbackEngine`; it holds no state of its own (the
engine's ``__init__`` sets it up) and knows nothing of Lightning."""

from __future__ import annotations

import collections
import contextlib
import math
import re
import warnings
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any, NamedTuple

import torch
from torch import nn

from .blocks import Block, Target, _frozen, _has_params
from .checks import refuse_fullgraph_compile, refuse_reentrant_checkpointing, refuse_torchscript, scripted
from .delivery import (
    Capture,
    CapturedPoint,
    _bypasses,
    _cut_bypass,
    _DeliverFeedback,
    _deliveries_upstream_of,
    _Delivery,
    _EncoderRead,
    _ForwardState,
    _grad_beyond_soft_cuts,
    _Group,
    _Hook,
    _in_backward,
    _next_functions,
    _parameters_reached,
    _Point,
    _Reattach,
    _SoftCut,
    _upstream_of_points_past_candidates,
    _walk,
)
from .discovery import discover, single_trainable_layer
from .layout import Layouts, PackedRows, PointMeta, is_map, per_item, sequence_shaped
from .norms import NormSpec, _may_normalise, probe_normalisation
from .points import carries_grad as _carries_grad
from .points import detached
from .points import split_input as _split_input
from .points import split_main as _split_main
from .recipe import chooses_cut, last_top_level_block, only_norms_before
from .roles import encoder_modules, encoder_of, faint_token_tables, token_embeddings

_NORM_OR_DROPOUT = re.compile(r"Norm|Dropout")


class ForwardHooks:
    """Forward hooks of :class:`lightning_dfa.FeedbackEngine` (see the module's docstring)."""

    def _install(self, root: nn.Module, target: Target | None, configured: bool) -> Target:
        if target is None:
            try:
                target = discover(root, self.config.blocks, self.config.output, self.config.placement)
            except ValueError:
                if self.mode != "bp":
                    refuse_torchscript(root)  # what hid the layers, rather than "found no blocks"
                layer = single_trainable_layer(root)
                if self.mode == "bp":
                    # the control arm is plain backprop: it needs no blocks, so it never refuses a model
                    target = Target([], type(root).__name__, root, "none (mode='bp' is plain backprop)")
                elif layer is not None:
                    warnings.warn(
                        f"DFA: {type(root).__name__} has a single trainable layer ({layer[0] or 'the model itself'}), "
                        "so there is no hidden layer to send feedback to: it learns from its true gradient, exactly "
                        f"as with backprop (mode={self.mode!r} changes nothing for this model).",
                        UserWarning,
                        stacklevel=4,
                    )
                    target = Target([], layer[0], layer[1], "none (a single trainable layer: nothing to feed back to)")
                else:
                    raise
            if configured and target.source == "explicit":
                target.source = "configure_dfa"
        outputs = {name for name, _ in target.outputs}
        if any(name not in outputs for name in self._heads):  # heads on middle layers, made outputs (add_outputs)
            target = target.with_blocks_as_outputs(self._heads, root)
        refuse_reentrant_checkpointing(root)
        refuse_fullgraph_compile(root)
        if self.mode != "bp":
            refuse_torchscript(root, target)
        # attached again to the same model with the same blocks and outputs (a fit after a fit, a benchmark that
        # attaches around each step): what the forwards taught the engine (layouts, norms, the true-gradient
        # region) still holds; another model starts afresh
        same = (
            root is self.root
            and self.target is not None
            and [b.name for b in target.blocks] == [b.name for b in self.target.blocks]
            and [n for n, _ in target.outputs] == [n for n, _ in self.target.outputs]
        )
        if not same:
            self.layouts = Layouts()
            self._consumers, self._norm_kinds, self._point_norms = {}, {}, set()
            self._residual_consumers, self._pooled_maps, self._map_errors = set(), {}, set()
            self._read_outputs = set(self._saved_read_outputs)
            self._consumers_complete = False
            self._sources, self._true_ids, self._loss_measured = {}, None, False
        self.root, self.target = root, target
        self._flatten = {b.name for b in target.blocks if _has_conv(b)}
        # (and a convolutional output module: its input, the last point of a net written by hand, is a feature map)
        self._flatten |= {name for name, out in target.outputs if isinstance(out, nn.modules.conv._ConvNd)}
        self._cut = chooses_cut(self, root, target)
        uncut = last_top_level_block(root, target) if self._cut else None
        for block in target.blocks:
            if block.top_level:  # prepend: the input is cut before FSDP2's pre-forward hook ties it to the
                # block's post-backward (the point's feedback would otherwise reduce the block's gradients early)
                self._handles.append(
                    block.entry.register_forward_pre_hook(
                        _Hook(lambda m, a, k, b=block: self._on_block_input(b, a, k)), with_kwargs=True, prepend=True
                    )
                )
            if block.output_point and block.name != uncut:  # cut_head_input: the point moves to the head's input
                self._handles.append(
                    block.exit.register_forward_hook(_Hook(lambda m, a, o, b=block: self._on_block_output(b, o)))
                )
            if isinstance(block.exit, nn.RNNBase) and self.mode == "dfa":
                self._handles.append(
                    block.exit.register_forward_hook(_Hook(lambda m, a, o, b=block: self._on_recurrent_output(b, o)))
                )
        if not same:
            self._readers_checked = False
        self._block_outputs, self._cut_readers, self._reader_handles = None, None, []
        # the graph nodes of the blocks' other outputs that pass uncut (a flow's log-determinant), until the first
        # loss is checked
        self._side_reads: collections.deque[tuple[str, Any]] | None = None
        # the memory of the points' cuts recorded since the last backward and of what parameter-free layers outside
        # the blocks made of them (a pooling, a flatten), until the first loss is checked
        self._cut_memory: set[int] | None = None
        self._watched: set[str] = set()  # blocks whose output point's cut stays in the graph (see _record)
        if self.mode == "dfa" and not self._readers_checked:  # until the first loss is checked (loss_readers)
            self._block_outputs = collections.deque(maxlen=4 * len(target.blocks))
            self._side_reads = collections.deque(maxlen=4 * len(target.blocks))
            for block in target.blocks:
                if block.output_point and block.name != uncut:
                    self._watched.add(block.name)  # its output is cut: the cut's graph node stands for it
                    continue
                handle = block.exit.register_forward_hook(_Hook(lambda m, a, o, b=block: self._on_block_exit(b, o)))
                self._reader_handles.append(handle)
                self._handles.append(handle)
            self._cut_readers, self._cut_memory = collections.deque(maxlen=64), set()
            for name, module in _loose_layers(root, target):
                handle = module.register_forward_hook(_Hook(lambda m, a, o, n=name: self._on_loose_layer(n, a, o)))
                self._reader_handles.append(handle)
                self._handles.append(handle)
            for module in _passing_layers(root, target):
                handle = module.register_forward_hook(_Hook(lambda m, a, o: self._on_passing_layer(a, o)))
                self._reader_handles.append(handle)
                self._handles.append(handle)
        self._encoder_names = encoder_modules(root, target)
        encoder = encoder_of(root, target) if self.mode == "dfa" and self.encoder_from_decoder else None
        if encoder is not None:
            self._handles.append(encoder.register_forward_hook(_Hook(lambda m, a, o: self._on_encoder(o))))
        self._modules = {name: module for name, module in target.outputs}
        self._candidates = self._output_candidates(root, target)
        for name, module in target.outputs:
            if self.head_input_is_point:
                self._handles.append(
                    module.register_forward_pre_hook(
                        _Hook(lambda m, a, k, n=name: self._on_head_input(n, a, k)), with_kwargs=True, prepend=True
                    )
                )
            if self.config.error_at == "output":
                hook = module.register_forward_hook(_Hook(lambda m, a, o, n=name: self._on_output(n, o)))
            else:
                hook = module.register_forward_pre_hook(
                    _Hook(lambda m, a, k, n=name: self._on_output_input(n, a, k)), with_kwargs=True
                )
            self._handles.append(hook)
        for name, module in self._candidates:
            self._modules[name] = module
            self._handles.append(
                module.register_forward_hook(_Hook(lambda m, a, o, n=name: self._on_output(n, o, auto=True)))
            )
        # a table tied to the output is cut only where norms alone lie between the last block and the output (a
        # language model's head); behind a head transform (BERT's masked-LM head) the cut was measured to cost
        # learning
        transform = not only_norms_before(root, target)
        cutting = self.mode == "dfa" and self.cut_token_embedding
        tables = token_embeddings(root, target) if cutting else []
        # decided once, at the first attach of a run, and kept (attached again to the same model, or resumed from a
        # checkpoint): the token table grows in training, and the rule must not change course half-way
        earlier, self._faint = (self._faint if same else None), None
        if cutting and self.config.chosen("cut_token_embedding") is None:
            if self._saved_faint is not None:
                self._faint = list(self._saved_faint)
            elif earlier is not None:
                self._faint = earlier
            else:
                self._faint = faint_token_tables(root, tables)
            cutting = not self._faint
        self._token_embeddings = token_embeddings(root, target, tied=not transform) if cutting else []
        self._token_embeddings = [t for t in self._token_embeddings if not scripted(t[1])]  # no hooks run there
        self._first_block_tables, self._released = [], set()
        if any(tied for _, _, tied in self._token_embeddings) and self.tables_from_first_block:
            # beside a token table tied to the output, the other tables stay trainable: the input of the block that
            # reads them is not cut (see _on_block_input)
            main = {id(m) for _, m, _ in token_embeddings(root, target, tied=not transform, beside=False)}
            beside = [(n, m) for n, m, _ in self._token_embeddings if id(m) not in main]
            self._token_embeddings = [t for t in self._token_embeddings if id(t[1]) in main]
            self._first_block_tables = [n for n, _ in beside]
            self._released = {id(p) for _, m in beside for p in m.parameters() if p.requires_grad}
        self._tied_kept = [n for n, _, tied in tables if tied] if cutting and transform else []
        heads = {id(p) for _, m in target.outputs for p in m.parameters()}
        for _, module, _ in self._token_embeddings:
            # its output is detached in the forwards; what it holds apart from weights tied to an output (the table
            # untied; a norm inside it) is also frozen (DDP, set up after, leaves it out)
            self._handles.append(module.register_forward_hook(_Hook(lambda m, a, o: self._on_token_embedding(o))))
            frozen = {id(p) for p in self._frozen}  # (modules sharing one table: each parameter once)
            self._frozen += [
                p for p in module.parameters() if p.requires_grad and id(p) not in frozen and id(p) not in heads
            ]
        self._kept = {id(p) for p in self._frozen}
        for p in self._frozen:
            p.requires_grad_(False)
        if self.mode == "dfa" and (self.norm_feedback == "consumer" or self.norm_points):
            self._inside_blocks = {id(m) for b in target.blocks if b.top_level for m in b.entry.modules()}
            self._norm_blocks = {
                id(m): b.name for b in target.blocks if b.top_level for m in b.entry.modules() if _may_normalise(m)
            }
            for name, module in root.named_modules():
                if not _may_normalise(module) or scripted(module):
                    continue
                self._handles.append(
                    module.register_forward_pre_hook(
                        _Hook(lambda m, a, k: self._on_norm_input(m, a, k)), with_kwargs=True
                    )
                )
                self._handles.append(
                    module.register_forward_hook(_Hook(lambda m, a, o, n=name: self._on_norm_output(n, m, o)))
                )
        self.layouts.pending = not same
        return target

    def _output_candidates(self, root: nn.Module, target: Target) -> list[tuple[str, nn.Module]]:
        """The layers outside the blocks that may be outputs: the output is the module the loss is computed from,
        which only the forward shows (a head reached through functional code, several heads). Each is tied when
        called after points; in the backward only those whose error did not come through another output deliver.
        Not with explicit ``output=``, ``error_at="head_input"`` or ``cut_head_input`` (those name the output)."""
        cfg = self.config
        if cfg.output is not None or cfg.error_at != "output" or cfg.cut_head_input or self.mode == "bp":
            return []  # (in shallow mode, only for the skip paths around the blocks that they read)
        taken = {id(p) for b in target.blocks for p in b.parameters()}
        taken |= {id(p) for _, m in target.outputs for p in m.parameters()}
        outputs = {id(m) for _, m in target.outputs}
        # an adaptive softmax's tail clusters see only the rows of their own words: no error source of the points
        clusters = tuple(n + "." for n, m in root.named_modules() if n and isinstance(m, nn.AdaptiveLogSoftmaxWithLoss))
        found = []
        for name, module in root.named_modules():
            if not name or id(module) in outputs or scripted(module) or (clusters and name.startswith(clusters)):
                continue
            if not any(True for _ in module.parameters(recurse=False)):
                continue
            if any(_has_params(c) for c in module.children()) or any(id(p) in taken for p in module.parameters()):
                continue
            found.append((name, module))
        return found

    def _release(self, state: _ForwardState) -> None:
        """A backward started through this forward's outputs: no output is tied to its points any more, so the
        engine lets go of their tensors (autograd frees each one once its block's backward has run)."""
        g = self._group
        if g is not None and g.state is state:
            g.points, g.cuts, g.copies, g.ties, g.untied, g.stream = [], {}, [], [], 0, {}
        self._norm_outputs = set()

    @property
    def _pending(self) -> list[_Point]:
        """The points recorded since the last output call (not tied to any output yet)."""
        g = self._group
        return [] if g is None or not g.untied else g.points[-g.untied :]

    def _active(self) -> bool:
        return (
            torch.is_grad_enabled()
            and not self._inert
            and (self.mode != "bp" or self._capture is not None)
            and not _in_backward()
        )

    def _group_for(self, name: str) -> _Group:
        """The current forward's group; a block recorded again after an output was tied starts a new forward."""
        g = self._group
        if g is None or g.state.closed or (g.outputs and name in g.calls):
            tied = g is not None and bool(g.ties) and not g.state.closed
            g = self._group = _Group(after_ties=tied, before=g if tied else None)
        return g

    def _record(self, name: str, tensor: torch.Tensor, rows: PackedRows | None = None) -> torch.Tensor:
        g = self._group_for(name)
        count = g.calls.get(name, 0)
        g.calls[name] = count + 1
        if self._capture is None and self.mode == "dfa":
            again = self._recorded_cut(g, tensor)
            if again is not None:
                return again
        key = name if count == 0 else f"{name}#{count}"
        flatten = name.split(":")[0] in self._flatten
        for observer in self.point_observers:
            observer(key, tensor)
        if self._capture is not None:
            self._capture.points.append(CapturedPoint(key, tensor, flatten))
            return tensor
        if self.mode == "dfa":
            if g.ties or g.after_ties:  # an output was tied before this point: was the point computed from it?
                upstream = _deliveries_upstream_of(tensor)
                for delivery in upstream:
                    delivery.feeds_point = True
                if g.before is not None and not g.points and any(d in g.before.ties for d in upstream):
                    # a forward computed from the last one's outputs (a layer looped over its own output): those
                    # outputs feed a point, so they are no error source; the last forward's points take this one's
                    g.points.extend(g.before.points)
                g.before = None
            if not g.copies_cuts and self.layouts.pending and sequence_shaped(tensor.shape, flatten):
                g.soft = g.copies_cuts = True  # from here on, this forward's points stay connected for a layout probe
            if not g.soft and self._watched and not _in_backward():
                # until the first backward, the cuts stay in the graph (without a copy of their own), so that the
                # first loss shows whether it reads a block's output point directly (loss_readers)
                g.soft = True
            # the values are kept where the backward reads them (norm-aware or learned feedback), and the tensor
            # while the norms that read each point are still searched for, or for a layout probe
            keep = self.learned is not None or self._norm_of(key, flatten) is not None
            point = _Point(key, tensor, flatten, keep, hold=g.soft or not self._consumers_complete, rows=rows)
            g.points.append(point)
            g.untied += 1
            self.report.points_recorded += 1
            self.report.points_named.add(name)
            if g.soft:
                cut = _SoftCut.apply(self.layouts, tensor, g.copies_cuts)
                g.cuts[id(cut)] = tensor
                g.copies.append(cut)  # kept alive, so that no other tensor takes its id in this forward
                if name in self._watched and self._block_outputs is not None:
                    self._block_outputs.append((name, cut.grad_fn))
            elif name in self._pooled:
                # a point the output reaches through a pooling over groups of rows (a graph's nodes): the cut stays
                # in the graph (no copy; its backward passes nothing), so that each forward finds the pooling's groups
                cut = _SoftCut.apply(self.layouts, tensor, False)
                g.cuts[id(cut)] = tensor
                g.copies.append(cut)
            else:
                cut = tensor.detach()
                point.alias = weakref.ref(cut)
            g.readers[id(tensor)] = (weakref.ref(tensor), tensor._version, weakref.ref(cut))
            if self._cut_memory is not None:  # until the first loss is checked (_on_loose_layer)
                self._cut_memory.update((_memory(tensor), _memory(cut)))
            return cut
        return tensor.detach()

    @staticmethod
    def _recorded_cut(g: _Group, tensor: torch.Tensor) -> torch.Tensor | None:
        """The cut of ``tensor`` where this forward recorded it already as a point (unchanged since) and a second
        layer reads it (a VAE's ``h`` read by both ``fc_mu`` and ``fc_logvar``): one hidden layer, one feedback."""
        seen = g.readers.get(id(tensor))
        if seen is None or seen[0]() is not tensor or seen[1] != tensor._version:
            return None
        cut = seen[2]()
        return cut if cut is not None else tensor.detach()

    def _carries(self, tensor: torch.Tensor | None) -> bool:
        """The tensor carries gradient from something other than a soft cut (in a layout-probe forward, a value
        computed only from cut points carries none, as after an ordinary cut)."""
        if not _carries_grad(tensor):
            return False
        g = self._group
        return g is None or not g.soft or _grad_beyond_soft_cuts(tensor)

    def _recomputed(self, tensor: torch.Tensor | None, key: str) -> torch.Tensor | None:
        """Inside an activation checkpoint's recomputation (a module called in the backward with gradients on): the
        cut of the forward at point ``key``, a layout-probe forward's soft cut or a detach, without recording the point
        again (its feedback was delivered already), so that the recomputed graph saves what the forward saved.
        ``None`` otherwise, and where the forward recorded no such point (a reentrant checkpoint's forward, run
        without gradients: its recomputation must stay connected)."""
        if self.mode != "dfa" or not torch.is_grad_enabled() or not _in_backward() or not _carries_grad(tensor):
            return None
        g = self._group
        if g is None or key not in g.calls:
            return None
        return _SoftCut.apply(self.layouts, tensor, g.copies_cuts) if g.soft else tensor.detach()

    def _count_call(self) -> None:
        # with or without gradients (said when none reached a block), but not in an evaluation loop
        if self.mode == "dfa" and not _in_backward() and not self._inert:
            self.report.blocks_called += 1

    def _at_point(
        self, key: str, tensor: torch.Tensor | None, rebuild: Any, block: Block | None = None, packed: Any = None
    ) -> Any:
        """The value a module hook hands on at point ``key``: in a training forward the point's cut (recorded), in an
        activation checkpoint's recomputation the same cut again, else nothing (``None``: the value unchanged).
        A frozen ``block`` records no point (so its recomputation is not cut either). ``packed``: the
        ``PackedSequence`` whose data ``tensor`` is."""
        if not self._active():
            cut = self._recomputed(tensor, key)
            return None if cut is None else rebuild(cut)
        if block is not None and _frozen(block):
            if _carries_grad(tensor):  # something trainable upstream would learn through frozen blocks
                self.report.frozen_blocks_fed += 1
            return None
        if not self._carries(tensor):
            return None
        rows = None
        if packed is not None and self.mode == "dfa" and self._capture is None:
            rows = PackedRows.of(packed, bool(getattr(block.exit if block else None, "batch_first", False)))
        return rebuild(self._record(key, tensor, rows))

    def _on_block_input(self, block: Block, args: tuple, kwargs: dict) -> Any:
        self._count_call()
        tensor, rebuild = _split_input(args, kwargs)
        packed = _packed(args[0] if args else None)
        if tensor is None and packed is not None:  # a recurrent block fed packed sequences: a point at their data
            tensor, rebuild = packed.data, lambda t: ((packed._replace(data=t), *args[1:]), kwargs)
        if self._cut_bypasses(tensor) and not _frozen(block):
            # computed from the stream only through skip paths now cut: a point there would feed nothing
            value = rebuild(tensor.detach())
        elif self._from_released_tables(tensor):
            # tables_from_first_block: computed from the lookup tables beside a tied token table (GPT-2's
            # ``wte(ids) + wpe(positions)``): no cut, they learn from this block's backward of its own feedback
            # (and from no later block's: the skip paths around this one are cut as around a cut input)
            self._group_for(block.name + ":in")
            self._note_stream(tensor, block)
            value = None
        else:
            value = self._at_point(block.name + ":in", tensor, rebuild, block, packed)
        if value is not None:
            self._note_stream(tensor, block)
        if self.mode != "dfa" or self._capture is not None or not self._active() or _frozen(block):
            return value
        self._note_reader(block, tensor)
        side = self._cut_side_inputs(block, *(value if value is not None else (args, kwargs)), main=tensor)
        return side if side is not None else value

    def _from_released_tables(self, tensor: torch.Tensor | None) -> bool:
        """``tensor`` (a block's input in a training forward of DFA) is computed from the lookup tables that
        ``tables_from_first_block`` leaves trainable (the walk stops at the points' cuts: a later block's input is
        not)."""
        if not self._released or tensor is None or tensor.grad_fn is None or self._capture is not None:
            return False
        for node in _walk(tensor, _upstream_of_points_past_candidates, 64):
            if id(getattr(node, "variable", None)) in self._released:
                return True
        return False

    def _bypassing(self) -> bool:
        """Skip paths around the blocks are looked for in this forward (a training forward of DFA or shallow)."""
        g = self._group
        return bool(g is not None and g.stream and self.mode != "bp" and self._capture is None and self._active())

    def _cut_bypasses(self, tensor: torch.Tensor | None) -> bool:
        """Cut the skip paths around this forward's blocks that ``tensor`` was computed through (the residual add
        of ``x = x + block(x)`` written in the parent, see :func:`_bypasses`): the feedback point at a block's input
        cuts the residual stream, as a block holding its own add does, so that nothing before a block (the
        embeddings) learns from the loss's true gradient through the identity path, in DFA or in the shallow
        baseline. ``True`` where ``tensor`` reaches nothing trainable but through those paths."""
        if tensor is None or tensor.grad_fn is None or not self._bypassing():
            return False
        stream = self._group.stream
        if tensor.output_nr in stream.get(tensor.grad_fn, {}):
            return False  # the same input read again (blocks in parallel)
        found, trainable = _bypasses(tensor, stream)
        for node, index in found:
            _cut_bypass(node, index)
        return bool(found) and not trainable

    def _note_stream(self, tensor: torch.Tensor | None, block: Block) -> None:
        """A top-level block's input was cut: later tensors computed from it (or from the norm or dropout's input in
        front of it) go around the block."""
        g = self._group
        if tensor is None or tensor.grad_fn is None or g is None or self.mode == "bp" or self._capture is not None:
            return
        node, index = tensor.grad_fn, tensor.output_nr
        params = frozenset(id(p) for p in block.parameters())
        for _ in range(3):
            g.stream.setdefault(node, {})[index] = params
            if not _NORM_OR_DROPOUT.search(type(node).__name__):
                break
            inputs = [e for e in node.next_functions if e[0] is not None and e[0].next_functions]
            if len(inputs) != 1:
                break
            node, index = inputs[0]

    def _cut_side_inputs(self, block: Block, args: tuple, kwargs: dict, main: torch.Tensor | None) -> Any:
        """The call's other inputs cut where they would carry the backward into another block, or ``None`` (none
        would): a tensor this forward recorded already as a point (a skip into a second input, ``nn.Bilinear(h2,
        h1)``) gets that point's cut; a recurrent block's final state (an encoder LSTM's ``(h, c)`` that starts a
        decoder) becomes a point of its own (:meth:`_state_point`)."""
        changed = False

        def visit(value: Any, depth: int = 0) -> Any:
            nonlocal changed
            if isinstance(value, torch.Tensor):
                read = self._encoder_read(block, value)
                if read is not None:
                    changed = True
                    return read
                if value is main or not _carries_grad(value) or (self._group and id(value) in self._group.cuts):
                    return value
                cut = self._side_cut(block, value)
                changed = changed or cut is not value
                return cut
            if depth < 2 and type(value) in (tuple, list):  # an LSTM's (h, c)
                return type(value)(visit(v, depth + 1) for v in value)
            return value

        args, kwargs = tuple(visit(a) for a in args), {k: visit(v) for k, v in kwargs.items()}
        return (args, kwargs) if changed else None

    def _on_encoder(self, output: Any) -> None:
        """An encoder-decoder's encoder returned: its output, read by the decoder's blocks (cross-attention), is where
        the encoder's own error arrives (:meth:`_encoder_read`)."""
        g = self._group
        if g is None or not self._active() or self._capture is not None:
            return
        tensor = output if isinstance(output, torch.Tensor) else getattr(output, "last_hidden_state", None)
        if tensor is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
            tensor = output[0]
        if isinstance(tensor, torch.Tensor):
            g.encoder_output, g.encoder_read = (weakref.ref(tensor), tensor._version), None

    def _encoder_read(self, block: Block, tensor: torch.Tensor) -> torch.Tensor | None:
        """The encoder's output as a decoder block reads it beside its main input: tied to the encoder's points of
        its shape, which receive as their error what the decoder's blocks send back to it (one value for every
        reader, so autograd sums what they send). ``None`` where ``tensor`` is not that output."""
        g = self._group
        if g is None or g.encoder_output is None or block.name in self._encoder_names:
            return None
        ref, version = g.encoder_output
        if ref() is not tensor or tensor._version != version:
            return None
        if g.encoder_read is None:
            points = [p for p in g.points if _of_encoder(p.key, self._encoder_names) and p.shape == tensor.shape]
            if not points:
                return None
            metas = [self._point_meta(p.key, p, p.flatten) for p in points]
            slots, edges = [p.slot for p in points], [p.edge for p in points]
            g.encoder_read = _EncoderRead.apply(self, metas, slots, tensor, *edges)
            g.read_fed = {id(p) for p in points}
        return g.encoder_read

    def _side_cut(self, block: Block, tensor: torch.Tensor) -> torch.Tensor:
        g = self._group
        if g is not None and not g.state.closed:
            again = self._recorded_cut(g, tensor)
            if again is not None:
                return again
        for produced in self._side_outputs.get(tensor.grad_fn, ()):
            if produced.shape == tensor.shape and produced.block != block.name:
                return self._side_point(produced, tensor)
        reader = block.exit
        cell = isinstance(reader, nn.RNNCellBase) and tensor.dim() == 2  # an LSTMCell's hx: [batch, d]
        if self._side_outputs and (cell or (isinstance(reader, nn.RNNBase) and tensor.dim() == 3)):
            # a recurrent block's initial state computed from another's final state (a bidirectional encoder's
            # directions summed, the top layer's state for a decoder cell): in the reader's own layout
            for node in _walk(tensor, _next_functions, limit=64):
                found = [p for p in self._side_outputs.get(node, ()) if p.what == "state" and p.block != block.name]
                if found:
                    batch_first = True if cell else bool(getattr(reader, "batch_first", False))
                    state = _Produced(found[0].block, "state", tensor.shape, batch_first)
                    cut = self._side_point(state, tensor.unsqueeze(0) if cell else tensor)
                    return cut.squeeze(0) if cell else cut
        return tensor  # (the same recurrent block called again keeps its state: backprop through time)

    def _side_point(self, produced: _Produced, tensor: torch.Tensor) -> torch.Tensor:
        """A block output read by another block beside its main input: a recurrent block's final state (``[layers,
        batch, d]``) or output sequence, or a block's second stream of hidden states. Recorded as the point
        ``"<block>:state"`` (``#1`` for an LSTM's cell state), ``"<block>:out"`` (an attention's keys and values)
        or ``"<block>:out<i>"``, batch first, and handed on cut. Its feedback is each item's error, averaged over the
        item's positions where the error has positions (:func:`lightning_dfa.layout.state_fit`): the positions of
        an encoder are not its decoder's."""
        key = f"{produced.block}:{produced.what}"
        self._state_keys[key] = "first" if produced.batch_first else "second"
        if produced.batch_first and produced.what.startswith("out"):
            return self._record(key, tensor)
        cut = self._record(key, tensor.transpose(0, 1)).transpose(0, 1)
        g = self._group
        if g is not None:  # read again (an attention's keys and values): the same cut, one point
            g.readers[id(tensor)] = (weakref.ref(tensor), tensor._version, weakref.ref(cut))
        return cut

    def _on_recurrent_output(self, block: Block, output: Any) -> None:
        """Note the graph nodes of a recurrent block's outputs in a training forward (its output sequence, and its
        final state: ``nn.LSTM``'s ``(h, c)``, ``nn.GRU``'s ``h``), so that another block that reads them beside its
        main input cuts them (:meth:`_side_cut`)."""
        if not self._active() or self._capture is not None or not isinstance(output, tuple) or len(output) != 2:
            return None
        batch_first = bool(getattr(block.exit, "batch_first", False))
        state = output[1] if isinstance(output[1], tuple) else (output[1],)
        for what, tensor in [("out", output[0])] + [("state", t) for t in state]:
            self._note_side_output(block, what, tensor, batch_first)
        return None

    def _note_side_output(self, block: Block, what: str, tensor: Any, batch_first: bool) -> None:
        """Note ``tensor``'s graph node as ``block``'s side output ``what`` (:class:`_Produced`), if it carries
        gradient."""
        if isinstance(tensor, torch.Tensor) and _carries_grad(tensor) and tensor.grad_fn is not None:
            self._side_outputs.setdefault(tensor.grad_fn, []).append(
                _Produced(block.name, what, tensor.shape, batch_first)
            )

    def _on_block_output(self, block: Block, output: Any) -> Any:
        self._count_call()
        tensor, rebuild = _split_main(output)
        packed = _packed(output[0] if type(output) is tuple and output else output)
        cut = self._at_point(block.name, tensor, rebuild, block, packed)
        if cut is not None and self.mode == "shallow" and self._capture is None and isinstance(output, tuple):
            # the shallow baseline trains nothing up to the blocks' outputs: none of them carries gradient (an
            # LSTM's final state read by the head, a second output that a loss term reads)
            return detached(cut)
        if cut is not None and isinstance(output, tuple) and not isinstance(block.exit, nn.RNNBase):
            self._note_second_outputs(block, output, tensor)
            cut = self._cut_second_outputs(block, cut, tensor)
            self._note_side_reads(block, output, cut)
        return cut

    def _note_side_reads(self, block: Block, output: tuple, handed: Any) -> None:
        """Keep the graph nodes of ``block``'s other outputs that it hands on as they are, with gradient (not cut as
        points: a normalizing flow's log-determinant, of another shape than the hidden state), for
        :meth:`FeedbackEngine.loss_readers`."""
        reads = self._side_reads
        if reads is None or type(handed) is not tuple or self._capture is not None or not self._active():
            return
        for before, after in zip(output[1:], handed[1:]):
            if after is before and isinstance(before, torch.Tensor) and _carries_grad(before) and before.grad_fn:
                reads.append((block.name, before.grad_fn))

    def _cut_second_outputs(self, block: Block, value: Any, main: torch.Tensor) -> Any:
        """A block's other outputs that are activations of its batch (``tensor`` of ``main``'s rank and batch, with
        gradient: WaveNet's skip outputs, which the parent sums into the head) are feedback points too, each
        ``"<block>:out<i>"``, handed on cut: a block's outputs carry no backprop into it. (Its attention weights,
        of another rank, a cache or position bias of another batch, and a state the main output was computed from,
        as Swin's before its downsampling, pass as they are.)"""
        if type(value) is not tuple or self._capture is not None or self.mode == "bp" or not self._active():
            return value
        items = list(value)
        upstream: set[Any] | None = None
        for i, tensor in enumerate(items[1:], start=1):
            if (
                isinstance(tensor, torch.Tensor)
                and tensor.is_floating_point()
                and tensor.dim() == main.dim() >= 2
                and tensor.shape[0] == main.shape[0]
                and self._carries(tensor)
            ):
                if upstream is None:
                    upstream = set(_walk(main, _next_functions, limit=64))
                if tensor.grad_fn in upstream:
                    continue  # the main output was computed from it (Swin's states before downsampling)
                items[i] = self._record(f"{block.name}:out{i}", tensor)
        return tuple(items)

    def _note_second_outputs(self, block: Block, output: tuple, main: torch.Tensor) -> None:
        """Note a block's other outputs that are activations like its main one (the same batch and width: a second
        stream of hidden states, PegasusX's global tokens), so that a block reading them beside its main input cuts
        them (:meth:`_side_cut`). Side tensors of another shape (T5's relative position bias) are not noted."""
        for i, tensor in enumerate(output[1:], start=1):
            if isinstance(tensor, torch.Tensor) and tensor.dim() == main.dim() >= 2:
                if tensor.shape[0] == main.shape[0] and tensor.shape[-1] == main.shape[-1]:
                    self._note_side_output(block, f"out{i}", tensor, batch_first=True)

    def _on_block_exit(self, block: Block, output: Any) -> None:
        """Keep the graph node of a block's output in a training forward, for :meth:`FeedbackEngine.loss_readers`
        (the latest few, dropped at each ``end_backward``: nothing is held beyond what the graph holds)."""
        outputs = self._block_outputs
        if outputs is None or not self._active():
            return None
        tensor, _ = _split_main(output)
        if _carries_grad(tensor) and tensor.grad_fn is not None:
            outputs.append((block.name, tensor.grad_fn))
        return None

    def _on_loose_layer(self, name: str, args: tuple, output: Any) -> None:
        """Keep the graph node of a layer outside the blocks and outputs that reads a point's cut (its input is the
        memory of a cut, or of what a parameter-free layer made of one), for :meth:`FeedbackEngine.loss_readers`."""
        readers, memory, g = self._cut_readers, self._cut_memory, self._group
        if readers is None or memory is None or g is None or not g.points or self._capture is not None:
            return None
        if not self._active():
            return None
        tensor, _ = _split_input(args, {})
        out, _ = _split_main(output)
        if tensor is None or self._carries(tensor) or _memory(tensor) not in memory:
            return None  # (a layer reading the batch, such as a first-order term on the inputs, reads no cut)
        if _carries_grad(out) and out.grad_fn is not None:
            readers.append((name, out.grad_fn))
        return None

    def _on_passing_layer(self, args: tuple, output: Any) -> None:
        """A parameter-free layer outside the blocks (a pooling before the mean and variance layers): what it makes
        of a point's cut counts as the cut (see :meth:`_on_loose_layer`)."""
        g = self._group
        if self._cut_memory is None or g is None or not g.points or self._capture is not None or not self._active():
            return None
        tensor, _ = _split_input(args, {})
        out, _ = _split_main(output)
        if tensor is not None and out is not None and _memory(tensor) in self._cut_memory:
            self._cut_memory.add(_memory(out))
        return None

    def _on_head_input(self, name: str, args: tuple, kwargs: dict) -> Any:
        """``cut_head_input``: the output module's input becomes the point ``"<output>:in"`` (detached downstream)."""
        tensor, rebuild = _split_input(args, kwargs)
        self._cut_bypasses(tensor)
        return self._at_point(name + ":in", tensor, rebuild)

    def _on_output(self, name: str, output: Any, auto: bool = False) -> Any:
        if auto and (self._capture is not None or not self._active()):
            return None  # a candidate is not the discovered output: it does not end a capture or a forward
        if self._capture is not None and self._active():
            tensor, _ = _split_main(output)
            if tensor is not None:
                self._capture.outputs.append(tensor)
            self._group = None
            return None
        tensor, rebuild = _split_main(output)
        if not auto or (tensor is not None and tensor.requires_grad):
            self._cut_bypasses(tensor)
        if not self._active() or self.mode != "dfa":
            g = self._group
            if auto:
                return None
            if self.mode == "shallow" and g is not None and self._active():
                # the forward's output: a block called again starts the next forward; until then the layers
                # after the output (a head registered before the norms it follows) may still read a skip path
                g.outputs[name] = g.outputs.get(name, 0) + 1
            else:
                self._group = None
            return None
        g = self._group
        # A frozen output module (a fixed readout) still gets tied: the points carry the gradient, and the
        # error reaches the delivery even though the output itself needs none.
        if g is None or g.state.closed or not g.points:
            return None
        if tensor is None or not tensor.is_floating_point():
            if not auto:
                self.report.untied_outputs.append(type(output).__name__ if tensor is None else f"{tensor.dtype} tensor")
            return None
        if auto and not tensor.requires_grad:
            return None  # a candidate whose output carries no gradient cannot be where the loss reads the error
        if auto and tensor.dim() == 0:
            return None  # a candidate that computes the loss itself (a CRF's negative log-likelihood) is the loss's
        fed = self._blocks_fed_by(name, g)
        points = list(g.points) if fed is None else [p for p in g.points if _of_blocks(p.key, fed)]
        points = [p for p in points if id(p) not in g.read_fed]  # an encoder's points: the decoder's read feeds them
        if not points:
            return None
        pooled = _note_pooling(tensor, points)
        if pooled is not None:
            self._pooled.add(pooled.split("#")[0])
        if name not in self._pooled_maps and self.pooled_channels:
            if any(is_map(p.shape) for p in points if p.flatten):  # checked once per output
                self._pooled_maps[name] = per_item(tensor.shape) and _reads_pooled_map(tensor, points[-1])
        calls = g.outputs.get(name, 0)
        g.outputs[name] = calls + 1
        source = name if calls == 0 else f"{name}#{calls}"
        metas = [self._point_meta(p.key, p, p.flatten) for p in points]
        delivery = _Delivery(self, metas, source, [p.slot for p in points])
        learned = self.learned is not None
        activations = [_activation(p) if m.norm is not None or learned else None for p, m in zip(points, metas)]
        module = self._modules.get(name)
        delivery.frozen = module is not None and not any(p.requires_grad for p in module.parameters())
        delivery.named = name in self.config.output_names
        delivery.candidate = auto and not delivery.named
        if len(g.outputs) > 1 or calls:  # another output was tied in this forward: was it computed from it?
            delivery.upstream = _deliveries_upstream_of(tensor)
        if g.copies_cuts:
            delivery.probe = (tensor, [p.tensor for p in points])
        if self._true_ids is None:  # until a backward delivered: which parameters lie between cuts and output
            delivery.reached = _parameters_reached(tensor)
        delivery.forward = g.state
        g.untied = 0
        g.ties.append(delivery)
        # the consumers are known once the output is tied; a candidate output tied on the way (an encoder's final
        # norm, which the decoder reads) does not end the search: the blocks after it have consumers too
        self._consumers_complete = self._consumers_complete or not auto
        self.report.outputs_tied += 1
        if isinstance(output, (tuple, list)) and sum(isinstance(v, torch.Tensor) for v in output) > 1:
            self.report.tuple_outputs.append(name)
        return rebuild(_DeliverFeedback.apply(delivery, activations, tensor, *[p.edge for p in points]))

    def _blocks_fed_by(self, name: str, g: _Group) -> set[str] | None:
        """The blocks whose points output ``name``'s error reaches in forward ``g`` (``None``: all): its own where it
        ends a tower (:meth:`Target.blocks_fed_by`); for another output, also those of a tower whose output a block's
        input was computed from in this forward (a stem, no error source: its points take this output's error)."""
        target = self.target
        fed = target.blocks_fed_by(name) if target is not None else None
        if fed is not None and name not in target.towers:
            for tie in g.ties:
                tower = target.towers.get(tie.source.split("#")[0])
                if tower is not None and tie.feeds_point:
                    fed |= set(tower)
        return fed

    def _note_reader(self, block: Block, tensor: torch.Tensor | None) -> None:
        """While the norms that consume each point are searched for: the point this call of top-level ``block`` reads
        (its input point, or an earlier point's cut), whose consumer may be a norm inside the block that reads it
        through a residual add (:meth:`_residual_consumer`)."""
        g = self._group
        if self._consumers_complete or g is None or tensor is None or self.norm_feedback != "consumer":
            return
        tensor = _uncut(g, tensor)
        point = next((p for p in reversed(self._pending) if p.reads(tensor)), None)
        if point is None:
            g.reads.pop(block.name, None)
        else:
            g.reads[block.name] = point

    def _residual_consumer(self, module: nn.Module, tensor: torch.Tensor) -> _Point | None:
        """The point whose consumer is norm ``module`` through a residual add, or ``None``: a post-norm block
        (PyTorch's ``nn.TransformerEncoderLayer`` by default, BERT's layers) reads its input point ``x`` through
        ``norm(x + f(x))``. Fed raw, that point's feedback would push what lies before it (the embeddings) along
        directions the norm then removes; it passes instead through the Jacobian of the first norm that runs inside
        the block on a tensor of the point's shape, where that tensor is a sum, at the point's own activation. A
        point that is itself a norm's output (through dropout, a slice or a reshape) is left as it is: the producing
        norm's Jacobian lies in its backward already. A flattened point (of a block with a convolution, as ConvBERT's)
        takes it too, at its own shape, position by position as the norm runs."""
        g = self._group
        block = self._norm_blocks.get(id(module))
        point = g.reads.get(block) if g is not None and block is not None else None
        if point is None or tuple(tensor.shape) != tuple(point.shape):
            return None
        del g.reads[block]  # only the first norm of the point's shape in the block
        node = tensor.grad_fn
        if point.tensor is None or node is None or not type(node).__name__.startswith(("Add", "Sub")):
            return None
        return None if _norm_output(point.tensor, self._norm_outputs) else point

    def _on_norm_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Norm-aware feedback: a normalisation reading a point recorded in this forward makes it that point's
        consumer (the point's feedback will pass through its Jacobian). Checked until the first delivery."""
        if self._consumers_complete and self._capture is None:
            return None
        if not self._active():
            return None
        tensor, _ = _split_input(args, kwargs)
        if tensor is None or not tensor.is_floating_point():
            return None
        g = self._group
        tensor = _uncut(g, tensor)
        if self._capture is not None:
            recorded = [(p.key, p.tensor.data_ptr() == tensor.data_ptr() and p.tensor.shape == tensor.shape, None)
                        for p in self._capture.points]  # fmt: skip
        else:
            recorded = [(p.key, p.reads(tensor), p) for p in self._pending]
        for key, reads, point in reversed(recorded):
            if not reads:
                continue
            if point is not None and point.activation is None:
                point.activation = tensor.detach()  # what norm-aware feedback will read (the norm keeps it too)
            # (a flattened point, such as a patch embedding's output, keeps its own shape: the norm's Jacobian
            # applies to it position by position, as the norm does)
            if id(module) not in self._norm_kinds:
                self._norm_kinds[id(module)] = probe_normalisation(module, tensor)
            spec = self._norm_kinds[id(module)]
            if spec is not None:
                self._consumers.setdefault(key.split("#")[0], spec)
                if id(module) in self._inside_blocks:
                    self._point_norms.add(id(module))
            if g is not None:
                g.reads.pop(self._norm_blocks.get(id(module)), None)
            return None
        point = self._residual_consumer(module, tensor) if self._capture is None else None
        if point is None or point.key.split("#")[0] in self._consumers:
            return None
        if id(module) not in self._norm_kinds:
            self._norm_kinds[id(module)] = probe_normalisation(module, tensor)
        spec = self._norm_kinds[id(module)]
        if spec is not None:
            key = point.key.split("#")[0]
            self._consumers[key] = spec
            self._residual_consumers.add(key)
            if point.activation is None:
                point.activation = point.tensor.detach()
        return None

    def _on_norm_output(self, name: str, module: nn.Module, output: Any) -> Any:
        """``norm_points``: the output of a norm inside a block that reads a point is a point too. While the norms
        that consume each point are searched for, the output's graph node is noted (see :meth:`_residual_consumer`)."""
        if not self._consumers_complete and self._active():
            tensor, _ = _split_main(output)
            if isinstance(tensor, torch.Tensor) and tensor.grad_fn is not None:
                self._norm_outputs.add(tensor.grad_fn)  # (dropped when a backward starts)
        if not self.norm_points or id(module) not in self._point_norms:
            return None
        spec = self._norm_kinds.get(id(module))
        if spec is not None and spec.channels_first:  # a feature map [batch, channels, *positions], as a conv's
            self._flatten.add(name)
        tensor, rebuild = _split_main(output)
        return self._at_point(name, tensor, rebuild)

    def _on_token_embedding(self, output: Any) -> Any:
        """``cut_token_embedding``: a token embedding's output is detached in DFA's forwards (tied to the output
        module, its weights then learn from the output's true gradient only). Not while :meth:`capture` records a
        plain backprop forward."""
        if self.mode != "dfa" or self._capture is not None or not torch.is_grad_enabled() or self._inert:
            return None
        tensor, rebuild = _split_main(output)
        if tensor is None or not tensor.requires_grad:
            return None
        return rebuild(tensor.detach())

    def _point_meta(self, key: str, tensor: torch.Tensor, flatten: bool) -> PointMeta:
        """What the backward needs of a point: its shape and dtype, the norm that shapes its feedback, and whether
        it lies in an encoder-decoder's encoder (its positions are not the output's)."""
        encoder = key.split("#")[0].split(":")[0] in self._encoder_names
        state = self._state_keys.get(key.split("#")[0])
        rows = getattr(tensor, "rows", None)  # a _Point's packed rows
        return PointMeta(
            key,
            tensor.shape,
            tensor.dtype,
            flatten,
            self._norm_of(key, flatten),
            encoder=encoder,
            state=state,
            rows=rows,
        )

    def _norm_of(self, key: str, flatten: bool) -> NormSpec | None:
        """The Jacobian that shapes point ``key``'s feedback, or ``None``."""
        mode = self.norm_feedback
        if mode == "layernorm":
            return NormSpec("layer", 1e-5, -1 if flatten else 1)
        if mode == "off":
            return None
        return self._consumers.get(key.split("#")[0])

    def _on_output_input(self, name: str, args: tuple, kwargs: dict) -> Any:
        tensor, rebuild = _split_input(args, kwargs)
        if tensor is None:
            return None
        g = self._group
        tensor = _uncut(g, tensor)
        if self._active() and self.mode == "dfa" and g is not None and (not tensor.requires_grad or g.soft):
            # The head reads the last block's output directly: that block gets the true error at the head's
            # input (it is where the error is read), the other points get its projection.
            for i in range(len(g.points) - 1, -1, -1):
                point = g.points[i]
                if point.reads(tensor):
                    del g.points[i]
                    g.untied = min(g.untied, len(g.points))
                    tensor = _Reattach.apply(point.slot, self.layouts, point.edge, tensor)
                    break
        tied = self._on_output(name, tensor)
        return None if tied is None else rebuild(tied)

    @contextlib.contextmanager
    def capture(self) -> Iterator[Capture]:
        """Run forwards as plain backprop (no cut, no delivery) while recording the feedback points and outputs.

        For instruments such as the alignment monitor: inside the context a forward keeps the full backprop
        graph, and the returned :class:`Capture` holds each point's tensor (still attached to the graph) and
        each output tensor, so ``torch.autograd.grad`` can give the true gradients there, and
        :meth:`feedback_for` the DFA signal for the same error.

        Example:
            >>> from lightning_dfa import FeedbackEngine
            >>> net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
            >>> engine = FeedbackEngine()
            >>> _ = engine.attach(net)
            >>> with engine.capture() as cap:
            ...     y = net(torch.randn(4, 3))
            >>> [p.key for p in cap.points], len(cap.outputs)
            (['1'], 1)
        """
        cap = Capture()
        previous, self._capture = self._capture, cap
        try:
            yield cap
        finally:
            self._capture = previous
            self._group = None

    def new_step(self) -> None:
        """Start the next training step afresh: forget the points of a forward that no output tied since the last
        backward (the backbone run alone with gradients, for a metric or a probe). The next output would otherwise
        feed them too, into a graph whose weights the optimizer has changed since. The Lightning adapters call it
        before each training step; a plain loop may call it before each step's forward.

        Example:
            >>> from lightning_dfa import FeedbackEngine
            >>> net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
            >>> engine = FeedbackEngine()
            >>> _ = engine.attach(net)
            >>> features = net[:2](torch.randn(4, 3))  # the blocks alone: points no output ties
            >>> engine.new_step()
            >>> net(torch.randn(4, 3)).sum().backward()
            >>> engine.end_backward().deliveries, [p.key for p in engine.last_points]
            (1, ['1'])
        """
        self._group = None

    @contextlib.contextmanager
    def inert(self) -> Iterator[None]:
        """Run forwards as the plain model, with gradients: no point, cut or delivery, so that gradients taken inside
        (a saliency map, an input-gradient metric in a validation step under ``torch.enable_grad()``) are the true
        derivatives. The Lightning adapters wrap validation, test and predict in it.

        Example:
            >>> from lightning_dfa import FeedbackEngine
            >>> net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
            >>> engine = FeedbackEngine()
            >>> _ = engine.attach(net)
            >>> x = torch.randn(4, 3, requires_grad=True)
            >>> with engine.inert():
            ...     saliency = torch.autograd.grad(net(x).sum(), x)[0]
            >>> engine.detach()
            >>> torch.equal(saliency, torch.autograd.grad(net(x).sum(), x)[0])
            True
        """
        self._inert += 1
        try:
            yield
        finally:
            self._inert -= 1
            self._group = None

    def output_modules(self) -> list[tuple[str, nn.Module]]:
        """The output modules: those whose error reached the blocks in the backwards so far (the loss decides, see
        :meth:`_output_candidates`), or the discovered ones before any backward.

        Example:
            >>> from lightning_dfa import FeedbackEngine
            >>> class TwoHeads(nn.Module):
            ...     def __init__(self):
            ...         super().__init__()
            ...         self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
            ...         self.a, self.b = nn.Linear(8, 3), nn.Linear(8, 1)
            ...     def forward(self, x):
            ...         h = self.body(x)
            ...         return self.a(h), self.b(h)
            >>> net, engine = TwoHeads(), FeedbackEngine()
            >>> _ = engine.attach(net)
            >>> [n for n, _ in engine.output_modules()]
            ['a']
            >>> a, b = net(torch.randn(5, 4))
            >>> (a.sum() + b.sum()).backward()
            >>> sorted(n for n, _ in engine.output_modules())
            ['a', 'b']
        """
        if self._sources:
            return list(self._sources.items())
        return list(self.target.outputs) if self.target is not None else []

    @property
    def outputs_guessed(self) -> bool:
        """Whether :meth:`output_modules` is still discovery's guess (no backward yet) while layers outside the
        blocks may turn out to be outputs (the loss decides, see :meth:`_output_candidates`)."""
        return not self._sources and bool(self._candidates)

    @property
    def roles_measured(self) -> bool:
        """Whether :meth:`parameter_roles` comes from the forward's data flow (after a first delivery) rather than
        from the order in which the modules are registered."""
        return self._true_ids is not None


class _Produced(NamedTuple):
    """A block output in this step's forward that another block may read beside its main input: ``what`` is
    ``"out"`` (a recurrent block's output sequence), ``"state"`` (its final state) or ``"out<i>"`` (a block's
    ``i``-th output, a second stream of hidden states)."""

    block: str
    what: str
    shape: torch.Size
    batch_first: bool


def _memory(tensor: torch.Tensor) -> int:
    """The address of a tensor's storage (a view, a detach and the tensor share it); ``0`` where there is none."""
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a tensor subclass without storage
        return 0


def _passing_layers(root: nn.Module, target: Target) -> list[nn.Module]:
    """The modules without parameters outside every block and output module (a pooling, a flatten, an activation
    between the backbone and the layers after it)."""
    held = [m for b in target.blocks for m in (*(b.members or (b.entry,)), b.exit)] + [o for _, o in target.outputs]
    inside = {id(m) for h in held for m in h.modules()}
    return [m for m in root.modules() if m is not root and id(m) not in inside and not (_has_params(m) or scripted(m))]


def _loose_layers(root: nn.Module, target: Target) -> list[tuple[str, nn.Module]]:
    """The modules holding trainable parameters of their own outside every block and output module (a VAE's mean and
    variance layers after a backbone, a value head beside a policy): a loss term reading them directly trains them
    by their true gradient, which stops at the point they read. Not a module holding an output module (BERT's
    ``cls.predictions`` with a bias of its own around its decoder): what it returns carries the output's error."""
    inside = target.block_param_ids() | {id(p) for _, m in target.outputs for p in m.parameters()}
    outputs = [name for name, _ in target.outputs]
    found = []
    for name, module in root.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if name and own and not any(id(p) in inside for p in own) and not scripted(module):
            if not any(out.startswith(name + ".") for out in outputs):
                found.append((name, module))
    return found


def _of_encoder(key: str, encoder: set[str]) -> bool:
    return key.split("#")[0].split(":")[0] in encoder


def _of_blocks(key: str, blocks: set[str]) -> bool:
    """Point ``key`` (``"<block>"``, ``"<block>:in"``, a norm inside the block, ``#<call>``) belongs to one of
    ``blocks``."""
    name = key.split("#")[0].split(":")[0]
    return any(name == b or name.startswith(b + ".") for b in blocks)


def _uncut(g: _Group | None, tensor: torch.Tensor) -> torch.Tensor:
    """In a layout-probe forward: the point itself for its soft cut's copy (or an alias of the copy, such as FSDP2's
    pre-forward hook passes on); any other tensor as it is."""
    if g is None or not g.cuts:
        return tensor
    return next((g.cuts[id(c)] for c in g.copies if _same_memory(c, tensor)), tensor)


def _activation(point: _Point) -> torch.Tensor:
    """The values norm-aware (or learned) feedback reads at ``point``."""
    if point.activation is not None:
        return point.activation
    if point.tensor is not None:
        return point.tensor.detach()
    raise RuntimeError(
        f"DFA: the activation of point {point.key!r} was not kept for its norm-aware feedback (the norm reading it "
        "was found after the point was recorded). Please report this with the model; norm_jacobian=False avoids it."
    )


#: graph nodes between a norm and a point that leave it the norm's output: dropout's mask, scaling, and ops that
#: only reshape, slice or cast
_NORM_OUTPUT_PASSES = (
    "MulBackward",
    "DivBackward",
    "SliceBackward",
    "SelectBackward",
    "ViewBackward",
    "UnsafeViewBackward",
    "ReshapeAliasBackward",
    "AliasBackward",
    "AsStridedBackward",
    "SqueezeBackward",
    "UnsqueezeBackward",
    "TransposeBackward",
    "PermuteBackward",
    "CloneBackward",
    "ToCopyBackward",
)


def _norm_output(tensor: torch.Tensor, outputs: set[Any]) -> bool:
    """``tensor`` was computed by one of the graph nodes ``outputs`` (a norm's output), directly or through dropout
    (a ``Dropout`` node, or a product with a constant mask, as ``nn.Dropout`` records it in training) and through
    ops that only reshape, slice or cast it (LUKE's layers return ``layer_output[:, :word_size]``)."""
    node = tensor.grad_fn
    for _ in range(8):
        if node is None or node in outputs:
            return node is not None
        inputs = [n for n, _ in node.next_functions if n is not None]
        name = type(node).__name__
        if len(inputs) != 1 or not ("Dropout" in name or name.startswith(_NORM_OUTPUT_PASSES)):
            return False
        node = inputs[0]
    return False


#: graph nodes of a sum, mean or max over groups of rows (torch_geometric's ``global_mean_pool(x, batch)``), which
#: save the group of each row as ``_saved_index``
_POOLINGS = ("ScatterAddBackward0", "ScatterReduceBackward0", "IndexAddBackward0", "IndexReduceBackward0")
#: the reductions among them followed: a sum (``None``: ``scatter_add`` and ``index_add`` name none), a mean, and a
#: maximum or minimum (whose gradient reaches, in each channel, the rows that hold their group's extreme)
_REDUCTIONS = (None, "sum", "mean", "amax", "amin")


def _note_pooling(tensor: torch.Tensor, points: list[_Point]) -> str | None:
    """Points with more rows than the output's items (a graph's nodes, before a pooling over each graph): where the
    output was computed from a sum, mean or maximum of rows over groups (a scatter or index-add along the rows, whose
    saved index gives each row's group, as torch_geometric's ``global_add_pool``, ``global_mean_pool`` and
    ``global_max_pool``; or, for one item, a reduction over all rows, as their ``batch=None``), each such point's
    rows are those groups' rows (:class:`PackedRows`), so that each row (node) is fed its group's (graph's) error:
    divided by the group's size in a mean (what the output applied to the rows before the pooling gives); in a
    maximum, at the last point, only in the channels where the row holds its group's maximum, and at earlier points
    weighed by the row's share of the channels. Returns the key of the last such point (its cut then stays in the
    graph, so that the next forwards find the groups too), or ``None``."""
    ragged = {p.shape[0] for p in points if p.rows is None and len(p.shape) == 2 and not p.flatten}
    items = tensor.shape[0] if tensor.dim() == 2 else None
    ragged = {n for n in ragged if items is not None and n > items}
    if not ragged or not tensor.requires_grad or tensor.grad_fn is None:
        return None
    groups: dict[int, PackedRows] = {}
    means: set[Any] = set()  # scatters divided by the group sizes after (torch_geometric's mean pooling)
    for node in _walk(tensor, _next_functions, limit=64):
        name = type(node).__name__
        if name == "DivBackward0" and node.next_functions and node.next_functions[0][0] is not None:
            means.add(node.next_functions[0][0])
        if items == 1 and name in _WHOLE:  # one graph's rows pooled without an index (``batch=None``)
            whole = _whole_pooling(node, ragged, tensor.device)
            if whole is not None and whole.items.shape[0] not in groups:
                groups[whole.items.shape[0]] = whole
            continue
        reduce = getattr(node, "_saved_reduce", None)
        if name not in _POOLINGS or getattr(node, "_saved_dim", None) != 0 or reduce not in _REDUCTIONS:
            continue
        index = getattr(node, "_saved_index", None)
        if isinstance(index, torch.Tensor) and index.dim() in (1, 2) and index.shape[0] in ragged:
            rows = (index if index.dim() == 1 else index[:, 0]).long()
            if rows.numel() and int(rows.max()) < items and rows.shape[0] not in groups:
                if reduce in ("amax", "amin"):
                    weights = _extreme_shares(node, rows)
                    if weights is None:
                        continue
                else:
                    # a mean's rows each weigh one over their group's size, as the head applied before the pooling
                    # sees
                    mean = node in means or reduce == "mean"
                    weights = 1.0 / torch.bincount(rows, minlength=items).clamp(min=1)[rows] if mean else None
                groups[rows.shape[0]] = PackedRows(rows, torch.zeros_like(rows), items, 1, True, weights)
    pooled = [p for p in points if p.rows is None and len(p.shape) == 2 and not p.flatten and p.shape[0] in groups]
    per_row: dict[int, PackedRows] = {}  # a maximum's groups with each row's share of the channels, made once
    for p in pooled:
        found = groups[p.shape[0]]
        shares = found.weights
        if shares is not None and shares.dim() == 2 and (p is not pooled[-1] or p.shape[1] != shares.shape[1]):
            # a maximum's channels are the last point's: an earlier point's rows weigh their share of the channels
            if p.shape[0] not in per_row:
                per_row[p.shape[0]] = replace(found, weights=shares.mean(1))
            found = per_row[p.shape[0]]
        p.rows = found
    return pooled[-1].key if pooled else None


def _reads_pooled_map(tensor: torch.Tensor, last: _Point) -> bool:
    """``tensor`` (an output) reads a feature map through a global average (or sum) over all its positions: a
    ``[batch, channels, *positions]`` map reduced over every position lies between the output and the last point
    (ResNet's pooler, ``x.mean((-2, -1))`` in the head), or the last point is itself that pooling's result (a
    ``Sequential`` CNN's ``AdaptiveAvgPool2d(1)``, the head's input taken after the pooling)."""
    if tensor.grad_fn is None:
        return False
    batch = tensor.shape[0]
    if any(_global_mean(node, batch) for node in _walk(tensor, _next_functions, limit=64)):
        return True
    node = last.edge.grad_fn.next_functions[0][0] if last.edge.grad_fn is not None else None
    while node is not None and _reshapes_or_scales(node):  # the pooling's result, reshaped or divided
        node = node.next_functions[0][0]
    return node is not None and _global_mean(node, batch)


def _reshapes_or_scales(node: Any) -> bool:
    """The graph node only reshapes its input, or multiplies or divides it by a constant (``x.sum((2, 3)) / n``)."""
    name = type(node).__name__
    if name in _VIEWS:
        return True
    return name in _SCALES and all(n is None for n, _ in node.next_functions[1:])


#: graph nodes that only reshape a tensor (``Flatten``, ``squeeze``, ``view``)
_VIEWS = ("ViewBackward0", "ReshapeAliasBackward0", "UnsafeViewBackward0", "SqueezeBackward1", "SqueezeBackward2",
          "SqueezeBackward0", "UnsqueezeBackward0")  # fmt: skip
_SCALES = ("MulBackward0", "MulBackward1", "DivBackward0", "DivBackward1")


def _global_mean(node: Any, batch: int) -> bool:
    """The graph node is a mean or a sum of a ``[batch, channels, *positions]`` tensor over all its positions (or an
    average pooling whose window is the whole map, as ``F.avg_pool2d(x, 4)`` on a 4x4 map)."""
    name = type(node).__name__
    if name in ("AvgPool2DBackward0", "AvgPool3DBackward0"):
        # the pooled map's shape, from the node that computed it (reading the pooling's saved input would unpack
        # it: under activation checkpointing, a recomputation of the checkpointed region in the forward)
        source, index = node.next_functions[0]
        try:
            sizes = tuple(source._input_metadata[index].shape)
        except (AttributeError, IndexError, RuntimeError):
            return False
        kernel = tuple(node._saved_kernel_size)
        kernel = kernel * (len(sizes) - 2) if len(kernel) == 1 else kernel
        whole = kernel == sizes[2:] and not any(node._saved_padding) and node._saved_divisor_override is None
        return whole and sizes[0] == batch and math.prod(sizes[2:]) > 1
    if name not in ("MeanBackward1", "SumBackward1"):
        return False
    sizes = tuple(getattr(node, "_saved_self_sym_sizes", ()))
    if len(sizes) < 3 or sizes[0] != batch or math.prod(sizes[2:]) <= 1:
        return False
    dims = {(d - 2**64 if d >= 2**63 else d) % len(sizes) for d in getattr(node, "_saved_dim", ())}
    return dims == set(range(2, len(sizes)))  # (the saved dimensions are unsigned: -1 is 2**64 - 1)


#: graph nodes of a sum, mean or max over all rows at once (torch_geometric's pooling of one graph, ``batch=None``)
_WHOLE = ("SumBackward1", "MeanBackward1", "MaxBackward0", "MinBackward0")


def _whole_pooling(node: Any, ragged: set[int], device: torch.device) -> PackedRows | None:
    """The rows of a ``[rows, channels]`` tensor reduced over its rows into one (``keepdim``), all in one group: in
    a mean each weighs one over their number, in a maximum (or minimum) the row holding it in each channel;
    ``None`` for any other reduction."""
    sizes = getattr(node, "_saved_self_sym_sizes", None)
    dims = getattr(node, "_saved_dim", None)
    if sizes is None or len(sizes) != 2 or sizes[0] not in ragged or not getattr(node, "_saved_keepdim", False):
        return None
    dims = dims if isinstance(dims, tuple) else (dims,)
    if len(dims) != 1 or dims[0] not in (0, -2, (1 << 64) - 2):  # over the rows (-2 may be saved unsigned)
        return None
    n, width = int(sizes[0]), int(sizes[1])
    indices = getattr(node, "_saved_indices", None)
    name = type(node).__name__
    rows = torch.zeros(n, dtype=torch.long, device=device)
    if name == "MeanBackward1":
        weights = torch.full((n,), 1.0 / n, device=device)
    elif indices is not None:  # a maximum or minimum: its row in each channel
        weights = torch.zeros(n, width, device=device).scatter_(0, indices.reshape(1, width), 1.0)
    else:
        weights = None
    return PackedRows(rows, torch.zeros_like(rows), 1, 1, True, weights)


def _extreme_shares(node: Any, rows: torch.Tensor) -> torch.Tensor | None:
    """``[rows, channels]``: where each row holds its group's maximum (or minimum) of a channel, one over the number
    of rows that do (ties share it, as the pooling's own gradient does), elsewhere 0; ``None`` if the node did not
    save its input and result."""
    src = getattr(node, "_saved_src", None)
    if src is None:
        src = getattr(node, "_saved_source", None)
    result = getattr(node, "_saved_result", None)
    if not isinstance(src, torch.Tensor) or not isinstance(result, torch.Tensor) or src.dim() != 2:
        return None
    wins = (src.detach() == result.detach().index_select(0, rows)).to(src.dtype)
    ties = torch.zeros_like(result, dtype=src.dtype).index_add_(0, rows, wins).clamp(min=1)
    return wins / ties.index_select(0, rows)


def _packed(value: Any) -> nn.utils.rnn.PackedSequence | None:
    return value if isinstance(value, nn.utils.rnn.PackedSequence) else None


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride())


def _has_conv(block: Block) -> bool:
    mods: Sequence[nn.Module] = block.members or (block.entry,)
    return any(isinstance(m, nn.modules.conv._ConvNd) for mod in mods for m in mod.modules())
