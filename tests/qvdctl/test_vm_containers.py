"""``qvdctl vm start/stop/list/exec/console`` on real LXC containers booted on real union mounts.

Every test runs the real CLI inside a network namespace of its own (bridge, veths
and containers stay there) on a storage root made a shared mount, exactly as the
demo does; containers live in an lxcpath inside that root (``vm.lxc.lxcpath``).
"Leaves nothing behind" is checked each time: no mount under the root, no veth in
the namespace, no container config, no liblxc monitor, no new LXC cgroup.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from qvdctl.fleet import fence
from qvdctl.mounting import QVDFS
from qvdproc import processes
from qvdproc.mountinfo import mounts_under
from tests.support import consoles
from tests.support.mounts import NODE_OPTIONS, daemon_pids
from tests.support.qvdctl import IMAGE, Cli, lxc_monitors, stock_unionfs_wrapper
from tools.imagebuild import build_image_tarball
from tools.sandbox import netns_argv, scratch_node

NET = "10.219.5"  # only ever configured inside each test's own namespace
BRIDGE = "qvdtbr0"

MODES = {
    "qvdfs": {"vm.lxc.unionfs.type": "qvdfs"},  # unprivileged, the default
    "qvdfs,privileged": {"vm.lxc.unionfs.type": "qvdfs", "vm.lxc.unprivileged": "0"},
    # unionfs-fuse cannot be mounted idmapped, so its containers run privileged.
    "unionfs-fuse=qvdfs": {
        "vm.lxc.unionfs.type": "unionfs-fuse", "command.unionfs-fuse": str(QVDFS),
        "vm.lxc.unprivileged": "0",
    },
    # The stock binary through the recording wrapper (see stock_unionfs_wrapper).
    "unionfs-fuse=stock": {"vm.lxc.unionfs.type": "unionfs-fuse", "vm.lxc.unprivileged": "0"},
}


@pytest.fixture(scope="module")
def no_init_tarball(tmp_path_factory, rootfs) -> Path:
    """An image that extracts fine but cannot boot: its /sbin/init is missing."""
    root = tmp_path_factory.mktemp("noinit") / "root"
    shutil.copytree(rootfs, root, symlinks=True)
    (root / "sbin" / "init").unlink()
    return build_image_tarball(tmp_path_factory.mktemp("tarballs") / "noinit.0.1.tgz", root)


def _lxc_cgroups() -> set[Path]:
    root = Path("/sys/fs/cgroup")
    return set(root.glob("lxc.*.qvd-*")) | set(root.glob("*/lxc.*.qvd-*"))


def _left_cgroups(before: set[Path]) -> set[Path]:
    """The lxc cgroups new since ``before`` that hold no process: what a stop left behind.

    A node runs other containers (other tests, other nodes' on this machine), whose
    groups come and go with names like ours; a group with a process in it belongs to a
    running container, and one of ours would show as a monitor.
    """
    return {group for group in _lxc_cgroups() - before if not _holds_a_process(group)}


def _holds_a_process(group: Path) -> bool:
    for folder, _, _ in os.walk(group):
        try:
            if (Path(folder) / "cgroup.procs").read_text().strip():
                return True
        except OSError:
            continue  # removed meanwhile
    return False


class Node:
    """The CLI on a throwaway root in a throwaway namespace, and what to look at."""

    def __init__(self, root: Path, netns: str) -> None:
        self.root = root
        self.netns = netns
        self.cli = Cli(root, netns)
        self.lxcpath = root / "lxc"

    def links(self) -> set[str]:
        with IPRoute(netns=self.netns) as ipr:
            return {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}

    def veths(self) -> set[str]:
        return {name for name in self.links() if name.startswith("qvd") and name != BRIDGE}

    def in_ns(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            netns_argv(self.netns, list(argv)), capture_output=True, text=True, timeout=60
        )

    def exec(self, vm: str, script: str) -> subprocess.CompletedProcess[str]:
        return self.cli.run("vm", "exec", "-f", f"name={vm}", "--", "sh", "-c", script,
                            check=False)

    def state(self, vm: str) -> str:
        return self.cli.vm(vm)["State"]

    def assert_nothing_left(self, cgroups_before: set[Path]) -> None:
        """No mount under rootfs/, no veth, no container, no monitor, no new cgroup."""
        assert mounts_under(self.root / "rootfs") == []
        assert self.veths() == set()
        assert not self.lxcpath.exists() or list(self.lxcpath.iterdir()) == []
        deadline = time.monotonic() + 15  # a failed start's monitor exits a moment later
        while (lxc_monitors(self.lxcpath) or _left_cgroups(cgroups_before)) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.1)
        assert lxc_monitors(self.lxcpath) == []
        assert _left_cgroups(cgroups_before) == set()


@contextlib.contextmanager
def lxc_node(
    root: Path, *, prefix: str = "qvdtest", net: str = NET, bridge: str = BRIDGE,
    stop_timeout: int = 10,
) -> Iterator[Node]:
    """A node on ``root`` set up for LXC on qvdfs in a namespace of its own; all of it
    (containers, mounts, namespace) is gone afterwards."""
    with scratch_node(root, prefix=prefix) as scratch:
        n = Node(root, scratch.netns)
        n.cli.run("config", "set",
                  *scratch.lxc_settings(net=net, bridge=bridge, stop_timeout=stop_timeout))
        yield n


@pytest.fixture
def node(tmp_path, tarball) -> Iterator[Node]:
    """A node with settings for LXC in its own namespace, one image and VM 'v' (id 1)."""
    with lxc_node(tmp_path / "root") as n:
        n.cli.run("osf", "add", "name=o", "memory=256")
        n.cli.run("di", "add", f"path={tarball}", "osf=o")
        n.cli.run("user", "add", "login=u", "password=p")
        n.cli.run("vm", "add", "name=v", "user=u", "osf=o")
        yield n


def _paths(node: Node, vm_id: int = 1, user_id: int = 1, di_id: int = 1) -> dict[str, Path]:
    r = node.root
    return {
        "rootfs": r / "rootfs" / f"{user_id}-{vm_id}-fs",
        "overlay": r / "overlayfs" / f"{di_id}-{vm_id}-overlayfs",
        "home": r / "homefs" / f"{vm_id}-{user_id}-homefs",
        "base": r / "basefs" / f"{vm_id}-{IMAGE}",
    }


# --- the lifecycle, on each union ------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", list(MODES))
def test_start_list_exec_stop(node: Node, mode: str, tmp_path: Path) -> None:
    settings = dict(MODES[mode])
    if mode == "unionfs-fuse=stock":
        wrapper = stock_unionfs_wrapper(tmp_path / "unionfs")
        settings["command.unionfs-fuse"] = str(wrapper)
    node.cli.run("config", "set", *(f"{k}={v}" for k, v in settings.items()))
    cgroups = _lxc_cgroups()
    p = _paths(node)

    assert node.cli.run("vm", "start", "-f", "name=v").stdout == "VM v started\n"
    if mode == "unionfs-fuse=stock":
        shared = node.root / "basefs" / ".images" / IMAGE
        assert Path(f"{wrapper}.argv").read_text().splitlines()[1:] == [
            *NODE_OPTIONS, f"{p['overlay']}=RW:{shared}=RO", str(p["rootfs"]),
        ]
    row = node.cli.vm("v")
    assert (row["State"], row["Ip"]) == ("running", f"{NET}.254")
    assert row["Host"] == node.cli.json("host", "list")[0]["Name"]
    # The standard LXC tools see it (SPEC §4), with -P for the node's lxcpath.
    listed = node.in_ns("lxc-ls", "-P", str(node.lxcpath), "-f", "-F", "NAME,STATE")
    assert "qvd-1" in listed.stdout and "RUNNING" in listed.stdout, listed
    assert node.veths() == {"qvd1"}

    done = node.exec("v", "hostname; echo os > /root/f; echo mine > /home/f; ip -4 addr show eth0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("v\n") and f"{NET}.254/24" in done.stdout
    assert (p["overlay"] / "root" / "f").read_text() == "os\n"
    assert not (p["base"] / "root" / "f").exists()
    assert (p["home"] / "f").read_text() == "mine\n"
    assert not (p["overlay"] / "home" / "f").exists()
    # The command's own status comes back as qvdctl's.
    assert node.exec("v", "exit 7").returncode == 7
    # The VM reaches the gateway over the bridge.
    assert node.exec("v", f"ping -c1 -W2 {NET}.1").returncode == 0

    assert node.cli.run("vm", "stop", "-f", "name=v").stdout == "VM v stopped\n"
    assert (node.state("v"), node.cli.vm("v")["Host"]) == ("stopped", None)
    assert list(p["rootfs"].iterdir()) == []
    node.assert_nothing_left(cgroups)
    # Started again on the same root: the lifecycle repeats cleanly.
    node.cli.run("vm", "start", "-f", "name=v")
    assert node.exec("v", "cat /home/f").stdout == "mine\n"
    node.cli.run("vm", "stop", "-f", "name=v")
    node.assert_nothing_left(cgroups)


@pytest.mark.timeout(120)
def test_console_through_the_cli(node: Node) -> None:
    node.cli.run("vm", "start", "-f", "name=v")
    try:
        seen = consoles.talk(
            node.cli.argv("vm", "console", "-f", "name=v"),
            b"echo console-says-$((6*7))", marker=b"console-says-42",
        )  # fmt: skip
        assert b"console-says-42" in seen
        assert node.state("v") == "running"  # leaving the console does not stop the VM
    finally:
        node.cli.run("vm", "stop", "-f", "name=v")


@pytest.mark.timeout(120)
def test_exec_forwards_standard_input_and_the_exit_status(node: Node, tmp_path: Path) -> None:
    node.cli.run("vm", "start", "-f", "name=v")
    try:
        data = os.urandom(3 * 1024 * 1024)  # binary, NULs included, larger than a pipe
        source = tmp_path / "f"
        source.write_bytes(data)
        with open(source, "rb") as f:  # the issue's own example: copy a file in
            done = subprocess.run(
                node.cli.argv("vm", "exec", "-f", "name=v", "--", "sh", "-c", "cat > /root/f"),
                stdin=f, capture_output=True, timeout=60,
            )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert (_paths(node)["overlay"] / "root" / "f").read_bytes() == data
        # Input in, the same bytes out, and the command's status is qvdctl's.
        done = subprocess.run(
            node.cli.argv("vm", "exec", "-f", "name=v", "--", "sh", "-c", "cat; exit 3"),
            input=b"line one\nline two\n", capture_output=True, timeout=60,
        )  # fmt: skip
        assert (done.returncode, done.stdout) == (3, b"line one\nline two\n"), done.stderr
        # With no input at all the command sees end of file at once, not a hang.
        done = subprocess.run(
            node.cli.argv("vm", "exec", "-f", "name=v", "--", "wc", "-c"),
            stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
        )  # fmt: skip
        assert (done.returncode, done.stdout.strip()) == (0, b"0")
        # The command's stderr stays its stderr.
        done = subprocess.run(
            node.cli.argv("vm", "exec", "-f", "name=v", "--", "sh", "-c", "echo oops >&2"),
            stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
        )  # fmt: skip
        assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"oops\n")
    finally:
        node.cli.run("vm", "stop", "-f", "name=v")


@pytest.mark.timeout(180)
def test_the_halt_signal_suits_the_image_unless_the_di_says_otherwise(
    node: Node, tarball: Path, tmp_path: Path
) -> None:
    # Long enough that only a halt the init understood ends sooner.
    node.cli.run("config", "set", "vm.stop.timeout=30")
    node.cli.run("vm", "start", "-f", "name=v")
    config = node.lxcpath / "qvd-1" / "config"
    assert "\nlxc.signal.halt = SIGUSR2\n" in config.read_text()  # found: init -> busybox
    started = time.monotonic()
    node.cli.run("vm", "stop", "-f", "name=v")
    assert time.monotonic() - started < 15

    # The DI's own setting wins: SIGHUP, on which busybox init only reloads its inittab.
    other = tmp_path / "image.0.23.tgz"
    shutil.copy(tarball, other)
    node.cli.run("osf", "add", "name=o2")
    node.cli.run("di", "add", f"path={other}", "osf=o2", "halt_signal=sighup")
    node.cli.run("vm", "add", "name=w", "user=u", "osf=o2")
    node.cli.run("config", "set", "vm.stop.timeout=2")
    node.cli.run("vm", "start", "-f", "name=w")
    assert "\nlxc.signal.halt = SIGHUP\n" in (node.lxcpath / "qvd-2" / "config").read_text()
    started = time.monotonic()
    node.cli.run("vm", "stop", "-f", "name=w")
    assert time.monotonic() - started >= 2  # waited for a halt that never came, then killed
    assert node.state("w") == "stopped"


@pytest.mark.timeout(180)
def test_an_osf_halt_signal_reaches_the_config_unless_its_di_has_one(
    node: Node, tarball: Path, tmp_path: Path
) -> None:
    node.cli.run("config", "set", "vm.stop.timeout=2")  # SIGPWR does not halt busybox
    node.cli.run("osf", "edit", "-f", "name=o", "halt_signal=sigpwr")
    node.cli.run("vm", "start", "-f", "name=v")
    config = node.lxcpath / "qvd-1" / "config"
    assert "\nlxc.signal.halt = SIGPWR\n" in config.read_text()
    node.cli.run("vm", "stop", "-f", "name=v")
    # A DI of the same OSF with its own signal: the VM gets it once its tag points there.
    other = tmp_path / "image.0.23.tgz"
    shutil.copy(tarball, other)
    node.cli.run("di", "add", f"path={other}", "osf=o", "halt_signal=sigusr2")
    node.cli.run("vm", "edit", "-f", "name=v", "di_tag=head")
    node.cli.run("vm", "start", "-f", "name=v")
    assert "\nlxc.signal.halt = SIGUSR2\n" in config.read_text()
    node.cli.run("vm", "stop", "-f", "name=v")
    assert node.state("v") == "stopped"


@pytest.mark.timeout(120)
def test_exec_and_console_refuse_a_stopped_vm(node: Node) -> None:
    assert node.cli.fails("vm", "exec", "-f", "name=v", "--", "true") == (
        "Error: VM 'v' is stopped, not running"
    )
    assert node.cli.fails("vm", "console", "-f", "name=v") == (
        "Error: VM 'v' is stopped, not running"
    )


# --- several VMs -------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_concurrent_starts_reach_each_other_and_one_failure_spares_the_rest(node: Node) -> None:
    cgroups = _lxc_cgroups()
    for i in range(2, 5):
        node.cli.run("vm", "add", f"name=v{i}", "user=u", "osf=o")
    node.cli.run("config", "set", "vm.lifecycle.parallel=4")
    # v3 cannot start: its mountpoint holds a stray file (checked before mounting).
    stray = _paths(node, vm_id=3)["rootfs"]
    stray.mkdir(parents=True)
    (stray / "stray").write_text("x")
    result = node.cli.run("vm", "start", "-f", "name=v*", check=False)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"Error: cannot start VM 'v3': preparing the mountpoint failed: {stray} is not empty;"
        " its overlay is kept as deleteme-1-3-overlayfs"
    ]
    assert sorted(result.stdout.splitlines()) == ["VM v started", "VM v2 started", "VM v4 started"]
    table = {r["Name"]: r for r in node.cli.json("vm", "list")}
    assert {n: r["State"] for n, r in table.items()} == {
        "v": "running", "v2": "running", "v3": "stopped", "v4": "running",
    }
    assert node.veths() == {"qvd1", "qvd2", "qvd4"}
    for other in ("v2", "v4"):
        assert node.exec("v", f"ping -c1 -W2 {table[other]['Ip']}").returncode == 0
    node.cli.run("vm", "stop", "-f", "name=v*", check=False)  # v3 is stopped: one error line
    assert {r["State"] for r in node.cli.json("vm", "list")} == {"stopped"}
    (stray / "stray").unlink()
    node.assert_nothing_left(cgroups)


def _init_uid(node: Node, vm_id: int) -> int:
    """The node uid that VM ``vm_id``'s init runs as."""
    done = node.in_ns("lxc-info", "-P", str(node.lxcpath), "-n", f"qvd-{vm_id}", "-p", "-H")
    status = processes.status(int(done.stdout))
    return int(status["Uid"].split()[0])


@pytest.mark.timeout(180)
@pytest.mark.parametrize("isolated", ["1", "0"])
def test_each_vm_has_an_id_range_of_its_own_unless_told_otherwise(
    node: Node, isolated: str
) -> None:
    node.cli.run("config", "set", f"vm.lxc.idmap.isolated={isolated}")
    node.cli.run("vm", "add", "name=v2", "user=u", "osf=o")
    node.cli.run("vm", "start", "-f", "name=v*")
    try:
        uids = [_init_uid(node, vm_id) for vm_id in (1, 2)]
        assert uids == ([1_000_000, 1_065_536] if isolated == "1" else [1_000_000] * 2)
        # Whatever the range, the overlay holds the ids the container meant.
        assert node.exec("v2", "echo x > /root/f && chown 1000:1000 /root/f").returncode == 0
        st = (_paths(node, vm_id=2)["overlay"] / "root" / "f").stat()
        assert (st.st_uid, st.st_gid) == (1000, 1000)
    finally:
        node.cli.run("vm", "stop", "-f", "name=v*")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ten_vms_started_together(node: Node) -> None:
    """Ten VMs in one ``vm start`` (``vm.lifecycle.parallel=10``); prints the time taken."""
    cgroups = _lxc_cgroups()
    for i in range(2, 11):
        node.cli.run("vm", "add", f"name=v{i}", "user=u", "osf=o")
    node.cli.run("config", "set", "vm.lifecycle.parallel=10")
    started = time.monotonic()
    node.cli.run("vm", "start", "-f", "name=v*", timeout=300)
    elapsed = time.monotonic() - started
    print(f"vm start of 10 VMs: {elapsed:.2f} s")
    try:
        assert [r["State"] for r in node.cli.json("vm", "list")] == ["running"] * 10
        assert len(node.veths()) == 10
    finally:
        node.cli.run("vm", "stop", "-f", "name=v*", timeout=300)
    node.assert_nothing_left(cgroups)


# --- each failure path leaves nothing behind ------------------------------------------


def _assert_failed_cleanly(node: Node, error: str, step: str, cgroups: set[Path]) -> None:
    assert error.startswith(f"Error: cannot start VM 'v': {step} failed: "), error
    row = node.cli.vm("v")
    assert (row["State"], row["Host"]) == ("stopped", None)
    node.assert_nothing_left(cgroups)


@pytest.mark.timeout(120)
def test_missing_image(node: Node) -> None:
    cgroups = _lxc_cgroups()
    (node.root / "images" / IMAGE).unlink()
    error = node.cli.fails("vm", "start", "-f", "name=v")
    _assert_failed_cleanly(node, error, "extracting the image", cgroups)
    # It failed before preparing the overlay: there is none to keep.
    assert not (node.root / "overlayfs" / "deleteme-1-1-overlayfs").exists()


@pytest.mark.timeout(120)
def test_corrupt_image(node: Node) -> None:
    cgroups = _lxc_cgroups()
    image = node.root / "images" / IMAGE
    data = bytearray(image.read_bytes())
    data[len(data) // 2:] = b"\0" * (len(data) - len(data) // 2)
    image.write_bytes(bytes(data))
    error = node.cli.fails("vm", "start", "-f", "name=v")
    _assert_failed_cleanly(node, error, "extracting the image", cgroups)
    assert not (node.root / "basefs" / ".images" / IMAGE).exists()


@pytest.mark.timeout(120)
def test_mount_failure(node: Node) -> None:
    cgroups = _lxc_cgroups()
    node.cli.run("config", "set", "vm.lxc.unionfs.type=unionfs-fuse",
                 "command.unionfs-fuse=/bin/false", "vm.lxc.unprivileged=0")
    error = node.cli.fails("vm", "start", "-f", "name=v")
    _assert_failed_cleanly(node, error, "mounting the root", cgroups)
    assert error.endswith("its overlay is kept as deleteme-1-1-overlayfs")
    assert (node.root / "overlayfs" / "deleteme-1-1-overlayfs").is_dir()
    assert not _paths(node)["overlay"].exists()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["unionfs-fuse", "overlayfs"])
def test_a_union_that_cannot_be_idmapped_is_refused_for_an_unprivileged_vm(
    node: Node, kind: str
) -> None:
    node.cli.run("config", "set", f"vm.lxc.unionfs.type={kind}")
    cgroups = _lxc_cgroups()
    error = node.cli.fails("vm", "start", "-f", "name=v")
    assert error == (
        f"Error: vm.lxc.unionfs.type={kind} cannot give an unprivileged container its root; "
        "use qvdfs or set vm.lxc.unprivileged=0"
    )
    assert node.state("v") == "stopped"
    assert sorted(p.name for p in (node.root / "overlayfs").iterdir()) == []
    node.assert_nothing_left(cgroups)


@pytest.mark.timeout(120)
def test_lxc_start_failure(node: Node, no_init_tarball: Path) -> None:
    cgroups = _lxc_cgroups()
    node.cli.run("osf", "add", "name=broken")
    node.cli.run("di", "add", f"path={no_init_tarball}", "osf=broken")
    node.cli.run("vm", "del", "-f", "name=v")
    node.cli.run("vm", "add", "name=v", "user=u", "osf=broken")  # VM 2, DI 2
    error = node.cli.fails("vm", "start", "-f", "name=v")
    _assert_failed_cleanly(node, error, "starting the container", cgroups)
    assert "/sbin/init" in error  # liblxc's own reason
    assert error.endswith("its overlay is kept as deleteme-2-2-overlayfs")
    assert (node.root / "overlayfs" / "deleteme-2-2-overlayfs").is_dir()


@pytest.mark.timeout(120)
def test_network_failure(node: Node) -> None:
    cgroups = _lxc_cgroups()
    with IPRoute(netns=node.netns) as ipr:  # a link with the bridge's name, not a bridge
        ipr.link("add", ifname=BRIDGE, kind="veth", peer="tpeer0")
    error = node.cli.fails("vm", "start", "-f", "name=v")
    _assert_failed_cleanly(node, error, "setting up the network", cgroups)
    assert "is a veth, not a bridge" in error
    assert error.endswith("its overlay is kept as deleteme-1-1-overlayfs")
    assert BRIDGE in node.links()  # the admin's link is left alone
    with IPRoute(netns=node.netns) as ipr:
        ipr.link("del", ifname=BRIDGE)


@pytest.mark.timeout(120)
def test_a_failed_start_whose_cleanup_fails_is_a_zombie_until_stop_succeeds(node: Node) -> None:
    """A bridge squatting the VM's veth name: liblxc cannot make the veth, and the
    cleanup refuses to delete a link that is not a veth, so the VM is left a zombie."""
    cgroups = _lxc_cgroups()
    with IPRoute(netns=node.netns) as ipr:
        ipr.link("add", ifname="qvd1", kind="bridge")
    error = node.cli.fails("vm", "start", "-f", "name=v")
    assert error.startswith("Error: cannot start VM 'v': starting the container failed: ")
    assert "refusing to delete network link 'qvd1'" in error
    assert error.endswith("it is now a zombie (vm stop retries the cleanup)")
    assert node.state("v") == "zombie"
    # Nothing under a container that may still run was touched: root mounted, overlay kept.
    assert mounts_under(_paths(node)["rootfs"]) == [str(_paths(node)["rootfs"])]
    assert _paths(node)["overlay"].is_dir()
    assert "zombie" in node.cli.fails("vm", "stop", "-f", "name=v")  # still refused
    assert node.state("v") == "zombie"
    with IPRoute(netns=node.netns) as ipr:  # the admin removes the squatter
        ipr.link("del", ifname="qvd1")
    node.cli.run("vm", "stop", "-f", "name=v")
    assert node.state("v") == "stopped"
    node.assert_nothing_left(cgroups)


# --- overlays ------------------------------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize("persistent", ["0", "1"])
def test_overlay_across_sessions(node: Node, persistent: str) -> None:
    node.cli.run("config", "set", f"vm.overlay.persistent={persistent}")
    p = _paths(node)
    node.cli.run("vm", "start", "-f", "name=v")
    assert node.exec("v", "echo first > /root/session; echo h > /home/h").returncode == 0
    node.cli.run("vm", "stop", "-f", "name=v")
    node.cli.run("vm", "start", "-f", "name=v")
    try:
        kept = node.exec("v", "cat /root/session").stdout
        assert node.exec("v", "cat /home/h").stdout == "h\n"  # homes always persist
    finally:
        node.cli.run("vm", "stop", "-f", "name=v")
    aside = node.root / "overlayfs" / "deleteme-1-1-overlayfs"
    if persistent == "1":
        assert kept == "first\n"
        assert not aside.exists()
    else:
        assert kept == ""
        assert (aside / "root" / "session").read_text() == "first\n"
        assert not (p["overlay"] / "root" / "session").exists()


# --- reconciliation with liblxc ---------------------------------------------------------


@pytest.mark.timeout(120)
def test_list_shows_a_container_stopped_from_outside_and_stop_cleans_it(node: Node) -> None:
    cgroups = _lxc_cgroups()
    node.cli.run("vm", "start", "-f", "name=v")
    done = node.in_ns("lxc-stop", "-P", str(node.lxcpath), "-n", "qvd-1", "-k")
    assert done.returncode == 0, done.stderr
    assert node.state("v") == "zombie"
    assert mounts_under(_paths(node)["rootfs"]) != []  # list itself cleans nothing up
    node.cli.run("vm", "stop", "-f", "name=v")
    assert node.state("v") == "stopped"
    node.assert_nothing_left(cgroups)


def _in_pid_namespace_of(pid: int) -> list[int]:
    """Every process in the PID namespace whose init is ``pid``."""
    wanted = os.readlink(f"/proc/{pid}/ns/pid")
    members = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.readlink(f"/proc/{entry}/ns/pid") == wanted:
                members.append(int(entry))
        except OSError:
            continue  # gone meanwhile, or not ours to look at (this machine's pid 1)
    return members


@pytest.mark.timeout(120)
def test_a_fence_kills_an_unprivileged_vm_at_once_and_stop_cleans_it(node: Node) -> None:
    """What a fleet node's fence does when its lease runs out (qvdctl/fleet/fence.py), on
    this suite's default VM: unprivileged, on a qvdfs root, in its own user namespace."""
    cgroups = _lxc_cgroups()
    node.cli.run("vm", "start", "-f", "name=v")
    (init,) = fence.container_inits(node.lxcpath)
    inside = _in_pid_namespace_of(init)
    assert init in inside and len(inside) > 1  # busybox's init has children
    killed_at = time.monotonic()
    assert fence.kill_containers(node.lxcpath) == ["qvd-1"]
    assert processes.wait_gone(inside, timeout=10)  # the whole namespace goes with its init
    assert time.monotonic() - killed_at < 2
    until_gone = time.monotonic() + 10
    while lxc_monitors(node.lxcpath) and time.monotonic() < until_gone:
        time.sleep(0.05)
    assert lxc_monitors(node.lxcpath) == []  # liblxc saw its container stop
    assert fence.kill_containers(node.lxcpath) == []
    assert node.state("v") == "zombie"
    node.cli.run("vm", "stop", "-f", "name=v")
    node.assert_nothing_left(cgroups)


@pytest.mark.timeout(120)
def test_list_from_another_namespace_does_not_mistake_a_running_vm(node: Node) -> None:
    """liblxc answers STOPPED outside the starting namespace; the monitor decides."""
    node.cli.run("vm", "start", "-f", "name=v")
    try:
        assert Cli(node.root).vm("v")["State"] == "running"  # the host's namespace
    finally:
        node.cli.run("vm", "stop", "-f", "name=v")


@pytest.mark.timeout(120)
def test_list_shows_a_vm_whose_union_daemon_died_and_stop_cleans_it(node: Node) -> None:
    cgroups = _lxc_cgroups()
    p = _paths(node)
    node.cli.run("vm", "start", "-f", "name=v")
    daemons = daemon_pids(p["rootfs"])
    assert len(daemons) == 1, daemons
    os.kill(daemons[0], 9)
    processes.wait_gone(daemons, timeout=10)
    assert node.state("v") == "zombie"
    node.cli.run("vm", "stop", "-f", "name=v")
    assert node.state("v") == "stopped"
    node.assert_nothing_left(cgroups)


@pytest.mark.timeout(120)
def test_concurrent_cli_starts_of_different_vms(node: Node) -> None:
    """Separate ``vm start`` processes at once, as several admins or scripts would."""
    for i in range(2, 4):
        node.cli.run("vm", "add", f"name=v{i}", "user=u", "osf=o")
    names = ["v", "v2", "v3"]
    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        results = list(pool.map(
            lambda n: node.cli.run("vm", "start", "-f", f"name={n}", check=False), names))
    try:
        assert [r.returncode for r in results] == [0, 0, 0], [r.stderr for r in results]
        assert [r["State"] for r in node.cli.json("vm", "list")] == ["running"] * 3
    finally:
        node.cli.run("vm", "stop", "-f", "name=v*")
