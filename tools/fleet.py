"""A fleet on this machine, for the tests, ``make bench-fleet`` and ``make chaos``: HKDs,
each with its own nodename, storage root, lxcpath and network namespace, on one
PostgreSQL, and an admin CLI as a third process; and an ``Observer`` of which node runs
each VM.

With a ``DbNetwork`` (``fleet_database``), the PostgreSQL runs in a network namespace
of its own and each node reaches it over TCP through a veth, so that one node can be cut
off from it and healed; without, the nodes use the server's Unix socket.

Images live on "shared storage" (one ``path.storage.images`` set globally for every
node, as SPEC §6 has it); everything else is per node, from each node's node.conf.
Everything a fleet made is undone by ``close``: HKDs killed, containers stopped in
the nodes' lxcpaths, mounts under the fleet's folder unmounted, namespaces removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from qvdctl.container.query import monitors
from qvdproc import processes
from qvdproc.mountinfo import mounts_under
from tests.support.postgres import PgServer, pg_server
from tools.cli import Cli
from tools.imagebuild import build_busybox_rootfs, build_image_tarball
from tools.sandbox import QVDCTL, create_netns, force_unmount, netns_argv, remove_netns

# On PYTHONPATH, it sets the wall clock of an HKD (and its fence) off (see its docstring).
SKEWED_CLOCK = Path(__file__).parent / "skewed_clock"
NET = "10.219.77"  # only ever configured inside each node's own namespace
BRIDGE = "qvdfleet0"
# The database's network: its bridge in the database's namespace, one veth per node.
DB_NET = "10.219.78"
DB_ADDRESS = f"{DB_NET}.1"
DB_BRIDGE = "qvddb0"
DB_LINK = "qvddb"  # each node's end of its veth to the database
PARTITION = "qvd_partition"  # the nftables table of a cut, in both namespaces


class DbNetwork:
    """A network namespace for the fleet's database, linked to each node's namespace.

    ``cut`` partitions a node from the database: an nftables table in each of the two
    namespaces drops every packet arriving from the other side. Nothing is closed or
    refused: connections stay open and packets vanish, as when a switch or a cable
    between them fails (a drop on the way *out* would fail the sender's calls at once
    with EPERM, which a real partition does not do). ``heal`` removes both tables.
    Only namespaces made here are touched; ``close`` removes the database's (and with
    it the veths).
    """

    def __init__(self) -> None:
        self.netns = f"qvdfleet-db-{secrets.token_hex(4)}"
        self.addresses: dict[str, str] = {}  # node namespace -> its address
        create_netns(self.netns)
        try:
            with IPRoute(netns=self.netns) as ipr:
                ipr.link("add", ifname=DB_BRIDGE, kind="bridge")
                (bridge,) = ipr.link_lookup(ifname=DB_BRIDGE)
                ipr.addr("add", index=bridge, address=DB_ADDRESS, prefixlen=24)
                ipr.link("set", index=bridge, state="up")
        except BaseException:
            remove_netns(self.netns)
            raise

    def attach(self, netns: str) -> str:
        """Link namespace ``netns`` to the database's; the address it has there."""
        number = len(self.addresses) + 2
        address = f"{DB_NET}.{number}"
        peer = f"{DB_LINK}{number}"
        with IPRoute(netns=netns) as ipr:
            ipr.link("add", ifname=DB_LINK, kind="veth", peer=peer)
            (mine,) = ipr.link_lookup(ifname=DB_LINK)
            ipr.link("set", index=ipr.link_lookup(ifname=peer)[0], net_ns_fd=self.netns)
            ipr.addr("add", index=mine, address=address, prefixlen=24)
            ipr.link("set", index=mine, state="up")
        with IPRoute(netns=self.netns) as ipr:
            (theirs,) = ipr.link_lookup(ifname=peer)
            ipr.link("set", index=theirs, master=ipr.link_lookup(ifname=DB_BRIDGE)[0],
                     state="up")
        self.addresses[netns] = address
        return address

    def cut(self, netns: str) -> None:
        """Drop every packet between namespace ``netns`` and the database, both ways."""
        _nft(netns, _drop_from(f"{DB_NET}.0/24"))
        _nft(self.netns, _drop_from(self.addresses[netns]))

    def heal(self, netns: str) -> None:
        """Undo ``cut``."""
        for where in (netns, self.netns):
            _nft(where, f"delete table inet {PARTITION}\n")

    def close(self) -> None:
        remove_netns(self.netns)


