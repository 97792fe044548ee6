"""The table shown at fit start: where feedback goes and what trains how."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .config import RECIPE_OPTIONS
from .points import call_with_example


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return str(n)


_OPTIONS = ("recipe", "error_at", *RECIPE_OPTIONS, "topk")


def _options_in_force(engine: Any) -> str:
    """``"error_at=output | norm_jacobian=True | ..."``: the options that change the signal or its cost."""
    cfg = engine.config
    parts = []
    for name in _OPTIONS:
        if not hasattr(cfg, name):
            continue
        value = getattr(cfg, name)
        parts.append(f"{name}={'auto' if value is None and name != 'topk' else value}")
    if getattr(cfg, "projector", None) is not None:
        parts.append(f"projector={cfg.projector!r}")
    transform = getattr(cfg, "feedback_transform", None)
    if transform is not None:
        parts.append(f"feedback_transform={getattr(transform, '__name__', type(transform).__name__)}")
    return " | ".join(parts)


def _trainable_before(root: object, entry: object) -> bool:
    """Whether ``root`` registers trainable parameters before the module ``entry`` (embeddings before the first
    block): then the first block's input carries gradient and is a feedback point."""
    named = getattr(root, "named_modules", None)
    if named is None:
        return False
    for _, module in named():
        if module is entry:
            return False
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            return True
    return False


def _own_order(point: Any) -> list[int]:
    """A point's shape as the model holds it: a recurrent block's state (``[layers, batch, d]``) and a sequence-first
    output are recorded batch first."""
    shape = list(point.shape)
    swap = point.state is not None and (point.key.split("#")[0].endswith(":state") or point.state == "second")
    return [shape[1], shape[0], *shape[2:]] if swap else shape


