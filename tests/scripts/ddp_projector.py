"""Train the MLP of ``ddp_train.py`` over 2-process DDP (CPU, gloo) with the simulated optical projector, each
process on its half of every batch; used by ``tests/test_projectors.py``.

``python tests/scripts/ddp_projector.py OUT_DIR`` starts rank 0; Lightning's ``popen`` launcher starts rank 1.
Each process writes ``OUT_DIR/optical.rank<r>.pt`` (final weights, hashes of the delivered feedback).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ddp_train  # noqa: E402  (puts the repository first on the path)

import lightning_dfa  # noqa: E402
from lightning_dfa.projectors import Optical  # noqa: E402

#: a camera with 6 bits and read noise: the noise must be the same for a row wherever it is computed
PROJECTOR = Optical(bits=6, snr_db=20.0)


def main(out: Path) -> None:
    strategy = lightning_dfa.DFADDPStrategy(projector=PROJECTOR, verbose=False)
    _, trainer = ddp_train.train(strategy, devices=2, rank="half", record=str(out / "optical"))
    launched = getattr(getattr(trainer.strategy, "_launcher", None), "procs", [])
    for proc in launched:
        proc.wait()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
