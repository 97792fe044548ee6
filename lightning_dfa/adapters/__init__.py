"""Thin Lightning adapters over :class:`lightning_dfa.engine.FeedbackEngine`.

``core`` holds the flavour-agnostic logic as mixins; ``pytorch_lightning`` and ``lightning`` define the
concrete classes for the two Lightning packages (each has its own classes and strategy registry).
"""
