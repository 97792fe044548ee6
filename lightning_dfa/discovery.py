"""Finding where feedback goes: the *blocks* (feedback points) and the *output* (where the error is read).

Discovery order (the first that applies wins):

1. explicit ``blocks=`` / ``output=`` arguments;
2. a ``configure_dfa()`` method on the root module (the LightningModule) returning the same options
   (merged by :meth:`lightning_dfa.DFAConfig.merged_with` in :meth:`lightning_dfa.FeedbackEngine.attach`);
3. a Hugging Face ``PreTrainedModel`` inside the root: blocks are the modules whose class is listed in the
   model's ``_no_split_modules``; the output is ``get_output_embeddings()`` or the task head;
4. the model's repeated blocks (:func:`repeated_blocks`): a ``ModuleList`` of composite blocks of one class (all
   Transformer stacks of an encoder-decoder), stages of residual blocks (ResNet's ``layer1``, one-block stages
   too), or composite attributes of one module sharing a class (a UNet's ``down1``, ``up1``...); the output is the
   last parametric layer registered outside them. A Sequential inside one of these blocks is part of the block.
   They win over rule 5 unless a Sequential chain outside them holds more parameters;
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

The output found here is where the engine starts: the layers outside the blocks are tied too, and the backward
keeps as error sources those the loss reads (see :meth:`lightning_dfa.FeedbackEngine.output_modules`).

Block names accept exact qualified names, dotted suffixes of them (``"h.0"`` matches ``"model.transformer.h.0"``),
and glob patterns where ``*`` matches within one dotted component, ``**`` across components, ``?`` one
character and ``[...]`` a character class (``"layers.[0-3]"``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Union

from torch import nn

from .registry import MICRO_POINTS, micro_points

BlockSpec = Union[str, type, Sequence[Union[str, type]], None]

_LAYER_TYPES = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.Embedding)
_NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_POOL_TYPES = (
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)
_DROPOUT_TYPES = (nn.modules.dropout._DropoutNd,)


def _is_activation(module: nn.Module) -> bool:
    return type(module).__module__ == nn.modules.activation.__name__ and not isinstance(
        module, (nn.MultiheadAttention, nn.Softmax, nn.LogSoftmax, nn.Softmax2d, nn.Softmin)
    )


_ACTIVATION_CLASS = re.compile(r"gelu|relu|silu|swish|mish|activation", re.IGNORECASE)


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _is_hidden_activation(module: nn.Module) -> bool:
    """A torch activation, a Hugging Face one (``transformers.activations``), or a parameter-free module whose
    class is named like one (e.g. BLOOM's ``BloomGelu``)."""
    if _is_activation(module) or type(module).__module__ == "transformers.activations":
        return True
    return bool(_ACTIVATION_CLASS.search(type(module).__name__)) and not _has_params(module)


_ATTENTION_NAME = re.compile(r"attn|attention", re.IGNORECASE)
_NORM_NAME = re.compile(r"(^|_)(ln|norm|layernorm|layer_norm|rmsnorm)(_|$)|norm$", re.IGNORECASE)


def infer_micro_points(block: nn.Module) -> tuple[str, ...]:
    """The micro feedback points of one Transformer block, found from its structure: the attention sub-block
    (the outermost submodule named ``*attn*``/``*attention*`` that holds parameters and is no norm) and the MLP's
    hidden activation (the first activation module outside the attention and outside mixture-of-experts
    ``experts``, whose rows are routed tokens, not the block's). Used for architectures not in
    :data:`lightning_dfa.registry.MICRO_POINTS`; returns the points found (``()`` if none).

    Example:
        >>> class Block(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.self_attn = nn.MultiheadAttention(8, 2)
        ...         self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        >>> infer_micro_points(Block())
        ('self_attn', 'mlp.1')
    """
    named = [(n, m) for n, m in block.named_modules() if n]
    attention = [
        n
        for n, m in named
        if _ATTENTION_NAME.search(n.rsplit(".", 1)[-1])
        and not _NORM_NAME.search(n.rsplit(".", 1)[-1])
        and not isinstance(m, _NORM_TYPES)
        and _has_params(m)
    ]
    attn = min(attention, key=lambda n: n.count(".")) if attention else None  # the outermost, first in order
    acts = [
        n
        for n, m in named
        if _is_hidden_activation(m)
        and not (attn is not None and n.startswith(attn + "."))
        and "expert" not in n.lower()
    ]
    return tuple(p for p in (attn, acts[0] if acts else None) if p is not None)


@dataclass(frozen=True)
class Block:
    """One feedback point: the output of ``exit`` receives feedback; its downstream sees a detached value.

    ``entry`` is the first module of the block (differs from ``exit`` for ``nn.Sequential`` groups). A
    *top-level* block (not nested in another block) also cuts its main input: if that input carries gradient
    (embeddings before the first block), it becomes a feedback point of its own, named ``"<name>:in"``.
    """

    name: str
    entry: nn.Module = field(compare=False, repr=False)
    exit: nn.Module = field(compare=False, repr=False)
    top_level: bool = True
    members: tuple[nn.Module, ...] = field(default=(), compare=False, repr=False)
    #: ``False``: the block's input is its only point (rule 6, layer-input discovery)
    output_point: bool = True

    def parameters(self) -> list[nn.Parameter]:
        """The parameters inside this block."""
        mods = self.members or (self.entry,)
        return [p for m in mods for p in m.parameters()]


@dataclass
class Target:
    """The result of discovery: the blocks, the output module and where they came from."""

    blocks: list[Block]
    output_name: str
    output: nn.Module
    source: str
    #: the output module's input is a feedback point (detached before the output), as ``cut_head_input``
    head_input_point: bool = False
    #: further output modules (several heads or losses), each an error source of its own
    extra_outputs: list[tuple[str, nn.Module]] = field(default_factory=list)

    @property
    def outputs(self) -> list[tuple[str, nn.Module]]:
        """Every output module: ``(name, module)``, the primary one first."""
        return [(self.output_name, self.output), *self.extra_outputs]

    def block_param_ids(self) -> set[int]:
        """``id`` of every parameter inside a block."""
        return {id(p) for b in self.blocks for p in b.parameters()}


def _compile_pattern(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^.]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^.]"
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2 :]:  # a character class, as in fnmatch: [0-3], [!0]
            end = pattern.index("]", i + 2)
            body = pattern[i + 1 : end]
            out += "[" + ("^" + body[1:] if body.startswith("!") else body) + "]"
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(rf"(?:.*\.)?{out}")


