"""DFA over DDP: 2 CPU processes with gloo, started by Lightning's own ``popen`` launcher (and its ``fork`` one).

One run of ``tests/scripts/ddp_train.py`` trains every configuration in turn (one process group, about 1 s per
configuration; the fork configurations run in a second invocation alongside). The tests compare each process's
final weights with a single process trained here on the same data, compare the feedback (matrices and every
delivered signal, hashed) across the processes, and check that every process exited with code 0 and printed no
C++ ``terminate called``.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import lightning_dfa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "scripts"))
import ddp_train  # noqa: E402

NAMES = [name for name in ddp_train.CONFIGS if not name.startswith("bp_")]
POPEN = [name for name in NAMES if not name.startswith("fork_")]
FORK = [name for name in NAMES if name.startswith("fork_")]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, subprocess.CompletedProcess]]:
    """Runs the popen configurations and the fork ones side by side (two invocations of the script)."""
    out = tmp_path_factory.mktemp("ddp")
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "NODE_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    script = str(ROOT / "tests" / "scripts" / "ddp_train.py")
    procs = {
        launcher: subprocess.Popen(
            [sys.executable, script, str(out), *names],
            cwd=out,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for launcher, names in (("popen", POPEN), ("fork", FORK))
    }
    done = {}
    for launcher, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=400)
        done[launcher] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return out, done


def reference(name: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """One process, ``DFAStrategy``, on the data of both processes."""
    cfg = ddp_train.config(name)
    callbacks = [lightning_dfa.DFA(verbose=False)] if cfg["callback"] else []
    options = {k: v for k, v in cfg["ddp"].items() if k.startswith("feedback_")}  # DFA options (the rest: DDP's)
    strategy: Any = "auto" if cfg["callback"] else lightning_dfa.DFAStrategy(verbose=False, **options)
    rank = -1 if cfg["split"] else None
    model, _ = ddp_train.train(
        strategy, cfg["automatic"], callbacks, 1, rank, cfg["returns"], accumulate=cfg["accumulate"], aux=cfg["aux"]
    )
    return model.state_dict(), model.feedback_hashes


def test_every_process_exits_cleanly(ddp_run: tuple[Path, dict[str, subprocess.CompletedProcess]]) -> None:
    out, done = ddp_run
    for launcher, run in done.items():
        assert run.returncode == 0, (launcher, run.stderr[-4000:])
        assert "terminate called" not in run.stderr, launcher
        assert "Traceback" not in run.stderr, launcher
        assert "Starting with 2 processes" in run.stderr, launcher
    assert "distributed_backend=gloo" in done["popen"].stderr
    assert json.loads((out / "children.json").read_text()) == [0]  # rank 1, launched by Lightning's popen launcher


@pytest.mark.parametrize("name", NAMES)
def test_ddp_matches_one_process_and_feedback_is_identical(
    ddp_run: tuple[Path, dict[str, subprocess.CompletedProcess]], name: str
) -> None:
    out, done = ddp_run
    run = done["fork" if name in FORK else "popen"]
    assert run.returncode == 0, run.stderr[-4000:]
    ranks = [torch.load(out / f"{name}.rank{r}.pt") for r in (0, 1)]
    cfg = ddp_train.config(name)
    expected_strategy = "DDPStrategy" if cfg["callback"] else "DFADDPStrategy"  # the callback form: Lightning's
    assert all(r["world_size"] == 2 and r["strategy"] == expected_strategy for r in ranks)
    # feedback identical in every process by construction: the same matrices; on the same batch, the same signal
    # at every step (and the same as one process); on different batches the errors, hence the signals, differ
    assert ranks[0]["matrices"] and ranks[0]["matrices"] == ranks[1]["matrices"]
    assert ranks[0]["learned"] == ranks[1]["learned"]  # learned feedback matrices: the same update in every process
    assert bool(ranks[0]["learned"]) == ("feedback_learning" in cfg["ddp"])
    deliveries = ddp_train.STEPS // cfg["accumulate"] * cfg["accumulate"]  # one per micro-batch
    deliveries += ddp_train.STEPS - 1 if cfg["aux"] else 0  # and the auxiliary head's, from the second step
    assert len(ranks[0]["feedback"]) == len(ranks[1]["feedback"]) == deliveries
    weights, feedback = reference(name)
    if cfg["split"]:
        assert all(a != b for a, b in zip(*(r["feedback"] for r in ranks)))
    else:
        assert ranks[0]["feedback"] == ranks[1]["feedback"] == feedback
    initial = ddp_train.MLP(aux=cfg["aux"]).state_dict()
    for key, value in weights.items():
        assert not torch.equal(value, initial[key])  # it trained
        for r in ranks:
            torch.testing.assert_close(r["weights"][key], value, atol=1e-5, rtol=0, msg=lambda m, k=key: f"{k}: {m}")


def test_split_batches_prove_gradients_are_synchronized(
    ddp_run: tuple[Path, dict[str, subprocess.CompletedProcess]],
) -> None:
    """Different halves per process end equal to one process on the whole batch only if DDP averaged the
    gradients; a process training on its half alone ends elsewhere (so the comparison above can fail)."""
    out, _ = ddp_run
    alone, _ = ddp_train.train(lightning_dfa.DFAStrategy(verbose=False), rank=0)
    synced = torch.load(out / "split_auto.rank0.pt")["weights"]
    assert max((alone.state_dict()[k] - synced[k]).abs().max().item() for k in synced) > 1e-3


def test_registered_names_start_methods_and_ddp_arguments() -> None:
    import pytorch_lightning as pl
    from pytorch_lightning.strategies import StrategyRegistry

    registries = [StrategyRegistry]
    try:
        from lightning.pytorch.strategies import StrategyRegistry as LightningRegistry

        registries.append(LightningRegistry)
    except ImportError:  # pragma: no cover - the lightning package is optional
        pass
    for registry in registries:
        for name, method in (
            ("dfa_ddp", "popen"),
            ("dfa_ddp_spawn", "spawn"),
            ("dfa_ddp_fork", "fork"),
            ("dfa_ddp_notebook", "fork"),
        ):
            assert registry[name]["init_params"]["start_method"] == method
            assert registry[name]["strategy"].__name__ == "DFADDPStrategy"
        assert "ddp" in registry and registry["ddp"]["strategy"].__name__ == "DDPStrategy"
    strategy = lightning_dfa.DFADDPStrategy(
        find_unused_parameters=True, static_graph=True, gradient_as_bucket_view=True, seed=5, start_method="spawn"
    )
    assert strategy._ddp_kwargs == {
        "find_unused_parameters": True,
        "static_graph": True,
        "gradient_as_bucket_view": True,
    }
    assert strategy._start_method == "spawn" and strategy.dfa.config.seed == 5
    trainer = pl.Trainer(strategy="dfa_ddp_spawn", accelerator="cpu", devices=2, num_nodes=3, logger=False)
    assert isinstance(trainer.strategy, lightning_dfa.DFADDPStrategy)
    assert trainer.strategy._start_method == "spawn"
    assert trainer.strategy.num_nodes == 3 and trainer.world_size == 6


def test_strategy_and_attached_model_pickle_for_spawn() -> None:
    """``dfa_ddp_spawn`` pickles the strategy and the module into the new processes."""
    strategy = pickle.loads(pickle.dumps(lightning_dfa.DFADDPStrategy(start_method="spawn", seed=2, static_graph=True)))
    assert strategy.dfa.config.seed == 2 and strategy._ddp_kwargs == {"static_graph": True}
    model = ddp_train.MLP()
    engine = lightning_dfa.FeedbackEngine()
    engine.attach(model)
    copy = pickle.loads(pickle.dumps(model))
    x = torch.randn(4, 6)
    out = copy(x)  # the copy is a plain model: its hooks pass through and never feed `engine`
    assert engine.report.points_recorded == 0
    out.sum().backward()
    assert copy.net[0].weight.grad is not None  # plain backprop reaches the first layer: nothing was cut
    with torch.no_grad():
        torch.testing.assert_close(out, model(x))


@pytest.mark.parametrize("flavour", ["strategy", "callback", "pick"])
def test_ddp_leaves_the_untrained_token_embedding_out(tmp_path: Path, flavour: str) -> None:
    """The default cuts the token embedding from the feedback (``requires_grad=False`` while attached): both
    Lightning flavours attach before DDP wraps the model, so DDP does not wait for its gradient; both processes end
    with the weights of one process trained on the same batches, and the embeddings at their initial values. With a
    loss on the last position only (``pick``), every process finds that pick in its first loss, as one process
    does, and spreads the same feedback."""
    import ddp_lm

    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "NODE_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    script = str(ROOT / "tests" / "scripts" / "ddp_lm.py")
    done = subprocess.run(
        [sys.executable, script, str(tmp_path), flavour], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    single, fit = ddp_lm.fit(lightning_dfa.DFAStrategy(verbose=False), [], 1, pick=flavour == "pick")
    assert sorted(fit.strategy.dfa_engine._read_outputs) == (["model.lm_head"] if flavour == "pick" else [])
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"{flavour}.rank{rank}.pt")
        final, initial = saved["final"], saved["initial"]
        assert saved["read"] == (["model.lm_head"] if flavour == "pick" else []), saved["read"]
        for table in ("transformer.wte.weight", "transformer.wpe.weight"):  # the token and position embeddings
            assert torch.equal(final[table], initial[table]), table
        assert not torch.equal(final["transformer.h.0.mlp.c_fc.weight"], initial["transformer.h.0.mlp.c_fc.weight"])
        other = torch.load(tmp_path / f"{flavour}.rank{1 - rank}.pt")["final"]
        for key, value in single.model.state_dict().items():
            assert torch.equal(final[key], other[key]), key  # the processes stay in step
            torch.testing.assert_close(final[key], value, atol=1e-5, rtol=1e-5, msg=key)
    assert all(p.requires_grad for p in single.parameters())  # given back after the fit
