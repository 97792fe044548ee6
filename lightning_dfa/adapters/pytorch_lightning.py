"""The DFA strategies and callback for ``pytorch_lightning`` (see ``lightning.py`` for ``lightning.pytorch``),
built by :func:`.classes.define`."""

from __future__ import annotations

from pytorch_lightning.callbacks import Callback
from pytorch_lightning.strategies import (
    DDPStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    StrategyRegistry,
)
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from .classes import Flavour, define

_built = define(
    Flavour(
        __name__,
        "pytorch_lightning",
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
