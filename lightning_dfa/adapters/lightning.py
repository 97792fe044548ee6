"""DFA strategy and callback for ``lightning.pytorch`` (see ``pytorch_lightning.py`` for ``pytorch_lightning``).

The two modules must stay line-for-line the same apart from the import block: the logic lives in ``core``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional, Union

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, StrategyRegistry

from ..projectors import Projector
from .core import DFACallbackMixin, DFADDPMixin, DFASingleDeviceMixin, DFAStrategyMixin, make_config

Blocks = Optional[Union[str, list[str]]]


class DFAStrategy(DFASingleDeviceMixin, DFAStrategyMixin, SingleDeviceStrategy):
    """Train on one device with Direct Feedback Alignment; registered as ``"dfa"``.

    The device comes from the Trainer (``accelerator``/``devices``); for several devices use ``"dfa_ddp"``.
    Options are those of :class:`lightning_dfa.DFAConfig`.

    Example::

        import lightning_dfa  # registers "dfa", "dfa_ddp", ...
        trainer = lightning.pytorch.Trainer(strategy="dfa")
        trainer = lightning.pytorch.Trainer(strategy=lightning_dfa.DFAStrategy(mode="shallow", seed=3))
    """

    strategy_name = "dfa"

    def __init__(
        self,
        mode: str = "dfa",
        blocks: Blocks = None,
        output: Optional[Union[str, list[str]]] = None,
        seed: int = 0,
        distribution: str = "uniform",
        scale: float = 1.0,
        distinct: bool = False,
        placement: str = "macro",
        error_at: str = "output",
        recipe: str = "auto",
        norm_jacobian: Optional[bool] = None,
        cut_head_input: Optional[bool] = None,
        norm_points: Optional[bool] = None,
        topk: Optional[int] = None,
        sketch: Optional[bool] = None,
        projector: Optional[Projector] = None,
        feedback_transform: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None,
        verbose: bool = True,
        device: Optional[Union[str, torch.device]] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(device=torch.device(device) if device is not None else "cpu", **kwargs)
        self._dfa_init(make_config(locals()), verbose)
        self._dfa_devices = [torch.device(device)] if device is not None else None


class DFADDPStrategy(DFADDPMixin, DFAStrategyMixin, DDPStrategy):
    """Lightning's DDP with Direct Feedback Alignment; registered as ``"dfa_ddp"`` (and ``_spawn``/``_fork``/
    ``_notebook``). Every DDP keyword argument (``find_unused_parameters``, ``static_graph``...) is forwarded.
    ``"dfa_ddp_find_unused_parameters_true"`` (and its ``_spawn``/``_fork``/``_notebook`` variants) sets
    ``find_unused_parameters=True``, which ``mode="shallow"`` needs (its blocks get no gradient).

    Example::

        trainer = lightning.pytorch.Trainer(strategy="dfa_ddp", devices=2, accelerator="cpu")
    """

    strategy_name = "dfa_ddp"

    def __init__(
        self,
        mode: str = "dfa",
        blocks: Blocks = None,
        output: Optional[Union[str, list[str]]] = None,
        seed: int = 0,
        distribution: str = "uniform",
        scale: float = 1.0,
        distinct: bool = False,
        placement: str = "macro",
        error_at: str = "output",
        recipe: str = "auto",
        norm_jacobian: Optional[bool] = None,
        cut_head_input: Optional[bool] = None,
        norm_points: Optional[bool] = None,
        topk: Optional[int] = None,
        sketch: Optional[bool] = None,
        projector: Optional[Projector] = None,
        feedback_transform: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None,
        verbose: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._dfa_init(make_config(locals()), verbose)


class DFA(DFACallbackMixin, Callback):
    """Direct Feedback Alignment as a callback, composable with the single-device strategies and DDP (other
    strategies, such as DeepSpeed and FSDP, are refused in ``setup``).

    Example::

        trainer = lightning.pytorch.Trainer(strategy="ddp", devices=2, callbacks=[lightning_dfa.DFA(seed=1)])
    """

    _dfa_supported_strategies = (SingleDeviceStrategy, DDPStrategy)

    def __init__(
        self,
        mode: str = "dfa",
        blocks: Blocks = None,
        output: Optional[Union[str, list[str]]] = None,
        seed: int = 0,
        distribution: str = "uniform",
        scale: float = 1.0,
        distinct: bool = False,
        placement: str = "macro",
        error_at: str = "output",
        recipe: str = "auto",
        norm_jacobian: Optional[bool] = None,
        cut_head_input: Optional[bool] = None,
        norm_points: Optional[bool] = None,
        topk: Optional[int] = None,
        sketch: Optional[bool] = None,
        projector: Optional[Projector] = None,
        feedback_transform: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        self._dfa_init(make_config(locals()), verbose)


def register(registry: Any = StrategyRegistry) -> None:
    """Register ``"dfa"`` and the ``"dfa_ddp*"`` names (idempotent)."""
    if "dfa" not in registry:
        registry.register("dfa", DFAStrategy, description="Direct Feedback Alignment on one device")
    DFADDPStrategy.register_strategies(registry)
