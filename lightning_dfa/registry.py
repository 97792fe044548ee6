"""Known architectures: which modules are the blocks, and where the paper's "micro" feedback points lie inside a
Transformer block.

Macro placement (one feedback point per block) needs no entry for most models: Hugging Face models list their
blocks in ``_no_split_modules``. Where that list names the parts of a residual unit rather than the unit (Hugging
Face's ResNet lists its convolution layers and shortcuts) or no unit at all (BiT lists its embeddings only),
:data:`BLOCK_CLASSES` names the units: a point inside a residual unit would feed its branch and its skip path apart.
Add an architecture with :func:`register_blocks`.

Micro placement adds points inside each block: after the attention sub-block and after the MLP's hidden activation.
Keys are Hugging Face ``config.model_type`` values; values are submodule paths relative to one block. Add an
architecture with :func:`register_micro_points`. An architecture not listed here gets the points
:func:`lightning_dfa.discovery.infer_micro_points` finds in each block (the outermost ``*attn*`` / ``*attention*``
submodule and the first activation module outside it); an entry here overrides that.

Example:
    >>> micro_points("gpt2")
    ('attn', 'mlp.act')
"""

from __future__ import annotations

#: Block classes per Hugging Face ``config.model_type``, used instead of the model's ``_no_split_modules``.
BLOCK_CLASSES: dict[str, tuple[str, ...]] = {
    "resnet": ("ResNetBasicLayer", "ResNetBottleNeckLayer"),
    "rt_detr_resnet": ("RTDetrResNetBasicLayer", "RTDetrResNetBottleNeckLayer"),
    "bit": ("BitPreActivationBottleneckLayer", "BitBottleneckLayer"),
}

#: Architectures whose code calls each block's ``forward`` directly (``layer.forward(...)``), which runs no module
#: hooks: Hugging Face ``config.model_type`` -> the first and the last child of a block that are called as modules.
#: The block then starts at the first (its input is cut there) and ends at the last (its output is the point).
BLOCK_SPANS: dict[str, tuple[str, str]] = {
    "squeezebert": ("attention", "output"),
}

#: Architectures whose blocks may keep no normalisation: Hugging Face ``config.model_type`` -> the config attribute
#: and the value that says so. There the ``"auto"`` recipe gives every point the LayerNorm Jacobian
#: (``norm_jacobian=True``): fed raw into an unnormalised residual stack, the feedback let the activations grow until
#: they overflowed (MobileBERT with its default ``NoNorm``, a masked-LM task: NaN after 129 steps; with the Jacobian
#: it closed 93 % of the gap between the shallow baseline and backprop, as much as with its LayerNorm option).
UNNORMALISED: dict[str, tuple[str, str]] = {
    "mobilebert": ("normalization_type", "no_norm"),
}

MICRO_POINTS: dict[str, tuple[str, ...]] = {
    "gpt2": ("attn", "mlp.act"),
    "gpt_neo": ("attn", "mlp.act"),
    "llama": ("self_attn", "mlp.act_fn"),
    "mistral": ("self_attn", "mlp.act_fn"),
    "qwen2": ("self_attn", "mlp.act_fn"),
    "bert": ("attention", "intermediate"),
    "roberta": ("attention", "intermediate"),
}


def register_blocks(model_type: str, classes: tuple[str, ...]) -> None:
    """Declare the block classes of a Hugging Face architecture (class names, as in ``_no_split_modules``): each
    module of one of these classes gets one feedback point.

    Example:
        >>> BLOCK_CLASSES["resnet"]
        ('ResNetBasicLayer', 'ResNetBottleNeckLayer')
        >>> register_blocks("my_resnet", ("MyResidualLayer",))
    """
    BLOCK_CLASSES[model_type] = tuple(classes)


def register_micro_points(model_type: str, points: tuple[str, ...]) -> None:
    """Declare the micro feedback points of an architecture (submodule paths inside one block)."""
    MICRO_POINTS[model_type] = tuple(points)


def micro_points(model_type: str) -> tuple[str, ...]:
    """The micro feedback points of ``model_type``, or a clear error if the architecture is unknown."""
    try:
        return MICRO_POINTS[model_type]
    except KeyError:
        raise ValueError(
            f"DFA: no micro feedback points known for model type {model_type!r}. Known: {sorted(MICRO_POINTS)}. "
            "Use lightning_dfa.registry.register_micro_points(model_type, ('attn', 'mlp.act')) or pass blocks=."
        ) from None
