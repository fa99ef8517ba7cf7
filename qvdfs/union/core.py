"""The union's operations, in terms of Nodes: what each FUSE request means here.

``Union`` owns the stacks, the index and the open files. Its methods raise plain
``OSError``; the request layer (``qvdfs.handlers``) turns them into replies. Beside it:

- ``tree``: the Nodes, merged listings, and the two locks every module follows;
- ``copyup``: bringing entries (and, for a rename, whole trees) into the upper branch;
- ``whiteout``: writing and replacing whiteouts, in either on-disk format;
- ``rename``: rename and RENAME2;
- ``handles``: open files (``Union.files``), truncation;
- ``entry``: an entry to change in place, through a writer's descriptor or by name;
- ``markers`` and ``syscalls``: the on-disk formats and the no-symlink-following calls.

Locking (see ``qvdfs.union.tree``): every method runs under ``index.lock``, held by the
caller; each change runs inside ``index.changing``, which takes the mutation lock first.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Callable

from qvdfs.config import MountConfig, MountError
from qvdformat import markers, syscalls
from qvdfs.union import copyup, rename, whiteout
from qvdfs.union.branch import Branch, Stack
from qvdfs.union.entry import Entry, NamedEntry, OpenEntry
from qvdfs.union.handles import OpenFiles
from qvdfs.union.tree import (Index, Node, forget_absent_xattrs, known_absent,
                              note_absent_xattr, stale)

log = logging.getLogger(__name__)

CAPABILITY_XATTR = b"security.capability"


def dropped_by_change(mode: int, gid: int, in_group_or_capable: Callable[[int], bool]) -> int:
    """The set-id bits an unprivileged change of a file's data (or any chown) drops from a
    file of ``mode`` and group ``gid``, as the kernel decides it
    (``setattr_should_drop_suidgid``): set-user-id always; set-group-id when
    group-executable, and else (it then marks mandatory locking) only when the caller is
    outside the file's group and lacks CAP_FSETID."""
    kill = mode & stat.S_ISUID
    if mode & stat.S_ISGID and (mode & stat.S_IXGRP or not in_group_or_capable(gid)):
        kill |= stat.S_ISGID
    return kill


def _require_named(node: Node) -> None:
    """ENOENT for a removed entry, which only a descriptor reaches: its old name may name
    another entry by now (see ``Union._entry``)."""
    if node.unlinked:
        raise OSError(errno.ENOENT, "the entry was removed")


def may_drop_privileges(mode: int) -> bool:
    """Whether an unprivileged change of a file of ``mode`` may drop a set-id bit (which one
    depends on the caller), not counting a file capability."""
    return bool(mode & (stat.S_ISUID | stat.S_ISGID))


