"""Norm-aware feedback: which normalisation consumes a feedback point, and the vector-Jacobian product of that
normalisation (parameter-free) that shapes the point's feedback."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .points import split_main


@dataclass(frozen=True)
class NormSpec:
    """The normalisation whose Jacobian shapes a point's feedback (norm-aware feedback).

    ``kind`` is ``"layer"`` (mean and variance) or ``"rms"`` (no mean subtraction); ``dims`` is the number of
    trailing dimensions it normalises over, ``-1`` for all but the first (batch) dimension.
    """

    kind: str
    eps: float = 1e-5
    dims: int = 1


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
    """What normalisation ``module`` applies over its inputs' last dimension: ``nn.LayerNorm``/``nn.RMSNorm`` by
    class; any other module by its behaviour on a small random input (no gradients): invariant to scaling and
    shifting is a LayerNorm, to scaling only an RMSNorm, otherwise ``None``.

    Example:
        >>> probe_normalisation(nn.LayerNorm(8), torch.randn(2, 8))
        NormSpec(kind='layer', eps=1e-05, dims=1)
        >>> class T5Norm(nn.Module):  # an RMSNorm named like a LayerNorm
        ...     def forward(self, x):
        ...         return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        >>> probe_normalisation(T5Norm(), torch.randn(2, 8)).kind
        'rms'
    """
    eps = next(
        (float(v) for v in (getattr(module, a, None) for a in ("eps", "variance_epsilon", "epsilon")) if v is not None),
        None,
    )
    if isinstance(module, nn.LayerNorm):
        return NormSpec("layer", module.eps, len(module.normalized_shape))
    if hasattr(nn, "RMSNorm") and isinstance(module, nn.RMSNorm):
        return NormSpec("rms", eps if eps is not None else torch.finfo(example.dtype).eps, len(module.normalized_shape))
    width = example.shape[-1]
    z = torch.randn(4, width, generator=torch.Generator().manual_seed(0)).to(example.device, example.dtype)
    try:
        with torch.no_grad():
            base, scaled, shifted = (split_main(module(x))[0] for x in (z, z * 4.0, z + 3.0))
    except Exception:  # not callable on a plain [rows, features] tensor: not a per-position norm
        return None
    if base is None or scaled is None or shifted is None or base.shape != z.shape or not base.isfinite().all():
        return None
    tol = {"rtol": 2e-2, "atol": 2e-2 * float(base.abs().mean()) + 1e-6}
    if not torch.allclose(scaled.float(), base.float(), **tol):
        return None
    kind = "layer" if torch.allclose(shifted.float(), base.float(), **tol) else "rms"
    return NormSpec(kind, eps if eps is not None else 1e-6)
