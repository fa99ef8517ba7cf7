"""Differential test: random file operations on qvdfs and on kernel overlayfs agree.

The same sequence runs on a qvdfs mount and on a kernel overlayfs mount of identical
branches; every call must fail with the same errno or succeed on both, and the trees
they show must be identical (names, types, modes, owners, sizes, contents, link counts
of non-directories, user xattrs).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.mounts import NODE_OPTIONS, kernel_overlay, qvdfs_mount
from tests.support.trees import build_base, describe

DIRS = ["", "etc", "etc/conf.d", "usr", "usr/bin", "usr/lib", "usr/lib/deep", "usr/lib/deep/er",
        "var", "var/log", "new", "new/sub"]
NAMES = ["passwd", "a.conf", "b.conf", "tool", "deep", "er", "file", "x", "y", "new", "sub",
         "log", "lib.so", "link-to-file", "fifo"]

# The operations run in this (root, host) process, which follows an absolute link on the
# host: a target that exists there (it once was /etc/passwd) gets chmod 4711 or a truncating
# write. This one cannot exist, so both sides answer ENOENT and the host is never touched.
ABSENT_ABSOLUTE = "/nonexistent.qvd-differential/passwd"

# Directory renames need redirect_dir (else overlayfs answers EXDEV); metacopy lets
# chmod and chown copy no data, as qvdfs does.
KERNEL_OPTIONS = ("redirect_dir=on", "metacopy=on")

paths = st.builds(lambda d, n: os.path.join(d, n) if d else n, st.sampled_from(DIRS),
                  st.sampled_from(NAMES))
data = st.binary(max_size=300)


def _op(name: str, *args: object) -> tuple:
    return (name, *args)


ops = st.one_of(
    st.builds(lambda p, d, a: _op("write", p, d, a), paths, data, st.booleans()),
    st.builds(lambda p, n: _op("truncate", p, n), paths, st.integers(0, 9000)),
    st.builds(lambda p: _op("mkdir", p), paths),
    st.builds(lambda p: _op("rmdir", p), paths),
    st.builds(lambda p: _op("unlink", p), paths),
    st.builds(lambda a, b: _op("rename", a, b), paths, paths),
    st.builds(lambda p, t: _op("symlink", t, p), paths, st.sampled_from(["x", "../etc", ABSENT_ABSOLUTE])),
    st.builds(lambda a, b: _op("link", a, b), paths, paths),
    st.builds(lambda p, m: _op("chmod", p, m), paths, st.sampled_from([0o600, 0o755, 0o4711, 0o1777])),
    st.builds(lambda p, u: _op("chown", p, u), paths, st.sampled_from([0, 1000, 65534])),
    st.builds(lambda p, v: _op("setxattr", p, v), paths, st.binary(min_size=1, max_size=20)),
    st.builds(lambda p: _op("removexattr", p), paths),
    st.builds(lambda p: _op("mkfifo", p), paths),
)


def apply(root: Path, op: tuple) -> int | None:
    """Run one operation under ``root``; return its errno, or None on success."""
    name, *args = op
    p = lambda rel: os.path.join(root, rel)  # noqa: E731
    try:
        if name == "write":
            rel, content, append = args
            # O_NONBLOCK: opening a fifo without a reader fails (ENXIO) instead of hanging.
            mode = os.O_APPEND if append else os.O_TRUNC
            fd = os.open(p(rel), os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | mode, 0o644)
            try:
                os.write(fd, content)
            finally:
                os.close(fd)
        elif name == "truncate":
            os.truncate(p(args[0]), args[1])
        elif name == "mkdir":
            os.mkdir(p(args[0]), 0o750)
        elif name == "rmdir":
            os.rmdir(p(args[0]))
        elif name == "unlink":
            os.unlink(p(args[0]))
        elif name == "rename":
            os.rename(p(args[0]), p(args[1]))
        elif name == "symlink":
            os.symlink(args[0], p(args[1]))
        elif name == "link":
            os.link(p(args[0]), p(args[1]), follow_symlinks=False)
        elif name == "chmod":
            os.chmod(p(args[0]), args[1], follow_symlinks=True)
        elif name == "chown":
            os.chown(p(args[0]), args[1], args[1], follow_symlinks=False)
        elif name == "setxattr":
            os.setxattr(p(args[0]), "user.k", args[1], follow_symlinks=False)
        elif name == "removexattr":
            os.removexattr(p(args[0]), "user.k", follow_symlinks=False)
        elif name == "mkfifo":
            os.mkfifo(p(args[0]), 0o640)
        else:
            raise AssertionError(name)
    except OSError as exc:
        return exc.errno
    return None


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_base(tmp_path_factory.mktemp("diff") / "base")


@pytest.mark.timeout(600)
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(sequence=st.lists(ops, min_size=1, max_size=25))
def test_qvdfs_matches_kernel_overlayfs(base: Path, tmp_path_factory: pytest.TempPathFactory,
                                        sequence: list[tuple]) -> None:
    work = tmp_path_factory.mktemp("ex")
    for d in ("q_up", "q_mnt", "k_up", "k_work", "k_mnt"):
        (work / d).mkdir()
    try:
        with contextlib.ExitStack() as stack:
            q = stack.enter_context(qvdfs_mount(f"{work / 'q_up'}=RW:{base}=RO", work / "q_mnt",
                                                *NODE_OPTIONS))
            k = stack.enter_context(kernel_overlay(base, work / "k_up", work / "k_work",
                                                   work / "k_mnt", *KERNEL_OPTIONS))
            assert describe(q) == describe(k)
            for i, op in enumerate(sequence):
                got, want = apply(q, op), apply(k, op)
                assert got == want, f"step {i} {op}: qvdfs errno {got}, overlayfs errno {want}"
            expected = describe(k)
            assert describe(q) == expected, "trees differ"
        # The on-disk formats agree too: each upper branch shows the same tree when
        # mounted by the other implementation.
        (work / "k_work2").mkdir()
        with kernel_overlay(base, work / "q_up", work / "k_work2", work / "k_mnt", *KERNEL_OPTIONS) as k:
            assert describe(k) == expected, "kernel overlayfs reads qvdfs' upper differently"
        with qvdfs_mount(f"{work / 'k_up'}=RW:{base}=RO", work / "q_mnt", *NODE_OPTIONS) as q:
            assert describe(q) == expected, "qvdfs reads kernel overlayfs' upper differently"
    finally:
        shutil.rmtree(work, ignore_errors=True)
