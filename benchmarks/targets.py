"""The filesystems under test, and how to mount each fresh over the fixture.

Every mount gets its own empty upper (and work) folder below the run's scratch folder, is timed
from the command's start until the kernel lists the mountpoint, and is unmounted in a
``finally``. Mounts still up when the process is interrupted are listed in ``_ACTIVE`` and
taken down by ``unmount_all()``.

The plain directory is the physical limit: the workload runs on the lower folder itself, no
mount at all, and the workloads restore what they change (see ``fixture.Fixture.repair``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from qvdproc import mountinfo, processes

log = logging.getLogger(__name__)

QVDFS = str(Path(sys.executable).parent / "qvdfs")
# The node's exact options (SPEC §3), and unionfs-fuse's as the issue gives them.
QVDFS_OPTIONS = ["-o", "cow", "-o", "max_files=32000", "-o", "suid", "-o", "dev",
                 "-o", "allow_other"]
UNIONFS_OPTIONS = ["-o", "cow,allow_other,use_ino,suid,dev"]

MOUNT_TIMEOUT = 30.0
UNMOUNT_TIMEOUT = 15.0
STATS_TIMEOUT = 10.0

# Mountpoints this process has mounted and not yet unmounted.
_ACTIVE: set[str] = set()


@dataclasses.dataclass
class Mounted:
    """One fresh mount of a target: where to work, and what it cost to get there."""

    target: Target
    root: Path  # where the workload runs
    upper: Path | None
    mount_seconds: float | None  # None for the plain directory
    daemon_pid: int | None  # the FUSE daemon serving ``root``, if any
    # From ``umount`` until the daemon has exited; set once the mount is down.
    unmount_seconds: float | None = None

    def abort(self) -> bool:
        """Kill the FUSE daemon, so calls stuck in it fail (ECONNABORTED) instead of hanging.

        Its closed /dev/fuse ends the connection; the mount stays until ``unmount``. (The
        fusectl ``abort`` file would do the same, but fusectl is not mounted everywhere.)
        Returns False if there is no daemon to kill.
        """
        if self.daemon_pid is None:
            return False
        try:
            os.kill(self.daemon_pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True

    def daemon_cpu_seconds(self) -> float | None:
        """CPU time (user + system, all threads) the FUSE daemon has used so far.

        From /proc/<pid>/stat utime + stime, in clock ticks (10 ms here): measure enough
        requests that a tick does not matter.
        """
        ticks = None if self.daemon_pid is None else processes.cpu_ticks(self.daemon_pid)
        return None if ticks is None else ticks / os.sysconf("SC_CLK_TCK")

    def daemon_read_calls(self) -> int | None:
        """How many read(2) calls the daemon (all threads) has made: /proc/<pid>/io syscr.

        A FUSE daemon reads each request from /dev/fuse with one read, so the growth over a
        run of calls counts the requests that reached it (a daemon that used splice or
        io_uring for /dev/fuse would show fewer).
        """
        if self.daemon_pid is None:
            return None
        with open(f"/proc/{self.daemon_pid}/io") as f:
            for line in f:
                if line.startswith("syscr:"):
                    return int(line.split()[1])
        return None

    def daemon_counters(self) -> dict[str, Any] | None:
        """qvdfs' own per-opcode counters for this mount (``qvdfs stats MNT --json``), or None.

        None for other targets, and whenever the command is missing, fails, or prints
        something that is not the expected JSON object (the command is new).
        """
        if self.target.name != "qvdfs":
            return None
        try:
            done = subprocess.run([QVDFS, "stats", str(self.root), "--json"],
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=STATS_TIMEOUT)
        except (OSError, subprocess.SubprocessError):
            return None
        if done.returncode != 0:
            return None
        try:
            data = json.loads(done.stdout)
        except ValueError:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("opcodes"), dict):
            return None
        return data

    def daemon_rss_mib(self) -> float | None:
        """Resident memory of the FUSE daemon now, from /proc/<pid>/status VmRSS."""
        rss = None if self.daemon_pid is None else processes.status(self.daemon_pid).get("VmRSS")
        return None if rss is None else int(rss.split()[0]) / 1024


@dataclasses.dataclass(frozen=True)
class Target:
    """A filesystem to compare. ``kind`` is ``plain``, ``kernel`` or ``fuse``."""

    name: str
    kind: str
    summary: str

    def unavailable(self) -> str | None:
        """Why this target cannot run on this machine, or None when it can."""
        binary = {"unionfs-fuse": "/usr/bin/unionfs", "fuse-overlayfs": "/usr/bin/fuse-overlayfs",
                  "qvdfs": QVDFS}.get(self.name)
        if binary and not os.access(binary, os.X_OK):
            return f"{binary} is not installed"
        return None

    def uncached_attr_options(self) -> list[str]:
        """Options that make the kernel send a GETATTR to the daemon for every stat.

        unionfs-fuse (libfuse 2's high-level options) and qvdfs take ``attr_timeout=0``;
        fuse-overlayfs has one ``timeout=`` for both entries and attributes (libfuse's low-level
        loop rejects ``attr_timeout``). A stat of the mount's root needs no LOOKUP, so a zero
        entry timeout costs nothing there.
        """
        return {"unionfs-fuse": ["-o", "attr_timeout=0"], "fuse-overlayfs": ["-o", "timeout=0"],
                "qvdfs": ["-o", "attr_timeout=0"]}.get(self.name, [])

    def mount_command(self, lower: Path, upper: Path, work: Path, mnt: Path,
                      extra: Sequence[str] = ()) -> list[str]:
        """The command that mounts this target at ``mnt``; ``work`` is for the overlayfs kinds.

        ``extra`` options go after the usual ones (only for the FUSE daemons).
        """
        if self.name == "kernel-overlay":
            opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
            return ["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)]
        if self.name == "unionfs-fuse":
            return ["/usr/bin/unionfs", *UNIONFS_OPTIONS, *extra, f"{upper}=RW:{lower}=RO",
                    str(mnt)]
        if self.name == "fuse-overlayfs":
            opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
            return ["/usr/bin/fuse-overlayfs", "-o", opts, *extra, str(mnt)]
        if self.name == "qvdfs":
            return [QVDFS, *QVDFS_OPTIONS, *extra, f"{upper}=RW:{lower}=RO", str(mnt)]
        raise ValueError(f"{self.name} has no mount command")


PLAIN = Target("plain", "plain", "the lower folder itself, no union (the physical limit)")
KERNEL = Target("kernel-overlay", "kernel", "kernel overlayfs")
UNIONFS = Target("unionfs-fuse", "fuse", "stock unionfs-fuse 2.x (the baseline)")
FUSE_OVERLAYFS = Target("fuse-overlayfs", "fuse", "fuse-overlayfs, lowerdir/upperdir/workdir")
QVDFS_TARGET = Target("qvdfs", "fuse", "qvdfs with the node's exact command line")

ALL = (PLAIN, KERNEL, UNIONFS, FUSE_OVERLAYFS, QVDFS_TARGET)
BY_NAME = {t.name: t for t in ALL}
BASELINE = UNIONFS.name


def probe(target: Target, lower: Path, scratch: Path) -> str | None:
    """Mount ``target`` once over ``lower`` and take it down; the error, or None if it works.

    Catches a binary that exists but cannot mount yet (qvdfs while it is being written), so the
    run skips it with a reason instead of failing every workload.
    """
    reason = target.unavailable()
    if reason or target.kind == "plain":
        return reason
    try:
        with mount(target, lower, scratch / f"probe-{target.name}") as mounted:
            os.listdir(mounted.root)
    except (OSError, subprocess.SubprocessError, MountError) as exc:
        return f"probe mount failed: {exc}"
    return None


class MountError(Exception):
    """A target did not mount, or did not come down."""


@contextlib.contextmanager
def mount(target: Target, lower: Path, scratch: Path,
          extra: Sequence[str] = ()) -> Iterator[Mounted]:
    """Mount ``target`` fresh over ``lower`` with an empty upper; take it all down on exit.

    ``scratch`` must not exist yet; it receives ``upper/``, ``work/`` and ``mnt/`` and is
    deleted afterwards. For the plain target nothing is mounted and ``root`` is ``lower``.
    ``extra`` options are passed to a FUSE daemon (see ``Target.mount_command``).
    """
    if target.kind == "plain":
        yield Mounted(target, lower, None, None, None)
        return
    upper, work, mnt = scratch / "upper", scratch / "work", scratch / "mnt"
    for folder in (upper, work, mnt):
        folder.mkdir(parents=True)
    command = target.mount_command(lower, upper, work, mnt, extra)
    mounted = None
    try:
        start = time.perf_counter()
        _ACTIVE.add(str(mnt))
        # stderr goes to a file, not a pipe: a daemon that keeps its inherited stderr open
        # would otherwise hold run() until the timeout although its launcher exited long ago.
        with tempfile.TemporaryFile() as err:
            returncode = _run_timed(command, err)
            err.seek(0)
            detail = err.read().decode(errors="replace").strip().splitlines()
        if returncode != 0:
            raise MountError(f"{command[0]} exited {returncode}: "
                             f"{detail[-1] if detail else 'no output'}")
        # A daemon may return before the kernel lists the mount; mount time ends when it does.
        deadline = start + MOUNT_TIMEOUT
        while not mountinfo.is_mounted(mnt):
            if time.perf_counter() > deadline:
                raise MountError(f"{target.name} exited 0 but {mnt} is not mounted")
            time.sleep(0.001)
        seconds = time.perf_counter() - start
        pid = daemon_pid(mnt) if target.kind == "fuse" else None
        mounted = Mounted(target, mnt, upper, seconds, pid)
        yield mounted
    finally:
        try:
            down = unmount(mnt)
            if mounted is not None:
                mounted.unmount_seconds = down
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def _run_timed(command: list[str], stderr: Any) -> int:
    """Run ``command`` to its end (killed after ``MOUNT_TIMEOUT``); its exit status.

    Its end is seen when it happens, through a pidfd: ``subprocess.run`` with a timeout
    polls with a doubling sleep instead, so a command of 33 ms was timed 64 ms and one of
    110 ms 114 ms.
    """
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=stderr)
    pidfd = os.pidfd_open(proc.pid)
    try:
        ended, _, _ = select.select([pidfd], [], [], MOUNT_TIMEOUT)
    finally:
        os.close(pidfd)
    if not ended:
        proc.kill()
        proc.wait()
        raise subprocess.TimeoutExpired(command, MOUNT_TIMEOUT)
    return proc.wait()


def daemon_pid(mnt: Path) -> int | None:
    """The pid of the FUSE daemon serving ``mnt``: its argv names ``mnt``.

    If several processes match (a launcher still waiting for its daemonized child), the one
    holding /dev/fuse open is the daemon.
    """
    matches = [p.pid for word in {str(mnt), os.path.realpath(mnt)}
               for p in processes.with_argument(word) if p.pid != os.getpid()]
    for pid in matches:
        if "/dev/fuse" in processes.open_files(pid):
            return pid
    return matches[0] if matches else None


def unmount(mnt: Path) -> float:
    """Take ``mnt`` down the way the node does (plain ``umount``) and wait for its daemon.

    Falls back to a lazy unmount if the mount stays busy, so a run never leaves one behind.
    Returns the seconds from ``umount`` until the daemon had exited (or was killed).
    """
    pid = daemon_pid(mnt) if mountinfo.is_mounted(mnt) else None
    start = time.perf_counter()
    for command in (["umount", str(mnt)], ["umount", str(mnt)], ["umount", "-l", str(mnt)]):
        if not mountinfo.is_mounted(mnt):
            break
        done = subprocess.run(command, capture_output=True, text=True, timeout=UNMOUNT_TIMEOUT)
        if done.returncode != 0:
            log.warning("%s: %s", " ".join(command), done.stderr.strip())
            time.sleep(0.2)
    _ACTIVE.discard(str(mnt))
    if mountinfo.is_mounted(mnt):
        raise MountError(f"could not unmount {mnt}")
    if pid is not None:
        _wait_exit(pid, mnt)
    return time.perf_counter() - start


def _wait_exit(pid: int, mnt: Path) -> None:
    deadline = time.monotonic() + UNMOUNT_TIMEOUT
    while processes.alive(pid):
        if time.monotonic() > deadline:
            log.warning("daemon %d of %s still running %ds after umount; killing it", pid, mnt,
                        UNMOUNT_TIMEOUT)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
            return
        time.sleep(0.01)


def unmount_all() -> None:
    """Unmount whatever this process still has mounted (after an interrupt)."""
    for mnt in sorted(_ACTIVE, reverse=True):
        try:
            unmount(Path(mnt))
        except (OSError, subprocess.SubprocessError, MountError) as exc:
            print(f"bench: could not unmount {mnt}: {exc}", file=sys.stderr)
