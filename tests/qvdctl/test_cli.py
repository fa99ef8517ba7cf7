"""The admin CLI end to end: a real qvdctl process on a throwaway root."""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import pty
import shutil
import socket
import sqlite3
import subprocess
from pathlib import Path

import pytest

from qvdctl.commands.user import check_password
from tests.support.qvdctl import QVDCTL, Cli
from tools.imagebuild import build_image_tarball


@pytest.fixture(scope="module")
def populated_template(tmp_path_factory, tarball) -> Path:
    """Built once: an OSF with one image, a user, settings for a mount-only overlayfs start."""
    template = Cli(tmp_path_factory.mktemp("template") / "root")
    template.run("config", "set", "vm.hypervisor=lxc", "vm.lxc.unionfs.type=overlayfs",
                 "vm.start.mount_only=1")
    template.run("osf", "add", "name=MyOSF")
    template.run("di", "add", f"path={tarball}", "osf=MyOSF")
    template.run("user", "add", "login=test", "password=test")
    return template.root


@pytest.fixture
def populated(cli, populated_template) -> Cli:
    """A copy of the template root (no process has its database open)."""
    shutil.copytree(populated_template, cli.root, symlinks=True)
    return cli


def test_spec_workflow_from_config_to_mounted_root(cli, tarball):
    staging = cli.root / "staging"
    staging.mkdir(parents=True)
    (staging / "my_image.tar.gz").write_bytes(tarball.read_bytes())

    assert cli.run("config", "set", "vm.hypervisor=lxc").stdout == "vm.hypervisor=lxc\n"
    cli.run("config", "set", "vm.lxc.unionfs.type=overlayfs", "vm.start.mount_only=1")
    assert cli.run("osf", "add", "name=MyOSF").stdout == "OSF added with id 1\n"
    # A name relative to staging/ is found there, as an admin would type it.
    added = cli.run("di", "add", "path=my_image.tar.gz", "osf=MyOSF").stdout
    assert added == "DI added with id 1\n"
    assert cli.run("user", "add", "login=test", "password=test").stdout == "User added with id 1\n"
    added = cli.run("vm", "add", "name=TestVM", "user=test", "osf=MyOSF").stdout
    assert added == "VM added with id 1\n"
    cli.run("vm", "start", "-f", "name=TestVM")

    lines = cli.run("vm", "list", "-f", "name=TestVM").stdout.splitlines()
    assert lines[0].split() == ["Id", "Name", "User", "Ip", "OSF", "DI_Tag", "DI", "Host",
                                "State", "UserState", "Blocked"]
    fields = lines[1].split()

    assert fields[:6] == ["1", "TestVM", "test", "172.20.127.254", "MyOSF", "default"]
    assert fields[8:] == ["running", "disconnected", "0"]
    assert fields[7] == socket.gethostname()

    mountpoint = cli.root / "rootfs" / "1-1-fs"
    assert (mountpoint / "bin" / "busybox").is_file()
    assert (cli.root / "images" / "my_image.tar.gz").read_bytes() == tarball.read_bytes()
    assert (cli.root / "basefs" / "1-my_image.tar.gz").is_dir()
    assert (cli.root / "homefs" / "1-1-homefs").is_dir()
    assert (cli.root / "overlayfs" / "1-1-overlayfs").is_dir()
    # Writes go to the overlay, never to the shared image.
    (mountpoint / "etc" / "motd").write_text("hello\n")
    assert (cli.root / "overlayfs" / "1-1-overlayfs" / "etc" / "motd").read_text() == "hello\n"
    assert not (cli.root / "basefs" / "1-my_image.tar.gz" / "etc" / "motd").exists()

    cli.run("vm", "stop", "-f", "name=TestVM")
    assert cli.vm("TestVM")["State"] == "stopped"
    assert not any(mountpoint.iterdir())


def test_quiet_and_json_outputs(populated):
    cli = populated
    cli.run("vm", "add", "name=a", "user=test", "osf=MyOSF")
    quiet = cli.run("-q", "vm", "list").stdout.splitlines()
    assert len(quiet) == 1 and quiet[0].split()[1] == "a"
    assert cli.json("vm", "add", "name=b", "user=test", "osf=MyOSF") == {
        "message": "VM added with id 2", "id": 2, "ip": "172.20.127.253"}
    rows = cli.json("vm", "list")
    assert [r["Name"] for r in rows] == ["a", "b"]
    assert rows[0]["DI"] == cli.json("di", "list")[0]["Version"]


