"""A running VM's root as its qvdfs daemon counts it, for the VM's page.

qvdctl never imports qvdfs (``qvdproc/__init__.py``), so the counters come from the
daemon's own command, ``qvdfs stats ROOTFS --json``, which asks it over its socket.
Only a VM running on this node can be asked; the page names the host of any other.
"""

from __future__ import annotations

import json
import logging
import subprocess
from typing import Any

from qvdctl.db.states import VmState
from qvdctl.db.store import Row
from qvdctl.mounting import QVDFS
from qvdctl.node import Node

log = logging.getLogger(__name__)

TIMEOUT_S = 10


def root_counters(node: Node, vm: Row) -> dict[str, Any]:
    """``{"why": line}`` when there is nothing to show, else ``{"totals": {...},
    "opcodes": [(name, requests, ms, µs per request), ...]}``, the costliest first."""
    if vm["state"] != VmState.RUNNING:
        return {"why": f"the VM is {vm['state']}"}
    if vm["host"] != node.name():
        return {"why": f"the VM runs on host {vm['host']}; its counters are read there"}
    rootfs = node.storage().rootfs_entry(vm["user_id"], vm["id"])
    try:
        done = subprocess.run([str(QVDFS), "stats", str(rootfs), "--json"], capture_output=True,
                              text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"why": f"its qvdfs daemon did not answer within {TIMEOUT_S} s"}
    if done.returncode != 0:
        # Kernel overlayfs or stock unionfs-fuse count nothing we could ask for.
        return {"why": "no qvdfs daemon answers for its root (vm.lxc.unionfs.type)"}
    counters = json.loads(done.stdout)
    opcodes = counters.pop("opcodes", {})
    rows = [(name, row["count"], row["ns"] / 1e6, row["ns"] / row["count"] / 1e3 if row["count"]
             else 0.0) for name, row in opcodes.items()]
    return {"totals": {k: v for k, v in counters.items() if not isinstance(v, dict)},
            "opcodes": sorted(rows, key=lambda r: -r[2])}
