"""The language model's DFA/backprop gap: the variants of ``docs/results_language_model.md``, run and stored.

::

    python -m benchmarks.lm_gap --run dfa-llama --steps 1000           # one arm (a screen), raw result under
                                                                        # benchmarks/results/lm_gap/
    python -m benchmarks.lm_gap --run bp-llama                         # 5000 steps (the table's budget)
    python -m benchmarks.lm_gap --store                                # the 5000-step runs -> the results JSON,
                                                                        # then re-render the page

Every arm is an arm of ``python -m examples.demo`` (same data, seed, batch, AdamW lr 2e-3 with a cosine decay to
zero); :data:`ARMS` says which options it sets and what information its blocks' updates use. ``--store`` adds the
5000-step runs to ``docs/results/language_model.json`` as rows of a table per architecture, with the DFA/backprop
loss ratio against backprop on the same architecture and budget and the step time against that backprop run, then
re-renders the pages (``python -m benchmarks.quality --render-only``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RAW = Path(__file__).parent / "results" / "lm_gap"
RESULTS = Path(__file__).parent.parent / "docs" / "results" / "language_model.json"
STEPS = 5000

_TRANSPORT_FREE = "no weight transport"
#: name -> (demo options, architecture, what the blocks' updates use)
ARMS: dict[str, tuple[str, str, str]] = {
    "bp-llama": ("mode=bp,arch=llama", "llama", "backprop: the transposed forward weights (weight transport)"),
    "dfa-llama": (
        "arch=llama",
        "llama",
        "the default flag: a fixed random B, norm-aware feedback at the points that feed a norm, the head's input as "
        f"the last point, no feedback into the token embedding; {_TRANSPORT_FREE}",
    ),
    "dfa-llama-embeddings": (
        "arch=llama,cut_token_embedding=false",
        "llama",
        "the default flag with cut_token_embedding=False (the token embedding trained by feedback); " + _TRANSPORT_FREE,
    ),
    "kp-llama": (
        "arch=llama,feedback_learning=kolen_pollack",
        "llama",
        "the default flag with feedback_learning='kolen_pollack': per-point B learned from the point's activation "
        f"and the error it receives, decay 0.01; {_TRANSPORT_FREE}, no extra forward",
    ),
    "micro-llama": (
        "arch=llama,placement=micro",
        "llama",
        f"the default flag with placement='micro' (also after attention and the MLP activation); {_TRANSPORT_FREE}",
    ),
    "dfa-gpt2": (
        "mode=dfa",
        "gpt2",
        "the default flag (fixed random B, norm-aware feedback, the head's input as the last point, no feedback into "
        f"the embeddings); {_TRANSPORT_FREE}",
    ),
    "kp-gpt2": (
        "feedback_learning=kolen_pollack",
        "gpt2",
        "the default flag with feedback_learning='kolen_pollack' (as kp-llama); " + _TRANSPORT_FREE,
    ),
}
TABLES = {"gpt2": "Character-level GPT-2, Persuasion", "llama": "Character-level Llama, Persuasion"}
#: the row names of the arms in the rendered tables (``bp``/``dfa`` feed the index page's columns)
ROW_NAMES = {
    "bp-llama": "bp",
    "dfa-llama": "dfa",
    "dfa-llama-embeddings": "dfa, embeddings trained by feedback (cut_token_embedding=False)",
    "kp-llama": "dfa, learned feedback (Kolen-Pollack)",
    "micro-llama": "dfa, micro placement",
    "kp-gpt2": "dfa, learned feedback (Kolen-Pollack)",
}
PAPER_RATIO = math.log(52.0) / math.log(29.8)


def raw_path(name: str, steps: int, seed: int) -> Path:
    return RAW / f"{name}_{steps}_s{seed}.json"


def run(name: str, steps: int, seed: int) -> Path:
    """Train one arm with ``examples.demo`` and store its raw result (curve, test loss, timings)."""
    from examples import demo

    spec, _, _ = ARMS[name]
    path = raw_path(name, steps, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    argv = ["--steps", str(steps), "--lr-decay", "cosine", "--eval-every", str(max(steps // 10, 1)), "--seed"]
    argv += [str(seed), "--no-progress", "--arm", f"{name}:{spec}", "--json", str(path)]
    start = time.time()
    demo.main(argv)
    record = json.loads(path.read_text())
    record["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(start))
    record["command"] = f"python -m benchmarks.lm_gap --run {name} --steps {steps} --seed {seed}"
    root = str(Path(__file__).resolve().parent.parent) + "/"  # paths in the record relative to the repository
    path.write_text(json.dumps(record, indent=1).replace(root, "") + "\n")
    return path


def _row(name: str, result: dict[str, Any], bp: dict[str, Any] | None) -> dict[str, Any]:
    spec, arch, uses = ARMS[name]
    extra: dict[str, Any] = {"what it uses": uses}
    if bp is not None:
        extra["DFA/BP loss ratio"] = "-" if name.startswith("bp") else round(result["test_loss"] / bp["test_loss"], 3)
        extra["step time vs backprop"] = round(result["s_per_step"] / bp["s_per_step"], 2)
    return {
        "table": TABLES[arch],
        "arm": ROW_NAMES.get(name, name),
        "metric": "bits/char",
        "value": result["test_bpc"],
        "higher_is_better": False,
        "steps": result["steps"],
        "wall_s": result["wall_s"],
        "curve": [[c["step"], c["bpc"]] for c in result["curve"]],
        "curve_metric": "bits/char (first 20k chars of Persuasion)",
        "config": spec,
        "extra": extra,
    }


def store(seed: int = 0, names: Sequence[str] = tuple(ARMS)) -> Path:
    """Add the stored 5000-step runs to the results JSON (replacing earlier rows of the same arms), re-render."""
    record = json.loads(RESULTS.read_text())
    runs = {n: json.loads(raw_path(n, STEPS, seed).read_text()) for n in names if raw_path(n, STEPS, seed).exists()}
    bps = {ARMS[n][1]: r["results"][0] for n, r in runs.items() if n.startswith("bp")}
    new = [_row(n, r["results"][0], bps.get(ARMS[n][1])) for n, r in runs.items()]
    keys = {(r["table"], r["arm"]) for r in new}
    rows = [r for r in record["rows"] if (r["table"], r["arm"]) not in keys]
    gpt2 = [r for r in rows if r["table"] == TABLES["gpt2"]]
    bp_gpt2 = next((r for r in gpt2 if r["arm"] == "bp"), None)
    for row in gpt2:  # the stored GPT-2 rows get the same columns
        uses = {"bp": ARMS["bp-llama"][2], "dfa": ARMS["dfa-gpt2"][2]}.get(row["arm"])
        if uses and bp_gpt2 is not None:
            ratio = "-" if row["arm"] == "bp" else round(row["value"] / bp_gpt2["value"], 3)
            time_ratio = round((row["wall_s"] / row["steps"]) / (bp_gpt2["wall_s"] / bp_gpt2["steps"]), 2)
            row["extra"] = {"what it uses": uses, "DFA/BP loss ratio": ratio, "step time vs backprop": time_ratio}
    for row in new:  # the GPT-2 variants are compared with the stored GPT-2 backprop run
        if row["table"] == TABLES["gpt2"] and bp_gpt2 is not None:
            loss = row["value"] / bp_gpt2["value"]  # bits/char ratio = loss ratio
            row["extra"]["DFA/BP loss ratio"] = round(loss, 3)
            row["extra"]["step time vs backprop"] = round(
                (row["wall_s"] / row["steps"]) / (bp_gpt2["wall_s"] / bp_gpt2["steps"]), 2
            )
    record["rows"] = rows + new
    stored = {json.dumps(r, sort_keys=True) for r in record.get("runs", [])}
    for n, r in runs.items():
        entry = {"arms": [ROW_NAMES.get(n, n) + f" ({TABLES[ARMS[n][1]]})"], "command": r.get("command", ""),
                 "date": r.get("date", ""), "machine": MACHINE, "total_s": round(r["total_s"], 1)}  # fmt: skip
        if json.dumps(entry, sort_keys=True) not in stored:
            record.setdefault("runs", []).append(entry)
    RESULTS.write_text(json.dumps(record, indent=1) + "\n")
    from benchmarks import quality

    quality.main(["--render-only", "--out", str(RESULTS.parent.parent)])
    return RESULTS


MACHINE = "a 2-core CPU (AMD EPYC), shared with other jobs (load average 4 to 13), 1 torch thread, nice 10"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lm_gap", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--run", action="append", default=[], choices=list(ARMS), help="train this arm (repeatable)")
    p.add_argument("--steps", type=int, default=STEPS, help=f"optimizer steps (default {STEPS})")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, data order and feedback (default 0)")
    p.add_argument("--store", action="store_true", help="store the 5000-step runs in the results JSON, re-render")
    args = p.parse_args(argv)
    for name in args.run:
        print(f"[lm_gap] stored {run(name, args.steps, args.seed)}", flush=True)
    if args.store:
        print(f"[lm_gap] updated {store(args.seed)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
