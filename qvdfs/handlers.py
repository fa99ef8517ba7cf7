"""What each FUSE request means for the union, written once for every backend.

``UnionFilesystem`` answers the requests of ``qvdfs.fuse.filesystem.Filesystem`` in terms of
``union.core.Union``: it resolves node ids, takes the index lock, calls the union and turns
the result into plain reply values. The native session (``qvdfs.fuse``) calls it directly;
the pyfuse3 backend (``qvdfs.backends.pyfuse3``) adapts the same object.

Requests come from several threads. Everything that touches Nodes runs under
``index.lock``; the data path (read, write, fsync, fallocate, copy_file_range) only looks
up the backing descriptor under it and does its I/O outside, so a cold read or an fsync
holds up nobody else.
"""

from __future__ import annotations

import collections
import errno
import os
import stat
from collections.abc import Callable

from qvdfs.config import MountConfig
from qvdfs.fuse.abi import FOPEN_CACHE_DIR, FOPEN_DIRECT_IO, FOPEN_KEEP_CACHE
from qvdfs.fuse.mount import Atime
from qvdfs.fuse.filesystem import (
    AddDirEntry,
    AddDirEntryPlus,
    Attr,
    Context,
    Entry,
    Notifier,
    NullNotifier,
    Opened,
    SetattrChanges,
)
from qvdformat import syscalls
from qvdfs.union.core import Union, may_drop_privileges
from qvdfs.union.handles import backing_flags
from qvdfs.union.tree import Node, stale
from qvdproc import processes

NAME_MAX = 255
# linux/capability.h: what lets a caller change a file and keep its set-id bits.
CAP_FSETID = 4
# Directory listings kept for readdir streams in progress (see _snapshot).
MAX_LISTING_SNAPSHOTS = 256


def _check_name(name: bytes) -> None:
    # The kernel lets names up to 1024 bytes through; every branch filesystem stops at 255,
    # and a lookup must say so rather than "no such file".
    if len(name) > NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, "file name too long")


