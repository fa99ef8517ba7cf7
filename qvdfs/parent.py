"""``qvdfs parent``: one prepared parent per node, forking one child per mount.

A mount started by a fresh interpreter pays for Python's start and qvdfs' imports (about
100 ms here) and keeps a private copy of everything it imported (most of a root's memory).
The parent imports the daemon once, freezes its heap (``gc.freeze``, so that no collection
ever writes to those objects and un-shares their pages) and serves a socket; for every
``qvdfs`` command that reaches it, it forks a child that runs the command exactly as the
command would have (``qvdfs.daemon.run``): checks, mount, fork of the serving daemon, exit
0 once the mount answers. The daemon is the child's child, reparented like unionfs-fuse's,
so:

- each mount is its own process: a crash or a ``kill -9`` takes that root alone, and the
  parent, which never serves a request, is not even its parent;
- the interpreter's and the modules' pages are shared copy-on-write by every mount;
- ``umount`` ends that mount's daemon, as before.

The command line (``qvdfs.launch``) sends the folder of its qvdfs package (a command of
another installation is handed back, so that it runs its own code) and its argv over the
socket, with its standard streams, its root and working folders and its mount namespace
(``SCM_RIGHTS``). The child takes all of them, and the command's umask and limits, before
it runs the command, so paths, error lines and the mount itself are the caller's; the
daemon's ``/proc/PID/cmdline`` is the caller's command line (``set_command_line``), which
is how qvdctl finds a root's daemon (a kernel that cannot set it gets the command handed
back). The reply is one message: ``exit N``, ``error TEXT``, or ``local`` (the child
declines: ``-f``/``-d``, which serve in the caller's own process, and ``--help``,
``--version``). Without a parent the command mounts by itself: the parent is a speed-up,
never a dependency.

Only root may use it: the socket is 0600 in a 0700 folder, and a peer whose uid (seen
from our user namespace, ``SO_PEERCRED``) is not 0 is refused, so neither a container's
root (a mapped uid) nor a node user can make a root daemon mount anything.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import selectors
import resource
import signal
import socket
import struct
import sys
from collections.abc import Sequence
from typing import NoReturn

from qvdfs import PARENT_SOCKET
from qvdproc import processes

log = logging.getLogger(__name__)

# The command's package folder and argv, NUL-joined, in one SOCK_SEQPACKET message.
MAX_MESSAGE = 64 * 1024
# The folder of the qvdfs package the parent runs: a command of another one is handed back.
PACKAGE = os.path.dirname(os.path.abspath(__file__))
# What the command sends with its argv, in this order.
PASSED_FDS = ("stdin", "stdout", "stderr", "root", "cwd", "mount namespace")
# setns(2)'s flag for a mount namespace (os.setns comes with Python 3.12).
_CLONE_NEWNS = 0x00020000
_PR_SET_MM, _PR_SET_MM_MAP = 35, 14
_UCRED = struct.Struct("3i")
# Kept alive for good: the kernel reads the command line from this buffer.
_command_line: ctypes.Array[ctypes.c_char] | None = None


def is_parent_command(argv: Sequence[str]) -> bool:
    """``parent [--socket PATH]``: unionfs-fuse's grammar gives those words no meaning (a
    lone branch, or an unknown option), so they never name a mount."""
    return argv[:1] == ["parent"] and (len(argv) == 1 or (len(argv) == 3
                                                         and argv[1] == "--socket"))


def main(argv: Sequence[str]) -> int:
    """``qvdfs parent [--socket PATH]``: serve until SIGTERM or SIGINT; the exit status."""
    path = argv[1] if len(argv) == 2 else PARENT_SOCKET
    logging.basicConfig(level=logging.INFO, format="qvdfs parent: %(message)s",
                        stream=sys.stderr)
    if os.geteuid() != 0:
        print("qvdfs: the parent mounts for root and must run as root", file=sys.stderr)
        return 1
    try:
        listener = listen(path)
    except OSError as exc:
        print(f"qvdfs: cannot serve {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        print(f"qvdfs: {exc}", file=sys.stderr)
        return 1
    try:
        Parent(listener).serve()
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        listener.close()
    return 0


def prepare() -> None:
    """Import what a mount runs, warm it, and freeze the heap so children share it."""
    # Everything qvdfs.daemon.run reaches on the native backend (pyfuse3 is imported by the
    # child that asks for it).
    import faulthandler  # noqa: F401
    import logging.handlers  # noqa: F401

    from qvdfs import cmdline, daemon, handlers, stats  # noqa: F401
    from qvdfs.backends import native  # noqa: F401

    cmdline.parse_args(["-o", "cow,max_files=32000,suid,dev,allow_other", "/u=RW:/b=RO", "/m"])
    gc.collect()
    gc.freeze()


def listen(path: str) -> socket.socket:
    """Bind a root-only SOCK_SEQPACKET socket at ``path``; RuntimeError if a parent serves
    there already. A socket left by a parent that died is replaced."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, mode=0o700, exist_ok=True)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        probe.connect(path)
        raise RuntimeError(f"a parent already serves {path}")
    except (FileNotFoundError, ConnectionRefusedError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    finally:
        probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    old = os.umask(0o177)  # born 0600: no moment where others could connect
    try:
        listener.bind(path)
    finally:
        os.umask(old)
    listener.listen(64)
    return listener


class Parent:
    """The parent's loop: one thread, never blocked, so that it can always fork.

    Connections and children are watched by one selector: a connection until its request
    has come (a child is forked for it, or for a refused peer nothing), a child's pidfd
    until it exits (its status is sent back on its connection, which is then closed).

    SIGTERM or SIGINT only wakes the loop (``signal.set_wakeup_fd``), which then stops
    listening, hands the requests not yet forked back to their commands (they mount by
    themselves) and returns once every child under way has answered its command: a stop
    never leaves a command without its status, nor ends a mount.
    """

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.selector = selectors.EpollSelector()
        self.selector.register(listener, selectors.EVENT_READ)
        self.waiting: dict[int, socket.socket] = {}  # connection fd -> connection
        self.refused: dict[int, socket.socket] = {}  # peers that are not root
        self.peers: dict[int, int] = {}  # connection fd -> the command's pid
        self.children: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, connection)
        self.stopping: str | None = None  # the signal that asked for it
        self._wake, self._woken = socket.socketpair()
        for end in (self._wake, self._woken):
            end.setblocking(False)
        self.selector.register(self._woken, selectors.EVENT_READ)

    def serve(self) -> None:
        prepare()
        signal.set_wakeup_fd(self._wake.fileno())
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        log.info("serving %s as pid %d", self.listener.getsockname(), os.getpid())
        try:
            while self.stopping is None or self.children:
                for key, _ in self.selector.select():
                    if key.fileobj is self.listener:
                        self._accept()
                    elif key.fileobj is self._woken:
                        with contextlib.suppress(BlockingIOError):
                            self._woken.recv(64)
                    elif key.fd in self.waiting:
                        self._request(self.waiting.pop(key.fd))
                    elif key.fd in self.refused:
                        self._drain(self.refused.pop(key.fd))
                    else:
                        self._reap(key.fd)
                if self.stopping is not None and self.listener.fileno() != -1:
                    self._stop_listening()
        finally:
            signal.set_wakeup_fd(-1)
            for pidfd, (_pid, conn) in self.children.items():
                os.close(pidfd)
                conn.close()
            for conn in [*self.waiting.values(), *self.refused.values()]:
                conn.close()
            self.selector.close()
            self._wake.close()
            self._woken.close()

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.stopping = signal.Signals(signum).name

    def _stop_listening(self) -> None:
        log.info("got %s: stopping once %d mount(s) under way have answered; running "
                 "mounts stay", self.stopping, len(self.children))
        self.selector.unregister(self.listener)
        self.listener.close()
        for conn in [*self.waiting.values(), *self.refused.values()]:
            self._drain(conn, b"local")
        self.waiting.clear()
        self.refused.clear()
        self.peers.clear()

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        pid, uid, _gid = _UCRED.unpack(
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        if uid != 0:
            log.warning("refused pid %d: uid %d is not root", pid, uid)
            _reply(conn, b"error the qvdfs parent serves root only")
            # Closed only once its request is read: closing a socket with unread data
            # resets the peer's, and the refusal would be lost with it.
            self.refused[conn.fileno()] = conn
        else:
            self.waiting[conn.fileno()] = conn
            self.peers[conn.fileno()] = pid
        self.selector.register(conn, selectors.EVENT_READ)

    def _request(self, conn: socket.socket) -> None:
        self.selector.unregister(conn)
        peer = self.peers.pop(conn.fileno())
        fds: list[int] = []
        try:
            data, fds, flags, _ = socket.recv_fds(conn, MAX_MESSAGE, len(PASSED_FDS) + 1)
        except OSError:
            data, flags = b"", 0
        if not data or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) \
                or len(fds) != len(PASSED_FDS):
            for fd in fds:
                os.close(fd)
            if data:
                _reply(conn, b"error malformed request")
            conn.close()
            return
        package, *words = data.split(b"\0")
        if os.fsdecode(package) != PACKAGE:
            # Another installation's command (a checkout beside the package, say): it must
            # run its own code, so it mounts by itself.
            log.info("handed back a command of %s (this parent runs %s)",
                     os.fsdecode(package), PACKAGE)
            for fd in fds:
                os.close(fd)
            _reply(conn, b"local")
            conn.close()
            return
        argv = [os.fsdecode(word) for word in words]
        gc.freeze()  # what the loop allocated since, too: the child must not collect it
        pid = os.fork()
        if pid == 0:
            _child(conn, fds, argv, peer, self._own_fds())
        for fd in fds:
            os.close(fd)
        pidfd = os.pidfd_open(pid)
        self.children[pidfd] = (pid, conn)
        self.selector.register(pidfd, selectors.EVENT_READ)
        log.info("pid %d mounts for the command %s", pid, " ".join(argv))

    def _drain(self, conn: socket.socket, reply: bytes | None = None) -> None:
        """Read what ``conn`` sent (closing a socket with unread data would reset the
        peer's, losing our answer), answer ``reply`` if any, and close it."""
        self.selector.unregister(conn)
        conn.setblocking(False)
        with contextlib.suppress(OSError):
            for fd in socket.recv_fds(conn, MAX_MESSAGE, len(PASSED_FDS) + 1)[1]:
                os.close(fd)
        if reply is not None:
            _reply(conn, reply)
        conn.close()

    def _reap(self, pidfd: int) -> None:
        self.selector.unregister(pidfd)
        pid, conn = self.children.pop(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code < 0:
            _reply(conn, f"error the mount's process was killed by "
                         f"{signal.Signals(-code).name}".encode())
        else:
            _reply(conn, f"exit {code}".encode())
        conn.close()

    def _own_fds(self) -> list[int]:
        return [self.listener.fileno(), self.selector.fileno(), self._wake.fileno(),
                self._woken.fileno(), *self.waiting, *self.refused, *self.children]


def _reply(conn: socket.socket, message: bytes) -> None:
    with contextlib.suppress(OSError):  # the command is gone: nobody to tell
        conn.send(message)


def _child(conn: socket.socket, fds: list[int], argv: list[str], peer: int,
           parents: list[int]) -> NoReturn:
    """In the forked child: become the caller's command and run it; never returns."""
    status = 1
    try:
        for fd in parents:
            with contextlib.suppress(OSError):
                os.close(fd)
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_DFL)
        gc.enable()
        _enter(fds)
        _take_limits(peer)
        logging.getLogger().handlers.clear()  # the parent's journal handler
        if set_command_line(argv):
            sys.argv = argv
            status = _run(conn, argv[1:])
        else:
            # A daemon that does not name its mountpoint could not be found by qvdctl's
            # stop: the command mounts by itself instead.
            _reply(conn, b"local")
            status = 0
    except BaseException as exc:  # noqa: BLE001 - the caller must get a line, never a hang
        print(f"qvdfs: the parent's child failed: {type(exc).__name__}: {exc}",
              file=sys.stderr, flush=True)
    finally:
        with contextlib.suppress(Exception):
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(status)


