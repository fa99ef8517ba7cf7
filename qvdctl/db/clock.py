"""The database's clock, in seconds since the epoch: the one clock every node of a fleet shares.

Leases are written and judged on it (``fleet/lease.py``), so nodes whose own clocks
differ by minutes still agree on whose lease ran out. PostgreSQL's ``clock_timestamp()``
is the server's time at the moment the statement runs (``now()`` would be the start of
the transaction, which may have waited for the writer lock); SQLite has only the one
node's clock, which is all a SQLite node shares with itself.

``db_now()`` is a SQL expression, so the time is taken inside the statement that uses it
(the renewal's UPDATE itself), never read first and written later.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Float, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement


class db_now(FunctionElement[float]):  # noqa: N801 (reads as the SQL function it stands for)
    """The database server's current time, seconds since the epoch (a float)."""

    type = Float()
    inherit_cache = True


@compiles(db_now, "postgresql")
def _postgresql(_element: db_now, _compiler: Any, **_kw: Any) -> str:
    return "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"


@compiles(db_now, "sqlite")
def _sqlite(_element: db_now, _compiler: Any, **_kw: Any) -> str:
    # julianday counts days from noon of 4714 BC; the epoch is day 2440587.5.
    return "((julianday('now') - 2440587.5) * 86400.0)"


def read(conn: Connection) -> float:
    """The database's time now."""
    return float(conn.execute(select(db_now())).scalar_one())
