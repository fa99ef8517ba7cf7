"""How an image's init wants to be halted, found once from its extracted tree.

LXC stops a container by sending its init ``lxc.signal.halt``. An init that does not
take that signal as "power off" ignores it, so the stop waits the whole
``vm.stop.timeout`` and then kills the container (systemd's journal left open). Each
init has its own: systemd SIGRTMIN+3, sysvinit SIGPWR, busybox SIGUSR2.

Where ``/sbin/init`` leads tells them apart: a link to ``systemd`` or ``busybox``, else
the program's first bytes (busybox's banner, sysvinit's ``/run/initctl``). Anything else
gets SIGPWR, liblxc's own default. The answer is found when the image is extracted
(``extract.ensure_extracted``) and kept in a small JSON file beside the tree
(``basefs/.images/.<file>.init``), so every VM of the image reuses it.

The admin can override it: a DI's own ``halt_signal`` (``di add ... halt_signal=SIG``)
wins, then its OSF's (``osf add/edit ... halt_signal=SIG``), then what the init is. The
DI's comes first because it speaks of that one image; the OSF's is the flavour's
default for all of its images (including those ``di commit`` makes later).

The tree is hostile input read as root. Links are resolved by hand, one component at a
time from descriptors opened with ``O_PATH | O_NOFOLLOW``, with the image's root as
``/``: an absolute target restarts there, ``..`` at the top stays there, more than 40
links is a loop. Nothing outside the image is looked at, only a plain file is ever
opened for reading (a FIFO or a device planted as init is not), and at most
``SNIFF_BYTES`` of it are read.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
import stat
from pathlib import Path, PurePosixPath

log = logging.getLogger(__name__)

INIT = "/sbin/init"
# liblxc's default; sysvinit's, and harmless to the inits not recognised.
FALLBACK = "SIGPWR"
SIGNALS = {"systemd": "SIGRTMIN+3", "busybox": "SIGUSR2", "sysvinit": "SIGPWR"}
MAX_LINKS = 40  # the kernel's own limit before ELOOP
SNIFF_BYTES = 4 << 20  # a static busybox is ~2 MiB; sysvinit's init ~50 KiB
# Strings each init's binary carries: busybox's --help banner, sysvinit's control FIFO.
MARKS = ((b"BusyBox v", "busybox"), (b"/run/initctl", "sysvinit"), (b"/dev/initctl", "sysvinit"))

_SIGNAL = re.compile(r"SIG[A-Z0-9]+(\+[0-9]{1,2})?|[0-9]{1,2}")
_OPEN = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclasses.dataclass(frozen=True)
class InitFacts:
    """What ``/sbin/init`` of an image is.

    Attributes:
        init: "systemd", "busybox", "sysvinit" or "unknown".
        target: the file ``/sbin/init`` leads to inside the image, None if nowhere.
        halt_signal: what makes it power off.
    """

    init: str
    target: str | None
    halt_signal: str


def signal_number(text: str) -> int:
    """``SIGUSR2`` -> 12, ``SIGRTMIN+3`` -> 37, ``12`` -> 12, as liblxc reads them.

    Raises:
        ValueError: not a signal name or number this host knows.
    """
    value = text.strip().upper()
    if not _SIGNAL.fullmatch(value):
        raise ValueError(f"'{text}' is not a signal such as SIGPWR, SIGRTMIN+3 or 30")
    if value.isdigit():
        number = int(value)
    else:
        base, _, offset = value.partition("+")
        if offset and base != "SIGRTMIN":
            raise ValueError(f"'{text}': only SIGRTMIN takes an offset")
        try:
            number = int(signal.Signals[base]) + int(offset or 0)
        except KeyError:
            raise ValueError(f"'{text}' is not a signal this host knows") from None
    if not 0 < number <= signal.SIGRTMAX:
        raise ValueError(f"signal '{text}' is out of range")
    return number


def check_signal(text: str) -> str:
    """``text`` upper-cased, if it can be ``lxc.signal.halt``.

    Raises:
        ValueError: not a signal name or number this host knows.
    """
    signal_number(text)
    return text.strip().upper()


def _open_in_tree(root: Path, path: str) -> tuple[PurePosixPath, int] | None:
    """Where ``path`` leads inside the tree ``root`` (as ``/``), and an O_PATH fd of it.

    The fd is the caller's to close. None if a component is missing or not a folder,
    a link is empty, or there are more than ``MAX_LINKS`` links.
    """
    stack = [os.open(root, _OPEN | os.O_DIRECTORY)]
    names: list[str] = []  # what stack[1:] stand for
    todo = list(reversed(PurePosixPath(path).parts))
    links = 0
    try:
        while todo:
            part = todo.pop()
            if part in ("/", "."):
                continue
            if part == "..":
                if len(stack) > 1:  # at the top ".." is the top, as in a chroot
                    os.close(stack.pop())
                    names.pop()
                continue
            try:
                fd = os.open(part, _OPEN, dir_fd=stack[-1])
            except OSError:
                return None
            mode = os.fstat(fd).st_mode
            if stat.S_ISLNK(mode):
                os.close(fd)
                links += 1
                try:
                    target = os.readlink(part, dir_fd=stack[-1])
                except OSError:
                    return None
                if links > MAX_LINKS or not target:
                    return None
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop())
                    names.clear()
                todo.extend(reversed(PurePosixPath(target).parts))
            elif not todo:
                return PurePosixPath("/", *names, part), fd
            elif stat.S_ISDIR(mode):
                stack.append(fd)
                names.append(part)
            else:
                os.close(fd)
                return None
        return PurePosixPath("/", *names), os.dup(stack[-1])
    finally:
        for fd in stack:
            os.close(fd)


def _sniff(path_fd: int) -> str:
    """The kind of init whose marks the plain file ``path_fd`` carries, else "unknown"."""
    # Reopened through /proc: the O_PATH fd pins the very file that was checked.
    fd = os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        head = f.read(SNIFF_BYTES)
    return next((kind for mark, kind in MARKS if mark in head), "unknown")


def detect(root: Path) -> InitFacts:
    """What the image rooted at ``root`` runs as ``/sbin/init``, and how to halt it."""
    found = _open_in_tree(root, INIT)
    if found is None:
        return InitFacts("unknown", None, FALLBACK)
    where, fd = found
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            kind = "unknown"  # a FIFO, a device, a folder: never opened
        elif where.name in ("systemd", "busybox"):
            kind = where.name
        else:
            kind = _sniff(fd)
    except OSError:
        kind = "unknown"
    finally:
        os.close(fd)
    return InitFacts(kind, str(where), SIGNALS.get(kind, FALLBACK))


def facts_path(tree: Path) -> Path:
    """The file beside the extraction ``tree`` that remembers its ``InitFacts``."""
    return tree.parent / f".{tree.name}.init"


def record(tree: Path, root: Path) -> InitFacts:
    """Detect the init of ``root`` (the image's root within ``tree``) and remember it."""
    facts = detect(root)
    path = facts_path(tree)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(dataclasses.asdict(facts)) + "\n")
    os.replace(tmp, path)
    log.info("image %s: init is %s (%s), halted with %s",
             tree.name, facts.init, facts.target, facts.halt_signal)  # fmt: skip
    return facts


def override(di_signal: str | None, osf_signal: str | None) -> tuple[str, str] | None:
    """The admin's halt signal and whose it is ("di" or "osf"), None if neither set one."""
    if di_signal:
        return check_signal(di_signal), "di"
    if osf_signal:
        return check_signal(osf_signal), "osf"
    return None


def recorded(tree: Path) -> InitFacts | None:
    """What extraction found of ``tree``'s init; None if not yet examined (or spoilt)."""
    try:
        facts = InitFacts(**json.loads(facts_path(tree).read_text()))
        return dataclasses.replace(facts, halt_signal=check_signal(facts.halt_signal))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def halt_signal(
    tree: Path, root: Path, di_signal: str | None = None, osf_signal: str | None = None
) -> str:
    """``lxc.signal.halt`` for the VMs of extraction ``tree`` (image root ``root``).

    The DI's ``di_signal``, else the OSF's ``osf_signal``, else what was found at
    extraction. A tree extracted before images were examined is examined now, once.

    Raises:
        ValueError: an override is not a signal.
    """
    chosen = override(di_signal, osf_signal)
    if chosen is not None:
        return chosen[0]
    facts = recorded(tree)
    return (facts or record(tree, root)).halt_signal
