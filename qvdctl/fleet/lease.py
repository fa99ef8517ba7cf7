"""Hosts' leases: a node's HKD holds one while it runs and renews it every heartbeat.

A host row's ``ok_ts`` is the time of its last renewal; ``internal.hkd.cluster.node.timeout``
seconds without one and any other HKD marks the host ``lost`` and releases its VMs
as stopped, so they can start elsewhere. Before that can happen, a node that cannot
renew stops its own VMs (``hkd.py`` fences itself at half the timeout), so a VM never
runs on two nodes.

Times are seconds since the epoch, taken from each node's clock: nodes of a fleet keep
NTP time, as stock QVD assumes; the timeout is minutes, skew is milliseconds.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection, and_, select, update

from qvdctl.db import store
from qvdctl.db.schema import hosts
from qvdctl.vm.state import release_host_vms

log = logging.getLogger(__name__)

TIMEOUT_KEY = "internal.hkd.cluster.node.timeout"


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
    return timeout(settings) / 5


def register(conn: Connection, name: str) -> int:
    """Register (or re-register) host ``name``, ``starting`` with a fresh lease; its id."""
    host_id = store.ensure_host(conn, name)
    conn.execute(update(hosts).where(hosts.c.id == host_id)
                 .values(state=HostState.STARTING.value, ok_ts=time.time()))
    return host_id


def set_state(conn: Connection, host_id: int, state: HostState) -> None:
    conn.execute(update(hosts).where(hosts.c.id == host_id).values(state=state.value))


def renew(conn: Connection, host_id: int) -> bool:
    """Renew host ``host_id``'s lease; False if it is no longer alive (it was marked lost)."""
    stmt = (update(hosts)
            .where(and_(hosts.c.id == host_id, hosts.c.state.in_([s.value for s in ALIVE])))
            .values(ok_ts=time.time()))
    return conn.execute(stmt).rowcount == 1


def mark_expired_lost(conn: Connection, me: int, limit: float) -> list[str]:
    """Mark every other alive host silent for more than ``limit`` s ``lost``; release its VMs.

    Returns the names of the hosts marked. The UPDATE is conditional on the lease
    seen, so of several HKDs finding one host expired, one marks it.
    """
    deadline = time.time() - limit
    expired = conn.execute(
        select(hosts.c.id, hosts.c.name, hosts.c.ok_ts).where(and_(
            hosts.c.id != me,
            hosts.c.state.in_([s.value for s in ALIVE]),
            hosts.c.ok_ts < deadline,
        ))
    ).all()
    marked = []
    for host_id, name, ok_ts in expired:
        stmt = (update(hosts).where(and_(hosts.c.id == host_id, hosts.c.ok_ts == ok_ts))
                .values(state=HostState.LOST.value))
        if conn.execute(stmt).rowcount == 1:
            released = release_host_vms(conn, host_id, f"host {name} was lost")
            log.warning("host %s: no heartbeat for %.0f s; marked lost, %d VMs released",
                        name, time.time() - ok_ts, released)
            marked.append(name)
    return marked


def shown_state(row: Mapping[str, Any], limit: float, now: float) -> str:
    """A host's state as ``host list`` shows it: an alive host whose lease expired is lost."""
    if row["state"] in ALIVE and (row["ok_ts"] is None or now - row["ok_ts"] > limit):
        return HostState.LOST.value
    return str(row["state"])

