"""Which host a VM starts on: the least loaded running, unblocked host with a fresh lease.

Load is the number of VMs a host runs (``store.list_hosts``) plus those placed on it by
the same command, so ``vm start -f name=*`` spreads a batch evenly; ties go to a random
host, so many admins starting at once do not all pick the first. (Stock QVD weighs free
RAM and CPU too; our nodes do not report them.)
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection

from qvdctl.db import clock, store
from qvdctl.errors import QvdError
from qvdctl.fleet.lease import HostState, shown_state, silent


class Placer:
    """Places the VMs of one command, counting each placement in the hosts' load."""

    def __init__(self, conn: Connection, limit: float) -> None:
        self.limit, self.now = limit, clock.read(conn)
        self.hosts = {row["name"]: row for row in store.list_hosts(conn)}
        self.hosts_by_id = {row["id"]: name for name, row in self.hosts.items()}
        # A host that has missed a renewal may be paused or cut off: nothing new goes there.
        self.live = {
            name: row for name, row in self.hosts.items()
            if self.shown(row) == HostState.RUNNING and not row["blocked"]
            and not silent(row, limit, self.now)
        }
        self.load = {name: row["vms"] for name, row in self.live.items()}

    def shown(self, row: Mapping[str, Any]) -> str:
        return shown_state(row, self.limit, self.now)

    def place(self, pin: str | None = None) -> Mapping[str, Any]:
        """The host row the next VM goes to (``pin``: that host, which must be live).

        Raises:
            QvdError: no live host (or the pinned one is unknown, blocked or not running).
        """
        if pin is not None:
            if pin not in self.hosts:
                raise QvdError(f"no host named '{pin}'")
            if pin not in self.live:
                row = self.hosts[pin]
                if row["blocked"]:
                    why = "blocked"
                elif self.shown(row) != HostState.RUNNING:
                    why = f"not running (it is {self.shown(row)})"
                else:
                    why = f"silent: its lease was last renewed {self.now - row['ok_ts']:.1f} s ago"
                raise QvdError(f"host {pin} is {why}")
            name = pin
        else:
            if not self.live:
                raise QvdError("no running, unblocked host to start VMs on (see host list)")
            least = min(self.load.values())
            name = random.choice([n for n, load in self.load.items() if load == least])
        self.load[name] += 1
        return self.live[name]
