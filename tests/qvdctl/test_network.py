"""The network layer, inside network namespaces the tests create; never the host's links.

Code that touches links runs in a child process entered into the test's namespace
(``sandbox.netns_argv``), which prints one JSON line of results for the test to check.
Each namespace is deleted in a ``finally``; its bridge and veths go with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from qvdctl.network.addresses import gateway_cidr, mac_for_ip, prefix_length, veth_name
from qvdproc.mountinfo import mounts_under
from tests.support import REPO
from tests.support.mounts import NODE_OPTIONS, force_unmount, qvdfs_mount
from tools.sandbox import netns_argv, scratch_netns


def run_in_netns(ns: str, code: str, *args: str, timeout: float = 90) -> dict:
    """Run Python ``code`` inside namespace ``ns``; return the JSON its last line prints."""
    done = subprocess.run(
        netns_argv(ns, [sys.executable, "-c", textwrap.dedent(code), *args]),
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def netns() -> Iterator[str]:
    with scratch_netns("qvdtest") as name:
        yield name


def _links(ns: str) -> dict[str, str]:
    """name -> kind of every link in ``ns``, as ``ip`` sees it from outside."""
    out = subprocess.run(
        ["ip", "-n", ns, "-d", "-j", "link", "show"], capture_output=True, text=True, check=True
    ).stdout
    return {
        link["ifname"]: link.get("linkinfo", {}).get("info_kind", "") for link in json.loads(out)
    }


# --- addresses -----------------------------------------------------------------------


def test_mac_for_ip() -> None:
    assert mac_for_ip("172.20.127.254") == "54:52:00:14:7f:fe"
    assert mac_for_ip("10.0.0.1") == "54:52:00:00:00:01"
    assert mac_for_ip("192.168.5.10") == "54:52:00:a8:05:0a"
    with pytest.raises(ValueError):
        mac_for_ip("10.0.0.256")
    with pytest.raises(ValueError):
        mac_for_ip("fe80::1")


def test_names_and_masks() -> None:
    assert veth_name(7) == "qvd7"
    with pytest.raises(ValueError):
        veth_name(10**13)
    assert prefix_length("255.255.255.0") == 24
    assert prefix_length("16") == 16
    assert gateway_cidr("10.1.2.1", "255.255.0.0") == "10.1.2.1/16"
    for bad in ("255.0.255.0", "33", "x"):
        with pytest.raises(ValueError):
            prefix_length(bad)


# --- links in a namespace ------------------------------------------------------------

_BRIDGE_CODE = """
import json, sys
from qvdctl.network.links import NetworkError, ensure_bridge, link_kind, remove_veth
from pyroute2 import IPRoute
out = {}
out["created"] = ensure_bridge("qvdbr", "10.213.1.1/24")
out["again"] = ensure_bridge("qvdbr", "10.213.1.1/24")
out["kind"] = link_kind("qvdbr")
with IPRoute() as ipr:
    ipr.link("add", ifname="qvd5", kind="veth", peer="qvd5p")
    i = ipr.link_lookup(ifname="qvdbr")[0]
    out["addrs"] = sorted(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
                          for a in ipr.addr("dump", index=i, family=2))
    out["up"] = bool(ipr.link("get", index=i)[0]["flags"] & 1)
try:
    ensure_bridge("qvd5", "10.213.1.1/24")
except NetworkError as e:
    out["not_bridge"] = str(e)
try:
    remove_veth("qvdbr")
except NetworkError as e:
    out["not_veth"] = str(e)
try:
    ensure_bridge("qvdbr2", "10.213.1.300/24")
except NetworkError as e:
    out["bad_addr"] = str(e)
