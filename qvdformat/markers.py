"""Whiteouts, opaque directories, redirects and metadata-only copies, in both on-disk formats.

Kernel overlayfs format (what qvdfs writes by default):
- a whiteout is a character device 0/0 carrying the deleted name;
- a directory whose lower contents are hidden carries ``trusted.overlay.opaque=y``;
- a file whose data still lives in a lower branch carries ``trusted.overlay.metacopy``;
- a directory renamed by overlayfs with ``redirect_dir=on`` carries
  ``trusted.overlay.redirect``, the path of its lower part (read, never written), absolute
  from the layer roots (starting with ``/``) or a sibling's name.

The xattrs live under ``trusted.`` (``TRUSTED``), which only root may read or write. Kernel
overlayfs' ``userxattr`` option puts the same names under ``user.overlay.`` (``USER``),
which any owner may set: an unprivileged reader or writer of branches (the fast tests) uses
that.

unionfs-fuse format (read always, written with ``-o whiteout=unionfs``): a deletion of
``a/b`` in a writable branch is an empty file ``.unionfs-fuse/a/b_HIDDEN~`` (a folder of
that name for a directory); ``.unionfs/`` is the 2.x name of the same folder. A marker
hides the name in all lower branches; a marker beside a real entry in the same branch
makes that entry opaque (it was recreated after a delete).

Nothing here is reachable from inside a qvdfs union: its overlay xattrs are filtered by the
xattr handlers, a 0/0 device cannot be created through it, and the metadata folders are
hidden names of the branch root.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import shutil
import stat

from qvdformat import syscalls

UNIONFS_META_DIRS = (b".unionfs-fuse", b".unionfs")
UNIONFS_WRITE_DIR = b".unionfs-fuse"
HIDDEN_SUFFIX = b"_HIDDEN~"
WORK_DIR = b".qvdfs.work"

# Names at the root of every branch that belong to the union's bookkeeping.
RESERVED_ROOT_NAMES = frozenset({WORK_DIR, *UNIONFS_META_DIRS})

_ABSENT = (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP)


@dataclasses.dataclass(frozen=True)
class OverlayXattrs:
    """The names of overlayfs' xattrs under one namespace prefix."""

    prefix: bytes

    @property
    def opaque(self) -> bytes:
        return self.prefix + b"opaque"

    @property
    def metacopy(self) -> bytes:
        return self.prefix + b"metacopy"

    @property
    def redirect(self) -> bytes:
        return self.prefix + b"redirect"


TRUSTED = OverlayXattrs(b"trusted.overlay.")
USER = OverlayXattrs(b"user.overlay.")


class FormatError(OSError):
    """A marker no union writes (a redirect out of the layers); errno EIO."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)


def is_whiteout_stat(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _xattr(dir_fd: int, name: bytes, key: bytes) -> bytes | None:
    try:
        return syscalls.getxattr_at(dir_fd, name, key)
    except OSError as exc:
        if exc.errno in _ABSENT:
            return None
        raise


def is_opaque(dir_fd: int, name: bytes, xattrs: OverlayXattrs) -> bool:
    """Whether the directory ``name`` in ``dir_fd`` (``b"."``: ``dir_fd`` itself) hides
    what lower branches have at its path."""
    return _xattr(dir_fd, name, xattrs.opaque) == b"y"


def set_opaque(parent_fd: int, name: bytes, xattrs: OverlayXattrs) -> None:
    syscalls.setxattr_at(parent_fd, name, xattrs.opaque, b"y")


def has_metacopy(parent_fd: int, name: bytes, xattrs: OverlayXattrs) -> bool:
    return _xattr(parent_fd, name, xattrs.metacopy) is not None


def redirect(parent_fd: int, name: bytes, xattrs: OverlayXattrs
             ) -> tuple[bool, list[bytes]] | None:
    """Where the lower part of a renamed upper entry is (kernel ``redirect_dir``), or None.

    Returns (absolute, components): absolute from the layer roots, else relative to the
    lower folder that stands where the entry's parent is.

    Raises:
        FormatError: a redirect that climbs (``..``) or names nothing.
    """
    target = _xattr(parent_fd, name, xattrs.redirect)
    if target is None:
        return None
    parts = [p for p in target.split(b"/") if p]
    if not parts or any(p in (b".", b"..") for p in parts):
        raise FormatError(f"bad overlay redirect {target!r} on {name!r}")
    return target.startswith(b"/"), parts


def make_whiteout(parent_fd: int, name: bytes) -> None:
    os.mknod(name, stat.S_IFCHR | 0o000, 0, dir_fd=parent_fd)


def walk(fd: int, parts: list[bytes], *, create: bool = False) -> int | None:
    """Open the folder ``parts`` below ``fd`` one component at a time; None if absent."""
    current = os.dup(fd)
    try:
        for part in parts:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o700, dir_fd=current)
            nxt = syscalls.open_dir_if_any(current, part)
            if nxt is None:
                return None
            os.close(current)
            current = nxt
        result, current = current, -1
        return result
    finally:
        if current != -1:
            os.close(current)


def unionfs_hidden_in(marker_fd: int) -> set[bytes]:
    """The names the unionfs-fuse markers in the open marker folder ``marker_fd`` hide."""
    hidden = set()
    for name in os.listdir(marker_fd):
        raw = os.fsencode(name)
        if raw.endswith(HIDDEN_SUFFIX) and len(raw) > len(HIDDEN_SUFFIX):
            hidden.add(raw[: -len(HIDDEN_SUFFIX)])
    return hidden


def unionfs_hidden(meta_fds: list[int], parts: list[bytes]) -> set[bytes]:
    """Names hidden by unionfs-fuse markers for the directory ``parts`` of one branch."""
    hidden: set[bytes] = set()
    for meta_fd in meta_fds:
        fd = walk(meta_fd, parts)
        if fd is None:
            continue
        try:
            hidden |= unionfs_hidden_in(fd)
        finally:
            os.close(fd)
    return hidden


def unionfs_meta_fds(root_fd: int) -> list[int]:
    """The unionfs-fuse metadata folders a branch root has, opened."""
    found = (syscalls.open_dir_if_any(root_fd, meta) for meta in UNIONFS_META_DIRS)
    return [fd for fd in found if fd is not None]


def unionfs_hide(root_fd: int, parts: list[bytes], name: bytes) -> None:
    """Write the unionfs-fuse marker hiding ``parts/name`` below this branch."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(UNIONFS_WRITE_DIR, 0o700, dir_fd=root_fd)
    meta = syscalls.open_dir(root_fd, UNIONFS_WRITE_DIR)
    try:
        fd = walk(meta, parts, create=True)
        if fd is None:
            raise OSError(errno.EIO, "cannot create unionfs-fuse marker folder")
        try:
            marker = name + HIDDEN_SUFFIX
            with contextlib.suppress(FileExistsError):
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600, dir_fd=fd))
        finally:
            os.close(fd)
    finally:
        os.close(meta)


def unionfs_unhide(meta_fds: list[int], parts: list[bytes], name: bytes) -> None:
    """Remove every unionfs-fuse marker of ``parts/name`` in one branch."""
    for meta_fd in meta_fds:
        fd = walk(meta_fd, parts)
        if fd is None:
            continue
        try:
            marker = name + HIDDEN_SUFFIX
            try:
                st = syscalls.lstat_at(fd, marker)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(marker, dir_fd=fd)
            else:
                os.unlink(marker, dir_fd=fd)
        finally:
            os.close(fd)
