"""Finding the blocks of a model from its structure: Sequential chains of layer groups, repeated blocks in a
ModuleList, stages of residual blocks, composite attributes of one class, and hand-written nets whose layer inputs
are the points (rules 4 to 6 of :func:`lightning_dfa.discovery.discover`)."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence

from torch import nn

from .blocks import (
    _ATTENTION_NAME,
    _DROPOUT_TYPES,
    _NORM_TYPES,
    _POOL_TYPES,
    Block,
    Target,
    _has_params,
    _is_activation,
    _last_param_leaf,
    _module_order,
    infer_micro_points,
    owned_modules,
)


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


def _chain_list(module: nn.Module) -> bool:
    """An ``nn.ModuleList`` used as a Sequential: parametric layers with activations between them, called in order
    in a loop (``ModuleList([GCNConv, ReLU, Dropout, GCNConv])``, dispatching on each layer's kind).

    Example:
        >>> _chain_list(nn.ModuleList([nn.Linear(4, 8), nn.ReLU(), nn.Dropout(), nn.Linear(8, 2)]))
        True
        >>> _chain_list(nn.ModuleList([nn.Linear(4, 2), nn.Linear(4, 3)]))  # two heads, no chain
        False
    """
    children = list(module.children()) if isinstance(module, nn.ModuleList) else []
    return any(_has_params(c) for c in children) and any(_is_activation(c) for c in children)


def _is_feature_extractor(seq: nn.Sequential) -> bool:
    """A Sequential of two or more layers that ends in an activation, pooling, dropout or flatten: its last layer
    is hidden (a single ``Sequential(Linear, ReLU)`` is one block of something larger, as in a ModuleList)."""
    children = list(seq.children())
    return sum(_has_params(c) for c in children) >= 2 and not _has_params(children[-1])


def _callable(module: nn.Module) -> bool:
    """A module with a ``forward`` of its own (not a container such as ``nn.ModuleList``, which is never called, so
    forward hooks on it never fire)."""
    return _kind(module).forward is not nn.Module.forward


def _kind(module: nn.Module) -> type:
    """The class of a module, or of the module a ``torch.compile`` wrapper holds (a list whose blocks were compiled
    one by one is still a list of one class)."""
    return type(getattr(module, "_orig_mod", module)) if type(module).__name__ == "OptimizedModule" else type(module)


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
        and len({_kind(c) for c in children}) == 1
        and all(_composite(c) for c in children)
    )


def _one_block_stages(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """Sequentials of ONE composite block, when two or more hold blocks of the same class (timm's ``resnet10t``:
    ``layer1`` ... ``layer4`` each ``Sequential(BasicBlock)``)."""
    single = [(n, m) for n, m in owned_modules(root) if isinstance(m, nn.Sequential) and len(m) == 1]
    single = [(n, m) for n, m in single if _composite(m[0])]
    kinds = [_kind(m[0]) for _, m in single]
    return [(n, m) for n, m in single if kinds.count(_kind(m[0])) >= 2]


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
    for name, module in owned_modules(root):
        if isinstance(module, (nn.ModuleList, nn.Sequential)):
            children = list(module.children())
            if len(children) >= 2 and len({_kind(c) for c in children}) == 1 and all(_composite(c) for c in children):
                found.append((name, module))
    return found


def _inside(name: str, containers: Sequence[str]) -> bool:
    """``name`` is one of the containers' blocks or lies inside one (``""`` is the root)."""
    return any(name.startswith(c + ".") if c else bool(name) for c in containers)


def _stages_target(root: nn.Module) -> Target | None:
    """Rule 4a: stages of repeated composite blocks (ResNet's ``layer1`` ... ``layer4``). Every block of every
    stage is a block, and the output is the last parametric layer registered outside the stages (``fc``)."""
    stages = [(n, m) for n, m in owned_modules(root) if _is_stage(m)] + _one_block_stages(root)
    stages = [(n, m) for n, m in stages if not any(n.startswith(o + ".") for o, _ in stages)]
    stages.sort(key=lambda x: _module_order(root)[x[0]])
    if not stages:
        return None
    size = sum(p.numel() for _, m in stages for p in m.parameters())
    lists = [m for m in root.modules() if isinstance(m, nn.ModuleList) and len({_kind(c) for c in m}) == 1]
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
        for n, m in owned_modules(root)
        if (isinstance(m, nn.Sequential) or _chain_list(m))
        and not _inside(n, repeated)
        and not _inside(n + ".", exclude)
    ]
    sequentials = [(n, m) for n, m in sequentials if n not in repeated]
    chains = []
    for name, seq in sorted(sequentials, key=lambda x: -sum(p.numel() for p in x[1].parameters())):
        grouped = sequential_groups(seq, name)
        if grouped is not None or _is_feature_extractor(seq):
            chains.append((name, seq, grouped))
    if not chains:
        return None
    name, seq, grouped = chains[0]  # the largest
    # a frozen twin of a trainable chain (same input and output widths: a distillation's teacher, a target network)
    # is not the model: that chain is, and its frozen twins are neither its output nor blocks (a frozen backbone
    # that feeds it is no twin)
    twin = next((c for c in chains if _frozen_network(seq) and _trainable(c[1]) and _twins(seq, c[1])), None)
    if twin is not None:
        name, seq, grouped = twin
    aside = {n for n, m in sequentials if _frozen_network(m) and _twins(m, seq)} if _trainable(seq) else set()
    blocks: list[Block] = []
    out_name = grouped[1] if grouped is not None else None
    after = _module_after(root, name, order, skip=aside)
    if after is None and _is_feature_extractor(seq):
        after = _head_before(root, name, seq, order, aside)
    network, other = _network_of(root, name), _network_of(root, after[0]) if after is not None else None
    towers: dict[str, tuple[str, ...]] = {}
    if grouped is not None and after is not None and _beside(after[1], seq):
        # a second network registered after the chain that reads the chain's input, not its output (a critic
        # beside an actor): its groups are blocks that its own last layer's error reaches, as a tower's
        tower = _tower_of(after[1], after[0])
        if tower is not None:
            towers[tower[1]] = tuple(b.name for b in tower[0])
            blocks = list(grouped[0]) + tower[0]
        after = None
    elif grouped is not None and network is not None and other is not None and network != other:
        # two networks of their own (a GAN's generator and discriminator): each chain ends in its own output (the
        # other network's last layer is found as an output from the forward); the other's groups are blocks too
        extra = _sequential_target(root.get_submodule(other))
        blocks = list(grouped[0]) + ([] if extra is None else [_renamed(b, other) for b in extra.blocks])
        after = None
    elif _is_feature_extractor(seq) or _is_layer(after):  # its last layer is hidden: a layer is registered after it
        if after is not None:
            whole = sequential_groups(seq, name, whole=True)
            blocks = whole[0] if whole else []
            # a recurrent layer after the features (a convolutional front-end before an LSTM) is a block when a
            # layer follows it, which is then the output
            following = _module_after(root, after[0], order, skip=aside)
            while isinstance(after[1], nn.RNNBase) and following is not None:
                blocks.append(Block(after[0], after[1], after[1]))
                after, following = following, _module_after(root, following[0], order, skip=aside)
            out_name = after[0]
            if isinstance(after[1], nn.Sequential):  # its last layer is the output (a Sigmoid after it is the loss's)
                tail = _chain_continued(root, after, order, aside, [seq])
                if tail is not None:
                    blocks, out_name = blocks + tail[0], tail[1]
                else:  # a one-layer Sequential: that layer is the output
                    layer = next(n for n, m in after[1].named_children() if _has_params(m))
                    out_name = f"{after[0]}.{layer}"
            else:
                decoder = _extractors_after(root, after[0], order, aside)
                if decoder is not None:  # a U-Net's decoder: its groups are blocks too, its last layer the output
                    blocks, out_name = blocks + decoder[0], decoder[1]
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
        if nested or order[other] > first or not _has_params(mod) or other in aside:
            continue
        if after is not None and (other == after[0] or other.startswith(after[0] + ".")):
            continue  # the head, registered before the chain
        if any(other.startswith(o + ".") for o, m in sequentials if o != other and _has_params(m)):
            continue
        tower = _tower_of(mod, other) if _beside(mod, seq) else None
        if tower is not None:  # a network of its own registered before the chain (a critic before its actor)
            towers[tower[1]] = tuple(b.name for b in tower[0])
            blocks = tower[0] + blocks
            continue
        extra = sequential_groups(mod, other, whole=True)
        if extra is not None:
            blocks = extra[0] + blocks
    blocks.sort(key=lambda b: order[b.name])
    extra_outputs = [(n, root.get_submodule(n)) for n in towers]
    return Target(blocks, out_name, root.get_submodule(out_name), "sequential", False, extra_outputs, towers)


