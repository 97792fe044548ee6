"""The census of Hugging Face architectures (``benchmarks/hf_sweep.py``): its per-model measure on a few tiny models,
in this process, and its classifier on an arm that trains the blocks by backprop."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from benchmarks import hf_sweep  # noqa: E402


@pytest.mark.parametrize("task_id", ["causal:gpt2", "img:vit", "seqcls:bert"])
def test_default_flag_is_ok(task_id):
    rec = hf_sweep.measure(task_id)
    assert rec["status"] == "ok", rec
    assert rec["id"] == task_id and rec["reason"] == ""
    assert rec["variant"] == "shrink" and 1_000 < rec["n_params"] < 1_000_000
    assert rec["bp_engine_equals_plain"]
    assert rec["deliveries"] >= 1 and rec["n_blocks"] >= 2 and rec["n_points"] >= 2
    assert 0 < rec["share_true_gradient"] < 50
    assert rec["block_params"] > 0 and rec["dfa_bp_step_ratio"] > 0


def test_question_answering_and_multiple_choice_are_ok():
    """The spans of a question-answering batch and the [batch, choices, seq] ids of a multiple-choice one."""
    for task_id in ("qa:bert", "mc:bert"):
        rec = hf_sweep.measure(task_id)
        assert rec["status"] == "ok", rec
        assert rec["variant"] == "shrink" and rec["bp_engine_equals_plain"]
        assert rec["deliveries"] >= 1 and rec["n_blocks"] >= 2 and rec["block_params"] > 0


def test_blocks_trained_by_backprop_are_a_failure():
    """The engine in backprop mode delivers no feedback: the blocks train by their backprop gradient."""
    rec = hf_sweep.measure("causal:gpt2", mode="bp")
    assert rec["status"] == "silent backprop", rec
    assert rec["status"] in hf_sweep.FAILURES
    assert "no feedback" in rec["reason"]


def test_a_refusal_of_the_library_is_told_from_a_crash():
    """Reformer's reversible layers run without gradients in the forward: the engine refuses them with its own
    error, which the census classes apart from a crash."""
    rec = hf_sweep.measure("seqcls:reformer")
    assert rec["status"] == "refused", rec
    assert "DFA: no feedback reached the blocks" in rec["reason"]


def test_render_counts_every_record():
    data = {
        "machine": {"cpu": "AMD EPYC 7B13 64-Core Processor", "cores": 2},
        "versions": {"torch": "2", "transformers": "5", "lightning_dfa": None},
        "records": [
            {"id": "causal:a", "head": "causal", "class": "A", "status": "ok", "reason": ""},
            {"id": "causal:b", "head": "causal", "class": "B", "status": "no grad", "reason": "no gradient: x_y"},
            {"id": "img:c", "head": "img", "class": "C", "status": "skipped", "reason": "too big: shrink: too big"},
        ],
    }
    text = hf_sweep.render(data)
    assert "a 2-core AMD EPYC 7B13 CPU" in text
    assert "| causal LM | 2 | 1 | 0 | 0 | 1 no grad |" in text
    assert "| image classification | 1 | 0 | 0 | 1 | 0 |" in text
    assert "`causal:b` (`B`): **no grad**: no gradient: x\\_y" in text
