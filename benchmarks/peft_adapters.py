"""Every adapter type PEFT offers, on a tiny BERT classifier and a tiny GPT-2, trained with ``strategy="dfa"``.

Usage (from the repository root; about a minute on a CPU, no download)::

    python -m benchmarks.peft_adapters    # prints a markdown table, writes benchmarks/results/peft_adapters.json

For each ``peft.PeftType`` and each model it builds the adapter with ``peft.get_peft_model`` (the first of a few
small configurations that PEFT accepts; a type that fits neither model says why), then trains three steps under
DFA and one under backprop from the same weights and batch, and classifies the outcome:

* ``trains``: every parameter that backprop gives a non-zero gradient gets a finite, non-zero DFA gradient, the
  adapters' gradients are not backprop's, the head's gradient equals backprop's, and the loss is finite;
* ``refused``: DFA stops at set-up or at the first step with an error (its message is kept);
* ``not applicable``: PEFT itself does not build this adapter on the model (its message is kept);
* ``WRONG``: it ran, but some parameter that backprop trains got no DFA gradient, or every adapter got exactly
  backprop's gradient (silent failures: the library must either fix or refuse these).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

VOCAB = 48
TINY = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2, vocab_size=VOCAB)

#: Per model: (task type, modules targeted by weight adapters, feed-forward modules among them, head name part)
MODELS: dict[str, dict[str, Any]] = {
    "bert": {"task": "SEQ_CLS", "targets": ["query", "value", "intermediate.dense"], "ff": ["intermediate.dense"]},
    "gpt2": {"task": "CAUSAL_LM", "targets": ["c_attn", "c_fc"], "ff": ["c_fc"]},
}


def build_model(name: str) -> nn.Module:
    import transformers as hf

    torch.manual_seed(0)
    if name == "bert":
        cfg = hf.BertConfig(num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **TINY)
        return hf.BertForSequenceClassification(cfg)
    cfg = hf.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, n_positions=32, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
    )  # fmt: skip
    return hf.GPT2LMHeadModel(cfg)


def _candidates(ptype: str, model: str) -> list[dict[str, Any]]:
    """Configurations to try, in order (the first that PEFT builds is used)."""
    spec = MODELS[model]
    targets, ff = spec["targets"], spec["ff"]
    prompt = {"num_virtual_tokens": 4}
    if ptype in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"):
        return [dict(prompt, encoder_hidden_size=32) if ptype == "P_TUNING" else prompt]
    if ptype == "MULTITASK_PROMPT_TUNING":
        return [dict(prompt, num_tasks=1)]
    if ptype == "CARTRIDGE":
        return [prompt]
    if ptype == "CPT":
        return [{"cpt_token_ids": [1, 2, 3], "cpt_mask": [1, 1, 1], "cpt_tokens_type_mask": [1, 2, 2]}]
    if ptype == "IA3":
        return [{"target_modules": targets, "feedforward_modules": ff}]
    if ptype == "TRAINABLE_TOKENS":
        return [{"token_indices": [1, 2, 3]}]
    if ptype == "ADAPTION_PROMPT":
        return [{"adapter_len": 4, "adapter_layers": 1}]
    if ptype == "LN_TUNING":
        return [{}, {"target_modules": ["LayerNorm"]}]
    sized = {"OFT": {"oft_block_size": 4, "r": 0}, "VBLORA": {"r": 4, "vector_length": 8, "num_vectors": 16},
             "C3A": {"block_size": 8}, "WAVEFT": {"n_frequency": 64}}  # fmt: skip
    if ptype in sized:
        return [{"target_modules": targets, **sized[ptype]}, {"target_modules": targets, "r": 4}]
    if ptype == "XLORA":
        return [{"hidden_size": 32, "adapters": {}}]
    if ptype == "POLY":
        return [{"target_modules": targets, "r": 2, "n_tasks": 1}]
    if ptype == "VERA":
        return [{"target_modules": ff, "r": 4}, {"target_modules": targets, "r": 4}]
    attention = targets[:1]
    return [
        {"target_modules": targets, "r": 4},
        {"target_modules": targets},
        {"target_modules": attention, "r": 4},
        {"target_modules": attention},
        {"target_modules": ff},
        {"target_modules": targets, "r": 4, "total_step": 10},
    ]


def build_adapter(ptype: str, model: str) -> tuple[nn.Module | None, str]:
    """``(peft model, configuration used)``, or ``(None, PEFT's message)`` when no candidate builds."""
    import peft

    config_cls = peft.PEFT_TYPE_TO_CONFIG_MAPPING.get(ptype)
    if config_cls is None:
        return None, "no configuration class"
    errors: list[str] = []
    for kwargs in _candidates(ptype, model):
        try:
            cfg = config_cls(task_type=MODELS[model]["task"], **kwargs)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return peft.get_peft_model(build_model(model), cfg), str(kwargs)
        except Exception as err:  # PEFT's refusal, kept as the reason
            errors.append(f"{type(err).__name__}: {str(err).splitlines()[0][:160]}")
    # the most telling reason: one about the model rather than about a keyword this type does not take
    telling = [e for e in errors if "unexpected keyword argument" not in e]
    return None, (telling or errors or ["no configuration tried"])[0]


_TASK_IDS = ("POLY", "MULTITASK_PROMPT_TUNING")  # adapter types whose forward takes task ids


class _Module(pl.LightningModule):
    def __init__(self, net: nn.Module, kind: str) -> None:
        super().__init__()
        self.net, self.kind = net, kind
        self.losses: list[float] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        labels = batch if self.kind == "gpt2" else batch[:, 0] % 3
        extra: dict[str, Any] = {}
        if getattr(getattr(self.net, "peft_config", {}).get("default"), "peft_type", None) in _TASK_IDS:
            extra["task_ids"] = torch.zeros(len(batch), dtype=torch.long)  # one task
        loss = self.net(input_ids=batch, labels=labels, **extra).loss
        self.losses.append(float(loss))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=1e-2)


