"""qvdfs.fuse.Session mounted for real over a MirrorFS (see conftest.py and mirror.py)."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qvdfs.fuse.filesystem import ROOT_ID
from qvdfs.fuse.mount import MountOptions
from qvdfs.fuse.negotiate import FEATURES

from .conftest import wait_for
from .mirror import RENAME_EXCHANGE, RENAME_NOREPLACE, MirrorFS, renameat2

pytestmark = pytest.mark.timeout(60)

Mount = Callable[..., Any]
_libc = ctypes.CDLL(None, use_errno=True)


def _getxattr_size(path: Path, name: bytes, size: int) -> int:
    buf = ctypes.create_string_buffer(max(size, 1))
    n = _libc.getxattr(os.fsencode(path), name, buf if size else None, size)
    if n < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(n)


def _listxattr_size(path: Path, size: int) -> int:
    buf = ctypes.create_string_buffer(max(size, 1))
    n = _libc.listxattr(os.fsencode(path), buf if size else None, size)
    if n < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(n)


def test_mount_and_umount_end_serve(mount: Mount) -> None:
    with mount() as m:
        assert os.listdir(m.mnt) == []
        assert m.thread.is_alive()
        assert "passthrough" in m.fs.features      # kernel 6.18 offers it
        assert m.fs.notifier is m.session          # handed over with the features
    assert not m.thread.is_alive()
    assert m.fs.calls["destroy"] == 1


def test_lookup_getattr_and_readdir_of_many_entries(mount: Mount) -> None:
    with mount() as m:
        names = sorted(f"file-{i:04d}-{'x' * 60}" for i in range(1500))
        for name in names:
            (m.src / name).write_bytes(name.encode())
        assert sorted(os.listdir(m.mnt)) == names
        # 1500 entries of 70-byte names do not fit one reply (the kernel asks for the
        # getdents buffer's size, 32 KiB for Python's listdir).
        assert m.fs.calls["readdirplus"] + m.fs.calls["readdir"] > 3
        st, src = os.stat(m.mnt / names[17]), os.stat(m.src / names[17])
        assert (st.st_ino, st.st_size, st.st_mode) == (src.st_ino, src.st_size, src.st_mode)
        with os.scandir(m.mnt) as it:
            assert sum(1 for _ in it) == 1500
        counters = m.session.counters()["opcodes"]
        # READDIRPLUS_AUTO: plus for the first batch, plain ones after it unless the
        # entries are being looked up.
        calls = counters["READDIRPLUS"]["count"] + counters.get("READDIR", {}).get(
            "count", 0)
        assert calls >= 3 and counters["READDIRPLUS"]["ns"] > 0


def test_file_and_directory_operations(mount: Mount) -> None:
    with mount() as m:
        f = m.mnt / "f"
        f.write_bytes(b"hello world")
        assert (m.src / "f").read_bytes() == b"hello world"
        assert f.read_bytes() == b"hello world"
        with open(f, "r+b") as fh:
            fh.seek(6)
            fh.write(b"there")
        assert (m.src / "f").read_bytes() == b"hello there"
        os.truncate(f, 5)
        assert f.read_bytes() == b"hello"
        os.chmod(f, 0o600)
        assert os.stat(m.src / "f").st_mode & 0o777 == 0o600
        before = time.time_ns()
        os.utime(f, None)               # "now": FATTR_ATIME_NOW | FATTR_MTIME_NOW
        assert m.fs.last_setattr.mtime_ns is not None
        assert m.fs.last_setattr.mtime_ns >= before - 1_000_000
        os.utime(f, ns=(1_000_000_123, 2_000_000_456))
        assert os.stat(m.src / "f").st_mtime_ns == 2_000_000_456

        os.mkdir(m.mnt / "d", 0o750)
        assert os.path.isdir(m.src / "d")
        os.rename(f, m.mnt / "d" / "g")
        assert (m.src / "d" / "g").read_bytes() == b"hello"
        assert not f.exists()
        os.symlink("d/g", m.mnt / "s")
        assert os.readlink(m.mnt / "s") == "d/g"
        assert (m.mnt / "s").read_bytes() == b"hello"
        os.link(m.mnt / "d" / "g", m.mnt / "h")
        assert os.stat(m.mnt / "h").st_nlink == 2
        assert os.stat(m.src / "h").st_ino == os.stat(m.src / "d" / "g").st_ino
        os.unlink(m.mnt / "h")
        os.unlink(m.mnt / "d" / "g")
        with pytest.raises(OSError) as exc:
            os.rmdir(m.mnt / "nope")
        assert exc.value.errno == errno.ENOENT
        os.rmdir(m.mnt / "d")
        assert sorted(os.listdir(m.src)) == ["s"]
        os.mknod(m.mnt / "fifo", 0o644 | 0o010000)
        assert os.path.exists(m.src / "fifo")
        statfs, src_statfs = os.statvfs(m.mnt), os.statvfs(m.src)
        assert (statfs.f_blocks, statfs.f_bsize) == (src_statfs.f_blocks, src_statfs.f_bsize)
        with open(m.mnt / "synced", "wb") as fh:
            fh.write(b"x")
            os.fsync(fh.fileno())
            os.fdatasync(fh.fileno())
        assert m.fs.calls["fsync"] == 2


def test_rename2_noreplace_and_exchange(mount: Mount) -> None:
    with mount() as m:
        (m.mnt / "a").write_bytes(b"A")
        (m.mnt / "b").write_bytes(b"B")
        with pytest.raises(OSError) as exc:
            renameat2(m.mnt / "a", m.mnt / "b", RENAME_NOREPLACE)
        assert exc.value.errno == errno.EEXIST
        renameat2(m.mnt / "a", m.mnt / "b", RENAME_EXCHANGE)
        assert (m.mnt / "a").read_bytes() == b"B" and (m.mnt / "b").read_bytes() == b"A"
        assert (m.src / "a").read_bytes() == b"B"
        renameat2(m.mnt / "a", m.mnt / "c", RENAME_NOREPLACE)
        assert sorted(os.listdir(m.mnt)) == ["b", "c"]


def test_xattrs_with_size_probe_and_erange(mount: Mount) -> None:
    with mount() as m:
        f = m.mnt / "f"
        f.write_bytes(b"")
        os.setxattr(f, "user.colour", b"ultramarine")
        os.setxattr(f, "user.n", b"1")
        assert os.getxattr(m.src / "f", "user.colour") == b"ultramarine"
        assert os.getxattr(f, "user.colour") == b"ultramarine"
        assert _getxattr_size(f, b"user.colour", 0) == len(b"ultramarine")
        with pytest.raises(OSError) as exc:
            _getxattr_size(f, b"user.colour", 3)
        assert exc.value.errno == errno.ERANGE
        assert sorted(os.listxattr(f)) == ["user.colour", "user.n"]
        assert _listxattr_size(f, 0) == len(b"user.colour\0user.n\0")
        with pytest.raises(OSError) as exc:
            _listxattr_size(f, 4)
        assert exc.value.errno == errno.ERANGE
        with pytest.raises(OSError) as exc:
            os.setxattr(f, "user.n", b"2", os.XATTR_CREATE)
        assert exc.value.errno == errno.EEXIST
        os.removexattr(f, "user.n")
        with pytest.raises(OSError) as exc:
            os.getxattr(f, "user.n")
        assert exc.value.errno == errno.ENODATA
        assert os.listxattr(f) == ["user.colour"]


@pytest.mark.parametrize("disabled", [frozenset(), frozenset({"passthrough"})])
def test_fallocate_lseek_and_copy_file_range_reach_the_fs(mount: Mount,
                                                          disabled: frozenset[str]) -> None:
    with mount(disabled=disabled) as m:
        with open(m.src / "sparse", "wb") as fh:
            fh.seek(1 << 20)
            fh.write(b"d" * 4096)
        fd = os.open(m.mnt / "sparse", os.O_RDWR)
        try:
            assert os.lseek(fd, 0, os.SEEK_DATA) == 1 << 20
            assert os.lseek(fd, 1 << 20, os.SEEK_HOLE) == (1 << 20) + 4096
            assert m.fs.calls["lseek"] == 2
            os.posix_fallocate(fd, 0, 8192)
            assert m.fs.calls["fallocate"] == 1
            assert os.stat(m.src / "sparse").st_blocks >= 16 + 8
            out = os.open(m.mnt / "copy", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                assert os.copy_file_range(fd, out, 4096, 1 << 20, 0) == 4096
            finally:
                os.close(out)
            assert m.fs.calls["copy_file_range"] >= 1
            assert (m.src / "copy").read_bytes() == b"d" * 4096
        finally:
            os.close(fd)


@pytest.mark.parametrize("disabled", [frozenset(), frozenset({"passthrough"})])
def test_o_direct_opens_work(mount: Mount, disabled: frozenset[str]) -> None:
    with mount(disabled=disabled) as m:
        subprocess.run(["dd", "if=/dev/urandom", f"of={m.mnt / 'd'}", "bs=4096", "count=64",
                        "oflag=direct", "status=none"], check=True, timeout=20)
        copy = m.mnt.parent / f"copy-{len(disabled)}"
        subprocess.run(["dd", f"if={m.mnt / 'd'}", f"of={copy}", "bs=4096", "iflag=direct",
                        "status=none"], check=True, timeout=20)
        assert copy.read_bytes() == (m.src / "d").read_bytes()
        assert len(copy.read_bytes()) == 64 * 4096
        assert not m.fs.last_open_flags & os.O_DIRECT


def test_a_slow_request_does_not_hold_up_others(mount: Mount) -> None:
    with mount(threads=4) as m:
        (m.src / "slow").write_bytes(b"")
        (m.src / "fast").write_bytes(b"fast")
        os.symlink("fast", m.src / "link")
        gate = threading.Event()
        m.fs.gates["readlink"] = gate
        t = threading.Thread(target=os.readlink, args=(m.mnt / "link",))
        t.start()
        try:
            assert wait_for(lambda: m.fs.calls["readlink"] == 1)
            start = time.monotonic()
            assert (m.mnt / "fast").read_bytes() == b"fast"
            assert os.listdir(m.mnt)
            assert time.monotonic() - start < 1.0
            assert t.is_alive()          # the readlink is still waiting in the filesystem
        finally:
            gate.set()
            t.join(10)


def test_notifications(mount: Mount) -> None:
    fs_timeout = 60.0
    with mount(fs=None) as m:
        m.fs.timeout = fs_timeout
        (m.src / "a").write_bytes(b"12345")
        assert os.stat(m.mnt / "a").st_size == 5
        assert not (m.mnt / "b").exists()            # a negative entry, kept 60 s
        os.rename(m.src / "a", m.src / "b")          # behind the kernel's back
        assert not (m.mnt / "b").exists() and (m.mnt / "a").exists()
        m.session.invalidate_entry(ROOT_ID, b"a")
        m.session.invalidate_entry(ROOT_ID, b"b")
        m.session.invalidate_entry(ROOT_ID, b"never-looked-up")   # ENOENT: ignored
        assert m.session.wait_notifications(5)
        # MirrorFS keys nodes by path; tell it about the move too.
        with m.fs.lock:
            node = m.fs.ids.pop(str(m.src / "a"))
            m.fs.ids[str(m.src / "b")] = node
            m.fs.paths[node] = str(m.src / "b")
        assert (m.mnt / "b").read_bytes() == b"12345"
        assert not (m.mnt / "a").exists()

        assert os.stat(m.mnt / "b").st_size == 5
        with open(m.src / "b", "ab") as fh:
            fh.write(b"678")
        assert os.stat(m.mnt / "b").st_size == 5     # attributes cached 60 s
        m.session.invalidate_inode(node, -1)
        assert m.session.wait_notifications(5)
        assert os.stat(m.mnt / "b").st_size == 8

        os.unlink(m.src / "b")
        assert (m.mnt / "b").exists()
        m.session.notify_delete(ROOT_ID, node, b"b")
        assert m.session.wait_notifications(5)
        assert not (m.mnt / "b").exists()


def _drop_caches() -> None:
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")


@pytest.mark.parametrize("disabled", [frozenset(), frozenset({"readdirplus"})])
def test_forget_counts_add_up(mount: Mount, disabled: frozenset[str]) -> None:
    with mount(disabled=disabled) as m:
        for i in range(200):
            (m.src / f"f{i}").write_bytes(b"x")
        os.mkdir(m.src / "d")
        for i in range(50):
            os.stat(m.mnt / f"f{i}")
            (m.mnt / "d" / f"n{i}").write_bytes(b"y")
        os.listdir(m.mnt)
        os.listdir(m.mnt / "d")
        # readdirplus hands out a lookup for every listed entry; plain readdir none.
        assert sum(m.fs.lookups.values()) >= (101 if disabled else 250)
        assert m.fs.calls["readdirplus" if not disabled else "readdir"] > 0

        def all_forgotten() -> bool:
            _drop_caches()
            return all(n == 0 for n in m.fs.lookups.values())
        assert wait_for(all_forgotten, 10), (sum(m.fs.lookups.values()), m.session.counters())
        assert m.session.counters()["opcodes"].get("BATCH_FORGET", {}).get("count", 0) + \
            m.session.counters()["opcodes"].get("FORGET", {}).get("count", 0) > 0


def test_passthrough_reads_never_reach_the_fs(mount: Mount) -> None:
    data = os.urandom(3 << 20)
    with mount() as m:
        (m.src / "big").write_bytes(data)
        with open(m.mnt / "big", "rb") as fh:
            assert fh.read() == data
            assert m.session.counters()["backing_ids"] == 1
        (m.mnt / "new").write_bytes(b"written through")
        assert (m.src / "new").read_bytes() == b"written through"
        assert m.fs.calls["read"] == 0 and m.fs.calls["write"] == 0
        counters = m.session.counters()
        assert counters["passthrough_opens"] == 2
        assert "READ" not in counters["opcodes"] and "WRITE" not in counters["opcodes"]
        assert wait_for(lambda: m.session.counters()["backing_ids"] == 0)


def test_passthrough_rules_for_one_inode(mount: Mount) -> None:
    with mount() as m:
        (m.src / "f").write_bytes(b"lower")
        (m.src / "upper").write_bytes(b"upper")
        r1 = os.open(m.mnt / "f", os.O_RDONLY)
        node = m.fs.node_of(str(m.src / "f"))
        try:
            # Same file again: the same backing id is reused.
            r2 = os.open(m.mnt / "f", os.O_RDONLY)
            assert m.session.counters()["backing_ids"] == 1
            assert m.session.counters()["passthrough_opens"] == 2
            # A writer on a different file (a copy-up) while readers read the lower one.
            m.fs.redirect[node] = str(m.src / "upper")
            before = set(m.fs.open_fds)
            with pytest.raises(OSError) as exc:
                os.open(m.mnt / "f", os.O_RDWR)
            assert exc.value.errno == errno.ETXTBSY
            assert m.fs.open_fds == before                  # the refused open was released
            assert m.session.counters()["passthrough_refused"] == 1
            assert os.pread(r1, 5, 0) == b"lower" and os.pread(r2, 5, 0) == b"lower"
            os.close(r2)
        finally:
            os.close(r1)
        # Once the readers are gone the copied-up file gets its own backing.
        assert wait_for(lambda: m.session.counters()["backing_ids"] == 0)
        w = os.open(m.mnt / "f", os.O_RDWR)
        try:
            assert os.pread(w, 5, 0) == b"upper"
        finally:
            os.close(w)
        assert m.fs.calls["read"] == 0

        # A cached (served) open first: a later open of the node is served as well.
        (m.src / "g").write_bytes(b"served")
        os.stat(m.mnt / "g")
        g = m.fs.node_of(str(m.src / "g"))
        m.fs.no_backing.add(g)
        c1 = os.open(m.mnt / "g", os.O_RDONLY)
        try:
            m.fs.no_backing.discard(g)
            c2 = os.open(m.mnt / "g", os.O_RDONLY)
            assert os.pread(c2, 6, 0) == b"served"
            assert m.fs.calls["read"] >= 1
            assert m.session.counters()["backing_ids"] == 0
            os.close(c2)
        finally:
            os.close(c1)


def test_passthrough_off_serves_reads(mount: Mount) -> None:
    with mount(disabled=frozenset({"passthrough"})) as m:
        (m.src / "f").write_bytes(b"served by the daemon")
        assert "passthrough" not in m.fs.features
        assert (m.mnt / "f").read_bytes() == b"served by the daemon"
        (m.mnt / "g").write_bytes(b"w")
        assert m.fs.calls["read"] >= 1 and m.fs.calls["write"] >= 1
        assert m.session.counters()["passthrough_opens"] == 0


def test_readdirplus_off_uses_plain_readdir(mount: Mount) -> None:
    with mount(disabled=frozenset({"readdirplus"})) as m:
        for i in range(20):
            (m.src / f"f{i}").write_bytes(b"")
        assert len(os.listdir(m.mnt)) == 20
        assert m.fs.calls["readdir"] > 0 and m.fs.calls["readdirplus"] == 0
        assert "readdirplus" not in m.fs.features and "readdirplus_auto" not in m.fs.features


@pytest.mark.parametrize("no_opendir", [True, False])
def test_no_opendir(mount: Mount, no_opendir: bool) -> None:
    disabled = frozenset() if no_opendir else frozenset({"no_opendir"})
    with mount(disabled=disabled) as m:
        (m.src / "x").write_bytes(b"")
        m.fs.fail["opendir"] = lambda: OSError(errno.ENOSYS, "no opendir")
        for _ in range(3):
            assert os.listdir(m.mnt) == ["x"]
        # With NO_OPENDIR_SUPPORT the kernel stops asking after one ENOSYS; without it
        # every opendir(2) reaches the filesystem (the session answers ENOSYS with fh 0).
        assert m.fs.calls["opendir"] == (1 if no_opendir else 3)


@pytest.mark.parametrize("feature", sorted(set(FEATURES) - {"allow_idmap"}))
def test_each_disabled_feature_still_works(mount: Mount, feature: str) -> None:
    with mount(disabled=frozenset({feature}), options=MountOptions(default_permissions=True)) as m:
        assert feature not in m.fs.features
        data = os.urandom(2 << 20)
        (m.mnt / "f").write_bytes(data)
        assert (m.mnt / "f").read_bytes() == data
        assert (m.src / "f").read_bytes() == data
        os.symlink("f", m.mnt / "s")
        assert os.readlink(m.mnt / "s") == "f"
        os.mkdir(m.mnt / "d")
        assert sorted(os.listdir(m.mnt)) == ["d", "f", "s"]
        os.rename(m.mnt / "f", m.mnt / "d" / "f")
        os.truncate(m.mnt / "d" / "f", 1)
        assert os.stat(m.mnt / "d" / "f").st_size == 1
        if feature == "max_pages":
            assert m.session.max_write == 128 << 10
    if feature != "posix_acl":
        # posix_acl is asked for only with default_permissions, as here.
        assert {"posix_acl", "readdirplus", "passthrough"} - {feature} <= m.fs.features


def test_idmap_is_asked_for_only_when_wanted(mount: Mount) -> None:
    with mount() as m:
        os.listdir(m.mnt)
        assert "allow_idmap" not in m.fs.features
    with mount(idmap=True) as m:           # not without default_permissions
        os.listdir(m.mnt)
        assert "allow_idmap" not in m.fs.features
    with mount(idmap=True, options=MountOptions(default_permissions=True)) as m:
        os.listdir(m.mnt)
        assert "allow_idmap" in m.fs.features
    with mount(idmap=True, options=MountOptions(default_permissions=True),
               disabled=frozenset({"allow_idmap"})) as m:
        os.listdir(m.mnt)
        assert "allow_idmap" not in m.fs.features


def test_a_bug_in_the_fs_costs_one_request(mount: Mount, caplog: pytest.LogCaptureFixture) -> None:
    with mount() as m:
        (m.src / "x").write_bytes(b"x")
        m.fs.fail["lookup"] = lambda: RuntimeError("a bug")
        with caplog.at_level(logging.ERROR, logger="qvdfs.fuse"):
            with pytest.raises(OSError) as exc:
                os.stat(m.mnt / "x")
        assert exc.value.errno == errno.EIO
        assert any("a bug" in (r.exc_text or "") or r.exc_info for r in caplog.records)
        del m.fs.fail["lookup"]
        assert (m.mnt / "x").read_bytes() == b"x"
        m.fs.fail["getxattr"] = lambda: OSError(errno.EPERM, "denied")
        with pytest.raises(OSError) as exc:
            os.getxattr(m.mnt / "x", "user.a")
        assert exc.value.errno == errno.EPERM


class _WithoutFallocate(MirrorFS):
    def __getattribute__(self, name: str) -> Any:
        if name == "fallocate":
            raise AttributeError(name)
        return super().__getattribute__(name)


def test_missing_methods_and_unserved_opcodes_answer_enosys(mount: Mount,
                                                            tmp_path: Path) -> None:
    (tmp_path / "nf-src").mkdir()
    fs = _WithoutFallocate(str(tmp_path / "nf-src"))
    assert not hasattr(fs, "fallocate")
    with mount(fs=fs, name="nf") as m:
        (m.src / "x").write_bytes(b"")
        fd = os.open(m.mnt / "x", os.O_RDWR)
        try:
            # fallocate(2) itself: posix_fallocate would fall back to writing zeros.
            for _ in range(2):
                assert _libc.fallocate(fd, 0, ctypes.c_long(0), ctypes.c_long(4096)) == -1
                assert ctypes.get_errno() == errno.EOPNOTSUPP   # the kernel's word for ENOSYS
        finally:
            os.close(fd)
        ops = m.session.counters()["opcodes"]
        assert ops["FALLOCATE"]["count"] == 1            # remembered after one ENOSYS
        # ACCESS: ENOSYS, so the kernel grants access(2) without asking again.
        assert os.access(m.mnt / "x", os.R_OK)
        assert os.access(m.mnt / "x", os.W_OK)
        assert m.session.counters()["opcodes"]["ACCESS"]["count"] == 1
        # FLUSH: the filesystem has no flush method; after one ENOSYS the kernel stops.
        for _ in range(3):
            (m.mnt / "x").read_bytes()
        assert m.session.counters()["opcodes"]["FLUSH"]["count"] == 1
        # GETLK: ENOSYS, but without POSIX_LOCKS the kernel keeps locks itself.

        with open(m.mnt / "x", "r+b") as fh:
            fcntl.lockf(fh, fcntl.LOCK_EX)
            fcntl.lockf(fh, fcntl.LOCK_UN)
        assert "SETLK" not in m.session.counters()["opcodes"]


def test_allow_root_refuses_other_users(mount: Mount) -> None:
    with mount(public_dir=True, options=MountOptions(allow_root=True)) as m:
        (m.src / "x").write_bytes(b"x")
        os.chmod(m.src, 0o755)
        assert _as_nobody(lambda: os.stat(m.src / "x")) == 0          # the path is open
        assert _as_nobody(lambda: os.stat(m.mnt / "x")) == errno.EACCES
        assert (m.mnt / "x").read_bytes() == b"x"                   # root gets in
    with mount(public_dir=True, options=MountOptions(allow_other=True)) as m:
        (m.src / "x").write_bytes(b"x")
        assert _as_nobody(lambda: os.stat(m.mnt / "x")) == 0


def _as_nobody(action: Callable[[], Any]) -> int:
    """Run ``action`` in a child as uid/gid 65534: 0 if it worked, else the errno."""
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            os.setgid(65534)
            os.setuid(65534)
            action()
            code = 0
        except OSError as exc:
            code = exc.errno or 255
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_kill_suidgid_reaches_the_fs(mount: Mount) -> None:
    with mount(public_dir=True, options=MountOptions(allow_other=True),
               disabled=frozenset({"passthrough"})) as m:
        f = m.src / "suid"
        f.write_bytes(b"#!/bin/true\n")
        os.chown(f, 65534, 65534)
        os.chmod(f, 0o6777)
        os.stat(m.mnt / "suid")
        # An unprivileged truncate of a set-id file: SETATTR with FATTR_KILL_SUIDGID.
        assert _as_nobody(lambda: os.truncate(m.mnt / "suid", 1)) == 0
        assert m.fs.last_setattr.size == 1 and m.fs.last_setattr.kill_suidgid
        os.chmod(f, 0o6777)
        os.stat(m.mnt / "suid")

        def write() -> None:
            fd = os.open(m.mnt / "suid", os.O_WRONLY)
            try:
                os.write(fd, b"x")
            finally:
                os.close(fd)
        assert _as_nobody(write) == 0
        assert m.fs.last_write_unprivileged is not None
        assert m.fs.last_write_unprivileged.uid == 65534


def test_an_acl_set_outside_the_files_group_asks_to_drop_setgid(mount: Mount) -> None:
    """With SETXATTR_EXT the kernel says when an access ACL change drops set-group-id."""
    # posix_acl_xattr: version 2, then (tag, perm, id): user::rwx group::rwx other::rwx
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, 7, 0xFFFFFFFF)
                                          for tag in (0x01, 0x04, 0x20))
    with mount(public_dir=True,
               options=MountOptions(allow_other=True, default_permissions=True)) as m:
        f = m.src / "sgid"
        f.write_bytes(b"")
        os.chown(f, 65534, 0)  # nobody owns it; its group is root's, which nobody is not in
        os.chmod(f, 0o2755)
        os.stat(m.mnt / "sgid")
        assert _as_nobody(lambda: os.setxattr(m.mnt / "sgid", "system.posix_acl_access", acl)) == 0
        assert m.fs.last_setxattr_kill_sgid is True
