"""``dfa_model_parallel`` (Lightning's ModelParallelStrategy, FSDP2) on 2 CPU processes with gloo:
``python lightning_fsdp2.py OUT MODEL`` (``mlp`` or ``llama``) trains 2 epochs straight, then 1 epoch, a sharded
checkpoint, and a resume from it into a model built from another seed, then 2 epochs with Lightning's own
``ModelParallelStrategy`` (the model sharded by its blocks in ``configure_model``) and the ``DFA`` callback; rank 0
writes the runs' full final weights and the checkpoint's feedback state to ``OUT/<MODEL>.pt``. Lightning's popen
launcher runs this script again for rank 1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
import fsdp_engine  # noqa: E402

import lightning_dfa  # noqa: E402  (registers "dfa_model_parallel")
from lightning_dfa import discover  # noqa: E402
from lightning_dfa.sharding import shard_blocks  # noqa: E402


class Model(pl.LightningModule):
    """Builds its network in ``configure_model`` (as Lightning's ModelParallelStrategy asks) and leaves the sharding
    to the strategy."""

    def __init__(self, kind: str, seed: int, shard: bool = False) -> None:
        super().__init__()
        self.kind, self.seed, self.shard = kind, seed, shard
        self.net: torch.nn.Module | None = None

    def configure_model(self) -> None:
        if self.net is None:
            self.net = fsdp_engine.build(self.kind, self.seed)
            if self.shard:  # sharded here, as for Lightning's own ModelParallelStrategy
                shard_blocks(self.net, discover(self.net), mesh=self.device_mesh["data_parallel"])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return fsdp_engine.loss_of(self.kind, self.net, *batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader:
        """Each global batch of :mod:`fsdp_engine` split in halves, one per process, in order."""
        world, rank = self.trainer.world_size, self.trainer.global_rank
        size = fsdp_engine.BATCH // world
        keep = [i for i in range(fsdp_engine.BATCH * fsdp_engine.STEPS) if (i // size) % world == rank]
        return DataLoader(Subset(dataset(self.kind), keep), batch_size=size)


def dataset(kind: str) -> TensorDataset:
    batches = fsdp_engine.data(kind)  # 4 global batches of 8
    return TensorDataset(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))


def fit(
    kind: str, epochs: int, strategy: Any, devices: int, seed: int = 0, ckpt: Any = None, callbacks: Any = None
) -> pl.Trainer:
    trainer = pl.Trainer(
        callbacks=callbacks,
        strategy=strategy,
        accelerator="cpu",
        devices=devices,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(Model(kind, seed, shard=bool(callbacks)), ckpt_path=ckpt)
    return trainer


def full_weights(trainer: pl.Trainer) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {k: v.clone() for k, v in get_model_state_dict(trainer.lightning_module, options=options).items()}


if __name__ == "__main__":
    out, kind = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    straight = full_weights(fit(kind, 2, "dfa_model_parallel", 2))
    first = fit(kind, 1, "dfa_model_parallel", 2)
    first.save_checkpoint(out / f"{kind}.ckpt")
    resumed = full_weights(fit(kind, 2, "dfa_model_parallel", 2, seed=7, ckpt=out / f"{kind}.ckpt"))
    plain = pl.strategies.ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    callback = full_weights(fit(kind, 2, plain, 2, callbacks=[lightning_dfa.DFA(verbose=False)]))
    if first.global_rank == 0:
        meta = torch.load(out / f"{kind}.ckpt" / "meta.pt", weights_only=False)
        runs = {"straight": straight, "resumed": resumed, "callback": callback}
        torch.save({**runs, "dfa": meta.get("dfa")}, out / f"{kind}.pt")
    if torch.distributed.is_initialized():  # leave no gloo thread running at interpreter exit
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    # done and written: leave without the interpreter's teardown, where a gloo thread still being destroyed has
    # (rarely) aborted the process with "terminate called without an active exception" after all work was done
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
