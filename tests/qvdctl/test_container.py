"""The container layer on real LXC containers booted from a busybox root on a real union.

Containers live in a per-test lxcpath (``-P``), so they never meet an admin's or
another test's. Tests that need no network run in the host's namespace with
``lxc.net.0.type = empty``; the network tests are in test_network.py.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from qvdctl.container import config as config_mod
from qvdctl.container import query
from qvdctl.container.config import (
    ConfigError,
    ContainerSpec,
    remove_config,
    render_config,
    write_config,
)
from qvdctl.container.launch import LaunchError, halt, launch
from qvdctl.container.runtime import exec_in, prune_cgroups, state
from qvdproc.mountinfo import is_mounted
from tests.support import consoles
from tests.support.mounts import NODE_OPTIONS, force_unmount, qvdfs_mount
from tests.support.qvdctl import lxc_monitors, scratch_lxcpath

# Stock unionfs-fuse cannot raise its open-file limit to 32000 here (no CAP_SYS_RESOURCE
# and a hard limit of 20000), so the comparison mounts leave max_files out.
STOCK_OPTIONS = ["-o", "cow", "-o", "suid", "-o", "dev", "-o", "allow_other"]


def _vm_id() -> int:
    return random.randint(10_000, 99_999)


@pytest.fixture
def lxcpath(tmp_path: Path) -> Iterator[Path]:
    with scratch_lxcpath(tmp_path) as path:
        yield path


@pytest.fixture(params=["qvdfs", "unionfs-fuse"])
def union_root(
    request: pytest.FixtureRequest, tmp_path: Path, rootfs: Path
) -> Iterator[tuple[Path, Path]]:
    """A busybox root mounted by qvdfs (the node's line) or stock unionfs-fuse.

    Yields (mountpoint, overlay branch).
    """
    overlay, mnt = tmp_path / "overlay", tmp_path / "root"
    overlay.mkdir()
    mnt.mkdir()
    branches = f"{overlay}=RW:{rootfs}=RO"
    if request.param == "qvdfs":
        with qvdfs_mount(branches, mnt, *NODE_OPTIONS):
            yield mnt, overlay
        return
    subprocess.run(["unionfs", *STOCK_OPTIONS, branches, str(mnt)], check=True, timeout=30)
    try:
        yield mnt, overlay
    finally:
        force_unmount(mnt)


def _spec(vm_id: int, rootfs: Path, **extra: object) -> ContainerSpec:
    return ContainerSpec.for_vm(
        vm_id=vm_id, vm_name=f"Test VM {vm_id}", rootfs=rootfs,
        ip=None, netmask=None, gateway=None, bridge=None, **extra,  # type: ignore[arg-type]
    )  # fmt: skip


def _base_snapshot(base: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(base)): (p.lstat().st_mtime_ns, p.lstat().st_size)
        for p in base.rglob("*")
    }


# --- the config file -----------------------------------------------------------------


def test_config_has_spec_keys(tmp_path: Path) -> None:
    spec = ContainerSpec.for_vm(
        vm_id=7, vm_name="TestVM", rootfs=tmp_path / "1-7-fs", ip="172.20.127.254",
        netmask="255.255.0.0", gateway="172.20.0.1", bridge="qvdnet",
        home=tmp_path / "7-1-homefs", memory_mb=256, cpus=1.5,
    )  # fmt: skip
    text = render_config(spec, tmp_path)
    keys = dict(
        line.split(" = ", 1) for line in text.splitlines() if line and not line.startswith("#")
        and not line.startswith("lxc.mount.entry")
    )
    assert spec.name == "qvd-7"
    assert keys["lxc.uts.name"] == "TestVM"
    assert keys["lxc.rootfs.path"] == f"dir:{tmp_path}/1-7-fs"
    assert keys["lxc.autodev"] == "1"
    assert keys["lxc.tty.max"] == "3"
    assert keys["lxc.pty.max"] == "1024"
    assert keys["lxc.signal.halt"] == "SIGUSR2"
    assert keys["lxc.net.0.type"] == "veth"
    assert keys["lxc.net.0.link"] == "qvdnet"
    assert keys["lxc.net.0.veth.pair"] == "qvd7"
    assert keys["lxc.net.0.name"] == "eth0"
    assert keys["lxc.net.0.flags"] == "up"
    assert keys["lxc.net.0.hwaddr"] == "54:52:00:14:7f:fe"
    assert keys["lxc.net.0.ipv4.address"] == "172.20.127.254/16 172.20.255.255"
    assert keys["lxc.net.0.ipv4.gateway"] == "172.20.0.1"
    mounts = [line for line in text.splitlines() if line.startswith("lxc.mount.entry")]
    assert "lxc.mount.entry = /dev/fuse dev/fuse none bind,create=file,optional 0 0" in mounts
    assert f"lxc.mount.entry = {tmp_path}/7-1-homefs home none bind,create=dir 0 0" in mounts
    if config_mod.cgroup_version() == 1:
        assert keys["lxc.cgroup.memory.limit_in_bytes"] == str(256 << 20)
        assert keys["lxc.cgroup.cpu.cfs_quota_us"] == "150000"
    else:
        assert keys["lxc.cgroup2.memory.max"] == str(256 << 20)
        assert keys["lxc.cgroup2.cpu.max"] == "150000 100000"


def test_config_uses_cgroup2_keys_on_a_unified_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This machine is hybrid (v1 controllers); the v2 spelling is checked as text only.
    monkeypatch.setattr(config_mod, "cgroup_version", lambda: 2)
    text = render_config(_spec(3, tmp_path, memory_mb=64, cpus=0.5), tmp_path)
    assert f"lxc.cgroup2.memory.max = {64 << 20}" in text
    assert "lxc.cgroup2.cpu.max = 50000 100000" in text
    assert "lxc.cgroup.memory" not in text


def test_config_refuses_injection(tmp_path: Path) -> None:
    # A hostile VM name becomes a harmless hostname, never a config line.
    spec = ContainerSpec.for_vm(
        vm_id=5, vm_name="x\nlxc.mount.entry = / host none bind 0 0", rootfs=tmp_path / "r",
        ip=None, netmask=None, gateway=None, bridge=None,
    )  # fmt: skip
    text = render_config(spec, tmp_path)
    assert "host none" not in text
    assert spec.hostname == "x-lxc-mount-entry-host-none-bind-0-0"
    for bad_root in ("relative/root", "/tmp/a\nlxc.init.cmd = /evil", "/tmp/a b", "/tmp/../etc"):
        with pytest.raises(ConfigError):
            render_config(_spec(5, Path(bad_root)), tmp_path)
    with pytest.raises(ConfigError):
        ContainerSpec.for_vm(
            vm_id=5, vm_name="v", rootfs=tmp_path, ip="10.0.0.2", netmask="255.255.255.0",
            gateway="10.9.9.1", bridge="br0",
        )  # fmt: skip
    with pytest.raises(ConfigError):
        ContainerSpec.for_vm(
            vm_id=5, vm_name="v", rootfs=tmp_path, ip="10.0.0.2", netmask=None,
            gateway="10.0.0.1", bridge="br0",
        )  # fmt: skip
    bad_bridge = ContainerSpec.for_vm(
        vm_id=5, vm_name="v", rootfs=tmp_path, ip="10.0.0.2", netmask="24",
        gateway="10.0.0.1", bridge="br0\nlxc.x=1",
    )  # fmt: skip
    with pytest.raises(ConfigError):
        render_config(bad_bridge, tmp_path)


def test_config_dir_is_ours_only(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    (rootfs / "precious").write_text("data")
    lxcpath = tmp_path / "lxc"
    (lxcpath / "qvd-8").mkdir(parents=True)
    (lxcpath / "qvd-8" / "config").write_text("# an admin's own container\n")
    with pytest.raises(ConfigError, match="not made by qvdctl"):
        write_config(_spec(8, rootfs), lxcpath)
    with pytest.raises(ConfigError):
        remove_config("qvd-8", lxcpath)
    assert (lxcpath / "qvd-8" / "config").read_text() == "# an admin's own container\n"

    path = write_config(_spec(9, rootfs), lxcpath)
    assert path == lxcpath / "qvd-9" / "config"
    assert remove_config("qvd-9", lxcpath)
    assert not (lxcpath / "qvd-9").exists()
    assert not remove_config("qvd-9", lxcpath)
    # Removing the config never deletes the root it pointed at.
    assert (rootfs / "precious").read_text() == "data"


# --- real containers -------------------------------------------------------------------


@pytest.mark.timeout(90)
async def test_issue2_smoke_on_qvdfs_node_line(tmp_path: Path, rootfs: Path, lxcpath: Path) -> None:
    """Issue 2: a root mounted with qvdfs's node command line boots, writes go to the overlay."""
    overlay, mnt = tmp_path / "overlay", tmp_path / "root"
    overlay.mkdir()
    mnt.mkdir()
    before = _base_snapshot(rootfs)
    spec = _spec(_vm_id(), mnt)
    with qvdfs_mount(f"{overlay}=RW:{rootfs}=RO", mnt, *NODE_OPTIONS):
        await launch(spec, lxcpath)
        try:
            done = await exec_in(
                spec.name, ["sh", "-c", "echo written-inside > /root/note && cat /etc/hostname"],
                lxcpath,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            assert done.stdout == b"qvd-busybox\n"
        finally:
            assert await halt(spec.name, spec.veth, lxcpath, timeout=20)
    assert (overlay / "root/note").read_text() == "written-inside\n"
    # busybox's rcS appended its boot line: that write went to the overlay too.
    assert (overlay / "var/log/boot.log").read_text().startswith("booted ")
    assert not (rootfs / "root/note").exists()
    assert _base_snapshot(rootfs) == before
    assert await state(spec.name, lxcpath) == "ABSENT"


@pytest.mark.timeout(90)
async def test_lxc_tools_find_the_container(
    union_root: tuple[Path, Path], lxcpath: Path
) -> None:
    mnt, _ = union_root
    spec = _spec(_vm_id(), mnt)
    own_cgroups = Path("/proc/self/cgroup").read_text()
    pid = await launch(spec, lxcpath)
    try:
        # liblxc moves the process that starts a container into its monitor cgroup:
        # that must never be the controller itself.
        assert Path("/proc/self/cgroup").read_text() == own_cgroups
        assert pid > 0 and os.path.exists(f"/proc/{pid}")
        listed = subprocess.run(
            ["lxc-ls", "-P", str(lxcpath), "-f", "-F", "NAME,STATE"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert re.search(rf"^{spec.name}\s+RUNNING\s*$", listed, re.M), listed
        attached = subprocess.run(
            ["lxc-attach", "-P", str(lxcpath), "-n", spec.name, "--", "hostname"],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout  # fmt: skip
        assert attached.strip() == spec.hostname
        assert query.states(lxcpath) == {spec.name: "RUNNING"}
        assert len(lxc_monitors(lxcpath)) == 1
        # A second launch of the same name is refused and leaves the running one alone.
        with pytest.raises(LaunchError, match="already running"):
            await launch(spec, lxcpath)
        assert await state(spec.name, lxcpath) == "RUNNING"
    finally:
        await halt(spec.name, spec.veth, lxcpath, timeout=20)
    assert query.states(lxcpath) == {}


@pytest.mark.timeout(90)
async def test_exec_returns_status_and_output(
    union_root: tuple[Path, Path], lxcpath: Path
) -> None:
    mnt, overlay = union_root
    spec = _spec(_vm_id(), mnt)
    await launch(spec, lxcpath)
    try:
        done = await exec_in(
            spec.name, ["sh", "-c", "cat; echo out; echo err >&2; exit 7"], lxcpath, stdin=b"in\n"
        )
        assert (done.returncode, done.stdout, done.stderr) == (7, b"in\nout\n", b"err\n")
        # The environment is clean: nothing of the caller's leaks in.
        env = await exec_in(spec.name, ["env"], lxcpath)
        assert b"PYTEST" not in env.stdout and b"PATH=" in env.stdout
        # The container sees a device tree made by autodev, with /dev/fuse and 3 ttys.
        devs = await exec_in(
            spec.name,
            ["sh", "-c", "test -c /dev/fuse && test -c /dev/tty3 && ! test -e /dev/tty4 "
             "&& test -c /dev/null && test -c /dev/ptmx && cat /proc/1/comm"],
            lxcpath,
        )  # fmt: skip
        assert (devs.returncode, devs.stdout) == (0, b"init\n"), devs.stderr
        with pytest.raises(Exception, match="timed out"):
            await exec_in(spec.name, ["sleep", "30"], lxcpath, timeout=1)
    finally:
        await halt(spec.name, spec.veth, lxcpath, timeout=20)
    with pytest.raises(Exception, match="not running"):
        await exec_in(spec.name, ["true"], lxcpath)


@pytest.mark.timeout(90)
async def test_limits_reach_the_cgroup(union_root: tuple[Path, Path], lxcpath: Path) -> None:
    mnt, _ = union_root
    spec = _spec(_vm_id(), mnt, memory_mb=192, cpus=0.5)
    pid = await launch(spec, lxcpath)
    try:
        groups = dict(
            line.split(":", 2)[1:] for line in Path(f"/proc/{pid}/cgroup").read_text().split("\n")
            if line
        )  # fmt: skip
        if config_mod.cgroup_version() == 1:
            memory = Path("/sys/fs/cgroup/memory") / groups["memory"].lstrip("/")
            assert (memory / "memory.limit_in_bytes").read_text().strip() == str(192 << 20)
            cpu = Path("/sys/fs/cgroup/cpu") / groups["cpu"].lstrip("/")
            assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "50000"
        else:
            group = Path("/sys/fs/cgroup") / groups[""].lstrip("/")
            assert (group / "memory.max").read_text().strip() == str(192 << 20)
            assert (group / "cpu.max").read_text().strip() == "50000 100000"
    finally:
        await halt(spec.name, spec.veth, lxcpath, timeout=20)


@pytest.mark.timeout(90)
async def test_halt_is_clean_and_falls_back_to_a_hard_stop(
    union_root: tuple[Path, Path], lxcpath: Path
) -> None:
    mnt, _ = union_root
    spec = _spec(_vm_id(), mnt)
    pid = await launch(spec, lxcpath)
    # busybox init powers off on SIGUSR2
    assert await halt(spec.name, spec.veth, lxcpath, timeout=20) is True
    assert not os.path.exists(f"/proc/{pid}")
    assert not (lxcpath / spec.name).exists()
    assert await halt(spec.name, spec.veth, lxcpath, timeout=20) is True  # idempotent

    # An init that does not halt on the signal (busybox init reloads on SIGHUP) is killed.
    stubborn = _spec(_vm_id(), mnt, halt_signal="SIGHUP")
    pid = await launch(stubborn, lxcpath)
    started = time.monotonic()
    assert await halt(stubborn.name, stubborn.veth, lxcpath, timeout=2) is False
    assert 2 <= time.monotonic() - started < 15
    assert not os.path.exists(f"/proc/{pid}")
    assert await state(stubborn.name, lxcpath) == "ABSENT"


@pytest.mark.timeout(60)
async def test_failed_start_leaves_nothing(tmp_path: Path, lxcpath: Path) -> None:
    empty = tmp_path / "no-init"
    empty.mkdir()
    spec = _spec(_vm_id(), empty)
    with pytest.raises(LaunchError) as info:
        await launch(spec, lxcpath)
    assert info.value.step == "start"
    assert spec.name in str(info.value) and "\n" not in str(info.value)
    assert "/sbin/init" in str(info.value)  # liblxc's own reason reaches the message
    assert await state(spec.name, lxcpath) == "ABSENT"
    assert not (lxcpath / spec.name).exists()
    assert not list(Path("/sys/fs/cgroup").glob(f"*/lxc.*.{spec.name}*"))


@pytest.mark.timeout(90)
async def test_cancelled_launch_leaves_nothing(
    union_root: tuple[Path, Path], lxcpath: Path
) -> None:
    mnt, _ = union_root
    # Cancel at several moments: before lxc-start, during it, while waiting for init.
    for delay in (0.0, 0.02, 0.1, 0.3):
        spec = _spec(_vm_id(), mnt)
        finished = False
        with trio.move_on_after(delay):
            await launch(spec, lxcpath)
            finished = True
        if finished:  # the launch beat the deadline: stop it as a caller would
            await halt(spec.name, spec.veth, lxcpath, timeout=10)
        assert await state(spec.name, lxcpath) == "ABSENT", delay
        assert not (lxcpath / spec.name).exists()
        deadline = time.monotonic() + 5
        while lxc_monitors(lxcpath) and time.monotonic() < deadline:
            await trio.sleep(0.1)
        assert lxc_monitors(lxcpath) == [], delay


@pytest.mark.timeout(90)
async def test_home_bind_mount_lands_in_homefs(
    union_root: tuple[Path, Path], tmp_path: Path, lxcpath: Path
) -> None:
    mnt, overlay = union_root
    home = tmp_path / "homefs"
    home.mkdir()
    spec = _spec(_vm_id(), mnt, home=home)
    await launch(spec, lxcpath)
    try:
        done = await exec_in(spec.name, ["sh", "-c", "echo mine > /home/file"], lxcpath)
        assert done.returncode == 0, done.stderr
    finally:
        await halt(spec.name, spec.veth, lxcpath, timeout=20)
    assert (home / "file").read_text() == "mine\n"
    assert not (overlay / "home/file").exists()


@pytest.mark.timeout(90)
async def test_home_grafted_by_qvdfs_lands_in_homefs(
    tmp_path: Path, rootfs: Path, lxcpath: Path
) -> None:
    overlay, home, mnt = tmp_path / "overlay", tmp_path / "homefs", tmp_path / "root"
    for d in (overlay, home, mnt):
        d.mkdir()
    spec = _spec(_vm_id(), mnt)  # no bind mount: the union serves /home itself
    assert "home none bind" not in render_config(spec, lxcpath)
    with qvdfs_mount(f"{overlay}=RW:{rootfs}=RO:{home}=RW@/home", mnt, *NODE_OPTIONS):
        await launch(spec, lxcpath)
        try:
            done = await exec_in(
                spec.name, ["sh", "-c", "echo mine > /home/file && echo os > /root/file"], lxcpath
            )
            assert done.returncode == 0, done.stderr
        finally:
            await halt(spec.name, spec.veth, lxcpath, timeout=20)
    assert (home / "file").read_text() == "mine\n"
    assert (overlay / "root/file").read_text() == "os\n"
    assert not (overlay / "home/file").exists()


@pytest.mark.timeout(90)
async def test_concurrent_launches(tmp_path: Path, rootfs: Path, lxcpath: Path) -> None:
    roots = []
    for i in range(4):
        overlay, mnt = tmp_path / f"overlay{i}", tmp_path / f"root{i}"
        overlay.mkdir()
        mnt.mkdir()
        roots.append((overlay, mnt))
    try:
        for overlay, mnt in roots:
            subprocess.run(
                ["unionfs", *STOCK_OPTIONS, f"{overlay}=RW:{rootfs}=RO", str(mnt)],
                check=True, timeout=30,
            )  # fmt: skip
        specs = [_spec(_vm_id() * 10 + i, mnt) for i, (_, mnt) in enumerate(roots)]
        try:
            async with trio.open_nursery() as nursery:
                for spec in specs:
                    nursery.start_soon(launch, spec, lxcpath)
            assert query.states(lxcpath) == {s.name: "RUNNING" for s in specs}
            for spec, (overlay, _) in zip(specs, roots):
                argv = ["sh", "-c", f"echo {spec.name} > /tmp/me"]
                done = await exec_in(spec.name, argv, lxcpath)
                assert done.returncode == 0
                assert (overlay / "tmp/me").read_text() == f"{spec.name}\n"
        finally:
            async with trio.open_nursery() as nursery:
                for spec in specs:
                    nursery.start_soon(halt, spec.name, spec.veth, lxcpath, 20)
        assert query.states(lxcpath) == {}
    finally:
        for _, mnt in roots:
            force_unmount(mnt)
    assert not any(is_mounted(mnt) for _, mnt in roots)


@pytest.mark.timeout(60)
async def test_console_gives_an_interactive_shell(
    union_root: tuple[Path, Path], lxcpath: Path
) -> None:
    mnt, _ = union_root
    spec = _spec(_vm_id(), mnt)
    await launch(spec, lxcpath)
    try:
        output = await trio.to_thread.run_sync(_talk_to_console, spec.name, lxcpath)
        assert "console-says-42" in output
    finally:
        await halt(spec.name, spec.veth, lxcpath, timeout=20)


def _talk_to_console(name: str, lxcpath: Path) -> str:
    """Drive ``lxc-console`` through a pty as an admin would: a command, then Ctrl+a q."""
    from qvdctl.container.query import console_argv

    seen = consoles.talk(
        console_argv(name, lxcpath), b"echo console-says-$((6*7))", marker=b"console-says-42"
    )
    return seen.decode(errors="replace")


# --- cgroup pruning ------------------------------------------------------------------


def test_prune_cgroups_takes_what_is_empty_and_spares_the_rest(tmp_path: Path) -> None:
    """A plain tree stands in for /sys/fs/cgroup: rmdir refuses a folder with files
    as cgroupfs refuses a group with tasks."""
    top = tmp_path / "cpuset"
    (top / "lxc.monitor.qvd-7" / "a" / "b").mkdir(parents=True)
    (top / "lxc.payload.qvd-7-2" / "c").mkdir(parents=True)
    busy = top / "lxc.payload.qvd-7" / "busy"
    busy.mkdir(parents=True)
    (busy / "tasks").write_text("1\n")
    (top / "lxc.payload.qvd-77").mkdir()  # another container's
    left = prune_cgroups("qvd-7", wait=0, root=tmp_path)
    assert left == [top / "lxc.payload.qvd-7"]
    assert sorted(p.name for p in top.iterdir()) == ["lxc.payload.qvd-7", "lxc.payload.qvd-77"]


@pytest.mark.timeout(60)
def test_prune_cgroups_tolerates_groups_vanishing_under_it(tmp_path: Path) -> None:
    """liblxc's exiting monitor removes its own groups while we prune them (once seen
    as ENOENT on lxc.monitor.qvd-1, which made a clean stop a zombie)."""
    top = tmp_path / "cpuset"
    top.mkdir()
    stop = threading.Event()

    def churn() -> None:
        # Deep, wide trees created and torn down as fast as possible, as the monitor does.
        while not stop.is_set():
            group = top / "lxc.monitor.qvd-1"
            for i in range(20):
                try:
                    (group / f"s{i}" / "x" / "y").mkdir(parents=True, exist_ok=True)
                except FileNotFoundError:
                    pass  # the pruning took a parent first
            shutil.rmtree(group, ignore_errors=True)

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        deadline = time.monotonic() + 3
        rounds = 0
        while time.monotonic() < deadline:
            prune_cgroups("qvd-1", wait=0, root=tmp_path)  # must never raise
            rounds += 1
    finally:
        stop.set()
        thread.join()
    assert rounds > 10
    shutil.rmtree(top / "lxc.monitor.qvd-1", ignore_errors=True)
    assert prune_cgroups("qvd-1", wait=0, root=tmp_path) == []