def _chain_continued(
    root: nn.Module, part: tuple[str, nn.Module], order: dict[str, int], skip: Collection[str], before: list[nn.Module]
) -> tuple[list[Block], str] | None:
    """The groups (blocks) and the output of the Sequential ``part`` and of the trainable Sequentials registered
    after it that read its output width, each ending in a layer (a BYOL online network's encoder, projector and
    predictor; a backbone, neck and head): each part's last layer is hidden where another part follows, and the last
    part's last layer is the output. A part with the input and output widths of an earlier one (a target network's
    copy whose gradients were left on) ends the chain. ``None`` where ``part`` has fewer than two layers.

    Example:
        >>> mlp = lambda i, o: nn.Sequential(nn.Linear(i, 8), nn.ReLU(), nn.Linear(8, o))
        >>> net = nn.Module()
        >>> net.encoder, net.projector, net.predictor, net.target = mlp(4, 6), mlp(6, 3), mlp(3, 3), mlp(4, 6)
        >>> blocks, out = _chain_continued(net, ("projector", net.projector), _module_order(net), (), [net.encoder])
        >>> [b.name for b in blocks], out
        (['projector.1', 'projector.2', 'predictor.1'], 'predictor.2')
    """
    parts = [*before, part[1]]
    found = sequential_groups(part[1], part[0])
    if found is None:
        return None
    blocks, out = found
    done = []  # the blocks of the parts before the last, whose last layers are hidden
    while True:
        nxt = _module_after(root, part[0], order, skip)
        if nxt is None or not isinstance(nxt[1], nn.Sequential) or _is_feature_extractor(nxt[1]):
            break
        widths, own = _ends(part[1]), _ends(nxt[1])
        if widths is None or own is None or own[0] != widths[1] or not _trainable(nxt[1]):
            break
        if any(_twins(nxt[1], p) for p in parts):
            break
        groups, whole = sequential_groups(nxt[1], nxt[0]), sequential_groups(part[1], part[0], whole=True)
        if groups is None or whole is None:
            break
        done, (blocks, out), part = done + whole[0], groups, nxt
        parts.append(nxt[1])
    return done + blocks, out


