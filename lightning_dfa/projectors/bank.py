"""Random feedback matrices (drawn from a private generator, or hashed from the seed) kept in a
:class:`FeedbackBank` (the state a checkpoint saves); the projectors built on them are in :mod:`.random`.

The matrices never touch the global RNG: each one is drawn from its own ``torch.Generator`` seeded from the
user's seed and the matrix's shape, in fixed chunks of rows, so that

* every process draws the same matrix (DDP needs no broadcast),
* a matrix grown to more columns keeps its first columns (a wider feedback point added later does not
  change the feedback of the others),
* the drawn values are saved in checkpoints, so a resumed run continues with exactly the same feedback even
  if a future PyTorch draws random numbers differently.

Scaling (documented in the README): a feedback point of width ``d`` receives ``scale / sqrt(d) * (e @ B[:, :d])``
where ``B`` holds i.i.d. entries of the chosen distribution. With ``distribution="gaussian"`` the expected norm
of each token's feedback then equals ``scale * ||e||`` whatever the width; ``"uniform"`` draws from ``[-1, 1)``
(variance 1/3, the DFA authors' choice) and ``"rademacher"`` draws signs (variance 1).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .base import mix as _mix

DISTRIBUTIONS = ("uniform", "gaussian", "rademacher")


_CHUNK_ROWS = 64


_STATE_VERSION = 1


def draw(shape: tuple[int, int], distribution: str, seed: int, *parts: int | str) -> torch.Tensor:
    """Draw a ``[rows, cols]`` float32 CPU tensor of ``distribution`` from a private generator.

    Rows are drawn in chunks of 64, each from its own generator, so the first rows do not depend on how
    many rows are asked for.

    Example:
        >>> a = draw((10, 4), "gaussian", 0, "k")
        >>> b = draw((100, 4), "gaussian", 0, "k")
        >>> bool(torch.equal(a, b[:10]))
        True
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"Unknown feedback distribution {distribution!r}; choose one of {DISTRIBUTIONS}.")
    rows, cols = shape
    chunks = []
    for start in range(0, rows, _CHUNK_ROWS):
        n = min(_CHUNK_ROWS, rows - start)
        g = torch.Generator(device="cpu").manual_seed(_mix(seed, distribution, *parts, start // _CHUNK_ROWS))
        if distribution == "gaussian":
            block = torch.randn(_CHUNK_ROWS, cols, generator=g)
        elif distribution == "uniform":
            block = torch.rand(_CHUNK_ROWS, cols, generator=g) * 2 - 1
        else:
            block = torch.randint(0, 2, (_CHUNK_ROWS, cols), generator=g).float() * 2 - 1
        chunks.append(block[:n])
    if not chunks:
        return torch.empty(0, cols)
    return torch.cat(chunks)


_M32 = 0xFFFFFFFF


SKETCH_RANK = 4  # the sketch option: the outputs of one residue class share a random subspace of this dimension


#: the ``sketch`` projection replaces the dense one only for errors wider than this many times the feedback width
SKETCH_MIN_RATIO = 4


def uses_sketch(k: int, width: int) -> bool:
    """Whether ``sketch=True`` projects an error of width ``k`` onto points of width ``width`` with the structured
    matrix (a vocabulary-wide error), rather than the dense one."""
    return k > SKETCH_MIN_RATIO * width


def _mul32(x: torch.Tensor, c: int, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """``x * c mod 2**32`` for int64 ``x < 2**32`` without int64 overflow (16-bit halves of ``c``), IN PLACE:
    ``x`` is overwritten and returned (callers pass a tensor of their own); ``scratch``, of ``x``'s shape, saves
    an allocation."""
    high = torch.mul(x, c >> 16, out=scratch) if scratch is not None else x * (c >> 16)
    return x.mul_(c & 0xFFFF).add_(high.bitwise_and_(0xFFFF).bitwise_left_shift_(16)).bitwise_and_(_M32)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """The ``lowbias32`` integer hash (C. Wellons) of int64 tensors holding 32-bit values, IN PLACE (one scratch
    tensor instead of a new tensor per step of the hash)."""
    scratch = torch.empty_like(x)
    x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=scratch))
    _mul32(x, 0x7FEB352D, scratch)
    x.bitwise_xor_(torch.bitwise_right_shift(x, 15, out=scratch))
    _mul32(x, 0x846CA68B, scratch)
    return x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=scratch))