class _Grads(pl.Callback):
    def __init__(self) -> None:
        self.first: dict[str, torch.Tensor | None] | None = None

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        if self.first is None:
            self.first = {
                n: None if p.grad is None else p.grad.detach().clone()
                for n, p in pl_module.named_parameters()
                if p.requires_grad
            }


def _data() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.randint(1, VOCAB, (16, 1), generator=g) + torch.arange(12)) % VOCAB


def _train(net: nn.Module, kind: str, strategy: Any, steps: int) -> tuple[_Module, _Grads]:
    from torch.utils.data import DataLoader

    rec = _Grads()
    module = _Module(net, kind)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, max_steps=steps, strategy=strategy, callbacks=[rec],
    )  # fmt: skip
    trainer.fit(module, DataLoader(_data(), batch_size=8))
    return module, rec


def check(ptype: str, model: str) -> dict[str, Any]:
    """One cell of the table: ``{"peft_type", "model", "outcome", "detail"}``."""
    from lightning_dfa import DFAStrategy

    out: dict[str, Any] = {"peft_type": ptype, "model": model}
    bp_net, used = build_adapter(ptype, model)
    if bp_net is None:
        return {**out, "outcome": "not applicable", "detail": used}
    out["config"] = used
    try:
        _, bp = _train(bp_net, model, "auto", 1)
    except Exception as err:
        return {**out, "outcome": "not applicable", "detail": f"backprop fails too: {type(err).__name__}: {err}"}
    dfa_net, _ = build_adapter(ptype, model)
    strategy = DFAStrategy(verbose=False)
    try:
        module, dfa = _train(dfa_net, model, strategy, 3)
    except Exception as err:
        return {**out, "outcome": "refused", "detail": f"{type(err).__name__}: {str(err).splitlines()[0]}"}
    assert bp.first is not None and dfa.first is not None
    trained = [n for n, g in bp.first.items() if g is not None and bool(torch.any(g != 0))]
    missing = [n for n in trained if dfa.first.get(n) is None or not bool(torch.any(dfa.first[n] != 0))]
    bad = [n for n, g in dfa.first.items() if g is not None and not bool(torch.isfinite(g).all())]
    target = strategy.dfa_engine.target if strategy.dfa_engine is not None else None
    out_name = target.output_name if target is not None else ""
    head = [n for n in trained if n.startswith(out_name + ".") or n.startswith(out_name.removeprefix("net.") + ".")]
    head_equal = all(torch.allclose(bp.first[n], dfa.first[n], atol=1e-6) for n in head if dfa.first.get(n) is not None)
    finite = all(torch.isfinite(torch.tensor(v)) for v in module.losses)
    out["trainable"] = len(bp.first)
    out["trained_by_bp"] = len(trained)
    out["output"] = out_name
    body = [n for n in trained if n not in head]
    same = [n for n in body if torch.allclose(bp.first[n], dfa.first[n], rtol=1e-4, atol=1e-7)]
    if body and len(same) == len(body) and not (missing or bad):
        return {**out, "outcome": "WRONG", "detail": f"the DFA gradient equals backprop's for {same[:3]}"}
    if missing or bad or not finite:
        detail = f"no DFA gradient for {missing[:3]}" if missing else f"non-finite: {bad[:3] or module.losses}"
        return {**out, "outcome": "WRONG", "detail": detail}
    return {
        **out,
        "outcome": "trains",
        "detail": f"{len(trained)} tensors; head gradient equal to backprop's: {head_equal}",
    }


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run every PEFT type on both models; print the table and store the JSON."""
    import peft

    parser = argparse.ArgumentParser(prog="python -m benchmarks.peft_adapters", description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", default=None, help="comma-separated PeftType names (default: all)")
    parser.add_argument("--out", default="benchmarks/results/peft_adapters.json", help="JSON output ('' to skip)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    types = args.types.split(",") if args.types else [t.value for t in peft.PeftType]
    rows = [check(t, m) for t in types for m in MODELS]
    print("| PEFT type | BERT classifier | GPT-2 |\n|---|---|---|")
    for t in types:
        cells = [next(r for r in rows if r["peft_type"] == t and r["model"] == m) for m in MODELS]
        print(f"| {t} | " + " | ".join(f"{c['outcome']}: {c['detail']}" for c in cells) + " |")
    if args.out:
        record = {
            "rows": rows,
            "peft": peft.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "python -m benchmarks.peft_adapters " + " ".join(argv if argv is not None else sys.argv[1:]),
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
