"""The admin side of ``vm start`` / ``vm stop`` against a fleet: queue, notify, wait.

One writer transaction places every VM (``placement.py``) and queues its command
(``commands.py``); the hosts' HKDs are notified when it commits. Then, unless told
not to, the admin's process watches the rows until every command has ended (the
HKD clears ``vm_cmd``): running or stopped is a success, anything else a failure
whose one line the HKD wrote in ``error``. A host that dies meanwhile releases its
VMs when it is marked lost, which ends the wait too.

A VM still recorded on a host that has stopped renewing its lease (its HKD died, hangs,
or lost the database) is started elsewhere exactly when that lease expires on the
database's clock: until then its node's fence may not have killed it yet. ``start`` says
so and waits that long (``--no-wait``: refuses, saying how long), then marks the host
lost itself rather than wait for another HKD's next heartbeat to notice.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, select

from qvdctl.db import clock
from qvdctl.db.notify import notify, vm_commands
from qvdctl.db.schema import hosts, vms
from qvdctl.errors import QvdError
from qvdctl.fleet import commands, lease
from qvdctl.fleet.commands import Cmd
from qvdctl.fleet.placement import Placer
from qvdctl.node import Node
from qvdctl.db.states import VmState
from qvdctl.vm.state import Vm

log = logging.getLogger(__name__)

WAIT_POLL_S = 0.05


@dataclasses.dataclass
class Outcome:
    """One VM's command: where it went and, once known, how it ended."""

    vm: Vm
    host: str | None = None
    error: QvdError | None = None
    done: bool = False


def start(node: Node, vms: list[Vm], *, pin: str | None, wait: bool,
          say: Callable[[str], None] = log.info) -> list[Outcome]:
    """Queue a start of each VM on a live host and (with ``wait``) see them end.

    ``say`` is told why the start waits, if it must (a silent host's lease).

    Raises:
        QvdError: there is no live host (or the pinned one is not); nothing was queued.
    """
    limit = lease.timeout(node.settings())
    outcomes = [Outcome(vm) for vm in vms]
    while held := _queue_starts(
        node, [o for o in outcomes if o.error is None and o.host is None], pin, limit, wait
    ):
        soonest = min(left for left, _ in held.values())
        for host, (left, names) in sorted(held.items()):
            say(f"waiting {left:.1f} s for host {host}'s lease to expire"
                f" ({', '.join(names)} ran there)")
        time.sleep(max(soonest, WAIT_POLL_S))
    for outcome in outcomes:
        outcome.done = outcome.error is not None
    if wait:
        _wait(node, outcomes, lambda row: row["state"] == VmState.RUNNING)
    return outcomes


def _queue_starts(node: Node, outcomes: list[Outcome], pin: str | None, limit: float,
                  wait: bool) -> dict[str, tuple[float, list[str]]]:
    """Queue what can start now; host -> (seconds until its lease expires, VM names) for the
    VMs that must wait for a silent host (left neither queued nor failed)."""
    held: dict[str, tuple[float, list[str]]] = {}
    with node.db.writer() as conn:
        lease.mark_expired_lost(conn, None, limit)
        now = clock.read(conn)
        placer = Placer(conn, limit)
        rows = _rows(conn, [o.vm.id for o in outcomes])
        notified = set()
        for outcome in outcomes:
            vm, row = outcome.vm, rows[outcome.vm.id]
            holder = placer.hosts_by_id.get(row["host_id"])
            if row["vm_cmd"] is not None:
                outcome.error = QvdError(f"VM '{vm.name}' is already queued to {row['vm_cmd']}"
                                         f" on host {holder or '?'}")
            elif row["state"] == VmState.ZOMBIE:
                # Its leftovers are on its host: that one cleans up and starts it.
                if holder is None:
                    outcome.error = QvdError(f"VM '{vm.name}' is a zombie of no known host")
                    continue
                try:
                    host = placer.place(pin=holder)
                except QvdError as exc:
                    outcome.error = QvdError(f"VM '{vm.name}' is a zombie on host {holder}: {exc}")
                    continue
                commands.queue_start(conn, vm.id, host["id"], zombie=True)
                outcome.host = holder
            elif row["state"] != VmState.STOPPED:
                host_row = placer.hosts.get(holder or "")
                if host_row is not None and lease.silent(host_row, limit, now):
                    left = lease.expires_in(host_row, limit, now)
                    if wait:
                        held.setdefault(holder or "", (left, []))[1].append(vm.name)
                        continue
                    outcome.error = QvdError(
                        f"VM '{vm.name}' is {row['state']} on host {holder}, which stopped"
                        f" renewing its lease: it may start elsewhere in {left:.1f} s")
                else:
                    where = f" on host {holder}" if holder else ""
                    outcome.error = QvdError(f"VM '{vm.name}' is {row['state']}{where},"
                                             " not stopped")
            else:
                host = placer.place(pin)
                commands.queue_start(conn, vm.id, host["id"])
                outcome.host = host["name"]
            if outcome.host is not None and outcome.host not in notified:
                notify(conn, vm_commands(placer.hosts[outcome.host]["id"]))
                notified.add(outcome.host)
    return held


def stop(node: Node, vms: list[Vm], *, wait: bool) -> list[Outcome]:
    """Queue a stop of each VM for its host and (with ``wait``) see them end."""
    outcomes = [Outcome(vm) for vm in vms]
    with node.db.writer() as conn:
        rows = _rows(conn, [vm.id for vm in vms])
        names = dict(conn.execute(select(hosts.c.id, hosts.c.name)).all())
        notified = set()
        for outcome in outcomes:
            vm, row = outcome.vm, rows[outcome.vm.id]
            outcome.host = names.get(row["host_id"])
            if commands.cancel_start(conn, vm.id):
                outcome.done = True  # no HKD had taken it: nothing ever ran
            elif commands.queue_stop(conn, vm.id):
                if row["host_id"] not in notified:
                    notify(conn, vm_commands(row["host_id"]))
                    notified.add(row["host_id"])
            else:
                why = f"already queued to {row['vm_cmd']}" if row["vm_cmd"] else row["state"]
                outcome.error = QvdError(f"VM '{vm.name}' is {why}; there is nothing to stop")
                outcome.done = True
    if wait:
        _wait(node, outcomes, lambda row: row["state"] == VmState.STOPPED)
    return outcomes


def _rows(conn: Connection, ids: list[int]) -> dict[int, dict[str, Any]]:
    stmt = select(vms.c.id, vms.c.state, vms.c.vm_cmd, vms.c.host_id, vms.c.error).where(
        vms.c.id.in_(ids)
    )
    return {row.id: dict(row._mapping) for row in conn.execute(stmt)}


def _wait(
    node: Node, outcomes: list[Outcome], success: Callable[[dict[str, Any]], bool]
) -> None:
    """Watch the rows until every queued command has ended."""
    while pending := [o for o in outcomes if not o.done]:
        time.sleep(WAIT_POLL_S)
        with node.db.reader() as conn:
            rows = _rows(conn, [o.vm.id for o in pending])
        for outcome in pending:
            row = rows.get(outcome.vm.id)
            if row is None:
                outcome.error, outcome.done = QvdError(f"VM '{outcome.vm.name}' is gone"), True
            elif row["vm_cmd"] not in (Cmd.START, Cmd.STOP, Cmd.BUSY) or (
                success(row) and row["vm_cmd"] != Cmd.BUSY
            ):
                outcome.done = True
                if not success(row):
                    outcome.error = QvdError(
                        row["error"] or f"VM '{outcome.vm.name}' is {row['state']}"
                    )
