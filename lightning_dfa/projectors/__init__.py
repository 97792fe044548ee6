"""Feedback projectors: what computes the raw feedback ``B e`` from the output error.

Subclass :class:`Projector` (implement ``project(error, width)``) to plug in a device or a model of one, or
use a built-in:

* :class:`Dense` (the default), :class:`Sketch` (a structured matrix for wide errors; the ``"auto"`` recipe's
  choice), :class:`TopK` (the largest entries of each error row);
* :class:`Optical`, a simulated optical co-processor (binary/ternary input, holographic read-out, camera bits,
  noise);
* wrappers that compose with any projector: :class:`Ternarized`, :class:`Quantized`, :class:`Noisy`.

Example::

    from lightning_dfa import DFAStrategy
    from lightning_dfa.projectors import Noisy, Optical

    trainer = pytorch_lightning.Trainer(strategy=DFAStrategy(projector=Optical(bits=6)))
    trainer = pytorch_lightning.Trainer(strategy=DFAStrategy(projector=Noisy(Optical(), snr_db=10)))
"""

from .bank import FeedbackBank
from .base import Projector, Wrapper
from .optical import Optical
from .random import Dense, Sketch, TopK
from .wrappers import Noisy, Quantized, Ternarized

__all__ = [
    "Dense",
    "FeedbackBank",
    "Noisy",
    "Optical",
    "Projector",
    "Quantized",
    "Sketch",
    "Ternarized",
    "TopK",
    "Wrapper",
]