def match_modules(root: nn.Module, spec: BlockSpec) -> list[tuple[str, nn.Module]]:
    """Modules of ``root`` matching a name, glob pattern, module class, or a list of them (in module order).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 2))
        >>> [n for n, _ in match_modules(net, "0")], [n for n, _ in match_modules(net, nn.Tanh)]
        (['0'], ['1'])
    """
    if spec is None:
        return []
    items: Iterable[str | type] = [spec] if isinstance(spec, (str, type)) else spec
    patterns = []
    classes: list[type] = []
    for item in items:
        if isinstance(item, type):
            classes.append(item)
        elif isinstance(item, str):
            patterns.append(_compile_pattern(item))
        else:
            raise TypeError(f"DFA: blocks must be names, glob patterns or module classes, got {item!r}.")
    found = []
    for name, module in root.named_modules():
        if not name:
            continue
        if any(isinstance(module, c) for c in classes) or any(p.fullmatch(name) for p in patterns):
            found.append((name, module))
    return found


def _nested(names: list[str]) -> set[str]:
    """Names that lie inside another name of the list."""
    return {n for n in names if any(n.startswith(o + ".") for o in names if o != n)}


def _blocks_from_modules(found: list[tuple[str, nn.Module]]) -> list[Block]:
    inner = _nested([n for n, _ in found])
    return [Block(n, m, m, top_level=n not in inner) for n, m in found]


def _last_param_leaf(root: nn.Module, exclude: Iterable[str]) -> tuple[str, nn.Module] | None:
    excluded = tuple(exclude)
    last = None
    for name, module in root.named_modules():
        if not name or any(name == e or name.startswith(e + ".") for e in excluded):
            continue
        if any(True for _ in module.parameters(recurse=False)) and not any(True for _ in module.children()):
            last = (name, module)
    return last


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


