"""How commands print: aligned tables and messages for people, JSON for scripts."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any


class Output:
    """Prints a command's result on stdout.

    ``quiet`` drops table headers (one row per line, for ``while read``);
    ``as_json`` prints one JSON document instead: a list of objects for a
    table, an object for a message.
    """

    def __init__(self, *, quiet: bool = False, as_json: bool = False) -> None:
        self.quiet = quiet
        self.as_json = as_json

    def message(self, text: str, **data: Any) -> None:
        if self.as_json:
            print(json.dumps({"message": text, **data}))
        else:
            print(text)

    def progress(self, text: str) -> None:
        """Why a command is still at work: on stderr, so stdout stays its result."""
        print(text, file=sys.stderr, flush=True)

    def table(self, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        if self.as_json:
            print(json.dumps([dict(zip(columns, row)) for row in rows], default=str))
            return
        cells = [[_cell(v) for v in row] for row in rows]
        if not self.quiet:
            cells.insert(0, list(columns))
        widths = [max((len(r[i]) for r in cells), default=0) for i in range(len(columns))]
        for row in cells:
            sys.stdout.write("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n")


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    return str(value)
