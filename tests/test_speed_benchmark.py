"""Smoke test of ``benchmarks/speed.py`` (``--quick``: a tiny MLP, a few steps) and of the FLOP account.

The speed and memory goals themselves are measured by running the benchmark (``docs/performance.md``), never
by timed unit tests.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.flops import gcn_macs, gpt2_macs, mlp_macs
from benchmarks.speed import main, render


def test_quick_run_writes_json_and_renders(tmp_path: Path) -> None:
    assert main(["--quick", "--models", "mlp", "--out", str(tmp_path), "--tag", "smoke"]) == 0
    path = tmp_path / "speed_cpu_smoke.json"
    data = json.loads(path.read_text())
    case = data["cases"][0]
    assert case["model"] == "mlp" and [r["arm"] for r in case["rows"]] == ["bp", "dfa"]
    bp, dfa = case["rows"]
    assert bp["peak_bytes"] > 0 and dfa["feedback_bytes"] > 0
    assert 0 < dfa["limit"] < 1 and len(dfa["wall_ratio"]) == 3
    # the analytic limit and the dispatched-FLOP count agree for a plain MLP
    assert abs(dfa["limit"] - dfa["counted_ratio"]) < 1e-6
    assert "| dfa |" in render([path], None).replace(str(Path.cwd()), "")


def test_flop_account() -> None:
    bp = gpt2_macs(8192, 256, 6, 128, 8, None)["total"]
    dense_cut = gpt2_macs(8192, 256, 6, 128, 8, {"cut_head_input": True})["total"]
    assert dense_cut == bp  # the shared projection costs exactly the head input gradient it replaces
    assert gpt2_macs(8192, 256, 6, 128, 8, {})["total"] > bp  # without the cut the projection is extra
    big = gpt2_macs(50257, 256, 6, 128, 8, {"cut_head_input": True, "topk": 64})["total"]
    assert big / gpt2_macs(50257, 256, 6, 128, 8, None)["total"] < 0.8
    assert mlp_macs([4, 8, 8, 2], 3, {})["total"] < mlp_macs([4, 8, 8, 2], 3, None)["total"]
    assert gcn_macs(10, 20, 5, 8, 3, 2, {})["total"] < gcn_macs(10, 20, 5, 8, 3, 2, None)["total"]
