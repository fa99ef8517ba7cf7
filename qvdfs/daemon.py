"""The ``qvdfs`` program: check, mount, daemonize, serve until unmounted.

The node's HKD treats exit status 0 as "the rootfs is mounted" and then starts a container on
it, so the order of things matters:

1. Parse and check everything that can be checked (``/dev/fuse``, mountpoint, branches) while
   stderr still reaches the caller, so a bad start is one line and a non-zero exit.
2. Build the Operations and mount with ``pyfuse3.init`` *before* forking, as s3ql does: mount
   errors are then reported by the process the caller waits for.
3. Fork. The parent waits on a pipe and exits 0 only after the child reports that the mount
   answers requests (it stats the mountpoint through its own trio loop). If the child fails
   first, it unmounts, sends its error line through the pipe, and the parent prints it and
   exits 1. One fork plus ``setsid`` is enough: the child never opens a terminal.
4. The child serves with ``trio.run``. ``umount MOUNTPOINT`` ends the FUSE session from the
   kernel side and the loop returns; SIGTERM, SIGINT or SIGHUP end it from our side and we
   unmount ourselves. Either way the process exits 0 and nothing is left running.
"""

from __future__ import annotations

import faulthandler
import inspect
import logging
import os
import resource
import signal
import stat
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from typing import IO, Any, NoReturn

import pyfuse3
import trio

from qvdfs import cmdline
from qvdfs.config import MountConfig, MountError

log = logging.getLogger(__name__)

FUSE_DEVICE = "/dev/fuse"
# How long the mount may take to answer its first request before the start counts as failed.
READY_TIMEOUT = 60.0
# The kernel's read-ahead window for the mount. libfuse lets read requests grow to 1 MiB,
# but the default window of 128 KiB keeps them at 256 KiB: measured on a 256 MiB file,
# 1024 requests at the default against 258 at 1 MiB, and every request has a fixed cost here.
READ_AHEAD_KIB = 1024
_READY = b"ready\n"
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

