"""The HKD's /metrics: scraped over loopback in the node's own network namespace and
parsed with prometheus_client's own parser.

Two HKDs on a test PostgreSQL: node-a has ``hkd.metrics.listen`` in its node.conf,
node-b has not (and must open no port). A mount-only VM on node-a has a qvdfs root,
so its FUSE counters are the daemon's own, read the way ``qvdfs stats`` reads them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tools.fleet import Fleet, HkdNode, until
from tests.support.postgres import PgServer, pg_server, postgres  # noqa: F401 (a fixture)

pytestmark = pytest.mark.timeout(240)

LISTEN = "127.0.0.1:9640"  # loopback of node-a's own namespace
SCRAPE = ("import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
          f"'http://{LISTEN}/metrics', timeout=20).read().decode())")


@pytest.fixture
def fleet(postgres: PgServer, tmp_path: Path) -> Iterator[Fleet]:  # noqa: F811
    f = Fleet(tmp_path, postgres.url(), ("node-a", "node-b"), vms=1, timeout=5)
    try:
        f.admin.run("config", "set", "vm.lxc.unionfs.type=qvdfs")
        with open(f.nodes["node-a"].conf, "a") as conf:
            conf.write(f"hkd.metrics.listen = {LISTEN}\n")
        f.start()
        yield f
    finally:
        f.close()


def scrape(node: HkdNode) -> dict[str, list[Sample]]:
    """Family name -> its samples, from one scrape of ``node``'s /metrics."""
    done = node.in_ns(sys.executable, "-c", SCRAPE)
    assert done.returncode == 0, done.stderr
    return {family.name: family.samples
            for family in text_string_to_metric_families(done.stdout)}


def value(samples: list[Sample], name: str, **labels: str) -> float:
    (found,) = [s.value for s in samples if s.name == name and s.labels == labels]
    return found


def listening_tcp(node: HkdNode) -> str:
    done = node.in_ns("ss", "-Hltn")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_scrape_shows_the_vms_the_lease_and_a_running_roots_counters(fleet: Fleet) -> None:
    node = fleet.nodes["node-a"]
    families = scrape(node)
    assert value(families["qvd_vms"], "qvd_vms", state="running") == 0
    assert 0 <= value(families["qvd_lease_age_seconds"], "qvd_lease_age_seconds") < 5
    assert listening_tcp(fleet.nodes["node-b"]) == ""  # metrics off: no port at all

    fleet.admin.run("vm", "start", "-f", "name=v1", "host=node-a")
    (root,) = node.mounts()
    # Touching a file of the image copies it up; walking the tree makes FUSE requests.
    first = next(Path(d) / f for d, _, files in os.walk(root) for f in files
                 if (Path(d) / f).is_file() and not (Path(d) / f).is_symlink())
    os.utime(first)

    families = scrape(node)
    assert value(families["qvd_vms"], "qvd_vms", state="running") == 1
    assert value(families["qvd_vms"], "qvd_vms", state="stopped") == 0
    start = families["qvd_vm_start_duration_seconds"]
    assert value(start, "qvd_vm_start_duration_seconds_count") == 1
    assert value(start, "qvd_vm_start_duration_seconds_sum") > 0
    pickup = families["qvd_command_pickup_seconds"]
    assert value(pickup, "qvd_command_pickup_seconds_count") == 1
    requests = [s for s in families["qvd_vm_fuse_requests"]
                if s.name == "qvd_vm_fuse_requests_total" and s.labels["vm"] == "v1"]
    assert {s.labels["opcode"] for s in requests} >= {"LOOKUP", "GETATTR"}, requests
    assert all(s.value > 0 for s in requests)
    assert value(families["qvd_vm_fuse_daemon_seconds"], "qvd_vm_fuse_daemon_seconds_total",
                 vm="v1", opcode="LOOKUP") > 0
    assert value(families["qvd_vm_copy_ups"], "qvd_vm_copy_ups_total", vm="v1") >= 1
    # A mount-only VM has no container: no cgroup numbers, and the scrape still works.
    assert not families["qvd_vm_cpu_seconds"]

    # Counters grow while the VM works.
    before = value(families["qvd_vm_fuse_requests"], "qvd_vm_fuse_requests_total",
                   vm="v1", opcode="LOOKUP")
    for d, _, _ in os.walk(root):
        (Path(d) / "no-such-file").exists()
    after = value(scrape(node)["qvd_vm_fuse_requests"], "qvd_vm_fuse_requests_total",
                  vm="v1", opcode="LOOKUP")
    assert after > before

    fleet.admin.run("vm", "stop", "-f", "name=v1")
    families = scrape(node)
    assert value(families["qvd_vm_stop_duration_seconds"],
                 "qvd_vm_stop_duration_seconds_count") == 1
    assert value(families["qvd_command_pickup_seconds"],
                 "qvd_command_pickup_seconds_count") == 2
    assert not families["qvd_vm_fuse_requests"]  # stopped: gone from the per-VM families


def test_a_running_container_shows_its_cgroup_cpu_and_memory(
    postgres: PgServer, tmp_path: Path  # noqa: F811
) -> None:
    # A real container on a kernel overlayfs root: cgroup numbers, and no qvdfs daemon to
    # ask (the scrape leaves that VM out of the FUSE families and still answers).
    url = postgres.url()
    f = Fleet(tmp_path, url, ("node-a",), vms=1, timeout=5, mount_only=False)
    try:
        with open(f.nodes["node-a"].conf, "a") as conf:
            conf.write(f"hkd.metrics.listen = {LISTEN}\nhkd.usage.interval = 1\n")
        f.start()
        f.admin.run("vm", "start", "-f", "name=v1")
        families = scrape(f.nodes["node-a"])
        assert value(families["qvd_vms"], "qvd_vms", state="running") == 1
        assert value(families["qvd_vm_cpu_seconds"], "qvd_vm_cpu_seconds_total", vm="v1") > 0
        assert value(families["qvd_vm_memory_bytes"], "qvd_vm_memory_bytes", vm="v1") > 0
        assert not families["qvd_vm_fuse_requests"]
        # The same numbers, published by the HKD for the web admins of the fleet.
        sql = "SELECT cpu_seconds, memory_bytes, qvdfs IS NULL FROM vm_usage WHERE vm_id = 1"
        database = url.partition("@/")[2].partition("?")[0]
        until(lambda: postgres.psql(sql, database), "v1's usage published", 30)
        cpu, memory, no_qvdfs = postgres.psql(sql, database).split("|")
        assert float(cpu) > 0 and float(memory) > 0 and no_qvdfs == "t"
        f.admin.run("vm", "stop", "-f", "name=v1")
    finally:
        f.close()


def test_a_scrape_answers_while_the_database_is_down(tmp_path: Path) -> None:
    # A lease long enough that the node does not fence during the outage: the scrape
    # shows the lease growing old and leaves out what only the database knows.
    with pg_server() as server:
        f = Fleet(tmp_path, server.url(), ("node-a",), vms=1, timeout=60)
        try:
            with open(f.nodes["node-a"].conf, "a") as conf:
                conf.write(f"hkd.metrics.listen = {LISTEN}\n")
            f.start()
            f.admin.run("vm", "start", "-f", "name=v1")
            assert "qvd_vms" in scrape(f.nodes["node-a"])
            server.stop()
            families = scrape(f.nodes["node-a"])
            assert "qvd_vms" not in families
            assert value(families["qvd_lease_age_seconds"], "qvd_lease_age_seconds") >= 0
        finally:
            f.close()
