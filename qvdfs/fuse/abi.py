"""The kernel's FUSE protocol, as far as qvdfs speaks it (``include/uapi/linux/fuse.h``).

Written from the kernel header's documented layout, protocol 7.45 (Linux 6.18). Only
facts live here: numbers, bit masks and ``struct.Struct`` layouts, all little-endian
host order ("<" is right on every architecture qvdfs runs on, and it forbids implicit
padding, so each size below is the kernel's ``sizeof``). Nothing here knows a node.
"""

from __future__ import annotations

import enum
import os
import struct

KERNEL_VERSION = 7
KERNEL_MINOR_VERSION = 45
ROOT_ID = 1

# The kernel refuses a read(2) of /dev/fuse into a smaller buffer.
MIN_READ_BUFFER = 8192


class Opcode(enum.IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52
    COPY_FILE_RANGE_64 = 53


class NotifyCode(enum.IntEnum):
    """Sent as the ``error`` field of an out header whose ``unique`` is 0."""

    POLL = 1
    INVAL_INODE = 2
    INVAL_ENTRY = 3
    STORE = 4
    RETRIEVE = 5
    DELETE = 6
    RESEND = 7
    INC_EPOCH = 8
    PRUNE = 9


# INIT flags. Bits 32..63 travel in ``flags2`` of init_in / init_out, and only when
# INIT_EXT is set; they are kept here as one 64-bit space, as the header does.
ASYNC_READ = 1 << 0
POSIX_LOCKS = 1 << 1
FILE_OPS = 1 << 2
ATOMIC_O_TRUNC = 1 << 3
EXPORT_SUPPORT = 1 << 4
BIG_WRITES = 1 << 5
DONT_MASK = 1 << 6
SPLICE_WRITE = 1 << 7
SPLICE_MOVE = 1 << 8
SPLICE_READ = 1 << 9
FLOCK_LOCKS = 1 << 10
HAS_IOCTL_DIR = 1 << 11
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
ASYNC_DIO = 1 << 15
WRITEBACK_CACHE = 1 << 16
NO_OPEN_SUPPORT = 1 << 17
PARALLEL_DIROPS = 1 << 18
HANDLE_KILLPRIV = 1 << 19
POSIX_ACL = 1 << 20
ABORT_ERROR = 1 << 21
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
NO_OPENDIR_SUPPORT = 1 << 24
EXPLICIT_INVAL_DATA = 1 << 25
MAP_ALIGNMENT = 1 << 26
SUBMOUNTS = 1 << 27
HANDLE_KILLPRIV_V2 = 1 << 28
SETXATTR_EXT = 1 << 29
INIT_EXT = 1 << 30
INIT_RESERVED = 1 << 31
SECURITY_CTX = 1 << 32
HAS_INODE_DAX = 1 << 33
CREATE_SUPP_GROUP = 1 << 34
HAS_EXPIRE_ONLY = 1 << 35
DIRECT_IO_ALLOW_MMAP = 1 << 36
PASSTHROUGH = 1 << 37
NO_EXPORT_SUPPORT = 1 << 38
HAS_RESEND = 1 << 39
ALLOW_IDMAP = 1 << 40
OVER_IO_URING = 1 << 41
REQUEST_TIMEOUT = 1 << 42

# Names for logs, by bit value.
INIT_FLAG_NAMES: dict[int, str] = {
    value: name for name, value in list(globals().items())
    if name.isupper() and isinstance(value, int) and name not in (
        "KERNEL_VERSION", "KERNEL_MINOR_VERSION", "ROOT_ID", "MIN_READ_BUFFER")}


def flag_names(flags: int) -> list[str]:
    """The names of the INIT bits set in ``flags`` (unknown bits as ``bitN``)."""
    names = []
    for bit in range(64):
        if flags >> bit & 1:
            names.append(INIT_FLAG_NAMES.get(1 << bit, f"bit{bit}"))
    return names


# setattr_in.valid
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

# open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_CACHE_DIR = 1 << 3
FOPEN_STREAM = 1 << 4
FOPEN_NOFLUSH = 1 << 5
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6
FOPEN_PASSTHROUGH = 1 << 7
# The only flags the kernel accepts next to FOPEN_PASSTHROUGH (fs/fuse/iomode.c).
FOPEN_PASSTHROUGH_MASK = (FOPEN_PASSTHROUGH | FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES
                          | FOPEN_NOFLUSH)

# open_in.open_flags / create_in.open_flags
OPEN_KILL_SUIDGID = 1 << 0
# write_in.write_flags
WRITE_CACHE = 1 << 0
WRITE_LOCKOWNER = 1 << 1
WRITE_KILL_SUIDGID = 1 << 2
# getattr_in.getattr_flags
GETATTR_FH = 1 << 0
# release_in.release_flags
RELEASE_FLUSH = 1 << 0
RELEASE_FLOCK_UNLOCK = 1 << 1
# fsync_in.fsync_flags
FSYNC_FDATASYNC = 1 << 0
# setxattr_in.setxattr_flags (only with SETXATTR_EXT)
SETXATTR_ACL_KILL_SGID = 1 << 0
# The high bit of ``unique`` marks a request the kernel resent (HAS_RESEND).
UNIQUE_RESEND = 1 << 63

# ---- Struct layouts -------------------------------------------------------------------

# len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
IN_HEADER = struct.Struct("<IIQQIIIHH")
# len, error, unique
OUT_HEADER = struct.Struct("<IiQ")

# ino, size, blocks, atime, mtime, ctime, atimensec, mtimensec, ctimensec, mode, nlink,
# uid, gid, rdev, blksize, flags
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
# nodeid, generation, entry_valid, attr_valid, entry_valid_nsec, attr_valid_nsec (+ attr)
ENTRY_OUT_HEAD = struct.Struct("<QQQQII")
ENTRY_OUT_SIZE = ENTRY_OUT_HEAD.size + ATTR.size
# attr_valid, attr_valid_nsec, dummy (+ attr)
ATTR_OUT_HEAD = struct.Struct("<QII")

# major, minor, max_readahead, flags, flags2, unused[11]: older kernels send only the
# first four fields.
INIT_IN = struct.Struct("<IIIII44x")
INIT_IN_V1 = struct.Struct("<IIII")
# major, minor, max_readahead, flags, max_background, congestion_threshold, max_write,
# time_gran, max_pages, map_alignment, flags2, max_stack_depth, request_timeout, unused[11]
INIT_OUT = struct.Struct("<IIIIHHIIHHIIH22x")

FORGET_IN = struct.Struct("<Q")                  # nlookup
BATCH_FORGET_IN = struct.Struct("<II")           # count, dummy
FORGET_ONE = struct.Struct("<QQ")                # nodeid, nlookup
GETATTR_IN = struct.Struct("<IIQ")               # getattr_flags, dummy, fh
# valid, padding, fh, size, lock_owner, atime, mtime, ctime, atimensec, mtimensec,
# ctimensec, mode, unused4, uid, gid, unused5
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
MKNOD_IN = struct.Struct("<IIII")                # mode, rdev, umask, padding
MKDIR_IN = struct.Struct("<II")                  # mode, umask
RENAME_IN = struct.Struct("<Q")                  # newdir
RENAME2_IN = struct.Struct("<QII")               # newdir, flags, padding
LINK_IN = struct.Struct("<Q")                    # oldnodeid
OPEN_IN = struct.Struct("<II")                   # flags, open_flags
CREATE_IN = struct.Struct("<IIII")               # flags, mode, umask, open_flags
OPEN_OUT = struct.Struct("<QIi")                 # fh, open_flags, backing_id
RELEASE_IN = struct.Struct("<QIIQ")              # fh, flags, release_flags, lock_owner
FLUSH_IN = struct.Struct("<QIIQ")                # fh, unused, padding, lock_owner
# fh, offset, size, read_flags / write_flags, lock_owner, flags, padding
READ_IN = struct.Struct("<QQIIQII")
WRITE_IN = READ_IN
WRITE_OUT = struct.Struct("<II")                 # size, padding
# blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, padding, spare[6]
STATFS_OUT = struct.Struct("<QQQQQIIII24x")
FSYNC_IN = struct.Struct("<QII")                 # fh, fsync_flags, padding
SETXATTR_IN = struct.Struct("<II")               # size, flags (without SETXATTR_EXT)
SETXATTR_EXT_IN = struct.Struct("<IIII")         # size, flags, setxattr_flags, padding
GETXATTR_IN = struct.Struct("<II")               # size, padding
GETXATTR_OUT = struct.Struct("<II")              # size, padding
ACCESS_IN = struct.Struct("<II")                 # mask, padding
INTERRUPT_IN = struct.Struct("<Q")               # unique
FALLOCATE_IN = struct.Struct("<QQQII")           # fh, offset, length, mode, padding
LSEEK_IN = struct.Struct("<QqII")                # fh, offset (signed), whence, padding
LSEEK_OUT = struct.Struct("<Q")                  # offset
# fh_in, off_in, nodeid_out, fh_out, off_out, len, flags
COPY_FILE_RANGE_IN = struct.Struct("<QQQQQQQ")
COPY_FILE_RANGE_OUT = struct.Struct("<Q")        # bytes_copied (COPY_FILE_RANGE_64)

# ino, off, namelen, type (+ name, padded to 8 bytes)
DIRENT = struct.Struct("<QQII")
# A direntplus is an entry_out followed by a dirent.
DIRENTPLUS_HEAD_SIZE = ENTRY_OUT_SIZE + DIRENT.size


def dirent_size(namelen: int) -> int:
    """Bytes one fuse_dirent of a name takes, with the kernel's 8-byte alignment."""
    return (DIRENT.size + namelen + 7) & ~7


def direntplus_size(namelen: int) -> int:
    return (DIRENTPLUS_HEAD_SIZE + namelen + 7) & ~7


# Notifications
NOTIFY_INVAL_INODE_OUT = struct.Struct("<Qqq")   # ino, off, len
NOTIFY_INVAL_ENTRY_OUT = struct.Struct("<QII")   # parent, namelen, flags
NOTIFY_DELETE_OUT = struct.Struct("<QQII")       # parent, child, namelen, padding
# notify_inval_entry_out.flags: only expire the entry, keep it (HAS_EXPIRE_ONLY)
EXPIRE_ONLY = 1 << 0

# ---- /dev/fuse ioctls -----------------------------------------------------------------

# fd, flags, padding
BACKING_MAP = struct.Struct("<IIQ")

_IOC_WRITE = 1
_DEV_IOC_MAGIC = 229


def _iow(nr: int, size: int) -> int:
    return (_IOC_WRITE << 30) | (size << 16) | (_DEV_IOC_MAGIC << 8) | nr


DEV_IOC_CLONE = (2 << 30) | (4 << 16) | (_DEV_IOC_MAGIC << 8) | 0   # _IOR(229, 0, uint32_t)
DEV_IOC_BACKING_OPEN = _iow(1, BACKING_MAP.size)
DEV_IOC_BACKING_CLOSE = _iow(2, 4)


def encode_dev(rdev: int) -> int:
    """glibc's dev_t to the kernel's 32-bit ``new_encode_dev`` form that fuse_attr carries."""
    major, minor = os.major(rdev), os.minor(rdev)
    return ((minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)) & 0xFFFFFFFF


def decode_dev(rdev: int) -> int:
    """The kernel's 32-bit device number (fuse_attr, MKNOD) to glibc's dev_t."""
    return os.makedev((rdev & 0xFFF00) >> 8, (rdev & 0xFF) | ((rdev >> 12) & 0xFFF00))