def _extractors_after(
    root: nn.Module, name: str, order: dict[str, int], skip: Collection[str]
) -> tuple[list[Block], str] | None:
    """Feature-extractor Sequentials registered after the layer ``name``, with single layers between them, and a
    last layer after them: a U-Net's decoder written as Sequentials (each up-convolution, then the convolution
    groups that read it beside the encoder's skip, then the output convolution). Their groups (blocks) and the last
    layer (the output), or ``None`` where no such Sequential follows.

    Example:
        >>> conv = lambda i, o: nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.ReLU(), nn.Conv2d(o, o, 3), nn.ReLU())
        >>> net = nn.Module()
        >>> net.enc, net.up = conv(1, 4), nn.ConvTranspose2d(4, 4, 2, 2)
        >>> net.dec, net.out = conv(8, 4), nn.Conv2d(4, 1, 1)
        >>> blocks, out = _extractors_after(net, "up", _module_order(net), ())
        >>> [b.name for b in blocks], out
        (['dec.1', 'dec.3'], 'out')
    """
    blocks: list[Block] = []
    last = None
    for other, module in _outer_modules(root, name, order, skip, before=False):
        if isinstance(module, nn.Sequential):
            groups = sequential_groups(module, other, whole=True) if _is_feature_extractor(module) else None
            if groups is None:
                break
            blocks, last = blocks + groups[0], None
        elif isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            last = other
        else:
            break
    return (blocks, last) if blocks and last is not None else None


