"""The DFA mixins of the sharded strategies: Lightning's ``FSDPStrategy`` (FSDP1) and ``ModelParallelStrategy``
(FSDP2), sharded by the blocks DFA discovers (no Lightning import here)."""

from __future__ import annotations

from typing import Any

from torch import nn
from typing_extensions import override

from .. import sharding
from ..blocks import Target
from ..config import DFAConfig
from ..engine import FeedbackEngine
from .core import DFAFit


class DFAShardedMixin:
    """FSDP (``FSDPStrategy``) and FSDP2 (``ModelParallelStrategy``) with DFA: the blocks DFA discovers are the
    units that are sharded (and, with ``checkpoint_blocks=True``, activation-checkpointed), unless the user gave
    an ``auto_wrap_policy`` (FSDP) or sharded the model in ``configure_model`` (FSDP2). The engine attaches after
    sharding, to the outermost wrapper of each block, with the names of the plain model."""

    dfa: DFAFit
    _dfa_plain_target: Target | None = None

    def _dfa_sharding_init(self, checkpoint_blocks: bool) -> None:
        if not isinstance(checkpoint_blocks, bool):
            raise ValueError(f"DFA: checkpoint_blocks must be True or False, got {checkpoint_blocks!r}.")
        self.dfa_checkpoint_blocks = checkpoint_blocks

    @override
    def setup(self, trainer: Any) -> None:
        module = self.lightning_module  # type: ignore[attr-defined]
        probe = FeedbackEngine(DFAConfig(**vars(self.dfa.config)))
        self._dfa_plain_target = probe.attach(module)  # the blocks of the plain model (configure_dfa() included)
        probe.detach()
        self._dfa_shard(module, self._dfa_plain_target)
        super().setup(trainer)  # type: ignore[misc]

    def _dfa_shard(self, module: nn.Module, target: Target) -> None:
        raise NotImplementedError

    def _dfa_target(self) -> Target | None:
        assert self._dfa_plain_target is not None
        return sharding.outermost(self.lightning_module, self._dfa_plain_target)  # type: ignore[attr-defined]


class DFAFSDPMixin(DFAShardedMixin):
    """Lightning's ``FSDPStrategy`` (FSDP1): the blocks as the auto-wrap policy and checkpointing policy."""

    kwargs: dict[str, Any]
    _activation_checkpointing_kwargs: dict[str, Any]

    def _dfa_shard(self, module: nn.Module, target: Target) -> None:
        self.kwargs.setdefault("auto_wrap_policy", sharding.fsdp_auto_wrap_policy(target))
        if self.dfa_checkpoint_blocks and not self._activation_checkpointing_kwargs:
            self._activation_checkpointing_kwargs = {"check_fn": sharding.checkpoint_check_fn(target)}

    @override
    def setup_environment(self) -> None:
        device = self.root_device  # type: ignore[attr-defined]
        if device.type == "cpu":
            raise ValueError(
                "DFA: strategy 'dfa_fsdp' runs Lightning's FSDPStrategy, which requires a GPU accelerator, but the "
                "Trainer gives the CPU. Set Trainer(accelerator='gpu'); on CPU use strategy='dfa_model_parallel' "
                "(FSDP2) or 'dfa_ddp'."
            )
        super().setup_environment()  # type: ignore[misc]

    @override
    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        for name, offload in (("dfa_fsdp", False), ("dfa_fsdp_cpu_offload", True)):
            if name not in strategy_registry:
                what = "FSDP full shard" + (" with CPU offload" if offload else "")
                strategy_registry.register(name, cls, description=f"DFA over {what}", cpu_offload=offload)
            registered = cls._registered_strategies  # type: ignore[attr-defined]
            if name not in registered:  # Lightning then asks for a GPU accelerator, as for "fsdp"
                registered.append(name)


class DFAModelParallelMixin(DFAShardedMixin):
    """Lightning's ``ModelParallelStrategy`` (FSDP2): a model that ``configure_model`` built but did not shard is
    sharded per block with ``fully_shard`` over the data-parallel mesh (``mp_policy``/``offload_policy`` passed on)."""

    device_mesh: Any
    _dfa_fully_shard_kwargs: dict[str, Any]
    _data_parallel_size: Any
    _tensor_parallel_size: Any

    @override
    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto" and self._tensor_parallel_size == "auto":
            # DFA shards by data parallelism (FSDP2 over every process); Lightning's "auto" would give tensor
            # parallelism within a node, which the blocks alone do not set up
            self._tensor_parallel_size = 1
            self._data_parallel_size = self.num_nodes * self.num_processes  # type: ignore[attr-defined]
        super().setup_environment()  # type: ignore[misc]

    def _dfa_shard(self, module: nn.Module, target: Target) -> None:
        from torch.distributed.tensor import DTensor

        if any(isinstance(p, DTensor) for p in module.parameters()):
            if self.dfa_checkpoint_blocks:
                raise ValueError(
                    "DFA: checkpoint_blocks=True checkpoints the blocks while DFA shards them, but configure_model() "
                    "sharded the model itself. Apply activation checkpointing there, or leave the sharding to DFA."
                )
            return  # sharded (or tensor-parallel) in configure_model(): kept as it is
        kwargs = {"mesh": self.device_mesh["data_parallel"], **self._dfa_fully_shard_kwargs}
        sharding.shard_blocks(module, target, checkpoint=self.dfa_checkpoint_blocks, **kwargs)
