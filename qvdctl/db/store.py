"""Data access: every query qvdctl runs, as small functions over a Connection.

Callers open the transaction (``Database.writer()`` / ``reader()``) and pass
its connection in, so one command's reads and writes are atomic together.
Rows come back as plain dicts. Constraint violations become ``QvdError``
naming what clashed; checks done here in Python (before the insert) give the
clearer message, the database constraints are the backstop.
"""

from __future__ import annotations

import datetime
import logging
from typing import Any

from sqlalchemy import (
    Connection, Insert, Result, Update, and_, delete, func, insert, select, update,
)
from sqlalchemy.exc import IntegrityError

from qvdctl.db.schema import di_tags, dis, hosts, osfs, settings, users, vms
from qvdctl.db.states import VmState
from qvdctl.errors import QvdError

log = logging.getLogger(__name__)

Row = dict[str, Any]


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None, microsecond=0)


def _rows(result: Result[Any]) -> list[Row]:
    return [dict(r._mapping) for r in result]


def _update(conn: Connection, stmt: Update, what: str) -> None:
    try:
        conn.execute(stmt)
    except IntegrityError:
        raise QvdError(f"{what} already exists") from None


def _insert(conn: Connection, stmt: Insert, what: str) -> int:
    try:
        key = conn.execute(stmt).inserted_primary_key
        assert key is not None  # an INSERT of one row always has one
        return int(key[0])
    except IntegrityError:
        raise QvdError(f"{what} already exists") from None


# --- settings -------------------------------------------------------------


def get_settings(conn: Connection) -> dict[str, str]:
    return {r["key"]: r["value"] for r in _rows(conn.execute(select(settings)))}


def set_setting(conn: Connection, key: str, value: str) -> None:
    if conn.execute(select(settings.c.key).where(settings.c.key == key)).first():
        conn.execute(update(settings).where(settings.c.key == key).values(value=value))
    else:
        conn.execute(insert(settings).values(key=key, value=value))


def del_setting(conn: Connection, key: str) -> bool:
    return conn.execute(delete(settings).where(settings.c.key == key)).rowcount > 0


# --- OS flavours ----------------------------------------------------------


def add_osf(
    conn: Connection, name: str, memory: int, user_storage: int, halt_signal: str | None = None
) -> int:
    if conn.execute(select(osfs.c.id).where(osfs.c.name == name)).first():
        raise QvdError(f"OSF '{name}' already exists")
    stmt = insert(osfs).values(
        name=name, memory=memory, user_storage=user_storage, halt_signal=halt_signal
    )
    return _insert(conn, stmt, f"OSF '{name}'")


def edit_osf(conn: Connection, osf: Row, values: dict[str, Any]) -> None:
    """Set the columns ``values`` of OSF ``osf``; a new name must be free."""
    name = values.get("name", osf["name"])
    if name != osf["name"] and conn.execute(select(osfs.c.id).where(osfs.c.name == name)).first():
        raise QvdError(f"OSF '{name}' already exists")
    _update(conn, update(osfs).where(osfs.c.id == osf["id"]).values(**values), f"OSF '{name}'")


def list_osfs(conn: Connection) -> list[Row]:
    return _rows(conn.execute(select(osfs).order_by(osfs.c.id)))


def osf_by_name(conn: Connection, name: str) -> Row:
    row = conn.execute(select(osfs).where(osfs.c.name == name)).first()
    if row is None:
        raise QvdError(f"no OSF named '{name}'")
    return dict(row._mapping)


def get_osf(conn: Connection, osf_id: int) -> Row:
    return dict(conn.execute(select(osfs).where(osfs.c.id == osf_id)).one()._mapping)


def del_osf(conn: Connection, osf: Row) -> None:
    if conn.execute(select(func.count()).where(dis.c.osf_id == osf["id"])).scalar_one():
        raise QvdError(f"OSF '{osf['name']}' still has disk images; delete them first")
    if conn.execute(select(func.count()).where(vms.c.osf_id == osf["id"])).scalar_one():
        raise QvdError(f"OSF '{osf['name']}' still has VMs; delete them first")
    conn.execute(delete(osfs).where(osfs.c.id == osf["id"]))


# --- disk images and tags -------------------------------------------------


def add_di(
    conn: Connection,
    osf_id: int,
    path: str,
    version: str,
    sha256: str,
    size: int,
    halt_signal: str | None = None,
) -> int:
    if conn.execute(select(dis.c.id).where(dis.c.path == path)).first():
        raise QvdError(f"a disk image with file name '{path}' already exists")
    clash = select(dis.c.id).where(and_(dis.c.osf_id == osf_id, dis.c.version == version))
    if conn.execute(clash).first():
        raise QvdError(f"this OSF already has a disk image with version '{version}'")
    stmt = insert(dis).values(
        osf_id=osf_id, path=path, version=version, sha256=sha256, size=size, created=now(),
        halt_signal=halt_signal,
    )  # fmt: skip
    return _insert(conn, stmt, f"disk image '{path}'")


