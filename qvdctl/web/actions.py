"""What the web admin's buttons do, with the functions the CLI's commands use.

On a single node the web server's process does the work, as ``qvdctl vm start``
does (``vm/start.py``, ``vm/stop.py``, a few VMs at a time); in a fleet it queues
the commands for the hosts' HKDs (``fleet/client.py``) and returns without waiting:
an open VMs page shows their progress live. Each function takes what a form posted
and returns one line per object: ``(name, None)`` done, ``(name, error)`` not; a
QvdError it raises changed nothing.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping

from qvdctl.commands import di as di_commands
from qvdctl.commands import osf as osf_commands
from qvdctl.commands.di import check_tag
from qvdctl.commands.osf import check_name
from qvdctl.commands.user import hash_password, nonempty
from qvdctl.commands.vm import remove_leftovers
from sqlalchemy import Connection

from qvdctl.db import store
from qvdctl.errors import QvdError
from qvdctl.node import Node
from qvdctl.vm.parallel import run_each
from qvdctl.vm.state import Vm, load_vm

log = logging.getLogger(__name__)

Outcome = list[tuple[str, str | None]]


@dataclasses.dataclass(frozen=True)
class Posted:
    """What an action's form posted: the ids ticked, and its other fields."""

    ids: list[int]
    fields: Mapping[str, str]

    def field(self, key: str) -> str:
        if not self.fields.get(key):
            raise QvdError(f"{key} is missing")
        return self.fields[key]


def _vms(node: Node, ids: list[int]) -> list[Vm]:
    if not ids:
        raise QvdError("no VM selected")
    try:
        return [load_vm(node, vm_id) for vm_id in ids]
    except QvdError:
        raise QvdError("a selected VM no longer exists; nothing changed") from None


def start_vms(node: Node, posted: Posted) -> Outcome:
    vms = _vms(node, posted.ids)
    if node.fleet:
        from qvdctl.fleet import client  # here: only a fleet queues

        return [(o.vm.name, None if o.error is None else str(o.error))
                for o in client.start(node, vms, pin=None, wait=False)]
    from qvdctl.vm.start import start_vm  # here: the start machinery loads liblxc and trio

    parallel = int(node.settings()["vm.lifecycle.parallel"])
    return [(vm.name, None if error is None else str(error))
            for vm, _, error in run_each(lambda vm: start_vm(node, vm), vms, parallel)]


def stop_vms(node: Node, posted: Posted) -> Outcome:
    vms = _vms(node, posted.ids)
    if node.fleet:
        from qvdctl.fleet import client

        return [(o.vm.name, None if o.error is None else str(o.error))
                for o in client.stop(node, vms, wait=False)]
    from qvdctl.vm.stop import stop_vm

    parallel = int(node.settings()["vm.lifecycle.parallel"])
    return [(vm.name, None if error is None else str(error))
            for vm, _, error in run_each(lambda vm: stop_vm(node, vm), vms, parallel)]


def _each_vm(node: Node, ids: list[int], change: Callable[..., None]) -> Outcome:
    """``change(conn, row)`` on every VM, all in one transaction: all or nothing."""
    _vms(node, ids)
    with node.db.writer() as conn:
        rows = [store.get_vm(conn, vm_id) for vm_id in ids]
        for row in rows:
            change(conn, row)
    return [(row["name"], None) for row in rows]


def block_vms(node: Node, posted: Posted) -> Outcome:
    return _each_vm(node, posted.ids, lambda conn, row: store.set_vm_blocked(conn, row["id"], 1))


def unblock_vms(node: Node, posted: Posted) -> Outcome:
    return _each_vm(node, posted.ids, lambda conn, row: store.set_vm_blocked(conn, row["id"], 0))


def delete_vms(node: Node, posted: Posted) -> Outcome:
    vms = _vms(node, posted.ids)
    outcome = _each_vm(node, posted.ids, store.del_vm)
    remove_leftovers(node, [{"id": vm.id, "user_id": vm.user_id} for vm in vms])
    return outcome


def _each_host(node: Node, ids: list[int], blocked: int) -> Outcome:
    if not ids:
        raise QvdError("no host selected")
    with node.db.writer() as conn:
        names = {row["id"]: row["name"] for row in store.list_hosts(conn)}
        if any(host_id not in names for host_id in ids):
            raise QvdError("a selected host no longer exists; nothing changed")
        for host_id in ids:
            store.set_host_blocked(conn, host_id, blocked)
    return [(names[host_id], None) for host_id in ids]


def block_hosts(node: Node, posted: Posted) -> Outcome:
    return _each_host(node, posted.ids, 1)


def unblock_hosts(node: Node, posted: Posted) -> Outcome:
    return _each_host(node, posted.ids, 0)


def add_user(node: Node, posted: Posted) -> Outcome:
    login = check_name(posted.field("login"), "login")
    hashed = hash_password(nonempty(posted.field("password")))
    with node.db.writer() as conn:
        store.add_user(conn, login, hashed)
    return [(login, None)]