def _hf_target(root: nn.Module, placement: str) -> Target | None:
    found = _find_hf_model(root)
    if found is None:
        return None
    prefix, hf = found
    classes: set[str] = set()
    for module in hf.modules():
        classes.update(getattr(module, "_no_split_modules", None) or [])
    blocks_found = [(n, m) for n, m in root.named_modules() if n.startswith(prefix) and type(m).__name__ in classes]
    inner = _nested([n for n, _ in blocks_found])
    blocks_found = [(n, m) for n, m in blocks_found if n not in inner]
    if not blocks_found:  # no _no_split_modules (e.g. ALBERT): its list of repeated layers, even a shared one
        layers = _module_list_target(hf, min_len=1)
        if layers is None:
            return None
        join_ = (prefix + ".") if prefix else ""
        blocks_found = [(join_ + b.name, b.entry) for b in layers.blocks]
    join = (prefix + ".") if prefix else ""
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    out_name = _head_after_backbone(root, prefix, hf) if head is None else None
    if out_name is not None:  # a backbone (AutoModel, a PEFT-wrapped one) with the user's own head after it
        pass
    elif head is not None:
        out_name = next(n for n, m in root.named_modules() if m is head)
    else:
        base = getattr(hf, "base_model", None)
        heads = [(n, m) for n, m in hf.named_children() if m is not base and _has_params(m)]
        if heads:
            out_name = join + heads[-1][0]
        else:
            leaf = _last_param_leaf(root, [n for n, _ in blocks_found])
            out_name = leaf[0] if leaf else None
    if out_name is None:
        return None
    blocks = [Block(n, m, m) for n, m in blocks_found]
    if placement == "micro":
        model_type = getattr(getattr(hf, "config", None), "model_type", type(hf).__name__)
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


def _module_order(root: nn.Module) -> dict[str, int]:
    return {n: i for i, (n, _) in enumerate(root.named_modules())}


# --------------------------------------------------------------------------- nn.Sequential
def sequential_groups(seq: nn.Sequential, prefix: str = "", whole: bool = False) -> tuple[list[Block], str] | None:
    """Split a Sequential into feedback groups and its output layer.

    A group starts at a parametric layer (Linear/Conv, or a container with parameters) and takes the norms,
    activations, pooling and dropout that follow it; the last parametric layer is the output. ``whole``: every
    layer's group is a block (a feature extractor whose output layer lies after it) and the output is ``""``.

    Example:
        >>> seq = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> blocks, out = sequential_groups(seq)
        >>> [b.name for b in blocks], out
        (['1', '3'], '4')
    """
    children = list(seq.named_children())
    join = (prefix + ".") if prefix else ""
    param_idx = [i for i, (_, m) in enumerate(children) if _has_params(m)]
    if len(param_idx) < (1 if whole else 2):
        return None
    last = len(children) if whole else param_idx[-1]
    # norms directly after a layer are part of its group, so the output is the last *layer*
    while not whole and last > 0 and isinstance(children[last][1], _NORM_TYPES) and last - 1 in param_idx:
        last -= 1
    blocks = []
    i = 0
    while i < last:
        name, module = children[i]
        if not _has_params(module):
            i += 1
            continue
        j = i
        while j + 1 < last and (
            isinstance(children[j + 1][1], _NORM_TYPES + _POOL_TYPES + _DROPOUT_TYPES)
            or _is_activation(children[j + 1][1])
        ):
            j += 1
        members = tuple(m for _, m in children[i : j + 1])
        blocks.append(Block(join + children[j][0], module, children[j][1], members=members))
        i = j + 1
    if not blocks:
        return None
    return blocks, "" if whole else join + children[last][0]


def _is_feature_extractor(seq: nn.Sequential) -> bool:
    """A Sequential of two or more layers that ends in an activation, pooling, dropout or flatten: its last layer
    is hidden (a single ``Sequential(Linear, ReLU)`` is one block of something larger, as in a ModuleList)."""
    children = list(seq.children())
    return sum(_has_params(c) for c in children) >= 2 and not _has_params(children[-1])


def _composite(module: nn.Module) -> bool:
    """A module made of submodules that holds parameters (a block, not a single layer)."""
    return any(True for _ in module.children()) and _has_params(module)


def _is_stage(seq: nn.Module) -> bool:
    """A Sequential of two or more composite blocks of one class (ResNet's ``layer1 = Sequential(BasicBlock, ...)``):
    a list of residual blocks, not a chain of layers."""
    children = list(seq.children())
    return (
        isinstance(seq, nn.Sequential)
        and len(children) >= 2
        and len({type(c) for c in children}) == 1
        and all(_composite(c) for c in children)
    )