def hashed_uniform(n: int, key: int, device: torch.device | str = "cpu", stream: int = 0) -> torch.Tensor:
    """``n`` float32 values uniform on ``[-1, 1)``, a pure function of ``(key, position)``: an integer hash
    computed with exact integer tensor ops on ``device``, so the values are bit-identical on every device,
    process and PyTorch version, and a longer draw keeps the shorter one's values as its prefix.

    Example:
        >>> x = hashed_uniform(1000, key=7)
        >>> bool(x.min() >= -1 and x.max() < 1), bool(torch.equal(x[:10], hashed_uniform(10, key=7)))
        (True, True)
    """
    x = _mul32(torch.arange(n, dtype=torch.int64, device=device), 0x9E3779B1)
    x = _hash32(x.add_(key + 0x6A09E667 + stream * 0x632BE5AB).bitwise_and_(_M32))
    return x.bitwise_right_shift_(8).to(torch.float32).mul_(2.0**-23).sub_(1.0)


def keyed_normal(rows: torch.Tensor, width: int, key: int) -> torch.Tensor:
    """``[n, width]`` standard normal float32 values, a pure function of (``key``, each row's 32-bit key in
    ``rows`` (int64 ``[n]``), column): exact integer hashing, so every process and device draws the same values for
    the same keys, without a generator to carry along.

    Example:
        >>> a = keyed_normal(torch.tensor([5, 9]), 4, key=1)
        >>> bool(torch.equal(a[1], keyed_normal(torch.tensor([9]), 4, key=1)[0])), a.shape
        (True, torch.Size([2, 4]))
    """
    cols = _mul32(torch.arange(width, dtype=torch.int64, device=rows.device), 0x85EBCA6B)

    def uniform(stream: int) -> torch.Tensor:  # on [-1, 1), as hashed_uniform
        base = _hash32((_mul32(rows & _M32, 0x9E3779B1) + (key & _M32) + stream * 0x632BE5AB) & _M32)
        x = _hash32((base.unsqueeze(-1) + cols + 0x6A09E667) & _M32)
        return (x >> 8).to(torch.float32) * 2.0**-23 - 1.0

    r = (-2.0 * torch.log1p(-(uniform(0) + 1.0) / 2)).sqrt()
    return r * torch.cos(torch.pi * (uniform(1) + 1.0))


def row_keys(codes: torch.Tensor, salt: int) -> torch.Tensor:
    """A 32-bit key of each row of an integer tensor ``[n, k]`` with small non-negative entries (a hash of its
    contents): rows with the same entries get the same key on every process, whatever their position in a batch.
    """
    k = codes.shape[-1]
    weights = _hash32((_mul32(torch.arange(k, dtype=torch.int64, device=codes.device), 0x27D4EB2F) + salt) & _M32)
    return _hash32((codes.to(torch.int64) * weights).sum(-1) & _M32)


def hashed_matrix(
    rows: int, cols: int, distribution: str, key: int, device: torch.device, dtype: torch.dtype, scale: float = 1.0
) -> torch.Tensor:
    """A ``[rows, cols]`` matrix of ``distribution`` from :func:`hashed_uniform` (row-major positions, so the first
    rows do not depend on how many rows are asked for). Gaussian entries by the Box-Muller transform."""
    n = rows * cols
    u = hashed_uniform(n, key, device)
    if distribution == "uniform":
        out = u
    elif distribution == "rademacher":
        out = torch.where(u < 0, -1.0, 1.0)
    else:
        # in place: sqrt(-2 log(1 - U)), 1 - U in (0, 1]
        out = u.add_(1.0).div_(2).neg_().log1p_().mul_(-2.0).sqrt_()
        out.mul_(hashed_uniform(n, key, device, stream=1).add_(1.0).mul_(torch.pi).cos_())
    return (out.mul_(scale) if scale != 1.0 else out).to(dtype).view(rows, cols)


