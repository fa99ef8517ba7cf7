"""Union semantics through a real qvdfs mount with the node's command line.

Each test names one behaviour a Linux userland relies on and checks it both in the
mount and in the branches: what the union shows, what landed in the upper branch, and
that the base branch was not touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import random
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.support.mounts import NODE_OPTIONS, qvdfs_mount
from tests.support.trees import build_base, describe


class Union(NamedTuple):
    upper: Path
    base: Path
    mnt: Path


@contextlib.contextmanager
def mounted(tmp: Path, *options: str, home: Path | None = None, exist_ok: bool = False) -> Iterator[Union]:
    upper, mnt = tmp / "upper", tmp / "mnt"
    upper.mkdir(exist_ok=exist_ok)
    mnt.mkdir()
    base = build_base(tmp / "base")
    branches = f"{upper}=RW:{base}=RO" + (f":{home}=RW@/home" if home else "")
    with qvdfs_mount(branches, mnt, *(options or NODE_OPTIONS)):
        yield Union(upper, base, mnt)


@pytest.fixture
def union(tmp_path: Path) -> Iterator[Union]:
    with mounted(tmp_path) as u:
        yield u


@pytest.fixture
def base_snapshot(union: Union) -> dict:
    return describe(union.base)


def test_merged_listing_shows_each_name_once(tmp_path: Path) -> None:
    (tmp_path / "upper/etc/conf.d").mkdir(parents=True)  # an existing overlay
    (tmp_path / "upper/etc/conf.d/b.conf").write_text("upper b\n")
    with mounted(tmp_path, exist_ok=True) as union:
        _check_merged_listing(union)


def _check_merged_listing(union: Union) -> None:
    assert (union.mnt / "etc/conf.d/b.conf").read_text() == "upper b\n"
    assert sorted(os.listdir(union.mnt / "etc/conf.d")) == ["a-hardlink.conf", "a.conf", "b.conf"]
    (union.mnt / "etc/new").write_text("n")
    assert sorted(os.listdir(union.mnt / "etc")) == ["conf.d", "new", "passwd"]
    assert ".qvdfs.work" not in os.listdir(union.mnt)


def test_write_copies_up_data_mode_owner_times_and_xattrs(union: Union, base_snapshot: dict) -> None:
    src = union.base / "var/log/syslog"
    os.setxattr(src, "user.kept", b"1")
    before = os.lstat(src)
    with open(union.mnt / "var/log/syslog", "ab") as f:
        f.write(b"more\n")
    up = os.lstat(union.upper / "var/log/syslog")
    assert (union.upper / "var/log/syslog").read_bytes() == b"boot\nmore\n"
    assert (up.st_mode, up.st_uid, up.st_gid) == (before.st_mode, before.st_uid, before.st_gid)
    assert os.getxattr(union.upper / "var/log/syslog", "user.kept") == b"1"
    assert src.read_bytes() == b"boot\n"
    # Parents were copied up with their own metadata.
    assert os.stat(union.upper / "var/log").st_mode == os.stat(union.base / "var/log").st_mode


def test_copy_up_keeps_nanosecond_times(union: Union) -> None:
    os.utime(union.base / "etc/passwd", ns=(1_111_111_111_123_456_789, 1_222_222_222_987_654_321))
    os.chmod(union.mnt / "etc/passwd", 0o600)  # a metadata-only copy-up
    st = os.lstat(union.mnt / "etc/passwd")
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_111_111_111_123_456_789, 1_222_222_222_987_654_321)


def test_reads_partly_from_disk_return_every_byte(tmp_path: Path) -> None:
    """Pages of a base file half in the page cache and half on disk: the union serves the
    cached ones inline and fetches the others, and the reader gets every byte in order."""
    data = os.urandom(8 << 20)
    base, upper, mnt = build_base(tmp_path / "base"), tmp_path / "upper", tmp_path / "mnt"
    upper.mkdir()
    mnt.mkdir()
    big = base / "big"
    big.write_bytes(data)
    fd = os.open(big, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        for off in range(0, len(data), 192 << 10):  # warm one page in every 48
            os.pread(fd, 4096, off)
    finally:
        os.close(fd)
    with qvdfs_mount(f"{upper}=RW:{base}=RO", mnt, *NODE_OPTIONS), open(mnt / "big", "rb") as f:
        assert f.read() == data
        f.seek(123457)
        assert f.read(1 << 20) == data[123457:123457 + (1 << 20)]


def test_chmod_chown_utimens_copy_no_data(union: Union) -> None:
    tool = union.mnt / "usr/bin/tool"
    data = tool.read_bytes()
    os.chmod(tool, 0o700)
    os.chown(tool, 12, 34)
    os.utime(tool, ns=(5, 6))
    up = union.upper / "usr/bin/tool"
    st = os.lstat(up)
    assert st.st_blocks == 0 and st.st_size == len(data), "data was copied"
    assert "trusted.overlay.metacopy" in os.listxattr(up)
    assert tool.read_bytes() == data
    mst = os.lstat(tool)
    assert (stat.S_IMODE(mst.st_mode), mst.st_uid, mst.st_gid, mst.st_mtime_ns) == (0o700, 12, 34, 6)
    # The first write then copies the data in.
    with open(tool, "r+b") as f:
        f.write(b"Z")
    assert up.read_bytes() == b"Z" + data[1:]
    assert "trusted.overlay.metacopy" not in os.listxattr(up)


def test_truncate_to_zero_copies_no_data(union: Union) -> None:
    os.truncate(union.mnt / "usr/bin/tool", 0)
    up = union.upper / "usr/bin/tool"
    assert up.stat().st_size == 0 and "trusted.overlay.metacopy" not in os.listxattr(up)
    assert (union.mnt / "usr/bin/tool").read_bytes() == b""
    with open(union.mnt / "etc/passwd", "w") as f:  # O_TRUNC through open
        f.write("new\n")
    assert (union.mnt / "etc/passwd").read_text() == "new\n"


def test_inode_numbers_stable_and_hard_links_shared(union: Union) -> None:
    a, b = union.mnt / "etc/conf.d/a.conf", union.mnt / "etc/conf.d/a-hardlink.conf"
    ino = os.stat(a).st_ino
    assert os.stat(b).st_ino == ino and os.stat(a).st_nlink == 2
    os.chmod(union.mnt / "etc/passwd", 0o640)
    assert os.stat(a).st_ino == ino
    f = union.mnt / "new"
    f.write_text("x")
    os.link(f, union.mnt / "new2")
    assert os.stat(f).st_ino == os.stat(union.mnt / "new2").st_ino
    assert os.stat(f).st_nlink == 2
    os.unlink(union.mnt / "new2")
    assert os.stat(f).st_nlink == 1


def test_merged_directory_link_count(union: Union) -> None:
    (union.mnt / "usr/extra").mkdir()
    # usr holds bin, lib (base) and extra (upper): 2 + 3
    assert os.stat(union.mnt / "usr").st_nlink == 5


def test_unlink_and_rmdir_leave_whiteouts(union: Union, base_snapshot: dict) -> None:
    os.unlink(union.mnt / "etc/passwd")
    wh = os.lstat(union.upper / "etc/passwd")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    os.remove(union.mnt / "usr/lib/deep/er/lib.so")
    os.rmdir(union.mnt / "usr/lib/deep/er")  # looks empty, base still has lib.so
    assert not (union.mnt / "usr/lib/deep/er").exists()
    assert sorted(os.listdir(union.mnt / "usr/lib/deep")) == ["file"]
    assert describe(union.base) == base_snapshot


def test_recreated_directory_is_opaque(union: Union) -> None:
    subprocess.run(["rm", "-rf", str(union.mnt / "etc/conf.d")], check=True)
    (union.mnt / "etc/conf.d").mkdir()
    assert os.listdir(union.mnt / "etc/conf.d") == []
    assert os.getxattr(union.upper / "etc/conf.d", "trusted.overlay.opaque") == b"y"


def test_rename_of_base_directory_keeps_every_file(union: Union) -> None:
    before = describe(union.mnt / "usr/lib")
    os.rename(union.mnt / "usr/lib", union.mnt / "lib2")
    assert describe(union.mnt / "lib2") == before
    assert not (union.mnt / "usr/lib").exists()
    assert sorted(os.listdir(union.mnt / "usr")) == ["bin"]


_libc = ctypes.CDLL(None, use_errno=True)


def _renameat2(old: Path, new: Path, flags: int) -> None:
    if _libc.renameat2(-100, bytes(old), -100, bytes(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def test_rename_noreplace_and_exchange(union: Union) -> None:
    m = union.mnt
    with pytest.raises(FileExistsError):
        _renameat2(m / "etc/passwd", m / "var/log/syslog", 1)
    _renameat2(m / "etc/passwd", m / "var/log/syslog", 2)
    assert (m / "var/log/syslog").read_text().startswith("root:")
    assert (m / "etc/passwd").read_text() == "boot\n"
    _renameat2(m / "etc/conf.d", m / "usr/lib", 2)
    assert sorted(os.listdir(m / "usr/lib")) == ["a-hardlink.conf", "a.conf", "b.conf"]
    assert sorted(os.listdir(m / "etc/conf.d")) == ["deep"]


def test_special_files_as_root(union: Union) -> None:
    os.mkfifo(union.mnt / "fifo2")
    os.mknod(union.mnt / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(union.mnt / "blk", stat.S_IFBLK | 0o600, os.makedev(7, 0))
    os.mknod(union.mnt / "sock", stat.S_IFSOCK | 0o600)
    assert stat.S_ISFIFO(os.lstat(union.mnt / "fifo2").st_mode)
    assert os.lstat(union.upper / "null").st_rdev == os.makedev(1, 3)
    assert stat.S_ISBLK(os.lstat(union.mnt / "blk").st_mode)
    assert stat.S_ISSOCK(os.lstat(union.mnt / "sock").st_mode)
    with open(union.mnt / "null", "wb") as f:  # served by the device itself (-o dev)
        f.write(b"gone")
    with pytest.raises(PermissionError):  # a forged whiteout
        os.mknod(union.mnt / "forged", stat.S_IFCHR | 0o600, os.makedev(0, 0))


def test_open_then_unlink_leaves_no_litter(union: Union) -> None:
    with open(union.mnt / "etc/passwd", "w+") as f:
        os.unlink(union.mnt / "etc/passwd")
        f.write("still writable")
        f.seek(0)
        assert f.read() == "still writable"
        assert os.fstat(f.fileno()).st_nlink == 0
    for root, dirs, files in os.walk(union.upper):
        assert not [n for n in dirs + files if n.startswith(".fuse_hidden")]
    assert not (union.mnt / "etc/passwd").exists()


def test_shared_writable_mmap_and_append(union: Union) -> None:
    path = union.mnt / "usr/lib/deep/er/lib.so"
    with open(path, "r+b") as f:
        with mmap.mmap(f.fileno(), 0) as m:
            m[0:5] = b"HELLO"
            m.flush()
    assert (union.upper / "usr/lib/deep/er/lib.so").read_bytes()[:6] == b"HELLOx"
    fd = os.open(union.mnt / "etc/passwd", os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"tail\n")
    os.close(fd)
    assert (union.mnt / "etc/passwd").read_text().endswith("/bin/sh\ntail\n")


def _as_user(uid: int, gid: int, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *cmd],
                          capture_output=True, text=True, timeout=30)


@pytest.fixture
def open_union() -> Iterator[Union]:
    """A union under a folder other users may traverse (pytest's tmp is root-only)."""
    top = Path(tempfile.mkdtemp(prefix="qvdfs-perm-", dir="/var/tmp"))
    try:
        os.chmod(top, 0o755)
        with mounted(top) as u:
            os.chmod(u.mnt, 0o755)
            yield u
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_caller_owns_what_it_creates_and_permissions_hold(open_union: Union) -> None:
    union = open_union
    os.mkdir(union.mnt / "shared")
    os.chmod(union.mnt / "shared", 0o777)
    assert _as_user(1000, 1000, "touch", str(union.mnt / "shared/mine")).returncode == 0
    st = os.lstat(union.upper / "shared/mine")
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    os.mkdir(union.mnt / "sgid")
    os.chown(union.mnt / "sgid", 0, 50)
    os.chmod(union.mnt / "sgid", 0o2777)
    assert _as_user(1000, 1000, "mkdir", str(union.mnt / "sgid/d")).returncode == 0
    st = os.lstat(union.mnt / "sgid/d")
    assert st.st_gid == 50 and st.st_mode & stat.S_ISGID
    denied = _as_user(1000, 1000, "sh", "-c", f"echo x >> {union.mnt}/etc/passwd")
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    assert not (union.upper / "etc/passwd").exists()


def test_xattrs_and_acls(union: Union) -> None:
    p = union.mnt / "etc/passwd"
    assert os.getxattr(p, "user.origin") == b"base"
    os.setxattr(p, "trusted.mine", b"t")
    os.setxattr(p, "security.mine", b"s")
    assert {"user.origin", "trusted.mine", "security.mine"} <= set(os.listxattr(p))
    os.removexattr(p, "user.origin")
    assert "user.origin" not in os.listxattr(p)
    assert os.getxattr(union.base / "etc/passwd", "user.origin") == b"base"
    subprocess.run(["setfacl", "-m", "u:1234:rw", str(p)], check=True)
    acl = subprocess.run(["getfacl", "-c", str(p)], check=True, capture_output=True, text=True).stdout
    assert "user:1234:rw-" in acl


def test_overlay_xattrs_cannot_be_seen_or_forged(union: Union) -> None:
    os.chmod(union.mnt / "usr/bin/tool", 0o755)  # upper now carries trusted.overlay.metacopy
    assert not [n for n in os.listxattr(union.mnt / "usr/bin/tool") if n.startswith("trusted.overlay.")]
    with pytest.raises(OSError) as exc:
        os.setxattr(union.mnt / "etc", "trusted.overlay.opaque", b"y")
    assert exc.value.errno == errno.EPERM
    assert sorted(os.listdir(union.mnt / "etc")) == ["conf.d", "passwd"]


def test_fsync_statfs_and_symlinks(union: Union) -> None:
    fd = os.open(union.mnt / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"x")
    os.fsync(fd)
    os.fdatasync(fd)
    os.close(fd)
    assert os.statvfs(union.mnt).f_blocks == os.statvfs(union.upper).f_blocks
    os.symlink("../lib/deep/file", union.mnt / "usr/bin/another")
    assert (union.mnt / "usr/bin/another").read_text() == "deep\n"
    assert os.readlink(union.mnt / "usr/bin/abs-link") == "/etc/passwd"


def test_unionfs_fuse_markers_are_honoured(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    (upper / ".unionfs-fuse/etc/conf.d").mkdir(parents=True)
    (upper / ".unionfs-fuse/etc/passwd_HIDDEN~").touch()
    (upper / ".unionfs-fuse/etc/conf.d/a.conf_HIDDEN~").touch()
    (upper / ".unionfs/usr").mkdir(parents=True)
    (upper / ".unionfs/usr/lib_HIDDEN~").mkdir()
    (tmp_path / "upper").rename(tmp_path / "upper0")
    base = build_base(tmp_path / "base")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with qvdfs_mount(f"{tmp_path / 'upper0'}=RW:{base}=RO", mnt, *NODE_OPTIONS):
        assert sorted(os.listdir(mnt)) == ["etc", "usr", "var"]
        assert sorted(os.listdir(mnt / "etc")) == ["conf.d"]
        assert sorted(os.listdir(mnt / "etc/conf.d")) == ["a-hardlink.conf", "b.conf"]
        assert sorted(os.listdir(mnt / "usr")) == ["bin"]
        (mnt / "etc/passwd").write_text("again\n")  # recreating drops the marker
        assert (mnt / "etc/passwd").read_text() == "again\n"


def test_whiteout_format_unionfs_writes_markers(tmp_path: Path) -> None:
    with mounted(tmp_path, *NODE_OPTIONS, "-o", "whiteout=unionfs") as u:
        os.unlink(u.mnt / "etc/passwd")
        subprocess.run(["rm", "-rf", str(u.mnt / "usr/lib")], check=True)
        assert sorted(os.listdir(u.mnt / "etc")) == ["conf.d"]
        assert ".unionfs-fuse" not in os.listdir(u.mnt)
    assert (u.upper / ".unionfs-fuse/etc/passwd_HIDDEN~").exists()
    assert (u.upper / ".unionfs-fuse/usr/lib_HIDDEN~").exists()
    assert not any(stat.S_ISCHR(os.lstat(os.path.join(r, n)).st_mode)
                   for r, ds, fs in os.walk(u.upper) for n in fs)


def test_without_cow_base_files_are_read_only(tmp_path: Path) -> None:
    with mounted(tmp_path, "-o", "allow_other") as u:
        with pytest.raises(OSError) as exc:
            open(u.mnt / "etc/passwd", "a").close()
        assert exc.value.errno == errno.EROFS
        (u.mnt / "fresh").write_text("ok")  # new files still go to the writable branch
        assert (u.upper / "fresh").read_text() == "ok"


def test_home_graft_takes_home_writes(tmp_path: Path) -> None:
    home = tmp_path / "homefs"
    (home / "alice").mkdir(parents=True)
    with mounted(tmp_path, home=home) as u:
        assert os.listdir(u.mnt / "home") == ["alice"]
        (u.mnt / "home/alice/notes").write_text("hi")
        (u.mnt / "var/log/app.log").write_text("log")
        assert (home / "alice/notes").read_text() == "hi"
        assert (u.upper / "var/log/app.log").exists() and not (u.upper / "home").exists()
        with pytest.raises(OSError) as exc:
            os.rename(u.mnt / "home/alice/notes", u.mnt / "notes")
        assert exc.value.errno == errno.EXDEV
        with pytest.raises(OSError) as exc:
            os.rmdir(u.mnt / "home")
        assert exc.value.errno in (errno.EBUSY, errno.ENOTEMPTY)


def test_work_folder_planted_as_symlink_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    upper = tmp_path / "upper"
    upper.mkdir()
    os.symlink(outside, upper / ".qvdfs.work")
    (tmp_path / "mnt").mkdir()
    base = build_base(tmp_path / "base")
    res = subprocess.run([*_qvdfs(), *NODE_OPTIONS, f"{upper}=RW:{base}=RO", str(tmp_path / "mnt")],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode != 0
    assert "work folder" in res.stderr.strip().splitlines()[-1] and "Traceback" not in res.stderr
    assert not os.path.ismount(tmp_path / "mnt") and os.listdir(outside) == []


def _qvdfs() -> list[str]:
    from tests.support.mounts import QVDFS

    return [QVDFS]


def test_umask_default_acl_and_acl_enforcement(open_union: Union) -> None:
    m = open_union.mnt
    made = subprocess.run(["sh", "-c", f"umask 077 && echo x > {m}/private && mkdir {m}/pdir"],
                          timeout=30)
    assert made.returncode == 0
    assert stat.S_IMODE(os.lstat(m / "private").st_mode) == 0o600
    assert stat.S_IMODE(os.lstat(m / "pdir").st_mode) == 0o700
    os.mkdir(m / "inherit")
    subprocess.run(["setfacl", "-d", "-m", "u:1234:rwx", str(m / "inherit")], check=True)
    subprocess.run(["sh", "-c", f"umask 077 && touch {m}/inherit/child"], check=True, timeout=30)
    acl = subprocess.run(["getfacl", "-c", str(m / "inherit/child")], check=True,
                         capture_output=True, text=True).stdout
    assert "user:1234:" in acl  # inherited from the default ACL, umask ignored
    secret = m / "secret"
    secret.write_text("s")
    os.chmod(secret, 0o600)
    assert _as_user(1000, 1000, "cat", str(secret)).returncode != 0
    subprocess.run(["setfacl", "-m", "u:1000:r", str(secret)], check=True)
    reader = _as_user(1000, 1000, "cat", str(secret))
    assert reader.returncode == 0 and reader.stdout == "s"


_CAP = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_bind_service=ep

# Shell lines an unprivileged user runs on the file at $0: a write that keeps the size, an
# open with O_TRUNC, and truncate(2).
_UNPRIVILEGED_CHANGES = {
    "write": 'printf "#" 1<> "$0"',
    "truncating open": ': > "$0"',
    "truncate": 'truncate -s 3 "$0"',
}


@pytest.mark.parametrize("how", list(_UNPRIVILEGED_CHANGES))
def test_an_unprivileged_change_drops_setid_bits_and_capabilities(
        open_union: Union, how: str) -> None:
    """As the kernel does on a local filesystem (qvdfs handles it: HANDLE_KILLPRIV_V2)."""
    union = open_union
    target = union.base / "usr/bin/setid"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"#!/bin/sh\n")
    os.chmod(target, 0o6777)
    os.setxattr(target, "security.capability", _CAP)
    path = union.mnt / "usr/bin/setid"
    changed = _as_user(1000, 1000, "sh", "-c", _UNPRIVILEGED_CHANGES[how], str(path))
    assert changed.returncode == 0, changed.stderr
    upper = union.upper / "usr/bin/setid"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o777
    assert stat.S_IMODE(os.stat(upper).st_mode) == 0o777
    assert "security.capability" not in os.listxattr(upper)
    assert stat.S_IMODE(target.stat().st_mode) == 0o6777  # the base is never touched


def test_root_keeps_setid_bits_when_it_writes(union: Union) -> None:
    target = union.base / "usr/bin/setid"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"#!/bin/sh\n")
    os.chmod(target, 0o4755)
    with open(union.mnt / "usr/bin/setid", "r+b") as f:
        f.write(b"#")
    assert stat.S_IMODE(os.stat(union.mnt / "usr/bin/setid").st_mode) == 0o4755


@pytest.mark.parametrize("whence", [os.SEEK_DATA, os.SEEK_HOLE])
def test_seek_data_or_hole_before_the_start_is_enxio(union: Union, whence: int) -> None:
    """generic/448: a negative offset is ENXIO, as on the branch (it used to be EIO: the
    offset was read unsigned)."""
    path = union.mnt / "etc/passwd"
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as raised:
            os.lseek(fd, -1, whence)
        assert raised.value.errno == errno.ENXIO
        assert os.lseek(fd, 0, whence) == (0 if whence == os.SEEK_DATA else path.stat().st_size)
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_an_open_entry_replaced_by_a_rename_has_no_links(union: Union, kind: str) -> None:
    """generic/035: fstat of what a rename replaced says nlink 0 (a folder said 2)."""
    old, new = union.mnt / "old", union.mnt / "new"
    for path in (old, new):
        path.mkdir() if kind == "folder" else path.write_text(path.name)
    fd = os.open(new, os.O_RDONLY)
    try:
        os.rename(old, new)
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)


