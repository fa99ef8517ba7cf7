"""The live feed of the VMs' states: one watcher for every open page of this server.

A thread reads every VM's state (``pages.vm_states``, a few ms for 1,000 VMs) and
hands it to each subscribed page when it changed. On PostgreSQL it reads when a
trigger's NOTIFY says the vms table changed (``migrations._add_web_admin``), and every
``PG_POLL_S`` anyway, so a lost notification costs a poll period; SQLite has no
NOTIFY, so there it reads every ``POLL_S``. Notifications that arrive while it reads
are handled by the next read: a burst of changes costs one query, not one each.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from collections.abc import AsyncIterator

from qvdctl.db.notify import Listener
from qvdctl.db.schema import VMS_CHANGED
from qvdctl.errors import QvdError
from qvdctl.node import Node
from qvdctl.web import pages

log = logging.getLogger(__name__)

POLL_S = 0.25
PG_POLL_S = 2.0
KEEPALIVE_S = 15.0


class VmFeed:
    """Started and stopped with the application (``start`` / ``stop``)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._pages: set[asyncio.Queue[str]] = set()
        self._latest: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._watch, name="vm-feed", daemon=True)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=10)
        os.close(self._wake_r)
        os.close(self._wake_w)

    async def events(self) -> AsyncIterator[str]:
        """The states as JSON now, then each time they change; ``""`` when it is time for a
        keep-alive (so a dead connection is noticed)."""
        queue: asyncio.Queue[str] = asyncio.Queue()
        if self._latest is not None:
            queue.put_nowait(self._latest)
        self._pages.add(queue)
        try:
            while True:
                try:
                    yield await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    yield ""
        finally:
            self._pages.discard(queue)

    def _publish(self, states: str) -> None:
        self._latest = states
        for queue in self._pages:
            queue.put_nowait(states)

    def _watch(self) -> None:
        assert self._loop is not None
        listener = Listener(self.node.db, [VMS_CHANGED])
        period = POLL_S if self.node.db.is_sqlite else PG_POLL_S
        last = None
        try:
            while not self._stopping.is_set():
                try:
                    if last is None:  # LISTEN before the first read: no change slips between
                        listener.wait(0, self._wake_r)
                    with self.node.db.reader() as conn:
                        states = json.dumps(pages.vm_states(conn))
                    if states != last:
                        last = states
                        self._loop.call_soon_threadsafe(self._publish, states)
                    listener.wait(period, self._wake_r)
                except QvdError as exc:  # the database went away: say so, retry
                    log.warning("live feed: %s", exc)
                    self._stopping.wait(PG_POLL_S)
        finally:
            listener.close()