def _one_block_stages(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """Sequentials of ONE composite block, when two or more hold blocks of the same class (timm's ``resnet10t``:
    ``layer1`` ... ``layer4`` each ``Sequential(BasicBlock)``)."""
    single = [(n, m) for n, m in root.named_modules() if isinstance(m, nn.Sequential) and len(m) == 1]
    single = [(n, m) for n, m in single if _composite(m[0])]
    kinds = [type(m[0]) for _, m in single]
    return [(n, m) for n, m in single if kinds.count(type(m[0])) >= 2]


def repeated_blocks(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """Containers of the model's repeated blocks: ModuleLists and Sequentials of two or more composite modules of
    one class (``blocks = nn.ModuleList([Block(...)])``, ResNet's stages). A Sequential found inside one of their
    blocks (an MLP ``nn.Sequential(Linear, GELU, Linear)``) is part of that block, never a chain of blocks itself.

    Example:
        >>> class Block(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.mlp = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
        >>> net = nn.Module()
        >>> net.blocks = nn.ModuleList([Block(), Block()])
        >>> [n for n, _ in repeated_blocks(net)]
        ['blocks']
    """
    found = []
    for name, module in root.named_modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)):
            children = list(module.children())
            if len(children) >= 2 and len({type(c) for c in children}) == 1 and all(_composite(c) for c in children):
                found.append((name, module))
    return found


def _inside(name: str, containers: Sequence[str]) -> bool:
    """``name`` is one of the containers' blocks or lies inside one (``""`` is the root)."""
    return any(name.startswith(c + ".") if c else bool(name) for c in containers)


def _stages_target(root: nn.Module) -> Target | None:
    """Rule 4a: stages of repeated composite blocks (ResNet's ``layer1`` ... ``layer4``). Every block of every
    stage is a block, and the output is the last parametric layer registered outside the stages (``fc``)."""
    stages = [(n, m) for n, m in root.named_modules() if _is_stage(m)] + _one_block_stages(root)
    stages = [(n, m) for n, m in stages if not any(n.startswith(o + ".") for o, _ in stages)]
    stages.sort(key=lambda x: _module_order(root)[x[0]])
    if not stages:
        return None
    size = sum(p.numel() for _, m in stages for p in m.parameters())
    lists = [m for m in root.modules() if isinstance(m, nn.ModuleList) and len({type(c) for c in m}) == 1]
    if any(sum(p.numel() for p in m.parameters()) > size for m in lists):
        return None  # a larger ModuleList of repeated layers is the backbone (rule 5)
    names = [n for n, _ in stages]
    leaf = _last_param_leaf(root, names)
    order = _module_order(root)
    if leaf is None or order[leaf[0]] < max(order[n] for n in names):
        return None  # no output layer after the stages
    blocks = [Block(f"{n}.{child}", m, m) for n, stage in stages for child, m in stage.named_children()]
    return Target(blocks, leaf[0], leaf[1], "stages")


def _sequential_target(root: nn.Module, exclude: Sequence[str] = ()) -> Target | None:
    """Rule 4. The largest Sequential that splits into groups; if it is a feature extractor (``encoder =
    Sequential(Linear, ReLU, Linear, ReLU)`` before ``head = Linear``), all its groups are blocks and the output is
    the first parametric module registered after it (a Sequential there adds its own groups). Feature-extractor
    Sequentials registered before the chosen one (VGG's ``features`` before its ``classifier``) add their groups."""
    order = _module_order(root)
    repeated = [n for n, _ in repeated_blocks(root)]
    sequentials = [
        (n, m)
        for n, m in root.named_modules()
        if isinstance(m, nn.Sequential) and not _inside(n, repeated) and not _inside(n + ".", exclude)
    ]
    sequentials = [(n, m) for n, m in sequentials if n not in repeated]
    best = None
    for name, seq in sorted(sequentials, key=lambda x: -sum(p.numel() for p in x[1].parameters())):
        grouped = sequential_groups(seq, name)
        if grouped is not None or _is_feature_extractor(seq):
            best = (name, seq, grouped)
            break
    if best is None:
        return None
    name, seq, grouped = best
    blocks: list[Block] = []
    out_name = grouped[1] if grouped is not None else None
    after = _module_after(root, name, order)
    network, other = _network_of(root, name), _network_of(root, after[0]) if after is not None else None
    if grouped is not None and network is not None and other is not None and network != other:
        # two networks of their own (a GAN's generator and discriminator): each chain ends in its own output (the
        # other network's last layer is found as an output from the forward); the other's groups are blocks too
        extra = _sequential_target(root.get_submodule(other))
        blocks = list(grouped[0]) + ([] if extra is None else [_renamed(b, other) for b in extra.blocks])
        after = None
    elif _is_feature_extractor(seq) or _is_layer(after):  # its last layer is hidden: a layer is registered after it
        if after is not None:
            whole = sequential_groups(seq, name, whole=True)
            blocks = whole[0] if whole else []
            out_name = after[0]
            if isinstance(after[1], nn.Sequential):  # its last layer is the output (a Sigmoid after it is the loss's)
                tail = sequential_groups(after[1], after[0])
                if tail is not None:
                    blocks, out_name = blocks + tail[0], tail[1]
                else:  # a one-layer Sequential: that layer is the output
                    layer = next(n for n, m in after[1].named_children() if _has_params(m))
                    out_name = f"{after[0]}.{layer}"
    if out_name is None:
        return None
    if not blocks:
        assert grouped is not None
        blocks = list(grouped[0])
    # Sequentials that run before (feature extractors, the features before a larger classifier): all their groups
    # are blocks too
    first = min(order[b.name] for b in blocks)
    for other, mod in sequentials:
        nested = other.startswith(name + ".") or name.startswith(other + ".") or other == name
        if nested or order[other] > first or not _has_params(mod):
            continue
        if any(other.startswith(o + ".") for o, m in sequentials if o != other and _has_params(m)):
            continue
        extra = sequential_groups(mod, other, whole=True)
        if extra is not None:
            blocks = extra[0] + blocks
    blocks.sort(key=lambda b: order[b.name])
    return Target(blocks, out_name, root.get_submodule(out_name), "sequential")


