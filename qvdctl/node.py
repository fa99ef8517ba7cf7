"""The node qvdctl runs on: its database, its settings and its storage.

Two ways to run, one code path:

- a single node (the default): the embedded SQLite database under the storage root,
  and every command does its work in the admin's process;
- a fleet: a node config file (``--config`` / ``$QVD_NODE_CONF`` / ``/etc/qvd/node.conf``)
  or a PostgreSQL URL (``--db`` / ``$QVD_DB``) points at the shared database; each
  node runs an HKD (``qvdctl hkd``) that does the work, and the admin CLI only records
  commands for it (``qvdctl/fleet/``).
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from qvdctl import nodeconf
from qvdctl.db import store
from qvdctl.db.engine import Database
from qvdctl.settings import DEFAULT_ROOT, Settings
from qvdctl.storage import Storage

log = logging.getLogger(__name__)

DB_FILE = "qvd.db"


def database_url(root: Path | None, config: nodeconf.NodeConfig | None = None,
                 explicit: str | None = None) -> str:
    """Where the database lives: ``--db`` / ``$QVD_DB``, else the node config's, else SQLite.

    ``$QVD_DB_URL`` is the older spelling of ``$QVD_DB``. The SQLite file is
    ``<root>/qvd.db`` with a root (``--root`` / ``$QVD_ROOT``); without, it sits
    beside the default storage root: ``/var/lib/qvd/qvd.db``.
    """
    if url := explicit or os.environ.get("QVD_DB") or os.environ.get("QVD_DB_URL"):
        return url
    if config is not None and config.database_url:
        return config.database_url
    path = root / DB_FILE if root is not None else DEFAULT_ROOT.parent / DB_FILE
    return f"sqlite:///{path}"


class Node:
    """Everything a command needs about this node; settings are re-read on demand.

    ``config`` is the node config file (when None, found as ``nodeconf.find`` says);
    ``db_url`` overrides its database.
    """

    def __init__(self, root: Path | None = None, *, config: Path | None = None,
                 db_url: str | None = None) -> None:
        self.root = root.absolute() if root is not None else None
        path = nodeconf.find(config)
        self.config = nodeconf.load(path) if path is not None else None
        self._local = dict(self.config.settings) if self.config else {}
        if self.root is not None:
            self._local.pop("path.storage.root", None)  # --root beats the file
        self.db = Database(database_url(self.root, self.config, db_url))
        # A fleet: the admin CLI records commands for the nodes' HKDs instead of working.
        self.fleet = self.config is not None or not self.db.is_sqlite

    def settings(self) -> Settings:
        with self.db.reader() as conn:
            stored = store.get_settings(conn)
        return Settings(stored, self.root or DEFAULT_ROOT, self._local)

    def storage(self) -> Storage:
        return Storage.from_settings(self.settings())

    def name(self) -> str:
        """This node's name in the hosts table.

        The node config's ``nodename`` first (a node's identity is its own, whatever
        the shared database says), then the setting ``nodename``, else the hostname.
        """
        return self._local.get("nodename") or self.settings()["nodename"] or socket.gethostname()

    def close(self) -> None:
        self.db.close()
