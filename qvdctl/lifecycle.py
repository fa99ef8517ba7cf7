"""The storage side of a VM's life: from ``stopped`` to a mounted root and back.

    vm start:  prepare_and_mount(node, vm) -> MountedRoot      state: starting
               start_container(vm, mounted_root)                state: running
    vm stop:   stop_container(vm)                              state: stopping
               unmount_and_release(node, vm)                    state: stopped (or zombie)

``start_container`` / ``stop_container`` are the one seam to the container
layer (``qvdctl/container/``). Until it is wired in, ``start_container``
raises, and ``vm start`` takes the normal failure path; the setting
``vm.start.mount_only=1`` skips the container and leaves the VM ``running``
with only its root mounted (tests, or an admin inspecting a root).

Failure contract of a start: whatever step fails, the steps already done are
undone in reverse, the VM's overlay (if this start got as far as preparing it)
is renamed ``deleteme-...`` for the admin to read, the VM is ``stopped``, and
one QvdError names the VM, the failed step and the kept overlay.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NoReturn

from qvdctl import mounting
from qvdctl.db import store
from qvdctl.errors import QvdError
from qvdctl.images.extract import ensure_extracted, find_root
from qvdctl.network.addresses import mac_for_ip
from qvdctl.node import Node
from qvdctl.progress import status
from qvdctl.storage import Storage, move_aside

log = logging.getLogger(__name__)

# States from which `vm stop` may clean up (a crashed start leaves `starting`).
STOPPABLE = ("running", "starting", "stopping", "zombie", "debugging")


@dataclasses.dataclass(frozen=True)
class Vm:
    """What the container layer needs to know about one VM."""

    id: int
    name: str
    user_id: int
    user: str
    osf: str
    memory: int  # MiB
    ip: str
    di_tag: str
    state: str

    @property
    def container_name(self) -> str:
        return f"qvd-{self.id}"

    @property
    def mac(self) -> str:
        """``54:52:00`` and the last three octets of the IP, in hex (SPEC §4)."""
        return mac_for_ip(self.ip)


@dataclasses.dataclass(frozen=True)
class MountedRoot:
    """A VM's root, mounted and ready for a container."""

    rootfs: Path  # the mountpoint: lxc.rootfs.path
    base: Path
    overlay: Path
    home: Path
    # True when the union serves /home itself (qvdfs); else bind-mount `home` onto /home.
    home_in_union: bool
    unionfs_type: str
    settings: Mapping[str, str]  # the settings this start used (bridge, gateway, ...)


def load_vm(node: Node, vm_id: int) -> Vm:
    with node.db.reader() as conn:
        row = store.get_vm(conn, vm_id)
    return Vm(
        id=row["id"], name=row["name"], user_id=row["user_id"], user=row["user"],
        osf=row["osf"], memory=row["memory"], ip=row["ip"], di_tag=row["di_tag"],
        state=row["state"],
    )


# --- the seam to the container layer -----------------------------------------


def start_container(vm: Vm, mounted_root: MountedRoot) -> None:
    """Start the LXC container ``qvd-<id>`` on ``mounted_root``; raise on failure."""
    raise QvdError("no container runtime wired yet")


def stop_container(vm: Vm) -> None:
    """Stop the container of ``vm`` if one runs. No runtime is wired yet, so none does."""


# --- start ---------------------------------------------------------------------


def start_vm(node: Node, vm: Vm) -> MountedRoot:
    """``vm start``: mount the root, then hand over to the container layer."""
    mounted = prepare_and_mount(node, vm)
    if mounted.settings["vm.start.mount_only"] != "1":
        try:
            start_container(vm, mounted)
        except Exception as exc:
            undo = [lambda: mounting.unmount_tree(mounted.rootfs, lazy_fallback=True)]
            _fail_start(node, vm, "starting the container", exc, undo, mounted.overlay)
    with node.db.writer() as conn:
        if not store.set_vm_state(conn, vm.id, "running", expect=("starting",)):
            # A `vm stop` ran during the start and owns the VM now; say so rather
            # than report a VM as started that is being torn down.
            raise QvdError(f"VM '{vm.name}' was stopped while it started")
    return mounted


