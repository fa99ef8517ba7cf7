"""The host's processes, from ``/proc/PID/…``, for qvdctl, the tests and the benchmarks.

Every question here is asked of a table that changes while it is read: a process can end
between the listing of ``/proc`` and the read of its files. Such a process is simply gone
(``processes`` skips it, ``state`` answers None), never an error. Kernel threads and zombies
have an empty command line, so ``processes`` never yields them; a zombie still has a state
(``Z``), which is why "still running" is ``alive``, not "its folder exists".

No library: psutil would do all of it, but ``import psutil`` costs 30 ms here (measured, the
median of three) against a budget of 300 ms for ``qvdctl vm list``, which scans for
containers' monitors, and the project needs only what follows.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable, Iterator

PROC = "/proc"


@dataclasses.dataclass(frozen=True)
class Process:
    pid: int
    argv: tuple[bytes, ...]

    @property
    def command_line(self) -> str:
        """argv joined by spaces, decoded as file names: what ``ps`` shows.

        A process that rewrote its title (liblxc's ``[lxc monitor] LXCPATH NAME``) has one
        word with spaces in it; this is the form to match such a title against.
        """
        return " ".join(os.fsdecode(word) for word in self.argv)


def _read(pid: int, name: str, proc: str) -> bytes | None:
    try:
        with open(f"{proc}/{pid}/{name}", "rb") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None


def processes(proc: str = PROC) -> Iterator[Process]:
    """The processes with a command line, in the order of ``/proc``.

    The pids are listed first and each command line read as it is yielded, so a process that
    ends meanwhile is left out. A trailing empty argument cannot be told from the NULs some
    programs pad a rewritten title with, and is dropped.
    """
    pids = [int(name) for name in os.listdir(proc) if name.isdigit()]
    for pid in pids:
        raw = _read(pid, "cmdline", proc)
        if raw:
            yield Process(pid, tuple(raw.rstrip(b"\0").split(b"\0")))


def with_argument(word: str | os.PathLike[str], proc: str = PROC) -> list[Process]:
    """The processes that have ``word`` as one whole argument (a daemon names its mount point)."""
    wanted = os.fsencode(word)
    return [p for p in processes(proc) if wanted in p.argv]


def _stat_fields(pid: int, proc: str) -> list[str] | None:
    raw = _read(pid, "stat", proc)
    # The command name (field 2) is in parentheses and may hold spaces or ")": split after it.
    return raw.rsplit(b")", 1)[1].decode().split() if raw else None


def state(pid: int, proc: str = PROC) -> str | None:
    """The one-letter state (``R``, ``S``, ``D``, ``Z``, ...) of ``pid``; None if it is gone."""
    fields = _stat_fields(pid, proc)
    return fields[0] if fields else None


def parent(pid: int, proc: str = PROC) -> int | None:
    """The parent pid of ``pid``; None if it is gone."""
    fields = _stat_fields(pid, proc)
    return int(fields[1]) if fields else None


def alive(pid: int, proc: str = PROC) -> bool:
    """Whether ``pid`` exists and is not a zombie (which has ended, but not been reaped)."""
    return state(pid, proc) not in (None, "Z", "X")


def wait_gone(pids: Iterable[int], timeout: float, proc: str = PROC) -> bool:
    """Wait until none of ``pids`` is alive; False if some still are after ``timeout`` s."""
    pids = list(pids)
    deadline = time.monotonic() + timeout
    while any(alive(pid, proc) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def cpu_ticks(pid: int, proc: str = PROC) -> int | None:
    """User plus system CPU time of ``pid`` (all threads), in clock ticks; None if gone.

    ``os.sysconf("SC_CLK_TCK")`` ticks make a second (100 here).
    """
    fields = _stat_fields(pid, proc)
    # utime and stime are fields 14 and 15 of stat; the split starts at field 3.
    return int(fields[11]) + int(fields[12]) if fields else None


def status(pid: int, proc: str = PROC) -> dict[str, str]:
    """The fields of ``/proc/PID/status`` (``VmRSS``, ``SigCgt``, ...); empty if gone."""
    raw = _read(pid, "status", proc)
    pairs = (line.split(":", 1) for line in (raw or b"").decode().splitlines() if ":" in line)
    return {key: value.strip() for key, value in pairs}


@dataclasses.dataclass(frozen=True)
class Credentials:
    """What the kernel decides a process may do by, as ``/proc/PID/status`` shows it to us."""

    fsgid: int
    groups: frozenset[int]  # the supplementary groups
    effective: int  # the effective capability set, one bit per ``CAP_*`` number
    # Whether the process is in our own user namespace: its capabilities count over files
    # only there (in a container's namespace they act on what that namespace owns).
    in_our_user_namespace: bool

    def in_group(self, gid: int) -> bool:
        return gid == self.fsgid or gid in self.groups

    def capable(self, capability: int) -> bool:
        """Whether the process holds ``capability`` over every file, as host root does."""
        return self.in_our_user_namespace and bool(self.effective >> capability & 1)


def credentials(pid: int, proc: str = PROC) -> Credentials | None:
    """The credentials of ``pid`` (a thread id works too: credentials are per thread), or
    None if it is gone."""
    fields = status(pid, proc)
    try:
        ns = os.stat(f"{proc}/{pid}/ns/user").st_ino
    except (FileNotFoundError, ProcessLookupError):
        return None
    if not fields:
        return None
    return Credentials(
        fsgid=int(fields["Gid"].split()[3]),
        groups=frozenset(int(g) for g in fields.get("Groups", "").split()),
        effective=int(fields["CapEff"], 16),
        in_our_user_namespace=ns == os.stat(f"{proc}/self/ns/user").st_ino)


def open_files(pid: int, proc: str = PROC) -> list[str]:
    """What the open descriptors of ``pid`` point to (``/dev/fuse``, paths, ``pipe:[N]``)."""
    try:
        fds = os.listdir(f"{proc}/{pid}/fd")
    except (FileNotFoundError, ProcessLookupError):
        return []
    found = []
    for fd in fds:
        try:
            found.append(os.readlink(f"{proc}/{pid}/fd/{fd}"))
        except (FileNotFoundError, ProcessLookupError):
            continue  # closed meanwhile
    return found
