"""The command line of ``python -m benchmarks.speed``: :func:`main`."""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.speed.cases import ladder, model_names
from benchmarks.speed.learning import LM_ARMS, WORD_ARMS, lm_runs, merging_saver, word_lm_runs
from benchmarks.speed.machine import machine, malloc_setting, reexec_with_kept_malloc
from benchmarks.speed.measure import PRECISIONS, run_case
from benchmarks.speed.render import DOC, RESULTS, mib, ratio_text, write_doc

__all__ = ["main", "parser"]

EXAMPLES = """examples:
  python -m benchmarks.speed --models gpt2-v8k --tag v8k      # one model, every arm -> results/speed_cpu_v8k.json
  python -m benchmarks.speed --quick --out /tmp/speedq        # smoke run: tiny models, a few steps, seconds
  python -m benchmarks.speed --render                         # rewrite docs/performance.md's tables from the JSON
"""


def parser() -> argparse.ArgumentParser:
    """The argument parser (its ``--help`` is the reference of the options)."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.speed",
        description="Time and peak memory of a DFA training step against a backprop step on the same model,\n"
        "with the FLOP limit beside each ratio; results go to a JSON file.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    names = ", ".join(model_names())
    p.add_argument(
        "--models", default="", help=f"comma-separated models to run: {names} (default: all that fit the device)"
    )
    p.add_argument(
        "--arms",
        default="",
        help="comma-separated DFA arms to keep, e.g. 'dfa,dfa paper' (default: "
        "every arm of each model; backprop always runs)",
    )
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda (default: cuda when available)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    p.add_argument(
        "--precision",
        default="32",
        choices=PRECISIONS,
        help="32-bit, or bfloat16 autocast as Trainer(precision='bf16-mixed') (default: 32)",
    )
    p.add_argument(
        "--malloc",
        default="keep",
        choices=["keep", "system"],
        help="CPU only: 'keep' re-runs under glibc settings that reuse freed memory, as jemalloc does; "
        "'system' keeps the C library's default (default: keep)",
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing (default: 2)")
    p.add_argument(
        "--repeats",
        type=int,
        default=15,
        help="timed rounds; each runs every arm once, in a rotated order (default: 15)",
    )
    p.add_argument(
        "--proj-repeats",
        type=int,
        default=20,
        help="repeats of the timing of the feedback projection alone (default: 20)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: tiny models, a few steps (seconds)")
    p.add_argument("--out", default=str(RESULTS), help="folder for the JSON results (default: benchmarks/results)")
    p.add_argument("--tag", default="", help="suffix of the file name: speed_<device>_<tag>.json (default: none)")
    p.add_argument(
        "--lm",
        action="store_true",
        help="instead of timing, train the language-model example per arm and compare validation "
        "losses (do top-k and sketch projections learn as well as the dense one?)",
    )
    p.add_argument("--lm-steps", type=int, default=300, help="--lm: optimizer steps per arm (default: 300)")
    p.add_argument(
        "--lm-arms",
        default=",".join(LM_ARMS),
        help=f"--lm: comma-separated arms (default: {', '.join(LM_ARMS)}); with --lm-words only the listed "
        f"names that are word-level arms run ({', '.join(WORD_ARMS)})",
    )
    p.add_argument(
        "--lm-words",
        action="store_true",
        help="--lm: a word-level GPT-2 with vocabulary 8192 instead of the character-level model",
    )
    p.add_argument("--lm-seed", type=int, default=0, help="--lm: seed of model, feedback and batch order (default: 0)")
    p.add_argument(
        "--lm-source",
        default="auto",
        help="--lm: where the Austen text comes from: auto, debian or synthetic (default: auto)",
    )
    p.add_argument(
        "--render",
        action="store_true",
        help="do not measure: rewrite the tables of docs/performance.md from the stored JSON",
    )
    return p


def _learning(args: argparse.Namespace, out: Path) -> None:
    steps = 3 if args.quick else args.lm_steps
    path = out / ("lm_projection_words.json" if args.lm_words else "lm_projection.json")
    save = merging_saver(path, lambda: machine(torch.device("cpu")))
    if args.lm_words:
        arms = [a for a in args.lm_arms.split(",") if a in WORD_ARMS]
        word_lm_runs(steps, arms, args.lm_seed, source=args.lm_source, save=save)
    else:
        lm_runs(steps, args.lm_arms.split(","), args.lm_seed, source=args.lm_source, quick=args.quick, save=save)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark as the command line says; ``argv=None`` reads ``sys.argv``.

    Example::

        main(["--quick", "--models", "mlp", "--out", "/tmp/speedq"])  # -> /tmp/speedq/speed_cpu.json
    """
    p = parser()
    args = p.parse_args(argv)
    timing_cpu = not (args.render or args.lm) and torch.device(args.device).type == "cpu"
    if argv is None and timing_cpu and args.malloc == "keep" and malloc_setting() != "keep":
        reexec_with_kept_malloc(sys.argv[1:])  # the command line only: main([...]) never replaces its caller
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    if args.render:
        tables = write_doc()
        print(tables if tables is not None else f"updated the tables of {DOC}")
        return 0
    if args.lm:
        _learning(args, out)
        return 0
    dev = torch.device(args.device)
    cases = ladder(args.quick)
    wanted = [m for m in args.models.split(",") if m]
    if wanted:
        unknown = set(wanted) - {c.name for c in cases}
        if unknown:
            p.error(f"unknown models {sorted(unknown)}; known: {[c.name for c in cases]}")
        cases = [c for c in cases if c.name in wanted]
    else:
        cases = [c for c in cases if dev.type == "cuda" or not c.cuda_only]
    if args.arms:
        keep = set(args.arms.split(","))
        for case in cases:
            case.arms = {k: v for k, v in case.arms.items() if k in keep}
    warmup, repeats, proj = (1, 2, 2) if args.quick else (args.warmup, args.repeats, args.proj_repeats)
    info = machine(dev)
    info["precision"] = args.precision
    results: dict[str, Any] = {"machine": info, "cases": []}
    name = f"speed_{dev.type}{('_' + args.tag) if args.tag else ''}.json"
    for case in cases:
        print(f"{case.name}: {case.description}", flush=True)
        res = run_case(case, dev, warmup, repeats, proj, precision=args.precision)
        for r in res["rows"]:
            wr = ratio_text(r["wall_ratio"]) if "wall_ratio" in r else "-"
            cr = ratio_text(r["cpu_ratio"]) if "cpu_ratio" in r else "-"
            print(
                f"  {r['arm']:24s} wall {r['wall_s'][1]:.3f}s ratio {wr} cpu {cr} limit {r['limit']:.3f} "
                f"counted {r['counted_ratio']:.3f} peak {mib(r['peak_bytes'])} MiB ({r['peak_ratio']:.3f})"
                + (f" issued in {r['issue_s'][1]:.3f}s" if "issue_s" in r else ""),
                flush=True,
            )
        results["cases"].append(res)
        (out / name).write_text(json.dumps(results, indent=1))
        del res
        gc.collect()
    print(f"wrote {out / name}")
    return 0
