"""A union over plain folders, driven as the kernel would drive it, and the oracles that judge
what it did.

The union runs with its overlay xattrs under ``user.overlay.`` (``qvdformat.markers.USER``,
kernel overlayfs' ``userxattr``), and every request comes from the caller running the tests,
so the fast tier needs no root: ``make test-union`` runs it as ``nobody``.

After a change, three readings of the branches must agree (``check``):
- the union that made it (its index, kept up to date by the change itself);
- a fresh union over the same branches (which reads everything back from disk);
- ``di commit``'s merge of the upper branch over the base (``qvdctl.images.merge``), an
  independent reading of the on-disk format.
The upper branch's work folder must hold nothing but the live union's own folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qvdctl.images.merge import Merge
from qvdfs import cmdline
from qvdfs.fuse.filesystem import ROOT_ID, Context, Entry, Notifier, NullNotifier
from qvdfs.handlers import UnionFilesystem
from qvdformat import markers, syscalls

XATTRS = markers.USER
CALLER = Context(uid=os.getuid(), gid=os.getgid(), pid=1)

# What a path looks like: type, permissions, owner, and per type its data, link target or
# device; non-directories their mtime; and the xattrs a user sees.
Looks = tuple[object, ...]


def make_fs(d: dict[str, Path], *options: str, upper: str = "RW",
            notifier: Notifier | None = None) -> UnionFilesystem:
    config = cmdline.parse_args(["-o", "cow", *options, f"{d['upper']}={upper}:{d['base']}=RO",
                                 str(d["mnt"])])
    fs = UnionFilesystem(dataclasses.replace(config, overlay_xattrs=XATTRS))
    fs.init(frozenset({"no_opendir", "readdirplus"}), notifier or NullNotifier())
    return fs


@contextlib.contextmanager
def mounted(d: dict[str, Path], *options: str, upper: str = "RW"
            ) -> Iterator[UnionFilesystem]:
    """A union over ``d``'s branches for the length of a ``with``, as a mount would be."""
    fs = make_fs(d, *options, upper=upper)
    try:
        yield fs
    finally:
        fs.destroy()


def lookup(fs: UnionFilesystem, path: str) -> Entry:
    node = ROOT_ID
    entry = None
    for part in path.strip("/").split("/"):
        entry = fs.lookup(node, part.encode(), CALLER)
        if entry.node_id == 0:
            raise FileNotFoundError(path)
        node = entry.node_id
    assert entry is not None
    return entry


def node_of(fs: UnionFilesystem, path: str) -> int:
    return lookup(fs, path).node_id if path.strip("/") else ROOT_ID


def listing(fs: UnionFilesystem, node_id: int) -> list[tuple[bytes, Entry]]:
    out: list[tuple[bytes, Entry]] = []
    fs.readdirplus(node_id, 0, 0, lambda name, entry, off: out.append((name, entry)) is None)
    return sorted((n, e) for n, e in out if n not in (b".", b".."))


def names(fs: UnionFilesystem, path: str = "") -> list[bytes]:
    return [name for name, _ in listing(fs, node_of(fs, path))]


def read(fs: UnionFilesystem, path: str) -> bytes:
    node = node_of(fs, path)
    opened = fs.open(node, os.O_RDONLY, CALLER)
    try:
        return fs.read(node, opened.fh, 0, 1 << 20)
    finally:
        fs.release(node, opened.fh)


def write(fs: UnionFilesystem, path: str, data: bytes, *, offset: int = 0,
          flags: int = os.O_WRONLY) -> None:
    node = node_of(fs, path)
    opened = fs.open(node, flags, CALLER)
    try:
        assert fs.write(node, opened.fh, offset, memoryview(data), None) == len(data)
    finally:
        fs.release(node, opened.fh)


