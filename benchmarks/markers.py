"""Generated sections of the docs: the text between a pair of HTML comment markers, rewritten from stored results."""

from __future__ import annotations

from pathlib import Path


def replace_section(path: Path, marker: str, body: str) -> None:
    """Replace the text between ``<!-- {marker}: start -->`` and ``<!-- {marker}: end -->`` in ``path`` by
    ``body``, keeping the markers and everything around them.

    Example:
        >>> import tempfile
        >>> page = Path(tempfile.mkdtemp()) / "page.md"
        >>> _ = page.write_text("intro\\n<!-- table: start -->\\nold\\n<!-- table: end -->\\noutro\\n")
        >>> replace_section(page, "table", "new\\n")
        >>> page.read_text()
        'intro\\n<!-- table: start -->\\nnew\\n<!-- table: end -->\\noutro\\n'
    """
    start, end = f"<!-- {marker}: start -->\n", f"<!-- {marker}: end -->"
    head, rest = path.read_text().split(start)
    _, tail = rest.split(end)
    path.write_text(head + start + body + end + tail)
