"""Smoke test of ``python -m benchmarks.speed`` (``--quick``: a tiny MLP, a few steps) and of the FLOP account.

The speed and memory goals themselves are measured by running the benchmark (``docs/performance.md``), never
by timed unit tests.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.flops import gcn_macs, gpt2_macs, mlp_macs
from benchmarks.speed.cases import ladder
from benchmarks.speed.cli import main, parser
from benchmarks.speed.machine import KEEP_MALLOC_ENV
from benchmarks.speed.measure import run_case
from benchmarks.speed.render import ROOT, render


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


def test_precision_is_a_parameter_and_unknown_values_are_refused() -> None:
    mlp = ladder(quick=True)[0]
    mlp.arms = {}
    with pytest.raises(ValueError, match="precision='fp8'"):
        run_case(mlp, torch.device("cpu"), warmup=0, repeats=1, proj_repeats=1, precision="fp8")


def test_every_option_has_help() -> None:
    actions = [a for a in parser()._actions if a.dest != "help"]
    assert len(actions) > 10 and all(a.help and "%(" not in a.help for a in actions)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="--malloc keep is a glibc setting")
def test_malloc_keep_reruns_under_the_glibc_setting_and_records_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in KEEP_MALLOC_ENV}
    cmd = [sys.executable, "-m", "benchmarks.speed", "--quick", "--models", "mlp", "--out", str(tmp_path)]
    for setting in ("system", "keep"):
        out = subprocess.run([*cmd, "--tag", setting, "--malloc", setting], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        machine = json.loads((tmp_path / f"speed_cpu_{setting}.json").read_text())["machine"]
        assert machine["malloc"] == setting
        assert ("re-running under MALLOC_MMAP_MAX_=0" in out.stdout) == (setting == "keep")
    rendered = render([tmp_path / "speed_cpu_keep.json"], None)
    assert "glibc keeping freed memory" in rendered


def test_flop_account() -> None:
    bp = gpt2_macs(8192, 256, 6, 128, 8, None)["total"]
    dense_cut = gpt2_macs(8192, 256, 6, 128, 8, {"recipe": "paper", "cut_head_input": True})["total"]
    assert dense_cut == bp  # the shared projection costs exactly the head input gradient it replaces
    assert gpt2_macs(8192, 256, 6, 128, 8, {"recipe": "paper"})["total"] > bp  # without the cut it is extra
    assert gpt2_macs(8192, 256, 6, 128, 8, {})["total"] < dense_cut  # the default: cut and sketch
    big = gpt2_macs(50257, 256, 6, 128, 8, {"cut_head_input": True, "topk": 64})["total"]
    assert big / gpt2_macs(50257, 256, 6, 128, 8, None)["total"] < 0.8
    assert mlp_macs([4, 8, 8, 2], 3, {})["total"] < mlp_macs([4, 8, 8, 2], 3, None)["total"]
    assert gcn_macs(10, 20, 5, 8, 3, 2, {})["total"] < gcn_macs(10, 20, 5, 8, 3, 2, None)["total"]


def test_gpu_breakdown_smoke_run_on_the_cpu(tmp_path: Path) -> None:
    """The GPU breakdown script runs end to end (on the CPU, a tiny GPT-2) and its first-stage variants compute
    what the engine's projection computes."""
    from benchmarks.gpu_breakdown import main as breakdown

    breakdown(["--device", "cpu", "--model", "gpt2-tiny", "--precision", "32", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "gpu_breakdown_gpt2-tiny_32.json").read_text())
    assert set(result["kernels"]) == {"bp", "dfa"} and result["kernels"]["dfa"]["wall_ms"] > 0
    assert result["engine"]["projection"] > 0 and result["engine"]["error_bytes"] > 0
    stages = {k: v for k, v in result["sketch_first_stage"].items() if isinstance(v, dict)}
    assert "bmm (current)" in stages
    for name, row in stages.items():
        assert "error" not in row, (name, row)
        if not name.startswith("other layout"):
            assert row["rel_err"] < 1e-5, (name, row)
