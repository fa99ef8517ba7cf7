"""What the FUSE session asks of a filesystem: the ``Filesystem`` protocol and its reply types.

The session (``qvdfs.fuse.session``) speaks the kernel's protocol; a filesystem only answers
questions about node ids, in plain Python values. Every method is synchronous and may be
called from several threads at once: the filesystem does its own locking. A method raises
``OSError`` with the errno the caller should see; any other exception becomes EIO and is
logged. A method the filesystem does not define is answered with ENOSYS, which the kernel
remembers for most opcodes and stops sending.

Node ids are the filesystem's own; ``ROOT_ID`` (1) is the root. A node id handed to the
kernel in an ``Entry`` (lookup, mknod, mkdir, symlink, link, create, readdirplus) counts one
lookup; ``forget`` gives them back.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import NamedTuple, Protocol

from . import abi

ROOT_ID = 1


@dataclasses.dataclass(slots=True)
class Context:
    """Who made a request (the caller's ids as the kernel saw them)."""

    uid: int
    gid: int
    pid: int
    # The caller's umask, for mknod/mkdir/create (0 when the kernel did not send one).
    umask: int = 0


_NS = 1_000_000_000
_MASK64 = (1 << 64) - 1


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >> 63 else value


class AttrFields(NamedTuple):
    """A node's attributes, decoded (``Attr.fields``)."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int
    blksize: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


class Attr:
    """A node's attributes as the kernel is to see them, held in their wire form.

    A daemon keeps one per node it has answered for, so they are stored as ``packed``, the
    88-byte fuse_attr the kernel reads: the twelve Python ints of a stat result cost about
    190 bytes more per node (measured with tracemalloc over a 10,900-node walk). The inode
    number and the mode, which every directory entry needs, are kept beside it; the others
    are decoded, all at once, when asked for (``fields``: the pyfuse3 backend asks).
    """

    __slots__ = ("ino", "mode", "packed")

    def __init__(self, ino: int, mode: int, nlink: int, uid: int, gid: int, rdev: int,
                 size: int, blocks: int, blksize: int, atime_ns: int, mtime_ns: int,
                 ctime_ns: int) -> None:
        self.ino = ino
        self.mode = mode
        a_s, a_ns = divmod(atime_ns, _NS)
        m_s, m_ns = divmod(mtime_ns, _NS)
        c_s, c_ns = divmod(ctime_ns, _NS)
        # Seconds before the epoch go as two's complement (the kernel's s64).
        self.packed = abi.ATTR.pack(ino, size, blocks, a_s & _MASK64, m_s & _MASK64,
                                    c_s & _MASK64, a_ns, m_ns, c_ns, mode, nlink, uid, gid,
                                    abi.encode_dev(rdev), blksize, 0)

    @classmethod
    def from_stat(cls, ino: int, st: os.stat_result, nlink: int | None = None) -> Attr:
        return cls(ino, st.st_mode, st.st_nlink if nlink is None else nlink, st.st_uid, st.st_gid,
                   st.st_rdev, st.st_size, st.st_blocks, st.st_blksize, st.st_atime_ns,
                   st.st_mtime_ns, st.st_ctime_ns)

    def fields(self) -> AttrFields:
        """Every attribute, decoded from the wire form at once."""
        (ino, size, blocks, a_s, m_s, c_s, a_ns, m_ns, c_ns, mode, nlink, uid, gid, rdev,
         blksize, _) = abi.ATTR.unpack(self.packed)
        return AttrFields(ino, mode, nlink, uid, gid, abi.decode_dev(rdev), size, blocks,
                          blksize, _signed64(a_s) * _NS + a_ns, _signed64(m_s) * _NS + m_ns,
                          _signed64(c_s) * _NS + c_ns)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Attr) and other.packed == self.packed

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Attr({self.fields()})"


@dataclasses.dataclass(slots=True)
class Entry:
    """The answer to a lookup: a node id with its attributes and cache lifetimes.

    ``node_id`` 0 is a negative entry: the name does not exist, and the kernel may remember
    that for ``entry_timeout`` seconds (``attr`` is then ignored).
    """

    node_id: int
    attr: Attr | None
    entry_timeout: float
    attr_timeout: float
    generation: int = 0


@dataclasses.dataclass(slots=True)
class Opened:
    """The answer to open, create and opendir.

    ``fh`` comes back in every request on the open file. ``open_flags`` are FOPEN_* bits
    (``abi``), e.g. FOPEN_KEEP_CACHE, FOPEN_DIRECT_IO, FOPEN_CACHE_DIR.
    ``backing_fd``, for a regular file, is an open descriptor of the file that holds its
    data; where the kernel offers passthrough and its rules allow, the session registers it
    with the kernel, which then reads, writes and maps that file itself, and no READ or
    WRITE of this open reaches the filesystem. The descriptor stays the filesystem's: the
    session never closes it. Where passthrough is not used, READ and WRITE come as usual.
    """

    fh: int
    open_flags: int = 0
    backing_fd: int | None = None


@dataclasses.dataclass(slots=True)
class SetattrChanges:
    """What a SETATTR asks to change; None means unchanged. Times are nanoseconds since the
    epoch (the session turns "now" into the current time)."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    # Clear set-user-id, set-group-id (if group-executable) and security.capability, because
    # an unprivileged caller truncates or changes owner (HANDLE_KILLPRIV_V2).
    kill_suidgid: bool = False


# readdir's ``add(name, node_id, type, next_offset) -> bool``: False once the reply is full,
# and that entry was not sent. ``type`` is the S_IFMT bits of the mode.
AddDirEntry = Callable[[bytes, int, int, int], bool]
# readdirplus' ``add(name, entry, next_offset) -> bool``: as above; an entry that was sent
# counts one lookup of its node id (except for "." and "..", which the kernel never keeps).
AddDirEntryPlus = Callable[[bytes, Entry, int], bool]


class Notifier(Protocol):
    """How a filesystem tells the kernel to drop what it cached of a change the kernel did
    not make itself. Every call may come from any thread, with the filesystem's locks
    held: the first two only queue the notification and never wait for the kernel."""

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        """Forget ``name`` in ``parent`` (its node id, or that it does not exist)."""

    def invalidate_inode(self, node_id: int) -> None:
        """Drop the node's cached attributes, data and (for a directory) listing."""

    def invalidate_attributes(self, node_id: int) -> None:
        """Drop the node's cached attributes alone, at once: before the reply to the
        request in hand, so that the caller's next stat sees what that request changed
        behind the kernel's back (set-id bits dropped by a write). Safe inline: with no
        page to drop, the kernel takes no lock for it."""


class NullNotifier:
    """The ``Notifier`` where no kernel listens (tests without a mount) or where the backend
    cannot notify: every call is dropped."""

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        pass

    def invalidate_inode(self, node_id: int) -> None:
        pass

    def invalidate_attributes(self, node_id: int) -> None:
        pass


class Filesystem(Protocol):
    """The requests a filesystem answers. See the module docstring for the rules."""

    def init(self, features: frozenset[str], notifier: Notifier) -> None:
        """Called once INIT is answered, with the names of the features in force
        (e.g. "passthrough", "readdirplus", "posix_acl", "killpriv_v2") and the notifier
        to tell the kernel of changes with, from then until ``destroy``."""

    def destroy(self) -> None: ...

    def lookup(self, parent: int, name: bytes, ctx: Context) -> Entry: ...

    def forget(self, node_id: int, count: int) -> None: ...

    def getattr(self, node_id: int, fh: int | None, ctx: Context) -> tuple[Attr, float]:
        """Attributes and how long (seconds) the kernel may keep them."""

    def setattr(self, node_id: int, fh: int | None, changes: SetattrChanges,
                ctx: Context) -> tuple[Attr, float]: ...

    def readlink(self, node_id: int, ctx: Context) -> bytes: ...

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, ctx: Context) -> Entry: ...

    def mkdir(self, parent: int, name: bytes, mode: int, ctx: Context) -> Entry: ...

    def symlink(self, parent: int, name: bytes, target: bytes, ctx: Context) -> Entry: ...

    def link(self, node_id: int, new_parent: int, new_name: bytes, ctx: Context) -> Entry: ...

    def unlink(self, parent: int, name: bytes, ctx: Context) -> None: ...

    def rmdir(self, parent: int, name: bytes, ctx: Context) -> None: ...

    def rename(self, parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int,
               ctx: Context) -> None:
        """``flags``: RENAME_NOREPLACE, RENAME_EXCHANGE (RENAME2)."""

    def open(self, node_id: int, flags: int, ctx: Context, kill_suidgid: bool = False) -> Opened:
        """``flags`` are the caller's open(2) flags; O_TRUNC may be among them. With
        ``kill_suidgid`` (an unprivileged caller truncates), set-id bits and file
        capabilities go, as with ``write``'s."""

    def create(self, parent: int, name: bytes, mode: int, flags: int,
               ctx: Context) -> tuple[Entry, Opened]: ...

    def read(self, node_id: int, fh: int, offset: int, size: int) -> bytes | memoryview: ...

    def write(self, node_id: int, fh: int, offset: int, data: memoryview,
              unprivileged: Context | None) -> int:
        """``unprivileged``: the caller, when the kernel says it lacks CAP_FSETID
        (HANDLE_KILLPRIV_V2's WRITE_KILL_SUIDGID); the write then drops set-id bits and
        file capabilities."""

    def flush(self, node_id: int, fh: int) -> None:
        """At each close(2) of a descriptor of the open file ``fh``."""

    def release(self, node_id: int, fh: int) -> None: ...

    def fsync(self, node_id: int, fh: int, datasync: bool) -> None: ...

    def fallocate(self, node_id: int, fh: int, offset: int, length: int, mode: int,
                  ctx: Context) -> None:
        """Like ``copy_file_range``, drops set-id bits and capabilities when the caller
        lacks CAP_FSETID: the kernel leaves that to us and does not say (HANDLE_KILLPRIV_V2)."""

    def lseek(self, node_id: int, fh: int, offset: int, whence: int) -> int: ...

    def copy_file_range(self, node_in: int, fh_in: int, offset_in: int, node_out: int,
                        fh_out: int, offset_out: int, length: int, flags: int,
                        ctx: Context) -> int: ...

    def opendir(self, node_id: int, flags: int, ctx: Context) -> Opened: ...

    def readdir(self, node_id: int, fh: int, offset: int, add: AddDirEntry) -> None:
        """Call ``add`` for the entries after ``offset`` (0: from the start, "." and ".."
        first) until it returns False or the directory ends."""

    def readdirplus(self, node_id: int, fh: int, offset: int, add: AddDirEntryPlus) -> None: ...

    def releasedir(self, node_id: int, fh: int) -> None: ...

    def fsyncdir(self, node_id: int, fh: int, datasync: bool) -> None: ...

    def statfs(self, node_id: int) -> os.statvfs_result: ...

    def getxattr(self, node_id: int, name: bytes, ctx: Context) -> bytes:
        """The value; ENODATA if there is none. The session handles size probes and ERANGE."""

    def listxattr(self, node_id: int, ctx: Context) -> list[bytes]: ...

    def setxattr(self, node_id: int, name: bytes, value: bytes, flags: int, ctx: Context,
                 kill_sgid: bool = False) -> None:
        """``flags``: XATTR_CREATE / XATTR_REPLACE. ``kill_sgid``: the caller, outside the
        file's group, sets its access ACL; the set-group-id bit goes (SETXATTR_ACL_KILL_SGID)."""

    def removexattr(self, node_id: int, name: bytes, ctx: Context) -> None: ...
