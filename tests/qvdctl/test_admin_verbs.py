"""Admin verbs of qvd-admin beyond the workflow: vm block / unblock / edit, user passwd,
osf edit."""

from __future__ import annotations

import shutil
import sqlite3

import pytest

from qvdctl.commands.user import check_password
from tests.support.qvdctl import Cli, cleanup_root, run_on_terminal
from tools.imagebuild import build_busybox_rootfs, build_image_tarball


@pytest.mark.timeout(180)
def test_a_blocked_vm_cannot_start_and_list_shows_it(tmp_path):
    rootfs = build_busybox_rootfs(tmp_path / "busybox")
    tarball = build_image_tarball(tmp_path / "image.tgz", rootfs)
    cli = Cli(tmp_path / "root")
    try:
        cli.run("config", "set", "vm.hypervisor=lxc", "vm.start.mount_only=1")
        cli.run("osf", "add", "name=o")
        cli.run("di", "add", f"path={tarball}", "osf=o")
        cli.run("user", "add", "login=u", "password=p")
        cli.run("vm", "add", "name=v", "user=u", "osf=o")
        assert "needs a filter" in cli.fails("vm", "block")
        cli.run("vm", "block", "-f", "name=v")
        assert cli.vm("v")["Blocked"] == 1
        assert "is blocked" in cli.fails("vm", "start", "-f", "name=v")
        assert cli.vm("v")["State"] == "stopped"
        cli.run("vm", "unblock", "-f", "name=v")
        assert cli.vm("v")["Blocked"] == 0
        cli.run("vm", "start", "-f", "name=v")
        cli.run("vm", "stop", "-f", "name=v")
    finally:
        cleanup_root(cli.root)


# --- vm edit ----------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_vm_edit_renames_retags_and_readdresses(cli, tarball, tmp_path):
    second = tmp_path / "image.0.23.tgz"
    shutil.copy(tarball, second)
    cli.run("config", "set", "vm.hypervisor=lxc", "vm.start.mount_only=1")
    cli.run("osf", "add", "name=o")
    cli.run("di", "add", f"path={tarball}", "osf=o", "version=1")
    cli.run("di", "add", f"path={second}", "osf=o", "version=2")
    cli.run("user", "add", "login=u", "password=p")
    cli.run("vm", "add", "name=v", "user=u", "osf=o")
    cli.run("vm", "add", "name=w", "user=u", "osf=o")

    before = cli.db_dump()
    for args, expected in [
        (["name=w"], "VM 'w' already exists"),
        (["colour=red"], "unknown argument 'colour' for vm edit"),
        ([], "vm edit needs one of name=..., di_tag=..., ip=..."),
        (["name=a b"], "bad VM name"),
        (["di_tag=no/such"], "bad tag"),
        (["ip=10.1.1.1"], "outside the VM range"),
        (["ip=" + cli.vm("w")["Ip"]], "already assigned to another VM"),
    ]:
        assert expected in cli.fails("vm", "edit", "-f", "name=v", *args), args
    assert "needs a filter" in cli.fails("vm", "edit", "name=x")
    assert "matches 2 VMs" in cli.fails("vm", "edit", "-f", "name=*", "name=x")
    assert "matches 2 VMs" in cli.fails("vm", "edit", "-f", "name=*", "ip=172.20.127.100")
    assert cli.db_dump() == before

    # A running VM: renamed at once, its tag applies at its next start, its address is kept.
    cli.run("vm", "start", "-f", "name=v")
    assert cli.vm("v")["DI"] == "1"
    assert cli.run("vm", "edit", "-f", "name=v", "name=v2").stdout == "VM v2 edited\n"
    cli.run("vm", "edit", "-f", "name=*", "di_tag=head")  # several VMs at once
    assert [r["DI_Tag"] for r in cli.json("vm", "list")] == ["head", "head"]
    assert cli.vm("v2")["DI"] == "1"  # the image it runs, until it starts again
    error = cli.fails("vm", "edit", "-f", "name=v2", "ip=172.20.127.100")
    assert error == "Error: VM 'v2' is running; stop it before changing its ip"
    cli.run("vm", "stop", "-f", "name=v2")
    cli.run("vm", "edit", "-f", "name=v2", "ip=172.20.127.100")
    cli.run("vm", "start", "-f", "name=v2")
    row = cli.vm("v2")
    assert (row["Id"], row["DI"], row["Ip"]) == (1, "2", "172.20.127.100")
    cli.run("vm", "stop", "-f", "name=v2")
    # Its own address again is no clash.
    cli.run("vm", "edit", "-f", "name=v2", "ip=172.20.127.100")


