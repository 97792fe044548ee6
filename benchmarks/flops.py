"""Analytic multiply-add (MAC) counts of one training step, backprop vs DFA.

Only the matrix products are counted (GEMMs, attention's two batched products, a GCN's sparse aggregation as
one multiply-add per edge and feature); elementwise work (norms, activations, softmax, the optimizer) is left
out, so the ratio ``DFA / BP`` of these totals is the best a DFA step can do against a backprop step: the
*limit* against which ``benchmarks/speed/`` (``python -m benchmarks.speed``) holds the measured ratios.

Backward of a linear map ``y = x W`` costs a weight gradient (as many MACs as the forward) and, when ``x``
carries gradient, an input gradient (as many again). DFA removes the input gradients that cross a feedback point
(the point's downstream sees a detached value) and adds ONE projection ``e @ B`` per error width (shared by all
points of that width, or ``topk`` rows per token with the ``topk`` option).

Example:
    >>> dense = {"recipe": "paper", "cut_head_input": True, "blocks": ["transformer.h.*.ln_1"]}
    >>> r = gpt2_macs(8192, 256, 6, 128, 8, dense)
    >>> round(r["total"] / gpt2_macs(8192, 256, 6, 128, 8, None)["total"], 3)
    0.945
"""

from __future__ import annotations

import math
from typing import Any

from lightning_dfa.projectors.bank import uses_sketch


def _blocks_have(options: dict[str, Any] | None, suffix: str) -> bool:
    blocks = (options or {}).get("blocks") or []
    blocks = [blocks] if isinstance(blocks, str) else blocks
    return any(isinstance(b, str) and b.endswith(suffix) for b in blocks)


def gpt2_macs(
    vocab: int, d: int, layers: int, ctx: int, batch: int, options: dict[str, Any] | None
) -> dict[str, float]:
    """MACs of one step of a GPT-2 LM (``options=None``: backprop; else the DFA engine's options).

    Per token and layer the forward has ``12 d^2`` (QKV 3, attention projection 1, MLP 4 + 4) and attention
    ``2 T d`` (scores and weighted sum over the full ``T x T``), the head ``V d``. DFA options counted:
    ``recipe`` (``"auto"``: ``cut_head_input``, ``norm_points`` and ``sketch`` unless set), ``cut_head_input`` (no
    head input gradient), ``norm_points`` or ``blocks`` naming ``*.ln_1`` / ``*.ln_2`` (no input gradient
    of ``c_attn`` (3 d^2) / ``c_fc`` (4 d^2)), ``topk``, ``sketch``, ``error_at="head_input"``, and
    ``cut_token_embedding`` (nothing before the first block carries gradient to cut, or with
    ``tables_from_first_block`` and a tied head its input is not cut: either way its ``ln_1`` is no point, and its
    ``c_attn`` computes its input gradient, for ``ln_1``'s parameters and the position table).
    """
    n = batch * ctx
    attn = 2 * n * ctx * d
    out = {
        "forward": layers * (12 * n * d * d + attn) + n * vocab * d,
        "weight_grads": layers * 12 * n * d * d + n * vocab * d,
        "input_grads": layers * 12 * n * d * d,
        "attention_backward": layers * 2 * attn,
        "head_input_grad": n * vocab * d,
        "projection": 0,
    }
    if options is not None:
        o = options
        auto = o.get("recipe", "auto") == "auto"  # the recipe's choices for options left unset (a GPT-2 LM head widens)
        cut = o.get("cut_head_input")
        cut = auto and o.get("error_at", "output") == "output" and vocab > d if cut is None else cut
        sketch = o.get("sketch")
        sketch = auto and o.get("topk") is None if sketch is None else sketch
        points = o.get("norm_points")
        ln1 = _blocks_have(o, ".ln_1") or (auto if points is None else points)  # ln_1 reads each block's input
        saved = 3 * ln1 + 4 * _blocks_have(o, ".ln_2")
        cutting = o.get("cut_token_embedding")
        first = auto if cutting is None else cutting  # the first block's ln_1 reads no point
        out["input_grads"] -= (layers * saved - 3 * ln1 * first) * n * d * d
        if cut:
            out["head_input_grad"] = 0
        if o.get("error_at") == "head_input":
            out["projection"] = n * d * d
        elif sketch and uses_sketch(vocab, d):
            out["projection"] = n * sketch_macs(vocab, d)
        else:
            k = o.get("topk")
            out["projection"] = n * d * (k if k is not None and k < vocab else vocab)
    out["total"] = sum(out.values())
    return out


def sketch_macs(k: int, d: int) -> int:
    """MACs per row of the ``sketch`` projection of a width-``k`` error to width ``d``: one pass over the error with
    four multiply-adds per entry (``4 k``) and a small GEMM (``4 g d``, ``g = max(sqrt(k), d / 4)``).

    Example:
        >>> round(sketch_macs(50257, 256) / (50257 * 256), 3)  # against the dense projection
        0.034
    """
    g = min(k, max(math.isqrt(k - 1) + 1, -(-d // 4)))
    return 4 * k + 4 * g * d


def mlp_macs(sizes: list[int], batch: int, options: dict[str, Any] | None) -> dict[str, float]:
    """MACs of one step of an MLP ``sizes[0] -> ... -> sizes[-1]`` whose hidden layers are the feedback points."""
    pairs = list(zip(sizes[:-1], sizes[1:]))
    fwd = batch * sum(a * b for a, b in pairs)
    out = {"forward": fwd, "weight_grads": fwd, "input_grads": batch * sum(a * b for a, b in pairs[1:])}
    out["projection"] = 0
    if options is not None:
        out["input_grads"] = 0  # every layer's input is a detached feedback point (or the raw input)
        k = options.get("topk")
        width = sizes[-1] if k is None or k >= sizes[-1] else k
        out["projection"] = batch * width * max(sizes[1:-1])
    out["total"] = sum(out.values())
    return out


def gcn_macs(
    nodes: int, edges: int, n_in: int, hidden: int, n_out: int, layers: int, options: dict[str, Any] | None
) -> dict[str, float]:
    """MACs of one full-batch step of ``layers`` GCNConv (``A X W``) and a Linear head (``edges`` directed)."""
    dims = [n_in] + [hidden] * layers
    lin = sum(nodes * a * b for a, b in zip(dims[:-1], dims[1:]))
    agg = layers * edges * hidden
    head = nodes * hidden * n_out
    out = {
        "forward": lin + agg + head,
        "weight_grads": lin + head,
        "aggregation_backward": agg,
        "input_grads": lin - nodes * n_in * hidden + head,  # the raw features carry no gradient
        "projection": 0,
    }
    if options is not None:
        out["input_grads"] = 0
        out["projection"] = nodes * n_out * hidden
    out["total"] = sum(out.values())
    return out
