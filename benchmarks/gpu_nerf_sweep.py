"""NeRF sweep on a GPU: does a wider MLP or a longer budget close DFA's gap? Each variant is
``benchmarks.quality.fit_arm`` on the procedural scene with ``accelerator="gpu"``, one process per variant
(results: ``benchmarks/results/gpu_nerf_sweep_h100.jsonl``).

Usage: ``python -m benchmarks.gpu_nerf_sweep NAME ARM WIDTH STEPS`` (one variant), printing one JSON line.
"""

from __future__ import annotations

import json
import sys
import time

from benchmarks.domains.nerf import BUDGET
from benchmarks.quality import fit_arm
from examples.nerf import NeRF, SceneDataModule


def main() -> None:
    """Train one variant and print its test PSNR and validation curve."""
    name, arm, width, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    data = SceneDataModule(size=BUDGET["size"], batch_size=BUDGET["batch_size"], seed=0)
    data.setup()
    t0 = time.time()
    res = fit_arm(lambda dm: NeRF(lr=5e-3, width=width, n_samples=BUDGET["n_samples"]), lambda: data, arm,
                  seed=0, max_steps=steps, curve_metric="val_psnr", test_metrics=("test_psnr",),
                  trainer_options={"accelerator": "gpu", "check_val_every_n_epoch": max(1, steps // 1000)})  # fmt: skip
    print(json.dumps({"name": name, "arm": arm, "width": width, "steps": steps, "test_psnr": res["metrics"],
                      "curve": [[int(s), round(v, 2)] for s, v in res["curve"]], "s": round(time.time() - t0)}),
          flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
