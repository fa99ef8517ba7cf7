"""What each page of the web admin shows, read in one transaction per page.

Rows come from the same queries as the CLI's listings (``db/store.py``, ``vm list``'s
``listing``), and filters match as the CLI's ``-f`` does (``commands/base.matching``):
in Python, with ``*`` and ``?`` as wildcards, so nothing typed into a filter reaches SQL.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection, func, select

from qvdctl import audit
from qvdctl.commands.base import matching
from qvdctl.commands.vm import listing
from qvdctl.db import store
from qvdctl.db.schema import dis, hosts, osfs, users, vms
from qvdctl.db.states import VmState
from qvdctl.db.store import Row
from qvdctl.fleet import lease

VM_FILTERS = ("name", "state", "host", "user", "osf")
LOG_FILTERS = ("who", "action", "object", "result")
LOG_ROWS = 500


def filters_of(query: Mapping[str, str], keys: tuple[str, ...]) -> list[tuple[str, str]]:
    """The filters a page's query string gives, as ``(key, pattern)``; empty ones dropped."""
    return [(key, query[key]) for key in keys if query.get(key)]


def host_rows(conn: Connection, settings: Mapping[str, str]) -> list[Row]:
    """The hosts as ``host list`` shows them: the lease's state and age in seconds."""
    limit, now = lease.timeout(settings), time.time()
    rows = store.list_hosts(conn)
    for row in rows:
        row["shown_state"] = lease.shown_state(row, limit, now)
        row["lease_age"] = None if row["ok_ts"] is None else round(now - row["ok_ts"], 1)
    return rows


def dashboard(conn: Connection, settings: Mapping[str, str]) -> dict[str, Any]:
    def count(table: Any, *where: Any) -> int:
        return int(conn.execute(select(func.count()).select_from(table).where(*where))
                   .scalar_one())

    by_state: dict[str, int] = dict(
        conn.execute(select(vms.c.state, func.count()).group_by(vms.c.state)).tuples().all())
    return {
        "counts": {
            "VMs": count(vms), "users": count(users), "hosts": count(hosts),
            "OSFs": count(osfs), "DIs": count(dis),
            "blocked VMs": count(vms, vms.c.blocked != 0),
            "blocked users": count(users, users.c.blocked != 0),
            "blocked hosts": count(hosts, hosts.c.blocked != 0),
        },
        "by_state": {state.value: by_state.get(state.value, 0) for state in VmState},
        "hosts": host_rows(conn, settings),
    }


def vm_list(conn: Connection, filters: list[tuple[str, str]]) -> list[Row]:
    return matching(listing(conn), filters)


def vm_states(conn: Connection) -> list[dict[str, Any]]:
    """What a live VMs page updates, for every VM: a few ms for 1,000 (``live.py``)."""
    stmt = (select(vms.c.id, vms.c.state, vms.c.blocked, vms.c.user_state, vms.c.error,
                   hosts.c.name.label("host"))
            .outerjoin(hosts, hosts.c.id == vms.c.host_id).order_by(vms.c.id))
    return [dict(r._mapping) for r in conn.execute(stmt)]


def user_rows(conn: Connection) -> list[Row]:
    counts: dict[int, int] = dict(
        conn.execute(select(vms.c.user_id, func.count()).group_by(vms.c.user_id)).tuples().all())
    rows = store.list_users(conn)
    for row in rows:
        row["vms"] = counts.get(row["id"], 0)
        del row["password"]  # a hash, but still nothing a page needs
    return rows


def images(conn: Connection) -> dict[str, list[Row]]:
    return {"osfs": store.list_osfs(conn), "dis": store.list_dis(conn)}


def config_rows(conn: Connection, settings: Mapping[str, str]) -> list[Row]:
    """Every setting in effect, as ``config get`` shows it, and whether it was set."""
    stored = store.get_settings(conn)
    return [{"key": key, "value": value, "set": key in stored} for key, value in settings.items()]


def log_rows(conn: Connection, filters: list[tuple[str, str]]) -> list[Row]:
    return matching(audit.entries(conn, LOG_ROWS), filters)
