"""The node config file, ``/etc/qvd/node.conf`` in stock QVD's format.

A node learns from it who it is and where the shared database is: ``key = value``
lines, ``#`` comments, blank lines ignored. Keys it knows:

- ``nodename``: this node's name in the hosts table;
- ``database.host``, ``database.name``, ``database.user``, ``database.password``
  (and ``database.port``), or one ``database.url`` (an SQLAlchemy URL), naming the
  fleet's PostgreSQL; a ``database.host`` starting with ``/`` is a Unix socket folder;
- any node setting (``path.storage.root``, ``vm.lxc.lxcpath``, ...): a per-node value
  that the database's global rows override (stock QVD's precedence, SPEC §6);
- ``path.log`` and ``log.level``: stock keys, accepted and not used (logs go to stderr,
  which systemd's journal keeps).

An unknown key is an error naming its line, as a typo in ``config set`` is.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from sqlalchemy.engine import URL

from qvdctl.errors import QvdError
from qvdctl.settings import KNOWN, validate

log = logging.getLogger(__name__)

DEFAULT_PATH = Path("/etc/qvd/node.conf")

_DATABASE_KEYS = ("host", "port", "name", "user", "password", "url")
_STOCK_UNUSED = ("path.log", "log.level")


@dataclasses.dataclass(frozen=True)
class NodeConfig:
    """What one node config file says."""

    path: Path
    database_url: str | None
    settings: dict[str, str]  # node-local settings, nodename included


def find(explicit: Path | None) -> Path | None:
    """The node config file in use: ``--config``, else ``$QVD_NODE_CONF``, else the stock path.

    An explicit file must exist; the stock path is used only if it does.
    """
    if explicit is None and (env := os.environ.get("QVD_NODE_CONF")):
        explicit = Path(env)
    if explicit is not None:
        if not explicit.is_file():
            raise QvdError(f"node config {explicit} does not exist")
        return explicit
    return DEFAULT_PATH if DEFAULT_PATH.is_file() else None


def load(path: Path) -> NodeConfig:
    """Parse ``path``.

    Raises:
        QvdError: an unreadable file, a line that is not ``key = value``, an unknown
            key or a bad value; the message names the file and line.
    """
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise QvdError(f"cannot read node config {path}: {exc}") from None
    database: dict[str, str] = {}
    settings: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        where = f"{path}:{number}"
        if not sep or not key:
            raise QvdError(f"{where}: expected 'key = value'")
        if key.startswith("database."):
            if key.removeprefix("database.") not in _DATABASE_KEYS:
                raise QvdError(f"{where}: unknown key '{key}'")
            database[key.removeprefix("database.")] = value
        elif key in KNOWN:
            try:
                settings[key] = validate(key, value)
            except QvdError as exc:
                raise QvdError(f"{where}: {exc}") from None
        elif key not in _STOCK_UNUSED:
            raise QvdError(f"{where}: unknown key '{key}'")
    return NodeConfig(path, _database_url(path, database), settings)


def _database_url(path: Path, db: dict[str, str]) -> str | None:
    if "url" in db:
        if len(db) > 1:
            raise QvdError(f"{path}: give either database.url or database.host/name/..., not both")
        return db["url"]
    if not db:
        return None
    if "name" not in db:
        raise QvdError(f"{path}: database.name is missing")
    host = db.get("host", "")
    port = db.get("port")
    if port is not None and not port.isdigit():
        raise QvdError(f"{path}: database.port '{port}' is not a number")
    # libpq takes a socket folder as the host; URL.create keeps it out of the
    # authority part, where a '/' would not parse.
    query = {"host": host} if host.startswith("/") else {}
    return URL.create(
        "postgresql+psycopg",
        username=db.get("user") or None,
        password=db.get("password") or None,
        host=None if query or not host else host,
        port=int(port) if port else None,
        database=db["name"],
        query=query,
    ).render_as_string(hide_password=False)
