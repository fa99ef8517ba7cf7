"""A running qvdfs daemon's counters, asked over its stats socket.

The daemon (``qvdfs/stats.py``) listens on a Unix socket in the abstract namespace named
after its mountpoint and answers every connection from root with one JSON document: per
opcode the number of requests and the daemon time they took, the copy-ups and passthrough
opens, and the backend in use. ``qvdfs stats`` reads it, and so do qvdctl's metrics, which
may not import qvdfs: the name and the reading live here, below both.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket

TIMEOUT = 10.0


def socket_name(mountpoint: str) -> bytes:
    """The abstract socket of the daemon serving the resolved path ``mountpoint``."""
    digest = hashlib.sha256(os.fsencode(mountpoint)).hexdigest()[:32]
    return b"\0qvdfs-stats-" + digest.encode()


def fetch(mountpoint: str, timeout: float = TIMEOUT) -> dict[str, object]:
    """The counters of the daemon serving ``mountpoint``.

    Raises:
        OSError: no daemon answers there (or not within ``timeout`` seconds).
        ValueError: the answer is not a JSON document.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        sock.connect(socket_name(os.path.realpath(mountpoint)))
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    data: dict[str, object] = json.loads(b"".join(chunks))
    return data
