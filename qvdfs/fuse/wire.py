"""Reply values in their wire form: attributes, entries, device numbers, directory buffers.

Pure packing of the ``filesystem`` reply types into the kernel's structs (``abi``); nothing
here reads /dev/fuse or knows a request. The opcode decoders (``opcodes``) call these.
"""

from __future__ import annotations

import os

from . import abi
from .filesystem import Attr, Entry

_ZERO_ATTR = bytes(abi.ATTR.size)
_ZERO_ATTR_OUT_HEAD = abi.ATTR_OUT_HEAD.pack(0, 0, 0)
_NEGATIVE_DIRENTPLUS_HEAD = abi.ENTRY_OUT_HEAD.pack(0, 0, 0, 0, 0, 0) + _ZERO_ATTR
_MASK64 = (1 << 64) - 1
_NS = 1_000_000_000


def pack_attr(attr: Attr) -> bytes:
    """The wire form of ``attr`` (fuse_attr), cached in ``attr.packed``."""
    packed = attr.packed
    if packed is None:
        a_s, a_ns = divmod(attr.atime_ns, _NS)
        m_s, m_ns = divmod(attr.mtime_ns, _NS)
        c_s, c_ns = divmod(attr.ctime_ns, _NS)
        packed = abi.ATTR.pack(
            attr.ino, attr.size, attr.blocks, a_s & _MASK64, m_s & _MASK64, c_s & _MASK64,
            a_ns, m_ns, c_ns, attr.mode, attr.nlink, attr.uid, attr.gid,
            encode_dev(attr.rdev), attr.blksize, 0)
        attr.packed = packed
    return packed


def attr_out_head(timeout: float) -> bytes:
    """The head of fuse_attr_out (how long the attributes may be kept), before pack_attr's."""
    if timeout > 0:
        whole = int(timeout)
        return abi.ATTR_OUT_HEAD.pack(whole, int((timeout - whole) * _NS), 0)
    return _ZERO_ATTR_OUT_HEAD


def encode_dev(rdev: int) -> int:
    """glibc's dev_t to the kernel's 32-bit ``new_encode_dev`` form that fuse_attr carries."""
    major, minor = os.major(rdev), os.minor(rdev)
    return ((minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)) & 0xFFFFFFFF


def decode_dev(rdev: int) -> int:
    """The kernel's 32-bit device number (MKNOD) to glibc's dev_t, as os.mknod wants it."""
    return os.makedev((rdev & 0xFFF00) >> 8, (rdev & 0xFF) | ((rdev >> 12) & 0xFFF00))


def split_timeout(seconds: float) -> tuple[int, int]:
    """Seconds as the (whole seconds, nanoseconds) pair of the entry structs; <= 0 is (0, 0)."""
    if seconds <= 0:
        return 0, 0
    whole = int(seconds)
    return whole, int((seconds - whole) * _NS)


def pack_entry(entry: Entry) -> bytes:
    """fuse_entry_out; node id 0 is a negative entry the kernel may cache."""
    e_s, e_ns = split_timeout(entry.entry_timeout)
    if entry.node_id == 0:
        return abi.ENTRY_OUT_HEAD.pack(0, 0, e_s, 0, e_ns, 0) + _ZERO_ATTR
    if entry.attr is None:
        raise ValueError(f"entry for node {entry.node_id} without attributes")
    a_s, a_ns = split_timeout(entry.attr_timeout)
    return (abi.ENTRY_OUT_HEAD.pack(entry.node_id, entry.generation, e_s, a_s, e_ns, a_ns)
            + pack_attr(entry.attr))


class DirBuffer:
    """Packs READDIR / READDIRPLUS replies up to the size the kernel asked for."""

    __slots__ = ("buf", "limit", "sent")

    def __init__(self, limit: int) -> None:
        self.buf = bytearray()
        self.limit = limit
        # Node ids handed out by readdirplus (one lookup each), to give back if the
        # reply never reaches the kernel.
        self.sent: list[int] = []

    def add(self, name: bytes, node_id: int, type_: int, next_offset: int) -> bool:
        """``filesystem.AddDirEntry``: False, and nothing added, once the reply is full."""
        size = abi.dirent_size(len(name))
        buf = self.buf
        if len(buf) + size > self.limit:
            return False
        buf += abi.DIRENT.pack(node_id, next_offset, len(name), (type_ & 0o170000) >> 12)
        buf += name
        buf += bytes(size - abi.DIRENT.size - len(name))
        return True

    def add_plus(self, name: bytes, entry: Entry, next_offset: int) -> bool:
        """``filesystem.AddDirEntryPlus``: as ``add``, with the entry of the name."""
        size = abi.direntplus_size(len(name))
        buf = self.buf
        if len(buf) + size > self.limit:
            return False
        attr = entry.attr
        if entry.node_id == 0 or attr is None:
            # The kernel emits the name and makes no dentry of it.
            buf += _NEGATIVE_DIRENTPLUS_HEAD
            ino, mode = (attr.ino, attr.mode) if attr is not None else (0, 0)
        else:
            buf += pack_entry(entry)
            ino, mode = attr.ino, attr.mode
            if name not in (b".", b".."):
                self.sent.append(entry.node_id)
        buf += abi.DIRENT.pack(ino, next_offset, len(name), (mode & 0o170000) >> 12)
        buf += name
        buf += bytes(size - abi.DIRENTPLUS_HEAD_SIZE - len(name))
        return True
