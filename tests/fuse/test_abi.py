"""Packing and parsing without a mount: struct sizes, attr/entry/dirent packing, options."""

from __future__ import annotations

import os
import stat

import pytest

from qvdfs.fuse import abi
from qvdfs.fuse.filesystem import Attr, Entry
from qvdfs.fuse.mount import MS_NODEV, MS_NOSUID, MountOptions
from qvdfs.fuse.negotiate import FEATURES
from qvdfs.fuse.session import Session
from qvdfs.fuse.abi import decode_dev, encode_dev
from qvdfs.fuse.wire import DirBuffer, pack_entry, split_timeout

pytestmark = pytest.mark.timeout(10)


def test_struct_sizes_match_the_kernel_header() -> None:
    sizes = {
        abi.IN_HEADER: 40, abi.OUT_HEADER: 16, abi.ATTR: 88, abi.INIT_IN: 64,
        abi.INIT_OUT: 64, abi.SETATTR_IN: 88, abi.READ_IN: 40, abi.OPEN_OUT: 16,
        abi.STATFS_OUT: 80, abi.RELEASE_IN: 24, abi.COPY_FILE_RANGE_IN: 56,
        abi.FALLOCATE_IN: 32, abi.LSEEK_IN: 24, abi.DIRENT: 24, abi.BACKING_MAP: 16,
        abi.MKNOD_IN: 16, abi.CREATE_IN: 16, abi.NOTIFY_INVAL_ENTRY_OUT: 16,
        abi.NOTIFY_INVAL_INODE_OUT: 24, abi.NOTIFY_DELETE_OUT: 24,
    }
    for st, size in sizes.items():
        assert st.size == size, st.format
    assert abi.ENTRY_OUT_SIZE == 128
    assert abi.ATTR_OUT_HEAD.size + abi.ATTR.size == 104


def test_ioctl_numbers() -> None:
    assert abi.DEV_IOC_BACKING_OPEN == 0x4010E501
    assert abi.DEV_IOC_BACKING_CLOSE == 0x4004E502


def test_flags2_bits_and_names() -> None:
    assert abi.PASSTHROUGH >> 32 == 1 << 5
    assert abi.DIRECT_IO_ALLOW_MMAP >> 32 == 1 << 4
    assert abi.ALLOW_IDMAP >> 32 == 1 << 8
    assert abi.flag_names(abi.INIT_EXT | abi.PASSTHROUGH | (1 << 60)) == [
        "INIT_EXT", "PASSTHROUGH", "bit60"]
    assert abi.Opcode(53) is abi.Opcode.COPY_FILE_RANGE_64


def test_dirent_alignment() -> None:
    assert [abi.dirent_size(n) for n in (1, 8, 9, 255)] == [32, 32, 40, 280]
    assert abi.direntplus_size(1) == 128 + 32


def _attr(**kw: int) -> Attr:
    base = dict(ino=7, mode=stat.S_IFREG | 0o640, nlink=1, uid=1000, gid=100, rdev=0,
                size=12345, blocks=24, blksize=4096, atime_ns=1_500_000_000_123,
                mtime_ns=2_000_000_000_000_000_007, ctime_ns=-1_500_000_000)
    base.update(kw)
    return Attr(**base)


def test_attr_is_held_in_its_wire_form() -> None:
    attr = _attr()
    f = abi.ATTR.unpack(attr.packed)
    assert f[:3] == (7, 12345, 24)
    assert (f[3], f[6]) == (1500, 123)
    assert (f[4], f[7]) == (2_000_000_000, 7)
    # Before the epoch: -1.5 s is -2 s + 0.5 s, seconds in two's complement.
    assert (f[5] - (1 << 64), f[8]) == (-2, 500_000_000)
    assert f[9:15] == (stat.S_IFREG | 0o640, 1, 1000, 100, 0, 4096)


def test_attr_fields_read_back_from_the_wire_form() -> None:
    fields = dict(ino=7, mode=stat.S_IFCHR | 0o620, nlink=3, uid=1000, gid=5,
                  rdev=os.makedev(136, 300), size=0, blocks=0, blksize=1024,
                  atime_ns=1_500_000_000_123, mtime_ns=2_000_000_000_000_000_007,
                  ctime_ns=-1_500_000_000)
    attr = _attr(**fields)
    assert attr.fields()._asdict() == fields
    assert attr == _attr(**fields) and attr != _attr(**{**fields, "nlink": 4})


