"""Opening the database: SQLite by default, safe for concurrent qvdctl processes.

SQLite rules that keep several processes from corrupting or deadlocking it:

- WAL journal: readers never block the writer and a crash never leaves a
  half-written page behind;
- ``busy_timeout``: a process that finds the database locked waits instead of
  failing at once;
- writers start with ``BEGIN IMMEDIATE``: they take the write lock before the
  first read, so two read-then-write transactions cannot both read, then
  deadlock on the upgrade (pysqlite's own deferred BEGIN would allow that).

Anything SQLite-specific stays in this module; the rest of qvdctl speaks
SQLAlchemy Core, so a PostgreSQL URL only needs a branch here.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import OperationalError

from qvdctl.db import migrations
from qvdctl.errors import QvdError

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 30_000


class Database:
    """One database, opened (and created or upgraded) on construction."""

    def __init__(self, url: str) -> None:
        self.url = url
        if url.startswith("sqlite:///"):
            path = Path(url.removeprefix("sqlite:///"))
            path.parent.mkdir(parents=True, exist_ok=True)
        elif not url.startswith("sqlite"):
            raise QvdError(f"unsupported database URL '{url}': only sqlite is wired so far")
        self.engine: Engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})
        event.listen(self.engine, "connect", _sqlite_connect)
        event.listen(self.engine, "begin", _sqlite_begin)
        with self.reader() as conn:
            current = migrations.current_version(conn)
        if current != migrations.LATEST:
            # Under the write lock: of two processes opening a fresh database, one
            # creates it and the other then finds it up to date.
            with self.writer() as conn:
                migrations.upgrade(conn)

    @contextlib.contextmanager
    def writer(self) -> Iterator[Connection]:
        """A transaction holding the write lock from its start; commits on success."""
        with self._transaction(write=True) as conn:
            yield conn

    @contextlib.contextmanager
    def reader(self) -> Iterator[Connection]:
        """A read transaction: one consistent snapshot, never blocks the writer."""
        with self._transaction(write=False) as conn:
            yield conn

    @contextlib.contextmanager
    def _transaction(self, *, write: bool) -> Iterator[Connection]:
        try:
            with self.engine.connect() as conn:
                conn = conn.execution_options(qvd_write=write)
                with conn.begin():
                    yield conn
        except OperationalError as exc:
            raise QvdError(f"database {self.url}: {exc.orig}") from exc

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_connect(dbapi_connection: Any, _record: object) -> None:
    # Take transaction control away from pysqlite so _sqlite_begin decides.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA journal_mode = WAL")
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    write = conn.get_execution_options().get("qvd_write", True)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
