"""The in-memory index of the union: one Node per visible name, merged listings.

Every change to the branches is made by this daemon, so once a directory's merged
listing is built it is kept up to date by the operations themselves and never read
from disk again: a lookup, positive or negative, is a dictionary access. Nodes live
as long as their name does (and after that, while the kernel or an open file still
holds them), so inode numbers are stable for the life of the mount.

Notes (invariants):
- ``node.branch`` is the index, in ``node.stack.branches``, of the branch whose entry
  is visible; ``node.data_branch`` is where a regular file's data lives (a lower branch
  for a metadata-only copy-up, else the same as ``branch``).
- For a directory, ``node.layers`` lists the branches that contribute to its listing,
  highest first, cut after an opaque one; ``node.branch == node.layers[0]``.
- ``node.in_lower`` is true when some branch other than the upper one has this name,
  so removing it must leave a whiteout.
- ``node.whiteouts`` maps the names whited out in the directory's upper branch to the
  format of the whiteout on disk there (``qvdfs.union.whiteout`` writes and replaces them).

Locking: requests run on several threads, and two locks keep them apart (the rules every
module of the union follows):
- ``Index.lock`` guards every Node, the index and the open files. The request layer
  (``qvdfs.handlers``) holds it while it calls into the union; it is let go only around
  blocking I/O that touches no shared state (``Index.unlocked``), such as the data copy of
  a large copy-up.
- ``Index.changing`` serializes changes to the namespace, across those gaps too: a rename
  that copies a tree up stays one change while lookups and reads go on. Its mutation lock
  is always taken before ``lock``, never while holding it, so the two cannot deadlock.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import stat
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from qvdfs.config import WhiteoutFormat
from qvdformat import markers, syscalls
from qvdfs.union.branch import Stack

log = logging.getLogger(__name__)

_T = TypeVar("_T")

ROOT_ID = 1
MAX_CACHED_DIR_FDS = 4096


# Read-only stand-ins for the layers and whiteouts a file does not have.
_NO_LAYERS: Any = ()
_NO_WHITEOUTS: Any = types.MappingProxyType({})
_NO_FDS: Any = types.MappingProxyType({})


class Node:
    __slots__ = (
        "id", "parent", "name", "stack", "is_dir", "branch", "data_branch", "in_lower",
        "layers", "listing", "whiteouts", "fds", "lookups", "opens", "writers", "unlinked",
        "is_stack_root", "aliases", "redirect", "changes", "absent_xattrs", "absent_in",
    )

    def __init__(self, id_: int, parent: Node | None, name: bytes, stack: Stack,
                 is_dir: bool, branch: int) -> None:
        self.id = id_
        self.parent = parent
        self.name = name
        self.stack = stack
        self.is_dir = is_dir
        self.branch = branch
        # None until looked up (see Index.data_location); files this daemon creates
        # set it at once.
        self.data_branch: int | None = None if not is_dir else branch
        self.in_lower = False
        # A file never has layers or whiteouts; sharing one empty value keeps the tens of
        # thousands of file nodes of a root small.
        self.layers: list[int] = [branch] if is_dir else _NO_LAYERS
        self.listing: dict[bytes, Node] | None = None
        # name -> the format of the whiteout that hides it in the upper branch
        self.whiteouts: dict[bytes, WhiteoutFormat] = {} if is_dir else _NO_WHITEOUTS
        # branch -> descriptor of this directory there (a file: of its metacopy's lower
        # folder, rarely); files share one empty, read-only mapping until then.
        self.fds: dict[int, int] = {} if is_dir else _NO_FDS
        self.lookups = 0
        # How many open files (handles.OpenFiles) hold the node, and how many of them may
        # write: counts, so that the index needs nothing of the open files but whether any.
        self.opens = 0
        self.writers = 0
        self.unlinked = False
        self.is_stack_root = False
        # Other (parent, name) places of a hard-linked file, beside the primary one; a
        # tuple, replaced on change, for the same reason.
        self.aliases: tuple[tuple[Node, bytes], ...] = ()
        # For an upper directory renamed by kernel overlayfs: where its lower part is,
        # as path components from the stack root.
        self.redirect: list[bytes] | None = None
        # Counts the daemon's changes to the node: whoever caches its attributes (the
        # request layer) keeps them only while this stays the same.
        self.changes = 0
        # Extended attributes the node's entry in branch ``absent_in`` is known to lack (see
        # ``absent_xattrs``); the sets are shared between nodes.
        self.absent_xattrs: frozenset[bytes] = _NO_NAMES
        self.absent_in = -1

    def __repr__(self) -> str:
        return f"<Node {self.id} {self.name!r} b{self.branch}{'/' if self.is_dir else ''}>"

    def has_writer(self) -> bool:
        """Whether a handle open for writing may be changing the file's data right now."""
        return self.writers > 0

    @property
    def on_upper(self) -> bool:
        if self.is_stack_root:
            return self.stack.upper is not None
        return self.branch == self.stack.upper