def _enter(fds: list[int]) -> None:
    """Take the caller's streams, mount namespace, root and working folder (``PASSED_FDS``)."""
    stdin, stdout, stderr, root, cwd, mntns = fds
    libc = ctypes.CDLL(None, use_errno=True)
    # Only a single-threaded process may change its mount namespace: this one is, just forked.
    if libc.setns(mntns, _CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "setns to the caller's mount namespace")
    os.fchdir(root)
    os.chroot(".")
    os.fchdir(cwd)
    for fd, target in ((stdin, 0), (stdout, 1), (stderr, 2)):
        os.dup2(fd, target)
    for fd in fds:
        os.close(fd)


def _take_limits(peer: int) -> None:
    """Take the command's umask and resource limits (``max_files`` raises its open-file
    limit as far as *its* hard limit goes, as the command itself would). A limit that cannot
    be taken (a hard limit above ours, without CAP_SYS_RESOURCE) stays ours, and is logged."""
    umask = processes.status(peer).get("Umask")
    if umask:
        os.umask(int(umask, 8))
    for name in dir(resource):
        if name.startswith("RLIMIT_"):
            which = getattr(resource, name)
            try:
                resource.setrlimit(which, resource.prlimit(peer, which))
            except (OSError, ValueError) as exc:
                log.debug("keeping our %s: %s", name, exc)