def set_password(node: Node, posted: Posted) -> Outcome:
    if len(posted.ids) != 1:
        raise QvdError("choose one user to set the password of")
    hashed = hash_password(nonempty(posted.field("password")))
    with node.db.writer() as conn:
        users = {row["id"]: row["login"] for row in store.list_users(conn)}
        if posted.ids[0] not in users or not store.set_user_password(conn, posted.ids[0], hashed):
            raise QvdError("the selected user no longer exists; nothing changed")
    return [(users[posted.ids[0]], None)]


def delete_users(node: Node, posted: Posted) -> Outcome:
    if not posted.ids:
        raise QvdError("no user selected")
    with node.db.writer() as conn:
        users = {row["id"]: row for row in store.list_users(conn)}
        if any(user_id not in users for user_id in posted.ids):
            raise QvdError("a selected user no longer exists; nothing changed")
        for user_id in posted.ids:
            store.del_user(conn, users[user_id])
    return [(users[user_id]["login"], None) for user_id in posted.ids]


def _one_di(conn: Connection, posted: Posted) -> store.Row:
    if len(posted.ids) != 1:
        raise QvdError("choose one disk image")
    for row in store.list_dis(conn):
        if row["id"] == posted.ids[0]:
            return row
    raise QvdError("the selected disk image no longer exists; nothing changed")


def tag_di(node: Node, posted: Posted) -> Outcome:
    """The tag moves to this DI from whichever DI of its OSF had it, as ``di tag``."""
    tag = check_tag(posted.field("tag"))
    with node.db.writer() as conn:
        di = _one_di(conn, posted)
        store.tag_di(conn, di, tag)
    return [(f"{di['osf']} {di['version']} {tag}", None)]


def untag_di(node: Node, posted: Posted) -> Outcome:
    tag = posted.field("tag")
    with node.db.writer() as conn:
        di = _one_di(conn, posted)
        if not store.untag_di(conn, di, tag):
            raise QvdError(f"DI {di['id']} has no tag '{tag}'")
    return [(f"{di['osf']} {di['version']} {tag}", None)]


def _given(posted: Posted, keys: list[str]) -> dict[str, str]:
    """The fields of ``keys`` the form filled in; an empty one is left to its default
    (an add) or unchanged (an edit)."""
    return {key: posted.fields[key] for key in keys if posted.fields.get(key)}


# The halt signal field's value for "no override: what the image's /sbin/init wants"
# (the CLI's ``halt_signal=``); an empty field leaves it as it is.
HALT_FROM_INIT = "init"


def _halt_signal_given(args: dict[str, str]) -> dict[str, str]:
    if args.get("halt_signal") == HALT_FROM_INIT:
        args["halt_signal"] = ""
    return args


def add_osf(node: Node, posted: Posted) -> Outcome:
    """As ``osf add``."""
    args = _halt_signal_given(_given(posted, osf_commands.EDITABLE))
    osf_commands.add_osf(node, args)
    return [(args.get("name", ""), None)]


def edit_osfs(node: Node, posted: Posted) -> Outcome:
    """As ``osf edit``, on the OSFs ticked; the fields left empty stay as they are."""
    if not posted.ids:
        raise QvdError("no OSF selected")
    values = osf_commands.edit_values(
        _halt_signal_given(_given(posted, osf_commands.EDITABLE)))
    if not values:
        raise QvdError("nothing to change: fill in a field")
    with node.db.writer() as conn:
        osfs = {row["id"]: row for row in store.list_osfs(conn)}
        if any(osf_id not in osfs for osf_id in posted.ids):
            raise QvdError("a selected OSF no longer exists; nothing changed")
        rows = [osfs[osf_id] for osf_id in posted.ids]
        osf_commands.edit_osfs(conn, rows, values)
    return [(row["name"], None) for row in rows]


def staged_images(node: Node) -> list[str]:
    """The files of the node's staging/ that ``di add`` could import, by name."""
    from qvdctl.images.importer import check_image_name  # libarchive: only for the form

    staging = node.storage().staging
    found = []
    for entry in sorted(staging.iterdir()) if staging.is_dir() else ():
        try:
            check_image_name(entry.name)
        except QvdError:
            continue
        if entry.is_file() and not entry.is_symlink():
            found.append(entry.name)
    return found


def add_di(node: Node, posted: Posted) -> Outcome:
    """As ``di add``, from a file of staging/ alone: the web admin imports nothing else of
    the node's file system."""
    name = posted.field("path")
    if name not in staged_images(node):
        raise QvdError(f"'{name}' is not an image file in staging/")
    args = _halt_signal_given(_given(posted, ["osf", "version", "halt_signal"]))
    added = di_commands.add_image(node, node.storage().staging / name, args)
    return [(f"{args.get('osf', '')} {added.version}", None)]


# What each form's action=... does, by object.
ACTIONS: dict[str, dict[str, Callable[[Node, Posted], Outcome]]] = {
    "vm": {"start": start_vms, "stop": stop_vms, "block": block_vms, "unblock": unblock_vms,
           "delete": delete_vms},
    "host": {"block": block_hosts, "unblock": unblock_hosts},
    "user": {"add": add_user, "passwd": set_password, "delete": delete_users},
    "di": {"tag": tag_di, "untag": untag_di, "add": add_di},
    "osf": {"add": add_osf, "edit": edit_osfs},
}
