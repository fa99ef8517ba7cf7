"""``qvdctl config set/get/del``: the node's settings (SPEC §2)."""

from __future__ import annotations

import logging

from qvdctl.commands.base import Request, parse_pairs
from qvdctl.db import store
from qvdctl.db.notify import CONFIG_CHANGED, notify
from qvdctl.errors import QvdError
from qvdctl.settings import KNOWN, validate

log = logging.getLogger(__name__)


def set_(req: Request) -> None:
    """``config set k=v [k=v ...]``: all or nothing."""
    req.no_filter()
    pairs = parse_pairs(req.words, "setting")
    if not pairs:
        raise QvdError("config set needs key=value")
    checked = {key: validate(key, value) for key, value in pairs.items()}
    with req.node.db.writer() as conn:
        for key, value in checked.items():
            store.set_setting(conn, key, value)
        notify(conn, CONFIG_CHANGED)  # every running HKD re-reads its settings
    for key, value in checked.items():
        req.out.message(f"{key}={value}", key=key, value=value)


def get(req: Request) -> None:
    """``config get [key ...] [-f key=pattern]``: values in effect, defaults included."""
    for key in req.words:
        if key not in KNOWN:
            raise QvdError(f"unknown setting '{key}'")
    settings = req.node.settings()
    rows = [{"key": k, "value": settings[k]} for k in settings if not req.words or k in req.words]
    rows = req.select(rows, ["key", "value"], need=False)
    req.out.table(["Key", "Value"], [[r["key"], r["value"]] for r in rows])


def del_(req: Request) -> None:
    """``config del key [key ...]``: back to the default."""
    req.no_filter()
    if not req.words:
        raise QvdError("config del needs the keys to delete")
    for key in req.words:
        if key not in KNOWN:
            raise QvdError(f"unknown setting '{key}'")
    with req.node.db.writer() as conn:
        missing = [k for k in req.words if k not in store.get_settings(conn)]
        if missing:
            raise QvdError(f"setting '{missing[0]}' is not set")
        for key in req.words:
            store.del_setting(conn, key)
        notify(conn, CONFIG_CHANGED)
    for key in req.words:
        req.out.message(f"{key} deleted (back to its default)", key=key)


COMMANDS = {"set": set_, "get": get, "del": del_}
