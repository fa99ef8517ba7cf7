"""Open files: the backing descriptor behind each FUSE file handle.

An open for writing (or with O_TRUNC) copies the file up first, so a writable handle always
holds the upper file. A read-only open holds whichever file has the data then, possibly in a
lower branch; when the file is copied up later, ``OpenFiles.get`` moves the handle to the
upper copy at its next use, so every reader sees the writer's data as on kernel overlayfs.

Locking (see ``qvdfs.union.tree``): every method runs under ``Index.lock``; ``open`` and
``truncate`` change the union and take ``Index.changing``. The data path (read, write,
fsync) only fetches a descriptor under the lock and does its I/O outside it, which is why a
replaced descriptor is not closed at once (``Handle.retired``).
"""

from __future__ import annotations

import contextlib
import errno
import os

from qvdformat import syscalls
from qvdfs.union import copyup
from qvdfs.union.entry import OpenEntry
from qvdfs.union.tree import Index, Node, stale

# O_DIRECT too: the kernel hands the daemon buffers of any alignment, and a passthrough
# open gets the caller's O_DIRECT from the kernel itself.
_OPEN_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_DIRECT


def backing_flags(flags: int, writeback: bool) -> int:
    """Flags to open a backing file with, for a FUSE open with ``flags``.

    With the kernel's writeback cache, the kernel fills partial pages by reading and
    computes append offsets itself: a writable backing file must be readable too, and
    O_APPEND must go (the kernel's offsets are already the end of the file).
    """
    flags &= ~_OPEN_STRIP
    if writeback and (flags & os.O_ACCMODE) != os.O_RDONLY:
        flags = (flags & ~(os.O_ACCMODE | os.O_APPEND)) | os.O_RDWR
    return flags


class Handle:
    """An open file: the backing descriptor and where its data came from."""

    __slots__ = ("node", "fd", "data_branch", "writable", "entry", "retired")

    def __init__(self, node: Node, fd: int, data_branch: int, writable: bool) -> None:
        self.node = node
        self.fd = fd
        self.data_branch = data_branch
        self.writable = writable
        # A writable handle's descriptor never changes: the entry that changes the file
        # through it is made once, not per request (see ``OpenFiles.writer``).
        self.entry = OpenEntry(fd) if writable else None
        # Descriptors replaced after a copy-up, closed at release: a read on another
        # thread may still be using one, and a closed number could be reused meanwhile.
        self.retired: tuple[int, ...] = ()


