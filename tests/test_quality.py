"""benchmarks/quality.py: the quick smoke of the image and graph domains in every arm, the domain contract,
rendering and merging (tiny data, no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import quality


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("quality")
    quality.main(["--quick", "--domains", "images,graphs", "--out", str(out), "--threads", "1"])
    return out


def test_quick_run_has_every_arm_of_every_table(quick_run: Path) -> None:
    text = (quick_run / "results.md").read_text()
    assert "## images" in text and "## graphs" in text and "quick smoke run" in text
    for domain, tables in (("images", 2), ("graphs", 3)):
        record = json.loads((quick_run / "results" / f"{domain}.json").read_text())
        by_table: dict[str, set[str]] = {}
        for row in record["rows"]:
            by_table.setdefault(row["table"], set()).add(row["arm"])
            assert row["steps"] == 3 and row["wall_s"] > 0, row
        assert len(by_table) == tables and all(arms == {"bp", "dfa", "shallow"} for arms in by_table.values())
        for name in record["images"].values():
            assert (quick_run / "img" / name).stat().st_size > 1000
            assert f"](img/{name})" in text
    assert text.count("| dfa |") == 5 and text.count("| shallow |") == 5


def test_rerun_keeps_other_domains_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "results").mkdir()
    other = {"domain": "language_model", "pending": "not yet"}
    (tmp_path / "results" / "language_model.json").write_text(json.dumps(other))
    monkeypatch.setitem(quality.DOMAINS, "missing", "examples.no_such_module_here")
    quality.main(["--domains", "missing", "--out", str(tmp_path)])
    text = (tmp_path / "results.md").read_text()
    assert "## language_model" in text and "Pending: not yet" in text
    assert "## missing" in text and "does not exist yet" in text


def test_unknown_domain_is_refused() -> None:
    with pytest.raises(SystemExit):
        quality.main(["--domains", "imagez", "--quick"])


def _row(table: str, arm: str, value: float, higher: bool = False) -> dict:
    return {"table": table, "arm": arm, "metric": "m", "value": value, "higher_is_better": higher, "steps": 1,
            "wall_s": 1.0}  # fmt: skip


def test_verdicts_respect_the_metric_direction() -> None:
    lower = [_row("t", "bp", 10.0), _row("t", "dfa", 12.0), _row("t", "shallow", 15.0)]
    assert "DFA beats shallow by 3.00" in quality.verdicts(lower)[0]
    higher = [_row("t", "bp", 80.0, True), _row("t", "dfa", 70.0, True), _row("t", "shallow", 75.0, True)]
    assert "DFA does NOT beat shallow" in quality.verdicts(higher)[0]
    assert quality.verdicts(lower[:2]) == []  # no verdict without all three arms


def test_merge_records_orders_arms_and_drops_duplicates() -> None:
    recs = [
        {"domain": "d", "rows": [_row("t", "shallow", 3.0), _row("t", "ref", 0.0)], "total_s": 2.0},
        {"domain": "d", "rows": [_row("t", "bp", 1.0), _row("t", "ref", 0.0)], "total_s": 3.0},
        {"domain": "d", "rows": [_row("t", "dfa", 2.0), _row("t", "ref", 0.0)], "total_s": 4.0},
    ]
    merged = quality.merge_records(recs, ["bp", "dfa", "shallow"])
    assert [r["arm"] for r in merged["rows"]] == ["bp", "dfa", "shallow", "ref"] and merged["total_s"] == 9.0


def test_rows_must_follow_the_contract() -> None:
    with pytest.raises(ValueError, match="lacks"):
        quality._check_row("d", {"table": "t", "arm": "bp", "value": 1.0})


def test_collect_merges_processes(tmp_path: Path) -> None:
    for arm, value in (("bp", 1.0), ("dfa", 2.0), ("shallow", 3.0)):
        folder = tmp_path / "jobs" / f"d-{arm}" / "results"
        folder.mkdir(parents=True)
        rec = {"domain": "images", "rows": [_row("t", arm, value)], "total_s": 5.0, "note": "", "quick": True,
               "seed": 0, "machine": "m", "platform": "p", "torch_threads": 1, "date": "now"}  # fmt: skip
        (folder / "images.json").write_text(json.dumps(rec))
    merged = quality.collect(tmp_path / "jobs")
    assert merged["images"]["processes"] == 3 and merged["images"]["total_s"] == 15.0
    assert [r["arm"] for r in merged["images"]["rows"]] == ["bp", "dfa", "shallow"]
    quality.main(["--collect", str(tmp_path / "jobs"), "--domains", "images", "--out", str(tmp_path / "out")])
    text = (tmp_path / "out" / "results.md").read_text()
    assert "ran as 3 processes, which took" in text and "DFA beats shallow by 1.00" in text
