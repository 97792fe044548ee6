"""DFA strategy and callback for ``lightning.pytorch`` (see ``pytorch_lightning.py`` for ``pytorch_lightning``).

The two modules must stay line-for-line the same apart from the import block: the logic lives in ``core``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional, Union

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import (
    DDPStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    StrategyRegistry,
)

from .core import (
    DFACallbackMixin,
    DFADDPMixin,
    DFAFSDPMixin,
    DFAModelParallelMixin,
    DFASingleDeviceMixin,
    DFAStrategyMixin,
    make_config,
)

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
        feedback_transform: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None,
        verbose: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._dfa_init(make_config(locals()), verbose)


class DFAFSDPStrategy(DFAFSDPMixin, DFAStrategyMixin, FSDPStrategy):
    """Lightning's FSDP (needs a GPU) with Direct Feedback Alignment; registered as ``"dfa_fsdp"`` and
    ``"dfa_fsdp_cpu_offload"``. Each discovered block is an FSDP unit (unless ``auto_wrap_policy`` is given);
    ``checkpoint_blocks=True`` checkpoints each block's activations. Every ``FSDPStrategy`` keyword argument
    (``mixed_precision``, ``sharding_strategy``, ``state_dict_type="sharded"``, ``cpu_offload``...) is forwarded; a
    checkpoint, sharded or full, carries the feedback state under ``"dfa"``.

    Example::

        trainer = lightning.pytorch.Trainer(strategy="dfa_fsdp", accelerator="gpu", devices=8, precision="bf16-mixed")
        trainer = lightning.pytorch.Trainer(strategy=lightning_dfa.DFAFSDPStrategy(checkpoint_blocks=True))
    """

    strategy_name = "dfa_fsdp"

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
        feedback_transform: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None,
        verbose: bool = True,
        checkpoint_blocks: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._dfa_init(make_config(locals()), verbose)
        self._dfa_sharding_init(checkpoint_blocks)


class DFAModelParallelStrategy(DFAModelParallelMixin, DFAStrategyMixin, ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (FSDP2; also on CPU with gloo) with Direct Feedback Alignment;
    registered as ``"dfa_model_parallel"``. Lightning requires a ``configure_model()`` hook; if it builds the model
    without sharding it, each discovered block is sharded with ``fully_shard`` (``mp_policy``, ``offload_policy``:
    FSDP2's mixed-precision and offload policies) and ``checkpoint_blocks=True`` checkpoints each block's activations.
    The other ``ModelParallelStrategy`` keyword arguments are forwarded; a checkpoint carries the feedback state.

    Example::

        trainer = lightning.pytorch.Trainer(strategy="dfa_model_parallel", devices=2, accelerator="cpu")
    """

    strategy_name = "dfa_model_parallel"

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
        feedback_transform: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None,
        verbose: bool = True,
        checkpoint_blocks: bool = False,
        mp_policy: Any = None,
        offload_policy: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._dfa_init(make_config(locals()), verbose)
        self._dfa_sharding_init(checkpoint_blocks)
        policies = {"mp_policy": mp_policy, "offload_policy": offload_policy}
        self._dfa_fully_shard_kwargs = {k: v for k, v in policies.items() if v is not None}


class DFA(DFACallbackMixin, Callback):
    """Direct Feedback Alignment as a callback, composable with the single-device strategies, DDP, FSDP and
    ``ModelParallelStrategy`` (other strategies, such as DeepSpeed, are refused in ``setup``). Under FSDP the engine
    attaches to the wrapped model: prefer ``"dfa_fsdp"``/``"dfa_model_parallel"``, which shard by the blocks.

    Example::

        trainer = lightning.pytorch.Trainer(strategy="ddp", devices=2, callbacks=[lightning_dfa.DFA(seed=1)])
    """

    _dfa_supported_strategies = (SingleDeviceStrategy, DDPStrategy, FSDPStrategy, ModelParallelStrategy)

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
        feedback_transform: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        self._dfa_init(make_config(locals()), verbose)


def register(registry: Any = StrategyRegistry) -> None:
    """Register ``"dfa"``, the ``"dfa_ddp*"``, ``"dfa_fsdp*"`` names and ``"dfa_model_parallel"`` (idempotent)."""
    if "dfa" not in registry:
        registry.register("dfa", DFAStrategy, description="Direct Feedback Alignment on one device")
    DFADDPStrategy.register_strategies(registry)
    DFAFSDPStrategy.register_strategies(registry)
    if "dfa_model_parallel" not in registry:
        registry.register("dfa_model_parallel", DFAModelParallelStrategy, description="DFA over FSDP2")
