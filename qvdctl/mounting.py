"""Mounting and unmounting a VM's root, the three ways ``vm.lxc.unionfs.type`` names.

- ``qvdfs``: the native mode. Our own union, run from this interpreter's bin
  folder with the node's options, merges overlay, base *and* home in one mount
  (``OVERLAY=RW:BASE=RO:HOME=RW@/home``), so LXC has no home to bind-mount.
- ``unionfs-fuse``: exactly the stock node's command line (SPEC §3), with the
  binary from ``command.unionfs-fuse`` and the words of
  ``command.unionfs-fuse.args.extra`` right after it. Pointing that setting at
  qvdfs or at the stock binary must both work. LXC bind-mounts the home later.
- ``overlayfs``: kernel overlayfs, for comparison; its workdir sits beside the
  overlay (``<overlay>.work``). LXC bind-mounts the home later.

The FUSE programs daemonize and exit 0 only once mounted; we still check the
mount table, since "exit 0 and nothing mounted" must not pass for a start.
Unmounting is a plain ``umount`` of every mount at or below the root, deepest
first, as the stock HKD does. A FUSE root then has its connection ended for good: a
copy of the mount in another process's mount namespace (an admin's ``unshare -m``
shell, a tool's sandbox made while the VM ran) would keep the daemon serving after
our ``umount``, and the next start would put a second daemon on the same overlay.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from qvdctl.errors import QvdError
from qvdctl.settings import Settings
from qvdproc import mountinfo, processes

log = logging.getLogger(__name__)

NODE_OPTIONS = [
    "-o", "cow", "-o", "max_files=32000", "-o", "suid", "-o", "dev", "-o", "allow_other",
]

MOUNT_TIMEOUT = 120
UMOUNT_TIMEOUT = 60
# How long a FUSE daemon may take to exit once its last mount is gone, and once its
# connection is aborted.
DAEMON_GRACE = 2
DAEMON_EXIT_TIMEOUT = 10
FUSE_CONNECTIONS = Path("/sys/fs/fuse/connections")

QVDFS = Path(sys.executable).parent / "qvdfs"


@dataclasses.dataclass(frozen=True)
class Branches:
    """The folders that make one VM's root."""

    base: Path
    overlay: Path
    home: Path
    workdir: Path  # used by kernel overlayfs only


def mount_command(kind: str, branches: Branches, rootfs: Path, settings: Settings) -> list[str]:
    """The argv that mounts ``rootfs`` for union type ``kind``."""
    b = branches
    if kind == "qvdfs":
        union = f"{b.overlay}=RW:{b.base}=RO:{b.home}=RW@/home"
        # An unprivileged container's root is an idmapped mount of this one.
        idmap = ["-o", "idmap"] if settings["vm.lxc.unprivileged"] == "1" else []
        return [str(QVDFS), *NODE_OPTIONS, *idmap, union, str(rootfs)]
    if kind == "unionfs-fuse":
        extra = shlex.split(settings["command.unionfs-fuse.args.extra"])
        binary = settings["command.unionfs-fuse"]
        return [binary, *extra, *NODE_OPTIONS, f"{b.overlay}=RW:{b.base}=RO", str(rootfs)]
    if kind == "overlayfs":
        opts = f"lowerdir={b.base},upperdir={b.overlay},workdir={b.workdir}"
        return ["mount", "-t", "overlay", "overlay", "-o", opts, str(rootfs)]
    raise QvdError(f"unknown vm.lxc.unionfs.type '{kind}'")


def home_in_union(kind: str) -> bool:
    """Whether the union itself serves /home (else the container must bind-mount it)."""
    return kind == "qvdfs"


def mount_root(kind: str, branches: Branches, rootfs: Path, settings: Settings) -> None:
    """Mount the VM root at ``rootfs``.

    Raises:
        QvdError: the command failed, timed out, or exited 0 without a mount.
    """
    cmd = mount_command(kind, branches, rootfs, settings)
    log.info("mounting: %s", shlex.join(cmd))
    try:
        result = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=MOUNT_TIMEOUT
        )
    except FileNotFoundError:
        raise QvdError(f"{kind} mount: program {cmd[0]} not found") from None
    except subprocess.TimeoutExpired:
        raise QvdError(f"{kind} mount: {cmd[0]} did not return within {MOUNT_TIMEOUT} s") from None
    if result.returncode != 0:
        why = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        raise QvdError(f"{kind} mount failed: {why}")
    if not mountinfo.is_mounted(rootfs):
        raise QvdError(f"{kind} mount: {cmd[0]} exited 0 but {rootfs} is not mounted")


