"""One decoder per opcode, and the table the session dispatches on.

Each ``do_<op>(session, request)`` unpacks its opcode's input struct from the request,
calls the filesystem with plain values and sends the reply (packed by ``wire``). An
``OSError`` it lets out becomes the errno of the reply, anything else EIO (the session's
read loop does both). Adding an opcode is one function and one row of ``OPCODES``.

INIT is not here: the session answers it before any decoder runs (``negotiate``).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable
from typing import Protocol

from . import abi
from .abi import Opcode
from .filesystem import Attr, Context, Entry, Filesystem, Opened, SetattrChanges
from .passthrough import Passthrough
from .wire import DirBuffer, attr_out_head, pack_entry


class Session(Protocol):
    """What a decoder needs of the session that read its request (``session.Session``):
    the filesystem, what INIT agreed, and the way to answer. A protocol, so that this
    module does not import the session, which imports it for the table."""

    fs: Filesystem
    features: frozenset[str]
    passthrough: Passthrough | None
    posix_acl: bool
    setxattr_ext: bool

    def reply(self, unique: int, *parts: bytes | bytearray | memoryview) -> bool: ...

    def error(self, unique: int, err: int) -> None: ...

    def destroy(self) -> None: ...

log = logging.getLogger("qvdfs.fuse")

# Where an opcode's input struct starts.
HDR = abi.IN_HEADER.size
_NS = 1_000_000_000
_unpack_header = abi.IN_HEADER.unpack_from


class Request:
    """One request as read from /dev/fuse: the buffer, its length and the header's fields.

    Each reader thread owns one Request over its own buffer and refills it for every
    request it reads (as go-fuse pools its requests), so a decoder must not keep it, nor
    a memoryview of ``mv``, past its return.
    """

    __slots__ = ("mv", "n", "opcode", "unique", "nodeid", "uid", "gid", "pid")

    def __init__(self, mv: memoryview) -> None:
        self.mv = mv
        self.n = 0
        self.opcode = 0
        self.unique = 0
        self.nodeid = 0
        self.uid = 0
        self.gid = 0
        self.pid = 0

    def fill(self, n: int) -> None:
        """Take the header of the ``n`` bytes just read into ``mv``."""
        self.n = n
        (_, self.opcode, self.unique, self.nodeid, self.uid, self.gid, self.pid, _,
         _) = _unpack_header(self.mv)

    def name(self, start: int = HDR) -> bytes:
        """The NUL-terminated name that ends the request, from ``start``."""
        return bytes(self.mv[start:self.n - 1])

    def two_names(self, start: int) -> tuple[bytes, bytes]:
        """The two NUL-terminated names (old and new, name and target) from ``start``."""
        first, _, rest = bytes(self.mv[start:self.n]).partition(b"\0")
        return first, rest.split(b"\0", 1)[0]

    def context(self, umask: int = 0) -> Context:
        return Context(self.uid, self.gid, self.pid, umask)


Decoder = Callable[[Session, Request], None]


def op_name(opcode: int) -> str:
    try:
        return Opcode(opcode).name
    except ValueError:
        return f"OP{opcode}"


# ---- replies shared by several opcodes --------------------------------------------------

def _reply_entry(s: Session, unique: int, entry: Entry, *more: bytes) -> None:
    if not s.reply(unique, pack_entry(entry), *more) and entry.node_id:
        # The kernel gave up on the request: it never counted this lookup.
        s.fs.forget(entry.node_id, 1)


def _reply_attr(s: Session, unique: int, attr: Attr, timeout: float) -> None:
    s.reply(unique, attr_out_head(timeout), attr.packed)


def _reply_sized(s: Session, unique: int, want: int, value: bytes) -> None:
    """getxattr/listxattr: a size probe (``want`` 0), ERANGE, or the value."""
    if want == 0:
        s.reply(unique, abi.GETXATTR_OUT.pack(len(value), 0))
    elif len(value) > want:
        s.error(unique, errno.ERANGE)
    else:
        s.reply(unique, value)


def _open_out(s: Session, nodeid: int, opened: Opened) -> bytes | None:
    """open_out for ``opened``, or None if the open must be refused (ETXTBSY)."""
    pt = s.passthrough
    if pt is None:
        return abi.OPEN_OUT.pack(opened.fh, opened.open_flags & ~abi.FOPEN_PASSTHROUGH, 0)
    decided = pt.decide(nodeid, opened)
    if decided is None:
        return None
    return abi.OPEN_OUT.pack(opened.fh, decided[0], decided[1])


def _refuse_open(s: Session, unique: int, nodeid: int, fh: int) -> None:
    log.info("FUSE: open of node %d refused (ETXTBSY): it is passed through to another "
             "file", nodeid)
    try:
        s.fs.release(nodeid, fh)
    finally:
        s.error(unique, errno.ETXTBSY)


def _lost_open(s: Session, nodeid: int, fh: int) -> None:
    # No RELEASE will come for an open the kernel never received.
    if s.passthrough is not None:
        s.passthrough.release(nodeid, fh)
    s.fs.release(nodeid, fh)


def _creator(s: Session, r: Request, umask: int) -> Context:
    """The context of a request that creates a node: with the caller's umask, which the
    kernel leaves to us only with POSIX ACLs on."""
    return r.context(umask if s.posix_acl else 0)


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >> 63 else value


# ---- the decoders -----------------------------------------------------------------------

def do_enosys(s: Session, r: Request) -> None:
    if r.opcode in (Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT):
        return  # no reply expected
    s.error(r.unique, errno.ENOSYS)


def do_ioctl(s: Session, r: Request) -> None:
    # Almost all of a desktop's are TCGETS from isatty(3) on regular files (systemd asks
    # for every file it reads: 3,400 in a boot). The kernel asks again for each call
    # whatever the answer, and turns ENOSYS into ENOTTY: answer that at once.
    s.error(r.unique, errno.ENOTTY)


def do_lookup(s: Session, r: Request) -> None:
    _reply_entry(s, r.unique, s.fs.lookup(r.nodeid, r.name(), r.context()))


def do_forget(s: Session, r: Request) -> None:
    s.fs.forget(r.nodeid, abi.FORGET_IN.unpack_from(r.mv, HDR)[0])


def do_batch_forget(s: Session, r: Request) -> None:
    mv = r.mv
    count = abi.BATCH_FORGET_IN.unpack_from(mv, HDR)[0]
    forget = s.fs.forget
    off = HDR + abi.BATCH_FORGET_IN.size
    for _ in range(count):
        node, nlookup = abi.FORGET_ONE.unpack_from(mv, off)
        off += abi.FORGET_ONE.size
        try:
            forget(node, nlookup)
        except Exception:
            log.exception("forget of node %d failed", node)


def do_getattr(s: Session, r: Request) -> None:
    flags, _, fh = abi.GETATTR_IN.unpack_from(r.mv, HDR)
    attr, timeout = s.fs.getattr(r.nodeid, fh if flags & abi.GETATTR_FH else None,
                                 r.context())
    _reply_attr(s, r.unique, attr, timeout)


def do_setattr(s: Session, r: Request) -> None:
    (valid, _, fh, size, _, atime, mtime, _, atimensec, mtimensec, _, mode, _,
     a_uid, a_gid, _) = abi.SETATTR_IN.unpack_from(r.mv, HDR)
    changes = SetattrChanges()
    if valid & abi.FATTR_MODE:
        changes.mode = mode
    if valid & abi.FATTR_UID:
        changes.uid = a_uid
    if valid & abi.FATTR_GID:
        changes.gid = a_gid
    if valid & abi.FATTR_SIZE:
        changes.size = size
    now = 0
    if valid & (abi.FATTR_ATIME_NOW | abi.FATTR_MTIME_NOW):
        now = time.time_ns()
    if valid & abi.FATTR_ATIME_NOW:
        changes.atime_ns = now
    elif valid & abi.FATTR_ATIME:
        changes.atime_ns = _signed64(atime) * _NS + atimensec
    if valid & abi.FATTR_MTIME_NOW:
        changes.mtime_ns = now
    elif valid & abi.FATTR_MTIME:
        changes.mtime_ns = _signed64(mtime) * _NS + mtimensec
    changes.kill_suidgid = bool(valid & abi.FATTR_KILL_SUIDGID)
    attr, timeout = s.fs.setattr(r.nodeid, fh if valid & abi.FATTR_FH else None, changes,
                                 r.context())
    _reply_attr(s, r.unique, attr, timeout)


def do_readlink(s: Session, r: Request) -> None:
    s.reply(r.unique, s.fs.readlink(r.nodeid, r.context()))


def do_symlink(s: Session, r: Request) -> None:
    name, target = r.two_names(HDR)
    _reply_entry(s, r.unique, s.fs.symlink(r.nodeid, name, target, r.context()))


def do_mknod(s: Session, r: Request) -> None:
    mode, rdev, umask, _ = abi.MKNOD_IN.unpack_from(r.mv, HDR)
    name = r.name(HDR + abi.MKNOD_IN.size)
    _reply_entry(s, r.unique, s.fs.mknod(r.nodeid, name, mode, abi.decode_dev(rdev),
                                         _creator(s, r, umask)))


def do_mkdir(s: Session, r: Request) -> None:
    mode, umask = abi.MKDIR_IN.unpack_from(r.mv, HDR)
    name = r.name(HDR + abi.MKDIR_IN.size)
    # The kernel leaves S_IFDIR out of mkdir's mode.
    _reply_entry(s, r.unique, s.fs.mkdir(r.nodeid, name, mode | stat.S_IFDIR,
                                         _creator(s, r, umask)))


def do_unlink(s: Session, r: Request) -> None:
    s.fs.unlink(r.nodeid, r.name(), r.context())
    s.reply(r.unique)


def do_rmdir(s: Session, r: Request) -> None:
    s.fs.rmdir(r.nodeid, r.name(), r.context())
    s.reply(r.unique)


def do_rename(s: Session, r: Request) -> None:
    newdir = abi.RENAME_IN.unpack_from(r.mv, HDR)[0]
    old, new = r.two_names(HDR + abi.RENAME_IN.size)
    s.fs.rename(r.nodeid, old, newdir, new, 0, r.context())
    s.reply(r.unique)


def do_rename2(s: Session, r: Request) -> None:
    newdir, flags, _ = abi.RENAME2_IN.unpack_from(r.mv, HDR)
    old, new = r.two_names(HDR + abi.RENAME2_IN.size)
    s.fs.rename(r.nodeid, old, newdir, new, flags, r.context())
    s.reply(r.unique)


def do_link(s: Session, r: Request) -> None:
    old = abi.LINK_IN.unpack_from(r.mv, HDR)[0]
    name = r.name(HDR + abi.LINK_IN.size)
    _reply_entry(s, r.unique, s.fs.link(old, r.nodeid, name, r.context()))


def do_open(s: Session, r: Request) -> None:
    flags, open_flags = abi.OPEN_IN.unpack_from(r.mv, HDR)[:2]
    # The kernel does O_DIRECT's part itself; a descriptor the filesystem opened with
    # it would refuse Python's unaligned buffers (EINVAL).
    # KILL_SUIDGID: an unprivileged caller truncates (HANDLE_KILLPRIV_V2 leaves the
    # set-id bits and capabilities to us).
    opened = s.fs.open(r.nodeid, flags & ~os.O_DIRECT, r.context(),
                       bool(open_flags & abi.OPEN_KILL_SUIDGID))
    out = _open_out(s, r.nodeid, opened)
    if out is None:
        _refuse_open(s, r.unique, r.nodeid, opened.fh)
    elif not s.reply(r.unique, out):
        _lost_open(s, r.nodeid, opened.fh)


def do_create(s: Session, r: Request) -> None:
    flags, mode, umask, _ = abi.CREATE_IN.unpack_from(r.mv, HDR)
    name = r.name(HDR + abi.CREATE_IN.size)
    entry, opened = s.fs.create(r.nodeid, name, mode, flags & ~os.O_DIRECT,
                                _creator(s, r, umask))
    out = _open_out(s, entry.node_id, opened)
    if out is None:
        # The file exists now; only this open of it is refused.
        s.fs.forget(entry.node_id, 1)
        _refuse_open(s, r.unique, entry.node_id, opened.fh)
        return
    if not s.reply(r.unique, pack_entry(entry), out):
        s.fs.forget(entry.node_id, 1)
        _lost_open(s, entry.node_id, opened.fh)


def do_read(s: Session, r: Request) -> None:
    fh, offset, size, _, _, _, _ = abi.READ_IN.unpack_from(r.mv, HDR)
    s.reply(r.unique, s.fs.read(r.nodeid, fh, offset, size))


def do_write(s: Session, r: Request) -> None:
    fh, offset, size, wflags, _, _, _ = abi.WRITE_IN.unpack_from(r.mv, HDR)
    start = HDR + abi.WRITE_IN.size
    written = s.fs.write(r.nodeid, fh, offset, r.mv[start:start + size],
                         r.context() if wflags & abi.WRITE_KILL_SUIDGID else None)
    s.reply(r.unique, abi.WRITE_OUT.pack(written, 0))


def do_statfs(s: Session, r: Request) -> None:
    st = s.fs.statfs(r.nodeid)
    s.reply(r.unique, abi.STATFS_OUT.pack(st.f_blocks, st.f_bfree, st.f_bavail, st.f_files,
                                          st.f_ffree, st.f_bsize, st.f_namemax, st.f_frsize,
                                          0))


def do_release(s: Session, r: Request) -> None:
    fh = abi.RELEASE_IN.unpack_from(r.mv, HDR)[0]
    if s.passthrough is not None:
        s.passthrough.release(r.nodeid, fh)
    s.fs.release(r.nodeid, fh)
    s.reply(r.unique)


def do_fsync(s: Session, r: Request) -> None:
    fh, flags, _ = abi.FSYNC_IN.unpack_from(r.mv, HDR)
    s.fs.fsync(r.nodeid, fh, bool(flags & abi.FSYNC_FDATASYNC))
    s.reply(r.unique)


def do_setxattr(s: Session, r: Request) -> None:
    setxattr_flags = 0
    if s.setxattr_ext:
        size, flags, setxattr_flags, _ = abi.SETXATTR_EXT_IN.unpack_from(r.mv, HDR)
        start = HDR + abi.SETXATTR_EXT_IN.size
    else:
        size, flags = abi.SETXATTR_IN.unpack_from(r.mv, HDR)
        start = HDR + abi.SETXATTR_IN.size
    end = bytes(r.mv[start:r.n]).index(b"\0") + start
    name = bytes(r.mv[start:end])
    value = bytes(r.mv[end + 1:end + 1 + size])
    s.fs.setxattr(r.nodeid, name, value, flags, r.context(),
                  bool(setxattr_flags & abi.SETXATTR_ACL_KILL_SGID))
    s.reply(r.unique)


def do_getxattr(s: Session, r: Request) -> None:
    size = abi.GETXATTR_IN.unpack_from(r.mv, HDR)[0]
    name = r.name(HDR + abi.GETXATTR_IN.size)
    _reply_sized(s, r.unique, size, s.fs.getxattr(r.nodeid, name, r.context()))


def do_listxattr(s: Session, r: Request) -> None:
    size = abi.GETXATTR_IN.unpack_from(r.mv, HDR)[0]
    names = s.fs.listxattr(r.nodeid, r.context())
    _reply_sized(s, r.unique, size, b"".join(name + b"\0" for name in names))


def do_removexattr(s: Session, r: Request) -> None:
    s.fs.removexattr(r.nodeid, r.name(), r.context())
    s.reply(r.unique)


def do_flush(s: Session, r: Request) -> None:
    fh = abi.FLUSH_IN.unpack_from(r.mv, HDR)[0]
    s.fs.flush(r.nodeid, fh)
    s.reply(r.unique)


def do_opendir(s: Session, r: Request) -> None:
    flags = abi.OPEN_IN.unpack_from(r.mv, HDR)[0]
    opendir = getattr(s.fs, "opendir", None)
    try:
        if opendir is None:
            raise OSError(errno.ENOSYS, "no opendir")
        opened = opendir(r.nodeid, flags, r.context())
    except OSError as exc:
        # Without NO_OPENDIR_SUPPORT the kernel fails the opendir(2) on ENOSYS, so
        # answer it ourselves: a handle of 0 and no caching of the listing.
        if exc.errno != errno.ENOSYS or "no_opendir" in s.features:
            raise
        opened = Opened(0)
    s.reply(r.unique, abi.OPEN_OUT.pack(opened.fh, opened.open_flags & ~abi.FOPEN_PASSTHROUGH,
                                        0))


def do_readdir(s: Session, r: Request) -> None:
    fh, offset, size, _, _, _, _ = abi.READ_IN.unpack_from(r.mv, HDR)
    out = DirBuffer(size)
    s.fs.readdir(r.nodeid, fh, offset, out.add)
    s.reply(r.unique, out.buf)


def do_readdirplus(s: Session, r: Request) -> None:
    fh, offset, size, _, _, _, _ = abi.READ_IN.unpack_from(r.mv, HDR)
    out = DirBuffer(size)
    try:
        s.fs.readdirplus(r.nodeid, fh, offset, out.add_plus)
    except BaseException:
        # Entries added before the failure were counted by the filesystem, but the
        # kernel gets an error, not them.
        for node in out.sent:
            s.fs.forget(node, 1)
        raise
    if not s.reply(r.unique, out.buf):
        for node in out.sent:
            s.fs.forget(node, 1)


def do_releasedir(s: Session, r: Request) -> None:
    fh = abi.RELEASE_IN.unpack_from(r.mv, HDR)[0]
    releasedir = getattr(s.fs, "releasedir", None)
    if releasedir is not None:
        releasedir(r.nodeid, fh)
    s.reply(r.unique)


def do_fsyncdir(s: Session, r: Request) -> None:
    fh, flags, _ = abi.FSYNC_IN.unpack_from(r.mv, HDR)
    s.fs.fsyncdir(r.nodeid, fh, bool(flags & abi.FSYNC_FDATASYNC))
    s.reply(r.unique)


def do_interrupt(s: Session, r: Request) -> None:
    # Allowed by the protocol: the interrupted request is answered when it completes.
    pass


def do_destroy(s: Session, r: Request) -> None:
    s.destroy()
    s.reply(r.unique)


def do_fallocate(s: Session, r: Request) -> None:
    fh, offset, length, mode, _ = abi.FALLOCATE_IN.unpack_from(r.mv, HDR)
    s.fs.fallocate(r.nodeid, fh, offset, length, mode, r.context())
    s.reply(r.unique)


def do_lseek(s: Session, r: Request) -> None:
    fh, offset, whence, _ = abi.LSEEK_IN.unpack_from(r.mv, HDR)
    s.reply(r.unique, abi.LSEEK_OUT.pack(s.fs.lseek(r.nodeid, fh, offset, whence)))


def _copy_file_range(s: Session, r: Request) -> int:
    fh_in, off_in, node_out, fh_out, off_out, length, flags = \
        abi.COPY_FILE_RANGE_IN.unpack_from(r.mv, HDR)
    return s.fs.copy_file_range(r.nodeid, fh_in, off_in, node_out, fh_out, off_out, length,
                                flags, r.context())


def do_copy_file_range(s: Session, r: Request) -> None:
    # The 32-bit reply: the kernel asks for at most 4 GiB - 1 here.
    s.reply(r.unique, abi.WRITE_OUT.pack(_copy_file_range(s, r), 0))


def do_copy_file_range_64(s: Session, r: Request) -> None:
    s.reply(r.unique, abi.COPY_FILE_RANGE_OUT.pack(_copy_file_range(s, r)))


# One row per opcode: the decoder and the filesystem method it needs (None: always served).
# A filesystem without that method gets ENOSYS, which most opcodes' kernel side remembers.
OPCODES: dict[Opcode, tuple[Decoder, str | None]] = {
    Opcode.LOOKUP: (do_lookup, "lookup"),
    Opcode.FORGET: (do_forget, "forget"),
    Opcode.BATCH_FORGET: (do_batch_forget, "forget"),
    Opcode.GETATTR: (do_getattr, "getattr"),
    Opcode.SETATTR: (do_setattr, "setattr"),
    Opcode.READLINK: (do_readlink, "readlink"),
    Opcode.SYMLINK: (do_symlink, "symlink"),
    Opcode.MKNOD: (do_mknod, "mknod"),
    Opcode.MKDIR: (do_mkdir, "mkdir"),
    Opcode.UNLINK: (do_unlink, "unlink"),
    Opcode.RMDIR: (do_rmdir, "rmdir"),
    Opcode.RENAME: (do_rename, "rename"),
    Opcode.RENAME2: (do_rename2, "rename"),
    Opcode.LINK: (do_link, "link"),
    Opcode.OPEN: (do_open, "open"),
    Opcode.READ: (do_read, "read"),
    Opcode.WRITE: (do_write, "write"),
    Opcode.STATFS: (do_statfs, "statfs"),
    Opcode.RELEASE: (do_release, "release"),
    Opcode.FSYNC: (do_fsync, "fsync"),
    Opcode.SETXATTR: (do_setxattr, "setxattr"),
    Opcode.GETXATTR: (do_getxattr, "getxattr"),
    Opcode.LISTXATTR: (do_listxattr, "listxattr"),
    Opcode.REMOVEXATTR: (do_removexattr, "removexattr"),
    Opcode.FLUSH: (do_flush, "flush"),
    Opcode.OPENDIR: (do_opendir, None),
    Opcode.READDIR: (do_readdir, "readdir"),
    Opcode.READDIRPLUS: (do_readdirplus, "readdirplus"),
    Opcode.RELEASEDIR: (do_releasedir, None),
    Opcode.FSYNCDIR: (do_fsyncdir, "fsyncdir"),
    Opcode.CREATE: (do_create, "create"),
    Opcode.INTERRUPT: (do_interrupt, None),
    Opcode.DESTROY: (do_destroy, None),
    Opcode.FALLOCATE: (do_fallocate, "fallocate"),
    Opcode.LSEEK: (do_lseek, "lseek"),
    Opcode.IOCTL: (do_ioctl, None),
    Opcode.COPY_FILE_RANGE: (do_copy_file_range, "copy_file_range"),
    Opcode.COPY_FILE_RANGE_64: (do_copy_file_range_64, "copy_file_range"),
    # ACCESS: ENOSYS on purpose; the kernel then checks permissions itself (with
    # default_permissions) or lets access(2) succeed, and never asks again.
    # GETLK/SETLK/SETLKW: without POSIX_LOCKS the kernel keeps locks itself.
    # POLL, BMAP, SETUPMAPPING, REMOVEMAPPING, SYNCFS, TMPFILE, STATX: ENOSYS.
}

# Opcodes libfuse lets through with allow_root for everybody: they act on files a
# permitted caller opened already, or they are the kernel's own housekeeping.
ALLOW_ROOT_EXEMPT = frozenset({
    Opcode.INIT, Opcode.READ, Opcode.WRITE, Opcode.FSYNC, Opcode.RELEASE, Opcode.READDIR,
    Opcode.READDIRPLUS, Opcode.FSYNCDIR, Opcode.RELEASEDIR, Opcode.FORGET,
    Opcode.BATCH_FORGET, Opcode.INTERRUPT, Opcode.DESTROY, Opcode.NOTIFY_REPLY,
    Opcode.FLUSH})
# Opcodes below this index the dispatch list (all the kernel has).
TABLE_SIZE = 64


def _allow_root_check(decoder: Decoder, owner_uid: int) -> Decoder:
    def checked(s: Session, r: Request) -> None:
        if r.uid != 0 and r.uid != owner_uid:
            s.error(r.unique, errno.EACCES)
            return
        decoder(s, r)
    return checked


def build_table(fs: Filesystem, allow_root: bool, owner_uid: int) -> list[Decoder]:
    """The decoder for each opcode below ``TABLE_SIZE``: ``do_enosys`` where ``fs`` lacks
    the method; with ``allow_root``, callers other than root and ``owner_uid`` get EACCES
    (except for ``ALLOW_ROOT_EXEMPT``)."""
    table: list[Decoder] = [do_enosys] * TABLE_SIZE
    for opcode, (decoder, method) in OPCODES.items():
        if method is not None and not hasattr(fs, method):
            continue
        if allow_root and opcode not in ALLOW_ROOT_EXEMPT:
            decoder = _allow_root_check(decoder, owner_uid)
        table[opcode] = decoder
    return table
