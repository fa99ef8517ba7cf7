"""Passthrough bookkeeping: which backing file each node's opens are passed through to.

With FUSE_PASSTHROUGH the kernel reads, writes and maps a registered backing file itself
(``Opened.backing_fd``), so no READ or WRITE of such an open reaches the daemon. This module
keeps the kernel's rules (below) per node and registers and closes backing ids with the
/dev/fuse ioctls; the session asks it for each OPEN/CREATE reply and tells it each RELEASE.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from typing import Any

from . import abi
from .filesystem import Opened

log = logging.getLogger("qvdfs.fuse")


class Passthrough:
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
