"""``vm start``: from ``stopped`` to a running container on a mounted root.

    prepare_and_mount(node, vm) -> MountedRoot     state: starting
    the container layer's start_vm_container       state: running

The setting ``vm.start.mount_only=1`` skips the container and leaves the VM
``running`` with only its root mounted (tests, or an admin inspecting a root).

Failure contract: whatever step fails, the steps already done are undone in
reverse, the VM's overlay (if this start got as far as preparing it) is renamed
``deleteme-...`` for the admin to read, the VM is ``stopped``, and one QvdError
names the VM, the failed step and the kept overlay. If undoing the container
itself fails, nothing under it is touched (no unmount, no rename: a container may
still run on that root) and the VM is ``zombie`` (see ``state.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import NoReturn

from qvdctl import mounting
from qvdctl.container import seam
from qvdctl.container.launch import LaunchError
from qvdctl.db import store
from qvdctl.db.states import VmState
from qvdctl.errors import QvdError
from qvdctl.images import halt
from qvdctl.images.extract import ensure_extracted, find_root
from qvdctl.node import Node
from qvdctl.progress import status
from qvdctl.storage import Storage, move_aside
from qvdctl.vm.state import StateRefused, Vm, change_state, fail_as_zombie, locked
from qvdctl.vm.stop import stop_locked

log = logging.getLogger(__name__)

# What the admin reads for each step of the container layer's launch.
LAUNCH_STEPS = {
    "network": "setting up the network",
    "config": "writing the container config",
    "start": "starting the container",
}


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
    halt_signal: str  # what powers the image's init off (images/halt.py)


def start_vm(node: Node, vm: Vm) -> MountedRoot:
    """``vm start``: mount the root, then start the container on it.

    Waits for any start or stop of the same VM in progress (see ``state.py``).
    A zombie is cleaned up first, then started.

    Raises:
        QvdError: one line naming the VM and the failed step; see the module docstring.
    """
    with locked(node, vm.id) as vm:
        if vm.state is VmState.ZOMBIE:
            log.info("VM %s is a zombie: retrying its cleanup before the start", vm.name)
            stop_locked(node, vm)
        return _start(node, vm)


def _start(node: Node, vm: Vm) -> MountedRoot:
    mounted = prepare_and_mount(node, vm)
    if mounted.settings["vm.start.mount_only"] != "1":
        try:
            seam.start_vm_container(
                vm_id=vm.id, vm_name=vm.name, ip=vm.ip, rootfs=mounted.rootfs,
                home=None if mounted.home_in_union else mounted.home,
                memory_mb=vm.memory, halt_signal=mounted.halt_signal, settings=mounted.settings,
            )  # fmt: skip
        except LaunchError as exc:
            step = LAUNCH_STEPS.get(exc.step, "starting the container")
            if exc.cleanup_error:
                fail_as_zombie(node, vm, f"cannot start VM '{vm.name}': {step} failed: {exc}", exc)
            _fail_start(node, vm, step, exc, mounted.overlay, mounted=mounted.rootfs)
        except Exception as exc:  # a setting or VM value the container config cannot take
            _fail_start(node, vm, "starting the container", exc, mounted.overlay,
                        mounted=mounted.rootfs)  # fmt: skip
    with node.db.writer() as conn:
        change_state(conn, vm.id, VmState.RUNNING)
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
    container = settings["vm.start.mount_only"] != "1"
    if kind != "qvdfs" and settings["vm.lxc.unprivileged"] == "1" and container:
        # Only qvdfs can be mounted idmapped: without it the image's files would all
        # belong to nobody inside the container.
        raise QvdError(
            f"vm.lxc.unionfs.type={kind} cannot give an unprivileged container its root; "
            "use qvdfs or set vm.lxc.unprivileged=0"
        )
    di, osf_halt_signal = _claim(node, vm)

    overlay_used: Path | None = None
    rootfs = storage.rootfs_entry(vm.user_id, vm.id)
    step = "cleaning up stale mounts"
    try:
        mounting.unmount_tree(rootfs, lazy_fallback=True)

        step = "extracting the image"
        with status(f"extracting {di['path']}"):
            base = _prepare_base(storage, vm.id, di["path"])
            halt_signal = halt.halt_signal(
                storage.extraction(di["path"]), base.resolve(strict=True),
                di["halt_signal"], osf_halt_signal,
            )  # fmt: skip

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
    except Exception as exc:
        # Nothing to unmount: mounting is the last step, and no step before it mounts.
        _fail_start(node, vm, step, exc, overlay_used)

    log.info("VM %s: root mounted at %s (%s)", vm.name, rootfs, kind)
    return MountedRoot(
        rootfs=rootfs, base=base, overlay=overlay, home=home,
        home_in_union=mounting.home_in_union(kind), unionfs_type=kind, settings=dict(settings),
        halt_signal=halt_signal,
    )  # fmt: skip


def _claim(node: Node, vm: Vm) -> tuple[store.Row, str | None]:
    """Resolve the VM's DI and move it ``stopped`` -> ``starting``; return the DI row
    and the OSF's halt signal override, read in the same transaction."""
    node_name = node.name()
    with node.db.writer() as conn:
        row = store.get_vm(conn, vm.id)
        if row["blocked"]:
            raise QvdError(f"VM '{vm.name}' is blocked")
        di = store.di_for_tag(conn, row["osf_id"], row["di_tag"])
        if di is None:
            raise QvdError(f"OSF '{row['osf']}' has no disk image tagged '{row['di_tag']}'")
        host_id = store.ensure_host(conn, node_name)
        try:
            change_state(conn, vm.id, VmState.STARTING, host_id=host_id, current_di_id=di["id"])
        except StateRefused as exc:
            raise QvdError(f"VM '{vm.name}' is {exc.current}, not stopped") from None
    return di, row["osf_halt_signal"]


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
    overlay: Path | None,
    *,
    mounted: Path | None = None,
) -> NoReturn:
    """Undo a start that failed at ``step`` and raise the admin's one-line error.

    ``mounted`` is the root, if this start mounted it; it is unmounted before the
    overlay is moved aside.
    """
    log.info("VM %s: start failed while %s: %s", vm.name, step, exc)
    if mounted is not None:
        try:
            mounting.unmount_tree(mounted, lazy_fallback=True)
        except Exception as undo_exc:  # keep undoing; the first error is the one to report
            log.warning("VM %s: undo after failed start: %s", vm.name, undo_exc)
    kept = ""
    if overlay is not None and overlay.exists():
        with contextlib.suppress(OSError):
            kept = f"; its overlay is kept as {move_aside(overlay).name}"
    with node.db.writer() as conn:
        change_state(conn, vm.id, VmState.STOPPED)
    raise QvdError(f"cannot start VM '{vm.name}': {step} failed: {exc}{kept}") from exc
