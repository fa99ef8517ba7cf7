"""Every operation of the union in turn, in both whiteout formats, as s3ql's t3_fs_api takes
its Operations: each test checks what the operation answers and what it leaves in the
branches, and then the oracles (``harness.check``) must agree with the union: a fresh union
over the same branches, and di commit's reading of the format on disk.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from qvdfs.fuse.filesystem import ROOT_ID, SetattrChanges
from qvdfs.handlers import UnionFilesystem
from tests.union.harness import (
    CALLER,
    XATTRS,
    check,
    create,
    errno_of,
    hidden_on_disk,
    is_whiteout,
    lookup,
    mounted,
    names,
    node_of,
    read,
    write,
)

pytestmark = pytest.mark.timeout(30)

NOREPLACE, EXCHANGE = 1, 2


@dataclasses.dataclass
class Union:
    fs: UnionFilesystem
    d: dict[str, Path]
    fmt: str

    @property
    def upper(self) -> Path:
        return self.d["upper"]

    @property
    def base(self) -> Path:
        return self.d["base"]

    def hidden(self, path: str) -> bool:
        return hidden_on_disk(self.d, self.fmt, path)


@pytest.fixture(params=["overlay", "unionfs"])
def u(request: pytest.FixtureRequest, branches: dict[str, Path]) -> Iterator[Union]:
    """A union writing whiteouts in one format; the oracles judge it once the test is done."""
    options = ("-o", f"whiteout={request.param}")
    with mounted(branches, *options) as fs:
        yield Union(fs, branches, request.param)
        check(fs, branches, *options)


def test_lookup_and_getattr(u: Union) -> None:
    entry = lookup(u.fs, "dir/inner")
    st = os.lstat(u.base / "dir" / "inner")
    assert entry.attr is not None
    found = entry.attr.fields()
    assert (found.mode, found.size, found.uid) == (st.st_mode, st.st_size, st.st_uid)
    attr, _timeout = u.fs.getattr(entry.node_id, None, CALLER)
    assert attr.ino == entry.node_id and attr.fields().mtime_ns == st.st_mtime_ns
    assert lookup(u.fs, "dir/inner").node_id == entry.node_id  # one node per name
    assert u.fs.lookup(ROOT_ID, b"missing", CALLER).node_id == 0
    assert errno_of(lambda: u.fs.lookup(lookup(u.fs, "file").node_id, b"x", CALLER)) == \
        errno.ENOTDIR
    assert u.fs.readlink(lookup(u.fs, "link").node_id, CALLER) == b"file"
    assert os.listdir(u.upper) == [".qvdfs.work"]  # reading writes nothing


def test_mkdir(u: Union) -> None:
    entry = u.fs.mkdir(node_of(u.fs, "dir"), b"new", 0o750, CALLER)
    assert entry.attr is not None and entry.attr.mode == stat.S_IFDIR | 0o750
    assert (u.upper / "dir" / "new").is_dir()  # its parent was copied up first
    assert names(u.fs, "dir") == [b"inner", b"new", b"sub"]
    assert errno_of(lambda: u.fs.mkdir(ROOT_ID, b"file", 0o755, CALLER)) == errno.EEXIST
    assert errno_of(lambda: u.fs.mkdir(ROOT_ID, b"dir", 0o755, CALLER)) == errno.EEXIST


def test_mknod(u: Union) -> None:
    entry = u.fs.mknod(node_of(u.fs, "dir/sub"), b"fifo", stat.S_IFIFO | 0o640, 0, CALLER)
    assert entry.attr is not None and entry.attr.mode == stat.S_IFIFO | 0o640
    assert stat.S_ISFIFO(os.lstat(u.upper / "dir" / "sub" / "fifo").st_mode)
    assert errno_of(lambda: u.fs.mknod(ROOT_ID, b"w", stat.S_IFCHR, 0, CALLER)) == errno.EPERM
    assert errno_of(lambda: u.fs.mknod(ROOT_ID, b"link", stat.S_IFIFO | 0o600, 0, CALLER)) \
        == errno.EEXIST


def test_create_write_read(u: Union) -> None:
    entry = create(u.fs, "dir/made", b"hello world", 0o600)
    assert entry.attr is not None and entry.attr.mode == stat.S_IFREG | 0o600
    write(u.fs, "dir/made", b"HELLO", offset=0)
    write(u.fs, "dir/made", b"!", flags=os.O_WRONLY | os.O_APPEND, offset=11)
    assert read(u.fs, "dir/made") == b"HELLO world!"
    assert (u.upper / "dir" / "made").read_bytes() == b"HELLO world!"
    attr, _ = u.fs.getattr(entry.node_id, None, CALLER)
    assert attr.fields().size == 12  # the cached attributes followed the writes


def test_symlink(u: Union) -> None:
    entry = u.fs.symlink(node_of(u.fs, "dir"), b"up", b"../file", CALLER)
    assert entry.attr is not None and stat.S_ISLNK(entry.attr.mode)
    assert u.fs.readlink(entry.node_id, CALLER) == b"../file"
    assert os.readlink(u.upper / "dir" / "up") == "../file"
    assert errno_of(lambda: u.fs.symlink(ROOT_ID, b"file", b"x", CALLER)) == errno.EEXIST


def test_link_of_a_base_file_shares_one_node(u: Union) -> None:
    node = lookup(u.fs, "file").node_id
    entry = u.fs.link(node, node_of(u.fs, "dir"), b"again", CALLER)
    assert entry.node_id == node
    assert entry.attr is not None and entry.attr.fields().nlink == 2
    assert os.lstat(u.upper / "file").st_ino == os.lstat(u.upper / "dir" / "again").st_ino
    write(u.fs, "dir/again", b"BASE")
    assert read(u.fs, "file") == b"BASE data"  # one file under both names
    assert (u.base / "file").read_text() == "base data"


def test_unlink(u: Union) -> None:
    u.fs.unlink(ROOT_ID, b"file", CALLER)
    assert u.hidden("file") and (u.base / "file").exists()
    create(u.fs, "mine", b"x")
    u.fs.unlink(ROOT_ID, b"mine", CALLER)
    assert not os.path.lexists(u.upper / "mine") and not u.hidden("mine")  # nothing below
    assert errno_of(lambda: u.fs.unlink(ROOT_ID, b"file", CALLER)) == errno.ENOENT
    assert errno_of(lambda: u.fs.unlink(ROOT_ID, b"dir", CALLER)) == errno.EISDIR
    assert names(u.fs) == [b"dir", b"empty", b"link"]


def test_unlink_of_an_open_file_keeps_it_readable(u: Union) -> None:
    node = lookup(u.fs, "file").node_id
    opened = u.fs.open(node, os.O_RDONLY, CALLER)
    u.fs.unlink(ROOT_ID, b"file", CALLER)
    assert u.fs.read(node, opened.fh, 0, 100) == b"base data"
    attr, _ = u.fs.getattr(node, None, CALLER)
    assert attr.fields().size == len(b"base data")
    u.fs.release(node, opened.fh)
    u.fs.forget(node, 1)
    assert errno_of(lambda: u.fs.getattr(node, None, CALLER)) == errno.ESTALE


def test_rmdir(u: Union) -> None:
    assert errno_of(lambda: u.fs.rmdir(ROOT_ID, b"dir", CALLER)) == errno.ENOTEMPTY
    assert errno_of(lambda: u.fs.rmdir(ROOT_ID, b"file", CALLER)) == errno.ENOTDIR
    dir_ = node_of(u.fs, "dir")
    u.fs.unlink(dir_, b"inner", CALLER)
    u.fs.rmdir(dir_, b"sub", CALLER)
    u.fs.rmdir(ROOT_ID, b"dir", CALLER)  # what only whiteouts hide counts as empty
    assert u.hidden("dir") and (u.base / "dir" / "inner").exists()
    u.fs.mkdir(ROOT_ID, b"dir", 0o755, CALLER)
    assert names(u.fs, "dir") == []  # the new directory hides the old contents


def test_rename_of_a_file(u: Union) -> None:
    node = lookup(u.fs, "file").node_id
    u.fs.rename(ROOT_ID, b"file", node_of(u.fs, "dir/sub"), b"moved", 0, CALLER)
    assert lookup(u.fs, "dir/sub/moved").node_id == node
    assert u.hidden("file") and read(u.fs, "dir/sub/moved") == b"base data"
    u.fs.rename(node_of(u.fs, "dir/sub"), b"moved", node_of(u.fs, "dir"), b"inner", 0, CALLER)
    assert read(u.fs, "dir/inner") == b"base data"  # replaced the base's inner
    assert names(u.fs, "dir") == [b"inner", b"sub"]


def test_rename_of_a_directory_copies_it_up(u: Union) -> None:
    u.fs.rename(ROOT_ID, b"dir", ROOT_ID, b"moved", 0, CALLER)
    assert names(u.fs, "moved") == [b"inner", b"sub"]
    assert u.hidden("dir") and (u.upper / "moved" / "inner").read_text() == "inner"
    u.fs.rename(ROOT_ID, b"moved", ROOT_ID, b"empty", 0, CALLER)  # onto an empty directory
    assert names(u.fs) == [b"empty", b"file", b"link"]
    assert names(u.fs, "empty") == [b"inner", b"sub"]


def test_rename_flags(u: Union) -> None:
    assert errno_of(lambda: u.fs.rename(ROOT_ID, b"file", ROOT_ID, b"link", NOREPLACE,
                                        CALLER)) == errno.EEXIST
    u.fs.rename(ROOT_ID, b"file", ROOT_ID, b"link", EXCHANGE, CALLER)
    assert u.fs.readlink(lookup(u.fs, "file").node_id, CALLER) == b"file"
    assert read(u.fs, "link") == b"base data"
    assert errno_of(lambda: u.fs.rename(ROOT_ID, b"file", ROOT_ID, b"nothing", EXCHANGE,
                                        CALLER)) == errno.ENOENT
    u.fs.rename(ROOT_ID, b"file", ROOT_ID, b"new", NOREPLACE, CALLER)
    assert names(u.fs) == [b"dir", b"empty", b"link", b"new"]


def test_chmod_and_utimens_copy_metadata_only(u: Union) -> None:
    node = lookup(u.fs, "dir/inner").node_id
    attr, _ = u.fs.setattr(node, None, SetattrChanges(mode=0o600, mtime_ns=10**18), CALLER)
    assert stat.S_IMODE(attr.mode) == 0o600 and attr.fields().mtime_ns == 10**18
    upper = u.upper / "dir" / "inner"
    assert os.getxattr(upper, XATTRS.metacopy) == b""
    assert os.stat(upper).st_blocks == 0  # the data stays in the base
    assert read(u.fs, "dir/inner") == b"inner"
    st = os.stat(u.base / "dir" / "inner")
    assert stat.S_IMODE(st.st_mode) != 0o600 and st.st_mtime_ns != 10**18


def test_chown_to_the_callers_own_ids(u: Union) -> None:
    node = lookup(u.fs, "file").node_id
    attr, _ = u.fs.setattr(node, None, SetattrChanges(uid=CALLER.uid, gid=CALLER.gid), CALLER)
    owner = attr.fields()
    assert (owner.uid, owner.gid) == (CALLER.uid, CALLER.gid)
    assert os.path.lexists(u.upper / "file")


def test_truncate(u: Union) -> None:
    node = lookup(u.fs, "file").node_id
    attr, _ = u.fs.setattr(node, None, SetattrChanges(size=4), CALLER)
    assert attr.fields().size == 4 and read(u.fs, "file") == b"base"
    assert (u.upper / "file").read_bytes() == b"base"  # the data was copied up
    inner = lookup(u.fs, "dir/inner").node_id
    attr, _ = u.fs.setattr(inner, None, SetattrChanges(size=0), CALLER)
    assert attr.fields().size == 0 and read(u.fs, "dir/inner") == b""
    assert XATTRS.metacopy.decode() not in os.listxattr(u.upper / "dir" / "inner")
    assert (u.base / "dir" / "inner").read_text() == "inner"


def test_open_with_o_trunc(u: Union) -> None:
    write(u.fs, "file", b"new", flags=os.O_WRONLY | os.O_TRUNC)
    assert read(u.fs, "file") == b"new"
    assert (u.base / "file").read_text() == "base data"


def test_xattrs(u: Union) -> None:
    node = lookup(u.fs, "dir/inner").node_id
    assert errno_of(lambda: u.fs.getxattr(node, b"user.note", CALLER)) == errno.ENODATA
    u.fs.setxattr(node, b"user.note", b"hi", 0, CALLER)
    assert u.fs.getxattr(node, b"user.note", CALLER) == b"hi"
    assert b"user.note" in u.fs.listxattr(node, CALLER)
    assert os.getxattr(u.upper / "dir" / "inner", b"user.note") == b"hi"
    assert errno_of(lambda: u.fs.setxattr(node, b"user.note", b"x", os.XATTR_CREATE, CALLER)) \
        == errno.EEXIST
    u.fs.removexattr(node, b"user.note", CALLER)
    assert b"user.note" not in u.fs.listxattr(node, CALLER)
    assert errno_of(lambda: u.fs.removexattr(node, b"user.note", CALLER)) == errno.ENODATA
    # The union's own markers are neither shown nor writable.
    for key in (XATTRS.opaque, XATTRS.metacopy, XATTRS.redirect):
        assert errno_of(lambda: u.fs.setxattr(node, key, b"y", 0, CALLER)) == errno.EPERM
        assert key not in u.fs.listxattr(node, CALLER)


def test_readdir_merges_every_branch(u: Union) -> None:
    (u.upper / "dir").mkdir()
    (u.upper / "dir" / "top").write_text("top")
    with mounted(u.d, "-o", f"whiteout={u.fmt}") as fs:
        assert names(fs, "dir") == [b"inner", b"sub", b"top"]
        seen: list[tuple[bytes, int]] = []
        fs.readdir(node_of(fs, "dir"), 0, 0,
                   lambda name, node, kind, off: seen.append((name, kind)) is None)
        kinds = dict(seen)
        assert kinds[b"inner"] == stat.S_IFREG and kinds[b"sub"] == stat.S_IFDIR


def test_statfs_is_the_upper_branchs(u: Union) -> None:
    assert u.fs.statfs(ROOT_ID).f_bsize == os.statvfs(u.upper).f_bsize


def test_a_whiteout_on_disk_is_never_shown(u: Union) -> None:
    u.fs.unlink(node_of(u.fs, "dir"), b"inner", CALLER)
    assert u.hidden("dir/inner")
    if u.fmt == "overlay":
        assert is_whiteout(u.upper / "dir" / "inner")
    assert names(u.fs, "dir") == [b"sub"]
    assert u.fs.lookup(node_of(u.fs, "dir"), b"inner", CALLER).node_id == 0


def test_the_oracles_see_what_the_union_does_not(branches: dict[str, Path]) -> None:
    with mounted(branches) as fs:
        assert names(fs) == [b"dir", b"empty", b"file", b"link"]
        check(fs, branches)
        # Changed behind the union's back (never done to a mounted union): its index
        # does not show the new name, which both oracles read from disk.
        (branches["base"] / "late").write_text("late")
        with pytest.raises(AssertionError, match="fresh union"):
            check(fs, branches)
