"""What the web admin's buttons do, with the functions the CLI's commands use.

On a single node the web server's process does the work, as ``qvdctl vm start``
does (``vm/start.py``, ``vm/stop.py``, a few VMs at a time); in a fleet it queues
the commands for the hosts' HKDs (``fleet/client.py``) and returns without waiting:
an open VMs page shows their progress live. Each function takes the ids a form
posted and returns one line per object: ``(name, None)`` done, ``(name, error)`` not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from qvdctl.commands.vm import remove_leftovers
from qvdctl.db import store
from qvdctl.errors import QvdError
from qvdctl.node import Node
from qvdctl.vm.parallel import run_each
from qvdctl.vm.state import Vm, load_vm

log = logging.getLogger(__name__)

Outcome = list[tuple[str, str | None]]


def _vms(node: Node, ids: list[int]) -> list[Vm]:
    if not ids:
        raise QvdError("no VM selected")
    try:
        return [load_vm(node, vm_id) for vm_id in ids]
    except QvdError:
        raise QvdError("a selected VM no longer exists; nothing changed") from None


def start_vms(node: Node, ids: list[int]) -> Outcome:
    vms = _vms(node, ids)
    if node.fleet:
        from qvdctl.fleet import client  # here: only a fleet queues

        return [(o.vm.name, None if o.error is None else str(o.error))
                for o in client.start(node, vms, pin=None, wait=False)]
    from qvdctl.vm.start import start_vm  # here: the start machinery loads liblxc and trio

    parallel = int(node.settings()["vm.lifecycle.parallel"])
    return [(vm.name, None if error is None else str(error))
            for vm, _, error in run_each(lambda vm: start_vm(node, vm), vms, parallel)]


def stop_vms(node: Node, ids: list[int]) -> Outcome:
    vms = _vms(node, ids)
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


def block_vms(node: Node, ids: list[int]) -> Outcome:
    return _each_vm(node, ids, lambda conn, row: store.set_vm_blocked(conn, row["id"], 1))


def unblock_vms(node: Node, ids: list[int]) -> Outcome:
    return _each_vm(node, ids, lambda conn, row: store.set_vm_blocked(conn, row["id"], 0))


def delete_vms(node: Node, ids: list[int]) -> Outcome:
    vms = _vms(node, ids)
    outcome = _each_vm(node, ids, store.del_vm)
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


def block_hosts(node: Node, ids: list[int]) -> Outcome:
    return _each_host(node, ids, 1)


def unblock_hosts(node: Node, ids: list[int]) -> Outcome:
    return _each_host(node, ids, 0)


# What each form's action=... does, by object.
ACTIONS: dict[str, dict[str, Callable[[Node, list[int]], Outcome]]] = {
    "vm": {"start": start_vms, "stop": stop_vms, "block": block_vms, "unblock": unblock_vms,
           "delete": delete_vms},
    "host": {"block": block_hosts, "unblock": unblock_hosts},
}