def format_summary(engine: Any, shapes: Mapping[str, Sequence[int]] | None = None) -> str:
    """Render ``engine``'s feedback points, output, options and parameter roles as a plain-text table.

    ``shapes`` (point key -> shape) come from a probe forward at fit start; otherwise from the last delivery.
    Before any forward the shape and width columns are left out (the first training step prints the shapes), and
    the first block's input is listed only when trainable parameters come before it (it is a point only if it
    carries gradient: embeddings, not the raw data).
    """
    assert engine.target is not None
    cfg = engine.config
    seen = {key.split("#")[0]: meta for key, meta in engine.bank.widths.items()}
    if shapes is None:  # (a recurrent block's state or sequence-first output is recorded batch first: shown as is)
        shapes = {m.key.split("#")[0]: _own_order(m) for m in engine.last_points}
    shapes = {k.split("#")[0]: list(v) for k, v in shapes.items()}
    known = bool(seen or shapes)
    rows = []
    first = True
    for block in engine.target.blocks:
        name_in = f"{block.name}:in"
        measured = name_in in seen or name_in in shapes
        if first:
            input_is_point = measured if known else _trainable_before(engine.root, block.entry)
        if not block.output_point:
            # a layer's input is a point where it carries gradient: never a lookup table's indices, and once
            # measured, only where it was recorded
            shown = input_is_point if first else (measured if known else not isinstance(block.entry, nn.Embedding))
            if shown:
                rows.append((name_in, f"input of {type(block.entry).__name__}", seen.get(name_in)))
        else:
            if block.top_level and first and input_is_point:
                rows.append((name_in, "block input", seen.get(name_in)))
            rows.append((block.name, type(block.exit).__name__, seen.get(block.name)))
        first = False
        for key in sorted({k for k in [*seen, *shapes] if k.startswith(f"{block.name}:") and k != name_in}):
            what = key[len(block.name) + 1 :]  # an output read by another block beside its main input
            kind = {"out": "output sequence", "state": "final state"}.get(what, f"output {what[3:]}")
            rows.append((key, f"{kind} of {type(block.exit).__name__}", seen.get(key)))
    if engine.head_input_is_point:
        head_in = f"{engine.target.output_name}:in"
        rows.append((head_in, f"input of {type(engine.target.output).__name__} (output)", seen.get(head_in)))
    header: tuple[str, ...] = ("", "Feedback point", "Module", "Shape", "Width")
    lines = [header]
    for i, (name, kind, width) in enumerate(rows):
        shape = shapes.get(name)
        lines.append((str(i), name, kind, str(shape) if shape else "-", str(width[1]) if width else "-"))
    if not known:  # nothing measured yet: no columns of dashes
        lines = [line[:3] for line in lines]
    widths = [max(len(r[c]) for r in lines) for c in range(len(lines[0]))]
    out = [" | ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in lines]
    out.insert(1, "-" * max(len(line) for line in out))
    roles = engine.parameter_roles()
    feedback = (
        f"{cfg.distribution}, seed {cfg.seed}, scale {cfg.scale:g}/sqrt(width), "
        f"{'distinct per point (sign flips)' if cfg.distinct else 'shared projection'}"
    )
    outputs = ", ".join(f"{n} ({type(m).__name__})" for n, m in engine.output_modules())
    guessed = engine.outputs_guessed
    trained = roles["feedback"] + roles["true gradient"]
    share = roles["true gradient"] / trained if trained else 0.0
    how = "measured in the first backward" if engine.roles_measured else "estimated from the module order"
    if engine.roles_measured and not engine.roles_from_loss and engine.mode != "bp":
        # the layers a loss applies after the output module (a bias added to the logits) are known from the loss
        how += " (layers applied after the output module are counted once the loss is passed: end_backward(loss))"
    out += [
        "-" * len(out[1]),
        f"DFA mode: {engine.mode} | placement: {cfg.placement} | blocks from: {engine.target.source}",
        f"Options: {_options_in_force(engine)}",
        *(
            ["Shapes: printed at the first training step (set example_input_array to see them here)."]
            if not known
            else []
        ),
        f"Output (error read here, true gradient): {outputs}"
        + (" (guessed from the module order: the first step names the outputs the loss reads)" if guessed else ""),
        f"Feedback: {feedback}",
        f"Trainable params by feedback: {_count(roles['feedback'])} | by true gradient: "
        f"{_count(roles['true gradient'])} | not trained: {_count(roles['none'])}",
        f"Share of trainable params trained by their true gradient: {100 * share:.1f}% ({how})",
        *(f"Recipe: {line}" for line in engine.recipe_notes()),
    ]
    warning = mostly_backprop(engine)
    if warning:
        out.append(warning)
    return "\n".join(out)


def mostly_backprop(engine: Any) -> str | None:
    """A warning when, in ``mode="dfa"`` with blocks found, more than half of the trainable parameters are trained
    by backprop after the last feedback point (or reached by the loss outside the output modules); ``None``
    otherwise. The output modules'
    own parameters (always trained by their true gradient: a language model's vocabulary head may hold most of
    the model) do not count towards the half."""
    if engine.mode != "dfa" or engine.target is None or not engine.target.blocks:
        return None
    roles = engine.parameter_roles()
    trained = roles["feedback"] + roles["true gradient"]
    own = {id(p): p.numel() for _, m in engine.output_modules() for p in m.parameters() if p.requires_grad}
    between = roles["true gradient"] - sum(own.values())
    if not trained or between <= 0.5 * trained:
        return None
    names = ", ".join(n for n, _ in engine.output_modules())
    return (
        f"WARNING: {100 * between / trained:.0f}% of the trainable parameters are trained by backprop (their true "
        f"gradient), not by feedback: they lie after the last feedback point, or the loss reaches them without "
        f"passing the output {names}. Name the blocks and the output: DFAStrategy(blocks=[...], output=...) or "
        "configure_dfa()."
    )


def probe_shapes(engine: Any, root: nn.Module, example: Any) -> dict[str, list[int]]:
    """Shapes of the feedback points for one forward of ``example`` (in eval mode, RNG state restored).

    Used at fit start for the summary table, like Lightning's model summary uses ``example_input_array``.
    """
    was_training = root.training
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    root.eval()
    try:
        with torch.enable_grad(), engine.capture() as cap:
            call_with_example(root, example)
    finally:
        root.train(was_training)
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
    return {p.key: list(p.tensor.shape) for p in cap.points}
