"""The fit-start summary: only real feedback points, no columns of dashes before any forward, the options shown;
``lightning_dfa.lightning`` reachable as an attribute."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lightning_dfa
from lightning_dfa import FeedbackEngine
from lightning_dfa.summary import format_summary


class HandWritten(nn.Module):
    """Layers as attributes, activations in ``forward`` (discovery rule 6): points at the inputs of l2 and l3."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l3(F.relu(self.l2(F.relu(self.l1(x)))))


class Embedded(nn.Module):
    """An embedding before a Sequential of blocks: the first block's input carries gradient, so it is a point."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2)])
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def _points(summary: str) -> list[str]:
    rows = summary.split("\n")[2:]
    points = []
    for row in rows:
        if row.startswith("-"):
            break
        points.append(row.split("|")[1].strip())
    return points


def test_summary_lists_what_the_first_step_delivers_and_the_options() -> None:
    torch.manual_seed(0)
    net = HandWritten()
    engine = FeedbackEngine(seed=0)
    engine.attach(net)
    before = format_summary(engine)
    assert _points(before) == ["l2:in", "l3:in"]  # not the raw data at l1's input
    assert "Shape" not in before.split("\n")[0] and "| -" not in before  # no columns of dashes before a forward
    assert "Options: " in before and "error_at=output" in before and "topk=None" in before
    assert "printed at the first training step" in before
    F.cross_entropy(net(torch.randn(4, 6)), torch.tensor([0, 1, 2, 0])).backward()
    engine.end_backward()
    after = format_summary(engine)
    delivered = sorted(m.key.split("#")[0] for m in engine.last_points)
    assert sorted(_points(after)) == delivered
    assert "[4, 8]" in after and "printed at the first training step" not in after
    engine.detach()


def test_summary_lists_the_first_block_input_after_an_embedding() -> None:
    torch.manual_seed(0)
    net = Embedded()
    engine = FeedbackEngine(seed=0)
    engine.attach(net)
    listed = _points(format_summary(engine))
    F.cross_entropy(net(torch.tensor([1, 2, 3])), torch.tensor([0, 1, 2])).backward()
    engine.end_backward()
    delivered = [m.key.split("#")[0] for m in engine.last_points]
    assert listed[0].endswith(":in") and sorted(listed) == sorted(delivered)
    engine.detach()


def test_lightning_classes_are_an_attribute_of_the_package() -> None:
    pytest.importorskip("lightning")
    assert lightning_dfa.lightning.DFAStrategy.__module__ == "lightning_dfa.adapters.lightning"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lightning_dfa.nope  # noqa: B018


class TwoTables(nn.Module):
    """Layers as attributes, a second lookup table among them (a decoder's token table)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 8)
        self.tgt = nn.Embedding(5, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))) + self.tgt(ids))


def test_summary_lists_no_point_at_a_lookup_tables_indices() -> None:
    """A table's input (integer indices) is never a point: not listed before the first step, and after it only the
    recorded layer inputs are."""
    torch.manual_seed(0)
    net, engine = TwoTables(), FeedbackEngine()
    target = engine.attach(net)
    assert "tgt" in [b.name for b in target.blocks]
    assert "tgt:in" not in engine.summary()
    net(torch.randn(2, 4), torch.tensor([1, 2])).sum().backward()
    engine.end_backward()
    listed = [line.split("|")[1].strip() for line in engine.summary().splitlines() if line[:1].isdigit()]
    assert set(listed) == {p.key for p in engine.last_points}
    assert "tgt:in" not in listed
    engine.detach()
