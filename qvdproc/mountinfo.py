"""The mount table, from ``/proc/self/mountinfo`` (proc(5)), for every part of the project.

mountinfo rather than ``/proc/self/mounts``: it carries each mount's device number (qvdfs sets
its read-ahead window through ``/sys/class/bdi/MAJOR:MINOR``) and the propagation fields.

The table is read, never the mount points themselves: a stat of a dead FUSE mount fails with
ENOTCONN and one of a hung daemon never returns, while "is it mounted" must still be
answered then. The kernel writes space, tab, newline and backslash inside a path as ``\\ooo``
(``\\040``, ``\\011``, ``\\012``, ``\\134``) and every other byte as it is, so the path fields
are unescaped, then decoded as the ``os`` module decodes file names: a mount point compares
equal to ``os.path.realpath`` of the same path, even for names that are not UTF-8.

No library: psutil's ``disk_partitions`` reads ``/proc/self/mounts`` and gives neither device
numbers nor propagation, and the format is one line of space-separated fields per mount.
"""

from __future__ import annotations

import dataclasses
import os
import re

MOUNTINFO = "/proc/self/mountinfo"

_ESCAPE = re.compile(rb"\\([0-7]{3})")


@dataclasses.dataclass(frozen=True)
class Mount:
    """One line of mountinfo. Later lines are mounted over earlier ones on the same point."""

    mount_id: int
    parent_id: int
    device: str  # "major:minor", as /sys/class/bdi names it
    root: str  # the folder of the filesystem that is mounted here
    mount_point: str
    options: tuple[str, ...]  # per mount: rw, nosuid, relatime, ...
    optional_fields: tuple[str, ...]  # shared:N, master:N, propagate_from:N, unbindable
    fs_type: str  # with its subtype: fuse.qvdfs
    source: str
    super_options: tuple[str, ...]  # per filesystem


def unescape(field: bytes) -> str:
    """A path field with the kernel's ``\\ooo`` escapes undone, decoded as a file name."""
    return os.fsdecode(_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), field))


def parse_line(line: bytes) -> Mount:
    """One mountinfo line (without its newline).

    Raises:
        ValueError: the line does not have mountinfo's fields.
    """
    fields = line.split(b" ")
    try:
        separator = fields.index(b"-", 6)
        fs_type, source, super_options = fields[separator + 1 : separator + 4]
        return Mount(
            mount_id=int(fields[0]),
            parent_id=int(fields[1]),
            device=fields[2].decode(),
            root=unescape(fields[3]),
            mount_point=unescape(fields[4]),
            options=tuple(fields[5].decode().split(",")),
            optional_fields=tuple(f.decode() for f in fields[6:separator]),
            fs_type=unescape(fs_type),
            source=unescape(source),
            super_options=tuple(super_options.decode().split(",")),
        )
    except (ValueError, IndexError):
        raise ValueError(f"not a mountinfo line: {line!r}") from None


def read_mounts(mountinfo: str = MOUNTINFO) -> list[Mount]:
    """Every mount of ``mountinfo``, in its order (a mount over another comes after it)."""
    with open(mountinfo, "rb") as f:
        return [parse_line(line) for line in f.read().splitlines() if line]


def mounts_under(path: str | os.PathLike[str], mountinfo: str = MOUNTINFO) -> list[str]:
    """Mount points at or below ``path`` (resolved), deepest first.

    A point mounted several times appears that many times: each ``umount`` takes the top one.
    """
    top = os.path.realpath(path)
    prefix = top.rstrip("/") + "/"
    found = [m.mount_point for m in read_mounts(mountinfo)
             if m.mount_point == top or m.mount_point.startswith(prefix)]
    return sorted(found, key=lambda p: p.count("/"), reverse=True)


def is_mounted(path: str | os.PathLike[str], mountinfo: str = MOUNTINFO) -> bool:
    """Whether something is mounted exactly at ``path`` (resolved)."""
    target = os.path.realpath(path)
    return any(m.mount_point == target for m in read_mounts(mountinfo))
