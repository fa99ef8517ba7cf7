"""``qvdctl user add/passwd/list/del``, and how passwords are stored.

Passwords are hashed with scrypt (stdlib ``hashlib``), a memory-hard slow
hash, with a random salt; the stored form says its parameters so they can be
raised later without breaking old hashes: ``scrypt$n$r$p$salt$hash`` (base64).
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import logging
import os
import sys

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
    """``user add login=L password=P``: a new user (the password is stored hashed)."""
    req.no_filter()
    args = req.args(required=["login", "password"])
    login = check_name(args["login"], "login")
    hashed = hash_password(nonempty(args["password"]))
    with req.node.db.writer() as conn:
        user_id = store.add_user(conn, login, hashed)
    req.out.message(f"User added with id {user_id}", id=user_id)


def passwd(req: Request) -> None:
    """``user passwd -f login=L [password=P]``: set one user's password.

    Without ``password=`` it is asked for twice on the terminal, unechoed, as
    qvd-admin does; with no terminal to ask on, ``password=`` is needed.
    """
    given = req.args(optional=["password"]).get("password")
    with req.node.db.reader() as conn:
        rows = req.select(store.list_users(conn), KEYS, need=True)
    if len(rows) != 1:
        raise QvdError(f"the filter matches {len(rows)} users; user passwd needs exactly one")
    login = rows[0]["login"]
    password = given if given is not None else ask_password(login, "user passwd")
    hashed = hash_password(nonempty(password))
    with req.node.db.writer() as conn:
        if not store.set_user_password(conn, rows[0]["id"], hashed):
            raise QvdError(f"user '{login}' was deleted meanwhile")
    req.out.message(f"Password of user {login} changed", id=rows[0]["id"])


def ask_password(login: str, command: str) -> str:
    """A new password for ``login``, asked twice on the terminal, unechoed; ``command`` is
    the one that asks, named in the error when there is no terminal."""
    if not sys.stdin.isatty():
        raise QvdError(f"{command} needs password=... when not run on a terminal")
    try:
        first = getpass.getpass(f"New password for {login}: ")
        again = getpass.getpass("Retype it: ")
    except EOFError:
        raise QvdError("no password given") from None
    if first != again:
        raise QvdError("the passwords do not match; nothing changed")
    return first


def nonempty(password: str) -> str:
    if not password:
        raise QvdError("the password must not be empty")
    return password


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


COMMANDS = {"add": add, "passwd": passwd, "list": list_, "del": del_}
