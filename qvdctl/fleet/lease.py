"""Hosts' leases: a node's HKD holds one while it runs and renews it every heartbeat.

A host row's ``ok_ts`` is the time of its last renewal on the database's clock
(``db/clock.py``), written by the renewal's UPDATE itself; ``internal.hkd.cluster.node.timeout``
seconds (T) later on that same clock, any other HKD (or an admin's ``vm start``) may mark
the host ``lost`` and release its VMs as stopped, so they can start elsewhere. Node
clocks never enter the arithmetic, so they may be minutes apart.

The node itself counts its lease on its own monotonic clock, from *before* it sent the
renewal the database accepted (``valid_for``: T less a ``margin``), so its deadline is
never later than the one the others judge by. Its fence process (``fence.py``) kills the
node's containers at that deadline; the margin is the time the kill may take plus what
the two clocks may drift apart over T.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection, and_, select, update

from qvdctl.db import clock, store
from qvdctl.db.clock import db_now
from qvdctl.db.schema import hosts
from qvdctl.vm.state import release_host_vms

log = logging.getLogger(__name__)

TIMEOUT_KEY = "internal.hkd.cluster.node.timeout"
# The margin: a fence's kill takes milliseconds, but a loaded node may be slow to
# schedule the fence process, hence a whole second; the node's and the database's
# clocks tick at rates that differ by far less than 1 % (NTP slews at most 0.05 %).
MARGIN_S = 1.0
DRIFT = 0.01
# Renewals per timeout (stock).
HEARTBEATS = 5


class HostState(enum.StrEnum):
    """A host row's ``state`` (stock names)."""

    STOPPED = "stopped"
    STARTING = "starting"  # registered, reconciling; takes no commands yet
    RUNNING = "running"
    STOPPING = "stopping"
    LOST = "lost"


# States of a host whose HKD claims to be alive (and must keep renewing).
ALIVE = (HostState.STARTING, HostState.RUNNING, HostState.STOPPING)


def timeout(settings: Mapping[str, str]) -> float:
    return float(settings[TIMEOUT_KEY])


def heartbeat(settings: Mapping[str, str]) -> float:
    """How often an HKD renews its lease: a fifth of the timeout (stock: 120 s of 600)."""
    return timeout(settings) / HEARTBEATS


def margin(limit: float) -> float:
    """What a node gives up of a ``limit``-second lease, for its fence to act in time."""
    return min(limit / 2, MARGIN_S + 2 * DRIFT * limit)


def valid_for(limit: float) -> float:
    """How long a node's lease holds, counted on its own clock from sending the renewal."""
    return limit - margin(limit)


def register(conn: Connection, name: str) -> int:
    """Register (or re-register) host ``name``, ``starting`` with a fresh lease; its id."""
    host_id = store.ensure_host(conn, name)
    conn.execute(update(hosts).where(hosts.c.id == host_id)
                 .values(state=HostState.STARTING.value, ok_ts=db_now()))
    return host_id


def set_state(conn: Connection, host_id: int, state: HostState) -> None:
    conn.execute(update(hosts).where(hosts.c.id == host_id).values(state=state.value))


def renew(conn: Connection, host_id: int) -> bool:
    """Renew host ``host_id``'s lease; False if it is no longer alive (it was marked lost)."""
    stmt = (update(hosts)
            .where(and_(hosts.c.id == host_id, hosts.c.state.in_([s.value for s in ALIVE])))
            .values(ok_ts=db_now()))
    return conn.execute(stmt).rowcount == 1


def mark_expired_lost(conn: Connection, me: int | None, limit: float) -> list[str]:
    """Mark every other alive host silent for more than ``limit`` s ``lost``; release its VMs.

    ``me`` is the caller's host (None: an admin's CLI, on no host). Returns the names of
    the hosts marked. The UPDATE is conditional on the lease seen, so of several HKDs
    finding one host expired, one marks it.
    """
    now = clock.read(conn)
    query = select(hosts.c.id, hosts.c.name, hosts.c.ok_ts).where(and_(
        hosts.c.state.in_([s.value for s in ALIVE]), hosts.c.ok_ts < db_now() - limit
    ))
    if me is not None:
        query = query.where(hosts.c.id != me)
    expired = conn.execute(query).all()
    marked = []
    for host_id, name, ok_ts in expired:
        stmt = (update(hosts).where(and_(hosts.c.id == host_id, hosts.c.ok_ts == ok_ts))
                .values(state=HostState.LOST.value))
        if conn.execute(stmt).rowcount == 1:
            released = release_host_vms(conn, host_id, f"host {name} was lost")
            log.warning("host %s: no heartbeat for %.1f s; marked lost, %d VMs released",
                        name, now - ok_ts, released)
            marked.append(name)
    return marked


def shown_state(row: Mapping[str, Any], limit: float, now: float) -> str:
    """A host's state as ``host list`` shows it: an alive host whose lease expired is lost.

    ``now`` is the database's time (``clock.read``), like the row's ``ok_ts``.
    """
    if row["state"] in ALIVE and (row["ok_ts"] is None or now - row["ok_ts"] > limit):
        return HostState.LOST.value
    return str(row["state"])



def expires_in(row: Mapping[str, Any], limit: float, now: float) -> float:
    """Seconds (database time ``now``) until alive host ``row`` may be marked lost."""
    return float(row["ok_ts"]) + limit - now if row["ok_ts"] is not None else 0.0


def silent(row: Mapping[str, Any], limit: float, now: float) -> bool:
    """Whether alive host ``row`` has missed a renewal (its lease is older than two
    heartbeats, database time ``now``): its VMs may soon be, or already be, fenced."""
    return row["state"] in ALIVE and (
        row["ok_ts"] is None or now - row["ok_ts"] > 2 * limit / HEARTBEATS)
