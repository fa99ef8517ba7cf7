"""Daemon CPU per request of qvdfs.fuse.Session (not a test; run by hand).

    .venv/bin/python -m tests.fuse.bench_session [--threads N] [--count N] [--slow]

The daemon runs in a child process serving a filesystem that answers GETATTR from one
cached Attr with attr_timeout 0, so each os.stat() in the parent is one GETATTR; the
figure is the child's utime+stime (/proc/PID/stat) over the count. ``--slow`` also times
stat() calls while another request sleeps in the filesystem.
"""

from __future__ import annotations

import argparse
import os
import stat
import tempfile
import threading
import time

from qvdfs.fuse import mount as fmount
from qvdfs.fuse.filesystem import Attr, Context, Entry
from qvdfs.fuse.session import Session
from qvdproc import processes


class NullFS:
    def __init__(self) -> None:
        now = time.time_ns()
        self.root = Attr(1, stat.S_IFDIR | 0o755, 2, 0, 0, 0, 0, 0, 4096, now, now, now)
        self.file = Attr(2, stat.S_IFREG | 0o644, 1, 0, 0, 0, 0, 0, 4096, now, now, now)

    def lookup(self, parent: int, name: bytes, ctx: Context) -> Entry:
        if name == b"f":
            return Entry(2, self.file, 60, 0)
        if name == b"slow":
            time.sleep(1.0)
            return Entry(0, None, 0, 0)
        return Entry(0, None, 0, 0)

    def forget(self, node_id: int, count: int) -> None:
        pass

    def getattr(self, node_id: int, fh: int | None, ctx: Context) -> tuple[Attr, float]:
        return (self.root if node_id == 1 else self.file), 0.0


def cpu_ns(pid: int) -> int:
    ticks = processes.cpu_ticks(pid)
    assert ticks is not None, f"process {pid} is gone"
    return ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--count", type=int, default=30000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--slow", action="store_true")
    args = ap.parse_args()
    mnt = tempfile.mkdtemp(prefix="qvdfs-bench-")
    fd = fmount.mount(mnt, fmount.MountOptions(fsname="qvdbench"))
    pid = os.fork()
    if pid == 0:
        try:
            Session(NullFS(), fd, mountpoint=mnt, threads=args.threads).serve()
        finally:
            os._exit(0)
    try:
        path = os.path.join(mnt, "f")
        os.stat(path)
        best = None
        for _ in range(args.rounds):
            c0, t0 = cpu_ns(pid), time.perf_counter_ns()
            for _ in range(args.count):
                os.stat(path)
            c1, t1 = cpu_ns(pid), time.perf_counter_ns()
            per = (c1 - c0) / args.count / 1000
            best = per if best is None else min(best, per)
            print(f"threads={args.threads}: daemon CPU {per:.1f} us/GETATTR, "
                  f"wall {(t1 - t0) / args.count / 1000:.1f} us/stat")
        print(f"best of {args.rounds}: {best:.1f} us")
        if args.slow:
            t = threading.Thread(target=lambda: os.path.exists(os.path.join(mnt, "slow")))
            t.start()
            time.sleep(0.1)
            s0 = time.monotonic()
            os.stat(path)
            print(f"stat while another request sleeps 1 s: {1000 * (time.monotonic() - s0):.1f} ms")
            t.join()
    finally:
        fmount.unmount(mnt)
        os.waitpid(pid, 0)
        os.close(fd)
        os.rmdir(mnt)


if __name__ == "__main__":
    main()
