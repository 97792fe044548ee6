"""Finding where feedback goes: the *blocks* (feedback points) and the *output* (where the error is read).

Discovery order (the first that applies wins):

1. explicit ``blocks=`` / ``output=`` arguments;
2. a ``configure_dfa()`` method on the root module (the LightningModule) returning the same options
   (merged by :meth:`lightning_dfa.DFAConfig.merged_with` in :meth:`lightning_dfa.FeedbackEngine.attach`);
3. a Hugging Face ``PreTrainedModel`` inside the root: blocks are the modules whose class is listed in the
   model's ``_no_split_modules`` (or in :data:`lightning_dfa.registry.BLOCK_CLASSES` for its ``model_type``; an
   attention module listed there stands for the layer holding it, and a larger stack of layers none of them
   touches adds its layers); the output is ``get_output_embeddings()`` or the task head;
4. the model's repeated blocks (:func:`repeated_blocks`): a ``ModuleList`` of composite blocks of one class (all
   Transformer stacks of an encoder-decoder), stages of residual blocks (ResNet's ``layer1``, one-block stages
   too), or composite attributes of one module sharing a class (a UNet's ``down1``, ``up1``...); the output is the
   last parametric layer registered outside them. A Sequential inside one of these blocks is part of the block.
   A list of layers that are lists of sublayers of the same classes (``layers = ModuleList([ModuleList([attn,
   ff])])``, lucidrains' layout) gives one block per layer, fed at its input. They win over rule 5 unless a
   Sequential chain outside them holds more parameters; a chain ending in its own last layer registered before
   them (a two-tower model's image tower) adds its groups as blocks and its last layer as an output, which feeds
   that tower's blocks only;
5. an ``nn.Sequential``: groups of Linear/Conv + optional norm + activation + optional pooling/dropout are
   blocks, the final parametric layer is the output; a Sequential followed by a layer (it ends in an activation
   or pooling, or a layer that is no embedding is registered after it) is a feature extractor (``encoder``
   before ``head = nn.Linear``): all its groups are blocks and the output is the module registered after it;
   Sequentials registered before add their groups; two networks of their own (a GAN) keep their own outputs;
   then a ``ModuleList`` of repeated layers: each layer is a block, the output the last parametric layer
   registered outside the list;
6. a hand-written net whose layers are attributes (``self.fc1``, ``self.conv2``, ... with functional
   activations in ``forward``): the *input* of every layer after the first is a feedback point, so it
   lies after whatever activation, pooling or reshaping ``forward`` applied; the output is the layer
   registered last.

Where every block found lies in a frozen network in evaluation mode (a distillation's teacher) while other
parameters train, discovery runs again without the frozen networks.

The output found here is where the engine starts: the layers outside the blocks are tied too, and the backward
keeps as error sources those the loss reads (see :meth:`lightning_dfa.FeedbackEngine.output_modules`).

Block names accept exact qualified names, dotted suffixes of them (``"h.0"`` matches ``"model.transformer.h.0"``),
and glob patterns where ``*`` matches within one dotted component, ``**`` across components, ``?`` one
character and ``[...]`` a character class (``"layers.[0-3]"``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from torch import nn

from .blocks import (
    _ATTENTION_NAME,
    Block,
    BlockSpec,
    Target,
    _blocks_from_modules,
    _has_params,
    _last_param_leaf,
    _module_order,
    _nested,
    infer_micro_points,
    match_modules,
)
from .registry import BLOCK_CLASSES, BLOCK_SPANS, MICRO_POINTS, micro_points
from .structure import (
    _composite,
    _is_layer_list,
    _layer_inputs_target,
    _module_list_target,
    _sequential_target,
    _stages_target,
    _structure_target,
    _trainable,
)

__all__ = ["Block", "BlockSpec", "Target", "discover", "infer_micro_points", "match_modules"]


# --------------------------------------------------------------------------- Hugging Face
def _find_hf_model(root: nn.Module) -> tuple[str, nn.Module] | None:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency, but keep discovery importable
        return None
    for name, module in root.named_modules():
        if isinstance(module, PreTrainedModel):
            return name, module
    return None


def _named_in(cls: type, names: set[str]) -> bool:
    """``cls`` is named in ``names``, or is FSDP2's ``FSDP<Name>`` subclass of such a class."""
    return cls.__name__ in names or any(
        c.__name__ in names and cls.__name__ == "FSDP" + c.__name__ for c in cls.__mro__[1:]
    )