def create(fs: UnionFilesystem, path: str, data: bytes, mode: int = 0o644) -> Entry:
    parent, _, name = path.strip("/").rpartition("/")
    entry, opened = fs.create(node_of(fs, parent), name.encode(), mode, os.O_WRONLY, CALLER)
    try:
        fs.write(entry.node_id, opened.fh, 0, memoryview(data), None)
    finally:
        fs.release(entry.node_id, opened.fh)
    return entry


def errno_of(call: Callable[[], object]) -> int | None:
    with pytest.raises(OSError) as info:
        call()
    return info.value.errno


def is_whiteout(path: Path) -> bool:
    return markers.is_whiteout_stat(os.lstat(path))


def hidden_on_disk(branches: dict[str, Path], fmt: str, path: str) -> bool:
    """True if the upper branch holds a whiteout of ``path`` in the format ``fmt``."""
    if fmt == "overlay":
        return os.path.lexists(branches["upper"] / path) and is_whiteout(branches["upper"] / path)
    return (branches["upper"] / ".unionfs-fuse" / (path + "_HIDDEN~")).exists()


# -- the oracles ----------------------------------------------------------------------------

def _looks(st: os.stat_result, data: Callable[[], bytes], link: Callable[[], bytes],
           xattrs: dict[bytes, bytes]) -> Looks:
    kind = stat.S_IFMT(st.st_mode)
    if stat.S_ISREG(st.st_mode):
        what: object = data()
    elif stat.S_ISLNK(st.st_mode):
        what = link()
    elif stat.S_ISDIR(st.st_mode):
        what = None
    else:
        what = st.st_rdev
    mtime = None if stat.S_ISDIR(st.st_mode) else st.st_mtime_ns
    return (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, what, mtime,
            tuple(sorted(xattrs.items())))


def seen_by_union(fs: UnionFilesystem) -> dict[bytes, Looks]:
    """Every path below the union's root and what it looks like through the union."""
    seen: dict[bytes, Looks] = {}

    def walk(node_id: int, path: bytes) -> None:
        for name, entry in listing(fs, node_id):
            child = path + b"/" + name if path else name
            st = fs.union.getattr(fs.index.get(entry.node_id))
            xattrs = {key: fs.getxattr(entry.node_id, key, CALLER)
                      for key in fs.listxattr(entry.node_id, CALLER)}
            seen[child] = _looks(st, lambda: read(fs, os.fsdecode(child)),
                                 lambda: fs.readlink(entry.node_id, CALLER), xattrs)
            if stat.S_ISDIR(st.st_mode):
                walk(entry.node_id, child)

    walk(ROOT_ID, b"")
    return seen


def seen_on_disk(upper: Path, base: Path) -> dict[bytes, Looks]:
    """Every path of ``upper`` merged over ``base`` as ``di commit`` reads the branches."""
    seen: dict[bytes, Looks] = {}
    with Merge(upper, base, XATTRS) as merge:
        for entry in merge.entries():
            if not entry.path:
                continue  # the root: di commit takes the image's
            meta, data = entry.meta, entry.data

            def content() -> bytes:
                assert data is not None
                fd = os.open(data.name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=data.dir_fd)
                try:
                    return os.read(fd, 1 << 20)
                finally:
                    os.close(fd)

            seen[entry.path] = _looks(
                meta.st, content, lambda: os.readlink(meta.name, dir_fd=meta.dir_fd),
                syscalls.xattrs_at(meta.dir_fd, meta.name, skip=XATTRS.prefix))
    return seen


def check(fs: UnionFilesystem, d: dict[str, Path], *options: str) -> dict[bytes, Looks]:
    """The union ``fs`` over ``d``, a fresh union and the format on disk agree; returns
    what they see."""
    live = seen_by_union(fs)
    with mounted(d, *options) as fresh:
        assert seen_by_union(fresh) == live, "a fresh union reads back another tree"
    assert seen_on_disk(d["upper"], d["base"]) == live, "the format on disk says otherwise"
    work = d["upper"] / os.fsdecode(markers.WORK_DIR)
    if work.exists():
        for folder in os.listdir(work):
            assert os.listdir(work / folder) == [], "a change left its temporary files"
    return live
