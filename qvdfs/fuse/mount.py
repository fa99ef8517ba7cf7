"""Mounting a FUSE filesystem without libfuse: open /dev/fuse, then mount(2) with its fd.

Only root mounts this way (no fusermount3 helper); qvdfs runs as root on the node.
The options are the ones the daemon already parses from unionfs-fuse's command line;
the defaults follow libfuse: nosuid and nodev unless ``suid`` / ``dev`` are given.
"""

from __future__ import annotations

import ctypes
import dataclasses
import enum
import os
import stat

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_DIRSYNC = 128
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_STRICTATIME = 1 << 24
MNT_FORCE = 1
MNT_DETACH = 2

# None: the C library this interpreter already runs on. find_library would spawn
# `ldconfig -p` on every mount (about a tenth of qvdfs' mount time).
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class Atime(enum.Enum):
    """When the kernel updates access times: mount(8)'s three policies."""

    RELATIME = "relatime"  # the default: once past the mtime, or a day old
    NOATIME = "noatime"
    STRICTATIME = "strictatime"


# relatime is the kernel's default: mount(2) needs no flag for it.
_ATIME_FLAGS = {Atime.RELATIME: 0, Atime.NOATIME: MS_NOATIME, Atime.STRICTATIME: MS_STRICTATIME}


@dataclasses.dataclass(slots=True)
class MountOptions:
    """The libfuse mount options a mount is given, typed (``qvdfs.cmdline`` reads them from
    the command line); ``data``, ``flags`` and ``fstype`` are their mount(2) form,
    ``libfuse_strings`` their form for libfuse (pyfuse3)."""

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
    # The generic mount flags every file system takes (mount(8)'s ro, noexec, noatime ...).
    read_only: bool = False
    exec: bool = True
    atime: Atime = Atime.RELATIME
    diratime: bool = True
    sync: bool = False
    dirsync: bool = False

    def libfuse_strings(self) -> set[str]:
        """The options as libfuse's ``-o`` words; nosuid and nodev are libfuse's defaults,
        as they are mount(2)'s here."""
        words = {f"fsname={self.fsname}"}
        words.update(name for name in ("allow_other", "allow_root", "default_permissions",
                                       "suid", "dev") if getattr(self, name))
        if self.subtype is not None:
            words.add(f"subtype={self.subtype}")
        if self.max_read is not None:
            words.add(f"max_read={self.max_read}")
        for word, on in (("ro", self.read_only), ("noexec", not self.exec),
                         ("nodiratime", not self.diratime), ("sync", self.sync),
                         ("dirsync", self.dirsync)):
            if on:
                words.add(word)
        if self.atime is not Atime.RELATIME:
            words.add(self.atime.value)
        return words

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
        return ((0 if self.suid else MS_NOSUID) | (0 if self.dev else MS_NODEV)
                | (MS_RDONLY if self.read_only else 0) | (0 if self.exec else MS_NOEXEC)
                | _ATIME_FLAGS[self.atime] | (0 if self.diratime else MS_NODIRATIME)
                | (MS_SYNCHRONOUS if self.sync else 0) | (MS_DIRSYNC if self.dirsync else 0))

    @property
    def fstype(self) -> str:
        return f"fuse.{self.subtype}" if self.subtype else "fuse"


def mount(mountpoint: str, opts: MountOptions) -> int:
    """Open /dev/fuse and mount it on ``mountpoint``; return the /dev/fuse descriptor.

    Raises:
        OSError: /dev/fuse cannot be opened or mount(2) fails; the message names both.
    """
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
