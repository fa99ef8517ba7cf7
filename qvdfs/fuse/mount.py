"""Mounting a FUSE filesystem without libfuse: open /dev/fuse, then mount(2) with its fd.

Only root mounts this way (no fusermount3 helper); qvdfs runs as root on the node.
The options are the ones the daemon already parses from unionfs-fuse's command line;
the defaults follow libfuse: nosuid and nodev unless ``suid`` / ``dev`` are given.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import stat
from collections.abc import Iterable

MS_NOSUID = 2
MS_NODEV = 4
MNT_FORCE = 1
MNT_DETACH = 2

# None: the C library this interpreter already runs on. find_library would spawn
# `ldconfig -p` on every mount (about a tenth of qvdfs' mount time).
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


@dataclasses.dataclass(frozen=True, slots=True)
class MountOptions:
    """What the parsed option strings mean for mount(2) and for the session."""

    fsname: str = "qvdfs"
    subtype: str | None = None
    allow_other: bool = False
    # allow_root: the kernel lets everybody in (allow_other) and the session turns away
    # callers other than root and the mounting user.
    allow_root: bool = False
    default_permissions: bool = False
    suid: bool = False
    dev: bool = False
    max_read: int | None = None

    @classmethod
    def parse(cls, options: Iterable[str]) -> MountOptions:
        """Read ``allow_other``, ``allow_root``, ``default_permissions``, ``suid``/``nosuid``,
        ``dev``/``nodev``, ``fsname=X``, ``subtype=X`` and ``max_read=N``; the last of a
        pair wins. Unknown options raise ValueError."""
        values: dict[str, object] = {}
        for opt in options:
            key, eq, value = opt.partition("=")
            if key in ("allow_other", "allow_root", "default_permissions", "suid", "dev") \
                    and not eq:
                values[key] = True
            elif key in ("nosuid", "nodev") and not eq:
                values[key[2:]] = False
            elif key in ("fsname", "subtype") and eq:
                values[key] = value
            elif key == "max_read" and eq:
                values[key] = int(value)
            else:
                raise ValueError(f"unknown FUSE mount option {opt!r}")
        return cls(**values)  # type: ignore[arg-type]

    @property
    def kernel_allow_other(self) -> bool:
        return self.allow_other or self.allow_root

    def data(self, fd: int, rootmode: int = stat.S_IFDIR, uid: int = 0, gid: int = 0) -> str:
        """The ``data`` string of mount(2) for the fuse file system type."""
        parts = [f"fd={fd}", f"rootmode={rootmode:o}", f"user_id={uid}", f"group_id={gid}"]
        if self.kernel_allow_other:
            parts.append("allow_other")
        if self.default_permissions:
            parts.append("default_permissions")
        if self.max_read is not None:
            parts.append(f"max_read={self.max_read}")
        return ",".join(parts)

    @property
    def flags(self) -> int:
        return (0 if self.suid else MS_NOSUID) | (0 if self.dev else MS_NODEV)

    @property
    def fstype(self) -> str:
        return f"fuse.{self.subtype}" if self.subtype else "fuse"


def mount(mountpoint: str, options: MountOptions | Iterable[str]) -> int:
    """Open /dev/fuse and mount it on ``mountpoint``; return the /dev/fuse descriptor.

    Raises:
        OSError: /dev/fuse cannot be opened or mount(2) fails; the message names both.
    """
    opts = options if isinstance(options, MountOptions) else MountOptions.parse(options)
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot open /dev/fuse: {exc.strerror}") from exc
    data = opts.data(fd, uid=os.getuid(), gid=os.getgid())
    if _libc.mount(opts.fsname.encode(), os.fsencode(mountpoint), opts.fstype.encode(),
                   opts.flags, data.encode()) != 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise OSError(err, f"mount -t {opts.fstype} {opts.fsname} {mountpoint} "
                           f"-o {data} failed: {os.strerror(err)}", mountpoint)
    return fd


def unmount(mountpoint: str, lazy: bool = False) -> None:
    """umount2(2), with MNT_DETACH when ``lazy``.

    Raises:
        OSError: the kernel refused (EBUSY while in use and not lazy, EINVAL if not mounted).
    """
    if _libc.umount2(os.fsencode(mountpoint), MNT_DETACH if lazy else 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {mountpoint} failed: {os.strerror(err)}", mountpoint)
