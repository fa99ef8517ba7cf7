"""``vm stop``: from a running container back to ``stopped``, or else ``zombie``.

    the container layer's stop_vm_container        state: stopping
    unmount_and_release(node, vm)                  state: stopped (or zombie)

The same steps clean up a zombie, or a VM a crashed command left ``starting`` or
``stopping``: each is idempotent, so it is simply run again.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from qvdctl import mounting
from qvdctl.container import seam
from qvdctl.db.states import VmState
from qvdctl.errors import QvdError
from qvdctl.node import Node
from qvdctl.storage import Storage
from qvdctl.vm.state import StateRefused, Vm, change_state, fail_as_zombie, locked

log = logging.getLogger(__name__)


def stop_vm(node: Node, vm: Vm) -> None:
    """``vm stop``: stop the container, then unmount and release the root.

    Waits for any start or stop of the same VM in progress (see ``state.py``).

    Raises:
        QvdError: the VM is not in a stoppable state, or a step failed (it is then zombie).
    """
    with locked(node, vm.id) as vm:
        stop_locked(node, vm)


def stop_locked(node: Node, vm: Vm) -> None:
    """``stop_vm`` for a caller that already holds the VM's lock (a start of a zombie)."""
    with node.db.writer() as conn:
        try:
            change_state(conn, vm.id, VmState.STOPPING)
        except StateRefused as exc:
            raise QvdError(f"VM '{vm.name}' is {exc.current}; there is nothing to stop") from None
    settings = node.settings()
    try:
        if _may_have_container(vm, settings):
            seam.stop_vm_container(vm_id=vm.id, settings=settings)
    except Exception as exc:
        fail_as_zombie(node, vm, f"VM '{vm.name}': stopping the container failed: {exc}", exc)
    unmount_and_release(node, vm)


def _may_have_container(vm: Vm, settings: Mapping[str, str]) -> bool:
    """Whether stopping ``vm`` involves its container at all.

    A mount-only node never made one; there, ``halt`` is skipped unless liblxc knows
    a ``qvd-<id>`` in our lxcpath (the setting changed while the VM ran). Skipping it
    keeps mount-only use from touching any network link named like a VM's veth.
    """
    if settings["vm.start.mount_only"] != "1":
        return True
    return vm.id in seam.vm_container_states(settings=settings)


def unmount_and_release(node: Node, vm: Vm) -> None:
    """Unmount the VM's root and mark it ``stopped``; on failure mark it ``zombie``.

    A zombie is retried by the next ``vm stop``.
    """
    rootfs = Storage.from_settings(node.settings()).rootfs_entry(vm.user_id, vm.id)
    try:
        mounting.unmount_tree(rootfs)
    except QvdError as exc:
        fail_as_zombie(node, vm, f"VM '{vm.name}' could not be cleaned up ({exc})", exc)
    with node.db.writer() as conn:
        change_state(conn, vm.id, VmState.STOPPED)
    log.info("VM %s stopped", vm.name)
