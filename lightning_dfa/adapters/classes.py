"""The DFA strategies and callback, written once and built for each Lightning package.

``pytorch_lightning`` and ``lightning.pytorch`` have separate class hierarchies and strategy registries, so each
gets its own classes: :func:`define` builds them from a :class:`Flavour` (that package's base classes). The logic
lives in the mixins of :mod:`.core`; the classes here only spell out their options, so that LightningCLI and
``help()`` show every one of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Optional, Union

import torch

from ..projectors import Projector
from .core import DFACallbackMixin, DFADDPMixin, DFASingleDeviceMixin, DFAStrategyMixin, make_config
from .sharded import DFAFSDPMixin, DFAModelParallelMixin

Blocks = Optional[Union[str, list[str]]]
Outputs = Optional[Union[str, list[str]]]
Transform = Optional[Callable[[str, torch.Tensor], torch.Tensor]]


@dataclass(frozen=True)
class Flavour:
    """One Lightning package: the module the classes are published in and the base classes they extend."""

    module: str
    package: str
    Callback: type
    SingleDeviceStrategy: type
    DDPStrategy: type
    FSDPStrategy: type
    ModelParallelStrategy: type
    registry: Any
    info: Callable[[str], Any]


def define(flavour: Flavour) -> SimpleNamespace:
    """The classes ``DFAStrategy``, ``DFADDPStrategy``, ``DFAFSDPStrategy``, ``DFAModelParallelStrategy``, ``DFA``
    and the function ``register`` for one Lightning package (published under ``flavour.module``)."""
    f = flavour

    class DFAStrategy(DFASingleDeviceMixin, DFAStrategyMixin, f.SingleDeviceStrategy):
        """Train on one device with Direct Feedback Alignment; registered as ``"dfa"``.

        The device comes from the Trainer (``accelerator``/``devices``); for several devices use ``"dfa_ddp"``.
        Options are those of :class:`lightning_dfa.DFAConfig`.

        Example::

            import lightning_dfa  # registers "dfa", "dfa_ddp", ...
            trainer = Trainer(strategy="dfa")
            trainer = Trainer(strategy=lightning_dfa.DFAStrategy(mode="shallow", seed=3))
        """

        strategy_name = "dfa"
        _dfa_info = staticmethod(f.info)

        def __init__(
            self,
            mode: str = "dfa",
            blocks: Blocks = None,
            output: Outputs = None,
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
            cut_token_embedding: Optional[bool] = None,
            tables_from_first_block: Optional[bool] = None,
            encoder_from_decoder: Optional[bool] = None,
            pooled_channels: Optional[bool] = None,
            positionwise_maps: Optional[bool] = None,
            spread_read_token: Optional[bool] = None,
            topk: Optional[int] = None,
            sketch: Optional[bool] = None,
            projector: Optional[Projector] = None,
            feedback_transform: Transform = None,
            feedback_learning: Optional[str] = None,
            feedback_decay: float = 0.01,
            verbose: bool = True,
            device: Optional[Union[str, torch.device]] = None,
            **kwargs: Any,
        ) -> None:
            super().__init__(device=torch.device(device) if device is not None else "cpu", **kwargs)
            self._dfa_init(make_config(locals()), verbose)
            self._dfa_devices = [torch.device(device)] if device is not None else None

    class DFADDPStrategy(DFADDPMixin, DFAStrategyMixin, f.DDPStrategy):
        """Lightning's DDP with Direct Feedback Alignment; registered as ``"dfa_ddp"`` (and ``_spawn``/``_fork``/
        ``_notebook``). Every DDP keyword argument (``find_unused_parameters``, ``static_graph``...) is forwarded.
        ``"dfa_ddp_find_unused_parameters_true"`` (and its ``_spawn``/``_fork``/``_notebook`` variants) sets
        ``find_unused_parameters=True``, which ``mode="shallow"`` needs (its blocks get no gradient).

        Example::

            trainer = Trainer(strategy="dfa_ddp", devices=2, accelerator="cpu")
        """

        strategy_name = "dfa_ddp"
        _dfa_info = staticmethod(f.info)

        def __init__(
            self,
            mode: str = "dfa",
            blocks: Blocks = None,
            output: Outputs = None,
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
            cut_token_embedding: Optional[bool] = None,
            tables_from_first_block: Optional[bool] = None,
            encoder_from_decoder: Optional[bool] = None,
            pooled_channels: Optional[bool] = None,
            positionwise_maps: Optional[bool] = None,
            spread_read_token: Optional[bool] = None,
            topk: Optional[int] = None,
            sketch: Optional[bool] = None,
            projector: Optional[Projector] = None,
            feedback_transform: Transform = None,
            feedback_learning: Optional[str] = None,
            feedback_decay: float = 0.01,
            verbose: bool = True,
            **kwargs: Any,
        ) -> None:
            super().__init__(**kwargs)
            self._dfa_init(make_config(locals()), verbose)

    class DFAFSDPStrategy(DFAFSDPMixin, DFAStrategyMixin, f.FSDPStrategy):
        """Lightning's FSDP (needs a GPU) with Direct Feedback Alignment; registered as ``"dfa_fsdp"`` and
        ``"dfa_fsdp_cpu_offload"``. Each discovered block is an FSDP unit (unless ``auto_wrap_policy`` is given);
        ``checkpoint_blocks=True`` checkpoints each block's activations. Every ``FSDPStrategy`` keyword argument
        (``mixed_precision``, ``sharding_strategy``, ``state_dict_type="sharded"``, ``cpu_offload``...) is
        forwarded; a checkpoint, sharded or full, carries the feedback state under ``"dfa"``.

        Example::

            trainer = Trainer(strategy="dfa_fsdp", accelerator="gpu", devices=8, precision="bf16-mixed")
            trainer = Trainer(strategy=lightning_dfa.DFAFSDPStrategy(checkpoint_blocks=True))
        """

        strategy_name = "dfa_fsdp"
        _dfa_info = staticmethod(f.info)

        def __init__(
            self,
            mode: str = "dfa",
            blocks: Blocks = None,
            output: Outputs = None,
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
            cut_token_embedding: Optional[bool] = None,
            tables_from_first_block: Optional[bool] = None,
            encoder_from_decoder: Optional[bool] = None,
            pooled_channels: Optional[bool] = None,
            positionwise_maps: Optional[bool] = None,
            spread_read_token: Optional[bool] = None,
            topk: Optional[int] = None,
            sketch: Optional[bool] = None,
            projector: Optional[Projector] = None,
            feedback_transform: Transform = None,
            feedback_learning: Optional[str] = None,
            feedback_decay: float = 0.01,
            verbose: bool = True,
            checkpoint_blocks: bool = False,
            **kwargs: Any,
        ) -> None:
            super().__init__(**kwargs)
            self._dfa_init(make_config(locals()), verbose)
            self._dfa_sharding_init(checkpoint_blocks)

    class DFAModelParallelStrategy(DFAModelParallelMixin, DFAStrategyMixin, f.ModelParallelStrategy):
        """Lightning's ``ModelParallelStrategy`` (FSDP2; also on CPU with gloo) with Direct Feedback Alignment;
        registered as ``"dfa_model_parallel"``. Lightning requires a ``configure_model()`` hook; if it builds the
        model without sharding it, each discovered block is sharded with ``fully_shard`` (``mp_policy``,
        ``offload_policy``: FSDP2's mixed-precision and offload policies) and ``checkpoint_blocks=True`` checkpoints
        each block's activations. The other ``ModelParallelStrategy`` keyword arguments are forwarded; a checkpoint
        carries the feedback state.

        Example::

            trainer = Trainer(strategy="dfa_model_parallel", devices=2, accelerator="cpu")
        """

        strategy_name = "dfa_model_parallel"
        _dfa_info = staticmethod(f.info)

        def __init__(
            self,
            mode: str = "dfa",
            blocks: Blocks = None,
            output: Outputs = None,
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
            cut_token_embedding: Optional[bool] = None,
            tables_from_first_block: Optional[bool] = None,
            encoder_from_decoder: Optional[bool] = None,
            pooled_channels: Optional[bool] = None,
            positionwise_maps: Optional[bool] = None,
            spread_read_token: Optional[bool] = None,
            topk: Optional[int] = None,
            sketch: Optional[bool] = None,
            projector: Optional[Projector] = None,
            feedback_transform: Transform = None,
            feedback_learning: Optional[str] = None,
            feedback_decay: float = 0.01,
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

    class DFA(DFACallbackMixin, f.Callback):
        """Direct Feedback Alignment as a callback, composable with the single-device strategies, DDP, FSDP and
        ``ModelParallelStrategy`` (other strategies, such as DeepSpeed, are refused in ``setup``). Under FSDP the
        engine attaches to the wrapped model: prefer ``"dfa_fsdp"``/``"dfa_model_parallel"``, which shard by the
        blocks.

        Example::

            trainer = Trainer(strategy="ddp", devices=2, callbacks=[lightning_dfa.DFA(seed=1)])
        """

        _dfa_supported_strategies = (f.SingleDeviceStrategy, f.DDPStrategy, f.FSDPStrategy, f.ModelParallelStrategy)
        _dfa_info = staticmethod(f.info)

        def __init__(
            self,
            mode: str = "dfa",
            blocks: Blocks = None,
            output: Outputs = None,
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
            cut_token_embedding: Optional[bool] = None,
            tables_from_first_block: Optional[bool] = None,
            encoder_from_decoder: Optional[bool] = None,
            pooled_channels: Optional[bool] = None,
            positionwise_maps: Optional[bool] = None,
            spread_read_token: Optional[bool] = None,
            topk: Optional[int] = None,
            sketch: Optional[bool] = None,
            projector: Optional[Projector] = None,
            feedback_transform: Transform = None,
            feedback_learning: Optional[str] = None,
            feedback_decay: float = 0.01,
            verbose: bool = True,
        ) -> None:
            super().__init__()
            self._dfa_init(make_config(locals()), verbose)

    def register(registry: Any = f.registry) -> None:
        """Register ``"dfa"``, the ``"dfa_ddp*"`` and ``"dfa_fsdp*"`` names and ``"dfa_model_parallel"``
        (idempotent)."""
        if "dfa" not in registry:
            registry.register("dfa", DFAStrategy, description="Direct Feedback Alignment on one device")
        DFADDPStrategy.register_strategies(registry)
        DFAFSDPStrategy.register_strategies(registry)
        if "dfa_model_parallel" not in registry:
            registry.register("dfa_model_parallel", DFAModelParallelStrategy, description="DFA over FSDP2")

    built = SimpleNamespace(
        DFAStrategy=DFAStrategy,
        DFADDPStrategy=DFADDPStrategy,
        DFAFSDPStrategy=DFAFSDPStrategy,
        DFAModelParallelStrategy=DFAModelParallelStrategy,
        DFA=DFA,
        register=register,
    )
    for name, obj in vars(built).items():  # importable (picklable, as DDP's spawn needs) from the flavour's module
        obj.__module__ = f.module
        obj.__qualname__ = name
    return built
