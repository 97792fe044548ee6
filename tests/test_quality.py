"""benchmarks/quality.py: the quick smoke of the image and graph domains in every arm, the domain contract,
rendering and merging (tiny data, no network); the examples never import the benchmarks."""

from __future__ import annotations

import ast
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
    index = (quick_run / "results.md").read_text()
    assert "[images](results_images.md)" in index and "[graphs](results_graphs.md)" in index
    assert index.count("quick smoke run") == 5  # one row per sub-table, each marked
    for domain, tables in (("images", 2), ("graphs", 3)):
        page = (quick_run / f"results_{domain}.md").read_text()
        assert page.startswith("# ") and "Quick smoke run (not a result)" in page
        assert f"python -m benchmarks.quality --domains {domain}" in page and f"(results/{domain}.json)" in page
        record = json.loads((quick_run / "results" / f"{domain}.json").read_text())
        by_table: dict[str, set[str]] = {}
        for row in record["rows"]:
            by_table.setdefault(row["table"], set()).add(row["arm"])
            assert row["steps"] == 3 and row["wall_s"] > 0, row
        assert len(by_table) == tables and all(arms == {"bp", "dfa", "shallow"} for arms in by_table.values())
        for name in record["images"].values():
            assert (quick_run / "img" / name).stat().st_size > 1000
            assert f"](img/{name})" in page
        assert page.count("| dfa |") == tables and page.count("| shallow |") == tables
        # the page opens with its first table, before the setup and the findings
        assert page.index("### ") < page.index("## Setup") < page.index("## How to reproduce")
        assert "CPU" in record["machine"] and "this" not in record["machine"]


def test_render_only_redraws_plots_and_pages(quick_run: Path) -> None:
    drawn = sorted(p.name for p in (quick_run / "img").glob("*.png"))
    assert len(drawn) >= 3  # at least the three graph tables have curves
    for name in drawn:
        (quick_run / "img" / name).unlink()
    (quick_run / "results_images.md").unlink()
    quality.main(["--render-only", "--out", str(quick_run)])
    assert (quick_run / "results_images.md").exists()
    assert sorted(p.name for p in (quick_run / "img").glob("*.png")) == drawn


def test_examples_never_import_the_benchmarks() -> None:
    root = Path(__file__).resolve().parents[1] / "examples"
    offenders = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "benchmarks"]
    assert not offenders, offenders


def test_rerun_keeps_other_domains_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "results").mkdir()
    other = {"domain": "language_model", "pending": "not yet"}
    (tmp_path / "results" / "language_model.json").write_text(json.dumps(other))
    monkeypatch.setitem(quality.DOMAINS, "missing", "examples.no_such_module_here")
    quality.main(["--domains", "missing", "--out", str(tmp_path)])
    text = (tmp_path / "results.md").read_text()
    assert "[language_model]" in text and "pending: not yet" in text
    assert "[missing]" in text and "does not exist yet" in text
    assert "Pending: not yet" in (tmp_path / "results_language_model.md").read_text()


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
    stored = json.loads((tmp_path / "out" / "results" / "images.json").read_text())
    assert stored["processes"] == 3 and stored["command"].startswith("python -m benchmarks.quality --collect")
    assert "DFA beats shallow by 1.00" in (tmp_path / "out" / "results_images.md").read_text()
