"""The ``qvdfs`` command: hand the mount to the node's prepared parent, or mount by itself.

This module is the console entry point, so it imports nothing of qvdfs until it must: a
command the parent (``qvdfs.parent``) serves costs the interpreter's start and one socket
round trip, and the mount itself happens in a child forked from the parent. When no parent
answers (``QVDFS_PARENT_SOCKET`` empty, no socket, a stale socket), and for ``qvdfs stats``
and ``qvdfs parent``, the command runs in this process (``qvdfs.daemon.main``), exactly as
it did before the parent existed, so a node without the parent's unit still mounts.
"""

from __future__ import annotations

# _socket, socket.py's own core, not socket.py: importing that costs 10 ms here (enum,
# selectors), a fifth of a mount's budget of 50 ms, for two helpers this module does without.
import _socket
import array
import os
import sys
from collections.abc import Sequence

import qvdfs
from qvdfs import PARENT_SOCKET, PARENT_SOCKET_ENV

REPLY_SIZE = 4096
_SUBCOMMANDS = ("stats", "parent")


def main() -> int:
    """Console entry point: ``sys.exit(main())``."""
    args = sys.argv[1:]
    if args[:1] == ["parent"]:
        from qvdfs import parent

        if parent.is_parent_command(args):
            return parent.main(args[1:])
    path = os.environ.get(PARENT_SOCKET_ENV, PARENT_SOCKET)
    if path and args[:1] and args[0] not in _SUBCOMMANDS:
        status = through_parent(path, sys.argv)
        if status is not None:
            # Nothing of ours to tear down: skipping the interpreter's own (5-10 ms on a
            # busy node, measured) shortens every mount by as much.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    from qvdfs import daemon

    return daemon.main(args)


def through_parent(path: str, argv: Sequence[str]) -> int | None:
    """Have the parent at ``path`` run ``argv``; its exit status, or None when no parent
    answers there or it hands the command back (run it in this process then)."""
    conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    try:
        try:
            conn.connect(path)
        except OSError:
            return None
        opened = _passed_fds()
        try:
            # Our package's folder first: a parent of another installation hands us back.
            package = os.path.dirname(os.path.abspath(qvdfs.__file__))
            conn.sendmsg([b"\0".join(os.fsencode(a) for a in [package, *argv])],
                         [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, array.array("i", opened))])
        except OSError as exc:
            print(f"qvdfs: cannot reach the parent at {path}: {exc.strerror or exc}",
                  file=sys.stderr)
            return 1
        finally:
            for fd in opened[3:]:
                os.close(fd)
        try:
            reply = conn.recv(REPLY_SIZE).decode(errors="replace")
        except OSError as exc:
            reply = f"error {exc.strerror or exc}"
    finally:
        conn.close()
    word, _, rest = reply.partition(" ")
    if word == "local":
        return None
    if word == "exit" and rest.isdigit():
        return int(rest)
    why = rest if word == "error" else "the parent ended before the mount was ready"
    print(f"qvdfs: {why}", file=sys.stderr, flush=True)
    return 1


def _passed_fds() -> list[int]:
    """The streams (``/dev/null`` for a closed one), root, working folder and mount namespace,
    as ``qvdfs.parent.PASSED_FDS`` lists them; the last three are ours to close."""
    streams = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            streams.append(fd)
        except OSError:
            streams.append(os.open(os.devnull, os.O_RDWR))  # left to the exit to close
    return [*streams, os.open("/", os.O_RDONLY | os.O_DIRECTORY),
            os.open(".", os.O_RDONLY | os.O_DIRECTORY), os.open("/proc/self/ns/mnt", os.O_RDONLY)]