def test_device_numbers_roundtrip() -> None:
    for major, minor in ((1, 3), (8, 17), (259, 0), (4095, 1 << 19)):
        dev = os.makedev(major, minor)
        assert decode_dev(encode_dev(dev)) == dev
    assert encode_dev(os.makedev(1, 3)) == 0x103


def test_pack_entry_positive_and_negative() -> None:
    out = pack_entry(Entry(5, _attr(), 1.25, 0.5, generation=3))
    assert len(out) == 128
    assert abi.ENTRY_OUT_HEAD.unpack_from(out) == (5, 3, 1, 0, 250_000_000, 500_000_000)
    neg = pack_entry(Entry(0, None, 2.0, 0))
    assert abi.ENTRY_OUT_HEAD.unpack_from(neg) == (0, 0, 2, 0, 0, 0)
    assert neg[40:] == bytes(88)
    with pytest.raises(ValueError):
        pack_entry(Entry(5, None, 1, 1))
    assert split_timeout(0) == (0, 0) and split_timeout(-1) == (0, 0)


def test_dirbuffer_stops_when_full_and_aligns() -> None:
    buf = DirBuffer(100)
    assert buf.add(b"a", 10, stat.S_IFDIR | 0o755, 1)
    assert buf.add(b"abcdefghi", 11, stat.S_IFREG, 2)          # 24 + 9 -> 40
    assert len(buf.buf) == 72
    assert not buf.add(b"toolong", 12, stat.S_IFREG, 3)        # 72 + 32 > 100
    assert len(buf.buf) == 72
    ino, off, namelen, type_ = abi.DIRENT.unpack_from(buf.buf, 32)
    assert (ino, off, namelen, type_) == (11, 2, 9, stat.S_IFREG >> 12)
    assert bytes(buf.buf[56:65]) == b"abcdefghi" and bytes(buf.buf[65:72]) == bytes(7)


def test_dirbuffer_plus_counts_lookups_but_not_dot_entries() -> None:
    buf = DirBuffer(4096)
    entry = Entry(9, _attr(ino=99), 1, 1)
    assert buf.add_plus(b".", Entry(1, _attr(ino=1), 0, 0), 1)
    assert buf.add_plus(b"x", entry, 2)
    assert buf.add_plus(b"gone", Entry(0, None, 0, 0), 3)
    assert buf.sent == [9]
    assert len(buf.buf) == 3 * 160
    head = abi.ENTRY_OUT_HEAD.unpack_from(buf.buf, 160)
    assert head[0] == 9
    assert abi.DIRENT.unpack_from(buf.buf, 160 + 128)[:3] == (99, 2, 1)
    small = DirBuffer(150)
    assert not small.add_plus(b"x", entry, 1) and small.sent == []


def test_mount_options_for_mount2_and_for_libfuse() -> None:
    opts = MountOptions(fsname="u1", subtype="qvdfs", allow_root=True, default_permissions=True,
                        suid=True, max_read=131072)
    assert opts.data(5, uid=0, gid=0) == (
        "fd=5,rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions,"
        "max_read=131072")
    assert opts.flags == MS_NODEV and opts.fstype == "fuse.qvdfs"
    assert opts.libfuse_strings() == {"fsname=u1", "subtype=qvdfs", "allow_root",
                                      "default_permissions", "suid", "max_read=131072"}
    plain = MountOptions()
    assert plain.flags == MS_NOSUID | MS_NODEV and plain.fstype == "fuse"
    assert plain.libfuse_strings() == {"fsname=qvdfs"}
    assert MountOptions(dev=True).flags == MS_NOSUID


def test_session_refuses_unknown_feature_names() -> None:
    assert "passthrough" in FEATURES and "allow_idmap" in FEATURES
    with pytest.raises(ValueError):
        Session(object(), -1, mountpoint="/x",  # type: ignore[arg-type]
                disabled=frozenset({"warp"}))
