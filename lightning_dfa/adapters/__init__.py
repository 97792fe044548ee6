"""Thin Lightning adapters over :class:`lightning_dfa.engine.FeedbackEngine`.

``core`` (and ``sharded`` for FSDP) holds the logic as mixins that import no Lightning package; ``classes`` writes
the strategies and the callback once, and ``pytorch_lightning`` and ``lightning`` build them for each package
(each has its own classes and strategy registry).
"""
