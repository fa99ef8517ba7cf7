"""The HKD's Prometheus endpoint: ``/metrics`` at ``hkd.metrics.listen`` (empty: off).

prometheus_client formats the text and serves it from a thread of its own. Everything a
scrape shows is read when the scrape comes: one query for this host's VMs, then per VM
whose root is mounted here its qvdfs daemon's counters and its container's cgroup
(``vm/usage.py``, which the HKD also publishes for the web admin). A VM whose numbers
cannot be read is left out of that family; a scrape never fails because of one VM.

Names follow Prometheus' rules: one prefix ``qvd_``, base units (seconds, bytes),
``_total`` on counters.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from qvdctl.container import seam
from qvdctl.db import store
from qvdctl.db.states import VmState
from qvdctl.node import Node
from qvdctl.settings import Settings
from qvdctl.storage import Storage
from qvdctl.vm import usage

log = logging.getLogger(__name__)

# Start and stop take from a fraction of a second (mount only) to a guest's stop timeout.
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# From an admin's queueing of a command to this HKD's claim of it: its loop's latency.
PICKUP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)


class HkdCollector:
    """Collects on scrape what one HKD knows: its VMs, its lease and what runs here."""

    def __init__(self, node: Node, settings: Callable[[], Settings], host_id: Callable[[], int],
                 lease_age: Callable[[], float]) -> None:
        self.node = node
        self.settings = settings  # the HKD's own: no database read, so none to fail
        self.host_id = host_id
        self.lease_age = lease_age

    def collect(self) -> Iterator[Metric]:
        by_state = GaugeMetricFamily("qvd_vms", "VMs of this host by state", labels=["state"])
        names: dict[int, str] = {}
        counts = dict.fromkeys(VmState, 0)
        try:
            with self.node.db.reader() as conn:
                for row in store.list_vms(conn):
                    if row["host_id"] == self.host_id():
                        counts[VmState(row["state"])] += 1
                        names[row["id"]] = row["name"]
        except Exception as exc:  # noqa: BLE001 - the database down is what a scrape shows
            log.debug("metrics: reading this host's VMs: %s", exc)
        else:
            for state, count in counts.items():
                by_state.add_metric([state.value], count)
            yield by_state
        yield GaugeMetricFamily("qvd_lease_age_seconds",
                                "Seconds since the database last accepted this host's lease",
                                value=self.lease_age())
        settings = self.settings()
        yield from _per_vm(Storage.from_settings(settings), seam.lxcpath_from(settings), names)


def _per_vm(storage: Storage, lxcpath: Path, names: dict[int, str]) -> Iterator[Metric]:
    requests = CounterMetricFamily("qvd_vm_fuse_requests", "FUSE requests the VM's root served",
                                   labels=["vm", "opcode"])
    busy = CounterMetricFamily("qvd_vm_fuse_daemon_seconds",
                               "qvdfs daemon time spent on the VM's FUSE requests",
                               labels=["vm", "opcode"])
    copy_ups = CounterMetricFamily("qvd_vm_copy_ups", "Files qvdfs copied up in the VM's root",
                                   labels=["vm"])
    passthrough = CounterMetricFamily("qvd_vm_fuse_passthrough_opens",
                                      "Opens of the VM's root the kernel served by passthrough",
                                      labels=["vm"])
    cpu = CounterMetricFamily("qvd_vm_cpu_seconds", "CPU time of the VM's container",
                              labels=["vm"])
    memory = GaugeMetricFamily("qvd_vm_memory_bytes", "Memory the VM's container uses",
                               labels=["vm"])
    for vm_id, found in usage.read(storage, lxcpath, names).items():
        name = names[vm_id]
        if (counters := found.qvdfs) is not None:
            opcodes = counters.get("opcodes")
            for opcode, row in (opcodes.items() if isinstance(opcodes, dict) else ()):
                requests.add_metric([name, opcode], row["count"])
                busy.add_metric([name, opcode], row["ns"] / 1e9)
            copy_ups.add_metric([name], float(str(counters.get("copy_ups", 0))))
            passthrough.add_metric([name], float(str(counters.get("passthrough_opens", 0))))
        if found.cpu_seconds is not None and found.memory_bytes is not None:
            cpu.add_metric([name], found.cpu_seconds)
            memory.add_metric([name], found.memory_bytes)
    yield from (requests, busy, copy_ups, passthrough, cpu, memory)


class Metrics:
    """The HKD's registry: its collector, the duration histograms, and the server."""

    def __init__(self, node: Node, settings: Callable[[], Settings], host_id: Callable[[], int],
                 lease_age: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(HkdCollector(node, settings, host_id, lease_age))
        self.start_seconds = Histogram("qvd_vm_start_duration_seconds",
                                       "Time this HKD took to start a VM",
                                       buckets=DURATION_BUCKETS, registry=self.registry)
        self.stop_seconds = Histogram("qvd_vm_stop_duration_seconds",
                                      "Time this HKD took to stop a VM",
                                      buckets=DURATION_BUCKETS, registry=self.registry)
        self.pickup_seconds = Histogram("qvd_command_pickup_seconds",
                                        "Time from a command's queueing to this HKD's claim",
                                        buckets=PICKUP_BUCKETS, registry=self.registry)
        self._server: WSGIServer | None = None

    def serve(self, listen: str) -> None:
        """Serve ``/metrics`` on ``listen`` (``host:port``, validated by the setting)."""
        host, _, port = listen.rpartition(":")
        self._server, _thread = start_http_server(int(port), host.strip("[]"),
                                                  registry=self.registry)
        log.info("metrics on http://%s/metrics", listen)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

