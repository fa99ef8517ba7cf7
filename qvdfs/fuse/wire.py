"""Reply values in their wire form: entries, attribute heads, directory buffers.

Pure packing of the ``filesystem`` reply types into the kernel's structs (``abi``); nothing
here reads /dev/fuse or knows a request. The opcode decoders (``opcodes``) call these.
"""

from __future__ import annotations

from . import abi
from .filesystem import Attr, Entry

_ZERO_ATTR = bytes(abi.ATTR.size)
_ZERO_ATTR_OUT_HEAD = abi.ATTR_OUT_HEAD.pack(0, 0, 0)
_NEGATIVE_DIRENTPLUS_HEAD = abi.ENTRY_OUT_HEAD.pack(0, 0, 0, 0, 0, 0) + _ZERO_ATTR
_NS = 1_000_000_000


def attr_out_head(timeout: float) -> bytes:
    """The head of fuse_attr_out (how long the attributes may be kept), before ``Attr.packed``."""
    if timeout > 0:
        whole = int(timeout)
        return abi.ATTR_OUT_HEAD.pack(whole, int((timeout - whole) * _NS), 0)
    return _ZERO_ATTR_OUT_HEAD


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
            + entry.attr.packed)


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
