"""PostgreSQL as qvdctl's second engine, and the node config file that names it.

The schema, its migrations and the admin CLI must behave on PostgreSQL as they do
on SQLite: the same commands, the same one-line errors.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from qvdctl import nodeconf
from qvdctl.db import clock, migrations, store
from qvdctl.db.engine import IDLE_IN_TRANSACTION_S, Database
from qvdctl.errors import QvdError
from qvdctl.node import Node
from tests.support.postgres import PgServer, postgres  # noqa: F401 (a fixture)
from tests.support.qvdctl import Cli

pytestmark = pytest.mark.timeout(120)


def _conf(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.conf"
    path.write_text(text)
    return path


def test_node_conf_names_a_postgresql_over_a_socket(tmp_path: Path) -> None:
    conf = nodeconf.load(_conf(tmp_path, (
        "# a node\n"
        "nodename = node7\n"
        "database.host = /run/postgresql\n"
        "database.name = qvd\n"
        "database.user = qvd\n"
        "database.password = s3cr/t\n"
        "path.log = /var/log/qvd\n"
        "path.storage.root = /srv/qvd\n"
    )))
    assert conf.settings == {"nodename": "node7", "path.storage.root": "/srv/qvd"}
    assert conf.database_url == "postgresql+psycopg://qvd:s3cr%2Ft@/qvd?host=%2Frun%2Fpostgresql"


def test_node_conf_tcp_host_and_url(tmp_path: Path) -> None:
    conf = nodeconf.load(_conf(tmp_path, "database.host = db1\ndatabase.name = qvd\n"))
    assert conf.database_url == "postgresql+psycopg://db1/qvd"
    conf = nodeconf.load(_conf(tmp_path, "database.url = postgresql://a@b/c\n"))
    assert conf.database_url == "postgresql://a@b/c"


@pytest.mark.parametrize(("text", "message"), [
    ("nodenmae = x\n", "node.conf:1: unknown key 'nodenmae'"),
    ("\n# c\nnodename\n", "node.conf:3: expected 'key = value'"),
    ("database.hots = x\n", "unknown key 'database.hots'"),
    ("database.host = x\n", "database.name is missing"),
    ("database.url = a\ndatabase.name = b\n", "either database.url or"),
    ("vm.overlay.persistent = 2\n", "node.conf:1: bad value for vm.overlay.persistent"),
])
def test_a_bad_node_conf_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(QvdError, match=message):
        nodeconf.load(_conf(tmp_path, text))


def test_node_conf_settings_sit_under_the_database_s(tmp_path: Path) -> None:
    path = _conf(tmp_path, "nodename = n1\nvm.stop.timeout = 7\nvm.overlay.persistent = 1\n")
    node = Node(tmp_path, config=path, db_url=f"sqlite:///{tmp_path / 'q.db'}")
    try:
        with node.db.writer() as conn:
            from qvdctl.db import store

            store.set_setting(conn, "vm.stop.timeout", "9")
            store.set_setting(conn, "nodename", "global")
        settings = node.settings()
        assert settings["vm.stop.timeout"] == "9"  # the global row wins (stock precedence)
        assert settings["vm.overlay.persistent"] == "1"
        assert node.name() == "n1"  # but a node's name is its own
        assert node.fleet
    finally:
        node.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'qvd.db'}"
    else:
        server: PgServer = request.getfixturevalue("postgres")
        yield server.url()


def test_an_old_schema_is_migrated(db_url: str, tmp_path: Path) -> None:
    node = Node(tmp_path, db_url=db_url)
    try:
        with node.db.writer() as conn:
            # Back to version 1 as it shipped: without the fleet's columns.
            for table, columns in (("hosts", ("state", "ok_ts", "blocked")),
                                   ("vms", ("vm_cmd", "cmd_at", "error"))):
                for column in columns:
                    conn.exec_driver_sql(f"ALTER TABLE {table} DROP COLUMN {column}")
            conn.exec_driver_sql("UPDATE schema_version SET version = 1")
    finally:
        node.close()
    node = Node(tmp_path, db_url=db_url)
    try:
        with node.db.reader() as conn:
            assert migrations.current_version(conn) == migrations.LATEST
            names = {c["name"] for c in inspect(conn).get_columns("hosts")}
        assert {"state", "ok_ts", "blocked"} <= names
    finally:
        node.close()


def test_the_admin_cli_on_postgresql(postgres: PgServer, tmp_path: Path) -> None:  # noqa: F811
    cli = Cli(tmp_path / "root")
    env = {"QVD_DB": postgres.url()}
    cli.run("config", "set", "vm.network.ip.start=10.9.0.2", "vm.network.netmask=24", env=env)
    assert "OSF added with id 1" in cli.run("osf", "add", "name=o", env=env).stdout
    cli.run("user", "add", "login=u", "password=p", env=env)
    cli.run("vm", "add", "name=v1", "user=u", "osf=o", env=env)
    cli.run("vm", "add", "name=v2", "user=u", "osf=o", env=env)
    assert "OSF 'o' already exists" in cli.fails("osf", "add", "name=o", env=env)
    rows = json.loads(cli.run("--json", "vm", "list", env=env).stdout)
    assert [(r["Name"], r["Ip"], r["State"]) for r in rows] == [
        ("v1", "10.9.0.254", "stopped"), ("v2", "10.9.0.253", "stopped"),
    ]
    # Nothing landed in the SQLite file the root would otherwise hold.
    assert not (tmp_path / "root" / "qvd.db").exists()


def test_an_unreachable_postgresql_is_one_line(tmp_path: Path) -> None:
    cli = Cli(tmp_path)
    error = cli.fails("osf", "list", env={"QVD_DB": f"postgresql://qvd@/qvd?host={tmp_path}"})
    assert error.startswith("Error: database postgresql+psycopg://qvd@/qvd"), error


def test_a_disk_image_of_more_than_2_gib_is_recorded(db_url: str, tmp_path: Path) -> None:
    node = Node(tmp_path, db_url=db_url)
    try:
        with node.db.writer() as conn:
            # As a database made before dis.size was widened: a 32-bit column.
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql("ALTER TABLE dis ALTER COLUMN size TYPE INTEGER")
            conn.exec_driver_sql("UPDATE schema_version SET version = 4")
    finally:
        node.close()
    node = Node(tmp_path, db_url=db_url)
    try:
        with node.db.writer() as conn:
            osf = store.add_osf(conn, "o", 256, 0)
            di = store.add_di(conn, osf, "o-1.tar.gz", "1", "0" * 64, 5 << 30)
        with node.db.reader() as conn:
            assert store.get_di(conn, di)["size"] == 5 << 30
    finally:
        node.close()


def test_the_database_clock_is_the_server_s_time_in_epoch_seconds(db_url: str) -> None:
    """Leases are stamped with it (qvdctl/db/clock.py): epoch seconds, sub-second, ticking."""
    db = Database(db_url)
    try:
        with db.reader() as conn:
            first = clock.read(conn)
        with db.reader() as conn:
            second = clock.read(conn)
        # The server runs on this machine: its clock is this one's.
        assert abs(first - time.time()) < 5
        assert first != int(first) or second != int(second)  # not whole seconds
        assert second >= first
    finally:
        db.close()


_HOLD_THE_WRITER_LOCK = """
import os, signal, sys
from sqlalchemy import text
from qvdctl.db.engine import Database
with Database(sys.argv[1]).writer() as conn:
    conn.execute(text("SELECT 1"))
    print("holding", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
"""


@pytest.mark.timeout(120)
def test_a_writer_stopped_inside_its_transaction_holds_the_others_up_only_briefly(
    postgres: PgServer,  # noqa: F811
) -> None:
    """A fleet's renewals take the writer lock: one stuck client must not stop them all."""
    url = postgres.url()
    Database(url).close()  # the schema, before the holder takes the lock
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_THE_WRITER_LOCK, url],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
        db = Database(url)
        started = time.monotonic()
        with db.writer() as conn:
            conn.execute(text("SELECT 1"))
        waited = time.monotonic() - started
        db.close()
        assert IDLE_IN_TRANSACTION_S - 1 < waited < IDLE_IN_TRANSACTION_S + 10, waited
    finally:
        holder.kill()
        holder.wait()
