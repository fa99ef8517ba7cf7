"""The web admin's accounts: argon2id hashes, roles, sessions, and the lock-out.

A session is a random token in an HttpOnly cookie; the database keeps only its
SHA-256, beside the session's CSRF token, so sessions survive a restart of the web
server and work on any web server of a fleet. After ``MAX_FAILURES`` wrong passwords
in a row an account refuses every login for ``LOCKOUT_S``, the right password too.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import secrets
import time

import argon2
from sqlalchemy import Connection, delete, insert, select, update

from qvdctl.db.schema import admins, web_sessions
from qvdctl.db.store import Row
from qvdctl.errors import QvdError

log = logging.getLogger(__name__)

MAX_FAILURES = 5
LOCKOUT_S = 300.0
SESSION_IDLE_S = 12 * 3600.0
# A session's last_seen is written at most this often: most requests only read.
TOUCH_EVERY_S = 60.0

_hasher = argon2.PasswordHasher()  # argon2id with the library's current defaults


class Role(enum.StrEnum):
    ADMIN = "admin"  # sees and changes everything
    VIEWER = "viewer"  # sees everything, changes nothing


def check_role(value: str) -> Role:
    try:
        return Role(value)
    except ValueError:
        raise QvdError(f"bad role '{value}': expected admin or viewer") from None


def add_admin(conn: Connection, login: str, password: str, role: Role) -> int:
    if conn.execute(select(admins.c.id).where(admins.c.login == login)).first():
        raise QvdError(f"admin '{login}' already exists")
    result = conn.execute(insert(admins).values(login=login, password=_hasher.hash(password),
                                                role=role.value, failures=0))
    assert result.inserted_primary_key is not None
    return int(result.inserted_primary_key[0])


def list_admins(conn: Connection) -> list[Row]:
    return [dict(r._mapping) for r in conn.execute(select(admins).order_by(admins.c.id))]


def del_admin(conn: Connection, admin_id: int) -> None:
    conn.execute(delete(web_sessions).where(web_sessions.c.admin_id == admin_id))
    conn.execute(delete(admins).where(admins.c.id == admin_id))


class LoginRefused(QvdError):
    """A login that did not succeed; its message is what the login page shows."""


def log_in(conn: Connection, login: str, password: str, now: float | None = None) -> Row:
    """The admin ``login`` if ``password`` is theirs and the account is not locked.

    Counts the failure (and locks the account at the fifth) otherwise; the caller
    commits either way, so a failure counts even though this raises.

    Raises:
        LoginRefused: wrong login or password, or locked; one message for the first two.
    """
    now = time.time() if now is None else now
    row = conn.execute(select(admins).where(admins.c.login == login)).first()
    if row is None:
        _hasher.hash(password)  # the same time as a wrong password: no hint a login exists
        raise LoginRefused("wrong login or password")
    admin = dict(row._mapping)
    if admin["locked_until"] is not None and admin["locked_until"] > now:
        minutes = int((admin["locked_until"] - now) // 60) + 1
        raise LoginRefused(f"too many failed logins: this account is locked for {minutes} min")
    try:
        _hasher.verify(admin["password"], password)
    except argon2.exceptions.VerificationError:
        failures = admin["failures"] + 1
        locked = now + LOCKOUT_S if failures >= MAX_FAILURES else None
        conn.execute(update(admins).where(admins.c.id == admin["id"]).values(
            failures=0 if locked else failures, locked_until=locked))
        if locked:
            log.warning("web admin %r locked after %d failed logins", login, failures)
        raise LoginRefused("wrong login or password") from None
    conn.execute(update(admins).where(admins.c.id == admin["id"])
                 .values(failures=0, locked_until=None))
    return admin


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def open_session(conn: Connection, admin_id: int) -> str:
    """A new session of ``admin_id``; returns the cookie's token. Idle sessions go."""
    token = secrets.token_urlsafe(32)
    now = time.time()
    conn.execute(delete(web_sessions).where(web_sessions.c.last_seen < now - SESSION_IDLE_S))
    conn.execute(insert(web_sessions).values(
        token_hash=_digest(token), admin_id=admin_id, csrf=secrets.token_urlsafe(32),
        last_seen=now))
    return token


def session(conn: Connection, token: str) -> Row | None:
    """The session of ``token`` with its admin's login and role; None if unknown or idle
    longer than ``SESSION_IDLE_S``. Read-only: ``touch`` records that it was seen."""
    stmt = (select(web_sessions.c.csrf, web_sessions.c.last_seen, admins.c.id, admins.c.login,
                   admins.c.role)
            .join(admins, admins.c.id == web_sessions.c.admin_id)
            .where(web_sessions.c.token_hash == _digest(token)))
    row = conn.execute(stmt).first()
    if row is None or time.time() - row.last_seen > SESSION_IDLE_S:
        return None
    return dict(row._mapping)


def touch(conn: Connection, token: str) -> None:
    """Mark the session of ``token`` seen now: its idle time counts from here."""
    conn.execute(update(web_sessions).where(web_sessions.c.token_hash == _digest(token))
                 .values(last_seen=time.time()))


def close_session(conn: Connection, token: str) -> None:
    conn.execute(delete(web_sessions).where(web_sessions.c.token_hash == _digest(token)))
