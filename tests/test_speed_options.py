"""The speed options of the engine: ``cut_head_input``, ``topk``, the cached feedback matrix.

Correctness only (tiny, seeded, CPU): speed and memory are measured by ``python -m benchmarks.speed``, never here.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_dfa import DFAConfig, FeedbackEngine
from lightning_dfa.engine import PointMeta
from lightning_dfa.projectors.bank import FeedbackBank

V, D, LAYERS, T, B = 64, 16, 2, 8, 2


def _gpt2(seed: int = 0, vocab: int = V) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab,
        n_embd=D,
        n_layer=LAYERS,
        n_head=2,
        n_positions=T,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg)


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 7))


def _lm_grads(model: nn.Module, engine: FeedbackEngine | None, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    logits = model(input_ids=ids).logits
    nn.functional.cross_entropy(logits.reshape(-1, V), ids.reshape(-1)).backward()
    if engine is not None:
        engine.end_backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="cut_head_input"):
        DFAConfig(cut_head_input=True, error_at="head_input")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="topk"):
            DFAConfig(topk=bad)
    assert DFAConfig(topk=4.0).topk == 4
    assert DFAConfig().topk is None and DFAConfig(recipe="paper").chosen("cut_head_input") is False


def test_topk_with_full_width_is_the_dense_projection() -> None:
    torch.manual_seed(0)
    error = torch.randn(3, 5, 40)
    points = [PointMeta("a", torch.Size([3, 5, 12]), torch.float32, False)]
    dense = FeedbackEngine(recipe="paper", seed=1).feedback_for(error, points)[0]
    for k in (40, 400):  # k >= error width: the dense GEMM
        assert torch.equal(FeedbackEngine(recipe="paper", seed=1, topk=k).feedback_for(error, points)[0], dense)
    # the gather path is exact whenever each row has at most k non-zero entries
    sparse = error * (torch.rand_like(error) < 0.1)
    sparse[..., 0] = 1.0  # at least one non-zero per row; at most 4 + 1 on average
    kept = int((sparse != 0).sum(-1).max())
    gathered = FeedbackEngine(recipe="paper", seed=1, topk=kept).feedback_for(sparse, points)[0]
    torch.testing.assert_close(gathered, FeedbackEngine(recipe="paper", seed=1).feedback_for(sparse, points)[0])


def test_topk_is_exact_for_a_flat_tail() -> None:
    """The dropped entries count as their sum times the mean column of ``B``: exact when they are equal."""
    torch.manual_seed(0)
    error = torch.full((6, 100), 0.01)
    error[torch.arange(6), torch.randint(0, 100, (6,))] = -0.9
    error[:, 7] = 0.05
    points = [PointMeta("a", torch.Size([6, 24]), torch.float32, False)]
    dense = FeedbackEngine(recipe="paper", seed=4).feedback_for(error, points)[0]
    torch.testing.assert_close(FeedbackEngine(recipe="paper", seed=4, topk=2).feedback_for(error, points)[0], dense)


def test_topk_approximates_a_softmax_cross_entropy_error() -> None:
    """``e = softmax - onehot``: a few entries carry the signal; the random projection of the rest is small."""
    torch.manual_seed(0)
    logits, target = torch.randn(32, 512) * 2, torch.randint(0, 512, (32,))
    error = torch.softmax(logits, -1) - nn.functional.one_hot(target, 512)
    points = [PointMeta("a", torch.Size([32, 64]), torch.float32, False)]
    dense = FeedbackEngine(recipe="paper", seed=0).feedback_for(error, points)[0]
    approx = FeedbackEngine(recipe="paper", seed=0, topk=32).feedback_for(error, points)[0]
    cos = nn.functional.cosine_similarity(dense, approx, dim=-1)
    assert cos.min() > 0.99, cos.min()


def test_topk_with_distinct_signs_and_several_widths() -> None:
    torch.manual_seed(0)
    error = torch.randn(4, 50)
    points = [
        PointMeta("a", torch.Size([4, 8]), torch.float32, False),
        PointMeta("b", torch.Size([4, 16]), torch.float32, False),
    ]
    for distinct in (False, True):
        dense = FeedbackEngine(recipe="paper", seed=2, distinct=distinct).feedback_for(error, points)
        full = FeedbackEngine(recipe="paper", seed=2, distinct=distinct, topk=49).feedback_for(error, points)
        assert [f.shape for f in full] == [torch.Size([4, 8]), torch.Size([4, 16])]
        for a, b in zip(dense, full):  # dropping one of 50 entries per row changes little
            assert nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.9


def test_cut_head_input_moves_the_last_point_and_keeps_the_head_true_gradient() -> None:
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    bp = _lm_grads(_gpt2(), None, ids)
    plain_model, cut_model = _gpt2(), _gpt2()
    plain = FeedbackEngine(recipe="paper", seed=0)
    plain.attach(plain_model)
    cut = FeedbackEngine(recipe="paper", seed=0, cut_head_input=True)
    cut.attach(cut_model)
    g_plain = _lm_grads(plain_model, plain, ids)
    keys = [p.key for p in plain.last_points]
    g_cut = _lm_grads(cut_model, cut, ids)
    cut_keys = [p.key for p in cut.last_points]
    last = f"transformer.h.{LAYERS - 1}"
    assert last in keys and "lm_head:in" not in keys
    assert last not in cut_keys and cut_keys[-1] == "lm_head:in" and cut_keys[:-1] == keys[:-1]
    # every parameter still gets a gradient
    assert set(g_cut) == set(g_plain) == set(bp)
    # the final norm: true gradient without the cut, feedback with it
    torch.testing.assert_close(g_plain["transformer.ln_f.weight"], bp["transformer.ln_f.weight"])
    assert not torch.allclose(g_cut["transformer.ln_f.weight"], bp["transformer.ln_f.weight"])
    # blocks before the last one receive exactly the same feedback either way
    for name in g_plain:
        if name.startswith("transformer.h.0."):
            torch.testing.assert_close(g_cut[name], g_plain[name])
    roles_plain, roles_cut = plain.parameter_roles(), cut.parameter_roles()
    ln_f = sum(p.numel() for p in cut_model.transformer.ln_f.parameters())
    assert roles_cut["feedback"] == roles_plain["feedback"] + ln_f
    assert roles_cut["true gradient"] == roles_plain["true gradient"] - ln_f


def test_cut_head_input_skips_the_head_input_gradient() -> None:
    """The backward of the cut model does one vocabulary-sized GEMM fewer (counted by FlopCounterMode)."""
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))

    def flops(**options: object) -> int:
        model = _gpt2()
        engine = FeedbackEngine(recipe="paper", seed=0, **options)
        engine.attach(model)
        _lm_grads(model, engine, ids)  # the first step after attach also probes the points' layout
        with FlopCounterMode(display=False) as counter:
            _lm_grads(model, engine, ids)
        return counter.get_total_flops()

    assert flops() - flops(cut_head_input=True) == 2 * B * T * V * D


def test_cut_head_input_on_a_sequential_mlp_changes_only_the_key() -> None:
    """Nothing lies between the last block and the head: the cut gives the same gradients as before."""
    x, y = torch.randn(6, 5), torch.randint(0, 7, (6,))
    grads = []
    for cut in (False, True):
        net = _mlp()
        engine = FeedbackEngine(recipe="paper", seed=3, cut_head_input=cut)
        engine.attach(net)
        nn.functional.cross_entropy(net(x), y).backward()
        engine.end_backward()
        grads.append([p.grad.clone() for p in net.parameters()])
        assert engine.last_points[-1].key == ("4:in" if cut else "3")
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_feedback_matrix_is_cached_and_shared() -> None:
    bank = FeedbackBank(seed=0)
    cpu = torch.device("cpu")
    a = bank.matrix(30, 8, cpu, torch.float32)
    assert bank.matrix(30, 8, cpu, torch.float32) is a
    assert bank.cached_nbytes == 0  # the fp32 CPU cast is the stored matrix itself
    t = bank.matrix(30, 8, cpu, torch.float32, transposed=True)
    assert t.is_contiguous() and t.shape == (30, 8) and torch.equal(t, a.t())
    assert bank.matrix(30, 8, cpu, torch.float32, transposed=True) is t
    assert bank.cached_nbytes == 30 * 8 * 4
    h = bank.matrix(30, 8, cpu, torch.bfloat16)
    assert h.dtype == torch.bfloat16 and bank.matrix(30, 8, cpu, torch.bfloat16) is h


def test_strategies_accept_the_options() -> None:
    from lightning_dfa.adapters.pytorch_lightning import DFA, DFADDPStrategy, DFAStrategy

    for cls in (DFAStrategy, DFA):
        obj = cls(cut_head_input=True, topk=8, verbose=False)
        assert obj.dfa.config.cut_head_input is True and obj.dfa.config.topk == 8
    for cls in (DFAStrategy, DFA, DFADDPStrategy):
        assert cls(sketch=True, verbose=False).dfa.config.sketch is True


def test_sketch_trains_through_the_trainer_and_resumes_identically(tmp_path) -> None:  # noqa: ANN001
    """A GPT-2 whose vocabulary is wider than 4 d, fit with the sketch, checkpointed, resumed: same weights as
    an uninterrupted run (the sketch's entries are recomputed from the seed, its group size from the checkpoint)."""
    import pytorch_lightning as pl
    from conftest import trainer
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_dfa.adapters.pytorch_lightning import DFAStrategy

    vocab = 8 * D

    class LM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _gpt2(vocab=vocab)

        def training_step(self, batch, i):  # noqa: ANN001, ANN202
            ids = batch[0]
            logits = self.net(input_ids=ids[:, :-1]).logits
            return nn.functional.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))

        def configure_optimizers(self):  # noqa: ANN202
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    ids = torch.randint(0, vocab, (16, T + 1), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(ids), batch_size=4)
    strategy = {"sketch": True, "cut_head_input": True, "verbose": False}

    def fit(epochs: int, ckpt: str | None = None, seed: int = 0) -> LM:
        pl.seed_everything(seed, verbose=False)
        model = LM() if ckpt is None else LM()
        t = trainer(max_epochs=epochs, strategy=DFAStrategy(**strategy), enable_checkpointing=False)
        t.fit(model, loader, ckpt_path=ckpt)
        if ckpt is None and epochs == 1:
            t.save_checkpoint(tmp_path / "one.ckpt")
        return model

    full = fit(2)
    fit(1)
    resumed = fit(2, str(tmp_path / "one.ckpt"), seed=7)
    for (n, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n
    untrained = _gpt2(vocab=vocab).transformer.h[0].mlp.c_fc.weight
    assert not torch.equal(full.net.transformer.h[0].mlp.c_fc.weight, untrained)
    ckpt = torch.load(tmp_path / "one.ckpt", weights_only=False)
    assert ckpt["dfa"]["sketch_groups"] == {vocab: 12}  # ceil(sqrt(128))


def test_blocked_selection_finds_the_exact_top_entries() -> None:
    """Wide rows use a two-stage (blocks, then entries) selection: the same set as a plain top-k."""
    from lightning_dfa.projectors.random import _largest_entries

    torch.manual_seed(0)
    for width in (1000, 1027):  # a whole number of blocks, and a ragged last block
        rows = torch.softmax(torch.randn(16, width) * 3, -1)
        rows[torch.arange(16), torch.randint(0, width, (16,))] -= 1
        index, values = _largest_entries(rows, 5, block=16)
        assert torch.equal(index.sort(-1).values, rows.abs().topk(5, -1).indices.sort(-1).values)
        assert torch.equal(values, rows.gather(-1, index))
    # and through the engine: a wide error takes the blocked path and matches the plain top-k formula
    error = torch.softmax(torch.randn(4, 6000), -1)
    error[:, 3] -= 1
    points = [PointMeta("a", torch.Size([4, 8]), torch.float32, False)]
    engine = FeedbackEngine(recipe="paper", seed=0, topk=4)
    got = engine.feedback_for(error, points)[0]
    idx = error.abs().topk(4, -1).indices
    kept = error.gather(-1, idx)
    tail = (error.sum(-1, keepdim=True) - kept.sum(-1, keepdim=True)) / (6000 - 4)
    b = engine.bank.matrix(6000, 8, torch.device("cpu"), torch.float32)  # [8, 6000]
    ref = torch.einsum("nk,nkd->nd", kept - tail, b.t()[idx]) + tail * b.sum(1)
    torch.testing.assert_close(got, ref / math.sqrt(8))


# ------------------------------------------------------------------------------------------------ sketch
def _points(width: int, n: int = 1) -> list[PointMeta]:
    return [PointMeta(f"p{i}", torch.Size([3, 5, width]), torch.float32, False) for i in range(n)]


@pytest.mark.parametrize(("k", "width"), [(1000, 16), (1024, 16), (50257, 64), (8192, 256)])
def test_sketch_projection_is_exact_for_its_structured_matrix(k: int, width: int) -> None:
    torch.manual_seed(0)
    error = torch.randn(3, 5, k, dtype=torch.float64)
    engine = FeedbackEngine(recipe="paper", seed=3, sketch=True)
    got = engine.feedback_for(error, _points(width))[0]
    dense = engine.bank.sketch_matrix(k, width).double()
    want = (error @ dense.t()) / math.sqrt(width)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
    # full rank, the dense matrix's entry variance (uniform on [-1, 1): 1/3), and rows all different
    assert torch.linalg.matrix_rank(dense).item() == width
    assert abs(dense.var().item() - 1 / 3) < 0.1  # in expectation exactly; A has only 4 * k / g values
    assert torch.unique(dense.t(), dim=0).shape[0] == k
    # rows of different residue classes are independent: their mean |cosine| is that of random vectors
    rows = nn.functional.normalize(dense.t()[:200], dim=1)
    cos = (rows @ rows.t()).abs()
    g = engine.bank._sketch_groups[k]
    other = torch.arange(200)[:, None] % g != torch.arange(200)[None, :] % g
    assert cos[other].mean() < 3 / math.sqrt(width)


def test_sketch_factors_are_cached_on_an_accelerator_only() -> None:
    bank = FeedbackBank(seed=3)
    cpu = bank.sketch(4000, 32, torch.device("cpu"), torch.float32)
    assert bank.cached_nbytes == 0 and torch.equal(cpu[2], bank.sketch(4000, 32, torch.device("cpu"), torch.float32)[2])
    # the meta device stands for an accelerator: the factors are computed once per dtype and width, then reused
    meta = bank.sketch(4000, 32, torch.device("meta"), torch.float32)
    again = bank.sketch(4000, 32, torch.device("meta"), torch.float32)
    assert again[1] is meta[1] and again[2]._base is meta[2]._base is not None
    assert meta[0] == cpu[0] and meta[2].shape == cpu[2].shape
    assert bank.sketch(4000, 32, torch.device("meta"), torch.bfloat16)[1].dtype == torch.bfloat16


def test_sketch_is_used_only_for_wide_errors_and_not_with_topk() -> None:
    error = torch.randn(3, 5, 40)
    dense = FeedbackEngine(recipe="paper", seed=1).feedback_for(error, _points(16))[0]
    assert torch.equal(FeedbackEngine(recipe="paper", seed=1, sketch=True).feedback_for(error, _points(16))[0], dense)
    with pytest.raises(ValueError, match="sketch=True or topk"):
        DFAConfig(sketch=True, topk=8)
    with pytest.raises(ValueError, match="sketch must be"):
        DFAConfig(sketch=1)


def test_sketch_saves_no_matrix_and_resumes_identically() -> None:
    error = torch.randn(3, 5, 4000)
    a = FeedbackEngine(recipe="paper", seed=5, sketch=True, distinct=True)
    first = a.feedback_for(error, _points(32, 2))
    # nothing stored to save; on the CPU only the points' signs are held: the factors are hashed at each call
    assert a.bank.nbytes == 0 and a.bank.cached_nbytes == 2 * 32 * 4
    state = a.state_dict()
    assert not state["matrices"]
    b = FeedbackEngine(recipe="paper", seed=99, sketch=True, distinct=True)
    b.load_state_dict(state)
    for x, y in zip(first, b.feedback_for(error, _points(32, 2))):
        assert torch.equal(x, y)
    with pytest.raises(RuntimeError, match="changed since the checkpoint"):
        b.feedback_for(torch.randn(3, 5, 5000), _points(32))
    # switching the projection on resume would silently change the feedback: refused both ways
    dense = FeedbackEngine(recipe="paper", seed=5, distinct=True)
    dense.load_state_dict(state)
    with pytest.raises(RuntimeError, match="resume with sketch=True"):
        dense.feedback_for(error, _points(32, 2))
    dense_state = FeedbackEngine(recipe="paper", seed=5)
    dense_state.feedback_for(error, _points(32))
    sketched = FeedbackEngine(recipe="paper", seed=5, sketch=True)
    sketched.load_state_dict(dense_state.state_dict())
    with pytest.raises(RuntimeError, match="resume with sketch=False"):
        sketched.feedback_for(error, _points(32))


def test_hashed_feedback_is_a_pure_function_of_seed_and_position() -> None:
    from lightning_dfa.projectors.bank import hashed_matrix, hashed_uniform

    x = hashed_uniform(100_000, key=3)
    assert torch.equal(x[:777], hashed_uniform(777, key=3))
    assert not torch.equal(x[:777], hashed_uniform(777, key=4))
    assert abs(x.mean().item()) < 0.01 and abs(x.var().item() - 1 / 3) < 0.01
    # neighbouring values are uncorrelated
    assert abs(torch.corrcoef(torch.stack([x[:-1], x[1:]]))[0, 1].item()) < 0.02
    for dist, var in (("uniform", 1 / 3), ("gaussian", 1.0), ("rademacher", 1.0)):
        m = hashed_matrix(200, 300, dist, 11, torch.device("cpu"), torch.float64)
        assert m.dtype == torch.float64 and abs(m.var().item() - var) < 0.03 * var
        assert torch.equal(m[:50], hashed_matrix(50, 300, dist, 11, torch.device("cpu"), torch.float64))
    # fixed values: the hash must never change, or resumed runs would get other feedback
    assert hashed_uniform(3, key=0).tolist() == [-0.03389155864715576, -0.5231430530548096, -0.47083723545074463]


def test_the_in_place_hash_gives_the_values_of_the_plain_formula() -> None:
    """The hash runs in place (it is recomputed at every backward); its values are those of the plain formula."""
    from lightning_dfa.projectors.bank import hashed_matrix, hashed_uniform, keyed_normal, row_keys

    m32 = 0xFFFFFFFF

    def mul32(x: torch.Tensor, c: int) -> torch.Tensor:
        return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & m32

    def hash32(x: torch.Tensor) -> torch.Tensor:
        x = mul32(x ^ (x >> 16), 0x7FEB352D)
        x = mul32(x ^ (x >> 15), 0x846CA68B)
        return x ^ (x >> 16)

    def uniform(n: int, key: int, stream: int = 0) -> torch.Tensor:
        x = hash32((mul32(torch.arange(n), 0x9E3779B1) + key + 0x6A09E667 + stream * 0x632BE5AB) & m32)
        return (x >> 8).to(torch.float32) * 2.0**-23 - 1.0

    for n, key, stream in ((70_001, 123_456_789, 0), (1000, -3, 1), (17, 2**40 + 5, 1)):
        assert torch.equal(hashed_uniform(n, key, stream=stream), uniform(n, key, stream))
    u, v = uniform(300 * 7, 9), uniform(300 * 7, 9, 1)
    gaussian = (-2.0 * torch.log1p(-(u + 1.0) / 2)).sqrt() * torch.cos(torch.pi * (v + 1.0))
    assert torch.equal(hashed_matrix(7, 300, "gaussian", 9, torch.device("cpu"), torch.float32), gaussian.view(7, 300))
    assert torch.equal(
        hashed_matrix(7, 300, "uniform", 9, torch.device("cpu"), torch.float32, 0.5), u.view(7, 300) * 0.5
    )
    rows = torch.tensor([5, 9, 2**33 + 1, -4])
    cols = mul32(torch.arange(6), 0x85EBCA6B)

    def keyed(stream: int) -> torch.Tensor:
        base = hash32((mul32(rows & m32, 0x9E3779B1) + 11 + stream * 0x632BE5AB) & m32)
        return (hash32((base.unsqueeze(-1) + cols + 0x6A09E667) & m32) >> 8).to(torch.float32) * 2.0**-23 - 1.0

    normal = (-2.0 * torch.log1p(-(keyed(0) + 1.0) / 2)).sqrt() * torch.cos(torch.pi * (keyed(1) + 1.0))
    assert torch.equal(keyed_normal(rows, 6, key=11), normal)
    codes = torch.randint(0, 50, (20, 7), generator=torch.Generator().manual_seed(0))
    weights = hash32((mul32(torch.arange(7), 0x27D4EB2F) + 99) & m32)
    assert torch.equal(row_keys(codes, salt=99), hash32((codes * weights).sum(-1) & m32))


def test_sketch_trains_a_gpt2_with_every_parameter_getting_a_gradient() -> None:
    vocab = 8 * D
    model = _gpt2(vocab=vocab)
    engine = FeedbackEngine(recipe="paper", seed=0, sketch=True, cut_head_input=True)
    engine.attach(model)
    ids = torch.randint(0, vocab, (B, T + 1), generator=torch.Generator().manual_seed(0))
    logits = model(input_ids=ids[:, :-1]).logits
    nn.functional.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1)).backward()
    engine.end_backward()
    assert list(engine.bank._sketch_groups) == [vocab] and not engine.bank._matrices  # the sketch path was taken
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0
        for n, p in model.named_parameters()
        if "attn.c_attn.bias" not in n
    )
    engine.detach()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("options", [{}, {"topk": 8}, {"sketch": True}, {"distinct": True, "norm_jacobian": True}])
