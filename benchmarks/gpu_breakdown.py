"""Where a GPU training step's time goes, backprop against the default DFA flag (GPT-2 small, CUDA only).

Four parts (``--parts``; the first three unless told), each written to ``--out``:

* ``kernels``: one profiled step per arm (``torch.profiler``, after warm-up): GPU kernel time summed by kernel
  name, the step's GPU busy time against its wall time (the difference is time the GPU waited for the host),
  and the kernels whose time differs most between the arms;
* ``engine``: the engine's own work timed alone with CUDA events: the structured projection of a
  ``[tokens, 50257]`` error and its stages, and the norm-aware feedback of every point;
* ``sketch_first_stage``: equivalent ways of computing the projection's first stage (the same matrix), timed
  and checked against the engine's result;
* ``host``: where the host's time to issue a step goes, per arm (``cProfile`` over a few steps): the host time
  per step, and the functions of the engine and of the model's code that take most of it. Where the host issues a
  step more slowly than the GPU runs it (bf16-mixed), this is the step's time.

Usage::

    python -m benchmarks.gpu_breakdown --precision bf16-mixed --out /tmp/out
    python -m benchmarks.gpu_breakdown --precision bf16-mixed --parts host --out /tmp/out   # the host side only
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.speed.cases import ladder
from benchmarks.speed.measure import Arm, Bench, _sync
from lightning_dfa.projectors.random import sketch_first_stage


def _events_time(fn: Callable[[], Any], repeats: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``fn`` between CUDA events (host clock on the CPU: smoke runs)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if not torch.cuda.is_available():
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernels(bench: Bench, arms: list[Arm], top: int = 25) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    out: dict[str, Any] = {}
    for arm in arms:
        for _ in range(3):
            bench.timed_step(arm)
        with arm.attached(bench.model):
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.dev.type == "cuda" else [])
            with profile(activities=activities) as prof:
                t0 = time.perf_counter()
                bench.step(arm)
                if bench.dev.type == "cuda":
                    torch.cuda.synchronize()
                wall_ms = (time.perf_counter() - t0) * 1e3
        per_kernel: dict[str, float] = defaultdict(float)
        count = 0
        spans = []
        for e in prof.events():
            # kernels only: not the ranges user code marks on the GPU's timeline (the optimizer's step)
            if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False):
                per_kernel[e.name[:90]] += e.device_time / 1e3
                count += 1
                spans.append((e.time_range.start, e.time_range.end))
        busy = 0.0
        last = -math.inf
        for s, t in sorted(spans):  # union of the kernels' intervals (us)
            if s >= last:
                busy += t - s
                last = t
            elif t > last:
                busy += t - last
                last = t
        out[arm.name] = {
            "wall_ms": wall_ms,
            "busy_ms": busy / 1e3,
            "kernels": count,
            "per_kernel_ms": dict(sorted(per_kernel.items(), key=lambda kv: -kv[1])),
        }
    base = out[arms[0].name]["per_kernel_ms"]
    for arm in arms[1:]:
        mine = out[arm.name]["per_kernel_ms"]
        diff = {k: mine.get(k, 0.0) - base.get(k, 0.0) for k in set(base) | set(mine)}
        out[arm.name]["largest_differences_ms"] = dict(sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:top])
    return out


def engine_parts(bench: Bench, arm: Arm, dtype: torch.dtype) -> dict[str, float]:
    """Milliseconds of the default arm's engine work, alone, on a softmax-minus-one-hot error of ``dtype``."""
    from lightning_dfa.norms import norm_vjp

    case, dev = bench.case, bench.dev
    n, k = math.prod(case.error_shape[:-1]), case.error_shape[-1]
    g = torch.Generator(device=dev).manual_seed(1)
    error = torch.softmax(torch.randn(n, k, device=dev, generator=g) * 2, -1)
    error[torch.arange(n, device=dev), torch.randint(0, k, (n,), device=dev, generator=g)] -= 1
    error = (error / n).to(dtype)
    engine = arm.engine
    points = engine.last_points
    acts = [None if p.norm is None else torch.randn(p.shape, device=dev, generator=g).to(dtype) for p in points]
    projector = engine._projector_for("", dev, dtype)
    width = max(p.shape[-1] for p in points)
    bank = projector.bank
    src = projector._source
    out: dict[str, float] = {}
    with torch.no_grad():
        out["feedback_for (all points)"] = _events_time(lambda: engine.feedback_for(error, points, acts))
        out["projection"] = _events_time(lambda: projector.project(error, width))
        out["sketch matrices (hash)"] = _events_time(lambda: bank.sketch(k, width, dev, dtype, source=src))
        gg, a, big = bank.sketch(k, width, dev, dtype, source=src)
        out["first stage (bmm)"] = _events_time(lambda: sketch_first_stage(error, a, gg))
        y = sketch_first_stage(error, a, gg).flatten(1)
        out["second stage (GEMM)"] = _events_time(lambda: y @ big)
        fb = torch.randn(n, width, device=dev, generator=g).to(dtype)
        normed = [(h, p) for h, p in zip(acts, points) if p.norm is not None]
        out[f"norm_vjp x {len(normed)}"] = _events_time(
            lambda: [norm_vjp(h.reshape(n, -1), fb[:, : h.shape[-1]], p.norm) for h, p in normed]
        )
        out["read the error once (sum)"] = _events_time(lambda: error.sum(0))
    out["error_bytes"] = error.numel() * error.element_size()
    return out


