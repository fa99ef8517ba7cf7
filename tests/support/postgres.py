"""A throwaway PostgreSQL server for the tests: Debian's binaries, a temporary folder,
a Unix socket in that folder and, by default, no TCP listener at all.

A fleet that must be cut off from its database (``tools/fleet.py``'s ``DbNetwork``)
starts the server inside a network namespace of its own, listening on one address there
(``netns``, ``address``); the nodes reach it over TCP (``tcp_url``), the admin still over
the socket, which no network fault touches.

PostgreSQL refuses to run as root, so the cluster belongs to the ``postgres`` user
the Debian package creates and the server runs as that user (``runuser``); clients
(running as root) connect over the socket with ``trust`` authentication, as the
superuser ``qvd``. ``initdb`` costs a few seconds, so its result is kept as a
template under /tmp (keyed by the server's version) and copied for each server.
The Debian package's own cluster (``main`` on port 5432) is never touched.
"""

from __future__ import annotations

import contextlib
import glob
import ipaddress
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

SUPERUSER = "qvd"
# The length of the network prefix of a TCP listener's clients (see ``pg_server``).
PREFIX = 24


def _bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _as_postgres(argv: list[str], netns: str | None = None,
                 **kw) -> subprocess.CompletedProcess:
    """``argv`` run as the postgres user (in network namespace ``netns``, if given)."""
    enter = ["nsenter", f"--net=/run/netns/{netns}"] if netns is not None else []
    return subprocess.run([*enter, "runuser", "-u", "postgres", "--", *argv], check=True,
                          capture_output=True, text=True, timeout=120, **kw)


def _template(bindir: Path) -> Path:
    """An initdb'd cluster folder to copy, made once per server version."""
    path = Path(tempfile.gettempdir()) / f"qvd-pg-template-{bindir.parent.name}"
    if (path / "PG_VERSION").is_file():
        return path
    tmp = Path(tempfile.mkdtemp(prefix="qvd-pg-initdb-"))
    os.chown(tmp, pwd.getpwnam("postgres").pw_uid, -1)
    _as_postgres([str(bindir / "initdb"), "-D", str(tmp / "data"), "-U", SUPERUSER,
                  "-A", "trust", "--no-sync", "-E", "UTF8", "--locale=C"])
    try:
        os.rename(tmp, path)
    except OSError:  # another test run made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return path


class PgServer:
    """One running server; ``url(name)`` creates database ``name`` and returns its URL."""

    def __init__(self, bindir: Path, netns: str | None = None,
                 address: str | None = None) -> None:
        self.bindir = bindir
        self.netns = netns
        self.address = address
        self.dir = Path(tempfile.mkdtemp(prefix="qvd-pg-"))
        self.data = self.dir / "data"
        shutil.copytree(_template(bindir) / "data", self.data, symlinks=True)
        postgres = pwd.getpwnam("postgres")
        for path in [self.dir, *self.data.rglob("*"), self.data]:
            os.lchown(path, postgres.pw_uid, postgres.pw_gid)
        os.chmod(self.data, 0o700)
        if address is not None:  # clients on the namespace's network, as on the socket
            with open(self.data / "pg_hba.conf", "a") as hba:
                clients = ipaddress.ip_network(f"{address}/{PREFIX}", strict=False)
                hba.write(f"host all all {clients} trust\n")
        self._databases = 0

    def start(self) -> None:
        options = (f"-k {self.dir} -c listen_addresses='{self.address or ''}'"
                   " -c max_connections=300 -c fsync=off")
        # In its namespace: the postmaster, and so every backend, lives there.
        _as_postgres([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l",
                      str(self.dir / "log"), "-o", options, "-w", "-t", "60", "start"],
                     self.netns)

    def stop(self, mode: str = "fast") -> None:
        """``mode`` "immediate": a crash (no checkpoint; the next start recovers)."""
        _as_postgres([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode,
                      "-w", "-t", "60", "stop"])

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def psql(self, sql: str, database: str = "postgres") -> str:
        result = subprocess.run(
            [str(self.bindir / "psql"), "-h", str(self.dir), "-U", SUPERUSER, "-d", database,
             "-tAc", sql],
            check=True, capture_output=True, text=True, timeout=60,
        )
        return result.stdout.strip()

    def url(self, name: str | None = None) -> str:
        if name is None:
            self._databases += 1
            name = f"qvd{self._databases}"
        self.psql(f"CREATE DATABASE {name}")
        return f"postgresql+psycopg://{SUPERUSER}@/{name}?host={self.dir}"

    def tcp_url(self, url: str) -> str:
        """The URL of ``url``'s database over TCP (the server was given an ``address``)."""
        assert self.address is not None, "this server listens on its socket only"
        return f"postgresql+psycopg://{SUPERUSER}@{self.address}:5432/{make_url(url).database}"

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            if self.running():
                self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def pg_server(netns: str | None = None, address: str | None = None) -> Iterator[PgServer]:
    """A started server, stopped and removed on the way out; skips if PostgreSQL is absent.

    With ``netns`` and ``address``, it runs in that network namespace and also listens
    on TCP at that address (clients from the address's /PREFIX network are trusted).
    """
    bindir = _bindir()
    if bindir is None or shutil.which("runuser") is None:
        pytest.skip("PostgreSQL is not installed (scripts/setup.sh installs it)")
    server = PgServer(bindir, netns, address)
    try:
        server.start()
        yield server
    finally:
        server.remove()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PgServer]:
    """One server for the whole session; each test takes its own database with ``url()``."""
    with pg_server() as server:
        yield server


def database_url(request: pytest.FixtureRequest, folder: Path) -> str:
    """A fresh database for a fixture parametrized ``["sqlite", "postgresql"]``: a SQLite
    file in ``folder``, or a database of the session's server (``postgres``)."""
    if request.param == "sqlite":
        return f"sqlite:///{folder / 'qvd.db'}"
    server: PgServer = request.getfixturevalue("postgres")
    return server.url()
