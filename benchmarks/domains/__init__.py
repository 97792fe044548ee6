"""One module per example domain for ``benchmarks/quality.py``: budgets, the quality runs, and the notes shown
with the domain's tables.

Each module exposes (see the contract in :mod:`benchmarks.quality`)::

    TITLE: str                 # page title, with the data set's name
    NOTE: str                  # markdown: data, model, budget (stored with the rows at run time)
    FINDINGS: str              # markdown: what the numbers show and what did not work (read when rendering)
    PARTS: tuple[str, ...]     # optional: independent pieces that ``--jobs`` may run as separate processes
    BEST_VALIDATION: bool      # optional: the tested weights are those of the best validation point
    def quality_runs(quick: bool, seed: int = 0, arms=("bp", "dfa", "shallow"), part=None) -> list[dict]

The examples (``examples/``) hold the models, the data and the command lines; they never import this package.
"""
