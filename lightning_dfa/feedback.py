"""The fixed random feedback matrices, now in :mod:`lightning_dfa.projectors.random` (kept importable here)."""

from .projectors.random import (  # noqa: F401
    DISTRIBUTIONS,
    SKETCH_MIN_RATIO,
    SKETCH_RANK,
    FeedbackBank,
    check_bank_state,
    draw,
    hashed_matrix,
    hashed_uniform,
    uses_sketch,
)
