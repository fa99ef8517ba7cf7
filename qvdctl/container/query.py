"""What liblxc and the process table say about containers, and the commands that reach one.

No event loop and no network library: ``vm list``, ``vm exec`` and ``vm console`` need only
this module (through ``seam.py``), so they answer without loading trio or pyroute2, which
cost more than the rest of such a command together. ``runtime.py`` starts and stops
containers on top of it.

liblxc reaches a running container through an abstract unix socket, which lives in
the network namespace of whoever started it: query and attach from that namespace.
The process table answers the same from everywhere (``monitors``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import lxc

from qvdctl.container.config import DEFAULT_LXCPATH
from qvdproc import processes

# What a command run with `vm exec` finds in its environment (lxc-attach --clear-env).
EXEC_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ABSENT = "ABSENT"
# liblxc retitles the monitor process of each running container "[lxc monitor] LXCPATH NAME".
MONITOR_TITLE = "[lxc monitor] "


class ContainerError(Exception):
    """A container operation failed; the message is one line naming the container."""


def container(name: str, lxcpath: Path) -> lxc.Container:
    """python-lxc's handle on ``name``; its calls block."""
    return lxc.Container(name, str(lxcpath))


def state(name: str, lxcpath: Path = DEFAULT_LXCPATH) -> str:
    """liblxc's state of ``name`` ("RUNNING", "STOPPED", ...), or "ABSENT" with no config."""
    c = container(name, lxcpath)
    return c.state if c.defined else ABSENT


def states(lxcpath: Path = DEFAULT_LXCPATH) -> dict[str, str]:
    """States of every ``qvd-*`` container defined in ``lxcpath``, for ``vm list``."""
    names = lxc.list_containers(config_path=str(lxcpath)) if lxcpath.is_dir() else ()
    return {n: state(n, lxcpath) for n in names if n.startswith("qvd-")}


def attach_argv(name: str, argv: Sequence[str], lxcpath: Path = DEFAULT_LXCPATH) -> list[str]:
    """The ``lxc-attach`` command line running ``argv`` in ``name`` with a clean env."""
    return [
        "lxc-attach", "-P", str(lxcpath), "-n", name,
        "--clear-env", "--set-var", f"PATH={EXEC_PATH}", "--", *argv,
    ]  # fmt: skip


def attach_command(name: str, argv: Sequence[str], lxcpath: Path = DEFAULT_LXCPATH) -> list[str]:
    """``attach_argv`` for a command that can run now.

    Raises:
        ContainerError: empty command, or the container is not running.
    """
    if not argv:
        raise ContainerError(f"no command given to run in container {name}")
    if state(name, lxcpath) != "RUNNING":
        raise ContainerError(f"container {name} is not running")
    return attach_argv(name, argv, lxcpath)


def console_argv(name: str, lxcpath: Path = DEFAULT_LXCPATH, tty: int = 1) -> list[str]:
    """The ``lxc-console`` command line for ``name``'s tty (Ctrl+a q leaves)."""
    return ["lxc-console", "-P", str(lxcpath), "-n", name, "-t", str(tty)]


class Monitor(NamedTuple):
    pid: int
    lxcpath: Path
    name: str


def monitors() -> list[Monitor]:
    """liblxc's monitor processes on this host: one per running container.

    Unlike liblxc's socket, which only answers in the network namespace that started the
    container, the process table is the same from everywhere.
    """
    found = []
    for process in processes.processes():
        title = process.command_line
        if title.startswith(MONITOR_TITLE):
            lxcpath, _, name = title.removeprefix(MONITOR_TITLE).rpartition(" ")
            found.append(Monitor(process.pid, Path(lxcpath), name))
    return found


def container_inits(lxcpath: Path) -> dict[int, tuple[int, str]]:
    """Pid -> (its monitor's pid, container name) of the init of every running ``qvd-*``
    container in ``lxcpath``: the child of its liblxc monitor (container names repeat
    across lxcpaths, so the monitor's lxcpath is what tells them apart)."""
    names = {m.pid: m.name for m in monitors()
             if m.lxcpath == lxcpath and m.name.startswith("qvd-")}
    if not names:
        return {}
    inits = {}
    for pid in (int(entry) for entry in os.listdir(processes.PROC) if entry.isdigit()):
        ppid = processes.parent(pid)
        if ppid in names and processes.alive(pid):
            inits[pid] = (ppid, names[ppid])
    return inits
