"""Opening the database: SQLite by default or a fleet's PostgreSQL, safe for concurrent processes.

SQLite rules that keep several processes from corrupting or deadlocking it:

- WAL journal: readers never block the writer and a crash never leaves a
  half-written page behind;
- ``busy_timeout``: a process that finds the database locked waits instead of
  failing at once;
- writers start with ``BEGIN IMMEDIATE``: they take the write lock before the
  first read, so two read-then-write transactions cannot both read, then
  deadlock on the upgrade (pysqlite's own deferred BEGIN would allow that).

PostgreSQL (driver psycopg 3, ``postgresql+psycopg://``; a bare ``postgresql://``
URL gets that driver) keeps the same promise with one transaction-level advisory
lock taken by every writer at its start: writers run one at a time as on SQLite,
so code that reads, then writes (the free IP of ``vm add``) stays correct, and
readers never wait. Stale pooled connections (the server restarted under an HKD)
are tested before use. Over TCP, a server that stops answering altogether (a partition:
packets vanish, nothing is refused) fails a call within ``TCP_USER_TIMEOUT_S`` and an
idle LISTEN within the keepalives', instead of the kernel's retransmissions (about 15
minutes), so an HKD cut off from its database notices, and rejoins soon after it heals.

Anything engine-specific stays in this module (and ``notify.py``, ``clock.py``); the
rest of qvdctl speaks SQLAlchemy Core, so the schema and every query are the same on both.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import InterfaceError, OperationalError

from qvdctl.db import migrations
from qvdctl.errors import QvdError

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 30_000
# The advisory lock key every PostgreSQL writer holds ("qvd" in ASCII).
WRITER_LOCK = 0x717664
# A PostgreSQL server that does not answer within this is down, as far as we care.
CONNECT_TIMEOUT_S = 5
# Over TCP: unacknowledged data for this long ends the connection (libpq's tcp_user_timeout),
# and an idle one is probed after KEEPALIVE_IDLE_S, every KEEPALIVE_INTERVAL_S, given up
# after KEEPALIVE_COUNT probes unanswered. Only a dead network waits that long: a busy
# server's kernel still acknowledges at once.
TCP_USER_TIMEOUT_S = 10
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT = 5, 2, 3
# The server ends a session idle this long inside a transaction: a process stopped there
# (SIGSTOP, a swap storm) would otherwise hold the writer lock, and every other writer
# (the fleet's lease renewals among them) would wait behind it for as long as it stays.
IDLE_IN_TRANSACTION_S = 10


class Database:
    """One database, opened (and created or upgraded) on construction."""

    def __init__(self, url: str) -> None:
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if url.startswith("sqlite:///"):
            path = Path(url.removeprefix("sqlite:///"))
            path.parent.mkdir(parents=True, exist_ok=True)
        if self.is_sqlite:
            self.engine: Engine = create_engine(
                url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000}
            )
            event.listen(self.engine, "connect", _sqlite_connect)
            event.listen(self.engine, "begin", _sqlite_begin)
        elif url.startswith("postgresql+psycopg://"):
            self.engine = create_engine(url, pool_pre_ping=True, connect_args={
                "connect_timeout": CONNECT_TIMEOUT_S,
                "tcp_user_timeout": TCP_USER_TIMEOUT_S * 1000,
                "keepalives": 1, "keepalives_idle": KEEPALIVE_IDLE_S,
                "keepalives_interval": KEEPALIVE_INTERVAL_S, "keepalives_count": KEEPALIVE_COUNT,
                # The server's side of the same bounds: a backend of a client cut off
                # in the middle of a writer transaction, blocked sending it a reply,
                # is not idle, and would hold the writer lock for the kernel's 15
                # minutes of retransmissions.
                "options": f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_S}s"
                           f" -c tcp_user_timeout={TCP_USER_TIMEOUT_S * 1000}"
                           f" -c tcp_keepalives_idle={KEEPALIVE_IDLE_S}"
                           f" -c tcp_keepalives_interval={KEEPALIVE_INTERVAL_S}"
                           f" -c tcp_keepalives_count={KEEPALIVE_COUNT}",
            })
            event.listen(self.engine, "begin", _postgresql_begin)
        else:
            raise QvdError(
                f"unsupported database URL '{url}': use sqlite:///FILE or postgresql://..."
            )
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
        except (OperationalError, InterfaceError) as exc:
            # A server gone away says so over several lines; the first is the reason.
            first = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else exc
            raise QvdError(f"database {self.shown_url}: {first}") from exc

    @property
    def shown_url(self) -> str:
        """The URL without its password, for messages."""
        return make_url(self.url).render_as_string(hide_password=True)

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


def _postgresql_begin(conn: Connection) -> None:
    if conn.get_execution_options().get("qvd_write", True):
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({WRITER_LOCK})")
