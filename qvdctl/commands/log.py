"""``qvdctl log list``: the audit log of every change made from the CLI and the web admin."""

from __future__ import annotations

import logging

from qvdctl import audit
from qvdctl.commands.base import Request, positive_int

log = logging.getLogger(__name__)

KEYS = ["id", "who", "origin", "action", "object", "result"]


def list_(req: Request) -> None:
    """``log list [-f who=...,action=...] [last=N]``: the changes, newest first.

    Filters: id, who, origin, action, object, result (``*`` and ``?`` as wildcards,
    e.g. ``-f action=vm*``); ``last=N`` shows only the N newest that match.
    """
    args = req.args(optional=["last"])
    last = positive_int("last", args["last"]) if "last" in args else None
    with req.node.db.reader() as conn:
        rows = req.select(audit.entries(conn), KEYS, need=False)
    req.out.table(["Id", "At", "Who", "Origin", "Action", "Object", "Args", "Result"],
                  [[r["id"], r["at"], r["who"], r["origin"], r["action"], r["object"],
                    r["args"], r["result"]] for r in rows[:last]])


COMMANDS = {"list": list_}
