"""How each parameter of an attached model is trained: by feedback, by its true gradient, or not at all."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .blocks import Target
from .discovery import _find_hf_model


def parameter_roles(engine: Any, root: nn.Module | None = None) -> dict[str, int]:
    """Number of trainable parameters trained by feedback, by their true gradient, or not at all."""
    root = root or engine.root
    if root is None or engine.target is None:
        raise RuntimeError("DFA: attach() the engine first.")
    measured = engine._true_ids is not None  # measured from the forward at the first delivery
    after = engine._true_ids if engine._true_ids is not None else params_after_blocks(root, engine.target)
    cut = engine._cut and not measured  # the cut is in the measurement
    out_ids = {id(p) for _, m in engine.output_modules() for p in m.parameters()}
    roles = {"feedback": 0, "true gradient": 0, "none": 0}
    seen: set[int] = set()
    kept = _kept_tables(engine)
    for p in root.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if not _updated(engine, p) or id(p) in kept:
            roles["none"] += p.numel()
        elif engine.mode == "bp" or id(p) in out_ids or (id(p) in after and not cut):
            roles["true gradient"] += p.numel()
        elif engine.mode == "shallow":
            roles["none"] += p.numel()
        else:
            roles["feedback"] += p.numel()
    return roles


def role_of(engine: Any, parameter: nn.Parameter) -> str:
    """``"feedback"``, ``"true gradient"`` or ``"none"``: how a parameter of the model is trained (as counted by
    :meth:`parameter_roles`).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> from lightning_dfa import FeedbackEngine
        >>> engine = FeedbackEngine()
        >>> _ = engine.attach(net)
        >>> role_of(engine, net[0].weight), role_of(engine, net[2].weight)
        ('feedback', 'true gradient')
    """
    if engine.root is None or engine.target is None:
        raise RuntimeError("DFA: attach() the engine first.")
    if not _updated(engine, parameter) or id(parameter) in _kept_tables(engine):
        return "none"
    if engine.mode == "bp" or any(parameter is p for _, m in engine.output_modules() for p in m.parameters()):
        return "true gradient"
    measured = engine._true_ids is not None
    after = engine._true_ids if engine._true_ids is not None else params_after_blocks(engine.root, engine.target)
    if id(parameter) in after and (measured or not engine._cut):
        return "true gradient"
    return "none" if engine.mode == "shallow" else "feedback"


def _updated(engine: Any, parameter: nn.Parameter) -> bool:
    """The parameter requires grad and an optimizer holds it (where the engine was told which do)."""
    optimized = engine.optimized_ids
    return parameter.requires_grad and (optimized is None or id(parameter) in optimized)


def _kept_tables(engine: Any) -> set[int]:
    """``id`` of the parameters ``cut_token_embedding`` keeps at their initial values (an untied table, a norm
    inside a table): frozen while the engine is attached, and counted as not trained after it let go."""
    return engine._kept if engine.mode == "dfa" else set()


def params_after_blocks(root: nn.Module, target: Target) -> set[int]:
    """``id`` of the parameters registered after the last block and outside every block (the tail), and those of
    the module holding an output module where it holds no block (a head registered before the blocks, as
    XLM-RoBERTa's ``lm_head``: its transform lies after the blocks in the data flow). Blocks are found in ``root``
    by identity, not by name, so a wrapped model (FSDP, activation checkpointing: other names, the same modules)
    has the same tail."""
    if not target.blocks:
        return set()
    position = {id(m): i for i, m in enumerate(root.modules())}
    last = max(position.get(id(m), -1) for b in target.blocks for m in (b.exit, b.entry))
    inside = {id(m) for b in target.blocks for m in b.exit.modules()}
    block_ids = target.block_param_ids()
    heads = [m for m in (_holder(root, out) for _, out in target.outputs) if m is not None]
    in_heads = {id(m) for h in heads if not any(id(m) in inside for m in h.modules()) for m in h.modules()}
    after: set[int] = set()
    for module in root.modules():
        if (position[id(module)] <= last and id(module) not in in_heads) or id(module) in inside:
            continue
        for p in module.parameters(recurse=False):
            if id(p) not in block_ids:
                after.add(id(p))
    return after


def _holder(root: nn.Module, module: nn.Module) -> nn.Module | None:
    """The module that holds ``module`` as a child (``None``: the root holds it, or it is not in ``root``)."""
    for parent in root.modules():
        if parent is not root and any(child is module for child in parent.children()):
            return parent
    return None


def _output_shape(module: nn.Module) -> tuple[int, int] | None:
    """Features an output module produces and reads: a Linear's ``out_features`` and ``in_features``, else the rows
    and columns of its last 2-D weight."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    weights = [m.weight for m in module.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)]
    weights = [w for w in weights if w.dim() == 2]
    return (weights[-1].shape[0], weights[-1].shape[1]) if weights else None


def _hf_embeddings(model: nn.Module) -> tuple[Any, Any]:
    """A Hugging Face model's vocabulary head and token table (``get_output_embeddings()``,
    ``get_input_embeddings()``); ``None`` for what it does not have or cannot say."""
    get_in, get_out = (getattr(model, n, None) for n in ("get_input_embeddings", "get_output_embeddings"))
    try:
        return get_out() if callable(get_out) else None, get_in() if callable(get_in) else None
    except (NotImplementedError, AttributeError):
        return None, None


def predicts_vocabulary(root: nn.Module, target: Target) -> bool:
    """Whether an output module is a language model's head: it predicts over a vocabulary of tokens the model also
    reads. In a Hugging Face model, its vocabulary head (``get_output_embeddings()``) is an output; elsewhere an
    ``nn.Embedding`` is tied to an output, or has as many rows as the output predicts and is as wide as it reads (the
    rule of :func:`token_embeddings`). Unlike the output's width, this holds for a small vocabulary too.

    Example:
        >>> class TinyLM(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.emb, self.block, self.head = nn.Embedding(10, 16), nn.Linear(16, 16), nn.Linear(16, 10)
        >>> from lightning_dfa import FeedbackEngine
        >>> net = TinyLM()
        >>> target = FeedbackEngine(blocks=["block"], output="head", recipe="paper").attach(net)
        >>> predicts_vocabulary(net, target)
        True
        >>> net.emb = nn.Embedding(10, 4)  # a categorical feature with as many values as there are classes
        >>> predicts_vocabulary(net, target)
        False
    """
    inside = {id(m) for _, o in target.outputs for m in o.modules()}
    hf = _find_hf_model(root)
    if hf is not None and any(id(m) in inside for m in hf[1].modules()):  # the model's own head: it says
        head = _hf_embeddings(hf[1])[0]
        return head is not None and id(head) in inside
    weights = {id(p) for _, o in target.outputs for p in o.parameters()}
    shapes = {shape for _, o in target.outputs if (shape := _output_shape(o)) is not None}
    return any(
        isinstance(m, nn.Embedding)
        and id(m) not in inside
        and (id(m.weight) in weights or (m.num_embeddings, m.embedding_dim) in shapes)
        for m in root.modules()
    )


def token_embeddings(
    root: nn.Module, target: Target, tied: bool = True, beside: bool = True
) -> list[tuple[str, nn.Module, bool]]:
    """The token embeddings of a model (the ``cut_token_embedding`` option): ``(name, module, tied)`` for each
    module other than the output modules (and those holding them) that is a lookup table over the vocabulary an
    output predicts (an ``nn.Embedding`` with as many rows as the output has features and as many columns as it
    reads: a categorical feature of a classifier that merely has as many values as there are classes is no
    vocabulary), or whose trainable weights all belong to an output module (``tied``: an input embedding tied to the
    head), and the ``nn.Embedding`` lookup tables of the same width registered beside one (learned positions, token
    types). In a Hugging Face model, the table is
    ``get_input_embeddings()`` and the modules sharing its weights, where ``get_output_embeddings()`` (a
    vocabulary head) is an output, or where the model has no vocabulary head (a sequence or token classifier, a bare
    backbone under the user's head): there its token table is untied, whatever the output's width. ``tied=False``
    leaves out the tables tied to an output (and the tables beside them); ``beside=False`` the tables beside the
    token tables.

    Example:
        >>> class Tiny(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.emb, self.pos = nn.Embedding(10, 8), nn.Embedding(4, 8)
        ...         self.block = nn.Linear(8, 8)
        ...         self.head = nn.Linear(8, 10, bias=False)
        >>> from lightning_dfa import FeedbackEngine
        >>> net = Tiny()
        >>> target = FeedbackEngine(blocks=["block"], output="head", recipe="paper").attach(net)
        >>> [(name, tied) for name, _, tied in token_embeddings(net, target)]
        [('emb', False), ('pos', False)]
        >>> net.head.weight = net.emb.weight
        >>> [(name, tied) for name, _, tied in token_embeddings(net, target)]
        [('emb', True), ('pos', False)]
    """
    outputs = {id(p) for _, m in target.outputs for p in m.parameters() if p.requires_grad}
    # (vocabulary, width) of a table over what an output predicts: as wide as what the output reads
    shapes = {shape for _, m in target.outputs if (shape := _output_shape(m)) is not None}
    widths = {rows for rows, _ in shapes}
    heads = {id(m) for _, m in target.outputs}
    inside = {id(m) for _, o in target.outputs for m in o.modules()}
    hf = _find_hf_model(root)
    tables: set[int] | None = None
    reader = False  # a Hugging Face model with no vocabulary head (a classifier) reading a token table
    if hf is not None:  # a Hugging Face model says which are its token embedding and its vocabulary head
        vocab_head, table = _hf_embeddings(hf[1])
        reader = vocab_head is None and isinstance(table, nn.Embedding)
        if table is None or (not reader and (vocab_head is None or id(vocab_head) not in inside)):
            return []
        # and the modules that share its weights (BART's encoder and decoder embed with their own modules around
        # the model's ``shared`` weight, which is never called itself)
        weights = {id(p) for p in table.parameters(recurse=False)}
        tables = {id(m) for m in root.modules() if weights and {id(p) for p in m.parameters(recurse=False)} == weights}
    found = []
    for name, module in root.named_modules():
        if tables is not None and id(module) not in tables:
            continue
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        # not an output module, a module inside one, nor one holding one
        if not own or id(module) in inside or any(id(m) in heads for m in module.modules()):
            continue
        if all(id(p) in outputs for p in own):
            if tied:
                found.append((name, module, True))
        elif isinstance(module, nn.Embedding) and (
            reader  # (only the classifier's table and the modules sharing it get here)
            or (
                module.num_embeddings in widths
                if tables is not None
                else (module.num_embeddings, module.embedding_dim) in shapes
            )
        ):
            found.append((name, module, False))
    if not beside:
        return found
    # the lookup tables beside a token embedding (learned positions, token types, added to it: of its width) go
    # with it
    parents = {name.rpartition(".")[0] for name, _, _ in found}
    taken = {id(m) for _, m, _ in found}
    dims = {m.weight.shape[-1] for _, m, _ in found if isinstance(getattr(m, "weight", None), torch.Tensor)}
    for name, module in root.named_modules():
        if (
            isinstance(module, nn.Embedding)
            and (hf is not None or module.embedding_dim in dims)
            and id(module) not in taken
            and name.rpartition(".")[0] in parents
            and any(p.requires_grad for p in module.parameters(recurse=False))
            and not any(id(p) in outputs for p in module.parameters(recurse=False))
        ):
            found.append((name, module, False))
    return found


#: a token table is faint when the RMS of its values (times the model's embedding scale) is below this share of the
#: RMS of a fixed position table beside it
FAINT_TOKENS = 0.1


def faint_token_tables(root: nn.Module, tables: list[tuple[str, nn.Module, bool]]) -> list[str]:
    """Why the token embedding should not be cut (``cut_token_embedding="auto"``): one line per token table of
    ``tables`` (:func:`token_embeddings`) whose values are faint beside a fixed (untrained) position table registered
    with it, as Marian's and Pegasus's sinusoids (RMS 0.58) beside a table drawn at RMS 0.02. Cut, such a table
    learns only from the output, and the blocks could hardly tell the tokens apart (measured: no learning at all on a
    reversal task, against a third of backprop's gain uncut). ``[]``: nothing speaks against the cut.

    Example:
        >>> class Tiny(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.emb = nn.Embedding(10, 8)
        ...         self.pos = nn.Embedding(4, 8).requires_grad_(False)  # fixed, as a sinusoid table
        >>> net = Tiny()
        >>> _ = net.emb.weight.data.fill_(0.02), net.pos.weight.data.fill_(0.5)
        >>> faint_token_tables(net, [("emb", net.emb, False)])
        ['the token table emb (RMS 0.02) is faint beside the fixed position table pos (RMS 0.5)']
    """
    modules = dict(root.named_modules())
    # the token tables themselves, not the learned positions or token types beside them (fewer rows)
    rows = max((m.num_embeddings for _, m, _ in tables if isinstance(m, nn.Embedding)), default=0)
    reasons = []
    for name, module, tied in tables:
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not (tied or weight.shape[0] == rows):
            continue
        parent_name = name.rpartition(".")[0]
        parent = modules.get(parent_name)
        if parent is None:
            continue
        scale = getattr(module, "embed_scale", None)
        scale = getattr(parent, "embed_scale", 1.0) if scale is None else scale
        rms = float(weight.detach().float().pow(2).mean().sqrt()) * abs(float(scale))
        for child_name, child in parent.named_children():
            if child is module or any(p.requires_grad for p in child.parameters()):
                continue
            for table in (*child.parameters(recurse=False), *child.buffers(recurse=False)):
                if table.dim() == 2 and table.shape[0] > 1 and table.shape[1] == weight.shape[1]:
                    fixed = float(table.detach().float().pow(2).mean().sqrt())
                    if rms < FAINT_TOKENS * fixed:
                        where = f"{parent_name}.{child_name}" if parent_name else child_name
                        reasons.append(
                            f"the token table {name} (RMS {rms:.2g}) is faint beside the fixed position table "
                            f"{where} (RMS {fixed:.2g})"
                        )
                    break
    return reasons


def encoder_of(root: nn.Module, target: Target) -> nn.Module | None:
    """The encoder of an encoder-decoder whose encoder and decoder both hold blocks: a Hugging Face model's
    ``get_encoder()`` beside its ``get_decoder()``, or an ``nn.TransformerEncoder`` beside an
    ``nn.TransformerDecoder``; ``None`` for other models.

    Example:
        >>> net = nn.Transformer(d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=16)
        >>> from lightning_dfa import FeedbackEngine
        >>> target = FeedbackEngine(blocks=["encoder.layers.*", "decoder.layers.*"], output="decoder.norm").attach(net)
        >>> encoder_of(net, target) is net.encoder
        True
    """
    pairs: list[tuple[nn.Module, nn.Module]] = []
    hf = _find_hf_model(root)
    if hf is not None:
        get_enc, get_dec = (getattr(hf[1], n, None) for n in ("get_encoder", "get_decoder"))
        try:
            enc, dec = (get_enc() if callable(get_enc) else None), (get_dec() if callable(get_dec) else None)
        except (AttributeError, NotImplementedError, TypeError):
            enc, dec = None, None
        if isinstance(enc, nn.Module) and isinstance(dec, nn.Module) and enc is not dec and enc is not hf[1]:
            pairs.append((enc, dec))
    encoders = [m for m in root.modules() if isinstance(m, nn.TransformerEncoder)]
    decoders = [m for m in root.modules() if isinstance(m, nn.TransformerDecoder)]
    pairs += [(e, d) for e in encoders for d in decoders]
    blocks = [b.entry for b in target.blocks]
    for enc, dec in pairs:
        inside_enc = {id(m) for m in enc.modules()}
        inside_dec = {id(m) for m in dec.modules()}
        if id(enc) in inside_dec or id(dec) in inside_enc:  # one holds the other (an encoder-only model's fallbacks)
            continue
        if any(id(b) in inside_enc for b in blocks) and any(id(b) in inside_dec for b in blocks):
            return enc
    return None


def encoder_modules(root: nn.Module, target: Target) -> set[str]:
    """Names (in ``root``) of the modules inside the encoder of an encoder-decoder whose encoder and decoder both
    hold blocks (:func:`encoder_of`). Their positions are not the output's (the decoder's).

    Example:
        >>> net = nn.Transformer(d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=16)
        >>> from lightning_dfa import FeedbackEngine
        >>> target = FeedbackEngine(blocks=["encoder.layers.*", "decoder.layers.*"], output="decoder.norm").attach(net)
        >>> sorted(n for n in encoder_modules(net, target) if n.count(".") < 3)
        ['encoder', 'encoder.layers', 'encoder.layers.0', 'encoder.norm']
    """
    enc = encoder_of(root, target)
    if enc is None:
        return set()
    inside = {id(m) for m in enc.modules()}
    return {name for name, m in root.named_modules() if id(m) in inside}