_NO_NAMES: frozenset[bytes] = frozenset()
# The attributes whose absence is remembered: the ones asked about all day (the kernel before
# writes and chowns, ls -l for every entry, the union before every create). A fixed few, so
# that the sets of them are few too, each made once and shared (``_SHARED_NAMES``), and
# names a caller makes up cost no memory.
REMEMBERED_ABSENT = frozenset({b"security.capability", b"security.selinux",
                               b"system.posix_acl_access", b"system.posix_acl_default"})
_SHARED_NAMES: dict[frozenset[bytes], frozenset[bytes]] = {_NO_NAMES: _NO_NAMES}


def known_absent(node: Node, attr: bytes) -> bool:
    """Whether ``node``'s entry is known to lack the extended attribute ``attr``.

    The kernel asks for ``security.capability`` before every first write and every chown
    (to drop it), ``ls -l`` for ``security.selinux`` of every entry, and the union for
    ``system.posix_acl_default`` before every create. The answer is almost always "none",
    and it stays true until the daemon itself sets an attribute on the entry
    (``forget_absent_xattrs``) or moves the node to another branch (a copy-up): the union
    is the only writer of its branches. Writes, truncations and chowns only ever drop
    attributes.
    """
    return node.absent_in == node.branch and attr in node.absent_xattrs


def note_absent_xattr(node: Node, attr: bytes) -> None:
    """Record that the entry of ``node`` in its current branch lacks ``attr`` (if ``attr``
    is one of ``REMEMBERED_ABSENT``)."""
    if attr not in REMEMBERED_ABSENT:
        return
    names = node.absent_xattrs if node.absent_in == node.branch else _NO_NAMES
    grown = names | {attr}
    node.absent_xattrs = _SHARED_NAMES.setdefault(grown, grown)
    node.absent_in = node.branch


def forget_absent_xattrs(node: Node) -> None:
    """An attribute of ``node``'s entry may have been set: know nothing absent."""
    node.absent_xattrs = _NO_NAMES
    node.absent_in = -1


def stale(*nodes: Node | None) -> None:
    """Record that ``nodes`` changed: attributes cached before are stale."""
    for node in nodes:
        if node is not None:
            node.changes += 1


