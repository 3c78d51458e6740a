"""What the commands print for data: JSON (with ``--json``) or a plain table for people."""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Sequence
from typing import Any


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def width(c: str) -> int:
    """Cells one character takes on a terminal: east Asian wide ones (and emoji) two, combining marks none."""
    return 0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in ("W", "F") else 1


def cells(text: str) -> int:
    """Cells ``text`` takes on a terminal."""
    return sum(map(width, text))


def table(rows: Sequence[Sequence[str]], headers: Sequence[str]) -> None:
    """Columns aligned in terminal cells, so wide names keep the columns after them in place."""
    widths = [max(cells(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    for row in (headers, *rows):
        print("  ".join(str(cell) + " " * (w - cells(str(cell))) for cell, w in zip(row, widths, strict=False)).rstrip())


ESCAPES = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)?|[@-Z\\-_])")  # CSI, OSC, and two-byte ones


def printable(text: str) -> str:
    """A server's log text fit for one line of a terminal: no control characters or escapes
    (a \\r or a colour code from a server would move the cursor or repaint the line)."""
    return "".join(c if c.isprintable() else " " for c in ESCAPES.sub("", text).replace("\t", " "))


def duration(s: float | None) -> str:
    """A span of seconds, short: 42s, 3m07s, 2h05m, 1d03h; - for none."""
    if s is None:
        return "-"
    s = int(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