out["removed"] = remove_veth("qvd5")
out["removed_again"] = remove_veth("qvd5")
out["peer_gone"] = link_kind("qvd5p") is None
print(json.dumps(out))
"""


@pytest.mark.timeout(60)
def test_bridge_and_veth_in_a_namespace(netns: str) -> None:
    out = run_in_netns(netns, _BRIDGE_CODE)
    assert out["created"] is True and out["again"] is False
    assert out["kind"] == "bridge"
    assert out["addrs"] == ["10.213.1.1/24"]
    assert out["up"] is True
    assert "not a bridge" in out["not_bridge"] and "veth" in out["not_bridge"]
    assert "not a VM's veth" in out["not_veth"]
    assert "invalid gateway" in out["bad_addr"]
    assert out["removed"] is True and out["removed_again"] is False and out["peer_gone"]
    # Seen from outside: the bridge is there and nothing else was created.
    assert _links(netns) == {"lo": "", "qvdbr": "bridge"}


# --- two containers on one bridge ----------------------------------------------------

_TWO_VMS_CODE = """
import json, sys, time
from pathlib import Path
import trio
from qvdctl.container.config import ContainerSpec
from qvdctl.container.launch import LaunchError, halt, launch
from qvdctl.container.runtime import exec_in
from qvdctl.network.links import link_kind

args = json.loads(sys.argv[1])
lxcpath = Path(args["lxcpath"])
net = args["net"]
specs = [
    ContainerSpec.for_vm(
        vm_id=vm_id, vm_name=f"vm{vm_id}", rootfs=Path(root), ip=f"{net}.{host}",
        netmask="255.255.255.0", gateway=f"{net}.1", bridge="qvdnet",
    )
    for vm_id, root, host in args["vms"]
]
out = {}

async def ping(spec, target):
    done = await exec_in(spec.name, ["ping", "-c1", "-W2", target], lxcpath)
    return done.returncode

async def main():
    try:
        started = time.monotonic()
        async with trio.open_nursery() as nursery:
            for spec in specs:
                nursery.start_soon(launch, spec, lxcpath)
        out["start_seconds"] = time.monotonic() - started
        a, b = specs
        out["veths"] = {s.network.veth_pair: link_kind(s.network.veth_pair) for s in specs}
        out["a_to_b"] = await ping(a, str(b.network.address.ip))
        out["b_to_a"] = await ping(b, str(a.network.address.ip))
        out["a_to_gw"] = await ping(a, str(a.network.gateway))
        out["b_to_gw"] = await ping(b, str(b.network.gateway))
        shown = await exec_in(a.name, ["cat", "/sys/class/net/eth0/address"], lxcpath)
        out["mac"] = shown.stdout.decode().strip()
        route = await exec_in(a.name, ["ip", "route"], lxcpath)
        out["route"] = route.stdout.decode()
    finally:
        for spec in specs:
            await halt(spec.name, spec.veth, lxcpath, timeout=10)
    out["veths_after"] = {s.network.veth_pair: link_kind(s.network.veth_pair) for s in specs}

trio.run(main)
print(json.dumps(out))
"""


@pytest.fixture
def two_roots(tmp_path: Path, rootfs: Path) -> Iterator[list[Path]]:
    """Two busybox roots, each mounted by qvdfs with the node's command line."""
    with contextlib.ExitStack() as stack:
        roots = []
        for i in range(2):
            overlay, mnt = tmp_path / f"overlay{i}", tmp_path / f"root{i}"
            overlay.mkdir()
            mnt.mkdir()
            roots.append(stack.enter_context(
                qvdfs_mount(f"{overlay}=RW:{rootfs}=RO", mnt, *NODE_OPTIONS)
            ))  # fmt: skip
        yield roots


def _cleanup_containers(ns: str, lxcpath: Path) -> None:
    """Stop whatever a failed test left in ``lxcpath``; from inside ``ns``, where its socket is."""
    for entry in lxcpath.iterdir() if lxcpath.exists() else ():
        subprocess.run(
            netns_argv(ns, ["lxc-stop", "-P", str(lxcpath), "-n", entry.name, "-k"]),
            capture_output=True, timeout=30,
        )  # fmt: skip


