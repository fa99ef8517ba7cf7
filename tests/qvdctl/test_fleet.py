"""A fleet: two HKDs on one PostgreSQL, driven by the admin CLI from a third process.

Each node has its own nodename, storage root, lxcpath and network namespace; the
image is on storage both see. Most tests run with ``vm.start.mount_only=1`` (a VM is
its mounted root): the point is who starts what, where, and once. The lease timeout
is 5 s (heartbeat 1 s, fencing at 2.5 s), so losing a node takes seconds.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.fleet import AdminCli, Fleet, parse, stop_hkd, until
from tests.support.postgres import PgServer, pg_server, postgres  # noqa: F401 (a fixture)

pytestmark = pytest.mark.timeout(240)

TIMEOUT = 5  # internal.hkd.cluster.node.timeout in these tests


def _two_nodes(server: PgServer, base: Path) -> Iterator[Fleet]:
    f = Fleet(base, server.url(), ("node-a", "node-b"), vms=4, timeout=TIMEOUT)
    try:
        f.start()
        yield f
    finally:
        f.close()


@pytest.fixture(scope="module")
def shared_fleet(postgres: PgServer, tmp_path_factory: pytest.TempPathFactory  # noqa: F811
                 ) -> Iterator[Fleet]:
    yield from _two_nodes(postgres, tmp_path_factory.mktemp("fleet"))


@pytest.fixture
def fleet(shared_fleet: Fleet) -> Iterator[Fleet]:
    """The module's two nodes, every VM stopped and no host blocked between tests."""
    yield shared_fleet
    shared_fleet.admin.run("host", "unblock", "-f", "name=*")
    if any(r["State"] != "stopped" for r in shared_fleet.admin.vms().values()):
        shared_fleet.admin.run("vm", "stop", "-f", "name=*", check=False)
    assert {r["State"] for r in shared_fleet.admin.vms().values()} == {"stopped"}


@pytest.fixture
def own_fleet(postgres: PgServer, tmp_path: Path) -> Iterator[Fleet]:  # noqa: F811
    """Two nodes of the test's own, for tests that kill or stop them."""
    yield from _two_nodes(postgres, tmp_path)


def _placement(fleet: Fleet) -> dict[str, str | None]:
    return {name: row["Host"] for name, row in fleet.admin.vms().items()}


def test_vms_spread_over_both_nodes_and_stop(fleet: Fleet) -> None:
    out = fleet.admin.run("vm", "start", "-f", "name=v*").stdout
    assert sorted(out.splitlines()) == [f"VM v{i} started (root mounted only)" for i in range(1, 5)]
    vms = fleet.admin.vms()
    assert {row["State"] for row in vms.values()} == {"running"}
    hosts = [row["Host"] for row in vms.values()]
    assert sorted(hosts) == ["node-a", "node-a", "node-b", "node-b"]
    for name, node in fleet.nodes.items():
        assert len(node.mounts()) == hosts.count(name)  # each root is on its own node
    listed = fleet.admin.hosts()
    assert [listed[n]["RunningVMs"] for n in ("node-a", "node-b")] == [2, 2]
    assert {listed[n]["State"] for n in ("node-a", "node-b")} == {"running"}
    assert all(0 <= listed[n]["LeaseAge"] < TIMEOUT for n in ("node-a", "node-b"))

    out = fleet.admin.run("vm", "stop", "-f", "name=v*").stdout
    assert sorted(out.splitlines()) == [f"VM v{i} stopped" for i in range(1, 5)]
    assert set(_placement(fleet).values()) == {None}
    assert fleet.nodes["node-a"].mounts() == fleet.nodes["node-b"].mounts() == []


def test_pinning_blocking_and_no_live_host(fleet: Fleet) -> None:
    fleet.admin.run("vm", "start", "-f", "name=v1", "host=node-b")
    assert _placement(fleet)["v1"] == "node-b"
    fleet.admin.run("host", "block", "-f", "name=node-b")
    fleet.admin.run("vm", "start", "-f", "name=v2")
    assert _placement(fleet)["v2"] == "node-a"
    error = fleet.admin.fails("vm", "start", "-f", "name=v3", "host=node-b")
    assert error == "Error: host node-b is blocked"
    fleet.admin.run("host", "block", "-f", "name=node-a")
    started = time.monotonic()
    error = fleet.admin.fails("vm", "start", "-f", "name=v3")
    assert error == "Error: no running, unblocked host to start VMs on (see host list)"
    assert time.monotonic() - started < 5  # at once, not after a wait
    assert fleet.admin.vms()["v3"]["State"] == "stopped"


