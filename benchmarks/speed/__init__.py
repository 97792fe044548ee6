"""Speed and memory of a DFA training step against backprop, with the FLOP limit beside each ratio.

Usage (from the repository root; ``--help`` lists every option)::

    python -m benchmarks.speed                         # the CPU ladder -> benchmarks/results/speed_<device>.json
    python -m benchmarks.speed --models gpt2-v8k       # some models
    python -m benchmarks.speed --lm                    # learning with the top-k projection vs dense (LM example)
    python -m benchmarks.speed --render                # docs/performance.md's tables from the stored JSON
    python -m benchmarks.speed --quick --out /tmp/x    # smoke run: tiny models, a few steps
    python -m benchmarks.speed --malloc system ...     # CPU: glibc's default allocator behaviour

The modules: :mod:`~benchmarks.speed.cases` (the models and their DFA arms), :mod:`~benchmarks.speed.measure`
(timing, peak memory, FLOP count; the method is in its docstring), :mod:`~benchmarks.speed.machine` (what ran
the benchmark, and the CPU allocator setting), :mod:`~benchmarks.speed.learning` (the learning check of the
cheaper projections), :mod:`~benchmarks.speed.render` (the tables of ``docs/performance.md``) and
:mod:`~benchmarks.speed.cli` (the command line).
"""

from benchmarks.speed.cases import Case, gpt2_arms, ladder
from benchmarks.speed.cli import main
from benchmarks.speed.learning import LM_ARMS, WORD_ARMS, lm_runs, word_lm_runs
from benchmarks.speed.machine import KEEP_MALLOC_ENV, machine, malloc_setting
from benchmarks.speed.measure import run_case
from benchmarks.speed.render import DOC, RESULTS, ROOT, render, write_doc

__all__ = [
    "DOC",
    "KEEP_MALLOC_ENV",
    "LM_ARMS",
    "RESULTS",
    "ROOT",
    "WORD_ARMS",
    "Case",
    "gpt2_arms",
    "ladder",
    "lm_runs",
    "machine",
    "main",
    "malloc_setting",
    "render",
    "run_case",
    "word_lm_runs",
    "write_doc",
]