class OpenFiles:
    """The open file handles of a union, by handle number."""

    def __init__(self, index: Index) -> None:
        self.index = index
        self._handles: dict[int, Handle] = {}
        # node id -> one of its handles open for writing (see ``writer``)
        self._writer: dict[int, Handle] = {}
        self._next_fh = 1

    def __len__(self) -> int:
        return len(self._handles)

    def close(self) -> None:
        for handle in self._handles.values():
            for fd in (handle.fd, *handle.retired):
                os.close(fd)
        self._handles.clear()
        self._writer.clear()

    def open(self, node: Node, flags: int, *, writeback: bool = False) -> int:
        """Open ``node`` with the caller's open(2) ``flags``; return the handle number."""
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if writable or flags & os.O_TRUNC:
            with self.index.changing(node):
                if flags & os.O_TRUNC:
                    self.truncate(node, 0, None)
                else:
                    copyup.copy_up(self.index, node, data=True)
        flags = backing_flags(flags, writeback)
        if node.unlinked:
            # Opened again through /proc/PID/fd/N: see ``_reopen_removed``.
            branch = node.branch if writable else self.index.data_location(node)[0]
            fd = self._reopen_removed(node, branch, flags)
        else:
            if writable:
                branch, dirfd, name = node.branch, self.index.parent_fd(node, node.branch), node.name
            else:
                branch, dirfd, name = self.index.data_location(node)
            fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
        return self._register(Handle(node, fd, branch, writable))

    def _reopen_removed(self, node: Node, branch: int, flags: int) -> int:
        """A new descriptor, with ``flags``, of the removed file ``node`` in ``branch``.

        Its old name is gone or names another file by now, which an open by name would
        reach (a write there would change somebody else's file): see ``held_fd``.
        """
        # A magic link, which O_NOFOLLOW would refuse.
        return os.open(b"/proc/self/fd/%d" % self.held_fd(node, branch), flags | os.O_CLOEXEC)

    def adopt(self, node: Node, fd: int) -> int:
        """Register ``fd``, opened read-write by ``create``, as a handle of ``node``."""
        return self._register(Handle(node, fd, node.branch, True))

    def _register(self, handle: Handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        handle.node.opens += 1
        handle.node.writers += handle.writable
        if handle.writable:
            self._writer.setdefault(handle.node.id, handle)
        return fh

    def held_fd(self, node: Node, branch: int | None = None) -> int:
        """A descriptor of ``node``'s file held by one of its handles; with ``branch``, one of
        the file in that branch (a read-only handle opened before a copy-up may still hold
        the lower file). The only way to a removed file, whose old name may name another by
        now: ENOENT if no handle holds one."""
        for handle in self._handles.values() if node.opens else ():
            if handle.node is node and branch in (None, handle.data_branch):
                return handle.fd
        raise OSError(errno.ENOENT, "the entry was removed")

    def writer(self, node: Node) -> OpenEntry | None:
        """``node``'s file through a descriptor open for writing, if one of its handles has
        one: that is the file in ``node``'s branch (a writable open copies up first). The
        kernel names no handle for fchmod, fchown or futimens, so any writer's will do."""
        handle = self._writer.get(node.id) if node.writers else None
        return None if handle is None else handle.entry

    def get(self, fh: int) -> Handle:
        """The handle ``fh``, following its file's data to the upper branch if need be."""
        handle = self._handles[fh]
        node = handle.node
        if not handle.writable and not node.unlinked and handle.data_branch != node.data_branch:
            # The file was copied up since this read-only open: follow its data.
            branch, dirfd, name = self.index.data_location(node)
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
            handle.retired += (handle.fd,)
            handle.fd, handle.data_branch = fd, branch
        return handle

    def release(self, fh: int) -> None:
        handle = self._handles.pop(fh)
        # Passed-through reads move the access time, and shared mappings the data and its
        # times, without a request.
        stale(handle.node)
        for fd in (handle.fd, *handle.retired):
            os.close(fd)
        handle.node.opens -= 1
        handle.node.writers -= handle.writable
        if self._writer.get(handle.node.id) is handle:
            del self._writer[handle.node.id]
            if handle.node.writers:  # another writer of the file is still open
                self._writer[handle.node.id] = next(
                    h for h in self._handles.values() if h.node is handle.node and h.writable)
        self.index.maybe_free(handle.node)

    def truncate(self, node: Node, size: int, fh: int | None) -> None:
        """Set the size of the file ``node`` (through the writable handle ``fh`` if given),
        copying it up first. The caller is inside ``Index.changing``."""
        if node.is_dir:
            raise OSError(errno.EISDIR, "is a directory")
        # A removed file: only a whole copy in its branch can be changed (``copy_up``
        # refuses one whose data is still in a lower branch).
        copyup.copy_up(self.index, node, data=size != 0 or node.unlinked)
        handle = self._handles.get(fh) if fh is not None else None
        if handle is not None and handle.writable:
            os.ftruncate(handle.fd, size)
        elif node.unlinked:
            fd = self._reopen_removed(node, node.branch, os.O_WRONLY)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
        else:
            dirfd = self.index.parent_fd(node, node.branch)
            fd = os.open(node.name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
        if self.index.is_metacopy(node):
            pfd = self.index.parent_fd(node, node.branch)
            for attr in (node.stack.xattrs.metacopy, node.stack.xattrs.redirect):
                with contextlib.suppress(OSError):
                    syscalls.removexattr_at(pfd, node.name, attr)
            self.index.drop_data_location(node)
