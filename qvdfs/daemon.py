"""The ``qvdfs`` program: check, mount, daemonize, serve until unmounted.

The node's HKD treats exit status 0 as "the rootfs is mounted" and then starts a container on
it, so the order of things matters:

1. Parse and check everything that can be checked (``/dev/fuse``, mountpoint, branches) while
   stderr still reaches the caller, so a bad start is one line and a non-zero exit.
2. Build the filesystem and mount *before* forking, as s3ql does: mount errors are then
   reported by the process the caller waits for.
3. Fork. The parent waits on a pipe and exits 0 only after the child reports that the mount
   answers requests (a thread stats the mountpoint, which goes through the kernel to the
   child's own session). If the child fails first, it unmounts, sends its error line through
   the pipe, and the parent prints it and exits 1. One fork plus ``setsid`` is enough: the
   child never opens a terminal.
4. The child serves (``qvdfs.backends``). ``umount MOUNTPOINT`` ends the FUSE session from the
   kernel side and serving returns; SIGTERM, SIGINT or SIGHUP end it from our side and we
   unmount ourselves. Either way the process exits 0 and nothing is left running.

While mounted, ``qvdfs stats MOUNTPOINT [--json]`` asks the daemon for its counters over a
Unix socket (``qvdfs.stats``).
"""

from __future__ import annotations

import faulthandler
import logging
import logging.handlers
import os
import resource
import signal
import stat
import sys
import threading
from collections.abc import Callable, Sequence
from typing import IO, Any, NoReturn

from qvdfs import cmdline, stats
from qvdfs.backends import Backend, make_backend
from qvdfs.config import MountConfig, MountError
from qvdproc import devices, mountinfo

log = logging.getLogger(__name__)

FUSE_DEVICE = "/dev/fuse"
# How long the mount may take to answer its first request before the start counts as failed.
READY_TIMEOUT = 60.0
# The kernel's read-ahead window for the mount. Read requests may grow to 1 MiB, but the
# default window of 128 KiB keeps them at 256 KiB: measured on a 256 MiB file, 1024 requests
# at the default against 258 at 1 MiB, and every request has a fixed cost here.
READ_AHEAD_KIB = 1024
_READY = b"ready\n"
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