def _is_attention(module: nn.Module) -> bool:
    return "attention" in type(module).__name__.lower()


def _attention_to_layers(root: nn.Module, found: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Blocks named by ``_no_split_modules`` that are attention modules inside the layers of a layer list
    (Longformer's ``LongformerSelfAttention``, LUKE's ``LukeAttention``) are replaced by the layer holding them: an
    attention module is part of a Transformer layer, and with points at the attention alone the layers' MLPs learned
    by backprop through every later layer."""
    if not any(_is_attention(m) for _, m in found):
        return found
    layers = [  # the elements of every list of layers (one class, each holding parameters in submodules)
        f"{name}.{i}" if name else str(i)
        for name, mlist in root.named_modules()
        if _is_layer_list(mlist, 1) and all(_composite(m) for m in mlist)
        for i in range(len(mlist))
    ]
    out: dict[str, nn.Module] = {}
    for n, m in found:
        holders = [layer for layer in layers if n.startswith(layer + ".")]
        if _is_attention(m) and holders:
            n = max(holders, key=len)
            m = root.get_submodule(n)
        out.setdefault(n, m)
    return list(out.items())


def _outermost_layers(found: list[tuple[str, nn.Module]], output: str | None) -> list[tuple[str, nn.Module]]:
    """The found modules that lie inside no other, except that one holding ``output`` (the model's last layer)
    gives way to the found modules inside it: ViTMAE lists its whole decoder beside the layers in it, and the
    decoder's last layer is the output, which must lie after the blocks."""
    names = [n for n, _ in found]
    holders = {o for o in names if output and output.startswith(o + ".") and any(n.startswith(o + ".") for n in names)}
    kept = [(n, m) for n, m in found if n not in holders]
    inner = _nested([n for n, _ in kept])
    return [(n, m) for n, m in kept if n not in inner]


def _with_unlisted_layers(
    root: nn.Module, prefix: str, hf: nn.Module, found: list[tuple[str, nn.Module]]
) -> list[tuple[str, nn.Module]]:
    """The listed blocks, plus the layers of the model's stack of layers where no listed block lies in that stack
    or holds it, and the stack holds more parameters than the listed blocks (a list naming only the embeddings):
    with the listed blocks alone, the whole stack would learn by backprop."""
    stack = _module_list_target(hf, min_len=1, composite=True)
    if stack is None:
        return found
    join = (prefix + ".") if prefix else ""
    layers = [(join + b.name, b.entry) for b in stack.blocks]
    if any(n == s or n.startswith(s + ".") or s.startswith(n + ".") for n, _ in found for s, _ in layers):
        return found

    def size(modules: list[tuple[str, nn.Module]]) -> int:
        return sum(p.numel() for _, m in modules for p in m.parameters())

    if size(layers) <= size(found):
        return found
    order = _module_order(root)
    return sorted(found + layers, key=lambda x: order[x[0]])


def _hf_target(root: nn.Module, placement: str) -> Target | None:
    found = _find_hf_model(root)
    if found is None:
        return None
    prefix, hf = found
    model_type = getattr(getattr(hf, "config", None), "model_type", None)
    classes = set(BLOCK_CLASSES.get(model_type, ()))
    if not classes:
        for module in hf.modules():
            classes.update(getattr(module, "_no_split_modules", None) or [])
    blocks_found = [  # by the class or a base of it (FSDP2's fully_shard subclasses each sharded module)
        (n, m) for n, m in root.named_modules() if n.startswith(prefix) and _named_in(type(m), classes)
    ]
    tail = _last_param_leaf(hf, [])
    join = (prefix + ".") if prefix else ""
    blocks_found = _without_task_heads(hf, join, blocks_found)
    blocks_found = _attention_to_layers(root, _outermost_layers(blocks_found, join + tail[0] if tail else None))
    if blocks_found:
        blocks_found = _with_unlisted_layers(root, prefix, hf, blocks_found)
    if not blocks_found:  # no _no_split_modules (e.g. ALBERT): its list of repeated layers, even a shared one;
        # every stack of Transformer layers of an encoder-decoder (Marian, Blenderbot, LED, FSMT), not only the largest
        layers = _module_list_target(hf, min_len=1, composite=True) or _module_list_target(hf, min_len=1)
        if layers is None:
            return None
        blocks_found = [(join + b.name, b.entry) for b in layers.blocks]
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    out_name = _head_after_backbone(root, prefix, hf) if head is None else None
    if out_name is not None:  # a backbone (AutoModel, a PEFT-wrapped one) with the user's own head after it
        pass
    elif head is not None:
        out_name = next(n for n, m in root.named_modules() if m is head)
    else:
        base = getattr(hf, "base_model", None)
        heads = [(n, m) for n, m in hf.named_children() if m is not base and _has_params(m)]
        last = (join + heads[-1][0]) if heads else None
        if last is not None and any(n.startswith(last + ".") for n, _ in blocks_found):
            # a head child holding layers (ViTMAE's decoder): its last parametric layer after them
            leaf = _last_param_leaf(root.get_submodule(last), [n[len(last) + 1 :] for n, _ in blocks_found])
            out_name = f"{last}.{leaf[0]}" if leaf else None
        elif last is not None:
            out_name = last
        else:
            leaf = _last_param_leaf(root, [n for n, _ in blocks_found])
            out_name = leaf[0] if leaf else None
    if out_name is None:
        return None
    span = BLOCK_SPANS.get(model_type or "")
    if span is not None:  # blocks whose own forward runs no hooks: from their first called child to their last
        blocks = [Block(n, m.get_submodule(span[0]), m.get_submodule(span[1]), members=(m,)) for n, m in blocks_found]
    else:
        blocks = [Block(n, m, m) for n, m in blocks_found]
    if placement == "micro":
        model_type = model_type or type(hf).__name__
        registered = MICRO_POINTS.get(model_type)
        extra = []
        for n, m in blocks_found:  # blocks without them (embeddings listed in _no_split_modules) keep one point
            # unregistered architectures: each block's own points (a T5 decoder block differs from an encoder one)
            for sub in registered if registered is not None else infer_micro_points(m):
                try:
                    extra.append((f"{n}.{sub}", m.get_submodule(sub)))
                except AttributeError:
                    continue
        if not extra:
            if registered is None:
                micro_points(model_type)  # raises: not registered, and nothing found by structure
            raise ValueError(
                f"DFA: micro placement for model type {model_type!r}: no block has the points {registered}. "
                "Register them with lightning_dfa.registry.register_micro_points() or pass blocks=[...]."
            )
        every = sorted(blocks_found + extra, key=lambda x: _module_order(root)[x[0]])
        blocks = _blocks_from_modules(every)
    return Target(blocks, out_name, root.get_submodule(out_name), "huggingface")


def _without_task_heads(hf: nn.Module, join: str, found: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """The found modules without the task model's heads: a module listed in ``_no_split_modules`` that is a child
    of the task model beside its backbone (``base_model``), where other found modules lie in the backbone, is a
    head, not a block (BEiT's UPerNet and FCN heads, MobileNetV2's DeepLabV3+ head, listed since Transformers
    5.25). The layers listed inside such a child (ViTMAE's decoder) stay blocks."""
    base = getattr(hf, "base_model", hf)
    base_name = next((n for n, m in hf.named_children() if m is base), None)
    if base is hf or base_name is None:
        return found
    if not any(n.startswith(join + base_name + ".") for n, _ in found):
        return found
    heads = {join + n for n, m in hf.named_children() if m is not base}
    return [(n, m) for n, m in found if n not in heads]


def _head_after_backbone(root: nn.Module, prefix: str, hf: nn.Module) -> str | None:
    """The user's head when ``hf`` is a bare backbone (``AutoModel``: its ``base_model`` is itself, also inside a
    PEFT wrapper) and a parametric layer is registered after it, outside it: the last such layer."""
    if not prefix or getattr(hf, "base_model", hf) is not hf:
        return None
    parts = prefix.split(".")
    wrappers = [".".join(parts[:i]) for i in range(1, len(parts))]  # a PEFT wrapper around it, with its prompts
    outer = next((w for w in wrappers if type(root.get_submodule(w)).__module__.startswith("peft.")), prefix)
    order = _module_order(root)
    end = max(order[n] for n in order if n == outer or n.startswith(outer + "."))
    leaf = _last_param_leaf(root, [outer])
    return leaf[0] if leaf is not None and order[leaf[0]] > end else None


# --------------------------------------------------------------------------- entry point
def discover(
    root: nn.Module,
    blocks: BlockSpec = None,
    output: str | Sequence[str] | None = None,
    placement: str = "macro",
) -> Target:
    """Find the feedback points and the output module of ``root``.

    Args:
        root: the model (usually the LightningModule).
        blocks: names, glob patterns or classes of the modules whose outputs receive feedback.
        output: qualified name of the module whose output the loss is computed from, or a list of them (several
            heads or losses).
        placement: ``"macro"`` (one point per block) or ``"micro"`` (also inside Transformer blocks: the points
            listed in :mod:`lightning_dfa.registry`, else those :func:`infer_micro_points` finds).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> t = discover(net)
        >>> [b.name for b in t.blocks], t.output_name, t.source
        (['1'], '2', 'sequential')
    """
    if placement not in ("macro", "micro"):
        raise ValueError(f"DFA: placement must be 'macro' or 'micro', got {placement!r}.")
    outputs = [output] if isinstance(output, str) else list(output or [])
    if not all(isinstance(o, str) for o in outputs):
        raise TypeError(f"DFA: output must be a module name or a list of them, got {output!r}.")
    target = _discover(root, blocks, outputs[0] if outputs else None, placement)
    if outputs:  # the outputs named; else those discovery found beside the output (heads in a ModuleDict)
        target.extra_outputs = [(n, _get_output(root, n)) for n in outputs[1:]]
        if blocks is None:  # discovery took a named output for a block (a VAE's mean and variance layers)
            target.blocks = [b for b in target.blocks if b.name not in outputs[1:]]
    for name, _ in target.outputs:
        if any(b.name == name or b.name.startswith(name + ".") for b in target.blocks):
            raise ValueError(
                f"DFA: the output module {name!r} is also a block (or contains one); the output must lie "
                "after the last block. Pass output= naming the final layer (logits, predictions), and blocks= naming "
                "the hidden modules before it."
            )
        inside = [b.name for b in target.blocks if name.startswith(b.name + ".")]
        if inside:
            raise ValueError(
                f"DFA: the block {inside[0]!r} contains the output module {name!r}; DFA detaches every block's "
                "output, so the loss could not reach the output. Name the hidden modules inside it instead (their "
                "qualified names in blocks=), leaving out the output, which must lie after the last block."
            )
    return target


def _discover(root: nn.Module, blocks: BlockSpec, output: str | None, placement: str) -> Target:
    target: Target | None = None
    if blocks is not None:
        found = match_modules(root, blocks)
        if not found:
            names = [n for n, _ in root.named_modules() if n][:12]
            raise ValueError(
                f"DFA: blocks={blocks!r} matched no module of {type(root).__name__}. Module names look like "
                f"{names} ...; use qualified names, glob patterns ('transformer.h.*') or module classes."
            )
        found_blocks = _grown_to_their_layers(root, _blocks_from_modules(found))
        if output is None:
            inferred = _hf_target(root, "macro") or _sequential_target(root) or _module_list_target(root)
            if inferred is not None and not any(inferred.output_name == b.name for b in found_blocks):
                out_name = inferred.output_name
            else:
                leaf = _last_param_leaf(root, [b.name for b in found_blocks])
                order = _module_order(root)
                last = max(order[b.name] for b in found_blocks)
                if inferred is not None and (leaf is None or order[leaf[0]] < last):
                    # the blocks took the module the loss is read from, and nothing with parameters comes after
                    raise ValueError(
                        f"DFA: blocks={blocks!r} includes {inferred.output_name!r}, the module the loss is computed "
                        "from (the output), which must lie after the last block: DFA detaches every block's output. "
                        f"Remove {inferred.output_name!r} from blocks=, or pass output= naming the module whose output "
                        "the loss is computed from."
                    )
                if leaf is None:
                    raise ValueError("DFA: could not find an output module after the blocks; pass output='name'.")
                out_name = leaf[0]
        else:
            out_name = output
        target = Target(found_blocks, out_name, _get_output(root, out_name), "explicit")
    else:
        target = _hf_target(root, placement)
        if target is None and placement == "micro":
            return _micro_from_structure(root, output)
        target = target or _adaptive_softmax_target(root, placement) or _structure_target(root)
        target = target or _layer_inputs_target(root)
        if target is not None and _teacher_blocks(root, target):
            # every block lies in a frozen network in evaluation mode, and something else trains: a distillation's
            # teacher (a frozen backbone being fine-tuned stays in training mode: its blocks are kept)
            trained = _without_frozen_networks(root)
            if trained is not root:
                target = _found_in(trained, placement)
        if target is None and _bare_parameters_only(root):
            bare = [n for n, _ in root.named_parameters()][:4]
            raise ValueError(
                f"DFA: found no blocks in {type(root).__name__}: its weights are bare parameters ({bare}) with no "
                "layer modules holding them, and DFA places its feedback at the modules a forward calls (the blocks) "
                "and reads the error at one (the output). Hold each layer's weights in a module (nn.Linear, or a "
                "small nn.Module of your own) so that blocks= and output= can name them, or train this model with "
                "backprop (strategy='auto')."
            )
        if target is None:
            raise ValueError(
                f"DFA: found no blocks in {type(root).__name__}. Searched for: a configure_dfa() method, a Hugging "
                "Face model (_no_split_modules), an nn.Sequential of Linear/Conv + activation groups, an "
                "nn.ModuleList of repeated layers, and two or more Linear/Conv/RNN layers. Tell DFA where feedback "
                "goes, e.g. "
                "DFAStrategy(blocks=['encoder.layers.*'], output='head') or a configure_dfa() method returning "
                "{'blocks': [...], 'output': '...'}."
            )
        if output is not None:
            target = Target(
                _blocks_before(root, target.blocks, output),
                output,
                _get_output(root, output),
                target.source,
                target.head_input_point,
            )
    return target


def _found_in(stand_in: nn.Module, placement: str) -> Target | None:
    """Discovery's searches on a stand-in for the model (a Hugging Face model, the structure, the layers' inputs)."""
    return _hf_target(stand_in, placement) or _structure_target(stand_in) or _layer_inputs_target(stand_in)


def _adaptive_softmax_target(root: nn.Module, placement: str) -> Target | None:
    """A model whose output is an ``nn.AdaptiveLogSoftmaxWithLoss`` (a word language model's adaptive softmax): the
    blocks found without it, the layer it reads (the stand-in's output) the last of them, and its shortlist head the
    output (the error is read there; its tail clusters, which see only the rows of their rare words, learn by their
    true gradient). ``None`` without exactly one such module.

    Example:
        >>> class LM(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.embedding, self.rnn = nn.Embedding(300, 16), nn.LSTM(16, 32, batch_first=True)
        ...         self.out = nn.AdaptiveLogSoftmaxWithLoss(32, 300, cutoffs=[20, 100])
        >>> target = _adaptive_softmax_target(LM(), "macro")
        >>> [b.name for b in target.blocks], target.output_name
        (['embedding', 'rnn'], 'out.head')
    """
    found = [name for name, m in root.named_modules() if isinstance(m, nn.AdaptiveLogSoftmaxWithLoss)]
    if len(found) != 1 or not found[0]:
        return None
    stand_in = _without(root, lambda m: isinstance(m, nn.AdaptiveLogSoftmaxWithLoss))
    if stand_in is root:
        return None
    inner = _found_in(stand_in, placement)
    if inner is None:
        return None
    blocks = list(inner.blocks)
    if not any(b.name == inner.output_name for b in blocks):
        blocks += _blocks_from_modules([(inner.output_name, inner.output)])
    head = f"{found[0]}.head"
    return Target(blocks, head, root.get_submodule(head), "adaptive softmax")


def _frozen_teacher(module: nn.Module) -> bool:
    """A network (two or more layers holding parameters, at any depth) none of whose parameters trains, in
    evaluation mode."""
    layers = [m for m in module.modules() if any(True for _ in m.parameters(recurse=False))]
    return not module.training and len(layers) >= 2 and not _trainable(module)


def _teacher_blocks(root: nn.Module, target: Target) -> bool:
    """Every block of ``target`` lies in a frozen network in evaluation mode (:func:`_frozen_teacher`) among
    ``root``'s attributes, and ``root`` has parameters that train."""
    if not target.blocks or not _trainable(root):
        return False
    frozen = [n for n, m in root.named_modules() if n and _frozen_teacher(m)]
    return all(any(b.name == n or b.name.startswith(n + ".") for n in frozen) for b in target.blocks)


def _without_frozen_networks(root: nn.Module) -> nn.Module:
    """A stand-in for ``root`` for discovery: the same modules under the same names, less the frozen networks in
    evaluation mode (:func:`_frozen_teacher`) among its attributes and those of its plain containers
    (``nn.ModuleDict`` and modules that are neither lists nor chains, whose names do not shift). ``root`` itself
    where there is none.

    Example:
        >>> class Distill(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         teacher = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        ...         self.teacher = teacher.requires_grad_(False).eval()
        ...         self.student = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
        >>> [n for n, _ in _without_frozen_networks(Distill()).named_children()]
        ['student']
    """

    return _without(root, _frozen_teacher)


def _without(root: nn.Module, drop: Callable[[nn.Module], bool]) -> nn.Module:
    """A stand-in for ``root`` for discovery: the same modules under the same names, less those for which ``drop``
    holds among its attributes and those of its plain containers (see :func:`_without_frozen_networks`)."""

    def pruned(module: nn.Module) -> nn.Module:
        if isinstance(module, (nn.ModuleList, nn.Sequential)) or not any(True for _ in module.children()):
            return module
        kids = [(n, c) for n, c in module.named_children() if not drop(c)]
        changed = [(n, pruned(c)) for n, c in kids]
        if len(kids) == len(list(module.children())) and all(a is c for (_, a), (_, c) in zip(changed, kids)):
            return module
        stand_in = nn.ModuleDict() if isinstance(module, nn.ModuleDict) else nn.Module()
        for name, child in changed:
            stand_in.add_module(name, child)
        return stand_in

    return pruned(root)


def _grown_to_their_layers(root: nn.Module, blocks: list[Block]) -> list[Block]:
    """Named blocks without parameters of their own (an activation, as the summary lists an ``nn.Sequential``'s
    Linear+Tanh group) take in the layer before them in their ``nn.Sequential`` and what lies between, as discovery's
    groups do: the feedback then lands on the activation's output, through its derivative, and the layer's input is
    cut. Otherwise the block's own input would be cut, and its output carry no gradient to the layer.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> [(b.name, type(b.entry).__name__) for b in _grown_to_their_layers(net, _blocks_from_modules(
        ...     [("1", net[1]), ("3", net[3])]))]
        [('1', 'Linear'), ('3', 'Linear')]
    """
    named = {id(b.exit) for b in blocks}
    out = []
    for block in blocks:
        parent_name, _, child = block.name.rpartition(".")
        parent = root.get_submodule(parent_name)
        if _has_params(block.exit) or not isinstance(parent, nn.Sequential):
            out.append(block)
            continue
        children = list(parent.named_children())
        at = next((i for i, (n, _) in enumerate(children) if n == child), None)
        group = [block.exit]
        for _, module in reversed(children[:at] if at is not None else []):
            if id(module) in named:
                break
            group.insert(0, module)
            if _has_params(module):
                break
        if len(group) == 1 or not _has_params(group[0]):
            out.append(block)
            continue
        out.append(dataclasses.replace(block, entry=group[0], members=tuple(group)))
    return out


def _blocks_before(root: nn.Module, blocks: list[Block], output: str) -> list[Block]:
    """The found ``blocks`` without the ``output`` named by the user: where discovery took it for a block (a chain
    of layers running on into a critic's registered after the model's head), the blocks before it, neither the
    output, a module inside it or holding it, nor one registered after it. Unchanged when none would be left."""

    def overlaps(name: str) -> bool:
        return name == output or name.startswith(output + ".") or output.startswith(name + ".")

    if not any(overlaps(b.name) for b in blocks):
        return blocks
    order = _module_order(root)
    at = order.get(output, len(order))
    kept = [b for b in blocks if not overlaps(b.name) and order.get(b.name, -1) < at]
    return kept or blocks


_PARAMETER_LISTS = (nn.ParameterList, nn.ParameterDict)


def _bare_parameters_only(root: nn.Module) -> bool:
    """The model holds parameters, all of them its own or in parameter lists: no layer module holds any."""
    holders = [m for m in root.modules() if any(True for _ in m.parameters(recurse=False))]
    return bool(holders) and all(m is root or isinstance(m, _PARAMETER_LISTS) for m in holders)


def single_trainable_layer(root: nn.Module) -> tuple[str, nn.Module] | None:
    """The one module holding trainable parameters of its own, when there is only one (Lightning's
    ``BoringModel``, a logistic regression): a model with no hidden layer, where DFA has nowhere to send feedback.

    Example:
        >>> single_trainable_layer(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))[0]
        '1'
        >>> single_trainable_layer(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))) is None
        True
    """
    holders = [(n, m) for n, m in root.named_modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    if len(holders) != 1:
        return None
    name, module = holders[0]
    # a layer (Linear, Conv, ...: a leaf with a weight and perhaps a bias), not parameters used in the model's own
    # code, where two raw weights are two layers
    leaf = module is not root and not any(True for _ in module.children()) and not isinstance(module, _PARAMETER_LISTS)
    return (name, module) if leaf and len(list(module.parameters(recurse=False))) <= 2 else None


def _micro_from_structure(root: nn.Module, output: str | None) -> Target:
    """``placement="micro"`` outside Hugging Face: the Transformer blocks of a ModuleList or of stages (timm's
    ``blocks = nn.Sequential(Block, ...)``), each with the inner points :func:`infer_micro_points` finds."""
    macro = _stages_target(root) or _module_list_target(root)
    inner = [] if macro is None else [(b, infer_micro_points(b.entry)) for b in macro.blocks]
    # Transformer blocks only: the first inferred point is the attention (a ResNet block has an activation only)
    inner = [(b, pts) for b, pts in inner if pts and _ATTENTION_NAME.search(pts[0].rsplit(".", 1)[-1])]
    if macro is None or not inner:
        raise ValueError(
            "DFA: placement='micro' adds points inside Transformer blocks (after attention and after the MLP's "
            "activation), but found no blocks with an attention submodule in "
            f"{type(root).__name__}. Use placement='macro', or explicit blocks=[...] naming the inner points."
        )
    found = [(b.name, b.entry) for b in macro.blocks]
    found += [(f"{b.name}.{sub}", b.entry.get_submodule(sub)) for b, points in inner for sub in points]
    order = _module_order(root)
    blocks = _blocks_from_modules(sorted(found, key=lambda x: order[x[0]]))
    out_name = output or macro.output_name
    return Target(blocks, out_name, _get_output(root, out_name), macro.source)


def _get_output(root: nn.Module, name: str) -> nn.Module:
    found = match_modules(root, name)
    exact = [(n, m) for n, m in found if n == name]
    if exact:
        return exact[0][1]
    if len(found) == 1:
        return found[0][1]
    if not found:
        raise ValueError(f"DFA: output={name!r} names no module of {type(root).__name__}.")
    raise ValueError(f"DFA: output={name!r} is ambiguous: it matches {[n for n, _ in found]}.")