def _beside(module: nn.Module, chain: nn.Module) -> bool:
    """``module`` is a network beside ``chain`` rather than a stem feeding it or a head reading it: a chain of two or
    more layers that ends in a layer (no activation after it: its own output), reads ``chain``'s input width and
    neither reads ``chain``'s output nor produces ``chain``'s input (an actor and a critic on the same states).

    Example:
        >>> mlp = lambda i, o: nn.Sequential(nn.Linear(i, 8), nn.ReLU(), nn.Linear(8, o))
        >>> _beside(mlp(4, 1), mlp(4, 2)), _beside(mlp(2, 3), mlp(4, 2)), _beside(mlp(4, 4), mlp(4, 2))
        (True, False, False)
    """
    ends, own = _ends(chain), _ends(module)
    if ends is None or own is None or _is_feature_extractor(module) or not isinstance(module, nn.Sequential):
        return False
    if sum(_has_params(c) for c in module.children()) < 2:
        return False
    return own[0] == ends[0] and not _reads_output(own[0], chain) and own[1] != ends[0]


def _tower_of(seq: nn.Module, name: str) -> tuple[list[Block], str] | None:
    """A network of its own: its groups (the blocks) and its last layer (its output)."""
    return sequential_groups(seq, name) if isinstance(seq, nn.Sequential) else None


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _frozen_network(module: nn.Module) -> bool:
    """A frozen chain of two or more parametric layers (a distillation's teacher), not a frozen readout layer."""
    return not _trainable(module) and sum(1 for c in module.children() if _has_params(c)) >= 2


def _layer_weights(m: nn.Module) -> list[nn.Parameter]:
    """The weights of the layers in ``m`` that map a width to another (Linear, Conv: 2 or more dimensions; not a
    norm's scale), in registration order."""
    weights = [c.weight for c in m.modules() if isinstance(getattr(c, "weight", None), nn.Parameter)]
    return [w for w in weights if w.dim() >= 2]


def _layer_widths(layer: nn.Module) -> tuple[int, int] | None:
    """A layer's input and output width: a convolution's channels (a transposed one stores its weight as ``[in,
    out, ...]``), a Linear's features, else its weight's ``[out, in, ...]``; ``None`` without a weight of two or more
    dimensions."""
    if isinstance(layer, nn.modules.conv._ConvNd):
        return layer.in_channels, layer.out_channels
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() < 2:
        return None
    return int(weight.shape[1]), int(weight.shape[0])


def _ends(m: nn.Module) -> tuple[int, int] | None:
    """A chain's input and output widths: its first layer's input and its last layer's output width, from the
    layers that hold a weight of two or more dimensions (``None`` without such a layer).

    Example:
        >>> _ends(nn.Sequential(nn.ConvTranspose2d(16, 8, 3), nn.ReLU(), nn.ConvTranspose2d(8, 3, 3)))
        (16, 3)
    """
    widths = [w for w in map(_layer_widths, m.modules()) if w is not None]
    return (widths[0][0], widths[-1][1]) if widths else None