def set_command_line(argv: Sequence[str]) -> bool:
    """Make ``/proc/self/cmdline`` read ``argv`` (NUL-separated), as if we had been exec'd
    with it: ps shows the command, and qvdctl finds a root's daemon by the mountpoint in it.

    ``prctl(PR_SET_MM, PR_SET_MM_MAP)`` points the kernel at a buffer of ours, every other
    field as it is now. (``PR_SET_MM_ARG_START`` alone would need CAP_SYS_RESOURCE, which
    a node's root may lack; the map needs only the kernel's checkpoint/restore support.)
    Returns False if the kernel refused (no checkpoint/restore support).
    """
    global _command_line
    data = b"\0".join(os.fsencode(word) for word in argv) + b"\0"
    buffer = ctypes.create_string_buffer(data, len(data))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.sbrk.restype = ctypes.c_void_p
    with open("/proc/self/stat", "rb") as f:
        # Fields from 3 on, after the command name (which may hold spaces or ")").
        fields = [int(x) for x in f.read().rsplit(b")", 1)[1].split()[1:]]
    start = ctypes.addressof(buffer)
    mm_map = _MmMap(
        start_code=fields[_STAT["startcode"]], end_code=fields[_STAT["endcode"]],
        start_data=fields[_STAT["start_data"]], end_data=fields[_STAT["end_data"]],
        start_brk=fields[_STAT["start_brk"]], brk=libc.sbrk(0) or 0,
        start_stack=fields[_STAT["startstack"]], arg_start=start, arg_end=start + len(data),
        env_start=fields[_STAT["env_start"]], env_end=fields[_STAT["env_end"]],
        auxv=None, auxv_size=0, exe_fd=0xFFFFFFFF)
    if libc.prctl(_PR_SET_MM, _PR_SET_MM_MAP, ctypes.byref(mm_map),
                  ctypes.c_ulong(ctypes.sizeof(mm_map)), ctypes.c_ulong(0)) != 0:
        log.debug("cannot set the command line: %s", os.strerror(ctypes.get_errno()))
        return False
    _command_line = buffer
    return True