def count_dis(conn: Connection, osf_id: int) -> int:
    return conn.execute(select(func.count()).where(dis.c.osf_id == osf_id)).scalar_one()


def versions_like(conn: Connection, osf_id: int, prefix: str) -> list[str]:
    stmt = select(dis.c.version).where(
        and_(dis.c.osf_id == osf_id, dis.c.version.like(prefix + "%"))
    )
    return list(conn.execute(stmt).scalars())


def tag_di(conn: Connection, di: Row, tag: str) -> None:
    """Put ``tag`` on ``di``, taking it off whichever DI of the same OSF had it."""
    same = and_(di_tags.c.osf_id == di["osf_id"], di_tags.c.tag == tag)
    conn.execute(delete(di_tags).where(same))
    conn.execute(insert(di_tags).values(di_id=di["id"], osf_id=di["osf_id"], tag=tag))


def untag_di(conn: Connection, di: Row, tag: str) -> bool:
    stmt = delete(di_tags).where(and_(di_tags.c.di_id == di["id"], di_tags.c.tag == tag))
    return conn.execute(stmt).rowcount > 0


def list_dis(conn: Connection) -> list[Row]:
    """Every DI with its OSF's name and halt signal, and its tags (a sorted list)."""
    stmt = (
        select(dis, osfs.c.name.label("osf"), osfs.c.halt_signal.label("osf_halt_signal"))
        .join(osfs, osfs.c.id == dis.c.osf_id)
        .order_by(dis.c.id)
    )
    rows = _rows(conn.execute(stmt))
    tags: dict[int, list[str]] = {}
    for di_id, tag in conn.execute(select(di_tags.c.di_id, di_tags.c.tag).order_by(di_tags.c.tag)):
        tags.setdefault(di_id, []).append(tag)
    for row in rows:
        row["tags"] = tags.get(row["id"], [])
    return rows


def di_for_tag(conn: Connection, osf_id: int, tag: str) -> Row | None:
    stmt = (
        select(dis)
        .join(di_tags, di_tags.c.di_id == dis.c.id)
        .where(and_(di_tags.c.osf_id == osf_id, di_tags.c.tag == tag))
    )
    row = conn.execute(stmt).first()
    return dict(row._mapping) if row else None


def get_di(conn: Connection, di_id: int) -> Row:
    return dict(conn.execute(select(dis).where(dis.c.id == di_id)).one()._mapping)


def vms_using_di(conn: Connection, di_id: int) -> list[str]:
    """Names of VMs that run ``di_id`` right now (any state but stopped)."""
    stmt = select(vms.c.name).where(and_(vms.c.current_di_id == di_id, vms.c.state != VmState.STOPPED))
    return list(conn.execute(stmt).scalars())


def del_di(conn: Connection, di: Row) -> None:
    conn.execute(update(vms).where(vms.c.current_di_id == di["id"]).values(current_di_id=None))
    conn.execute(delete(di_tags).where(di_tags.c.di_id == di["id"]))
    conn.execute(delete(dis).where(dis.c.id == di["id"]))


# --- users ----------------------------------------------------------------


def add_user(conn: Connection, login: str, password_hash: str) -> int:
    if conn.execute(select(users.c.id).where(users.c.login == login)).first():
        raise QvdError(f"user '{login}' already exists")
    stmt = insert(users).values(login=login, password=password_hash)
    return _insert(conn, stmt, f"user '{login}'")


def set_user_password(conn: Connection, user_id: int, password_hash: str) -> bool:
    stmt = update(users).where(users.c.id == user_id).values(password=password_hash)
    return conn.execute(stmt).rowcount == 1


def list_users(conn: Connection) -> list[Row]:
    return _rows(conn.execute(select(users).order_by(users.c.id)))


def user_by_login(conn: Connection, login: str) -> Row:
    row = conn.execute(select(users).where(users.c.login == login)).first()
    if row is None:
        raise QvdError(f"no user with login '{login}'")
    return dict(row._mapping)


def del_user(conn: Connection, user: Row) -> None:
    names = list(conn.execute(select(vms.c.name).where(vms.c.user_id == user["id"])).scalars())
    if names:
        raise QvdError(
            f"user '{user['login']}' still has VMs ({', '.join(names)}); delete them first"
        )
    conn.execute(delete(users).where(users.c.id == user["id"]))


# --- hosts ----------------------------------------------------------------


def add_host(conn: Connection, name: str, address: str) -> int:
    if conn.execute(select(hosts.c.id).where(hosts.c.name == name)).first():
        raise QvdError(f"host '{name}' already exists")
    stmt = insert(hosts).values(name=name, address=address, created=now())
    return _insert(conn, stmt, f"host '{name}'")


