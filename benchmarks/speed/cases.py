"""The models of the speed benchmark: each :class:`Case` builds a model and a batch, and names its DFA arms.

The ladder runs from a small MLP and a GCN to GPT-2 shapes with vocabularies of 512 to 50257. An *arm* is a set
of :class:`~lightning_dfa.engine.FeedbackEngine` options (``{}`` = the default flag), timed against plain backprop
on the same model instance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from benchmarks.flops import gcn_macs, gpt2_macs, mlp_macs

__all__ = ["GCN", "Case", "gpt2_arms", "ladder", "model_names"]


@dataclass
class Case:
    """One model of the ladder: how to build it and a batch, the loss, the DFA arms and their FLOP account."""

    name: str
    description: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.device], tuple[Any, ...]]
    loss: Callable[[nn.Module, tuple[Any, ...]], torch.Tensor]
    arms: dict[str, dict[str, Any]]
    macs: Callable[[dict[str, Any] | None], dict[str, float]]
    error_shape: tuple[int, ...] = ()
    head_weight: Callable[[nn.Module], torch.Tensor] | None = None
    cuda_only: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


def _gpt2_case(
    name: str, vocab: int, d: int, layers: int, ctx: int, batch: int, arms: dict[str, dict[str, Any]], **kw: Any
) -> Case:
    heads = max(1, d // 64)

    def build() -> nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        cfg = GPT2Config(
            vocab_size=vocab,
            n_embd=d,
            n_layer=layers,
            n_head=heads,
            n_positions=ctx,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
        return GPT2LMHeadModel(cfg)

    def make_batch(device: torch.device) -> tuple[Any, ...]:
        g = torch.Generator().manual_seed(0)
        return (torch.randint(0, vocab, (batch, ctx + 1), generator=g).to(device),)

    def loss(model: nn.Module, b: tuple[Any, ...]) -> torch.Tensor:
        ids = b[0]
        logits = model(input_ids=ids[:, :-1]).logits
        return nn.functional.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))

    def macs(options: dict[str, Any] | None) -> dict[str, float]:
        return gpt2_macs(vocab, d, layers, ctx, batch, options)

    desc = f"GPT-2 (HF), vocabulary {vocab}, d {d}, {layers} layers, {heads} heads, context {ctx}, batch {batch}"
    return Case(
        name,
        desc,
        build,
        make_batch,
        loss,
        arms,
        macs,
        error_shape=(batch, ctx, vocab),
        head_weight=lambda m: m.lm_head.weight,
        **kw,
    )


def _mlp_case(name: str, sizes: list[int], batch: int, arms: dict[str, dict[str, Any]]) -> Case:
    def build() -> nn.Module:
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-2], sizes[1:-1]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(sizes[-2], sizes[-1]))
        return nn.Sequential(*layers)

    def make_batch(device: torch.device) -> tuple[Any, ...]:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, sizes[0], generator=g)
        y = torch.randint(0, sizes[-1], (batch,), generator=g)
        return x.to(device), y.to(device)

    def loss(model: nn.Module, b: tuple[Any, ...]) -> torch.Tensor:
        return nn.functional.cross_entropy(model(b[0]), b[1])

    return Case(
        name,
        f"MLP {'-'.join(map(str, sizes))} (ReLU), batch {batch}",
        build,
        make_batch,
        loss,
        arms,
        lambda o: mlp_macs(sizes, batch, o),
        error_shape=(batch, sizes[-1]),
        head_weight=lambda m: m[-1].weight,
    )


class GCN(nn.Module):
    """``layers`` GCNConv + ReLU (the feedback points), then a Linear classifier (the output module)."""

    def __init__(self, n_in: int, hidden: int, n_out: int, layers: int) -> None:
        super().__init__()
        from torch_geometric.nn import GCNConv

        dims = [n_in] + [hidden] * layers
        self.convs = nn.ModuleList(GCNConv(a, b, cached=True) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = torch.relu(conv(x, edge_index))
        return self.head(x)


def _gcn_case(name: str, nodes: int, edges: int, n_in: int, hidden: int, n_out: int, layers: int) -> Case:
    def make_batch(device: torch.device) -> tuple[Any, ...]:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(nodes, n_in, generator=g)
        src = torch.randint(0, nodes, (edges,), generator=g)
        dst = torch.randint(0, nodes, (edges,), generator=g)
        edge_index = torch.stack([torch.cat([src, dst]), torch.cat([dst, src])])
        y = torch.randint(0, n_out, (nodes,), generator=g)
        mask = torch.rand(nodes, generator=g) < 0.3
        return x.to(device), edge_index.to(device), y.to(device), mask.to(device)

    def loss(model: nn.Module, b: tuple[Any, ...]) -> torch.Tensor:
        x, edge_index, y, mask = b
        return nn.functional.cross_entropy(model(x, edge_index)[mask], y[mask])

    arms = {"dfa": {"blocks": "convs.*", "output": "head"}}
    return Case(
        name,
        f"GCN (torch_geometric), {layers} GCNConv {n_in}-{hidden}, {nodes} nodes, {2 * edges} directed edges, "
        f"{n_out} classes, full batch",
        lambda: GCN(n_in, hidden, n_out, layers),
        make_batch,
        loss,
        arms,
        lambda o: gcn_macs(nodes, 2 * edges, n_in, hidden, n_out, layers, o),
        error_shape=(nodes, n_out),
        head_weight=lambda m: m.head.weight,
    )


def gpt2_arms(topk: int | None = None, ln2: bool = False, paper: bool = True) -> dict[str, dict[str, Any]]:
    """The DFA arms of a GPT-2 model: the default flag (recipe ``"auto"``: on GPT-2, norm-aware feedback, the
    ``ln_1`` outputs as points, ``cut_head_input`` and ``sketch``), the same without the ``ln_1`` points, with the
    position table kept at its initial values (``tables_from_first_block=False``), with the ``ln_2`` outputs as
    points too, and the paper's plain DFA (with and without the cheaper head)."""
    arms: dict[str, dict[str, Any]] = {
        "dfa": {},
        "dfa no ln1": {"norm_points": False},
        "dfa fixed tables": {"tables_from_first_block": False},
    }
    if ln2:
        arms["dfa +ln2"] = {"blocks": ["transformer.h.*", "transformer.h.*.ln_2"]}
    if topk is not None:
        arms[f"dfa top{topk}"] = {"topk": topk}
    if paper:
        arms["dfa paper"] = {"recipe": "paper"}
        arms["dfa paper cut sketch"] = {"recipe": "paper", "cut_head_input": True, "sketch": True}
    return arms


