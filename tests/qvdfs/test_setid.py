"""Set-user-id and set-group-id bits that an unprivileged change must drop, on qvdfs and on
kernel overlayfs side by side (xfstests generic/355, 375, 444, 683-685, 697).

The kernel drops set-id bits when a caller without CAP_FSETID changes a file's data or mode,
so that a user who may write a set-uid program cannot keep it set-uid. Through FUSE with
HANDLE_KILLPRIV_V2 the daemon does part of that work, and some paths (fallocate,
copy_file_range, an ACL set by a caller outside the file's group) come with no flag saying
so. Every case runs as uid 1000 on a file in the base (copied up by the change) and on one
already in the overlay, on both targets, and must end with the mode the kernel's rule gives,
which is also what kernel overlayfs shows.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.support.mounts import NODE_OPTIONS, kernel_overlay, qvdfs_mount

pytestmark = pytest.mark.timeout(120)

USER = ("setpriv", "--reuid=1000", "--regid=1000", "--clear-groups")

# Shell lines uid 1000 runs on the file at $0 (world-writable, owned by root:root).
CHANGES = {
    "write": 'printf "#" 1<> "$0"',
    "pwrite past the end":
        'dd if=/dev/zero of="$0" bs=1 count=1 seek=200000 conv=notrunc status=none',
    "direct write":
        'dd if=/dev/zero of="$0" bs=4096 count=1 oflag=direct conv=notrunc status=none',
    "truncate": 'truncate -s 3 "$0"',
    "truncating open": ': > "$0"',
    "fallocate": 'fallocate -o 0 -l 262144 "$0"',
    "fallocate keep size": 'fallocate -n -o 0 -l 262144 "$0"',
    "punch hole": 'fallocate -p -o 0 -l 4096 "$0"',
    "zero range": 'fallocate -z -o 0 -l 4096 "$0"',
    "copy_file_range":
        'python3 -c "import os, sys; s = os.open(sys.argv[1] + \'.src\', 0); '
        'd = os.open(sys.argv[1], os.O_WRONLY); os.copy_file_range(s, d, 3, 0, 0)" "$0"',
}
# 6777: set-group-id with group-execute, dropped whoever writes; 6666: without it (mandatory
# locking), dropped because uid 1000 is outside the file's group (root).
MODES = {0o6777: 0o777, 0o6666: 0o666}
PLACES = ("base", "overlay")


class Target(NamedTuple):
    lower: Path
    upper: Path
    mnt: Path


def _name(change: str, place: str, mode: int) -> str:
    return f"{change.replace(' ', '-')}-{place}-{mode:o}"


def _cases() -> Iterator[tuple[str, str, int]]:
    for change in CHANGES:
        for place in PLACES:
            for mode in MODES:
                yield change, place, mode


def _make(path: Path, mode: int, owner: tuple[int, int] = (0, 0)) -> None:
    path.write_bytes(b"x" * 131072)
    (path.parent / (path.name + ".src")).write_bytes(b"abcdef")
    os.chown(path, *owner)
    os.chmod(path, mode)


@contextlib.contextmanager
def _targets(prepare: Callable[[Path, str], None]) -> Iterator[dict[str, Target]]:
    """A kernel overlayfs mount and a qvdfs mount (the node's options) over identical
    branches; ``prepare(branch, place)`` fills the base before mounting and the overlay
    through the mount (as root), so both see the same files."""
    # Other users must reach the mounts, and pytest's tmp is root's alone.
    tmp = Path(tempfile.mkdtemp(prefix="qvdfs-setid-", dir="/var/tmp"))
    os.chmod(tmp, 0o755)
    made: dict[str, Target] = {}
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        for kind in ("overlayfs", "qvdfs"):
            lower, upper, work, mnt = (tmp / kind / n for n in ("lower", "upper", "work", "mnt"))
            for path in (lower, upper, work, mnt):
                path.mkdir(parents=True)
            prepare(lower, "base")
            mount = kernel_overlay(lower, upper, work, mnt) if kind == "overlayfs" else \
                qvdfs_mount(f"{upper}=RW:{lower}=RO", mnt, *NODE_OPTIONS)
            stack.enter_context(mount)
            prepare(mnt, "overlay")
            made[kind] = Target(lower, upper, mnt)
        yield made


def _as_user(script: str, path: Path, *ids: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(ids or USER), "sh", "-c", script, str(path)],
                          capture_output=True, text=True, timeout=60)


def _mode(path: Path) -> int:
    """The mode as ``stat -c %a`` shows it: statx asks for the mode alone, so the kernel
    answers from its cache unless the mode was invalidated (``os.stat`` asks for times and
    sizes too, which a write invalidates, and so would hide a stale mode)."""
    shown = subprocess.run(["stat", "-c", "%a", str(path)], capture_output=True, text=True,
                           check=True, timeout=30)
    return int(shown.stdout, 8)


def test_every_unprivileged_change_of_data_drops_setid_bits() -> None:
    def prepare(root: Path, place: str) -> None:
        for change, where, mode in _cases():
            if where == place:
                _make(root / _name(change, where, mode), mode)

    with _targets(prepare) as targets:
        for change, place, mode in _cases():
            name = _name(change, place, mode)
            for kind, target in targets.items():
                # The kernel caches the mode it sees now: the change must reach that cache.
                assert _mode(target.mnt / name) == mode
                done = _as_user(CHANGES[change], target.mnt / name)
                assert done.returncode == 0, (kind, change, done.stderr)
                got = _mode(target.mnt / name)
                assert got == MODES[mode], f"{kind}: {change} on a {mode:o} file in the " \
                    f"{place} left {got:o}, not {MODES[mode]:o}"
            assert _mode(targets["qvdfs"].upper / name) == MODES[mode]
            if place == "base":
                assert _mode(targets["qvdfs"].lower / name) == mode  # never touched


def test_root_keeps_setid_bits_through_fallocate_and_copy_file_range() -> None:
    """Host root holds CAP_FSETID: asking ``/proc`` must not drop what the kernel keeps."""
    kept = ("fallocate", "punch hole", "copy_file_range")

    def prepare(root: Path, place: str) -> None:
        if place == "base":
            for change in kept:
                _make(root / _name(change, place, 0o6777), 0o6777)

    with _targets(prepare) as targets:
        for change in kept:
            name = _name(change, "base", 0o6777)
            for kind, target in targets.items():
                done = subprocess.run(["sh", "-c", CHANGES[change], str(target.mnt / name)],
                                      capture_output=True, text=True, timeout=60)
                assert done.returncode == 0, (kind, change, done.stderr)
                assert _mode(target.mnt / name) == 0o6777, (kind, change)


def test_chmod_or_acl_by_an_owner_outside_the_group_drops_setgid() -> None:
    """generic/375: the owner (uid 100) may chmod its file and set its ACL; outside the
    file's group (gid 101, the file's is 100) it cannot keep set-group-id; inside, it can."""
    changes = {"chmod": 'chmod 2777 "$0"', "setfacl": 'setfacl -m u::rwx,g::rwx,o::rwx "$0"'}
    callers = {"outside": ("101", 0o777), "inside": ("100", 0o2777)}

    def prepare(root: Path, place: str) -> None:
        for change in changes:
            for caller in callers:
                for kind in ("file", "dir"):
                    path = root / f"{change}-{caller}-{kind}-{place}"
                    if kind == "dir":
                        path.mkdir()
                    else:
                        path.touch()
                    os.chown(path, 100, 100)
                    os.chmod(path, 0o2755)

    with _targets(prepare) as targets:
        for change, script in changes.items():
            for caller, (gid, expected) in callers.items():
                for kind in ("file", "dir"):
                    for place in PLACES:
                        name = f"{change}-{caller}-{kind}-{place}"
                        for target_kind, target in targets.items():
                            done = _as_user(script, target.mnt / name, "setpriv", "--reuid=100",
                                            f"--regid={gid}", "--clear-groups")
                            assert done.returncode == 0, (target_kind, name, done.stderr)
                            got = _mode(target.mnt / name)
                            assert got == expected, f"{target_kind}: {name} left {got:o}"


def test_new_entries_in_a_setgid_folder_with_a_default_acl() -> None:
    """generic/444 and 697: the umask gives way to the default ACL (group bits from its
    mask), subfolders inherit set-group-id, and a file made by a caller outside the
    folder's group without CAP_FSETID does not get it."""
    def prepare(root: Path, place: str) -> None:
        if place != "overlay":
            return
        acl = root / "acl"
        acl.mkdir()
        subprocess.run(["setfacl", "-d", "-m", "u:101:rwx", str(acl)], check=True)
        os.chown(acl, 100, 100)
        os.chmod(acl, 0o2755)
        masked = root / "masked"
        masked.mkdir()
        os.chmod(masked, 0o2777)
        subprocess.run(["setfacl", "-d", "-m", "u::rwx,g::rw,o::rwx,m:rw", str(masked)],
                       check=True)

    create = ("import os, stat, sys; d = sys.argv[1]; os.umask(stat.S_IXGRP); "
              "os.close(os.open(d + '/file', os.O_CREAT | os.O_EXCL | os.O_WRONLY, "
              "stat.S_IXGRP | stat.S_ISGID)); os.mkdir(d + '/dir', 0); "
              "os.mknod(d + '/node', stat.S_IFREG | stat.S_ISGID | stat.S_IXGRP)")
    with _targets(prepare) as targets:
        for kind, target in targets.items():
            for sub, gid in (("sub1", "100"), ("sub2", "101")):
                made = subprocess.run(["setpriv", "--reuid=100", f"--regid={gid}",
                                       "--clear-groups", "mkdir", str(target.mnt / "acl" / sub)],
                                      capture_output=True, text=True, timeout=60)
                assert made.returncode == 0, made.stderr
                got = stat.filemode(os.stat(target.mnt / "acl" / sub).st_mode)
                assert got == "drwxrwsr-x", (kind, sub, got)
            # Root with its groups cleared and without CAP_FSETID, as vfstest runs it.
            made = subprocess.run(["setpriv", "--regid=10000", "--clear-groups",
                                   "--bounding-set=-fsetid", "--inh-caps=-fsetid",
                                   "python3", "-c", create, str(target.mnt / "masked")],
                                  capture_output=True, text=True, timeout=60)
            assert made.returncode == 0, made.stderr
            modes = {n: os.stat(target.mnt / "masked" / n).st_mode for n in ("file", "dir", "node")}
            assert {n: m & (stat.S_ISGID | stat.S_IXGRP) for n, m in modes.items()} == \
                {"file": 0, "dir": stat.S_ISGID, "node": 0}, kind


def test_chown_by_root_drops_setuid_and_an_executable_setgid() -> None:
    """generic/193: a chown drops set-user-id even for root, and set-group-id only where it
    means execution (group-executable); root keeps a mandatory-locking set-group-id."""
    expected = {0o6644: 0o644 | 0o2000, 0o6744: 0o744 | 0o2000, 0o6654: 0o654, 0o6754: 0o754}

    def prepare(root: Path, place: str) -> None:
        for mode in expected:
            _make(root / f"chown-{place}-{mode:o}", mode)

    with _targets(prepare) as targets:
        for kind, target in targets.items():
            for place in PLACES:
                for mode, after in expected.items():
                    path = target.mnt / f"chown-{place}-{mode:o}"
                    assert _mode(path) == mode
                    os.chown(path, 1000, 1000)
                    got = _mode(path)
                    assert got == after, f"{kind}: chown of a {mode:o} file in the {place} " \
                        f"left {got:o}, not {after:o}"
