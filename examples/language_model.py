"""Character-level GPT-2 (or Llama) on Jane Austen's novels: an ordinary LightningModule + LightningDataModule.

Nothing here knows about DFA: the training method is chosen by the Trainer's strategy only::

    python -m examples.language_model fit --trainer.strategy=auto            # backprop
    python -m examples.language_model fit --trainer.strategy=dfa             # Direct Feedback Alignment
    python -m examples.language_model fit --trainer.strategy=lightning_dfa.DFAStrategy \\
        --trainer.strategy.mode=shallow                                     # only the head learns

Other DFA options: ``--trainer.strategy=lightning_dfa.DFAStrategy --trainer.strategy.placement=micro``,
``--trainer.strategy.error_at=head_input`` (the paper's language-model setting), ``--trainer.strategy.distinct=true``
(see ``lightning_dfa.DFAConfig``). Measurements: ``docs/results_language_model.md``. ``python -m examples.demo``
trains the three arms side by side.

The model is a Hugging Face GPT-2 built from a config (no pretrained weights, untied vocabulary projection as
in the DFA paper), over a fixed 97-character alphabet; ``--model.arch=llama`` builds a Llama-style model of about
the same size instead (RMSNorm, rotary positions, SwiGLU). Data: the five other novels for training (their last
``val_fraction`` for validation) and Persuasion as the test set, from the Debian package ``r-cran-janeaustenr``
(see :mod:`examples.data.austen`). At the end of ``fit`` the :class:`AustenReport` callback evaluates bits per
character on Persuasion, prints them next to the unigram/bigram/trigram references computed on the same
split, and a few generated lines; its last line is the test bits/char and the data it was measured on.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from examples.data.austen import load_books, load_books_from, ngram_references, split_books

#: The alphabet: newline, printable ASCII and the pound sign (everything in the six novels).
VOCAB = "\n" + "".join(chr(i) for i in range(32, 127)) + "\u00a3"
_INDEX = {c: i for i, c in enumerate(VOCAB)}
_UNKNOWN = _INDEX["?"]
LN2 = math.log(2.0)


def encode(text: str) -> torch.Tensor:
    """Character ids (characters outside :data:`VOCAB` map to ``"?"``).

    Example:
        >>> decode(encode("Anne\\n"))
        'Anne\\n'
    """
    return torch.tensor([_INDEX.get(c, _UNKNOWN) for c in text], dtype=torch.long)


def decode(ids: Any) -> str:
    """Text from character ids."""
    return "".join(VOCAB[int(i)] for i in ids)


class RandomWindows(Dataset):
    """Every window of ``block_size + 1`` characters of ``ids`` (shuffle it in the DataLoader): ``(x, y)`` pairs."""

    def __init__(self, ids: torch.Tensor, block_size: int) -> None:
        if len(ids) <= block_size + 1:
            raise ValueError(f"Text of {len(ids)} characters is too short for windows of {block_size + 1}.")
        self.ids, self.block_size = ids, block_size

    def __len__(self) -> int:
        return len(self.ids) - self.block_size - 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.ids[i : i + self.block_size + 1]
        return chunk[:-1], chunk[1:]


class ConsecutiveWindows(Dataset):
    """Non-overlapping windows covering ``ids`` once (evaluation: every character after the first is scored)."""

    def __init__(self, ids: torch.Tensor, block_size: int) -> None:
        self.ids, self.block_size = ids, block_size
        self.n = max(1, math.ceil((len(ids) - 1) / block_size))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = i * self.block_size
        chunk = self.ids[start : start + self.block_size + 1]
        x, y = chunk[:-1], chunk[1:]
        pad = self.block_size - len(x)
        if pad:  # the last window: pad, and ignore the padding in the loss
            x = torch.cat([x, x.new_zeros(pad)])
            y = torch.cat([y, y.new_full((pad,), -100)])
        return x, y


class AustenDataModule(pl.LightningDataModule):
    """Jane Austen's novels, character level: train/validation from five novels, Persuasion for test.

    Args:
        source: ``"auto"`` (Debian package, else a synthetic corpus with a warning), ``"debian"``,
            ``"gutenberg"`` (online) or ``"synthetic"`` (tests); see :mod:`examples.data.austen`.
        cache_dir: where downloads are kept (default ``$LIGHTNING_DFA_DATA`` or ``~/.cache/lightning_dfa``).
        block_size: characters per training window (the model's context).
        batch_size: windows per training batch.
        val_fraction: the last fraction of each training novel, held out for validation.
        test_chars: score only the first ``test_chars`` characters of Persuasion (``None``: all of it, about
            470,000, which takes minutes on a CPU); the documented results use the first 50,000.
        eval_batch_size: windows per validation/test batch.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        source: str = "auto",
        cache_dir: Optional[str] = None,
        block_size: int = 64,
        batch_size: int = 32,
        val_fraction: float = 0.02,
        test_chars: Optional[int] = 50_000,
        eval_batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.texts: dict[str, Any] = {}
        self.source_used = ""

    def prepare_data(self) -> None:
        load_books(self.hparams.source, self.hparams.cache_dir)  # fetch once (cached)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.texts:
            return
        books, self.source_used = load_books_from(self.hparams.source, self.hparams.cache_dir)
        train_books, test = split_books(books)
        frac = self.hparams.val_fraction
        cuts = [len(b) - int(len(b) * frac) for b in train_books]
        train = "\n".join(b[:c] for b, c in zip(train_books, cuts))
        val = "\n".join(b[c:] for b, c in zip(train_books, cuts))
        if self.hparams.test_chars is not None:
            test = test[: self.hparams.test_chars]
        self.texts = {"train": train, "val": val, "test": test}
        self.ids = {k: encode(v) for k, v in self.texts.items()}

    def references(self) -> dict[str, float]:
        """n-gram bits/char on the test text, fitted on the training text (add-one smoothing)."""
        self.setup()
        if "refs" not in self.__dict__:
            self.refs = ngram_references(self.texts["train"], self.texts["test"])
        return self.refs

    def describe(self) -> str:
        """The test text in words, with the fallback if one was taken (for the example's last line)."""
        self.setup()
        what = {"debian": "Persuasion (Debian package r-cran-janeaustenr)", "gutenberg": "Persuasion (Gutenberg)"}
        name = what.get(self.source_used, "a SYNTHETIC test text")
        if self.source_used == "synthetic" and self.hparams.source == "auto":
            name += " (FALLBACK: Jane Austen's novels could not be fetched)"
        return f"the first {len(self.texts['test']):,} characters of {name}"

    def train_dataloader(self) -> DataLoader:
        ds = RandomWindows(self.ids["train"], self.hparams.block_size)
        return DataLoader(
            ds, batch_size=self.hparams.batch_size, shuffle=True, num_workers=self.hparams.num_workers, drop_last=True
        )

    def _eval_loader(self, split: str) -> DataLoader:
        ds = ConsecutiveWindows(self.ids[split], self.hparams.block_size)
        return DataLoader(ds, batch_size=self.hparams.eval_batch_size, num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")


#: The architectures :class:`CharGPT` builds.
ARCHS = ("gpt2", "llama")


class CharGPT(pl.LightningModule):
    """A character-level Hugging Face GPT-2 or Llama built from a config (random init); plain cross-entropy training.

    ``arch="gpt2"`` (default): ``GPT2LMHeadModel`` (LayerNorm, learned absolute positions, GELU MLP, biases).
    ``arch="llama"``: ``LlamaForCausalLM`` (RMSNorm, rotary positions, SwiGLU MLP, no biases) of about the same
    parameter count: the SwiGLU's three matrices of width ``intermediate_size`` (default ``8 n_embd / 3`` rounded
    up to a multiple of 8) hold what GPT-2's two matrices of width ``4 n_embd`` hold.

    Example:
        >>> m = CharGPT(arch="llama", n_layer=1, n_embd=32, n_head=2, block_size=16)
        >>> type(m.model).__name__, tuple(m(encode("Anne")[None]).shape)
        ('LlamaForCausalLM', (1, 4, 97))

    Args:
        n_layer, n_embd, n_head: model size (layers, width, attention heads).
        block_size: context length (``n_positions``).
        dropout: residual, embedding and attention dropout.
        lr: Adam(W) learning rate (after a linear warm-up of ``warmup_steps``: constant, or see ``lr_decay``).
        beta1, beta2: Adam betas.
        weight_decay: AdamW weight decay.
        warmup_steps: linear learning-rate warm-up.
        tie_embeddings: tie the vocabulary projection to the input embedding (the DFA paper used untied).
        lr_decay: ``"none"`` (default) or ``"cosine"``: a cosine decay to zero over the Trainer's budget
            (``trainer.estimated_stepping_batches``, i.e. ``max_steps`` or ``max_epochs``).
        arch: ``"gpt2"`` (default) or ``"llama"``.
        intermediate_size: the Llama MLP's width (``None``: ``8 n_embd / 3`` rounded up to a multiple of 8).
    """

    def __init__(
        self,
        n_layer: int = 4,
        n_embd: int = 128,
        n_head: int = 4,
        block_size: int = 64,
        dropout: float = 0.0,
        lr: float = 2e-3,
        beta1: float = 0.9,
        beta2: float = 0.99,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        tie_embeddings: bool = False,
        lr_decay: str = "none",
        arch: str = "gpt2",
        intermediate_size: Optional[int] = None,
    ) -> None:
        super().__init__()
        if lr_decay not in ("none", "cosine"):
            raise ValueError(f"CharGPT: lr_decay must be 'none' or 'cosine', got {lr_decay!r}.")
        if arch not in ARCHS:
            raise ValueError(f"CharGPT: arch must be one of {ARCHS}, got {arch!r}.")
        self.save_hyperparameters()
        if arch == "llama":
            self.model = _llama(n_layer, n_embd, n_head, block_size, dropout, tie_embeddings, intermediate_size)
            return
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=len(VOCAB),
            n_positions=block_size,
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
            tie_word_embeddings=tie_embeddings,
            bos_token_id=0,
            eos_token_id=0,
        )
        self.model = GPT2LMHeadModel(config)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, positions, vocab]``."""
        return self.model(input_ids=ids).logits

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> None:
        loss = self._loss(batch)
        n = int((batch[1] != -100).sum())
        self.log(f"{split}_loss", loss, batch_size=n, prog_bar=split == "val")
        self.log(f"{split}_bpc", loss / LN2, batch_size=n, prog_bar=split == "val")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, betas=(hp.beta1, hp.beta2), weight_decay=hp.weight_decay)
        decay = hp.get("lr_decay", "none")
        if not hp.warmup_steps and decay == "none":
            return opt
        total = max(1, int(self.trainer.estimated_stepping_batches)) if decay == "cosine" else 1

        def factor(step: int) -> float:
            warm = min(1.0, (step + 1) / hp.warmup_steps) if hp.warmup_steps else 1.0
            return warm * (0.5 * (1 + math.cos(math.pi * min(step, total) / total)) if decay == "cosine" else 1.0)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    @torch.no_grad()
    def evaluate(self, loader: DataLoader) -> float:
        """Mean cross-entropy (nats per character) over ``loader``, in eval mode, without gradients."""
        was_training = self.training
        self.eval()
        total, count = 0.0, 0
        for x, y in loader:
            x, y = x.to(self.device), y.to(self.device)
            logits = self(x)
            total += float(
                nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum", ignore_index=-100
                )
            )
            count += int((y != -100).sum())
        self.train(was_training)
        return total / max(count, 1)

    @torch.no_grad()
    def sample(self, prompt: str = "\n", n_chars: int = 300, temperature: float = 0.8, seed: int = 0) -> str:
        """Generate ``n_chars`` characters after ``prompt`` (temperature sampling, fixed seed)."""
        was_training = self.training
        self.eval()
        g = torch.Generator(device="cpu").manual_seed(seed)
        ids = encode(prompt or "\n").to(self.device)[None]
        block = self.hparams.block_size
        for _ in range(n_chars):
            logits = self(ids[:, -block:])[0, -1].float().cpu() / max(temperature, 1e-6)
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)
            ids = torch.cat([ids, nxt.to(self.device)[None]], dim=1)
        self.train(was_training)
        return decode(ids[0, len(prompt or "\n") :])


def _llama(
    n_layer: int,
    n_embd: int,
    n_head: int,
    block_size: int,
    dropout: float,
    tie_embeddings: bool,
    intermediate_size: Optional[int],
) -> nn.Module:
    """A character-level ``LlamaForCausalLM`` from a config (see :class:`CharGPT`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=n_embd,
        intermediate_size=intermediate_size or -(-8 * n_embd // 3 // 8) * 8,
        num_hidden_layers=n_layer,
        num_attention_heads=n_head,
        num_key_value_heads=n_head,
        max_position_embeddings=block_size,
        attention_dropout=dropout,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config)


class AustenReport(pl.Callback):
    """At the end of ``fit``: bits/char on the test novel next to the n-gram references, and generated lines.

    Args:
        test: evaluate on the test text (Persuasion) at the end of ``fit``.
        sample_chars: characters to generate (0: none).
        temperature: sampling temperature.
        echo: print the report when ``fit`` ends (else it is only kept in :attr:`report`, for a caller to print
            after the progress bar has finished, as the example's command line does).
    """

    def __init__(self, test: bool = True, sample_chars: int = 400, temperature: float = 0.8, echo: bool = True) -> None:
        super().__init__()
        self.test, self.sample_chars, self.temperature, self.echo = test, sample_chars, temperature, echo
        self.results: dict[str, float] = {}
        self.report = ""
        self._start = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or not isinstance(pl_module, CharGPT):
            return
        wall = time.perf_counter() - self._start
        dm = trainer.datamodule
        lines = [f"Trained {trainer.global_step} steps in {wall:.0f} s ({type(trainer.strategy).__name__})."]
        self.results = {"steps": trainer.global_step, "wall_s": wall}
        if self.sample_chars:
            text = pl_module.sample("\n", self.sample_chars, self.temperature)
            lines.append("Sample:\n" + "\n".join("    " + ln for ln in text.splitlines()[:8]))
        if self.test and isinstance(dm, AustenDataModule):
            loss = pl_module.evaluate(dm.test_dataloader())
            self.results.update(test_loss=loss, test_bpc=loss / LN2)
            refs = dm.references()
            lines.append(
                "References (add-one n-grams fitted on the training split): "
                + ", ".join(f"{k} {v:.2f}" for k, v in refs.items())
                + " bits/char"
            )
            lines.append(f"Test: {loss / LN2:.3f} bits/char ({loss:.3f} nats) on {dm.describe()}")
        self.report = "\n".join(lines)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.echo and trainer.is_global_zero and self.report:
            print(self.report, flush=True)


def main(args: Any = None) -> Any:
    """The LightningCLI entry point (``python -m examples.language_model --help``)."""
    from pytorch_lightning.cli import LightningCLI

    import lightning_dfa  # noqa: F401  (registers strategy="dfa"; the model itself knows nothing of DFA)

    class CLI(LightningCLI):
        def add_arguments_to_parser(self, parser: Any) -> None:
            parser.link_arguments("data.block_size", "model.block_size")

        def after_fit(self) -> None:
            # the report after the progress bar's last line, so that the test bits/char come last
            for callback in self.trainer.callbacks:
                if isinstance(callback, AustenReport) and callback.report and self.trainer.is_global_zero:
                    print(callback.report, flush=True)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return CLI(
        CharGPT,
        AustenDataModule,
        trainer_defaults={
            "max_steps": 2000,
            "max_epochs": 1,  # one pass is about 100,000 steps: max_steps ends the run (and the bar counts from 0/0)
            "val_check_interval": 500,
            "limit_val_batches": 10,
            "check_val_every_n_epoch": None,
            "callbacks": [AustenReport(echo=False)],
            "enable_checkpointing": False,
        },
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        args=args,
    )


if __name__ == "__main__":
    main()
