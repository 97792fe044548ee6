"""DFA under sharding, on CPU with gloo (Lightning's FSDPStrategy needs a GPU; torch's FSDP2 and Lightning's
ModelParallelStrategy do not).

``tests/scripts/fsdp_engine.py`` trains the engine on models sharded with ``fully_shard`` per discovered block (2
processes, ``torch.multiprocessing.spawn``), with activation checkpointing per block and with a
``torch.distributed.checkpoint`` save and resume; ``tests/scripts/lightning_fsdp2.py`` does the same through
``Trainer(strategy="dfa_model_parallel")`` and through Lightning's ``ModelParallelStrategy`` with the ``DFA`` callback.
Every 2-process run is compared with one process trained here on the same data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

import lightning_dfa
from lightning_dfa import FeedbackEngine, discover
from lightning_dfa.adapters.core import check_strategy
from lightning_dfa.sharding import outermost, wrap_units

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "scripts"))
import fsdp_engine  # noqa: E402

ENGINE_CONFIGS = ["mlp_fsdp2", "mlp_fsdp2_resume", "llama_fsdp2_resume", "llama_fsdp2_ckpt", "mlp_fsdp1", "llama_fsdp1"]


def _run(script: str, out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "NODE_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, str(ROOT / "tests" / "scripts" / script), str(out), *args]
    return subprocess.run(command, cwd=out, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp2")
    run = _run("fsdp_engine.py", out, *ENGINE_CONFIGS)
    assert run.returncode == 0, run.stderr[-4000:]
    return out


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("name", ENGINE_CONFIGS)
def test_engine_under_fsdp_equals_one_process(engine_run: Path, name: str) -> None:
    sharded = torch.load(engine_run / f"{name}.pt")
    single = fsdp_engine.train(name.replace("_resume", ""))  # one process, whole batches, never interrupted
    initial = fsdp_engine.build(name.split("_")[0], 0).state_dict()
    assert _max_difference(single, initial) > 1e-2  # the weights moved: the comparison can fail
    assert _max_difference(sharded, single) < 1e-5


def test_sharded_checkpoint_resumes_exactly(engine_run: Path) -> None:
    # resumed into a model, optimizer (Adam) and engine built from other seeds: weights, optimizer state and
    # feedback all came back from the checkpoint (the script also checks the feedback seed was taken from it)
    resumed = torch.load(engine_run / "mlp_fsdp2_resume.pt")
    straight = torch.load(engine_run / "mlp_fsdp2.pt")
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_delivery_returns_no_view_and_fsdp2_does_not_warn(engine_run: Path) -> None:
    for name in ENGINE_CONFIGS:
        assert json.loads((engine_run / f"{name}.warnings.json").read_text()) == [], name
    net = fsdp_engine.build("mlp", 0)
    FeedbackEngine(seed=0).attach(net)
    out = net(torch.randn(4, 6))
    assert out._base is None and out.requires_grad
    out.mul_(2.0)  # allowed in place, as on a plain output


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mlp", "llama"])
def test_dfa_model_parallel_strategy_and_callback_equal_one_process(tmp_path: Path, kind: str) -> None:
    import lightning_fsdp2

    run = _run("lightning_fsdp2.py", tmp_path, kind)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "Traceback" not in run.stderr and "terminate called" not in run.stderr
    runs = torch.load(tmp_path / f"{kind}.pt", weights_only=False)
    single = lightning_fsdp2.fit(kind, 2, lightning_dfa.DFAStrategy(verbose=False), 1).lightning_module.state_dict()
    assert _max_difference(runs["straight"], single) < 1e-5
    assert _max_difference(runs["callback"], single) < 1e-5
    assert all(torch.equal(runs["resumed"][k], runs["straight"][k]) for k in single)
    assert runs["dfa"]["seed"] == 0 and runs["dfa"]["widths"]  # the sharded checkpoint's metadata holds the feedback


@pytest.mark.parametrize("package", [pl, L])
def test_dfa_fsdp_is_registered_and_asks_for_a_gpu(package: Any) -> None:
    registry = package.strategies.StrategyRegistry
    for name in ("dfa_fsdp", "dfa_fsdp_cpu_offload", "dfa_model_parallel"):
        assert name in registry
    assert registry["dfa_fsdp_cpu_offload"]["init_params"] == {"cpu_offload": True}
    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        package.Trainer(strategy="dfa_fsdp", accelerator="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(Exception, match="No supported gpu backend found"):
            package.Trainer(strategy="dfa_fsdp", accelerator="gpu")
    classes = lightning_dfa if package is pl else lightning_dfa.lightning
    trainer = package.Trainer(strategy="dfa_model_parallel", accelerator="cpu", devices=2, logger=False)
    assert isinstance(trainer.strategy, classes.DFAModelParallelStrategy)


def test_blocks_are_the_fsdp_units_and_checkpointed_regions() -> None:
    net = fsdp_engine.build("llama", 0)
    target = discover(net)
    assert wrap_units(target) == list(net.model.layers)
    strategy = lightning_dfa.DFAFSDPStrategy(checkpoint_blocks=True, verbose=False)
    strategy._dfa_shard(net, target)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert [policy._lambda_fn(m) for m in (net.model.layers[1], net.model.embed_tokens, net.lm_head)] == [1, 0, 0]
    check = strategy._activation_checkpointing_kwargs["check_fn"]
    assert check(net.model.layers[0]) and not check(net.model.norm)
    own = lightning_dfa.DFAFSDPStrategy(auto_wrap_policy={nn.Linear}, verbose=False)
    given = own.kwargs["auto_wrap_policy"]
    own._dfa_shard(net, target)
    assert own.kwargs["auto_wrap_policy"] is given and not own._activation_checkpointing_kwargs
    with pytest.raises(ValueError, match="checkpoint_blocks must be True or False"):
        lightning_dfa.DFAModelParallelStrategy(checkpoint_blocks="yes")


def test_engine_hooks_sit_outside_activation_checkpoint_wrappers() -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    from lightning_dfa.sharding import checkpoint_check_fn

    net = fsdp_engine.build("llama", 0)
    target = discover(net)
    apply_activation_checkpointing(net, check_fn=checkpoint_check_fn(target))
    outer = outermost(net, target)
    assert [b.name for b in outer.blocks] == [b.name for b in target.blocks]
    assert [type(b.entry).__name__ for b in outer.blocks] == ["CheckpointWrapper"] * 2
    assert outer.output is net.lm_head


def test_deepspeed_is_refused_and_sharded_strategies_compose_with_the_callback() -> None:
    supported = lightning_dfa.DFA._dfa_supported_strategies
    check_strategy(pl.strategies.ModelParallelStrategy(), supported)

    class DeepSpeedStrategy(pl.strategies.DDPStrategy): ...

    with pytest.raises(RuntimeError, match="DeepSpeed runs its own engine's backward.*dfa_fsdp"):
        check_strategy(DeepSpeedStrategy(), supported)
