"""Tensors in module inputs and outputs: the main tensor of a value (a tensor, a tuple's first item, a
``ModelOutput``'s first field) and how to rebuild the value around a replacement; a module called on an example
input, moved to a device."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def split_main(value: Any) -> tuple[torch.Tensor | None, Callable[[torch.Tensor], Any] | None]:
    """The main tensor of a module's output (a tensor, the first item of a tuple/list/ModelOutput, also nested, as
    PVTv2's ``((hidden,), height, width)``) and a function that rebuilds the value around a replacement.

    Example:
        >>> value = ((torch.zeros(2), "attention"), 3, 4)
        >>> main, rebuild = split_main(value)
        >>> main.shape, rebuild(torch.ones(2))[0][0].tolist(), rebuild(torch.ones(2))[1:]
        (torch.Size([2]), [1.0, 1.0], (3, 4))
    """
    if isinstance(value, torch.Tensor):
        return value, lambda t: t
    if isinstance(value, (tuple, list)) and value:
        main, inner = split_main(value[0])
        if main is None or inner is None:
            return None, None
        if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
            return main, lambda t: type(value)(inner(t), *value[1:])
        return main, lambda t: type(value)([inner(t), *value[1:]])
    if hasattr(value, "to_tuple") and hasattr(value, "keys"):  # transformers.ModelOutput
        keys = list(value.keys())
        if keys and isinstance(value[keys[0]], torch.Tensor):

            def rebuild(t: torch.Tensor) -> Any:
                value[keys[0]] = t
                return value

            return value[keys[0]], rebuild
    return None, None


INPUT_KWARGS = ("hidden_states", "x", "input", "inputs", "inputs_embeds", "h")


def split_input(args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, Callable | None]:
    """A module call's main input tensor (the first argument, or the first of :data:`INPUT_KWARGS`) and a function
    that gives the call's ``(args, kwargs)`` with it replaced, wherever the call passes that same tensor (self-
    attention's ``attn(h, h, h)``: the query, keys and values are one input)."""
    main = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if main is None:
        main = next((kwargs[k] for k in INPUT_KWARGS if isinstance(kwargs.get(k), torch.Tensor)), None)
    if main is None:
        return None, None

    def rebuild(t: torch.Tensor) -> tuple[tuple, dict]:
        return tuple(t if a is main else a for a in args), {k: t if v is main else v for k, v in kwargs.items()}

    return main, rebuild


def detached(value: Any, depth: int = 0) -> Any:
    """``value`` with every tensor that carries gradient detached, in tuples and lists two levels deep (an LSTM's
    ``(output, (h, c))``).

    Example:
        >>> h = torch.ones(2, requires_grad=True) * 2
        >>> out = detached((h, (h, 3)))
        >>> out[0].requires_grad, out[1][0].requires_grad, out[1][1]
        (False, False, 3)
    """
    if isinstance(value, torch.Tensor):
        return value.detach() if value.requires_grad else value
    if depth <= 2 and isinstance(value, (tuple, list)):
        items = [detached(v, depth + 1) for v in value]
        if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple (a PackedSequence)
            return type(value)(*items)
        return type(value)(items)
    return value


def carries_grad(t: torch.Tensor | None) -> bool:
    return t is not None and t.requires_grad and t.is_floating_point()


def call_with_example(module: nn.Module, example: Any) -> Any:
    """``module`` called on an example input as Lightning's ``example_input_array`` holds it: a tuple or list of
    positional arguments, a dict of keyword arguments, or one argument.

    Example:
        >>> call_with_example(nn.Linear(3, 2), torch.zeros(4, 3)).shape
        torch.Size([4, 2])
    """
    if isinstance(example, (tuple, list)):
        return module(*example)
    if isinstance(example, dict):
        return module(**example)
    return module(example)


def to_device(value: Any, device: torch.device) -> Any:
    """The tensors of ``value`` (nested in tuples, lists and dicts) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value