@pytest.mark.timeout(120)
def test_two_vms_reach_each_other_and_the_gateway(
    netns: str, two_roots: list[Path], tmp_path: Path
) -> None:
    lxcpath = tmp_path / "lxc"
    lxcpath.mkdir()
    net = f"10.213.{random.randint(2, 250)}"
    base_id = random.randint(1000, 9000)
    args = {
        "lxcpath": str(lxcpath),
        "net": net,
        "vms": [[base_id, str(two_roots[0]), 254], [base_id + 1, str(two_roots[1]), 253]],
    }
    try:
        out = run_in_netns(netns, _TWO_VMS_CODE, json.dumps(args))
    finally:
        _cleanup_containers(netns, lxcpath)
    a, b = f"qvd{base_id}", f"qvd{base_id + 1}"
    assert out["veths"] == {a: "veth", b: "veth"}
    assert (out["a_to_b"], out["b_to_a"], out["a_to_gw"], out["b_to_gw"]) == (0, 0, 0, 0)
    assert out["mac"] == mac_for_ip(f"{net}.254")
    assert f"default via {net}.1" in out["route"]
    assert out["veths_after"] == {a: None, b: None}
    # Nothing left in the namespace but its bridge, and nothing left in the lxcpath.
    assert _links(netns) == {"lo": "", "qvdnet": "bridge"}
    assert list(lxcpath.iterdir()) == []


_FAILURES_CODE = """
import json, sys
from pathlib import Path
import trio
from pyroute2 import IPRoute
from qvdctl.container.config import ContainerSpec
from qvdctl.container.launch import LaunchError, launch
from qvdctl.container.runtime import state
from qvdctl.network.links import link_kind

args = json.loads(sys.argv[1])
lxcpath = Path(args["lxcpath"])
out = {}

def spec(vm_id, root, bridge):
    return ContainerSpec.for_vm(
        vm_id=vm_id, vm_name="v", rootfs=Path(root), ip="10.213.0.20",
        netmask="255.255.255.0", gateway="10.213.0.1", bridge=bridge,
    )

async def attempt(key, s):
    try:
        await launch(s, lxcpath)
        out[key] = "started"
    except LaunchError as e:
        out[key] = [e.step, str(e)]
    out[key + "_state"] = await state(s.name, lxcpath)
    out[key + "_veth"] = link_kind(s.network.veth_pair)

async def main():
    # The bridge name is taken by a veth: the network step fails, before any config.
    with IPRoute() as ipr:
        ipr.link("add", ifname="qvdbusy", kind="veth", peer="qvdbusyp")
    await attempt("network", spec(args["id"], args["root"], "qvdbusy"))
    # The network is fine but the root has no init: the start fails, the veth goes.
    await attempt("start", spec(args["id"] + 1, args["empty"], "qvdnet"))

trio.run(main)
print(json.dumps(out))
"""


@pytest.mark.timeout(90)
def test_failures_leave_no_container_and_no_veth(
    netns: str, two_roots: list[Path], tmp_path: Path
) -> None:
    lxcpath = tmp_path / "lxc"
    lxcpath.mkdir()
    empty = tmp_path / "empty"
    empty.mkdir()
    vm_id = random.randint(1000, 9000)
    args = {"lxcpath": str(lxcpath), "id": vm_id, "root": str(two_roots[0]), "empty": str(empty)}
    try:
        out = run_in_netns(netns, _FAILURES_CODE, json.dumps(args))
    finally:
        _cleanup_containers(netns, lxcpath)
    step, message = out["network"]
    assert step == "network" and "not a bridge" in message
    assert out["network_state"] == "ABSENT" and out["network_veth"] is None
    step, message = out["start"]
    assert step == "start" and f"qvd-{vm_id + 1}" in message and "\n" not in message
    assert out["start_state"] == "ABSENT" and out["start_veth"] is None
    assert list(lxcpath.iterdir()) == []
    assert _links(netns) == {"lo": "", "qvdbusy": "veth", "qvdbusyp": "veth", "qvdnet": "bridge"}


