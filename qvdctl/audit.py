"""The audit log: one row per change made from the CLI or the web admin.

A row says when, who (a web admin's login, or the user who ran qvdctl), from where
(the browser's address, or ``cli@<host>``), the action (``vm start``), the object
(the filter or the names it acted on), the arguments with every secret replaced by
``***``, and the result (``ok`` or the error line). Reads (``list``, ``get``) and
commands that only attach to a VM (``console``, ``exec``) are not changes.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
from collections.abc import Iterable

from sqlalchemy import Connection, insert, select

from qvdctl.db import store
from qvdctl.db.engine import Database
from qvdctl.db.schema import audit_log
from qvdctl.errors import QvdError

log = logging.getLogger(__name__)

# Commands that change nothing in the database, so they leave no row.
NOT_CHANGES = frozenset({"list", "get", "console", "exec"})
# A key=value word whose key ends with one of these shows as key=*** (password=,
# database.password=, ...).
SECRETS = ("password", "secret")
OK = "ok"


def shown_args(words: Iterable[str]) -> str:
    """``key=value`` words as one line, each secret's value replaced by ``***``."""
    shown = []
    for word in words:
        key, sep, _ = word.partition("=")
        shown.append(f"{key}=***" if sep and key.lower().endswith(SECRETS) else word)
    return " ".join(shown)


def record(db: Database, *, who: str, origin: str, action: str, obj: str, args: str,
           result: str) -> None:
    """Append one row, in its own transaction (the change itself committed or failed)."""
    with db.writer() as conn:
        conn.execute(insert(audit_log).values(
            at=store.now(), who=who, origin=origin, action=action, object=obj, args=args,
            result=result,
        ))


def record_cli(db: Database, action: str, obj: str, words: Iterable[str], result: str) -> None:
    """Record a CLI command; a database that cannot take the row costs a warning only.

    The command already ran (or failed, maybe because of that very database), and
    its own outcome is what the admin must see.
    """
    who = os.environ.get("SUDO_USER") or getpass.getuser()
    try:
        record(db, who=who, origin=f"cli@{socket.gethostname()}", action=action, obj=obj,
               args=shown_args(words), result=result)
    except QvdError as exc:
        log.warning("the audit log did not get this command: %s", exc)


def entries(conn: Connection, limit: int | None = None) -> list[store.Row]:
    """The rows, newest first (``limit``: only that many)."""
    stmt = select(audit_log).order_by(audit_log.c.id.desc())
    if limit is not None:
        stmt = stmt.limit(limit)
    return [dict(r._mapping) for r in conn.execute(stmt)]