def _triton_first_stage() -> Callable | None:
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def first_stage(e_ptr, a_ptr, y_ptr, k, g, m, stride_e, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = j < g
        acc0 = tl.zeros([BLOCK], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK], dtype=tl.float32)
        acc3 = tl.zeros([BLOCK], dtype=tl.float32)
        base = e_ptr + row.to(tl.int64) * stride_e
        for i in range(0, m):
            cols = i * g + j
            e = tl.load(base + cols, mask=inside & (cols < k), other=0.0).to(tl.float32)
            acc0 += tl.load(a_ptr + i).to(tl.float32) * e
            acc1 += tl.load(a_ptr + m + i).to(tl.float32) * e
            acc2 += tl.load(a_ptr + 2 * m + i).to(tl.float32) * e
            acc3 += tl.load(a_ptr + 3 * m + i).to(tl.float32) * e
        out = y_ptr + row.to(tl.int64) * 4 * g + j
        tl.store(out, acc0.to(y_ptr.dtype.element_ty), mask=inside)
        tl.store(out + g, acc1.to(y_ptr.dtype.element_ty), mask=inside)
        tl.store(out + 2 * g, acc2.to(y_ptr.dtype.element_ty), mask=inside)
        tl.store(out + 3 * g, acc3.to(y_ptr.dtype.element_ty), mask=inside)

    def run(error: torch.Tensor, a: torch.Tensor, g: int, block: int = 256) -> torch.Tensor:
        n, k = error.shape
        m = a.shape[1]
        y = torch.empty(n, 4, g, device=error.device, dtype=error.dtype)
        first_stage[(n, triton.cdiv(g, block))](error, a.contiguous(), y, k, g, m, error.stride(0), BLOCK=block)
        return y

    return run


