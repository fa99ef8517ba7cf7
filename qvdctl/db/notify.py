"""Waking a fleet's HKDs: PostgreSQL LISTEN/NOTIFY, and nothing at all on SQLite.

A command or a setting is written to the database first; the notification only
says "look now". So a lost notification costs a poll period, never a command, and
SQLite (one node, no NOTIFY) works by the poll alone. Channel names are stock
QVD's (SPEC §6).

``Listener.wait`` selects on the listening connection's socket together with a
file descriptor of the caller's (the HKD's wake-up pipe, which also receives its
signals), so a SIGTERM or a finished job ends the wait at once.
"""

from __future__ import annotations

import logging
import select
from typing import Any

from sqlalchemy import Connection, text

from qvdctl.db.engine import Database
from qvdctl.errors import QvdError

log = logging.getLogger(__name__)

CONFIG_CHANGED = "qvd_config_changed"


def vm_commands(host_id: int) -> str:
    """The channel of VM commands for host ``host_id``."""
    return f"qvd_cmd_for_vm_on_host{host_id}"


def notify(conn: Connection, channel: str, payload: str = "") -> None:
    """Notify ``channel`` when ``conn``'s transaction commits (a no-op on SQLite)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_notify(:channel, :payload)"),
                     {"channel": channel, "payload": payload})


class Listener:
    """A connection LISTENing on ``channels``, reopened after the server went away."""

    def __init__(self, db: Database, channels: list[str]) -> None:
        self.db = db
        self.channels = channels
        self._raw: Any = None  # the pool's DBAPI connection, kept out of the pool
        self._conn: Any = None  # the psycopg connection under it

    def _open(self) -> None:
        if self._conn is not None and not self._conn.closed:
            return
        self.close()
        try:
            self._raw = self.db.engine.raw_connection()
            conn = self._raw.driver_connection
            conn.autocommit = True
            for channel in self.channels:
                conn.execute(f'LISTEN "{channel}"')
        except Exception as exc:
            self.close()
            raise QvdError(f"database {self.db.shown_url}: cannot listen: {exc}") from exc
        self._conn = conn

    def wait(self, timeout: float, wake_fd: int) -> list[tuple[str, str]]:
        """Wait up to ``timeout`` s for notifications or for ``wake_fd`` to be readable.

        Returns the (channel, payload) pairs received, maybe none.

        Raises:
            QvdError: the server cannot be reached (the caller retries later).
        """
        if self.db.is_sqlite:
            select.select([wake_fd], [], [], max(timeout, 0))
            return []
        self._open()
        select.select([self._conn.fileno(), wake_fd], [], [], max(timeout, 0))
        try:
            return [(n.channel, n.payload) for n in self._conn.notifies(timeout=0)]
        except Exception as exc:
            self.close()
            raise QvdError(f"database {self.db.shown_url}: listening failed: {exc}") from exc

    def close(self) -> None:
        if self._raw is not None:
            try:
                self._raw.invalidate()  # never hand a LISTENing connection back to the pool
            except Exception as exc:  # it is going away anyway
                log.debug("closing the listener: %s", exc)
        self._raw = self._conn = None
