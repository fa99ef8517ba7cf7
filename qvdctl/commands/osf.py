"""``qvdctl osf add/list/del``: OS flavours, the hardware profile of a group of VMs."""

from __future__ import annotations

import logging

from qvdctl.commands.base import Request, positive_int
from qvdctl.db import store
from qvdctl.errors import QvdError

log = logging.getLogger(__name__)

KEYS = ["id", "name", "memory", "user_storage"]


def add(req: Request) -> None:
    """``osf add name=N [memory=MiB] [user_storage=MiB]``."""
    req.no_filter()
    args = req.args(required=["name"], optional=["memory", "user_storage"])
    name = check_name(args["name"], "OSF")
    memory = positive_int("memory", args.get("memory", "256"))
    user_storage = args.get("user_storage", "0")
    if not user_storage.isdigit():
        raise QvdError(f"bad value for user_storage: '{user_storage}' is not a whole number")
    with req.node.db.writer() as conn:
        osf_id = store.add_osf(conn, name, memory, int(user_storage))
    req.out.message(f"OSF added with id {osf_id}", id=osf_id)


def list_(req: Request) -> None:
    """``osf list [-f ...]``: the OS flavours with their memory and user storage (MiB)."""
    req.args()
    with req.node.db.reader() as conn:
        rows = req.select(store.list_osfs(conn), KEYS, need=False)
    req.out.table(
        ["Id", "Name", "Memory", "UserStorage"],
        [[r["id"], r["name"], r["memory"], r["user_storage"]] for r in rows],
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


COMMANDS = {"add": add, "list": list_, "del": del_}
