"""The CLI side of the web admin: ``admin add/list/del`` and the audit log (``log list``)."""

from __future__ import annotations

import sqlite3

import argon2
import pytest

from tests.support.qvdctl import Cli, run_on_terminal

pytestmark = pytest.mark.timeout(120)


def _hash(cli: Cli, login: str) -> str:
    with sqlite3.connect(cli.root / "qvd.db") as db:
        return db.execute("select password from admins where login = ?", (login,)).fetchone()[0]


def test_admin_add_hashes_with_argon2_and_asks_twice_on_a_terminal(cli: Cli) -> None:
    assert cli.run("admin", "add", "login=a", "password=pw").stdout == \
        "Admin a added with id 1 (admin)\n"
    assert _hash(cli, "a").startswith("$argon2id$")
    assert argon2.PasswordHasher().verify(_hash(cli, "a"), "pw")
    before = cli.db_dump()
    for args, expected in [
        (["login=a", "password=x"], "admin 'a' already exists"),
        (["login=b", "password=x", "role=root"], "bad role 'root': expected admin or viewer"),
        (["login=b", "password="], "must not be empty"),
        (["login=b c", "password=x"], "bad login name"),
        (["login=b"], "admin add needs password=... when not run on a terminal"),
        (["login=b", "colour=red"], "unknown argument 'colour' for admin add"),
    ]:
        assert expected in cli.fails("admin", "add", *args), args
    assert cli.db_dump() == before

    mismatch = run_on_terminal(cli, ["admin", "add", "login=v", "role=viewer"], "one", "two")
    assert mismatch.returncode == 1 and "do not match" in mismatch.stderr
    typed = run_on_terminal(cli, ["admin", "add", "login=v", "role=viewer"], "s3cret", "s3cret")
    assert typed.returncode == 0, typed.stderr
    assert "s3cret" not in typed.stderr + typed.stdout  # not echoed
    assert argon2.PasswordHasher().verify(_hash(cli, "v"), "s3cret")
    rows = cli.json("admin", "list")
    assert [(r["Login"], r["Role"]) for r in rows] == [("a", "admin"), ("v", "viewer")]
    cli.run("admin", "del", "-f", "login=v")
    assert [r["Login"] for r in cli.json("admin", "list")] == ["a"]


def test_every_cli_change_is_logged_without_its_secrets_and_reads_are_not(cli: Cli) -> None:
    cli.run("user", "add", "login=u", "password=hunter2")
    cli.run("osf", "add", "name=o")
    cli.fails("config", "set", "database.password=topsecret", "vm.stop.timeout=5")
    cli.run("user", "list")
    cli.run("config", "get")
    cli.fails("user", "del", "-f", "login=nobody")
    cli.run("user", "passwd", "-f", "login=u", "password=n3w")
    rows = cli.json("log", "list")
    assert [(r["Action"], r["Object"], r["Args"], r["Result"]) for r in rows] == [
        ("user passwd", "login=u", "password=***", "ok"),
        ("user del", "login=nobody", "", "no user matches the filter login=nobody"),
        ("config set", "", "database.password=*** vm.stop.timeout=5",
         "unknown setting 'database.password'"),
        ("osf add", "", "name=o", "ok"),
        ("user add", "", "login=u password=***", "ok"),
    ]
    assert all(r["Origin"].startswith("cli@") and r["Who"] for r in rows)
    dump = "\n".join(sqlite3.connect(cli.root / "qvd.db").iterdump())
    assert "hunter2" not in dump and "n3w" not in dump and "topsecret" not in dump
    # Filters and last=N, as every listing's.
    assert [r["Action"] for r in cli.json("log", "list", "-f", "action=user*", "last=2")] == [
        "user passwd", "user del"]
    assert "no log matches" in cli.fails("log", "list", "-f", "who=nobody")
    assert "not a positive whole number" in cli.fails("log", "list", "last=0")
    assert len(cli.json("log", "list")) == 5  # the listings themselves left no row
