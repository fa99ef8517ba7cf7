"""A VM's root from ``vm start`` to ``vm stop``, with real mounts of every union type."""

from __future__ import annotations

import concurrent.futures
import os
import resource
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from qvdctl.mounting import QVDFS
from qvdproc import processes
from qvdproc.mountinfo import mounts_under
from tests.support.mounts import NODE_OPTIONS
from tests.support.qvdctl import STOCK_UNIONFS, Cli, stock_unionfs_wrapper


@pytest.fixture
def cli(cli: Cli, tarball: Path) -> Cli:
    """A root with one image, a user and VM 'v' (id 1, user id 1), mount-only starts."""
    cli.run("config", "set", "vm.hypervisor=lxc", "vm.start.mount_only=1")
    cli.run("osf", "add", "name=o")
    cli.run("di", "add", f"path={tarball}", "osf=o")
    cli.run("user", "add", "login=u", "password=p")
    cli.run("vm", "add", "name=v", "user=u", "osf=o")
    return cli


def _paths(cli: Cli) -> dict[str, Path]:
    r = cli.root
    return {
        "rootfs": r / "rootfs" / "1-1-fs",
        "overlay": r / "overlayfs" / "1-1-overlayfs",
        "home": r / "homefs" / "1-1-homefs",
        "base": r / "basefs" / "1-image.0.22.tgz",
    }


def _wait_gone(mountpoint: Path) -> None:
    deadline = time.monotonic() + 15
    while processes.with_argument(mountpoint):
        assert time.monotonic() < deadline, "union daemon still running after vm stop"
        time.sleep(0.1)


MODES = {
    "qvdfs": {"vm.lxc.unionfs.type": "qvdfs"},
    "unionfs-fuse=qvdfs": {
        "vm.lxc.unionfs.type": "unionfs-fuse", "command.unionfs-fuse": str(QVDFS),
    },
    "unionfs-fuse=stock": {"vm.lxc.unionfs.type": "unionfs-fuse"},  # through the wrapper
    "overlayfs": {"vm.lxc.unionfs.type": "overlayfs"},
}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", list(MODES))
def test_start_mounts_the_root_and_stop_unmounts_it(cli, mode, tmp_path):
    settings = dict(MODES[mode])
    if mode == "unionfs-fuse=stock":
        wrapper = stock_unionfs_wrapper(tmp_path / "unionfs")
        settings["command.unionfs-fuse"] = str(wrapper)
        settings["command.unionfs-fuse.args.extra"] = "-o statfs_omit_ro"
    cli.run("config", "set", *(f"{k}={v}" for k, v in settings.items()))
    p = _paths(cli)
    cli.run("vm", "start", "-f", "name=v")
    if mode == "unionfs-fuse=stock":
        shared = cli.root / "basefs" / ".images" / "image.0.22.tgz"
        assert Path(f"{wrapper}.argv").read_text().splitlines() == [
            str(wrapper), "-o", "statfs_omit_ro",
            *NODE_OPTIONS, f"{p['overlay']}=RW:{shared}=RO", str(p["rootfs"]),
        ]
    assert mounts_under(p["rootfs"]) == [str(p["rootfs"])]
    assert cli.vm("v")["State"] == "running"
    assert p["base"].is_symlink()
    assert (p["rootfs"] / "bin" / "busybox").is_file()

    # OS writes land in the overlay; the shared image stays untouched.
    (p["rootfs"] / "var" / "log" / "boot.log").write_text("booted\n")
    assert (p["overlay"] / "var" / "log" / "boot.log").read_text() == "booted\n"
    assert not (p["base"] / "var" / "log" / "boot.log").exists()
    (p["rootfs"] / "etc" / "hostname").unlink()
    assert (p["base"] / "etc" / "hostname").exists()

    if mode == "qvdfs":
        # Native mode: the union itself serves the home at /home.
        (p["rootfs"] / "home" / "notes.txt").write_text("mine\n")
        assert (p["home"] / "notes.txt").read_text() == "mine\n"

    cli.run("vm", "stop", "-f", "name=v")
    assert mounts_under(p["rootfs"]) == []
    assert list(p["rootfs"].iterdir()) == []
    assert cli.vm("v")["State"] == "stopped"
    if mode != "overlayfs":
        _wait_gone(p["rootfs"])


@pytest.mark.timeout(180)
def test_non_persistent_overlay_is_moved_aside_at_each_start(cli):
    cli.run("config", "set", "vm.lxc.unionfs.type=overlayfs", "vm.overlay.persistent=0")
    p = _paths(cli)
    for session in ("one", "two", "three"):
        cli.run("vm", "start", "-f", "name=v")
        assert not (p["rootfs"] / "root" / "session").exists()
        (p["rootfs"] / "root" / "session").write_text(session)
        cli.run("vm", "stop", "-f", "name=v")
    overlays = cli.root / "overlayfs"
    names = sorted(x.name for x in overlays.iterdir() if not x.name.endswith(".work"))
    assert names == ["1-1-overlayfs", "deleteme-1-1-overlayfs", "deleteme-1-1-overlayfs.1"]
    assert (overlays / "deleteme-1-1-overlayfs" / "root" / "session").read_text() == "one"
    assert (overlays / "deleteme-1-1-overlayfs.1" / "root" / "session").read_text() == "two"
    assert (p["overlay"] / "root" / "session").read_text() == "three"


