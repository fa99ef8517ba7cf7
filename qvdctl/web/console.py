"""A running VM's console in the browser: ``lxc-console`` on a pseudo-terminal, over a
WebSocket.

The page (``console.html``, xterm.js) opens ``/vms/ID/console/socket``; this end runs
the CLI's own ``vm console`` command line (``seam.console_command``) with a new
pseudo-terminal as its terminal, and copies bytes both ways: binary frames are what
the console printed or the keys typed, a text frame from the page is a JSON
``{"cols": C, "rows": R}`` window size. Closing the page ends ``lxc-console``; the
container's console stays, as after ``Ctrl+a q``.

Only for a VM running on this server's node: liblxc's console is reached through the
container's command socket, which answers in the network namespace that started it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import pty
import struct
import subprocess
import termios
from collections.abc import Mapping

from starlette.websockets import WebSocket

log = logging.getLogger(__name__)

READ_SIZE = 65536
# Window sizes a page may ask for: xterm.js' own bounds are far wider than any screen.
MAX_CELLS = 1000


def resize(fd: int, cols: int, rows: int) -> None:
    """Tell the terminal on ``fd`` (and the console behind it) its window size."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _size(text: str) -> tuple[int, int] | None:
    """``(cols, rows)`` from a page's text frame; None if it is not a sane window size."""
    try:
        asked = json.loads(text)
        cols, rows = int(asked["cols"]), int(asked["rows"])
    except (ValueError, TypeError, KeyError):
        return None
    return (cols, rows) if 0 < cols <= MAX_CELLS and 0 < rows <= MAX_CELLS else None


async def bridge(websocket: WebSocket, argv: list[str], env: Mapping[str, str]) -> None:
    """Run ``argv`` on a new pseudo-terminal and join it to the accepted ``websocket``
    until either ends; the program is ended (SIGTERM, then SIGKILL) on the way out."""
    master, slave = pty.openpty()
    try:
        # setsid --ctty: a session of its own with the new terminal as its controlling
        # one, so a window size set here reaches it as SIGWINCH, and the terminal's
        # hang-up ends it.
        process = subprocess.Popen(["setsid", "--ctty", *argv], stdin=slave, stdout=slave,
                                   stderr=slave, env=dict(env))
    finally:
        os.close(slave)
    loop = asyncio.get_running_loop()
    output: asyncio.Queue[bytes] = asyncio.Queue()

    def readable() -> None:
        try:
            data = os.read(master, READ_SIZE)
        except OSError:  # EIO: the program closed the terminal
            data = b""
        if not data:
            loop.remove_reader(master)
        output.put_nowait(data)

    async def to_page() -> None:
        while data := await output.get():
            await websocket.send_bytes(data)

    async def from_page() -> None:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("bytes"):
                await asyncio.to_thread(os.write, master, message["bytes"])
            elif message.get("text") and (size := _size(message["text"])):
                resize(master, *size)

    loop.add_reader(master, readable)
    tasks = [asyncio.ensure_future(to_page()), asyncio.ensure_future(from_page())]
    try:
        # Either side ending ends both; a task's own failure (the page gone while a
        # frame was sent) is an ending like any other.
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        loop.remove_reader(master)
        process.terminate()
        try:
            await asyncio.to_thread(process.wait, 5)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)
        os.close(master)
        with contextlib.suppress(RuntimeError):  # closed by the page already
            await websocket.close(reason="the console ended")
