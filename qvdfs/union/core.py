"""The union's operations, in terms of Nodes: what each FUSE request means here.

``Union`` owns the stacks, the index and the open files. Its methods raise plain
``OSError``; the FUSE layer (``qvdfs.operations``) turns them into replies.

Requests arrive on several threads. Two locks keep them apart:

- ``index.lock`` guards every Node, the index and the open handles. The request layer
  holds it while it calls in here; it is let go only around blocking I/O that touches
  no shared state (``Index.unlocked``), such as the data copy of a large copy-up.
- ``_mutation`` serializes changes to the namespace, across those gaps too: a rename
  that copies a tree up stays one change while lookups and reads go on. It is always
  taken before ``index.lock``, never while holding it, so the two cannot deadlock.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterator

from qvdfs.config import MountConfig, MountError, WhiteoutFormat
from qvdfs.union import copyup, markers, syscalls
from qvdfs.union.branch import Branch, Stack
from qvdfs.union.tree import Index, Node

log = logging.getLogger(__name__)

# O_DIRECT too: the kernel hands the daemon buffers of any alignment, and a passthrough
# open gets the caller's O_DIRECT from the kernel itself.
_OPEN_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_DIRECT
CAPABILITY_XATTR = b"security.capability"


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


def stale(*nodes: Node | None) -> None:
    """Drop the cached attributes of ``nodes``: they changed."""
    for node in nodes:
        if node is not None:
            node.attr = None


class Handle:
    """An open file: the backing descriptor and where its data came from."""

    __slots__ = ("node", "fd", "data_branch", "writable", "retired")

    def __init__(self, node: Node, fd: int, data_branch: int, writable: bool) -> None:
        self.node = node
        self.fd = fd
        self.data_branch = data_branch
        self.writable = writable
        # Descriptors replaced after a copy-up, closed at release: a read on another
        # thread may still be using one, and a closed number could be reused meanwhile.
        self.retired: tuple[int, ...] = ()


class Union:
    def __init__(self, config: MountConfig) -> None:
        branches: list[Branch] = []
        try:
            for bc in config.branches:
                branches.append(Branch(bc))
            main = [b for b, bc in zip(branches, config.branches) if bc.graft is None]
            if not main:
                raise MountError("no branch to serve the root of the union")
            self.stack = Stack(main, config.whiteout_format, config.cow)
            grafts = {}
            for branch, bc in zip(branches, config.branches):
                if bc.graft is not None:
                    path = tuple(os.fsencode(p) for p in bc.graft.strip("/").split("/"))
                    grafts[path] = Stack([branch], config.whiteout_format, cow=True)
        except BaseException:
            for branch in branches:
                branch.close()
            raise
        self.grafts = list(grafts.values())
        self.index = Index(self.stack, grafts)
        self.handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._mutation = threading.Lock()
        # (branch path, st_dev, st_ino) -> node, for files with more than one name
        self._links: dict[tuple[str, int, int], Node] = {}

    def close(self) -> None:
        for handle in self.handles.values():
            for fd in (handle.fd, *handle.retired):
                os.close(fd)
        self.handles.clear()
        for node in list(self.index.nodes.values()):
            self.index.close_fds(node)
        for stack in (self.stack, *self.grafts):
            stack.close()

    @contextlib.contextmanager
    def _changing(self, *nodes: Node | None) -> Iterator[None]:
        """Serialize a change, and forget the cached attributes of the nodes it touches.

        The caller holds ``index.lock``; it is let go while waiting for another change
        to finish (see the module docstring for the order of the locks).
        """
        lock = self.index.lock
        if not self._mutation.acquire(blocking=False):
            lock.release()
            try:
                self._mutation.acquire()
            finally:
                lock.acquire()
        try:
            yield
        finally:
            stale(*nodes)
            self._mutation.release()

    # -- attributes ---------------------------------------------------------------------

    def getattr(self, node: Node) -> os.stat_result:
        if node.unlinked and node.handles:
            return os.fstat(node.handles[0].fd)
        return self.index.stat(node)

    def nlink(self, node: Node, st: os.stat_result) -> int:
        """Link count as the union shows it: a merged directory counts its merged subdirs."""
        if node.is_dir and len(node.layers) > 1:
            return 2 + sum(1 for child in self.index.listing(node).values() if child.is_dir)
        return st.st_nlink

    def lookup(self, parent: Node, name: bytes) -> tuple[Node, os.stat_result]:
        node = self.index.lookup(parent, name)
        st = self.getattr(node)
        return self._merge_hard_link(parent, name, node, st), st

    def _merge_hard_link(self, parent: Node, name: bytes, node: Node, st: os.stat_result) -> Node:
        """Give every name of one backing file the same node, as the kernel expects."""
        if node.is_dir or st.st_nlink < 2:
            return node
        key = (node.stack.branches[node.branch].path, st.st_dev, st.st_ino)
        known = self._links.get(key)
        if known is None or known.unlinked or known is node:
            self._links[key] = node
            return node
        known_st = self.getattr(known)
        if (known_st.st_dev, known_st.st_ino) != (st.st_dev, st.st_ino):
            self._links[key] = node
            return node
        assert parent.listing is not None
        parent.listing[name] = known
        known.aliases += ((parent, name),)
        node.unlinked = True
        self.index.maybe_free(node)
        return known

    def entries(self, dir_: Node) -> list[tuple[bytes, Node]]:
        return list(self.index.listing(dir_).items())

    def has_default_acl(self, dir_: Node) -> bool:
        try:
            self.getxattr(dir_, b"system.posix_acl_default")
            return True
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
                return False
            raise

    def readlink(self, node: Node) -> bytes:
        return os.readlink(node.name, dir_fd=self.index.parent_fd(node, node.branch))

    def statfs(self) -> os.statvfs_result:
        b = self.stack.upper if self.stack.upper is not None else 0
        return os.statvfs(syscalls.proc_fd(self.stack.branches[b].root_fd))

    # -- references to entries ------------------------------------------------------------

    def _ref(self, node: Node, branch: int) -> tuple[int, bytes]:
        """(directory fd, name) that designates ``node``'s entry in ``branch``."""
        if node.is_stack_root:
            return node.stack.branches[branch].root_fd, b"."
        return self.index.parent_fd(node, branch), node.name

    # -- creating entries ---------------------------------------------------------------

    def create_entry(self, parent: Node, name: bytes, kind: int, uid: int, gid: int,
                           make: Callable[[int, bytes], int | None]) -> tuple[Node, int | None]:
        """Create ``parent/name`` in the upper branch with ``make(dirfd, name)``.

        ``kind`` is the file type (``stat.S_IFDIR`` ...). ``make`` returns an open fd
        for regular files (handed back to the caller) or None. The new entry belongs
        to ``uid`` and to ``gid``, or to the directory's group if it is setgid. A name
        whited out in the upper branch is replaced atomically; a directory created
        there is opaque, so the old contents stay hidden.
        """
        syscalls.check_name(name)
        if parent.is_stack_root and name in markers.RESERVED_ROOT_NAMES:
            raise OSError(errno.EPERM, "reserved name")
        with self._changing(parent):
            if name in self.index.listing(parent):
                raise OSError(errno.EEXIST, "file exists")
            pfd = copyup.ensure_dir_on_upper(self.index, parent)
            if os.fstat(pfd).st_mode & stat.S_ISGID:
                gid = -1
            stack = parent.stack
            whiteout = parent.whiteouts.get(name)
            is_dir = kind == stat.S_IFDIR
            fd = None
            if whiteout == "dev":
                work, tmp = stack.work_fd, stack.temp_name()
                fd = make(work, tmp)
                try:
                    self._chown_new(work, tmp, uid, gid)
                    if is_dir:
                        markers.set_opaque(work, tmp)
                        syscalls.renameat2(work, tmp, pfd, name, syscalls.RENAME_EXCHANGE)
                        os.unlink(tmp, dir_fd=work)
                    else:
                        os.rename(tmp, name, src_dir_fd=work, dst_dir_fd=pfd)
                except BaseException:
                    if fd is not None:
                        os.close(fd)
                    syscalls.remove_at(work, tmp)
                    raise
            else:
                fd = make(pfd, name)
                try:
                    self._chown_new(pfd, name, uid, gid)
                except BaseException:
                    if fd is not None:
                        os.close(fd)
                    syscalls.remove_at(pfd, name)
                    raise
                if whiteout == "marker" and not is_dir:
                    branch = stack.branches[stack.upper]
                    markers.unionfs_unhide(branch.meta_fds, self.index.parts(parent), name)
                    del parent.whiteouts[name]
            if whiteout == "dev":
                del parent.whiteouts[name]
            node = self.index.new_node(parent, name, stack, is_dir, stack.upper)
            node.data_branch = stack.upper
            node.in_lower = whiteout is not None
            if is_dir:
                node.listing = {}
            self.index.listing(parent)[name] = node
            return node, fd

    @staticmethod
    def _chown_new(dirfd: int, name: bytes, uid: int, gid: int) -> None:
        st = syscalls.lstat_at(dirfd, name)
        os.chown(name, uid, gid, dir_fd=dirfd, follow_symlinks=False)
        # chown clears set-id bits of non-directories; the caller asked for them.
        if st.st_mode & 0o6000 and not stat.S_ISDIR(st.st_mode) and not stat.S_ISLNK(st.st_mode):
            syscalls.chmod_at(dirfd, name, stat.S_IMODE(st.st_mode))

    def link(self, node: Node, parent: Node, name: bytes) -> Node:
        if node.is_dir:
            raise OSError(errno.EPERM, "hard link to a directory")
        if node.stack is not parent.stack:
            raise OSError(errno.EXDEV, "cross-branch link")
        syscalls.check_name(name)
        with self._changing(node, parent):
            if name in self.index.listing(parent):
                raise OSError(errno.EEXIST, "file exists")
            copyup.copy_up(self.index, node, data=True)
            src_fd = self.index.parent_fd(node, node.branch)
            pfd = copyup.ensure_dir_on_upper(self.index, parent)
            stack = parent.stack
            if parent.whiteouts.get(name) == "dev":
                tmp = stack.temp_name()
                os.link(node.name, tmp, src_dir_fd=src_fd, dst_dir_fd=stack.work_fd, follow_symlinks=False)
                os.rename(tmp, name, src_dir_fd=stack.work_fd, dst_dir_fd=pfd)
                del parent.whiteouts[name]
            else:
                os.link(node.name, name, src_dir_fd=src_fd, dst_dir_fd=pfd, follow_symlinks=False)
            parent.listing[name] = node
            node.aliases += ((parent, name),)
            return node

    # -- removing entries ---------------------------------------------------------------

    def unlink(self, parent: Node, name: bytes) -> None:
        with self._changing(parent):
            node = self.index.lookup(parent, name)
            if node.is_dir:
                raise OSError(errno.EISDIR, "is a directory")
            self._remove(parent, name, node)

    def rmdir(self, parent: Node, name: bytes) -> None:
        with self._changing(parent):
            node = self.index.lookup(parent, name)
            if not node.is_dir:
                raise OSError(errno.ENOTDIR, "not a directory")
            if node.is_stack_root:
                raise OSError(errno.EBUSY, "a grafted branch is mounted here")
            if self.index.listing(node):
                raise OSError(errno.ENOTEMPTY, "directory not empty")
            self._remove(parent, name, node)

    def _remove(self, parent: Node, name: bytes, node: Node) -> None:
        """Take ``parent/name`` out of the union, leaving a whiteout if a lower branch has it."""
        stack = parent.stack
        stale(node)
        upper = copyup.require_upper(node)
        if not stack.cow and node.in_lower:
            raise OSError(errno.EROFS, "entry lives in a read-only branch")
        if node.in_lower:
            pfd = copyup.ensure_dir_on_upper(self.index, parent)
            if stack.whiteout_format is WhiteoutFormat.OVERLAY:
                if node.on_upper:
                    self._replace_with_whiteout(stack, pfd, name)
                else:
                    markers.make_whiteout(pfd, name)
                parent.whiteouts[name] = "dev"
            else:
                if node.on_upper:
                    self._discard(stack, pfd, name)
                branch = stack.branches[upper]
                markers.unionfs_hide(branch.root_fd, self.index.parts(parent), name)
                if not branch.meta_fds:
                    branch.refresh_meta()
                parent.whiteouts[name] = "marker"
        else:
            pfd = self.index.dir_fd(parent, upper)
            assert pfd is not None
            if node.is_dir:
                self._discard(stack, pfd, name)
            else:
                os.unlink(name, dir_fd=pfd)
        del self.index.listing(parent)[name]
        self._drop_name(node, parent, name)

    @staticmethod
    def _primary(node: Node, parent: Node, name: bytes) -> bool:
        return node.parent is parent and node.name == name

    def _drop_name(self, node: Node, parent: Node, name: bytes) -> None:
        """Forget one name of ``node``; the node ends when its last name goes."""
        if self._primary(node, parent, name):
            if node.aliases:
                node.parent, node.name = node.aliases[-1]
                node.aliases = node.aliases[:-1]
                return
            node.unlinked = True
            if node.is_dir:
                self.index.close_fds(node)
            self.index.maybe_free(node)
        else:
            node.aliases = tuple(a for a in node.aliases if a != (parent, name))

    @staticmethod
    def _replace_with_whiteout(stack: Stack, pfd: int, name: bytes) -> None:
        work, tmp = stack.work_fd, stack.temp_name()
        markers.make_whiteout(work, tmp)
        syscalls.renameat2(work, tmp, pfd, name, syscalls.RENAME_EXCHANGE)
        syscalls.remove_at(work, tmp)

    @staticmethod
    def _discard(stack: Stack, pfd: int, name: bytes) -> None:
        """Remove an upper entry (a directory possibly holding whiteouts) in one step."""
        tmp = stack.temp_name()
        os.rename(name, tmp, src_dir_fd=pfd, dst_dir_fd=stack.work_fd)
        syscalls.remove_at(stack.work_fd, tmp)

    # -- rename ---------------------------------------------------------------------------

    def rename(self, parent_old: Node, name_old: bytes, parent_new: Node, name_new: bytes,
                     flags: int) -> None:
        syscalls.check_name(name_new)
        if parent_new.is_stack_root and name_new in markers.RESERVED_ROOT_NAMES:
            raise OSError(errno.EPERM, "reserved name")
        with self._changing(parent_old, parent_new):
            node = self.index.lookup(parent_old, name_old)
            target = self.index.listing(parent_new).get(name_new)
            stale(node, target)
            exchange = bool(flags & syscalls.RENAME_EXCHANGE)
            if node.is_stack_root or (target is not None and target.is_stack_root):
                raise OSError(errno.EBUSY, "a grafted branch is mounted here")
            if parent_new.stack is not node.stack:
                raise OSError(errno.EXDEV, "cross-branch rename")
            if flags & syscalls.RENAME_NOREPLACE and target is not None:
                raise OSError(errno.EEXIST, "file exists")
            if exchange and target is None:
                raise OSError(errno.ENOENT, "no such entry")
            if target is node:
                return
            if target is not None and not exchange:
                if node.is_dir and not target.is_dir:
                    raise OSError(errno.ENOTDIR, "not a directory")
                if not node.is_dir and target.is_dir:
                    raise OSError(errno.EISDIR, "is a directory")
                if target.is_dir and self.index.listing(target):
                    raise OSError(errno.ENOTEMPTY, "directory not empty")
            self._copy_up_whole(node)
            if exchange:
                self._copy_up_whole(target)
            old_pfd = copyup.ensure_dir_on_upper(self.index, parent_old)
            new_pfd = copyup.ensure_dir_on_upper(self.index, parent_new)
            if exchange:
                syscalls.renameat2(old_pfd, name_old, new_pfd, name_new, syscalls.RENAME_EXCHANGE)
                self._move_in_index(node, parent_old, name_old, parent_new, name_new)
                self._move_in_index(target, parent_new, name_new, parent_old, name_old)
                parent_old.listing[name_old] = target
                parent_new.listing[name_new] = node
                node.in_lower, target.in_lower = target.in_lower, node.in_lower
                return
            self._rename_into_place(node, parent_old, name_old, old_pfd, target, parent_new,
                                    name_new, new_pfd)

    def _rename_into_place(self, node: Node, parent_old: Node, name_old: bytes, old_pfd: int,
                           target: Node | None, parent_new: Node, name_new: bytes, new_pfd: int) -> None:
        stack = node.stack
        overlay = stack.whiteout_format is WhiteoutFormat.OVERLAY
        lower_at_new = target.in_lower if target is not None else name_new in parent_new.whiteouts
        if target is not None and target.is_dir and target.on_upper:
            tfd = self.index.dir_fd(target, stack.upper)
            for leftover in os.listdir(tfd):  # only whiteouts remain in an empty-looking dir
                syscalls.remove_at(tfd, leftover)
        if node.is_dir and lower_at_new:
            if overlay:
                markers.set_opaque(old_pfd, name_old)
            else:
                markers.unionfs_hide(stack.branches[stack.upper].root_fd,
                                     self.index.parts(parent_new), name_new)
        if parent_new.whiteouts.get(name_new) == "dev" and node.is_dir:
            os.unlink(name_new, dir_fd=new_pfd)
        if node.in_lower and overlay:
            try:
                syscalls.renameat2(old_pfd, name_old, new_pfd, name_new, syscalls.RENAME_WHITEOUT)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                os.rename(name_old, name_new, src_dir_fd=old_pfd, dst_dir_fd=new_pfd)
                markers.make_whiteout(old_pfd, name_old)
            parent_old.whiteouts[name_old] = "dev"
        else:
            os.rename(name_old, name_new, src_dir_fd=old_pfd, dst_dir_fd=new_pfd)
            if node.in_lower:
                branch = stack.branches[stack.upper]
                markers.unionfs_hide(branch.root_fd, self.index.parts(parent_old), name_old)
                if not branch.meta_fds:
                    branch.refresh_meta()
                parent_old.whiteouts[name_old] = "marker"
        if parent_new.whiteouts.get(name_new) == "dev":
            del parent_new.whiteouts[name_new]
        del parent_old.listing[name_old]
        if target is not None:
            self._drop_name(target, parent_new, name_new)
        parent_new.listing[name_new] = node
        self._move_in_index(node, parent_old, name_old, parent_new, name_new)
        node.in_lower = lower_at_new

    @staticmethod
    def _move_in_index(node: Node, parent_old: Node, name_old: bytes, parent_new: Node,
                       name_new: bytes) -> None:
        if node.parent is parent_old and node.name == name_old:
            node.parent, node.name = parent_new, name_new
        else:
            node.aliases = tuple((parent_new, name_new) if a == (parent_old, name_old) else a
                                 for a in node.aliases)

    def _copy_up_whole(self, node: Node) -> None:
        """Copy ``node`` and, for a directory, everything under it into the upper branch.

        A directory that merged lower branches becomes opaque: it can then move to any
        name and still show exactly what it showed before. (Kernel overlayfs records a
        redirect instead; copying is slower for big trees but needs no new format.)
        """
        if not node.is_dir:
            copyup.copy_up(self.index, node, data=True)
            return
        copyup.ensure_dir_on_upper(self.index, node)
        for child in list(self.index.listing(node).values()):
            self._copy_up_whole(child)
        if len(node.layers) > 1:
            stack = node.stack
            dfd = self.index.dir_fd(node, stack.upper)
            for name in list(node.whiteouts):
                if node.whiteouts[name] == "dev":
                    os.unlink(name, dir_fd=dfd)
            node.whiteouts = {}
            pfd, name = self._ref(node, stack.upper)
            markers.set_opaque(pfd, name)
            if node.redirect is not None:
                syscalls.removexattr_at(pfd, name, markers.REDIRECT_XATTR)
                node.redirect = None
            for b in node.layers[1:]:
                fd = node.fds.pop(b, None)
                if fd is not None:
                    os.close(fd)
            node.layers = [stack.upper]
            for child in self.index.listing(node).values():
                child.in_lower = False

    # -- metadata -----------------------------------------------------------------------

    def setattr(self, node: Node, *, mode: int | None = None, uid: int | None = None,
                      gid: int | None = None, size: int | None = None, atime_ns: int | None = None,
                      mtime_ns: int | None = None, fh: int | None = None) -> None:
        with self._changing(node):
            if size is not None:
                self._truncate(node, size, fh)
            if mode is None and uid is None and gid is None and atime_ns is None and mtime_ns is None:
                return
            copyup.copy_up(self.index, node, data=False)
            dirfd, name = self._ref(node, node.branch)
            if uid is not None or gid is not None:
                os.chown(name, -1 if uid is None else uid, -1 if gid is None else gid,
                         dir_fd=dirfd, follow_symlinks=False)
            if mode is not None:
                syscalls.chmod_at(dirfd, name, stat.S_IMODE(mode))
            if atime_ns is not None or mtime_ns is not None:
                st = syscalls.lstat_at(dirfd, name)
                os.utime(name, ns=(st.st_atime_ns if atime_ns is None else atime_ns,
                                   st.st_mtime_ns if mtime_ns is None else mtime_ns),
                         dir_fd=dirfd, follow_symlinks=False)

    def _truncate(self, node: Node, size: int, fh: int | None) -> None:
        if node.is_dir:
            raise OSError(errno.EISDIR, "is a directory")
        if size == 0:
            copyup.copy_up(self.index, node, data=False)
        else:
            copyup.copy_up(self.index, node, data=True)
        handle = self.handles.get(fh) if fh is not None else None
        if handle is not None and handle.writable:
            os.ftruncate(handle.fd, size)
        else:
            dirfd = self.index.parent_fd(node, node.branch)
            fd = os.open(node.name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
        if self.index.is_metacopy(node):
            pfd = self.index.parent_fd(node, node.branch)
            for attr in (markers.METACOPY_XATTR, markers.REDIRECT_XATTR):
                with contextlib.suppress(OSError):
                    syscalls.removexattr_at(pfd, node.name, attr)
            self.index.drop_data_location(node)

    def getxattr(self, node: Node, attr: bytes) -> bytes:
        if attr.startswith(markers.OVERLAY_XATTR_PREFIX):
            raise OSError(errno.ENODATA, "no such attribute")
        return syscalls.getxattr_at(*self._ref(node, node.branch), attr)

    def listxattr(self, node: Node) -> list[bytes]:
        names = (os.fsencode(n) for n in syscalls.listxattr_at(*self._ref(node, node.branch)))
        return [n for n in names if not n.startswith(markers.OVERLAY_XATTR_PREFIX)]

    def setxattr(self, node: Node, attr: bytes, value: bytes, flags: int = 0) -> None:
        """Set ``attr``; ``flags`` are os.XATTR_CREATE / os.XATTR_REPLACE."""
        if attr.startswith(markers.OVERLAY_XATTR_PREFIX):
            raise OSError(errno.EPERM, "reserved attribute")
        with self._changing(node):
            if flags & os.XATTR_REPLACE:
                self.getxattr(node, attr)  # ENODATA before any copy-up
            copyup.copy_up(self.index, node, data=False)
            syscalls.setxattr_at(*self._ref(node, node.branch), attr, value, flags)

    def kill_privileges(self, node: Node) -> None:
        """Drop set-user-id, set-group-id (when group-executable) and file capabilities,
        as the kernel does when an unprivileged caller writes, truncates or chowns."""
        with self._changing(node):
            dirfd, name = self._ref(node, node.branch)
            mode = syscalls.lstat_at(dirfd, name).st_mode
            kill = stat.S_ISUID | (stat.S_ISGID if mode & stat.S_IXGRP else 0)
            has_cap = True
            try:
                self.getxattr(node, CAPABILITY_XATTR)
            except OSError:
                has_cap = False
            if not (mode & kill or has_cap):
                return
            copyup.copy_up(self.index, node, data=False)
            dirfd, name = self._ref(node, node.branch)
            if mode & kill:
                syscalls.chmod_at(dirfd, name, stat.S_IMODE(mode) & ~kill)
            if has_cap:
                with contextlib.suppress(OSError):
                    syscalls.removexattr_at(dirfd, name, CAPABILITY_XATTR)

    def removexattr(self, node: Node, attr: bytes) -> None:
        if attr.startswith(markers.OVERLAY_XATTR_PREFIX):
            raise OSError(errno.EPERM, "reserved attribute")
        with self._changing(node):
            self.getxattr(node, attr)  # ENODATA before any copy-up
            copyup.copy_up(self.index, node, data=False)
            syscalls.removexattr_at(*self._ref(node, node.branch), attr)

    # -- open files -----------------------------------------------------------------------

    def open(self, node: Node, flags: int, *, writeback: bool = False) -> int:
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if writable or flags & os.O_TRUNC:
            with self._changing(node):
                if flags & os.O_TRUNC:
                    self._truncate(node, 0, None)
                else:
                    copyup.copy_up(self.index, node, data=True)
        return self._open_backing(node, backing_flags(flags, writeback), writable)

    def adopt(self, node: Node, fd: int) -> int:
        """Register ``fd``, opened read-write by ``create``, as a handle of ``node``."""
        return self._register(Handle(node, fd, node.branch, True))

    def _open_backing(self, node: Node, flags: int, writable: bool) -> int:
        if writable:
            branch, dirfd, name = node.branch, self.index.parent_fd(node, node.branch), node.name
        else:
            branch, dirfd, name = self.index.data_location(node)
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
        return self._register(Handle(node, fd, branch, writable))

    def _register(self, handle: Handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = handle
        handle.node.handles += (handle,)
        return fh

    def handle(self, fh: int) -> Handle:
        handle = self.handles[fh]
        node = handle.node
        if not handle.writable and not node.unlinked and handle.data_branch != node.data_branch:
            # The file was copied up since this read-only open: follow its data.
            branch, dirfd, name = self.index.data_location(node)
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
            handle.retired += (handle.fd,)
            handle.fd, handle.data_branch = fd, branch
        return handle

    def release(self, fh: int) -> None:
        handle = self.handles.pop(fh)
        if handle.writable:
            stale(handle.node)  # shared mmap writes may have landed without a write call
        for fd in (handle.fd, *handle.retired):
            os.close(fd)
        handle.node.handles = tuple(h for h in handle.node.handles if h is not handle)
        self.index.maybe_free(handle.node)
