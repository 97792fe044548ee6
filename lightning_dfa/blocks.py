"""The objects discovery returns (:class:`Block`, :class:`Target`), the module kinds it recognises, and matching
modules by name, glob pattern or class."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Union

from torch import nn

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
    #: networks of their own (a two-tower model's towers): output name -> the blocks its error reaches; the other
    #: outputs reach the blocks no tower holds
    towers: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def blocks_fed_by(self, output: str) -> set[str] | None:
        """The names of the blocks whose points the error of ``output`` reaches (``None``: every block).

        Example:
            >>> t = Target([], "text_head", nn.Identity(), "sequential", towers={"image_head": ("image.1",)})
            >>> t.blocks_fed_by("image_head"), t.blocks_fed_by("text_head")
            ({'image.1'}, set())
        """
        if not self.towers:
            return None
        if output in self.towers:
            return set(self.towers[output])
        held = {b for blocks in self.towers.values() for b in blocks}
        return {b.name for b in self.blocks if b.name not in held}

    @property
    def outputs(self) -> list[tuple[str, nn.Module]]:
        """Every output module: ``(name, module)``, the primary one first."""
        return [(self.output_name, self.output), *self.extra_outputs]

    def block_param_ids(self) -> set[int]:
        """``id`` of every parameter inside a block."""
        return {id(p) for b in self.blocks for p in b.parameters()}

    def with_blocks_as_outputs(self, names: Sequence[str], root: nn.Module | None = None) -> Target:
        """This target with the blocks named in ``names`` moved to the outputs (after those it has): heads on middle
        layers (:meth:`FeedbackEngine.add_outputs`). Names of ``root``'s modules that are no block are added as
        outputs too (a head outside the blocks); others are left alone."""
        known = {name for name, _ in self.outputs}
        blocks = {b.name: b for b in self.blocks}
        added = []
        for name in dict.fromkeys(names):
            if name in known:
                continue
            if name in blocks:
                added.append((name, blocks[name].exit))
            elif root is not None and name in dict(root.named_modules()):
                added.append((name, root.get_submodule(name)))
        kept = [b for b in self.blocks if b.name not in names]
        return replace(self, blocks=kept, extra_outputs=[*self.extra_outputs, *added])


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


def owned_modules(root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``root.named_modules()`` without the containers that only gather modules registered earlier under other
    names (``self.backbone = self.net[:-1]``, ``nn.ModuleList(self.layers[:2])``): views of the model, whose
    children ``named_modules`` lists once, under their first names.

    Example:
        >>> net = nn.Module()
        >>> net.body = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))
        >>> net.backbone = net.body[:2]
        >>> [n for n, _ in owned_modules(net)]
        ['', 'body', 'body.0', 'body.1', 'body.2']
    """
    modules = list(root.named_modules())
    names = {n for n, _ in modules}
    for name, module in modules:
        children = [f"{name}.{n}" if name else n for n, _ in module.named_children()]
        if children and not any(c in names for c in children):
            continue  # every child is listed under another name: a view, not a part
        yield name, module


def _module_order(root: nn.Module) -> dict[str, int]:
    return {n: i for i, (n, _) in enumerate(root.named_modules())}


def _frozen(block: Block) -> bool:
    """A block whose parameters are all frozen: no feedback point (it cannot learn; for a step in which a network
    is frozen, such as the discriminator in a generator's step, it is part of the loss)."""
    seen = False
    for m in block.members or (block.entry,):
        for p in m.parameters():
            if p.requires_grad:
                return False  # (checked at every call of a block: stop at its first trainable parameter)
            seen = True
    return seen
