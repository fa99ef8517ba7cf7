"""Directory-relative system calls that never follow a symlink inside a branch.

The qvdfs daemon and ``di commit`` run as root on the host while the branches hold files
an image or a container wrote. Every access therefore starts from a directory file descriptor
the daemon opened itself and names one path component at a time, so neither a
symlink nor a ``..`` inside a branch can lead it to a host path outside.

Two tricks need explaining:

- ``at_path(dirfd, name)`` is ``/proc/self/fd/<dirfd>/<name>``: the kernel jumps
  to the directory the fd refers to and looks ``name`` up inside it. Used with
  ``follow_symlinks=False`` it gives race-free access for calls that have no
  ``*at`` form in Python (xattrs, chmod).
- ``renameat2`` is not in the ``os`` module; ``RENAME_EXCHANGE`` is what makes
  replacing a directory by a whiteout atomic.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def check_name(name: bytes) -> bytes:
    """Return ``name`` if it is one path component; raise EINVAL otherwise."""
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise OSError(errno.EINVAL, f"not a file name: {name!r}")
    if len(name) > 255:
        raise OSError(errno.ENAMETOOLONG, "file name too long")
    return name


def open_dir(dirfd: int, name: bytes) -> int:
    """Open the directory ``name`` inside ``dirfd`` for reading, refusing symlinks."""
    return os.open(name, DIR_FLAGS, dir_fd=dirfd)


def open_dir_if_any(dirfd: int, name: bytes) -> int | None:
    """``open_dir``, or None where ``name`` is absent or no directory (a symlink included)."""
    try:
        return open_dir(dirfd, name)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        raise


def renameat2(old_dirfd: int, old: bytes, new_dirfd: int, new: bytes, flags: int = 0) -> None:
    if _libc.renameat2(old_dirfd, old, new_dirfd, new, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with its mode bits (os.posix_fallocate has none)."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def proc_fd(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def at_path(dirfd: int, name: bytes) -> bytes:
    return b"/proc/self/fd/%d/%s" % (dirfd, name)


def lstat_at(dirfd: int, name: bytes) -> os.stat_result:
    return os.stat(name, dir_fd=dirfd, follow_symlinks=False)


def chmod_at(dirfd: int, name: bytes, mode: int) -> None:
    """chmod without following a symlink (Linux cannot chmod a symlink itself)."""
    fd = os.open(name, PATH_FLAGS, dir_fd=dirfd)
    try:
        if stat.S_ISLNK(os.fstat(fd).st_mode):
            raise OSError(errno.EOPNOTSUPP, "cannot chmod a symlink")
        # The magic link resolves to the very object fd holds, which is no symlink.
        os.chmod(proc_fd(fd), mode)
    finally:
        os.close(fd)


def getxattr_at(dirfd: int, name: bytes, attr: bytes) -> bytes:
    return os.getxattr(at_path(dirfd, name), attr, follow_symlinks=False)


def setxattr_at(dirfd: int, name: bytes, attr: bytes, value: bytes, flags: int = 0) -> None:
    os.setxattr(at_path(dirfd, name), attr, value, flags, follow_symlinks=False)


def listxattr_at(dirfd: int, name: bytes) -> list[str]:
    return os.listxattr(at_path(dirfd, name), follow_symlinks=False)


def removexattr_at(dirfd: int, name: bytes, attr: bytes) -> None:
    os.removexattr(at_path(dirfd, name), attr, follow_symlinks=False)


def xattrs_at(dirfd: int, name: bytes, *, skip: bytes = b"") -> dict[bytes, bytes]:
    """Every extended attribute of ``name`` except those starting with ``skip``."""
    try:
        names = listxattr_at(dirfd, name)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    values = {}
    for attr in names:
        battr = os.fsencode(attr)
        if skip and battr.startswith(skip):
            continue
        try:
            values[battr] = getxattr_at(dirfd, name, battr)
        except OSError as exc:
            if exc.errno != errno.ENODATA:  # removed meanwhile
                raise
    return values


def copy_xattrs(src_dirfd: int, src: bytes, dst_dirfd: int, dst: bytes, *, skip: bytes = b"") -> None:
    """Copy every extended attribute except those starting with ``skip``."""
    for attr, value in xattrs_at(src_dirfd, src, skip=skip).items():
        setxattr_at(dst_dirfd, dst, attr, value)


def remove_at(dirfd: int, name: bytes | str) -> None:
    """Remove ``name`` inside ``dirfd``, a whole tree if it is a directory (no symlink followed)."""
    if stat.S_ISDIR(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode):
        shutil.rmtree(name, dir_fd=dirfd)
    else:
        os.unlink(name, dir_fd=dirfd)
