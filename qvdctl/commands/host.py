"""``qvdctl host add/list``: the nodes that run VMs (this one registers itself on first start)."""

from __future__ import annotations

import ipaddress
import logging
import re

from qvdctl.commands.base import Request
from qvdctl.db import store
from qvdctl.errors import QvdError

log = logging.getLogger(__name__)

KEYS = ["id", "name", "address"]


def add(req: Request) -> None:
    """``host add name=N address=IP``."""
    req.no_filter()
    args = req.args(required=["name", "address"])
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}", args["name"]):
        raise QvdError(f"bad host name '{args['name']}'")
    try:
        address = str(ipaddress.ip_address(args["address"]))
    except ValueError:
        raise QvdError(f"bad address '{args['address']}': not an IP address") from None
    with req.node.db.writer() as conn:
        host_id = store.add_host(conn, args["name"], address)
    req.out.message(f"Host added with id {host_id}", id=host_id)


def list_(req: Request) -> None:
    req.args()
    this = req.node.name()
    with req.node.db.reader() as conn:
        rows = req.select(store.list_hosts(conn), KEYS, need=False)
    req.out.table(
        ["Id", "Name", "Address", "RunningVMs", "ThisNode"],
        [[r["id"], r["name"], r["address"], r["vms"], int(r["name"] == this)] for r in rows],
    )


COMMANDS = {"add": add, "list": list_}
