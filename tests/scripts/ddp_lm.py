"""Train a tiny untied GPT-2 with DFA over DDP (CPU, gloo, 2 processes); used by ``tests/test_ddp.py``.

``python tests/scripts/ddp_lm.py OUT_DIR FLAVOUR`` (``strategy``: ``Trainer(strategy="dfa_ddp")``; ``callback``:
``Trainer(strategy="ddp", callbacks=[DFA()])``; ``pick``: ``dfa_ddp`` with a loss on the last position's logits
only, which every process finds in its first loss: ``spread_read_token``) starts rank 0; Lightning's ``popen``
launcher starts rank 1. The token embedding gets no feedback (``cut_token_embedding``): DDP must not wait for its
gradient. Each process writes ``OUT_DIR/<flavour>.rank<r>.pt`` with its initial and final weights and the outputs
its engine found read at one position.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import lightning_dfa  # noqa: E402

STEPS = 3


class TinyLM(pl.LightningModule):
    def __init__(self, pick: bool = False) -> None:
        super().__init__()
        self.pick = pick
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        torch.manual_seed(0)
        # no dropout: no random draws to line up across processes
        config = GPT2Config(vocab_size=20, n_embd=16, n_layer=2, n_head=2, n_positions=8, tie_word_embeddings=False,
                            bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0)  # fmt: skip
        self.model = GPT2LMHeadModel(config)
        self.initial = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        if self.pick:  # the last position's logits only: predict each sequence's first symbol there
            return torch.nn.functional.cross_entropy(self.model(input_ids=ids).logits[:, -1], ids[:, 0])
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)  # (Adam would magnify float noise in near-zero gradients)


def train(strategy: Any, callbacks: list, devices: int, pick: bool = False) -> TinyLM:
    model, _ = fit(strategy, callbacks, devices, pick)
    return model


def fit(strategy: Any, callbacks: list, devices: int, pick: bool = False) -> tuple[TinyLM, pl.Trainer]:
    model = TinyLM(pick)
    ids = torch.randint(0, 20, (4 * STEPS, 8), generator=torch.Generator().manual_seed(1))
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=devices, max_steps=STEPS, callbacks=callbacks,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False)  # fmt: skip
    trainer.fit(model, DataLoader(TensorDataset(ids), batch_size=4))
    return model, trainer


def main(out: Path, flavour: str) -> None:
    if flavour in ("strategy", "pick"):
        model, trainer = fit("dfa_ddp", [], 2, pick=flavour == "pick")
    else:
        model, trainer = fit("ddp", [lightning_dfa.DFA(verbose=False)], 2)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    engine = getattr(trainer.strategy, "dfa_engine", None) or trainer.callbacks[0].dfa_engine
    read = sorted(engine._read_outputs)
    torch.save(
        {"initial": model.initial, "final": model.model.state_dict(), "read": read}, out / f"{flavour}.rank{rank}.pt"
    )
    # rank 0 launched the other process: wait for it to write its weights, then close the process group before the
    # interpreter exits, as PyTorch asks of a script (without it, gloo's threads can abort the exit)
    for proc in getattr(getattr(trainer.strategy, "_launcher", None), "procs", []):
        proc.wait()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
