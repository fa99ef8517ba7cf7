"""What every command gets: the node, the output, its filters and its key=value words.

Filters (``-f k=v,k=v``) select rows of the object's listing, with ``*`` and
``?`` as wildcards (case-sensitive, like qvd-admin's SQL LIKE on names). A
filter that matches nothing is an error, so a mistyped name never turns into
a silent no-op.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from qvdctl.errors import QvdError
from qvdctl.node import Node
from qvdctl.output import Output

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Request:
    """One ``qvdctl <object> <command>`` invocation."""

    obj: str
    command: str
    node: Node
    out: Output
    filters: list[tuple[str, str]]
    words: list[str]
    # The words after "--" (a command line for `vm exec`); other commands refuse them.
    after_dashes: list[str] = dataclasses.field(default_factory=list)
    # --no-wait: in a fleet, `vm start/stop` return once the commands are queued.
    no_wait: bool = False
    # --dry-run: show what would change, change nothing (only commands in DRY_RUN take it).
    dry_run: bool = False

    def args(self, *, required: Sequence[str] = (), optional: Sequence[str] = ()) -> dict[str, str]:
        """The key=value words, checked against the keys this command takes."""
        if self.after_dashes:
            raise QvdError(f"{self.obj} {self.command} takes nothing after '--'")
        values = parse_pairs(self.words, "argument")
        allowed = set(required) | set(optional)
        for key in values:
            if key not in allowed:
                raise QvdError(
                    f"unknown argument '{key}' for {self.obj} {self.command}"
                    f" (expected: {', '.join(sorted(allowed)) or 'none'})"
                )
        missing = [k for k in required if k not in values]
        if missing:
            needed = ", ".join(k + "=..." for k in missing)
            raise QvdError(f"{self.obj} {self.command} needs {needed}")
        return values

    def edits(self, keys: Sequence[str]) -> dict[str, str]:
        """The key=value words of an ``edit``: any of ``keys``, and at least one."""
        values = self.args(optional=keys)
        if not values:
            raise QvdError(f"{self.obj} {self.command} needs one of "
                           + ", ".join(k + "=..." for k in keys))
        return values

    def no_filter(self) -> None:
        if self.filters:
            raise QvdError(f"{self.obj} {self.command} takes no -f filter")

    def select(
        self, rows: Iterable[dict[str, Any]], keys: Sequence[str], *, need: bool
    ) -> list[dict[str, Any]]:
        """The rows matching every filter; ``need``: this command must be given a filter.

        Raises:
            QvdError: a filter key the object does not have, or no row matches.
        """
        if need and not self.filters:
            raise QvdError(f"{self.obj} {self.command} needs a filter, e.g. -f name=...")
        for key, _ in self.filters:
            if key not in keys:
                raise QvdError(f"cannot filter {self.obj} by '{key}' (keys: {', '.join(keys)})")
        chosen = matching(rows, self.filters)
        if self.filters and not chosen:
            shown = ",".join(f"{k}={v}" for k, v in self.filters)
            raise QvdError(f"no {self.obj} matches the filter {shown}")
        return chosen


def matching(rows: Iterable[dict[str, Any]], filters: Sequence[tuple[str, str]]
             ) -> list[dict[str, Any]]:
    """The rows whose every filtered key matches its pattern (``*`` and ``?`` wildcards).

    Patterns are matched in Python, never put into SQL: whatever a filter holds is text.
    """
    return [row for row in rows
            if all(fnmatch.fnmatchcase(_text(row.get(k)), pattern) for k, pattern in filters)]


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def parse_pairs(words: Iterable[str], what: str) -> dict[str, str]:
    """``["a=1", "b=2"]`` -> ``{"a": "1", "b": "2"}``; a word without '=' is an error."""
    pairs: dict[str, str] = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise QvdError(f"bad {what} '{word}': expected key=value")
        if key in pairs:
            raise QvdError(f"{what} '{key}' given twice")
        pairs[key] = value
    return pairs


def parse_filters(specs: Iterable[str]) -> list[tuple[str, str]]:
    """``["name=a*,user=b"]`` -> ``[("name", "a*"), ("user", "b")]``."""
    filters: list[tuple[str, str]] = []
    for spec in specs:
        filters.extend(parse_pairs([p for p in spec.split(",")], "filter").items())
    return filters


def positive_int(key: str, value: str) -> int:
    if not value.isdigit() or int(value) <= 0:
        raise QvdError(f"bad value for {key}: '{value}' is not a positive whole number")
    return int(value)