@pytest.mark.parametrize("existing", [True, False], ids=["existing file", "new file"])
def test_a_write_through_a_shared_mapping_shows_new_times(union: Union, existing: bool) -> None:
    """generic/080 and 215: after a write through a shared mapping (which no request
    reports: the file's data is passed through), stat shows the new mtime and ctime."""
    path = union.mnt / ("usr/lib/deep/er/lib.so" if existing else "mapped")
    if not existing:
        path.write_bytes(b"x" * 4096)

    def times() -> list[float]:
        # As stat(1) asks (statx for the two times alone), which the kernel answers from
        # its cache while that holds; os.stat asks for more and would refresh it.
        shown = subprocess.run(["stat", "-c", "%.9Y %.9Z", str(path)], capture_output=True,
                               text=True, check=True, timeout=30)
        return [float(t) for t in shown.stdout.split()]

    before = times()  # cached by the kernel from here on
    time.sleep(0.05)  # past the coarse clock's tick that stamps file times
    # As xfs_io's mwrite does it: no msync, the mapping goes when the process ends.
    write = "import mmap, sys; f = open(sys.argv[1], 'r+b'); mmap.mmap(f.fileno(), 0)[0:1] = b'Z'"
    subprocess.run([sys.executable, "-c", write, str(path)], check=True, timeout=30)
    after = times()
    assert after[0] > before[0] and after[1] > before[1]
    assert path.read_bytes()[:1] == b"Z"


