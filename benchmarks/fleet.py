"""``make bench-fleet``: many HKDs on one PostgreSQL, driven by one admin command.

    python -m benchmarks.fleet [--nodes 20] [--vms 200]

Each node is a real ``qvdctl hkd`` in its own network namespace with its own storage
root (``tools/fleet.py``), with ``vm.start.mount_only=1`` so that a VM is its
mounted root (kernel overlayfs) and the figures are the fleet's, not LXC's. Measured:

- bulk: wall time of one ``vm start -f name=*`` until every VM runs (the command
  waits), and of one ``vm stop -f name=*``;
- pickup latency: from a command being queued (``cmd_at``) to an HKD claiming it,
  as each HKD logs it. In the bulk start a host takes ``vm.lifecycle.parallel`` VMs
  at a time, so later claims wait for a free slot; the first claim of each host, and
  single commands queued one at a time (``--no-wait``), are the pickup itself;
- database connections: ``pg_stat_activity`` of the fleet's database, idle and at
  the bulk start's peak.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from qvdctl.db import store
from qvdctl.network import addresses
from qvdctl.node import Node
from tools.fleet import Fleet, until
from tests.support.postgres import PgServer, _bindir

CLAIM = re.compile(r"VM \S+ \(id (\d+)\): claimed (start|stop) \(queued (\d+) ms ago\)")


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def _claims(fleet: Fleet) -> dict[str, list[tuple[str, float]]]:
    """Per host, in its log's order: (command, ms it waited) of every claim."""
    return {name: [(m.group(2), float(m.group(3))) for m in CLAIM.finditer(node.log_text())]
            for name, node in fleet.nodes.items()}


def _new(after: dict[str, list[tuple[str, float]]], before: dict[str, list[tuple[str, float]]], cmd: str) -> list[float]:
    return [ms for host, claims in after.items()
            for c, ms in claims[len(before.get(host, [])):] if c == cmd]


def _add_vms(url: str, count: int) -> None:
    # Straight into the database: 200 `vm add` processes would measure Python's start-up.
    node = Node(db_url=url)
    try:
        settings = node.settings()
        with node.db.writer() as conn:
            user = store.user_by_login(conn, "u")
            osf = store.osf_by_name(conn, "o")
            used = store.used_ips(conn)
            for i in range(1, count + 1):
                ip = addresses.next_free(settings, used)
                used.add(ip)
                store.add_vm(conn, f"v{i}", user["id"], osf["id"], "default", ip)
    finally:
        node.close()


def _connections(server: PgServer, db: str) -> int:
    return int(server.psql(f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}'"))


@contextlib.contextmanager
def bench_fleet(names: tuple[str, ...], prefix: str) -> Iterator[tuple[Fleet, PgServer, str]]:
    """A fleet of nodes ``names`` without VMs on a PostgreSQL of its own, with its URL;
    all of it gone on leaving."""
    bindir = _bindir()
    if bindir is None:
        raise SystemExit("PostgreSQL is not installed (make setup installs it)")
    server = PgServer(bindir)
    base = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        server.start()
        url = server.url("fleet")
        fleet = Fleet(base, url, names, vms=0, timeout=60)
        try:
            yield fleet, server, url
        finally:
            fleet.close()
    finally:
        server.remove()


def print_figures(title: str, figures: dict[str, float]) -> None:
    print(title)
    for key, value in figures.items():
        print(f"  {key:24} {value:10.1f}")


def run(nodes: int, vms: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    names = tuple(f"n{i:02d}" for i in range(nodes))
    with bench_fleet(names, "qvd-fleet-bench-") as (fleet, server, url):
        _add_vms(url, vms)
        started = time.monotonic()
        fleet.start()
        figures["hkd_startup_s"] = time.monotonic() - started
        figures["connections_idle"] = _connections(server, "fleet")

        peak = [0]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _connections(server, "fleet"))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        started = time.monotonic()
        fleet.admin.run("vm", "start", "-f", "name=*", timeout=600)
        figures["bulk_start_s"] = time.monotonic() - started
        done.set()
        sampler.join()
        figures["connections_peak"] = peak[0]
        running = sum(r["State"] == "running" for r in fleet.admin.vms().values())
        figures["running"] = running

        bulk = _claims(fleet)
        waits = _new(bulk, {}, "start")
        firsts = {host: claims[0][1] for host, claims in bulk.items() if claims}
        figures["bulk_claim_p50_ms"] = _percentile(waits, 0.5)
        figures["bulk_claim_p99_ms"] = _percentile(waits, 0.99)
        figures["first_pickup_p50_ms"] = _percentile(list(firsts.values()), 0.5)
        figures["first_pickup_p99_ms"] = _percentile(list(firsts.values()), 0.99)

        started = time.monotonic()
        fleet.admin.run("vm", "stop", "-f", "name=*", timeout=600)
        figures["bulk_stop_s"] = time.monotonic() - started

        # Single commands, one at a time: the pickup latency an admin sees.
        before = _claims(fleet)
        singles = min(vms, 50)
        for i in range(1, singles + 1):
            fleet.admin.run("--no-wait", "vm", "start", "-f", f"name=v{i}")
        until(lambda: len(_new(_claims(fleet), before, "start")) >= singles,
              "the single starts", 120)
        single = _new(_claims(fleet), before, "start")
        figures["single_pickup_p50_ms"] = statistics.median(single)
        figures["single_pickup_p99_ms"] = _percentile(single, 0.99)
        figures["single_pickup_max_ms"] = max(single)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--vms", type=int, default=200)
    ns = parser.parse_args()
    print_figures(f"fleet: {ns.nodes} HKDs, {ns.vms} VMs (vm.start.mount_only=1, kernel overlayfs)",
                  run(ns.nodes, ns.vms))


if __name__ == "__main__":
    main()