def _twins(a: nn.Module, b: nn.Module) -> bool:
    """Two chains that read inputs of one width and produce outputs of one width."""
    return _ends(a) is not None and _ends(a) == _ends(b)


def _head_before(
    root: nn.Module, name: str, seq: nn.Module, order: dict[str, int], skip: Collection[str] = ()
) -> tuple[str, nn.Module] | None:
    """The head of a feature extractor ``name`` that has nothing registered after it (``self.head`` assigned before
    ``self.backbone``): the one module registered before it that reads its output (its input width is the chain's
    output width, or a multiple of it after a convolution: flattened) and does not feed it (its output width is not
    the chain's input width), outermost first; ``None`` when there is none or more than one."""
    ends = _ends(seq)
    if ends is None:
        return None
    found = []
    for other, module in _outer_modules(root, name, order, skip, before=True):
        widths = _ends(module)
        if widths is not None and _reads_output(widths[0], seq) and widths[1] != ends[0]:
            found.append((other, module))
    return found[0] if len(found) == 1 else None


def _reads_output(width: int, chain: nn.Module) -> bool:
    """An input of ``width`` reads ``chain``'s output: the chain's output width, or a multiple of it after a
    convolution (flattened, a multiple of its channels)."""
    ends = _ends(chain)
    return ends is not None and (width == ends[1] or (_layer_weights(chain)[-1].dim() > 2 and width % ends[1] == 0))


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


def _module_after(
    root: nn.Module, name: str, order: dict[str, int], skip: Collection[str] = ()
) -> tuple[str, nn.Module] | None:
    """The first module registered after ``name`` (outside it and outside the modules named in ``skip``) that holds
    parameters, outermost first."""
    if not name:
        return None  # the root itself: nothing lies after it
    return next(_outer_modules(root, name, order, skip, before=False), None)


def _outer_modules(
    root: nn.Module, name: str, order: dict[str, int], skip: Collection[str], before: bool
) -> Iterator[tuple[str, nn.Module]]:
    """The modules registered before (or after) ``name``, outside it and outside the modules named in ``skip``,
    that hold parameters: layers and Sequentials, outermost first, never one inside a module already given (a
    container that is neither is looked into)."""
    given: list[str] = []
    for other, module in owned_modules(root):
        if (order[other] >= order[name]) if before else (order[other] <= order[name]):
            continue
        if other.startswith(name + ".") or name.startswith(other + ".") or not _has_params(module):
            continue
        if any(other == s or other.startswith(s + ".") for s in (*skip, *given)):
            continue
        if any(True for _ in module.children()) and not isinstance(module, nn.Sequential):
            continue  # a container: look inside it for the layer
        given.append(other)
        yield other, module


# --------------------------------------------------------------------------- ModuleList
def _module_list_target(root: nn.Module, min_len: int = 2, composite: bool = False) -> Target | None:
    best = None
    for name, mlist in owned_modules(root):
        if not _is_layer_list(mlist, min_len) or (composite and not all(_composite(m) for m in mlist)):
            continue
        size = sum(p.numel() for p in mlist.parameters())
        if size > 0 and (best is None or size > best[2]):
            best = (name, mlist, size)
    if best is None:
        return None
    name, mlist, _ = best
    side_by_side = _side_by_side(root, name, mlist) if composite else None
    if side_by_side is not None:
        return side_by_side
    lists = _sibling_lists(root, name, mlist)
    if composite and _is_transformer_stack(mlist):
        # an encoder-decoder (``nn.Transformer``): every stack of Transformer layers holds blocks, not only the
        # largest (the encoder would otherwise learn only through the decoder's cross-attention)
        for other, olist in owned_modules(root):
            if (
                _is_layer_list(olist, 1)  # (an encoder of one layer beside a decoder of several)
                and other != name
                and _is_transformer_stack(olist)
                and not any(other == n or other.startswith(n + ".") or n.startswith(other + ".") for n, _ in lists)
            ):
                lists.append((other, olist))
        order = _module_order(root)
        lists.sort(key=lambda x: order[x[0]])
    blocks = [Block(f"{n}.{i}", m, m) for n, ml in lists for i, m in enumerate(ml)]
    leaf = _last_param_leaf(root, [n for n, _ in lists])
    ends = _ends(lists[-1][1][-1])
    if (leaf is None or isinstance(leaf[1], _NORM_TYPES)) and len(blocks) >= 2 and ends and ends[0] != ends[1]:
        # nothing but norms registered after a list whose last layer changes the width (OGB's and PyG's
        # ``lins``/``convs`` ending in the classifier, their ``bns`` registered after them): a norm is never the
        # output, that last layer is
        *blocks, last = blocks
        leaf = (last.name, last.exit)
    if leaf is None:
        return None
    return Target(blocks, leaf[0], leaf[1], "module_list")


