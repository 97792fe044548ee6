"""A simulated optical random-projection co-processor, in the spirit of LightOn's OPU (arXiv 2012.06373)."""

from __future__ import annotations

import math
from typing import Any

import torch

from .bank import _M32, draw, keyed_normal, row_keys
from .base import Projector, mix
from .wrappers import _checked_level, _norm_matched, ternarize

ENCODINGS = ("ternary", "binary")


class Optical(Projector):
    """A simulated optical processing unit (OPU) computing the feedback projection.

    The device: light through a scattering medium multiplies the input by a fixed complex Gaussian transmission
    matrix ``A = R + iI`` (``[k, width]``, i.i.d. standard normal ``R`` and ``I``), a digital micromirror device
    (DMD) displays the input, which is therefore binary, and a camera reads the intensity ``|x A|^2``, never the
    field. The simulation, per error row (each row one DMD frame):

    1. **Encoding.** ``encoding="ternary"``: ``s = sign(e)`` where ``|e| > threshold * max |e|``, else 0 (the
       photonic DFA scheme), shown as two binary frames, ``s > 0`` and ``s < 0``. ``"binary"``: ``s = sign(e)``,
       shown as the one frame ``e > 0`` (``s = 2 b - 1``; the projection of the all-ones frame is a calibration).
    2. **Holography.** A plane reference wave of amplitude ``a`` (a per-frame gain, ``a^2`` = the frame's number
       of lit pixels) interferes with the field: the camera reads ``I1 = |a + x A|^2`` and, reference off,
       ``I0 = |x A|^2``; the linear projection is recovered as ``(I1 - I0 - a^2) / (2 a) = x R``.
    3. **Camera.** Each intensity frame gets additive Gaussian read noise at ``snr_db`` (against the frame's mean
       square; ``None``: none), then is quantised to ``bits`` (``None``: ideal) over ``[0, frame maximum]``
       (ideal auto-exposure).
    4. **Read-out.** ``B s`` (``B = R``, unit-variance Gaussian) from the frames, times ``||e|| / ||s||`` (one
       digital number per row) so that its scale matches the error's.

    With ``bits=None`` and ``snr_db=None`` the result is ``Ternarized(Dense("gaussian"), threshold)`` of the
    device's own matrix, up to rounding: the non-idealities are the encoding, the camera's bits and its noise. The
    matrix is drawn from the seed (first rows independent of ``width``) and saved in checkpoints; the noise is a hash of
    (seed, number of projections so far, the frame's binary contents, pixel, frame), so it is the same on every
    process, wherever the row sits in a batch, and the saved count makes a resumed run exact.

    Args:
        bits: camera bit depth (``None``: ideal read-out).
        encoding: ``"ternary"`` (default) or ``"binary"``.
        threshold: for the ternary encoding, the fraction of each row's largest magnitude below which an entry is 0
            (default 0.5: with a low threshold, the many small positive entries of a softmax error outweigh its one
            negative entry once all are +-1, and learning breaks down; see ``docs/projectors.md``).
        snr_db: read noise of each intensity frame, in dB (``None``: none).

    Example:
        >>> opu = Optical(bits=8)
        >>> opu.setup(seed=0)
        >>> e = torch.randn(32, 10)
        >>> ideal = Optical(bits=None)  # the same encoding, an ideal camera
        >>> ideal.setup(seed=0)
        >>> fb, exact = opu.project(e, 64), ideal.project(e, 64)
        >>> cos = torch.nn.functional.cosine_similarity(fb, exact, dim=-1).mean()
        >>> bool(cos > 0.9)
        True
    """

    def __init__(
        self, bits: int | None = 8, encoding: str = "ternary", threshold: float = 0.5, snr_db: float | None = None
    ) -> None:
        if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 24):
            raise ValueError(f"DFA: Optical bits must be None (ideal camera) or an integer from 1 to 24, got {bits!r}.")
        if encoding not in ENCODINGS:
            raise ValueError(f"DFA: Optical encoding must be one of {ENCODINGS}, got {encoding!r}.")
        self.bits = bits
        self.encoding = encoding
        self.threshold = _checked_level("Optical threshold", threshold, 0.0, 1.0)
        self.snr_db = None if snr_db is None else _checked_level("Optical snr_db", snr_db, -math.inf)
        self.calls = 0
        self._seed = 0
        self._matrices: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # k -> (R, I), [rows, k] float32 CPU
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def setup(self, seed: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        self._seed = int(seed)

    # ------------------------------------------------------------------ the transmission matrix
    def transmission(self, k: int, width: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Real and imaginary parts of the transmission matrix, each ``[k, width]`` float32 on ``device``."""
        stored = self._matrices.get(k)
        if stored is None or stored[0].shape[0] < width:
            stored = tuple(draw((width, k), "gaussian", self._seed, "optical", k, part) for part in ("re", "im"))
            self._matrices[k] = stored  # type: ignore[assignment]
            self._cache = {key: v for key, v in self._cache.items() if key[0] != k}
        key = (k, width, torch.device(device))
        cached = self._cache.get(key)
        if cached is None:
            cached = tuple(m[:width].t().to(device).contiguous() for m in stored)  # type: ignore[assignment]
            self._cache[key] = cached
        return cached

    # ------------------------------------------------------------------ the device
    def project(self, error: torch.Tensor, width: int) -> torch.Tensor:
        e = error.float()
        re, im = self.transmission(e.shape[-1], width, e.device)
        if self.encoding == "ternary":
            codes = ternarize(e, self.threshold)
            frames = [codes > 0, codes < 0]
        else:
            codes = torch.where(e > 0, 1.0, -1.0)
            frames = [e > 0]
        keys = row_keys(codes + 1, salt=self._seed & _M32)  # the frames' contents, not their place in the batch
        noise_key = mix(self._seed, "optical", self.calls)
        self.calls += 1
        lin = [self._linear(f.float(), re, im, keys, noise_key, 2 * i) for i, f in enumerate(frames)]
        if self.encoding == "ternary":
            out = lin[0] - lin[1]
        else:
            out = 2 * lin[0] - re.sum(0)  # s = 2 b - 1: B s = 2 B b - B 1 (B 1 measured once, a calibration)
        return (out * _norm_matched(e, codes)).to(error.dtype)

    def _linear(
        self, x: torch.Tensor, re: torch.Tensor, im: torch.Tensor, keys: torch.Tensor, noise_key: int, frame: int
    ) -> torch.Tensor:
        """``x R`` of binary frames ``x`` recovered from two camera reads, with and without the reference."""
        zr, zi = x @ re, x @ im
        a = x.sum(-1, keepdim=True).clamp_min(1).sqrt()  # reference amplitude: the frame's lit pixels
        with_reference = self._camera((a + zr).square() + zi.square(), keys, noise_key, frame)
        alone = self._camera(zr.square() + zi.square(), keys, noise_key, frame + 1)
        return (with_reference - alone - a.square()) / (2 * a)

    def _camera(self, intensity: torch.Tensor, keys: torch.Tensor, noise_key: int, frame: int) -> torch.Tensor:
        if self.snr_db is not None:
            rms = intensity.square().mean(-1, keepdim=True).sqrt()
            noise = keyed_normal(keys, intensity.shape[-1], mix(noise_key, frame))
            intensity = (intensity + rms * 10 ** (-self.snr_db / 20) * noise).clamp_min(0)
        if self.bits is not None:
            levels = 2**self.bits - 1
            full = intensity.amax(-1, keepdim=True).clamp_min(torch.finfo(intensity.dtype).tiny)
            intensity = torch.round(intensity / full * levels) * (full / levels)  # a dark frame stays 0
        return intensity

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "matrices": {k: {"re": r.clone(), "im": i.clone()} for k, (r, i) in self._matrices.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = int(state.get("calls", 0))
        self._matrices = {
            int(k): (m["re"].detach().to("cpu", torch.float32), m["im"].detach().to("cpu", torch.float32))
            for k, m in state.get("matrices", {}).items()
        }
        self._cache = {}
