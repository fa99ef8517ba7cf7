"""What each page of the web admin shows, read in one transaction per page.

Rows come from the same queries as the CLI's listings (``db/store.py``, ``vm list``'s
``listing``), and filters match as the CLI's ``-f`` does (``commands/base.matching``):
in Python, with ``*`` and ``?`` as wildcards, so nothing typed into a filter reaches SQL.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
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
# What a form's revision of an object covers: the settings an admin edits or acts on
# by what the page shows of them. Runtime state and the block flag are left out: the
# live feed updates those on an open page, and blocking is the same whatever it showed.
REVISED: dict[str, tuple[str, ...]] = {
    "vm": ("name", "user", "osf", "di_tag", "ip"),
    "host": ("name", "address"),
    "user": ("login",),
    "osf": ("name", "memory", "user_storage", "halt_signal"),
    "di": ("osf", "version", "path", "tags", "halt_signal"),
}
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


def revision(obj: str, row: Row) -> str:
    """A short digest of what ``REVISED[obj]`` covers of ``row``: a form names the
    object as ``id=ID:DIGEST``, and ``stale`` compares it at the POST."""
    seen = json.dumps([row[key] for key in REVISED[obj]], default=str)
    return hashlib.sha256(seen.encode()).hexdigest()[:16]


def _rows_by_id(conn: Connection, obj: str) -> dict[int, Row]:
    listed: dict[str, Callable[[Connection], list[Row]]] = {
        "vm": store.list_vms, "host": store.list_hosts, "user": store.list_users,
        "osf": store.list_osfs, "di": store.list_dis}
    return {row["id"]: row for row in listed[obj](conn)}


def stale(conn: Connection, obj: str, posted: list[str]) -> list[str]:
    """Why the form's revisions ``posted`` (``ID:DIGEST`` each) are out of date: one line
    per object changed or deleted since the page was made; empty if none is.

    An object posted without a revision is not checked (a script posting ids by hand);
    every page of the web admin sends one with each object it lists.
    """
    current = _rows_by_id(conn, obj)
    why = []
    for item in posted:
        id_, _, digest = item.partition(":")
        row = current.get(int(id_)) if id_.isdigit() else None
        if row is None:
            why.append(f"{obj} {id_} was deleted since this page was loaded")
        elif revision(obj, row) != digest:
            name = row.get("name") or row.get("login") or f"{row.get('osf')} {row.get('version')}"
            why.append(f"{obj} {name} was changed since this page was loaded")
    return why
