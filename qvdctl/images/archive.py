"""``di commit``'s writing half: a merged tree as a pax tarball, through libarchive.

libarchive (which qvdctl already uses to read images) writes numeric owners, modes, times
(ns), xattrs, POSIX ACLs (as the archive's ACL entries, which is all libarchive's extraction
restores), hard links (one inode seen twice in the merged tree), symlinks and device nodes,
so extracting the tarball gives back the tree the VM saw. libarchive-c has no setters for
symlink and hard-link targets, xattrs or ACL entries, so the four C functions are bound
here.

Regular files are opened as ``O_PATH``, checked to be regular, then reopened through
``/proc/self/fd``, so nothing in either tree can lead the commit to a FIFO or a device.
"""

from __future__ import annotations

import ctypes
import os
import stat
import struct
from collections.abc import Iterable
from typing import Any

import libarchive.ffi as ffi
from libarchive.entry import new_archive_entry
from libarchive.write import new_archive_write

from qvdctl.images.merge import CommitError, Entry, Source, close
from qvdformat import syscalls

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


def write_tarball(fd: int, entries: Iterable[tuple[bytes, Entry]]) -> int:
    """Write ``entries`` (each under a path prefix) to ``fd`` as a gzipped pax tarball;
    return how many were written."""
    count = 0
    with new_archive_write("pax", "gzip") as archive:
        ffi.write_open_fd(archive, fd)
        links: dict[tuple[int, int], bytes] = {}
        for prefix, entry in entries:
            _write_entry(archive, entry, prefix, links)
            count += 1
    return count


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
            close(data)


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
    path_fd = os.open(source.name, syscalls.PATH_FLAGS, dir_fd=source.dir_fd)
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
