"""Checks with errors that say what is wrong and what to do: a damaged feedback state, a feedback transform
that changes shapes, reentrant gradient checkpointing, a backward in which no feedback reached the blocks, and a
training loss that diverges."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .blocks import _frozen
from .config import _SAVED_OPTIONS, DFAConfig
from .projectors.bank import _damaged, check_bank_state


def check_state(state: Any) -> None:
    """Refuse a feedback state that :meth:`FeedbackEngine.state_dict` cannot have written: missing keys, wrong
    types, non-finite or misshapen tensors, an unknown version, or option values no :class:`DFAConfig` accepts.

    Example:
        >>> from lightning_dfa import FeedbackEngine
        >>> state = FeedbackEngine().state_dict()
        >>> check_state(state)
        >>> check_state({**state, "scale": float("nan")})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: DFA: the checkpoint's feedback state is damaged: ...scale must be a finite, non-zero number...
    """
    check_bank_state(state)
    saved = state.get("projector")
    if saved is not None and not (
        isinstance(saved, dict) and isinstance(saved.get("class"), str) and isinstance(saved.get("outputs"), dict)
    ):
        raise _damaged("its projector entry is not {'class': name, 'outputs': {output: state}}")
    for key in ("faint_token_tables", "blocks", "heads", "read_outputs"):
        names = state.get(key, [])
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise _damaged(f"its {key} entry is not a list of strings")
    options = {name: state[name] for name in _SAVED_OPTIONS if name in state}
    try:
        DFAConfig(**options)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"DFA: the checkpoint's feedback state is damaged: its saved options are invalid ({err}). Resume from "
            "another checkpoint, or start a new fit from the weights alone (Model.load_from_checkpoint(path), then "
            "fit without ckpt_path)."
        ) from None


def checked_transform(
    transform: Callable[[str, torch.Tensor], torch.Tensor], key: str, feedback: torch.Tensor
) -> torch.Tensor:
    """``transform(key, feedback)``, refused unless it keeps the feedback's shape."""
    out = transform(key, feedback)
    if not isinstance(out, torch.Tensor) or out.shape != feedback.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise RuntimeError(
            f"DFA: feedback_transform returned {got} for point {key!r}, whose feedback has shape "
            f"{tuple(feedback.shape)}; it must return a tensor of the same shape."
        )
    return out


def refuse_reentrant_checkpointing(root: nn.Module) -> None:
    for name, module in root.named_modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            func = getattr(module, "_gradient_checkpointing_func", None)
            keywords = getattr(func, "keywords", {}) or {}
            if keywords.get("use_reentrant", True):
                raise RuntimeError(
                    f"DFA: {name or type(root).__name__} uses reentrant gradient checkpointing, whose forward runs "
                    "without gradients and so hides the blocks from DFA. Enable it as "
                    "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})."
                )


def scripted(module: nn.Module) -> bool:
    """Whether ``module`` is TorchScript (it runs no Python hooks)."""
    return isinstance(module, torch.jit.ScriptModule)


def refuse_fullgraph_compile(root: nn.Module) -> None:
    """Refuse a model compiled with ``torch.compile(..., fullgraph=True)`` (a compiled module in it, or a compiled
    LightningModule as Lightning records it): the engine's hooks run eagerly between compiled graphs, a graph break
    at each block and output, which ``fullgraph=True`` forbids.

    Raises:
        ValueError: naming the compiled module and what to do.
    """
    ctx = getattr(root, "_compiler_ctx", None)  # a compiled LightningModule, as Lightning unwraps it
    whole = isinstance(ctx, dict) and _fullgraph(ctx.get("dynamo_ctx"))
    names = [f"{type(root).__name__} (the model)"] if whole else []
    names += [name or f"{type(m).__name__} (the model)" for name, m in root.named_modules() if _fullgraph(m)]
    if names:
        raise ValueError(
            f"DFA: {', '.join(names)} {'was' if len(names) == 1 else 'were'} compiled with torch.compile(..., "
            "fullgraph=True). DFA's hooks run eagerly between the compiled graphs, a graph break at each block and "
            "output, which fullgraph=True forbids. Compile without fullgraph=True: the code between the hooks (each "
            "block's own computation) still compiles."
        )


def _fullgraph(obj: Any) -> bool:
    """``obj`` is a ``torch.compile`` wrapper (or its context) set to ``fullgraph=True``, or a module whose
    ``module.compile(fullgraph=True)`` holds such a context in its compiled call."""
    ctx = getattr(obj, "dynamo_ctx", obj)
    if getattr(ctx, "fullgraph", False) is True:
        return True
    call = getattr(obj, "_compiled_call_impl", None) if isinstance(obj, nn.Module) else None
    cells = getattr(call, "__closure__", None) or ()
    return any(getattr(_contents(cell), "fullgraph", False) is True for cell in cells)


