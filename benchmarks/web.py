"""``make bench-web``: how fast the web admin answers, and how soon a change reaches a page.

    python -m benchmarks.web [--vms 1000] [--hosts 20] [--runs 20] [--changes 50]

On SQLite and on PostgreSQL (a server of its own in a temporary folder, as the tests'),
the database gets ``--vms`` VMs over ``--hosts`` hosts (half of them running), then a
real ``qvdctl web`` serves it on loopback. Measured, from a client on the same machine
(one connection per request, as a browser's first; each figure bounds the server's time
from above):
the VMs page, the VMs page filtered to about a ninth of them, the dashboard; and the
live feed's latency: a state change written to the database as an HKD or the CLI
would, to the feed's event on an open page's connection (``--changes`` samples, spaced
at random so they do not lock onto the feed's poll).
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from queue import Queue

from qvdctl.db import store
from qvdctl.db.engine import Database
from qvdctl.db.states import VmState
from qvdctl.web import accounts
from tests.support.postgres import pg_server
from tests.support.qvdctl import Cli
from tests.support.web import Client, web_server

PAGES = {"VMs page": "/vms", "VMs page, filtered": "/vms?name=vm1*", "dashboard": "/"}
LOGIN, PASSWORD = "bench", "bench-password"


def populate(db: Database, vms: int, hosts: int) -> None:
    with db.writer() as conn:
        osf = store.add_osf(conn, "bench", 256, 0)
        user = store.add_user(conn, "bench", "-")
        host_ids = [store.add_host(conn, f"host{i}", f"10.0.{i}.1") for i in range(hosts)]
        for i in range(vms):
            vm = store.add_vm(conn, f"vm{i}", user, osf, "default", f"10.{100 + i // 65000}"
                              f".{i // 250 % 250}.{i % 250 + 1}")
            if i % 2:
                store.set_vm_state(conn, vm, VmState.RUNNING, host_id=host_ids[i % hosts])
        accounts.add_admin(conn, LOGIN, PASSWORD, accounts.Role.ADMIN)


def page_times(client: Client, runs: int) -> dict[str, list[float]]:
    """Milliseconds per request of each page, the pages taking turns, after a warm-up."""
    samples: dict[str, list[float]] = {name: [] for name in PAGES}
    for round_ in range(runs + 1):
        for name, path in PAGES.items():
            began = time.perf_counter()
            reply = client.request(path)
            if reply.status != 200:
                raise SystemExit(f"GET {path}: {reply.status}")
            if round_:
                samples[name].append((time.perf_counter() - began) * 1000)
    return samples


def feed_latency(url: str, cookie: str, db: Database, changes: int) -> list[float]:
    """Milliseconds from each committed change to the feed's event that shows it."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=60)
    conn.request("GET", "/events/vms", headers={"Cookie": f"qvd_session={cookie}"})
    feed = conn.getresponse()
    events: Queue[tuple[float, int]] = Queue()

    def read() -> None:
        for raw in feed:
            line = raw.decode().strip()
            if line.startswith("data: "):
                events.put((time.perf_counter(), json.loads(line[6:])[0]["blocked"]))

    threading.Thread(target=read, daemon=True).start()
    events.get(timeout=60)  # the first event: the state as it is
    latencies = []
    for i in range(changes):
        time.sleep(random.uniform(0.1, 0.7))
        blocked = (i + 1) % 2
        began = time.perf_counter()
        with db.writer() as write:
            store.set_vm_blocked(write, 1, blocked)
        while True:
            at, shown = events.get(timeout=60)
            if shown == blocked:
                break
        latencies.append((at - began) * 1000)
    return latencies  # the feed ends with the server


@contextmanager
def databases(which: list[str], tmp: Path) -> Iterator[Iterator[tuple[str, str]]]:
    """(name, URL) of each database asked for; PostgreSQL's server runs while in use."""
    def urls() -> Iterator[tuple[str, str]]:
        if "sqlite" in which:
            yield "SQLite", f"sqlite:///{tmp / 'sqlite' / 'qvd.db'}"
        if "postgresql" in which:
            with pg_server() as server:
                yield "PostgreSQL", server.url()
    yield urls()


def measure(name: str, url: str, root: Path, args: argparse.Namespace) -> list[str]:
    db = Database(url)
    try:
        populate(db, args.vms, args.hosts)
        with web_server(Cli(root), "--db", url) as base:
            client = Client(base)
            client.log_in(LOGIN, PASSWORD)
            assert client.cookie is not None
            pages = page_times(client, args.runs)
            latency = feed_latency(base, client.cookie, db, args.changes)
    finally:
        db.close()
    rows = []
    for page, values in pages.items():
        rows.append(f"| {name} | {page} | {statistics.median(values):.0f} ms"
                    f" | {_p(values, 90):.0f} ms |")
    rows.append(f"| {name} | change to the page (live feed) | {statistics.median(latency):.0f} ms"
                f" | {_p(latency, 99):.0f} ms (p99) |")
    return rows


def _p(values: list[float], percent: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[percent - 1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.web", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vms", type=int, default=1000, help="VMs (default 1000)")
    parser.add_argument("--hosts", type=int, default=20, help="hosts (default 20)")
    parser.add_argument("--runs", type=int, default=20, help="requests of each page (default 20)")
    parser.add_argument("--changes", type=int, default=50,
                        help="state changes timed to the page (default 50)")
    parser.add_argument("--db", choices=["sqlite", "postgresql"], action="append",
                        help="the database(s) (default both)")
    args = parser.parse_args(argv)
    if args.runs < 2 or args.changes < 2:
        parser.error("--runs and --changes need at least 2")
    print(f"web admin: {args.vms} VMs over {args.hosts} hosts, half running")
    rows = ["| database | what | median | p90 |", "|---|---|---:|---:|"]
    with tempfile.TemporaryDirectory(prefix="qvd-bench-web-") as tmp:
        with databases(args.db or ["sqlite", "postgresql"], Path(tmp)) as urls:
            for name, url in urls:
                rows += measure(name, url, Path(tmp) / name, args)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