# --- user passwd ------------------------------------------------------------------------


def _stored(cli: Cli, login: str) -> str:
    with sqlite3.connect(cli.root / "qvd.db") as db:
        return db.execute("select password from users where login = ?", (login,)).fetchone()[0]


@pytest.mark.timeout(120)
def test_user_passwd_from_a_word_or_asked_twice_on_a_terminal(cli):
    cli.run("user", "add", "login=alice", "password=old")
    cli.run("user", "add", "login=bob", "password=old")
    cli.run("user", "passwd", "-f", "login=alice", "password=n3w")
    assert check_password("n3w", _stored(cli, "alice"))
    assert _stored(cli, "alice").startswith("scrypt$")  # as user add stores it
    assert check_password("old", _stored(cli, "bob"))

    before = cli.db_dump()
    assert "needs password=" in cli.fails("user", "passwd", "-f", "login=alice")  # no terminal
    assert "must not be empty" in cli.fails("user", "passwd", "-f", "login=alice", "password=")
    assert "matches 2 users" in cli.fails("user", "passwd", "-f", "login=*", "password=x")
    assert "needs a filter" in cli.fails("user", "passwd", "password=x")
    assert "no user matches" in cli.fails("user", "passwd", "-f", "login=carol", "password=x")
    mismatch = run_on_terminal(cli, ["user", "passwd", "-f", "login=alice"], "one", "two")
    assert mismatch.returncode == 1 and "do not match" in mismatch.stderr
    assert cli.db_dump() == before

    typed = run_on_terminal(cli, ["user", "passwd", "-f", "login=alice"],
                            "typed secret", "typed secret")
    assert typed.returncode == 0, typed.stderr
    assert typed.stdout == "Password of user alice changed\n"
    assert "typed secret" not in typed.stderr  # not echoed
    assert check_password("typed secret", _stored(cli, "alice"))


# --- osf edit ---------------------------------------------------------------------------


def test_osf_edit_changes_memory_storage_name_and_halt_signal(cli):
    cli.run("osf", "add", "name=a")
    cli.run("osf", "add", "name=b", "memory=128", "halt_signal=sigpwr")
    assert cli.json("osf", "list", "-f", "name=b") == [
        {"Id": 2, "Name": "b", "Memory": 128, "UserStorage": 0, "HaltSignal": "SIGPWR"}]

    before = cli.db_dump()
    for args, expected in [
        (["name=b"], "OSF 'b' already exists"),
        (["memory=0"], "bad value for memory"),
        (["user_storage=-1"], "bad value for user_storage"),
        (["halt_signal=SIGNOPE"], "bad halt_signal"),
        (["cpus=2"], "unknown argument 'cpus' for osf edit"),
        ([], "osf edit needs one of"),
    ]:
        assert expected in cli.fails("osf", "edit", "-f", "name=a", *args), args
    assert "matches 2 OSFs" in cli.fails("osf", "edit", "-f", "name=*", "name=c")
    assert cli.db_dump() == before

    cli.run("osf", "edit", "-f", "name=*", "memory=512")
    cli.run("osf", "edit", "-f", "name=a", "name=c", "user_storage=100", "halt_signal=sigrtmin+3")
    cli.run("osf", "edit", "-f", "name=b", "halt_signal=")  # drops the override
    assert [(r["Name"], r["Memory"], r["UserStorage"], r["HaltSignal"])
            for r in cli.json("osf", "list")] == [("c", 512, 100, "SIGRTMIN+3"),
                                                  ("b", 512, 0, None)]
