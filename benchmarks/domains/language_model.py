"""Quality runs of the language-model example (:mod:`examples.language_model`): the demo's three arms
(:mod:`examples.demo`) with a longer budget and a cosine learning-rate decay."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from benchmarks.quality import ARMS

TITLE = "Character-level GPT-2 and Llama on Jane Austen's novels"

#: Optimizer steps per arm (cosine decay to zero): long enough for DFA to pass the trigram reference.
STEPS = 5000

NOTE = (
    "Character-level GPT-2 (Hugging Face, built from a config: 4 layers, d 128, 4 heads, context 64, 0.8 M "
    "parameters, untied vocabulary projection), trained on five of Jane Austen's novels (Debian package "
    "`r-cran-janeaustenr`), batch 32, AdamW lr 2e-3 with a cosine decay to zero, "
    f"{STEPS} steps per arm, seed 0: the arms of `python -m examples.demo --steps {STEPS} --lr-decay cosine` (DFA "
    '= the default flag, `Trainer(strategy="dfa")`: on this model, norm-aware feedback at each point that feeds a '
    "LayerNorm, the blocks' first norms as points, the head's input as the last point, no feedback into the "
    "embeddings). Metric: bits per character on "
    "the first 50,000 characters of "
    "Persuasion (held out); the curve is bits/char on its first 20,000 characters. The n-gram references, fitted "
    "on the same split and scored on the same characters: unigram 4.453, bigram 3.565, trigram 2.914 bits/char."
)

FINDINGS = """\
**The head's input as the last point (`cut_head_input`, in the default for a head over the token vocabulary).**
The head predicts over 97 characters from a width of 128. The default took the head's input as the last point only
where the head widens; it now does for any head over the token vocabulary, so the last point here is the head's
input, behind `ln_f`, which is then trained by feedback. At 1000 steps (cosine decay, one run per seed of `python -m
examples.demo --arm dfa --steps 1000 --lr-decay cosine`) the default reaches 2.676 / 2.624 bits/char at seeds 0 / 1,
against 2.671 / 2.627 before; at 5000 steps 2.193 against 2.197 (GPT-2, seed 0, the table above) and on the Llama
model 2.196 / 2.180 against 2.177 / 2.174 (seeds 0 / 1; `python -m benchmarks.lm_gap --run dfa-llama
--seed S`, and the same arm with `cut_head_input=false`), 0.3-0.9 % worse.

