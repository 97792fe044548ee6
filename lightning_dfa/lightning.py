"""The DFA classes for ``lightning.pytorch`` (the ``lightning`` package), which has its own class hierarchy.

Example::

    import lightning.pytorch as L
    from lightning_dfa.lightning import DFA, DFAStrategy

    trainer = L.Trainer(strategy=DFAStrategy(seed=3))        # or simply L.Trainer(strategy="dfa")
    trainer = L.Trainer(strategy="ddp", callbacks=[DFA()])
"""

from .adapters.lightning import DFA, DFADDPStrategy, DFAFSDPStrategy, DFAModelParallelStrategy, DFAStrategy
from .alignment import LightningAlignmentMonitor as AlignmentMonitor

__all__ = [
    "DFA",
    "AlignmentMonitor",
    "DFADDPStrategy",
    "DFAFSDPStrategy",
    "DFAModelParallelStrategy",
    "DFAStrategy",
]
