"""lightning-dfa: train an unchanged Lightning model with Direct Feedback Alignment.

Example::

    import pytorch_lightning as pl
    import lightning_dfa  # registers the strategy names "dfa", "dfa_ddp", "dfa_fsdp", ...

    trainer = pl.Trainer(strategy="dfa", max_epochs=3)
    trainer.fit(model)  # any LightningModule
"""

from __future__ import annotations

import importlib
import importlib.util

from .adapters.pytorch_lightning import DFA, DFADDPStrategy, DFAFSDPStrategy, DFAModelParallelStrategy, DFAStrategy
from .adapters.pytorch_lightning import register as _register_pl
from .alignment import AlignmentMonitor
from .config import MODES, DFAConfig
from .discovery import Block, Target, discover
from .engine import FeedbackEngine
from .projectors import Projector
from .projectors.bank import DISTRIBUTIONS, FeedbackBank
from .registry import register_blocks, register_micro_points

__version__ = "0.1.0"

__all__ = [
    "AlignmentMonitor",
    "DFA",
    "DFAConfig",
    "DFADDPStrategy",
    "DFAFSDPStrategy",
    "DFAModelParallelStrategy",
    "DFAStrategy",
    "DISTRIBUTIONS",
    "MODES",
    "Projector",
    "Block",
    "FeedbackBank",
    "FeedbackEngine",
    "Target",
    "discover",
    "register_blocks",
    "register_micro_points",
]


def __getattr__(name: str) -> object:
    """``lightning_dfa.lightning`` (the classes for ``lightning.pytorch``) as an attribute, imported on first use."""
    if name == "lightning":
        return importlib.import_module(".lightning", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_register_pl()
if importlib.util.find_spec("lightning") is not None:  # the separate `lightning` package, if installed
    from .adapters.lightning import register as _register_lightning

    _register_lightning()