FilesystemFactory = Callable[[MountConfig], Any]


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: ``sys.exit(main())``."""
    args = sys.argv[1:] if argv is None else list(argv)
    if stats.is_stats_command(args):
        return stats.main(args[1:])
    return run(args)


def run(argv: Sequence[str], *, make_filesystem: FilesystemFactory | None = None) -> int:
    """Do everything ``qvdfs ARGV`` does; return the exit status.

    In the background mode this returns only in the daemon; the calling process exits from
    inside (0 once mounted, 1 with the daemon's error otherwise).

    ``make_filesystem`` builds the ``qvdfs.fuse.Filesystem`` from the config. It exists so
    that tests can serve a stand-in filesystem; the program always serves the union.
    """
    stderr_handler = _log_to_stderr()
    try:
        config = cmdline.parse_args(argv)
    except cmdline.InfoRequested as info:
        print(info.text.rstrip("\n"))
        return 0
    except MountError as exc:
        return _fail(exc)

    try:
        log_file = _setup_logging(config, stderr_handler)
        check_fuse_device()
        check_mountpoint(config.mountpoint)
        check_branches(config)
        # Named by its resolved path from here on: once mounted, resolving it again would
        # be a request to this very process.
        config.mountpoint = os.path.realpath(config.mountpoint)
        if config.max_files is not None:
            raise_file_limit(config.max_files)
        log.debug("mounting with %r", config)
        fs = (make_filesystem or _union_filesystem)(config)
        backend = make_backend(fs, config)
        backend.mount()
        log.info("mounted %s on %s (%s backend)", ":".join(b.path for b in config.branches),
                 config.mountpoint, backend.name)
    except MountError as exc:
        return _fail(exc)
    except Exception as exc:  # noqa: BLE001 - a bug; the caller still gets one line
        log.debug("failed before mounting", exc_info=True)
        return _fail(f"internal error before mounting: {type(exc).__name__}: {exc}")

    # The filesystem applies the modes callers ask for; our own umask must not cut them.
    os.umask(0)
    ready_fd = None
    if not config.foreground:
        ready_fd = _daemonize(log_file, stderr_handler, backend)
    if log_file is not None or config.foreground:
        faulthandler.enable(log_file or sys.stderr)
    return _serve(backend, fs, config, ready_fd)


def check_fuse_device(path: str = FUSE_DEVICE) -> None:
    """Raise MountError unless ``path`` is a character device (the FUSE device)."""
    try:
        devices.require_character_device(path)
    except devices.NotACharacterDevice as exc:
        if exc.strerror is None:
            raise MountError(str(exc)) from None
        raise MountError(f"{path} is missing ({exc.strerror}): is fuse loaded?") from None


def check_mountpoint(path: str) -> None:
    """Raise MountError unless ``path`` is a directory that nothing is mounted on."""
    # First, because the mount left by a crashed daemon cannot even be stat'ed (ENOTCONN).
    if mountinfo.is_mounted(path):
        raise MountError(f"mountpoint {path} is busy: something is already mounted on it")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise MountError(f"mountpoint {path} does not exist") from None
    except OSError as exc:
        raise MountError(f"mountpoint {path} cannot be used: {exc.strerror}") from None
    if not stat.S_ISDIR(mode):
        raise MountError(f"mountpoint {path} is not a directory")


def check_branches(config: MountConfig) -> None:
    """Raise MountError unless every branch is a directory outside the mountpoint.

    A branch at or under the mountpoint would be hidden by the mount itself, and looking
    it up would ask the filesystem about itself.
    """
    mountpoint = os.path.realpath(config.mountpoint)
    for branch in config.branches:
        if not os.path.exists(branch.path):
            raise MountError(f"branch {branch.path} does not exist")
        if not os.path.isdir(branch.path):
            raise MountError(f"branch {branch.path} is not a directory")
        real = os.path.realpath(branch.path)
        if real == mountpoint or real.startswith(mountpoint.rstrip("/") + "/"):
            raise MountError(f"branch {branch.path} is inside the mountpoint {config.mountpoint}")
        if branch.writable and not os.access(branch.path, os.W_OK):
            log.warning("branch %s is RW but not writable (read-only filesystem?)", branch.path)


def raise_file_limit(max_files: int) -> int:
    """Raise the soft RLIMIT_NOFILE to ``max_files``, or to the hard limit if that is lower.

    A soft limit already higher is kept. Returns the soft limit now in force. A hard limit
    below ``max_files`` is a warning, not an error: on this kind of machine stock unionfs-fuse
    fails to start ("Setting the maximum number of files failed"), and the node needs a mount.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_files if hard == resource.RLIM_INFINITY else min(max_files, hard)
    if wanted < max_files:
        log.warning("max_files=%d exceeds the hard limit %d; using %d", max_files, hard, wanted)
    if wanted > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return max(wanted, soft)


def _union_filesystem(config: MountConfig) -> Any:
    # Imported here so that --help, --version and the checks work without the union loaded.
    from qvdfs.handlers import UnionFilesystem

    return UnionFilesystem(config)


def set_read_ahead(mountpoint: str, kib: int) -> None:
    """Set the read-ahead window of the newest mount on ``mountpoint`` to ``kib`` KiB.

    ``mountpoint`` must be a resolved path. This goes through the device number in the
    mount table and its backing device in sysfs, not through the mount. A failure only
    costs speed, so it is logged, never raised.
    """
    devices = [m.device for m in mountinfo.read_mounts() if m.mount_point == mountpoint]
    if not devices:
        log.warning("cannot set read-ahead: %s is not in the mount table", mountpoint)
        return
    try:
        with open(f"/sys/class/bdi/{devices[-1]}/read_ahead_kb", "w") as f:
            f.write(str(kib))
    except OSError as exc:
        log.warning("cannot set read-ahead of %s: %s", mountpoint, exc)


def _daemonize(log_file: IO[str] | None, stderr_handler: logging.Handler,
               backend: Backend) -> int:
    """Fork; return the write end of the ready pipe in the child. The parent never returns."""
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork() > 0:
        os.close(write_fd)
        _wait_for_daemon(read_fd, backend)

    os.close(read_fd)
    os.setsid()
    os.chdir("/")
    # Stray output goes to the log file if any.
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    for fd in (1, 2):
        os.dup2(log_file.fileno() if log_file is not None else null, fd)
    os.close(null)
    logging.getLogger().removeHandler(stderr_handler)
    if log_file is None:
        _log_to_syslog()
    log.info("daemon running as pid %d", os.getpid())
    return write_fd


def _log_to_syslog() -> None:
    """Without a debug_file, the daemon's warnings and errors go to syslog (journald), where
    an admin looks for them; there is no other place once stderr is gone."""
    if not os.path.exists("/dev/log"):
        return
    try:
        handler = logging.handlers.SysLogHandler(
            address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON)
    except OSError:
        return
    handler.setFormatter(logging.Formatter("qvdfs[%(process)d]: %(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)
    logging.getLogger().addHandler(handler)


def _wait_for_daemon(read_fd: int, backend: Backend) -> NoReturn:
    """In the parent: exit 0 once the daemon says it serves, else print its error and exit 1."""
    chunks = []
    while chunk := os.read(read_fd, 4096):
        chunks.append(chunk)
    message = b"".join(chunks)
    if message == _READY:
        os._exit(0)
    if not message:
        # The daemon died without a word (killed, or crashed hard), so it did not unmount;
        # our copy of the session can. When the daemon reports an error, it has unmounted
        # already and we must not try again.
        backend.abandon()
    text = message.decode(errors="replace").strip() or "the daemon died before the mount was ready"
    print(f"qvdfs: {text}", file=sys.stderr, flush=True)
    os._exit(1)


class _Serving:
    """The daemon's state while it serves: stopped by us, ready, and the error if any."""

    def __init__(self, backend: Backend, config: MountConfig, ready_fd: int | None) -> None:
        self.backend = backend
        self.config = config
        self.ready_fd = ready_fd
        self.stopped_by_us = False
        self.ready = False
        self.error: str | None = None
        self._lock = threading.Lock()

    def stop(self, why: str, error: str | None = None) -> None:
        with self._lock:
            if error is not None and self.error is None:
                self.error = error
            if self.stopped_by_us:
                log.info("%s: already stopping", why)
                return
            self.stopped_by_us = True
        log.info("%s: unmounting", why)
        self.backend.stop()

    def on_signal(self, signum: int, _frame: object) -> None:
        self.stop(f"got {signal.Signals(signum).name}")

    def confirm(self) -> None:
        """Once a stat of the mountpoint comes back through our own session, the handshake
        is done and requests are answered: tell the waiting parent.

        The probe waits for INIT's answer first, so that it holds the mountpoint busy for
        one request only: an ``umount`` racing the start then finds the mount idle.
        """
        outcome: list[BaseException | None] = []
        if not self.backend.wait_initialized(READY_TIMEOUT):
            if not self.stopped_by_us:
                self.stop("no answer", f"the mount did not answer within {READY_TIMEOUT:g} s")
            return

        def probe() -> None:
            try:
                os.stat(self.config.mountpoint)
                outcome.append(None)
            except OSError as exc:
                outcome.append(exc)

        prober = threading.Thread(target=probe, name="qvdfs-ready", daemon=True)
        prober.start()
        prober.join(READY_TIMEOUT)
        if not outcome:
            self.stop("no answer", f"the mount did not answer within {READY_TIMEOUT:g} s")
            return
        exc = outcome[0]
        if exc is not None:
            if not mountinfo.is_mounted(self.config.mountpoint):
                return  # unmounted while we asked: serving is ending anyway
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            self.stop("first request refused", f"the mount refused its first request ({reason})")
            return
        self.ready = True
        log.info("serving %s", self.config.mountpoint)
        # Not before: the kernel sets the window again when it gets the answer to INIT.
        set_read_ahead(self.config.mountpoint, READ_AHEAD_KIB)
        with self._lock:
            if self.ready_fd is not None:
                # Closing is what lets the parent's read end: it reads up to end-of-file.
                _report(self.ready_fd, _READY)
                os.close(self.ready_fd)
                self.ready_fd = None


def _serve(backend: Backend, fs: Any, config: MountConfig, ready_fd: int | None) -> int:
    """Serve until the kernel or a signal ends the session; then clean up. Return the status."""
    serving = _Serving(backend, config, ready_fd)
    # The handlers stay installed until the mount is gone, so that a second signal during the
    # shutdown cannot kill us half way (the default action) and leave a dead mount.
    for signum in _STOP_SIGNALS:
        signal.signal(signum, serving.on_signal)
    stats_server = stats.serve(config.mountpoint, lambda: _counters(backend, fs))
    threading.Thread(target=serving.confirm, name="qvdfs-confirm", daemon=True).start()
    try:
        backend.serve()
        # Ended from the kernel's side before our first request got through: a plain
        # umount that came early removed the mount; a refused INIT leaves it in place.
        early = not serving.ready and not serving.stopped_by_us
        if early and mountinfo.is_mounted(config.mountpoint):
            serving.error = serving.error or "the FUSE session ended before the mount answered"
    except Exception as exc:  # noqa: BLE001 - log it, unmount, exit non-zero
        log.exception("qvdfs daemon stopped on an error")
        serving.error = str(exc) if isinstance(exc, MountError) else f"{type(exc).__name__}: {exc}"
        serving.stopped_by_us = True
    if stats_server is not None:
        stats_server.close()
    # When the kernel ended a session that was serving (umount, fusermount3 -u), the mount is
    # already gone. Otherwise we take it down: a stop, an error, or a session that ended
    # before it ever answered must not leave a dead mount.
    backend.close(unmount=serving.stopped_by_us or not serving.ready)
    log.info("unmounted %s", config.mountpoint)
    with serving._lock:
        if serving.ready_fd is not None:  # still open: the parent is waiting for our verdict
            reason = serving.error or ("stopped by a signal" if serving.stopped_by_us
                                       else "unmounted") + " before the mount answered"
            _report(serving.ready_fd, f"{reason}\n".encode())
            os.close(serving.ready_fd)
            serving.ready_fd = None
    return 1 if serving.error else 0


def _counters(backend: Backend, fs: Any) -> dict[str, object]:
    counters: dict[str, object] = {"backend": backend.name}
    counters.update(backend.counters())
    own = getattr(fs, "counters", None)
    if own is not None:
        counters.update(own())
    return counters


def _report(fd: int, message: bytes) -> None:
    try:
        os.write(fd, message)
    except OSError:  # the waiting parent is gone; nobody to tell
        pass


class _PrefixFormatter(logging.Formatter):
    """``qvdfs: warning: message``, the shape of every line we print to stderr."""

    def format(self, record: logging.LogRecord) -> str:
        return f"qvdfs: {record.levelname.lower()}: {super().format(record)}"


def _log_to_stderr() -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_PrefixFormatter("%(message)s"))
    handler.setLevel(logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    return handler


def _setup_logging(config: MountConfig, stderr_handler: logging.Handler) -> IO[str] | None:
    """Send the log where the config says; return the debug file, opened before any fork."""
    level = logging.DEBUG if config.debug else logging.INFO
    logging.getLogger().setLevel(level)
    if config.debug_file is None:
        if config.foreground:
            stderr_handler.setLevel(level)
        return None
    try:
        log_file = open(config.debug_file, "a", buffering=1)  # noqa: SIM115 - lives till exit
    except OSError as exc:
        raise MountError(f"cannot open debug_file {config.debug_file}: {exc.strerror}") from None
    file_handler = logging.StreamHandler(log_file)
    file_handler.setFormatter(
        logging.Formatter("%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(file_handler)
    return log_file


def _fail(error: MountError | str) -> int:
    """Print ``error`` as the one line the caller gets; return the exit status 1."""
    print(f"qvdfs: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