def test_filters_with_wildcards(populated):
    cli = populated
    for name in ("web1", "web2", "db1"):
        cli.run("vm", "add", f"name={name}", "user=test", "osf=MyOSF")
    assert [r["Name"] for r in cli.json("vm", "list", "-f", "name=web*")] == ["web1", "web2"]
    assert [r["Name"] for r in cli.json("vm", "list", "-f", "name=?b?")] == ["db1"]
    assert [r["Name"] for r in cli.json("vm", "list", "-f", "name=web*,ip=*.253")] == ["web2"]
    assert [r["Name"] for r in cli.json("vm", "list", "-f", "name=web*", "-f", "id=1")] == ["web1"]


def test_ip_assignment_from_the_top_down_until_full(cli):
    cli.run("config", "set", "vm.network.ip.start=10.9.8.250", "vm.network.netmask=24",
            "vm.network.gateway=10.9.8.253")
    cli.run("osf", "add", "name=o")
    cli.run("user", "add", "login=u", "password=p")
    ips = [cli.json("vm", "add", f"name=v{i}", "user=u", "osf=o")["ip"] for i in range(4)]
    # broadcast-1 downwards, skipping the gateway, down to ip.start.
    assert ips == ["10.9.8.254", "10.9.8.252", "10.9.8.251", "10.9.8.250"]
    error = cli.fails("vm", "add", "name=v5", "user=u", "osf=o")
    assert "no free IP" in error
    assert len(cli.json("vm", "list")) == 4
    # A freed address is reused.
    cli.run("vm", "del", "-f", "name=v1")
    assert cli.json("vm", "add", "name=v6", "user=u", "osf=o")["ip"] == "10.9.8.252"


def test_di_add_tags_version_head_and_default_if_first(populated, rootfs, tmp_path):
    cli = populated
    second = build_image_tarball(tmp_path / "second.tar.gz", rootfs)
    cli.run("di", "add", f"path={second}", "osf=MyOSF", "version=2.0")
    rows = {r["Id"]: r for r in cli.json("di", "list")}
    first_version = rows[1]["Version"]
    assert set(rows[1]["Tags"].split(",")) == {first_version, "default"}
    assert set(rows[2]["Tags"].split(",")) == {"2.0", "head"}
    # An image for another OSF is that OSF's default.
    cli.run("osf", "add", "name=Other")
    third = build_image_tarball(tmp_path / "third.tar.gz", rootfs)
    cli.run("di", "add", f"path={third}", "osf=Other")
    assert set(cli.json("di", "list", "-f", "id=3")[0]["Tags"].split(",")) >= {"default", "head"}
    # Tagging moves a tag within an OSF.
    cli.run("di", "tag", "-f", "id=2", "tag=default")
    rows = {r["Id"]: r for r in cli.json("di", "list")}
    assert "default" not in rows[1]["Tags"].split(",") and "default" in rows[2]["Tags"].split(",")
    cli.run("di", "untag", "-f", "id=2", "tag=head")
    assert "head" not in cli.json("di", "list", "-f", "id=2")[0]["Tags"].split(",")
    # The sha256 is recorded on the way in.
    sha = hashlib.sha256(second.read_bytes()).hexdigest()
    assert sqlite3.connect(cli.root / "qvd.db").execute(
        "select sha256 from dis where id = 2").fetchone()[0] == sha


def test_config_get_set_del(cli):
    assert cli.json("config", "get", "vm.overlay.persistent") == [
        {"Key": "vm.overlay.persistent", "Value": "0"}]
    cli.run("config", "set", "vm.overlay.persistent=1", "vm.network.netmask=16")
    got = {r["Key"]: r["Value"] for r in cli.json("config", "get", "-f", "key=vm.*")}
    assert got["vm.overlay.persistent"] == "1" and got["vm.network.netmask"] == "255.255.0.0"
    assert all(k.startswith("vm.") for k in got)
    # Paths default under --root.
    assert cli.json("config", "get", "path.storage.images")[0]["Value"] == str(cli.root / "images")
    cli.run("config", "del", "vm.overlay.persistent")
    assert cli.json("config", "get", "vm.overlay.persistent")[0]["Value"] == "0"