def test_two_clis_starting_one_vm_start_it_once(fleet: Fleet) -> None:
    claimed = "VM v1 (id 1): claimed start"
    logs_before = "".join(n.log_text() for n in fleet.nodes.values()).count(claimed)
    procs = [subprocess.Popen(fleet.admin.argv("vm", "start", "-f", "name=v1"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=60), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 1], results
    (loser,) = [err for code, _, err in results if code == 1]
    assert "VM 'v1' is" in loser, loser
    host = _placement(fleet)["v1"]
    assert len(fleet.nodes[host].mounts()) == 1
    logs = "".join(node.log_text() for node in fleet.nodes.values())
    assert logs.count(claimed) == 1 + logs_before


def test_no_wait_returns_once_queued(fleet: Fleet) -> None:
    out = fleet.admin.run("--json", "--no-wait", "vm", "start", "-f", "name=v1").stdout
    (msg,) = parse(out)
    assert msg["message"] == f"VM v1 queued on host {msg['host']}"
    until(lambda: fleet.admin.vms()["v1"]["State"] == "running", "v1 running", 30)


def test_config_set_reaches_every_hkd_at_once(fleet: Fleet) -> None:
    fleet.admin.run("config", "set", "vm.lifecycle.parallel=5")
    # The NOTIFY's reload or a heartbeat's, whichever comes first: the one that sees the
    # change logs it, the other finds nothing new. With heartbeats a second apart here,
    # "at once" is within a few heartbeats even on a busy machine.
    seen = re.compile(r"setting vm.lifecycle.parallel is now '5' \((notified|heartbeat)\)")
    until(lambda: all(seen.search(n.log_text()) for n in fleet.nodes.values()),
          "both HKDs to see the setting", 3 * TIMEOUT)


def test_console_and_exec_name_the_host_to_go_to(fleet: Fleet) -> None:
    fleet.admin.run("vm", "start", "-f", "name=v1", "host=node-a")
    error = fleet.admin.fails("vm", "exec", "-f", "name=v1", "--", "true")
    assert error == "Error: VM 'v1' runs on host node-a; run this on node-a"


def test_sigterm_leaves_nothing_running(own_fleet: Fleet) -> None:
    fleet = own_fleet
    fleet.admin.run("vm", "start", "-f", "name=v*")
    for node in fleet.nodes.values():
        assert stop_hkd(node) == 0
        assert node.mounts() == []
    hosts = fleet.admin.hosts()
    assert {hosts[n]["State"] for n in fleet.nodes} == {"stopped"}
    assert {row["State"] for row in fleet.admin.vms().values()} == {"stopped"}
    error = fleet.admin.fails("vm", "start", "-f", "name=v1")
    assert "no running, unblocked host" in error


def _until_lost(admin: AdminCli, host: str) -> None:
    """Until another HKD has marked ``host`` lost and released its VMs.

    ``host list`` shows a host lost as soon as its lease is out of date, but its VMs are
    released at the next heartbeat of another HKD; a quick admin CLI can look in between.
    """
    until(lambda: admin.hosts()[host]["State"] == "lost"
          and all(vm["Host"] != host for vm in admin.vms().values()), f"{host} lost", 3 * TIMEOUT)


def test_a_killed_node_is_lost_and_its_vms_start_elsewhere(own_fleet: Fleet) -> None:
    fleet = own_fleet
    fleet.admin.run("vm", "start", "-f", "name=v1", "host=node-a")
    fleet.admin.run("vm", "start", "-f", "name=v2", "host=node-b")
    a = fleet.nodes["node-a"]
    stop_hkd(a, signal.SIGKILL)
    assert len(a.mounts()) == 1  # a SIGKILL cleans up nothing
    _until_lost(fleet.admin, "node-a")
    vms = fleet.admin.vms()
    assert (vms["v1"]["State"], vms["v1"]["Host"]) == ("stopped", None)
    assert "host node-a was lost" in vms["v1"]["Error"]
    assert (vms["v2"]["State"], vms["v2"]["Host"]) == ("running", "node-b")
    fleet.admin.run("vm", "start", "-f", "name=v1")
    assert _placement(fleet)["v1"] == "node-b"
    # The node comes back: it reconciles (its stale root goes) before it takes commands.
    fleet.start("node-a")
    assert a.mounts() == []
    assert "runs here but not in the database" in a.log_text()


def test_postgresql_stopped_under_a_running_hkd(tmp_path: Path) -> None:
    with pg_server() as server:
        f = Fleet(tmp_path, server.url(), ("node-a",), vms=1, timeout=TIMEOUT)
        try:
            f.start()
            node = f.nodes["node-a"]
            f.admin.run("vm", "start", "-f", "name=v1")
            assert len(node.mounts()) == 1, node.log_text()
            server.stop()
            until(lambda: "fenced: nothing runs" in node.log_text(), "the node to fence",
                  3 * TIMEOUT)
            assert node.mounts() == []
            server.start()
            until(lambda: f.admin.hosts()["node-a"]["State"] == "running", "rejoin", 3 * TIMEOUT)
            until(lambda: f.admin.vms()["v1"]["State"] == "stopped", "v1 cleaned up", 10)
            f.admin.run("vm", "start", "-f", "name=v1")
            assert len(node.mounts()) == 1
            assert stop_hkd(node) == 0
        finally:
            f.close()


@pytest.mark.timeout(300)
def test_real_containers_a_killed_node_returns_with_nothing_left(
    postgres: PgServer, tmp_path: Path,  # noqa: F811
) -> None:
    f = Fleet(tmp_path, postgres.url(), ("node-a", "node-b"), vms=2, timeout=TIMEOUT,
              mount_only=False)
    try:
        f.start()
        a, b = f.nodes["node-a"], f.nodes["node-b"]
        f.admin.run("vm", "start", "-f", "name=v1", "host=node-a")
        f.admin.run("vm", "start", "-f", "name=v2", "host=node-b")
        assert a.containers() == ["qvd-1"] and b.containers() == ["qvd-2"]
        assert "qvd-1" in a.in_ns("lxc-ls", "-P", str(a.lxcpath), "--running").stdout
        stop_hkd(a, signal.SIGKILL)
        assert "qvd-1" in a.in_ns("lxc-ls", "-P", str(a.lxcpath), "--running").stdout
        _until_lost(f.admin, "node-a")
        f.admin.run("vm", "start", "-f", "name=v1")
        assert f.admin.vms()["v1"]["Host"] == "node-b"
        assert b.containers() == ["qvd-1", "qvd-2"]
        f.start("node-a")  # reconciles before it takes commands: v1's old container goes
        assert a.containers() == [] and a.mounts() == []
        assert a.in_ns("lxc-ls", "-P", str(a.lxcpath), "--running").stdout.strip() == ""
        assert stop_hkd(b) == 0  # SIGTERM: its containers stop, its roots unmount
        assert b.containers() == [] and b.mounts() == []
        assert b.in_ns("lxc-ls", "-P", str(b.lxcpath), "--running").stdout.strip() == ""
        assert {row["State"] for row in f.admin.vms().values()} == {"stopped"}
    finally:
        f.close()


def test_an_hkd_on_sqlite_works_by_the_poll(tmp_path: Path) -> None:
    f = Fleet(tmp_path, f"sqlite:///{tmp_path / 'fleet.db'}", ("node-a",), vms=2,
              timeout=TIMEOUT)
    try:
        f.start()
        out = f.admin.run("vm", "start", "-f", "name=v*").stdout
        assert sorted(out.splitlines()) == ["VM v1 started (root mounted only)",
                                            "VM v2 started (root mounted only)"]
        assert len(f.nodes["node-a"].mounts()) == 2
        assert stop_hkd(f.nodes["node-a"]) == 0
        assert f.nodes["node-a"].mounts() == []
    finally:
        f.close()
