"""Tables, the one renderer: aligned plain text for terminals and CI logs, or Markdown."""

from __future__ import annotations

from collections.abc import Sequence

Row = Sequence[str]


def format_table(header: Row, rows: Sequence[Row], markdown: bool = False) -> str:
    """`header` and `rows` of strings as a table; every row has the header's length."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    table = [list(header), *map(list, rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
