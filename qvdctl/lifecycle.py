"""A VM's life on this node: from ``stopped`` to a running container and back.

    vm start:  prepare_and_mount(node, vm) -> MountedRoot      state: starting
               start_container(vm, mounted_root)                state: running
    vm stop:   stop_container(vm, settings)                     state: stopping
               unmount_and_release(node, vm)                    state: stopped (or zombie)
    vm list:   reconcile(node)                                  running -> zombie if broken

``start_container`` / ``stop_container`` are the one seam to the container
layer (``qvdctl/container/seam.py``). The setting ``vm.start.mount_only=1``
skips the container and leaves the VM ``running`` with only its root mounted
(tests, or an admin inspecting a root).

Failure contract of a start: whatever step fails, the steps already done are
undone in reverse, the VM's overlay (if this start got as far as preparing it)
is renamed ``deleteme-...`` for the admin to read, the VM is ``stopped``, and
one QvdError names the VM, the failed step and the kept overlay. If undoing
the container itself fails, nothing under it is touched (no unmount, no
rename: a container may still run on that root) and the VM is ``zombie``.

``zombie`` means "this VM serves nobody, and something of it is left on the
node": a cleanup that failed, or (found by ``vm list``) a VM recorded
``running`` whose container died or was stopped from outside, or whose union
daemon died under it. It is never silently reset to ``stopped``, since its
root may still be mounted and its overlay busy; the next ``vm stop`` or
``vm start`` of it retries the whole cleanup (container, veth, config, mounts)
and only then calls it ``stopped``.

Concurrency: ``vm start`` and ``vm stop`` of one VM hold that VM's lock
(``Storage.vm_lock``) from their first state change to their last, so a stop
issued during a start waits for the start to end, then stops what it started.
The lock dies with its process: a VM found ``starting`` or ``stopping`` by the
holder of its lock was left so by a command that crashed, and ``vm stop``
cleans it up.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import errno
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import NoReturn, TypeVar

from qvdctl import locks, mounting
from qvdctl.container import seam
from qvdctl.container.launch import LaunchError
from qvdctl.db import store
from qvdctl.errors import QvdError
from qvdctl.images.extract import ensure_extracted, find_root
from qvdctl.network.addresses import mac_for_ip
from qvdctl.node import Node
from qvdctl.progress import status
from qvdctl.storage import Storage, move_aside

log = logging.getLogger(__name__)

T = TypeVar("T")

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


# What the admin reads for each step of the container layer's launch.
LAUNCH_STEPS = {
    "network": "setting up the network",
    "config": "writing the container config",
    "start": "starting the container",
}


def start_container(vm: Vm, mounted_root: MountedRoot) -> None:
    """Start the LXC container ``qvd-<id>`` on ``mounted_root`` and wait until its init runs.

    Raises:
        LaunchError: a step failed; the container layer undid its own steps, unless
            ``cleanup_error`` says that failed too.
        Exception: a setting or VM value the container config cannot take.
    """
    seam.start_vm_container(
        vm_id=vm.id, vm_name=vm.name, ip=vm.ip, rootfs=mounted_root.rootfs,
        home=None if mounted_root.home_in_union else mounted_root.home,
        memory_mb=vm.memory, settings=mounted_root.settings,
    )  # fmt: skip


def stop_container(vm: Vm, settings: Mapping[str, str]) -> None:
    """Stop ``vm``'s container (halt, hard stop after ``vm.stop.timeout``), veth and config.

    Idempotent: no container is fine. ``settings`` gives the lxcpath; a wrong one
    would make a running container look absent.
    """
    seam.stop_vm_container(vm_id=vm.id, settings=settings)


# --- start ---------------------------------------------------------------------


@contextlib.contextmanager
def _vm_locked(node: Node, vm_id: int) -> Iterator[Vm]:
    """Hold VM ``vm_id``'s lock; yield the VM as the database has it once the lock is ours."""
    storage = node.storage()
    storage.ensure()
    with locks.exclusive(storage.vm_lock(vm_id)):
        yield load_vm(node, vm_id)


def start_vm(node: Node, vm: Vm) -> MountedRoot:
    """``vm start``: mount the root, then start the container on it.

    Waits for any start or stop of the same VM in progress (see the module
    docstring). A zombie is cleaned up first, then started.

    Raises:
        QvdError: one line naming the VM and the failed step; see the module docstring.
    """
    with _vm_locked(node, vm.id) as vm:
        if vm.state == "zombie":
            log.info("VM %s is a zombie: retrying its cleanup before the start", vm.name)
            _stop(node, vm)
        return _start(node, vm)


def _start(node: Node, vm: Vm) -> MountedRoot:
    mounted = prepare_and_mount(node, vm)
    if mounted.settings["vm.start.mount_only"] != "1":
        try:
            start_container(vm, mounted)
        except LaunchError as exc:
            if exc.cleanup_error:
                _zombie_after_start(node, vm, exc)
            step = LAUNCH_STEPS.get(exc.step, "starting the container")
            undo = [lambda: mounting.unmount_tree(mounted.rootfs, lazy_fallback=True)]
            _fail_start(node, vm, step, exc, undo, mounted.overlay)
        except Exception as exc:
            undo = [lambda: mounting.unmount_tree(mounted.rootfs, lazy_fallback=True)]
            _fail_start(node, vm, "starting the container", exc, undo, mounted.overlay)
    with node.db.writer() as conn:
        store.set_vm_state(conn, vm.id, "running")
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


