"""Whiteouts, opaque directories and metadata-only copies, in both on-disk formats.

Kernel overlayfs format (what qvdfs writes by default):
- a whiteout is a character device 0/0 carrying the deleted name;
- a directory whose lower contents are hidden carries ``trusted.overlay.opaque=y``;
- a file whose data still lives in a lower branch carries ``trusted.overlay.metacopy``;
- a directory renamed by overlayfs with ``redirect_dir=on`` carries
  ``trusted.overlay.redirect``, the path of its lower part (read, never written).

unionfs-fuse format (read always, written with ``-o whiteout=unionfs``): a deletion of
``a/b`` in a writable branch is an empty file ``.unionfs-fuse/a/b_HIDDEN~`` (a folder of
that name for a directory); ``.unionfs/`` is the 2.x name of the same folder. A marker
hides the name in all lower branches; a marker beside a real entry in the same branch
makes that entry opaque (it was recreated after a delete).

Nothing here is reachable from inside the union: the ``trusted.overlay.*`` namespace is
filtered by the xattr handlers, a 0/0 device cannot be created through the union, and
the metadata folders are hidden names of the branch root.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat

from qvdfs.union import syscalls

OVERLAY_XATTR_PREFIX = b"trusted.overlay."
OPAQUE_XATTR = b"trusted.overlay.opaque"
METACOPY_XATTR = b"trusted.overlay.metacopy"
REDIRECT_XATTR = b"trusted.overlay.redirect"

UNIONFS_META_DIRS = (b".unionfs-fuse", b".unionfs")
UNIONFS_WRITE_DIR = b".unionfs-fuse"
HIDDEN_SUFFIX = b"_HIDDEN~"
WORK_DIR = b".qvdfs.work"

# Names at the root of every branch that belong to the union's bookkeeping.
RESERVED_ROOT_NAMES = frozenset({WORK_DIR, *UNIONFS_META_DIRS})

_ABSENT = (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP)


def is_whiteout_stat(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_opaque(dirfd: int) -> bool:
    try:
        return os.getxattr(syscalls.proc_fd(dirfd), OPAQUE_XATTR) == b"y"
    except OSError as exc:
        if exc.errno in _ABSENT:
            return False
        raise


def set_opaque(parent_fd: int, name: bytes) -> None:
    syscalls.setxattr_at(parent_fd, name, OPAQUE_XATTR, b"y")


def has_metacopy(parent_fd: int, name: bytes) -> bool:
    try:
        syscalls.getxattr_at(parent_fd, name, METACOPY_XATTR)
        return True
    except OSError as exc:
        if exc.errno in _ABSENT:
            return False
        raise


def redirect(parent_fd: int, name: bytes) -> bytes | None:
    """The lower path a renamed upper directory merges with (kernel ``redirect_dir``).

    Absolute (from the layer roots, starting with ``/``) or a sibling name.
    """
    try:
        return syscalls.getxattr_at(parent_fd, name, REDIRECT_XATTR)
    except OSError as exc:
        if exc.errno in _ABSENT:
            return None
        raise


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
            try:
                nxt = syscalls.open_dir(current, part)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    return None
                raise
            os.close(current)
            current = nxt
        result, current = current, -1
        return result
    finally:
        if current != -1:
            os.close(current)


def unionfs_hidden(meta_fds: list[int], parts: list[bytes]) -> set[bytes]:
    """Names hidden by unionfs-fuse markers for the directory ``parts`` of one branch."""
    hidden: set[bytes] = set()
    for meta_fd in meta_fds:
        fd = walk(meta_fd, parts)
        if fd is None:
            continue
        try:
            for entry in os.scandir(fd):
                name = os.fsencode(entry.name)
                if name.endswith(HIDDEN_SUFFIX) and len(name) > len(HIDDEN_SUFFIX):
                    hidden.add(name[: -len(HIDDEN_SUFFIX)])
        finally:
            os.close(fd)
    return hidden


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
