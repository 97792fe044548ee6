"""Norm-aware feedback: which normalisation consumes a feedback point, and the vector-Jacobian product of that
normalisation (parameter-free) that shapes the point's feedback."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from .points import split_main


@dataclass(frozen=True)
class NormSpec:
    """The normalisation whose Jacobian shapes a point's feedback (norm-aware feedback).

    ``kind`` is ``"layer"`` (mean and variance) or ``"rms"`` (no mean subtraction); ``dims`` is the number of
    trailing dimensions it normalises over, ``-1`` for all but the first (batch) dimension. ``channels_first``: it
    normalises over dimension 1 instead, at each position of the dimensions after it (ConvNeXt's
    ``data_format="channels_first"`` LayerNorm, timm's ``LayerNorm2d``).
    """

    kind: str
    eps: float = 1e-5
    dims: int = 1
    channels_first: bool = False


def norm_vjp(h: torch.Tensor, v: torch.Tensor, norm: NormSpec) -> torch.Tensor:
    """``v`` times the Jacobian of the parameter-free normalisation ``norm`` at ``h`` (``J^T v``), in ``v``'s dtype:
    LayerNorm's fused kernels (which accumulate in float32 for half-precision inputs), RMSNorm's three reductions
    in float32 where ``h`` or ``v`` is in half precision.

    Example:
        >>> h, v = torch.randn(2, 3, 8, dtype=torch.double), torch.randn(2, 3, 8, dtype=torch.double)
        >>> x = h.clone().requires_grad_()
        >>> ref, = torch.autograd.grad(nn.functional.rms_norm(x, (8,), eps=1e-6), x, v)
        >>> bool(torch.allclose(norm_vjp(h, v, NormSpec("rms", 1e-6)), ref))
        True
    """
    if norm.channels_first:
        return norm_vjp(h.movedim(1, -1), v.movedim(1, -1), replace(norm, channels_first=False)).movedim(-1, 1)
    dims = h.dim() - 1 if norm.dims < 0 else norm.dims
    shape = list(h.shape[h.dim() - dims :])
    if norm.kind == "layer":
        # the fused kernels accumulate in float32 for half-precision inputs (no float32 copies of h and v needed)
        common = torch.promote_types(h.dtype, v.dtype)
        hl, vl = h.to(common), v.to(common)
        _, mean, rstd = torch.native_layer_norm(hl, shape, None, None, norm.eps)
        out = torch.ops.aten.native_layer_norm_backward(vl, hl, shape, mean, rstd, None, None, [True, False, False])
        return out[0].to(v.dtype)
    low = h.dtype in (torch.float16, torch.bfloat16) or v.dtype in (torch.float16, torch.bfloat16)
    hf, vf = (h.float(), v.float()) if low else (h, v)
    reduce = tuple(range(h.dim() - dims, h.dim()))
    rrms = torch.rsqrt(hf.square().mean(reduce, keepdim=True) + norm.eps)
    hv = (hf * vf).mean(reduce, keepdim=True)
    out = torch.addcmul(vf * rrms, hf, hv * rrms.pow(3), value=-1)
    return out.to(v.dtype) if low else out


_NOT_PER_TOKEN = ("batch", "group", "instance", "localresponse")


def _may_normalise(module: nn.Module) -> bool:
    """A module that may normalise each position over its features: ``nn.LayerNorm``, ``nn.RMSNorm`` or a class
    named like a norm (Hugging Face's ``LlamaRMSNorm``, ``T5LayerNorm``...), except batch/group/instance norms and
    wrappers holding layers (lucidrains' ``PreNorm(dim, fn)``, whose output is ``fn``'s)."""
    if isinstance(module, nn.LayerNorm) or (hasattr(nn, "RMSNorm") and isinstance(module, nn.RMSNorm)):
        return True
    name = type(module).__name__.lower()
    if any(any(True for _ in child.parameters()) for child in module.children()):
        return False
    return "norm" in name and not any(word in name for word in _NOT_PER_TOKEN)


def probe_normalisation(module: nn.Module, example: torch.Tensor) -> NormSpec | None:
    """What normalisation ``module`` applies to a tensor shaped like ``example``: a plain ``nn.LayerNorm`` or
    ``nn.RMSNorm`` by class (over ``example``'s trailing dimensions, which must match its ``normalized_shape``);
    any other module, subclasses that override ``forward`` included, by its behaviour on small random inputs (no
    gradients). Invariant to scaling and shifting each position by its own factor and offset is a LayerNorm, to
    scaling only an RMSNorm; first over the last dimension, then, for an ``example`` of 3 or more dimensions, over
    dimension 1 (a channels-first norm of a convolutional network). Otherwise ``None``.

    Example:
        >>> probe_normalisation(nn.LayerNorm(8), torch.randn(2, 8))
        NormSpec(kind='layer', eps=1e-05, dims=1, channels_first=False)
        >>> class T5Norm(nn.Module):  # an RMSNorm named like a LayerNorm
        ...     def forward(self, x):
        ...         return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        >>> probe_normalisation(T5Norm(), torch.randn(2, 8)).kind
        'rms'
        >>> class LayerNorm2d(nn.LayerNorm):  # normalises the channels of [batch, channels, height, width]
        ...     def forward(self, x):
        ...         return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        >>> probe_normalisation(LayerNorm2d(4), torch.randn(2, 4, 5, 5)).channels_first
        True
    """
    eps = next(
        (float(v) for v in (getattr(module, a, None) for a in ("eps", "variance_epsilon", "epsilon")) if v is not None),
        None,
    )
    for plain, kind in ((nn.LayerNorm, "layer"), (getattr(nn, "RMSNorm", None), "rms")):
        if plain is not None and isinstance(module, plain) and type(module).forward is plain.forward:
            shape = tuple(module.normalized_shape)
            if tuple(example.shape[example.dim() - len(shape) :]) != shape:
                return None
            return NormSpec(kind, eps if eps is not None else torch.finfo(example.dtype).eps, len(shape))
    # random inputs of the example's rank (two rows, three positions a side): features last, then on dimension 1
    sides = (2,) + (3,) * (example.dim() - 2)
    layouts = [(sides + (example.shape[-1],), -1)]
    if example.dim() >= 3:
        layouts.append(((2, example.shape[1]) + sides[1:], 1))
    g = torch.Generator().manual_seed(0)
    for shape, axis in layouts:
        kind = _behaviour(module, shape, axis, g, example)
        if kind is not None:
            return NormSpec(kind, eps if eps is not None else 1e-6, channels_first=axis == 1)
    return None


def _behaviour(
    module: nn.Module, shape: tuple[int, ...], axis: int, g: torch.Generator, like: torch.Tensor
) -> str | None:
    """``"layer"``, ``"rms"`` or ``None``: how ``module`` treats a random input of ``shape`` whose positions (all
    but dimension ``axis``, the features) are scaled, or shifted, each by its own amount."""
    per_position = list(shape)
    per_position[axis] = 1
    z, scale, shift = (
        t.to(like.device, like.dtype)
        for t in (
            torch.randn(shape, generator=g),
            1 + 4 * torch.rand(per_position, generator=g),
            3 * torch.randn(per_position, generator=g),
        )
    )
    try:
        with torch.no_grad():
            base, scaled, shifted = (split_main(module(x))[0] for x in (z, z * scale, z + shift))
    except Exception:  # not callable on this layout: not a norm over these features
        return None
    if base is None or scaled is None or shifted is None or base.shape != z.shape or not base.isfinite().all():
        return None
    tol = {"rtol": 2e-2, "atol": 2e-2 * float(base.abs().mean()) + 1e-6}
    if not torch.allclose(scaled.float(), base.float(), **tol):
        return None
    return "layer" if torch.allclose(shifted.float(), base.float(), **tol) else "rms"
