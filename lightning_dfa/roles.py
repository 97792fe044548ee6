"""How each parameter of an attached model is trained: by feedback, by its true gradient, or not at all."""

from __future__ import annotations

from typing import Any

from torch import nn

from .blocks import Target


def parameter_roles(engine: Any, root: nn.Module | None = None) -> dict[str, int]:
    """Number of trainable parameters trained by feedback, by their true gradient, or not at all."""
    root = root or engine.root
    if root is None or engine.target is None:
        raise RuntimeError("DFA: attach() the engine first.")
    measured = engine._true_ids is not None  # measured from the forward at the first delivery
    after = engine._true_ids if engine._true_ids is not None else params_after_blocks(root, engine.target)
    cut = engine._cut and not measured  # the cut is in the measurement
    out_ids = {id(p) for _, m in engine.output_modules() for p in m.parameters()}
    roles = {"feedback": 0, "true gradient": 0, "none": 0}
    seen: set[int] = set()
    for p in root.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if not p.requires_grad:
            roles["none"] += p.numel()
        elif engine.mode == "bp" or id(p) in out_ids or (id(p) in after and not cut):
            roles["true gradient"] += p.numel()
        elif engine.mode == "shallow":
            roles["none"] += p.numel()
        else:
            roles["feedback"] += p.numel()
    return roles


def role_of(engine: Any, parameter: nn.Parameter) -> str:
    """``"feedback"``, ``"true gradient"`` or ``"none"``: how a parameter of the model is trained (as counted by
    :meth:`parameter_roles`).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> from lightning_dfa import FeedbackEngine
        >>> engine = FeedbackEngine()
        >>> _ = engine.attach(net)
        >>> role_of(engine, net[0].weight), role_of(engine, net[2].weight)
        ('feedback', 'true gradient')
    """
    if engine.root is None or engine.target is None:
        raise RuntimeError("DFA: attach() the engine first.")
    if not parameter.requires_grad:
        return "none"
    if engine.mode == "bp" or any(parameter is p for _, m in engine.output_modules() for p in m.parameters()):
        return "true gradient"
    measured = engine._true_ids is not None
    after = engine._true_ids if engine._true_ids is not None else params_after_blocks(engine.root, engine.target)
    if id(parameter) in after and (measured or not engine._cut):
        return "true gradient"
    return "none" if engine.mode == "shallow" else "feedback"


def params_after_blocks(root: nn.Module, target: Target) -> set[int]:
    """``id`` of the parameters registered after the last block and outside every block (the tail). Blocks are
    found in ``root`` by identity, not by name, so a wrapped model (FSDP, activation checkpointing: other names,
    the same modules) has the same tail."""
    if not target.blocks:
        return set()
    position = {id(m): i for i, m in enumerate(root.modules())}
    last = max(position.get(id(m), -1) for b in target.blocks for m in (b.exit, b.entry))
    inside = {id(m) for b in target.blocks for m in b.exit.modules()}
    block_ids = target.block_param_ids()
    after: set[int] = set()
    for module in root.modules():
        if position[id(module)] <= last or id(module) in inside:
            continue
        for p in module.parameters(recurse=False):
            if id(p) not in block_ids:
                after.add(id(p))
    return after
