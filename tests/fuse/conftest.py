"""Real mounts of a MirrorFS through qvdfs.fuse.Session, served from a thread of the test.

Each mount is unmounted on the way out; if ``serve()`` does not end after umount, the
connection is aborted so that no test leaves a hung mount behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qvdfs.fuse import mount as fmount
from qvdfs.fuse.session import Session

from .mirror import MirrorFS


@dataclasses.dataclass
class Mounted:
    mnt: Path
    src: Path
    fs: MirrorFS
    session: Session
    thread: threading.Thread
    errors: list[BaseException]


def _abort(conn: int) -> None:
    with contextlib.suppress(OSError):
        with open(f"/sys/fs/fuse/connections/{conn}/abort", "w") as f:
            f.write("1")


@contextlib.contextmanager
def mounted(tmp_path: Path, *, fs: MirrorFS | None = None,
            options: fmount.MountOptions | None = None, name: str = "m",
            **session_kw: Any) -> Iterator[Mounted]:
    src = tmp_path / f"{name}-src"
    mnt = tmp_path / f"{name}-mnt"
    src.mkdir(exist_ok=True)
    mnt.mkdir(exist_ok=True)
    fs = fs if fs is not None else MirrorFS(str(src))
    opts = dataclasses.replace(options or fmount.MountOptions(), fsname="qvdtest",
                               subtype="qvdtest")
    fd = fmount.mount(str(mnt), opts)
    session = Session(fs, fd, mountpoint=str(mnt), options=opts, **session_kw)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            session.serve()
        except BaseException as exc:  # surfaced by the test's teardown
            errors.append(exc)

    thread = threading.Thread(target=serve, name="serve", daemon=True)
    thread.start()
    conn = -1
    try:
        conn = os.minor(os.stat(mnt).st_dev)
        yield Mounted(mnt, src, fs, session, thread, errors)
    finally:
        try:
            fmount.unmount(str(mnt))
        except OSError:
            fmount.unmount(str(mnt), lazy=True)
        thread.join(10)
        if thread.is_alive():
            _abort(conn)
            thread.join(5)
        os.close(fd)
        assert not thread.is_alive(), "serve() did not end after umount"
        assert not errors, errors


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Callable[..., contextlib.AbstractContextManager[Mounted]]]:
    """``with mount(**kw) as m:`` mounts a MirrorFS (or ``fs=``) for the test;
    ``public=True`` puts it where other users can reach it (pytest's tmp_path is 0700)."""
    count = iter(range(100))
    public: list[Path] = []

    def make(public_dir: bool = False, **kw: Any) -> contextlib.AbstractContextManager[Mounted]:
        kw.setdefault("name", f"m{next(count)}")
        base = tmp_path
        if public_dir:
            base = Path(tempfile.mkdtemp(prefix="qvdfs-fuse-test-"))
            os.chmod(base, 0o755)
            public.append(base)
        return mounted(base, **kw)

    yield make
    for base in public:
        shutil.rmtree(base, ignore_errors=True)


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()