def unmount_tree(path: Path, *, lazy_fallback: bool = False) -> None:
    """Unmount everything at or below ``path`` with plain ``umount``, deepest first.

    With ``lazy_fallback`` (stale mounts left by a crash), a mount that refuses
    is detached with ``umount -l`` instead, and a warning logged.

    Raises:
        QvdError: something is still mounted afterwards.
    """
    for _ in range(64):  # bounded: a path can be mounted over several times
        points = mountinfo.mounts_under(path)
        if not points:
            return
        point = points[0]
        fuse = _fuse_mount(point)
        result = subprocess.run(
            ["umount", point], capture_output=True, text=True, timeout=UMOUNT_TIMEOUT
        )
        if result.returncode != 0 and lazy_fallback:
            log.warning("umount %s failed (%s); detaching it lazily", point, result.stderr.strip())
            result = subprocess.run(
                ["umount", "-l", point], capture_output=True, text=True, timeout=UMOUNT_TIMEOUT
            )
        if result.returncode != 0:
            why = (result.stderr.strip().splitlines() or ["unknown error"])[-1]
            raise QvdError(f"cannot unmount {point}: {why}")
        if fuse is not None:
            _end_fuse_connection(point, *fuse)
    raise QvdError(f"{path} is still mounted after 64 unmounts")


def _fuse_mount(point: str) -> tuple[int, list[int]] | None:
    """For the FUSE mount on top at ``point``: its connection number and the pids of its
    daemons, the processes that name ``point`` in their command line and hold /dev/fuse
    open (so an admin's ``tail -f`` of that path is never taken for one); None for any
    other mount."""
    top = [m for m in mountinfo.read_mounts() if m.mount_point == point][-1:]
    if not top or not (top[0].fs_type == "fuse" or top[0].fs_type.startswith("fuse.")):
        return None
    # The connection is named by the superblock's device number (major 0, so the minor).
    connection = int(top[0].device.split(":")[1])
    return connection, [p.pid for p in processes.with_argument(point)
                         if "/dev/fuse" in processes.open_files(p.pid)]


def _end_fuse_connection(point: str, connection: int, daemons: list[int]) -> None:
    """After ``umount point``: make sure the mount's daemons are gone, ending the FUSE
    connection for good if a copy of the mount still holds it.

    A daemon whose last mount went exits at once. One still serving a moment later serves
    a copy in another mount namespace: the connection is aborted through fusectl (mounted
    here if the node's init has not), so the daemon's next read fails and it exits, and
    the copy answers ENOTCONN. Where that cannot be done, killing the daemon ends the
    connection too (the kernel aborts it when its /dev/fuse closes).

    Raises:
        QvdError: a daemon of the mount still runs after all that.
    """
    if processes.wait_gone(daemons, timeout=DAEMON_GRACE):
        return
    log.warning("%s is still mounted in another mount namespace; ending its FUSE "
                "connection %d", point, connection)
    if not _abort_connection(connection) or not processes.wait_gone(
            daemons, timeout=DAEMON_EXIT_TIMEOUT):
        for pid in daemons:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not processes.wait_gone(daemons, timeout=DAEMON_EXIT_TIMEOUT):
            alive = [pid for pid in daemons if processes.alive(pid)]
            raise QvdError(f"the FUSE daemon of {point} (pid {', '.join(map(str, alive))}) "
                           f"still runs after its connection ended")


def _abort_connection(connection: int) -> bool:
    """Abort FUSE connection ``connection`` through fusectl; whether that could be done."""
    if not mountinfo.is_mounted(FUSE_CONNECTIONS):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", str(FUSE_CONNECTIONS)],
                       capture_output=True, timeout=UMOUNT_TIMEOUT)
    try:
        (FUSE_CONNECTIONS / str(connection) / "abort").write_text("1")
    except OSError as exc:
        log.warning("cannot abort FUSE connection %d through fusectl: %s", connection, exc)
        return False
    return True