def test_projection_queues_without_a_host_sync_on_cuda(options: dict) -> None:
    engine = FeedbackEngine(recipe="paper", seed=0, **options)
    error = torch.randn(4, 8, 1000, device="cuda")
    h = torch.randn(4, 8, 32, device="cuda")
    points = _points(32, 2)
    points = [PointMeta(p.key, torch.Size([4, 8, 32]), torch.float32, False) for p in points]
    engine.feedback_for(error, points, [h, h])  # first call draws and caches the matrices (host to device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = engine.feedback_for(error, points, [h, h])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out[0].is_cuda and out[0].shape == (4, 8, 32)


def test_speed_tip_for_wide_errors_names_the_missing_options() -> None:
    from lightning_dfa.adapters.core import speed_hint

    def tip(vocab: int, **options: object) -> str | None:
        net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, vocab))
        engine = FeedbackEngine(**options)
        engine.attach(net)
        nn.functional.cross_entropy(net(torch.randn(4, 8)), torch.randint(0, vocab, (4,))).backward()
        engine.end_backward()
        return speed_hint(engine)

    assert tip(10, recipe="paper") is None  # not wider than 4x the points
    wide = tip(200, recipe="paper")
    assert wide is not None and "200 wide" in wide and "cut_head_input=True and sketch=True" in wide
    half = tip(200, recipe="paper", cut_head_input=True) or ""
    assert "sketch=True" in half and "cut_head_input" not in half
    assert tip(200, recipe="paper", cut_head_input=True, sketch=True) is None
    assert tip(200) is None  # the default recipe chooses both for a widening head
    assert tip(200, recipe="paper", mode="shallow") is None


def test_points_of_two_layouts_share_one_matrix_kind_per_error_width() -> None:
    """A row point 64 wide and a per-position point 16 wide, one 100-wide error (a pyramid vision Transformer's
    stages before a classifier): dense for the first, so for the second too (its first 16 rows), fresh or
    resumed; no sketch beside it."""
    torch.manual_seed(0)
    error = torch.randn(3, 100)
    points = [  # the narrow one first: the engine projects the widest first
        PointMeta("tokens", torch.Size([3, 4, 16]), torch.float32, False),
        PointMeta("wide", torch.Size([3, 64]), torch.float32, False),
    ]
    state = None
    for _ in range(2):  # a fresh run, then one resumed from its feedback state
        engine = FeedbackEngine(seed=0)
        if state is not None:
            engine.load_state_dict(state)
        tokens, wide = engine.feedback_for(error, points)
        dense = engine.bank.matrix(100, 64, torch.device("cpu"), torch.float32)
        torch.testing.assert_close(wide, error @ dense.t() / 8)
        torch.testing.assert_close(tokens, (error @ dense[:16].t() / 4).unsqueeze(1).expand(3, 4, 16))
        assert engine.bank.dense_rows(100) == 64 and not engine.bank._sketch_groups
        state = engine.state_dict()
