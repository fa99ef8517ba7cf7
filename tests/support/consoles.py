"""Driving a container's console through a pty, as an admin at a terminal would.

Typing must wait for the shell: ``lxc-console`` sets its terminal up with
``TCSAFLUSH``, which throws away whatever was typed before it got there, and the
console's shell may still be starting. So ``talk`` presses Enter until a prompt
answers, and only then types the command.
"""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time
from collections.abc import Sequence

PROMPT = b"# "  # busybox ash's root prompt, "/ # "
LEAVE = b"\x01q"  # Ctrl+a q


def _read_for(fd: int, seconds: float) -> bytes:
    ready, _, _ = select.select([fd], [], [], seconds)
    try:
        return os.read(fd, 4096) if ready else b""
    except OSError:  # EIO: the console program exited and closed the pty
        return b""


def _read_until(fd: int, wanted: bytes, seen: bytes, deadline: float, nudge: bytes) -> bytes:
    """Read until ``wanted`` appears after ``len(seen)``, sending ``nudge`` every second."""
    start = len(seen)
    last_nudge = 0.0
    while wanted not in seen[start:] and time.monotonic() < deadline:
        if nudge and time.monotonic() - last_nudge >= 1:
            os.write(fd, nudge)
            last_nudge = time.monotonic()
        seen += _read_for(fd, 0.2)
    return seen


def talk(argv: Sequence[str], command: bytes, marker: bytes, timeout: float = 30) -> bytes:
    """Run console program ``argv`` on a pty: wait for the prompt, type ``command``,
    read until ``marker`` shows, leave with Ctrl+a q. Returns everything seen.

    Raises:
        AssertionError: no prompt or no marker within ``timeout``, or the console
            program did not exit 0 when left.
    """
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        list(argv), stdin=secondary, stdout=secondary, stderr=secondary, start_new_session=True
    )
    os.close(secondary)
    deadline = time.monotonic() + timeout
    try:
        seen = _read_until(primary, PROMPT, b"", deadline, nudge=b"\r")
        assert PROMPT in seen, f"no shell prompt on the console: {seen[-500:]!r}"
        os.write(primary, command + b"\r")
        seen = _read_until(primary, marker, seen, deadline, nudge=b"")
        assert marker in seen, f"{marker!r} never showed: {seen[-500:]!r}"
        os.write(primary, LEAVE)
        assert proc.wait(timeout=10) == 0
        return seen
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(primary)
