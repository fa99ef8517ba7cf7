"""Versioned schema migrations.

The database records the number of the last migration applied in
``schema_version``. ``upgrade`` runs the missing ones in order inside one
writer transaction, so two qvdctl processes opening a fresh database at once
cannot both create it. To change the schema: append a function to
``MIGRATIONS``; never edit one that has shipped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy import Connection, inspect, select, text

from qvdctl.db import schema
from qvdctl.errors import QvdError

log = logging.getLogger(__name__)


def _v1_initial(conn: Connection) -> None:
    # Version 1 is the schema as first released; later versions must spell out
    # their own DDL rather than call create_all on a changed metadata.
    schema.metadata.create_all(conn)


def _add_di_halt_signal(conn: Connection) -> None:
    # A database made fresh has the column already (_v1_initial creates today's tables).
    if "halt_signal" not in {c["name"] for c in inspect(conn).get_columns("dis")}:
        conn.execute(text("ALTER TABLE dis ADD COLUMN halt_signal VARCHAR(20)"))


def _add_fleet_runtime(conn: Connection) -> None:
    # The columns a fleet's HKDs and admin CLI share (hosts' lease, VMs' commands).
    # _v1_initial creates the tables from today's metadata, so a fresh database has
    # them already: add only those missing.
    inspector = inspect(conn)
    for table in (schema.hosts, schema.vms):
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for name in ("state", "ok_ts", "blocked", "vm_cmd", "cmd_at", "error"):
            if name in table.c and name not in present:
                column = table.c[name]
                ddl = f"ALTER TABLE {table.name} ADD COLUMN {name} "
                ddl += column.type.compile(dialect=conn.dialect)
                default = getattr(column.server_default, "arg", None)
                if default is not None:
                    ddl += f" NOT NULL DEFAULT '{default}'"
                conn.exec_driver_sql(ddl)


def _add_osf_halt_signal(conn: Connection) -> None:
    # As _add_di_halt_signal: a fresh database has it from _v1_initial.
    if "halt_signal" not in {c["name"] for c in inspect(conn).get_columns("osfs")}:
        conn.execute(text("ALTER TABLE osfs ADD COLUMN halt_signal VARCHAR(20)"))


def _widen_di_size(conn: Connection) -> None:
    # dis.size was a 32-bit INTEGER on PostgreSQL, which refuses an image of 2 GiB or
    # more; SQLite's INTEGER holds 64 bits already.
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("ALTER TABLE dis ALTER COLUMN size TYPE BIGINT")


def _add_web_admin(conn: Connection) -> None:
    # The web admin's accounts and sessions, and the audit log of the CLI and the web.
    # As the columns above: a fresh database has them from _v1_initial already.
    for table in (schema.admins, schema.web_sessions, schema.audit_log):
        table.create(conn, checkfirst=True)
    if conn.dialect.name == "postgresql":
        # Every change to a VM's row, whoever makes it, wakes the web admins' live
        # feeds (qvdctl/web/live.py): once per statement, however many rows it changed.
        conn.exec_driver_sql(f"""
            CREATE OR REPLACE FUNCTION qvd_notify_vms_changed() RETURNS trigger AS $$
            BEGIN PERFORM pg_notify('{schema.VMS_CHANGED}', ''); RETURN NULL; END $$
            LANGUAGE plpgsql""")
        conn.exec_driver_sql("DROP TRIGGER IF EXISTS qvd_vms_changed ON vms")
        conn.exec_driver_sql(
            "CREATE TRIGGER qvd_vms_changed AFTER INSERT OR UPDATE OR DELETE ON vms"
            " FOR EACH STATEMENT EXECUTE FUNCTION qvd_notify_vms_changed()")


def _add_vm_usage(conn: Connection) -> None:
    # What the HKDs publish of their VMs' use; a fresh database has it from _v1_initial.
    schema.vm_usage.create(conn, checkfirst=True)


MIGRATIONS: list[Callable[[Connection], None]] = [
    _v1_initial,
    _add_di_halt_signal,
    _add_fleet_runtime,
    _add_osf_halt_signal,
    _widen_di_size,
    _add_web_admin,
    _add_vm_usage,
]

LATEST = len(MIGRATIONS)


def current_version(conn: Connection) -> int:
    """The schema version of the database ``conn`` is connected to (0 when empty)."""
    if not inspect(conn).has_table("schema_version"):
        return 0
    return conn.execute(select(schema.schema_version.c.version)).scalar_one_or_none() or 0


def upgrade(conn: Connection) -> int:
    """Apply every missing migration; the caller holds a writer transaction.

    Returns the version reached. A database newer than this program is left alone
    and refused, rather than written with an old idea of its schema.
    """
    version = current_version(conn)
    if version > LATEST:
        raise QvdError(f"database schema version {version} is newer than this qvdctl ({LATEST})")
    for number in range(version + 1, LATEST + 1):
        log.info("applying database migration %d", number)
        MIGRATIONS[number - 1](conn)
    if version != LATEST:
        conn.execute(schema.schema_version.delete())
        conn.execute(schema.schema_version.insert().values(version=LATEST))
    return LATEST
