"""The FUSE session: read requests from /dev/fuse, dispatch them, reply, notify, count.

How it works, and why:

- INIT is answered in the thread that calls ``serve()``, before any worker starts, because
  the buffer size follows from the negotiated ``max_write`` and the kernel sends nothing
  else until INIT is answered. What is agreed is worked out by ``negotiate``; the
  filesystem then gets the features in force and this session as its ``Notifier``.
- Then ``threads`` workers read /dev/fuse. The kernel hands each request to exactly one
  blocked reader, so a request that sleeps (a cold directory, a copy-up, an fsync) holds up
  only its own thread. Each worker owns one preallocated buffer and one ``Request`` over
  it, reads with one ``readv``, and replies with one ``writev``: two system calls a request.
- Dispatch is a list indexed by opcode (``opcodes.build_table``): each opcode's decoder
  unpacks its input and calls the filesystem; a missing row, or a method the filesystem
  lacks, is ENOSYS. ``OSError`` becomes its errno; any other exception becomes EIO with a
  logged traceback, so a bug costs one request, never the mount.
- INTERRUPT is ignored, which the protocol allows: every request is answered when the
  filesystem returns, and the kernel drops the answer to a request it gave up on (our
  ``writev`` then fails with ENOENT, which is expected).
- Notifications are queued and written by one notifier thread: a worker that sent
  INVAL_ENTRY for the directory whose request it is serving would wait on the kernel's
  directory lock held for that very request, i.e. forever. ENOENT (nothing cached) is the
  normal answer and ignored.
- Passthrough (``Opened.backing_fd``): see ``passthrough.Passthrough`` for the kernel's rules.

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
import logging
import mmap
import os
import queue
import threading
import time
from typing import Any

from . import abi
from .abi import Opcode
from .filesystem import Filesystem
from .mount import MountOptions
from .negotiate import Asked, Offer, ProtocolTooOld, negotiate
from .opcodes import HDR, TABLE_SIZE, Request, build_table, op_name
from .passthrough import Passthrough

log = logging.getLogger("qvdfs.fuse")

DEFAULT_THREADS = 4
# Request headers (in header + write_in) fit in one page next to the data.
_HEADROOM = 4096
_OUT = abi.OUT_HEADER


class _Stop(Exception):
    """The connection is gone (ENODEV) or cannot be used: the readers end."""


class Session:
    """Serves one mounted FUSE connection (the /dev/fuse descriptor ``fd``) for ``fs``.

    It is also the filesystem's ``Notifier`` (``invalidate_entry``, ``invalidate_inode``).

    Args:
        fs: the filesystem (``qvdfs.fuse.filesystem.Filesystem``).
        fd: the /dev/fuse descriptor the mount uses (``qvdfs.fuse.mount.mount``); the
            session does not close it.
        mountpoint: for log messages.
        options: the mount's options (default: none); ``default_permissions`` lets it
            ask for POSIX ACLs (and idmapping), ``allow_root`` makes it answer EACCES to
            callers other than root and the mounting user.
        disabled: names from ``negotiate.FEATURES`` not to ask the kernel for.
        threads: readers of /dev/fuse (``DEFAULT_THREADS``).
        idmap: ask for ALLOW_IDMAP (unless "allow_idmap" is disabled).

    Raises:
        ValueError: ``disabled`` names a feature not in ``negotiate.FEATURES``.
    """

    def __init__(self, fs: Filesystem, fd: int, *, mountpoint: str,
                 options: MountOptions | None = None, disabled: frozenset[str] = frozenset(),
                 threads: int = DEFAULT_THREADS, idmap: bool = False) -> None:
        options = options or MountOptions()
        self.asked = Asked(frozenset(disabled), options.default_permissions, idmap,
                           hasattr(fs, "readdirplus"))
        self.fs = fs
        self.fd = fd
        self.mountpoint = mountpoint
        self.threads = max(1, threads)
        self.features: frozenset[str] = frozenset()
        self.max_write = 0
        self.passthrough: Passthrough | None = None
        self.posix_acl = False
        self.setxattr_ext = False
        self._table = build_table(fs, options.allow_root, os.getuid())
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
            self.destroy()

    def _serve(self) -> None:
        counts, nanos = self._new_stats()
        buf = bytearray(abi.MIN_READ_BUFFER * 2)
        try:
            while not self._handle_init(buf, counts, nanos):
                pass
        except _Stop:
            return
        notifier = threading.Thread(target=self._notifier, name="fuse-notify", daemon=True)
        workers = [threading.Thread(target=self._worker, name=f"fuse-{i}", daemon=True)
                   for i in range(1, self.threads)]
        for thread in (notifier, *workers):
            thread.start()
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

    def invalidate_attributes(self, node_id: int) -> None:
        """Sent at once, not queued: see ``Notifier.invalidate_attributes``."""
        self._send_notification(abi.NotifyCode.INVAL_INODE,
                                abi.NOTIFY_INVAL_INODE_OUT.pack(node_id, -1, 0))

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
                    name = op_name(op)
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

    def reply(self, unique: int, *parts: bytes | bytearray | memoryview) -> bool:
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

    def error(self, unique: int, err: int) -> None:
        """Answer request ``unique`` with errno ``err``."""
        try:
            os.write(self.fd, _OUT.pack(16, -err, unique))
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                raise _Stop from None
            if exc.errno != errno.ENOENT:
                log.warning("FUSE: error reply %d for request %d failed: %s", err, unique,
                            exc)

    def destroy(self) -> None:
        """Call the filesystem's ``destroy``, once whoever asks first (DESTROY or the end
        of ``serve``)."""
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

    # ---- the loop ---------------------------------------------------------------------

    def _new_stats(self) -> tuple[list[int], list[int]]:
        counts = [0] * TABLE_SIZE
        nanos = [0] * TABLE_SIZE
        self._counts.append(counts)
        self._nanos.append(nanos)
        return counts, nanos

    def _read(self, buf: bytearray | mmap.mmap) -> int:
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
        # Anonymous memory, not a bytearray (which is zero-filled, so every page of it
        # resident at once): a page is used only once a request as large reaches it. Four
        # readers' 1 MiB buffers were 4 MiB of every mount's private memory from the start.
        buf = mmap.mmap(-1, self.max_write + _HEADROOM)
        request = Request(memoryview(buf))
        fill = request.fill
        table = self._table
        read = self._read
        clock = time.perf_counter_ns
        # Asked once: a debug line per request is for `qvdfs -d`, never the normal path.
        trace = log.isEnabledFor(logging.DEBUG)
        try:
            while True:
                fill(read(buf))
                start = clock()
                opcode = request.opcode
                if trace:
                    log.debug("FUSE %s node %d (request %d, pid %d)", op_name(opcode),
                              request.nodeid, request.unique, request.pid)
                # Counted before the reply goes out, so a reader of the counters who has
                # seen the reply also sees the request.
                if opcode < TABLE_SIZE:
                    counts[opcode] += 1
                try:
                    table[opcode if opcode < TABLE_SIZE else 0](self, request)
                except OSError as exc:
                    self.error(request.unique, exc.errno or errno.EIO)
                except _Stop:
                    raise
                except Exception:
                    log.exception("FUSE %s (node %d) failed", op_name(opcode), request.nodeid)
                    self.error(request.unique, errno.EIO)
                if opcode < TABLE_SIZE:
                    nanos[opcode] += clock() - start
        except _Stop:
            pass

    def _notifier(self) -> None:
        while True:
            item = self._notify_q.get()
            if item is None:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            self._send_notification(*item)

    def _send_notification(self, code: int, payload: bytes) -> None:
        try:
            os.writev(self.fd, (_OUT.pack(16 + len(payload), code, 0), payload))
        except OSError as exc:
            # ENOENT: the kernel had nothing cached; ENODEV: unmounted meanwhile.
            if exc.errno not in (errno.ENOENT, errno.ENODEV):
                log.warning("FUSE notification %s failed: %s", abi.NotifyCode(code), exc)

    # ---- INIT -------------------------------------------------------------------------

    def _handle_init(self, buf: bytearray, counts: list[int], nanos: list[int]) -> bool:
        """Read one request, which must be INIT, and answer it; True once agreed."""
        n = self._read(buf)
        start = time.perf_counter_ns()
        _, opcode, unique, _, _, _, _, _, _ = abi.IN_HEADER.unpack_from(buf)
        if opcode != Opcode.INIT:
            log.warning("FUSE: %s before INIT; answering EIO", op_name(opcode))
            self.error(unique, errno.EIO)
            return False
        offer = Offer.unpack(memoryview(buf)[HDR:n])
        try:
            agreed = negotiate(offer, self.asked)
        except ProtocolTooOld as exc:
            log.error("FUSE: %s", exc)
            self.error(unique, errno.EPROTO)
            raise _Stop from None
        self.reply(unique, agreed.reply)
        if not agreed.settled:
            return False  # a newer major: it asks again in ours
        counts[opcode] += 1
        nanos[opcode] += time.perf_counter_ns() - start

        self.max_write = agreed.max_write
        if agreed.granted & abi.PASSTHROUGH:
            self.passthrough = Passthrough(self.fd)
            log.info("FUSE %s: passthrough on (kernel 7.%d)", self.mountpoint, offer.minor)
        else:
            why = ("disabled by the caller" if "passthrough" in self.asked.disabled
                   else "the kernel does not offer it" if not offer.flags & abi.PASSTHROUGH
                   else "not negotiated")
            log.info("FUSE %s: passthrough off (%s); the daemon serves file I/O",
                     self.mountpoint, why)
        self.posix_acl = bool(agreed.granted & abi.POSIX_ACL)
        self.setxattr_ext = bool(agreed.granted & abi.SETXATTR_EXT)
        log.debug("FUSE INIT: kernel 7.%d offered %s; in force: %s", offer.minor,
                  ",".join(abi.flag_names(offer.flags)), ",".join(sorted(agreed.features)))
        self.features = agreed.features
        init = getattr(self.fs, "init", None)
        if init is not None:
            init(self.features, self)
        self.initialized.set()
        return True
