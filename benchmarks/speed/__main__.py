"""``python -m benchmarks.speed``: see :mod:`benchmarks.speed.cli`."""

import sys

from benchmarks.speed.cli import main

sys.exit(main())
