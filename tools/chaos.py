"""``make chaos``: faults injected into a fleet of HKDs, checked in the style of Jepsen.

    python -m tools.chaos [--seed N] [--faults 30] [--nodes 3] [--vms 4] [--timeout 5]

HKDs on one PostgreSQL (``tools/fleet.py``) run real busybox containers. The harness
plays the admin: it wants every VM running, and starts any it finds stopped. One at a
time, it injects a fault, the kinds in equal numbers, shuffled by a seeded generator
that also draws every duration (the seed is printed first, so a run can be replayed):

    sigkill    an HKD killed; the node's HKD started again a while later
    sigstop    an HKD paused for 1.2 to 2.5 lease timeouts, then resumed
    db         PostgreSQL killed (an immediate shutdown: no checkpoint, crash recovery
               on restart) for 0.3 to 1.5 lease timeouts, then started again
    partition  a node cut off from the database for 1.2 to 2.5 lease timeouts, then
               healed: every packet between them dropped, both ways, by nftables in the
               two network namespaces (the nodes reach PostgreSQL over TCP; its own
               namespace, ``tools/fleet.py``'s ``DbNetwork``)
    clock      a node's wall clock steps by 1 to 60 minutes, forward or back (or back to
               right), while its HKD runs (``tools/skewed_clock``); it must change nothing:
               for two lease timeouts the node stays ``running`` and keeps its VMs

Each node also runs with its monotonic and boot-time clocks days ahead of the others'
(a time namespace of its own, the days drawn by the generator), and its wall clock stays
wherever the last clock fault left it through the faults that follow.

After an HKD fault or a partition the admin at once starts that node's VMs again
(``vm start`` waits for the node's lease to expire, then starts them elsewhere). An ``Observer`` samples
which node runs each VM twenty times a second from the process table, independently of
the HKDs, and the checker fails the run when

- any VM is seen on two nodes at one sample;
- after a fault heals, a VM is not running again within ``bound`` (a lost lease's T,
  a heartbeat, and a start: T + T/5 + START_S);
- at the end, the database and what runs on the nodes disagree.

It reports the faults survived per kind and how long a VM of a lost node took to run
again elsewhere, counted from the fault (median and worst).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from tests.support.postgres import PgServer
from tools.fleet import Fleet, HkdNode, Observer, fleet_database, until

KINDS = ("sigkill", "sigstop", "db", "partition", "clock")
START_S = 20.0  # a container's start on a loaded machine, with room
DAY_S = 86400


@dataclasses.dataclass
class Report:
    seed: int
    timeout: int
    survived: Counter[str] = dataclasses.field(default_factory=Counter)
    # Per fault kind: how long each VM of the failed node took to run elsewhere.
    moved_s: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    failures: list[str] = dataclasses.field(default_factory=list)
    samples: int = 0
    rate: float = 0.0

    def lines(self) -> list[str]:
        out = [f"seed {self.seed}, lease timeout {self.timeout} s, {self.samples} samples"
               f" at {self.rate:.0f} a second",
               "faults survived: " + ", ".join(f"{k} {self.survived[k]}" for k in KINDS)
               + f" (total {sum(self.survived.values())})"]
        every = [t for times in self.moved_s.values() for t in times]
        for what, times in [("", every), *((f" ({k})", self.moved_s[k]) for k in KINDS
                                           if k in self.moved_s)]:
            if times:
                out.append(f"a lost node's VM running elsewhere after the fault{what}:"
                           f" median {statistics.median(times):.1f} s,"
                           f" worst {max(times):.1f} s ({len(times)} moves)")
        out += [f"FAILED: {failure}" for failure in self.failures] or ["no violation"]
        return out


class Chaos:
    """One run: the fleet, the observer, the generator and what the checker found."""

    def __init__(self, fleet: Fleet, seen: Observer, server: PgServer, rng: random.Random,
                 report: Report) -> None:
        self.fleet, self.seen, self.server, self.rng = fleet, seen, server, rng
        self.report = report
        self.timeout = report.timeout
        self.bound = self.timeout * 1.2 + START_S
        self.containers = {row["Name"]: f"qvd-{row['Id']}" for row in fleet.admin.vms().values()}

    def run(self, plan: list[str], say: Callable[[str], None]) -> None:
        self._all_running()
        for number, kind in enumerate(plan, 1):
            started = time.monotonic()
            getattr(self, f"_{kind}")()
            self._all_running()
            self.report.survived[kind] += 1
            say(f"fault {number}/{len(plan)}: {kind} survived"
                f" ({time.monotonic() - started:.0f} s)")

    # --- the faults --------------------------------------------------------------

    def _victim(self) -> HkdNode:
        """A node running at least one VM (every node runs some when there are enough)."""
        hosts = {row["Host"] for row in self.fleet.admin.vms().values() if row["Host"]}
        return self.fleet.nodes[self.rng.choice(sorted(hosts or self.fleet.nodes))]

    def _sigkill(self) -> None:
        node = self._victim()
        node.signal(signal.SIGKILL)
        node.wait()
        at = time.monotonic()
        self._move_away(node.name, at, "sigkill")
        time.sleep(max(at + self.rng.uniform(0.0, 1.0) * self.timeout - time.monotonic(), 0))
        node.start()
        self.fleet.until_running(node.name)

    def _sigstop(self) -> None:
        node = self._victim()
        node.signal(signal.SIGSTOP)
        at = time.monotonic()
        try:
            self._move_away(node.name, at, "sigstop")
            time.sleep(max(at + self.rng.uniform(1.2, 2.5) * self.timeout - time.monotonic(), 0))
        finally:
            node.signal(signal.SIGCONT)
        self.fleet.until_running(node.name)

    def _partition(self) -> None:
        node = self._victim()
        self.fleet.cut(node.name)
        at = time.monotonic()
        try:
            self._move_away(node.name, at, "partition")
            time.sleep(max(at + self.rng.uniform(1.2, 2.5) * self.timeout - time.monotonic(), 0))
        finally:
            self.fleet.heal(node.name)
        self.fleet.until_running(node.name)

    def _clock(self) -> None:
        node = self._victim()
        step = self.rng.choice((-1, 1)) * self.rng.uniform(60, 3600)
        offset = 0.0 if node.clock_offset() and self.rng.random() < 0.25 else (
            node.clock_offset() + step)
        mine = {self.containers[name] for name, row in self.fleet.admin.vms().items()
                if row["Host"] == node.name}
        at = time.monotonic()
        node.set_clock_offset(offset)
        until(lambda: time.monotonic() - at > 2 * self.timeout, "two lease timeouts",
              3 * self.timeout)
        host = self.fleet.admin.hosts()[node.name]
        if host["State"] != "running":
            self.report.failures.append(f"{node.name}'s wall clock stepped to {offset:+.0f} s:"
                                        f" its host became {host['State']}")
        for container in mine:
            gone = [t for t, seen in self.seen.samples
                    if t > at and seen.get(container) != frozenset({node.name})]
            if gone:
                self.report.failures.append(
                    f"{node.name}'s wall clock stepped to {offset:+.0f} s: {container} was"
                    f" not running there {gone[0] - at:.1f} s later")

    def _db(self) -> None:
        self.server.stop(mode="immediate")  # a crash: no checkpoint, recovery on start
        time.sleep(self.rng.uniform(0.3, 1.5) * self.timeout)
        self.server.start()
        for name in self.fleet.nodes:
            self.fleet.until_running(name)

    # --- the admin and the checker ----------------------------------------------

    def _move_away(self, lost: str, fault_at: float, kind: str) -> None:
        """Start the VMs of node ``lost`` again elsewhere; record how long each took."""
        mine = [name for name, row in self.fleet.admin.vms().items() if row["Host"] == lost]
        for name in mine:
            self._start(name)
        for name in mine:
            container = self.containers[name]
            until(lambda: self.seen.where(container) - {lost}, f"{name} seen elsewhere",
                  self.bound)
            back = self.seen.first_elsewhere(container, lost, fault_at)
            assert back is not None
            self.report.moved_s.setdefault(kind, []).append(back - fault_at)
            if back - fault_at > self.bound:
                self.report.failures.append(f"{name} ran again {back - fault_at:.1f} s after"
                                            f" {lost} failed; the bound is {self.bound:.1f} s")

    def _start(self, name: str) -> None:
        """``vm start`` of ``name`` until it is accepted: a host that has not yet missed a
        renewal cannot be told from a healthy one, and the start is refused meanwhile."""
        deadline = time.monotonic() + self.bound
        while True:
            result = self.fleet.admin.run("vm", "start", "-f", f"name={name}", check=False,
                                          timeout=self.bound + 60)
            if result.returncode == 0 or "is already queued to" in result.stderr:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"vm start of {name} kept failing: {result.stderr}")
            time.sleep(min(self.timeout / 25, 2.0))

    def _all_running(self) -> None:
        """Every VM must run where the database says within the bound; meanwhile, start
        whatever is found stopped (a fault's consequences may still be unfolding: a node
        whose lease lapsed stops its VMs as it rejoins)."""
        healed = time.monotonic()
        while not self._agree():
            if time.monotonic() - healed > self.bound:
                raise AssertionError(
                    f"{time.monotonic() - healed:.1f} s after healing, the database says"
                    f" {self._db_view()} and the nodes run {self._nodes_view()}")
            for name, row in self.fleet.admin.vms().items():
                if row["State"] in ("stopped", "zombie"):
                    self._start(name)
            time.sleep(0.1)

    def _db_view(self) -> dict[str, str | None]:
        return {self.containers[name]: row["Host"] if row["State"] == "running" else None
                for name, row in self.fleet.admin.vms().items()}

    def _nodes_view(self) -> dict[str, str | None]:
        view: dict[str, str | None] = {}
        for container in self.containers.values():
            nodes = self.seen.where(container)
            view[container] = next(iter(nodes)) if len(nodes) == 1 else (
                None if not nodes else ",".join(sorted(nodes)))
        return view

    def _agree(self) -> bool:
        db = self._db_view()
        return None not in db.values() and db == self._nodes_view()


def plan(rng: random.Random, faults: int, kinds: tuple[str, ...] = KINDS) -> list[str]:
    """``faults`` faults, each kind as often as the others (give or take one), shuffled."""
    drawn = [kinds[i % len(kinds)] for i in range(faults)]
    rng.shuffle(drawn)
    return drawn


def run(base: Path, *, seed: int, faults: int | list[str], nodes: int, vms: int,
        timeout: int, kinds: tuple[str, ...] = KINDS,
        say: Callable[[str], None] = print) -> Report:
    """A chaos run in folder ``base``: ``faults`` drawn from ``kinds``, or that list of
    kinds in order. Its report (``failures`` empty if it held)."""
    say(f"chaos: seed {seed}")
    report = Report(seed, timeout)
    rng = random.Random(seed)
    with fleet_database() as (pg, network):
        names = tuple(f"node{i}" for i in range(1, nodes + 1))
        fleet = Fleet(base, pg.url(), names, vms=vms, timeout=timeout, mount_only=False,
                      network=(pg, network))
        try:
            for node in fleet.nodes.values():
                node.monotonic_offset_s = rng.randrange(DAY_S, 30 * DAY_S)
            fleet.start()
            with Observer(fleet.nodes) as seen:
                chaos = Chaos(fleet, seen, pg, rng, report)
                try:
                    chaos.run(plan(rng, faults, kinds) if isinstance(faults, int) else faults,
                              say)
                except AssertionError as exc:
                    report.failures.append(str(exc))
            report.samples, report.rate = len(seen.samples), seen.rate()
            for at, vm, where in seen.on_two_nodes():
                report.failures.append(f"{vm} ran on {', '.join(sorted(where))} at once"
                                       f" ({at - seen.samples[0][0]:.2f} s into the run)")
            if seen.rate() < 10:
                report.failures.append(f"the observer sampled {seen.rate():.1f} times a second")
        finally:
            fleet.close()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=None, help="replay a run (default: random)")
    parser.add_argument("--faults", type=int, default=30)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--vms", type=int, default=4)
    parser.add_argument("--timeout", type=int, default=5, help="the lease timeout T, seconds")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help="the faults to draw from, by comma (default: all)")
    ns = parser.parse_args(argv)
    kinds = tuple(ns.kinds.split(","))
    if not set(kinds) <= set(KINDS):
        parser.error(f"--kinds: choose from {', '.join(KINDS)}")
    seed = ns.seed if ns.seed is not None else random.SystemRandom().randrange(2**32)
    base = Path(tempfile.mkdtemp(prefix="qvd-chaos-"))
    report = run(base, seed=seed, faults=ns.faults, nodes=ns.nodes, vms=ns.vms,
                 timeout=ns.timeout, kinds=kinds, say=lambda line: print(line, flush=True))
    for line in report.lines():
        print(line)
    if report.failures:
        print(f"the nodes' logs are kept in {base}/*/hkd.log")
        return 1
    shutil.rmtree(base)
    return 0


if __name__ == "__main__":
    sys.exit(main())
