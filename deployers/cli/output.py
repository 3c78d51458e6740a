"""What the commands print for data: JSON (with ``--json``) or a plain table for people."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def table(rows: Sequence[Sequence[str]], headers: Sequence[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    for row in (headers, *rows):
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=False)).rstrip())


ESCAPES = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)?|[@-Z\\-_])")  # CSI, OSC, and two-byte ones


def printable(text: str) -> str:
    """A server's log text fit for one line of a terminal: no control characters or escapes
    (a \\r or a colour code from a server would move the cursor or repaint the line)."""
    return "".join(c if c.isprintable() else " " for c in ESCAPES.sub("", text).replace("\t", " "))
