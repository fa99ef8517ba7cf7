"""``qvdctl admin add/list/del``: the accounts of the web admin (``qvdctl web``).

An ``admin`` changes anything the web admin offers; a ``viewer`` sees every page and
changes nothing. Passwords are stored as argon2id hashes (``qvdctl/web/accounts.py``).
"""

from __future__ import annotations

import logging

from qvdctl.commands.base import Request
from qvdctl.commands.osf import check_name
from qvdctl.commands.user import ask_password, nonempty
from qvdctl.web import accounts

log = logging.getLogger(__name__)

KEYS = ["id", "login", "role"]


def add(req: Request) -> None:
    """``admin add login=L [password=P] [role=admin|viewer]``: a web admin account.

    Without ``password=`` it is asked for twice on the terminal, unechoed. The role
    is ``admin`` unless given.
    """
    req.no_filter()
    args = req.args(required=["login"], optional=["password", "role"])
    login = check_name(args["login"], "login")
    role = accounts.check_role(args.get("role", accounts.Role.ADMIN))
    password = args["password"] if "password" in args else ask_password(login, "admin add")
    password = nonempty(password)
    with req.node.db.writer() as conn:
        admin_id = accounts.add_admin(conn, login, password, role)
    req.out.message(f"Admin {login} added with id {admin_id} ({role})", id=admin_id)


def list_(req: Request) -> None:
    """``admin list [-f ...]``: the web admin accounts, their roles, whether locked."""
    req.args()
    with req.node.db.reader() as conn:
        rows = req.select(accounts.list_admins(conn), KEYS, need=False)
    req.out.table(["Id", "Login", "Role", "Failures", "LockedUntil"],
                  [[r["id"], r["login"], r["role"], r["failures"], r["locked_until"]]
                   for r in rows])


def del_(req: Request) -> None:
    """``admin del -f ...``: delete web admin accounts, and their sessions."""
    req.args()
    with req.node.db.writer() as conn:
        rows = req.select(accounts.list_admins(conn), KEYS, need=True)
        for row in rows:
            accounts.del_admin(conn, row["id"])
    for row in rows:
        req.out.message(f"Admin {row['login']} deleted", id=row["id"])


COMMANDS = {"add": add, "list": list_, "del": del_}
