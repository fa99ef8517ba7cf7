"""Running containers through liblxc, in trio: start, wait, shut down, exec.

Queries (``query.py``) and the hard stop use python-lxc; its calls block, so each runs
in a worker thread (``trio.to_thread.run_sync``) and a False becomes a
``ContainerError`` naming the container. Two things go through LXC's tools instead, as
cancellable subprocesses: the start (``lxc-start``: liblxc moves whoever starts a
container into that container's monitor cgroup, see ``start``) and commands inside
(``lxc-attach``). The graceful shutdown is ours too: liblxc's waits while holding the
GIL and would freeze every other task.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import lxc
import trio

from qvdctl.container import query
from qvdctl.container.config import DEFAULT_LXCPATH, LOG_NAME
from qvdctl.container.query import ABSENT, ContainerError, attach_command, container
from qvdctl.images.halt import signal_number
from qvdproc import processes

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class ExecResult:
    """Exit status and output of a command run inside a container."""

    returncode: int
    stdout: bytes
    stderr: bytes


async def _in_thread(fn: Callable[..., T], *args: object) -> T:
    return await trio.to_thread.run_sync(functools.partial(fn, *args))


def _log_size(name: str, lxcpath: Path) -> int:
    try:
        return (lxcpath / name / LOG_NAME).stat().st_size
    except OSError:
        return 0


_LOG_ERROR = re.compile(r" ERROR +\S+ - [^ ]+ - (?P<msg>.*)$")


def _first_error(name: str, lxcpath: Path, since: int) -> str | None:
    """liblxc's first ERROR line written to the container's log after offset ``since``."""
    try:
        with open(lxcpath / name / LOG_NAME, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        match = _LOG_ERROR.search(line)
        if match:
            return match["msg"]
    return None


def _prepare_start(name: str, lxcpath: Path) -> int:
    """Check ``name`` can start; return the log's size, to read only this start's errors."""
    c = container(name, lxcpath)
    if not c.defined:
        raise ContainerError(f"container {name} has no config in {lxcpath}")
    if c.running:
        raise ContainerError(f"container {name} is already running")
    return _log_size(name, lxcpath)


def _running_init(name: str, lxcpath: Path) -> int:
    c = container(name, lxcpath)
    return c.init_pid if c.running else -1


async def start(name: str, lxcpath: Path = DEFAULT_LXCPATH, timeout: float = 30.0) -> int:
    """Start container ``name`` from its config and wait until its init runs.

    "Runs" means init is ready for the config's halt signal (see ``_init_ready``):
    before that, a shutdown request would be lost.
    Returns the pid of the container's init (as the host sees it). On failure the
    container is left stopped.

    Raises:
        ContainerError: no config, already running, the start failed (the message
            carries liblxc's reason), or init never got ready within ``timeout``.
    """
    started = trio.current_time()
    since = await _in_thread(_prepare_start, name, lxcpath)
    # lxc-start, not python-lxc's start(): liblxc moves the calling process into the
    # new container's monitor cgroup, which must be a short-lived child, not the
    # controller. It daemonizes the monitor and exits once the container runs.
    # Shielded: killing lxc-start halfway would leave its monitor bringing the
    # container up unseen; a cancellation is honoured once it has answered, and the
    # caller's cleanup then finds the container in a definite state.
    with trio.CancelScope(shield=True):
        try:
            with trio.fail_after(timeout):
                done = await trio.run_process(
                    ["lxc-start", "-P", str(lxcpath), "-n", name],
                    stdin=subprocess.DEVNULL, capture_stdout=True, capture_stderr=True,
                    check=False,
                )  # fmt: skip
        except trio.TooSlowError:
            await _stop_late_start(name, lxcpath)
            raise ContainerError(
                f"container {name} failed to start within {timeout:.0f} s"
            ) from None
    pid = await _in_thread(_running_init, name, lxcpath)
    if done.returncode != 0 or pid <= 0:
        reason = await _in_thread(_first_error, name, lxcpath, since)
        await stop(name, lxcpath, timeout=0)
        raise ContainerError(
            f"container {name} failed to start: {reason or 'lxc-start exited %d' % done.returncode}"
        )
    c = await _in_thread(container, name, lxcpath)
    halt_signal = signal_number(c.get_config_item("lxc.signal.halt") or "SIGPWR")
    with trio.move_on_after(max(1.0, timeout - (trio.current_time() - started))):
        while not _init_ready(pid, halt_signal):
            if not processes.alive(pid):
                raise ContainerError(f"container {name} failed to start: its init exited")
            await trio.sleep(0.02)
        log.info("container %s running, init pid %d", name, pid)
        return pid
    await _in_thread(_hard_stop, c)
    raise ContainerError(
        f"container {name} failed to start: init did not get ready within {timeout:.0f} s"
    )


async def _stop_late_start(name: str, lxcpath: Path) -> None:
    """After lxc-start timed out: stop the container if its monitor still brings it up."""
    with trio.move_on_after(5):
        while await state(name, lxcpath) not in ("RUNNING", "STOPPED", ABSENT):
            await trio.sleep(0.1)
    await stop(name, lxcpath, timeout=0)


def _init_ready(pid: int, sig: int) -> bool:
    """Whether init ``pid`` will act on signal ``sig`` rather than drop it.

    A pid-namespace init drops signals it neither catches nor blocks. Inits catch
    (sysvinit, systemd: SigCgt) or block it and wait in ``sigtimedwait`` (busybox;
    the wait unblocks it in SigBlk meanwhile). Every init sets that up before it runs
    its first child, so a child also means ready.
    """
    fields = processes.status(pid)
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = f.read().split()
    except OSError:
        return False
    if not fields:
        return False
    masks = int(fields["SigCgt"], 16) | int(fields["SigBlk"], 16)
    return bool(masks >> (sig - 1) & 1) or bool(children)


def _send_halt(c: lxc.Container) -> bool:
    """Send init the config's halt signal; False if init is already gone."""
    pid = c.init_pid
    if pid <= 0:
        return False
    sig = signal_number(c.get_config_item("lxc.signal.halt") or "SIGPWR")
    try:
        # Through a pidfd: the pid cannot be recycled between lookup and signal.
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        signal.pidfd_send_signal(fd, sig)
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)
    return True