class _MmMap(ctypes.Structure):
    """``struct prctl_mm_map`` (include/uapi/linux/prctl.h)."""

    _fields_ = [
        ("start_code", ctypes.c_uint64), ("end_code", ctypes.c_uint64),
        ("start_data", ctypes.c_uint64), ("end_data", ctypes.c_uint64),
        ("start_brk", ctypes.c_uint64), ("brk", ctypes.c_uint64),
        ("start_stack", ctypes.c_uint64), ("arg_start", ctypes.c_uint64),
        ("arg_end", ctypes.c_uint64), ("env_start", ctypes.c_uint64),
        ("env_end", ctypes.c_uint64), ("auxv", ctypes.POINTER(ctypes.c_uint64)),
        ("auxv_size", ctypes.c_uint32), ("exe_fd", ctypes.c_uint32),
    ]


# Where proc(5)'s /proc/PID/stat fields are in the list that starts at field 4 (ppid).
_STAT = {name: number - 4 for name, number in (
    ("startcode", 26), ("endcode", 27), ("startstack", 28), ("start_data", 45),
    ("end_data", 46), ("start_brk", 47), ("env_start", 50), ("env_end", 51))}


def _run(conn: socket.socket, args: list[str]) -> int:
    """Run the command as ``qvdfs.daemon.run`` does; hand back to the caller what must run
    in its own process (foreground serving, help, version)."""
    from qvdfs import cmdline, daemon
    from qvdfs.config import MountError

    logging.disable(logging.WARNING)  # run() parses again, and it is the one that warns
    try:
        local = cmdline.parse_args(args).foreground
    except cmdline.InfoRequested:
        local = True
    except MountError:
        local = False  # run() prints the line and returns 1
    finally:
        logging.disable(logging.NOTSET)
    if local:
        _reply(conn, b"local")
        return 0
    conn.close()
    return daemon.run(args)
