"""The web admin's defences, each against the real server over HTTP on loopback."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sqlite3
import ssl
import subprocess

import pytest

from qvdctl.commands.user import check_password
from tests.support.qvdctl import Cli, cleanup_root
from tests.support.web import Client, self_signed, web_server
from tests.web.conftest import ADMIN, EVIL_OSF, EVIL_USER, EVIL_VM, VIEWER, Site

pytestmark = pytest.mark.timeout(180)

PAGES = ["/", "/vms", "/vms/1", "/hosts", "/users", "/images", "/config", "/log"]


def _objects(site: Site) -> list[str]:
    """The database as SQL, less what every request writes (sessions seen, the audit log)."""
    return [line for line in site.cli.db_dump() if '"web_sessions"' not in line]


def _everything(site: Site) -> str:
    """The whole database as SQL, the audit log and the sessions included."""
    with contextlib.closing(sqlite3.connect(site.cli.root / "qvd.db")) as db:
        return "\n".join(db.iterdump())


def _admin(site: Site) -> Client:
    client = Client(site.url)
    assert client.log_in(*ADMIN).status == 303
    return client


def test_no_page_feed_or_action_answers_without_a_session(site: Site) -> None:
    anonymous = Client(site.url)
    for path in PAGES:
        reply = anonymous.request(path)
        assert (reply.status, reply.location) == (303, "/login"), path
    assert anonymous.request("/events/vms").status == 401
    before = _objects(site)
    for path in ["/act/vm", "/act/host", "/logout"]:
        assert anonymous.request(path, {"action": "block", "id": "1"}).status == 401, path
    forged = Client(site.url, cookie="not-a-session")
    assert forged.request("/vms").location == "/login"
    assert _objects(site) == before


def test_every_page_answers_a_logged_in_admin(site: Site) -> None:
    client = _admin(site)
    for path in PAGES:
        reply = client.request(path)
        assert reply.status == 200, (path, reply.body[:300])
        assert "default-src 'self'" in reply.headers["content-security-policy"]
    config = client.request("/config").body
    assert "<td>vm.start.mount_only</td><td>1</td><td>set</td>" in config
    assert "<td>vm.lifecycle.parallel</td>" in config and "<td>default</td>" in config


def test_a_post_without_the_csrf_token_is_refused_and_changes_nothing(site: Site) -> None:
    client = _admin(site)
    before = _objects(site)
    for form in [{"action": "block", "id": "1"},
                 {"action": "block", "id": "1", "csrf": "forged"},
                 {"action": "block", "id": "1", "csrf": Client(site.url).cookie or ""}]:
        reply = client.request("/act/vm", form)
        assert reply.status == 403 and "CSRF" in reply.body, form
    assert _objects(site) == before
    # The same post with the page's token goes through: the refusal was the token's.
    token = client.csrf()
    assert client.request("/act/vm", {"action": "block", "id": "1", "csrf": token}).status == 303
    assert site.cli.vm("v1")["Blocked"] == 1
    client.request("/act/vm", {"action": "unblock", "id": "1", "csrf": token})
    assert site.cli.vm("v1")["Blocked"] == 0


def test_a_viewer_sees_every_page_but_changes_nothing(site: Site) -> None:
    viewer = Client(site.url)
    assert viewer.log_in(*VIEWER).status == 303
    for path in PAGES:
        assert viewer.request(path).status == 200, path
    assert 'id="vm-form"' not in viewer.request("/vms").body  # no buttons to press
    assert 'id="user-form"' not in viewer.request("/users").body
    token = viewer.csrf("/")
    before = _objects(site)
    for obj, action in [("vm", "start"), ("vm", "block"), ("vm", "delete"), ("host", "block"),
                        ("user", "delete"), ("user", "add")]:
        reply = viewer.request(f"/act/{obj}", {"action": action, "id": "1", "csrf": token})
        assert reply.status == 403 and "viewers cannot change" in reply.body, (obj, action)
    assert _objects(site) == before
    assert viewer.request("/logout", {"csrf": token}).location == "/login"  # that they may
    assert viewer.request("/vms").location == "/login"


def test_names_with_markup_are_shown_escaped_everywhere(site: Site) -> None:
    client = _admin(site)
    evil_id = next(r["Id"] for r in site.cli.json("vm", "list") if r["Name"] == EVIL_VM)
    shown = {path: client.request(path).body
             for path in ["/", "/vms", f"/vms/{evil_id}", "/users", "/images", "/log",
                          "/vms?user=*script*"]}
    for path, body in shown.items():
        assert "<script>alert" not in body, path
    escaped = {name: name.replace("<", "&lt;").replace(">", "&gt;")
               for name in (EVIL_USER, EVIL_OSF, EVIL_VM)}
    assert escaped[EVIL_USER] in shown["/users"] and escaped[EVIL_USER] in shown["/vms"]
    assert escaped[EVIL_OSF] in shown["/images"] and escaped[EVIL_OSF] in shown["/vms"]
    assert escaped[EVIL_VM] in shown["/vms"] and escaped[EVIL_VM] in shown[f"/vms/{evil_id}"]
    assert escaped[EVIL_USER] in shown["/vms?user=*script*"]


def test_sql_in_filters_matches_nothing_and_breaks_nothing(site: Site) -> None:
    client = _admin(site)
    before = _objects(site)
    for query in ["name=' OR '1'='1", "name=v1' --", "state=running' OR 1=1 --",
                  "user=u'; DROP TABLE vms; --", "osf=%25", "host=' UNION SELECT * FROM admins --"]:
        reply = client.request("/vms?" + query.replace(" ", "%20").replace(";", "%3B"))
        assert reply.status == 200, query
        assert 'id="no-vms"' in reply.body and "data-vm=" not in reply.body, query
    reply = client.request("/log?who=%27%20OR%201%3D1%20--")
    assert reply.status == 200 and "Nothing logged." in reply.body
    assert _objects(site) == before
    # The filters do filter: wildcards as the CLI's -f.
    rows = re.findall(r'data-vm="(\d+)"', client.request("/vms?name=v*").body)
    assert rows == ["1", "2"]


def test_the_session_cookie_is_httponly_samesite_strict_and_secure_over_tls(
    site: Site, tmp_path
) -> None:
    reply = Client(site.url).log_in(*ADMIN)
    flags = [f.strip().lower() for f in reply.set_cookie("qvd_session").split(";")]
    assert "httponly" in flags and "samesite=strict" in flags and "path=/" in flags
    assert "secure" not in flags  # plain HTTP: a Secure cookie would never come back

    cert, key = self_signed(tmp_path)
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False  # the certificate names 127.0.0.1 as its CN only
    with web_server(site.cli, "--cert", str(cert), "--key", str(key)) as url:
        assert url.startswith("https://")
        tls = Client(url, context=context)
        reply = tls.log_in(*ADMIN)
        assert reply.status == 303
        flags = [f.strip().lower() for f in reply.set_cookie("qvd_session").split(";")]
        assert {"httponly", "samesite=strict", "secure"} <= set(flags)
        assert tls.request("/vms").status == 200


def test_a_login_without_its_forms_csrf_token_is_refused_and_counts_nothing(
    site: Site
) -> None:
    site.cli.run("admin", "add", "login=carol", "password=carols")
    form = Client(site.url).request("/login")
    cookie = form.set_cookie("qvd_login")
    flags = [f.strip().lower() for f in cookie.split(";")]
    assert "httponly" in flags and "samesite=strict" in flags
    token = cookie.split(";")[0].partition("=")[2]
    assert f'name="csrf" value="{token}"' in form.body
    # Another site's form: no login cookie (SameSite), or not this form's token.
    for fields, cookies in [({}, f"qvd_login={token}"),
                            ({"csrf": token}, ""),
                            ({"csrf": "forged"}, f"qvd_login={token}"),
                            ({"csrf": token}, "qvd_login=another")]:
        reply = Client(site.url).request(
            "/login", {"login": "carol", "password": "carols", **fields},
            headers={"Cookie": cookies} if cookies else {})
        assert reply.status == 403 and "CSRF" in reply.body, fields
        assert not reply.set_cookie("qvd_session"), fields
    # Refused before the password is looked at: wrong passwords so posted count nothing.
    for _ in range(6):
        Client(site.url).request("/login", {"login": "carol", "password": "wrong"})
    (row,) = site.cli.json("admin", "list", "-f", "login=carol")
    assert row["Failures"] == 0 and row["LockedUntil"] is None
    assert "no log matches" in site.cli.fails("log", "list", "-f", "who=carol")
    assert Client(site.url).log_in("carol", "carols").status == 303


def test_five_wrong_passwords_lock_the_login(site: Site) -> None:
    site.cli.run("admin", "add", "login=mallory", "password=right-one")
    client = Client(site.url)
    for _ in range(5):
        reply = client.log_in("mallory", "wrong")
        assert reply.status == 403 and "wrong login or password" in reply.body
    reply = client.log_in("mallory", "right-one")
    assert reply.status == 403 and "locked" in reply.body and client.cookie is None
    (row,) = site.cli.json("admin", "list", "-f", "login=mallory")
    assert row["LockedUntil"] is not None
    # An unknown login gets the same answer as a wrong password.
    assert "wrong login or password" in client.log_in("nobody", "x").body
    # Each attempt is in the audit log, the password nowhere.
    logged = site.cli.json("log", "list", "-f", "who=mallory")
    assert len(logged) == 6 and all(r["Action"] == "web login" for r in logged)
    assert "right-one" not in _everything(site)


def test_bad_input_is_a_clear_line_and_changes_nothing(site: Site) -> None:
    client = _admin(site)
    token = client.csrf()
    before = _objects(site)
    for form, expected in [
        ({"action": "explode", "id": "1"}, "unknown action"),
        ({"action": "start", "id": "99"}, "no longer exists"),
        ({"action": "start", "id": "1; DROP TABLE vms"}, "bad id"),
        ({"action": "block"}, "no VM selected"),
    ]:
        reply = client.request("/act/vm", {**form, "csrf": token},
                               headers={"Accept": "application/json"})
        assert reply.status == 200 and expected in reply.body, (form, reply.body)
    assert client.request("/vms/99").status == 404
    # A start on a blocked VM: refused by the start itself, with its own line.
    client.request("/act/vm", {"action": "block", "id": "1", "csrf": token})
    reply = client.request("/act/vm", {"action": "start", "id": "1", "csrf": token},
                           headers={"Accept": "application/json"})
    assert "is blocked" in reply.body and site.cli.vm("v1")["State"] == "stopped"
    client.request("/act/vm", {"action": "unblock", "id": "1", "csrf": token})
    assert _objects(site) == before


def test_web_refuses_bad_options_in_one_line(tmp_path) -> None:
    cli = Cli(tmp_path / "root")
    try:
        assert "bad --listen" in cli.fails("web", "--listen", "localhost")
        assert "go together" in cli.fails("web", "--cert", str(tmp_path / "c"))
        assert "cannot use --cert" in cli.fails("web", "--cert", str(tmp_path / "c"),
                                               "--key", str(tmp_path / "k"))
        assert "takes no command" in cli.fails("web", "start")
    finally:
        cleanup_root(cli.root)


def test_users_are_added_given_a_password_and_deleted_from_the_web(site: Site) -> None:
    client = _admin(site)
    token = client.csrf("/users")
    json_reply = {"Accept": "application/json"}

    def post(**form: str | list[str]) -> list[dict[str, str | None]]:
        reply = client.request("/act/user", {**form, "csrf": token}, headers=json_reply)
        assert reply.status == 200, reply.body
        return json.loads(reply.body)

    assert post(action="add", login="carol", password="carol-first-secret") == [
        {"what": "user add carol", "error": None}]
    (carol,) = site.cli.json("user", "list", "-f", "login=carol")
    before = _objects(site)
    for form, expected in [
        ({"action": "add", "login": "carol", "password": "x"}, "user 'carol' already exists"),
        ({"action": "add", "login": "a b", "password": "x"}, "bad login name"),
        ({"action": "add", "login": "dave"}, "password is missing"),
        ({"action": "passwd", "id": [str(carol["Id"]), "1"], "password": "x"}, "choose one"),
        ({"action": "passwd", "id": "999", "password": "x"}, "no longer exists"),
        ({"action": "delete", "id": "1"}, "still has VMs"),
    ]:
        (line,) = post(**form)
        assert line["error"] and expected in line["error"], (form, line)
    assert _objects(site) == before

    changed = post(action="passwd", id=str(carol["Id"]), password="carol-second-secret")
    assert changed[0]["error"] is None
    with sqlite3.connect(site.cli.root / "qvd.db") as db:
        stored = db.execute("select password from users where login='carol'").fetchone()[0]
    assert check_password("carol-second-secret", stored)
    assert post(action="delete", id=str(carol["Id"]))[0]["error"] is None
    assert "no user matches" in site.cli.fails("user", "list", "-f", "login=carol")
    logged = [(r["Action"], r["Args"]) for r in site.cli.json("log", "list", "-f", "who=alice")]
    assert ("user add", "login=carol password=***") in logged
    assert ("user passwd", f"ids={carol['Id']} password=***") in logged
    assert "carol-first-secret" not in _everything(site)
    assert "carol-second-secret" not in _everything(site)


def test_the_vms_page_shows_a_vm_whose_root_vanished_as_a_zombie(site: Site) -> None:
    client = _admin(site)
    site.cli.run("vm", "start", "-f", "name=v1")
    try:
        rootfs = site.cli.root / "rootfs" / "1-1-fs"
        subprocess.run(["umount", "-l", str(rootfs)], check=True, timeout=60)
        row = re.search(r'<tr data-vm="1">.*?</tr>', client.request("/vms").body, re.S)
        assert row and 'class="state state-zombie">zombie<' in row.group(0)
    finally:
        site.cli.run("vm", "stop", "-f", "name=v1")
    assert site.cli.vm("v1")["State"] == "stopped"


def test_an_idle_session_ends_and_is_removed_at_the_next_login(site: Site) -> None:
    client = _admin(site)
    assert client.request("/vms").status == 200
    with sqlite3.connect(site.cli.root / "qvd.db") as db:
        db.execute("update web_sessions set last_seen = last_seen - 13 * 3600")
    assert client.request("/vms").location == "/login"
    _admin(site)
    with sqlite3.connect(site.cli.root / "qvd.db") as db:
        assert db.execute("select count(*) from web_sessions").fetchone()[0] == 1


def test_a_running_vms_page_shows_its_qvdfs_counters(site: Site) -> None:
    client = _admin(site)
    assert "Nothing to show: the VM is stopped." in client.request("/vms/1").body
    site.cli.run("vm", "start", "-f", "name=v1")
    try:
        assert (site.cli.root / "rootfs" / "1-1-fs" / "etc").is_dir()  # a LOOKUP at least
        page = client.request("/vms/1").body
        opcodes = re.search(r'<table id="root-opcodes">.*?</table>', page, re.S)
        assert opcodes, page[-3000:]
        assert re.search(r"<td>LOOKUP</td><td class=\"num\">[1-9]", opcodes.group(0)), opcodes
        assert 'id="root-totals"' in page
    finally:
        site.cli.run("vm", "stop", "-f", "name=v1")


def test_a_disk_image_is_tagged_and_untagged_from_the_web(site: Site) -> None:
    client = _admin(site)
    token = client.csrf("/images")

    def post(**form: str | list[str]) -> list[dict[str, str | None]]:
        reply = client.request("/act/di", {**form, "csrf": token},
                               headers={"Accept": "application/json"})
        assert reply.status == 200, reply.body
        return json.loads(reply.body)

    def tags() -> list[str]:
        (di,) = site.cli.json("di", "list")
        return str(di["Tags"]).replace(",", " ").split()

    before = _objects(site)
    for form, expected in [
        ({"action": "tag", "id": "1", "tag": "no/such"}, "bad tag"),
        ({"action": "tag", "id": "1"}, "tag is missing"),
        ({"action": "tag", "id": ["1", "1"], "tag": "x"}, "choose one disk image"),
        ({"action": "tag", "id": "7", "tag": "x"}, "no longer exists"),
        ({"action": "untag", "id": "1", "tag": "never"}, "has no tag 'never'"),
    ]:
        (line,) = post(**form)
        assert line["error"] and expected in line["error"], (form, line)
    assert _objects(site) == before
    assert post(action="tag", id="1", tag="head")[0]["error"] is None
    assert "head" in tags()
    assert 'class="tags">' in client.request("/images").body
    assert post(action="untag", id="1", tag="head")[0]["error"] is None
    assert "head" not in tags()


def test_a_change_from_a_page_older_than_the_object_is_refused_and_changes_nothing(
    site: Site
) -> None:
    client = _admin(site)
    token, revs = client.csrf(), client.revisions("/vms")
    json_reply = {"Accept": "application/json"}
    site.cli.run("vm", "edit", "-f", "name=v1", "name=v1-renamed")
    try:
        before = _objects(site)
        for action in ["block", "start", "delete"]:
            reply = client.request("/act/vm", {"action": action, "id": revs["1"], "csrf": token},
                                   headers=json_reply)
            (line,) = json.loads(reply.body)
            assert line["error"] == ("vm v1-renamed was changed since this page was loaded:"
                                     " reload the page; nothing changed"), line
        assert _objects(site) == before
        # Without a script the page itself says so, after the redirect.
        client.request("/act/vm", {"action": "block", "id": revs["1"], "csrf": token})
        assert "was changed since this page was loaded" in client.request("/vms").body
        # The runtime state is not part of it: a VM blocked elsewhere is still this page's.
        site.cli.run("vm", "block", "-f", "name=v2")
        reply = client.request("/act/vm", {"action": "unblock", "id": revs["2"],
                                           "csrf": token}, headers=json_reply)
        assert json.loads(reply.body) == [{"what": "vm unblock v2", "error": None}]
        # A fresh page has the new revision, and the same change goes through.
        fresh = client.revisions("/vms")
        assert fresh["1"] != revs["1"] and fresh["2"] == revs["2"]
        reply = client.request("/act/vm", {"action": "block", "id": fresh["1"],
                                           "csrf": token}, headers=json_reply)
        assert json.loads(reply.body) == [{"what": "vm block v1-renamed", "error": None}]
        client.request("/act/vm", {"action": "unblock", "id": "1", "csrf": token})
    finally:
        site.cli.run("vm", "edit", "-f", "name=v1-renamed", "name=v1")
    # A user deleted since the page was made.
    site.cli.run("user", "add", "login=gone", "password=p")
    users = client.revisions("/users")
    (gone,) = [r["Id"] for r in site.cli.json("user", "list", "-f", "login=gone")]
    site.cli.run("user", "del", "-f", "login=gone")
    reply = client.request("/act/user", {"action": "passwd", "id": users[str(gone)],
                                         "password": "x", "csrf": token}, headers=json_reply)
    (line,) = json.loads(reply.body)
    assert line["error"].startswith(f"user {gone} was deleted since this page was loaded")


def test_osfs_are_added_and_edited_from_the_web_as_the_cli_does(site: Site) -> None:
    client = _admin(site)
    token = client.csrf("/images")

    def post(**form: str) -> list[dict[str, str | None]]:
        reply = client.request("/act/osf", {**form, "csrf": token},
                               headers={"Accept": "application/json"})
        assert reply.status == 200, reply.body
        return json.loads(reply.body)

    def osf(name: str) -> dict[str, object]:
        (row,) = site.cli.json("osf", "list", "-f", f"name={name}")
        return row

    before = _objects(site)
    for form, expected in [
        ({"action": "add", "name": "bad name"}, "bad OSF name"),
        ({"action": "add", "name": "x", "memory": "lots"}, "bad value for memory"),
        ({"action": "add", "name": "x", "halt_signal": "SIGBOGUS"}, "bad halt_signal"),
        ({"action": "add", "name": "o"}, "already exists"),
        ({"action": "edit", "name": "y"}, "no OSF selected"),
        ({"action": "edit", "id": "1"}, "nothing to change"),
        ({"action": "edit", "id": ["1", "2"], "name": "same"}, "a rename needs exactly one"),
        ({"action": "edit", "id": "99", "memory": "1"}, "no longer exists"),
    ]:
        (line,) = post(**form)
        assert line["error"] and expected in line["error"], (form, line)
    assert _objects(site) == before

    assert post(action="add", name="webosf", memory="300", halt_signal="SIGUSR2") == [
        {"what": "osf add webosf", "error": None}]
    try:
        added = osf("webosf")
        assert (added["Memory"], added["UserStorage"], added["HaltSignal"]) == (300, 0, "SIGUSR2")
        osf_id = str(added["Id"])
        revs = client.revisions("/images", "osf-form")
        # Empty fields stay as they are; the halt signal changes, then goes back to init's.
        assert post(action="edit", id=revs[osf_id], name="", memory="",
                    halt_signal="SIGRTMIN+3")[0]["error"] is None
        assert (osf("webosf")["Memory"], osf("webosf")["HaltSignal"]) == (300, "SIGRTMIN+3")
        # The page that edit was made from is older than the OSF now.
        (line,) = post(action="edit", id=revs[osf_id], memory="512")
        assert line["error"] and "osf webosf was changed since this page was loaded" in str(
            line["error"])
        assert osf("webosf")["Memory"] == 300
        fresh = client.revisions("/images", "osf-form")
        assert post(action="edit", id=fresh[osf_id], memory="512",
                    halt_signal="init")[0]["error"] is None
        assert (osf("webosf")["Memory"], osf("webosf")["HaltSignal"]) == (512, None)
        logged = [(r["Action"], r["Args"]) for r in site.cli.json("log", "list", "-f",
                                                                  "action=osf*")]
        assert ("osf add", "name=webosf memory=300 halt_signal=SIGUSR2") in logged
    finally:
        site.cli.run("osf", "del", "-f", "name=webosf")


def test_a_disk_image_is_imported_from_staging_alone(site: Site, tarball) -> None:
    client = _admin(site)
    token = client.csrf("/images")
    staging = site.cli.root / "staging"
    staged = staging / "web-import.tar.gz"
    json_reply = {"Accept": "application/json"}
    assert 'id="no-staged"' in client.request("/images").body
    shutil.copy(tarball, staged)
    try:
        page = client.request("/images").body
        assert "<option>web-import.tar.gz</option>" in page
        before = _objects(site)
        # Anything but a file of staging/ is refused: the web imports nothing else.
        for path in ["../qvd.db", str(staged), "/etc/passwd", "missing.tar.gz", ""]:
            reply = client.request("/act/di", {"action": "add", "path": path, "osf": "o",
                                               "csrf": token}, headers=json_reply)
            (line,) = json.loads(reply.body)
            assert line["error"] and ("not an image file in staging/" in line["error"]
                                      or "path is missing" in line["error"]), (path, line)
        (line,) = json.loads(client.request(
            "/act/di", {"action": "add", "path": staged.name, "osf": "nope", "csrf": token},
            headers=json_reply).body)
        assert line["error"] == "no OSF named 'nope'"
        assert _objects(site) == before
        reply = client.request("/act/di", {"action": "add", "path": staged.name, "osf": "o",
                                           "version": "web1", "halt_signal": "SIGPWR",
                                           "csrf": token}, headers=json_reply)
        assert json.loads(reply.body) == [{"what": "di add o web1", "error": None}]
        (row,) = site.cli.json("di", "list", "-f", "version=web1")
        assert (row["Path"], row["HaltSignal"], row["HaltFrom"]) == (staged.name, "SIGPWR", "di")
        assert set(str(row["Tags"]).split(",")) == {"web1", "head"}
        assert (site.cli.root / "images" / staged.name).is_file()
        # Imported, it is offered no more (another import of it would be refused).
        assert 'id="no-staged"' in client.request("/images").body
        site.cli.run("di", "del", "-f", "version=web1")
        site.cli.run("di", "tag", "-f", "id=1", "tag=head")  # back where it was
    finally:
        staged.unlink(missing_ok=True)