class Union:
    def __init__(self, config: MountConfig, invalidate: Callable[[Node, bytes], None]) -> None:
        branches: list[Branch] = []
        try:
            for bc in config.branches:
                branches.append(Branch(bc))
            main = [b for b, bc in zip(branches, config.branches) if bc.graft is None]
            if not main:
                raise MountError("no branch to serve the root of the union")
            self.stack = Stack(main, config.whiteout_format, config.cow, config.overlay_xattrs)
            grafts = {}
            for branch, bc in zip(branches, config.branches):
                if bc.graft is not None:
                    path = tuple(os.fsencode(p) for p in bc.graft.strip("/").split("/"))
                    grafts[path] = Stack([branch], config.whiteout_format, True,
                                         config.overlay_xattrs)
        except BaseException:
            for branch in branches:
                branch.close()
            raise
        self.grafts = list(grafts.values())
        self.index = Index(self.stack, grafts, invalidate)
        self.files = OpenFiles(self.index)
        # (branch path, st_dev, st_ino) -> node, for files with more than one name
        self._links: dict[tuple[str, int, int], Node] = {}

    def close(self) -> None:
        self.files.close()
        for node in list(self.index.nodes.values()):
            self.index.close_fds(node)
        for stack in (self.stack, *self.grafts):
            stack.close()

    # -- attributes ---------------------------------------------------------------------

    def getattr(self, node: Node) -> os.stat_result:
        # A file being written is asked through its descriptor: no path to resolve.
        writer = self.files.writer(node)
        if writer is not None:
            return writer.stat()
        if not node.unlinked or node.is_dir:
            # (A removed folder: through the descriptor it kept, see ``Index.dir_fd``.)
            return self.index.stat(node)
        return os.fstat(self.files.held_fd(node))

    def nlink(self, node: Node, st: os.stat_result) -> int:
        """Link count as the union shows it: a merged directory counts its merged subdirs,
        and a removed one (still open, or replaced by a rename) none."""
        if node.is_dir and node.unlinked:
            return 0
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
        self.index.listing(parent)[name] = known
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
        _require_named(node)
        return os.readlink(node.name, dir_fd=self.index.parent_fd(node, node.branch))

    def statfs(self) -> os.statvfs_result:
        b = self.stack.upper if self.stack.upper is not None else 0
        # fstatfs works on the O_PATH descriptor itself: no /proc path to resolve (systemd
        # asks 250 times in a boot).
        return os.fstatvfs(self.stack.branches[b].root_fd)

    # -- creating entries ---------------------------------------------------------------

    @staticmethod
    def _check_new_name(parent: Node, name: bytes) -> None:
        syscalls.check_name(name)
        if parent.is_stack_root and name in markers.RESERVED_ROOT_NAMES:
            raise OSError(errno.EPERM, "reserved name")

    def create_entry(self, parent: Node, name: bytes, kind: int, uid: int, gid: int,
                     make: Callable[[int, bytes], int | None]
                     ) -> tuple[Node, int | None, os.stat_result | None]:
        """Create ``parent/name`` in the upper branch with ``make(dirfd, name)``.

        ``kind`` is the file type (``stat.S_IFDIR`` ...). ``make`` returns an open fd
        for regular files (handed back to the caller) or None. The new entry belongs
        to ``uid`` and to ``gid``, or to the directory's group if it is setgid. A name
        whited out in the upper branch is replaced atomically; a directory created
        there is opaque, so the old contents stay hidden.

        Returns the node, the fd ``make`` returned, and the entry's attributes when the
        entry was made in place (no whiteout replaced): the stat that checked its owner is
        still true then, and the caller need not ask again. None otherwise.
        """
        self._check_new_name(parent, name)
        with self.index.changing(parent):
            if name in self.index.listing(parent):
                raise OSError(errno.EEXIST, "file exists")
            upper = parent.stack.require_upper()
            pfd = copyup.ensure_dir_on_upper(self.index, parent)
            if os.fstat(pfd).st_mode & stat.S_ISGID:
                gid = -1
            is_dir = kind == stat.S_IFDIR
            in_lower = whiteout.hidden(parent, name)
            fd: int | None = None
            made: os.stat_result | None = None

            def make_owned(dirfd: int, tmp: bytes) -> None:
                nonlocal fd, made
                fd = make(dirfd, tmp)
                try:
                    made = self._chown_new(NamedEntry(dirfd, tmp) if fd is None else OpenEntry(fd),
                                           uid, gid)
                except BaseException:
                    syscalls.remove_at(dirfd, tmp)
                    raise

            try:
                whiteout.build_over(upper, parent, pfd, name, make_owned, is_dir=is_dir)
            except BaseException:
                if fd is not None:
                    os.close(fd)
                raise
            if not is_dir:
                whiteout.unhide(self.index, parent, name)
            node = self.index.new_node(parent, name, parent.stack, is_dir, upper.index)
            node.data_branch = upper.index
            node.in_lower = in_lower
            if is_dir:
                node.listing = {}
            else:
                # A new file has no capability: the kernel's question before its first
                # write and its chown is answered from memory.
                note_absent_xattr(node, CAPABILITY_XATTR)
            self.index.listing(parent)[name] = node
            return node, fd, None if in_lower else made

    @staticmethod
    def _chown_new(entry: Entry, uid: int, gid: int) -> os.stat_result:
        """Give the new entry its owner (-1: the daemon's); return its attributes after that."""
        st = entry.stat()
        if uid in (-1, st.st_uid) and gid in (-1, st.st_gid):
            return st  # made as its owner already: the caller is the daemon's own user (root)
        entry.chown(uid, gid)
        # chown clears set-id bits of non-directories; the caller asked for them.
        if st.st_mode & 0o6000 and not stat.S_ISDIR(st.st_mode) and not stat.S_ISLNK(st.st_mode):
            entry.chmod(stat.S_IMODE(st.st_mode))
        return entry.stat()

    def link(self, node: Node, parent: Node, name: bytes) -> Node:
        if node.is_dir:
            raise OSError(errno.EPERM, "hard link to a directory")
        if node.stack is not parent.stack:
            raise OSError(errno.EXDEV, "cross-branch link")
        _require_named(node)  # (the kernel links no removed file either)
        syscalls.check_name(name)
        with self.index.changing(node, parent):
            if name in self.index.listing(parent):
                raise OSError(errno.EEXIST, "file exists")
            copyup.copy_up(self.index, node, data=True)
            src_fd = self.index.parent_fd(node, node.branch)
            pfd = copyup.ensure_dir_on_upper(self.index, parent)

            def make_link(dirfd: int, new: bytes) -> None:
                os.link(node.name, new, src_dir_fd=src_fd, dst_dir_fd=dirfd, follow_symlinks=False)

            whiteout.build_over(parent.stack.require_upper(), parent, pfd, name, make_link,
                                is_dir=False)
            self.index.listing(parent)[name] = node
            node.aliases += ((parent, name),)
            return node

    # -- removing entries ---------------------------------------------------------------

    def unlink(self, parent: Node, name: bytes) -> None:
        with self.index.changing(parent):
            node = self.index.lookup(parent, name)
            if node.is_dir:
                raise OSError(errno.EISDIR, "is a directory")
            self._remove(parent, name, node)

    def rmdir(self, parent: Node, name: bytes) -> None:
        with self.index.changing(parent):
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
        upper = stack.require_upper()
        if not stack.cow and node.in_lower:
            raise OSError(errno.EROFS, "entry lives in a read-only branch")
        pfd = copyup.ensure_dir_on_upper(self.index, parent)
        if node.in_lower:
            whiteout.writer(stack).hide(self.index, parent, pfd, name, replace=node.on_upper)
        elif node.is_dir:
            upper.discard(pfd, name)
        else:
            os.unlink(name, dir_fd=pfd)
        del self.index.listing(parent)[name]
        self.index.drop_name(node, parent, name)

    # -- rename ---------------------------------------------------------------------------

    def rename(self, parent_old: Node, name_old: bytes, parent_new: Node, name_new: bytes,
               flags: int) -> None:
        """See ``qvdfs.union.rename``."""
        self._check_new_name(parent_new, name_new)
        with self.index.changing(parent_old, parent_new):
            rename.rename(self.index, parent_old, name_old, parent_new, name_new, flags)

    # -- metadata -----------------------------------------------------------------------

    def setattr(self, node: Node, *, mode: int | None = None, uid: int | None = None,
                      gid: int | None = None, size: int | None = None, atime_ns: int | None = None,
                      mtime_ns: int | None = None, fh: int | None = None) -> None:
        with self.index.changing(node):
            if size is not None:
                self.files.truncate(node, size, fh)
            if mode is None and uid is None and gid is None and atime_ns is None and mtime_ns is None:
                return
            copyup.copy_up(self.index, node, data=False)
            entry = self._entry(node)
            if uid is not None or gid is not None:
                entry.chown(-1 if uid is None else uid, -1 if gid is None else gid)
            if mode is not None:
                entry.chmod(stat.S_IMODE(mode))
            if atime_ns is not None or mtime_ns is not None:
                entry.utime(atime_ns, mtime_ns)

    def _entry(self, node: Node) -> Entry:
        """``node``'s entry in its branch, to read or change in place (a caller that changes
        it has copied it up).

        A file being written is reached through its writer's descriptor: tar and dpkg set
        owner, mode and times before they close a file, and so pay one system call each
        and no path to resolve. A removed file still open only through a descriptor one of
        its handles holds: its old name is gone or names another entry by now, which a
        change by name would alter (``copyup.copy_up`` refuses such a file of a lower
        branch). Anything else through its folder and name.
        """
        writer = self.files.writer(node)
        if writer is not None:
            return writer
        if node.unlinked:
            return OpenEntry(self.files.held_fd(node, node.branch))
        dirfd, name = self.index.entry_ref(node, node.branch)
        return NamedEntry(dirfd, name)

    def getxattr(self, node: Node, attr: bytes) -> bytes:
        """The value of ``attr``; a name the entry is known to lack (``tree.known_absent``)
        is answered without asking the branch."""
        if attr.startswith(self.stack.xattrs.prefix) or known_absent(node, attr):
            raise OSError(errno.ENODATA, "no such attribute")
        try:
            return self._entry(node).getxattr(attr)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                note_absent_xattr(node, attr)
            raise

    def listxattr(self, node: Node) -> list[bytes]:
        names = (os.fsencode(n) for n in self._entry(node).listxattr())
        return [n for n in names if not n.startswith(self.stack.xattrs.prefix)]

    def setxattr(self, node: Node, attr: bytes, value: bytes, flags: int = 0) -> None:
        """Set ``attr``; ``flags`` are os.XATTR_CREATE / os.XATTR_REPLACE."""
        if attr.startswith(self.stack.xattrs.prefix):
            raise OSError(errno.EPERM, "reserved attribute")
        with self.index.changing(node):
            if flags & os.XATTR_REPLACE:
                self.getxattr(node, attr)  # ENODATA before any copy-up
            copyup.copy_up(self.index, node, data=False)
            forget_absent_xattrs(node)
            self._entry(node).setxattr(attr, value, flags)

    def has_privileges(self, node: Node) -> bool:
        """Whether an unprivileged change of the file ``node`` may have to drop something."""
        return may_drop_privileges(self._entry(node).stat().st_mode) or self._has_capability(node)

    def _has_capability(self, node: Node) -> bool:
        try:
            self.getxattr(node, CAPABILITY_XATTR)
        except OSError:
            return False
        return True

    def kill_privileges(self, node: Node, in_group_or_capable: Callable[[int], bool]) -> bool:
        """Drop set-id bits (see ``dropped_by_change``) and file capabilities, as the kernel
        does when an unprivileged caller writes, truncates, allocates or chowns; whether
        anything was dropped."""
        with self.index.changing(node):
            st = self.getattr(node)
            kill = dropped_by_change(st.st_mode, st.st_gid, in_group_or_capable)
            has_cap = self._has_capability(node)
            if not (kill or has_cap):
                return False
            copyup.copy_up(self.index, node, data=False)
            # A file being written (root's chown of it, an unlinked one too) through its
            # descriptor; see ``_entry``.
            entry = self._entry(node)
            if kill:
                entry.chmod(stat.S_IMODE(st.st_mode) & ~kill)
            if has_cap:
                with contextlib.suppress(OSError):
                    entry.removexattr(CAPABILITY_XATTR)
            return True

    def drop_setgid(self, node: Node) -> None:
        """Drop the set-group-id bit, as the kernel does when a caller outside the file's
        group sets its access ACL (the kernel tells us: ``SETXATTR_ACL_KILL_SGID``)."""
        with self.index.changing(node):
            entry = self._entry(node)
            mode = entry.stat().st_mode
            if mode & stat.S_ISGID:
                entry.chmod(stat.S_IMODE(mode) & ~stat.S_ISGID)

    def removexattr(self, node: Node, attr: bytes) -> None:
        if attr.startswith(self.stack.xattrs.prefix):
            raise OSError(errno.EPERM, "reserved attribute")
        with self.index.changing(node):
            self.getxattr(node, attr)  # ENODATA before any copy-up
            copyup.copy_up(self.index, node, data=False)
            self._entry(node).removexattr(attr)
