"""LightningCLI: the DFA strategy by name, by class path with flags, and from a YAML config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_dfa

pytest.importorskip("jsonargparse")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "cli_train.py"
sys.path.insert(0, str(SCRIPT.parent))
import cli_train  # noqa: E402

COMMON = ["--trainer.accelerator=cpu", "--trainer.max_epochs=3"]


def test_cli_from_the_command_line_trains_with_dfa(tmp_path: Path) -> None:
    """Two real command lines, run side by side: ``--trainer.strategy=dfa`` and the class path with a flag."""
    commands = {
        "name": ["--trainer.strategy=dfa"],
        "class": ["--trainer.strategy=lightning_dfa.DFAStrategy", "--trainer.strategy.seed=3"],
    }
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = {
        key: subprocess.Popen(
            [sys.executable, str(SCRIPT), "fit", *args, *COMMON, f"--model.report={tmp_path / key}.json"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for key, args in commands.items()
    }
    reports = {}
    for key, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        reports[key] = json.loads((tmp_path / f"{key}.json").read_text())
    for key, seed in (("name", 0), ("class", 3)):
        report = reports[key]
        assert report["strategy"] == "DFAStrategy" and report["seed"] == seed
        losses = report["losses"]
        assert len(losses) == 18 and report["deliveries"] == 18  # every step delivered feedback
        assert sum(losses[-3:]) / 3 < 0.85 * sum(losses[:3]) / 3  # it trains
    assert reports["name"]["losses"][0] == reports["class"]["losses"][0]  # same data and initial weights
    assert reports["name"]["losses"][1:] != reports["class"]["losses"][1:]  # seed 3 is other feedback


def test_cli_strategy_from_yaml_and_ddp_flags(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  accelerator: cpu\n"
        "  strategy:\n"
        "    class_path: lightning_dfa.DFAStrategy\n"
        "    init_args:\n"
        "      seed: 7\n"
        "      mode: shallow\n"
        "      distribution: gaussian\n"
    )
    cli = cli_train.main(["--config", str(config)], run=False)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, lightning_dfa.DFAStrategy)
    assert (strategy.dfa.config.seed, strategy.dfa.config.mode, strategy.dfa.config.distribution) == (
        7,
        "shallow",
        "gaussian",
    )
    flags = ["--trainer.strategy.static_graph=true", "--trainer.strategy.find_unused_parameters=true"]
    strategies = {}
    for path in ("lightning_dfa.DFADDPStrategy", "pytorch_lightning.strategies.DDPStrategy"):
        args = ["--trainer.accelerator=cpu", "--trainer.devices=2", f"--trainer.strategy={path}", *flags]
        strategies[path] = cli_train.main(args, run=False).trainer.strategy
    strategy = strategies["lightning_dfa.DFADDPStrategy"]
    assert isinstance(strategy, lightning_dfa.DFADDPStrategy) and strategy.dfa.config.seed == 0
    assert strategy._ddp_kwargs["static_graph"] is True and strategy._ddp_kwargs["find_unused_parameters"] is True
    # every DDP keyword reaches DDP exactly as with Lightning's own DDPStrategy
    assert strategy._ddp_kwargs == strategies["pytorch_lightning.strategies.DDPStrategy"]._ddp_kwargs
    with pytest.raises(SystemExit):  # a misspelt option is refused by the parser, not ignored
        cli_train.main(["--trainer.strategy=lightning_dfa.DFAStrategy", "--trainer.strategy.sede=3"], run=False)


def test_cli_recipe_and_each_recipe_option_from_flags() -> None:
    base = ["--trainer.accelerator=cpu", "--trainer.strategy=lightning_dfa.DFAStrategy", "--trainer.strategy.seed=1"]
    config = cli_train.main(base, run=False).trainer.strategy.dfa.config
    assert (config.recipe, config.norm_jacobian, config.cut_head_input, config.sketch) == ("auto", None, None, None)
    flags = [
        "--trainer.strategy.recipe=paper",
        "--trainer.strategy.sketch=true",
        "--trainer.strategy.norm_points=false",
    ]
    config = cli_train.main(base + flags, run=False).trainer.strategy.dfa.config
    assert (config.recipe, config.sketch, config.norm_points, config.norm_jacobian) == ("paper", True, False, None)
    with pytest.raises(ValueError, match="recipe must be one of"):  # a recipe the library does not know
        cli_train.main(base + ["--trainer.strategy.recipe=best"], run=False)
