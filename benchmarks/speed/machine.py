"""What ran a benchmark (:func:`machine`, the JSON's ``machine`` entry) and the CPU allocator setting.

CPU memory allocator (``--malloc``): PyTorch's CPU tensors come from the C library's ``malloc``. glibc's default
hands every block above its mmap threshold (at most 32 MiB; here the ``[batch*context, vocabulary]`` logits, their
softmax and their gradients: 206 MB each at vocabulary 50257) back to the OS when it is freed, so the next step
faults every page of it in again: about 270,000 page faults (~0.3-0.5 s) per step on the v50k shape, in both
arms. That is allocator work, not training work, and it dilutes every ratio. So a CPU run from the command line
re-runs itself with glibc told to keep freed memory for reuse (``--malloc keep``, the default:
``MALLOC_MMAP_MAX_=0``, ``MALLOC_TRIM_THRESHOLD_`` at 2**40), what PyTorch's CPU performance guide gets from
jemalloc/tcmalloc; ``--malloc system`` measures glibc's default. The JSON's ``machine.malloc`` says which setting
a run had; both arms of a run share it.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["KEEP_MALLOC_ENV", "machine", "malloc_setting", "reexec_with_kept_malloc", "write_cpu_rows"]

#: glibc ``malloc`` settings of ``--malloc keep``: never return freed blocks to the OS (no mmap, no trimming).
KEEP_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def malloc_setting() -> str:
    """``"keep"`` when this process runs under :data:`KEEP_MALLOC_ENV`, else ``"system"`` (the C library's)."""
    return "keep" if all(os.environ.get(k) == v for k, v in KEEP_MALLOC_ENV.items()) else "system"


def reexec_with_kept_malloc(argv: list[str]) -> None:
    """Replace this process by the same command under :data:`KEEP_MALLOC_ENV` (read by glibc at start-up).

    Without glibc (macOS, musl) the setting does not apply: the run goes on with the system allocator, and its
    JSON says so (``machine.malloc == "system"``).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        print(f"--malloc keep is a glibc setting; {platform.system()} runs with its own allocator", flush=True)
        return
    env = {**os.environ, **KEEP_MALLOC_ENV}
    print(f"re-running under {' '.join(f'{k}={v}' for k, v in KEEP_MALLOC_ENV.items())}", flush=True)
    command = list(getattr(sys, "orig_argv", [])) or [sys.executable, "-m", "benchmarks.speed", *argv]
    os.execve(sys.executable, command, env)  # the same interpreter flags and arguments as this process


def machine(dev: torch.device) -> dict[str, Any]:
    """What ran the benchmark: CPU model, cores, threads, load, torch version, GPU name."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(dev),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "malloc": malloc_setting(),
    }
    with contextlib.suppress(OSError):
        info["load_average_at_start"] = os.getloadavg()
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    return info


def write_cpu_rows(out: Path, rows: list[dict[str, Any]], started: float) -> dict[str, Any]:
    """Write ``{"machine": ..., "rows": rows}`` to ``out`` (a CPU run that began at ``started``, ``time.time()``)."""
    import json

    result = {"machine": {**machine(torch.device("cpu")), "seconds": round(time.time() - started, 1)}, "rows": rows}
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return result
