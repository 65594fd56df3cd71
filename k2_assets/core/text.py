"""Text shown to people: markdown tables (Dagster metadata, reports) and errors in one line."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A markdown table; a `|` or a newline inside a cell is replaced, so the table keeps its shape."""

    def cell(value) -> str:
        return "" if value is None else str(value).replace("|", "/").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def one_line(exc: BaseException | None) -> str:
    """An exception in one line: its type and the first line of its message, at most 300 characters."""
    if exc is None:
        return "unknown error"
    first = str(exc).splitlines()[0] if str(exc) else ""
    return (f"{type(exc).__name__}: {first}" if first else type(exc).__name__)[:300]