def test_passwords_are_stored_hashed(cli):
    cli.run("user", "add", "login=alice", "password=s3cret")
    db = sqlite3.connect(cli.root / "qvd.db")
    stored = db.execute("select password from users").fetchone()[0]
    assert "s3cret" not in stored and stored.startswith("scrypt$")
    assert check_password("s3cret", stored) and not check_password("S3cret", stored)


def test_qvd_root_environment_variable(tmp_path):
    root = tmp_path / "envroot"
    cli = Cli(tmp_path / "ignored")
    result = subprocess.run([QVDCTL, "osf", "add", "name=X"], capture_output=True, text=True,
                            env={"QVD_ROOT": str(root), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (root / "qvd.db").is_file()
    assert not cli.root.exists()


# --- errors: one line, exit 1, nothing changed ----------------------------------


@pytest.mark.parametrize("args, expected", [
    (["nosuch", "list"], "unknown object 'nosuch'"),
    (["vm", "frobnicate"], "unknown command 'frobnicate' for vm"),
    (["vm", "add", "name"], "bad argument 'name': expected key=value"),
    (["vm", "add", "=x"], "bad argument '=x'"),
    (["vm", "list", "-f", "name"], "bad filter 'name'"),
    (["vm", "list", "-f", "colour=red"], "cannot filter vm by 'colour'"),
    (["vm", "add", "name=x", "user=test", "osf=MyOSF", "color=red"], "unknown argument 'color'"),
    (["vm", "add", "name=x", "user=test"], "needs osf=..."),
    (["vm", "add", "name=x", "user=nobody", "osf=MyOSF"], "no user with login 'nobody'"),
    (["vm", "list", "-f", "name=nomatch*"], "no vm matches the filter name=nomatch*"),
    (["vm", "start", "-f", "name=nomatch"], "no vm matches the filter"),
    (["vm", "del"], "needs a filter"),
    (["config", "set", "vm.hypervisor=xen"], "bad value for vm.hypervisor"),
    (["config", "set", "vm.no.such=1"], "unknown setting 'vm.no.such'"),
    (["config", "set", "vm.network.netmask=300"], "bad value for vm.network.netmask"),
    (["config", "set", "path.storage.root=relative"], "bad value for path.storage.root"),
    (["osf", "add", "name=MyOSF"], "OSF 'MyOSF' already exists"),
    (["user", "add", "login=test", "password=x"], "user 'test' already exists"),
    (["osf", "del", "-f", "name=MyOSF"], "still has disk images"),
    (["user", "add", "login=x"], "needs password=..."),
    (["--bogus", "vm", "list"], "unrecognized arguments"),
    (["vm", "list", "--", "ls"], "vm list takes nothing after '--'"),
    (["vm", "exec", "-f", "name=TestVM"], "vm exec needs a command after '--'"),
    (["vm", "exec", "-f", "name=TestVM", "--", "true"], "VM 'TestVM' is stopped, not running"),
    (["vm", "console", "-f", "name=*"], "VM 'TestVM' is stopped, not running"),
])
def test_errors_are_one_line_and_change_nothing(populated, args, expected):
    cli = populated
    cli.run("vm", "add", "name=TestVM", "user=test", "osf=MyOSF")
    before = cli.db_dump()
    error = cli.fails(*args)
    assert expected in error
    assert cli.db_dump() == before


def test_name_clashes(populated, tarball):
    cli = populated
    cli.run("vm", "add", "name=TestVM", "user=test", "osf=MyOSF")
    error = cli.fails("vm", "add", "name=TestVM", "user=test", "osf=MyOSF")
    assert "VM 'TestVM' already exists" in error
    assert "already exists" in cli.fails("di", "add", f"path={tarball}", "osf=MyOSF")
    cli.run("host", "add", "name=node9", "address=10.0.0.9")
    error = cli.fails("host", "add", "name=node9", "address=10.0.0.8")
    assert "host 'node9' already exists" in error
    assert len(cli.json("vm", "list")) == 1 and len(cli.json("di", "list")) == 1


def test_wrong_vm_state_and_di_in_use(populated):
    cli = populated
    cli.run("vm", "add", "name=TestVM", "user=test", "osf=MyOSF")
    assert "is stopped; there is nothing to stop" in cli.fails("vm", "stop", "-f", "name=TestVM")
    assert "not running" in cli.fails("vm", "console", "-f", "name=TestVM")
    cli.run("vm", "start", "-f", "name=TestVM")
    before = cli.db_dump()
    assert "is running, not stopped" in cli.fails("vm", "start", "-f", "name=TestVM")
    assert "stop it before deleting it" in cli.fails("vm", "del", "-f", "name=TestVM")
    assert "DI 1 is in use by VM TestVM" in cli.fails("di", "del", "-f", "id=1")
    assert cli.db_dump() == before
    assert (cli.root / "images" / cli.json("di", "list")[0]["Path"]).exists()
    cli.run("vm", "stop", "-f", "name=TestVM")
    cli.run("vm", "del", "-f", "name=TestVM")
    cli.run("di", "del", "-f", "id=1")
    assert not any((cli.root / "images").iterdir())


def test_start_refused_on_kvm_and_without_image(cli, tarball):
    cli.run("osf", "add", "name=Empty")
    cli.run("user", "add", "login=u", "password=p")
    cli.run("vm", "add", "name=v", "user=u", "osf=Empty")
    assert "this node runs lxc only" in cli.fails("vm", "start", "-f", "name=v")
    cli.run("config", "set", "vm.hypervisor=lxc")
    assert "no disk image tagged 'default'" in cli.fails("vm", "start", "-f", "name=v")
    assert cli.vm("v")["State"] == "stopped"


def test_host_list_names_this_node(cli):
    cli.run("config", "set", "nodename=node1")
    cli.run("host", "add", "name=node2", "address=192.0.2.2")
    cli.run("host", "add", "name=node1", "address=192.0.2.1")
    rows = cli.json("host", "list")
    assert [(r["Name"], r["ThisNode"]) for r in rows] == [("node2", 0), ("node1", 1)]


@pytest.mark.timeout(180)
def test_concurrent_writers_never_corrupt_the_database(cli):
    cli.run("osf", "add", "name=o")
    cli.run("user", "add", "login=u", "password=p")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(
            lambda i: cli.run("vm", "add", f"name=v{i}", "user=u", "osf=o", check=False),
            range(24)))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results if r.returncode]
    rows = cli.json("vm", "list")
    assert len(rows) == 24 and len({r["Ip"] for r in rows}) == 24
    db = sqlite3.connect(cli.root / "qvd.db")
    assert db.execute("pragma integrity_check").fetchone()[0] == "ok"
    assert db.execute("pragma journal_mode").fetchone()[0] == "wal"


