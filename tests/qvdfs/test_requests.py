"""What the kernel asks of a union on the native FUSE session, counted by the session's own
per-request counters (``qvdfs stats``).

The pyfuse3 backend keeps no such counters, so ``make test``'s pass on that backend leaves
this file out; the union behaviour it shares is in test_union.py.
"""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qvdproc import counters
from tests.qvdfs.test_union import Union, mounted


@pytest.fixture
def union(tmp_path: Path) -> Iterator[Union]:
    with mounted(tmp_path) as u:
        yield u


def test_isatty_on_a_union_file_is_enotty(union: Union) -> None:
    fd = os.open(union.mnt / "etc/passwd", os.O_RDONLY)  # open() would ask isatty itself
    try:
        before = _opcode_count(union.mnt, "IOCTL")
        assert not os.isatty(fd)
        with pytest.raises(OSError) as raised:
            fcntl.ioctl(fd, termios.TCGETS, bytes(64))
    finally:
        os.close(fd)
    assert raised.value.errno == errno.ENOTTY
    assert _opcode_count(union.mnt, "IOCTL") == before + 2  # the kernel asks every time


def _opcode_count(mnt: Path, opcode: str) -> int:
    rows = counters.fetch(str(mnt))["opcodes"]
    assert isinstance(rows, dict)
    return int(rows.get(opcode, {}).get("count", 0))


def test_a_created_file_is_not_asked_for_again_until_it_changes(union: Union) -> None:
    # The reply to a create is kept like any other entry, although the file is open for
    # writing: its open sends no GETATTR. The first write, truncation or mapping after it
    # shows new times all the same.
    os.stat(union.mnt / "var")
    asked = _opcode_count(union.mnt, "GETATTR")
    fd = os.open(union.mnt / "var/new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        assert _opcode_count(union.mnt, "GETATTR") == asked
        created = os.stat(union.mnt / "var/new")
        time.sleep(0.05)  # past the coarse clock's tick that stamps file times
        os.ftruncate(fd, 4096)
        truncated = os.stat(union.mnt / "var/new")
        assert truncated.st_size == 4096 and truncated.st_mtime_ns > created.st_mtime_ns
    finally:
        os.close(fd)
    time.sleep(0.05)
    write = "import mmap, sys; f = open(sys.argv[1], 'r+b'); mmap.mmap(f.fileno(), 0)[0:1] = b'Z'"
    subprocess.run([sys.executable, "-c", write, str(union.mnt / "var/new")], check=True,
                   timeout=30)
    shown = subprocess.run(["stat", "-c", "%.9Y", str(union.mnt / "var/new")],
                           capture_output=True, text=True, check=True, timeout=30)
    assert float(shown.stdout) > truncated.st_mtime_ns / 1e9
