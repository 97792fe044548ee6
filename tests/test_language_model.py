"""The language-model example: data (parser, fallback, references) and a few steps of each arm (no network)."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import pytest
import pytorch_lightning as pl

import lightning_dfa
from examples.data import austen, debian
from examples.language_model import AustenDataModule, AustenReport, CharGPT, decode, encode, main

# ---------------------------------------------------------------------------------------------- a tiny R writer
_ASCII, _NIL = 64, 254


def _i(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def _charsxp(s: str) -> bytes:
    raw = s.encode()
    return _i(9 | (_ASCII << 12), len(raw)) + raw


def _strsxp(items: list[str]) -> bytes:
    return _i(16, len(items)) + b"".join(_charsxp(s) for s in items)


def _named_list(items: dict[str, bytes]) -> bytes:
    """A VECSXP with a ``names`` attribute (pairlist tagged with the symbol ``names``)."""
    body = _i(19 | (1 << 9), len(items)) + b"".join(items.values())
    attr = _i(2 | (1 << 10)) + _i(1) + _charsxp("names") + _strsxp(list(items)) + _i(_NIL)
    return body + attr


def _serialize(obj: bytes) -> bytes:
    return b"X\n" + _i(2, 0x040201, 0x020300) + obj


def write_lazyload(directory: Path, variables: dict[str, list[str]]) -> tuple[Path, Path]:
    """An R lazy-load database (``.rdx`` + ``.rdb``) of character vectors, as R writes it."""
    rdb, offsets = b"", {}
    for name, lines in variables.items():
        payload = _serialize(_strsxp(lines))
        chunk = struct.pack(">I", len(payload)) + zlib.compress(payload)
        offsets[name] = _i(13, 2, len(rdb), len(chunk))
        rdb += chunk
    index = _named_list({"variables": _named_list(offsets), "compressed": _i(10, 1, 1)})
    (directory / "Rdata.rdb").write_bytes(rdb)
    (directory / "Rdata.rdx").write_bytes(gzip.compress(_serialize(index)))
    return directory / "Rdata.rdx", directory / "Rdata.rdb"


# ---------------------------------------------------------------------------------------------- data
def test_read_lazyload_parses_r_database(tmp_path: Path) -> None:
    books = {name: [f"{name} line {k}" for k in range(3)] + ["", "It is a truth."] for name in austen.BOOKS}
    rdx, rdb = write_lazyload(tmp_path, books)
    assert austen.read_lazyload(rdx, rdb) == books


def test_load_debian_reads_cached_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "janeaustenr" / "usr" / "lib" / "R" / "site-library" / "janeaustenr" / "data"
    data.mkdir(parents=True)
    write_lazyload(data, {name: ["Chapter 1", "", name.title()] for name in austen.BOOKS})
    monkeypatch.setattr(debian.subprocess, "run", _no_subprocess)
    books = austen.load_books("debian", cache_dir=tmp_path)
    assert books["persuasion"] == "Chapter 1\n\nPersuasion"


def _no_subprocess(*args: object, **kwargs: object) -> None:
    raise AssertionError("no apt-get in tests")


def test_auto_falls_back_to_synthetic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable(cache_dir: object = None) -> Path:
        raise austen.DataUnavailable("no apt-get here")

    monkeypatch.setattr(austen, "fetch_debian", unavailable)
    with pytest.warns(UserWarning, match="SYNTHETIC"):
        books = austen.load_books("auto", cache_dir=tmp_path)
    assert books == austen.load_synthetic()
    with pytest.raises(austen.DataUnavailable, match="no apt-get"):
        austen.load_books("debian", cache_dir=tmp_path)


def test_gutenberg_fails_clearly_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("network unreachable")

    monkeypatch.setattr(austen.urllib.request, "urlopen", offline)
    with pytest.raises(austen.DataUnavailable, match="source='debian'"):
        austen.load_books("gutenberg", cache_dir=tmp_path)


def test_ngram_references_order() -> None:
    train, test = austen.split_books(austen.load_synthetic())
    refs = austen.ngram_references(train, test)
    assert refs["unigram"] > refs["bigram"] > refs["trigram"] > 0


def test_vocabulary_round_trip() -> None:
    text = "\n".join(austen.split_books(austen.load_synthetic())[0])[:2000] + " \u00a3"
    assert decode(encode(text)) == text
    assert decode(encode("caf\u00e9")) == "caf?"


# ---------------------------------------------------------------------------------------------- training smoke
TINY = dict(n_layer=2, n_embd=32, n_head=2, block_size=32)


def _fit(strategy: object, steps: int = 4) -> tuple[CharGPT, AustenDataModule, AustenReport, list[float]]:
    pl.seed_everything(0, verbose=False)
    dm = AustenDataModule(source="synthetic", block_size=32, batch_size=8, test_chars=1500, eval_batch_size=32)
    model = CharGPT(**TINY, lr=3e-3)
    report = AustenReport(sample_chars=20)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=strategy,
        max_steps=steps,
        limit_val_batches=1,
        val_check_interval=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[report],
    )
    before = [p.detach().clone() for p in model.model.transformer.h[0].parameters()]
    trainer.fit(model, datamodule=dm)
    moved = [float((p.detach() - b).abs().max()) for p, b in zip(model.model.transformer.h[0].parameters(), before)]
    return model, dm, report, moved


@pytest.mark.parametrize("arm", ["bp", "dfa", "shallow", "micro_head_input"])
def test_each_arm_trains(arm: str) -> None:
    strategy = {
        "bp": "auto",
        "dfa": "dfa",
        "shallow": lightning_dfa.DFAStrategy(mode="shallow", verbose=False),
        "micro_head_input": lightning_dfa.DFAStrategy(
            placement="micro", error_at="head_input", norm_jacobian=True, verbose=False
        ),
    }[arm]
    model, dm, report, moved = _fit(strategy)
    assert report.results["steps"] == 4
    assert 0 < report.results["test_bpc"] < 8
    if arm == "shallow":
        assert max(moved) == 0  # blocks frozen: only the head learns
    else:
        assert max(moved) > 0


def _tiny_fit_args(*extra: str) -> list[str]:
    """``python -m examples.language_model fit`` arguments for a 2-step DFA run of a tiny model on synthetic text."""
    return [
        "fit",
        "--data.source=synthetic",
        "--data.block_size=16",
        "--data.batch_size=4",
        "--data.test_chars=400",
        "--model.n_embd=16",
        "--model.n_head=2",
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.strategy=lightning_dfa.DFAStrategy",
        "--trainer.strategy.verbose=false",
        *extra,
    ]


def test_cli_fit_runs_with_dfa_strategy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # without a logger, LightningCLI writes config.yaml to the working directory
    cli = main(_tiny_fit_args("--model.n_layer=1", "--trainer.strategy.norm_jacobian=true"))
    assert cli.trainer.global_step == 2
    assert cli.trainer.strategy.dfa.config.norm_jacobian is True
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("Test: ") and "bits/char" in last and "SYNTHETIC" in last  # the metric and the data, last


def test_llama_arch_is_the_size_of_gpt2_and_trains_through_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = {a: sum(p.numel() for p in CharGPT(arch=a).parameters()) for a in ("gpt2", "llama")}
    assert abs(sizes["llama"] / sizes["gpt2"] - 1) < 0.03  # 0.82 M each (816,512 against 826,368)
    with pytest.raises(ValueError, match="arch"):
        CharGPT(arch="bert")
    monkeypatch.chdir(tmp_path)
    cli = main(
        _tiny_fit_args("--model.arch=llama", "--model.n_layer=2", "--trainer.strategy.feedback_learning=kolen_pollack")
    )
    assert type(cli.model.model).__name__ == "LlamaForCausalLM" and cli.trainer.global_step == 2
    engine = cli.trainer.strategy.dfa.engine
    # (the token embedding gets no feedback, so the first block's input and first norm are no points)
    assert {"model.model.layers.0", "model.model.layers.1.input_layernorm"} <= set(engine.learned.matrices)


def test_fallback_to_the_synthetic_text_is_said(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable(cache_dir=None):  # noqa: ANN001, ANN202
        raise austen.DataUnavailable("no package manager here")

    monkeypatch.setattr(austen, "fetch_debian", unavailable)
    with pytest.warns(UserWarning, match="SYNTHETIC"):
        dm = AustenDataModule(source="auto", cache_dir=str(tmp_path), test_chars=300)
        dm.setup()
    assert "FALLBACK" in dm.describe() and "300 characters" in dm.describe()


def test_demo_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from examples import demo

    results = demo.main(["--quick", "--steps", "4", "--json", str(tmp_path / "r.json")])
    assert [r["arm"] for r in results] == ["backprop", "dfa", "shallow"]
    assert all(r["steps"] == 4 and r["test_bpc"] > 0 for r in results)
    assert (tmp_path / "r.json").exists()
    out = capsys.readouterr().out
    # redirected output (not a terminal) still shows progress: a line per tenth of the run, with the step count
    for arm in ("backprop", "dfa", "shallow"):
        assert f"  {arm}: step 1/4, " in out and f"  {arm}: step 4/4, " in out
    assert "Epoch" not in out
    tail = out.strip().splitlines()[-10:]  # the results table ends the output
    assert tail[0].startswith("Test: the first 2,000 characters of a SYNTHETIC test text")
    assert [row.split("|")[1].strip() for row in tail[4:7]] == ["backprop", "dfa", "shallow"]


def test_quality_runs_follow_the_benchmark_contract() -> None:
    from benchmarks import quality
    from benchmarks.domains import language_model

    rows = language_model.quality_runs(quick=True, arms=("bp", "shallow"))
    assert [r["arm"] for r in rows] == ["bp", "shallow"]
    for r in rows:
        quality._check_row("language_model", r)  # raises on a row that breaks the contract
        assert r["metric"] == "bits/char" and r["steps"] == 8 and r["value"] > 0 and r["curve"]