def prepare_and_mount(node: Node, vm: Vm) -> MountedRoot:
    """Take ``vm`` from ``stopped`` to ``starting`` with its root mounted.

    Raises:
        QvdError: the VM cannot start (wrong state, no image, a failed step);
            everything this call did is undone, see the module docstring.
    """
    settings = node.settings()
    if settings["vm.hypervisor"] != "lxc":
        raise QvdError(f"vm.hypervisor is '{settings['vm.hypervisor']}'; this node runs lxc only")
    storage = Storage.from_settings(settings)
    storage.ensure()
    kind = settings["vm.lxc.unionfs.type"]
    di = _claim(node, vm)

    undo: list[Callable[[], None]] = []
    overlay_used: Path | None = None
    rootfs = storage.rootfs_entry(vm.user_id, vm.id)
    step = "cleaning up stale mounts"
    try:
        mounting.unmount_tree(rootfs, lazy_fallback=True)

        step = "extracting the image"
        with status(f"extracting {di['path']}"):
            base = _prepare_base(storage, vm.id, di["path"])

        step = "preparing the overlay"
        overlay = storage.overlay(di["id"], vm.id)
        if overlay.exists() and not settings.flag("vm.overlay.persistent"):
            move_aside(overlay)
        overlay.mkdir(exist_ok=True)
        overlay_used = overlay
        workdir = storage.overlay_workdir(di["id"], vm.id)
        if kind == "overlayfs":
            # Kernel-private scratch space; it must start empty on every mount.
            shutil.rmtree(workdir, ignore_errors=True)
            workdir.mkdir()

        step = "preparing the home"
        home = storage.homefs_entry(vm.id, vm.user_id)
        home.mkdir(mode=0o755, exist_ok=True)

        step = "preparing the mountpoint"
        rootfs.mkdir(exist_ok=True)
        if any(rootfs.iterdir()):
            raise QvdError(f"{rootfs} is not empty")

        step = "mounting the root"
        # The union gets the shared tree the entry links to: qvdfs (rightly) refuses a
        # symlink as a branch, and all three unions then see the same plain folder.
        branches = mounting.Branches(
            base=base.resolve(strict=True), overlay=overlay, home=home, workdir=workdir
        )
        mounting.mount_root(kind, branches, rootfs, settings)
        undo.append(lambda: mounting.unmount_tree(rootfs, lazy_fallback=True))
    except Exception as exc:
        _fail_start(node, vm, step, exc, undo, overlay_used)

    log.info("VM %s: root mounted at %s (%s)", vm.name, rootfs, kind)
    return MountedRoot(
        rootfs=rootfs, base=base, overlay=overlay, home=home,
        home_in_union=mounting.home_in_union(kind), unionfs_type=kind, settings=dict(settings),
    )


def _claim(node: Node, vm: Vm) -> dict:
    """Resolve the VM's DI and move it ``stopped`` -> ``starting``; return the DI row."""
    node_name = node.name()
    with node.db.writer() as conn:
        row = store.get_vm(conn, vm.id)
        if row["blocked"]:
            raise QvdError(f"VM '{vm.name}' is blocked")
        di = store.di_for_tag(conn, row["osf_id"], row["di_tag"])
        if di is None:
            raise QvdError(f"OSF '{row['osf']}' has no disk image tagged '{row['di_tag']}'")
        host_id = store.ensure_host(conn, node_name)
        if not store.set_vm_state(
            conn, vm.id, "starting", expect=("stopped",), host_id=host_id, current_di_id=di["id"]
        ):
            raise QvdError(f"VM '{vm.name}' is {row['state']}, not stopped")
    return di


def _prepare_base(storage: Storage, vm_id: int, image_file: str) -> Path:
    """Extract the image once and point ``basefs/<vm id>-<image file>`` at its root."""
    tree = storage.extraction(image_file)
    ensure_extracted(storage.image(image_file), tree)
    entry = storage.basefs_entry(vm_id, image_file)
    link = os.path.relpath(find_root(tree), entry.parent)
    if entry.is_symlink() and os.readlink(entry) == link:
        return entry
    if entry.exists() and not entry.is_symlink():
        raise QvdError(f"{entry} exists and is not qvdctl's link to the extracted image")
    tmp = entry.with_name(f".{entry.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(link)
    os.rename(tmp, entry)
    return entry


def _fail_start(
    node: Node,
    vm: Vm,
    step: str,
    exc: Exception,
    undo: list[Callable[[], None]],
    overlay: Path | None,
) -> NoReturn:
    """Undo a start that failed at ``step`` and raise the admin's one-line error."""
    log.info("VM %s: start failed while %s: %s", vm.name, step, exc)
    for action in reversed(undo):
        try:
            action()
        except Exception as undo_exc:  # keep undoing; the first error is the one to report
            log.warning("VM %s: undo after failed start: %s", vm.name, undo_exc)
    kept = ""
    if overlay is not None and overlay.exists():
        with contextlib.suppress(OSError):
            kept = f"; its overlay is kept as {move_aside(overlay).name}"
    with node.db.writer() as conn:
        store.set_vm_state(conn, vm.id, "stopped", host_id=None)
    raise QvdError(f"cannot start VM '{vm.name}': {step} failed: {exc}{kept}") from exc


# --- stop ----------------------------------------------------------------------


def stop_vm(node: Node, vm: Vm) -> None:
    """``vm stop``: stop the container, then unmount and release the root."""
    with node.db.writer() as conn:
        if not store.set_vm_state(conn, vm.id, "stopping", expect=STOPPABLE):
            state = store.get_vm(conn, vm.id)["state"]
            raise QvdError(f"VM '{vm.name}' is {state}; there is nothing to stop")
    try:
        stop_container(vm)
    except Exception as exc:
        with node.db.writer() as conn:
            store.set_vm_state(conn, vm.id, "zombie")
        raise QvdError(
            f"VM '{vm.name}': stopping the container failed: {exc}; it is now a zombie"
        ) from exc
    unmount_and_release(node, vm)


def unmount_and_release(node: Node, vm: Vm) -> None:
    """Unmount the VM's root and mark it ``stopped``; on failure mark it ``zombie``.

    A zombie is retried by the next ``vm stop``.
    """
    rootfs = Storage.from_settings(node.settings()).rootfs_entry(vm.user_id, vm.id)
    try:
        mounting.unmount_tree(rootfs)
    except QvdError as exc:
        with node.db.writer() as conn:
            store.set_vm_state(conn, vm.id, "zombie")
        raise QvdError(
            f"VM '{vm.name}' could not be cleaned up ({exc}); it is now a zombie"
        ) from exc
    with node.db.writer() as conn:
        store.set_vm_state(conn, vm.id, "stopped", host_id=None)
    log.info("VM %s stopped", vm.name)