def list_hosts(conn: Connection) -> list[Row]:
    stmt = select(hosts, func.count(vms.c.id).label("vms")).outerjoin(
        vms, and_(vms.c.host_id == hosts.c.id, vms.c.state != VmState.STOPPED)
    )
    return _rows(conn.execute(stmt.group_by(hosts.c.id).order_by(hosts.c.id)))


def set_host_blocked(conn: Connection, host_id: int, blocked: int) -> None:
    conn.execute(update(hosts).where(hosts.c.id == host_id).values(blocked=blocked))


def ensure_host(conn: Connection, name: str) -> int:
    """The id of host ``name``, registering it (address unknown) on first use."""
    host_id = conn.execute(select(hosts.c.id).where(hosts.c.name == name)).scalar_one_or_none()
    if host_id is None:
        host_id = add_host(conn, name, "")
    return host_id


# --- VMs ------------------------------------------------------------------


def add_vm(conn: Connection, name: str, user_id: int, osf_id: int, di_tag: str, ip: str) -> int:
    if conn.execute(select(vms.c.id).where(vms.c.name == name)).first():
        raise QvdError(f"VM '{name}' already exists")
    if conn.execute(select(vms.c.id).where(vms.c.ip == ip)).first():
        raise QvdError(f"IP {ip} is already assigned to another VM")
    stamp = now()
    stmt = insert(vms).values(
        name=name, user_id=user_id, osf_id=osf_id, di_tag=di_tag, ip=ip,
        blocked=0, state=VmState.STOPPED, user_state="disconnected", created=stamp, state_changed=stamp,
    )
    return _insert(conn, stmt, f"VM '{name}'")


def edit_vm(conn: Connection, vm: Row, values: dict[str, Any]) -> None:
    """Set the columns ``values`` of VM ``vm``; a new name or IP must be free."""
    name = values.get("name", vm["name"])
    others = select(vms.c.id).where(vms.c.id != vm["id"])
    if conn.execute(others.where(vms.c.name == name)).first():
        raise QvdError(f"VM '{name}' already exists")
    if "ip" in values and conn.execute(others.where(vms.c.ip == values["ip"])).first():
        raise QvdError(f"IP {values['ip']} is already assigned to another VM")
    _update(conn, update(vms).where(vms.c.id == vm["id"]).values(**values), f"VM '{name}'")


def used_ips(conn: Connection) -> set[str]:
    return set(conn.execute(select(vms.c.ip)).scalars())


def list_vms(conn: Connection, vm_id: int | None = None) -> list[Row]:
    """Every VM (or only ``vm_id``) joined with its user, OSF, host and current DI."""
    current = dis.alias("current")
    stmt = (
        select(
            vms,
            users.c.login.label("user"),
            osfs.c.name.label("osf"),
            osfs.c.memory.label("memory"),
            osfs.c.halt_signal.label("osf_halt_signal"),
            hosts.c.name.label("host"),
            current.c.version.label("current_di_version"),
            current.c.path.label("current_di_path"),
        )
        .join(users, users.c.id == vms.c.user_id)
        .join(osfs, osfs.c.id == vms.c.osf_id)
        .outerjoin(hosts, hosts.c.id == vms.c.host_id)
        .outerjoin(current, current.c.id == vms.c.current_di_id)
        .order_by(vms.c.id)
    )
    if vm_id is not None:
        stmt = stmt.where(vms.c.id == vm_id)
    return _rows(conn.execute(stmt))


def get_vm(conn: Connection, vm_id: int) -> Row:
    rows = list_vms(conn, vm_id)
    if not rows:
        raise QvdError(f"no VM with id {vm_id}")
    return rows[0]


def vm_by_name(conn: Connection, name: str) -> Row:
    row = conn.execute(select(vms.c.id).where(vms.c.name == name)).first()
    if row is None:
        raise QvdError(f"no VM named '{name}'")
    return get_vm(conn, row.id)


def set_vm_blocked(conn: Connection, vm_id: int, blocked: int) -> None:
    conn.execute(update(vms).where(vms.c.id == vm_id).values(blocked=blocked))


def set_vm_state(
    conn: Connection,
    vm_id: int,
    new: VmState,
    *,
    expect: tuple[VmState, ...] | None = None,
    **values: Any,
) -> bool:
    """Move VM ``vm_id`` to state ``new`` (and set ``values``).

    With ``expect``, only from one of those states: the conditional UPDATE is
    what makes two concurrent ``vm start`` of one VM safe. Returns whether the
    row changed.
    """
    stmt = update(vms).where(vms.c.id == vm_id)
    if expect is not None:
        stmt = stmt.where(vms.c.state.in_(expect))
    result = conn.execute(stmt.values(state=new, state_changed=now(), **values))
    return result.rowcount == 1


def del_vm(conn: Connection, vm: Row) -> None:
    stmt = delete(vms).where(and_(vms.c.id == vm["id"], vms.c.state == VmState.STOPPED))
    if conn.execute(stmt).rowcount != 1:
        raise QvdError(f"VM '{vm['name']}' is {vm['state']}; stop it before deleting it")
