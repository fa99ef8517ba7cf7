"""``di commit``'s file half: a VM's base with its overlay applied, as a new image tarball.

The overlay may have been written by any of the node's unions, so both formats
the unions use are read (SPEC §3), with the meaning qvdfs and kernel overlayfs
give them:

- a 0/0 character device hides the lower entry of its name; a directory with
  ``trusted.overlay.opaque=y`` hides the whole lower directory; a file with
  ``trusted.overlay.metacopy`` has its metadata in the overlay and its data in
  the lower file; ``trusted.overlay.redirect`` names the lower directory a
  renamed directory merges with;
- unionfs-fuse's ``.unionfs-fuse/<dir>/<name>_HIDDEN~`` (or ``.unionfs/``) hides
  ``<dir>/<name>`` below; beside a real entry in the overlay it makes that entry
  opaque (it was recreated after a delete).

These names are format facts shared with ``qvdfs/union/markers.py``; qvdctl
keeps its own copy because the two packages never import each other.

Both trees are written by an image and by a container, and this runs as root:
every access starts from a directory descriptor opened here and names one
component with ``O_NOFOLLOW``; files are opened as ``O_PATH``, checked to be
regular, then reopened through ``/proc/self/fd``, so nothing in either tree can
lead the commit to a host path, a FIFO or a device. Sockets cannot be archived
and are left out; the union's own bookkeeping (``trusted.overlay.*``, the
marker folders, ``.qvdfs.work``) never reaches the image.

The tarball (pax, gzip) is written by libarchive, which qvdctl already uses to
read images: numeric owners, modes, times (ns), xattrs, POSIX ACLs (as the
archive's ACL entries, which is all libarchive's extraction restores), hard
links (one inode seen twice in the merged tree), symlinks and device nodes, so
extracting it gives back the tree the VM saw. libarchive-c has no setters for
symlink and hard-link targets, xattrs or ACL entries, so the four C functions
are bound here. The file
is written under a temporary name, fsynced and linked into place only when
complete; any failure removes it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import hashlib
import logging
import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libarchive.ffi as ffi
from libarchive.entry import new_archive_entry
from libarchive.exception import ArchiveError
from libarchive.write import new_archive_write

from qvdctl.errors import QvdError

log = logging.getLogger(__name__)

OVERLAY_XATTR_PREFIX = b"trusted.overlay."
OPAQUE_XATTR = b"trusted.overlay.opaque"
METACOPY_XATTR = b"trusted.overlay.metacopy"
REDIRECT_XATTR = b"trusted.overlay.redirect"
UNIONFS_META_DIRS = (b".unionfs-fuse", b".unionfs")
HIDDEN_SUFFIX = b"_HIDDEN~"
# The overlay root's bookkeeping names: never part of the image.
RESERVED_ROOT_NAMES = frozenset({b".qvdfs.work", *UNIONFS_META_DIRS})

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_ABSENT = (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP)
CHUNK = 1 << 20

_lib = ffi.libarchive
_lib.archive_entry_copy_symlink.argtypes = [ffi.c_archive_entry_p, ctypes.c_char_p]
_lib.archive_entry_copy_hardlink.argtypes = [ffi.c_archive_entry_p, ctypes.c_char_p]
_lib.archive_entry_xattr_add_entry.argtypes = [
    ffi.c_archive_entry_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t,
]
_lib.archive_entry_acl_add_entry.argtypes = [
    ffi.c_archive_entry_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
    ctypes.c_char_p,
]

# POSIX ACLs travel as ACL entries, never as their xattrs: libarchive's extraction skips
# the system.posix_acl_* xattrs and restores only the archive's ACLs (SCHILY.acl.*).
# The kernel's xattr form (linux/posix_acl_xattr.h): a version word, then one
# (tag, perm, id) per entry; the perm bits (r=4, w=2, x=1) are libarchive's too.
ACL_XATTRS = {
    b"system.posix_acl_access": 0x100,  # ARCHIVE_ENTRY_ACL_TYPE_ACCESS
    b"system.posix_acl_default": 0x200,  # ARCHIVE_ENTRY_ACL_TYPE_DEFAULT
}
ACL_XATTR_VERSION = 2
ACL_ENTRY = struct.Struct("<HHI")
# The kernel's ACL_USER_OBJ ... ACL_OTHER, as libarchive's ARCHIVE_ENTRY_ACL_* tags.
ACL_TAGS = {0x01: 10002, 0x02: 10001, 0x04: 10004, 0x08: 10003, 0x10: 10005, 0x20: 10006}
ACL_NAMED = (0x02, 0x08)  # ACL_USER, ACL_GROUP: the only ones whose id means something


class CommitError(QvdError):
    """The overlay or the base cannot be merged (a broken metacopy, an unreadable entry)."""


@dataclasses.dataclass(frozen=True)
class Source:
    """One entry of one layer: its parent folder's descriptor, its name and its lstat."""

    dir_fd: int
    name: bytes
    st: os.stat_result

    def xattrs(self) -> dict[bytes, bytes]:
        """Its extended attributes, without the union's ``trusted.overlay.*``."""
        return {k: v for k, v in _xattrs(self.dir_fd, self.name).items()
                if not k.startswith(OVERLAY_XATTR_PREFIX)}


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