def test_progress_bar_only_on_a_terminal(cli, tarball):
    cli.run("osf", "add", "name=o")
    quiet = cli.run("di", "add", f"path={tarball}", "osf=o")
    assert quiet.stderr == ""
    cli.run("di", "del", "-f", "id=1")
    leader, follower = pty.openpty()
    try:
        result = subprocess.run(
            [QVDCTL, "--root", str(cli.root), "di", "add", f"path={tarball}", "osf=o"],
            stdout=subprocess.PIPE, stderr=follower, text=True, timeout=60,
        )
        os.close(follower)
        follower = -1
        shown = b""
        with contextlib.suppress(OSError):  # EIO once the terminal has no writer left
            while chunk := os.read(leader, 65536):
                shown += chunk
    finally:
        os.close(leader)
        if follower != -1:
            os.close(follower)
    assert result.returncode == 0 and result.stdout == "DI added with id 2\n"
    assert b"copying image.0.22.tgz" in shown


def test_ids_are_never_reused(cli):
    """A VM id names its home folder: a new VM must not inherit a deleted VM's home."""
    cli.run("osf", "add", "name=o")
    cli.run("user", "add", "login=u", "password=p")
    assert cli.json("vm", "add", "name=a", "user=u", "osf=o")["id"] == 1
    cli.run("vm", "del", "-f", "name=a")
    assert cli.json("vm", "add", "name=b", "user=u", "osf=o")["id"] == 2


def test_database_url_from_the_environment(cli, tmp_path):
    elsewhere = tmp_path / "elsewhere.db"
    cli.run("osf", "add", "name=o", env={"QVD_DB_URL": f"sqlite:///{elsewhere}"})
    names = sqlite3.connect(elsewhere).execute("select name from osfs").fetchall()
    assert names == [("o",)]
    assert not (cli.root / "qvd.db").exists()


def test_a_database_newer_than_qvdctl_is_refused(cli):
    cli.run("osf", "add", "name=o")
    with sqlite3.connect(cli.root / "qvd.db") as db:
        db.execute("update schema_version set version = 99")
    assert "schema version 99 is newer than this qvdctl" in cli.fails("osf", "list")
