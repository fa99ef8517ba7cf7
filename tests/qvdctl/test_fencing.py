"""Fencing under injected faults: a VM never runs on two nodes, whatever happens to an HKD.

Two HKDs on one PostgreSQL run real containers; an ``Observer`` samples, independently
of the HKDs and their fences, which node runs each VM, at least ten times a second. An
HKD is paused (SIGSTOP) for longer than the lease, another is killed (SIGKILL), and the
admin starts the VM elsewhere each time; the checker then requires: no sample with the VM
on two nodes, the VM running elsewhere within the bound the design promises, and the
database and the nodes agreeing at the end.

The bound, from the fault: the lease's age at the fault (at most a heartbeat, T/5) plus
T until it expires on the database's clock, plus the start itself, which on a busy
machine takes a few seconds; hence T/5 + T + START_S.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qvdctl.db import engine
from qvdctl.fleet import lease
from tools.fleet import Fleet, HkdNode, Observer, fleet_database, until
from tools.sandbox import netns_argv, scratch_netns
from tests.support.postgres import PgServer, postgres  # noqa: F401 (a fixture)

pytestmark = pytest.mark.timeout(300)

TIMEOUT = 5  # internal.hkd.cluster.node.timeout
START_S = 15  # a container's start on a loaded machine, with room
BOUND = TIMEOUT / 5 + TIMEOUT + START_S


def _moved(f: Fleet, seen: Observer, to: str, fault_at: float) -> float:
    """``vm start`` of v1 waits for the silent host, then starts it on ``to``; how long
    from ``fault_at`` until the observer saw it run there."""
    gone = "node-b" if to == "node-a" else "node-a"
    # Until a renewal is missed, a host cannot be told from a healthy one, and the start
    # is refused; then it waits for the lease.
    looked: dict[str, float] = {}

    def missed_renewal() -> bool:
        started = time.monotonic()
        age = f.admin.hosts()[gone]["LeaseAge"]
        looked.update(age=age, cli_s=time.monotonic() - started)
        return bool(age > 2 * TIMEOUT / lease.HEARTBEATS)

    until(missed_renewal, f"{gone} to miss a renewal", 2 * TIMEOUT)
    result = f.admin.run("vm", "start", "-f", "name=v1", timeout=BOUND + 30)
    assert result.stdout.strip() == "VM v1 started", result.stdout
    # The start waits for the lease, saying so, when the CLI reads it before it runs out.
    # The lease had TIMEOUT - age left when `host list` read it; `vm start` reads it about
    # one CLI start-up (what that `host list` took, twice for a load that varies) later.
    # A fixed margin failed CI once on a busy machine: the CLI took longer than it.
    if TIMEOUT - looked["age"] - 2 * looked["cli_s"] > 0.5:
        assert re.search(rf"^waiting [0-9.]+ s for host {gone}'s lease to expire"
                         r" \(v1 ran there\)$", result.stderr, re.M), (looked, result.stderr)
    assert f.admin.vms()["v1"]["Host"] == to
    until(lambda: seen.where("qvd-1") == {to}, f"v1 seen on {to}", 10)
    back = seen.first("qvd-1", to, fault_at)
    assert back is not None and back - fault_at < BOUND
    return back - fault_at


def _fenced(node: HkdNode) -> bool:
    return "fence: the lease ran out" in node.log_text()


def test_a_paused_then_a_killed_hkd_never_leave_a_vm_on_two_nodes(
    postgres: PgServer, tmp_path: Path,  # noqa: F811
) -> None:
    f = Fleet(tmp_path, postgres.url(), ("node-a", "node-b"), vms=1, timeout=TIMEOUT,
              mount_only=False)
    try:
        f.start()
        a, b = f.nodes["node-a"], f.nodes["node-b"]
        with Observer(f.nodes) as seen:
            f.admin.run("vm", "start", "-f", "name=v1", "host=node-a")
            until(lambda: seen.where("qvd-1") == {"node-a"}, "v1 seen on node-a", 10)

            # node-a's HKD paused for longer than the lease: its fence kills v1 there
            # before node-b may start it, and the HKD rejoins when it resumes.
            a.signal(signal.SIGSTOP)
            paused = time.monotonic()
            try:
                _moved(f, seen, "node-b", paused)
                assert _fenced(a)
                killed = seen.last("qvd-1", "node-a", time.monotonic())
                assert killed is not None
                assert killed - paused < lease.valid_for(TIMEOUT) + 1
            finally:
                a.signal(signal.SIGCONT)
            until(lambda: f.admin.hosts()["node-a"]["State"] == "running", "node-a back", 30)

            # node-b's HKD killed: its fence waits out the lease, kills v1, and exits.
            b.signal(signal.SIGKILL)
            b.wait()
            _moved(f, seen, "node-a", time.monotonic())
            assert _fenced(b)
            until(lambda: b.fences() == [], "node-b's fence to exit", 10)

        assert seen.rate() >= 10 and seen.longest_gap() < 1.0
        assert seen.on_two_nodes() == []
        vms = f.admin.vms()
        assert (vms["v1"]["State"], vms["v1"]["Host"]) == ("running", "node-a")
        assert seen.where("qvd-1") == {"node-a"}
    finally:
        f.close()


def test_a_node_cut_off_from_the_database_fences_itself_before_another_takes_over(
    tmp_path: Path,
) -> None:
    """The database in a network namespace of its own, the nodes reaching it over TCP:
    node-a is cut off (every packet between them dropped, both ways; its HKD keeps
    running, its connections stay open and go silent). node-a's fence kills v1 before
    its lease runs out on the database's clock; only then does node-b start it. Healed,
    node-a rejoins with nothing running, and v1 stays on node-b."""
    with fleet_database() as network:
        f = Fleet(tmp_path, network[0].url(), ("node-a", "node-b"), vms=1, timeout=TIMEOUT,
                  mount_only=False, network=network)
        try:
            f.start()
            a = f.nodes["node-a"]
            with Observer(f.nodes) as seen:
                f.admin.run("vm", "start", "-f", "name=v1", "host=node-a")
                until(lambda: seen.where("qvd-1") == {"node-a"}, "v1 seen on node-a", 10)
                f.cut("node-a")
                cut = time.monotonic()
                try:
                    _moved(f, seen, "node-b", cut)
                    assert a.proc is not None and a.proc.poll() is None  # not a crash
                    assert _fenced(a)
                    killed = seen.last("qvd-1", "node-a", time.monotonic())
                    started = seen.first("qvd-1", "node-b", cut)
                    assert killed is not None and started is not None
                    # Within the node's own lease (a heartbeat of it may have run before
                    # the cut), and before node-b's start.
                    assert killed - cut < lease.valid_for(TIMEOUT) + 1
                    assert killed < started
                finally:
                    f.heal("node-a")
                until(lambda: "rejoining" in a.log_text(), "node-a to rejoin", 60)
                f.until_running("node-a")
                assert a.in_ns("lxc-ls", "-P", str(a.lxcpath), "--running").stdout.strip() == ""
            assert seen.rate() >= 10 and seen.longest_gap() < 1.0
            assert seen.on_two_nodes() == []
            vms = f.admin.vms()
            assert (vms["v1"]["State"], vms["v1"]["Host"]) == ("running", "node-b")
        finally:
            f.close()


def test_a_session_over_tcp_is_bounded_on_both_sides_of_a_partition() -> None:
    """The server's side of a node's session gives up on a silent network as the node's
    does (``db/engine.py``): a backend blocked replying to a cut-off node would otherwise
    hold the writer lock, and every node's renewal, for the kernel's 15 minutes."""
    settings = ("tcp_user_timeout", "tcp_keepalives_idle", "tcp_keepalives_interval",
                "tcp_keepalives_count")
    show = ("import sys; from sqlalchemy import text; from qvdctl.db.engine import Database\n"
            "with Database(sys.argv[1]).reader() as conn:\n"
            f"    print(*(conn.execute(text('SHOW ' + k)).scalar() for k in {settings!r}))")
    with fleet_database() as (server, network), scratch_netns("qvdtcp") as netns:
        network.attach(netns)
        result = subprocess.run(netns_argv(netns, [sys.executable, "-c", show,
                                                   server.tcp_url(server.url())]),
                                capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == [str(engine.TCP_USER_TIMEOUT_S * 1000),
                                     str(engine.KEEPALIVE_IDLE_S),
                                     str(engine.KEEPALIVE_INTERVAL_S),
                                     str(engine.KEEPALIVE_COUNT)], result.stderr


@contextlib.contextmanager
def _one_node_running_v1(server: PgServer, base: Path, timeout: int
                         ) -> Iterator[tuple[Fleet, HkdNode]]:
    """One HKD with a real container, v1, running on it."""
    f = Fleet(base, server.url(), ("node-a",), vms=1, timeout=timeout, mount_only=False)
    try:
        f.start()
        f.admin.run("vm", "start", "-f", "name=v1")
        yield f, f.nodes["node-a"]
    finally:
        f.close()


def test_a_killed_fence_is_started_again_with_the_lease_it_held(
    postgres: PgServer, tmp_path: Path,  # noqa: F811
) -> None:
    with _one_node_running_v1(postgres, tmp_path, TIMEOUT) as (f, a):
        (first,) = a.fences()
        os.kill(first, signal.SIGKILL)
        until(lambda: len(a.fences()) == 1 and a.fences() != [first], "a new fence", 10)
        assert f"the fence process {first} ended" in a.log_text()
        # Paused with the new fence only: it kills v1 as the first would have.
        a.signal(signal.SIGSTOP)
        try:
            until(lambda: _fenced(a), "the new fence to fire", 2 * TIMEOUT)
            assert a.in_ns("lxc-ls", "-P", str(a.lxcpath), "--running").stdout.strip() == ""
        finally:
            a.signal(signal.SIGCONT)
        # Resumed, the HKD finds its lease lapsed, cleans up and rejoins: v1 is stopped.
        until(lambda: "the lease lapsed" in a.log_text(), "the HKD to see the lapse", 2 * TIMEOUT)
        until(lambda: f.admin.vms()["v1"]["State"] == "stopped", "v1 stopped", 30)
        until(lambda: "the lease holds again" in a.log_text(), "the fence re-armed", 10)
        f.admin.run("vm", "start", "-f", "name=v1")
        assert a.in_ns("lxc-ls", "-P", str(a.lxcpath), "--running").stdout.split() == ["qvd-1"]


def _stamps(node: HkdNode, pattern: str) -> list[float]:
    """The wall-clock times (as the node's clock read them) of ``node``'s log lines that
    match ``pattern``: the HKD's and its fence's, both stamped by Python's logging."""
    found = re.finditer(rf"^(\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d,\d+) .*{pattern}",
                        node.log_text(), re.M)
    return [datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            for m in found]


def test_node_clocks_hours_apart_and_stepping_never_put_a_vm_on_two_nodes(
    postgres: PgServer, tmp_path: Path,  # noqa: F811
) -> None:
    """node-a's wall clock 5 minutes slow and its monotonic clock 2 days ahead (a time
    namespace), node-b's wall clock 5 minutes fast. v1 runs on node-a; then, while both
    run, node-a's wall clock steps an hour forward and node-b's an hour back. Leases are
    on the database's clock and the monotonic one, so for two whole leases both stay
    running and v1 stays on node-a; killed, node-a's v1 is started on node-b only once
    its lease has run out (``_moved``: the start waits, saying so), never on both."""
    f = Fleet(tmp_path, postgres.url(), ("node-a", "node-b"), vms=1, timeout=TIMEOUT,
              mount_only=False)
    try:
        a, b = f.nodes["node-a"], f.nodes["node-b"]
        a.set_clock_offset(-300)
        b.set_clock_offset(300)
        a.monotonic_offset_s = 2 * 86400
        f.start()
        assert a.proc is not None
        offsets = Path(f"/proc/{a.proc.pid}/timens_offsets").read_text()
        assert re.search(r"^monotonic\s+172800\s", offsets, re.M), offsets
        with Observer(f.nodes) as seen:
            f.admin.run("vm", "start", "-f", "name=v1", "host=node-a")
            until(lambda: seen.where("qvd-1") == {"node-a"}, "v1 seen on node-a", 10)
            (claimed,) = _stamps(a, "VM v1 \\(id 1\\): claimed start")
            assert abs(claimed - time.time() + 300) < 60  # node-a's HKD reads its slow clock
            # How long the start waited is on the database's clock, not 5 minutes off.
            queued = re.search(r"VM v1 \(id 1\): claimed start \(queued (-?\d+) ms ago\)",
                               a.log_text())
            assert queued is not None and 0 <= int(queued.group(1)) < 10_000, queued

            a.set_clock_offset(3300)
            b.set_clock_offset(-3300)
            stepped = time.monotonic()
            while time.monotonic() - stepped < 2 * TIMEOUT:  # two whole leases
                hosts = f.admin.hosts()
                assert {hosts[n]["State"] for n in f.nodes} == {"running"}, hosts
                assert all(0 <= hosts[n]["LeaseAge"] < TIMEOUT for n in f.nodes), hosts
                assert seen.where("qvd-1") == {"node-a"}
            assert not _fenced(a) and not _fenced(b)

            a.signal(signal.SIGKILL)
            a.wait()
            killed = time.monotonic()
            _moved(f, seen, "node-b", killed)
            (fired,) = _stamps(a, "fence: the lease ran out")
            assert abs(fired - time.time() - 3300) < 60  # its fence read the stepped clock
        assert seen.on_two_nodes() == []
        assert seen.rate() >= 10
    finally:
        f.close()


def test_an_hkd_restarted_at_once_keeps_its_vm_and_ends_the_old_fence(
    postgres: PgServer, tmp_path: Path,  # noqa: F811
) -> None:
    """The killed HKD's fence waits out the old lease; the new HKD, once its own lease
    holds, ends it, so the VM it took over is not killed at the old deadline. (A lease
    long enough that the new HKD surely starts before the old one runs out, even on a
    busy machine: if it did not, that kill would be right.)"""
    timeout = 15
    with _one_node_running_v1(postgres, tmp_path, timeout) as (f, a):
        (old,) = a.fences()
        a.signal(signal.SIGKILL)
        a.wait()
        killed = time.monotonic()
        a.start()
        f.until_running("node-a")
        until(lambda: old not in a.fences(), "the old fence to end", 10)
        assert f"ended fence process {old} of a previous HKD" in a.log_text()
        # Until well past the old lease's deadline: v1 keeps running.
        until(lambda: time.monotonic() - killed > lease.valid_for(timeout) + 2,
              "the old deadline to pass", 2 * timeout)
        assert "fence: the lease ran out" not in a.log_text()
        assert a.in_ns("lxc-ls", "-P", str(a.lxcpath), "--running").stdout.split() == ["qvd-1"]
        assert f.admin.vms()["v1"]["State"] == "running"