class UnionFilesystem:
    """The union's answers to FUSE requests (implements ``qvdfs.fuse.Filesystem``).

    Raises:
        MountError: from the constructor, when a branch cannot be used.
    """

    def __init__(self, config: MountConfig) -> None:
        self.config = config
        # Until ``init``: no kernel has cached anything yet.
        self.notifier: Notifier = NullNotifier()
        self.union = Union(config, self._entry_changed)
        self.index = self.union.index
        self.lock = self.index.lock
        self.attr_timeout = config.attr_timeout
        # With -o noatime the kernel leaves access times alone, and so must our reads and
        # passed-through ones on the branch (root may open any file so).
        self._noatime = os.O_NOATIME if config.fuse_options.atime is Atime.NOATIME else 0
        self.features: frozenset[str] = frozenset()
        # node id -> (generation, entries) of the listing a readdir stream is reading
        self._listings: collections.OrderedDict[int, tuple[int, list[tuple[bytes, Node]]]] = \
            collections.OrderedDict()
        self._listing_generation = 0
        # node id -> (node.changes, the attributes last sent to the kernel); see _attrs
        self._attr_cache: dict[int, tuple[int, Attr]] = {}

    def init(self, features: frozenset[str], notifier: Notifier) -> None:
        self.features = features
        self.notifier = notifier

    def destroy(self) -> None:
        with self.lock:
            self.union.close()

    def counters(self) -> dict[str, int]:
        """The union's own counters, beside the session's per-opcode ones."""
        return {"copy_ups": self.index.copy_ups, "nodes": len(self.index.nodes),
                "open_files": len(self.union.files)}

    def _entry_changed(self, parent: Node, name: bytes) -> None:
        # Called by the union with the index lock held; the notifier only queues.
        self.notifier.invalidate_entry(parent.id, name)
        # A cached listing holds the old node id of the name.
        self.notifier.invalidate_inode(parent.id)

    # -- replies ------------------------------------------------------------------------

    def _node(self, node_id: int) -> Node:
        return self.index.get(node_id)

    def _attrs(self, node: Node, st: os.stat_result | None = None) -> Attr:
        """The node's attributes, from the cache while still true.

        Every change of metadata goes through this daemon, which drops a node's cached
        attributes when it changes it, so a warm ``ls -l`` costs no system call. Data need
        not: while a file is open, passed-through reads change its access time, and writes
        and shared mappings its size and times, behind our back, so such a file is always
        asked (and its cache dropped at its last close).
        """
        cached = self._attr_cache.get(node.id)
        if (cached is not None and cached[0] == node.changes and not node.unlinked
                and not node.opens):
            return cached[1]
        if st is None:
            st = self.union.getattr(node)
        attr = Attr.from_stat(node.id, st, self.union.nlink(node, st))
        if len(self._attr_cache) > 2 * len(self.index.nodes) + 1024:
            # Node ids are never reused: drop the ones the index has let go, now and then.
            self._attr_cache = {id_: c for id_, c in self._attr_cache.items()
                                if id_ in self.index.nodes}
        self._attr_cache[node.id] = (node.changes, attr)
        return attr

    def _attr_timeout(self, node: Node) -> float:
        """How long the kernel may keep ``node``'s attributes: not at all while the file is
        open for writing, since a shared mapping of a passed-through file changes its times
        with no request to anybody; the first stat after the last close asks again."""
        return 0.0 if node.has_writer() else self.attr_timeout

    def _entry(self, node: Node, st: os.stat_result | None = None,
               attr_timeout: float | None = None) -> Entry:
        """An entry handed to the kernel, which now holds one more lookup of ``node``;
        its attributes kept for ``attr_timeout`` (default: ``_attr_timeout``)."""
        entry = Entry(node.id, self._attrs(node, st), self.config.entry_timeout,
                      self._attr_timeout(node) if attr_timeout is None else attr_timeout)
        node.lookups += 1
        return entry

    def _mode(self, parent: Node, mode: int, ctx: Context) -> int:
        """The caller's mode after its umask, which the kernel leaves to us with ACLs on.

        A directory with a default ACL ignores the umask: the branch's filesystem then
        derives the mode from that ACL as the entry is created.
        """
        if not ctx.umask or self.union.has_default_acl(parent):
            return mode
        return mode & ~ctx.umask

    # -- lookups and attributes -----------------------------------------------------------

    def lookup(self, parent: int, name: bytes, ctx: Context) -> Entry:
        _check_name(name)
        with self.lock:
            try:
                node, st = self.union.lookup(self._node(parent), name)
            except FileNotFoundError:
                # A zero id caches the miss in the kernel: shells, ld.so and Python probe
                # many names that do not exist.
                return Entry(0, None, self.config.negative_timeout, 0)
            return self._entry(node, st)

    def forget(self, node_id: int, count: int) -> None:
        with self.lock:
            node = self.index.nodes.get(node_id)
            if node is not None:
                self.index.forget(node, count)

    def getattr(self, node_id: int, fh: int | None, ctx: Context) -> tuple[Attr, float]:
        with self.lock:
            node = self._node(node_id)
            return self._attrs(node), self._attr_timeout(node)

    def setattr(self, node_id: int, fh: int | None, changes: SetattrChanges,
                ctx: Context) -> tuple[Attr, float]:
        with self.lock:
            node = self._node(node_id)
            self.union.setattr(node, mode=changes.mode, uid=changes.uid, gid=changes.gid,
                               size=changes.size, atime_ns=changes.atime_ns,
                               mtime_ns=changes.mtime_ns, fh=fh)
            if changes.kill_suidgid and changes.mode is None:
                # The reply carries the new mode: no invalidation needed.
                self.union.kill_privileges(node, _in_group_or_capable(ctx))
            return self._attrs(node), self._attr_timeout(node)

    def readlink(self, node_id: int, ctx: Context) -> bytes:
        with self.lock:
            return self.union.readlink(self._node(node_id))

    def statfs(self, node_id: int) -> os.statvfs_result:
        with self.lock:
            return self.union.statfs()

    # -- creating and removing entries ------------------------------------------------------

    def mkdir(self, parent: int, name: bytes, mode: int, ctx: Context) -> Entry:
        _check_name(name)
        with self.lock:
            pnode = self._node(parent)
            mode = self._mode(pnode, mode, ctx)
            node, _, made = self.union.create_entry(
                pnode, name, stat.S_IFDIR, ctx.uid, ctx.gid,
                lambda dirfd, n: os.mkdir(n, stat.S_IMODE(mode), dir_fd=dirfd))
            return self._entry(node, made)

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, ctx: Context) -> Entry:
        _check_name(name)
        if stat.S_ISCHR(mode) and rdev == 0:
            # A 0/0 device is a whiteout on disk; letting one be made would let a
            # container forge deletions.
            raise OSError(errno.EPERM, "a 0/0 character device is a whiteout")
        with self.lock:
            pnode = self._node(parent)
            mode = self._mode(pnode, mode, ctx)
            node, _, made = self.union.create_entry(
                pnode, name, stat.S_IFMT(mode), ctx.uid, ctx.gid,
                lambda dirfd, n: os.mknod(n, mode, rdev, dir_fd=dirfd))
            return self._entry(node, made)

    def symlink(self, parent: int, name: bytes, target: bytes, ctx: Context) -> Entry:
        _check_name(name)
        with self.lock:
            node, _, made = self.union.create_entry(
                self._node(parent), name, stat.S_IFLNK, ctx.uid, ctx.gid,
                lambda dirfd, n: os.symlink(target, n, dir_fd=dirfd))
            return self._entry(node, made)

    def link(self, node_id: int, new_parent: int, new_name: bytes, ctx: Context) -> Entry:
        _check_name(new_name)
        with self.lock:
            node = self.union.link(self._node(node_id), self._node(new_parent), new_name)
            return self._entry(node)

    def unlink(self, parent: int, name: bytes, ctx: Context) -> None:
        _check_name(name)
        with self.lock:
            self.union.unlink(self._node(parent), name)

    def rmdir(self, parent: int, name: bytes, ctx: Context) -> None:
        _check_name(name)
        with self.lock:
            self.union.rmdir(self._node(parent), name)

    def rename(self, parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int,
               ctx: Context) -> None:
        _check_name(name)
        _check_name(new_name)
        with self.lock:
            self.union.rename(self._node(parent), name, self._node(new_parent), new_name, flags)

    # -- files ----------------------------------------------------------------------------

    def _opened(self, fh: int, privileged: bool | None = None) -> Opened:
        """The reply to an open: the page cache survives opens, since every change to a
        file's data goes through this daemon and the kernel.

        ``privileged``: whether the file has set-id bits a write drops or a capability,
        when the caller knows it already (a file it just created); None: ask the branch.
        """
        if self.config.direct_io:
            return Opened(fh, FOPEN_DIRECT_IO)
        handle = self.union.files.get(fh)
        if privileged is None:
            privileged = handle.writable and self.union.has_privileges(handle.node)
        if handle.writable and privileged:
            # A passed-through write never reaches us, and with HANDLE_KILLPRIV_V2 the
            # kernel leaves dropping set-id bits and capabilities to us: serve it ourselves.
            return Opened(fh, FOPEN_KEEP_CACHE)
        return Opened(fh, FOPEN_KEEP_CACHE, handle.fd)

    def open(self, node_id: int, flags: int, ctx: Context, kill_suidgid: bool = False) -> Opened:
        with self.lock:
            node = self._node(node_id)
            fh = self.union.files.open(node, flags | self._noatime)
            if kill_suidgid:
                try:
                    self._kill_privileges(node, ctx)
                except BaseException:
                    self.union.files.release(fh)  # the kernel gets an error, not a handle
                    raise
            opened = self._opened(fh)
            if opened.backing_fd is not None and node.has_writer():
                # What the kernel cached before this open would outlive writes through a
                # mapping of it (see _attr_timeout).
                self.notifier.invalidate_attributes(node.id)
            return opened

    def create(self, parent: int, name: bytes, mode: int, flags: int,
               ctx: Context) -> tuple[Entry, Opened]:
        _check_name(name)
        open_flags = backing_flags((flags & ~os.O_ACCMODE) | os.O_RDWR, False)
        with self.lock:
            pnode = self._node(parent)
            mode = self._mode(pnode, mode, ctx)
            node, fd, made = self.union.create_entry(
                pnode, name, stat.S_IFREG, ctx.uid, ctx.gid,
                lambda dirfd, n: os.open(n, open_flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                         | os.O_CLOEXEC, stat.S_IMODE(mode), dir_fd=dirfd))
            assert fd is not None
            fh = self.union.files.adopt(node, fd)
            # The new file is empty, so no shared mapping can change it (a write there is
            # SIGBUS) before a write, fallocate or truncation, and the kernel drops the
            # attributes it keeps after each of those itself: they may be kept the usual
            # time, which spares the GETATTR its open would send at once (issue 24).
            entry = self._entry(node, made, self.attr_timeout)
            assert entry.attr is not None
            # A new file has no capability; its set-id bits are the ones asked for.
            return entry, self._opened(fh, privileged=may_drop_privileges(entry.attr.mode))

    def _drop_privileges_unasked(self, node: Node, ctx: Context) -> None:
        """Drop set-id bits and capabilities before a change the kernel sends no
        KILL_SUIDGID flag with (fallocate, copy_file_range): with HANDLE_KILLPRIV_V2 it
        leaves that to us, so we ask ``/proc`` whether the caller holds CAP_FSETID.

        A caller in another user namespace (a container's root) counts as lacking it, even
        where the kernel would let it keep the bits of a file its namespace owns: we cannot
        see which files that is, and dropping a bit is the safe side.
        """
        if not self.union.has_privileges(node):
            return
        caller = processes.credentials(ctx.pid)
        if caller is None or not caller.capable(CAP_FSETID):
            self._kill_privileges(node, ctx)

    def _kill_privileges(self, node: Node, ctx: Context) -> None:
        if self.union.kill_privileges(node, _in_group_or_capable(ctx)):
            # The kernel keeps the mode it cached: after a write or an fallocate it asks
            # again for sizes and times only.
            self.notifier.invalidate_attributes(node.id)

    def _fd(self, fh: int) -> int:
        with self.lock:
            return self.union.files.get(fh).fd

    def read(self, node_id: int, fh: int, offset: int, size: int) -> bytes:
        return os.pread(self._fd(fh), size, offset)

    def write(self, node_id: int, fh: int, offset: int, data: memoryview,
              unprivileged: Context | None) -> int:
        with self.lock:
            handle = self.union.files.get(fh)
            stale(handle.node)
            if unprivileged is not None:
                self._kill_privileges(handle.node, unprivileged)
            fd = handle.fd
        return os.pwrite(fd, data, offset)

    def flush(self, node_id: int, fh: int) -> None:
        # Every write reaches the branch file at once, so a close(2) has nothing to flush;
        # after this one ENOSYS the kernel sends no more FLUSH requests.
        raise OSError(errno.ENOSYS, "nothing to flush")

    def release(self, node_id: int, fh: int) -> None:
        with self.lock:
            self.union.files.release(fh)

    def fsync(self, node_id: int, fh: int, datasync: bool) -> None:
        (os.fdatasync if datasync else os.fsync)(self._fd(fh))

    def fallocate(self, node_id: int, fh: int, offset: int, length: int, mode: int,
                  ctx: Context) -> None:
        with self.lock:
            handle = self.union.files.get(fh)
            if not handle.writable:
                raise OSError(errno.EBADF, "file not open for writing")
            stale(handle.node)
            self._drop_privileges_unasked(handle.node, ctx)
            fd = handle.fd
        syscalls.fallocate(fd, mode, offset, length)

    def lseek(self, node_id: int, fh: int, offset: int, whence: int) -> int:
        return os.lseek(self._fd(fh), offset, whence)

    def copy_file_range(self, node_in: int, fh_in: int, offset_in: int, node_out: int,
                        fh_out: int, offset_out: int, length: int, flags: int,
                        ctx: Context) -> int:
        if flags:
            raise OSError(errno.EINVAL, "copy_file_range takes no flags")
        with self.lock:
            src = self.union.files.get(fh_in).fd
            out = self.union.files.get(fh_out)
            if not out.writable:
                raise OSError(errno.EBADF, "file not open for writing")
            stale(out.node)
            self._drop_privileges_unasked(out.node, ctx)
            dst = out.fd
        return os.copy_file_range(src, dst, length, offset_in, offset_out)

    # -- directories ----------------------------------------------------------------------

    def opendir(self, node_id: int, flags: int, ctx: Context) -> Opened:
        if "no_opendir" in self.features:
            # The kernel then never asks again, and keeps listings in its cache.
            raise OSError(errno.ENOSYS, "no opendir needed")
        with self.lock:
            if not self._node(node_id).is_dir:
                raise OSError(errno.ENOTDIR, "not a directory")
        return Opened(0, FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE)

    def releasedir(self, node_id: int, fh: int) -> None:
        pass

    def fsyncdir(self, node_id: int, fh: int, datasync: bool) -> None:
        pass

    def _listing_from(self, node: Node, offset: int) -> tuple[int, int, list[tuple[bytes, Node]]]:
        """(generation, position, entries) for a readdir stream at ``offset``.

        Without OPENDIR there is no handle to keep a stream's listing in, so the offsets
        handed to the kernel carry it: the position in the high 32 bits and the listing's
        generation in the low ones. A stream keeps reading the listing it started with, so a
        change meanwhile neither skips nor repeats an entry. A stream whose listing was
        dropped (more than MAX_LISTING_SNAPSHOTS in progress) goes on in a fresh one.
        The position leads so that offsets grow along the listing: seekdir to any value
        below the last offset a stream saw lands on an entry, as on a local filesystem.
        """
        position, generation = offset >> 32, offset & 0xFFFFFFFF
        kept = self._listings.get(node.id)
        if offset == 0 or kept is None or kept[0] != generation:
            self._listing_generation = (self._listing_generation + 1) & 0x7FFFFFFF
            parent = node.parent or node
            kept = (self._listing_generation,
                    [(b".", node), (b"..", parent), *self.union.entries(node)])
            self._listings[node.id] = kept
            if len(self._listings) > MAX_LISTING_SNAPSHOTS:
                self._listings.popitem(last=False)
        else:
            self._listings.move_to_end(node.id)
        return kept[0], position, kept[1]

    def readdir(self, node_id: int, fh: int, offset: int, add: AddDirEntry) -> None:
        with self.lock:
            node = self._node(node_id)
            if not node.is_dir:
                raise OSError(errno.ENOTDIR, "not a directory")
            generation, position, entries = self._listing_from(node, offset)
            for i in range(position, len(entries)):
                name, child = entries[i]
                if child.unlinked:
                    continue
                kind = stat.S_IFDIR if child.is_dir else stat.S_IFMT(self._attrs(child).mode)
                if not add(name, child.id, kind, _offset(i + 1, generation)):
                    return

    def readdirplus(self, node_id: int, fh: int, offset: int, add: AddDirEntryPlus) -> None:
        with self.lock:
            node = self._node(node_id)
            if not node.is_dir:
                raise OSError(errno.ENOTDIR, "not a directory")
            generation, position, entries = self._listing_from(node, offset)
            for i in range(position, len(entries)):
                name, child = entries[i]
                if child.unlinked:
                    continue
                try:
                    attr = self._attrs(child)
                except OSError:
                    continue
                entry = Entry(child.id, attr, self.config.entry_timeout,
                              self._attr_timeout(child))
                if not add(name, entry, _offset(i + 1, generation)):
                    return
                # The kernel takes a lookup reference for every entry but "." and "..".
                if name not in (b".", b".."):
                    child.lookups += 1

    # -- extended attributes -------------------------------------------------------------

    def getxattr(self, node_id: int, name: bytes, ctx: Context) -> bytes:
        with self.lock:
            return self.union.getxattr(self._node(node_id), name)

    def listxattr(self, node_id: int, ctx: Context) -> list[bytes]:
        with self.lock:
            return self.union.listxattr(self._node(node_id))

    def setxattr(self, node_id: int, name: bytes, value: bytes, flags: int, ctx: Context,
                 kill_sgid: bool = False) -> None:
        with self.lock:
            node = self._node(node_id)
            self.union.setxattr(node, name, value, flags)
            if kill_sgid:
                self.union.drop_setgid(node)

    def removexattr(self, node_id: int, name: bytes, ctx: Context) -> None:
        with self.lock:
            self.union.removexattr(self._node(node_id), name)


def _offset(position: int, generation: int) -> int:
    """A readdir offset: see ``UnionFilesystem._listing_from``."""
    return position << 32 | generation


def _in_group_or_capable(ctx: Context) -> Callable[[int], bool]:
    """Whether the caller of ``ctx`` is in a group (its filesystem gid, or one of its
    supplementary groups, which FUSE does not send) or holds CAP_FSETID, which keeps a
    set-group-id bit the same way (the kernel's ``in_group_or_capable``): root's chown
    comes with KILL_SUIDGID too. ``/proc`` is asked only past the first test, for a
    set-group-id file that is not group-executable, which is rare."""
    def in_group(gid: int) -> bool:
        if gid == ctx.gid:
            return True
        caller = processes.credentials(ctx.pid)
        return caller is not None and (caller.in_group(gid) or caller.capable(CAP_FSETID))
    return in_group
