"""The command queue: a VM's row carries the command queued for its host (SPEC §6).

    admin CLI  queue_start / queue_stop    vm_cmd = start | stop, host_id = the host
    HKD        claim                       vm_cmd: start | stop -> busy (conditional)
    HKD        finish                      vm_cmd: busy -> NULL, error = the failure

Every step is one conditional UPDATE, so two admins starting one VM queue it once,
and two threads (or HKDs) seeing one command claim it once: no command runs twice.
The HKD then runs today's ``start_vm`` / ``stop_vm``, which move the VM's state
through ``change_state`` as in a single node. ``cmd_at`` records when a command was
queued, on the database's clock (``db/clock.py``), and ``claim`` returns how long it
waited on that same clock: the HKD logs it (the benchmark's pickup latency), right
whatever the admin's and the node's own clocks say.
"""

from __future__ import annotations

import enum
import logging
from typing import NamedTuple

from sqlalchemy import ColumnElement, Connection, and_, or_, select, update

from qvdctl.db.clock import db_now
from qvdctl.db.schema import vms
from qvdctl.db.states import VmState

log = logging.getLogger(__name__)


class Cmd(enum.StrEnum):
    """A VM row's ``vm_cmd`` (stock values)."""

    START = "start"
    STOP = "stop"
    BUSY = "busy"  # claimed: the host's HKD is at work on it


# States a stop may be queued from (a stop of a start in progress runs after it).
STOPPABLE = (VmState.RUNNING, VmState.ZOMBIE, VmState.STARTING, VmState.STOPPING,
             VmState.DEBUGGING)


def queue_start(conn: Connection, vm_id: int, host_id: int, *, zombie: bool = False) -> bool:
    """Queue a start of stopped VM ``vm_id`` on ``host_id``; False if it is not free to start.

    A ``zombie`` is started by the host it is left on (its start cleans it up first).
    """
    state = VmState.ZOMBIE if zombie else VmState.STOPPED
    where = and_(vms.c.id == vm_id, vms.c.state == state.value, vms.c.vm_cmd.is_(None))
    if zombie:
        where = and_(where, vms.c.host_id == host_id)
    stmt = update(vms).where(where).values(
        host_id=host_id, vm_cmd=Cmd.START.value, cmd_at=db_now(), error=None
    )
    return conn.execute(stmt).rowcount == 1


def queue_stop(conn: Connection, vm_id: int) -> bool:
    """Queue a stop of VM ``vm_id`` for its host; False if it has nothing to stop."""
    stmt = update(vms).where(and_(
        vms.c.id == vm_id,
        vms.c.host_id.is_not(None),
        vms.c.state.in_([s.value for s in STOPPABLE]),
        or_(vms.c.vm_cmd.is_(None), vms.c.vm_cmd == Cmd.BUSY.value),
    )).values(vm_cmd=Cmd.STOP.value, cmd_at=db_now(), error=None)
    return conn.execute(stmt).rowcount == 1


def cancel_start(conn: Connection, vm_id: int) -> bool:
    """Take back a start no HKD has claimed yet; False if one has."""
    return _unqueue_starts(conn, vms.c.id == vm_id, None) == 1


def _unqueue_starts(conn: Connection, which: ColumnElement[bool], why: str | None) -> int:
    stmt = update(vms).where(and_(
        which, vms.c.vm_cmd == Cmd.START.value, vms.c.state == VmState.STOPPED.value
    )).values(vm_cmd=None, host_id=None, error=why)
    return conn.execute(stmt).rowcount


class Pending(NamedTuple):
    """A command queued for a host."""

    vm_id: int
    name: str
    cmd: Cmd


def pending(conn: Connection, host_id: int) -> list[Pending]:
    """The commands queued for ``host_id``, oldest first."""
    stmt = (
        select(vms.c.id, vms.c.name, vms.c.vm_cmd)
        .where(and_(vms.c.host_id == host_id,
                    vms.c.vm_cmd.in_([Cmd.START.value, Cmd.STOP.value])))
        .order_by(vms.c.cmd_at, vms.c.id)
    )
    return [Pending(vm_id, name, Cmd(cmd)) for vm_id, name, cmd in conn.execute(stmt)]


def claim(conn: Connection, host_id: int, vm_id: int, cmd: Cmd) -> float | None:
    """Claim command ``cmd`` of VM ``vm_id`` for ``host_id``: for exactly one claimer, the
    seconds it waited since it was queued (the database's clock); None for the others."""
    stmt = update(vms).where(and_(
        vms.c.id == vm_id, vms.c.host_id == host_id, vms.c.vm_cmd == cmd.value
    )).values(vm_cmd=Cmd.BUSY.value).returning(db_now() - vms.c.cmd_at)
    row = conn.execute(stmt).first()
    if row is None:
        return None
    return float(row[0]) if row[0] is not None else 0.0


def finish(conn: Connection, vm_id: int, error: str | None, *, drop_queued: bool = False) -> None:
    """The claimed command of ``vm_id`` is done; ``error`` is its failure's one line, if any.

    A stop queued while it ran (``vm_cmd`` no longer busy) stays queued, unless
    ``drop_queued`` (the HKD stopped the VM anyway, leaving).
    """
    conn.execute(update(vms).where(vms.c.id == vm_id).values(error=error))
    which = vms.c.id == vm_id
    if not drop_queued:
        which = and_(which, vms.c.vm_cmd == Cmd.BUSY.value)
    conn.execute(update(vms).where(which).values(vm_cmd=None))


def forget_claims(conn: Connection, host_id: int) -> int:
    """Drop the claims a crashed HKD of ``host_id`` left; its reconcile cleans up the VMs."""
    stmt = (update(vms).where(and_(vms.c.host_id == host_id, vms.c.vm_cmd == Cmd.BUSY.value))
            .values(vm_cmd=None))
    return conn.execute(stmt).rowcount


def release_queued_starts(conn: Connection, host_id: int, why: str) -> int:
    """Give back every start queued for ``host_id`` and not claimed (its HKD is leaving)."""
    return _unqueue_starts(conn, vms.c.host_id == host_id, why)
