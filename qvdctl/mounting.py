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
first, as the stock HKD does.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import subprocess
import sys
from pathlib import Path

from qvdctl.errors import QvdError
from qvdctl.settings import Settings
from qvdproc import mountinfo

log = logging.getLogger(__name__)

NODE_OPTIONS = [
    "-o", "cow", "-o", "max_files=32000", "-o", "suid", "-o", "dev", "-o", "allow_other",
]

MOUNT_TIMEOUT = 120
UMOUNT_TIMEOUT = 60

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
    raise QvdError(f"{path} is still mounted after 64 unmounts")
