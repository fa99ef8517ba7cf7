"""``python -m benchmarks.dispatch``: the daemon's own cost of one request, with no kernel.

Each request is packed as /dev/fuse would deliver it and handed to the native session's
opcode table (``qvdfs.fuse.opcodes``), which decodes it, calls the union
(``qvdfs.handlers.UnionFilesystem`` over real folders in a temporary directory) and writes
its reply with the session's own ``writev`` to /dev/null. What is timed is therefore what a
daemon thread does for a request between its ``readv`` and the next one: decoding, the
union's Python, its system calls on the branches, packing and the reply's system call. Not
timed: the kernel's side of FUSE, thread wake-ups and the GIL hand-offs between readers.

Each figure is this thread's CPU time (not wall time) per request: the median over
``--rounds`` of a round's mean, so other processes on a loaded machine move it far less than
they move a timed mount. The first line says which of the request path's modules were
loaded from extension modules (as mypyc builds them) rather than from source, so that two
runs, one of each, can be put side by side (benchmarks/README.md: "A compiled hot path").

Every request must succeed, except GETXATTR of an attribute the file does not have (ENODATA,
which is what the kernel asks on a first write); anything else stops the run with the errno.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from qvdfs import cmdline, handlers
from qvdfs.fuse import abi, opcodes, session, wire
from qvdfs.fuse.abi import Opcode
from qvdfs.fuse.filesystem import ROOT_ID, Context, NullNotifier
from qvdfs.fuse.session import Session
from qvdfs.handlers import UnionFilesystem
from qvdfs.union import core, tree

# Modules whose form (compiled or source) the report names.
WATCHED = (session, opcodes, wire, handlers, core, tree)
FILES_IN_DIR = 100
# The one error a measured request may get: the kernel's GETXATTR security.capability.
EXPECTED_ERRORS = {(Opcode.GETXATTR, errno.ENODATA)}


class RequestFailed(Exception):
    """A measured request was answered with an error it should not get."""


class Driver:
    """Packs requests and dispatches them through one session's opcode table."""

    def __init__(self, fs: UnionFilesystem, reply_fd: int) -> None:
        self.session = Session(fs, reply_fd, mountpoint="benchmark")
        self.table = opcodes.build_table(fs, False, os.getuid())
        self.buf = bytearray(1 << 17)
        self.request = opcodes.Request(memoryview(self.buf))
        self.unique = 0

    def send(self, opcode: Opcode, nodeid: int, body: bytes = b"") -> None:
        """Dispatch one request as a session worker does (an OSError becomes the errno
        reply); raise RequestFailed if the answer is an error not in EXPECTED_ERRORS."""
        self.unique += 1
        size = opcodes.HDR + len(body)
        abi.IN_HEADER.pack_into(self.buf, 0, size, opcode, self.unique, nodeid, os.getuid(),
                                os.getgid(), os.getpid(), 0, 0)
        self.buf[opcodes.HDR:size] = body
        self.request.fill(size)
        try:
            self.table[opcode](self.session, self.request)
        except OSError as exc:
            err = exc.errno or errno.EIO
            self.session.error(self.unique, err)
            if (opcode, err) not in EXPECTED_ERRORS:
                raise RequestFailed(f"{opcode.name} of node {nodeid}: "
                                    f"{errno.errorcode.get(err, err)}") from None


def _name(text: str) -> bytes:
    return text.encode() + b"\0"


@contextlib.contextmanager
def union(root: Path) -> Iterator[UnionFilesystem]:
    """A union of an empty upper folder over a base holding ``f`` and ``dir/`` (files)."""
    base, upper, mnt = root / "base", root / "upper", root / "mnt"
    for d in (base, upper, mnt, base / "dir"):
        d.mkdir()
    (base / "f").write_bytes(b"x" * 100)
    for i in range(FILES_IN_DIR):
        (base / "dir" / f"file{i:03}").write_bytes(b"y")
    config = cmdline.parse_args(["-o", "cow", f"{upper}=RW:{base}=RO", str(mnt)])
    fs = UnionFilesystem(config)
    fs.init(frozenset({"no_opendir", "readdirplus"}), NullNotifier())
    try:
        yield fs
    finally:
        fs.destroy()


