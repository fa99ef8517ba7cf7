"""The node qvdctl runs on: its database, its settings and its storage."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from qvdctl.db import store
from qvdctl.db.engine import Database
from qvdctl.settings import DEFAULT_ROOT, Settings
from qvdctl.storage import Storage

log = logging.getLogger(__name__)

DB_FILE = "qvd.db"


def database_url(root: Path | None) -> str:
    """Where the database lives: ``$QVD_DB_URL``, else a SQLite file.

    With a root (``--root`` / ``$QVD_ROOT``) the file is ``<root>/qvd.db``;
    without, it sits beside the default storage root: ``/var/lib/qvd/qvd.db``.
    """
    if url := os.environ.get("QVD_DB_URL"):
        return url
    path = root / DB_FILE if root is not None else DEFAULT_ROOT.parent / DB_FILE
    return f"sqlite:///{path}"


class Node:
    """Everything a command needs about this node; settings are re-read on demand."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root.absolute() if root is not None else None
        self.db = Database(database_url(self.root))

    def settings(self) -> Settings:
        with self.db.reader() as conn:
            stored = store.get_settings(conn)
        return Settings(stored, self.root or DEFAULT_ROOT)

    def storage(self) -> Storage:
        return Storage.from_settings(self.settings())

    def name(self) -> str:
        """This node's name in the hosts table: setting ``nodename``, else the hostname."""
        return self.settings()["nodename"] or socket.gethostname()

    def close(self) -> None:
        self.db.close()