def _side_by_side(root: nn.Module, name: str, mlist: nn.ModuleList) -> Target | None:
    """A list of networks side by side, each ending in its own last layer: a mixture of experts' MLPs, each reading
    the same input, whose outputs a gate weighs. Their widths cannot chain (each maps the same input width to
    another), so they are no stack: each is a tower whose groups are blocks and whose last layer is an output
    feeding that tower only (a gate outside them learns by its true gradient).

    Example:
        >>> net = nn.Module()
        >>> net.experts = nn.ModuleList(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)) for _ in "ab")
        >>> net.gate = nn.Linear(8, 2)
        >>> target = _side_by_side(net, "experts", net.experts)
        >>> [b.name for b in target.blocks], [n for n, _ in target.outputs]
        (['experts.0.1', 'experts.1.1'], ['experts.0.2', 'experts.1.2'])
    """
    ends = [_ends(m) for m in mlist]
    if any(e is None for e in ends):
        return None
    if len({e[0] for e in ends}) != 1 or any(e[1] == e[0] for e in ends):
        return None  # not one input width, or a width an item could pass on to the next: a stack
    towers = [_tower_of(m, f"{name}.{i}") for i, m in enumerate(mlist)]
    if any(t is None or not t[0] for t in towers):
        return None
    outputs = [(out, root.get_submodule(out)) for _, out in towers]
    blocks = [b for tower, _ in towers for b in tower]
    fed = {out: tuple(b.name for b in tower) for tower, out in towers}
    return Target(blocks, outputs[0][0], outputs[0][1], "module_list", False, outputs[1:], fed)


def _layer_lists_target(root: nn.Module) -> Target | None:
    """A list of layers, each a list of sublayers of the same classes, called in order (``layers =
    ModuleList([ModuleList([attention, feed_forward]) for _ in range(depth)])``, iterated as ``for attn, ff in
    self.layers: x = attn(x) + x; x = ff(x) + x``, as in lucidrains' models and vit-pytorch): each layer is one
    block from its first sublayer to its last. Its feedback point is its input (the next layer's input, which holds
    the parent's residual adds), and the output module's input for the last one: the sublayers of a layer learn
    together from it, as in a block holding its own adds, and the stream around each layer is cut. (A point after
    each sublayer would feed the attention apart from the MLP after it, which was measured to cost learning.)

    Example:
        >>> net = nn.Module()
        >>> net.layers = nn.ModuleList([nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)]) for _ in range(3)])
        >>> net.head = nn.Linear(4, 2)
        >>> t = _layer_lists_target(net)
        >>> [b.name for b in t.blocks], t.output_name, t.head_input_point
        (['layers.0', 'layers.1', 'layers.2'], 'head', True)
    """
    best = None
    for name, outer in owned_modules(root):
        layers = list(outer.children()) if isinstance(outer, nn.ModuleList) else []
        if len(layers) < 2 or not all(isinstance(m, nn.ModuleList) and len(m) >= 2 for m in layers):
            continue
        shape = [_kind(c) for c in layers[0]]
        if not all([_kind(c) for c in m] == shape and all(_callable(c) for c in m) for m in layers):
            continue
        size = sum(p.numel() for p in outer.parameters())
        if size and (best is None or size > best[2]):
            best = (name, layers, size)
    if best is None:
        return None
    name, layers, _ = best
    join = f"{name}." if name else ""
    blocks = [Block(f"{join}{i}", m[0], m[-1], members=tuple(m), output_point=False) for i, m in enumerate(layers)]
    leaf = _last_param_leaf(root, [name])
    if leaf is None:
        return None
    return Target(blocks, leaf[0], leaf[1], "layer_lists", head_input_point=True)


