"""A small mirror filesystem over a directory, speaking qvdfs.fuse's Filesystem protocol.

It exists to drive the session for real: every call is counted (``calls``), opens hand out
their descriptor as ``backing_fd`` (unless ``backing`` is off or the node is listed in
``no_backing``), ``redirect`` makes an open of a node open another file (a copy-up seen
from the session), and ``slow`` makes a method sleep.
"""

from __future__ import annotations

import collections
import errno
import os
import stat
import threading
import time
from collections.abc import Callable

from qvdfs.fuse.filesystem import (
    ROOT_ID,
    AddDirEntry,
    AddDirEntryPlus,
    Attr,
    Context,
    Entry,
    Notifier,
    Opened,
    SetattrChanges,
)


class MirrorFS:
    def __init__(self, root: str, *, backing: bool = True, timeout: float = 1.0) -> None:
        self.root = root
        self.backing = backing
        self.timeout = timeout
        self.lock = threading.RLock()
        self.paths: dict[int, str] = {ROOT_ID: root}
        self.ids: dict[str, int] = {root: ROOT_ID}
        self.lookups: collections.Counter[int] = collections.Counter()
        self.next_id = 2
        self.open_fds: set[int] = set()
        self.calls: collections.Counter[str] = collections.Counter()
        self.features: frozenset[str] | None = None
        self.notifier: Notifier | None = None
        self.slow: dict[str, float] = {}
        # A method listed here waits until its event is set (at most 10 s).
        self.gates: dict[str, threading.Event] = {}
        self.redirect: dict[int, str] = {}
        self.no_backing: set[int] = set()
        self.released: list[int] = []
        self.fail: dict[str, Callable[[], BaseException]] = {}

    # ---- bookkeeping ------------------------------------------------------------------

    def _enter(self, name: str) -> None:
        self.calls[name] += 1
        if name in self.fail:
            raise self.fail[name]()
        delay = self.slow.get(name)
        if delay:
            time.sleep(delay)
        gate = self.gates.get(name)
        if gate is not None:
            gate.wait(10)

    def path(self, node_id: int) -> str:
        with self.lock:
            try:
                return self.paths[node_id]
            except KeyError:
                raise OSError(errno.ESTALE, "unknown node") from None

    def child(self, parent: int, name: bytes) -> str:
        return os.path.join(self.path(parent), os.fsdecode(name))

    def _entry(self, path: str, count: bool = True) -> Entry:
        st = os.lstat(path)
        with self.lock:
            node = self.ids.get(path)
            if node is None:
                node = self.next_id
                self.next_id += 1
                self.ids[path] = node
                self.paths[node] = path
            if count:
                self.lookups[node] += 1
        return Entry(node, Attr.from_stat(st.st_ino, st), self.timeout, self.timeout)

    def attr(self, node_id: int) -> Attr:
        st = os.lstat(self.path(node_id))
        return Attr.from_stat(st.st_ino, st)

    def node_of(self, path: str) -> int:
        with self.lock:
            return self.ids[path]

    # ---- the protocol -----------------------------------------------------------------

    def init(self, features: frozenset[str], notifier: Notifier) -> None:
        self.features = features
        self.notifier = notifier

    def destroy(self) -> None:
        self.calls["destroy"] += 1

    def lookup(self, parent: int, name: bytes, ctx: Context) -> Entry:
        self._enter("lookup")
        try:
            return self._entry(self.child(parent, name))
        except FileNotFoundError:
            # A negative entry the kernel may keep as long as positive ones.
            return Entry(0, None, self.timeout, 0)

    def forget(self, node_id: int, count: int) -> None:
        self.calls["forget"] += 1
        with self.lock:
            self.lookups[node_id] -= count

    def getattr(self, node_id: int, fh: int | None, ctx: Context) -> tuple[Attr, float]:
        self._enter("getattr")
        return self.attr(node_id), self.timeout

    def setattr(self, node_id: int, fh: int | None, changes: SetattrChanges,
                ctx: Context) -> tuple[Attr, float]:
        self._enter("setattr")
        path = self.path(node_id)
        if changes.mode is not None:
            os.chmod(path, stat.S_IMODE(changes.mode))
        if changes.uid is not None or changes.gid is not None:
            os.lchown(path, -1 if changes.uid is None else changes.uid,
                      -1 if changes.gid is None else changes.gid)
        if changes.size is not None:
            os.truncate(path, changes.size)
        if changes.atime_ns is not None or changes.mtime_ns is not None:
            st = os.lstat(path)
            os.utime(path, ns=(st.st_atime_ns if changes.atime_ns is None else changes.atime_ns,
                               st.st_mtime_ns if changes.mtime_ns is None else changes.mtime_ns),
                     follow_symlinks=False)
        self.last_setattr = changes
        return self.attr(node_id), self.timeout

    def readlink(self, node_id: int, ctx: Context) -> bytes:
        self._enter("readlink")
        return os.fsencode(os.readlink(self.path(node_id)))

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, ctx: Context) -> Entry:
        self._enter("mknod")
        path = self.child(parent, name)
        os.mknod(path, mode, rdev)
        return self._entry(path)

    def mkdir(self, parent: int, name: bytes, mode: int, ctx: Context) -> Entry:
        self._enter("mkdir")
        path = self.child(parent, name)
        os.mkdir(path, stat.S_IMODE(mode))
        return self._entry(path)

    def symlink(self, parent: int, name: bytes, target: bytes, ctx: Context) -> Entry:
        self._enter("symlink")
        path = self.child(parent, name)
        os.symlink(target, path)
        return self._entry(path)

    def link(self, node_id: int, new_parent: int, new_name: bytes, ctx: Context) -> Entry:
        self._enter("link")
        path = self.child(new_parent, new_name)
        os.link(self.path(node_id), path)
        return self._entry(path)

    def unlink(self, parent: int, name: bytes, ctx: Context) -> None:
        self._enter("unlink")
        os.unlink(self.child(parent, name))

    def rmdir(self, parent: int, name: bytes, ctx: Context) -> None:
        self._enter("rmdir")
        os.rmdir(self.child(parent, name))

    def rename(self, parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int,
               ctx: Context) -> None:
        self._enter("rename")
        old, new = self.child(parent, name), self.child(new_parent, new_name)
        _renameat2(old, new, flags)
        with self.lock:
            a, b = self.ids.pop(old, None), self.ids.pop(new, None)
            if a is not None:
                self.ids[new] = a
                self.paths[a] = new
            if b is not None and flags & RENAME_EXCHANGE:
                self.ids[old] = b
                self.paths[b] = old

    def _opened(self, node_id: int, fd: int) -> Opened:
        with self.lock:
            self.open_fds.add(fd)
        use_backing = self.backing and node_id not in self.no_backing
        return Opened(fd, 0, fd if use_backing else None)

    def open(self, node_id: int, flags: int, ctx: Context, kill_suidgid: bool = False) -> Opened:
        self._enter("open")
        self.last_open_flags = flags
        path = self.redirect.get(node_id) or self.path(node_id)
        fd = os.open(path, flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY))
        return self._opened(node_id, fd)

    def create(self, parent: int, name: bytes, mode: int, flags: int,
               ctx: Context) -> tuple[Entry, Opened]:
        self._enter("create")
        path = self.child(parent, name)
        fd = os.open(path, flags | os.O_CREAT, stat.S_IMODE(mode))
        entry = self._entry(path)
        return entry, self._opened(entry.node_id, fd)

    def read(self, node_id: int, fh: int, offset: int, size: int) -> bytes:
        self._enter("read")
        return os.pread(fh, size, offset)

    def write(self, node_id: int, fh: int, offset: int, data: memoryview,
              unprivileged: Context | None) -> int:
        self._enter("write")
        self.last_write_unprivileged = unprivileged
        return os.pwrite(fh, data, offset)

    def release(self, node_id: int, fh: int) -> None:
        self.calls["release"] += 1
        with self.lock:
            self.open_fds.discard(fh)
            self.released.append(fh)
        os.close(fh)

    def fsync(self, node_id: int, fh: int, datasync: bool) -> None:
        self._enter("fsync")
        (os.fdatasync if datasync else os.fsync)(fh)

    def fallocate(self, node_id: int, fh: int, offset: int, length: int, mode: int,
                  ctx: Context) -> None:
        self._enter("fallocate")
        if mode:
            raise OSError(errno.EOPNOTSUPP, "only mode 0")
        os.posix_fallocate(fh, offset, length)

    def lseek(self, node_id: int, fh: int, offset: int, whence: int) -> int:
        self._enter("lseek")
        return os.lseek(fh, offset, whence)

    def copy_file_range(self, node_in: int, fh_in: int, offset_in: int, node_out: int,
                        fh_out: int, offset_out: int, length: int, flags: int,
                        ctx: Context) -> int:
        self._enter("copy_file_range")
        return os.copy_file_range(fh_in, fh_out, length, offset_in, offset_out)

    def opendir(self, node_id: int, flags: int, ctx: Context) -> Opened:
        self._enter("opendir")
        return Opened(0)

    def _listing(self, node_id: int) -> list[str]:
        return [".", ".."] + sorted(os.listdir(self.path(node_id)))

    def readdir(self, node_id: int, fh: int, offset: int, add: AddDirEntry) -> None:
        self._enter("readdir")
        base = self.path(node_id)
        names = self._listing(node_id)
        for i in range(offset, len(names)):
            st = os.lstat(os.path.join(base, names[i]))
            if not add(os.fsencode(names[i]), st.st_ino, st.st_mode, i + 1):
                return

    def readdirplus(self, node_id: int, fh: int, offset: int, add: AddDirEntryPlus) -> None:
        self._enter("readdirplus")
        base = self.path(node_id)
        names = self._listing(node_id)
        for i in range(offset, len(names)):
            name = names[i]
            if name in (".", ".."):
                st = os.lstat(os.path.join(base, name))
                entry = Entry(node_id, Attr.from_stat(st.st_ino, st), 0, 0)
                if not add(os.fsencode(name), entry, i + 1):
                    return
                continue
            entry = self._entry(os.path.join(base, name), count=False)
            if not add(os.fsencode(name), entry, i + 1):
                return
            with self.lock:
                self.lookups[entry.node_id] += 1

    def releasedir(self, node_id: int, fh: int) -> None:
        self.calls["releasedir"] += 1

    def fsyncdir(self, node_id: int, fh: int, datasync: bool) -> None:
        self._enter("fsyncdir")

    def statfs(self, node_id: int) -> os.statvfs_result:
        self._enter("statfs")
        return os.statvfs(self.root)

    def getxattr(self, node_id: int, name: bytes, ctx: Context) -> bytes:
        self._enter("getxattr")
        return os.getxattr(self.path(node_id), name, follow_symlinks=False)

    def listxattr(self, node_id: int, ctx: Context) -> list[bytes]:
        self._enter("listxattr")
        return [os.fsencode(n) for n in os.listxattr(self.path(node_id),
                                                      follow_symlinks=False)]

    def setxattr(self, node_id: int, name: bytes, value: bytes, flags: int,
                 ctx: Context, kill_sgid: bool = False) -> None:
        self._enter("setxattr")
        self.last_setxattr_kill_sgid = kill_sgid
        os.setxattr(self.path(node_id), name, value, flags, follow_symlinks=False)

    def removexattr(self, node_id: int, name: bytes, ctx: Context) -> None:
        self._enter("removexattr")
        os.removexattr(self.path(node_id), name, follow_symlinks=False)


RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def _renameat2(old: str, new: str, flags: int) -> None:
    if not flags:
        os.rename(old, new)
        return
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100
    if libc.renameat2(at_fdcwd, os.fsencode(old), at_fdcwd, os.fsencode(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), new)


def renameat2(old: str | os.PathLike[str], new: str | os.PathLike[str], flags: int) -> None:
    """renameat2(2) for the tests' own calls through the mount."""
    _renameat2(os.fspath(old), os.fspath(new), flags)