def first_stage_variants(bench: Bench, dtype: torch.dtype) -> dict[str, Any]:
    """The projection's first stage ``Y[n, c, j] = sum_i A[c, i] E[n, i g + j]`` computed several ways."""
    case, dev = bench.case, bench.dev
    n, k = math.prod(case.error_shape[:-1]), case.error_shape[-1]
    gen = torch.Generator(device=dev).manual_seed(2)
    error = (torch.softmax(torch.randn(n, k, device=dev, generator=gen), -1) / n).to(dtype)
    g = math.isqrt(k - 1) + 1
    m = -(-k // g)
    full, rest = divmod(k, g)
    a = torch.randn(4, m, device=dev, generator=gen).to(dtype)

    def current() -> torch.Tensor:
        return sketch_first_stage(error, a, g)

    def transposed() -> torch.Tensor:
        grid = error[:, : full * g].unflatten(1, (full, g))
        y = torch.matmul(grid.transpose(1, 2), a[:, :full].t()).transpose(1, 2)  # [n, 4, g] (strided)
        if rest:
            y = y.contiguous()
            y[:, :, :rest].add_(a[:, full].view(1, 4, 1) * error[:, full * g :].unsqueeze(1))
        return y

    def padded_gemm() -> torch.Tensor:
        # copy into [m, n, g] (zero-padded), then one [4, m] @ [m, n g] GEMM
        pad = torch.nn.functional.pad(error, (0, m * g - k)).view(n, m, g).transpose(0, 1).reshape(m, n * g)
        return (a @ pad).view(4, n, g).transpose(0, 1)

    def conv() -> torch.Tensor:
        grid = error[:, : full * g].unflatten(1, (full, g))
        y = torch.nn.functional.conv1d(grid, a[:, :full].unsqueeze(-1))
        if rest:
            y[:, :, :rest].add_(a[:, full].view(1, 4, 1) * error[:, full * g :].unsqueeze(1))
        return y

    variants: dict[str, Callable[[], torch.Tensor]] = {
        "bmm (current)": current,
        "transposed bmm": transposed,
        "pad + one GEMM": padded_gemm,
        "conv1d": conv,
    }
    tri = _triton_first_stage() if error.is_cuda else None  # (Triton compiles for a GPU only)
    if tri is not None:
        variants["triton kernel"] = lambda: tri(error, a, g)
    # the other layout (v = r m + s): one contiguous [n g, m] @ [m, 4] GEMM (a different matrix, for scale)
    padded = torch.nn.functional.pad(error, (0, m * g - k))
    variants["other layout: [n g, m] @ [m, 4]"] = lambda: padded.view(n * g, m) @ a.t()
    ref = current().float()
    out: dict[str, Any] = {"error_dtype": str(dtype), "g": g, "m": m}
    for name, fn in variants.items():
        try:
            with torch.no_grad():
                y = fn()
                err = None
                if not name.startswith("other layout"):
                    err = float((y.float() - ref).norm() / ref.norm())
                ms = _events_time(fn)
            out[name] = {"ms": ms, "rel_err": err}
        except Exception as exc:  # report and go on: one failing variant must not cost the run
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return out


def host(bench: Bench, arms: list[Arm], steps: int = 10, top: int = 25) -> dict[str, Any]:
    """Per arm: the host milliseconds per step (median, until the last kernel is queued), and the functions that take
    most of it over ``steps`` profiled steps (``cProfile``: own and cumulative milliseconds per step)."""
    import cProfile
    import pstats

    out: dict[str, Any] = {}
    for arm in arms:
        for _ in range(3):
            bench.timed_step(arm)
        issue = []
        with arm.attached(bench.model):
            for _ in range(steps):
                _sync(bench.dev)
                t0 = time.perf_counter()
                bench.step(arm)
                issue.append((time.perf_counter() - t0) * 1e3)
            _sync(bench.dev)
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(steps):
                bench.step(arm)
            profiler.disable()
            _sync(bench.dev)
        stats = pstats.Stats(profiler).stats  # {(file, line, name): (calls, primitive, own s, cumulative s, callers)}
        rows = [
            (f"{Path(f).name}:{line}({name})", calls, own * 1e3 / steps, cum * 1e3 / steps)
            for (f, line, name), (_, calls, own, cum, _) in stats.items()
        ]
        entries = [
            {"function": f, "calls_per_step": c / steps, "own_ms": round(o, 3), "cumulative_ms": round(t, 3)}
            for f, c, o, t in rows
        ]
        engine = [e for e in entries if e["function"].split(":")[0] in _ENGINE_FILES]
        out[arm.name] = {
            "issue_ms": statistics.median(issue),
            "by_own_time": sorted(entries, key=lambda e: -e["own_ms"])[:top],
            "engine_by_cumulative_time": sorted(engine, key=lambda e: -e["cumulative_ms"])[:top],
        }
    return out


#: the engine's modules, as :func:`host` names them (file name only)
_ENGINE_FILES = {p.name for p in (Path(__file__).parent.parent / "lightning_dfa").rglob("*.py") if p.stem != "__init__"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", default="bf16-mixed", choices=["32", "bf16-mixed"])
    ap.add_argument("--model", default="gpt2-small")
    ap.add_argument("--arms", default="dfa", help="comma-separated arms of the model besides bp")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run (use a small --model)")
    ap.add_argument(
        "--parts",
        default="kernels,engine,first_stage",
        help="comma-separated parts to run: kernels, engine, first_stage, host (default: the first three)",
    )
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    dev = torch.device(args.device)
    case = next(c for c in ladder(quick=False) if c.name == args.model)
    torch.manual_seed(0)
    model = case.build().to(dev)
    model.train()
    bench = Bench(case, model, torch.optim.AdamW(model.parameters(), lr=1e-5), case.batch(dev), dev, args.precision)
    arms = [Arm("bp", None)] + [Arm(n, case.arms[n]) for n in args.arms.split(",")]
    result: dict[str, Any] = {"model": case.description, "precision": args.precision}
    result["gpu"] = torch.cuda.get_device_name() if dev.type == "cuda" else "none"
    result["torch"] = torch.__version__
    dtype = torch.bfloat16 if args.precision == "bf16-mixed" else torch.float32
    if "kernels" in parts:
        result["kernels"] = kernels(bench, arms)
    if "engine" in parts:
        result["engine"] = engine_parts(bench, arms[1], dtype)
    if "first_stage" in parts:
        result["sketch_first_stage"] = first_stage_variants(bench, dtype)
    if "host" in parts:
        result["host"] = host(bench, arms)
    suffix = "" if parts == {"kernels", "engine", "first_stage"} else "_" + "_".join(sorted(parts))
    path = Path(args.out) / f"gpu_breakdown_{args.model}_{args.precision}{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    for arm, r in result.get("kernels", {}).items():
        print(f"{arm}: wall {r['wall_ms']:.2f} ms, GPU busy {r['busy_ms']:.2f} ms, {r['kernels']} kernels")
        for name, ms in list(r.get("largest_differences_ms", {}).items())[:12]:
            print(f"   {ms:+8.3f} ms  {name}")
    if "engine" in result:
        print("engine:", {k: round(v, 3) for k, v in result["engine"].items() if isinstance(v, float)})
    for name, r in result.get("sketch_first_stage", {}).items():
        print("first stage:", name, r)
    for arm, r in result.get("host", {}).items():
        print(f"host, {arm}: {r['issue_ms']:.2f} ms per step")
        for row in r["engine_by_cumulative_time"][:12]:
            print(f"   {row['cumulative_ms']:8.3f} ms cumulative, {row['own_ms']:7.3f} own  {row['function']}")
    print("wrote", path)


if __name__ == "__main__":
    main()
