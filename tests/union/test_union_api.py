"""The union's request handling driven in-process, without FUSE: ``UnionFilesystem`` on plain
directories, called as the kernel would call it (as s3ql's t3_fs_api drives its Operations).

Fast and exact: each test checks what a request answers and what it leaves in the branches
(whiteouts, opaque markers, copy-ups), with no mount to set up or tear down, and without
root (see ``harness``). ``test_operations`` takes every operation in turn.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from qvdfs.fuse.filesystem import ROOT_ID, SetattrChanges
from qvdfs.handlers import UnionFilesystem
from qvdformat import markers
from tests.union.harness import (
    CALLER,
    XATTRS,
    errno_of,
    hidden_on_disk,
    is_whiteout,
    lookup,
    make_fs,
    mounted,
    names,
)

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def fs(branches: dict[str, Path]) -> Iterator[UnionFilesystem]:
    with mounted(branches) as fs:
        yield fs


def test_merged_listing_and_lookup(fs: UnionFilesystem, branches: dict[str, Path]) -> None:
    (branches["upper"] / "new").write_text("upper")
    assert names(fs) == [b"dir", b"empty", b"file", b"link", b"new"]
    assert lookup(fs, "dir/inner").attr is not None
    assert fs.lookup(ROOT_ID, b"missing", CALLER).node_id == 0  # a cached miss, not an error


def test_a_name_longer_than_255_bytes_is_enametoolong_everywhere(fs: UnionFilesystem) -> None:
    long = b"x" * 256
    assert errno_of(lambda: fs.lookup(ROOT_ID, long, CALLER)) == errno.ENAMETOOLONG
    assert errno_of(lambda: fs.mknod(ROOT_ID, long, stat.S_IFIFO | 0o644, 0, CALLER)) == \
        errno.ENAMETOOLONG
    assert errno_of(lambda: fs.mkdir(ROOT_ID, long, 0o755, CALLER)) == errno.ENAMETOOLONG
    assert errno_of(lambda: fs.create(ROOT_ID, long, 0o644, os.O_WRONLY, CALLER)) == \
        errno.ENAMETOOLONG
    assert errno_of(lambda: fs.rename(ROOT_ID, b"file", ROOT_ID, long, 0, CALLER)) == \
        errno.ENAMETOOLONG


def test_unlink_of_a_base_file_leaves_a_whiteout(fs: UnionFilesystem,
                                                  branches: dict[str, Path]) -> None:
    fs.unlink(ROOT_ID, b"file", CALLER)
    assert is_whiteout(branches["upper"] / "file")
    assert (branches["base"] / "file").read_text() == "base data"
    assert b"file" not in names(fs)
    # A new file of that name replaces the whiteout.
    entry, opened = fs.create(ROOT_ID, b"file", 0o644, os.O_WRONLY, CALLER)
    fs.write(entry.node_id, opened.fh, 0, memoryview(b"new"), None)
    fs.release(entry.node_id, opened.fh)
    assert (branches["upper"] / "file").read_text() == "new"


def test_rmdir_then_mkdir_makes_an_opaque_directory(fs: UnionFilesystem,
                                                    branches: dict[str, Path]) -> None:
    fs.rmdir(ROOT_ID, b"empty", CALLER)
    assert is_whiteout(branches["upper"] / "empty")
    fs.mkdir(ROOT_ID, b"empty", 0o755, CALLER)
    upper_dir = branches["upper"] / "empty"
    assert upper_dir.is_dir()
    assert os.getxattr(upper_dir, XATTRS.opaque) == b"y"
    assert errno_of(lambda: fs.rmdir(ROOT_ID, b"dir", CALLER)) == errno.ENOTEMPTY


def test_write_open_copies_up_and_read_only_open_does_not(fs: UnionFilesystem,
                                                         branches: dict[str, Path]) -> None:
    node = lookup(fs, "file").node_id
    opened = fs.open(node, os.O_RDONLY, CALLER)
    assert fs.read(node, opened.fh, 0, 100) == b"base data"
    assert not (branches["upper"] / "file").exists()
    writer = fs.open(node, os.O_WRONLY, CALLER)
    assert (branches["upper"] / "file").read_text() == "base data"
    fs.write(node, writer.fh, 0, memoryview(b"BASE"), None)
    # The read-only open follows the file's data to the upper branch.
    assert fs.read(node, opened.fh, 0, 100) == b"BASE data"
    assert (branches["base"] / "file").read_text() == "base data"
    for fh in (opened.fh, writer.fh):
        fs.release(node, fh)
    assert fs.counters()["copy_ups"] == 1


def test_chmod_copies_metadata_only(fs: UnionFilesystem, branches: dict[str, Path]) -> None:
    node = lookup(fs, "file").node_id
    attr, _ = fs.setattr(node, None, SetattrChanges(mode=0o600), CALLER)
    assert stat.S_IMODE(attr.mode) == 0o600
    upper = branches["upper"] / "file"
    assert os.getxattr(upper, XATTRS.metacopy) == b""
    assert os.stat(upper).st_blocks == 0  # sparse: the data stays in the base
    opened = fs.open(node, os.O_RDONLY, CALLER)
    assert fs.read(node, opened.fh, 0, 100) == b"base data"
    fs.release(node, opened.fh)


def test_kill_suidgid_clears_setuid(fs: UnionFilesystem, branches: dict[str, Path]) -> None:
    # File capabilities need root to set: tests/qvdfs/test_union.py checks they go too.
    os.chmod(branches["base"] / "file", 0o6755)
    node = lookup(fs, "file").node_id
    writer = fs.open(node, os.O_WRONLY, CALLER)
    fs.write(node, writer.fh, 0, memoryview(b"x"), CALLER)
    fs.release(node, writer.fh)
    upper = branches["upper"] / "file"
    assert stat.S_IMODE(os.stat(upper).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(branches["base"] / "file").st_mode) == 0o6755


def test_rename_of_a_base_directory_copies_it_up_whole(fs: UnionFilesystem,
                                                       branches: dict[str, Path]) -> None:
    fs.rename(ROOT_ID, b"dir", ROOT_ID, b"moved", 0, CALLER)
    assert names(fs, "moved") == [b"inner", b"sub"]
    assert is_whiteout(branches["upper"] / "dir")
    assert (branches["upper"] / "moved" / "inner").read_text() == "inner"
    assert (branches["base"] / "dir" / "inner").exists()
    assert b"dir" not in names(fs)


def test_rename_flags(fs: UnionFilesystem, branches: dict[str, Path]) -> None:
    noreplace, exchange = 1, 2
    assert errno_of(lambda: fs.rename(ROOT_ID, b"file", ROOT_ID, b"link", noreplace, CALLER)) \
        == errno.EEXIST
    fs.rename(ROOT_ID, b"file", ROOT_ID, b"link", exchange, CALLER)
    assert stat.S_ISLNK(lookup(fs, "file").attr.mode)  # type: ignore[union-attr]
    assert stat.S_ISREG(lookup(fs, "link").attr.mode)  # type: ignore[union-attr]
    assert errno_of(lambda: fs.rename(ROOT_ID, b"file", ROOT_ID, b"nothing", exchange, CALLER)) \
        == errno.ENOENT


def test_readdir_offsets_resume_the_listing_they_started(fs: UnionFilesystem) -> None:
    first: list[tuple[bytes, int]] = []

    def take_two(name: bytes, node_id: int, kind: int, offset: int) -> bool:
        if len(first) == 2:
            return False  # the reply is full: this entry was not sent
        first.append((name, offset))
        return True

    fs.readdir(ROOT_ID, 0, 0, take_two)
    # Changes between two READDIR calls of one stream.
    fs.mknod(ROOT_ID, b"zz", stat.S_IFIFO | 0o644, 0, CALLER)
    fs.rename(ROOT_ID, b"empty", ROOT_ID, b"aa", 0, CALLER)
    rest: list[bytes] = []
    fs.readdir(ROOT_ID, 0, first[-1][1], lambda n, i, k, o: rest.append(n) is None)
    seen = [name for name, _ in first] + rest
    # Every entry that did not change comes exactly once.
    for name in (b".", b"..", b"dir", b"file", b"link"):
        assert seen.count(name) == 1, seen
    fresh: list[bytes] = []
    fs.readdir(ROOT_ID, 0, 0, lambda n, i, k, o: fresh.append(n) is None)
    assert b"zz" in fresh and b"aa" in fresh and b"empty" not in fresh


def test_whiteouts_cannot_be_forged(fs: UnionFilesystem) -> None:
    assert errno_of(lambda: fs.mknod(ROOT_ID, b"w", stat.S_IFCHR | 0o600, 0, CALLER)) == errno.EPERM
    node = lookup(fs, "file").node_id
    assert errno_of(lambda: fs.setxattr(node, XATTRS.opaque, b"y", 0, CALLER)) == errno.EPERM
    assert fs.lookup(ROOT_ID, markers.WORK_DIR, CALLER).node_id == 0  # never shown


def test_unionfs_whiteout_format(branches: dict[str, Path]) -> None:
    with mounted(branches, "-o", "whiteout=unionfs") as fs:
        fs.unlink(ROOT_ID, b"file", CALLER)
        assert (branches["upper"] / ".unionfs-fuse" / "file_HIDDEN~").exists()
        assert b"file" not in names(fs)
    with mounted(branches) as fs:  # read back by a new mount
        assert b"file" not in names(fs)


def test_a_mount_ending_leaves_the_next_mounts_work_folder(branches: dict[str, Path]) -> None:
    first = make_fs(branches)
    second = make_fs(branches)  # a VM restarted before the old daemon finished
    first.destroy()
    work = branches["upper"] / ".qvdfs.work"
    assert work.is_dir() and len(os.listdir(work)) == 1
    # The second mount can still copy up through its work folder.
    node = lookup(second, "file").node_id
    second.release(node, second.open(node, os.O_WRONLY, CALLER).fh)
    assert (branches["upper"] / "file").read_text() == "base data"
    second.destroy()
    assert not work.exists()


def test_crash_leftovers_in_the_work_folder_are_removed(branches: dict[str, Path]) -> None:
    work = branches["upper"] / ".qvdfs.work"
    (work / "1234-dead").mkdir(parents=True)
    (work / "1234-dead" / "tmp-half").write_text("half a copy")
    (work / "tmp-old").write_text("left by an older qvdfs")
    with mounted(branches):
        assert len(os.listdir(work)) == 1
        assert not (work / "1234-dead").exists() and not (work / "tmp-old").exists()


@pytest.mark.parametrize("fmt", ["overlay", "unionfs"])
def test_remove_rename_and_create_in_either_whiteout_format(branches: dict[str, Path],
                                                            fmt: str) -> None:
    with mounted(branches, "-o", f"whiteout={fmt}") as fs:
        fs.unlink(ROOT_ID, b"file", CALLER)
        assert hidden_on_disk(branches, fmt, "file")
        entry, opened = fs.create(ROOT_ID, b"file", 0o644, os.O_WRONLY, CALLER)
        fs.write(entry.node_id, opened.fh, 0, memoryview(b"new"), None)
        fs.release(entry.node_id, opened.fh)
        assert not hidden_on_disk(branches, fmt, "file")  # a file needs no whiteout
        fs.rename(ROOT_ID, b"dir", ROOT_ID, b"moved", 0, CALLER)
        assert hidden_on_disk(branches, fmt, "dir")
        fs.mkdir(ROOT_ID, b"dir", 0o755, CALLER)
        assert names(fs, "dir") == []
        if fmt == "overlay":
            assert os.getxattr(branches["upper"] / "dir", XATTRS.opaque) == b"y"
        else:
            assert hidden_on_disk(branches, fmt, "dir")  # the marker keeps it opaque
        fs.rmdir(ROOT_ID, b"empty", CALLER)
        assert hidden_on_disk(branches, fmt, "empty")
    with mounted(branches) as fs:  # a new mount reads the same union back
        assert names(fs) == [b"dir", b"file", b"link", b"moved"]
        assert names(fs, "dir") == []
        assert names(fs, "moved") == [b"inner", b"sub"]
        node = lookup(fs, "file").node_id
        opened = fs.open(node, os.O_RDONLY, CALLER)
        assert fs.read(node, opened.fh, 0, 100) == b"new"
        fs.release(node, opened.fh)


@pytest.mark.parametrize("fmt", ["overlay", "unionfs"])
def test_entries_renamed_and_linked_onto_a_whited_out_name(branches: dict[str, Path],
                                                           fmt: str) -> None:
    with mounted(branches, "-o", f"whiteout={fmt}") as fs:
        fs.rmdir(ROOT_ID, b"empty", CALLER)
        fs.mkdir(ROOT_ID, b"fresh", 0o755, CALLER)
        fs.mknod(lookup(fs, "fresh").node_id, b"x", stat.S_IFIFO | 0o644, 0, CALLER)
        fs.rename(ROOT_ID, b"fresh", ROOT_ID, b"empty", 0, CALLER)  # a directory onto it
        assert names(fs, "empty") == [b"x"]
        assert (branches["upper"] / "empty").is_dir()
        fs.unlink(ROOT_ID, b"file", CALLER)
        fs.link(lookup(fs, "link").node_id, ROOT_ID, b"file", CALLER)  # a link onto it
        assert stat.S_ISLNK(os.lstat(branches["upper"] / "file").st_mode)
        fs.unlink(ROOT_ID, b"file", CALLER)
        assert b"file" not in names(fs)  # the base file stays hidden
    with mounted(branches) as fs:
        assert names(fs) == [b"dir", b"empty", b"link"]
        assert names(fs, "empty") == [b"x"]


def test_a_read_only_union_answers_erofs(branches: dict[str, Path]) -> None:
    with mounted(branches, upper="RO") as fs:
        node = lookup(fs, "file").node_id
        assert errno_of(lambda: fs.unlink(ROOT_ID, b"file", CALLER)) == errno.EROFS
        assert errno_of(lambda: fs.mkdir(ROOT_ID, b"new", 0o755, CALLER)) == errno.EROFS
        assert errno_of(lambda: fs.rename(ROOT_ID, b"file", ROOT_ID, b"f2", 0, CALLER)) == \
            errno.EROFS
        assert errno_of(lambda: fs.open(node, os.O_WRONLY, CALLER)) == errno.EROFS
        assert not (branches["upper"] / ".qvdfs.work").exists()


class RecordingNotifier:
    """A ``Notifier`` that keeps what the kernel would have been told."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int, bytes | None]] = []

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        self.sent.append(("entry", parent, name))

    def invalidate_inode(self, node_id: int) -> None:
        self.sent.append(("inode", node_id, None))

    def invalidate_attributes(self, node_id: int) -> None:
        self.sent.append(("attributes", node_id, None))


def test_a_copy_up_that_splits_a_hard_link_tells_the_notifier(branches: dict[str, Path]) -> None:
    os.link(branches["base"] / "file", branches["base"] / "alias")
    notifier = RecordingNotifier()
    fs = make_fs(branches, notifier=notifier)
    try:
        node = lookup(fs, "file").node_id
        assert lookup(fs, "alias").node_id == node
        writer = fs.open(node, os.O_WRONLY, CALLER)
        fs.release(node, writer.fh)
        # The copy-up breaks the link, as in overlayfs: the kernel must drop the node it
        # holds for the other name, and the root's cached listing. Then, as for every
        # writable open passed through, the file's own cached attributes.
        assert notifier.sent == [("entry", ROOT_ID, b"alias"), ("inode", ROOT_ID, None),
                                 ("attributes", node, None)]
        assert lookup(fs, "alias").node_id != node
    finally:
        fs.destroy()