**No feedback into the embeddings (`cut_token_embedding`, part of the default flag).** Trained by `B e`, an
embedding table drifts towards a code of what follows each token and loses the token itself. Leaving GPT-2's token
and position tables at their initial values (a table tied to the head learns from the head's true gradient alone)
moved the default flag, at 1000 steps with the cosine schedule (one run per seed of
`python -m examples.demo --steps 1000 --lr-decay cosine`, 1 torch thread, a 2-core AMD EPYC CPU), from 3.311 / 3.319
bits/char (seeds 0 / 1) to **2.671 / 2.627** (backprop 2.51, shallow 3.72); cutting only the token table gave
2.952 / 2.968, only the position table 3.150 / 3.111. At 5000 steps: **2.20** against 2.70 (DFA /
backprop loss ratio 1.10, below the paper's 1.16). On the Llama model (rotary positions, so only the token table is
cut) the cut is neutral at 5000 steps: 2.177 against 2.165 (seed 0; the curves cross: the cut is
ahead from step 1000 to 4000, 2.581 against 2.605 at step 1000) and better at seed 1: 2.174 against 2.214 (one
run each with `--seed 1`, not stored); with a 1000-step schedule it
cost 2.473 against 2.364 (seed 0). On the tiny Transformers of the test suite (`tests/test_transformer_quality.py`)
the share of the shallow-to-backprop gap that DFA closes went from 47 % to 96 % (GPT-2), 87 % to 91 % (Llama) and
63 % to 106 % (BERT masked LM). The step-time column compares runs made under different load: the new rows ran
on a quieter machine than the backprop rows, so 0.43 and 0.18 are not speed-ups (side by side, a DFA step of these
small models costs about what a backprop step costs). The paragraphs below were written before the cut; their
"default flag" trains the embeddings by feedback.

**Closing the gap to the DFA paper's ratio.** The paper's Transformer reaches a DFA/backprop loss ratio of
ln 52 / ln 29.8 = 1.16 (word-level perplexity on WikiText-103, 6 layers, d 512, macro placement). The demo's GPT-2
with the default flag of the time reached 1.35 (2.70 against 2.00 bits/char). The same data, budget (5000 steps,
cosine decay), seed, batch and optimizer with a Llama-style model of the same size (`CharGPT(arch="llama")`, on
the command line `--model.arch=llama`: Hugging Face `LlamaForCausalLM` from a config, RMSNorm, rotary positions,
SwiGLU MLP of width 344, no biases, untied head; 816,512 parameters against GPT-2's 826,368) and the default flag
of the time, unchanged (`Trainer(strategy="dfa")`), test bits/char on the first 50,000 characters of Persuasion,
one seed:

| arm | what the blocks' updates use | bits/char | DFA/BP loss ratio | step time vs backprop |
|---|---|---|---|---|
| Llama, backprop | the transposed forward weights (weight transport) | 2.020 | - | 1.00 |
| Llama, DFA, the default flag | fixed random `B`, norm-aware feedback | **2.165** | **1.072** | 0.84 |
| Llama, DFA + `feedback_learning="kolen_pollack"` | learned per-point `B_p` | stopped (below) | - | about 1.1 x DFA's |
| GPT-2, backprop (stored run) | weight transport | 1.996 | - | 1.00 |
| GPT-2, DFA, the default flag (stored run) | fixed random `B`, norm-aware feedback | 2.696 | 1.35 | 0.47 (other load) |
| the DFA paper (WikiText-103, macro) | fixed random `B` | - | 1.16 | - |

No DFA row uses weight transport or an extra forward pass. The default flag's blocks learn from `B e` (a fixed random
`B`) passed through the Jacobian of the RMSNorm or LayerNorm that reads each point, at the point's own activation;
the learned-feedback row's `B_p` learns from the point's own activation and the error it already receives.

The Llama model with the default flag of the time reached a loss ratio of **1.072** (1.077 with the cut), with
no weight transport (GPT-2: 1.35). Backprop on the Llama model (2.020) is within 1.2 % of the best backprop result
at this budget (GPT-2's 1.996; the ratio counts only within 2 %), so the ratio is not won by a weaker backprop. The
Llama arms ran side by side on the same shared machine
(a 2-core AMD EPYC CPU, 1 torch thread each, load average 4 to 13), so their step times compare with each other
and not with the stored GPT-2 rows: on this small model (a 97-character output) a DFA step costs about what a
backprop step costs. The curves (bits/char on the first 20,000 characters of Persuasion, every 500 steps) are in
the Llama plot above; the DFA/backprop ratio along them: step 500: 1.05, step 1000: 1.12, step 1500: 1.13, step
2000: 1.13, step 2500: 1.12, step 3000: 1.12, step 3500: 1.11, step 4000: 1.10, step 4500: 1.09, step 5000: 1.09.
Runs, dates and commands: the `runs` list of
[`results/language_model.json`](results/language_model.json) and the raw results in
[`benchmarks/results/lm_gap/`](../benchmarks/results/lm_gap/) (`python -m benchmarks.lm_gap --run NAME`, then
`--store`).

What we do not know: which of the Llama model's differences does it (rotary instead of learned absolute positions,
which in GPT-2 learn only through the feedback at the first block's input; RMSNorm without mean subtraction; the
gated MLP; no biases). No run separates them.

**Leads that did not help, or were not tried** (same 5000-step schedule and seed, the curve's bits/char on the first
20,000 characters of Persuasion; stopped early to leave the machine to the runs above; their curves:
[`benchmarks/results/lm_gap/stopped_runs.json`](../benchmarks/results/lm_gap/stopped_runs.json)):

| arm | step 500 | step 1000 |
|---|---|---|
| Llama, DFA, the default flag | 2.683 | 2.605 |
| the same + `feedback_learning="kolen_pollack"`, `feedback_decay=0.01` | 3.040 | 2.977 |
| the same + `feedback_learning="kolen_pollack"`, `feedback_decay=0.001` | 2.706 | 2.672 |

- Learned feedback (direct Kolen-Pollack, `lightning_dfa.learned`): each point's `B_p` follows the update a direct
  linear readout from the point to the output would get (its activation times the error, with decay). It is correct
  as a rule (on a tiny MLP the head-input point's `B_p` lines up with the head's weight: cosine 0.90, against 0.48
  for the fixed matrix the head aligned to; `tests/test_learned_feedback.py`), but on the language model it slows
  learning: with decay 0.01 (a 100-step memory) it trails the fixed matrix by 0.36-0.37 bits/char at steps 500
  and 1000; with decay 0.001 it stays close to the fixed matrix and does not beat it. A plausible reason: a
  block's residual-stream output is not read linearly by the head, so the readout that `B_p` learns is not the
  true gradient's map, and a moving `B_p` undoes the alignment of the forward weights to it that DFA relies on.
  The option stays (off by default) for models whose points the output reads nearly linearly.
- Per-block learning-rate or feedback scaling: not tried. Under Adam(W) a per-block scale of the feedback cancels
  (Adam divides by the gradient's running RMS), so only a per-block learning rate could change anything, and that
  needs the optimizer's parameter groups, which the strategy does not own.
- GrAPE-style forward-gradient corrections: not tried (they add forward-mode passes, and their backprop anchor steps
  are weight transport).
- Micro placement: not run on the Llama model (on GPT-2, 300 steps, it did worse than macro: table below).
- A second seed, a shallow arm on the Llama model, wider models, longer budgets: not run. The larger-scale check
(the winning recipe at 20,000 steps, or a
  word-level model on the whole Austen corpus) needs a GPU, and none was available for it: a known gap.

**What the numbers show (GPT-2).** The default flag reaches 2.70 bits/char after 5000 steps (2.6955; a second run of the
same arm with 2 torch threads instead of 1, whose floating-point sums differ, gave 2.674), below the trigram
reference (2.91), 0.97 ahead of the shallow baseline (flat since step 1000) and 0.70 behind backprop. The earlier
recipe row (a parameter-free LayerNorm Jacobian at every point, asked for with `norm_jacobian=True`) is kept for
history: 2.703. At 1000 steps with the same cosine schedule (one run each, 1 thread, not stored): the default
without the `ln_1` points 3.306, with them 3.311, with the head's input cut as well 3.306, against 3.31 for the
earlier recipe. The backprop and shallow rows come from the earlier run: the default changes nothing for them.
In loss, DFA / backprop = 1.868 / 1.384 nats = 1.35, against 1.16 in the DFA paper
(ln 52 / ln 29.8 word-level perplexity on WikiText-103); the
model, the tokens and the budget differ, so the comparison is loose. At equal wall time the picture is the same:
on this small model (a 97-character output) a DFA step costs what a backprop step costs, and a shallow step about
half, but shallow has stopped improving long before. In the demo's 300 constant-rate steps
(`python -m examples.demo`) DFA reached 3.52 against backprop 3.05 and shallow 3.76 (with the cut: 3.32): ahead of
shallow, not yet of the trigram.

**How the budget was chosen.** A sweep on one H100 80GB ([`benchmarks/gpu_lm_sweep.sh`](../benchmarks/gpu_lm_sweep.sh),
curves on the first 10,000 characters of Persuasion in
[`benchmarks/results/gpu_lm_sweep_h100.txt`](../benchmarks/results/gpu_lm_sweep_h100.txt)): DFA with a cosine decay
over 5000 steps reached 2.78, over 3000 steps 3.03; a constant learning rate over 5000 steps 2.84; lr 1e-3
instead of 2e-3, 2.93; the error read at the head's input (the paper's language-model setting), 2.78 (the same).
The decay and the number of steps matter; the other settings do not.

**What we tried that did not work** (300 steps, constant lr 2e-3, test bits/char on the first 50,000 characters
of Persuasion; one run each of `python -m examples.demo --steps 300 --arm NAME:key=value,...`, not stored):

| arm | bits/char |
|---|---|
| DFA, norm-aware feedback (`norm_jacobian=True`, the earlier recipe) | **3.523** |
| the same, error read at the head's input (`error_at="head_input"`) | 3.580 |
| the same, distinct per-point signals (`distinct=True`) | 3.591 |
| the same, micro placement (`placement="micro"`: also after attention and the MLP activation) | 3.628 |
| the same, lr 4e-3 / lr 1e-3 / Adam beta2 0.999 / Gaussian feedback | 3.643 / 3.529 / 3.528 / 3.543 |
| plain DFA, feedback straight into the pre-LN residual stream (`recipe="paper"`) | 3.890 |
| shallow / backprop, for reference | 3.761 / 3.054 |

Why the norm-aware feedback helps: in a pre-LN residual stream every consumer of a block's output normalises it
first, so the components of the feedback along the mean and along the activation itself are invisible downstream;
raw feedback spends the blocks' updates on them. Passing each point's feedback through the Jacobian of a
parameter-free LayerNorm at the point's own activation removes them, locally and without weight transport.
"""


def quality_runs(quick: bool, seed: int = 0, arms: Sequence[str] = ARMS) -> list[dict[str, Any]]:
    """The demo's arms (``bp`` = its ``backprop`` arm), one row each."""
    from examples import demo

    names = {"bp": "backprop", "dfa": "dfa", "shallow": "shallow"}
    argv = ["--seed", str(seed), "--no-progress", "--lr-decay", "cosine"]
    argv += ["--quick", "--eval-every", "2"] if quick else ["--steps", str(STEPS), "--eval-every", "500"]
    for arm in arms:
        argv += ["--arm", names[arm]]
    results = demo.main(argv)
    rows = []
    for arm, r in zip(arms, results):
        rows.append(
            {
                "table": "Character-level GPT-2, Persuasion" if not quick else "Character-level GPT-2 (quick)",
                "arm": arm,
                "metric": "bits/char",
                "value": r["test_bpc"],
                "higher_is_better": False,
                "steps": r["steps"],
                "wall_s": r["wall_s"],
                "curve": [[c["step"], c["bpc"]] for c in r["curve"]],
                "curve_metric": "bits/char (first 20k chars of Persuasion)",
                "config": ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "plain",
            }
        )
    return rows