def _hard_stop(c: lxc.Container) -> None:
    if not c.stop() and c.running:
        raise ContainerError(f"container {c.name} could not be stopped")
    if not c.wait("STOPPED", 10):
        raise ContainerError(f"container {c.name} still {c.state} after a hard stop")


async def stop(name: str, lxcpath: Path = DEFAULT_LXCPATH, timeout: float = 30.0) -> bool:
    """Ask the container's init to power off; hard-stop it after ``timeout`` seconds.

    A stopped or absent container is fine. ``timeout=0`` stops it hard at once.
    Returns True if it halted by itself (or was not running), False if it was killed.

    Raises:
        ContainerError: even the hard stop failed.
    """
    # Not liblxc's shutdown(): it waits holding the GIL, freezing every other task.
    # Sending init the halt signal is all liblxc would do before waiting.
    c = await _in_thread(container, name, lxcpath)
    if not c.running:
        return True
    if timeout > 0 and await _in_thread(_send_halt, c):
        with trio.move_on_after(timeout):
            while await _in_thread(lambda: c.running):
                await trio.sleep(0.1)
            log.info("container %s halted", name)
            return True
        log.warning("container %s did not halt within %.0f s, stopping it hard", name, timeout)
    await _in_thread(_hard_stop, c)
    log.info("container %s stopped hard", name)
    return False


async def state(name: str, lxcpath: Path = DEFAULT_LXCPATH) -> str:
    """liblxc's state of ``name`` ("RUNNING", "STOPPED", ...), or "ABSENT" with no config."""
    return await _in_thread(query.state, name, lxcpath)


async def exec_in(
    name: str,
    argv: Sequence[str],
    lxcpath: Path = DEFAULT_LXCPATH,
    timeout: float = 60.0,
    stdin: bytes = b"",
) -> ExecResult:
    """Run ``argv`` inside running container ``name``; return its status and output.

    The command's own non-zero status is returned, not raised.

    Raises:
        ContainerError: empty command, the container is not running, or it timed out.
    """
    command = await _in_thread(attach_command, name, argv, lxcpath)
    try:
        with trio.fail_after(timeout):
            done = await trio.run_process(
                command,
                stdin=stdin,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    except trio.TooSlowError:
        raise ContainerError(f"command in container {name} timed out after {timeout} s") from None
    return ExecResult(done.returncode, done.stdout, done.stderr)


CGROUP_ROOT = Path("/sys/fs/cgroup")


def prune_cgroups(name: str, wait: float = 3.0, root: Path = CGROUP_ROOT) -> list[Path]:
    """Remove empty cgroups liblxc left for ``name`` (a failed start leaves its monitor's).

    Only empty directories go (``rmdir`` refuses the rest), so a running container's
    cgroups are never touched. The monitor of a failed start exits a moment after the
    start call returns, so this retries for up to ``wait`` seconds. Returns what is left.

    That monitor removes its own groups as it exits, so any group may vanish while
    this walks it: a group already gone counts as pruned, never as an error.
    """
    deadline = time.monotonic() + wait
    while True:
        left = _prune_once(name, root)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def _prune_once(name: str, root: Path) -> list[Path]:
    patterns = (f"lxc.payload.{name}", f"lxc.monitor.{name}")
    tops = [root, *(p for p in root.iterdir() if p.is_dir())] if root.is_dir() else []
    left = []
    for top in tops:
        for prefix in patterns:
            for entry in top.glob(prefix + "*"):
                rest = entry.name[len(prefix):]
                if rest and not re.fullmatch(r"-[0-9]+", rest):
                    continue  # qvd-1 must not prune qvd-12's groups
                # Children first: a cgroup folder cannot go while it has sub-groups.
                # os.walk, not Path.rglob: rglob raises when a folder vanishes between
                # being listed and being read; os.walk skips it.
                for folder, _, _ in os.walk(entry, topdown=False):
                    _rmdir_quiet(Path(folder))
                if entry.exists():
                    left.append(entry)
    return left


def _rmdir_quiet(path: Path) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass  # busy (a live group), or already gone
