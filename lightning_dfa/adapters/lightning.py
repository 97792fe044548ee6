"""The DFA strategies and callback for ``lightning.pytorch`` (see ``pytorch_lightning.py`` for ``pytorch_lightning``),
built by :func:`.classes.define`."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import (
    DDPStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    StrategyRegistry,
)
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from .classes import Flavour, define

_built = define(
    Flavour(
        __name__,
        "lightning.pytorch",
        Callback,
        SingleDeviceStrategy,
        DDPStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
        StrategyRegistry,
        rank_zero_info,
    )
)
DFAStrategy = _built.DFAStrategy
DFADDPStrategy = _built.DFADDPStrategy
DFAFSDPStrategy = _built.DFAFSDPStrategy
DFAModelParallelStrategy = _built.DFAModelParallelStrategy
DFA = _built.DFA
register = _built.register

__all__ = ["DFA", "DFADDPStrategy", "DFAFSDPStrategy", "DFAModelParallelStrategy", "DFAStrategy", "register"]