class _Dirent(ctypes.Structure):
    _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64),
                ("d_reclen", ctypes.c_ushort), ("d_type", ctypes.c_ubyte),
                ("d_name", ctypes.c_char * 256)]


def test_seekdir_back_and_forth_in_a_large_folder(union: Union) -> None:
    """generic/676: seekdir to a position telldir gave returns that entry again, and to any
    position below the largest one returns some entry (the position used to be the low
    half of the offset, so most values below the largest pointed past the end)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.opendir.restype = ctypes.c_void_p
    libc.readdir.argtypes = libc.telldir.argtypes = libc.closedir.argtypes = [ctypes.c_void_p]
    libc.readdir.restype = ctypes.POINTER(_Dirent)
    libc.telldir.restype = ctypes.c_long
    libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
    folder = union.mnt / "big"
    folder.mkdir()
    for i in range(600):
        (folder / f"file-{i:04}-{'x' * (i % 50)}").touch()
    stream = libc.opendir(os.fsencode(folder))
    assert stream
    try:
        positions, names = [], []
        while True:
            positions.append(libc.telldir(stream))
            entry = libc.readdir(stream)
            if not entry:
                break
            names.append(entry.contents.d_name)
        positions.pop()  # the position of the end
        assert len(names) == 602
        rng = random.Random(676)
        for _ in range(300):
            i = rng.randrange(len(names))
            libc.seekdir(stream, positions[i])
            entry = libc.readdir(stream)
            assert entry and entry.contents.d_name == names[i]
        largest = max(positions)
        for _ in range(300):
            libc.seekdir(stream, rng.randrange(largest))
            assert libc.readdir(stream), "an offset below the largest one read as the end"
    finally:
        libc.closedir(stream)


def test_reading_a_file_moves_its_access_time(union: Union) -> None:
    """generic/003 (relatime's first read after a change): a read passed through to the
    branch changes the access time there, and stat shows it."""
    path = union.mnt / "read-me"
    path.write_text("data")
    # An access time before the mtime: relatime's next read moves it.
    os.utime(path, ns=(10**18, path.stat().st_mtime_ns))
    shown = subprocess.run(["stat", "-c", "%X", str(path)], capture_output=True, text=True,
                           check=True, timeout=30)
    assert int(shown.stdout) == 10**9
    assert path.read_text() == "data"
    shown = subprocess.run(["stat", "-c", "%X", str(path)], capture_output=True, text=True,
                           check=True, timeout=30)
    assert int(shown.stdout) > 10**9


def test_generic_mount_flags_ro_noexec_and_noatime(tmp_path: Path) -> None:
    """generic/003, 294, 306, 452: mount(8)'s generic flags are taken (they were refused as
    unknown options) and hold: ro refuses changes, noexec refuses running a program."""
    with mounted(tmp_path, *NODE_OPTIONS, "-o", "ro,noexec,noatime") as union:
        line = next(m for m in Path("/proc/self/mounts").read_text().splitlines()
                    if m.split()[1] == str(union.mnt))
        assert {"ro", "noexec", "noatime"} <= set(line.split()[3].split(",")), line
        with pytest.raises(OSError) as refused:
            (union.mnt / "new").write_text("x")
        assert refused.value.errno == errno.EROFS
        tool = union.mnt / "usr/bin/tool"
        assert os.stat(tool).st_mode & stat.S_IXUSR
        with pytest.raises(PermissionError):
            subprocess.run([str(tool)], timeout=30)


def test_noatime_leaves_the_branches_access_times_alone(tmp_path: Path) -> None:
    """Reads the daemon serves open the branch's file with O_NOATIME. (A passed-through
    read is the kernel's own backing file, opened with the caller's flags: the branch's
    mount decides there, hence nopassthrough here.)"""
    with mounted(tmp_path, *NODE_OPTIONS, "-o", "noatime,nopassthrough") as union:
        passwd = union.base / "etc/passwd"
        os.utime(passwd, ns=(10**18, passwd.stat().st_mtime_ns))  # a read would move it
        assert (union.mnt / "etc/passwd").read_text()
        assert passwd.stat().st_atime_ns == 10**18


# -- what the daemon answers from memory (issue 24) -------------------------------------------

def _getxattr(path: Path, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError as exc:
        assert exc.errno == errno.ENODATA
        return None


def test_an_absent_xattr_is_read_once_and_asked_again_after_the_union_sets_one(
        union: Union) -> None:
    # The union is the only writer of its branches (README): what it found missing stays
    # missing until it sets an attribute itself. A write behind its back shows that the
    # answer came from memory.
    path, upper = union.mnt / "var/new", union.upper / "var/new"
    path.write_text("x")
    assert _getxattr(path, "security.selinux") is None  # as ls -l asks
    assert _getxattr(path, "user.probe") is None
    os.setxattr(upper, "security.selinux", b"behind")
    os.setxattr(upper, "user.probe", b"made-up names are always asked")
    assert _getxattr(path, "security.selinux") is None
    assert _getxattr(path, "user.probe") == b"made-up names are always asked"
    os.setxattr(path, "user.other", b"1")  # a change through the union: ask again
    assert _getxattr(path, "security.selinux") == b"behind"


def test_a_copy_up_asks_the_upper_copy_for_xattrs_again(union: Union) -> None:
    path = union.mnt / "etc/conf.d/b.conf"
    assert _getxattr(path, "security.selinux") is None  # asked of the base file
    os.chmod(path, 0o640)  # copies the file up
    os.setxattr(union.upper / "etc/conf.d/b.conf", "security.selinux", b"upper")
    assert _getxattr(path, "security.selinux") == b"upper"


def test_a_created_file_has_no_capability_until_one_is_set_through_the_union(
        union: Union) -> None:
    # The kernel asks for security.capability before a file's first write and before
    # every chown; a file the union just made has none, and that is answered from memory.
    cap_net_raw = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)
    path, upper = union.mnt / "var/made", union.upper / "var/made"
    with open(path, "wb") as f:
        f.write(b"x")
        os.fchown(f.fileno(), 0, 0)
    os.setxattr(upper, "security.capability", cap_net_raw)
    assert _getxattr(path, "security.capability") is None
    os.setxattr(path, "security.capability", cap_net_raw)
    assert _getxattr(path, "security.capability") == cap_net_raw
    os.chown(path, 0, 0)  # root's chown drops a capability, as on any filesystem
    assert _getxattr(path, "security.capability") is None
    assert _getxattr(upper, "security.capability") is None


@pytest.mark.parametrize("unlinked", [False, True], ids=["linked", "unlinked"])
def test_fchown_fchmod_futimens_of_a_file_being_written(union: Union, unlinked: bool) -> None:
    path = union.mnt / "var/written"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, b"data")
        if unlinked:
            os.unlink(path)
        os.fchown(fd, 1000, 1001)
        os.fchmod(fd, 0o4751)
        os.utime(fd, ns=(1_000_000_123, 2_000_000_456))
        st = os.fstat(fd)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1001, 0o4751)
        assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
        if not unlinked:
            upper = os.lstat(union.upper / "var/written")
            assert (upper.st_uid, upper.st_gid, upper.st_mode, upper.st_mtime_ns) == \
                (1000, 1001, st.st_mode, 2_000_000_456)
    finally:
        os.close(fd)


@pytest.mark.parametrize("branch", ["upper", "base"])
def test_a_removed_file_still_open_is_never_changed_by_its_old_name(union: Union,
                                                                    branch: str) -> None:
    # Its old name may name somebody else's file by now: a change by name would, for
    # instance, let a container's user make a file root puts there later set-user-id.
    path = union.mnt / ("var/removed" if branch == "upper" else "etc/passwd")
    if branch == "upper":
        path.write_bytes(b"old")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.unlink(path)
        path.write_bytes(b"new")
        os.chmod(path, 0o644)
        before = os.lstat(path)
        changes = (lambda: os.fchown(fd, 1000, 1000), lambda: os.fchmod(fd, 0o4777),
                   lambda: os.utime(fd, ns=(1, 2)), lambda: os.setxattr(fd, "user.x", b"1"))
        for change in changes:
            if branch == "upper":
                change()
            else:  # a removed base file cannot be copied up by its name: refused
                with pytest.raises(OSError) as refused:
                    change()
                assert refused.value.errno == errno.EROFS
        if branch == "upper":
            st = os.fstat(fd)
            assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_mtime_ns) == (0o4777, 1000, 2)
            assert os.getxattr(fd, "user.x") == b"1"
        after = os.lstat(path)
        assert (after.st_mode, after.st_uid, after.st_mtime_ns) == \
            (before.st_mode, before.st_uid, before.st_mtime_ns)
        assert "user.x" not in os.listxattr(path)
        assert path.read_bytes() == b"new"
    finally:
        os.close(fd)
    assert (union.base / "etc/passwd").stat().st_mode & 0o7777 != 0o4777


@pytest.mark.parametrize("branch", ["upper", "base"])
def test_a_removed_file_opened_again_through_proc_is_that_file(union: Union,
                                                               branch: str) -> None:
    # /proc/PID/fd/N opens the removed file itself (the kernel asks an OPEN of its node),
    # never whatever has its old name now.
    path = union.mnt / ("var/removed" if branch == "upper" else "etc/passwd")
    if branch == "upper":
        path.write_bytes(b"old file")
    old = path.read_bytes()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.unlink(path)
        path.write_bytes(b"new")
        again = f"/proc/self/fd/{fd}"
        with open(again, "rb") as reader:
            assert reader.read() == old
        if branch == "upper":
            with open(again, "r+b") as writer:
                writer.write(b"OLD")
            os.truncate(again, 5)
            assert os.pread(fd, 100, 0) == b"OLD f"
        else:  # a removed base file cannot be copied up by its name: refused
            for change in (lambda: open(again, "r+b"), lambda: os.truncate(again, 5)):
                with pytest.raises(OSError) as refused:
                    change()
                assert refused.value.errno == errno.EROFS
        assert path.read_bytes() == b"new"
    finally:
        os.close(fd)
    assert (union.base / "etc/passwd").read_bytes() == \
        (old if branch == "base" else (union.base / "etc/passwd").read_bytes())


def test_a_removed_folder_still_open_never_shows_a_new_one_of_its_name(union: Union) -> None:
    # A process left in a removed folder must not see into a folder made later at its
    # name (which may be 0700 and somebody else's).
    path = union.mnt / "var/gone"
    path.mkdir()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        path.rmdir()
        path.mkdir(mode=0o700)
        (path / "secret").write_bytes(b"x")
        try:
            names = os.listdir(fd)
        except OSError as exc:
            assert exc.errno == errno.ENOENT
        else:
            assert names == []
        with pytest.raises(FileNotFoundError):
            os.stat("secret", dir_fd=fd)
    finally:
        os.close(fd)
    assert os.listdir(path) == ["secret"]


_SAME = ("st_mode", "st_uid", "st_gid", "st_size", "st_nlink", "st_mtime_ns",
         "st_ctime_ns")


def _same_attributes(mnt: os.stat_result, upper: os.stat_result) -> None:
    assert {f: getattr(mnt, f) for f in _SAME} == {f: getattr(upper, f) for f in _SAME}


def test_a_new_entry_shows_the_attributes_it_has_in_the_branch(open_union: Union) -> None:
    # The reply to a create carries the attributes of the stat that checked the new
    # entry's owner; the kernel keeps them, so they must be the final ones, also after a
    # chown to a caller other than root and where a whiteout was replaced.
    union = open_union
    os.mkdir(union.mnt / "shared")
    os.chmod(union.mnt / "shared", 0o777)
    os.unlink(union.mnt / "etc/conf.d/b.conf")  # leaves a whiteout to build over
    made = _as_user(1000, 1000, "sh", "-c",
                    f"cd {union.mnt}/shared && echo data > file && mkdir dir && ln -s t link "
                    f"&& mkfifo fifo")
    assert made.returncode == 0, made.stderr
    for name in ("file", "dir", "link", "fifo"):
        _same_attributes(os.lstat(union.mnt / "shared" / name),
                         os.lstat(union.upper / "shared" / name))
        assert os.lstat(union.mnt / "shared" / name).st_uid == 1000
    (union.mnt / "etc/conf.d/b.conf").write_text("new\n")
    _same_attributes(os.lstat(union.mnt / "etc/conf.d/b.conf"),
                     os.lstat(union.upper / "etc/conf.d/b.conf"))


def test_chmod_of_a_file_still_written_by_a_second_writer(union: Union) -> None:
    path = union.mnt / "var/two"
    first = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    second = os.open(path, os.O_WRONLY)
    try:
        os.close(first)  # the handle the union went through so far
        os.fchmod(second, 0o640)
        os.utime(second, ns=(5_000_000_000, 6_000_000_000))
        assert stat.S_IMODE(os.fstat(second).st_mode) == 0o640
    finally:
        os.close(second)
    os.chmod(path, 0o604)  # no writer left: by path
    upper = os.lstat(union.upper / "var/two")
    assert (stat.S_IMODE(upper.st_mode), upper.st_mtime_ns) == (0o604, 6_000_000_000)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o604