def _matrix_id(k: int, source: str) -> int | str:
    """The key of the matrices of error width ``k`` from output ``source``: ``k`` for the primary output (as
    checkpoints have always stored it), ``"k@source"`` for the others."""
    return k if not source else f"{k}@{source}"


def _error_width(key: Any) -> int | None:
    """The error width of a matrices key (:func:`_matrix_id`: ``k`` or ``"k@output"``), ``None`` if it is neither."""
    if _is_int(key):
        return key if key >= 1 else None
    width = key.split("@", 1)[0] if isinstance(key, str) and "@" in key else ""
    return int(width) if width.isdigit() and int(width) >= 1 else None


def _load_id(key: int | str) -> int | str:
    return int(key) if isinstance(key, int) or str(key).isdigit() else str(key)


def _ids_text(ids: Any) -> list[str]:
    return sorted(str(k) for k in ids)


class FeedbackBank:
    """The fixed random matrices of one engine, keyed by the error's width.

    One matrix per error width ``k`` is stored transposed, ``[d_max, k]``: a feedback point of width ``d``
    uses its first ``d`` rows. Casts to a device and dtype are cached, so a step allocates nothing.

    Example:
        >>> bank = FeedbackBank(seed=0, distribution="gaussian")
        >>> bank.matrix(k=10, width=32, device=torch.device("cpu"), dtype=torch.float32).shape
        torch.Size([32, 10])
    """

    def __init__(self, seed: int = 0, distribution: str = "uniform") -> None:
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"Unknown feedback distribution {distribution!r}; choose one of {DISTRIBUTIONS}.")
        self.seed = int(seed)
        self.distribution = distribution
        self._matrices: dict[int, torch.Tensor] = {}
        self._signs: dict[str, torch.Tensor] = {}
        self._sketch_groups: dict[int, int] = {}  # sketch option: error width k -> group size g
        self._cache: dict[tuple, torch.Tensor] = {}
        self._loaded_widths: dict[str, list[int]] | None = None
        self.widths: dict[str, list[int]] = {}  # point key -> [error width k, point width d]

    # ------------------------------------------------------------------ matrices
    def dense_rows(self, k: int, source: str = "") -> int:
        """Rows of the dense matrix of error width ``k`` held (``0``: none): the widest point that read it."""
        stored = self._matrices.get(_matrix_id(k, source))
        return 0 if stored is None else stored.shape[0]

    def matrix(
        self,
        k: int,
        width: int,
        device: torch.device,
        dtype: torch.dtype,
        transposed: bool = False,
        source: str = "",
    ) -> torch.Tensor:
        """The ``[width, k]`` matrix (first ``width`` rows of the error-width-``k`` matrix) on ``device``/``dtype``.

        With ``transposed=True`` its contiguous transpose ``[k, width]`` (a table of rows, for the ``topk``
        projection). Either is cast once and cached: the same tensor is returned at every step; a cast to the
        master's own device, dtype and layout is the master itself (no copy). ``source`` names the output whose
        error it projects (``""``: the primary one); every output has its own matrices.
        """
        mid = _matrix_id(k, source)
        stored = self._matrices.get(mid)
        if stored is None or stored.shape[0] < width:
            if stored is None and mid in self._sketch_groups:
                raise RuntimeError(
                    f"DFA: the feedback for error width {k} was a sketch (sketch=True) when the checkpoint was "
                    "written; resume with sketch=True, or start a new run to change the projection."
                )
            if stored is None and self._loaded_widths is not None and self._matrices:
                raise RuntimeError(
                    f"DFA: the model now produces an error of width {k}, but the checkpoint's feedback matrices "
                    f"were drawn for error widths {_ids_text(self._matrices)}. The model's output shape changed "
                    "since the checkpoint was written; resume with the original model or start a new run."
                )
            parts = ("B", k) if not source else ("B", k, source)
            self._matrices[mid] = draw((width, k), self.distribution, self.seed, *parts)
            self._cache = {key: v for key, v in self._cache.items() if key[0] != mid}
        key = (mid, width, device, dtype, transposed)
        cached = self._cache.get(key)
        if cached is None:
            master = self._matrices[mid][:width]
            cached = (master.t() if transposed else master).to(device=device, dtype=dtype).contiguous()
            self._cache[key] = cached
        return cached

    def mean_column(
        self, k: int, width: int, device: torch.device, dtype: torch.dtype, source: str = ""
    ) -> torch.Tensor:
        """The mean over the ``k`` columns of the ``[width, k]`` matrix (``[width]``, cached): the ``topk`` option
        projects the dropped entries of the error as if each were their mean."""
        self.matrix(k, width, device, dtype, source=source)  # draws or grows the stored matrix if needed
        mid = _matrix_id(k, source)
        key = (mid, width, device, dtype, "mean")
        cached = self._cache.get(key)
        if cached is None:
            cached = self._matrices[mid][:width].mean(dim=1).to(device=device, dtype=dtype)
            self._cache[key] = cached
        return cached

    def sketch(
        self, k: int, width: int, device: torch.device, dtype: torch.dtype, source: str = ""
    ) -> tuple[int, torch.Tensor, torch.Tensor]:
        """The structured feedback of error width ``k`` (the ``sketch`` option): ``(g, A, G)``.

        Output index ``v = i * g + j`` (``i < m = ceil(k / g)``, ``j < g``) has the feedback row
        ``B[v] = sum_c A[c, i] G[c * g + j] / 2`` over ``c < 4``, with ``A`` (``[4, m]``) Gaussian and ``G``
        (``[4 g, width]``) of the bank's distribution: every entry of ``B`` has the dense matrix's variance, any
        two rows differ (the outputs of one residue ``j`` share a random 4-dimensional subspace, those of
        different residues are independent), and ``B`` has full rank (``4 g >= width``).
        ``g = max(ceil(sqrt(k)), ceil(width / 4))`` (capped at ``k``) is fixed when first used. The returned ``G``
        carries the 1/2.

        Nothing is saved: the entries are a pure function of (seed, ``k``, position), computed by an integer hash
        on ``device`` (:func:`hashed_uniform`, ``4 (m + g) width`` values: 2.8 MB in float32 for GPT-2 small's
        vocabulary and width, against 154 MB for the dense matrix), so checkpoints carry no matrix, no host-to-device
        copy is made, and the values are the same on every device, process and PyTorch version (bit for bit for the
        uniform and Rademacher distributions' ``G``; the Gaussian values' Box-Muller transform to float rounding).
        On an accelerator they are computed once per dtype and cached (the hash is about a hundred small kernels,
        whose launches cost more there than the memory); on the CPU at each call (about 1.3 ms at a 50257-word
        vocabulary, and no memory held between steps). The group size ``g`` is saved in :meth:`state_dict`.

        Example:
            >>> bank = FeedbackBank(seed=0, distribution="gaussian")
            >>> g, A, G = bank.sketch(k=1000, width=16, device=torch.device("cpu"), dtype=torch.float32)
            >>> g, tuple(A.shape), tuple(G.shape)
            (32, (4, 32), (128, 16))
        """
        mid = _matrix_id(k, source)
        g = self._sketch_groups.get(mid)
        if g is None:
            if mid in self._matrices:
                raise RuntimeError(
                    f"DFA: the feedback for error width {k} was a dense matrix (sketch=False) when the checkpoint "
                    "was written; resume with sketch=False, or start a new run to change the projection."
                )
            if self._loaded_widths is not None and (self._sketch_groups or self._matrices):
                raise RuntimeError(
                    f"DFA: the model now produces an error of width {k}, but the checkpoint's feedback was drawn "
                    f"for error widths {_ids_text({**self._sketch_groups, **self._matrices})}. The model's output "
                    "shape changed since the checkpoint was written; resume with the original model or start a new run."
                )
            g = min(k, max(math.isqrt(k - 1) + 1, -(-width // SKETCH_RANK)))
            self._sketch_groups[mid] = g
        cache_a, cache_g = (("sketch", mid), width, device, dtype, "A"), (("sketch", mid), width, device, dtype, "G")
        a, g_t = self._cache.get(cache_a), self._cache.get(cache_g)
        if a is None or g_t is None:
            key = (self.seed, self.distribution, "sketch", k) + ((source,) if source else ())
            a = hashed_matrix(SKETCH_RANK, -(-k // g), "gaussian", _mix(*key, "A"), device, dtype)
            # stored as [width, 4 g] rows so that a wider point keeps the narrower one's values
            g_t = hashed_matrix(width, SKETCH_RANK * g, self.distribution, _mix(*key, "G"), device, dtype, 0.5)
            if torch.device(device).type != "cpu":
                self._cache[cache_a], self._cache[cache_g] = a, g_t
        return g, a, g_t.t()

    def sketch_matrix(self, k: int, width: int) -> torch.Tensor:
        """The ``sketch`` option's feedback as a dense ``[width, k]`` float32 matrix (for inspection and tests).

        Example:
            >>> bank = FeedbackBank(seed=0)
            >>> bank.sketch_matrix(k=100, width=8).shape
            torch.Size([8, 100])
        """
        g, a, big = self.sketch(k, width, torch.device("cpu"), torch.float32)
        v = torch.arange(k)
        i, j = v // g, v % g
        rows = sum(a[c, i, None] * big[c * g + j] for c in range(SKETCH_RANK))
        return rows.t().contiguous()

    def signs(self, point: str, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Fixed random +-1 vector of one feedback point (the ``distinct`` option)."""
        stored = self._signs.get(point)
        if stored is None or stored.shape[0] != width:
            stored = draw((1, width), "rademacher", self.seed, "signs", point)[0]
            self._signs[point] = stored
        key = ("signs", point, device, dtype)
        cached = self._cache.get(key)
        if cached is None:
            cached = stored.to(device=device, dtype=dtype)
            self._cache[key] = cached
        return cached

    def check_point(self, point: str, k: int, width: int) -> None:
        """Record a feedback point's widths; after a resume, refuse one whose widths changed."""
        seen = self.widths.get(point)
        if seen is not None and seen == [k, width]:
            return
        if (
            self._loaded_widths is not None
            and point in self._loaded_widths
            and self._loaded_widths[point] != [k, width]
        ):
            old_k, old_d = self._loaded_widths[point]
            raise RuntimeError(
                f"DFA: feedback point {point!r} now has width {width} for an error of width {k}, but the "
                f"checkpoint's feedback was drawn for width {old_d} and error width {old_k}. The model's shapes "
                "changed since the checkpoint was written; resume with the original model or start a new run."
            )
        self.widths[point] = [k, width]

    @property
    def nbytes(self) -> int:
        """Memory held by the stored float32 matrices (one copy; device casts are cached separately)."""
        return sum(m.numel() * m.element_size() for m in self._matrices.values())

    @property
    def cached_nbytes(self) -> int:
        """Memory held by cached casts that are not views of the stored matrices (device, dtype or layout copies)."""
        masters = {m.untyped_storage().data_ptr() for m in self._matrices.values()}
        storages = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in self._cache.values()
            if t.untyped_storage().data_ptr() not in masters
        }
        return sum(storages.values())

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue with identical feedback."""
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "distribution": self.distribution,
            "matrices": {k: m.clone() for k, m in self._matrices.items()},
            "signs": {p: s.clone() for p, s in self._signs.items()},
            "sketch_groups": dict(self._sketch_groups),
            "widths": {p: list(w) for p, w in self.widths.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore matrices saved by :meth:`state_dict`; they replace whatever the seed would draw. A damaged state
        is refused (:func:`check_bank_state`)."""
        check_bank_state(state)
        self.seed = int(state["seed"])
        self.distribution = state["distribution"]
        self._matrices = {_load_id(k): m.detach().to("cpu", torch.float32) for k, m in state["matrices"].items()}
        self._signs = {p: s.detach().to("cpu", torch.float32) for p, s in state["signs"].items()}
        self._sketch_groups = {_load_id(k): int(g) for k, g in state.get("sketch_groups", {}).items()}
        self._loaded_widths = {p: list(w) for p, w in state["widths"].items()}
        self.widths = {}
        self._cache = {}


def _damaged(what: str) -> ValueError:
    return ValueError(
        f"DFA: the checkpoint's feedback state is damaged: {what}. It was not written by lightning-dfa or was "
        "changed since; resume from another checkpoint, or start a new fit from the weights alone "
        "(Model.load_from_checkpoint(path), then fit without ckpt_path)."
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_bank_state(state: Any) -> None:
    """Refuse a :meth:`FeedbackBank.state_dict` that is damaged: not a dict, an unknown version, missing keys, wrong
    types, matrices that are not ``[rows, k]`` float tensors, non-finite values, signs other than +-1.

    Example:
        >>> state = FeedbackBank(seed=1).state_dict()
        >>> check_bank_state(state)
        >>> check_bank_state({k: v for k, v in state.items() if k != "widths"})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: DFA: the checkpoint's feedback state is damaged: it lacks the keys ['widths']...
    """
    if not isinstance(state, dict):
        raise _damaged(f"it is a {type(state).__name__}, not a dict")
    if state.get("version") != _STATE_VERSION:
        raise _damaged(f"unknown feedback state version {state.get('version')!r} (this version reads {_STATE_VERSION})")
    missing = [k for k in ("seed", "distribution", "matrices", "signs", "widths") if k not in state]
    if missing:
        raise _damaged(f"it lacks the keys {missing}")
    if not _is_int(state["seed"]):
        raise _damaged(f"seed is {state['seed']!r}, not an integer")
    if state["distribution"] not in DISTRIBUTIONS:
        raise _damaged(f"distribution is {state['distribution']!r}, not one of {DISTRIBUTIONS}")
    for key in ("matrices", "signs", "widths", "sketch_groups"):
        if not isinstance(state.get(key, {}), dict):
            raise _damaged(f"{key} is a {type(state[key]).__name__}, not a dict")
    for key, m in state["matrices"].items():
        k = _error_width(key)
        if k is None:
            raise _damaged(f"a feedback matrix is keyed {key!r}, not an error width (or 'width@output')")
        if not isinstance(m, torch.Tensor) or not m.is_floating_point() or m.dim() != 2 or m.shape[1] != k:
            got = list(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise _damaged(f"the feedback matrix of error width {key} is {got}, not a [rows, {k}] float tensor")
        if not bool(torch.isfinite(m).all()):
            raise _damaged(f"the feedback matrix of error width {key} holds NaN or infinite values")
    for point, s in state["signs"].items():
        if not isinstance(s, torch.Tensor) or s.dim() != 1 or not bool((s.abs() == 1).all()):
            raise _damaged(f"the signs of point {point!r} are not a vector of +-1")
    for key, g in state.get("sketch_groups", {}).items():
        k = _error_width(key)
        if not (k is not None and _is_int(g) and 1 <= g <= k):
            raise _damaged(f"the sketch group of error width {key!r} is {g!r}")
    for point, w in state["widths"].items():
        if not (isinstance(w, (list, tuple)) and len(w) == 2 and all(_is_int(v) and v >= 1 for v in w)):
            raise _damaged(f"the widths of point {point!r} are {w!r}, not [error width, point width]")
