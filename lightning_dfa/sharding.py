"""Sharded training with DFA: the discovered blocks as FSDP units, activation checkpointing per block.

DFA's blocks are FSDP's natural wrap units: no gradient travels between blocks, so a block's backward needs only
its own parameters and its feedback. The functions here build FSDP1's auto-wrap policy and apply FSDP2's
``fully_shard`` from a :class:`~lightning_dfa.discovery.Target`, and map a target found on the plain model to the
wrappers that sharding and checkpointing put around its modules (so the engine's hooks sit outside them).

Example::

    from torch.distributed.fsdp import fully_shard
    from lightning_dfa import FeedbackEngine, discover
    from lightning_dfa.sharding import outermost, shard_blocks

    target = discover(model)
    shard_blocks(model, target)                 # fully_shard per block, then the root
    engine = FeedbackEngine(seed=0)
    engine.attach(model, outermost(model, target))
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from .blocks import Block, Target

#: attributes under which a wrapper keeps the module it wraps (FSDP1, activation-checkpoint wrapper)
_WRAPPED = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def wrap_units(target: Target) -> list[nn.Module]:
    """The modules that become FSDP units (and checkpointed regions): each top-level block module, or for a block
    made of a group of modules (``Linear, Tanh`` in an ``nn.Sequential``) its members that hold parameters.

    Example:
        >>> from lightning_dfa import discover
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> [type(m).__name__ for m in wrap_units(discover(net))]
        ['Linear', 'Linear']
    """
    units: list[nn.Module] = []
    for block in target.blocks:
        if not block.top_level:
            continue
        for module in block.members or (block.entry,):
            if any(True for _ in module.parameters()) and all(module is not u for u in units):
                units.append(module)
    return units


def fsdp_auto_wrap_policy(target: Target) -> Any:
    """FSDP1's auto-wrap policy (for ``FullyShardedDataParallel`` / Lightning's ``FSDPStrategy``): each block unit
    of :func:`wrap_units` is wrapped, nothing else (the root wraps the rest)."""
    from torch.distributed.fsdp.wrap import CustomPolicy

    ids = {id(m) for m in wrap_units(target)}
    return CustomPolicy(lambda module: id(module) in ids)


def checkpoint_check_fn(target: Target) -> Any:
    """``check_fn`` for ``apply_activation_checkpointing``: checkpoint each block unit of :func:`wrap_units`."""
    ids = {id(m) for m in wrap_units(target)}
    return lambda module: id(module) in ids


def shard_blocks(
    root: nn.Module, target: Target, checkpoint: bool = False, **fully_shard_kwargs: Any
) -> list[nn.Module]:
    """FSDP2: ``fully_shard`` each block unit of :func:`wrap_units`, then :func:`network`; with ``checkpoint=True``
    each unit first gets non-reentrant activation checkpointing. ``fully_shard_kwargs`` (``mesh``, ``mp_policy``,
    ``offload_policy``, ``reshard_after_forward``) are passed on. Returns the sharded units (the checkpoint wrappers
    where ``checkpoint=True``). Attach the engine afterwards with :func:`outermost`."""
    from torch.distributed.fsdp import fully_shard

    units = wrap_units(target)
    if checkpoint:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

        apply_activation_checkpointing(root, check_fn=checkpoint_check_fn(target))
        units = [_wrapper_of(root, u) for u in units]
    for unit in units:
        fully_shard(unit, **fully_shard_kwargs)
    fully_shard(network(root, target), **fully_shard_kwargs)
    return units


def network(root: nn.Module, target: Target) -> nn.Module:
    """The innermost module of ``root`` that holds every parameter of ``root``: FSDP2's root unit, whose forward must
    run (a LightningModule's ``training_step`` calls its network, not ``self``).

    Example:
        >>> from lightning_dfa import discover
        >>> outer = nn.Module()
        >>> outer.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> network(outer, discover(outer)) is outer.net
        True
    """
    everything = {id(p) for p in root.parameters()}
    inner = root
    while True:
        child = next((c for c in inner.children() if {id(p) for p in c.parameters()} == everything), None)
        if child is None:
            return inner
        inner = child


def _wrapper_of(root: nn.Module, module: nn.Module) -> nn.Module:
    """The outermost wrapper (FSDP1, activation checkpoint) around ``module`` in ``root``, or ``module`` itself."""
    outer = {id(module): module}
    for wrapper in root.modules():
        inner: Any = wrapper
        while any(hasattr(inner, a) for a in _WRAPPED):
            inner = next(getattr(inner, a) for a in _WRAPPED if hasattr(inner, a))
            if inner is module:
                outer[id(module)] = wrapper
                return wrapper
    return outer[id(module)]


def outermost(root: nn.Module, target: Target) -> Target:
    """``target`` (discovered on the plain model) with every block and output module replaced by the outermost
    wrapper around it in ``root`` after sharding or checkpointing: the engine's hooks then see what the wrapper
    returns, outside the checkpointed region and after FSDP's own output hooks. Names stay those of the plain model.
    """
    cache: dict[int, nn.Module] = {}

    def outer(module: nn.Module) -> nn.Module:
        if id(module) not in cache:
            cache[id(module)] = _wrapper_of(root, module)
        return cache[id(module)]

    blocks = [
        Block(b.name, outer(b.entry), outer(b.exit), b.top_level, tuple(outer(m) for m in b.members), b.output_point)
        for b in target.blocks
    ]
    return dataclasses.replace(
        target,
        blocks=blocks,
        output=outer(target.output),
        extra_outputs=[(n, outer(m)) for n, m in target.extra_outputs],
    )
