"""The FUSE request loop: read requests from /dev/fuse, call the ``Filesystem``, reply.

How it works, and why:

- INIT is answered in the thread that calls ``serve()``, before any worker starts, because
  the buffer size follows from the negotiated ``max_write`` and the kernel sends nothing
  else until INIT is answered.
- Then ``threads`` workers read /dev/fuse. The kernel hands each request to exactly one
  blocked reader, so a request that sleeps (a cold directory, a copy-up, an fsync) holds up
  only its own thread. Each worker owns one preallocated buffer, reads with one ``readv``,
  parses with ``unpack_from`` and replies with one ``writev``: two system calls a request.
- Dispatch is a table indexed by opcode (``_TABLE``); a missing row, or a method the
  filesystem lacks, is ENOSYS. ``OSError`` becomes its errno; any other exception becomes
  EIO with a logged traceback, so a bug costs one request, never the mount.
- INTERRUPT is ignored, which the protocol allows: every request is answered when the
  filesystem returns, and the kernel drops the answer to a request it gave up on (our
  ``writev`` then fails with ENOENT, which is expected).
- Notifications are queued and written by one notifier thread: a worker that sent
  INVAL_ENTRY for the directory whose request it is serving would wait on the kernel's
  directory lock held for that very request, i.e. forever. ENOENT (nothing cached) is the
  normal answer and ignored.
- Passthrough (``Opened.backing_fd``): see ``_Passthrough`` for the kernel's rules.

Threads (``DEFAULT_THREADS``), measured on this 2-CPU VM, kernel 6.18, with
``tests/fuse/bench_session.py``: daemon CPU per GETATTR answered from a cached Attr
(attr_timeout 0, 3 x 30k stat(2), best round) is 6.0 us with 1 reader, 7.0 us with 2,
7.7 us with 4 and 8.7 us with 8: each extra reader makes it likelier that the woken
thread is not the one that just ran, which costs a GIL hand-off. With 1 reader, a stat(2)
issued while another request sleeps 1 s in the filesystem waited 900 ms; with 2 or more
it took 0.1 ms. The default is 4: a few slow requests at once (copy-ups, fsyncs, cold
directories) still leave readers free, for about 1.7 us more per request than 1 reader.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable
from typing import Any

from . import abi
from .abi import Opcode
from .filesystem import Attr, Context, Entry, Filesystem, Opened, SetattrChanges
from .mount import MountOptions

log = logging.getLogger("qvdfs.fuse")

DEFAULT_THREADS = 4
# With MAX_PAGES the kernel sends up to 256 pages per READ/WRITE.
MAX_WRITE = 1 << 20
# Without MAX_PAGES the kernel's limit is 32 pages.
MAX_WRITE_NO_MAX_PAGES = 128 << 10
# Request headers (in header + write_in) fit in one page next to the data.
_HEADROOM = 4096

_HDR = abi.IN_HEADER.size
_OUT = abi.OUT_HEADER
_ZERO_ATTR = bytes(abi.ATTR.size)
_MASK64 = (1 << 64) - 1
_NS = 1_000_000_000

# Features the caller may decline (``disabled``), with the INIT bits they stand for.
FEATURES: dict[str, int] = {
    "passthrough": abi.PASSTHROUGH,
    "readdirplus": abi.DO_READDIRPLUS,
    "readdirplus_auto": abi.READDIRPLUS_AUTO,
    "posix_acl": abi.POSIX_ACL,
    "killpriv_v2": abi.HANDLE_KILLPRIV_V2,
    "cache_symlinks": abi.CACHE_SYMLINKS,
    "parallel_dirops": abi.PARALLEL_DIROPS,
    "max_pages": abi.MAX_PAGES,
    "no_opendir": abi.NO_OPENDIR_SUPPORT,
    "direct_io_allow_mmap": abi.DIRECT_IO_ALLOW_MMAP,
    "allow_idmap": abi.ALLOW_IDMAP,
}
# Always asked for; reported to the filesystem too.
_BASE_FEATURES: dict[str, int] = {
    "async_read": abi.ASYNC_READ,
    "atomic_o_trunc": abi.ATOMIC_O_TRUNC,
    "big_writes": abi.BIG_WRITES,
    "explicit_inval_data": abi.EXPLICIT_INVAL_DATA,
}

# Opcodes libfuse lets through with allow_root for everybody: they act on files a
# permitted caller opened already, or they are the kernel's own housekeeping.
_ALLOW_ROOT_EXEMPT = frozenset({
    Opcode.INIT, Opcode.READ, Opcode.WRITE, Opcode.FSYNC, Opcode.RELEASE, Opcode.READDIR,
    Opcode.READDIRPLUS, Opcode.FSYNCDIR, Opcode.RELEASEDIR, Opcode.FORGET,
    Opcode.BATCH_FORGET, Opcode.INTERRUPT, Opcode.DESTROY, Opcode.NOTIFY_REPLY,
    Opcode.FLUSH})

Handler = Callable[["Session", memoryview, int, int, int, int, int, int], None]


def pack_attr(attr: Attr) -> bytes:
    """The wire form of ``attr`` (fuse_attr), cached in ``attr.packed``."""
    packed = attr.packed
    if packed is None:
        a_s, a_ns = divmod(attr.atime_ns, _NS)
        m_s, m_ns = divmod(attr.mtime_ns, _NS)
        c_s, c_ns = divmod(attr.ctime_ns, _NS)
        packed = abi.ATTR.pack(
            attr.ino, attr.size, attr.blocks, a_s & _MASK64, m_s & _MASK64, c_s & _MASK64,
            a_ns, m_ns, c_ns, attr.mode, attr.nlink, attr.uid, attr.gid,
            encode_dev(attr.rdev), attr.blksize, 0)
        attr.packed = packed
    return packed


def encode_dev(rdev: int) -> int:
    """glibc's dev_t to the kernel's 32-bit ``new_encode_dev`` form that fuse_attr carries."""
    major, minor = os.major(rdev), os.minor(rdev)
    return ((minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)) & 0xFFFFFFFF


def decode_dev(rdev: int) -> int:
    """The kernel's 32-bit device number (MKNOD) to glibc's dev_t, as os.mknod wants it."""
    return os.makedev((rdev & 0xFFF00) >> 8, (rdev & 0xFF) | ((rdev >> 12) & 0xFFF00))


def split_timeout(seconds: float) -> tuple[int, int]:
    if seconds <= 0:
        return 0, 0
    whole = int(seconds)
    return whole, int((seconds - whole) * _NS)


def pack_entry(entry: Entry) -> bytes:
    """fuse_entry_out; node id 0 is a negative entry the kernel may cache."""
    e_s, e_ns = split_timeout(entry.entry_timeout)
    if entry.node_id == 0:
        return abi.ENTRY_OUT_HEAD.pack(0, 0, e_s, 0, e_ns, 0) + _ZERO_ATTR
    if entry.attr is None:
        raise ValueError(f"entry for node {entry.node_id} without attributes")
    a_s, a_ns = split_timeout(entry.attr_timeout)
    return (abi.ENTRY_OUT_HEAD.pack(entry.node_id, entry.generation, e_s, a_s, e_ns, a_ns)
            + pack_attr(entry.attr))


class DirBuffer:
    """Packs READDIR / READDIRPLUS replies up to the size the kernel asked for."""

    __slots__ = ("buf", "limit", "sent")

    def __init__(self, limit: int) -> None:
        self.buf = bytearray()
        self.limit = limit
        # Node ids handed out by readdirplus (one lookup each), to give back if the
        # reply never reaches the kernel.
        self.sent: list[int] = []

    def add(self, name: bytes, node_id: int, type_: int, next_offset: int) -> bool:
        size = abi.dirent_size(len(name))
        buf = self.buf
        if len(buf) + size > self.limit:
            return False
        buf += abi.DIRENT.pack(node_id, next_offset, len(name), (type_ & 0o170000) >> 12)
        buf += name
        buf += bytes(size - abi.DIRENT.size - len(name))
        return True

    def add_plus(self, name: bytes, entry: Entry, next_offset: int) -> bool:
        size = abi.direntplus_size(len(name))
        buf = self.buf
        if len(buf) + size > self.limit:
            return False
        attr = entry.attr
        if entry.node_id == 0 or attr is None:
            # The kernel emits the name and makes no dentry of it.
            buf += abi.ENTRY_OUT_HEAD.pack(0, 0, 0, 0, 0, 0) + _ZERO_ATTR
            ino, mode = (attr.ino, attr.mode) if attr is not None else (0, 0)
        else:
            buf += pack_entry(entry)
            ino, mode = attr.ino, attr.mode
            if name not in (b".", b".."):
                self.sent.append(entry.node_id)
        buf += abi.DIRENT.pack(ino, next_offset, len(name), (mode & 0o170000) >> 12)
        buf += name
        buf += bytes(size - abi.DIRENTPLUS_HEAD_SIZE - len(name))
        return True


class _Passthrough:
    """Which backing file each node is passed through to, under the kernel's rules.

    The kernel (fs/fuse/iomode.c) keeps one io mode per inode:
    - while an inode has passthrough opens, each further open must be FOPEN_PASSTHROUGH
      with the same backing file (the same backing id), else the open fails with EIO;
    - a passthrough open of an inode that has cached opens (neither passthrough nor
      FOPEN_DIRECT_IO) fails;
    - the kernel takes its reference to a backing id only after the OPEN reply is written,
      so the id is closed at the node's last RELEASE, never right after the reply; the
      kernel sends RELEASE for opens it failed, too.
    So per node: the active backing (id, file identity, open count), or the number of
    cached opens. A new open reuses the active id for the same file, is refused with
    ETXTBSY for a different file (a writer on the copied-up file while readers still read
    the lower one: it must never be passed through to the lower file), is served by the
    daemon while cached opens exist, and otherwise registers its fd (BACKING_OPEN),
    falling back to served I/O when the kernel refuses.
    """

    PASSTHROUGH = 1
    CACHED = 2

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lock = threading.Lock()
        self.backing: dict[int, list[Any]] = {}     # node -> [id, (dev, ino), opens]
        self.cached: dict[int, int] = {}            # node -> cached opens
        self.kinds: dict[tuple[int, int], int] = {}  # (node, fh) -> PASSTHROUGH / CACHED
        self.opens_total = 0
        self.refused_total = 0
        self._warned = False

    def decide(self, node_id: int, opened: Opened) -> tuple[int, int] | None:
        """(open_flags, backing_id) for the reply, or None: refuse with ETXTBSY."""
        flags = opened.open_flags & ~abi.FOPEN_PASSTHROUGH
        key = (node_id, opened.fh)
        fd = opened.backing_fd
        identity = None
        if fd is not None:
            st = os.fstat(fd)
            identity = (st.st_dev, st.st_ino)
        with self.lock:
            active = self.backing.get(node_id)
            if active is not None:
                if identity != active[1]:
                    self.refused_total += 1
                    return None
                active[2] += 1
                self.kinds[key] = self.PASSTHROUGH
                self.opens_total += 1
                return (flags & abi.FOPEN_PASSTHROUGH_MASK) | abi.FOPEN_PASSTHROUGH, active[0]
            if fd is not None and not self.cached.get(node_id):
                backing_id = self._register(fd)
                if backing_id is not None:
                    self.backing[node_id] = [backing_id, identity, 1]
                    self.kinds[key] = self.PASSTHROUGH
                    self.opens_total += 1
                    return ((flags & abi.FOPEN_PASSTHROUGH_MASK) | abi.FOPEN_PASSTHROUGH,
                            backing_id)
            if not flags & abi.FOPEN_DIRECT_IO:
                self.cached[node_id] = self.cached.get(node_id, 0) + 1
                self.kinds[key] = self.CACHED
            return flags, 0

    def _register(self, fd: int) -> int | None:
        arg = bytearray(abi.BACKING_MAP.pack(fd, 0, 0))
        try:
            backing_id = fcntl.ioctl(self.fd, abi.DEV_IOC_BACKING_OPEN, arg, True)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("passthrough: the kernel refused a backing file (%s); serving "
                            "I/O in the daemon for such opens", exc)
            return None
        return int(backing_id)

    def release(self, node_id: int, fh: int) -> None:
        with self.lock:
            kind = self.kinds.pop((node_id, fh), None)
            if kind == self.PASSTHROUGH:
                active = self.backing[node_id]
                active[2] -= 1
                if active[2] == 0:
                    del self.backing[node_id]
                    self._close(active[0])
            elif kind == self.CACHED:
                left = self.cached[node_id] - 1
                if left:
                    self.cached[node_id] = left
                else:
                    del self.cached[node_id]

    def _close(self, backing_id: int) -> None:
        try:
            fcntl.ioctl(self.fd, abi.DEV_IOC_BACKING_CLOSE, backing_id.to_bytes(4, "little"))
        except OSError as exc:
            log.warning("passthrough: closing backing id %d failed: %s", backing_id, exc)


class _Stop(Exception):
    pass


class Session:
    """Serves one mounted FUSE connection (the /dev/fuse descriptor ``fd``) for ``fs``.

    Args:
        fs: the filesystem (``qvdfs.fuse.filesystem.Filesystem``).
        fd: the /dev/fuse descriptor the mount uses (``qvdfs.fuse.mount.mount``); the
            session does not close it.
        mountpoint: for log messages.
        options: the mount's options (default: none); ``default_permissions``
            lets it ask for POSIX ACLs (and idmapping), ``allow_root`` makes it answer
            EACCES to callers other than root and the mounting user.
        disabled: names from ``FEATURES`` not to ask the kernel for.
        threads: readers of /dev/fuse (``DEFAULT_THREADS``).
        idmap: ask for ALLOW_IDMAP (unless "allow_idmap" is disabled).
    """

    def __init__(self, fs: Filesystem, fd: int, *, mountpoint: str,
                 options: MountOptions | None = None, disabled: frozenset[str] = frozenset(),
                 threads: int = DEFAULT_THREADS, idmap: bool = False) -> None:
        options = options or MountOptions()
        unknown = set(disabled) - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown FUSE features {sorted(unknown)}")
        self.fs = fs
        self.fd = fd
        self.mountpoint = mountpoint
        self.disabled = frozenset(disabled)
        self.threads = max(1, threads)
        self.default_permissions = options.default_permissions
        self.allow_root = options.allow_root
        self.idmap = idmap
        self.owner_uid = os.getuid()
        self.features: frozenset[str] = frozenset()
        self.kernel_minor = 0
        self.kernel_flags = 0
        self.granted_flags = 0
        self.max_write = MAX_WRITE
        self.passthrough: _Passthrough | None = None
        self.posix_acl = False
        self._table = self._build_table()
        self._counts: list[list[int]] = []
        self._nanos: list[list[int]] = []
        self._notify_q: queue.SimpleQueue[tuple[int, bytes] | threading.Event | None] = \
            queue.SimpleQueue()
        self._destroyed = False
        self._destroy_lock = threading.Lock()
        # Set once INIT is answered and the filesystem told: requests are served from then on.
        self.initialized = threading.Event()

    # ---- public -----------------------------------------------------------------------

    def serve(self) -> None:
        """Answer requests until the kernel ends the connection (umount, abort, DESTROY);
        the filesystem's ``destroy`` has run once when this returns, whatever happened."""
        try:
            self._serve()
        finally:
            self._destroy()

    def _serve(self) -> None:
        counts, nanos = self._new_stats()
        buf = bytearray(abi.MIN_READ_BUFFER * 2)
        try:
            while not self._handle_init(buf, counts, nanos):
                pass
        except _Stop:
            return
        notifier = threading.Thread(target=self._notifier, name="fuse-notify", daemon=True)
        notifier.start()
        workers = [threading.Thread(target=self._worker, name=f"fuse-{i}", daemon=True)
                   for i in range(1, self.threads)]
        for w in workers:
            w.start()
        try:
            self._worker()
        finally:
            for w in workers:
                w.join()
            self._notify_q.put(None)
            notifier.join()

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        """Make the kernel forget ``name`` in ``parent`` (and its negative entry)."""
        self._notify_q.put((abi.NotifyCode.INVAL_ENTRY,
                            abi.NOTIFY_INVAL_ENTRY_OUT.pack(parent, len(name), 0)
                            + name + b"\0"))

    def invalidate_inode(self, node_id: int, offset: int = 0, length: int = 0) -> None:
        """Drop cached attributes and data from ``offset`` for ``length`` bytes (0: to the
        end); ``offset`` -1 drops the attributes only."""
        self._notify_q.put((abi.NotifyCode.INVAL_INODE,
                            abi.NOTIFY_INVAL_INODE_OUT.pack(node_id, offset, length)))

    def notify_delete(self, parent: int, child: int, name: bytes) -> None:
        """Tell the kernel ``name`` (node ``child``) left ``parent``."""
        self._notify_q.put((abi.NotifyCode.DELETE,
                            abi.NOTIFY_DELETE_OUT.pack(parent, child, len(name), 0)
                            + name + b"\0"))

    def wait_notifications(self, timeout: float | None = None) -> bool:
        """Block until the notifications queued so far were sent; False on timeout."""
        done = threading.Event()
        self._notify_q.put(done)
        return done.wait(timeout)

    def counters(self) -> dict[str, Any]:
        """Per opcode name: requests and nanoseconds spent; plus passthrough state."""
        ops: dict[str, dict[str, int]] = {}
        for counts, nanos in zip(list(self._counts), list(self._nanos)):
            for op, n in enumerate(counts):
                if n:
                    name = _op_name(op)
                    row = ops.setdefault(name, {"count": 0, "ns": 0})
                    row["count"] += n
                    row["ns"] += nanos[op]
        pt = self.passthrough
        return {
            "opcodes": ops,
            "passthrough_opens": pt.opens_total if pt else 0,
            "passthrough_refused": pt.refused_total if pt else 0,
            "backing_ids": len(pt.backing) if pt else 0,
        }

    # ---- the loop ---------------------------------------------------------------------

    def _new_stats(self) -> tuple[list[int], list[int]]:
        counts = [0] * 64
        nanos = [0] * 64
        self._counts.append(counts)
        self._nanos.append(nanos)
        return counts, nanos

    def _read(self, buf: bytearray) -> int:
        while True:
            try:
                return os.readv(self.fd, [buf])
            except OSError as exc:
                # ENOENT: the request was interrupted before we read it.
                if exc.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                    continue
                if exc.errno == errno.ENODEV:
                    raise _Stop from None
                raise

    def _worker(self) -> None:
        counts, nanos = self._new_stats()
        buf = bytearray(self.max_write + _HEADROOM)
        mv = memoryview(buf)
        table = self._table
        read = self._read
        unpack = abi.IN_HEADER.unpack_from
        clock = time.perf_counter_ns
        # Asked once: a debug line per request is for `qvdfs -d`, never the normal path.
        trace = log.isEnabledFor(logging.DEBUG)
        try:
            while True:
                n = read(buf)
                start = clock()
                _, opcode, unique, nodeid, uid, gid, pid, _, _ = unpack(buf)
                if trace:
                    log.debug("FUSE %s node %d (request %d, pid %d)", _op_name(opcode),
                              nodeid, unique, pid)
                # Counted before the reply goes out, so a reader of the counters who has
                # seen the reply also sees the request.
                if opcode < 64:
                    counts[opcode] += 1
                try:
                    table[opcode if opcode < 64 else 0](self, mv, n, unique, nodeid, uid,
                                                        gid, pid)
                except OSError as exc:
                    self._error(unique, exc.errno or errno.EIO)
                except _Stop:
                    raise
                except Exception:
                    log.exception("FUSE %s (node %d) failed", _op_name(opcode), nodeid)
                    self._error(unique, errno.EIO)
                if opcode < 64:
                    nanos[opcode] += clock() - start
        except _Stop:
            pass

    def _reply(self, unique: int, *parts: bytes | bytearray | memoryview) -> bool:
        """One writev of header and payload; False if the kernel no longer waits for it."""
        size = 16
        for p in parts:
            size += len(p)
        try:
            os.writev(self.fd, (_OUT.pack(size, 0, unique),) + parts)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return False
            if exc.errno == errno.ENODEV:
                raise _Stop from None
            raise
        return True

    def _error(self, unique: int, err: int) -> None:
        try:
            os.write(self.fd, _OUT.pack(16, -err, unique))
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                raise _Stop from None
            if exc.errno != errno.ENOENT:
                log.warning("FUSE: error reply %d for request %d failed: %s", err, unique,
                            exc)

    def _notifier(self) -> None:
        while True:
            item = self._notify_q.get()
            if item is None:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            code, payload = item
            try:
                os.writev(self.fd, (_OUT.pack(16 + len(payload), code, 0), payload))
            except OSError as exc:
                # ENOENT: the kernel had nothing cached; ENODEV: unmounted meanwhile.
                if exc.errno not in (errno.ENOENT, errno.ENODEV):
                    log.warning("FUSE notification %s failed: %s", abi.NotifyCode(code), exc)

    def _destroy(self) -> None:
        with self._destroy_lock:
            if self._destroyed:
                return
            self._destroyed = True
        destroy = getattr(self.fs, "destroy", None)
        if destroy is not None:
            try:
                destroy()
            except Exception:
                log.exception("filesystem destroy failed")

    # ---- INIT -------------------------------------------------------------------------

    def _handle_init(self, buf: bytearray, counts: list[int], nanos: list[int]) -> bool:
        n = self._read(buf)
        start = time.perf_counter_ns()
        _, opcode, unique, _, _, _, _, _, _ = abi.IN_HEADER.unpack_from(buf)
        if opcode != Opcode.INIT:
            log.warning("FUSE: %s before INIT; answering EIO", _op_name(opcode))
            self._error(unique, errno.EIO)
            return False
        major, minor, max_readahead, flags = abi.INIT_IN_V1.unpack_from(buf, _HDR)
        flags2 = 0
        if n - _HDR >= abi.INIT_IN.size and flags & abi.INIT_EXT:
            flags2 = abi.INIT_IN.unpack_from(buf, _HDR)[4]
        if major != abi.KERNEL_VERSION:
            if major < abi.KERNEL_VERSION:
                log.error("FUSE: kernel speaks protocol %d.%d; need 7", major, minor)
                self._error(unique, errno.EPROTO)
                raise _Stop
            # A newer major: answer ours and expect INIT again.
            self._reply(unique, abi.INIT_OUT.pack(abi.KERNEL_VERSION, abi.KERNEL_MINOR_VERSION,
                                                  0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0))
            return False
        offered = flags | (flags2 << 32)
        want = sum(_BASE_FEATURES.values())
        for name, bit in FEATURES.items():
            if name not in self.disabled:
                want |= bit
        if not self.default_permissions:
            want &= ~abi.POSIX_ACL
        # The kernel refuses the whole INIT when ALLOW_IDMAP comes without
        # default_permissions (it cannot check permissions of mapped ids itself).
        if not self.idmap or not self.default_permissions:
            want &= ~abi.ALLOW_IDMAP
        if not hasattr(self.fs, "readdirplus"):
            want &= ~(abi.DO_READDIRPLUS | abi.READDIRPLUS_AUTO)
        if not want & abi.DO_READDIRPLUS:
            want &= ~abi.READDIRPLUS_AUTO
        granted = want & offered
        if not offered & abi.INIT_EXT:
            granted &= 0xFFFFFFFF
        self.kernel_minor = minor
        self.kernel_flags = offered
        self.granted_flags = granted
        self.max_write = MAX_WRITE if granted & abi.MAX_PAGES else MAX_WRITE_NO_MAX_PAGES
        reply_flags = granted & 0xFFFFFFFF
        if granted >> 32:
            reply_flags |= abi.INIT_EXT
        out = abi.INIT_OUT.pack(
            abi.KERNEL_VERSION, abi.KERNEL_MINOR_VERSION, max_readahead, reply_flags,
            64, 48,                                  # max_background, congestion_threshold
            self.max_write, 1,                       # max_write, time_gran (ns)
            self.max_write // 4096 if granted & abi.MAX_PAGES else 0, 0,
            granted >> 32,
            1 if granted & abi.PASSTHROUGH else 0,   # max_stack_depth: backing on ext4 etc.
            0)
        self._reply(unique, out)
        counts[opcode] += 1
        nanos[opcode] += time.perf_counter_ns() - start

        if granted & abi.PASSTHROUGH:
            self.passthrough = _Passthrough(self.fd)
            log.info("FUSE %s: passthrough on (kernel 7.%d)", self.mountpoint, minor)
        else:
            why = ("disabled by the caller" if "passthrough" in self.disabled
                   else "the kernel does not offer it" if not offered & abi.PASSTHROUGH
                   else "not negotiated")
            log.info("FUSE %s: passthrough off (%s); the daemon serves file I/O",
                     self.mountpoint, why)
        self.posix_acl = bool(granted & abi.POSIX_ACL)
        names = {name for name, bit in (FEATURES | _BASE_FEATURES).items() if granted & bit}
        log.debug("FUSE INIT: kernel 7.%d offered %s; in force: %s", minor,
                  ",".join(abi.flag_names(offered)), ",".join(sorted(names)))
        self.features = frozenset(names)
        init = getattr(self.fs, "init", None)
        if init is not None:
            init(self.features)
        self.initialized.set()
        return True

    # ---- handlers ---------------------------------------------------------------------

    def _build_table(self) -> list[Handler]:
        table: list[Handler] = [Session._do_enosys] * 64
        for opcode, (handler, method) in _HANDLERS.items():
            if method is not None and not hasattr(self.fs, method):
                continue
            if self.allow_root and opcode not in _ALLOW_ROOT_EXEMPT:
                handler = _allow_root_check(handler)
            table[opcode] = handler
        return table

    def _do_enosys(self, mv: memoryview, n: int, unique: int, nodeid: int, uid: int,
                   gid: int, pid: int) -> None:
        opcode = abi.IN_HEADER.unpack_from(mv)[1]
        if opcode in (Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT):
            return
        self._error(unique, errno.ENOSYS)

    def _reply_entry(self, unique: int, entry: Entry, *more: bytes) -> None:
        if not self._reply(unique, pack_entry(entry), *more) and entry.node_id:
            # The kernel gave up on the request: it never counted this lookup.
            self.fs.forget(entry.node_id, 1)

    def _do_lookup(self, mv: memoryview, n: int, unique: int, nodeid: int, uid: int,
                   gid: int, pid: int) -> None:
        entry = self.fs.lookup(nodeid, bytes(mv[_HDR:n - 1]), Context(uid, gid, pid))
        self._reply_entry(unique, entry)

    def _do_forget(self, mv: memoryview, n: int, unique: int, nodeid: int, uid: int,
                   gid: int, pid: int) -> None:
        self.fs.forget(nodeid, abi.FORGET_IN.unpack_from(mv, _HDR)[0])

    def _do_batch_forget(self, mv: memoryview, n: int, unique: int, nodeid: int, uid: int,
                         gid: int, pid: int) -> None:
        count = abi.BATCH_FORGET_IN.unpack_from(mv, _HDR)[0]
        forget = self.fs.forget
        off = _HDR + abi.BATCH_FORGET_IN.size
        for _ in range(count):
            node, nlookup = abi.FORGET_ONE.unpack_from(mv, off)
            off += abi.FORGET_ONE.size
            try:
                forget(node, nlookup)
            except Exception:
                log.exception("forget of node %d failed", node)

    def _do_getattr(self, mv: memoryview, n: int, unique: int, nodeid: int, uid: int,
                    gid: int, pid: int) -> None:
        flags, _, fh = abi.GETATTR_IN.unpack_from(mv, _HDR)
        attr, timeout = self.fs.getattr(nodeid, fh if flags & abi.GETATTR_FH else None,
                                        Context(uid, gid, pid))
        self._reply_attr(unique, attr, timeout)

    def _reply_attr(self, unique: int, attr: Attr, timeout: float) -> None:
        packed = attr.packed
        if packed is None:
            packed = pack_attr(attr)
        if timeout > 0:
            whole = int(timeout)
            head = abi.ATTR_OUT_HEAD.pack(whole, int((timeout - whole) * _NS), 0)
        else:
            head = _ZERO_ATTR_OUT_HEAD
        self._reply(unique, head, packed)

    def _do_setattr(self, mv: memoryview, n: int, unique: int, nodeid: int, uid: int,
                    gid: int, pid: int) -> None:
        (valid, _, fh, size, _, atime, mtime, _, atimensec, mtimensec, _, mode, _,
         a_uid, a_gid, _) = abi.SETATTR_IN.unpack_from(mv, _HDR)
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
        attr, timeout = self.fs.setattr(nodeid, fh if valid & abi.FATTR_FH else None, changes,
                                        Context(uid, gid, pid))
        self._reply_attr(unique, attr, timeout)

    def _do_readlink(self, mv: memoryview, n: int, unique: int, nodeid: int, uid: int,
                     gid: int, pid: int) -> None:
        self._reply(unique, self.fs.readlink(nodeid, Context(uid, gid, pid)))

    def _do_symlink(self, mv: memoryview, n: int, unique: int, nodeid: int, uid: int,
                    gid: int, pid: int) -> None:
        name, target = _two_names(mv, _HDR, n)
        self._reply_entry(unique, self.fs.symlink(nodeid, name, target, Context(uid, gid, pid)))

    def _ctx_umask(self, uid: int, gid: int, pid: int, umask: int) -> Context:
        return Context(uid, gid, pid, umask if self.posix_acl else 0)

    def _do_mknod(self, mv: memoryview, n: int, unique: int, nodeid: int, uid: int,
                  gid: int, pid: int) -> None:
        mode, rdev, umask, _ = abi.MKNOD_IN.unpack_from(mv, _HDR)
        name = bytes(mv[_HDR + abi.MKNOD_IN.size:n - 1])
        self._reply_entry(unique, self.fs.mknod(nodeid, name, mode, decode_dev(rdev),
                                                self._ctx_umask(uid, gid, pid, umask)))

    def _do_mkdir(self, mv: memoryview, n: int, unique: int, nodeid: int, uid: int,
                  gid: int, pid: int) -> None:
        mode, umask = abi.MKDIR_IN.unpack_from(mv, _HDR)
        name = bytes(mv[_HDR + abi.MKDIR_IN.size:n - 1])
        # The kernel leaves S_IFDIR out of mkdir's mode.
        self._reply_entry(unique, self.fs.mkdir(nodeid, name, mode | stat.S_IFDIR,
                                                self._ctx_umask(uid, gid, pid, umask)))

    def _do_unlink(self, mv: memoryview, n: int, unique: int, nodeid: int, uid: int,
                   gid: int, pid: int) -> None:
        self.fs.unlink(nodeid, bytes(mv[_HDR:n - 1]), Context(uid, gid, pid))
        self._reply(unique)

    def _do_rmdir(self, mv: memoryview, n: int, unique: int, nodeid: int, uid: int,
                  gid: int, pid: int) -> None:
        self.fs.rmdir(nodeid, bytes(mv[_HDR:n - 1]), Context(uid, gid, pid))
        self._reply(unique)

    def _do_rename(self, mv: memoryview, n: int, unique: int, nodeid: int, uid: int,
                   gid: int, pid: int) -> None:
        newdir = abi.RENAME_IN.unpack_from(mv, _HDR)[0]
        old, new = _two_names(mv, _HDR + abi.RENAME_IN.size, n)
        self.fs.rename(nodeid, old, newdir, new, 0, Context(uid, gid, pid))
        self._reply(unique)

    def _do_rename2(self, mv: memoryview, n: int, unique: int, nodeid: int, uid: int,
                    gid: int, pid: int) -> None:
        newdir, flags, _ = abi.RENAME2_IN.unpack_from(mv, _HDR)
        old, new = _two_names(mv, _HDR + abi.RENAME2_IN.size, n)
        self.fs.rename(nodeid, old, newdir, new, flags, Context(uid, gid, pid))
        self._reply(unique)

    def _do_link(self, mv: memoryview, n: int, unique: int, nodeid: int, uid: int,
                 gid: int, pid: int) -> None:
        old = abi.LINK_IN.unpack_from(mv, _HDR)[0]
        name = bytes(mv[_HDR + abi.LINK_IN.size:n - 1])
        self._reply_entry(unique, self.fs.link(old, nodeid, name, Context(uid, gid, pid)))

    def _open_reply(self, nodeid: int, opened: Opened) -> bytes | None:
        """open_out for ``opened``, or None if the open must be refused (ETXTBSY)."""
        pt = self.passthrough
        if pt is None:
            return abi.OPEN_OUT.pack(opened.fh, opened.open_flags & ~abi.FOPEN_PASSTHROUGH, 0)
        decided = pt.decide(nodeid, opened)
        if decided is None:
            return None
        return abi.OPEN_OUT.pack(opened.fh, decided[0], decided[1])

    def _do_open(self, mv: memoryview, n: int, unique: int, nodeid: int, uid: int,
                 gid: int, pid: int) -> None:
        flags, open_flags = abi.OPEN_IN.unpack_from(mv, _HDR)[:2]
        # The kernel does O_DIRECT's part itself; a descriptor the filesystem opened with
        # it would refuse Python's unaligned buffers (EINVAL).
        # KILL_SUIDGID: an unprivileged caller truncates (HANDLE_KILLPRIV_V2 leaves the
        # set-id bits and capabilities to us).
        opened = self.fs.open(nodeid, flags & ~os.O_DIRECT, Context(uid, gid, pid),
                              bool(open_flags & abi.OPEN_KILL_SUIDGID))
        out = self._open_reply(nodeid, opened)
        if out is None:
            self._refuse_open(unique, nodeid, opened.fh)
        elif not self._reply(unique, out):
            self._lost_open(nodeid, opened.fh)

    def _refuse_open(self, unique: int, nodeid: int, fh: int) -> None:
        log.info("FUSE: open of node %d refused (ETXTBSY): it is passed through to another "
                 "file", nodeid)
        try:
            self.fs.release(nodeid, fh)
        finally:
            self._error(unique, errno.ETXTBSY)

    def _lost_open(self, nodeid: int, fh: int) -> None:
        # No RELEASE will come for an open the kernel never received.
        if self.passthrough is not None:
            self.passthrough.release(nodeid, fh)
        self.fs.release(nodeid, fh)

    def _do_create(self, mv: memoryview, n: int, unique: int, nodeid: int, uid: int,
                   gid: int, pid: int) -> None:
        flags, mode, umask, _ = abi.CREATE_IN.unpack_from(mv, _HDR)
        name = bytes(mv[_HDR + abi.CREATE_IN.size:n - 1])
        entry, opened = self.fs.create(nodeid, name, mode, flags & ~os.O_DIRECT,
                                       self._ctx_umask(uid, gid, pid, umask))
        out = self._open_reply(entry.node_id, opened)
        if out is None:
            # The file exists now; only this open of it is refused.
            self.fs.forget(entry.node_id, 1)
            self._refuse_open(unique, entry.node_id, opened.fh)
            return
        if not self._reply(unique, pack_entry(entry), out):
            self.fs.forget(entry.node_id, 1)
            self._lost_open(entry.node_id, opened.fh)

    def _do_read(self, mv: memoryview, n: int, unique: int, nodeid: int, uid: int,
                 gid: int, pid: int) -> None:
        fh, offset, size, _, _, _, _ = abi.READ_IN.unpack_from(mv, _HDR)
        self._reply(unique, self.fs.read(nodeid, fh, offset, size))

    def _do_write(self, mv: memoryview, n: int, unique: int, nodeid: int, uid: int,
                  gid: int, pid: int) -> None:
        fh, offset, size, wflags, _, _, _ = abi.WRITE_IN.unpack_from(mv, _HDR)
        start = _HDR + abi.WRITE_IN.size
        written = self.fs.write(nodeid, fh, offset, mv[start:start + size],
                                bool(wflags & abi.WRITE_KILL_SUIDGID))
        self._reply(unique, abi.WRITE_OUT.pack(written, 0))

    def _do_statfs(self, mv: memoryview, n: int, unique: int, nodeid: int, uid: int,
                   gid: int, pid: int) -> None:
        st = self.fs.statfs(nodeid)
        self._reply(unique, abi.STATFS_OUT.pack(st.f_blocks, st.f_bfree, st.f_bavail,
                                                st.f_files, st.f_ffree, st.f_bsize,
                                                st.f_namemax, st.f_frsize, 0))

    def _do_release(self, mv: memoryview, n: int, unique: int, nodeid: int, uid: int,
                    gid: int, pid: int) -> None:
        fh = abi.RELEASE_IN.unpack_from(mv, _HDR)[0]
        if self.passthrough is not None:
            self.passthrough.release(nodeid, fh)
        self.fs.release(nodeid, fh)
        self._reply(unique)

    def _do_fsync(self, mv: memoryview, n: int, unique: int, nodeid: int, uid: int,
                  gid: int, pid: int) -> None:
        fh, flags, _ = abi.FSYNC_IN.unpack_from(mv, _HDR)
        self.fs.fsync(nodeid, fh, bool(flags & abi.FSYNC_FDATASYNC))
        self._reply(unique)

    def _do_setxattr(self, mv: memoryview, n: int, unique: int, nodeid: int, uid: int,
                     gid: int, pid: int) -> None:
        # We never ask for SETXATTR_EXT, so the kernel sends the short struct.
        size, flags = abi.SETXATTR_IN.unpack_from(mv, _HDR)
        start = _HDR + abi.SETXATTR_IN.size
        end = bytes(mv[start:n]).index(b"\0") + start
        name = bytes(mv[start:end])
        value = bytes(mv[end + 1:end + 1 + size])
        self.fs.setxattr(nodeid, name, value, flags, Context(uid, gid, pid))
        self._reply(unique)

    def _reply_sized(self, unique: int, want: int, value: bytes) -> None:
        if want == 0:
            self._reply(unique, abi.GETXATTR_OUT.pack(len(value), 0))
        elif len(value) > want:
            self._error(unique, errno.ERANGE)
        else:
            self._reply(unique, value)

    def _do_getxattr(self, mv: memoryview, n: int, unique: int, nodeid: int, uid: int,
                     gid: int, pid: int) -> None:
        size = abi.GETXATTR_IN.unpack_from(mv, _HDR)[0]
        name = bytes(mv[_HDR + abi.GETXATTR_IN.size:n - 1])
        self._reply_sized(unique, size, self.fs.getxattr(nodeid, name, Context(uid, gid, pid)))

    def _do_listxattr(self, mv: memoryview, n: int, unique: int, nodeid: int, uid: int,
                      gid: int, pid: int) -> None:
        size = abi.GETXATTR_IN.unpack_from(mv, _HDR)[0]
        names = self.fs.listxattr(nodeid, Context(uid, gid, pid))
        self._reply_sized(unique, size, b"".join(name + b"\0" for name in names))

    def _do_removexattr(self, mv: memoryview, n: int, unique: int, nodeid: int, uid: int,
                        gid: int, pid: int) -> None:
        self.fs.removexattr(nodeid, bytes(mv[_HDR:n - 1]), Context(uid, gid, pid))
        self._reply(unique)

    def _do_flush(self, mv: memoryview, n: int, unique: int, nodeid: int, uid: int,
                  gid: int, pid: int) -> None:
        fh = abi.FLUSH_IN.unpack_from(mv, _HDR)[0]
        self.fs.flush(nodeid, fh)  # type: ignore[attr-defined]
        self._reply(unique)

    def _do_opendir(self, mv: memoryview, n: int, unique: int, nodeid: int, uid: int,
                    gid: int, pid: int) -> None:
        flags = abi.OPEN_IN.unpack_from(mv, _HDR)[0]
        opendir = getattr(self.fs, "opendir", None)
        try:
            if opendir is None:
                raise OSError(errno.ENOSYS, "no opendir")
            opened = opendir(nodeid, flags, Context(uid, gid, pid))
        except OSError as exc:
            # Without NO_OPENDIR_SUPPORT the kernel fails the opendir(2) on ENOSYS, so
            # answer it ourselves: a handle of 0 and no caching of the listing.
            if exc.errno != errno.ENOSYS or "no_opendir" in self.features:
                raise
            opened = Opened(0)
        self._reply(unique, abi.OPEN_OUT.pack(opened.fh,
                                              opened.open_flags & ~abi.FOPEN_PASSTHROUGH, 0))

    def _do_readdir(self, mv: memoryview, n: int, unique: int, nodeid: int, uid: int,
                    gid: int, pid: int) -> None:
        fh, offset, size, _, _, _, _ = abi.READ_IN.unpack_from(mv, _HDR)
        out = DirBuffer(size)
        self.fs.readdir(nodeid, fh, offset, out.add)
        self._reply(unique, out.buf)

    def _do_readdirplus(self, mv: memoryview, n: int, unique: int, nodeid: int, uid: int,
                        gid: int, pid: int) -> None:
        fh, offset, size, _, _, _, _ = abi.READ_IN.unpack_from(mv, _HDR)
        out = DirBuffer(size)
        try:
            self.fs.readdirplus(nodeid, fh, offset, out.add_plus)
        except BaseException:
            # Entries added before the failure were counted by the filesystem, but the
            # kernel gets an error, not them.
            for node in out.sent:
                self.fs.forget(node, 1)
            raise
        if not self._reply(unique, out.buf):
            for node in out.sent:
                self.fs.forget(node, 1)

    def _do_releasedir(self, mv: memoryview, n: int, unique: int, nodeid: int, uid: int,
                       gid: int, pid: int) -> None:
        fh = abi.RELEASE_IN.unpack_from(mv, _HDR)[0]
        releasedir = getattr(self.fs, "releasedir", None)
        if releasedir is not None:
            releasedir(nodeid, fh)
        self._reply(unique)

    def _do_fsyncdir(self, mv: memoryview, n: int, unique: int, nodeid: int, uid: int,
                     gid: int, pid: int) -> None:
        fh, flags, _ = abi.FSYNC_IN.unpack_from(mv, _HDR)
        self.fs.fsyncdir(nodeid, fh, bool(flags & abi.FSYNC_FDATASYNC))
        self._reply(unique)

    def _do_interrupt(self, mv: memoryview, n: int, unique: int, nodeid: int, uid: int,
                      gid: int, pid: int) -> None:
        # Allowed by the protocol: the interrupted request is answered when it completes.
        pass

    def _do_destroy(self, mv: memoryview, n: int, unique: int, nodeid: int, uid: int,
                    gid: int, pid: int) -> None:
        self._destroy()
        self._reply(unique)

    def _do_fallocate(self, mv: memoryview, n: int, unique: int, nodeid: int, uid: int,
                      gid: int, pid: int) -> None:
        fh, offset, length, mode, _ = abi.FALLOCATE_IN.unpack_from(mv, _HDR)
        self.fs.fallocate(nodeid, fh, offset, length, mode)
        self._reply(unique)

    def _do_lseek(self, mv: memoryview, n: int, unique: int, nodeid: int, uid: int,
                  gid: int, pid: int) -> None:
        fh, offset, whence, _ = abi.LSEEK_IN.unpack_from(mv, _HDR)
        self._reply(unique, abi.LSEEK_OUT.pack(self.fs.lseek(nodeid, fh, offset, whence)))

    def _copy_file_range(self, mv: memoryview, nodeid: int) -> int:
        fh_in, off_in, node_out, fh_out, off_out, length, flags = \
            abi.COPY_FILE_RANGE_IN.unpack_from(mv, _HDR)
        return self.fs.copy_file_range(nodeid, fh_in, off_in, node_out, fh_out, off_out,
                                        length, flags)

    def _do_copy_file_range(self, mv: memoryview, n: int, unique: int, nodeid: int, uid: int,
                            gid: int, pid: int) -> None:
        # The 32-bit reply: the kernel asks for at most 4 GiB - 1 here.
        self._reply(unique, abi.WRITE_OUT.pack(self._copy_file_range(mv, nodeid), 0))

    def _do_copy_file_range_64(self, mv: memoryview, n: int, unique: int, nodeid: int,
                               uid: int, gid: int, pid: int) -> None:
        self._reply(unique, abi.COPY_FILE_RANGE_OUT.pack(self._copy_file_range(mv, nodeid)))


