"""Jane Austen's six novels for the character-level language model, offline by default.

Sources (``load_books(source=...)``):

* ``"debian"``: the Debian package ``r-cran-janeaustenr`` (1.6 MB, public-domain texts). It is fetched with
  ``apt-get download`` (no root needed, nothing is installed) and unpacked with ``dpkg -x`` into the cache
  directory; an already installed copy under ``/usr/lib/R/site-library`` is used as is. The novels are R
  objects in the package's lazy-load database (``data/Rdata.rdx`` + ``.rdb``), read with the PyPI package
  ``rdata``: the ``.rdx`` is a gzipped R object mapping each variable to ``(offset, length)`` in the ``.rdb``,
  and each ``.rdb`` chunk is a 4-byte big-endian length followed by a zlib stream holding one serialized R
  object (here a character vector, one element per line).
* ``"gutenberg"``: the same novels from Project Gutenberg (needs the internet; fails with a clear message).
* ``"synthetic"``: a small generated pseudo-English corpus (no files, no network) for tests and smoke runs.
* ``"auto"`` (default): ``"debian"``, falling back to ``"synthetic"`` with a warning when the package
  cannot be fetched (not Debian, no registry access).

A novel's text is its lines joined with ``"\\n"``. The split used throughout: Persuasion is the test set, the
other five novels the training set. :func:`ngram_bits_per_char` gives the n-gram references; with add-one
smoothing they are, on Persuasion, unigram 4.43, bigram 3.54 and trigram 2.85 bits per character.

The cache directory is ``$LIGHTNING_DFA_DATA`` if set, else ``~/.cache/lightning_dfa``.
"""

from __future__ import annotations

import glob
import gzip
import os
import random
import struct
import urllib.request
import warnings
import zlib
from pathlib import Path

import numpy as np

from examples.data.debian import PackageUnavailable, unpack_package

BOOKS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
TEST_BOOK = "persuasion"
GUTENBERG_IDS = {
    "sensesensibility": 161,
    "prideprejudice": 1342,
    "mansfieldpark": 141,
    "emma": 158,
    "northangerabbey": 121,
    "persuasion": 105,
}
DEB_PACKAGE = "r-cran-janeaustenr"
_RDATA_SUBDIR = "usr/lib/R/site-library/janeaustenr/data"
SOURCES = ("auto", "debian", "gutenberg", "synthetic")


class DataUnavailable(RuntimeError):
    """The requested source cannot be read here (no package manager, no network...)."""


def default_cache_dir() -> Path:
    """``$LIGHTNING_DFA_DATA`` or ``~/.cache/lightning_dfa``."""
    env = os.environ.get("LIGHTNING_DFA_DATA")
    return Path(env) if env else Path.home() / ".cache" / "lightning_dfa"


# ---------------------------------------------------------------------------------------------- R lazy-load files
def _r_object(raw: bytes) -> object:
    """Convert one serialized R object (the bytes of an ``.rds`` without its compression) with ``rdata``."""
    try:
        import rdata
    except ImportError as err:  # pragma: no cover - rdata is in the examples extra
        raise DataUnavailable("Reading the R package needs `rdata`: pip install 'lightning-dfa[examples]'.") from err
    return rdata.conversion.convert(rdata.parser.parse_data(raw, extension=".rds"))


def read_lazyload(rdx_path: str | Path, rdb_path: str | Path) -> dict[str, list[str]]:
    """Every character-vector variable of an R lazy-load database, as a list of lines per variable.

    Args:
        rdx_path: the index (``.rdx``, a gzip-compressed serialized R list with ``variables``).
        rdb_path: the database (``.rdb``): for each variable, a 4-byte big-endian length and a zlib stream.
    """
    index = _r_object(gzip.decompress(Path(rdx_path).read_bytes()))
    data = Path(rdb_path).read_bytes()
    out: dict[str, list[str]] = {}
    for name, (offset, length) in index["variables"].items():
        chunk = data[int(offset) : int(offset) + int(length)]
        expected = struct.unpack(">I", chunk[:4])[0]
        raw = zlib.decompress(chunk[4:])
        if len(raw) != expected:
            raise DataUnavailable(f"{rdb_path}: variable {name!r} decompressed to {len(raw)} bytes, not {expected}.")
        value = _r_object(raw)
        out[str(name)] = ["" if v is None else str(v) for v in np.asarray(value, dtype=object).ravel()]
    return out


def _find_rdata(root: Path) -> Path | None:
    hits = glob.glob(str(root / "**" / "janeaustenr" / "data" / "Rdata.rdx"), recursive=True)
    return Path(hits[0]).parent if hits else None


