"""``qvdfs.union.entry``: an entry changed through an open descriptor and through its folder
and name ends up the same, and by name a symlink is never followed.

Plain files in a temporary folder, no union; the caller's own ids only, so the fast tier
runs these as ``nobody`` too.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from qvdfs.union.entry import Entry, NamedEntry, OpenEntry

pytestmark = pytest.mark.timeout(30)

ATTR = b"user.test"
SETUID_MODE = 0o4755


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[int]:
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


def _make_file(folder: Path, name: str) -> Path:
    path = folder / name
    path.write_bytes(b"data")
    os.chmod(path, SETUID_MODE)
    os.setxattr(path, ATTR, b"value")
    return path


def _change(entry: Entry) -> os.stat_result:
    """What setattr and kill_privileges do to a file: owner, mode, one time, an xattr."""
    entry.chown(os.getuid(), -1)
    entry.chmod(0o2750)
    entry.utime(None, 7_000_000_000)
    entry.removexattr(ATTR)
    return entry.stat()


def _seen(st: os.stat_result) -> tuple[int, ...]:
    return st.st_uid, st.st_gid, st.st_mode, st.st_mtime_ns


def test_the_same_changes_through_a_descriptor_and_by_name_give_the_same_file(
        tmp_path: Path, folder: int) -> None:
    by_fd, by_name = _make_file(tmp_path, "by_fd"), _make_file(tmp_path, "by_name")
    atime_ns = 3_000_000_000
    for path in (by_fd, by_name):
        os.utime(path, ns=(atime_ns, 1_000_000_000))
    fd = os.open(by_fd, os.O_RDWR)
    try:
        through_fd = _change(OpenEntry(fd))
    finally:
        os.close(fd)
    through_name = _change(NamedEntry(folder, b"by_name"))
    assert _seen(through_fd) == _seen(through_name) == _seen(os.lstat(by_name))
    assert stat.S_IMODE(through_name.st_mode) == 0o2750
    # utime kept the access time it was not given; removexattr removed it in both.
    assert through_fd.st_atime_ns == through_name.st_atime_ns == atime_ns
    assert os.listxattr(by_fd) == os.listxattr(by_name) == []


def test_chown_drops_set_user_id_the_same_way_in_both_forms(tmp_path: Path, folder: int) -> None:
    """The kernel clears set-user-id on any chown of a file: what ``_chown_new`` repairs."""
    by_fd, by_name = _make_file(tmp_path, "by_fd"), _make_file(tmp_path, "by_name")
    fd = os.open(by_fd, os.O_RDONLY)
    try:
        OpenEntry(fd).chown(os.getuid(), os.getgid())
    finally:
        os.close(fd)
    NamedEntry(folder, b"by_name").chown(os.getuid(), os.getgid())
    assert stat.S_IMODE(os.stat(by_fd).st_mode) == stat.S_IMODE(os.stat(by_name).st_mode) == 0o755


def test_by_name_a_symlink_is_changed_itself_or_refused_never_followed(
        tmp_path: Path, folder: int) -> None:
    target = _make_file(tmp_path, "target")
    before = os.stat(target)
    (tmp_path / "link").symlink_to("target")
    link = NamedEntry(folder, b"link")
    assert stat.S_ISLNK(link.stat().st_mode)
    link.chown(os.getuid(), os.getgid())  # lchown: the target keeps its set-user-id bit
    with pytest.raises(OSError) as refused:
        link.chmod(0o600)
    assert refused.value.errno == errno.EOPNOTSUPP
    link.utime(5_000_000_000, 6_000_000_000)
    assert os.lstat(tmp_path / "link").st_mtime_ns == 6_000_000_000
    after = os.stat(target)
    assert (after.st_mode, after.st_mtime_ns) == (before.st_mode, before.st_mtime_ns)
    with pytest.raises(OSError) as refused:
        link.removexattr(ATTR)
    assert refused.value.errno == errno.EPERM  # Linux keeps user.* attributes off symlinks
    assert os.getxattr(target, ATTR) == b"value"


def test_the_folder_itself_is_named_dot(tmp_path: Path, folder: int) -> None:
    NamedEntry(folder, b".").utime(None, 9_000_000_000)
    assert os.stat(tmp_path).st_mtime_ns == 9_000_000_000