def _at(dir_fd: int, name: bytes) -> bytes:
    # The kernel resolves the folder from its descriptor, then the one name in it.
    return b"/proc/self/fd/%d/%s" % (dir_fd, name)


def _xattrs(dir_fd: int, name: bytes) -> dict[bytes, bytes]:
    path = _at(dir_fd, name)
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in _ABSENT:
            return {}
        raise
    values = {}
    for key in names:
        try:
            values[os.fsencode(key)] = os.getxattr(path, key, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in _ABSENT:
                raise
    return values


def _xattr(source: Source, key: bytes) -> bytes | None:
    try:
        return os.getxattr(_at(source.dir_fd, source.name), key, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in _ABSENT:
            return None
        raise


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _listing(dir_fd: int | None, *, skip: frozenset[bytes] = frozenset()) -> dict[bytes, Source]:
    if dir_fd is None:
        return {}
    found = {}
    for name in os.listdir(dir_fd):
        raw = os.fsencode(name)
        if raw not in skip:
            found[raw] = Source(dir_fd, raw, os.stat(raw, dir_fd=dir_fd, follow_symlinks=False))
    return found


def _open_dir(source: Source | None) -> int | None:
    if source is None or not stat.S_ISDIR(source.st.st_mode):
        return None
    return os.open(source.name, DIR_FLAGS, dir_fd=source.dir_fd)


def _open_child_dir(dir_fd: int, name: bytes) -> int | None:
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        raise


def _close(*fds: int | None) -> None:
    for fd in fds:
        if fd is not None:
            os.close(fd)


def _hidden(marker_fds: list[int]) -> set[bytes]:
    names = set()
    for fd in marker_fds:
        for name in os.listdir(fd):
            raw = os.fsencode(name)
            if raw.endswith(HIDDEN_SUFFIX) and len(raw) > len(HIDDEN_SUFFIX):
                names.add(raw[: -len(HIDDEN_SUFFIX)])
    return names


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
        if _is_whiteout(src.st) or stat.S_ISSOCK(src.st.st_mode):
            continue
        child = path + b"/" + name if path else name
        if stat.S_ISDIR(src.st.st_mode):
            yield Entry(child, src, None, None)
            sub = _open_dir(src)
            try:
                yield from _pristine(child, sub)
            finally:
                _close(sub)
        else:
            yield Entry(child, src, src if stat.S_ISREG(src.st.st_mode) else None, None)


class Merge:
    """The merged tree of ``lower`` (the base) under ``upper`` (the overlay), walked once.

    ``entries()`` yields every entry of the merged tree, parents first;
    ``removed`` then holds the base paths the overlay hides.
    """

    def __init__(self, upper: Path, lower: Path) -> None:
        self.upper = upper
        self.lower = lower
        self.removed: list[bytes] = []

    def entries(self) -> Iterator[Entry]:
        upper_fd = os.open(self.upper, DIR_FLAGS)
        lower_fd = os.open(self.lower, DIR_FLAGS)
        self._lower_root = lower_fd
        markers = [fd for fd in (_open_child_dir(upper_fd, m) for m in UNIONFS_META_DIRS)
                   if fd is not None]
        try:
            # The root's metadata is the image's: the overlay folder itself is qvdctl's.
            root = Source(lower_fd, b".", os.stat(lower_fd))
            yield Entry(b"", root, None, None)
            yield from self._dir(b"", upper_fd, lower_fd, lower_fd, markers, opaque=False)
        finally:
            _close(upper_fd, lower_fd, *markers)

    def _dir(self, path: bytes, upper_fd: int | None, lower_fd: int | None,
             base_fd: int | None, markers: list[int], *, opaque: bool) -> Iterator[Entry]:
        """The merged contents of folder ``path``.

        ``lower_fd``: the lower folder merged here (None: opaque or none);
        ``base_fd``: the base's folder at the same path, for the change list
        (differs from ``lower_fd`` only under a redirect); ``markers``: the
        unionfs-fuse marker folders for ``path``.
        """
        upper = _listing(upper_fd, skip=RESERVED_ROOT_NAMES if path == b"" else frozenset())
        lower = {} if opaque else _listing(lower_fd)
        hidden = _hidden(markers)
        base = lower if base_fd == lower_fd and not opaque else _listing(base_fd)
        merged_names = set()
        for name in sorted(upper.keys() | lower.keys()):
            u, lo = upper.get(name), lower.get(name)
            if lo is not None and (name in hidden or _is_whiteout(lo.st)):
                lo = None
            if u is not None and _is_whiteout(u.st):
                continue
            if u is None and lo is None:
                continue
            merged_names.add(name)
            child = path + b"/" + name if path else name
            b = base.get(name)
            if b is not None and _is_whiteout(b.st):
                b = None
            if u is None:
                assert lo is not None
                # Not in the overlay: the base's own entry (and, if the base is the lower
                # here and no unionfs-fuse marker hides anything below, its whole subtree
                # unchanged). unionfs-fuse deletes lower/a/b with only a marker in
                # .unionfs-fuse/a/, never making the overlay's a/.
                change = None if b is lo else ("changed" if b is not None else "added")
                child_markers = [fd for fd in (_open_child_dir(m, name) for m in markers)
                                 if fd is not None] if stat.S_ISDIR(lo.st.st_mode) else []
                try:
                    yield from self._emit(child, lo, lo, b, upper=None, lower=lo,
                                          markers=child_markers, opaque=False, change=change)
                finally:
                    _close(*child_markers)
                continue
            change = "added" if b is None else (None if _same(u, b) else "changed")
            if stat.S_ISDIR(u.st.st_mode):
                child_opaque = name in hidden or _xattr(u, OPAQUE_XATTR) == b"y"
                below = None if child_opaque else self._redirected(u, lower_fd, lo)
                child_markers = [fd for fd in (_open_child_dir(m, name) for m in markers)
                                 if fd is not None]
                try:
                    yield from self._emit(child, u, None, b, upper=u, lower=below,
                                          markers=child_markers, opaque=child_opaque,
                                          change=change)
                finally:
                    _close(*child_markers)
                continue
            data = u
            if stat.S_ISREG(u.st.st_mode) and _xattr(u, METACOPY_XATTR) is not None:
                data = self._metacopy_data(child, u, lower_fd, lo)
            yield from self._emit(child, u, data, b, upper=None, lower=None,
                                  markers=[], opaque=False, change=change)
        for name in sorted(base.keys() - merged_names):
            if not _is_whiteout(base[name].st):
                self._remove(path + b"/" + name if path else name, base[name])

    def _emit(self, path: bytes, meta: Source, data: Source | None, base: Source | None, *,
              upper: Source | None, lower: Source | None, markers: list[int],
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
            if up is None and same_base and not markers:
                yield from _pristine(path, lo)
            else:
                yield from self._dir(path, up, lo, ba, markers, opaque=opaque)
        finally:
            _close(up, lo, *(() if same_base else (ba,)))

    def _remove(self, path: bytes, base: Source) -> None:
        self.removed.append(path)
        if stat.S_ISDIR(base.st.st_mode):
            self._remove_below(path, base)

    def _remove_below(self, path: bytes, base: Source) -> None:
        fd = _open_dir(base)
        try:
            for name, src in sorted(_listing(fd).items()):
                if not _is_whiteout(src.st):
                    self._remove(path + b"/" + name, src)
        finally:
            _close(fd)

    def _redirected(self, upper: Source, lower_fd: int | None, same: Source | None
                    ) -> Source | None:
        """The lower folder an upper folder merges with: its redirect's, else its namesake."""
        target = _xattr(upper, REDIRECT_XATTR)
        if target is None:
            return same if same is not None and stat.S_ISDIR(same.st.st_mode) else None
        parts = [p for p in target.split(b"/") if p]
        if not parts or any(p in (b".", b"..") for p in parts):
            raise CommitError(f"bad overlay redirect {target!r} on {upper.name!r}")
        start = self._lower_root if target.startswith(b"/") else lower_fd
        return self._lookup(start, parts, want_dir=True)

    def _metacopy_data(self, path: bytes, upper: Source, lower_fd: int | None,
                       same: Source | None) -> Source:
        target = _xattr(upper, REDIRECT_XATTR)
        if target is not None:
            parts = [p for p in target.split(b"/") if p]
            start = self._lower_root if target.startswith(b"/") else lower_fd
            same = self._lookup(start, parts, want_dir=False) if parts else None
        if same is None or not stat.S_ISREG(same.st.st_mode):
            raise CommitError(
                f"{os.fsdecode(path)}: the overlay holds only its metadata (metacopy) "
                "and the base has no file with its data"
            )
        return same

    def _lookup(self, start: int | None, parts: list[bytes], *, want_dir: bool
                ) -> Source | None:
        """``parts`` below folder ``start``, one component at a time, never through a link."""
        if start is None:
            return None
        fd = os.dup(start)
        try:
            for part in parts[:-1]:
                nxt = _open_child_dir(fd, part)
                if nxt is None:
                    return None
                os.close(fd)
                fd = nxt
            try:
                st = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                return None
            if stat.S_ISDIR(st.st_mode) != want_dir:
                return None
            # The Source must outlive this walk: keep the folder open for the merge.
            keep, fd = fd, -1
            self._kept.append(keep)
            return Source(keep, parts[-1], st)
        finally:
            if fd != -1:
                os.close(fd)

    _kept: list[int]

    def __enter__(self) -> Merge:
        self._kept = []
        return self

    def __exit__(self, *exc: object) -> None:
        _close(*self._kept)


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


@dataclasses.dataclass(frozen=True)
class WrittenImage:
    path: Path
    sha256: str
    size: int
    entries: int


def write_image(upper: Path, lower: Path, dest: Path, *, outer: Path | None = None
                ) -> WrittenImage:
    """Write the merged tree of ``upper`` over ``lower`` as the tarball ``dest``.

    ``outer``: an extended image's extracted tree, whose root ``lower`` is its
    ``rootfs/``; what lies beside ``rootfs/`` is kept as it is and the merged root
    goes under ``rootfs/`` again. ``dest`` must not exist; it appears only
    complete and flushed to disk.

    Raises:
        QvdError: the trees cannot be merged, or writing failed (nothing is left behind).
    """
    tmp = dest.with_name(f".tmp-{dest.name}.{os.getpid()}")
    count = 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with Merge(upper, lower) as merge, new_archive_write("pax", "gzip") as archive:
                ffi.write_open_fd(archive, fd)
                links: dict[tuple[int, int], bytes] = {}
                prefix = b""
                if outer is not None:
                    for entry in _outer_entries(outer):
                        _write_entry(archive, entry, b"", links)
                        count += 1
                    prefix = b"rootfs/"
                for entry in merge.entries():
                    _write_entry(archive, entry, prefix, links)
                    count += 1
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, dest)
    except FileExistsError:
        raise QvdError(f"{dest} already exists") from None
    except QvdError:
        raise
    except OSError as exc:
        where = f": {os.fsdecode(exc.filename)}" if exc.filename else ""
        raise QvdError(f"writing {dest.name} failed: {exc.strerror or exc}{where}") from None
    except ArchiveError as exc:
        why = getattr(exc, "msg", None) or str(exc)
        if getattr(exc, "errno", None):
            why = f"{why}: {os.strerror(exc.errno)}"
        raise QvdError(f"writing {dest.name} failed: {why}") from None
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(dest.parent)
    digest = hashlib.sha256()
    with open(dest, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    log.info("wrote %s (%d entries)", dest, count)
    return WrittenImage(dest, digest.hexdigest(), dest.stat().st_size, count)


def _outer_entries(tree: Path) -> Iterator[Entry]:
    fd = os.open(tree, DIR_FLAGS)
    try:
        yield Entry(b"", Source(fd, b".", os.stat(fd)), None, None)
        yield from _pristine(b"", fd, skip=frozenset({b"rootfs"}))
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, DIR_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_entry(archive: Any, entry: Entry, prefix: bytes,
                 links: dict[tuple[int, int], bytes]) -> None:
    st = entry.meta.st
    name = prefix + entry.path if entry.path else (prefix or b".")
    with new_archive_entry() as e:
        ffi.entry_copy_pathname(e, name)
        ffi.entry_set_filetype(e, stat.S_IFMT(st.st_mode))
        ffi.entry_set_perm(e, stat.S_IMODE(st.st_mode))
        ffi.entry_set_uid(e, st.st_uid)
        ffi.entry_set_gid(e, st.st_gid)
        ffi.entry_set_mtime(e, st.st_mtime_ns // 10**9, st.st_mtime_ns % 10**9)
        ffi.entry_set_atime(e, st.st_atime_ns // 10**9, st.st_atime_ns % 10**9)
        for xattr, value in entry.meta.xattrs().items():
            if xattr in ACL_XATTRS:
                _add_acl(e, ACL_XATTRS[xattr], value, entry.path)
            else:
                _lib.archive_entry_xattr_add_entry(e, xattr, value, len(value))
        data = None
        if stat.S_ISLNK(st.st_mode):
            _lib.archive_entry_copy_symlink(e, os.readlink(entry.meta.name,
                                                           dir_fd=entry.meta.dir_fd))
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            ffi.entry_set_rdevmajor(e, os.major(st.st_rdev))
            ffi.entry_set_rdevminor(e, os.minor(st.st_rdev))
        elif stat.S_ISREG(st.st_mode):
            key = (st.st_dev, st.st_ino)
            first = links.get(key) if st.st_nlink > 1 else None
            if first is not None:
                _lib.archive_entry_copy_hardlink(e, first)
                ffi.entry_set_size(e, 0)
            else:
                if st.st_nlink > 1:
                    links[key] = name
                assert entry.data is not None
                data = _open_regular(entry.data)
                ffi.entry_set_size(e, os.fstat(data).st_size)
        try:
            ffi.write_header(archive, e)
            if data is not None:
                _copy_data(archive, data, entry)
            ffi.write_finish_entry(archive)
        finally:
            _close(data)


def _add_acl(e: Any, kind: int, value: bytes, path: bytes) -> None:
    """Add the ACL of xattr form ``value`` to archive entry ``e`` as ``kind`` (access/default)."""
    body = value[4:]
    if (len(value) < 4 or int.from_bytes(value[:4], "little") != ACL_XATTR_VERSION
            or len(body) % ACL_ENTRY.size):
        raise CommitError(f"/{os.fsdecode(path)}: an ACL the kernel did not write")
    for tag, perm, id_ in ACL_ENTRY.iter_unpack(body):
        if tag not in ACL_TAGS:
            raise CommitError(f"/{os.fsdecode(path)}: an ACL entry of unknown tag {tag:#x}")
        qualifier = id_ if tag in ACL_NAMED else -1
        _lib.archive_entry_acl_add_entry(e, kind, perm & 0o7, ACL_TAGS[tag], qualifier, None)


def _open_regular(source: Source) -> int:
    """Open a regular file for reading without ever opening anything else.

    An ``O_PATH`` descriptor opens nothing; once it is known to be a regular file,
    reopening it through ``/proc`` reads that very inode.
    """
    path_fd = os.open(source.name, PATH_FLAGS, dir_fd=source.dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(path_fd).st_mode):
            raise CommitError(f"{os.fsdecode(source.name)} changed while being committed")
        return os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(path_fd)


def _copy_data(archive: Any, fd: int, entry: Entry) -> None:
    expected = os.fstat(fd).st_size
    done = 0
    while chunk := os.read(fd, CHUNK):
        ffi.write_data(archive, chunk, len(chunk))
        done += len(chunk)
    if done != expected:
        raise CommitError(f"/{os.fsdecode(entry.path)} changed size while being committed")
