"""``qvdctl osf add/edit/list/del``: OS flavours, the hardware profile of a group of VMs."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection

from qvdctl.commands.base import Request, positive_int
from qvdctl.db import store
from qvdctl.db.store import Row
from qvdctl.errors import QvdError
from qvdctl.images.halt import check_signal
from qvdctl.node import Node

log = logging.getLogger(__name__)

KEYS = ["id", "name", "memory", "user_storage", "halt_signal"]
EDITABLE = ["name", "memory", "user_storage", "halt_signal"]


def add(req: Request) -> None:
    """``osf add name=N [memory=MiB] [user_storage=MiB] [halt_signal=SIG]``: a new OS flavour.

    ``halt_signal`` stops the VMs of every image of the flavour whose DI sets none
    (``images/halt.py``).
    """
    req.no_filter()
    osf_id = add_osf(req.node, req.args(required=["name"], optional=EDITABLE[1:]))
    req.out.message(f"OSF added with id {osf_id}", id=osf_id)


def add_osf(node: Node, args: Mapping[str, str]) -> int:
    """What ``osf add`` does with its checked words (the web admin's form too): the new
    OSF's id. Keys left out take their defaults (256 MiB, unlimited, no halt signal)."""
    name = check_name(args.get("name", ""), "OSF")
    memory = positive_int("memory", args.get("memory", "256"))
    user_storage = _whole("user_storage", args.get("user_storage", "0"))
    halt_signal = check_halt_signal(args.get("halt_signal", "")) or None
    with node.db.writer() as conn:
        return store.add_osf(conn, name, memory, user_storage, halt_signal)


def edit(req: Request) -> None:
    """``osf edit -f ... [name=N] [memory=MiB] [user_storage=MiB] [halt_signal=SIG]``: change OSFs.

    A running VM keeps what it started with: memory and halt_signal apply at its next
    start. ``halt_signal=`` (empty) drops the override. A rename must pick one OSF.
    """
    values = edit_values(req.edits(EDITABLE))
    with req.node.db.writer() as conn:
        rows = req.select(store.list_osfs(conn), KEYS, need=True)
        edit_osfs(conn, rows, values)
    for row in rows:
        req.out.message(f"OSF {values.get('name', row['name'])} edited", id=row["id"])


def edit_values(args: Mapping[str, str]) -> dict[str, Any]:
    """The columns an ``osf edit`` with the words ``args`` (any of ``EDITABLE``) sets."""
    values: dict[str, Any] = {}
    if "name" in args:
        values["name"] = check_name(args["name"], "OSF")
    if "memory" in args:
        values["memory"] = positive_int("memory", args["memory"])
    if "user_storage" in args:
        values["user_storage"] = _whole("user_storage", args["user_storage"])
    if "halt_signal" in args:
        values["halt_signal"] = check_halt_signal(args["halt_signal"]) or None
    return values


def edit_osfs(conn: Connection, rows: list[Row], values: dict[str, Any]) -> None:
    """Set ``values`` (``edit_values``) on the OSFs ``rows``; a rename takes exactly one."""
    if "name" in values and len(rows) != 1:
        raise QvdError(f"the filter matches {len(rows)} OSFs; a rename needs exactly one")
    for row in rows:
        store.edit_osf(conn, row, values)


def list_(req: Request) -> None:
    """``osf list [-f ...]``: the OS flavours with their memory and user storage (MiB)."""
    req.args()
    with req.node.db.reader() as conn:
        rows = req.select(store.list_osfs(conn), KEYS, need=False)
    req.out.table(
        ["Id", "Name", "Memory", "UserStorage", "HaltSignal"],
        [[r["id"], r["name"], r["memory"], r["user_storage"], r["halt_signal"]] for r in rows],
    )


def del_(req: Request) -> None:
    """``osf del -f ...``: only OSFs without disk images or VMs."""
    req.args()
    with req.node.db.writer() as conn:
        rows = req.select(store.list_osfs(conn), KEYS, need=True)
        for row in rows:
            store.del_osf(conn, row)
    for row in rows:
        req.out.message(f"OSF {row['name']} deleted", id=row["id"])


def check_name(name: str, what: str) -> str:
    """A name an admin can type and filter on: printable, no spaces or wildcards."""
    if not name or len(name) > 200 or any(c.isspace() or c in "*?,=" for c in name):
        raise QvdError(f"bad {what} name '{name}': no spaces, '*', '?', ',' or '='")
    return name


def check_halt_signal(text: str) -> str:
    """A ``halt_signal=`` value (an OSF's or a DI's) upper-cased; empty stays empty."""
    if not text:
        return text
    try:
        return check_signal(text)
    except ValueError as exc:
        raise QvdError(f"bad halt_signal: {exc}") from None


def _whole(key: str, value: str) -> int:
    if not value.isdigit():
        raise QvdError(f"bad value for {key}: '{value}' is not a whole number")
    return int(value)


COMMANDS = {"add": add, "edit": edit, "list": list_, "del": del_}