@pytest.mark.timeout(180)
def test_persistent_overlay_is_kept(cli):
    cli.run("config", "set", "vm.lxc.unionfs.type=qvdfs", "vm.overlay.persistent=1")
    p = _paths(cli)
    cli.run("vm", "start", "-f", "name=v")
    (p["rootfs"] / "root" / "kept").write_text("still here")
    cli.run("vm", "stop", "-f", "name=v")
    cli.run("vm", "start", "-f", "name=v")
    assert (p["rootfs"] / "root" / "kept").read_text() == "still here"
    cli.run("vm", "stop", "-f", "name=v")
    assert not any(x.name.startswith("deleteme-") for x in (cli.root / "overlayfs").iterdir())


@pytest.mark.parametrize("command, expected", [
    # The real stock binary under the machine's real hard limit of open files.
    (STOCK_UNIONFS, "unionfs-fuse mount failed: set_max_open_files"),
    ("/nonexistent/unionfs", "program /nonexistent/unionfs not found"),
])
def test_a_failed_mount_leaves_the_vm_stopped_and_its_overlay_renamed(cli, command, expected):
    if command == STOCK_UNIONFS and resource.getrlimit(resource.RLIMIT_NOFILE)[1] >= 32000:
        pytest.skip("this machine's hard limit lets stock unionfs start")
    cli.run("config", "set", "vm.lxc.unionfs.type=unionfs-fuse", f"command.unionfs-fuse={command}")
    p = _paths(cli)
    error = cli.fails("vm", "start", "-f", "name=v")
    assert "cannot start VM 'v': mounting the root failed" in error and expected in error
    assert error.endswith("its overlay is kept as deleteme-1-1-overlayfs")
    assert (cli.root / "overlayfs" / "deleteme-1-1-overlayfs").is_dir()
    assert not p["overlay"].exists()
    assert mounts_under(p["rootfs"]) == []
    row = cli.vm("v")
    assert (row["State"], row["Host"]) == ("stopped", None)


def test_a_container_the_layer_refuses_fails_the_start_cleanly(cli):
    """The wired seam: without a gateway no container config can be written."""
    cli.run("config", "set", "vm.lxc.unionfs.type=overlayfs", "vm.start.mount_only=0",
            "vm.lxc.unprivileged=0")
    p = _paths(cli)
    error = cli.fails("vm", "start", "-f", "name=v")
    assert "cannot start VM 'v': starting the container failed: vm.network.gateway is not set" \
        in error
    assert error.endswith("its overlay is kept as deleteme-1-1-overlayfs")
    assert mounts_under(p["rootfs"]) == []
    assert cli.vm("v")["State"] == "stopped"


@pytest.mark.timeout(180)
def test_a_stale_mount_from_a_crash_is_cleaned_before_the_next_start(cli):
    cli.run("config", "set", "vm.lxc.unionfs.type=qvdfs")
    p = _paths(cli)
    cli.run("vm", "start", "-f", "name=v")
    # Crash: the union daemon dies, the node's bookkeeping is reset to stopped.
    for pid in [q.pid for q in processes.with_argument(p["rootfs"])]:
        os.kill(pid, signal.SIGKILL)
    _wait_gone(p["rootfs"])
    with pytest.raises(OSError):
        os.listdir(p["rootfs"])  # "Transport endpoint is not connected"
    with sqlite3.connect(cli.root / "qvd.db") as db:
        db.execute("update vms set state = 'stopped', host_id = null")
    cli.run("vm", "start", "-f", "name=v")
    assert mounts_under(p["rootfs"]) == [str(p["rootfs"])]
    assert (p["rootfs"] / "bin" / "busybox").is_file()
    cli.run("vm", "stop", "-f", "name=v")
    assert mounts_under(p["rootfs"]) == []


@pytest.mark.timeout(180)
def test_a_busy_root_makes_a_zombie_that_the_next_stop_cleans(cli):
    cli.run("config", "set", "vm.lxc.unionfs.type=overlayfs")
    p = _paths(cli)
    cli.run("vm", "start", "-f", "name=v")
    busy = open(p["rootfs"] / "etc" / "inittab")
    try:
        error = cli.fails("vm", "stop", "-f", "name=v")
        assert "could not be cleaned up" in error and "zombie" in error
        assert cli.vm("v")["State"] == "zombie"
        # A start of a zombie retries its cleanup first; still busy, it stays a zombie.
        error = cli.fails("vm", "start", "-f", "name=v")
        assert "could not be cleaned up" in error and "zombie" in error
        assert cli.vm("v")["State"] == "zombie"
    finally:
        busy.close()
    cli.run("vm", "stop", "-f", "name=v")
    assert cli.vm("v")["State"] == "stopped"
    assert mounts_under(p["rootfs"]) == []