def _network_of(root: nn.Module, name: str) -> str | None:
    """The root's child holding ``name`` when that child is a network of its own (a module class of the user's,
    holding ``name`` below it), else ``None``."""
    top = name.split(".")[0]
    if not name or top == name:
        return None
    child = root.get_submodule(top)
    return None if isinstance(child, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) else top


def _renamed(block: Block, prefix: str) -> Block:
    return Block(f"{prefix}.{block.name}", block.entry, block.exit, block.top_level, block.members, block.output_point)


def _is_layer(found: tuple[str, nn.Module] | None) -> bool:
    """A module that can read a feature tensor (not an embedding lookup, whose input is indices)."""
    return found is not None and not isinstance(found[1], (nn.Embedding, nn.EmbeddingBag))


def _module_after(root: nn.Module, name: str, order: dict[str, int]) -> tuple[str, nn.Module] | None:
    """The first module registered after ``name`` (outside it) that holds parameters, outermost first."""
    if not name:
        return None  # the root itself: nothing lies after it
    for other, module in root.named_modules():
        if order[other] <= order[name] or other.startswith(name + ".") or not _has_params(module):
            continue
        if any(True for _ in module.children()) and not isinstance(module, nn.Sequential):
            continue  # a container: look inside it for the layer
        return other, module
    return None


# --------------------------------------------------------------------------- ModuleList
def _module_list_target(root: nn.Module, min_len: int = 2, composite: bool = False) -> Target | None:
    best = None
    for name, mlist in root.named_modules():
        if not isinstance(mlist, nn.ModuleList) or len(mlist) < min_len:
            continue
        if composite and not all(_composite(m) for m in mlist):
            continue
        kinds = {type(m) for m in mlist}
        size = sum(p.numel() for p in mlist.parameters())
        if len(kinds) == 1 and size > 0 and (best is None or size > best[2]):
            best = (name, mlist, size)
    if best is None:
        return None
    name, mlist, _ = best
    lists = [(name, mlist)]
    if composite and _is_transformer_stack(mlist):
        # an encoder-decoder (``nn.Transformer``): every stack of Transformer layers holds blocks, not only the
        # largest (the encoder would otherwise learn only through the decoder's cross-attention)
        for other, olist in root.named_modules():
            if (
                isinstance(olist, nn.ModuleList)
                and other != name
                and len(olist) >= min_len
                and len({type(m) for m in olist}) == 1
                and _is_transformer_stack(olist)
                and not any(other.startswith(n + ".") or n.startswith(other + ".") for n, _ in lists)
            ):
                lists.append((other, olist))
        order = _module_order(root)
        lists.sort(key=lambda x: order[x[0]])
    blocks = [Block(f"{n}.{i}", m, m) for n, ml in lists for i, m in enumerate(ml)]
    leaf = _last_param_leaf(root, [n for n, _ in lists])
    if leaf is None:
        return None
    return Target(blocks, leaf[0], leaf[1], "module_list")


