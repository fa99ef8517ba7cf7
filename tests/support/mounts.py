"""Real mounts for tests: each one is unmounted, and its daemon reaped, on the way out."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from qvdproc import processes
from qvdproc.mountinfo import is_mounted
from tools.sandbox import force_unmount

VENV_BIN = Path(sys.executable).parent
# QVDFS_BIN lets the same tests run against another build of the daemon.
QVDFS = os.environ.get("QVDFS_BIN", str(VENV_BIN / "qvdfs"))
# What a request on a mount whose daemon was killed gets: which one depends on where the
# kernel's abort of the connection meets the request (measured here, 25 kills then a
# listdir each: ECONNABORTED 18, ENOTCONN 4, EIO 3).
DEAD_MOUNT_ERRNOS = (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO)
NODE_OPTIONS = ["-o", "cow", "-o", "max_files=32000", "-o", "suid", "-o", "dev", "-o", "allow_other"]
# QVDFS_TEST_BACKEND=pyfuse3 runs the union tests on the portable backend (make test does).
BACKEND_OPTIONS = ["-o", f"backend={os.environ['QVDFS_TEST_BACKEND']}"] \
    if os.environ.get("QVDFS_TEST_BACKEND") else []


def node_branches(d: dict[str, Path]) -> str:
    """The node's two-branch argument for the ``dirs`` fixture: ``UPPER=RW:BASE=RO``."""
    return f"{d['upper']}=RW:{d['base']}=RO"


def daemon_pids(mountpoint: str | os.PathLike[str]) -> list[int]:
    """Pids of qvdfs daemons serving ``mountpoint`` (its program, then ``mountpoint`` in argv)."""
    return [p.pid for p in processes.with_argument(mountpoint)
            if any(b"qvdfs" in word for word in p.argv[:2])]


@contextlib.contextmanager
def qvdfs_mount(
    branches: str, mountpoint: str | os.PathLike[str], *options: str, timeout: float = 30
) -> Iterator[Path]:
    """Mount with ``qvdfs OPTIONS BRANCHES MOUNTPOINT`` (daemonized), unmount on exit.

    Asserts that the daemon exits 0 after ``umount``, as the node expects.
    """
    mnt = str(mountpoint)
    try:
        subprocess.run([QVDFS, *BACKEND_OPTIONS, *options, branches, mnt], check=True,
                       timeout=timeout)
    except subprocess.TimeoutExpired:
        force_unmount(mnt)  # a daemon that hangs while mounting must not leave its mount behind
        raise
    pids = daemon_pids(mnt)
    try:
        assert is_mounted(mnt), "qvdfs exited 0 but nothing is mounted"
        yield Path(mnt)
    finally:
        force_unmount(mnt)
        if not processes.wait_gone(pids, timeout=15):
            for p in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, 9)
            raise AssertionError(f"qvdfs daemon {pids} still running after umount")


@contextlib.contextmanager
def kernel_overlay(lower: Path, upper: Path, work: Path, mnt: Path, *extra: str) -> Iterator[Path]:
    """Mount kernel overlayfs of ``upper`` over ``lower``; unmount on exit."""
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    if extra:
        opts += "," + ",".join(extra)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], check=True, timeout=30)
    try:
        yield mnt
    finally:
        force_unmount(mnt)