def fetch_debian(cache_dir: str | Path | None = None) -> Path:
    """The ``data/`` directory of ``r-cran-janeaustenr``: cached, installed, or fetched with ``apt-get download``."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / "janeaustenr"
    found = _find_rdata(target)
    if found is not None:
        return found
    installed = Path("/") / _RDATA_SUBDIR
    if (installed / "Rdata.rdx").exists():
        return installed
    try:
        unpack_package(DEB_PACKAGE, target, timeout=300)
    except PackageUnavailable as err:
        raise DataUnavailable(
            f"{err}\nRun `apt-get update` first, or use source='gutenberg' (online) or source='synthetic'."
        ) from err
    found = _find_rdata(target)
    if found is None:
        raise DataUnavailable(f"{DEB_PACKAGE} unpacked into {target} but holds no janeaustenr/data/Rdata.rdx.")
    return found


def load_debian(cache_dir: str | Path | None = None) -> dict[str, str]:
    """The six novels from ``r-cran-janeaustenr`` (fetched into the cache on first use)."""
    data_dir = fetch_debian(cache_dir)
    books = read_lazyload(data_dir / "Rdata.rdx", data_dir / "Rdata.rdb")
    missing = [b for b in BOOKS if b not in books]
    if missing:
        raise DataUnavailable(f"{data_dir}: the R data lacks {missing}.")
    return {b: "\n".join(books[b]) for b in BOOKS}


# ---------------------------------------------------------------------------------------------- online
def _strip_gutenberg(text: str) -> str:
    start, end = text.find("*** START OF"), text.find("*** END OF")
    if start >= 0:
        text = text[text.find("\n", start) + 1 :]
        end = text.find("*** END OF")
    if end >= 0:
        text = text[:end]
    return text.replace("\r\n", "\n").strip() + "\n"


def load_gutenberg(cache_dir: str | Path | None = None, timeout: float = 30.0) -> dict[str, str]:
    """The six novels from Project Gutenberg (plain-text UTF-8), cached after the first download.

    The texts differ slightly from the Debian package's (headers, chapter headings, typography), so the n-gram
    references differ a little too.
    """
    cache = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "gutenberg"
    cache.mkdir(parents=True, exist_ok=True)
    books = {}
    for name, number in GUTENBERG_IDS.items():
        path = cache / f"{name}.txt"
        if not path.exists():
            url = f"https://www.gutenberg.org/cache/epub/{number}/pg{number}.txt"
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    raw = response.read().decode("utf-8-sig")
            except OSError as err:
                raise DataUnavailable(
                    f"Could not download {url} ({err}). Project Gutenberg needs the internet; offline, use "
                    "source='debian' (apt-get download r-cran-janeaustenr) or source='synthetic'."
                ) from err
            path.write_text(_strip_gutenberg(raw), encoding="utf-8")
        books[name] = path.read_text(encoding="utf-8")
    return books


# ---------------------------------------------------------------------------------------------- synthetic
_NAMES = (
    "Anne",
    "Elizabeth",
    "Emma",
    "Fanny",
    "Catherine",
    "Elinor",
    "Marianne",
    "Mr. Darcy",
    "Captain Wentworth",
    "Sir Walter",
    "Mrs. Bennet",
    "Mr. Knightley",
    "Lady Russell",
    "Edmund",
    "Henry",
)
_VERBS = (
    "admired",
    "visited",
    "wrote to",
    "spoke of",
    "walked with",
    "thought of",
    "danced with",
    "disliked",
    "forgave",
    "answered",
    "observed",
    "pitied",
)
_ADJS = (
    "amiable",
    "agreeable",
    "handsome",
    "proud",
    "sensible",
    "lively",
    "quiet",
    "tolerable",
    "elegant",
    "silly",
    "respectable",
    "charming",
)
_PLACES = (
    "Bath",
    "Highbury",
    "Pemberley",
    "Kellynch Hall",
    "Mansfield Park",
    "Northanger Abbey",
    "Barton Cottage",
    "London",
    "Lyme",
    "Hartfield",
)
_TEMPLATES = (
    "{a} {v} {b} at {p}.",
    '"I am sure {b} is very {j}," said {a}.',
    "{a} was {j}, and {b} was {j2}.",
    "It was a {j} morning at {p}, and {a} {v} {b}.",
    "{a} had never {v} anyone so {j} as {b}.",
    '"{p} is {j}," cried {a}; "but {b} is more {j2}."',
)


def synthetic_text(n_chars: int = 20000, seed: int = 0) -> str:
    """Deterministic pseudo-Austen prose (sentences from a small grammar, lines of at most 70 characters).

    Example:
        >>> t = synthetic_text(300, seed=1)
        >>> len(t) >= 300 and t == synthetic_text(300, seed=1)
        True
    """
    rng = random.Random(seed)
    lines, line, total = [], "", 0
    while total < n_chars:
        sentence = rng.choice(_TEMPLATES).format(
            a=rng.choice(_NAMES),
            b=rng.choice(_NAMES),
            v=rng.choice(_VERBS),
            p=rng.choice(_PLACES),
            j=rng.choice(_ADJS),
            j2=rng.choice(_ADJS),
        )
        for word in sentence.split(" "):
            if len(line) + len(word) + 1 > 70:
                lines.append(line)
                total += len(line) + 1
                line = word
            else:
                line = f"{line} {word}" if line else word
        if rng.random() < 0.15:
            lines += [line, ""]
            total += len(line) + 2
            line = ""
    lines.append(line)
    return "\n".join(lines)


def load_synthetic(n_chars: int = 60000) -> dict[str, str]:
    """Six synthetic "novels" (one seed each; the test book is a quarter the size of the others)."""
    return {
        name: synthetic_text(n_chars // 4 if name == TEST_BOOK else n_chars, seed=i) for i, name in enumerate(BOOKS)
    }


# ---------------------------------------------------------------------------------------------- entry point
def load_books(source: str = "auto", cache_dir: str | Path | None = None) -> dict[str, str]:
    """The six novels as ``{name: text}`` from ``source`` (see the module docstring).

    Example:
        >>> books = load_books("synthetic")
        >>> sorted(books) == sorted(BOOKS)
        True
    """
    return load_books_from(source, cache_dir)[0]


def load_books_from(source: str = "auto", cache_dir: str | Path | None = None) -> tuple[dict[str, str], str]:
    """:func:`load_books` and the source actually used (``"debian"``, ``"gutenberg"`` or ``"synthetic"``: with
    ``source="auto"``, ``"synthetic"`` means the fallback was taken)."""
    if source not in SOURCES:
        raise ValueError(f"Unknown source {source!r}; choose one of {SOURCES}.")
    if source == "synthetic":
        return load_synthetic(), "synthetic"
    if source == "gutenberg":
        return load_gutenberg(cache_dir), "gutenberg"
    try:
        return load_debian(cache_dir), "debian"
    except DataUnavailable as err:
        if source == "debian":
            raise
        warnings.warn(
            f"Jane Austen's novels are unavailable offline here ({err}). Falling back to a small SYNTHETIC corpus: "
            "numbers will not be comparable to the documented ones.",
            stacklevel=2,
        )
        return load_synthetic(), "synthetic"


def split_books(books: dict[str, str], test_book: str = TEST_BOOK) -> tuple[list[str], str]:
    """The training novels (in :data:`BOOKS` order) and the held-out test novel."""
    return [books[b] for b in BOOKS if b != test_book and b in books], books[test_book]


# ---------------------------------------------------------------------------------------------- references
def _ngram_ids(codes: np.ndarray, n: int, base: int) -> np.ndarray:
    ids = np.zeros(len(codes) - n + 1, dtype=np.int64)
    for i in range(n):
        ids = ids * base + codes[i : len(codes) - n + 1 + i]
    return ids


def _count(ids: np.ndarray, query: np.ndarray) -> np.ndarray:
    keys, counts = np.unique(ids, return_counts=True)
    pos = np.clip(np.searchsorted(keys, query), 0, max(len(keys) - 1, 0))
    return np.where(keys[pos] == query, counts[pos], 0) if len(keys) else np.zeros_like(query)


def ngram_bits_per_char(train: str | list[str], test: str, n: int, k: float = 1.0) -> float:
    """Test bits per character of an add-``k`` smoothed character ``n``-gram model fitted on ``train``.

    The alphabet is the union of the training and test characters. The first ``n - 1`` test characters are
    not scored. Several training texts are scored as if concatenated with ``"\\n"``.

    Example:
        >>> round(ngram_bits_per_char("abababab", "abab", 2), 2) < round(ngram_bits_per_char("abababab", "abab", 1), 2)
        True
    """
    train_text = train if isinstance(train, str) else "\n".join(train)
    alphabet = sorted(set(train_text) | set(test))
    lookup = {c: i for i, c in enumerate(alphabet)}
    v = len(alphabet)
    tr = np.fromiter((lookup[c] for c in train_text), dtype=np.int64, count=len(train_text))
    te = np.fromiter((lookup[c] for c in test), dtype=np.int64, count=len(test))
    if n == 1:
        p = (_count(tr, te) + k) / (len(tr) + k * v)
        return float(-np.log2(p).mean())
    query = _ngram_ids(te, n, v)
    context = _ngram_ids(te, n - 1, v)[: len(query)]
    num = _count(_ngram_ids(tr, n, v), query)
    den = _count(_ngram_ids(tr, n - 1, v)[: len(tr) - n + 1], context)
    return float(-np.log2((num + k) / (den + k * v)).mean())


def ngram_references(train: str | list[str], test: str, orders: tuple[int, ...] = (1, 2, 3)) -> dict[str, float]:
    """``{"unigram": ..., "bigram": ..., "trigram": ...}`` bits per character on ``test``."""
    names = {1: "unigram", 2: "bigram", 3: "trigram", 4: "4-gram", 5: "5-gram"}
    return {names.get(n, f"{n}-gram"): ngram_bits_per_char(train, test, n) for n in orders}