@pytest.mark.timeout(180)
def test_a_zombie_is_cleaned_and_started_by_the_next_start(cli):
    cli.run("config", "set", "vm.lxc.unionfs.type=overlayfs")
    p = _paths(cli)
    cli.run("vm", "start", "-f", "name=v")
    with open(p["rootfs"] / "etc" / "inittab"):
        cli.fails("vm", "stop", "-f", "name=v")
    assert cli.vm("v")["State"] == "zombie"
    out = cli.run("vm", "start", "-f", "name=v").stdout
    assert "VM v started" in out
    assert cli.vm("v")["State"] == "running"
    assert mounts_under(p["rootfs"]) == [str(p["rootfs"])]
    cli.run("vm", "stop", "-f", "name=v")


@pytest.mark.timeout(180)
def test_list_marks_a_running_vm_whose_union_died_zombie_and_stop_cleans_it(cli):
    cli.run("config", "set", "vm.lxc.unionfs.type=qvdfs")
    p = _paths(cli)
    cli.run("vm", "start", "-f", "name=v")
    assert cli.vm("v")["State"] == "running"
    for pid in [q.pid for q in processes.with_argument(p["rootfs"])]:
        os.kill(pid, signal.SIGKILL)
    _wait_gone(p["rootfs"])
    assert cli.vm("v")["State"] == "zombie"
    assert cli.vm("v")["State"] == "zombie"  # recorded, not only shown
    cli.run("vm", "stop", "-f", "name=v")
    assert (cli.vm("v")["State"], cli.vm("v")["Host"]) == ("stopped", None)
    assert mounts_under(p["rootfs"]) == []


@pytest.mark.timeout(180)
def test_list_marks_a_running_vm_whose_root_was_unmounted_zombie(cli):
    cli.run("config", "set", "vm.lxc.unionfs.type=overlayfs")
    p = _paths(cli)
    cli.run("vm", "start", "-f", "name=v")
    subprocess.run(["umount", str(p["rootfs"])], check=True)
    assert cli.vm("v")["State"] == "zombie"
    cli.run("vm", "stop", "-f", "name=v")
    assert cli.vm("v")["State"] == "stopped"


@pytest.mark.timeout(240)
def test_stop_of_several_vms_reports_each_failure_and_stops_the_rest(cli):
    cli.run("config", "set", "vm.lxc.unionfs.type=overlayfs")
    for i in range(2, 4):
        cli.run("vm", "add", f"name=v{i}", "user=u", "osf=o")
    cli.run("vm", "start", "-f", "name=v*")
    busy = open(cli.root / "rootfs" / "1-2-fs" / "etc" / "inittab")  # v2 is VM 2
    try:
        result = cli.run("vm", "stop", "-f", "name=v*", check=False)
    finally:
        busy.close()
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        line for line in result.stderr.splitlines() if line.startswith("Error: VM 'v2'")
    ] and len(result.stderr.splitlines()) == 1, result.stderr
    assert sorted(result.stdout.split("\n")) == ["", "VM v stopped", "VM v3 stopped"]
    states = {r["Name"]: r["State"] for r in cli.json("vm", "list")}
    assert states == {"v": "stopped", "v2": "zombie", "v3": "stopped"}
    cli.run("vm", "stop", "-f", "name=v2")
    assert mounts_under(cli.root / "rootfs") == []


@pytest.mark.timeout(240)
def test_many_vms_of_one_image_start_together_on_one_extraction(cli):
    cli.run("config", "set", "vm.lxc.unionfs.type=overlayfs")
    for i in range(2, 7):
        cli.run("vm", "add", f"name=v{i}", "user=u", "osf=o")
    names = ["v"] + [f"v{i}" for i in range(2, 7)]
    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        results = list(pool.map(
            lambda n: cli.run("vm", "start", "-f", f"name={n}", check=False), names))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    assert [r["State"] for r in cli.json("vm", "list")] == ["running"] * 6
    basefs = cli.root / "basefs"
    assert [x.name for x in (basefs / ".images").iterdir() if x.is_dir()] == ["image.0.22.tgz"]
    entries = sorted(x for x in basefs.iterdir() if not x.name.startswith("."))
    assert [x.name for x in entries] == [f"{i}-image.0.22.tgz" for i in range(1, 7)]
    assert {x.resolve() for x in entries} == {basefs / ".images" / "image.0.22.tgz"}
    cli.run("vm", "stop", "-f", "name=v*")
    assert mounts_under(cli.root / "rootfs") == []


@pytest.mark.timeout(180)
def test_two_starts_of_one_vm_race_and_one_wins(cli):
    cli.run("config", "set", "vm.lxc.unionfs.type=overlayfs")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: cli.run("vm", "start", "-f", "name=v", check=False),
                                range(2)))
    assert sorted(r.returncode for r in results) == [0, 1]
    (loser,) = [r for r in results if r.returncode]
    assert "not stopped" in loser.stderr and len(loser.stderr.splitlines()) == 1
    assert mounts_under(_paths(cli)["rootfs"]) == [str(_paths(cli)["rootfs"])]
    cli.run("vm", "stop", "-f", "name=v")