_ZERO_ATTR_OUT_HEAD = abi.ATTR_OUT_HEAD.pack(0, 0, 0)


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >> 63 else value


def _two_names(mv: memoryview, start: int, n: int) -> tuple[bytes, bytes]:
    raw = bytes(mv[start:n])
    first, _, rest = raw.partition(b"\0")
    return first, rest.split(b"\0", 1)[0]


def _op_name(opcode: int) -> str:
    try:
        return Opcode(opcode).name
    except ValueError:
        return f"OP{opcode}"


def _allow_root_check(handler: Handler) -> Handler:
    def checked(session: Session, mv: memoryview, n: int, unique: int, nodeid: int, uid: int,
                gid: int, pid: int) -> None:
        if uid != 0 and uid != session.owner_uid:
            session._error(unique, errno.EACCES)
            return
        handler(session, mv, n, unique, nodeid, uid, gid, pid)
    return checked


# One row per opcode: the handler and the filesystem method it needs (None: always served).
# A filesystem without that method gets ENOSYS, which most opcodes' kernel side remembers.
_HANDLERS: dict[int, tuple[Handler, str | None]] = {
    Opcode.LOOKUP: (Session._do_lookup, "lookup"),
    Opcode.FORGET: (Session._do_forget, "forget"),
    Opcode.BATCH_FORGET: (Session._do_batch_forget, "forget"),
    Opcode.GETATTR: (Session._do_getattr, "getattr"),
    Opcode.SETATTR: (Session._do_setattr, "setattr"),
    Opcode.READLINK: (Session._do_readlink, "readlink"),
    Opcode.SYMLINK: (Session._do_symlink, "symlink"),
    Opcode.MKNOD: (Session._do_mknod, "mknod"),
    Opcode.MKDIR: (Session._do_mkdir, "mkdir"),
    Opcode.UNLINK: (Session._do_unlink, "unlink"),
    Opcode.RMDIR: (Session._do_rmdir, "rmdir"),
    Opcode.RENAME: (Session._do_rename, "rename"),
    Opcode.RENAME2: (Session._do_rename2, "rename"),
    Opcode.LINK: (Session._do_link, "link"),
    Opcode.OPEN: (Session._do_open, "open"),
    Opcode.READ: (Session._do_read, "read"),
    Opcode.WRITE: (Session._do_write, "write"),
    Opcode.STATFS: (Session._do_statfs, "statfs"),
    Opcode.RELEASE: (Session._do_release, "release"),
    Opcode.FSYNC: (Session._do_fsync, "fsync"),
    Opcode.SETXATTR: (Session._do_setxattr, "setxattr"),
    Opcode.GETXATTR: (Session._do_getxattr, "getxattr"),
    Opcode.LISTXATTR: (Session._do_listxattr, "listxattr"),
    Opcode.REMOVEXATTR: (Session._do_removexattr, "removexattr"),
    Opcode.FLUSH: (Session._do_flush, "flush"),
    Opcode.OPENDIR: (Session._do_opendir, None),
    Opcode.READDIR: (Session._do_readdir, "readdir"),
    Opcode.READDIRPLUS: (Session._do_readdirplus, "readdirplus"),
    Opcode.RELEASEDIR: (Session._do_releasedir, None),
    Opcode.FSYNCDIR: (Session._do_fsyncdir, "fsyncdir"),
    Opcode.CREATE: (Session._do_create, "create"),
    Opcode.INTERRUPT: (Session._do_interrupt, None),
    Opcode.DESTROY: (Session._do_destroy, None),
    Opcode.FALLOCATE: (Session._do_fallocate, "fallocate"),
    Opcode.LSEEK: (Session._do_lseek, "lseek"),
    Opcode.COPY_FILE_RANGE: (Session._do_copy_file_range, "copy_file_range"),
    Opcode.COPY_FILE_RANGE_64: (Session._do_copy_file_range_64, "copy_file_range"),
    # ACCESS: ENOSYS on purpose; the kernel then checks permissions itself (with
    # default_permissions) or lets access(2) succeed, and never asks again.
    # GETLK/SETLK/SETLKW: without POSIX_LOCKS the kernel keeps locks itself.
    # IOCTL, POLL, BMAP, SETUPMAPPING, REMOVEMAPPING, SYNCFS, TMPFILE, STATX: ENOSYS.
}