def _contents(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def refuse_torchscript(root: nn.Module, target: Any = None) -> None:
    """Refuse a model whose blocks or output DFA would have to hook inside TorchScript (``torch.jit.script`` or
    ``trace``): a scripted module runs no Python hooks. ``target=None``: before discovery (the root, and the
    trainable scripted modules that would hide layers from it); else the blocks and outputs found.

    Raises:
        ValueError: naming the scripted modules and what to do.
    """
    if target is None:
        if scripted(root):
            names = [f"{getattr(root, 'original_name', type(root).__name__)} (the model)"]
        else:
            trainable = [(n, m) for n, m in root.named_modules() if any(p.requires_grad for p in m.parameters())]
            names = [n for n, m in trainable if scripted(m)]
            names = [n for n in names if not any(n.startswith(o + ".") for o in names)]  # the outermost only
    else:
        hooked = [(b.name, m) for b in target.blocks for m in (b.entry, b.exit)] + list(target.outputs)
        names = list(dict.fromkeys(n for n, m in hooked if scripted(m)))
    if names:
        it = "it" if len(names) == 1 else "them"
        raise ValueError(
            f"DFA: {', '.join(names)} {'is' if len(names) == 1 else 'are'} TorchScript (torch.jit.script or trace), "
            f"which runs no Python hooks, so DFA can neither place feedback in {it} nor read the error at {it}. Train "
            "the eager nn.Module and script it afterwards (for deployment), or train this model with backprop "
            "(strategy='auto')."
        )


def output_names(engine: Any) -> str:
    """The output module(s) named for a message: ``'head'`` or ``(any of [...])``."""
    names = [n for n, _ in engine.target.outputs] if engine.target else ["?"]
    return repr(names[0]) if len(names) == 1 else f"(any of {names})"


class UnfedBlocks:
    """The blocks whose feedback points training steps recorded but whose feedback no backward delivered, over the
    first ``steps`` steps: they ran with gradient and learn nothing (a loss term reads them only through a cut, a
    network whose last layer was taken for a block). Collected over every backward (an optimizer each,
    accumulation, a critic stepped several times per generator step); :meth:`observe`, called as each step ends,
    says it once. Done as soon as every recorded block was fed.

    Example:
        >>> from types import SimpleNamespace
        >>> from lightning_dfa.delivery import BackwardReport
        >>> report = BackwardReport(points_named={"a", "b", "b:in", "head:in"}, points_fed=[SimpleNamespace(key="a")])
        >>> watch = UnfedBlocks(steps=2)
        >>> watch.add(report, blocks={"a", "b"})
        >>> watch.observe(outputs=["head"]) is None  # one step: b may still be fed
        True
        >>> watch.add(report, blocks={"a", "b"})
        >>> watch.observe(outputs=["head"]).split(" in the first")[0]
        "DFA: no output's error reached the feedback points of ['b']"
    """

    def __init__(self, steps: int = 10) -> None:
        self.steps = steps
        self.recorded: set[str] = set()
        self.fed: set[str] = set()
        self.seen = 0
        self.done = False

    def add(self, report: Any, blocks: set[str]) -> None:
        """One backward's points: those recorded and those fed, by block name."""
        if self.done:
            return
        self.recorded |= {n.split(":")[0] for n in report.points_named} & blocks
        self.fed |= {m.key.split("#")[0].split(":")[0] for m in report.points_fed}

    def observe(self, outputs: list[str]) -> str | None:
        """As a step ends: the warning, once (``None`` while blocks may still be fed)."""
        if self.done or not self.recorded:
            return None
        self.seen += 1
        unfed = sorted(self.recorded - self.fed)
        if unfed and self.seen < self.steps:
            return None
        self.done = True
        if not unfed:
            return None
        return (
            f"DFA: no output's error reached the feedback points of {unfed} in the first {self.seen} training steps: "
            f"those blocks ran with gradient but learn nothing. The error is read at {outputs}; a loss term that "
            "reads these blocks only through a cut block output (a second network whose last layer was taken for a "
            "block) is not fed back. Name each network's last layer as an output (output=[...]) and blocks= without "
            "those layers."
        )


def only_layers_after_frozen_blocks(engine: Any, report: Any) -> bool:
    """Every block was called frozen and no gradient entered one: only the layers after the blocks train in this
    step, by their own gradient (as with backprop), and DFA has nothing to do."""
    blocks = engine.target.blocks if engine.target else []
    return (
        bool(blocks)
        and report.points_recorded == 0
        and report.blocks_called > 0
        and report.frozen_blocks_fed == 0
        and all(_frozen(b) for b in blocks)
    )


def explain_silence(engine: Any, report: Any) -> str:
    """Why no feedback reached the blocks in a backward, and what to do."""
    out = output_names(engine)
    names = [b.name for b in engine.target.blocks] if engine.target else []
    if report.points_recorded == 0 and engine.target and all(_frozen(b) for b in engine.target.blocks):
        return (
            f"DFA: no feedback reached the blocks in this backward: every block is frozen (no parameter inside "
            f"{names[:3]}... requires grad), so DFA has nothing to train there, but trainable parameters before "
            "them feed the blocks (a prompt or prefix, as PEFT's prompt tuning, p-tuning and prefix tuning train): "
            "they would learn from noise, since a frozen network cannot align with DFA's fixed random feedback. "
            "Train them with backprop (strategy='auto'), use an adapter inside the blocks (LoRA, IA3, ...) or "
            "unfreeze the blocks; freeze what lies before the blocks if only the layers after them should learn."
        )
    if report.points_recorded == 0 and report.blocks_called == 0 and engine.target and engine.target.blocks:
        first = engine.target.blocks[0]
        if isinstance(first.exit, (nn.ModuleList, nn.ModuleDict)):  # a container: only its elements are called
            pattern = re.sub(r"\.\d+$", ".*", first.name) + ".*"
            return (
                f"DFA: no feedback reached the blocks in this backward: the blocks {names[:6]}... are containers "
                f"({type(first.exit).__name__}), whose forward is never called: the code iterates over them and calls "
                f"their elements. Pass blocks= naming the elements, e.g. blocks=[{pattern!r}], or leave blocks= out "
                "(a list of such lists, each called in order, is found by itself: each list is one block), or use "
                "mode='shallow' if only the layers after the blocks should learn."
            )
        inner = [n for n, c in first.exit.named_children() if any(True for _ in c.parameters())]
        pattern = re.sub(r"\.\d+$", ".*", first.name) + (f".{inner[-1]}" if inner else ".<layer>")
        return (
            f"DFA: no feedback reached the blocks in this backward: no block was called in this step's forward "
            f"(blocks: {names[:6]}...). Code that calls block.forward(...) directly, rather than block(...), "
            "bypasses PyTorch's module hooks, so DFA never sees the blocks run. Pass blocks= naming modules inside "
            f"them that are called, e.g. blocks=[{pattern!r}], or use mode='shallow' if only the layers after the "
            "blocks should learn."
        )
    if report.points_recorded == 0:
        why = (
            f"no block ran with gradients enabled in this step's forward (blocks: {names[:6]}...): under "
            "torch.no_grad(), or inside torch.utils.checkpoint.checkpoint(..., use_reentrant=True), whose forward "
            "runs without gradients (use use_reentrant=False), or in reversible layers (Reformer's, RevNet's), "
            "which run their blocks without gradients and rebuild them in the backward: DFA cannot train those."
        )
    elif report.outputs_tied == 0 and report.untied_outputs:
        kinds = sorted(set(report.untied_outputs))
        why = (
            f"the output module {out} was called after the blocks, but returned {', '.join(kinds)}, where DFA "
            "needs a floating-point tensor to read the error at (the output itself, the first item of a tuple or "
            "list, or the first field of a ModelOutput). Make it return the tensor the loss is computed from "
            "(logits, predictions) first, or pass output= naming the submodule that produces that tensor."
        )
    elif report.outputs_tied == 0:
        why = f"the output module {out} was not called after the blocks in this step's forward."
    elif report.tuple_outputs:
        name = report.tuple_outputs[-1]
        why = (
            f"the output module {name!r} returned a tuple, and DFA reads the error at its first item, which the loss "
            f"does not depend on (it may read another item: a forecast beside a backcast, as N-BEATS' blocks "
            f"return). Pass output= naming the layer inside {name!r} that computes what the loss reads, or make it "
            "return that tensor first."
        )
    elif engine._candidates:
        why = f"the loss does not depend on the output module {out} nor on another layer after the blocks."
    else:
        why = f"the loss does not depend on the output module {out}."
    return (
        f"DFA: no feedback reached the blocks in this backward: {why} Training would silently update only "
        "the layers after the last block. Pass output= naming the module whose output the loss is computed "
        "from (and blocks= if needed), or use mode='shallow' if that is what you want."
    )


def check_loss(engine: Any, loss: torch.Tensor) -> None:
    """Refuse a loss that cannot carry the error back to the output module."""
    # (in the first forward the points' cuts stay in the graph: what the loss carries must come from beyond them)
    if engine.mode != "bp" and isinstance(loss, torch.Tensor) and not engine._carries(loss):
        out = output_names(engine)
        if engine._pending:
            # points recorded (and detached) after the last call of the output module: the loss was computed
            # from a block's output, which DFA cuts from what follows
            last = engine._pending[-1].key.split("#")[0].split(":")[0]
            raise RuntimeError(
                f"DFA: the loss does not require grad: it was computed downstream of block {last!r}, whose output "
                f"DFA detaches, so it does not depend on the output module {out}. Compute the loss from that "
                "module's output (logits, predictions), or pass output= naming the module it is computed from; "
                "if blocks= names that module (or a module containing it), remove it from blocks=: the output "
                "must lie after the last block."
            )
        raise RuntimeError(
            f"DFA: the loss does not require grad, so it does not depend on the output module {out} "
            f"(mode={engine.mode!r} detaches everything else). Compute the loss from that module's output "
            "(logits, predictions), or pass output= naming the module it is computed from."
        )


def uninitialized(tensor: torch.Tensor) -> bool:
    """A lazy module's parameter or buffer, whose shape its first forward sets."""
    return isinstance(tensor, (nn.parameter.UninitializedParameter, nn.parameter.UninitializedBuffer))


def lazy_modules(root: nn.Module) -> list[str]:
    """The modules of ``root`` holding parameters whose shape the first forward sets (``nn.LazyLinear``...)."""
    return [
        name or type(root).__name__
        for name, module in root.named_modules()
        if any(uninitialized(p) for p in module.parameters(recurse=False))
    ]


def refuse_lazy_modules(root: nn.Module) -> None:
    """Say what to do where lazy modules are not materialised yet: discovery reads the layers' widths before training,
    and a lazy layer has none until its first forward."""
    lazy = lazy_modules(root)
    if lazy:
        raise ValueError(
            f"DFA: {', '.join(map(repr, lazy[:4]))}{' ...' if len(lazy) > 4 else ''} are lazy modules (nn.LazyLinear, "
            "nn.LazyConv2d...) whose shapes the first forward sets, and DFA finds its blocks and the widths of its "
            "feedback before training. Run one forward before fit (model(example_batch)), or set the "
            "LightningModule's example_input_array: the DFA strategy and callback then run it once, without "
            "gradients, before they attach."
        )


class DivergenceWatch:
    """Says once when a fit's training loss stops being finite, or grows a thousandfold from its first value (and
    past 1000): DFA's feedback depends on the output's error alone, not on the layers between a block and the
    output, so steps that backprop takes safely can make the activations grow without bound (BatchNorm ResNets
    trained by SGD at lr 0.1 with momentum 0.9). Reads the loss at the first call and every ``every``-th (one
    host sync each).

    Example:
        >>> watch = DivergenceWatch(every=2)
        >>> [watch.observe(torch.tensor(v)) is None for v in (2.0, 1.5, 9.0, 3e4)]
        [True, True, True, False]
    """

    def __init__(self, every: int = 25, factor: float = 1e3) -> None:
        self.every, self.factor = every, factor
        self.calls, self.first, self.said = 0, None, False

    def observe(self, loss: torch.Tensor, scale: Callable[[], float] | None = None) -> str | None:
        """The warning's text when ``loss / scale()`` (``scale``: the mixed-precision loss scale already applied,
        asked for only when the loss is read) shows the training diverging, once per watch; else ``None``."""
        if self.said or loss.numel() != 1:
            return None
        self.calls += 1
        if self.first is not None and self.calls % self.every:
            return None
        value = float(loss.detach().float()) / (scale() if scale is not None else 1.0)
        if self.first is None:
            self.first = value if math.isfinite(value) else None
            return None
        if math.isfinite(value) and value <= max(self.factor * abs(self.first), 1e3):
            return None
        self.said = True
        return (
            f"DFA: the training loss went from {self.first:.4g} at the first step to {value:.4g} after "
            f"{self.calls - 1} steps: the training is diverging. DFA's feedback depends on the output's error "
            "alone, not on the layers between a block and the output, so steps that backprop takes safely can make "
            "the activations grow without bound (BatchNorm ResNets trained by SGD at lr 0.1 with momentum 0.9 do). "
            "A lower learning rate, Adam or AdamW, or a smaller scale= usually trains; the same model under "
            "strategy='auto' tells whether backprop diverges too."
        )