def _sibling_lists(root: nn.Module, name: str, mlist: nn.ModuleList) -> list[tuple[str, nn.ModuleList]]:
    """The layer list ``name`` and, where it is one element of a list of such lists (``layers = ModuleList([
    ModuleList([attention, feed_forward]) for _ in range(depth)])``, iterated as ``for attn, ff in self.layers``),
    every element of the outer list: each layer of the network, not only the first one's sublayers.

    Example:
        >>> net = nn.Module()
        >>> net.layers = nn.ModuleList([nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)]) for _ in range(3)])
        >>> [n for n, _ in _sibling_lists(net, "layers.0", net.layers[0])]
        ['layers.0', 'layers.1', 'layers.2']
    """
    parent_name, _, _ = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    shape = [_kind(m) for m in mlist]
    if not isinstance(parent, nn.ModuleList) or not all(
        isinstance(m, nn.ModuleList) and [_kind(c) for c in m] == shape for m in parent
    ):
        return [(name, mlist)]
    join = f"{parent_name}." if parent_name else ""
    return [(f"{join}{i}", m) for i, m in enumerate(parent)]


def _is_layer_list(mlist: nn.Module, min_len: int) -> bool:
    """An ``nn.ModuleList`` of at least ``min_len`` layers of one class that are called (a list of lists, as
    Funnel's blocks of layers, is never called: its inner lists hold the layers)."""
    return (
        isinstance(mlist, nn.ModuleList)
        and len(mlist) >= min_len
        and len({_kind(m) for m in mlist}) == 1
        and all(_callable(m) for m in mlist)
    )


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
    for name, parent in owned_modules(root):
        if isinstance(parent, (nn.ModuleList, nn.Sequential, nn.ModuleDict)):
            continue
        kids = [(n, c) for n, c in parent.named_children() if _composite(c)]
        kinds = [_kind(c) for _, c in kids if type(c) not in (nn.Sequential, nn.ModuleList, nn.ModuleDict)]
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
    layers = _module_list_target(root, composite=True) or _single_transformer_layer_target(root)
    repeated = [t for t in (_stages_target(root), layers) if t is not None]
    repeated += [t for t in (_attribute_blocks_target(root),) if t is not None]
    best = max(repeated, key=_block_params) if repeated else None
    units = _layer_lists_target(root)
    if units is not None and (best is None or _block_params(units) >= _block_params(best)):
        best = units
    chain = _sequential_target(root, [b.name for b in best.blocks] if best is not None else [])
    if best is not None and _block_params(best) >= _block_params(chain):
        return _with_tower(root, best, chain)
    return chain or _module_list_target(root)


def _single_transformer_layer_target(root: nn.Module) -> Target | None:
    """A Transformer of one layer (``layers = ModuleList([EncoderBlock])``, ``nn.TransformerEncoder(...,
    num_layers=1)``, ``nn.Transformer`` with one layer a stack): its layers are the blocks, not the Sequentials or
    the attention modules inside them.

    Example:
        >>> net = nn.Module()
        >>> net.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16), 1, enable_nested_tensor=False)
        >>> net.head = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> target = _single_transformer_layer_target(net)
        >>> [b.name for b in target.blocks], target.output_name
        (['encoder.layers.0'], 'head.2')
    """
    target = _module_list_target(root, min_len=1, composite=True)
    if target is None:
        return None
    lists = {b.name.rpartition(".")[0] for b in target.blocks}
    return target if all(_is_transformer_stack(root.get_submodule(n)) for n in lists) else None


