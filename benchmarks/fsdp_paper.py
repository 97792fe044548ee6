"""Per-device communication and activation memory of one FSDP (full shard) training step, backprop against DFA,
worked out from formulas (no run): ``python -m benchmarks.fsdp_paper`` writes ``benchmarks/results/fsdp_paper.json``
and prints the table of ``docs/performance.md``.

Assumptions: a Llama-style decoder (d 2048, 16 layers, SwiGLU FFN 8192, full multi-head attention, vocabulary 32000,
untied head: 1.20 B parameters), one sequence of 2048 tokens per device, bf16 parameters, gradients reduced in
bf16, FlashAttention (no ``s x s`` term), no activation checkpointing unless stated, DFA's default recipe (a point
at each block output and at each block's first norm, the head's input as the last point).
"""

from __future__ import annotations

import json
from pathlib import Path

D, LAYERS, FFN, VOCAB, TOKENS = 2048, 16, 8192, 32000, 2048
BF16 = 2
PARAMS = LAYERS * (4 * D * D + 3 * D * FFN) + 2 * VOCAB * D
# activations a block saves for its backward, per token, in bytes: Korthikanti et al. (2022), 34 d bytes for a
# Transformer layer without dropout masks and without the attention matrix
LAYER_ACTIVATIONS = 34 * TOKENS * D
LOGITS = TOKENS * VOCAB * (BF16 + 4)  # bf16 logits and the fp32 softmax of the loss
POINTS = 2 * LAYERS + 1  # block outputs, first norms, head input


def per_device(n: int) -> dict[str, float]:
    gather = BF16 * PARAMS * (n - 1) / n  # one ring all-gather of the bf16 parameters, bytes received per device
    activations = LAYERS * LAYER_ACTIVATIONS + LOGITS
    checkpointed = LAYERS * TOKENS * D * BF16 + LAYER_ACTIVATIONS + LOGITS  # block inputs + one block recomputed
    feedback = POINTS * TOKENS * D * BF16  # DFA: every point's feedback is computed at once at the output
    gb = 1e9
    return {
        "devices": n,
        "communication_backprop_GB": 3 * gather / gb,  # all-gather forward, all-gather backward, reduce-scatter
        "communication_dfa_GB": 3 * gather / gb,
        "activations_backprop_GB": activations / gb,
        "activations_dfa_GB": (activations + feedback) / gb,
        "activations_checkpointed_backprop_GB": checkpointed / gb,
        "activations_checkpointed_dfa_GB": (checkpointed + feedback) / gb,
        "sharded_states_GB": 16 * PARAMS / n / gb,  # bf16 params and grads, fp32 master weights and Adam moments
    }


def main() -> None:
    rows = [per_device(n) for n in (8, 64)]
    result = {"parameters": PARAMS, "tokens_per_device": TOKENS, "d": D, "layers": LAYERS, "rows": rows}
    out = Path(__file__).parent / "results" / "fsdp_paper.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"parameters {PARAMS / 1e9:.3f} B")
    for row in rows:
        print(" | ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
