"""``qvdctl user add/list/del``, and how passwords are stored.

Passwords are hashed with scrypt (stdlib ``hashlib``), a memory-hard slow
hash, with a random salt; the stored form says its parameters so they can be
raised later without breaking old hashes: ``scrypt$n$r$p$salt$hash`` (base64).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os

from qvdctl.commands.base import Request
from qvdctl.commands.osf import check_name
from qvdctl.db import store
from qvdctl.errors import QvdError

log = logging.getLogger(__name__)

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
KEYS = ["id", "login", "blocked"]


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def check_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches ``stored`` (as made by ``hash_password``)."""
    scheme, n, r, p, salt, digest = stored.split("$")
    if scheme != "scrypt":
        return False
    mine = _scrypt(password, base64.b64decode(salt), int(n), int(r), int(p))
    return hmac.compare_digest(mine, base64.b64decode(digest))


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=128 * n * r * 2)


def add(req: Request) -> None:
    """``user add login=L password=P``."""
    req.no_filter()
    args = req.args(required=["login", "password"])
    login = check_name(args["login"], "login")
    if not args["password"]:
        raise QvdError("the password must not be empty")
    hashed = hash_password(args["password"])
    with req.node.db.writer() as conn:
        user_id = store.add_user(conn, login, hashed)
    req.out.message(f"User added with id {user_id}", id=user_id)


def list_(req: Request) -> None:
    """``user list [-f ...]``: the users, and whether they are blocked."""
    req.args()
    with req.node.db.reader() as conn:
        rows = req.select(store.list_users(conn), KEYS, need=False)
    req.out.table(["Id", "Login", "Blocked"], [[r["id"], r["login"], r["blocked"]] for r in rows])


def del_(req: Request) -> None:
    """``user del -f ...``: only users without VMs."""
    req.args()
    with req.node.db.writer() as conn:
        rows = req.select(store.list_users(conn), KEYS, need=True)
        for row in rows:
            store.del_user(conn, row)
    for row in rows:
        req.out.message(f"User {row['login']} deleted", id=row["id"])


COMMANDS = {"add": add, "list": list_, "del": del_}
