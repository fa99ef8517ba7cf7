"""``vm list``: the database against what really runs on this node.

A VM recorded ``running`` is checked three ways: its root is still mounted, its
union still answers, and (unless the node is mount-only) its container still runs.
One that fails any of them is marked ``zombie`` (see ``state.py``), so the admin
sees it and the next ``vm stop`` cleans it up.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path

from qvdctl.db import store
from qvdctl.db.states import VmState
from qvdctl.node import Node
from qvdctl.storage import Storage
from qvdctl.vm.state import StateRefused, change_state
from qvdproc import mountinfo

log = logging.getLogger(__name__)

# How long `vm list` waits for a union to answer before calling it hung.
ROOT_CHECK_TIMEOUT = 5.0


def reconcile(node: Node) -> list[tuple[str, str]]:
    """Mark ``zombie`` each VM of this node recorded ``running`` that no longer serves.

    Broken means: its root is no longer mounted, its union does not answer (the
    daemon died: ENOTCONN, or hung), or, unless the node is mount-only, its container
    is not running (it died, or an admin stopped or destroyed it with the LXC tools).
    VMs in ``starting`` / ``stopping`` belong to a command still at work and are left
    alone; the state change is conditional, so a concurrent stop wins.

    Returns (VM name, why) for every VM this call marked.
    """
    settings = node.settings()
    node_name = node.name()
    with node.db.reader() as conn:
        running = [
            row for row in store.list_vms(conn)
            if row["state"] == VmState.RUNNING and row["host"] == node_name
        ]  # fmt: skip
    if not running:
        return []  # no liblxc query: `vm list` stays instant on an idle node
    storage = Storage.from_settings(settings)
    containers = None
    if settings["vm.start.mount_only"] != "1":
        from qvdctl.container import seam  # here: liblxc loads only to ask it

        containers = seam.vm_container_states(settings=settings)
    marked = []
    for row in running:
        why = _root_problem(storage.rootfs_entry(row["user_id"], row["id"]))
        if why is None and containers is not None:
            why = _container_problem(row["id"], containers, settings)
        if why is None:
            continue
        try:
            with node.db.writer() as conn:
                change_state(conn, row["id"], VmState.ZOMBIE, only_from={VmState.RUNNING})
        except StateRefused:
            continue  # a vm stop got there first
        log.warning("VM %s: %s; marked zombie (vm stop cleans it up)", row["name"], why)
        marked.append((row["name"], why))
    return marked


def _root_problem(rootfs: Path) -> str | None:
    """Why the mounted root at ``rootfs`` does not serve, or None if it does."""
    if not mountinfo.is_mounted(rootfs):
        return "its root is not mounted"
    # statfs always reaches the union daemon: a stat, and with a cached listing even
    # opening and reading the folder, are answered by the kernel for a while after the
    # daemon died. In a thread: a hung daemon would block us.
    answer: list[str | None] = []

    def probe() -> None:
        try:
            os.statvfs(rootfs)
            answer.append(None)
        except OSError as exc:
            if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
                answer.append("its union daemon died (transport endpoint not connected)")
            else:
                answer.append(f"its root does not answer: {os.strerror(exc.errno or 0)}")

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(ROOT_CHECK_TIMEOUT)
    if not answer:
        return f"its root did not answer within {ROOT_CHECK_TIMEOUT:.0f} s"
    return answer[0]


def _container_problem(
    vm_id: int, containers: Mapping[int, str], settings: Mapping[str, str]
) -> str | None:
    """Why VM ``vm_id``'s container does not run, or None if it does."""
    from qvdctl.container import seam  # loaded already: reconcile asked liblxc

    state = containers.get(vm_id)
    if state == "RUNNING":
        return None
    # liblxc asks a running container over an abstract socket of the network namespace
    # that started it; from another namespace it answers STOPPED. Its monitor process
    # is visible from anywhere, so that decides.
    if seam.monitor_runs(vm_id, settings=settings):
        return None
    return "its container is gone" if state is None else f"its container is {state.lower()}"
