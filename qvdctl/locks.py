"""Advisory locks that serialise qvdctl processes on one node.

A lock is an exclusive ``flock`` on a small file. The kernel releases it when
its holder exits in any way, SIGKILL included, so a crashed command never
leaves a lock behind; what it leaves is state for the next holder to repair.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` body.

    Blocks until every other holder, in this or another process, has let go.
    Not re-entrant: a second ``exclusive`` of the same path inside the body waits forever.
    """
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