def ladder(quick: bool) -> list[Case]:
    """The models, smallest first. ``quick``: tiny shapes for the CI smoke test."""
    if quick:
        return [
            _mlp_case("mlp", [32, 64, 64, 10], 16, {"dfa": {}}),
            _gpt2_case("gpt2-tiny", 256, 32, 2, 16, 2, gpt2_arms(topk=16)),
        ]
    return [
        _mlp_case("mlp", [784, 1024, 1024, 1024, 10], 256, {"dfa": {}, "dfa distinct": {"distinct": True}}),
        _gcn_case("gcn", 2708, 5278, 1433, 256, 7, 3),
        _gpt2_case("gpt2-tiny", 512, 64, 2, 64, 8, gpt2_arms()),
        _gpt2_case("gpt2-v8k", 8192, 256, 6, 128, 8, gpt2_arms(ln2=True)),
        _gpt2_case("gpt2-v50k", 50257, 256, 6, 128, 8, gpt2_arms(topk=64, ln2=True)),
        _gpt2_case(
            "gpt2-small-t256",
            50257,
            768,
            12,
            256,
            1,
            gpt2_arms(topk=64),
            meta={"cpu_stand_in": True},
        ),
        _gpt2_case("gpt2-small", 50257, 768, 12, 1024, 8, gpt2_arms(topk=64, ln2=True), cuda_only=True),
    ]


def model_names(quick: bool = False) -> list[str]:
    """The names ``--models`` accepts, smallest model first; CUDA-only models are marked ``(CUDA only)``."""
    return [c.name + (" (CUDA only)" if c.cuda_only else "") for c in ladder(quick)]
