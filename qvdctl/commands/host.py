"""``qvdctl host add/list/block/unblock``: the nodes that run VMs.

A node registers itself on its first VM start, or when its HKD starts (a fleet).
``host list`` shows each HKD's lease: its state (an alive host whose lease ran out
shows ``lost`` even before another HKD marks it so), and the lease's age in seconds.
A blocked host keeps its VMs but gets no new ones.
"""

from __future__ import annotations

import ipaddress
import logging
import re

from qvdctl.commands.base import Request
from qvdctl.db import clock, store
from qvdctl.errors import QvdError
from qvdctl.fleet import lease

log = logging.getLogger(__name__)

KEYS = ["id", "name", "address"]


def add(req: Request) -> None:
    """``host add name=N address=IP``: register a node of the fleet."""
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
    """``host list [-f ...]``: the nodes, their leases' state and age, their running VMs."""
    req.args()
    this = req.node.name()
    limit = lease.timeout(req.node.settings())
    with req.node.db.reader() as conn:
        now = clock.read(conn)  # the leases' clock, not this machine's
        rows = req.select(store.list_hosts(conn), KEYS, need=False)
    req.out.table(
        ["Id", "Name", "Address", "State", "LeaseAge", "RunningVMs", "Blocked", "ThisNode"],
        [[r["id"], r["name"], r["address"], lease.shown_state(r, limit, now),
          None if r["ok_ts"] is None else round(now - r["ok_ts"], 1), r["vms"], r["blocked"],
          int(r["name"] == this)] for r in rows],
    )


def _set_blocked(req: Request, blocked: int) -> None:
    req.args()
    with req.node.db.writer() as conn:
        rows = req.select(store.list_hosts(conn), KEYS, need=True)
        for row in rows:
            store.set_host_blocked(conn, row["id"], blocked)
    for row in rows:
        req.out.message(f"Host {row['name']} {'blocked' if blocked else 'unblocked'}",
                        id=row["id"])


def block(req: Request) -> None:
    """``host block -f name=...``: no new VMs on these hosts."""
    _set_blocked(req, 1)


def unblock(req: Request) -> None:
    """``host unblock -f name=...``: these hosts get new VMs again."""
    _set_blocked(req, 0)


COMMANDS = {"add": add, "list": list_, "block": block, "unblock": unblock}