_SEAM_CODE = """
import json, sys
from pathlib import Path
from qvdctl.container import seam
from qvdctl.network.links import link_kind

args = json.loads(sys.argv[1])
settings = {
    "vm.network.bridge": "qvdnet", "vm.network.netmask": "255.255.255.0",
    "vm.network.gateway": "10.213.0.1", "vm.stop.timeout": "10",
    "vm.lxc.lxcpath": args["lxcpath"], "vm.lxc.unprivileged": "0",
}
vm_id = args["id"]
out = {}
out["pid"] = seam.start_vm_container(
    vm_id=vm_id, vm_name="Seam VM", ip="10.213.0.254", rootfs=Path(args["root"]),
    home=Path(args["home"]), memory_mb=128, halt_signal="SIGUSR2", settings=settings,
)
out["states"] = seam.vm_container_states(settings=settings)
done = seam.exec_in_vm(vm_id, ["sh", "-c", "echo hi > /home/h; ping -c1 -W2 10.213.0.1"],
                       settings=settings)
out["exec"] = done.returncode
out["veth"] = link_kind(f"qvd{vm_id}")
out["clean"] = seam.stop_vm_container(vm_id=vm_id, settings=settings)
out["again"] = seam.stop_vm_container(vm_id=vm_id, settings=settings)
out["states_after"] = seam.vm_container_states(settings=settings)
out["veth_after"] = link_kind(f"qvd{vm_id}")
try:
    seam.start_vm_container(
        vm_id=vm_id, vm_name="x", ip="10.213.0.254", rootfs=Path(args["root"]), home=None,
        memory_mb=None, halt_signal="SIGUSR2", settings={**settings, "vm.network.gateway": ""},
    )
except Exception as exc:
    out["no_gateway"] = str(exc)
print(json.dumps(out))
"""


@pytest.mark.timeout(90)
def test_seam_for_the_lifecycle(netns: str, two_roots: list[Path], tmp_path: Path) -> None:
    lxcpath = tmp_path / "lxc"
    lxcpath.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    vm_id = random.randint(1000, 9000)
    args = {"lxcpath": str(lxcpath), "id": vm_id, "root": str(two_roots[0]), "home": str(home)}
    try:
        out = run_in_netns(netns, _SEAM_CODE, json.dumps(args))
    finally:
        _cleanup_containers(netns, lxcpath)
    assert out["pid"] > 0
    assert out["states"] == {str(vm_id): "RUNNING"}
    assert out["exec"] == 0 and out["veth"] == "veth"
    assert out["clean"] is True and out["again"] is True
    assert out["states_after"] == {} and out["veth_after"] is None
    assert "vm.network.gateway is not set" in out["no_gateway"]
    assert (home / "h").read_text() == "hi\n"
    assert list(lxcpath.iterdir()) == []


@pytest.mark.timeout(60)
def test_mounts_made_in_the_namespace_reach_the_host(netns: str, tmp_path: Path) -> None:
    """The sandbox's point: a mount made by a command in the namespace is the host's too,
    and a later command there sees it; the namespace's /sys shows its own links."""
    from tools.sandbox import shared_mount

    root = tmp_path / "storage"
    (root / "src").mkdir(parents=True)
    (root / "mnt").mkdir()
    (root / "src" / "file").write_text("through the bind\n")
    with shared_mount(root):
        try:
            subprocess.run(
                netns_argv(netns, ["mount", "--bind", str(root / "src"), str(root / "mnt")]),
                check=True, timeout=30,
            )  # fmt: skip
            assert (root / "mnt" / "file").read_text() == "through the bind\n"
            later = subprocess.run(
                netns_argv(netns, ["sh", "-c", f"cat {root}/mnt/file; ls /sys/class/net"]),
                capture_output=True, text=True, check=True, timeout=30,
            ).stdout  # fmt: skip
            assert later.split() == ["through", "the", "bind", "lo"]
            subprocess.run(["umount", str(root / "mnt")], check=True)
            gone = subprocess.run(
                netns_argv(netns, ["ls", str(root / "mnt")]),
                capture_output=True, text=True, check=True, timeout=30,
            ).stdout  # fmt: skip
            assert gone == ""
        finally:
            force_unmount(root / "mnt")
    assert mounts_under(root) == []


@pytest.mark.timeout(60)
def test_entering_leaves_a_shared_hosts_sysfs_alone(netns: str) -> None:
    """On hosts with shared mounts (systemd), entering must not replace the host's
    /sys/class/net with the namespace's view. Simulated in a throwaway mount namespace
    made rshared, so this machine's own mounts are not touched."""
    import shlex

    host_links = sorted(os.listdir("/sys/class/net"))
    script = (
        "mount --make-rshared / && "
        f"{shlex.join(netns_argv(netns, ['ls', '/sys/class/net']))} && "
        "echo outer && ls /sys/class/net"
    )
    out = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout.split()  # fmt: skip
    inner, outer = out[: out.index("outer")], out[out.index("outer") + 1 :]
    assert inner == ["lo"]
    assert sorted(outer) == host_links