def _drop_from(source: str) -> str:
    return (f"table inet {PARTITION} {{\n  chain input {{\n"
            "    type filter hook input priority 0; policy accept;\n"
            f"    ip saddr {source} drop\n  }}\n}}\n")


def _nft(netns: str, ruleset: str) -> None:
    subprocess.run(["nsenter", f"--net=/run/netns/{netns}", "nft", "-f", "-"],
                   input=ruleset, text=True, check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def fleet_database() -> Iterator[tuple[PgServer, DbNetwork]]:
    """A PostgreSQL in a ``DbNetwork``'s namespace, listening there on ``DB_ADDRESS``
    (and on its socket, for the admin); both removed on the way out."""
    network = DbNetwork()
    try:
        with pg_server(network.netns, DB_ADDRESS) as server:
            yield server, network
    finally:
        network.close()


class AdminCli(Cli):
    """``qvdctl --config FILE ...`` from a process on no node at all: its config names
    only the database (on SQLite, the config is what makes the CLI queue commands)."""

    def __init__(self, root: Path, url: str) -> None:
        super().__init__(root)
        root.mkdir(parents=True, exist_ok=True)
        self.conf = root / "admin.conf"
        self.conf.write_text(f"database.url = {url}\n")

    def argv(self, *args: str) -> list[str]:
        return [QVDCTL, "--root", str(self.root), "--config", str(self.conf), *args]

    def hosts(self) -> dict[str, dict[str, Any]]:
        return {row["Name"]: row for row in self.json("host", "list")}

    def vms(self) -> dict[str, dict[str, Any]]:
        return {row["Name"]: row for row in self.json("vm", "list")}


class HkdNode:
    """One node: its folder, node.conf, namespace and (while running) its HKD."""

    def __init__(self, base: Path, name: str, url: str, netns: str) -> None:
        self.name = name
        self.dir = base / name
        self.root = self.dir / "storage"
        self.lxcpath = self.dir / "lxc"
        self.root.mkdir(parents=True)
        self.lxcpath.mkdir()
        self.netns = netns
        self.conf = self.dir / "node.conf"
        self.conf.write_text(
            f"nodename = {name}\n"
            f"database.url = {url}\n"
            f"path.storage.root = {self.root}\n"
            f"vm.lxc.lxcpath = {self.lxcpath}\n"
        )
        self.log = self.dir / "hkd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        # Seconds this node's monotonic and boot-time clocks are ahead of the host's, from
        # its HKD's next start (a time namespace: the HKD, its fence and its containers).
        self.monotonic_offset_s = 0
        self.clock_file = self.dir / "clock-offset"
        self.set_clock_offset(0)
        # Extra environment of the HKD (a test's NOTIFY_SOCKET, as systemd would give it).
        self.env: dict[str, str] = {}

    def set_clock_offset(self, seconds: float) -> None:
        """Set this node's wall clock ``seconds`` off the host's, at once, in the running
        HKD too (a step, as ``date -s`` makes): Python's realtime reads, by
        ``tools/skewed_clock``; the programs the HKD runs keep the host's."""
        partial = self.clock_file.with_suffix(".new")
        partial.write_text(f"{seconds!r}\n")
        partial.rename(self.clock_file)  # never half-written when the HKD reads it

    def clock_offset(self) -> float:
        return float(self.clock_file.read_text())

    def start(self) -> None:
        hkd = [QVDCTL, "--config", str(self.conf), "hkd"]
        if self.monotonic_offset_s:
            # unshare execs it (no fork): the pid stays the HKD's, for signals.
            hkd = ["unshare", "--time", f"--monotonic={self.monotonic_offset_s}",
                   f"--boottime={self.monotonic_offset_s}", *hkd]
        argv = netns_argv(self.netns, hkd)
        skewed = {"PYTHONPATH": str(SKEWED_CLOCK), "QVD_CLOCK_OFFSET_FILE": str(self.clock_file)}
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL,
                                         env=os.environ | skewed | self.env)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        # netns_argv's shell execs the HKD, so this pid is the HKD itself.
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout=timeout)
        self.proc = None
        return code

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def containers(self) -> list[str]:
        return sorted(p.name for p in self.lxcpath.iterdir() if (p / "config").exists())

    def mounts(self) -> list[str]:
        return mounts_under(self.root / "rootfs")

    def in_ns(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(netns_argv(self.netns, list(argv)), capture_output=True,
                              text=True, timeout=60)

    def fences(self) -> list[int]:
        """The pids of this node's fence processes (one, or a dead HKD's still waiting)."""
        return [p.pid for p in processes.with_argument(str(self.lxcpath))
                if b"qvdctl.fleet.fence" in p.argv]

    def close(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(timeout=30)
            self.proc = None
        for pid in self.fences():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for entry in self.lxcpath.iterdir() if self.lxcpath.is_dir() else ():
            self.in_ns("lxc-stop", "-P", str(self.lxcpath), "-n", entry.name, "-k")


class Fleet:
    """Nodes ``names`` on database ``url``, set up with one image, one user and ``vms`` VMs.

    With ``network`` (and a ``server`` started by ``fleet_database``), each node is
    linked to the database's namespace and reaches the server over TCP; the admin
    keeps ``url``.
    """

    def __init__(self, base: Path, url: str, names: tuple[str, ...], *, vms: int,
                 timeout: int = 5, mount_only: bool = True,
                 network: tuple[PgServer, DbNetwork] | None = None) -> None:
        self.base = base
        self.url = url
        self.nodes: dict[str, HkdNode] = {}
        self.network = network[1] if network is not None else None
        node_url = network[0].tcp_url(url) if network is not None else url
        subprocess.run(["mount", "--bind", str(base), str(base)], check=True)
        subprocess.run(["mount", "--make-shared", str(base)], check=True)
        try:
            for name in names:
                netns = f"qvdfleet-{name}-{secrets.token_hex(4)}"  # fleets may coexist
                create_netns(netns)
                if self.network is not None:
                    self.network.attach(netns)
                self.nodes[name] = HkdNode(base, name, node_url, netns)
            self.admin = AdminCli(base / "admin", url)
            staging = base / "admin" / "staging"
            staging.mkdir()
            build_image_tarball(staging / "img.tar.gz", build_busybox_rootfs(base / "image"))
            (base / "shared-images").mkdir()
            self.admin.run(
                # Kernel overlayfs (no daemon per VM) cannot be idmapped: privileged.
                "config", "set", "vm.hypervisor=lxc", "vm.lxc.unionfs.type=overlayfs",
                "vm.lxc.unprivileged=0", f"vm.start.mount_only={int(mount_only)}",
                f"internal.hkd.cluster.node.timeout={timeout}",
                f"path.storage.images={base / 'shared-images'}",
                f"vm.network.bridge={BRIDGE}", f"vm.network.ip.start={NET}.2",
                "vm.network.netmask=24", f"vm.network.gateway={NET}.1", "vm.stop.timeout=5",
            )  # fmt: skip
            self.admin.run("osf", "add", "name=o", "memory=256")
            self.admin.run("di", "add", "path=img.tar.gz", "osf=o")
            self.admin.run("user", "add", "login=u", "password=p")
            for i in range(1, vms + 1):
                self.admin.run("vm", "add", f"name=v{i}", "user=u", "osf=o")
        except BaseException:
            self.close()
            raise

    def start(self, *names: str) -> None:
        for name in names or tuple(self.nodes):
            self.nodes[name].start()
        for name in names or tuple(self.nodes):
            self.until_running(name)

    def cut(self, name: str) -> None:
        """Partition node ``name`` from the database (``DbNetwork.cut``)."""
        assert self.network is not None, "this fleet's nodes use the database's socket"
        self.network.cut(self.nodes[name].netns)

    def heal(self, name: str) -> None:
        assert self.network is not None
        self.network.heal(self.nodes[name].netns)

    def until_running(self, name: str, timeout: float = 60) -> None:
        """Until host ``name`` is registered and ``running`` (reconciled, taking commands)."""
        until(lambda: self.admin.hosts().get(name, {}).get("State") == "running",
              f"host {name} running", timeout)

    def close(self) -> None:
        for node in self.nodes.values():
            node.close()
        for point in mounts_under(self.base):
            if point != str(self.base):
                force_unmount(point)
        subprocess.run(["umount", "-l", str(self.base)], capture_output=True)
        for node in self.nodes.values():
            remove_netns(node.netns)


def until(check: Callable[[], object], what: str, timeout: float, step: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


def stop_hkd(node: HkdNode, signum: int = signal.SIGTERM) -> int:
    node.signal(signum)
    return node.wait()


def parse(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


class Observer:
    """Which node runs each VM, sampled on a thread of its own at least ten times a second.

    Independent of the HKDs and their fences: a VM's container runs on a node while
    liblxc's monitor of it (in that node's lxcpath) has a child, the container's init,
    read from the kernel's ``children`` list. Samples are (``time.monotonic()``,
    container name -> the nodes it runs on).
    """

    PERIOD_S = 0.05

    def __init__(self, nodes: dict[str, HkdNode]) -> None:
        self.by_lxcpath = {node.lxcpath: name for name, node in nodes.items()}
        self.samples: list[tuple[float, dict[str, frozenset[str]]]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="observer", daemon=True)

    def __enter__(self) -> Observer:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._done.is_set():
            at = time.monotonic()
            running: dict[str, set[str]] = {}
            for monitor in monitors():
                node = self.by_lxcpath.get(monitor.lxcpath)
                if node is not None and _has_child(monitor.pid):
                    running.setdefault(monitor.name, set()).add(node)
            self.samples.append((at, {vm: frozenset(n) for vm, n in running.items()}))
            self._done.wait(max(self.PERIOD_S - (time.monotonic() - at), 0))

    def where(self, vm: str) -> frozenset[str]:
        """The nodes ``vm`` ran on at the latest sample."""
        return self.samples[-1][1].get(vm, frozenset()) if self.samples else frozenset()

    def on_two_nodes(self) -> list[tuple[float, str, frozenset[str]]]:
        """Every sample at which a VM ran on more than one node."""
        return [(at, vm, nodes) for at, seen in self.samples for vm, nodes in seen.items()
                if len(nodes) > 1]

    def first(self, vm: str, node: str, after: float) -> float | None:
        """When ``vm`` was first seen on ``node`` after ``after``."""
        return next((at for at, seen in self.samples
                     if at > after and node in seen.get(vm, ())), None)

    def first_elsewhere(self, vm: str, node: str, after: float) -> float | None:
        """When ``vm`` was first seen on a node other than ``node`` after ``after``."""
        return next((at for at, seen in self.samples
                     if at > after and seen.get(vm, frozenset()) - {node}), None)

    def last(self, vm: str, node: str, before: float) -> float | None:
        """When ``vm`` was last seen on ``node`` before ``before``."""
        return next((at for at, seen in reversed(self.samples)
                     if at < before and node in seen.get(vm, ())), None)

    def rate(self) -> float:
        """Samples a second, over the whole watch."""
        if len(self.samples) < 2:
            return 0.0
        return (len(self.samples) - 1) / (self.samples[-1][0] - self.samples[0][0])

    def longest_gap(self) -> float:
        """The longest time between two samples (the observer itself may be starved)."""
        times = [at for at, _ in self.samples]
        return max((b - a for a, b in zip(times, times[1:])), default=0.0)


def _has_child(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return bool(f.read().split())
    except (FileNotFoundError, ProcessLookupError):
        return False