class Index:
    """Owns every Node: numbering, lookup, merged listings and directory descriptors,
    and the two locks (see the module docstring)."""

    def __init__(self, stack: Stack, grafts: dict[tuple[bytes, ...], Stack],
                 invalidate: Callable[[Node, bytes], None]) -> None:
        # Held by whoever reads or changes a Node, the index or the open handles.
        self.lock = threading.Lock()
        self._mutation = threading.Lock()
        self.copy_ups = 0  # files copied up (data or metadata), for the admin's counters
        self.nodes: dict[int, Node] = {}
        self._next_id = ROOT_ID
        self._fd_lru: collections.OrderedDict[tuple[int, int], Node] = collections.OrderedDict()
        self.root = self._stack_root(None, b"", stack)
        # Called with (parent, name) when the kernel's cached entry must be dropped
        # (qvdfs.handlers passes it on to the FUSE layer's notifier).
        self.invalidate = invalidate
        # graft parent path -> {name: graft root node}
        self._grafts: dict[tuple[bytes, ...], dict[bytes, Node]] = {}
        for path, gstack in grafts.items():
            node = self._stack_root(None, path[-1], gstack)
            self._grafts.setdefault(path[:-1], {})[path[-1]] = node

    def _stack_root(self, parent: Node | None, name: bytes, stack: Stack) -> Node:
        node = self.new_node(parent, name, stack, True, 0)
        node.layers = list(range(len(stack.branches)))
        node.is_stack_root = True
        return node

    def unlocked(self, call: Callable[..., _T], *args: Any) -> _T:
        """Run ``call(*args)`` with ``lock`` let go: blocking I/O that touches no Node."""
        self.lock.release()
        try:
            return call(*args)
        finally:
            self.lock.acquire()

    @contextlib.contextmanager
    def changing(self, *nodes: Node | None) -> Iterator[None]:
        """Serialize a change, and forget the cached attributes of the nodes it touches.

        The caller holds ``lock``; it is let go while waiting for another change to
        finish, since the mutation lock is always taken first.
        """
        if not self._mutation.acquire(blocking=False):
            self.lock.release()
            try:
                self._mutation.acquire()
            finally:
                self.lock.acquire()
        try:
            yield
        finally:
            stale(*nodes)
            self._mutation.release()

    # -- numbering --------------------------------------------------------------------

    def new_node(self, parent: Node | None, name: bytes, stack: Stack, is_dir: bool,
                 branch: int) -> Node:
        node = Node(self._next_id, parent, name, stack, is_dir, branch)
        self._next_id += 1
        self.nodes[node.id] = node
        return node

    def get(self, inode: int) -> Node:
        try:
            return self.nodes[inode]
        except KeyError:
            raise OSError(errno.ESTALE, "unknown inode") from None

    def drop_name(self, node: Node, parent: Node, name: bytes) -> None:
        """Forget one name of ``node``; the node ends when its last name goes."""
        if node.parent is parent and node.name == name:
            if node.aliases:
                node.parent, node.name = node.aliases[-1]
                node.aliases = node.aliases[:-1]
                return
            node.unlinked = True
            # A folder keeps its descriptors while something holds it: they are the only
            # way left to the removed folder itself (``dir_fd``).
            self.maybe_free(node)
        else:
            node.aliases = tuple(a for a in node.aliases if a != (parent, name))

    def move_name(self, node: Node, parent_old: Node, name_old: bytes, parent_new: Node,
                  name_new: bytes) -> None:
        """Record that ``node``'s name ``parent_old/name_old`` is now ``parent_new/name_new``."""
        if node.parent is parent_old and node.name == name_old:
            node.parent, node.name = parent_new, name_new
        else:
            node.aliases = tuple((parent_new, name_new) if a == (parent_old, name_old) else a
                                 for a in node.aliases)

    def forget(self, node: Node, count: int) -> None:
        node.lookups -= count
        self.maybe_free(node)

    def maybe_free(self, node: Node) -> None:
        """Drop a removed node once neither the kernel nor an open file holds it."""
        if node.unlinked and node.lookups <= 0 and not node.opens and node.id != ROOT_ID:
            self.nodes.pop(node.id, None)
            self.close_fds(node)

    # -- paths ------------------------------------------------------------------------

    def parts(self, node: Node) -> list[bytes]:
        """Path components of ``node`` relative to the root of its stack."""
        parts = []
        while not node.is_stack_root:
            parts.append(node.name)
            assert node.parent is not None
            node = node.parent
        parts.reverse()
        return parts

    def union_path(self, node: Node) -> bytes:
        parts = []
        while node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return b"/" + b"/".join(reversed(parts))

    # -- directory descriptors --------------------------------------------------------

    def dir_fd(self, node: Node, branch: int) -> int | None:
        """A descriptor of ``node``'s directory in ``branch``, or None if it has none there."""
        fd = node.fds.get(branch)
        if fd is not None:
            self._fd_lru.move_to_end((node.id, branch))
            return fd
        if node.unlinked:
            # Removed: its old name may name another folder by now, whose entries a lookup
            # or listing by name would show.
            return None
        if node.is_stack_root:
            return node.stack.branches[branch].root_fd
        assert node.parent is not None
        if node.redirect is not None and branch != node.stack.upper:
            fd = markers.walk(node.stack.branches[branch].root_fd, node.redirect)
            if fd is None:
                return None
        else:
            pfd = self.dir_fd(node.parent, branch)
            if pfd is None:
                return None
            try:
                fd = syscalls.open_dir(pfd, node.name)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    return None
                raise
        node.fds[branch] = fd
        self._fd_lru[(node.id, branch)] = node
        if len(self._fd_lru) > MAX_CACHED_DIR_FDS:
            (old_id, old_branch), old = self._fd_lru.popitem(last=False)
            os.close(old.fds.pop(old_branch))
        return fd

    def entry_ref(self, node: Node, branch: int) -> tuple[int, bytes]:
        """(directory fd, name) that designates ``node``'s entry in ``branch``."""
        if node.is_stack_root:
            return node.stack.branches[branch].root_fd, b"."
        return self.parent_fd(node, branch), node.name

    def parent_fd(self, node: Node, branch: int) -> int:
        """The descriptor of the directory holding ``node``'s entry in ``branch``."""
        assert node.parent is not None and not node.is_stack_root
        fd = self.dir_fd(node.parent, branch)
        if fd is None:
            raise OSError(errno.ENOENT, "parent directory vanished from its branch")
        return fd

    def close_fds(self, node: Node) -> None:
        for branch, fd in node.fds.items():
            self._fd_lru.pop((node.id, branch), None)
            os.close(fd)
        if node.fds:
            node.fds.clear()

    # -- attributes -------------------------------------------------------------------

    def stat(self, node: Node) -> os.stat_result:
        """The attributes of ``node``'s visible entry, as stored in its branch."""
        if node.is_dir:
            fd = self.dir_fd(node, node.branch)
            if fd is None:
                raise OSError(errno.ENOENT, "directory vanished from its branch")
            return os.fstat(fd)
        return syscalls.lstat_at(self.parent_fd(node, node.branch), node.name)

    # -- lookup and listing -----------------------------------------------------------

    def lookup(self, parent: Node, name: bytes) -> Node:
        if not parent.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        node = self.listing(parent).get(name)
        if node is None:
            raise OSError(errno.ENOENT, "no such entry")
        return node

    def listing(self, dir_: Node) -> dict[bytes, Node]:
        if dir_.listing is None:
            dir_.listing = self._build_listing(dir_)
        return dir_.listing

    def _build_listing(self, dir_: Node) -> dict[bytes, Node]:
        stack = dir_.stack
        entries: dict[bytes, Node] = {}
        hidden: set[bytes] = set()     # whited out by a branch above
        closed: set[bytes] = set()     # a non-directory or opaque entry stops merging below
        dir_.whiteouts = {}
        layers = []
        wanted = set(dir_.layers)
        for b in range(max(dir_.layers) + 1 if dir_.layers else 0):
            branch = stack.branches[b]
            fd = self.dir_fd(dir_, b) if b in wanted else None
            if fd is not None:
                layers.append(b)
                self._scan(dir_, b, fd, entries, hidden, closed)
            # unionfs-fuse markers hide names below their branch, whether or not the
            # directory itself exists in it.
            if branch.meta_fds:
                for name in markers.unionfs_hidden(branch.meta_fds, self.parts(dir_)):
                    if name not in entries:
                        hidden.add(name)
                    elif b == entries[name].branch:
                        closed.add(name)  # recreated after a delete: opaque
                    if b == stack.upper:
                        dir_.whiteouts.setdefault(name, WhiteoutFormat.UNIONFS)
            if fd is not None and markers.is_opaque(fd, b".", stack.xattrs):
                break
        dir_.layers = layers
        grafts = self._grafts.get(tuple(self.parts(dir_)), {}) if stack is self.root.stack else {}
        for name, graft in grafts.items():
            graft.parent = dir_
            entries[name] = graft
        return entries

    def _scan(self, dir_: Node, b: int, fd: int, entries: dict[bytes, Node], hidden: set[bytes],
              closed: set[bytes]) -> None:
        """Merge the entries of ``dir_`` in branch ``b`` into ``entries``."""
        stack = dir_.stack
        for entry in os.scandir(fd):
            name = os.fsencode(entry.name)
            if dir_.is_stack_root and name in markers.RESERVED_ROOT_NAMES:
                continue
            if name in hidden:
                continue
            is_dir = entry.is_dir(follow_symlinks=False)
            special = not (is_dir or entry.is_file(follow_symlinks=False) or entry.is_symlink())
            if special and markers.is_whiteout_stat(entry.stat(follow_symlinks=False)):
                if name not in entries:
                    hidden.add(name)
                    if b == stack.upper:
                        dir_.whiteouts[name] = WhiteoutFormat.OVERLAY
                continue
            node = entries.get(name)
            if node is None:
                node = self.new_node(dir_, name, stack, is_dir, b)
                node.in_lower = b != stack.upper
                entries[name] = node
                if not is_dir:
                    closed.add(name)
                elif b == stack.upper and self._follow_redirect(dir_, node, fd, b):
                    closed.add(name)
                continue
            if b != stack.upper:
                node.in_lower = True
            if node.is_dir and is_dir and name not in closed:
                node.layers.append(b)
            else:
                closed.add(name)

    def _follow_redirect(self, dir_: Node, node: Node, fd: int, upper: int) -> bool:
        """Merge an upper directory (in branch ``upper``) with the lower path its redirect
        names, if it has one."""
        node.redirect = self._redirect(dir_, fd, node.name)
        if node.redirect is None:
            return False
        for b in range(upper + 1, len(node.stack.branches)):
            fd_b = self.dir_fd(node, b)
            if fd_b is not None:
                node.layers.append(b)
                if markers.is_opaque(fd_b, b".", node.stack.xattrs):
                    break
        node.in_lower = True
        return True

    def _redirect(self, parent: Node, pfd: int, name: bytes) -> list[bytes] | None:
        """The lower path (from the stack root) that the redirect xattr of the upper entry
        ``parent/name`` names, if it has one."""
        target = markers.redirect(pfd, name, parent.stack.xattrs)
        if target is None:
            return None
        absolute, parts = target
        return parts if absolute else [*self._lower_parts(parent), *parts]

    def _lower_parts(self, dir_: Node) -> list[bytes]:
        """Where the lower part of directory ``dir_`` is: its own path unless redirected."""
        return dir_.redirect if dir_.redirect is not None else self.parts(dir_)

    def is_metacopy(self, node: Node) -> bool:
        """True for a file whose upper entry holds metadata only."""
        return not node.is_dir and self.data_location(node)[0] != node.branch

    def data_location(self, node: Node) -> tuple[int, int, bytes]:
        """(branch, directory fd, name) of the file that holds ``node``'s data.

        For a metadata-only copy the data is in a lower branch, at the same path or at
        the one its ``trusted.overlay.redirect`` names; the descriptor of that lower
        directory is kept in ``node.fds`` (a file has no other use for it).
        """
        if node.data_branch is None:
            self._resolve_data(node)
        b = node.data_branch
        assert b is not None
        if b == node.branch:
            return b, self.parent_fd(node, b), node.name
        assert node.redirect is not None
        return b, node.fds[b], node.redirect[-1]

    def _resolve_data(self, node: Node) -> None:
        node.data_branch = node.branch
        upper = node.stack.upper
        if upper is None or node.branch != upper:  # (a file: never a stack root)
            return
        pfd = self.parent_fd(node, node.branch)
        if not markers.has_metacopy(pfd, node.name, node.stack.xattrs):
            return
        assert node.parent is not None
        parts = self._redirect(node.parent, pfd, node.name)
        if parts is None:
            parts = [*self._lower_parts(node.parent), node.name]
        for b in range(upper + 1, len(node.stack.branches)):
            fd = markers.walk(node.stack.branches[b].root_fd, parts[:-1])
            if fd is None:
                continue
            try:
                if stat.S_ISREG(syscalls.lstat_at(fd, parts[-1]).st_mode):
                    node.data_branch, node.redirect, node.fds = b, parts, {b: fd}
                    return
            except FileNotFoundError:
                pass
            os.close(fd)
        log.warning("metacopy file %r has no lower data; serving it empty", self.union_path(node))

    def drop_data_location(self, node: Node) -> None:
        """The file has its own data in the upper branch now."""
        self.close_fds(node)
        node.data_branch = node.branch
        node.redirect = None
