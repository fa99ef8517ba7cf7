"""What a running VM uses, read on its node, and published for the rest of the fleet.

Read here (``read``): per VM whose root is mounted on this node, its qvdfs daemon's
counters (over the ``qvdfs stats`` socket, ``qvdproc.counters``) and its container's
CPU time and memory (its init's own cgroup). The HKD's Prometheus endpoint shows them
(``fleet/metrics.py``), the web admin's VM page shows a VM of its own node's, and the
HKD publishes them (``publish``) into the ``vm_usage`` table every
``hkd.usage.interval`` seconds, so that a web admin on any machine shows any VM's
(``published``). A number that cannot be read is None; a VM is never left out
because one of its numbers failed.

The write rate is bounded: one transaction per HKD per interval, one row per VM it
runs. The table has no NOTIFY trigger: publishing wakes no live feed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, delete, insert, select

from qvdctl.db.schema import hosts, vm_usage, vms
from qvdctl.db.states import VmState
from qvdctl.storage import Storage
from qvdproc import counters as qvdfs_counters
from qvdproc.mountinfo import mounts_under

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
# A hung daemon must not hold up the others' numbers (nor a scrape, nor the HKD).
COUNTERS_TIMEOUT_S = 1.0


@dataclasses.dataclass(frozen=True)
class Usage:
    """One VM's numbers at ``at`` (seconds since the epoch); None: could not be read."""

    at: float
    cpu_seconds: float | None
    memory_bytes: float | None
    # The daemon's whole document (``qvdfs stats --json``): per opcode ``count`` and
    # ``ns``, ``copy_ups``, ``passthrough_opens``, the backend. None: no qvdfs root.
    qvdfs: dict[str, Any] | None


def read(storage: Storage, lxcpath: Path, vm_ids: Collection[int]) -> dict[int, Usage]:
    """The numbers of each VM of ``vm_ids`` whose root is mounted on this node."""
    from qvdctl.container.query import container_inits  # here: it loads liblxc, which a
    # web server without containers to read never needs

    inits = {name: pid for pid, (_, name) in container_inits(lxcpath).items()}
    found = {}
    for point in mounts_under(storage.rootfs):
        vm_id = storage.rootfs_vm(Path(point))
        if vm_id is None or vm_id not in vm_ids:
            continue
        qvdfs: dict[str, Any] | None
        try:
            qvdfs = qvdfs_counters.fetch(point, timeout=COUNTERS_TIMEOUT_S)
        except (OSError, ValueError) as exc:  # overlayfs roots, or a daemon gone
            log.debug("no qvdfs counters for VM %d: %s", vm_id, exc)
            qvdfs = None
        init = inits.get(f"qvd-{vm_id}")
        cgroup = _cgroup_usage(init) if init is not None else None
        found[vm_id] = Usage(time.time(), cgroup[0] if cgroup else None,
                             cgroup[1] if cgroup else None, qvdfs)
    return found


def _cgroup_usage(pid: int, root: Path = CGROUP_ROOT) -> tuple[float, float] | None:
    """(CPU seconds, memory bytes) of the liblxc payload cgroup holding process ``pid``;
    None if it cannot be read (the container stopped meanwhile)."""
    try:
        groups = {}
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            # Up to the payload group itself: an init may sit in a child of it.
            parts = path.strip("/").split("/")
            top = next(i for i, part in enumerate(parts) if part.startswith("lxc.payload."))
            for controller in controllers.split(","):
                groups[controller] = "/".join(parts[:top + 1])
        if (root / "cgroup.controllers").exists():  # cgroup v2 alone
            group = root / groups[""]
            stat = dict(line.split() for line in (group / "cpu.stat").read_text().splitlines())
            return int(stat["usage_usec"]) / 1e6, float((group / "memory.current").read_text())
        cpu = root / "cpuacct" / groups["cpuacct"] / "cpuacct.usage"
        memory = root / "memory" / groups["memory"] / "memory.usage_in_bytes"
        return int(cpu.read_text()) / 1e9, float(memory.read_text())
    except (OSError, ValueError, KeyError, StopIteration) as exc:
        log.debug("cgroup of process %d: %s", pid, exc)
        return None


def running_on(conn: Connection, host_id: int) -> set[int]:
    """The ids of the VMs the database has running on host ``host_id``."""
    return set(conn.execute(select(vms.c.id).where(
        vms.c.host_id == host_id, vms.c.state == VmState.RUNNING)).scalars())


def publish(conn: Connection, host_id: int, usages: dict[int, Usage]) -> None:
    """Make ``usages`` the published numbers of host ``host_id``'s VMs: the rows of its
    VMs not in ``usages`` (stopped, or moved elsewhere) go."""
    conn.execute(delete(vm_usage).where(vm_usage.c.host_id == host_id))
    if usages:
        conn.execute(insert(vm_usage), [
            {"vm_id": vm_id, "host_id": host_id, "at": usage.at,
             "cpu_seconds": usage.cpu_seconds, "memory_bytes": usage.memory_bytes,
             "qvdfs": None if usage.qvdfs is None else json.dumps(usage.qvdfs)}
            for vm_id, usage in usages.items()])


def published(conn: Connection, vm_id: int) -> tuple[str, Usage] | None:
    """(the publishing host's name, the numbers) last published for ``vm_id``; None if
    no HKD publishes any."""
    row = conn.execute(select(vm_usage, hosts.c.name.label("host"))
                       .join(hosts, hosts.c.id == vm_usage.c.host_id)
                       .where(vm_usage.c.vm_id == vm_id)).first()
    if row is None:
        return None
    return row.host, Usage(row.at, row.cpu_seconds, row.memory_bytes,
                           None if row.qvdfs is None else json.loads(row.qvdfs))
