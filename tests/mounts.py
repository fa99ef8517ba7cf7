"""Real mounts for tests: each one is unmounted, and its daemon reaped, on the way out."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
# QVDFS_BIN lets the same tests run against another build of the daemon.
QVDFS = os.environ.get("QVDFS_BIN", str(VENV_BIN / "qvdfs"))
NODE_OPTIONS = ["-o", "cow", "-o", "max_files=32000", "-o", "suid", "-o", "dev", "-o", "allow_other"]
# QVDFS_TEST_BACKEND=pyfuse3 runs the union tests on the portable backend (make test does).
BACKEND_OPTIONS = ["-o", f"backend={os.environ['QVDFS_TEST_BACKEND']}"] \
    if os.environ.get("QVDFS_TEST_BACKEND") else []


def is_mounted(path: str | os.PathLike[str]) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def force_unmount(path: str | os.PathLike[str]) -> None:
    """Unmount ``path`` however it can be done; for cleanup after a failed test."""
    for cmd in (["umount", str(path)], ["fusermount3", "-u", "-z", str(path)], ["umount", "-l", str(path)]):
        if not is_mounted(path):
            return
        subprocess.run(cmd, capture_output=True, timeout=30)


def _daemon_pids(mountpoint: str) -> list[int]:
    """Pids of qvdfs daemons serving ``mountpoint`` (matched by their exact argv)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if any(b"qvdfs" in a for a in argv[:2]) and os.fsencode(mountpoint) in argv:
            pids.append(int(entry))
    return pids


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
    pids = _daemon_pids(mnt)
    try:
        assert is_mounted(mnt), "qvdfs exited 0 but nothing is mounted"
        yield Path(mnt)
    finally:
        force_unmount(mnt)
        deadline = time.monotonic() + 15
        while any(os.path.exists(f"/proc/{p}") and not _is_zombie(p) for p in pids):
            if time.monotonic() > deadline:
                for p in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p, 9)
                raise AssertionError(f"qvdfs daemon {pids} still running after umount")
            time.sleep(0.05)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


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
