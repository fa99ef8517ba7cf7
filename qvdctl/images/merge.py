"""``di commit``'s reading half: a VM's base with its overlay applied, as one merged tree.

The overlay may have been written by any of the node's unions, so both formats the unions
use are read (SPEC §3), through ``qvdformat`` as the qvdfs union reads them, with the
meaning qvdfs and kernel overlayfs give them: whiteouts (0/0 devices, unionfs-fuse's
``_HIDDEN~`` markers) hide the lower entry of their name; an opaque folder (or a unionfs
marker beside a real entry) hides the whole lower folder; a metacopy file has its
metadata in the overlay and its data in the lower file; a redirect names the lower folder
a renamed folder merges with.

Both trees are written by an image and by a container, and this runs as root: every
access starts from a directory descriptor opened here and names one component with
``O_NOFOLLOW`` (``qvdformat.syscalls``). Sockets cannot be archived and are left out; the
union's own bookkeeping (the overlay xattrs, the marker folders, ``.qvdfs.work``) never
reaches the merged tree.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from qvdctl.errors import QvdError
from qvdformat import markers, syscalls

log = logging.getLogger(__name__)

# The node's unions run as root and write the kernel's trusted.overlay.* names.
XATTRS = markers.TRUSTED


class CommitError(QvdError):
    """The overlay or the base cannot be merged (a broken metacopy, an unreadable entry)."""


@dataclasses.dataclass(frozen=True)
class Source:
    """One entry of one layer: its parent folder's descriptor, its name and its lstat."""

    dir_fd: int
    name: bytes
    st: os.stat_result

    def xattrs(self) -> dict[bytes, bytes]:
        """Its extended attributes, without the union's overlay xattrs."""
        return syscalls.xattrs_at(self.dir_fd, self.name, skip=XATTRS.prefix)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One entry of the merged tree.

    ``meta`` gives type, owner, mode, times and xattrs; ``data`` where a regular
    file's bytes are (the lower file for a metacopy). ``change`` is ``added``,
    ``changed`` or ``None`` (as in the base).
    """

    path: bytes
    meta: Source
    data: Source | None
    change: str | None


@dataclasses.dataclass(frozen=True)
class Changes:
    added: list[str]
    changed: list[str]
    removed: list[str]


def _listing(dir_fd: int | None, *, skip: frozenset[bytes] = frozenset()) -> dict[bytes, Source]:
    if dir_fd is None:
        return {}
    found = {}
    for name in os.listdir(dir_fd):
        raw = os.fsencode(name)
        if raw not in skip:
            found[raw] = Source(dir_fd, raw, syscalls.lstat_at(dir_fd, raw))
    return found


def _open_dir(source: Source | None) -> int | None:
    if source is None or not stat.S_ISDIR(source.st.st_mode):
        return None
    return syscalls.open_dir(source.dir_fd, source.name)


def close(*fds: int | None) -> None:
    for fd in fds:
        if fd is not None:
            os.close(fd)


def _child_markers(markers_fds: list[int], name: bytes) -> list[int]:
    """The unionfs-fuse marker folders of ``name`` below the ones of its parent."""
    found = (syscalls.open_dir_if_any(fd, name) for fd in markers_fds)
    return [fd for fd in found if fd is not None]


def _same(merged: Source, base: Source) -> bool:
    """Whether a merged entry is what the base has at its path (no data compare: the
    unions copy mtime on copy-up, so a written file differs in size or mtime)."""
    a, b = merged.st, base.st
    if stat.S_IFMT(a.st_mode) != stat.S_IFMT(b.st_mode):
        return False
    if (a.st_mode, a.st_uid, a.st_gid) != (b.st_mode, b.st_uid, b.st_gid):
        return False
    if not stat.S_ISDIR(a.st_mode):  # a folder's mtime moves with every change inside
        if (a.st_size, a.st_mtime_ns, a.st_rdev) != (b.st_size, b.st_mtime_ns, b.st_rdev):
            return False
    if stat.S_ISLNK(a.st_mode):
        if os.readlink(merged.name, dir_fd=merged.dir_fd) != os.readlink(
            base.name, dir_fd=base.dir_fd
        ):
            return False
    return merged.xattrs() == base.xattrs()


def _pristine(path: bytes, fd: int | None, skip: frozenset[bytes] = frozenset()
              ) -> Iterator[Entry]:
    """A base folder the overlay never touched: everything in it as it is."""
    for name, src in sorted(_listing(fd, skip=skip).items()):
        if markers.is_whiteout_stat(src.st) or stat.S_ISSOCK(src.st.st_mode):
            continue
        child = path + b"/" + name if path else name
        if stat.S_ISDIR(src.st.st_mode):
            yield Entry(child, src, None, None)
            sub = _open_dir(src)
            try:
                yield from _pristine(child, sub)
            finally:
                close(sub)
        else:
            yield Entry(child, src, src if stat.S_ISREG(src.st.st_mode) else None, None)


class Merge:
    """The merged tree of ``lower`` (the base) under ``upper`` (the overlay), walked once.

    ``entries()`` yields every entry of the merged tree, parents first;
    ``removed`` then holds the base paths the overlay hides. ``xattrs``: the namespace of
    the overlay's xattrs (a node's unions write ``TRUSTED``).
    """

    def __init__(self, upper: Path, lower: Path, xattrs: markers.OverlayXattrs = XATTRS
                 ) -> None:
        self.upper = upper
        self.lower = lower
        self.xattrs = xattrs
        self.removed: list[bytes] = []

    def entries(self) -> Iterator[Entry]:
        upper_fd = os.open(self.upper, syscalls.DIR_FLAGS)
        lower_fd = os.open(self.lower, syscalls.DIR_FLAGS)
        self._lower_root = lower_fd
        marker_dirs = markers.unionfs_meta_fds(upper_fd)
        try:
            # The root's metadata is the image's: the overlay folder itself is qvdctl's.
            root = Source(lower_fd, b".", os.stat(lower_fd))
            yield Entry(b"", root, None, None)
            yield from self._dir(b"", upper_fd, lower_fd, lower_fd, marker_dirs, opaque=False)
        finally:
            close(upper_fd, lower_fd, *marker_dirs)

    def _dir(self, path: bytes, upper_fd: int | None, lower_fd: int | None,
             base_fd: int | None, marker_dirs: list[int], *, opaque: bool) -> Iterator[Entry]:
        """The merged contents of folder ``path``.

        ``lower_fd``: the lower folder merged here (None: opaque or none);
        ``base_fd``: the base's folder at the same path, for the change list
        (differs from ``lower_fd`` only under a redirect); ``marker_dirs``: the
        unionfs-fuse marker folders for ``path``.
        """
        upper = _listing(upper_fd, skip=markers.RESERVED_ROOT_NAMES if path == b"" else frozenset())
        lower = {} if opaque else _listing(lower_fd)
        hidden = set().union(*map(markers.unionfs_hidden_in, marker_dirs))
        base = lower if base_fd == lower_fd and not opaque else _listing(base_fd)
        merged_names = set()
        for name in sorted(upper.keys() | lower.keys()):
            u, lo = upper.get(name), lower.get(name)
            if lo is not None and (name in hidden or markers.is_whiteout_stat(lo.st)):
                lo = None
            if u is not None and markers.is_whiteout_stat(u.st):
                continue
            if u is None and lo is None:
                continue
            merged_names.add(name)
            child = path + b"/" + name if path else name
            b = base.get(name)
            if b is not None and markers.is_whiteout_stat(b.st):
                b = None
            if u is None:
                assert lo is not None
                # Not in the overlay: the base's own entry (and, if the base is the lower
                # here and no unionfs-fuse marker hides anything below, its whole subtree
                # unchanged). unionfs-fuse deletes lower/a/b with only a marker in
                # .unionfs-fuse/a/, never making the overlay's a/.
                change = None if b is lo else ("changed" if b is not None else "added")
                child_markers = (_child_markers(marker_dirs, name)
                                 if stat.S_ISDIR(lo.st.st_mode) else [])
                try:
                    yield from self._emit(child, lo, lo, b, upper=None, lower=lo,
                                          marker_dirs=child_markers, opaque=False, change=change)
                finally:
                    close(*child_markers)
                continue
            change = "added" if b is None else (None if _same(u, b) else "changed")
            if stat.S_ISDIR(u.st.st_mode):
                child_opaque = name in hidden or markers.is_opaque(u.dir_fd, u.name, self.xattrs)
                below = None if child_opaque else self._redirected(u, lower_fd, lo)
                child_markers = _child_markers(marker_dirs, name)
                try:
                    yield from self._emit(child, u, None, b, upper=u, lower=below,
                                          marker_dirs=child_markers, opaque=child_opaque,
                                          change=change)
                finally:
                    close(*child_markers)
                continue
            data = u
            if stat.S_ISREG(u.st.st_mode) and markers.has_metacopy(u.dir_fd, u.name, self.xattrs):
                data = self._metacopy_data(child, u, lower_fd, lo)
            yield from self._emit(child, u, data, b, upper=None, lower=None,
                                  marker_dirs=[], opaque=False, change=change)
        for name in sorted(base.keys() - merged_names):
            if not markers.is_whiteout_stat(base[name].st):
                self._remove(path + b"/" + name if path else name, base[name])

    def _emit(self, path: bytes, meta: Source, data: Source | None, base: Source | None, *,
              upper: Source | None, lower: Source | None, marker_dirs: list[int],
              opaque: bool, change: str | None) -> Iterator[Entry]:
        if stat.S_ISSOCK(meta.st.st_mode):
            # A socket cannot be archived: the image has nothing at its path, and the
            # dry run lists what the image will be.
            log.debug("leaving out the socket %s", os.fsdecode(path))
            if base is not None and not stat.S_ISSOCK(base.st.st_mode):
                self._remove(path, base)
            return
        if not stat.S_ISDIR(meta.st.st_mode):
            if stat.S_ISREG(meta.st.st_mode) and data is None:
                data = meta
            yield Entry(path, meta, data, change)
            if base is not None and stat.S_ISDIR(base.st.st_mode):
                self._remove_below(path, base)
            return
        yield Entry(path, meta, None, change)
        up = _open_dir(upper)
        lo = _open_dir(lower)
        same_base = base is not None and lower is not None and base is lower
        ba = lo if same_base else _open_dir(base)
        try:
            if up is None and same_base and not marker_dirs:
                yield from _pristine(path, lo)
            else:
                yield from self._dir(path, up, lo, ba, marker_dirs, opaque=opaque)
        finally:
            close(up, lo, *(() if same_base else (ba,)))

    def _remove(self, path: bytes, base: Source) -> None:
        self.removed.append(path)
        if stat.S_ISDIR(base.st.st_mode):
            self._remove_below(path, base)

    def _remove_below(self, path: bytes, base: Source) -> None:
        fd = _open_dir(base)
        try:
            for name, src in sorted(_listing(fd).items()):
                if not markers.is_whiteout_stat(src.st):
                    self._remove(path + b"/" + name, src)
        finally:
            close(fd)

    def _redirected(self, upper: Source, lower_fd: int | None, same: Source | None
                    ) -> Source | None:
        """The lower folder an upper folder merges with: its redirect's, else its namesake."""
        target = self._redirect(upper)
        if target is None:
            return same if same is not None and stat.S_ISDIR(same.st.st_mode) else None
        absolute, parts = target
        return self._lookup(self._lower_root if absolute else lower_fd, parts, want_dir=True)

    def _metacopy_data(self, path: bytes, upper: Source, lower_fd: int | None,
                       same: Source | None) -> Source:
        target = self._redirect(upper)
        if target is not None:
            absolute, parts = target
            same = self._lookup(self._lower_root if absolute else lower_fd, parts,
                                want_dir=False)
        if same is None or not stat.S_ISREG(same.st.st_mode):
            raise CommitError(
                f"{os.fsdecode(path)}: the overlay holds only its metadata (metacopy) "
                "and the base has no file with its data"
            )
        return same

    def _redirect(self, upper: Source) -> tuple[bool, list[bytes]] | None:
        try:
            return markers.redirect(upper.dir_fd, upper.name, self.xattrs)
        except markers.FormatError as exc:
            raise CommitError(exc.strerror or str(exc)) from None

    def _lookup(self, start: int | None, parts: list[bytes], *, want_dir: bool
                ) -> Source | None:
        """``parts`` below folder ``start``, one component at a time, never through a link."""
        fd = None if start is None else markers.walk(start, parts[:-1])
        if fd is None:
            return None
        try:
            st = syscalls.lstat_at(fd, parts[-1])
        except FileNotFoundError:
            os.close(fd)
            return None
        # The Source must outlive this walk: keep the folder open for the merge.
        self._kept.append(fd)
        if stat.S_ISDIR(st.st_mode) != want_dir:
            return None
        return Source(fd, parts[-1], st)

    _kept: list[int]

    def __enter__(self) -> Merge:
        self._kept = []
        return self

    def __exit__(self, *exc: object) -> None:
        close(*self._kept)


def changes(upper: Path, lower: Path) -> Changes:
    """What applying ``upper`` to ``lower`` adds, changes and removes (paths from /)."""
    added, changed = [], []
    with Merge(upper, lower) as merge:
        for entry in merge.entries():
            if entry.change == "added":
                added.append("/" + os.fsdecode(entry.path))
            elif entry.change == "changed":
                changed.append("/" + os.fsdecode(entry.path))
        removed = ["/" + os.fsdecode(p) for p in merge.removed]
    return Changes(added=added, changed=changed, removed=sorted(removed))


def outer_entries(tree: Path) -> Iterator[Entry]:
    """An extended image's tree beside its ``rootfs/``, as it is (its root first)."""
    fd = os.open(tree, syscalls.DIR_FLAGS)
    try:
        yield Entry(b"", Source(fd, b".", os.stat(fd)), None, None)
        yield from _pristine(b"", fd, skip=frozenset({b"rootfs"}))
    finally:
        os.close(fd)
