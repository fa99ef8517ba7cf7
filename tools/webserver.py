"""A running ``qvdctl web``: where it says it serves, and its end (tests and ``make demo``)."""

from __future__ import annotations

import contextlib
import re
import select
import subprocess
from collections.abc import Iterator


@contextlib.contextmanager
def serving(server: subprocess.Popen[str], timeout: float = 60) -> Iterator[str]:
    """The base URL (``http://127.0.0.1:PORT/``) that ``server``, a ``qvdctl web`` started
    with its stdout and stderr piped, prints first; it is ended (SIGTERM, then SIGKILL)
    on the way out.

    Raises:
        RuntimeError: it printed no address within ``timeout`` seconds; its error output.
    """
    try:
        assert server.stdout is not None
        ready, _, _ = select.select([server.stdout], [], [], timeout)
        line = server.stdout.readline() if ready else ""
        if not (match := re.search(r"serving (\S+)", line)):
            server.kill()
            _, errors = server.communicate(timeout=15)
            raise RuntimeError(f"qvdctl web did not start: {line!r} {errors.strip()}")
        yield match.group(1)
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