def _with_tower(root: nn.Module, best: Target, chain: Target | None) -> Target:
    """``best`` and, where a chain of Sequential groups ending in its own last layer is registered before its
    blocks (a two-tower model's image tower beside its text Transformer, CLIP's layout), that chain's groups as
    blocks and its last layer as an output too: each tower's error reaches its own blocks. (Had the chain fed the
    blocks, a stem, its last layer would be no error source: an output a block's input is computed from delivers
    nothing.) Each tower's points are tied to its own output only: the other tower's error is not theirs."""
    if chain is None or not chain.blocks:
        return best
    order = _module_order(root)
    first = min(order[b.name] for b in best.blocks)
    names = [b.name for b in best.blocks] + [n for n, _ in best.outputs]
    tower = chain.output_name.rpartition(".")[0]
    if (
        not tower
        or order[chain.output_name] > first
        or any(n == tower or n.startswith(tower + ".") or tower.startswith(n + ".") for n in names)
        or not all(b.name.startswith(tower + ".") for b in chain.blocks)
    ):
        return best
    blocks = sorted(chain.blocks + best.blocks, key=lambda b: order[b.name])
    extra = [*best.extra_outputs, (chain.output_name, chain.output)]
    towers = {chain.output_name: tuple(b.name for b in chain.blocks)}
    return Target(blocks, best.output_name, best.output, best.source, best.head_input_point, extra, towers)


# --------------------------------------------------------------------------- layers as attributes
_POINT_LAYER_TYPES = (
    nn.Linear,
    nn.Bilinear,
    nn.modules.conv._ConvNd,
    nn.RNNBase,
    nn.RNNCellBase,
    nn.MultiheadAttention,
    nn.Embedding,
)


def _layer_inputs_target(root: nn.Module) -> Target | None:
    """Rule 6: the parametric layers (Linear, Conv, RNN and RNN cell, attention, Embedding; not norms) in
    registration order.

    Each layer's input is a feedback point (recorded only when it carries gradient, so never the data or token
    ids), and the last layer is the output, its input a point too. A layer's feedback thus arrives after the
    activation ``forward`` applies to the previous layer's output, as the DFA rule ``(B e) * f'(a)`` needs.
    """
    layers = [(n, m) for n, m in owned_modules(root) if n and isinstance(m, _POINT_LAYER_TYPES)]
    layers = [(n, m) for n, m in layers if not any(n.startswith(o + ".") for o, _ in layers)]  # MHA's out_proj
    if len(layers) < 2:
        return None
    *hidden, (out_name, out) = layers
    heads = _sibling_heads(root, hidden, out_name, out)
    blocks = [Block(n, m, m, output_point=False) for n, m in hidden if (n, m) not in heads]
    return Target(blocks, out_name, out, "layer_inputs", head_input_point=True, extra_outputs=heads)


def _sibling_heads(
    root: nn.Module, layers: list[tuple[str, nn.Module]], out_name: str, out: nn.Module
) -> list[tuple[str, nn.Module]]:
    """The layers beside the output in an ``nn.ModuleDict`` of heads (a multi-task model that picks its head by the
    batch's task), of its class and reading its width: outputs too, each an error source, not blocks."""
    parent_name, _, _ = out_name.rpartition(".")
    if not parent_name or not isinstance(root.get_submodule(parent_name), nn.ModuleDict):
        return []
    width = getattr(out, "in_features", None)
    return [
        (n, m)
        for n, m in layers
        if n.rpartition(".")[0] == parent_name and type(m) is type(out) and getattr(m, "in_features", None) == width
    ]