def _zombie_after_start(node: Node, vm: Vm, exc: LaunchError) -> NoReturn:
    """A failed launch whose own cleanup failed: leave everything in place, mark a zombie."""
    with node.db.writer() as conn:
        store.set_vm_state(conn, vm.id, "zombie")
    step = LAUNCH_STEPS.get(exc.step, "starting the container")
    raise QvdError(
        f"cannot start VM '{vm.name}': {step} failed: {exc}; it is now a zombie"
        " (vm stop retries the cleanup)"
    ) from exc


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
    """``vm stop``: stop the container, then unmount and release the root.

    Waits for any start or stop of the same VM in progress (see the module
    docstring). Also the cleanup of a zombie: every step is idempotent, so it is
    simply run again.

    Raises:
        QvdError: the VM is not in a stoppable state, or a step failed (it is then zombie).
    """
    with _vm_locked(node, vm.id) as vm:
        _stop(node, vm)


def _stop(node: Node, vm: Vm) -> None:
    with node.db.writer() as conn:
        if not store.set_vm_state(conn, vm.id, "stopping", expect=STOPPABLE):
            state = store.get_vm(conn, vm.id)["state"]
            raise QvdError(f"VM '{vm.name}' is {state}; there is nothing to stop")
    settings = node.settings()
    try:
        if _may_have_container(vm, settings):
            stop_container(vm, settings)
    except Exception as exc:
        with node.db.writer() as conn:
            store.set_vm_state(conn, vm.id, "zombie")
        raise QvdError(
            f"VM '{vm.name}': stopping the container failed: {exc}; it is now a zombie"
        ) from exc
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
        with node.db.writer() as conn:
            store.set_vm_state(conn, vm.id, "zombie")
        raise QvdError(
            f"VM '{vm.name}' could not be cleaned up ({exc}); it is now a zombie"
        ) from exc
    with node.db.writer() as conn:
        store.set_vm_state(conn, vm.id, "stopped", host_id=None)
    log.info("VM %s stopped", vm.name)


# --- vm list: the database against what runs -----------------------------------

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
            if row["state"] == "running" and row["host"] == node_name
        ]  # fmt: skip
    if not running:
        return []  # no liblxc query: `vm list` stays instant on an idle node
    storage = Storage.from_settings(settings)
    containers = None
    if settings["vm.start.mount_only"] != "1":
        containers = seam.vm_container_states(settings=settings)
    marked = []
    for row in running:
        why = _root_problem(storage.rootfs_entry(row["user_id"], row["id"]))
        if why is None and containers is not None:
            why = _container_problem(row["id"], containers, seam.lxcpath_from(settings))
        if why is None:
            continue
        with node.db.writer() as conn:
            if store.set_vm_state(conn, row["id"], "zombie", expect=("running",)):
                log.warning("VM %s: %s; marked zombie (vm stop cleans it up)", row["name"], why)
                marked.append((row["name"], why))
    return marked


def _root_problem(rootfs: Path) -> str | None:
    """Why the mounted root at ``rootfs`` does not serve, or None if it does."""
    if not mounting.is_mounted(rootfs):
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


def _container_problem(vm_id: int, containers: Mapping[int, str], lxcpath: Path) -> str | None:
    """Why VM ``vm_id``'s container does not run, or None if it does."""
    state = containers.get(vm_id)
    if state == "RUNNING":
        return None
    # liblxc asks a running container over an abstract socket of the network namespace
    # that started it; from another namespace it answers STOPPED. Its monitor process
    # is visible from anywhere, so that decides.
    if _has_monitor(f"qvd-{vm_id}", lxcpath):
        return None
    return "its container is gone" if state is None else f"its container is {state.lower()}"


def _has_monitor(name: str, lxcpath: Path) -> bool:
    """Whether liblxc's monitor ``[lxc monitor] <lxcpath> <name>`` runs (one per container)."""
    wanted = f"[lxc monitor] {lxcpath} {name}".encode()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if cmdline.rstrip(b"\0") == wanted:
                return True
    return False


# --- several VMs at once -------------------------------------------------------


def run_each(
    action: Callable[[Vm], T], vms: list[Vm], limit: int
) -> list[tuple[Vm, T | None, QvdError | None]]:
    """Run ``action`` on every VM, at most ``limit`` at a time; one failure stops no other.

    Returns (vm, result, error) in the order of ``vms``, with exactly one of result
    and error set. Only QvdError is caught: anything else is a bug and propagates
    once every running action has finished.
    """
    if len(vms) <= 1 or limit <= 1:
        return [_attempt(action, vm) for vm in vms]
    # Threads, since each action is blocking (the container seam runs its own trio loop
    # per call). On Ctrl+C the process still waits for its worker threads before it
    # exits, so each action in progress ends through its own success or failure path.
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(limit, len(vms))) as pool:
        futures = [pool.submit(_attempt, action, vm) for vm in vms]
    return [future.result() for future in futures]


def _attempt(action: Callable[[Vm], T], vm: Vm) -> tuple[Vm, T | None, QvdError | None]:
    try:
        return vm, action(vm), None
    except QvdError as exc:
        return vm, None, exc
