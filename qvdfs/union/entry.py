"""One entry of a branch, to read and change in place: ``Entry``.

The union reaches an entry it changes in one of two ways, and this module is the only place
that knows both:

- ``OpenEntry``: through the descriptor of the file open for writing (tar and dpkg set
  owner, mode and times of a file before they close it): one system call per change and
  no path to resolve. Such a descriptor is always a regular file's, never a symlink's.
  Also a removed file still open: its old name may name another entry by now.
- ``NamedEntry``: through the descriptor of its folder and its name, never following a
  symlink: chown acts on the symlink itself (lchown), chmod of a symlink is refused with
  EOPNOTSUPP as Linux cannot do it (``syscalls.chmod_at``).

An entry is built once per request (``Union._entry``, or over a just-made entry in
``Union.create_entry``) and then says what it changes, the same way whatever it holds.
It owns no descriptor: whoever handed it one keeps it open meanwhile.
"""

from __future__ import annotations

import abc
import os

from qvdformat import syscalls


class Entry(abc.ABC):
    """An entry of a branch: its attributes, read and changed without following a symlink.

    Each method is one system call, with two exceptions: ``utime`` first reads the times it
    is not given (``kept_times``), and by name ``chmod`` is ``syscalls.chmod_at``'s four
    (Linux has no lchmod). ``chown`` takes -1 for an id it leaves alone, as os.chown does.
    """

    __slots__ = ()

    @abc.abstractmethod
    def stat(self) -> os.stat_result:
        """The attributes (lstat: a symlink's own)."""

    @abc.abstractmethod
    def chown(self, uid: int, gid: int) -> None:
        """Give it owner ``uid`` and group ``gid`` (a symlink itself, as lchown)."""

    @abc.abstractmethod
    def chmod(self, mode: int) -> None:
        """Set its permission bits (EOPNOTSUPP for a symlink)."""

    @abc.abstractmethod
    def utime(self, atime_ns: int | None, mtime_ns: int | None) -> None:
        """Set its access and modification times; None keeps that one as it is."""

    @abc.abstractmethod
    def getxattr(self, attr: bytes) -> bytes:
        """The value of its extended attribute ``attr`` (ENODATA if it has none)."""

    @abc.abstractmethod
    def listxattr(self) -> list[str]:
        """The names of its extended attributes."""

    @abc.abstractmethod
    def setxattr(self, attr: bytes, value: bytes, flags: int) -> None:
        """Set its extended attribute ``attr``; ``flags`` are os.XATTR_CREATE/REPLACE."""

    @abc.abstractmethod
    def removexattr(self, attr: bytes) -> None:
        """Remove its extended attribute ``attr`` (ENODATA if it has none)."""


def kept_times(st: os.stat_result, atime_ns: int | None, mtime_ns: int | None) -> tuple[int, int]:
    """The times to set: those given, and ``st``'s where None (os.utime has no UTIME_OMIT).
    Each ``Entry.utime`` calls its own os.utime rather than a shared one, which saves a
    Python call on every SETATTR that sets times (tar -p: one per file)."""
    return (st.st_atime_ns if atime_ns is None else atime_ns,
            st.st_mtime_ns if mtime_ns is None else mtime_ns)


class OpenEntry(Entry):
    """The entry behind ``fd``, a descriptor of a regular file."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def stat(self) -> os.stat_result:
        return os.fstat(self.fd)

    def chown(self, uid: int, gid: int) -> None:
        os.fchown(self.fd, uid, gid)

    def chmod(self, mode: int) -> None:
        os.fchmod(self.fd, mode)

    def utime(self, atime_ns: int | None, mtime_ns: int | None) -> None:
        if atime_ns is None or mtime_ns is None:
            atime_ns, mtime_ns = kept_times(os.fstat(self.fd), atime_ns, mtime_ns)
        os.utime(self.fd, ns=(atime_ns, mtime_ns))

    def getxattr(self, attr: bytes) -> bytes:
        return os.getxattr(self.fd, attr)

    def listxattr(self) -> list[str]:
        return os.listxattr(self.fd)

    def setxattr(self, attr: bytes, value: bytes, flags: int) -> None:
        os.setxattr(self.fd, attr, value, flags)

    def removexattr(self, attr: bytes) -> None:
        os.removexattr(self.fd, attr)


class NamedEntry(Entry):
    """The entry ``name`` in the folder open as ``dirfd`` (``b"."``: that folder itself)."""

    __slots__ = ("dirfd", "name")

    def __init__(self, dirfd: int, name: bytes) -> None:
        self.dirfd = dirfd
        self.name = name

    def stat(self) -> os.stat_result:
        return syscalls.lstat_at(self.dirfd, self.name)

    def chown(self, uid: int, gid: int) -> None:
        os.chown(self.name, uid, gid, dir_fd=self.dirfd, follow_symlinks=False)

    def chmod(self, mode: int) -> None:
        syscalls.chmod_at(self.dirfd, self.name, mode)

    def utime(self, atime_ns: int | None, mtime_ns: int | None) -> None:
        if atime_ns is None or mtime_ns is None:
            atime_ns, mtime_ns = kept_times(self.stat(), atime_ns, mtime_ns)
        os.utime(self.name, ns=(atime_ns, mtime_ns), dir_fd=self.dirfd, follow_symlinks=False)

    def getxattr(self, attr: bytes) -> bytes:
        return syscalls.getxattr_at(self.dirfd, self.name, attr)

    def listxattr(self) -> list[str]:
        return syscalls.listxattr_at(self.dirfd, self.name)

    def setxattr(self, attr: bytes, value: bytes, flags: int) -> None:
        syscalls.setxattr_at(self.dirfd, self.name, attr, value, flags)

    def removexattr(self, attr: bytes) -> None:
        syscalls.removexattr_at(self.dirfd, self.name, attr)
