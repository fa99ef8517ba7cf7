"""What a running VM uses, for its page: its root's qvdfs counters, its CPU and memory.

A VM whose root is mounted on the web server's own node is read here and now
(``vm/usage.py``: the qvdfs stats socket and the container's cgroup), which is how a
single node without an HKD shows them. Any other VM's numbers are those its node's
HKD last published into the database (every ``hkd.usage.interval``), shown with
their age and the host that published them.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from qvdctl.db.states import VmState
from qvdctl.db.store import Row
from qvdctl.node import Node
from qvdctl.vm import usage

log = logging.getLogger(__name__)


def vm_usage(node: Node, vm: Row) -> dict[str, Any]:
    """``{"why": line}`` when there is nothing to show, else ``{"source": line,
    "cpu_seconds": s or None, "memory_mib": MiB or None, "totals": {...} or None,
    "opcodes": [(name, requests, ms, µs per request), ...]}``, the costliest first;
    totals and opcodes are None for a root no qvdfs daemon serves."""
    if vm["state"] != VmState.RUNNING:
        return {"why": f"the VM is {vm['state']}"}
    found = None
    if vm["host"] == node.name():
        from qvdctl.container import seam  # here: it loads liblxc, for local VMs alone

        settings = node.settings()
        found = usage.read(node.storage(), seam.lxcpath_from(settings), {vm["id"]}).get(vm["id"])
        source = "Read now on this node"
    if found is None:
        with node.db.reader() as conn:
            published = usage.published(conn, vm["id"])
        if published is None:
            return {"why": f"the VM runs on host {vm['host']}, whose HKD has published"
                           " nothing of it yet"}
        host, found = published
        source = f"Published by host {host}'s HKD {max(time.time() - found.at, 0):.0f} s ago"
    shown: dict[str, Any] = {
        "source": source, "cpu_seconds": found.cpu_seconds,
        "memory_mib": None if found.memory_bytes is None else found.memory_bytes / 2**20,
        "totals": None, "opcodes": []}
    if found.qvdfs is not None:
        counters = dict(found.qvdfs)
        opcodes = counters.pop("opcodes", {})
        shown["opcodes"] = sorted(
            [(name, row["count"], row["ns"] / 1e6,
              row["ns"] / row["count"] / 1e3 if row["count"] else 0.0)
             for name, row in opcodes.items()], key=lambda r: -r[2])
        shown["totals"] = {k: v for k, v in counters.items() if not isinstance(v, dict)}
    return shown