OperationsFactory = Callable[[MountConfig], Any]


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: ``sys.exit(main())``."""
    return run(sys.argv[1:] if argv is None else argv)


def run(argv: Sequence[str], *, make_operations: OperationsFactory | None = None) -> int:
    """Do everything ``qvdfs ARGV`` does; return the exit status.

    In the background mode this returns only in the daemon; the calling process exits from
    inside (0 once mounted, 1 with the daemon's error otherwise).

    ``make_operations`` builds the pyfuse3 Operations from the config. It exists so that tests
    can serve a stand-in filesystem; the program always uses ``qvdfs.operations``.
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
        ops = (make_operations or _union_operations)(config)
        _mount(ops, config)
    except MountError as exc:
        return _fail(exc)
    except Exception as exc:  # noqa: BLE001 - a bug; the caller still gets one line
        log.debug("failed before mounting", exc_info=True)
        return _fail(f"internal error before mounting: {type(exc).__name__}: {exc}")

    # The filesystem applies the modes callers ask for; our own umask must not cut them.
    os.umask(0)
    ready_fd = None
    if not config.foreground:
        ready_fd = _daemonize(log_file, stderr_handler)
    if log_file is not None or config.foreground:
        faulthandler.enable(log_file or sys.stderr)
    return trio.run(_serve, ops, config, ready_fd)


def check_fuse_device(path: str = FUSE_DEVICE) -> None:
    """Raise MountError unless ``path`` is a character device (the FUSE device)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise MountError(f"{path} is missing ({exc.strerror}): is fuse loaded?") from None
    if not stat.S_ISCHR(mode):
        raise MountError(f"{path} is not a character device")


def check_mountpoint(path: str) -> None:
    """Raise MountError unless ``path`` is a directory that nothing is mounted on."""
    # First, because the mount left by a crashed daemon cannot even be stat'ed (ENOTCONN).
    if _is_mounted(path):
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


def mounted_paths(mountinfo: str = "/proc/self/mountinfo") -> set[str]:
    """The mount points listed in ``mountinfo``, unescaped."""
    return {path for _device, path in _mounts(mountinfo)}


def _mounts(mountinfo: str) -> list[tuple[str, str]]:
    """(device ``major:minor``, unescaped mount point) of each line of ``mountinfo``, in order."""
    with open(mountinfo) as f:
        return [(fields[2], _unescape_mount_path(fields[4])) for fields in map(str.split, f)]


def _unescape_mount_path(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in paths as \040, \011, \012, \134.
    out = bytearray()
    raw = field.encode("utf-8", "surrogateescape")
    i = 0
    while i < len(raw):
        if raw[i] == 0x5C and raw[i + 1 : i + 4].isdigit() and len(raw[i + 1 : i + 4]) == 3:
            out.append(int(raw[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "surrogateescape")


def _union_operations(config: MountConfig) -> Any:
    # Imported here so that --help, --version and the checks work without the union loaded.
    from qvdfs.operations import UnionOperations

    return UnionOperations(config)


def _mount(ops: Any, config: MountConfig) -> None:
    try:
        pyfuse3.init(ops, config.mountpoint, set(config.fuse_options))
    except RuntimeError as exc:
        # libfuse has already printed its reason to stderr; ours names the mountpoint.
        raise MountError(f"cannot mount on {config.mountpoint}: {exc}") from None
    log.info("mounted %s on %s", ":".join(b.path for b in config.branches), config.mountpoint)


def set_read_ahead(mountpoint: str, kib: int, mountinfo: str = "/proc/self/mountinfo") -> None:
    """Set the read-ahead window of the newest mount on ``mountpoint`` to ``kib`` KiB.

    ``mountpoint`` must be a resolved path. This goes through the device number in
    ``mountinfo`` and its backing device in sysfs, not through the mount. A failure only
    costs speed, so it is logged, never raised.
    """
    devices = [device for device, path in _mounts(mountinfo) if path == mountpoint]
    if not devices:
        log.warning("cannot set read-ahead: %s is not in %s", mountpoint, mountinfo)
        return
    try:
        with open(f"/sys/class/bdi/{devices[-1]}/read_ahead_kb", "w") as f:
            f.write(str(kib))
    except OSError as exc:
        log.warning("cannot set read-ahead of %s: %s", mountpoint, exc)


def _daemonize(log_file: IO[str] | None, stderr_handler: logging.Handler) -> int:
    """Fork; return the write end of the ready pipe in the child. The parent never returns."""
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork() > 0:
        os.close(write_fd)
        _wait_for_daemon(read_fd)

    os.close(read_fd)
    os.setsid()
    os.chdir("/")
    # Stray output (libfuse writes its complaints to stderr) goes to the log file if any.
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    for fd in (1, 2):
        os.dup2(log_file.fileno() if log_file is not None else null, fd)
    os.close(null)
    logging.getLogger().removeHandler(stderr_handler)
    log.info("daemon running as pid %d", os.getpid())
    return write_fd


def _wait_for_daemon(read_fd: int) -> NoReturn:
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
        try:
            pyfuse3.close(unmount=True)
        except Exception:  # noqa: BLE001 - best effort, the error below is what matters
            pass
    text = message.decode(errors="replace").strip() or "the daemon died before the mount was ready"
    print(f"qvdfs: {text}", file=sys.stderr, flush=True)
    os._exit(1)


async def _serve(ops: Any, config: MountConfig, ready_fd: int | None) -> int:
    """Run the FUSE loop until the kernel or a signal ends it; then clean up. Return the status."""
    stopped_by_us = False
    error: str | None = None
    ready = False

    async def stop_on_signals(signals: AsyncIterator[int]) -> None:
        nonlocal stopped_by_us
        async for signum in signals:
            if stopped_by_us:
                log.info("got %s: already stopping", signal.Signals(signum).name)
                continue
            log.info("got %s: unmounting", signal.Signals(signum).name)
            stopped_by_us = True
            pyfuse3.terminate()

    async def confirm_serving() -> None:
        nonlocal ready, ready_fd
        # A stat of the mountpoint goes through the kernel to our own loop: once it returns,
        # the FUSE handshake is done and requests are answered.
        try:
            with trio.fail_after(READY_TIMEOUT):
                await trio.to_thread.run_sync(os.stat, config.mountpoint, abandon_on_cancel=True)
        except trio.TooSlowError:
            raise MountError(f"the mount did not answer within {READY_TIMEOUT:g} s") from None
        except OSError as exc:
            if not _is_mounted(config.mountpoint):
                return  # unmounted while we asked (ECONNABORTED): the loop is ending anyway
            # e.g. ECONNREFUSED when libfuse turned down the kernel's INIT
            raise MountError(f"the mount refused its first request ({exc.strerror})") from None
        ready = True
        log.info("serving %s", config.mountpoint)
        # Not before: the kernel sets the window again when it gets the answer to INIT.
        set_read_ahead(config.mountpoint, READ_AHEAD_KIB)
        if ready_fd is not None:
            # Closing is what lets the parent's read end: it reads up to end-of-file.
            _report(ready_fd, _READY)
            os.close(ready_fd)
            ready_fd = None

    # The receiver stays installed until the mount is gone, so that a second signal during the
    # shutdown cannot kill us half way (the default action) and leave a dead mount. Signals
    # still pending when it closes are re-delivered by trio to the handler it found: make that
    # a no-op, since by then the mount is gone and we are exiting anyway.
    for signum in _STOP_SIGNALS:
        signal.signal(signum, lambda *_: None)
    with trio.open_signal_receiver(*_STOP_SIGNALS) as signals:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stop_on_signals, signals)
                nursery.start_soon(confirm_serving)
                await pyfuse3.main()
                nursery.cancel_scope.cancel()
            # Ended from the kernel's side before our first request got through: a plain
            # umount that came early removed the mount; a refused INIT leaves it in place.
            if not ready and not stopped_by_us and _is_mounted(config.mountpoint):
                error = "the FUSE session ended before the mount answered"
            await _destroy(ops)
        except Exception as exc:  # noqa: BLE001 - log it, unmount, exit non-zero
            log.exception("qvdfs daemon stopped on an error")
            cause = _single(exc)
            error = str(cause) if isinstance(cause, MountError) else \
                f"{type(cause).__name__}: {cause}"
            stopped_by_us = True

        # When the kernel ended a session that was serving (umount, fusermount3 -u), the mount
        # is already gone. Otherwise we take it down: a stop, an error, or a session that ended
        # before it ever answered (libfuse refusing the kernel's INIT) must not leave a dead mount.
        pyfuse3.close(unmount=stopped_by_us or not ready)
        log.info("unmounted %s", config.mountpoint)
    if ready_fd is not None:  # still open: the parent is waiting for our verdict
        reason = error or ("stopped by a signal" if stopped_by_us else "unmounted") + \
            " before the mount answered"
        _report(ready_fd, f"{reason}\n".encode())
        os.close(ready_fd)
    return 1 if error else 0


def _is_mounted(path: str) -> bool:
    return os.path.realpath(path) in mounted_paths()


def _single(exc: BaseException) -> BaseException:
    """The one exception inside (nested) exception groups of one, for the error line."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


async def _destroy(ops: Any) -> None:
    """Let the filesystem flush its state: ``ops.destroy()``, sync or async, if it has one."""
    destroy = getattr(ops, "destroy", None)
    if destroy is not None:
        result = destroy()
        if inspect.isawaitable(result):
            await result


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