def _lookup(fs: UnionFilesystem, parent: int, name: str) -> int:
    caller = Context(os.getuid(), os.getgid(), os.getpid(), 0)
    return fs.lookup(parent, name.encode(), caller).node_id


def _entry_reply(pipe_r: int, what: str) -> tuple[int, bytes]:
    """The node id of the entry reply waiting in the pipe, and the whole reply."""
    reply = os.read(pipe_r, 4096)
    _, error, _ = abi.OUT_HEADER.unpack_from(reply)
    if error:
        raise RequestFailed(f"{what}: {errno.errorcode.get(-error, error)}")
    return abi.ENTRY_OUT_HEAD.unpack_from(reply, abi.OUT_HEADER.size)[0], reply


def measure(fs: UnionFilesystem, count: int, rounds: int) -> dict[str, float]:
    """CPU microseconds of this thread per request of each kind: the median over ``rounds``
    of the round's mean. Thread CPU time, not wall time, so that other processes taking
    the CPU away do not count (a loaded machine still slows caches and the branches)."""
    null_fd = os.open(os.devnull, os.O_WRONLY)
    pipe_r, pipe_w = os.pipe()
    clock = time.thread_time_ns
    try:
        to_null = Driver(fs, null_fd)
        to_pipe = Driver(fs, pipe_w)
        f_node = _lookup(fs, ROOT_ID, "f")
        dir_node = _lookup(fs, ROOT_ID, "dir")
        getattr_in = abi.GETATTR_IN.pack(0, 0, 0)
        getxattr_in = abi.GETXATTR_IN.pack(0, 0) + _name("security.capability")
        forget_one = abi.FORGET_IN.pack(1)
        times: dict[str, list[float]] = {}
        for r in range(rounds):
            samples: dict[str, list[float]] = {}

            def batch(kind: str, opcode: Opcode, node: int, body: bytes,
                      then: Callable[[], None] | None = None) -> None:
                # Requests that change nothing: timed as one loop, so the clock's own
                # cost (a system call) is paid once.
                start = clock()
                for _ in range(count):
                    to_null.send(opcode, node, body)
                    if then is not None:
                        then()
                samples[kind] = [(clock() - start) / count / 1000]

            def one(kind: str, run: Callable[[], None]) -> None:
                start = clock()
                run()
                samples.setdefault(kind, []).append((clock() - start) / 1000)

            batch("GETATTR", Opcode.GETATTR, ROOT_ID, getattr_in)
            batch("LOOKUP+FORGET", Opcode.LOOKUP, ROOT_ID, _name("f"),
                  lambda: to_null.send(Opcode.FORGET, f_node, forget_one))
            batch("GETXATTR", Opcode.GETXATTR, f_node, getxattr_in)
            batch("STATFS", Opcode.STATFS, ROOT_ID, b"")
            for i in range(count // 4):
                tag = f"{r}-{i}"
                one("CREATE", lambda: to_pipe.send(
                    Opcode.CREATE, ROOT_ID, abi.CREATE_IN.pack(os.O_WRONLY | os.O_CREAT,
                                                               0o100644, 0o022, 0)
                    + _name(f"c{tag}")))
                node, reply = _entry_reply(pipe_r, "CREATE")
                fh = abi.OPEN_OUT.unpack_from(
                    reply, abi.OUT_HEADER.size + abi.ENTRY_OUT_HEAD.size + abi.ATTR.size)[0]
                # Owner, mode and times of the file being written, as tar -p sets them
                # before it closes it, then of the closed file, by name.
                one("SETATTR/fd", lambda: to_null.send(Opcode.SETATTR, node,
                                                       _setattr_in(fh, abi.FATTR_FH)))
                one("RELEASE", lambda: to_null.send(Opcode.RELEASE, node,
                                                    abi.RELEASE_IN.pack(fh, 0, 0, 0)))
                one("SETATTR/name", lambda: to_null.send(Opcode.SETATTR, node,
                                                         _setattr_in(0, 0)))
                one("UNLINK", lambda: to_null.send(Opcode.UNLINK, ROOT_ID, _name(f"c{tag}")))
                to_null.send(Opcode.FORGET, node, forget_one)
                one("MKDIR", lambda: to_pipe.send(Opcode.MKDIR, ROOT_ID,
                                                  abi.MKDIR_IN.pack(0o40755, 0o022)
                                                  + _name(f"d{tag}")))
                node = _entry_reply(pipe_r, "MKDIR")[0]
                one("RMDIR", lambda: to_null.send(Opcode.RMDIR, ROOT_ID, _name(f"d{tag}")))
                to_null.send(Opcode.FORGET, node, forget_one)
                if i % 10 == 0:
                    one("READDIRPLUS", lambda: _readdirplus(to_pipe, pipe_r, dir_node))
            for kind, values in samples.items():
                times.setdefault(kind, []).append(statistics.fmean(values))
        return {kind: statistics.median(values) for kind, values in times.items()}
    finally:
        for fd in (null_fd, pipe_r, pipe_w):
            os.close(fd)


def _setattr_in(fh: int, extra_valid: int) -> bytes:
    """A SETATTR body that sets owner (the caller's own), mode 0644 and both times."""
    valid = (abi.FATTR_MODE | abi.FATTR_UID | abi.FATTR_GID | abi.FATTR_ATIME
             | abi.FATTR_MTIME | extra_valid)
    return abi.SETATTR_IN.pack(valid, 0, fh, 0, 0, 1_000_000_000, 1_000_000_000, 0, 0, 0, 0,
                               0o100644, 0, os.getuid(), os.getgid(), 0)


def _readdirplus(driver: Driver, pipe_r: int, dir_node: int) -> None:
    """One READDIRPLUS of the whole folder (it fits one 64 KiB reply), the reply drained.
    The kernel would FORGET the entries later; their lookup counts only grow here."""
    driver.send(Opcode.READDIRPLUS, dir_node, abi.READ_IN.pack(0, 0, 65536, 0, 0, 0, 0))
    reply = os.read(pipe_r, 1 << 17)
    if len(reply) < abi.OUT_HEADER.size + FILES_IN_DIR * abi.direntplus_size(len("file000")):
        raise RequestFailed(f"READDIRPLUS: a {len(reply)}-byte reply for {FILES_IN_DIR} files")


def compiled_modules() -> list[str]:
    """The watched modules that were loaded from an extension module (mypyc) here."""
    return [m.__name__ for m in WATCHED if not (m.__file__ or "").endswith(".py")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.dispatch",
        description="The FUSE daemon's own CPU time per request, with no kernel: requests run "
                    "through the session's opcode table and the union over folders.")
    parser.add_argument("--count", type=int, default=2000,
                        help="GETATTR, LOOKUP, GETXATTR and STATFS requests per round; a quarter "
                             "as many create (with SETATTR) and mkdir cycles, a fortieth as "
                             "many READDIRPLUS")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    if args.count < 4 or args.rounds < 1:
        print("dispatch: --count must be at least 4 and --rounds at least 1", file=sys.stderr)
        return 2
    compiled = compiled_modules()
    print(f"compiled: {', '.join(compiled) if compiled else 'none (pure Python)'}")
    try:
        with tempfile.TemporaryDirectory(prefix="qvdfs-dispatch-") as tmp, \
                union(Path(tmp)) as fs:
            result = measure(fs, args.count, args.rounds)
    except RequestFailed as exc:
        print(f"dispatch: a request failed: {exc}", file=sys.stderr)
        return 1
    for kind, us in result.items():
        print(f"{kind:<12} {us:8.2f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