def _is_transformer_stack(mlist: nn.ModuleList) -> bool:
    """A list of composite layers that each hold an attention submodule."""
    points = infer_micro_points(mlist[0]) if len(mlist) and _composite(mlist[0]) else ()
    return bool(points) and bool(_ATTENTION_NAME.search(points[0].rsplit(".", 1)[-1]))


# --------------------------------------------------------------------------- repeated blocks as attributes
def _attribute_blocks_target(root: nn.Module) -> Target | None:
    """Blocks that are attributes of one module (a UNet's ``inc``, ``down1`` ... ``down4``, ``up1`` ... ``up4``,
    ``outc``): where two or more of a module's composite children share a class, every composite child registered
    before the one holding its last parametric layer is a block, and that layer is the output."""
    best = None
    for name, parent in root.named_modules():
        if isinstance(parent, (nn.ModuleList, nn.Sequential, nn.ModuleDict)):
            continue
        kids = [(n, c) for n, c in parent.named_children() if _composite(c)]
        kinds = [type(c) for _, c in kids if type(c) not in (nn.Sequential, nn.ModuleList, nn.ModuleDict)]
        if not any(kinds.count(k) >= 2 for k in kinds):  # a class of the model's own, repeated
            continue
        leaf = _last_param_leaf(parent, [])
        if leaf is None:
            continue
        top = leaf[0].split(".")[0]
        order = [n for n, _ in parent.named_children()]
        kids = [(n, c) for n, c in kids if order.index(n) < order.index(top)]
        if len(kids) < 2:
            continue
        join = f"{name}." if name else ""
        blocks = [Block(join + n, c, c) for n, c in kids]
        size = sum(p.numel() for _, c in kids for p in c.parameters())
        if best is None or size > best[0]:
            best = (size, Target(blocks, join + leaf[0], leaf[1], "attribute_blocks"))
    return None if best is None else best[1]


def _block_params(target: Target | None) -> int:
    if target is None:
        return -1
    seen: dict[int, int] = {}
    for b in target.blocks:
        for p in b.parameters():
            seen[id(p)] = p.numel()
    return sum(seen.values())


def _structure_target(root: nn.Module) -> Target | None:
    """Rules 4, 4a and 5: the model's repeated blocks (stages, a ModuleList of composite blocks, or blocks as
    attributes of one module), unless a chain of Sequential groups outside them holds more parameters."""
    repeated = [t for t in (_stages_target(root), _module_list_target(root, composite=True)) if t is not None]
    repeated += [t for t in (_attribute_blocks_target(root),) if t is not None]
    best = max(repeated, key=_block_params) if repeated else None
    chain = _sequential_target(root, [b.name for b in best.blocks] if best is not None else [])
    if best is not None and _block_params(best) >= _block_params(chain):
        return best
    return chain or _module_list_target(root)


# --------------------------------------------------------------------------- layers as attributes
_POINT_LAYER_TYPES = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.RNNBase, nn.MultiheadAttention, nn.Embedding)


def _layer_inputs_target(root: nn.Module) -> Target | None:
    """Rule 6: the parametric layers (Linear, Conv, RNN, attention, Embedding; not norms) in registration order.

    Each layer's input is a feedback point (recorded only when it carries gradient, so never the data or token
    ids), and the last layer is the output, its input a point too. A layer's feedback thus arrives after the
    activation ``forward`` applies to the previous layer's output, as the DFA rule ``(B e) * f'(a)`` needs.
    """
    layers = [(n, m) for n, m in root.named_modules() if n and isinstance(m, _POINT_LAYER_TYPES)]
    layers = [(n, m) for n, m in layers if not any(n.startswith(o + ".") for o, _ in layers)]  # MHA's out_proj
    if len(layers) < 2:
        return None
    *hidden, (out_name, out) = layers
    blocks = [Block(n, m, m, output_point=False) for n, m in hidden]
    return Target(blocks, out_name, out, "layer_inputs", head_input_point=True)


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
    target.extra_outputs = [(n, _get_output(root, n)) for n in outputs[1:]]
    for name, _ in target.outputs:
        if any(b.name == name or b.name.startswith(name + ".") for b in target.blocks):
            raise ValueError(
                f"DFA: the output module {name!r} is also a block (or contains one); the output must lie "
                "after the last block. Pass output= naming the final layer (logits, predictions)."
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
        found_blocks = _blocks_from_modules(found)
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
        target = target or _structure_target(root) or _layer_inputs_target(root)
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
            target = Target(target.blocks, output, _get_output(root, output), target.source, target.head_input_point)
    return target


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
