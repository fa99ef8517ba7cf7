"""``qvdfs stats MOUNTPOINT``: a mounted daemon's counters, read while it serves.

The daemon listens on a Unix socket in the abstract namespace named after its mountpoint
(nothing to clean up, gone with the process) and answers every connection from root with
one JSON document: per opcode the number of requests and the daemon time they took, the
copy-ups and passthrough opens, and the backend in use. The socket's name and the reading
side are ``qvdproc.counters``, which qvdctl's metrics read too.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import sys
import threading
from collections.abc import Callable, Sequence

from qvdproc.counters import fetch, socket_name

log = logging.getLogger(__name__)

USAGE = "usage: qvdfs stats MOUNTPOINT [--json]"


def is_stats_command(argv: Sequence[str]) -> bool:
    """``stats MOUNTPOINT [--json]`` where MOUNTPOINT is a mount point.

    unionfs-fuse's own grammar would read those words as a branch called "stats" and a
    mountpoint; a mountpoint that is already mounted could not be mounted on, so the two
    never mean the same command.
    """
    words = [w for w in argv if w != "--json"]
    return len(words) == 2 and words[0] == "stats" and os.path.ismount(words[1])


class StatsServer:
    """Answers stats requests on a daemon thread until ``close``."""

    def __init__(self, sock: socket.socket, counters: Callable[[], dict[str, object]]) -> None:
        self._sock = sock
        self._counters = counters
        self._thread = threading.Thread(target=self._run, name="qvdfs-stats", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            with conn:
                try:
                    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                            struct.calcsize("3i"))
                    _pid, uid, _gid = struct.unpack("3i", creds)
                    if uid != 0:
                        continue
                    conn.sendall(json.dumps(self._counters()).encode())
                except Exception:  # noqa: BLE001 - a stats reader never harms the mount
                    log.debug("stats request failed", exc_info=True)

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


def serve(mountpoint: str, counters: Callable[[], dict[str, object]]) -> StatsServer | None:
    """Start answering ``qvdfs stats`` for ``mountpoint``; None if the socket is taken."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(socket_name(mountpoint))
        sock.listen(4)
    except OSError as exc:
        log.warning("no stats for %s: %s", mountpoint, exc)
        sock.close()
        return None
    return StatsServer(sock, counters)


def format_text(counters: dict[str, object]) -> str:
    """The counters as an admin reads them: totals, then opcodes by time spent."""
    lines = []
    for key, value in counters.items():
        if not isinstance(value, dict):
            lines.append(f"{key}: {value}")
    opcodes = counters.get("opcodes")
    if isinstance(opcodes, dict) and opcodes:
        lines.append(f"{'opcode':<16} {'requests':>10} {'ms':>10} {'µs/req':>8}")
        rows = sorted(opcodes.items(), key=lambda kv: -kv[1]["ns"])
        for name, row in rows:
            count, ns = row["count"], row["ns"]
            per = ns / count / 1000 if count else 0.0
            lines.append(f"{name:<16} {count:>10} {ns / 1e6:>10.1f} {per:>8.1f}")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    """``qvdfs stats MOUNTPOINT [--json]``; return the exit status."""
    as_json = "--json" in argv
    words = [w for w in argv if w != "--json"]
    if len(words) != 1:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        counters = fetch(words[0])
    except (OSError, ValueError) as exc:
        print(f"qvdfs: no qvdfs daemon answers for {words[0]}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(counters, indent=2) if as_json else format_text(counters))
    return 0
